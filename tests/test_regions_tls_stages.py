"""The tls, regions and annotate stages in a run: files, per-cell columns, and slides that have none."""

import dataclasses
import json

import numpy as np
import pytest

from tme_pipeline.cohort import run_cohort
from tme_pipeline.geojson import qupath_problems
from tme_pipeline.results import open_results
from tme_pipeline.stages import CELL_REGIONS
from tme_pipeline.synth import SlideCondition, synth_slide

CLASSIC = "segmentation: {method: classic}\n"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A TLS-rich resection piece, a slide without tumour, one that is mostly glass, and one with no B-cell rule."""
    root = tmp_path_factory.mktemp("regions_tls")
    rich = SlideCondition(tls_per_mm2=6.0, min_tls=2, tumor_fraction=0.45)
    no_tumour = dataclasses.replace(rich, tumor_fraction=0.0, tls_per_mm2=0.0, min_tls=0)
    glass = dataclasses.replace(rich, tissue_fraction=0.04, tls_per_mm2=0.0, min_tls=0)
    rows = ["patient_id,timepoint,slide"]
    for pid, cond, size, seed in (("R", rich, (1.2, 1.0), 11), ("N", no_tumour, (0.6, 0.5), 12),
                                  ("G", glass, (0.6, 0.5), 13)):
        synth_slide(root / f"{pid}.ome.tif", size_mm=size, seed=seed, condition=cond)
        rows.append(f"{pid},post,{pid}.ome.tif")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    (root / "c.yaml").write_text(CLASSIC)
    result = run_cohort(root / "m.csv", root / "out", config_path=root / "c.yaml")
    assert [s.status for s in result.slides] == ["done"] * 3, [s.error for s in result.slides]
    return root


def test_cells_carry_tls_and_region(cohort):
    slide = open_results(cohort / "out").slide("R")
    cells = slide.cells()
    obs = cells.obs
    assert list(obs["region"].cat.categories) == list(CELL_REGIONS) and obs["region"].notna().all()
    assert obs["tls_id"].dtype == np.int32 and obs["in_tumor"].dtype == bool
    # the sign of the border distance is the side of the bed
    d = obs["border_distance_um"].to_numpy()
    assert (d[obs["in_tumor"].to_numpy()] <= 0).all() and (d[~obs["in_tumor"].to_numpy()] >= 0).all()
    # tumour core cells lie deeper in the bed than the margin's half-width
    core = obs["region"].to_numpy() == "tumor_core"
    if core.any():
        assert (d[core] < 0).all()
    features, summary = slide.tls()
    assert summary is not None and len(features) == len(set(obs.loc[obs["tls_id"] > 0, "tls_id"]))
    # every cell inside a TLS is in the TLS it names: B or T cells dominate there
    in_tls = obs[obs["tls_id"] > 0]
    assert in_tls["phenotype"].isin(["B", "CD4_T", "CD8_T", "Treg"]).mean() > 0.6
    # the joined columns are the only difference from the phenotyped table
    typed = slide.phenotyped()
    np.testing.assert_array_equal(cells.X, typed.X)
    assert set(obs.columns) - set(typed.obs.columns) == {"tls_id", "region", "in_tumor", "border_distance_um"}
    areas = slide.regions()["areas_mm2"]
    assert areas["tissue"] == pytest.approx(areas["tumor_core"] + areas["margin"] + areas["stroma"], rel=1e-6)
    assert cells.uns["regions"]["areas_mm2"]["tissue"] == pytest.approx(areas["tissue"])


def test_geojson_files_import_into_qupath(cohort):
    folder = open_results(cohort / "out").slide("R").folder
    for name in ("regions.geojson", "tls.geojson"):
        collection = json.loads((folder / name).read_text())
        assert qupath_problems(collection) == [], name
        assert collection["properties"]["pixel_size_um"] == pytest.approx(0.5)
    assert (folder / "overview.png").stat().st_size > 10_000
    n_tls = len(json.loads((folder / "tls.geojson").read_text())["features"])
    assert len(list((folder / "tls").glob("*.png"))) == n_tls


@pytest.mark.parametrize("slide_id, region", [("N", "tumor"), ("G", "tumor")])
def test_empty_regions_and_tls_say_why(cohort, slide_id, region):
    results = open_results(cohort / "out")
    record = results.record(slide_id)
    assert record["status"] == "done"
    info = record["info"]
    assert info["tls"]["count"] == 0 and info["tls"]["reason"]
    assert region in info["regions"]["absent"] and info["regions"]["absent"][region]
    cells = results.slide(slide_id).cells()
    assert not cells.obs["in_tumor"].any()
    assert np.isnan(cells.obs["border_distance_um"].to_numpy()).all()


def test_a_panel_without_b_cells_gives_no_tls_and_says_why(cohort, tmp_path):
    rules = ("phenotypes:\n  - {name: CD8_T, markers: 'CD3+ CD8+'}\n  - {name: CD4_T, markers: 'CD3+ CD8-'}\n"
             "  - {name: tumor, markers: 'SATB2+ CD3-'}\n")
    (tmp_path / "c.yaml").write_text(CLASSIC + rules)
    (tmp_path / "m.csv").write_text(f"patient_id,timepoint,slide\nR,post,{cohort / 'R.ome.tif'}\n")
    result = run_cohort(tmp_path / "m.csv", tmp_path / "out", config_path=tmp_path / "c.yaml")
    (slide,) = result.slides
    assert slide.status == "done", slide.error
    assert slide.info["tls"]["count"] == 0 and "B" in slide.info["tls"]["reason"]
