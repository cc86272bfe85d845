"""tme-napari reader: the plain layer functions without a viewer, then a reader round trip in
napari (``make_napari_viewer``, run under ``xvfb-run -a`` by ``make test``).

The result folder is written by hand here, small and with known content: a 3-channel OME-TIFF
whose channels have disjoint intensity ranges, a labels store with known cells, a cell table
and QuPath GeoJSON for regions and TLS.
"""

from __future__ import annotations

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from slide_writers import write_ome_tiff
from tme_napari.cells_view import (
    CellTable,
    canvas_size_px,
    follow_camera,
    overview_rgba,
    read_cell_table,
    rows_in_box,
    view_box_um,
)
from tme_napari.layers import (
    REGION_LABELS,
    cell_points_layer,
    contrast_limits,
    region_labels_layer,
    result_folder_layers,
    shapes_layer,
    slide_layers,
)
from tme_napari.reader import napari_get_reader
from tme_pipeline.geojson import feature, feature_collection, write_geojson
from tme_pipeline.io.labels import create_labels_zarr, write_label_pyramid, write_overview_image
from tme_pipeline.io.slides import open_slide
from tme_pipeline.results import CELLS, LABELS, REGIONS_GEOJSON, REGIONS_NPZ, STAGES_JSON, TLS_GEOJSON

PIXEL_UM = 0.5
SIZE_PX = 256
CHANNELS = ("DAPI", "CD3", "PDL1")
MARKERS = {"DAPI": "DAPI", "CD3": "CD3", "PD-L1": "PDL1"}
# Disjoint per-channel intensity ranges: each channel's contrast must land inside its own.
RANGES = ((100, 200), (1000, 1500), (5000, 9000))
N_CELLS = 12
PHENOTYPES = ("CD8_T", "tumor", "other")
MATURE = (0, 128, 0)
EARLY = (255, 165, 0)
GRID_UM = 8.0  # the region grid: 16 x 16 pixels over the 128 µm slide


def _tls_features():
    two_part = MultiPolygon([box(10, 10, 30, 30), box(40, 10, 60, 30)])
    return [
        feature(two_part, pixel_um=PIXEL_UM, name="SFL", color=MATURE, measurements={"area_um2": 800.0},
                properties={"tls_id": 1}),
        feature(Polygon([(70, 70), (100, 70), (85, 110)]), pixel_um=PIXEL_UM, name="E-TLS", color=EARLY,
                measurements={"area_um2": 600.0}, properties={"tls_id": 2}),
    ]


@pytest.fixture
def result_folder(tmp_path):
    """``OUT/slides/S1`` with slide, labels, cells, regions and TLS; returns (folder, obs)."""
    rng = np.random.default_rng(0)
    data = np.stack([rng.integers(lo, hi, size=(SIZE_PX, SIZE_PX)) for lo, hi in RANGES]).astype(np.uint16)
    slide_path = write_ome_tiff(tmp_path / "S1.ome.tif", data, pixel_um=PIXEL_UM, channel_names=CHANNELS,
                                pyramid_levels=3, tile=64)
    folder = tmp_path / "out" / "slides" / "S1"
    folder.mkdir(parents=True)
    (folder / STAGES_JSON).write_text("{}")

    root = create_labels_zarr(folder / LABELS, shape_yx=(SIZE_PX, SIZE_PX), pixel_um=PIXEL_UM, chunk_px=64)
    nuclei = np.zeros((SIZE_PX, SIZE_PX), np.uint32)
    for i in range(N_CELLS):
        y, x = divmod(i, 4)
        nuclei[20 + 50 * y: 30 + 50 * y, 20 + 50 * x: 30 + 50 * x] = i + 1
    for name in ("nuclei", "cells"):
        root[f"labels/{name}/0"][:] = nuclei
        write_label_pyramid(root, name, pixel_um=PIXEL_UM)
    write_overview_image(root, data[:1, ::4, ::4], pixel_um=PIXEL_UM * 4)

    idx = np.arange(N_CELLS)
    obs = pd.DataFrame({
        "cell_id": idx + 1,
        "x_um": (25 + 50 * (idx % 4)) * PIXEL_UM,
        "y_um": (25 + 50 * (idx // 4)) * PIXEL_UM,
        "area_um2": np.full(N_CELLS, 25.0),
        "CD3_pos": idx % 3 == 0,
        "phenotype": pd.Categorical([PHENOTYPES[i % 3] for i in idx], categories=PHENOTYPES),
    }, index=[str(i) for i in idx])
    cells = ad.AnnData(X=rng.random((N_CELLS, len(CHANNELS))).astype(np.float32), obs=obs)
    cells.uns["slide"] = {"path": str(slide_path), "pixel_um": PIXEL_UM, "channels": list(CHANNELS),
                          "markers": MARKERS}
    cells.write_h5ad(folder / CELLS)

    write_geojson(folder / TLS_GEOJSON, feature_collection(_tls_features(), pixel_um=PIXEL_UM))
    band = box(0, 0, 64, 128).difference(box(10, 10, 30, 30))  # with a hole, as a margin band has
    bed = box(64, 0, 128, 64)
    regions = [feature(band, pixel_um=PIXEL_UM, name="margin", color=(200, 0, 0)),
               feature(bed, pixel_um=PIXEL_UM, name="tumor", color=(200, 0, 0))]
    write_geojson(folder / REGIONS_GEOJSON, feature_collection(regions, pixel_um=PIXEL_UM))
    np.savez(folder / REGIONS_NPZ, **_region_grids(), grid_um=GRID_UM)
    return folder, obs


def _region_grids() -> dict:
    """``regions.npz``'s masks: tissue everywhere, the bed the right half of the top (x >= 64, y < 64 µm),
    necrosis its top right grid pixel, the margin one pixel around the bed's border."""
    n = int(SIZE_PX * PIXEL_UM / GRID_UM)
    tissue = np.ones((n, n), bool)
    tumor = np.zeros((n, n), bool)
    tumor[: n // 2, n // 2:] = True
    margin = np.zeros((n, n), bool)
    margin[: n // 2 + 1, n // 2 - 1:] = True
    margin[: n // 2 - 1, n // 2 + 1:] = False
    necrosis = np.zeros((n, n), bool)
    necrosis[0, -1] = True
    masks = {"tissue": tissue, "tumor": tumor, "tumor_core": tumor & ~margin, "margin": margin,
             "stroma": tissue & ~tumor & ~margin, "necrosis": necrosis, "fibrosis": np.zeros((n, n), bool)}
    return {"mask_names": np.array(list(masks)), **{f"mask_{k}": v for k, v in masks.items()}}


# --- plain functions, no viewer -------------------------------------------------------------------

def test_contrast_limits_inside_each_channel_range():
    rng = np.random.default_rng(1)
    level = np.stack([rng.integers(lo, hi, size=(64, 64)) for lo, hi in RANGES])
    lims = contrast_limits(da.from_array(level, chunks=(3, 16, 16)))
    assert lims.shape == (3, 2)
    for (low, high), (lo, hi) in zip(lims, RANGES):
        assert lo <= low < high <= hi


def test_contrast_limits_reads_a_sample_of_chunks_only():
    reads = []

    def count(block):
        if block.size:  # dask calls once with an empty block to infer the output
            reads.append(block.shape)
        return block

    level = da.zeros((1, 1024, 1024), chunks=(1, 64, 64), dtype=np.float32).map_blocks(count, dtype=np.float32)
    lims = contrast_limits(level, max_blocks=16)
    assert 0 < len(reads) <= 16 < level.numblocks[1] * level.numblocks[2]
    assert lims[0, 1] > lims[0, 0], "a flat channel still gets a usable range"


def test_contrast_limits_rejects_a_2d_array():
    with pytest.raises(ValueError, match="C, Y, X"):
        contrast_limits(np.zeros((8, 8)))


def test_slide_layers_lazy_multiscale_in_um(result_folder):
    folder, _ = result_folder
    slide = open_slide(folder.parents[2] / "S1.ome.tif")
    layers = slide_layers(slide, markers=["DAPI", "CD3", "PD-L1"])
    assert [k["name"] for _, k, _ in layers] == ["DAPI", "CD3", "PD-L1"]
    assert {t for _, _, t in layers} == {"image"}
    cmaps = [k["colormap"] for _, k, _ in layers]
    assert cmaps[0] == "blue" and len(set(cmaps)) == 3
    for c, (levels, kwargs, _) in enumerate(layers):
        assert kwargs["scale"] == (PIXEL_UM, PIXEL_UM)
        assert kwargs["multiscale"] and len(levels) == 3
        assert all(isinstance(lv, da.Array) for lv in levels)
        assert levels[0].shape == (SIZE_PX, SIZE_PX)
        lo, hi = RANGES[c]
        assert lo <= kwargs["contrast_limits"][0] < kwargs["contrast_limits"][1] <= hi
    with pytest.raises(ValueError, match="marker names"):
        slide_layers(slide, markers=["DAPI"])


def test_cell_points_positions_colours_and_features(result_folder):
    folder, obs = result_folder
    cells = ad.read_h5ad(folder / CELLS)
    data, kwargs, kind = cell_points_layer(cells, size_um=5.0)
    assert kind == "points" and kwargs["size"] == 5.0 and data.dtype == np.float32
    np.testing.assert_allclose(data, obs[["y_um", "x_um"]].to_numpy())
    colors = kwargs["face_color"]
    assert colors.shape == (N_CELLS, 4)
    by_type = {p: {tuple(c) for c in colors[obs["phenotype"].to_numpy() == p]} for p in PHENOTYPES}
    assert all(len(c) == 1 for c in by_type.values()), "one colour per phenotype"
    assert len({next(iter(c)) for c in by_type.values()}) == len(PHENOTYPES), "phenotypes distinguishable"
    assert set(kwargs["metadata"]["phenotype_colors"]) == set(PHENOTYPES)
    assert len(kwargs["features"]) == N_CELLS
    assert list(kwargs["features"]["cell_id"]) == list(obs["cell_id"])
    # A lean table: what the widget needs, not the cell table's other columns.
    assert list(kwargs["features"].columns) == ["cell_id", "phenotype", "row"]
    assert list(kwargs["features"]["row"]) == list(range(N_CELLS))
    empty, kwargs, _ = cell_points_layer(cells, max_points=N_CELLS - 1)
    assert empty.shape == (0, 2) and kwargs["metadata"]["n_cells"] == N_CELLS
    assert list(kwargs["features"]["phenotype"].cat.categories) == list(PHENOTYPES)


def test_read_cell_table_reads_three_columns_as_float32(result_folder):
    folder, obs = result_folder
    table = read_cell_table(folder / CELLS)
    assert len(table) == N_CELLS and table.yx_um.dtype == np.float32
    np.testing.assert_allclose(table.yx_um, obs[["y_um", "x_um"]].to_numpy())
    assert table.categories == PHENOTYPES
    assert [table.categories[c] for c in table.codes] == list(obs["phenotype"])
    np.testing.assert_array_equal(table.cell_id, obs["cell_id"])
    bad = folder / "bad.h5ad"
    ad.AnnData(obs=pd.DataFrame({"x_um": [1.0], "y_um": [2.0]}, index=["0"])).write_h5ad(bad)
    with pytest.raises(ValueError, match=r"bad\.h5ad.*phenotype"):
        read_cell_table(bad)


def test_rows_in_box_and_view_box():
    table = CellTable.from_obs(pd.DataFrame({"x_um": [5.0, 15.0, 25.0, 15.0], "y_um": [5.0, 5.0, 5.0, 50.0],
                                             "phenotype": pd.Categorical(["a", "b", "a", "b"])}))
    np.testing.assert_array_equal(rows_in_box(table, (0, 10), (20, 30)), [1, 2])
    assert len(rows_in_box(table, (100, 100), (200, 200))) == 0
    lo, hi = view_box_um((0, 50.0, 60.0), 2.0, (100, 200))  # 100 x 200 screen px at 2 px/µm
    np.testing.assert_allclose(lo, [25.0, 10.0])
    np.testing.assert_allclose(hi, [75.0, 110.0])


def test_overview_raster_colours_bins_by_phenotype_mix():
    obs = pd.DataFrame({"x_um": [5.0, 6.0, 7.0, 25.0, 26.0], "y_um": [5.0, 6.0, 7.0, 5.0, 6.0],
                        "phenotype": pd.Categorical(["CD8_T", "CD8_T", "CD8_T", "CD8_T", "tumor"])})
    table = CellTable.from_obs(obs)
    palette, legend = table.palette()
    rgba = overview_rgba(table, (40.0, 40.0), bin_um=20.0)
    assert rgba.shape == (2, 2, 4) and rgba.dtype == np.float32
    np.testing.assert_allclose(rgba[0, 0, :3], legend["CD8_T"][:3], rtol=1e-6)
    np.testing.assert_allclose(rgba[0, 1, :3], (np.array(legend["CD8_T"][:3]) + legend["tumor"][:3]) / 2, rtol=1e-6)
    assert rgba[1, :, 3].max() == 0, "no cells, transparent"
    assert rgba[0, 0, 3] > rgba[0, 1, 3] > 0, "denser bins more opaque"
    with pytest.raises(ValueError, match="bin_um"):
        overview_rgba(table, (40.0, 40.0), bin_um=0)


def test_region_labels_from_the_grids_in_um(result_folder):
    masks = {k[5:]: v for k, v in _region_grids().items() if k.startswith("mask_")}
    labels, kwargs, kind = region_labels_layer(masks, GRID_UM)
    assert kind == "labels" and labels.dtype == np.uint8 and labels.shape == masks["tissue"].shape
    code = {name: k for k, name in enumerate(REGION_LABELS, start=1)}
    assert labels[0, -1] == code["necrosis"], "necrosis drawn over the bed"
    np.testing.assert_array_equal(labels[masks["stroma"]], code["stroma"])
    assert (labels[masks["tumor_core"] & ~masks["necrosis"]] == code["tumor_core"]).all()
    assert (labels[masks["margin"] & ~masks["necrosis"]] == code["margin"]).all()
    assert kwargs["scale"] == (GRID_UM, GRID_UM) and kwargs["translate"] == (GRID_UM / 2, GRID_UM / 2)
    np.testing.assert_allclose(kwargs["colormap"][code["stroma"]][:3], np.array([0, 160, 80]) / 255)
    assert kwargs["colormap"][0][3] == 0, "outside the tissue is transparent"
    assert kwargs["features"]["name"][code["margin"]] == "margin"
    assert region_labels_layer({}, GRID_UM) is None


def test_cell_points_missing_column_is_named():
    cells = ad.AnnData(obs=pd.DataFrame({"x_um": [1.0], "y_um": [2.0]}, index=["0"]))
    with pytest.raises(ValueError, match="phenotype"):
        cell_points_layer(cells)


def test_shapes_layer_one_shape_per_part_coloured_by_classification(tmp_path):
    from tme_pipeline.geojson import read_geojson

    path = tmp_path / "tls.geojson"
    write_geojson(path, feature_collection(_tls_features(), pixel_um=PIXEL_UM))
    polygons, kwargs, kind = shapes_layer(read_geojson(path)[0], name="TLS")
    assert kind == "shapes" and len(polygons) == 3  # the MultiPolygon gives two
    # (y, x) in µm: the first part is box(10, 10, 30, 30) in µm.
    np.testing.assert_allclose(polygons[0].min(axis=0), [10, 10])
    np.testing.assert_allclose(polygons[0].max(axis=0), [30, 30])
    assert list(kwargs["features"]["name"]) == ["SFL", "SFL", "E-TLS"]
    assert list(kwargs["features"]["tls_id"]) == [1, 1, 2]
    assert list(kwargs["features"]["area_um2"]) == [800.0, 800.0, 600.0]
    np.testing.assert_allclose(kwargs["edge_color"][0, :3], np.array(MATURE) / 255)
    np.testing.assert_allclose(kwargs["edge_color"][2, :3], np.array(EARLY) / 255)
    assert shapes_layer([], name="TLS") is None


def test_shapes_layer_draws_holes_as_outlines():
    band = box(0, 0, 100, 100).difference(box(20, 20, 80, 80))  # a margin band: one hole
    solid = box(200, 0, 220, 20)
    polygons, kwargs, _ = shapes_layer([(band, {"classification": {"name": "Margin", "color": [0, 0, 255]}}),
                                        (solid, {"classification": {"name": "Tumor", "color": [255, 0, 0]}})],
                                       name="regions", face_alpha=0.2)
    assert kwargs["shape_type"] == ["polygon", "path", "polygon"]
    np.testing.assert_allclose(polygons[1][0], polygons[1][-1])  # the hole's outline is closed
    np.testing.assert_allclose(polygons[1].min(axis=0), [20, 20])
    np.testing.assert_allclose(polygons[1].max(axis=0), [80, 80])
    # The band is not filled (its hole would be); the solid region is.
    np.testing.assert_allclose(kwargs["face_color"][:, 3], [0.0, 0.0, 0.2])
    assert list(kwargs["features"]["name"]) == ["Margin", "Margin", "Tumor"]


def test_result_folder_layers_order_and_counts(result_folder):
    folder, _ = result_folder
    layers = result_folder_layers(folder)
    assert [(k["name"], t) for _, k, t in layers] == [
        ("DAPI", "image"), ("CD3", "image"), ("PD-L1", "image"), ("nuclei", "labels"), ("cells", "labels"),
        ("regions", "labels"), ("TLS", "shapes"), ("cells (overview)", "image"), ("cells (phenotype)", "points"),
    ]
    nuclei = layers[3][0]
    assert len(nuclei) >= 2 and all(isinstance(lv, da.Array) for lv in nuclei)
    assert int(nuclei[0][25, 25].compute()) == 1


def test_moved_slide_and_no_geojson_fall_back(result_folder):
    folder, _ = result_folder
    (folder.parents[2] / "S1.ome.tif").unlink()
    (folder / TLS_GEOJSON).unlink()
    (folder / REGIONS_GEOJSON).unlink()
    (folder / REGIONS_NPZ).unlink()
    layers = result_folder_layers(folder)
    names = [k["name"] for _, k, _ in layers]
    assert names == ["DAPI overview", "nuclei", "cells", "cells (overview)", "cells (phenotype)"]
    overview, kwargs, _ = layers[0]
    assert kwargs["scale"] == (PIXEL_UM * 4, PIXEL_UM * 4)
    assert overview.shape == (SIZE_PX // 4, SIZE_PX // 4)


def test_results_without_region_grids_show_the_geojson_outlines(result_folder):
    folder, _ = result_folder
    (folder / REGIONS_NPZ).unlink()
    regions = next(layer for layer in result_folder_layers(folder) if layer[1]["name"] == "regions")
    assert regions[2] == "shapes" and list(regions[1]["features"]["name"]) == ["margin", "margin", "tumor"]


def test_get_reader_refuses_foreign_paths(result_folder, tmp_path):
    folder, _ = result_folder
    (tmp_path / "notes.txt").write_text("hello")
    plain = tmp_path / "plain.tif"
    write_ome_tiff(plain, np.zeros((1, 32, 32), np.uint16), pixel_um=None, channel_names=None, pyramid_levels=1,
                   tile=None)
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "missing.tif")) is None
    assert napari_get_reader(str(plain)) is None  # no pixel size: not shown at a wrong scale
    assert napari_get_reader(str(folder.parent)) is None  # OUT/slides, not one slide
    assert napari_get_reader([str(folder), str(folder)]) is None
    assert napari_get_reader(str(folder)) is not None
    assert napari_get_reader([str(folder)]) is not None


# --- in napari ------------------------------------------------------------------------------------

def test_reader_round_trip_in_viewer(make_napari_viewer, result_folder):
    folder, obs = result_folder
    viewer = make_napari_viewer()
    layers = viewer.open(str(folder), plugin="tme-napari")
    by_name = {layer.name: layer for layer in layers}
    assert list(by_name) == ["DAPI", "CD3", "PD-L1", "nuclei", "cells", "regions", "TLS", "cells (overview)",
                             "cells (phenotype)"]
    for name in ("DAPI", "CD3", "PD-L1", "nuclei", "cells"):
        assert by_name[name].multiscale
        np.testing.assert_allclose(by_name[name].scale, [PIXEL_UM, PIXEL_UM])
        # The scene extent is the slide in µm.
        np.testing.assert_allclose(by_name[name].extent.world[1] - by_name[name].extent.world[0],
                                   [SIZE_PX * PIXEL_UM] * 2, atol=PIXEL_UM)
    points = by_name["cells (phenotype)"]
    assert len(points.data) == N_CELLS
    assert list(points.features["phenotype"]) == list(obs["phenotype"])
    assert by_name["TLS"].nshapes == 3 and by_name["regions"].data.shape == (16, 16)
    # Grid pixel (i, j) covers [i, i+1) x [j, j+1) grid pixels of the slide: its centre is half a pixel in.
    np.testing.assert_allclose(by_name["regions"].data_to_world((0, 0)), [GRID_UM / 2] * 2)
    np.testing.assert_allclose(by_name["regions"].data_to_world((15, 15)), [SIZE_PX * PIXEL_UM - GRID_UM / 2] * 2)
    assert list(by_name["TLS"].features["name"]) == ["SFL", "SFL", "E-TLS"]
    # One unit for every layer, so the scale bar reads µm.
    assert {str(u) for layer in layers for u in layer.units} == {"micrometer"}


def test_points_follow_the_camera_when_the_slide_has_too_many(make_napari_viewer, result_folder):
    folder, obs = result_folder
    viewer = make_napari_viewer()
    data, kwargs, _ = cell_points_layer(read_cell_table(folder / CELLS), max_points=4)
    points = viewer.add_points(data, **kwargs)
    assert len(points.data) == 0, "more cells than max_points: none at open"
    viewer.scene.camera.center = (25.0, 25.0)
    viewer.scene.camera.zoom = 20.0
    update = follow_camera(viewer, points, read_cell_table(folder / CELLS), max_points=4)
    rows = update()
    lo, hi = view_box_um(viewer.scene.camera.center, viewer.scene.camera.zoom, canvas_size_px(viewer))
    inside = np.flatnonzero(((obs[["y_um", "x_um"]].to_numpy() >= lo) & (obs[["y_um", "x_um"]].to_numpy() < hi))
                            .all(axis=1))
    assert 0 < len(inside) <= 4
    np.testing.assert_array_equal(rows, inside)
    np.testing.assert_array_equal(points.features["cell_id"], obs["cell_id"].to_numpy()[inside])
    np.testing.assert_allclose(points.data, obs[["y_um", "x_um"]].to_numpy()[inside])
    viewer.scene.camera.zoom = 0.01  # the whole slide: too many cells again
    assert len(points.data) == 0


def test_reader_opens_a_slide_file(make_napari_viewer, result_folder):
    folder, _ = result_folder
    viewer = make_napari_viewer()
    layers = viewer.open(str(folder.parents[2] / "S1.ome.tif"), plugin="tme-napari")
    assert [layer.name for layer in layers] == list(CHANNELS)
    assert all(layer.multiscale and tuple(layer.scale) == (PIXEL_UM, PIXEL_UM) for layer in layers)


# --- TLS browser (read-only dock widget) ----------------------------------------------------------

def test_tls_views_group_parts_and_fit_with_margin():
    from tme_napari.tls_browser import tls_views

    polygons = [np.array([[10.0, 10], [30, 10], [30, 30]]), np.array([[10.0, 40], [30, 60], [10, 60]]),
                np.array([[70.0, 70], [110, 100], [70, 100]])]
    features = pd.DataFrame({"name": ["SFL", "SFL", "E-TLS"], "tls_id": [1, 1, 2], "area_um2": [800.0, 800, 600]})
    views = tls_views(polygons, features, margin_um=5.0)
    assert len(views) == 2
    assert views[0].center_yx_um == (20.0, 35.0)  # bounding box of both parts: y 10-30, x 10-60
    assert views[0].size_yx_um == (30.0, 60.0)
    assert "SFL" in views[0].label and "E-TLS" in views[1].label and "600" in views[1].label
    assert views[1].zoom((400, 400)) == pytest.approx(400 / 50.0)  # y 70-110 + margins: 50 µm
    without_ids = tls_views(polygons, features.drop(columns="tls_id"))
    assert len(without_ids) == 3
    with pytest.raises(ValueError, match="feature rows"):
        tls_views(polygons[:2], features)


def test_tls_browser_zooms_to_each_tls(make_napari_viewer, result_folder):
    from tme_napari.tls_browser import TLSBrowser

    folder, _ = result_folder
    viewer = make_napari_viewer()
    browser = TLSBrowser(viewer)
    assert browser.views == []
    viewer.open(str(folder), plugin="tme-napari")
    assert len(browser.views) == 2, "the list follows layers opened after the widget"
    browser.next()
    browser.next()
    # The second TLS is the triangle (70, 70)-(100, 70)-(85, 110) µm in (x, y): centre x 85, y 90.
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], [90.0, 85.0])
    zoom_second = viewer.scene.camera.zoom
    browser.show(0)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], [20.0, 35.0])
    assert viewer.scene.camera.zoom != zoom_second
    browser[0].value = 1  # choosing in the list zooms too
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], [90.0, 85.0])
    with pytest.raises(ValueError, match="out of range"):
        browser.show(5)


@pytest.mark.parametrize("canvas_yx", [(300, 900), (700, 250)])
def test_tls_zoom_fits_the_canvas_napari_reports(make_napari_viewer, result_folder, canvas_yx):
    from tme_napari.tls_browser import TLSBrowser

    folder, _ = result_folder
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="tme-napari")
    viewer.canvas.size = canvas_yx  # napari's public canvas model, (height, width) screen px
    assert canvas_size_px(viewer) == canvas_yx
    browser = TLSBrowser(viewer)
    browser.show(1)
    view = browser.views[1]
    lo, hi = view_box_um(viewer.scene.camera.center, viewer.scene.camera.zoom, canvas_yx)
    # The whole TLS (with its margin) is in view, and it fills the canvas along one axis.
    assert (hi - lo >= np.asarray(view.size_yx_um) - 1e-6).all()
    assert np.isclose(hi - lo, view.size_yx_um).any()


def test_tls_browser_docks_from_the_manifest(make_napari_viewer, result_folder):
    folder, _ = result_folder
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="tme-napari")
    _, widget = viewer.window.add_plugin_dock_widget("tme-napari", "TLS browser")
    assert len(widget.views) == 2


# --- a 10 x 10 mm slide is never read whole --------------------------------------------------------

def _big_lazy_slide(tmp_path):
    """A 10 x 10 mm, 2-channel slide at 0.5 µm (20000² px, 5 levels); levels 0-3 refuse to be read."""
    from tme_pipeline.io.slides import Slide

    def refuse(block):
        if block.size:  # dask calls once with an empty block to infer the output
            raise AssertionError("a full-resolution level was read")
        return block

    levels = []
    for k in range(5):
        side = 20000 // 2**k
        level = da.random.default_rng(k).integers(100, 1000, size=(2, side, side), chunks=(1, 1024, 1024))
        level = level.astype(np.uint16)
        levels.append(level if k == 4 else level.map_blocks(refuse, dtype=np.uint16))
    return Slide(path=tmp_path / "big.ome.tif", format="ome-tiff", levels=tuple(levels),
                 channel_names=("DAPI", "CD3"), pixel_um=PIXEL_UM)


def test_big_slide_layers_read_the_smallest_level_only(tmp_path):
    layers = slide_layers(_big_lazy_slide(tmp_path))
    assert [len(levels) for levels, _, _ in layers] == [5, 5]
    assert all(100 <= k["contrast_limits"][0] < k["contrast_limits"][1] <= 1000 for _, k, _ in layers)


def test_big_slide_shows_in_viewer_without_reading_full_resolution(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)  # a hidden viewer's screenshot is not drawn
    for data, kwargs, _ in slide_layers(_big_lazy_slide(tmp_path)):
        viewer.add_image(data, **kwargs)
    picture = viewer.screenshot(canvas_only=True, flash=False)
    assert picture[..., :3].max() > 0
    assert viewer.layers["DAPI"].data_level == 4  # the whole slide in view: the coarsest level
    np.testing.assert_allclose(viewer.layers["DAPI"].extent.world[1], [10000.0, 10000.0], atol=PIXEL_UM)
