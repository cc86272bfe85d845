"""Lazy, picklable, tile-wise reads of one pyramid level of a TIFF file.

A :class:`TiffLevel` holds only the file's path and how to find the level in it,
so a dask graph built on it pickles to a distributed worker. The worker opens
the file on first read and keeps the handle in a per-process cache.

Handle lifetime: :func:`tme_pipeline.io.slides.open_slide` parses metadata with
its own handle and closes it before returning. Reads open handles through
:data:`_CACHE`, which keeps at most :data:`MAX_OPEN_FILES` files open per
process and closes the least recently used one that no read is using (so it
briefly holds more only while more reads than that are in flight).
:func:`clear_handle_cache` closes them all. A file whose size or mtime differs
from what it had at open is refused at read time, since its pixels may no
longer match the slide's metadata (workers must see the same file, as on a
shared file system, not a re-copied one).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from ._common import SlideError, dask_chunk_yx

__all__ = ["TiffLevel", "level_to_dask", "clear_handle_cache", "open_handles", "MAX_OPEN_FILES"]

#: Open TIFF files kept per process; each costs one file descriptor and its
#: parsed IFDs (small beside the pixels a worker holds).
MAX_OPEN_FILES = 32

# A locator says how to find a level after reopening the file:
#   ("series", series_index, level_index): tifffile's own series parsing;
#   ("pages", (page_index, ...)): top-level IFDs, one per channel (QPTIFF).
Locator = tuple


class _Entry:
    """One open file, the zarr arrays made from it, and how many reads use it."""

    def __init__(self, tif: tifffile.TiffFile) -> None:
        self.tif = tif
        self.arrays: dict[Locator, Any] = {}
        self.users = 0


class _HandleCache:
    """Per-process LRU of open TIFF files, safe under dask's threaded scheduler."""

    def __init__(self, max_open: int) -> None:
        self.max_open = max_open
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, path: Path, locator: Locator, stamp: tuple[int, int]) -> tuple[_Entry, Any]:
        """Open (or reuse) the file and the level's zarr array; mark them in use.

        ``stamp`` is the file's ``(st_mtime_ns, st_size)`` when the slide was
        opened: pixels of a file rewritten since then would not match the slide's
        metadata, so that is an error rather than a silent reread.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: slide file no longer exists") from None
        if (st.st_mtime_ns, st.st_size) != tuple(stamp):
            raise SlideError(path, "file changed on disk since the slide was opened; open it again")
        # The pid keeps a forked worker from sharing its parent's file offsets.
        key = (os.getpid(), str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(tifffile.TiffFile(path))
                self._entries[key] = entry
                self._evict()
            self._entries.move_to_end(key)
            array = entry.arrays.get(locator)
            if array is None:
                array = zarr.open_array(_store(entry.tif, locator), mode="r")
                entry.arrays[locator] = array
            entry.users += 1
        return entry, array

    def release(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            self._evict()

    def clear(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                entry.tif.close()
            self._entries.clear()

    def _evict(self) -> None:
        # Called with the lock held. Files in use are skipped, so the cache can
        # exceed max_open briefly while more reads than that are in flight.
        for key in list(self._entries):
            if len(self._entries) <= self.max_open:
                break
            entry = self._entries[key]
            if entry.users == 0:
                entry.tif.close()
                del self._entries[key]


_CACHE = _HandleCache(MAX_OPEN_FILES)


def clear_handle_cache() -> None:
    """Close every TIFF file this process holds open for lazy reads.

    Call it between computations (in tests, or before deleting slide files);
    a read still running would lose its file. Later reads reopen what they need.
    """
    _CACHE.clear()


def open_handles() -> int:
    """Number of TIFF files this process holds open for lazy reads."""
    return len(_CACHE)


def _store(tif: tifffile.TiffFile, locator: Locator) -> Any:
    kind = locator[0]
    if kind == "series":
        _, series_index, level_index = locator
        return tif.series[series_index].aszarr(level=level_index)
    if kind == "pages":
        pages = [tif.pages[i] for i in locator[1]]
        first = pages[0]
        series = tifffile.TiffPageSeries(
            pages, (len(pages), *first.shape), first.dtype, "C" + first.axes, parent=tif
        )
        return series.aszarr()
    raise ValueError(f"unknown TIFF level locator {locator!r}")


class TiffLevel:
    """Array-like ``(C, Y, X)`` view of one pyramid level; reads only what is sliced.

    Parameters
    ----------
    path : Path
        The TIFF file.
    locator : tuple
        Where the level is in the file (see module notes).
    shape : tuple of int
        ``(C, Y, X)`` in pixels.
    dtype : numpy.dtype
        Native pixel type.
    """

    def __init__(
        self, path: Path, locator: Locator, shape: tuple[int, int, int], dtype: Any, stamp: tuple[int, int]
    ) -> None:
        self.path = Path(path)
        self.locator = locator
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 3
        self.stamp = tuple(stamp)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        box, rest = _bounding_box(key, self.shape)
        entry = None
        try:
            entry, array = _CACHE.acquire(self.path, self.locator, self.stamp)
            if array.ndim == 2:
                # tifffile squeezes a single-channel series to (Y, X).
                out = np.asarray(array[box[1:]])
                out = out if isinstance(box[0], int) else out[np.newaxis][box[0]]
            else:
                out = np.asarray(array[box])
        except SlideError:
            raise
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, RuntimeError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise SlideError(
                self.path, f"cannot read pixels, the file is truncated or corrupted ({exc})"
            ) from exc
        finally:
            if entry is not None:
                _CACHE.release(entry)
        return out if rest is None else out[rest]


def _bounding_box(key: tuple, shape: tuple[int, ...]) -> tuple[tuple, tuple | None]:
    """Split a numpy key into slices to read and the fancy part to apply after.

    Dask passes fancy (list or boolean) keys only when a user indexes that way;
    reading their bounding box keeps reads tile-wise without zarr's own rules for
    fancy indexing.
    """
    if all(isinstance(k, (int, np.integer, slice)) for k in key):
        return tuple(int(k) if isinstance(k, np.integer) else k for k in key), None
    box, rest = [], []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer, slice)):
            box.append(int(k) if isinstance(k, np.integer) else k)
            if not isinstance(k, (int, np.integer)):
                rest.append(slice(None))
            continue
        index = np.asarray(k)
        index = np.flatnonzero(index) if index.dtype == bool else index % n
        lo = int(index.min()) if index.size else 0
        hi = int(index.max()) + 1 if index.size else 0
        box.append(slice(lo, hi))
        rest.append(index - lo)
    return tuple(box), tuple(rest)


def level_to_dask(
    path: Path,
    locator: Locator,
    shape: tuple[int, int, int],
    dtype: Any,
    *,
    store_chunk_yx: tuple[int, int],
    stat: os.stat_result,
) -> da.Array:
    """Wrap one level as a lazy dask array, chunked on whole file tiles.

    Parameters
    ----------
    path : Path
        The TIFF file.
    locator : tuple
        Where the level is in the file.
    shape : tuple of int
        ``(C, Y, X)`` in pixels.
    dtype : numpy.dtype
        Native pixel type.
    store_chunk_yx : tuple of int
        The file's tile (or strip) shape ``(Y, X)`` in pixels.
    stat : os.stat_result
        The file's stat at open: reads refuse a file changed since, and the dask
        name changes with it.

    Returns
    -------
    dask.array.Array
        ``(C, Y, X)``, one channel per chunk.
    """
    _, ny, nx = shape
    chunks = (1, dask_chunk_yx(store_chunk_yx[0], ny), dask_chunk_yx(store_chunk_yx[1], nx))
    stamp = (stat.st_mtime_ns, stat.st_size)
    name = "slide-" + tokenize(str(path), stamp, locator, shape)
    return da.from_array(
        TiffLevel(path, locator, shape, dtype, stamp),
        chunks=chunks,
        name=name,
        asarray=True,
        meta=np.empty((0, 0, 0), dtype=dtype),
    )
