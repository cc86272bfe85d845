"""Segment a slide tile by tile and stitch one label image.

A slide is cut into square tile *cores* that partition it (``_grid.py``); each core is
segmented inside a *padded* window (core + overlap on every side, clipped to
the image). As in StarDist's ``predict_instances_big``, an object belongs to
exactly the tile whose core contains its centre, and the overlap is larger
than the largest object, so an owned object lies whole inside its tile's
window and is never cut by a seam.

The label image is never held whole. One Dask graph, run on whatever
scheduler is active, does three small steps per tile:

1. *segment*: read the padded window, segment it, keep the owned objects and
   stash their window crop (local ids 1..k) in a temporary on-disk zarr;
2. *resolve*: where an owned object overlaps pixels owned by a tile of lower
   index (the two tiles saw a border region slightly differently), the lower
   tile wins those pixels; an object left with less than half its pixels is a
   duplicate and is dropped;
3. *write*: global ids are offsets from the per-tile counts (tile order, then
   local order), and every output chunk (one tile core) is painted from the
   stashed crops of the <= 9 tiles whose window covers it, lowest index first.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from ._grid import Box, Tile, TileGrid
from ._tasks import WindowSource, map_tiles, output_array, shared_args

__all__ = ["StitchResult", "segment_tiled"]

logger = logging.getLogger(__name__)

# An object that keeps less than this share of its pixels after contested
# pixels went to a lower tile is that tile's object seen twice: drop it.
_MIN_KEPT_FRACTION = 0.5


@dataclass(frozen=True)
class StitchResult:
    """Output of :func:`segment_tiled`.

    Attributes
    ----------
    labels : zarr.Array
        (Y, X) uint32 level-0 labels, 0 background, ids 1..n_objects.
    n_objects : int
        Number of objects.
    centroids_yx_px : (n_objects, 2) float64 ndarray
        Centroid of object ``i + 1`` in level-0 px (y, x), as segmented by its
        owning tile (before contested pixels went to a lower tile).
    """

    labels: zarr.Array
    n_objects: int
    centroids_yx_px: np.ndarray


@dataclass(frozen=True)
class _Owned:
    """Objects a tile owns: local ids 1..count in its stashed crop."""

    index: int
    count: int
    centroids_yx_px: np.ndarray  # (count, 2) float64, global px


def segment_tiled(
    image: da.Array,
    segment_tile: Callable[[np.ndarray], np.ndarray],
    *,
    grid: TileGrid,
    store: zarr.Group | str | os.PathLike,
    component: str = "0",
) -> StitchResult:
    """Segment a large 2-D image tile by tile and stitch one global label image.

    Parameters
    ----------
    image : (Y, X) dask.array.Array or WindowSource
        One channel of a slide's level 0, lazily read; any chunking.
        ``window_source(slide.levels[0], channel)`` reads each window straight from the
        file (a third of the CPU of ``slide.levels[0][channel]`` through dask).
    segment_tile : callable
        Maps a padded window, (h, w) ndarray, to int labels of the same shape
        (0 background). Must be deterministic and picklable (e.g. a
        :func:`functools.partial` of a module-level function) to run on a
        distributed cluster.
    grid : TileGrid
        From :func:`tile_grid` for ``image.shape``.
    store : zarr.Group or path
        Group (or its path) that receives the labels at `component`. An
        existing array there is reused if its shape matches and its chunks
        divide the tile; otherwise one is created, chunked by the tile core.
        The temporary stash is made next to the store on disk (shared with the
        workers) and removed afterwards.
    component : str, optional
        Array path inside `store`.

    Returns
    -------
    StitchResult
        The uint32 zarr labels (ids 1..N, unique, consecutive, numbered by tile
        index then by the centre's raster order within the tile), N, and the
        centroids. The same for any scheduler and number of workers.

    Notes
    -----
    Contested pixels (claimed by owned objects of two tiles) go to the tile of
    lower index; an object keeping less than half of its pixels is dropped as a
    duplicate. Peak memory per task is about nine stashed windows.
    """
    if not isinstance(image, (da.Array, WindowSource)):
        image = da.asarray(image)
    if image.ndim != 2 or tuple(image.shape) != grid.shape_yx:
        raise ValueError(f"image shape {image.shape} does not match the grid's {grid.shape_yx}")
    out = output_array(store, component, grid)
    stash_dir = Path(tempfile.mkdtemp(prefix=".tme-stash-", dir=_local_dir(out)))
    logger.info(
        "segmenting %d tiles of %d px (+%d px overlap), stash %s",
        grid.n_tiles, grid.tile_px, grid.overlap_px, stash_dir,
    )
    try:
        stash = zarr.create_array(
            store=str(stash_dir / "crops.zarr"),
            shape=(grid.n_tiles, *grid.window_px),
            chunks=(1, *grid.window_px),
            dtype="uint32",
            fill_value=0,
        )
        owned = map_tiles(_segment_and_stash, [image], grid=grid, margin_px=grid.overlap_px,
                          args=(segment_tile, stash))
        grid_key, stash_key, out_key = shared_args(grid, stash, out)
        keeps = []
        for tile in grid.tiles:
            earlier = [t.index for t in grid.tiles_touching(tile.padded) if t.index < tile.index]
            keeps.append(
                dask.delayed(_resolve_contested, pure=False)(
                    owned[tile.index], [owned[i] for i in earlier], grid_key, stash_key
                )
            )
        luts = dask.delayed(_global_ids, pure=False)(keeps)
        writes = []
        for tile in grid.tiles:
            sources = [t.index for t in grid.tiles_touching(tile.core)]
            writes.append(
                dask.delayed(_write_core, pure=False)(
                    tile, [luts[i] for i in sources], grid_key, stash_key, out_key
                )
            )
        summary = dask.delayed(_summarise, pure=False)(owned, keeps)
        (n_objects, centroids), *_ = dask.compute(summary, *writes)
    finally:
        shutil.rmtree(stash_dir, ignore_errors=True)
    logger.info("stitched %d objects", n_objects)
    return StitchResult(out, n_objects, centroids)


def _local_dir(arr: zarr.Array) -> str | None:
    """Folder next to the output store on disk, or None (system temp) for others."""
    root = getattr(arr.store, "root", None)
    return str(Path(root).parent) if root is not None else None


def _segment_and_stash(window: np.ndarray, tile: Tile, box: Box, segment_tile, stash) -> _Owned:
    """Segment `tile`'s padded window (`box` = ``tile.padded``), stash its owned objects."""
    lab = np.asarray(segment_tile(window))
    if lab.shape != window.shape or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(
            f"segment_tile returned {lab.dtype} {lab.shape} for tile {tile.index}; "
            f"expected integer labels of shape {window.shape}"
        )
    h, w = lab.shape
    inverse, ids = lab.ravel().astype(np.intp, copy=False), None
    if inverse.size and (inverse.min() < 0 or inverse.max() > inverse.size):
        ids, inverse = np.unique(inverse, return_inverse=True)  # ids too sparse to index bins
    # Labels index the bins themselves: np.unique sorted every pixel of the window
    # (0.25 s CPU per 1184² tile, 7 % of a `tme segment`).
    area = np.bincount(inverse)
    sum_y = np.bincount(inverse, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=len(area))
    sum_x = np.bincount(inverse, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=len(area))
    present = np.flatnonzero(area)
    ids = present if ids is None else ids[present]
    py0, px0 = box[:2]
    cy = py0 + sum_y[present] / area[present]
    cx = px0 + sum_x[present] / area[present]
    # Round half up (not half to even) so the owner of a centre exactly on a
    # seam does not depend on parity.
    ry, rx = np.floor(cy + 0.5), np.floor(cx + 0.5)
    y0, x0, y1, x1 = tile.core
    own = (ids > 0) & (ry >= y0) & (ry < y1) & (rx >= x0) & (rx < x1)
    sel = np.flatnonzero(own)
    sel = sel[np.lexsort((ids[sel], rx[sel], ry[sel]))]
    lut = np.zeros(len(area), dtype=np.uint32)
    lut[present[sel]] = np.arange(1, len(sel) + 1, dtype=np.uint32)
    if len(sel):
        stash[tile.index, :h, :w] = lut[inverse].reshape(h, w)
    return _Owned(tile.index, len(sel), np.stack([cy[sel], cx[sel]], axis=1))


def _read_stash(stash, tile: Tile, box: Box) -> np.ndarray:
    """Stashed local ids of `tile` over the global `box` (inside its window)."""
    py0, px0 = tile.padded[:2]
    return stash[tile.index, box[0] - py0:box[2] - py0, box[1] - px0:box[3] - px0]


def _intersect(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


def _resolve_contested(own: _Owned, earlier: list[_Owned], grid: TileGrid, stash) -> np.ndarray:
    """Which owned objects survive; (count,) bool. Lower tiles win contested pixels."""
    if own.count == 0:
        return np.zeros(0, dtype=bool)
    tile = grid.tiles[own.index]
    crop = _read_stash(stash, tile, tile.padded)
    claimed = np.zeros(crop.shape, dtype=bool)
    for other in earlier:
        box = _intersect(tile.padded, grid.tiles[other.index].padded)
        if other.count == 0 or box is None:
            continue
        py0, px0 = tile.padded[:2]
        claimed[box[0] - py0:box[2] - py0, box[1] - px0:box[3] - px0] |= (
            _read_stash(stash, grid.tiles[other.index], box) > 0
        )
    area = np.bincount(crop.ravel(), minlength=own.count + 1)[1:]
    lost = np.bincount(crop[claimed], minlength=own.count + 1)[1:]
    keep = area - lost >= _MIN_KEPT_FRACTION * area
    if not keep.all():
        logger.debug("tile %d: %d duplicate objects dropped", own.index, int((~keep).sum()))
    return keep


def _global_ids(keeps: list[np.ndarray]) -> list[np.ndarray]:
    """Per tile, a lookup table local id -> global id (0 for dropped)."""
    counts = np.array([k.sum() for k in keeps], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    luts = []
    for keep, offset in zip(keeps, offsets):
        lut = np.zeros(len(keep) + 1, dtype=np.uint32)
        lut[1:][keep] = offset + np.arange(1, keep.sum() + 1)
        luts.append(lut)
    return luts


def _write_core(tile: Tile, luts: list[np.ndarray], grid: TileGrid, stash, out) -> None:
    """Paint one output chunk from the windows covering it, lowest tile first."""
    y0, x0, y1, x1 = tile.core
    block = np.zeros((y1 - y0, x1 - x0), dtype=out.dtype)
    for src, lut in zip(grid.tiles_touching(tile.core), luts):
        box = _intersect(tile.core, src.padded)
        if box is None or not lut.any():
            continue
        region = block[box[0] - y0:box[2] - y0, box[1] - x0:box[3] - x0]
        ids = lut[_read_stash(stash, src, box)]
        free = (region == 0) & (ids > 0)
        region[free] = ids[free]
    out[y0:y1, x0:x1] = block


def _summarise(owned: list[_Owned], keeps: list[np.ndarray]) -> tuple[int, np.ndarray]:
    centroids = [o.centroids_yx_px[k] for o, k in zip(owned, keeps)]
    cat = np.concatenate(centroids) if centroids else np.zeros((0, 2))
    return len(cat), cat
