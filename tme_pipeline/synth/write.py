"""Block-wise pyramidal OME-TIFF writer whose memory does not grow with slide size.

TIFF stores channel planes one after another (all tiles of channel 0, then channel 1, ...)
and reduced levels after level 0, while blocks are rendered with all channels at once. So
each rendered block and its 2x2-mean reductions go to a temporary chunked on-disk zarr
store, and the TIFF is then written from tile generators reading that store back.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

logger = logging.getLogger(__name__)


def pyramid_shapes(shape: tuple[int, int], *, min_px: int = 1024) -> list[tuple[int, int]]:
    """Level shapes (h, w): level 0, then halved (ceil) until the larger side is <= min_px."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > min_px:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample2(block: np.ndarray) -> np.ndarray:
    """2x2 mean of a (C, h, w) uint16 block (odd edges replicate the last row/column)."""
    c, h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    b = block.astype(np.uint32)
    s = b[:, 0::2, 0::2] + b[:, 1::2, 0::2] + b[:, 0::2, 1::2] + b[:, 1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint16)


def write_pyramid(path: str | Path, render: Callable[[tuple[int, int, int, int]], np.ndarray], *,
                  shape: tuple[int, int], channel_names: list[str], pixel_um: float,
                  block_px: int = 1024, tile_px: int = 512, uuid_seed: str = "") -> None:
    """Render a slide block by block and write it as a pyramidal tiled OME-TIFF.

    Parameters
    ----------
    path : output ``.ome.tif``.
    render : callable(window) -> (C, h, w) uint16 for window ``(y0, y1, x0, x1)``.
    shape : (height, width) of level 0 in pixels.
    channel_names : C names.
    pixel_um : level-0 pixel size in µm.
    block_px : rendered block edge in px; a multiple of ``2**(levels-1)`` and of 256.
    tile_px : TIFF tile edge (and temporary store chunk) in px.
    uuid_seed : text the OME UUID is derived from, so that equal inputs give equal bytes.
    """
    import zarr

    path = Path(path)
    shapes = pyramid_shapes(shape)
    n_sub = len(shapes) - 1
    if block_px % 256 or block_px % (2 ** n_sub):
        raise ValueError(f"{path}: block_px={block_px} must be a multiple of 256 and of {2 ** n_sub}")
    c = len(channel_names)
    h, w = shape
    with tempfile.TemporaryDirectory(prefix=".synth-", dir=path.parent) as tmp:
        levels = [zarr.create_array(store=f"{tmp}/level{k}.zarr", shape=(c, hk, wk), chunks=(1, tile_px, tile_px),
                                    dtype="uint16", fill_value=0, compressors=None)
                  for k, (hk, wk) in enumerate(shapes)]
        for y0 in range(0, h, block_px):
            for x0 in range(0, w, block_px):
                win = (y0, min(y0 + block_px, h), x0, min(x0 + block_px, w))
                _store(levels, win, render(win))
                release_free_memory()
            logger.debug("%s: rendered rows %d-%d of %d", path.name, y0, min(y0 + block_px, h), h)

        metadata = {"axes": "CYX", "Channel": {"Name": list(channel_names)},
                    "PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm",
                    "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"tme-synth:{uuid_seed}"))}
        bigtiff = c * h * w * 2 * 1.4 > 2 ** 31
        opts = dict(tile=(tile_px, tile_px), dtype=np.uint16, photometric="minisblack",
                    compression="zlib", compressionargs={"level": 1}, predictor=True, maxworkers=2,
                    buffersize=16 * 2**20)  # tifffile batches tiles this big; its default is 512 MB
        tmp_path = path.with_name(path.name + ".part")
        with tifffile.TiffWriter(tmp_path, bigtiff=bigtiff, ome=True) as tif:
            tif.write(_tiles(levels[0], tile_px), shape=(c, h, w), subifds=n_sub, metadata=metadata,
                      resolution=(1e4 / pixel_um, 1e4 / pixel_um), resolutionunit="CENTIMETER", **opts)
            for k in range(1, len(shapes)):
                f = 2 ** k
                tif.write(_tiles(levels[k], tile_px), shape=(c,) + shapes[k], subfiletype=1, metadata=None,
                          resolution=(1e4 / (pixel_um * f), 1e4 / (pixel_um * f)), resolutionunit="CENTIMETER",
                          **opts)
        tmp_path.replace(path)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Blocks allocate and free many mid-sized arrays; glibc keeps those on a heap whose holes
    count as resident memory, so RSS would creep up with the number of blocks. Dask's
    distributed workers trim for the same reason.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _store(levels, win: tuple[int, int, int, int], block: np.ndarray) -> None:
    """Write a level-0 block and its 2x2-mean reductions into the temporary store."""
    y0, y1, x0, x1 = win
    levels[0][:, y0:y1, x0:x1] = block
    for k in range(1, len(levels)):
        block = downsample2(block)
        ya, xa = y0 >> k, x0 >> k
        levels[k][:, ya:ya + block.shape[1], xa:xa + block.shape[2]] = block


def _tiles(arr, tile_px: int) -> Iterator[np.ndarray]:
    """Tiles of a (C, h, w) zarr array in TIFF order, padded to full tiles."""
    c, h, w = arr.shape
    for ch in range(c):
        for y0 in range(0, h, tile_px):
            for x0 in range(0, w, tile_px):
                t = arr[ch, y0:y0 + tile_px, x0:x0 + tile_px]
                if t.shape != (tile_px, tile_px):
                    t = np.pad(t, ((0, tile_px - t.shape[0]), (0, tile_px - t.shape[1])))
                yield t
