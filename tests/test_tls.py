"""TLS detection, outline, maturity and GeoJSON on hand-built point patterns."""

from __future__ import annotations

import json
import math

import anndata
import numpy as np
import pandas as pd
import pytest
import shapely
from pydantic import ValidationError
from shapely.geometry import shape

from tme_pipeline.geojson import qupath_problems
from tme_pipeline.tls import TLSConfig, find_tls, tls_geojson

MARKERS = ["DAPI", "CD3", "CD8", "CD20", "CD21"]
B_SPACING_UM, T_SPACING_UM = 7.0, 8.0  # ~20 000 B/mm² (a follicle) and ~15 600 T/mm²


def grid_in(rng, cx, cy, r_in, r_out, spacing):
    """Jittered square grid of points with r_in <= distance < r_out from (cx, cy), µm."""
    g = np.arange(-r_out, r_out + spacing, spacing)
    x, y = np.meshgrid(g, g)
    pts = np.column_stack([x.ravel(), y.ravel()]) + rng.uniform(-0.25, 0.25, (x.size, 2)) * spacing
    d = np.hypot(pts[:, 0], pts[:, 1])
    return pts[(d >= r_in) & (d < r_out)] + (cx, cy)


class Slide:
    """Cells built piece by piece; ``adata()`` gives the AnnData find_tls reads."""

    def __init__(self, seed=0, size_um=2000.0, background_per_mm2=800.0):
        self.rng = np.random.default_rng(seed)
        self.parts = []
        n = int(background_per_mm2 * (size_um / 1000) ** 2)
        self.add(self.rng.uniform(0, size_um, (n, 2)), "other")

    def add(self, pts, phenotype, *, cd21=None, area=33.0, dapi=4000.0):
        cd21 = self.rng.normal(200, 15, len(pts)) if cd21 is None else cd21 + self.rng.normal(0, 15, len(pts))
        self.parts.append(pd.DataFrame({"x_um": pts[:, 0], "y_um": pts[:, 1], "phenotype": phenotype,
                                        "nucleus_area_um2": area * self.rng.uniform(0.9, 1.1, len(pts)),
                                        "dapi_mean": dapi * self.rng.uniform(0.9, 1.1, len(pts)), "cd21": cd21}))

    def tls(self, cx, cy, radius_um, *, maturity="aggregate", b_name="B", mesh_cd21=900.0):
        """A follicle as in the generator: B core rho < 0.62, T zone 0.62-1, GC rho < 0.33."""
        core_r, gc_r = 0.62 * radius_um, 0.33 * radius_um
        mesh = mesh_cd21 if maturity in ("primary", "secondary") else None
        if maturity == "secondary":
            self.add(grid_in(self.rng, cx, cy, 0, gc_r, 9.0), b_name, cd21=mesh, area=64.0, dapi=2000.0)
            self.add(grid_in(self.rng, cx, cy, gc_r, core_r, B_SPACING_UM), b_name, cd21=mesh)
        else:
            self.add(grid_in(self.rng, cx, cy, 0, core_r, B_SPACING_UM), b_name, cd21=mesh)
        t = grid_in(self.rng, cx, cy, core_r, radius_um, T_SPACING_UM)
        self.add(t, self.rng.choice(["CD4_T", "CD8_T", "Treg"], len(t), p=[0.6, 0.3, 0.1]))

    def adata(self, markers=MARKERS):
        obs = pd.concat(self.parts, ignore_index=True)
        x = np.column_stack([obs["cd21"] if m == "CD21" else self.rng.normal(300, 20, len(obs)) for m in markers])
        obs = obs.drop(columns="cd21")
        obs["phenotype"] = obs["phenotype"].astype("category")
        obs.index = obs.index.astype(str)
        a = anndata.AnnData(X=x.astype(np.float32), obs=obs)
        a.var_names = list(markers)
        a.obsm["spatial"] = obs[["x_um", "y_um"]].to_numpy()
        return a


def test_dense_b_core_with_t_zone_is_one_tls_with_its_outline_area():
    s = Slide()
    s.tls(1000, 1000, 120)
    a = s.adata()
    r = find_tls(a, TLSConfig())
    assert len(r.table) == 1 and r.table["tls_id"].tolist() == [1]
    row = r.table.iloc[0]
    # The outline runs cell_radius_um (4 µm) beyond the outermost cell centres, which sit within
    # half a grid step (4 µm) inside the 120 µm disc: its radius is 120 + 4 ± 4 µm, area ± 7 %.
    expected = math.pi * (120 + TLSConfig().cell_radius_um) ** 2
    assert row["area_um2"] == pytest.approx(expected, rel=0.07)
    assert r.polygons_um[0].area == pytest.approx(row["area_um2"])
    assert (row["x_um"], row["y_um"]) == pytest.approx((1000, 1000), abs=5)
    n_core = int(((np.hypot(*(a.obs[["x_um", "y_um"]].to_numpy() - 1000).T) < 0.62 * 120)
                  & (a.obs["phenotype"] == "B")).sum())
    assert row["n_B"] == n_core
    assert row["n_T"] > 100


def test_t_cell_cluster_alone_is_rejected_with_a_reason():
    s = Slide()
    s.add(grid_in(s.rng, 800, 800, 0, 50, T_SPACING_UM), "CD8_T")
    r = find_tls(s.adata(), TLSConfig())
    assert len(r.table) == 0 and not r.cell_tls_id.any()
    reasons = [x["reason"] for x in r.rejected]
    assert any("T-cell cluster without a B-cell core" in x for x in reasons)
    assert r.to_json()["reason"]


def test_loose_b_patch_and_single_b_cells_are_not_tls():
    s = Slide()
    # A loose B-cell patch (~320 B/mm²) in a T-cell-rich area, and scattered single B cells.
    pts = s.rng.uniform(-120, 120, (200, 2))
    s.add(pts[np.hypot(*pts.T) < 120][:15] + 600, "B")
    s.add(grid_in(s.rng, 600, 600, 0, 140, 12.0), "CD4_T")
    s.add(s.rng.uniform(1000, 1900, (40, 2)), "B")
    r = find_tls(s.adata(), TLSConfig())
    assert len(r.table) == 0
    assert any("single or loose" in x["reason"] for x in r.rejected)


def test_a_b_core_without_t_zone_or_too_small_is_rejected_with_counts():
    s = Slide(background_per_mm2=0)
    s.add(grid_in(s.rng, 500, 500, 0, 60, B_SPACING_UM), "B")  # ~230 B, no T cells
    s.add(grid_in(s.rng, 1500, 1500, 0, 25, B_SPACING_UM), "B")  # ~40 B < 50
    s.add(grid_in(s.rng, 1500, 1500, 25, 60, T_SPACING_UM), "CD4_T")
    r = find_tls(s.adata(), TLSConfig())
    assert len(r.table) == 0
    reasons = sorted(x["reason"] for x in r.rejected)
    assert any(x.startswith("no T-cell zone: 0 T cells within 50 µm < 10") for x in reasons)
    small = [x for x in r.rejected if "B cells < 50" in x["reason"]]
    assert len(small) == 1 and small[0]["n_B"] < 50 and small[0]["x_um"] == pytest.approx(1500, abs=5)


def test_two_tls_far_apart_get_two_ids_and_mark_their_cells():
    s = Slide()
    s.tls(500, 500, 100)
    s.tls(1500, 1400, 150)
    a = s.adata()
    r = find_tls(a, TLSConfig())
    assert r.table["tls_id"].tolist() == [1, 2]
    # ids go by area, largest first
    assert r.table.loc[0, "x_um"] == pytest.approx(1500, abs=5)
    xy = a.obs[["x_um", "y_um"]].to_numpy()
    d1, d2 = np.hypot(*(xy - (1500, 1400)).T), np.hypot(*(xy - (500, 500)).T)
    # The outline holds the B core and the T cells within t_zone_um (50 µm) of it.
    assert (r.cell_tls_id[d1 < 0.62 * 150 + 40] == 1).all() and (r.cell_tls_id[d2 < 90] == 2).all()
    assert (r.cell_tls_id[(d1 > 175) & (d2 > 125)] == 0).all()
    assert r.cell_tls_id.dtype == np.int32 and r.cell_tls_id.shape == (a.n_obs,)


def test_maturity_from_the_fdc_mesh_and_germinal_centre():
    s = Slide()
    s.tls(400, 400, 110, maturity="aggregate")
    s.tls(1500, 500, 150, maturity="primary")
    s.tls(900, 1400, 200, maturity="secondary")
    r = find_tls(s.adata(), TLSConfig())
    by_place = {round(x / 100): m for x, m in zip(r.table["x_um"], r.table["maturity"])}
    assert by_place == {4: "aggregate", 15: "primary", 9: "secondary"}
    t = r.table.set_index("maturity")
    assert t.loc["aggregate", "fdc_fraction"] < 0.1 < 0.9 < t.loc["primary", "fdc_fraction"]
    threshold = TLSConfig().secondary_min_gc_score
    assert t.loc["primary", "gc_score"] < threshold < t.loc["secondary", "gc_score"]


def test_a_weak_mesh_is_found_when_tumour_cells_leak_into_cd21():
    # Another lab: a fifth of the background (tumour cells) reads +100 in CD21 through
    # spill-over, and the mesh stands only ~9 noise SDs (+140) above the unstained cells.
    s = Slide(background_per_mm2=600.0)
    tumour = s.rng.uniform(0, 2000, (600, 2))
    s.add(tumour, "tumor", cd21=np.full(len(tumour), 300.0))
    s.tls(500, 500, 110, maturity="aggregate")
    s.tls(1400, 1400, 150, maturity="primary", mesh_cd21=340.0)
    r = find_tls(s.adata(), TLSConfig())
    by_place = {round(x / 100): m for x, m in zip(r.table["x_um"], r.table["maturity"])}
    assert by_place == {5: "aggregate", 14: "primary"}
    assert 200 < r.notes["fdc_threshold"] < 300  # above the unstained cells, below the leaking ones
    # A high background quantile follows the leaking tumour cells over the mesh.
    old = find_tls(s.adata(), TLSConfig(fdc_background_quantile=0.95, fdc_mad_factor=3.0))
    assert set(old.table["maturity"]) == {"aggregate"}


def test_germinal_centre_is_judged_against_the_slides_b_cells():
    # Blur makes every small nucleus read larger and paler: the T cells at 1.8x the B cells'
    # area (the germinal centre's own size) and 0.75x their DAPI; the germinal centre still
    # stands out from the mantle.
    s = Slide()
    s.tls(900, 900, 200, maturity="secondary")
    s.tls(400, 1600, 150, maturity="primary")
    a = s.adata()
    t = a.obs["phenotype"].isin(["CD4_T", "CD8_T", "Treg"]).to_numpy()
    a.obs.loc[t, "nucleus_area_um2"] *= 1.8
    a.obs.loc[t, "dapi_mean"] *= 0.75
    r = find_tls(a, TLSConfig())
    by_place = {round(x / 100): m for x, m in zip(r.table["x_um"], r.table["maturity"])}
    assert by_place == {9: "secondary", 4: "primary"}


def test_without_the_fdc_marker_maturity_is_unstaged_and_says_why():
    s = Slide()
    s.tls(800, 800, 120, maturity="primary")
    r = find_tls(s.adata(markers=["DAPI", "CD3", "CD8", "CD20"]), TLSConfig())
    assert r.table["maturity"].tolist() == ["unstaged"]
    out = r.to_json()
    assert "CD21" in out["maturity_reason"] and out["counts"]["unstaged"] == 1
    assert out["tls"][0]["fdc_fraction"] is None


def test_phenotype_names_are_matched_exactly():
    s = Slide()
    s.tls(800, 800, 120, b_name="B_naive")
    a = s.adata()
    assert len(find_tls(a, TLSConfig()).table) == 0
    assert len(find_tls(a, TLSConfig(b_phenotypes=("B_naive",))).table) == 1


def test_geojson_is_importable_and_its_pixel_areas_match():
    s = Slide()
    s.tls(500, 500, 100, maturity="primary")
    s.tls(1400, 1400, 160, maturity="secondary")
    r = find_tls(s.adata(), TLSConfig())
    pixel_um = 0.325
    gj = tls_geojson(r, pixel_um=pixel_um, slide_id="S1")
    assert qupath_problems(gj) == []
    json.dumps(gj)
    assert gj["properties"]["pixel_size_um"] == pixel_um and gj["properties"]["slide_id"] == "S1"
    for f, (_, row) in zip(gj["features"], r.table.iterrows()):
        props = f["properties"]
        assert props["tls_id"] == row["tls_id"] and props["classification"]["name"] == row["maturity"]
        assert shape(f["geometry"]).area * pixel_um**2 == pytest.approx(row["area_um2"], rel=0.01)
        assert props["measurements"]["n_B"] == row["n_B"]
        assert set(props["measurements"]) >= {"area_um2", "n_B", "n_T", "fdc_fraction", "gc_score"}
    assert json.loads(json.dumps(r.to_json()))["count"] == 2


def test_bad_input_raises_and_a_slide_without_b_cells_says_why():
    s = Slide()
    s.add(grid_in(s.rng, 800, 800, 0, 50, T_SPACING_UM), "CD8_T")
    a = s.adata()
    r = find_tls(a, TLSConfig())
    assert len(r.table) == 0 and "no B cells" in r.to_json()["reason"]
    with pytest.raises(ValueError, match="phenotype"):
        find_tls(anndata.AnnData(X=a.X, obs=a.obs.drop(columns="phenotype")), TLSConfig())
    bad = a.copy()
    bad.obs.loc[bad.obs.index[0], "x_um"] = np.nan
    with pytest.raises(ValueError, match="x_um"):
        find_tls(bad, TLSConfig())
    with pytest.raises(ValidationError):
        TLSConfig(link_um=12, min_b_cell=50)


def test_outline_is_a_valid_polygon_holding_the_core():
    s = Slide()
    s.tls(900, 900, 180, maturity="secondary")
    r = find_tls(s.adata(), TLSConfig())
    poly = r.polygons_um[0]
    assert poly.is_valid and poly.geom_type == "Polygon" and len(poly.interiors) == 0
    assert poly.contains(shapely.Point(900, 900).buffer(0.62 * 180 - 5))


def test_a_gc_marker_in_the_panel_decides_the_germinal_centre():
    s = Slide()
    s.tls(600, 600, 160, maturity="primary")  # mesh, resting nuclei everywhere
    s.tls(1500, 1500, 160, maturity="primary")
    a = s.adata(markers=[*MARKERS, "Ki67"])
    xy = a.obs[["x_um", "y_um"]].to_numpy()
    # Proliferating B cells in the centre of the second follicle only: its germinal centre.
    gc = (np.hypot(*(xy - 1500).T) < 0.33 * 160) & (a.obs["phenotype"] == "B").to_numpy()
    a.X[gc, len(MARKERS)] = 2000.0
    r = find_tls(a, TLSConfig())
    by_place = {round(x / 100): m for x, m in zip(r.table["x_um"], r.table["maturity"])}
    assert by_place == {6: "primary", 15: "secondary"}
    # Without the marker the same nuclei show no germinal centre.
    assert set(find_tls(a[:, MARKERS].copy(), TLSConfig()).table["maturity"]) == {"primary"}
