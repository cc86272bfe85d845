"""Per-cell measurements (tme_pipeline.quantify): hand-computed values, tiled == reference."""

import anndata as ad
import dask.array as da
import numpy as np
import pytest
import zarr

from blobs import make_nuclei
from tme_pipeline.cells import expand_nuclei_tiled
from tme_pipeline.quantify import measure_cells
from tme_pipeline.quantify_reference import measure_cells_reference
from tme_pipeline.tiling import tile_grid

PIXEL_UM = 0.5
PANEL = {"markers": {"DAPI": 0, "CD8": 1}, "compartments": {"DAPI": "nuclear", "CD8": "membrane"},
         "nuclear_channel": 0}


def _measure(nuclei, cells, image, grid, **kw):
    args = {**PANEL, "pixel_um": PIXEL_UM, "expand_um": 1.0, "membrane_um": 0.75, **kw}
    tiled = measure_cells(nuclei, cells, da.from_array(image, chunks=(1, 16, 16)), grid=grid, **args)
    return tiled, measure_cells_reference(nuclei, cells, image, **args)


def _assert_same(a, b):
    np.testing.assert_array_equal(a.obs["cell_id"], b.obs["cell_id"])
    assert list(a.obs.columns) == list(b.obs.columns) and list(a.obs_names) == list(b.obs_names)
    for column in a.obs.columns:
        np.testing.assert_allclose(a.obs[column], b.obs[column], rtol=1e-9, err_msg=column)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-6)
    for name in ("nucleus", "membrane", "cytoplasm", "cell"):
        np.testing.assert_allclose(a.layers[name], b.layers[name], rtol=1e-6, err_msg=name)
    for key in ("spatial", "nucleus_polygon_um"):
        np.testing.assert_allclose(a.obsm[key], b.obsm[key], rtol=1e-6, err_msg=key)
    assert a.var.equals(b.var)


def _two_cells():
    """Two square nuclei with hand-made cells in a 20 x 20 image; values below by hand."""
    nuclei = np.zeros((20, 20), np.uint32)
    cells = np.zeros((20, 20), np.uint32)
    nuclei[4:8, 4:8] = 3  # 16 px, centroid (5.5, 5.5) px
    cells[2:10, 2:10] = 3  # 64 px; ring (8-neighbour outside) = outer frame, 28 px
    nuclei[12:15, 13:16] = 9  # 9 px, centroid (13, 14) px; its cell is the nucleus: no cytoplasm
    cells[12:15, 13:16] = 9
    image = np.zeros((2, 20, 20), np.float32)
    image[0][nuclei == 3] = 100
    image[0][nuclei == 9] = 50
    image[1] = 1
    frame = (cells == 3)
    frame[3:9, 3:9] = False
    image[1][frame] = 29
    image[1, 13, 14] = 10
    return nuclei, cells, image


@pytest.mark.parametrize("tile_um", [10.0, 5.0])  # one tile; 2 x 2 tiles of 10 px
def test_hand_computed_two_cells(tile_um):
    nuclei, cells, image = _two_cells()
    grid = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=tile_um, overlap_um=2.5, max_object_um=2.5)
    adata, reference = _measure(nuclei, cells, image, grid, channel_names=("DAPI", "Opal 520"), perinuclear_um=1.0)
    assert list(adata.obs["cell_id"]) == [3, 9] and list(adata.obs_names) == ["3", "9"]
    assert list(adata.var_names) == ["DAPI", "CD8"]
    assert list(adata.var["compartment"]) == ["nuclear", "membrane"]
    assert list(adata.var["channel"]) == ["DAPI", "Opal 520"]
    np.testing.assert_allclose(adata.layers["nucleus"], [[100, 1], [50, 2]])
    np.testing.assert_allclose(adata.layers["membrane"], [[0, 29], [50, 1]])
    # cell 3: 48 px = 28 frame px (29) + 20 px (1); cell 9: none, so the ring
    np.testing.assert_allclose(adata.layers["cytoplasm"], [[0, 832 / 48], [50, 1]])
    np.testing.assert_allclose(adata.layers["cell"], [[25, 848 / 64], [50, 2]])
    # perinuclear band, 1 µm = 2 px: cell pixels outside the nucleus at most 2 px (centre to
    # centre) from it, counted here by brute force over the nucleus pixels; cell 9 has no
    # band (its cell is its nucleus), so the membrane ring
    yy, xx = np.nonzero((cells == 3) & (nuclei != 3))
    ny, nx = np.nonzero(nuclei == 3)
    near = np.min(np.hypot(yy[:, None] - ny, xx[:, None] - nx), axis=1) <= 2
    peri = image[:, yy[near], xx[near]].mean(axis=1)
    assert near.sum() == 4 * 4 * 2 + 4  # 2 px on each side, one diagonal px per corner
    np.testing.assert_allclose(peri, [0, (16 * 29 + 20) / 36])  # 4 px of each straight side lie on the frame
    np.testing.assert_allclose(adata.layers["perinuclear"], [peri, [50, 1]], rtol=1e-6)
    np.testing.assert_allclose(adata.X, [[100, 29], [50, 1]])
    assert adata.X.dtype == np.float32 and adata.layers["cell"].dtype == np.float32
    obs = adata.obs
    np.testing.assert_allclose(obs["area_um2"], [64 * 0.25, 9 * 0.25])
    np.testing.assert_allclose(obs["nucleus_area_um2"], [16 * 0.25, 9 * 0.25])
    np.testing.assert_allclose(obs[["x_um", "y_um"]], [[2.75, 2.75], [7.0, 6.5]])
    np.testing.assert_allclose(adata.obsm["spatial"], [[2.75, 2.75], [7.0, 6.5]])
    np.testing.assert_allclose(obs["eccentricity"], [0, 0], atol=1e-12)
    np.testing.assert_allclose(obs["solidity"], [1, 1])
    np.testing.assert_allclose(obs["dapi_mean"], [100, 50])
    assert adata.uns["spatial_unit"] == "um" and adata.uns["pixel_um"] == PIXEL_UM
    assert adata.uns["cells"] == {"expand_um": 1.0, "membrane_um": 0.75, "perinuclear_um": 1.0, "n_rays": 32,
                                  "neighbour_correction": False}
    _assert_same(adata, reference)


@pytest.fixture(scope="module")
def blobs_region():
    """Dense blobs over 3 x 3 tiles, grown into cells, with 4 random channels."""
    dapi, nuclei = make_nuclei((330, 310), pixel_um=PIXEL_UM, density=1.5, seed=1)
    nuclei = nuclei.astype(np.uint32)
    grid = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=55.0, overlap_um=20.0, max_object_um=16.0)
    cells = expand_nuclei_tiled(nuclei, grid=grid, pixel_um=PIXEL_UM, expand_um=3.0,
                                store=zarr.group(), component="cells")
    rng = np.random.default_rng(0)
    image = np.concatenate([dapi[None], rng.gamma(2.0, 10.0, (3, *nuclei.shape)).astype(np.float32)])
    return nuclei, cells, image, grid


def test_tiled_equals_reference_over_3x3_tiles(blobs_region):
    nuclei, cells, image, grid = blobs_region
    assert grid.grid_shape == (3, 3)
    panel = {"markers": {"CD3": 2, "DAPI": 0, "CD8": 1, "PanCK": 3},
             "compartments": {"CD3": "membrane", "DAPI": "nuclear", "CD8": "whole", "PanCK": "cytoplasm"}}
    tiled, reference = _measure(nuclei, cells, image, grid, expand_um=3.0, membrane_um=1.5, **panel)
    ids = np.unique(nuclei)[1:]
    np.testing.assert_array_equal(tiled.obs["cell_id"], ids)  # every cell once, across seams
    _assert_same(tiled, reference)
    assert list(tiled.var_names) == ["CD3", "DAPI", "CD8", "PanCK"]
    assert list(tiled.var["channel"]) == ["C2", "C0", "C1", "C3"]
    for j, layer in enumerate(["membrane", "nucleus", "cell", "cytoplasm"]):
        np.testing.assert_array_equal(tiled.X[:, j], tiled.layers[layer][:, j])
    assert (tiled.obs["area_um2"] > tiled.obs["nucleus_area_um2"]).all()


def test_nucleus_on_tile_corner_measured_once():
    nuclei = np.zeros((40, 40), np.uint32)
    yy, xx = np.mgrid[:40, :40]
    nuclei[np.hypot(yy - 20, xx - 20) <= 5] = 4  # centroid on the corner of four cores
    nuclei[16:24, 1:9] = 2  # centroid (19.5, 4.5): rounds half up, into the lower tiles
    grid = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=10.0, overlap_um=7.5, max_object_um=7.5)
    assert grid.grid_shape == (2, 2)
    cells = expand_nuclei_tiled(nuclei, grid=grid, pixel_um=PIXEL_UM, expand_um=1.0,
                                store=zarr.group(), component="c")[:]
    image = np.stack([nuclei * 3.0, yy * 1.0]).astype(np.float32)
    tiled, reference = _measure(nuclei, cells, image, grid)
    assert list(tiled.obs["cell_id"]) == [2, 4]
    _assert_same(tiled, reference)


def test_polygon_of_a_disc_and_of_an_ellipse():
    yy, xx = np.mgrid[:41, :45]
    nuclei = np.zeros(yy.shape, np.uint32)
    nuclei[np.hypot(yy - 20, xx - 12) <= 8] = 1
    nuclei[((yy - 20) / 4.0) ** 2 + ((xx - 34) / 9.0) ** 2 <= 1] = 2
    grid = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=30.0, overlap_um=10.0, max_object_um=10.0)
    adata, reference = _measure(nuclei, nuclei, np.zeros((2, *yy.shape), np.float32), grid)
    poly = adata.obsm["nucleus_polygon_um"]
    assert poly.shape == (2, 32, 2) and poly.dtype == np.float32
    disc = np.hypot(poly[0, :, 0] - 12 * PIXEL_UM, poly[0, :, 1] - 20 * PIXEL_UM)
    assert np.all(np.abs(disc - 8 * PIXEL_UM) <= PIXEL_UM)
    # Ray 0 points along +x, ray 8 (a quarter turn) along +y, as stardist's dist_to_coord.
    cx, cy = 34 * PIXEL_UM, 20 * PIXEL_UM
    assert poly[1, 0, 1] == pytest.approx(cy) and abs(poly[1, 0, 0] - cx - 9 * PIXEL_UM) <= PIXEL_UM
    assert poly[1, 8, 0] == pytest.approx(cx) and abs(poly[1, 8, 1] - cy - 4 * PIXEL_UM) <= PIXEL_UM
    _assert_same(adata, reference)


def test_polygon_of_a_ring_starts_inside_the_nucleus():
    yy, xx = np.mgrid[:30, :30]
    r = np.hypot(yy - 15, xx - 15)
    nuclei = ((r >= 4) & (r <= 8)).astype(np.uint32)  # centroid pixel in the hole
    grid = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=15.0, overlap_um=10.0, max_object_um=10.0)
    adata, reference = _measure(nuclei, nuclei, np.ones((2, 30, 30), np.float32), grid)
    poly = adata.obsm["nucleus_polygon_um"][0] / PIXEL_UM
    # Ray 0 keeps the centre's row, ray 8 its column: the rays start from a ring
    # pixel nearest the centroid (15, 15), 4 px away, not from the hole.
    cx, cy = poly[8, 0], poly[0, 1]
    assert nuclei[int(round(cy)), int(round(cx))] == 1
    assert np.hypot(cx - 15, cy - 15) == pytest.approx(4, abs=1e-5)
    _assert_same(adata, reference)


def test_round_trip_through_h5ad(blobs_region, tmp_path):
    nuclei, cells, image, grid = blobs_region
    adata, _ = _measure(nuclei, cells, image, grid, expand_um=3.0, membrane_um=1.5)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    back = ad.read_h5ad(tmp_path / "cells.h5ad")
    _assert_same(back, adata)
    assert back.obsm["nucleus_polygon_um"].shape == (adata.n_obs, 32, 2)
    assert back.uns["cells"] == {"expand_um": 3.0, "membrane_um": 1.5, "perinuclear_um": 1.0, "n_rays": 32,
                                 "neighbour_correction": False}
    assert back.obs["cell_id"].dtype == np.int64


def test_empty_slide_gives_empty_writable_table(tmp_path):
    empty = np.zeros((30, 30), np.uint32)
    grid = tile_grid(empty.shape, pixel_um=PIXEL_UM, tile_um=10.0, overlap_um=5.0, max_object_um=5.0)
    adata, _ = _measure(empty, empty, np.ones((2, 30, 30), np.float32), grid)
    assert adata.shape == (0, 2) and adata.obsm["nucleus_polygon_um"].shape == (0, 32, 2)
    adata.write_h5ad(tmp_path / "empty.h5ad")


def test_object_larger_than_the_overlap_refused():
    nuclei = np.zeros((60, 60), np.uint32)
    nuclei[5:45, 5:45] = 1
    grid = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=10.0, overlap_um=2.0, max_object_um=2.0)
    with pytest.raises(ValueError, match="reaches the edge of tile"):
        _measure(nuclei, nuclei, np.ones((2, 60, 60), np.float32), grid, expand_um=0.0)


def test_bad_arguments_refused():
    lab = np.zeros((20, 20), np.uint32)
    grid = tile_grid(lab.shape, pixel_um=PIXEL_UM, tile_um=10.0, overlap_um=2.5, max_object_um=2.5)
    with pytest.raises(ValueError, match="valid compartment"):
        _measure(lab, lab, np.ones((2, 20, 20), np.float32), grid, compartments={"DAPI": "nuclear", "CD8": "ring"})
    with pytest.raises(ValueError, match=r"\(C, Y, X\)"):
        _measure(lab, lab, np.ones((2, 20, 21), np.float32), grid)
    with pytest.raises(ValueError, match="out of range"):
        _measure(lab, lab, np.ones((1, 20, 20), np.float32), grid)
