"""Test-only writers of every slide format :func:`tme_pipeline.io.slides.open_slide` reads.

Each writer takes a ``(C, Y, X)`` array and a pixel size in µm, and lays the file out
the way the real instruments and converters do, so the reader is tested on the
structures it meets in the wild. Pyramid levels are 2x strided subsamples
(``data[:, ::2**k, ::2**k]``) so tests can compare any level exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import zarr

__all__ = ["write_ome_tiff", "write_qptiff", "write_ome_zarr", "write_plain_tiff", "level_data"]

_UM_PER = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
           "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3}


def level_data(data_cyx: np.ndarray, level: int) -> np.ndarray:
    """The pixels the writers store at pyramid ``level``."""
    step = 2**level
    return data_cyx[:, ::step, ::step]


def write_ome_tiff(
    path: Path,
    data_cyx: np.ndarray,
    *,
    pixel_um: float | None,
    channel_names: Sequence[str] | None,
    pyramid_levels: int = 3,
    tile: int | None = 256,
    unit: str = "µm",
    pixel_um_y: float | None = None,
) -> Path:
    """Write an OME-TIFF as our synthetic generator does: levels 1.. in SubIFDs.

    ``pixel_um`` (and ``pixel_um_y``, default the same) are in µm and written
    converted to ``unit``; None writes no PhysicalSize. ``pyramid_levels=1`` is flat;
    ``tile=None`` writes strips.
    """
    metadata: dict = {"axes": "CYX"}
    if channel_names is not None:
        metadata["Channel"] = {"Name": list(channel_names)}
    if pixel_um is not None:
        y_um = pixel_um if pixel_um_y is None else pixel_um_y
        metadata.update(
            PhysicalSizeX=pixel_um / _UM_PER[unit], PhysicalSizeXUnit=unit,
            PhysicalSizeY=y_um / _UM_PER[unit], PhysicalSizeYUnit=unit,
        )
    options = {"photometric": "minisblack", "compression": "zlib"}
    if tile is not None:
        options["tile"] = (tile, tile)
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(data_cyx, subifds=pyramid_levels - 1, metadata=metadata, **options)
        for level in range(1, pyramid_levels):
            tw.write(level_data(data_cyx, level), subfiletype=1, **options)
    return Path(path)


def _qpi_xml(image_type: str, name: str = "", biomarker: str | None = None) -> str:
    marker = "" if biomarker is None else f"<Biomarker>{biomarker}</Biomarker>"
    return (
        '<?xml version="1.0" encoding="utf-16"?>'
        "<PerkinElmer-QPI-ImageDescription><DescriptionVersion>2</DescriptionVersion>"
        f"<AcquisitionSoftware>PhenoImagerHT</AcquisitionSoftware><ImageType>{image_type}</ImageType>"
        f"<Identifier>{abs(hash(name)) % 10**8}</Identifier><IsUnmixedComponent>True</IsUnmixedComponent>"
        f"<ExposureTime>100</ExposureTime><SignalUnits>64</SignalUnits>"
        f"<Name>{name}</Name>{marker}<Color>255,255,255</Color>"
        "<ScanProfile>&lt;root /&gt;</ScanProfile></PerkinElmer-QPI-ImageDescription>"
    )


def write_qptiff(
    path: Path,
    data_cyx: np.ndarray,
    *,
    pixel_um: float | None,
    channel_names: Sequence[str],
    biomarkers: Sequence[str | None] | None = None,
    pyramid_levels: int = 3,
    tile: int = 256,
    resolution_unit: str = "CENTIMETER",
) -> Path:
    """Write an Akoya QPTIFF: channel pages, thumbnail, reduced pages, overview, label.

    ``channel_names`` fill ``<Name>`` (the fluorophore), ``biomarkers`` fill
    ``<Biomarker>`` (None leaves the element out). Resolution is written in pixels
    per ``resolution_unit`` (Akoya writes px/cm).
    """
    n_channels = data_cyx.shape[0]
    biomarkers = [None] * n_channels if biomarkers is None else list(biomarkers)
    options = {"photometric": "minisblack", "software": "PerkinElmer-QPI", "tile": (tile, tile)}
    if pixel_um is not None:
        per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[resolution_unit]
        options["resolution"] = (per_unit / pixel_um, per_unit / pixel_um)
        options["resolutionunit"] = resolution_unit
    rgb = {"photometric": "rgb", "software": "PerkinElmer-QPI"}
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for c in range(n_channels):
            tw.write(data_cyx[c], description=_qpi_xml("FullResolution", channel_names[c], biomarkers[c]),
                     metadata=None, **options)
        thumb = np.zeros((64, 64, 3), np.uint8)
        tw.write(thumb, description=_qpi_xml("Thumbnail"), metadata=None, **rgb)
        for level in range(1, pyramid_levels):
            reduced = level_data(data_cyx, level)
            for c in range(n_channels):
                tw.write(reduced[c], description=_qpi_xml("ReducedResolution", channel_names[c], biomarkers[c]),
                         subfiletype=1, metadata=None, **options)
        tw.write(np.full((80, 120, 3), 200, np.uint8), description=_qpi_xml("Overview"),
                 subfiletype=1, metadata=None, **rgb)
        tw.write(np.full((60, 60, 3), 100, np.uint8), description=_qpi_xml("Label"),
                 subfiletype=1, metadata=None, **rgb)
    return Path(path)


def write_ome_zarr(
    path: Path,
    data: np.ndarray,
    *,
    pixel_um: float | None,
    channel_names: Sequence[str] | None,
    pyramid_levels: int = 3,
    chunk: int = 256,
    zarr_format: int = 2,
    axes: str = "cyx",
    unit: str | None = "micrometer",
) -> Path:
    """Write an OME-Zarr image: NGFF 0.4 on zarr v2, NGFF 0.5 (under ``"ome"``) on v3.

    ``data`` is ``(C, Y, X)`` (singleton axes are inserted to match ``axes``) or
    already has one dimension per letter of ``axes``. ``pixel_um`` is in µm,
    written in ``unit`` (None: a scale with no unit).
    """
    if data.ndim != len(axes):
        # Axes keep NGFF's t, c, z, y, x order, so inserting singletons is a reshape.
        data = data.reshape([data.shape["cyx".index(a)] if a in "cyx" else 1 for a in axes])
    if pixel_um is None:
        unit = None
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    size_yx = 1.0 if pixel_um is None else pixel_um / (1.0 if unit is None else _UM_PER[unit])
    datasets = []
    for level in range(pyramid_levels):
        step = 2**level
        index = tuple(slice(None, None, step) if a in "yx" else slice(None) for a in axes)
        chunks = tuple(chunk if a in "yx" else 1 for a in axes)
        group.create_array(str(level), data=data[index], chunks=chunks)
        scale = [size_yx * step if a in "yx" else 1.0 for a in axes]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    axes_meta = [
        {"name": a, "type": kinds[a], **({"unit": unit} if a in "yx" and unit is not None else {})}
        for a in axes
    ]
    version = "0.4" if zarr_format == 2 else "0.5"
    multiscale = {"axes": axes_meta, "datasets": datasets, "name": "image"}
    attrs: dict = {"multiscales": [multiscale]}
    if channel_names is not None:
        attrs["omero"] = {"channels": [{"label": n, "active": True} for n in channel_names]}
    if zarr_format == 2:
        multiscale["version"] = version
        group.attrs.update(attrs)
    else:
        group.attrs.update({"ome": {"version": version, **attrs}})
    return Path(path)


def write_plain_tiff(
    path: Path,
    data_cyx: np.ndarray,
    *,
    pixel_um: float | None = None,
    resolution_unit: str = "CENTIMETER",
    tile: int | None = None,
    rowsperstrip: int = 64,
    pixel_um_y: float | None = None,
) -> Path:
    """Write one grey page per channel, striped (or tiled), with resolution tags if given."""
    options: dict = {"photometric": "minisblack", "metadata": None}
    if tile is not None:
        options["tile"] = (tile, tile)
    else:
        options["rowsperstrip"] = rowsperstrip
    if pixel_um is not None:
        per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[resolution_unit]
        y_um = pixel_um if pixel_um_y is None else pixel_um_y
        options["resolution"] = (per_unit / pixel_um, per_unit / y_um)
        options["resolutionunit"] = resolution_unit
    with tifffile.TiffWriter(path) as tw:
        for c in range(data_cyx.shape[0]):
            tw.write(data_cyx[c], **options)
    return Path(path)
