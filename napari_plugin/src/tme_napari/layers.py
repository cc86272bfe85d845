"""Layer data for one slide's results, as plain ``(data, kwargs, layer_type)`` tuples.

Nothing here imports napari: the tuples are what an npe2 reader returns, so they are built
and tested without a viewer. Every layer is placed in µm (``scale`` = pixel size in µm for
pixel layers, coordinates already in µm for points and shapes), so the scale bar is right.
Nothing computes a full level-0 array: images and labels stay lazy dask pyramids, and the
contrast of each marker comes from a few chunks of the smallest level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "UNITS", "LayerData", "marker_colormap", "contrast_limits", "slide_layers", "label_layers",
    "overview_layer", "cell_points_layer", "cell_overview_layer", "region_labels_layer", "REGION_LABELS",
    "shapes_layer", "result_folder_layers",
]

logger = logging.getLogger(__name__)

#: The unit of every layer's coordinates (pint spelling, as napari's ``units`` wants it).
UNITS = "micrometer"

LayerData = tuple  # (data, kwargs dict, layer type str): npe2's LayerData tuple

# DAPI is blue by convention; the others get additive colormaps that stay distinct when
# several markers are shown together.
_MARKER_COLORMAPS = ("green", "magenta", "yellow", "cyan", "red", "bop orange", "bop purple", "gray")
_NUCLEAR_NAMES = ("dapi", "hoechst")



def marker_colormap(name: str, index: int) -> str:
    """The napari colormap name of marker ``name``, the ``index``-th non-nuclear one.

    Parameters
    ----------
    name : str
        Channel name.
    index : int
        Its position among the non-nuclear channels (0-based); the colours cycle.

    Returns
    -------
    str
        ``"blue"`` for DAPI/Hoechst, otherwise one of a fixed cycle of additive colormaps.
    """
    if name.lower() in _NUCLEAR_NAMES:
        return "blue"
    return _MARKER_COLORMAPS[index % len(_MARKER_COLORMAPS)]


def contrast_limits(level_cyx, *, percentiles: tuple[float, float] = (1.0, 99.8),
                    max_blocks: int = 16) -> np.ndarray:
    """Per-channel display range from a sample of a (low-resolution) pyramid level.

    Parameters
    ----------
    level_cyx : dask.array.Array or numpy.ndarray, shape (C, Y, X)
        Usually the slide's smallest level.
    percentiles : (float, float)
        Lower and upper percentile of the sampled intensities.
    max_blocks : int
        At most about this many (Y, X) chunks are read, spread evenly over the level, so a
        slide without a pyramid is still not read whole.

    Returns
    -------
    numpy.ndarray, shape (C, 2), float64
        ``[low, high]`` per channel in the slide's intensity units, ``high > low``.
    """
    import dask.array as da

    if level_cyx.ndim != 3:
        raise ValueError(f"contrast_limits needs a (C, Y, X) level, got shape {level_cyx.shape}")
    if not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError(f"percentiles must be increasing within 0-100, got {percentiles}")
    arr = da.asarray(level_cyx)
    ny, nx = arr.numblocks[1], arr.numblocks[2]
    # Strides over chunks keep the sample spread over the tissue, not one corner.
    side = max(1, int(np.sqrt(max_blocks)))
    sy, sx = max(1, -(-ny // side)), max(1, -(-nx // side))
    blocks = arr.blocks[:, ::sy, ::sx]
    sample = np.asarray(blocks.compute(), dtype=np.float64).reshape(arr.shape[0], -1)
    lims = np.percentile(sample, percentiles, axis=1).T
    # A flat channel (blank or saturated) still needs a non-empty range to display.
    flat = lims[:, 1] <= lims[:, 0]
    lims[flat, 1] = lims[flat, 0] + 1.0
    return lims


def slide_layers(slide, *, markers: Sequence[str] | None = None) -> list[LayerData]:
    """One lazy multiscale image layer per channel of a slide.

    Parameters
    ----------
    slide : tme_pipeline.io.slides.Slide
        ``levels`` (C, Y, X) dask arrays, ``channel_names``, ``pixel_um``.
    markers : sequence of str, optional
        Layer names, one per channel (e.g. the panel's marker names); by default the
        slide's channel names.

    Returns
    -------
    list of (list of dask.array.Array (Y, X), dict, "image")
        Additive blending; ``scale`` = level-0 pixel size (µm) on both axes; contrast from
        :func:`contrast_limits` of the smallest level.
    """
    names = list(markers) if markers is not None else list(slide.channel_names)
    if len(names) != len(slide.channel_names):
        raise ValueError(f"{slide.path}: {len(names)} marker names for {len(slide.channel_names)} channels")
    lims = contrast_limits(slide.levels[-1])
    layers, others = [], 0
    for c, name in enumerate(names):
        cmap = marker_colormap(name, others)
        others += cmap != "blue"
        kwargs = {
            "name": name, "scale": (slide.pixel_um, slide.pixel_um), "units": UNITS,
            "colormap": cmap, "contrast_limits": tuple(float(v) for v in lims[c]),
            "blending": "additive", "multiscale": True,
            "metadata": {"path": str(slide.path), "channel": slide.channel_names[c]},
        }
        layers.append(([level[c] for level in slide.levels], kwargs, "image"))
    return layers


def label_layers(results, *, pixel_um: float, names: Sequence[str] = ("nuclei", "cells")) -> list[LayerData]:
    """The label pyramids of ``labels.ome.zarr`` as lazy multiscale labels layers.

    Parameters
    ----------
    results : tme_pipeline.results.SlideResults
    pixel_um : float
        Level-0 pixel size of the slide, µm.
    names : sequence of str
        Label images to show; absent ones are skipped.

    Returns
    -------
    list of (list of dask.array.Array (Y, X) uint32, dict, "labels")
        Label value = ``obs['cell_id']`` of the cell table; only ``nuclei`` visible at first.
    """
    layers = []
    for name in names:
        levels = []
        while True:
            try:
                levels.append(results.labels(name, level=len(levels)))
            except ValueError:
                break
        if not levels:
            logger.info("%s: no %s labels", results.folder, name)
            continue
        kwargs = {"name": name, "scale": (pixel_um, pixel_um), "units": UNITS, "multiscale": True,
                  "opacity": 0.5, "visible": name == "nuclei"}
        layers.append((levels, kwargs, "labels"))
    return layers


def overview_layer(results) -> LayerData | None:
    """The low-resolution DAPI overview stored in ``labels.ome.zarr``, when the slide is not at hand.

    Returns
    -------
    (numpy.ndarray (Y, X), dict, "image") or None
        ``scale`` from the store's NGFF metadata (µm per overview pixel); None if absent.
    """
    import zarr

    path = results.folder / "labels.ome.zarr"
    if not path.is_dir():
        return None
    root = zarr.open_group(str(path), mode="r")
    if "0" not in root or "multiscales" not in root.attrs:
        return None
    transforms = root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    scale_yx = tuple(float(s) for s in transforms[0]["scale"][-2:])
    image = np.asarray(root["0"][0])
    return (image, {"name": "DAPI overview", "scale": scale_yx, "units": UNITS, "colormap": "blue",
                    "blending": "additive"}, "image")


def cell_points_layer(cells, *, size_um: float = 6.0, max_points: int | None = None) -> LayerData:
    """The cells as points at their centroids, coloured by phenotype, a lean table as features.

    Parameters
    ----------
    cells : anndata.AnnData or tme_napari.cells_view.CellTable
        ``obs`` with ``x_um``, ``y_um`` (µm) and a ``phenotype`` column (categorical).
    size_um : float
        Point diameter, µm.
    max_points : int, optional
        With more cells than this the layer starts empty (the cells in view are put in by
        :func:`tme_napari.cells_view.follow_camera` once few enough are in view).

    Returns
    -------
    (numpy.ndarray (N, 2) float32 (y, x) in µm, dict, "points")
        ``features`` holds ``cell_id``, ``phenotype`` and ``row`` (index in the cell table)
        only, the other columns stay on disk; ``face_color`` one RGBA per cell (fixed
        colour per phenotype); ``metadata['phenotype_colors']`` maps phenotype -> RGBA,
        ``metadata['n_cells']`` is the slide's cell count.
    """
    from .cells_view import CellTable, points_kwargs

    table = cells if isinstance(cells, CellTable) else CellTable.from_obs(cells.obs)
    rows = np.arange(len(table))
    if max_points is not None and len(table) > max_points:
        rows = rows[:0]
    data, kwargs = points_kwargs(table, rows, size_um=size_um)
    return (data, kwargs, "points")


def cell_overview_layer(table, extent_yx_um, *, bin_um: float = 20.0) -> LayerData:
    """The cells as a phenotype-coloured density raster (:func:`tme_napari.cells_view.overview_rgba`).

    Returns
    -------
    (numpy.ndarray (H, W, 4) float32, dict, "image")
        RGBA, ``scale`` = ``bin_um`` and ``translate`` half a bin (µm), so bin ``(i, j)``
        covers ``[i, i+1) x [j, j+1)`` times ``bin_um`` of the slide.
    """
    from .cells_view import OVERVIEW_LAYER, overview_rgba

    rgba = overview_rgba(table, extent_yx_um, bin_um=bin_um)
    return (rgba, {"name": OVERVIEW_LAYER, "rgb": True, "scale": (bin_um, bin_um),
                   "translate": (bin_um / 2, bin_um / 2), "units": UNITS, "opacity": 0.8}, "image")


#: Region grids drawn as labels, later ones over earlier ones (necrosis and fibrosis lie in the bed).
REGION_LABELS = ("stroma", "margin", "tumor_core", "fibrosis", "necrosis")


def region_labels_layer(masks: dict, grid_um: float, *, name: str = "regions") -> LayerData | None:
    """The coarse region grids of ``regions.npz`` as one Labels layer, in µm.

    Parameters
    ----------
    masks : dict of str -> (H, W) bool
        :meth:`tme_pipeline.results.SlideResults.region_grids`'s masks.
    grid_um : float
        Grid pixel edge, µm; pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)`` times ``grid_um``.

    Returns
    -------
    ((H, W) uint8, dict, "labels") or None
        Label ``k`` = ``REGION_LABELS[k - 1]`` (0: outside tissue), coloured as in the regions
        GeoJSON; ``features`` (``index``, ``name``) names each label. None without masks.
    """
    present = [k for k in REGION_LABELS if k in masks]
    if not present:
        return None
    shape = np.asarray(masks[present[0]]).shape
    labels = np.zeros(shape, np.uint8)
    for k, key in enumerate(REGION_LABELS, start=1):
        if key in masks:
            labels[np.asarray(masks[key], bool)] = k
    from tme_pipeline.regions import REGION_COLORS

    # The colours of the regions' QuPath GeoJSON, so the labels read like the exported outlines.
    colors = REGION_COLORS
    colormap = {0: (0.0, 0.0, 0.0, 0.0), None: (0.0, 0.0, 0.0, 0.0)}
    colormap.update({k: (*(np.asarray(colors[key][:3]) / 255.0), 1.0)
                     for k, key in enumerate(REGION_LABELS, start=1)})
    features = {"index": list(range(len(REGION_LABELS) + 1)), "name": ["", *REGION_LABELS]}
    return (labels, {"name": name, "scale": (grid_um, grid_um), "translate": (grid_um / 2, grid_um / 2),
                     "units": UNITS, "opacity": 0.35, "colormap": colormap, "features": features}, "labels")


def _rings_yx(geometry) -> list[tuple[np.ndarray, bool]]:
    """``(ring (V, 2) (y, x) µm, is_hole)`` for every exterior and interior ring of a (Multi)Polygon."""
    parts = getattr(geometry, "geoms", [geometry])
    rings = []
    for part in parts:
        if part.geom_type != "Polygon" or part.is_empty:
            continue
        rings.append((np.asarray(part.exterior.coords)[:-1, ::-1].copy(), False))
        rings += [(np.asarray(hole.coords)[:-1, ::-1].copy(), True) for hole in part.interiors]
    return rings


def shapes_layer(features: Sequence[tuple[object, dict]], *, name: str, edge_width_um: float = 4.0,
                 face_alpha: float = 0.15) -> LayerData | None:
    """QuPath features (from :func:`tme_pipeline.geojson.read_geojson`) as a Shapes layer.

    Parameters
    ----------
    features : sequence of (shapely geometry in µm, properties dict)
    name : str
        Layer name (``"regions"``, ``"TLS"``).
    edge_width_um : float
        Outline width, µm.
    face_alpha : float
        Fill opacity, 0-1.

    Returns
    -------
    (list of numpy.ndarray (V, 2) (y, x) µm, dict, "shapes") or None
        One polygon per part of each feature (a MultiPolygon gives several with the same
        properties). napari polygons have no holes, so a hole (e.g. of the margin band) is
        drawn as a closed path outline and its polygon is left unfilled. Colours are each
        feature's QuPath classification colour (for TLS, the maturity). ``features`` has
        ``name`` (the classification), every measurement and every scalar property. None if
        there is no polygon.
    """
    import pandas as pd

    polygons, rows, colors, types, filled = [], [], [], [], []
    for geometry, props in features:
        cls = props.get("classification") or {}
        rgb = np.asarray(cls.get("color", (255, 255, 0)), dtype=np.float64)[:3] / 255.0
        row = {"name": str(cls.get("name", ""))}
        row.update({k: v for k, v in props.items()
                    if isinstance(v, (int, float, str, bool)) and k != "objectType"})
        row.update({str(k): float(v) for k, v in (props.get("measurements") or {}).items()})
        rings = _rings_yx(geometry)
        has_holes = any(hole for _, hole in rings)
        for ring, hole in rings:
            polygons.append(np.vstack([ring, ring[:1]]) if hole else ring)
            rows.append(row)
            colors.append(rgb)
            types.append("path" if hole else "polygon")
            filled.append(not has_holes)
    if not polygons:
        return None
    edge = np.column_stack([np.asarray(colors), np.ones(len(colors))])
    face = edge.copy()
    face[:, 3] = np.where(filled, face_alpha, 0.0)
    kwargs = {"name": name, "scale": (1.0, 1.0), "units": UNITS, "shape_type": types,
              "edge_color": edge, "face_color": face, "edge_width": edge_width_um,
              "features": pd.DataFrame(rows), "text": {"string": "{name}", "size": 10, "color": "white"}}
    return (polygons, kwargs, "shapes")


def result_folder_layers(folder: str | Path, *, load_slide: bool = True,
                         max_points: int | None = None) -> list[LayerData]:
    """Every layer of one slide's result folder ``OUT/slides/<slide_id>/``.

    What is built does not grow with the slide beyond its coarse grids: images and labels
    are lazy pyramids, regions one Labels layer of the coarse region grid, the cells an
    overview raster plus a Points layer of at most ``max_points`` cells.

    Parameters
    ----------
    folder : str or Path
        The slide's result folder (``cells.h5ad``, ``labels.ome.zarr``, ...).
    load_slide : bool
        Open the slide file named in ``cells.uns['slide']['path']``; when False or the file
        is gone, the DAPI overview of ``labels.ome.zarr`` stands in.
    max_points : int, optional
        Most cells put in the Points layer at open (default
        :data:`tme_napari.cells_view.MAX_POINTS`); a slide with more opens with it empty,
        and :func:`tme_napari.cells_view.follow_camera` fills it with the cells in view.

    Returns
    -------
    list of LayerData
        In drawing order: marker images (or the overview), ``nuclei`` and ``cells`` labels,
        ``regions`` (Labels from ``regions.npz``; Shapes from ``regions.geojson`` for results
        without the grids), ``TLS`` shapes when their GeoJSON exists, the ``cells
        (overview)`` raster and the cell points. The points' ``metadata['cells_file']`` is
        the ``cells.h5ad`` they come from.

    Raises
    ------
    FileNotFoundError
        If ``folder`` has no ``cells.h5ad`` (not a finished slide's results).
    """
    import h5py
    from anndata.io import read_elem

    from tme_pipeline.geojson import read_geojson
    from tme_pipeline.io.slides import open_slide
    from tme_pipeline.results import CELLS, REGIONS_GEOJSON, REGIONS_NPZ, TLS_GEOJSON, SlideResults

    from .cells_view import MAX_POINTS, read_cell_table

    folder = Path(folder)
    results = SlideResults(folder.name, folder)
    cells_file = results.file(CELLS)
    if not cells_file.is_file():
        raise FileNotFoundError(f"{cells_file}: no cell table; {folder} is not a finished slide's results")
    # Only uns and three obs columns are read: a backed AnnData would still read all of obs.
    with h5py.File(cells_file, "r") as f:
        uns = read_elem(f["uns"]) if "uns" in f else {}
    info = dict(uns.get("slide", {}))
    pixel_um = float(info.get("pixel_um", uns.get("pixel_um", 0.0)))
    if not pixel_um > 0:
        raise ValueError(f"{cells_file}: no positive uns['slide']['pixel_um']")
    table = read_cell_table(cells_file)

    layers: list[LayerData] = []
    slide_path = Path(str(info.get("path", "")))
    extent = None
    if load_slide and info.get("path") and slide_path.exists():
        slide = open_slide(slide_path, channel_names=list(info["channels"]) if "channels" in info else None,
                           pixel_um=pixel_um)
        extent = np.asarray(slide.shape_yx, np.float64) * pixel_um
        # Layers named by marker (PD-L1), not by the file's channel name (PDL1), where known.
        by_channel = {str(ch): str(m) for m, ch in dict(info.get("markers", {})).items()}
        layers += slide_layers(slide, markers=[by_channel.get(ch, ch) for ch in slide.channel_names])
    else:
        logger.warning("%s: slide file %s not found; showing the DAPI overview", folder, slide_path)
        overview = overview_layer(results)
        if overview is not None:
            layers.append(overview)
    labels = label_layers(results, pixel_um=pixel_um)
    if extent is None and labels:
        extent = np.asarray(labels[0][0][0].shape, np.float64) * pixel_um
    layers += labels
    if results.file(REGIONS_NPZ).is_file():
        regions = region_labels_layer(*results.region_grids())
    elif results.file(REGIONS_GEOJSON).is_file():
        regions = shapes_layer(read_geojson(results.file(REGIONS_GEOJSON))[0], name="regions")
    else:
        regions = None
    if regions is not None:
        layers.append(regions)
    if results.file(TLS_GEOJSON).is_file():
        tls = shapes_layer(read_geojson(results.file(TLS_GEOJSON))[0], name="TLS")
        if tls is not None:
            layers.append(tls)
    if extent is None and len(table):
        extent = table.yx_um.max(axis=0).astype(np.float64) + 1.0
    if extent is not None:
        layers.append(cell_overview_layer(table, extent))
    points = cell_points_layer(table, max_points=MAX_POINTS if max_points is None else max_points)
    points[1]["metadata"]["cells_file"] = str(cells_file)
    layers.append(points)
    return layers
