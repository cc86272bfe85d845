"""OME-Zarr (NGFF 0.4) label images: ``OUT/slides/<id>/labels.ome.zarr``.

Layout (zarr format 2, ``/``-separated chunk keys, as ome-zarr-py writes 0.4)::

    labels.ome.zarr/            root: multiscales overview image (DAPI at low
                                resolution, :func:`write_overview_image`)
      0/                        (C, Y, X) overview pixels
      labels/                   attrs {"labels": ["nuclei", "cells"]}
        nuclei/                 multiscales + "image-label", axes y, x in µm
          0/ 1/ ...             uint32 levels, 2x mode-downsampled, chunked by tile
        cells/                  the same for the cells grown from the nuclei
          0/ 1/ ...             (cell id = nucleus id)

Readers (ome-zarr-py, napari-ome-zarr) open the root and find the labels
beside the overview. Before the overview is written, or without it, the labels
stand on their own: open ``labels.ome.zarr/labels`` (or ``labels/nuclei``,
``labels/cells``).
Every write is chunk by chunk through Dask, so memory stays flat.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import dask.array as da
import numpy as np
import zarr

__all__ = ["LABEL_NAMES", "create_labels_zarr", "open_label_level", "write_label_pyramid", "write_overview_image"]

logger = logging.getLogger(__name__)

NGFF_VERSION = "0.4"
_CHUNK_KEYS = {"name": "v2", "separator": "/"}
# The label images of a slide, in the order of labels/.zattrs.
LABEL_NAMES = ("nuclei", "cells")


def _axes(names: Sequence[str]) -> list[dict]:
    return [
        {"name": n, "type": "channel"} if n == "c"
        else {"name": n, "type": "space", "unit": "micrometer"}
        for n in names
    ]


def _multiscales(name: str, axes: Sequence[str], scales_um: Sequence[float], method: str) -> list[dict]:
    lead = [1.0] * (len(axes) - 2)
    return [{
        "version": NGFF_VERSION,
        "name": name,
        "axes": _axes(axes),
        "datasets": [
            {"path": str(level),
             "coordinateTransformations": [{"type": "scale", "scale": [*lead, s, s]}]}
            for level, s in enumerate(scales_um)
        ],
        "type": method,
    }]


def create_labels_zarr(
    path: str | os.PathLike,
    *,
    shape_yx: Sequence[int],
    pixel_um: float,
    chunk_px: int,
    names: Sequence[str] = LABEL_NAMES,
) -> zarr.Group:
    """Create an empty NGFF labels store with one level-0 array per label name.

    Parameters
    ----------
    path : str or path-like
        The store to create (overwritten if present), e.g.
        ``OUT/slides/<id>/labels.ome.zarr``.
    shape_yx : (int, int)
        Level-0 shape of the slide, px.
    pixel_um : float
        Level-0 pixel size, µm.
    chunk_px : int
        Chunk side of every level, px; the tile core size, so that
        :func:`tme_pipeline.tiling.segment_tiled` writes whole chunks.
    names : sequence of str, optional
        Label images to create, listed in ``labels/.zattrs`` in this order;
        by default ``nuclei`` and ``cells``, with the same chunking.

    Returns
    -------
    zarr.Group
        The root. Level 0 of label ``name`` is ``root[f"labels/{name}/0"]``:
        (Y, X) uint32 filled with 0.
    """
    if not pixel_um > 0 or chunk_px <= 0 or len(shape_yx) != 2 or min(shape_yx) <= 0:
        raise ValueError(
            f"{path}: need a positive 2-D shape, pixel size and chunk, got "
            f"shape_yx={tuple(shape_yx)}, pixel_um={pixel_um}, chunk_px={chunk_px}"
        )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{path}: label names must be unique and non-empty, got {names}")
    root = zarr.open_group(os.fspath(path), mode="w", zarr_format=2)
    labels = root.create_group("labels")
    labels.attrs["labels"] = list(names)
    for name in names:
        group = labels.create_group(name)
        group.create_array(
            "0", shape=tuple(int(s) for s in shape_yx), chunks=(chunk_px, chunk_px),
            dtype="uint32", fill_value=0, chunk_key_encoding=_CHUNK_KEYS,
        )
        group.attrs.update(_label_attrs(name, [pixel_um]))
    return root


def open_label_level(path: str | os.PathLike, name: str, level: int = 0) -> zarr.Array:
    """One level of a label image of the store at `path`, as a zarr array (read only).

    For reading whole bands: slicing the zarr array reads each chunk once per slice,
    with none of a dask array's per-chunk calls.

    Raises
    ------
    ValueError
        The store has no such label level; the message names the store.
    """
    group = zarr.open_group(os.fspath(path), mode="r")
    key = f"labels/{name}/{level}"
    if key not in group:
        raise ValueError(f"{path}: no label level {key!r}")
    return group[key]


def _label_attrs(name: str, scales_um: Sequence[float]) -> dict:
    return {
        "multiscales": _multiscales(name, ("y", "x"), scales_um, "mode"),
        # The source is the overview image at the root, two levels up.
        "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}},
    }


def write_label_pyramid(
    root: zarr.Group, name: str, *, pixel_um: float, n_levels: int | None = None
) -> None:
    """Build levels 1.. of a label image from its written level 0.

    Each level halves the previous one: every 2x2 block becomes its most
    frequent label (ties go to the top-left pixel, i.e. plain 2x stride), which
    keeps small nuclei visible better than stride alone. Done chunk by chunk
    with Dask on the active scheduler; the multiscales metadata then lists all
    levels with their scale in µm.

    Parameters
    ----------
    root : zarr.Group
        From :func:`create_labels_zarr`.
    name : str
        Label image, e.g. ``"nuclei"``.
    pixel_um : float
        Level-0 pixel size, µm.
    n_levels : int, optional
        Total number of levels including 0. By default, halve until the whole
        level fits in one chunk.
    """
    group = root["labels"][name]
    level0 = group["0"]
    chunk = level0.chunks
    if n_levels is None:
        ratio = max(s / c for s, c in zip(level0.shape, chunk))
        n_levels = 1 + max(math.ceil(math.log2(ratio)), 0)
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    src = level0
    for level in range(1, n_levels):
        shape = tuple(-(-s // 2) for s in src.shape)
        dst = group.create_array(
            str(level), shape=shape, chunks=chunk, dtype=src.dtype, fill_value=0,
            chunk_key_encoding=_CHUNK_KEYS, overwrite=True,
        )
        # Source blocks of two destination chunks align every write with one chunk.
        blocks = da.from_zarr(src, chunks=tuple(2 * c for c in chunk))
        out_chunks = tuple(tuple(-(-b // 2) for b in bc) for bc in blocks.chunks)
        small = blocks.map_blocks(
            _mode_2x2, chunks=out_chunks, dtype=src.dtype, meta=np.empty((0, 0), src.dtype)
        )
        da.store(small, dst, lock=False)
        logger.debug("labels/%s level %d: %s", name, level, shape)
        src = dst
    group.attrs.update(_label_attrs(name, [pixel_um * 2**lv for lv in range(n_levels)]))


def _mode_2x2(block: np.ndarray) -> np.ndarray:
    """(h, w) -> (ceil(h/2), ceil(w/2)): most frequent value of each 2x2 block."""
    h, w = block.shape
    padded = np.pad(block, ((0, h % 2), (0, w % 2)), mode="edge")
    # The four pixels of every block, top-left first so ties keep it.
    quad = np.stack([padded[0::2, 0::2], padded[0::2, 1::2], padded[1::2, 0::2], padded[1::2, 1::2]])
    votes = (quad[:, None] == quad[None, :]).sum(axis=1)
    best = np.argmax(votes, axis=0)
    return np.take_along_axis(quad, best[None], axis=0)[0]


def write_overview_image(
    root: zarr.Group,
    image: np.ndarray | da.Array,
    *,
    pixel_um: float,
    channel_names: Sequence[str] = ("DAPI",),
) -> None:
    """Write the root image that the labels are shown over.

    Parameters
    ----------
    root : zarr.Group
        From :func:`create_labels_zarr`.
    image : (C, Y, X) or (Y, X) array
        A low-resolution level of the slide (e.g. DAPI at 2-8 µm/px), intensities
        in the slide's units; written as one multiscales level.
    pixel_um : float
        Pixel size of `image`, µm (not level 0's).
    channel_names : sequence of str, optional
        One name per channel.
    """
    data = da.asarray(image)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[0] != len(channel_names):
        raise ValueError(
            f"{root.store}: overview must be (C, Y, X) with one name per channel, got "
            f"shape {image.shape} and names {list(channel_names)}"
        )
    chunks = (1, *(min(s, 1024) for s in data.shape[1:]))
    arr = root.create_array(
        "0", shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
        chunk_key_encoding=_CHUNK_KEYS, overwrite=True,
    )
    da.store(data.rechunk(chunks), arr, lock=False)
    lo, hi = (float(v) for v in da.compute(data.min(), data.max()))
    root.attrs.update({
        "multiscales": _multiscales("overview", ("c", "y", "x"), [pixel_um], "mean"),
        "omero": {"channels": [
            {"label": n, "color": "FFFFFF", "active": True,
             "window": {"min": lo, "max": hi, "start": lo, "end": hi}}
            for n in channel_names
        ]},
    })
