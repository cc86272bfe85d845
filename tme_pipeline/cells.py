"""Nuclei -> cells: every nucleus grows by a fixed distance, cells never overlap.

The growth is :func:`skimage.segmentation.expand_labels` (each background pixel
within the distance takes the label of its nearest nucleus), done tile by tile
over the segmentation's :class:`~tme_pipeline.tiling.TileGrid` so that memory
is bounded by one window, whatever the slide's size.

A tile reads the nuclei over its core grown by ``ceil(expand_px) + 1`` px. A
pixel of the core that ends up in a cell is at most ``expand_px`` from its
nearest nucleus, so every nucleus at that distance or closer, equidistant ones
included, lies inside the window: the window's distance transform sees the
same nearest seeds as the whole slide's and the core is the same as the
untiled result, pixel for pixel (``tests/test_cells.py`` checks this).
"""

from __future__ import annotations

import logging
import math
import os

import dask
import dask.array as da
import numpy as np
import zarr

from .tiling import Box, Tile, TileGrid, label_array, map_tiles, output_array

__all__ = ["expand_nuclei_tiled"]

logger = logging.getLogger(__name__)


def expand_nuclei_tiled(
    nuclei: zarr.Array | da.Array,
    *,
    grid: TileGrid,
    pixel_um: float,
    expand_um: float,
    store: zarr.Group | str | os.PathLike,
    component: str = "0",
) -> zarr.Array:
    """Grow every nucleus into its cell, tile by tile, into a zarr label image.

    Parameters
    ----------
    nuclei : zarr.Array or dask.array.Array, shape (Y, X), integer
        Stitched level-0 nucleus labels (0 background), e.g.
        ``labels.ome.zarr/labels/nuclei/0``; read one window at a time.
    grid : TileGrid
        The segmentation's grid (:func:`tme_pipeline.tiling.tile_grid`).
    pixel_um : float
        Level-0 pixel size, µm.
    expand_um : float
        Growth distance, µm (``CellsConfig.expand_um``); 0 gives cells equal to
        the nuclei.
    store : zarr.Group or path
        Group (or its path) that receives the cells at `component`, e.g.
        ``labels.ome.zarr/labels/cells``. An existing integer array there of
        shape (Y, X) whose chunks divide the tile is reused (as made by
        :func:`tme_pipeline.io.labels.create_labels_zarr`); otherwise a uint32
        one chunked by the tile core is created.
    component : str, optional
        Array path inside `store`.

    Returns
    -------
    zarr.Array, shape (Y, X)
        Cell labels: cell id = nucleus id, every nucleus pixel keeps its label,
        and each background pixel within `expand_um` of a nucleus (pixel centre
        to pixel centre) takes the label of the nearest one. Equal to
        ``skimage.segmentation.expand_labels(nuclei, expand_um / pixel_um)``.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> from tme_pipeline.tiling import tile_grid
    >>> nuc = np.zeros((8, 8), np.uint32); nuc[3, 3] = 5
    >>> g = tile_grid(nuc.shape, pixel_um=1.0, tile_um=4, overlap_um=2, max_object_um=1)
    >>> cells = expand_nuclei_tiled(nuc, grid=g, pixel_um=1.0, expand_um=1.0,
    ...                             store=zarr.group(), component="cells")
    >>> int((cells[:] == 5).sum())  # the pixel and its 4 neighbours
    5
    """
    if not pixel_um > 0 or not expand_um >= 0:
        raise ValueError(f"need pixel_um > 0 and expand_um >= 0, got pixel_um={pixel_um}, expand_um={expand_um}")
    nuclei = label_array(nuclei, grid)
    out = output_array(store, component, grid)
    expand_px = expand_um / pixel_um
    margin = math.ceil(expand_px) + 1
    dask.compute(*map_tiles(_expand_tile, [nuclei], grid=grid, margin_px=margin, args=(expand_px, out)))
    logger.info("expanded nuclei by %.2f µm into %s", expand_um, out.path or component)
    return out


def _expand_tile(labels: np.ndarray, tile: Tile, box: Box, expand_px: float, out) -> None:
    from skimage.segmentation import expand_labels

    wy0, wx0 = box[:2]
    y0, x0, y1, x1 = tile.core
    if labels.any() and expand_px > 0:
        labels = expand_labels(labels, distance=expand_px)
    out[y0:y1, x0:x1] = labels[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0].astype(out.dtype, copy=False)
