"""GeoJSON that QuPath imports onto the slide as it is: regions and TLS outlines.

QuPath (0.4 and later) reads a ``FeatureCollection`` whose features carry a ``Polygon`` or
``MultiPolygon`` in level-0 pixel coordinates (x right, y down, origin at the image's top
left corner) and ``properties`` with ``objectType`` (``"annotation"``), ``classification``
(``{"name": str, "color": [r, g, b]}``) and ``measurements`` (a map of name -> number). We
also record the pixel size (µm) in the collection's ``properties``, so that a reader can
turn the pixels back into µm without the slide.

The pipeline works in µm (shapely geometries); this module is the one place that turns them
into pixels and back.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from skimage.measure import find_contours

__all__ = ["mask_to_geometry", "feature", "feature_collection", "write_geojson", "read_geojson",
           "qupath_problems"]

OBJECT_TYPES = ("annotation", "detection", "tile", "cell")


def mask_to_geometry(mask: np.ndarray, grid_um: float, *, simplify_um: float = 0.0) -> MultiPolygon:
    """The outline of a boolean grid mask as a (multi)polygon in µm, holes kept.

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
        Grid pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` times ``grid_um`` µm.
    grid_um : float
        Edge of a grid pixel (µm).
    simplify_um : float
        Douglas-Peucker tolerance (µm); 0 keeps every contour vertex.

    Returns
    -------
    shapely MultiPolygon in µm (empty when the mask is). Its area equals the mask's to
    within the corners the half-pixel contour cuts (~0.1 pixel per boundary pixel).
    """
    mask = np.asarray(mask, bool)
    labels, n = ndi.label(mask)
    polygons: list[Polygon] = []
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == k
        origin = (sl[0].start, sl[1].start)
        filled = ndi.binary_fill_holes(comp)
        outer = _rings(filled, origin, grid_um)
        if not outer:
            continue
        holes_lab, n_holes = ndi.label(filled & ~comp)
        holes = []
        for h, hs in enumerate(ndi.find_objects(holes_lab), start=1):
            if hs is not None:
                hole = holes_lab[hs] == h
                holes.extend(_rings(hole, (origin[0] + hs[0].start, origin[1] + hs[1].start), grid_um))
        poly = Polygon(max(outer, key=lambda r: Polygon(r).area), holes)
        if not poly.is_valid:
            poly = shapely.make_valid(poly)
        polygons.extend(_polygons_of(poly))
    geom = MultiPolygon(polygons) if polygons else MultiPolygon()
    if simplify_um > 0 and not geom.is_empty:
        geom = MultiPolygon(_polygons_of(geom.simplify(simplify_um, preserve_topology=True)))
    return geom


def _rings(component: np.ndarray, origin: tuple[int, int], grid_um: float) -> list[np.ndarray]:
    """Closed contours (x, y) µm of one filled component, at the half-pixel level."""
    padded = np.pad(component.astype(np.float32), 1)
    rings = []
    for c in find_contours(padded, 0.5):
        if len(c) < 4:
            continue
        # find_contours gives (row, col) of pixel centres in the padded array; a pixel's centre
        # is at (index + 0.5) grid units.
        y = (c[:, 0] - 1 + origin[0] + 0.5) * grid_um
        x = (c[:, 1] - 1 + origin[1] + 0.5) * grid_um
        rings.append(np.column_stack([x, y]))
    return rings


def _polygons_of(geom) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom] if not geom.is_empty else []
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons_of(g)]
    return []


def feature(geometry_um, *, pixel_um: float, name: str, color: Sequence[int],
            measurements: Mapping[str, float] | None = None, properties: Mapping[str, object] | None = None,
            object_type: str = "annotation", feature_id: str | None = None) -> dict:
    """One QuPath-importable feature from a shapely geometry in µm.

    Parameters
    ----------
    geometry_um : shapely Polygon or MultiPolygon, coordinates in µm.
    pixel_um : float
        Level-0 pixel size (µm): coordinates are written in level-0 pixels.
    name : str
        The classification's name (QuPath's class).
    color : (r, g, b) ints 0-255.
    measurements : name -> number, shown in QuPath's measurement table; NaN and None are
        left out (QuPath shows a missing measurement as empty).
    properties : further properties kept beside QuPath's (e.g. ``tls_id``).
    object_type : QuPath object type, ``"annotation"`` by default.
    feature_id : str, optional
        Stable id; by default a UUID derived from the name and the geometry, so the same
        input writes the same file.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    if not pixel_um > 0:
        raise ValueError(f"pixel_um must be positive, got {pixel_um}")
    geom_px = shapely.affinity.scale(geometry_um, xfact=1.0 / pixel_um, yfact=1.0 / pixel_um, origin=(0, 0))
    geom_px = shapely.set_precision(geom_px, 0.001)
    geometry = mapping(geom_px)
    meas = {str(k): float(v) for k, v in (measurements or {}).items() if v is not None and math.isfinite(float(v))}
    props: dict[str, object] = {"objectType": object_type,
                                "classification": {"name": name, "color": [int(c) for c in color]},
                                "measurements": meas}
    props.update(properties or {})
    fid = feature_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}:{geom_px.wkb_hex}"))
    return {"type": "Feature", "id": fid, "geometry": _lists(geometry), "properties": props}


def _lists(obj):
    """shapely's ``mapping`` gives tuples; JSON wants lists (and equal files for equal input)."""
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    return obj


def feature_collection(features: Sequence[dict], *, pixel_um: float, **properties) -> dict:
    """A FeatureCollection with the pixel size (µm) and any further properties recorded."""
    return {"type": "FeatureCollection",
            "properties": {"pixel_size_um": float(pixel_um), "coordinates": "level-0 pixels", **properties},
            "features": list(features)}


def write_geojson(path: str | Path, collection: dict) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    problems = qupath_problems(collection)
    if problems:
        raise ValueError(f"{path}: not importable by QuPath: {'; '.join(problems)}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(collection, indent=1))
    os.replace(tmp, path)


def read_geojson(path: str | Path) -> tuple[list[tuple[object, dict]], float]:
    """Features of a file written by :func:`write_geojson`, geometries back in µm.

    Returns
    -------
    features : list of (shapely geometry in µm, properties dict)
    pixel_um : float
    """
    path = Path(path)
    obj = json.loads(path.read_text())
    try:
        pixel_um = float(obj["properties"]["pixel_size_um"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: no properties.pixel_size_um on the collection") from err
    out = []
    for f in obj.get("features", []):
        geom = shapely.affinity.scale(shape(f["geometry"]), xfact=pixel_um, yfact=pixel_um, origin=(0, 0))
        out.append((geom, f.get("properties", {})))
    return out, pixel_um


def qupath_problems(collection: Mapping) -> list[str]:
    """What would stop QuPath importing ``collection`` as we mean it; empty when nothing.

    Checks: a FeatureCollection with the pixel size in its properties; each feature a
    Feature with a Polygon/MultiPolygon of finite, closed rings of at least 4 points;
    ``objectType`` one of QuPath's; ``classification`` a name and three 0-255 integers;
    ``measurements`` a map of finite numbers.
    """
    problems: list[str] = []
    if collection.get("type") != "FeatureCollection":
        return [f"type is {collection.get('type')!r}, not 'FeatureCollection'"]
    px = (collection.get("properties") or {}).get("pixel_size_um")
    if not isinstance(px, (int, float)) or not px > 0:
        problems.append("properties.pixel_size_um missing or not positive")
    for i, f in enumerate(collection.get("features", [])):
        where = f"feature {i}"
        if f.get("type") != "Feature":
            problems.append(f"{where}: type is not 'Feature'")
            continue
        geom = f.get("geometry") or {}
        polys = ([geom.get("coordinates")] if geom.get("type") == "Polygon"
                 else geom.get("coordinates") if geom.get("type") == "MultiPolygon" else None)
        if polys is None:
            problems.append(f"{where}: geometry is {geom.get('type')!r}, not Polygon or MultiPolygon")
        else:
            for rings in polys:
                for ring in rings or []:
                    arr = np.asarray(ring, float)
                    if arr.ndim != 2 or arr.shape[0] < 4 or arr.shape[1] != 2:
                        problems.append(f"{where}: a ring is not >= 4 (x, y) points")
                    elif not np.isfinite(arr).all() or not np.array_equal(arr[0], arr[-1]):
                        problems.append(f"{where}: a ring is not closed or not finite")
        props = f.get("properties") or {}
        if props.get("objectType") not in OBJECT_TYPES:
            problems.append(f"{where}: objectType {props.get('objectType')!r} is not one of {OBJECT_TYPES}")
        cls = props.get("classification")
        if not (isinstance(cls, Mapping) and isinstance(cls.get("name"), str) and isinstance(cls.get("color"), list)
                and len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])):
            problems.append(f"{where}: classification must be {{name: str, color: [r, g, b]}}")
        meas = props.get("measurements", {})
        if not isinstance(meas, Mapping) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in meas.values()):
            problems.append(f"{where}: measurements must be a map of finite numbers")
    return problems
