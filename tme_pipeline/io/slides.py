"""Open any supported slide (OME-TIFF, Akoya QPTIFF, OME-Zarr, plain TIFF) as a :class:`Slide`.

Nothing is read at open but metadata: every pyramid level is a lazy dask array
whose chunks read only the file tiles they cover, and whose graph pickles to a
distributed worker (TIFF levels reopen the file by path there; see
:mod:`tme_pipeline.io._tiffread` for how long handles stay open).

Examples
--------
>>> slide = open_slide("biopsy.ome.tif")  # doctest: +SKIP
>>> slide.channel_names, slide.pixel_um, slide.levels[0].shape  # doctest: +SKIP
(('DAPI', 'CD3', 'CD8'), 0.5, (3, 40000, 30000))
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from ._common import RawSlide, SlideError
from ._tiff import read_tiff
from ._zarr import is_ome_zarr, read_ome_zarr

__all__ = ["Slide", "SlideError", "open_slide"]

logger = logging.getLogger(__name__)

#: Relative difference of X and Y pixel sizes above which pixels are not square.
SQUARE_TOLERANCE = 0.01

_TIFF_SUFFIXES = (".tif", ".tiff", ".qptiff", ".btf", ".tf8", ".tf2")


@dataclass(frozen=True, eq=False)
class Slide:
    """A multichannel slide: a lazy pyramid, channel names and the pixel size.

    Attributes
    ----------
    path : Path
        The file (or zarr folder) the slide was opened from.
    format : str
        ``"ome-tiff"``, ``"qptiff"``, ``"ome-zarr"`` or ``"tiff"``.
    levels : tuple of dask.array.Array
        Each ``(C, Y, X)`` in the file's native dtype, level 0 (full resolution)
        first, lazy.
    channel_names : tuple of str
        One unique name per channel.
    pixel_um : float
        µm per pixel at level 0 (square pixels).
    """

    path: Path
    format: str
    levels: tuple[da.Array, ...]
    channel_names: tuple[str, ...]
    pixel_um: float

    @property
    def n_channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.levels[0].shape[0])

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Level-0 height and width in pixels."""
        return int(self.levels[0].shape[1]), int(self.levels[0].shape[2])

    @property
    def downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per level pixel, one per level (level 0 is 1.0).

        Measured along the longer level-0 axis, where rounding a level's size to
        whole pixels changes the ratio the least.
        """
        axis = 1 if self.levels[0].shape[1] >= self.levels[0].shape[2] else 2
        size0 = self.levels[0].shape[axis]
        return tuple(size0 / level.shape[axis] for level in self.levels)

    @property
    def size_mm(self) -> tuple[float, float]:
        """Level-0 height and width in mm."""
        height, width = self.shape_yx
        return height * self.pixel_um / 1000.0, width * self.pixel_um / 1000.0

    def level_pixel_um(self, level: int) -> float:
        """µm per pixel of pyramid ``level`` (0 is full resolution)."""
        return self.pixel_um * self.downsamples[level]

    def coarsest_level_within(self, target_um: float) -> int:
        """The coarsest level whose pixel is at most ``target_um`` µm (0 when every level is coarser).

        Raises ``ValueError`` unless ``target_um`` is positive.
        """
        if not target_um > 0:
            raise ValueError(f"target_um must be positive, got {target_um}")
        fine_enough = [i for i in range(len(self.levels)) if self.level_pixel_um(i) <= target_um * (1 + 1e-6)]
        return fine_enough[-1] if fine_enough else 0

    def channel_index(self, name: str) -> int:
        """Index of the channel called ``name``.

        Raises
        ------
        SlideError
            Where the slide has no such channel (the message lists those it has).
        """
        try:
            return self.channel_names.index(name)
        except ValueError:
            raise SlideError(
                self.path, f"no channel named {name!r}; channels are {list(self.channel_names)}"
            ) from None


def _detect(path: Path) -> str:
    """``"zarr"`` or ``"tiff"``, from the content first and the name second."""
    if path.is_dir():
        if is_ome_zarr(path):
            return "zarr"
        raise SlideError(path, "folder is not an OME-Zarr image (no zarr group with 'multiscales')")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    kind = "TIFF" if path.name.lower().endswith(_TIFF_SUFFIXES) else "supported slide"
    raise SlideError(path, f"not a {kind} image (file does not start with a TIFF header)")


def _channel_names(path: Path, raw: RawSlide, given: Sequence[str] | None, n_channels: int) -> tuple[str, ...]:
    if given is not None:
        if isinstance(given, str):
            raise SlideError(path, "channel_names must be a sequence of names, not one string")
        names = tuple(str(n) for n in given)
        if len(names) != n_channels:
            has = f"{n_channels} channels"
            if n_channels == 1:
                has = "1 channel (a single 2-D image, not a multichannel slide)"
            raise SlideError(path, f"channel_names gives {len(names)} names but the slide has {has}")
    elif raw.channel_names is None:
        names = tuple(f"C{i}" for i in range(n_channels))
    else:
        names = tuple(n or f"C{i}" for i, n in enumerate(raw.channel_names))
        if any(not n for n in raw.channel_names):
            logger.warning("%s: some channels have no name in the metadata; named C<index>", path)
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        positions = {n: [i for i, m in enumerate(names) if m == n] for n in duplicates}
        where = "in the channel_names given" if given is not None else "in the file's metadata"
        fix = "; correct them in the file (a plain TIFF takes channel_names from the config)" if given is None else ""
        raise SlideError(
            path, f"duplicate channel names {duplicates} at channels {positions} {where}: each marker needs a "
            f"channel of its own name{fix}",
        )
    return names


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    """Refuse pixel types no fluorescence scanner writes.

    Stages measure in float32 (or float64), which holds every integer of up to 24 bits
    exactly and those of 32 bits to 7 digits; 64-bit integers, complex and boolean
    pixels are refused rather than silently cast.
    """
    dtype = np.dtype(dtype)
    if not ((dtype.kind in "ui" and dtype.itemsize <= 4) or (dtype.kind == "f" and dtype.itemsize <= 8)):
        raise SlideError(
            path,
            f"pixel type {dtype.name} is not supported; expected integers of at most 32 bits "
            "(uint8, uint16, uint32, int8, int16, int32) or floats (float16, float32, float64)",
        )


def _pixel_um(path: Path, raw: RawSlide, given: float | None) -> float:
    if given is not None:
        value = float(given)
        if not math.isfinite(value) or value <= 0:
            raise SlideError(path, f"pixel_um must be a positive number of µm, got {given!r}")
        if raw.pixel_um_yx is not None and abs(raw.pixel_um_yx[1] - value) > SQUARE_TOLERANCE * value:
            logger.warning(
                "%s: pixel_um=%g given overrides the metadata's %g µm", path, value, raw.pixel_um_yx[1]
            )
        return value
    if raw.pixel_um_yx is None:
        raise SlideError(
            path,
            "no pixel size in the file's metadata; give it (µm per pixel) as pixel_um "
            "in the manifest or with --pixel-um",
        )
    y_um, x_um = raw.pixel_um_yx
    if abs(x_um - y_um) > SQUARE_TOLERANCE * min(x_um, y_um):
        raise SlideError(path, f"non-square pixels ({x_um:g} µm in X, {y_um:g} µm in Y) are not supported")
    return float(x_um)


def open_slide(
    path: str | os.PathLike[str],
    *,
    pixel_um: float | None = None,
    channel_names: Sequence[str] | None = None,
) -> Slide:
    """Open a slide lazily, with its channel names and pixel size.

    Parameters
    ----------
    path : str or path-like
        An OME-TIFF (``.ome.tif``), Akoya QPTIFF (``.qptiff``), plain TIFF, or an
        OME-Zarr folder (``.zarr``). The format is decided by content.
    pixel_um : float, optional
        µm per pixel at level 0. Overrides the metadata; required where the file
        has none (from the manifest or ``--pixel-um``).
    channel_names : sequence of str, optional
        One name per channel. Overrides the metadata; plain TIFFs otherwise get
        ``C0 .. C{n-1}``.

    Returns
    -------
    Slide
        Levels ``(C, Y, X)`` as lazy dask arrays in the native dtype.

    Raises
    ------
    FileNotFoundError
        Where ``path`` does not exist.
    SlideError
        A ``ValueError`` whose message starts with the path: not an image, a
        truncated file, wrong axes (RGB, Z or T stacks), a pixel type other
        than integers of at most 32 bits or floats (64-bit integers, complex),
        duplicate names, a ``channel_names`` length that does not match, no
        pixel size, non-square pixels.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: slide file does not exist")
    kind = _detect(path)
    if kind == "zarr":
        raw = read_ome_zarr(path)
    else:
        raw = read_tiff(path, stat=os.stat(path))
    level0 = raw.levels[0]
    if level0.ndim != 3 or 0 in level0.shape:
        raise SlideError(path, f"level 0 has shape {level0.shape}; expected a non-empty (C, Y, X) image")
    _check_dtype(path, level0.dtype)
    names = _channel_names(path, raw, channel_names, int(level0.shape[0]))
    um = _pixel_um(path, raw, pixel_um)
    return Slide(path=path, format=raw.format, levels=raw.levels, channel_names=names, pixel_um=um)
