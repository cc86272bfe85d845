"""Shared pieces of the slide readers: the error type, the parsed-slide record, units.

Private to :mod:`tme_pipeline.io`; users see :class:`SlideError` through
:mod:`tme_pipeline.io.slides`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import dask.array as da

__all__ = ["SlideError", "RawSlide", "length_to_um", "dask_chunk_yx"]

#: Edge of a dask chunk in pixels that the readers aim for: large enough that a
#: 40 000 px slide has a few thousand tasks per channel, small enough to stay a
#: few MiB. Windows smaller than a chunk still read only the tiles they cover,
#: because dask fuses the window's slice into the chunk's getter.
TARGET_CHUNK_PX = 1024


class SlideError(ValueError):
    """A slide file that cannot be opened or read as a 2-D multichannel image.

    The message always starts with the file's path: ``f"{path}: {problem}"``.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple:
        # Rebuild from (path, problem), so the error survives the trip back from
        # a distributed worker.
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True, eq=False)
class RawSlide:
    """What a format reader found in a file, before the caller's overrides.

    Attributes
    ----------
    format : str
        ``"ome-tiff"``, ``"qptiff"``, ``"ome-zarr"`` or ``"tiff"``.
    levels : tuple of dask.array.Array
        Each ``(C, Y, X)``, native dtype, level 0 first, lazy.
    channel_names : tuple of str or None
        Names from the metadata, one per channel (empty strings where the file has
        none), or None where the format carries no names.
    pixel_um_yx : tuple of float or None
        µm per pixel at level 0 along Y and X, or None where the file has no
        physical pixel size.
    """

    format: str
    levels: tuple[da.Array, ...]
    channel_names: tuple[str, ...] | None
    pixel_um_yx: tuple[float, float] | None


# Factors to µm, keyed by the spellings OME-XML (UnitsLength symbols) and OME-NGFF
# (UDUNITS-2 names) use. "pixel" and "reference frame" are not lengths and are
# treated as "no physical size" by the callers.
_UM_PER_UNIT = {
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "dm": 1e5, "decimeter": 1e5,
    "cm": 1e4, "centimeter": 1e4,
    "mm": 1e3, "millimeter": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micrometer": 1.0, "micron": 1.0, "microns": 1.0,
    "nm": 1e-3, "nanometer": 1e-3,
    "pm": 1e-6, "picometer": 1e-6,
    "å": 1e-4, "angstrom": 1e-4,
    "in": 25400.0, "inch": 25400.0,
    "ft": 304800.0, "foot": 304800.0,
}

_NOT_LENGTHS = {"pixel", "reference frame", "referenceframe"}


def length_to_um(value: float, unit: str | None, *, path: Path, default: str = "µm") -> float | None:
    """Convert a pixel size to µm.

    Parameters
    ----------
    value : float
        The size in ``unit``.
    unit : str or None
        OME or NGFF unit name (``"nm"``, ``"µm"``, ``"micrometer"``, ...); None or
        empty means ``default``.
    path : Path
        The slide, named in errors.
    default : str, optional
        Unit assumed when ``unit`` is missing (OME's default is µm).

    Returns
    -------
    float or None
        µm per pixel, or None where the size is not a positive finite length
        (``"pixel"`` units, zero, NaN).

    Raises
    ------
    SlideError
        Where the unit is not a length this module knows.
    """
    name = (unit or default).strip()
    key = name if name in ("µm", "μm") else name.lower()
    if key in _NOT_LENGTHS:
        return None
    if key not in _UM_PER_UNIT:
        raise SlideError(path, f"unknown pixel size unit {name!r}")
    um = float(value) * _UM_PER_UNIT[key]
    if not math.isfinite(um) or um <= 0:
        return None
    return um


def dask_chunk_yx(store_chunk: int, size: int) -> int:
    """Dask chunk edge along one axis: a whole multiple of the file's own chunk.

    Parameters
    ----------
    store_chunk : int
        Edge of the file's tile, strip or zarr chunk along this axis, in pixels.
    size : int
        Length of the image along this axis, in pixels.

    Returns
    -------
    int
        Chunk edge in pixels, at most ``size``.
    """
    store_chunk = max(1, int(store_chunk))
    if store_chunk <= TARGET_CHUNK_PX:
        edge = max(1, TARGET_CHUNK_PX // store_chunk) * store_chunk
    elif store_chunk <= 4 * TARGET_CHUNK_PX:
        edge = store_chunk
    else:
        # Full-width strips: any edge works, each chunk rereads only its strips.
        edge = TARGET_CHUNK_PX
    return max(1, min(edge, size))
