"""Per-tile work over a :class:`TileGrid`: one Dask task per tile, each reading its own window.

Every tiled stage (segmentation, cell growth, measurement) runs through :func:`map_tiles`.
Why not :func:`dask.array.map_overlap`: two of the three stages return no array per
block (a tile's owned objects, a table of its cells), and map_overlap builds each
block's halo from its neighbours' chunks as shared tasks, so a slide chunk stays in
memory until every tile around it has run. Here a task reads its window itself, from
the lazy slide, and memory stays bounded by the tiles in flight however large the
slide (the reason for commit 216a4ab).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from ._grid import Box, Tile, TileGrid, box_slices, window_box

__all__ = ["label_array", "map_tiles", "output_array", "shared_args"]


def map_tiles(
    func: Callable[..., Any],
    arrays: Sequence[da.Array],
    *,
    grid: TileGrid,
    margin_px: int,
    args: Sequence[Any] = (),
) -> list[dask.delayed]:
    """One lazy task per tile, in tile order: ``func(*windows, tile, box, *args)``.

    Parameters
    ----------
    func : callable
        Called once per tile with, in order: the window of each array (ndarray,
        the array's leading axes whole and its last two cut to ``box``), the
        :class:`Tile`, its window ``box`` ``(y0, x0, y1, x1)`` (px), and `args`.
        Must be picklable (a module-level function) to run on a distributed cluster.
    arrays : sequence of dask.array.Array, each (..., Y, X)
        Lazily read images whose last two axes are ``grid.shape_yx``.
    grid : TileGrid
    margin_px : int
        Each window is the tile's core grown by this, clipped to the image (px);
        ``grid.overlap_px`` gives the padded window.
    args : sequence, optional
        Further arguments of `func`, the same for every tile.

    Returns
    -------
    list of dask.delayed.Delayed
        ``grid.n_tiles`` tasks; ``dask.compute(*tasks)`` gives the results, or
        later tasks may take them as inputs. A window is read inside its task,
        never as a task of its own, so no slide chunk waits in memory for the
        tiles that share it.

    Examples
    --------
    >>> import dask, dask.array as da, numpy as np
    >>> from tme_pipeline.tiling import tile_grid
    >>> g = tile_grid((8, 8), pixel_um=1.0, tile_um=4, overlap_um=1, max_object_um=1)
    >>> image = da.from_array(np.arange(64).reshape(8, 8), chunks=3)
    >>> def shape(window, tile, box):
    ...     return tile.index, box, window.shape
    >>> dask.compute(*map_tiles(shape, [image], grid=g, margin_px=1))[3]
    (3, (3, 3, 8, 8), (5, 5))
    """
    arrays = list(arrays)
    for a in arrays:
        if tuple(a.shape[-2:]) != grid.shape_yx:
            raise ValueError(f"map_tiles: an array of shape {a.shape} does not end in the grid's {grid.shape_yx}")
    if not margin_px >= 0:
        raise ValueError(f"map_tiles: margin_px must be >= 0, got {margin_px}")
    # Named keys (``_measure_tile-12-…``) keep the stage and tile readable on a dashboard.
    name = f"{getattr(func, '__name__', 'tile')}-{{}}-{uuid.uuid4().hex}"
    args = shared_args(*args)
    tasks = []
    for tile in grid.tiles:
        box = window_box(grid, tile, margin_px)
        windows = [_Window(a[(Ellipsis, *box_slices(box))]) for a in arrays]
        tasks.append(dask.delayed(_run_tile, pure=False)(
            func, windows, tile, box, *args, dask_key_name=name.format(tile.index)))
    return tasks


def shared_args(*values: Any) -> list[Any]:
    """Each value as one opaque graph key, for passing to many delayed calls.

    Dask walks every argument of every delayed call looking for collections, a dataclass
    field by field: a grid of 64 tiles or a segmenter holding its model was walked once per
    tile (a tenth of a StarDist segment stage's CPU time, 4 × 4 mm). Wrapped once, each is a
    key the calls share. Dask collections are left as they are, to be computed.
    """
    return [v if dask.is_dask_collection(v) else dask.delayed(v, traverse=False) for v in values]


def _run_tile(func: Callable[..., Any], windows: list["_Window"], tile: Tile, box: Box, *args: Any) -> Any:
    return func(*(w.read() for w in windows), tile, box, *args)


class _Window:
    """A tile's lazy window, opaque to the outer graph.

    Read inside the task that uses it, so that a slide chunk is never held
    in memory waiting for its other dependents: memory stays bounded by the
    tiles in flight, however large the slide.
    """

    def __init__(self, array: da.Array) -> None:
        self.array = array

    def read(self) -> np.ndarray:
        return np.asarray(self.array.compute(scheduler="synchronous"))


def label_array(labels: zarr.Array | da.Array | np.ndarray, grid: TileGrid) -> da.Array:
    """A (Y, X) integer label image of the grid's shape, as a lazy dask array.

    Raises
    ------
    ValueError
        Not 2-D, not the grid's shape, or not integer.
    """
    if isinstance(labels, zarr.Array):
        labels = da.from_zarr(labels)
    elif not isinstance(labels, da.Array):
        labels = da.asarray(labels)
    if labels.ndim != 2 or tuple(labels.shape) != grid.shape_yx or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"need integer labels of the grid's shape {grid.shape_yx}, got {labels.dtype} {labels.shape}"
        )
    return labels


def output_array(store: zarr.Group | str | os.PathLike, component: str, grid: TileGrid) -> zarr.Array:
    """The (Y, X) integer zarr array a tiled stage writes, one tile core per chunk write.

    An existing array at `component` is reused if it has the grid's shape, an
    integer dtype and chunks that divide the tile (so that no two tiles write one
    chunk); otherwise a uint32 array chunked by the tile core is created.

    Raises
    ------
    ValueError
        An existing array of another shape, dtype or chunking.
    """
    group = store if isinstance(store, zarr.Group) else zarr.open_group(store, mode="a")
    if component in group:
        arr = group[component]
        if not isinstance(arr, zarr.Array) or tuple(arr.shape) != grid.shape_yx:
            raise ValueError(
                f"{component!r} in {group.store} is not a {grid.shape_yx} array: {arr}"
            )
        if not np.issubdtype(arr.dtype, np.integer) or any(grid.tile_px % c for c in arr.chunks):
            raise ValueError(
                f"{component!r} in {group.store}: need integer dtype and chunks dividing "
                f"the tile ({grid.tile_px} px), got {arr.dtype} chunks {arr.chunks}"
            )
        return arr
    return group.create_array(
        component, shape=grid.shape_yx, chunks=(grid.tile_px, grid.tile_px),
        dtype="uint32", fill_value=0,
    )
