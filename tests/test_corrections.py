"""Review corrections: the append-only record, applying each kind, and a scripted review end to end.

The plain functions are tested on hand-made TLS, cells and region grids; the acceptance test
(issue 14) runs a small synthetic slide, corrects it as a reviewer would (delete a TLS, change a
maturity, draw a TLS, reassign 10 cells), recomputes, and checks that the metrics move by exactly
what the corrections imply and nothing else moves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Polygon, box

from tme_pipeline.corrections import (
    append_corrections,
    apply_bed_edit,
    apply_gates,
    apply_reassignments,
    apply_tls_corrections,
    correction_inputs,
    load_corrections,
)
from tme_pipeline.results import corrections_file, open_results


def _ring(poly) -> list:
    return [list(p) for p in np.asarray(poly.exterior.coords)[:-1]]


# --- the record ------------------------------------------------------------------------------------

def test_append_keeps_old_entries_and_numbers_new_ones(tmp_path):
    path = corrections_file(tmp_path, "S1")
    first = append_corrections(path, "S1", [("gate", {"marker": "CD8", "gate": 120.5})], who="anna")
    assert [c.id for c in first] == ["c0001"] and first[0].who == "anna" and first[0].when.endswith("+00:00")
    old = json.loads(path.read_text())["corrections"][0]
    added = append_corrections(path, "S1", [("tls_add", {"polygon_um": _ring(box(0, 0, 90, 90)),
                                                          "maturity": "primary"}),
                                            ("phenotype_reassign", {"cell_ids": [3, 4], "phenotype": "B"})], who="ben")
    assert [c.id for c in added] == ["c0002", "c0003"]
    stored = json.loads(path.read_text())
    assert stored["slide_id"] == "S1" and stored["corrections"][0] == old, "an old entry never changes"
    assert [c.kind for c in load_corrections(path, slide_id="S1")] == ["gate", "tls_add", "phenotype_reassign"]


def test_a_bad_correction_is_refused_before_anything_is_written(tmp_path):
    path = corrections_file(tmp_path, "S1")
    append_corrections(path, "S1", [("gate", {"marker": "CD8", "gate": 1.0})])
    before = path.read_bytes()
    for kind, payload, message in (("tls_add", {"polygon_um": [[0, 0], [1, 1]], "maturity": "primary"}, "polygon"),
                                   ("tls_maturity", {"tls_id": 1, "polygon_um": _ring(box(0, 0, 5, 5)),
                                                     "maturity": "tertiary"}, "maturity"),
                                   ("tls_explode", {}, "unknown correction kind"),
                                   ("gate", {"marker": "CD8"}, "needs"),
                                   ("bed_edit", {"polygons_um": [_ring(box(0, 0, 50, 50))],
                                                 "holes_um": []}, "one list of hole rings per outline"),
                                   ("bed_edit", {"polygons_um": [_ring(box(0, 0, 50, 50))],
                                                 "holes_um": [[[[1, 1], [2, 2]]]]}, "a hole")):
        with pytest.raises(ValueError, match=message):
            append_corrections(path, "S1", [("gate", {"marker": "CD3", "gate": 2.0}), (kind, payload)])
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="not 'S2'"):
        load_corrections(path, slide_id="S2")
    assert load_corrections(tmp_path / "none.json") == ()


def test_only_the_stage_a_correction_concerns_gets_a_key_input(tmp_path):
    path = corrections_file(tmp_path, "S1")
    fixes = append_corrections(path, "S1", [("tls_delete", {"tls_id": 2, "polygon_um": _ring(box(0, 0, 9, 9))})])
    assert correction_inputs(fixes, "phenotype") == {} and correction_inputs(fixes, "regions") == {}
    tls = correction_inputs(fixes, "tls")["corrections"]
    assert tls["count"] == 1 and tls["last_id"] == "c0001" and len(tls["sha256"]) == 64
    restage = {"tls_id": 1, "polygon_um": _ring(box(20, 0, 29, 9)), "maturity": "primary"}
    more = fixes + append_corrections(path, "S1", [("tls_maturity", restage)])
    assert correction_inputs(more, "tls")["corrections"]["sha256"] != tls["sha256"]


# --- applying them --------------------------------------------------------------------------------

def _tls_result():
    from tme_pipeline.tls import TLSResult

    polys = [box(0, 0, 100, 100), box(200, 0, 300, 100)]
    table = pd.DataFrame({"tls_id": [1, 2], "maturity": ["primary", "aggregate"], "x_um": [50.0, 250],
                          "y_um": [50.0, 50],
                          "area_um2": [1e4, 1e4], "b_core_area_um2": [5e3, 5e3], "n_B": [3, 2], "n_T": [1, 1],
                          "b_density_per_mm2": [1.0, 1.0], "fdc_fraction": [0.5, 0.0], "gc_score": [0.0, 0.0]})
    # cells: 4 in TLS 1, 3 in TLS 2, 3 outside at x = 400-420
    x = np.array([10, 20, 30, 40, 210, 220, 230, 400, 410, 420], float)
    obs = pd.DataFrame({"cell_id": np.arange(1, 11), "x_um": x, "y_um": np.full(10, 50.0),
                        "phenotype": pd.Categorical(["B", "B", "B", "CD8_T", "B", "B", "CD4_T", "B", "CD8_T", "other"],
                                                    categories=["CD8_T", "CD4_T", "B", "other"])},
                       index=[str(i) for i in range(10)])
    cell_tls = np.array([1, 1, 1, 1, 2, 2, 2, 0, 0, 0], np.int32)
    return TLSResult(table, polys, cell_tls, [], {}, {}), ad.AnnData(obs=obs)


def test_tls_corrections_delete_restage_and_draw():
    from tme_pipeline.tls import TLSConfig

    result, cells = _tls_result()
    fixes = [dataclasses.replace(c, id=f"c{i}") for i, c in enumerate([
        _c("tls_maturity", {"tls_id": 1, "polygon_um": _ring(box(2, 0, 100, 100)), "maturity": "secondary"}),
        # recorded id 9 is wrong on purpose: the outline finds TLS 2
        _c("tls_delete", {"tls_id": 9, "polygon_um": _ring(box(200, 0, 300, 100))}),
        _c("tls_add", {"polygon_um": _ring(box(390, 0, 430, 100)), "maturity": "aggregate"}),
        _c("tls_delete", {"tls_id": 5, "polygon_um": _ring(box(900, 900, 990, 990))}),
    ], 1)]
    fixed, warnings = apply_tls_corrections(result, fixes, cells, config=TLSConfig())
    assert list(fixed.table["tls_id"]) == [1, 3] and list(fixed.table["maturity"]) == ["secondary", "aggregate"]
    assert list(fixed.table["correction"]) == ["c1", "c3"]
    np.testing.assert_array_equal(fixed.cell_tls_id, [1, 1, 1, 1, 0, 0, 0, 3, 3, 3])
    added = fixed.table.iloc[1]
    assert added["n_B"] == 1 and added["n_T"] == 1 and added["area_um2"] == pytest.approx(4000.0)
    assert np.isnan(added["fdc_fraction"])
    assert len(warnings) == 1 and "c4" in warnings[0], "a correction that no longer matches is reported"
    assert fixed.to_json()["counts"] == {"aggregate": 1, "primary": 0, "secondary": 1, "unstaged": 0}
    assert fixed.notes["corrections"] == ["c1", "c2", "c3"]
    np.testing.assert_array_equal(result.cell_tls_id, [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]), "the input is not changed"


def _c(kind, payload):
    from tme_pipeline.corrections import Correction

    return Correction("c?", "t", "2026-01-01T00:00:00+00:00", kind, payload)


def test_reassign_and_gates():
    from tme_pipeline.config import GatingConfig

    _, cells = _tls_result()
    info, warnings = apply_reassignments(cells, [
        _c("phenotype_reassign", {"cell_ids": [1, 2, 99], "phenotype": "CD8_T"}),
        _c("phenotype_reassign", {"cell_ids": [2], "phenotype": "other"})])
    assert list(cells.obs["phenotype"][:3]) == ["CD8_T", "other", "B"] and info["n_cells"] == 2
    assert list(cells.obs["phenotype"].cat.categories) == ["CD8_T", "CD4_T", "B", "other"]
    assert "1 cell id" in warnings[0]
    with pytest.raises(ValueError, match="'NK' is not one of"):
        apply_reassignments(cells, [_c("phenotype_reassign", {"cell_ids": [1], "phenotype": "NK"})])
    gating = GatingConfig(per_slide={"S1": {"CD3": 5.0}})
    new = apply_gates(gating, [_c("gate", {"marker": "CD8", "gate": 7.0}), _c("gate", {"marker": "CD8", "gate": 9.0})],
                      slide_id="S1")
    assert new.per_slide == {"S1": {"CD3": 5.0, "CD8": 9.0}} and gating.per_slide == {"S1": {"CD3": 5.0}}


def test_bed_edit_rebuilds_margin_core_and_cells():
    from tme_pipeline.regions import Regions, RegionsConfig

    g, shape = 10.0, (100, 100)  # 1 x 1 mm
    tissue = np.zeros(shape, bool)
    tissue[:, :80] = True
    empty = np.zeros(shape, bool)
    masks = {"tissue": tissue, "tumor": empty, "necrosis": empty, "fibrosis": empty}
    regions = Regions(g, masks, {}, None, None, {"tumor": "no tumour cells"}, np.array([]), np.array([]),
                      np.array([]), {})
    obs = pd.DataFrame({"x_um": np.linspace(5, 995, 200), "y_um": np.full(200, 500.0)})
    bed = box(0, 0, 300, 1000)  # x < 300 µm; tissue ends at x = 800 µm
    tls = Polygon([(100, 100), (200, 100), (200, 200), (100, 200)])
    config = RegionsConfig(margin_um=100.0, min_region_cells=0)
    edit = [_c("bed_edit", {"polygons_um": [_ring(bed)]})]
    carved = apply_bed_edit(regions, edit, obs, tls_polygons_um=[tls], config=config)
    assert carved.areas_mm2["tumor"] == pytest.approx(0.3 - 0.01)  # the TLS is carved out
    new = apply_bed_edit(regions, edit, obs, config=config)
    assert new.areas_mm2["tumor"] == pytest.approx(0.3)
    assert new.areas_mm2["margin"] == pytest.approx(0.2)  # 100 µm each side of x = 300
    assert new.areas_mm2["tissue"] == pytest.approx(new.areas_mm2["tumor_core"] + new.areas_mm2["margin"]
                                                    + new.areas_mm2["stroma"])
    x = obs["x_um"].to_numpy()
    assert (new.in_tumor == (x < 300)).all()
    np.testing.assert_allclose(new.border_distance_um[(x > 50) & (x < 800)], (x - 300)[(x > 50) & (x < 800)], atol=g)
    assert set(new.cell_region[(x > 200) & (x < 400)]) == {"margin"} and "tumor" not in new.absent
    assert apply_bed_edit(regions, [], obs, config=config) is regions


def test_bed_edit_with_a_hole_leaves_a_stroma_island_with_its_own_margin():
    from tme_pipeline.corrections import bed_polygons
    from tme_pipeline.regions import Regions, RegionsConfig

    g, shape = 10.0, (100, 100)  # 1 x 1 mm, tissue everywhere
    tissue = np.ones(shape, bool)
    empty = np.zeros(shape, bool)
    regions = Regions(g, {"tissue": tissue, "tumor": empty, "necrosis": empty, "fibrosis": empty}, {}, None, None,
                      {"tumor": "no tumour cells"}, np.array([]), np.array([]), np.array([]), {})
    obs = pd.DataFrame({"x_um": np.linspace(5, 595, 60), "y_um": np.full(60, 500.0)})
    bed, island = box(0, 0, 600, 1000), box(100, 300, 300, 700)  # island: x 100-300, y 300-700 µm
    config = RegionsConfig(margin_um=50.0, min_region_cells=0)
    payload = {"polygons_um": [_ring(bed)], "holes_um": [[_ring(island)]]}
    assert bed_polygons(payload, "test")[0].area == pytest.approx(bed.area - island.area)
    new = apply_bed_edit(regions, [_c("bed_edit", payload)], obs, config=config)
    assert new.areas_mm2["tumor"] == pytest.approx(0.6 - 0.08)
    x = obs["x_um"].to_numpy()
    assert (new.in_tumor == ((x < 100) | (x > 300))).all()
    # Inside the island the cells are stroma beyond the 50 µm margin, margin within it, on both sides.
    assert set(new.cell_region[(x > 160) & (x < 240)]) == {"stroma"}
    assert set(new.cell_region[((x > 100) & (x < 140)) | ((x > 260) & (x < 300))]) == {"margin"}
    inside = (x > 110) & (x < 290)
    np.testing.assert_allclose(new.border_distance_um[inside], np.minimum(x - 100, 300 - x)[inside], atol=g)
    # Stroma: the island less its 50 µm margin, and the tissue right of the bed beyond its margin (x > 650).
    right = (1000 - 650) * 1000 * 1e-6
    assert new.areas_mm2["stroma"] == pytest.approx((200 - 100) * (400 - 100) * 1e-6 + right)
    # The same bed without the hole: stroma only right of the bed.
    whole = apply_bed_edit(regions, [_c("bed_edit", {"polygons_um": [_ring(bed)]})], obs, config=config)
    assert whole.in_tumor[x < 600].all() and whole.areas_mm2["stroma"] == pytest.approx(right)


# --- a scripted review, end to end ----------------------------------------------------------------

CLASSIC = "segmentation: {method: classic}\n"


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A small slide with >= 3 TLS, run once; returns (root, out folder)."""
    from tme_pipeline.cohort import run_cohort
    from tme_pipeline.synth import SlideCondition, synth_slide

    root = tmp_path_factory.mktemp("corrections")
    synth_slide(root / "R.ome.tif", size_mm=(1.2, 1.0), seed=11,
                condition=SlideCondition(tls_per_mm2=6.0, min_tls=3, tumor_fraction=0.45))
    (root / "m.csv").write_text("patient_id,timepoint,slide\nR,post,R.ome.tif\n")
    (root / "c.yaml").write_text(CLASSIC)
    result = run_cohort(root / "m.csv", root / "out", config_path=root / "c.yaml")
    assert result.slides[0].status == "done", result.slides[0].error
    return root


def _copy(src, dst):
    shutil.copytree(src, dst, copy_function=os.link)  # stages never write into a shared file
    return dst


def test_a_tls_correction_makes_exactly_tls_and_after_stale(reviewed):
    from tme_pipeline.config import load_config
    from tme_pipeline.pipeline import slide_inputs
    from tme_pipeline.records import read_records, stage_keys, stale_stages
    from tme_pipeline.stages import STAGES

    inputs = slide_inputs(reviewed / "R.ome.tif", config=load_config(reviewed / "c.yaml"), slide_id="R")
    folder = reviewed / "out" / "slides" / "R"
    records = read_records(folder)
    assert stale_stages(STAGES, stage_keys(STAGES, inputs), records, folder) == []
    names = [s.name for s in STAGES]
    for kind, payload, first in (("tls_add", {"polygon_um": _ring(box(0, 0, 90, 90)), "maturity": "primary"}, "tls"),
                                 ("bed_edit", {"polygons_um": [_ring(box(0, 0, 500, 500))]}, "regions"),
                                 ("gate", {"marker": "CD8", "gate": 50.0}, "phenotype")):
        fixed = dataclasses.replace(inputs, corrections=(_c(kind, payload),))
        assert stale_stages(STAGES, stage_keys(STAGES, fixed), records, folder) == names[names.index(first):], kind


def test_scripted_review_changes_exactly_what_it_should(reviewed, tmp_path):
    from tme_napari.layers import result_folder_layers
    from tme_pipeline.recompute import recompute

    out = _copy(reviewed / "out", tmp_path / "out")
    slide = open_results(out).slide("R")
    before_metrics = json.loads((slide.folder / "metrics.json").read_text())["metrics"]
    features, before_tls = slide.tls()
    obs = slide.cells().obs
    areas = slide.regions()["areas_mm2"]
    tls = {int(p["tls_id"]): (geom, p) for geom, p in features}
    assert len(tls) >= 3
    dist = obs["border_distance_um"].to_numpy()
    # Delete the TLS farthest outside the bed (so the bed, whose TLS are carved out, stays as it is).
    far = {t: float(np.nanmin(np.where(obs["tls_id"] == t, dist, np.nan))) for t in tls}
    gone = max(far, key=far.get)
    restaged = next(t for t in tls if t != gone)
    old_maturity = tls[restaged][1]["maturity"]
    new_maturity = "aggregate" if old_maturity != "aggregate" else "primary"
    # Draw a 60 µm square TLS around the outside cell farthest from the bed and from every TLS.
    free = obs[(obs["tls_id"] == 0) & ~obs["in_tumor"]]
    anchor = free.loc[free["border_distance_um"].idxmax()]
    drawn = box(anchor["x_um"] - 30, anchor["y_um"] - 30, anchor["x_um"] + 30, anchor["y_um"] + 30)
    assert not any(drawn.intersects(g) for g, _ in features)
    reassigned = obs[obs["phenotype"] == "CD8_T"].head(10)
    path = corrections_file(out, "R")
    append_corrections(path, "R", [
        ("tls_delete", {"tls_id": gone, "polygon_um": _ring(tls[gone][0])}),
        ("tls_maturity", {"tls_id": restaged, "polygon_um": _ring(tls[restaged][0]), "maturity": new_maturity}),
        ("tls_add", {"polygon_um": _ring(drawn), "maturity": "secondary"}),
        ("phenotype_reassign", {"cell_ids": reassigned["cell_id"].tolist(), "phenotype": "CD4_T"}),
    ], who="reviewer")

    done = recompute(out)
    assert done.n_failed == 0
    assert done.slides[0].ran[:2] == ("phenotype", "tls") and "measure" in done.slides[0].reused
    slide = open_results(out).slide("R")
    run = json.loads((out / "run.json").read_text())
    assert run["slides"][0]["info"]["corrections"]["count"] == 4
    assert run["slides"][0]["info"]["corrections"]["last_id"] == "c0004"
    assert [c["kind"] for c in json.loads(path.read_text())["corrections"]] == [
        "tls_delete", "tls_maturity", "tls_add", "phenotype_reassign"]

    # TLS and cells
    _, after_tls = slide.tls()
    expected = dict(before_tls["counts"])
    expected[tls[gone][1]["maturity"]] -= 1
    expected[old_maturity] -= 1
    expected[new_maturity] += 1
    expected["secondary"] += 1
    assert after_tls["counts"] == expected and after_tls["count"] == before_tls["count"]
    assert slide.regions()["areas_mm2"] == areas
    cells = slide.cells().obs.set_index("cell_id")
    assert (cells.loc[reassigned["cell_id"], "phenotype"] == "CD4_T").all()
    assert (cells["phenotype"] != obs.set_index("cell_id")["phenotype"]).sum() == 10
    original = slide.folder / "original"
    assert (original / "tls.json").is_file() and (original / "phenotyped.h5ad").is_file()
    assert json.loads((slide.folder / "original" / "tls.json").read_text())["counts"] == before_tls["counts"]

    # metrics: the expected moves, and nothing else
    after = json.loads((slide.folder / "metrics.json").read_text())["metrics"]
    moved = {m: before_tls["counts"][m] - expected[m] for m in expected}
    want = dict(before_metrics)
    for m, d in moved.items():
        want[f"tls_{m}_count"] = before_metrics[f"tls_{m}_count"] - d
    gone_area = next(r["area_um2"] for r in before_tls["tls"] if r["tls_id"] == gone)
    want["tls_area_fraction"] += 100 * (drawn.area - gone_area) * 1e-6 / areas["tissue"]
    # densities are over viable tissue: a reassigned cell on necrosis moves none of them, and
    # each density's denominator is its region's area without necrosis
    masks, grid_um = slide.region_grids()
    necrosis = masks.get("necrosis", np.zeros((1, 1), bool))
    rows = np.clip((reassigned["y_um"].to_numpy() / grid_um).astype(int), 0, necrosis.shape[0] - 1)
    cols = np.clip((reassigned["x_um"].to_numpy() / grid_um).astype(int), 0, necrosis.shape[1] - 1)
    viable = ~necrosis[rows, cols] if necrosis.any() else np.ones(10, bool)
    in_tumor = reassigned["in_tumor"].to_numpy()
    where = {"tissue": np.ones(10, bool), "tumor": in_tumor,
             "tumor_margin": in_tumor | (reassigned["region"] == "margin").to_numpy()}
    where.update({r: (reassigned["region"] == r).to_numpy() for r in ("tumor_core", "margin", "stroma")})
    for region, mask in where.items():
        k = int((mask & viable).sum())
        if before_metrics.get(f"density_CD8_T_{region}") is None or k == 0:
            continue
        area = before_metrics[f"area_{region}_without_necrosis_mm2"]
        n = round(before_metrics[f"density_CD8_T_{region}"] * area / (before_metrics[f"fraction_CD8_T_{region}"] / 100))
        want[f"density_CD8_T_{region}"] -= k / area
        want[f"density_CD4_T_{region}"] += k / area
        want[f"fraction_CD8_T_{region}"] -= 100 * k / n
        want[f"fraction_CD4_T_{region}"] += 100 * k / n
        treg = before_metrics[f"density_Treg_{region}"] * area
        if before_metrics.get(f"ratio_cd8_t_treg_{region}") is not None:
            want[f"ratio_cd8_t_treg_{region}"] -= k / treg
    assert set(after) == set(want)
    def differs(m):
        if want[m] is None or after[m] is None:
            return (want[m] is None) != (after[m] is None)
        return not np.isclose(after[m], want[m], rtol=1e-9, atol=1e-9)

    wrong = {m: (want[m], after[m]) for m in want if differs(m)}
    assert not wrong
    # ... and the cohort tables follow
    assert done.tables
    cohort = open_results(out).cohort()
    for name in ("tls_secondary_count", "density_CD4_T_tissue", "tls_area_fraction"):
        assert cohort[["R"], [name]].X[0, 0] == pytest.approx(after[name], rel=1e-9)
    table = open_results(out).metrics_table()
    assert table.loc[table["metric"] == "density_CD8_T_tissue", "value"].item() == pytest.approx(
        after["density_CD8_T_tissue"], rel=1e-9)

    # reopening shows the corrections
    layers = {kwargs["name"]: (data, kwargs)
              for data, kwargs, _ in result_folder_layers(slide.folder, load_slide=False)}
    shown = layers["TLS"][1]["features"]
    assert gone not in set(shown["tls_id"]) and "secondary" in set(shown.loc[shown["tls_id"] > max(tls), "name"])
    assert set(shown.loc[shown["tls_id"] == restaged, "name"]) == {new_maturity}
    points = layers["cells (phenotype)"][1]["features"].set_index("cell_id")
    assert (points.loc[reassigned["cell_id"], "phenotype"] == "CD4_T").all()

    # nothing stale any more: the command re-runs nothing and keeps the record of the corrections
    from tme_pipeline.cli import main

    assert main(["recompute", str(out), "--slide", "R"]) == 0
    entry = json.loads((out / "run.json").read_text())["slides"][0]
    assert entry["status"] == "skipped" and entry["stages"]["ran"] == []
    assert entry["info"]["corrections"]["count"] == 4 and "recomputed" in json.loads((out / "run.json").read_text())
