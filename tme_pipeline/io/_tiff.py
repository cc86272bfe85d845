"""Metadata of TIFF-based slides: OME-TIFF, Akoya QPTIFF and plain multi-page TIFF.

Each reader returns a :class:`~tme_pipeline.io._common.RawSlide` whose levels are
lazy :mod:`tme_pipeline.io._tiffread` arrays; no pixel is read here.

QPTIFF channel names: every full-resolution page carries a
``<PerkinElmer-QPI-ImageDescription>`` XML. ``<Name>`` is the fluorophore or filter
("DAPI", "Opal 570") on Vectra/Polaris scans, while PhenoImager and PhenoCycler
files add ``<Biomarker>`` with the marker ("CD8", "PanCK"), which is what the
config's ``panel:`` maps. So a non-empty ``<Biomarker>`` wins, then ``<Name>``
(the same order fastslide and the PhenoCycler-to-OME converters use); callers can
always override with ``channel_names``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import tifffile

from ._common import RawSlide, SlideError, length_to_um
from ._tiffread import level_to_dask

__all__ = ["read_tiff"]

logger = logging.getLogger(__name__)

# tifffile logs, and then works around, damage it meets while parsing IFDs; these
# phrases mean pages or pixel data lie past the end of the file.
_DAMAGE_PHRASES = ("invalid page offset", "corrupted", "invalid value offset", "truncated")

# TIFF ResolutionUnit codes (4 and 5 are tifffile's non-standard extensions).
_UM_PER_RESUNIT = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}

_QPI_ROOT = "PerkinElmer-QPI-ImageDescription"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_warnings() -> Iterator[list[str]]:
    """Collect what tifffile logs while parsing, so damage becomes our error."""
    handler = _Records()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(handler)
    try:
        yield handler.messages
    finally:
        tlog.removeHandler(handler)


def read_tiff(path: Path, *, stat: os.stat_result) -> RawSlide:
    """Parse a TIFF slide's metadata and wrap its levels lazily.

    Parameters
    ----------
    path : Path
        An existing file.
    stat : os.stat_result
        The file's stat, taken once by the caller.

    Returns
    -------
    RawSlide
        Format ``"qptiff"``, ``"ome-tiff"`` or ``"tiff"``, decided by content.

    Raises
    ------
    SlideError
        Not a TIFF, truncated, or not a 2-D multichannel image.
    """
    with _tifffile_warnings() as warnings:
        try:
            tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError, OSError, EOFError) as exc:
            raise SlideError(path, f"not a readable TIFF image ({exc})") from exc
        with tif:
            try:
                if not len(tif.pages):
                    raise SlideError(path, "TIFF file has no image pages")
                if _is_qpi(tif.pages.first):
                    raw, pages = _read_qptiff(path, tif, stat)
                elif tif.is_ome:
                    raw, pages = _read_series(path, tif, stat, fmt="ome-tiff")
                else:
                    raw, pages = _read_series(path, tif, stat, fmt="tiff")
                # All top-level pages too: a copy cut short is refused even when
                # only the label or overview at the end is lost.
                _check_complete(path, [*pages, *tif.pages], stat.st_size, warnings)
            except SlideError:
                raise
            except (tifffile.TiffFileError, EOFError, KeyError, IndexError, ValueError) as exc:
                raise SlideError(path, f"cannot parse TIFF structure, file corrupted or truncated ({exc})") from exc
    return raw


def _check_complete(path: Path, pages: Sequence[Any], file_size: int, warnings: list[str]) -> None:
    """Refuse a file whose IFDs or pixel data lie past its end."""
    damage = [m for m in warnings if any(p in m for p in _DAMAGE_PHRASES)]
    if damage:
        raise SlideError(path, f"file is truncated or corrupted (tifffile: {damage[0]})")
    for page in pages:
        if page is None:
            raise SlideError(path, "file is truncated or corrupted (a page of the image is missing)")
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > file_size:
            raise SlideError(
                path,
                f"file is truncated: pixel data run to byte {max(ends)} "
                f"but the file has {file_size} bytes",
            )


def _resolution_um(page: Any) -> tuple[float, float] | None:
    """µm per pixel (Y, X) from XResolution/YResolution tags, or None."""
    um_per_unit = _UM_PER_RESUNIT.get(int(page.resolutionunit))
    if um_per_unit is None:
        return None
    xres, yres = page.resolution
    if not (xres > 0 and yres > 0):
        return None
    # A writer that sets no resolution leaves tifffile's default 1 px per unit,
    # which no microscope produces (1 px per cm or inch); read it as "absent".
    if xres == 1 and yres == 1:
        return None
    return um_per_unit / yres, um_per_unit / xres


def _as_cyx(path: Path, axes: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Shape ``(C, Y, X)`` of a squeezed tifffile series, or a SlideError."""
    if "S" in axes:
        raise SlideError(
            path,
            f"RGB or multi-sample pixels (axes {axes!r}, shape {shape}); "
            "expected one grey plane per channel",
        )
    if axes == "YX":
        return (1, *shape)
    if len(axes) == 3 and axes.endswith("YX") and axes[0] in "CQI":
        return shape  # type: ignore[return-value]
    stack = [a for a in "ZT" if a in axes]
    what = f"a {'/'.join(stack)} stack" if stack else "unsupported axes"
    raise SlideError(
        path,
        f"{what} (axes {axes!r}, shape {shape}); expected a 2-D multichannel image (C, Y, X)",
    )


def _read_series(path: Path, tif: tifffile.TiffFile, stat: os.stat_result, *, fmt: str) -> tuple[RawSlide, list]:
    """OME-TIFF or plain TIFF: tifffile's first series and its pyramid levels."""
    series = tif.series[0]
    levels, pages = [], []
    base = None
    for index, level in enumerate(series.levels):
        shape = _as_cyx(path, level.axes, tuple(level.shape))
        if base is None:
            base = shape
        elif shape[0] != base[0]:
            logger.warning("%s: ignoring pyramid level %d with %d channels, not %d", path, index, shape[0], base[0])
            break
        keyframe = level.keyframe
        levels.append(
            level_to_dask(
                path, ("series", 0, index), shape, level.dtype,
                store_chunk_yx=tuple(keyframe.chunks[:2]), stat=stat,
            )
        )
        pages.extend(level.pages)
    names, pixel = None, None
    if fmt == "ome-tiff":
        names, pixel = _ome_metadata(path, tif.ome_metadata, base[0])
    if pixel is None:
        pixel = _resolution_um(series.keyframe)
    return RawSlide(fmt, tuple(levels), names, pixel), pages


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _ome_metadata(path: Path, xml: str | None, n_channels: int) -> tuple[tuple[str, ...] | None, tuple[float, float] | None]:
    """Channel names and µm per pixel (Y, X) of the first OME Image."""
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise SlideError(path, f"OME-XML metadata cannot be parsed ({exc})") from exc
    pixels = next((e for e in root.iter() if _local(e.tag) == "Pixels"), None)
    if pixels is None:
        return None, None
    channels = [c.get("Name", "") for c in pixels if _local(c.tag) == "Channel"]
    names = tuple(channels) if len(channels) == n_channels else None
    if channels and names is None:
        logger.warning("%s: OME-XML names %d channels but the image has %d; names ignored", path, len(channels), n_channels)
    size = {}
    for axis in "XY":
        value = pixels.get(f"PhysicalSize{axis}")
        if value is not None:
            size[axis] = length_to_um(float(value), pixels.get(f"PhysicalSize{axis}Unit"), path=path)
    x = size.get("X")
    y = size.get("Y", x)  # a writer that gives only X means square pixels
    if x is None or y is None:
        return names, None
    return names, (y, x)


def _is_qpi(page: Any) -> bool:
    """Akoya software says so in the Software tag; other writers at least in the XML."""
    return bool(page.is_qpi) or _qpi_xml(page) is not None


def _qpi_xml(page: Any) -> ET.Element | None:
    """The page's QPI XML root, or None."""
    tag = page.tags.get(270)
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, bytes):
        # PhenoImager writes UTF-16 with a byte-order mark.
        encoding = "utf-16" if value[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8"
        value = value.decode(encoding, errors="replace")
    value = value.lstrip("\ufeff").strip()
    if _QPI_ROOT not in value:
        return None
    try:
        # Parse the str, not bytes: Akoya declares encoding="utf-16" on what
        # tifffile has already decoded, and ElementTree ignores the declaration
        # only for str input.
        return ET.fromstring(value)
    except ET.ParseError:
        return None


def _text(root: ET.Element | None, tag: str) -> str:
    if root is None:
        return ""
    found = root.find(tag)
    return (found.text or "").strip() if found is not None else ""


def _read_qptiff(path: Path, tif: tifffile.TiffFile, stat: os.stat_result) -> tuple[RawSlide, list]:
    """Akoya QPTIFF: full-resolution channel pages, then reduced ones per level."""
    full: list[int] = []
    names: list[str] = []
    reduced: dict[tuple, list[int]] = {}
    typed = False
    for index, page in enumerate(tif.pages):
        root = _qpi_xml(page)
        kind = _text(root, "ImageType")
        typed = typed or bool(kind)
        if kind == "FullResolution":
            full.append(index)
            names.append(_text(root, "Biomarker") or _text(root, "Name"))
        elif kind == "ReducedResolution":
            reduced.setdefault((page.shape, page.dtype.str), []).append(index)
        elif not kind and not typed and (not full or page.shape == tif.pages[full[0]].shape):
            # No ImageType at all (old or hand-made files): leading equal pages.
            full.append(index)
            names.append(_text(root, "Biomarker") or _text(root, "Name"))
        # Thumbnail, Overview, Label (and anything else) are not the image.
    if not full:
        raise SlideError(path, "QPTIFF has no FullResolution pages")
    first = tif.pages[full[0]]
    if first.samplesperpixel != 1 or len(first.shape) != 2:
        raise SlideError(path, f"QPTIFF full-resolution pages are not grey 2-D images (shape {first.shape})")
    for index in full:
        page = tif.pages[index]
        if page.shape != first.shape or page.dtype != first.dtype:
            raise SlideError(
                path,
                f"QPTIFF full-resolution pages differ (page {index}: {page.shape} {page.dtype}, "
                f"page {full[0]}: {first.shape} {first.dtype})",
            )
    groups = [full]
    for (shape, _), indices in sorted(reduced.items(), key=lambda kv: -kv[0][0][0]):
        if len(indices) == len(full) and len(shape) == 2:
            groups.append(indices)
        else:
            logger.warning("%s: ignoring %d ReducedResolution pages of shape %s", path, len(indices), shape)
    levels: list[da.Array] = []
    pages = []
    for indices in groups:
        page = tif.pages[indices[0]]
        levels.append(
            level_to_dask(
                path, ("pages", tuple(indices)), (len(indices), *page.shape), page.dtype,
                store_chunk_yx=tuple(page.chunks[:2]), stat=stat,
            )
        )
        pages.extend(tif.pages[i] for i in indices)
    return RawSlide("qptiff", tuple(levels), tuple(names), _resolution_um(first)), pages
