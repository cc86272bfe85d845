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

__all__ = ["WindowSource", "label_array", "map_tiles", "output_array", "shared_args", "window_source"]


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
    arrays : sequence of dask.array.Array or WindowSource, each (..., Y, X)
        Lazily read images whose last two axes are ``grid.shape_yx``. A dask array that
        only wraps a lazily sliced store (``da.from_array`` of a zarr array or of the
        slide's TIFF level, as :func:`window_source` finds) is read from that store
        directly, one read per window.
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
    arrays = [a if isinstance(a, WindowSource) else window_source(a) for a in arrays]
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
        windows = [_Window(a, box) for a in arrays]
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
    tiles in flight, however large the slide. A window of a store is one read of
    that store (a TIFF level decodes only the file tiles it covers); through dask,
    each dask chunk it touches is one read (a zarr call, a graph to order) and a
    whole chunk decoded where dask cannot fuse the slice (an integer index):
    about three times the CPU of the direct read, on a 1250 px window of 8 channels.
    """

    def __init__(self, array: "da.Array | WindowSource", box: Box) -> None:
        if isinstance(array, WindowSource):
            self.source, self.box, self.array = array, box, None
        else:
            self.source, self.box, self.array = None, box, array[(Ellipsis, *box_slices(box))]

    def read(self) -> np.ndarray:
        if self.source is not None:
            return self.source.read(self.box)
        return np.asarray(self.array.compute(scheduler="synchronous"))


class WindowSource:
    """A lazily sliced (..., Y, X) store and a selection on its leading axes; picklable.

    Parameters
    ----------
    store : array-like
        Has ``shape``, ``dtype`` and a ``__getitem__`` that reads only what is sliced
        (zarr.Array, :class:`tme_pipeline.io.TiffLevel`, or an in-memory ndarray); it must
        pickle to run on a distributed cluster (a zarr array on disk and a TIFF level do).
    lead : int, slice, sequence of int or None
        Selection on the first axis (e.g. channels) of a 3-D store; None: all.

    Attributes
    ----------
    shape : tuple of int
        Shape after the selection.
    dtype : numpy.dtype
    ndim : int
    """

    def __init__(self, store: Any, lead: int | slice | Sequence[int] | None = None) -> None:
        self.store = store
        self.dtype = np.dtype(store.dtype)
        shape = tuple(int(s) for s in store.shape)
        if lead is None:
            self._key: tuple = ()
            self._pick: Any = None
        elif len(shape) < 3:
            raise ValueError(f"WindowSource: a selection on the leading axis needs a 3-D store, got {shape}")
        elif isinstance(lead, (int, np.integer)):
            if not -shape[0] <= int(lead) < shape[0]:
                raise IndexError(f"WindowSource: index {lead} out of range for {shape[0]} channels")
            self._key, self._pick = (int(lead) % shape[0],), None
        elif isinstance(lead, slice):
            self._key, self._pick = (lead,), None
        else:
            index = np.asarray(lead, dtype=np.int64).ravel()
            if index.size == 0 or index.min() < -shape[0] or index.max() >= shape[0]:
                raise IndexError(f"WindowSource: indices {index.tolist()} out of range for {shape[0]} channels")
            index %= shape[0]
            lo, hi = int(index.min()), int(index.max()) + 1
            # One read of the channels' bounding range, then the pick: no store sees fancy keys.
            self._key, self._pick = (slice(lo, hi),), index - lo
        if not self._key:
            self.shape = shape
        elif self._pick is not None:
            self.shape = (self._pick.size, *shape[1:])
        elif isinstance(self._key[0], slice):
            self.shape = (len(range(*self._key[0].indices(shape[0]))), *shape[1:])
        else:
            self.shape = shape[1:]
        self.ndim = len(self.shape)

    def read(self, box: Box) -> np.ndarray:
        """The window ``box`` ``(y0, x0, y1, x1)`` of the last two axes; ndarray, native dtype."""
        middle = (slice(None),) * (self.store.ndim - len(self._key) - 2)
        out = np.asarray(self.store[(*self._key, *middle, *box_slices(box))])
        return out if self._pick is None else out[self._pick]


def window_source(array: Any, lead: int | slice | Sequence[int] | None = None) -> "WindowSource | da.Array":
    """The store behind `array` as a :class:`WindowSource`, or the dask array where there is none.

    Parameters
    ----------
    array : zarr.Array, dask.array.Array, WindowSource or ndarray
        A dask array counts as a store only when it is ``da.from_array`` of one, untouched
        (a slide level, ``da.from_zarr``): its graph is that store and the chunk getters.
    lead : int, slice, sequence of int or None
        Selection on the leading axis, applied lazily either way.

    Returns
    -------
    WindowSource or dask.array.Array
        What :func:`map_tiles` reads windows of: directly from the store, or through dask.
    """
    if isinstance(array, WindowSource):
        if lead is None:
            return array
        array = array.store if array._key == () else None
        if array is None:
            raise ValueError("window_source: a selection on an already selected WindowSource")
    store = array
    if isinstance(array, da.Array):
        store = _wrapped_store(array)
        if store is None:
            return array if lead is None else array[lead]
    if isinstance(store, (zarr.Array, np.ndarray)) or _is_lazy_store(store):
        return WindowSource(store, lead)
    dask_array = da.asarray(array)
    return dask_array if lead is None else dask_array[lead]


def _wrapped_store(array: da.Array) -> Any | None:
    """The object ``da.from_array`` wrapped into `array`, if the graph is only that; else None."""
    layers = array.dask.layers
    original = f"original-{array.name}"
    if len(layers) != 2 or original not in layers:
        return None
    values = list(layers[original].values())
    if len(values) != 1:
        return None
    store = values[0]
    store = getattr(store, "value", store)  # a DataNode in dask's task spec
    if not hasattr(store, "dtype") or tuple(getattr(store, "shape", ())) != tuple(array.shape):
        return None
    if np.dtype(store.dtype) != array.dtype:
        return None
    return store


def _is_lazy_store(store: Any) -> bool:
    from ..io._tiffread import TiffLevel

    return isinstance(store, TiffLevel)


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
