"""Metadata of OME-Zarr (OME-NGFF 0.4 on zarr v2, 0.5 on zarr v3) slides.

Levels come from ``multiscales[0].datasets``, in the order listed (NGFF puts the
highest resolution first). Singleton ``t`` and ``z`` axes are dropped; a missing
``c`` axis becomes a single channel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask.array as da
import zarr

from ._common import RawSlide, SlideError, dask_chunk_yx, length_to_um

__all__ = ["read_ome_zarr", "is_ome_zarr"]

logger = logging.getLogger(__name__)

_ALLOWED_AXES = ("t", "c", "z", "y", "x")


def _open_group(path: Path) -> zarr.Group | None:
    try:
        node = zarr.open(str(path), mode="r")
    except Exception:  # zarr raises several types for "not a zarr store"
        return None
    return node if isinstance(node, zarr.Group) else None


def _ome_attrs(group: zarr.Group) -> dict[str, Any]:
    attrs = group.attrs.asdict()
    # NGFF 0.5 nests everything under "ome"; 0.4 keeps it at the top.
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def is_ome_zarr(path: Path) -> bool:
    """Whether ``path`` is a zarr group with NGFF ``multiscales`` metadata."""
    group = _open_group(path)
    return group is not None and bool(_ome_attrs(group).get("multiscales"))


def _axes(path: Path, multiscale: dict[str, Any], ndim: int) -> list[dict[str, Any]]:
    axes = multiscale.get("axes")
    if axes is None:
        # NGFF before 0.3 fixed the axes to tczyx.
        axes = list("tczyx")[-ndim:]
    axes = [a if isinstance(a, dict) else {"name": a} for a in axes]
    names = [str(a.get("name", "")).lower() for a in axes]
    if len(set(names)) != len(names) or any(n not in _ALLOWED_AXES for n in names) or names[-2:] != ["y", "x"]:
        raise SlideError(path, f"unsupported OME-Zarr axes {names}; expected e.g. cyx, czyx or tczyx")
    return axes


def _scale_yx(multiscale: dict[str, Any], axis_names: list[str]) -> tuple[float, float] | None:
    """Product of the dataset-0 and multiscale-wide ``scale`` transforms along (y, x)."""
    transforms = list(multiscale["datasets"][0].get("coordinateTransformations", []))
    transforms += list(multiscale.get("coordinateTransformations", []) or [])
    scale = [1.0] * len(axis_names)
    found = False
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t:
            scale = [a * float(b) for a, b in zip(scale, t["scale"])]
            found = True
    if not found:
        return None
    return scale[axis_names.index("y")], scale[axis_names.index("x")]


def read_ome_zarr(path: Path) -> RawSlide:
    """Parse an OME-Zarr image's metadata and wrap its levels lazily.

    Parameters
    ----------
    path : Path
        A zarr group folder (``.zarr`` / ``.ome.zarr``).

    Returns
    -------
    RawSlide
        Format ``"ome-zarr"``.

    Raises
    ------
    SlideError
        Not an OME-Zarr image, unsupported axes, a non-singleton t or z axis.
    """
    group = _open_group(path)
    if group is None:
        raise SlideError(path, "not a zarr group (no .zattrs/.zgroup or zarr.json)")
    attrs = _ome_attrs(group)
    multiscales = attrs.get("multiscales")
    if not multiscales or not multiscales[0].get("datasets"):
        raise SlideError(path, "zarr group has no OME-NGFF 'multiscales' datasets")
    multiscale = multiscales[0]
    levels = []
    axis_names: list[str] = []
    axes: list[dict[str, Any]] = []
    for dataset in multiscale["datasets"]:
        try:
            array = group[str(dataset["path"])]
        except KeyError:
            raise SlideError(path, f"multiscales dataset {dataset.get('path')!r} is missing") from None
        if not isinstance(array, zarr.Array):
            raise SlideError(path, f"multiscales dataset {dataset['path']!r} is not an array")
        if not axes:
            axes = _axes(path, multiscale, array.ndim)
            axis_names = [str(a["name"]).lower() for a in axes]
        if array.ndim != len(axes):
            raise SlideError(path, f"dataset {dataset['path']!r} has {array.ndim} dimensions but axes are {axis_names}")
        index: list[Any] = []
        for name, size in zip(axis_names, array.shape):
            if name in ("t", "z"):
                if size != 1:
                    raise SlideError(
                        path,
                        f"non-singleton {name} axis (size {size}, shape {array.shape}); "
                        "expected a 2-D multichannel image (C, Y, X)",
                    )
                index.append(0)
            else:
                index.append(slice(None))
        chunks = tuple(
            dask_chunk_yx(c, s) if n in ("y", "x") else 1 for n, c, s in zip(axis_names, array.chunks, array.shape)
        )
        level = da.from_zarr(array, chunks=chunks)[tuple(index)]
        if "c" not in axis_names:
            level = level[None]
        levels.append(level)
    pixel = None
    scale = _scale_yx(multiscale, axis_names)
    if scale is not None:
        units = {n: a.get("unit") for n, a in zip(axis_names, axes)}
        if units["y"] is None and units["x"] is None and scale == (1.0, 1.0):
            # ome-zarr-py's default identity transform: no physical size given.
            logger.info("%s: OME-Zarr scale is the unit-less identity; no pixel size", path)
        else:
            if units["y"] is None or units["x"] is None:
                logger.warning("%s: OME-Zarr axes y/x have no unit; scale read as micrometer", path)
            y = length_to_um(scale[0], units["y"], path=path, default="micrometer")
            x = length_to_um(scale[1], units["x"], path=path, default="micrometer")
            pixel = (y, x) if y is not None and x is not None else None
    names = None
    omero = attrs.get("omero") or group.attrs.asdict().get("omero")
    if isinstance(omero, dict) and isinstance(omero.get("channels"), list):
        labels = [str(c.get("label", "") or "") for c in omero["channels"]]
        if len(labels) == levels[0].shape[0]:
            names = tuple(labels)
        else:
            logger.warning("%s: omero names %d channels, image has %d; names ignored", path, len(labels), levels[0].shape[0])
    return RawSlide("ome-zarr", tuple(levels), names, pixel)
