"""Cohort tables: every manifest slide, failed ones never looking complete, patients paired
pre/post with one-sided patients kept, a tidy CSV with a unit on every row.

The results folder is hand-written here (run.json, a manifest, per-slide ``metrics.json`` as
the data contract fixes them), so the tables are checked against the very values written;
``write_results`` is shared with the R and Python interop tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from tme_pipeline.cohort_tables import LOG2_PSEUDOCOUNT, METRICS_COLUMNS, write_cohort_tables
from tme_pipeline.results import METRICS_JSON, RUN_JSON, STAGES_JSON, open_results, slide_folder

UNITS = {
    "area_tissue_mm2": "mm2",
    "density_CD8_T_tumor": "cells/mm2",
    "fraction_CD8_T_tumor": "%",
    "ratio_cd8_t_treg_margin": "ratio",
    "tls_count": "count",
    "pdl1_cps": "score",
}

# slide_id, patient, timepoint, response, site (differs within a patient), run status, immune class
SLIDES = [
    ("P1_pre", "P1", "pre", "responder", "biopsy", "done", "desert"),
    ("P1_post", "P1", "post", "responder", "resection", "skipped", "inflamed"),
    ("P2_pre", "P2", "pre", "non_responder", "biopsy", "done", "excluded"),
    ("P2_post", "P2", "post", "non_responder", "resection", "error", None),
    ("P3_post", "P3", "post", "responder", "resection", "done", None),
    ("P4_pre", "P4", "pre", "NA", "biopsy", "done", "inflamed"),
    ("P4_post", "P4", "post", "NA", "resection", "done", "inflamed"),
]
FAILED_ERROR = "ValueError: P2_post.ome.tif: no pixel size"


def slide_metrics(slide_id: str, seed: int, immune_class: str | None) -> dict:
    """A metrics.json as the metrics stage writes it; P4_post's margin ratio is absent."""
    rng = np.random.default_rng(seed)
    values = {name: float(rng.uniform(0, 500)) for name in UNITS}
    values["tls_count"] = float(rng.integers(0, 5))
    absent = {}
    if slide_id == "P4_post":
        values["ratio_cd8_t_treg_margin"] = None
        absent["ratio_cd8_t_treg_margin"] = "margin absent: area 0.01 mm² < 0.05 mm²"
    if slide_id == "P1_pre":
        values["density_CD8_T_tumor"] = 0.0  # a zero before treatment: the log2 fold needs its pseudo-count
    return {
        "format": 1,
        "slide_id": slide_id,
        "metrics": values,
        "units": dict(UNITS),
        "descriptions": {name: f"{name} described" for name in UNITS},
        "absent": absent,
        "immune_class": immune_class,
        "immune_class_reason": "hand-written",
        "infiltration_profile": {"bin_edges_um": [-50, 0, 50], "area_mm2": [0.1, 0.1],
                                 "density": {"CD8_T": [1.0, 2.0]}},
        "parameters": {},
    }


def write_results(root: Path, slides=SLIDES, *, edit=None) -> tuple[Path, dict[str, dict]]:
    """Write ``root/manifest.csv`` and ``root/out`` (run.json, stages.json, metrics.json).

    ``edit(slide_id, metrics)`` may change a slide's metrics.json before it is written.
    Returns the output folder and the metrics.json written per slide.
    """
    lines = ["patient_id,timepoint,slide,response,site"]
    lines += [f"{p},{t},slides/{s}.ome.tif,{r},{site}" for s, p, t, r, site, _, _ in slides]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = root / "out"
    written, records = {}, []
    for seed, (slide_id, patient, timepoint, _, _, status, immune_class) in enumerate(slides):
        error = FAILED_ERROR if status == "error" else None
        records.append({"slide_id": slide_id, "patient_id": patient, "timepoint": timepoint,
                        "path": str(root / "slides" / f"{slide_id}.ome.tif"), "status": status, "error": error})
        if status == "error":
            continue
        folder = slide_folder(out, slide_id)
        folder.mkdir(parents=True)
        (folder / STAGES_JSON).write_text(json.dumps({"format": 1, "slide_id": slide_id, "stages": {}}))
        metrics = slide_metrics(slide_id, seed, immune_class)
        if edit is not None:
            edit(slide_id, metrics)
        (folder / METRICS_JSON).write_text(json.dumps(metrics, allow_nan=False))
        written[slide_id] = metrics
    run = {"status": "complete", "manifest": str(root / "manifest.csv"),
           "config": {"timepoints": ["pre", "post"]}, "slides": records}
    (out / RUN_JSON).write_text(json.dumps(run))
    return out, written


# --- the tables ---------------------------------------------------------------------------------


@pytest.fixture()
def tables(tmp_path):
    out, written = write_results(tmp_path)
    paths = write_cohort_tables(out)
    return out, written, paths


def _value(metrics: dict, name: str) -> float:
    value = metrics["metrics"][name]
    return np.nan if value is None else value


def test_cohort_has_every_manifest_slide_and_failed_ones_never_look_complete(tables):
    out, written, paths = tables
    assert paths == {"cohort": out / "cohort.h5ad", "patients": out / "patients.h5ad", "metrics": out / "metrics.csv"}
    cohort = open_results(out).cohort()
    assert list(cohort.obs_names) == [s[0] for s in SLIDES]
    assert list(cohort.var_names) == list(UNITS)
    assert cohort.var["unit"].to_dict() == UNITS
    assert cohort.var.loc["tls_count", "description"] == "tls_count described"
    assert cohort.X.dtype == np.float64
    for i, slide_id in enumerate(cohort.obs_names):
        if slide_id in written:
            expected = [_value(written[slide_id], name) for name in UNITS]
            np.testing.assert_array_equal(cohort.X[i], expected)
    obs = cohort.obs
    assert obs.loc["P2_post", "status"] == "error" and obs.loc["P2_post", "error"] == FAILED_ERROR
    assert np.isnan(cohort[["P2_post"]].X).all()
    assert obs.loc["P1_post", "status"] == "skipped" and obs.loc["P1_pre", "error"] == ""
    assert np.isnan(cohort["P4_post", "ratio_cd8_t_treg_margin"].X).all()
    assert obs["response"].astype(str).tolist() == [s[3] for s in SLIDES]  # "NA" is a response, not a gap
    assert obs["site"].astype(str).tolist() == [s[4] for s in SLIDES]
    assert list(obs["immune_class"].cat.categories) == ["inflamed", "excluded", "desert"]
    assert obs.loc["P1_pre", "immune_class"] == "desert" and pd.isna(obs.loc["P2_post", "immune_class"])
    assert cohort.uns["metrics_format"] == 1 and cohort.uns["tme_version"] and cohort.uns["created"]


def test_patients_pair_pre_and_post(tables):
    out, written, _ = tables
    patients = open_results(out).patients()
    assert list(patients.obs_names) == ["P1", "P2", "P3", "P4"]
    assert patients.var["unit"].to_dict() == UNITS
    pre = np.array([_value(written["P1_pre"], n) for n in UNITS])
    post = np.array([_value(written["P1_post"], n) for n in UNITS])
    np.testing.assert_array_equal(patients["P1"].layers["pre"][0], pre)
    np.testing.assert_array_equal(patients["P1"].layers["post"][0], post)
    np.testing.assert_allclose(patients["P1"].layers["delta"][0], post - pre)
    np.testing.assert_array_equal(patients.X, patients.layers["delta"])
    c = np.array([LOG2_PSEUDOCOUNT.get(u, 0.1) for u in UNITS.values()])
    np.testing.assert_allclose(patients["P1"].layers["log2_fold_change"][0], np.log2((post + c) / (pre + c)))
    j = list(UNITS).index("density_CD8_T_tumor")
    assert pre[j] == 0 and np.isfinite(patients["P1"].layers["log2_fold_change"][0, j])
    pseudo = patients.uns["log2_pseudocount"]
    assert dict(zip(pseudo["unit"], pseudo["pseudocount"])) == {"mm2": 0.001, "cells/mm2": 1.0, "%": 0.1,
                                                                "ratio": 0.1, "count": 0.5, "score": 0.1}
    obs = patients.obs
    assert obs.loc["P1", "pre_slide_id"] == "P1_pre" and obs.loc["P1", "post_slide_id"] == "P1_post"
    assert obs.loc["P1", "immune_transition"] == "desert -> inflamed"
    assert obs.loc["P4", "immune_transition"] == "inflamed -> inflamed"
    assert obs.loc["P1", "complete"] and obs.loc["P4", "complete"] and obs.loc["P1", "reason"] == ""
    # a patient-level manifest column is kept; one that differs within a patient is the slide's
    assert obs["response"].astype(str).tolist() == ["responder", "non_responder", "responder", "NA"]
    assert "site" not in obs
    # P4's absent margin ratio: NaN on that side and in the delta, the patient still complete
    k = list(UNITS).index("ratio_cd8_t_treg_margin")
    assert np.isnan(patients["P4"].layers["delta"][0, k]) and np.isfinite(patients["P4"].layers["pre"][0, k])


def test_patient_with_one_usable_timepoint_is_kept_with_nan_deltas_and_a_reason(tables):
    out, written, _ = tables
    patients = open_results(out).patients()
    obs = patients.obs
    # P2: the post slide failed
    assert not obs.loc["P2", "complete"]
    assert obs.loc["P2", "reason"] == f"post slide P2_post error: {FAILED_ERROR}"
    np.testing.assert_array_equal(patients["P2"].layers["pre"][0], [_value(written["P2_pre"], n) for n in UNITS])
    for layer in ("post", "delta", "log2_fold_change"):
        assert np.isnan(patients["P2"].layers[layer]).all(), layer
    assert obs.loc["P2", "immune_class_pre"] == "excluded" and pd.isna(obs.loc["P2", "immune_transition"])
    # P3: no pre slide at all
    assert not obs.loc["P3", "complete"] and obs.loc["P3", "reason"] == "no pre slide in the manifest"
    assert obs.loc["P3", "pre_slide_id"] == "" and obs.loc["P3", "post_slide_id"] == "P3_post"
    assert np.isnan(patients["P3"].layers["pre"]).all() and np.isnan(patients["P3"].X).all()
    assert np.isfinite(patients["P3"].layers["post"]).all()


def test_metrics_csv_is_tidy_with_a_unit_on_every_row(tables):
    out, written, _ = tables
    text = (out / "metrics.csv").read_text().splitlines()
    assert text[0] == ",".join(METRICS_COLUMNS)
    assert len(text) == 1 + len(SLIDES) * len(UNITS)
    assert "P4,post,P4_post,ratio_cd8_t_treg_margin,,ratio" in text  # null: an empty value, with its unit
    table = open_results(out).metrics_table()
    assert (table["unit"] != "").all() and table["unit"].notna().all()
    assert table.loc[table["slide_id"] == "P2_post", "value"].isna().all()
    assert table.loc[table["patient_id"] == "P4", "patient_id"].eq("P4").all()
    for slide_id, metrics in written.items():
        rows = table[table["slide_id"] == slide_id].set_index("metric")
        np.testing.assert_array_equal(rows.loc[list(UNITS), "value"].to_numpy(),
                                      [_value(metrics, n) for n in UNITS])  # exact: floats round-trip
        assert rows["unit"].to_dict() == UNITS


def test_files_are_written_atomically_and_hold_no_pickles(tables):
    out, _, paths = tables
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["cohort.h5ad", "metrics.csv", "patients.h5ad",
                                                                    "run.json"]

    def plain(name, item):
        if isinstance(item, h5py.Dataset):
            assert item.dtype.kind != "O" or h5py.check_string_dtype(item.dtype), name
            assert item.dtype.kind != "V", f"{name}: opaque bytes"

    for name in ("cohort", "patients"):
        with h5py.File(paths[name], "r") as f:
            f.visititems(plain)
            assert set(f["uns"]) >= {"metrics_format", "tme_version", "created"}


def test_two_slides_of_one_patient_at_one_timepoint_is_an_error_naming_them(tmp_path):
    slides = [*SLIDES, ("P1_pre_b", "P1", "pre", "responder", "biopsy", "done", "desert")]
    out, _ = write_results(tmp_path, slides)
    (out / "metrics.csv").write_text("an earlier run's table\n")
    with pytest.raises(ValueError, match=r"patient 'P1' at 'pre': P1_pre, P1_pre_b"):
        write_cohort_tables(out)
    assert not (out / "metrics.csv").exists()  # no outdated table stays to be taken for this run's


def test_one_metric_in_two_units_is_an_error(tmp_path):
    def edit(slide_id, metrics):
        if slide_id == "P3_post":
            metrics["units"]["tls_count"] = "1/mm2"

    out, _ = write_results(tmp_path, edit=edit)
    with pytest.raises(ValueError, match=r"'tls_count' is in 'count' on slide 'P1_pre' but in '1/mm2' on slide "
                                         r"'P3_post'"):
        write_cohort_tables(out)


def test_a_metric_without_unit_makes_that_slide_an_error_not_the_cohort(tmp_path):
    def edit(slide_id, metrics):
        if slide_id == "P4_pre":
            del metrics["units"]["pdl1_cps"]

    out, _ = write_results(tmp_path, edit=edit)
    write_cohort_tables(out)
    results = open_results(out)
    cohort = results.cohort()
    assert cohort.obs.loc["P4_pre", "status"] == "error"
    assert "'pdl1_cps' has no unit" in cohort.obs.loc["P4_pre", "error"]
    assert np.isnan(cohort[["P4_pre"]].X).all() and np.isfinite(cohort[["P1_pre"]].X).all()
    patients = results.patients()
    assert not patients.obs.loc["P4", "complete"] and "pre slide P4_pre error" in patients.obs.loc["P4", "reason"]


def test_no_metrics_json_on_a_done_slide_is_an_error(tmp_path):
    out, _ = write_results(tmp_path)
    (out / "slides" / "P1_post" / "metrics.json").unlink()
    write_cohort_tables(out)
    obs = open_results(out).cohort().obs
    assert obs.loc["P1_post", "status"] == "error" and "metrics.json" in obs.loc["P1_post", "error"]


# --- written by `tme run` -----------------------------------------------------------------------

def _fake_metrics_stage(inputs, folder):
    """Stands in for the metrics stage: writes the contract's metrics.json for the slide."""
    from tme_pipeline.stages import StageOutput

    (folder / METRICS_JSON).write_text(json.dumps(slide_metrics(inputs.slide_id, 0, "desert")))
    return StageOutput()


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    from tme_pipeline.synth import synth_slide

    root = tmp_path_factory.mktemp("tiny")
    synth_slide(root / "A_pre.ome.tif", size_mm=(0.1, 0.1), seed=1)
    (root / "manifest.csv").write_text("patient_id,timepoint,slide,response\n"
                                       "A,pre,A_pre.ome.tif,responder\nA,post,A_post.ome.tif,responder\n")
    return root


def test_run_cohort_writes_the_tables_and_records_them(tiny_cohort, tmp_path):
    from tme_pipeline.cohort import run_cohort
    from tme_pipeline.stages import Stage

    stage = Stage("metrics", _fake_metrics_stage, reads=(), writes=(METRICS_JSON,))
    run_cohort(tiny_cohort / "manifest.csv", tmp_path / "out", stages=(stage,))
    results = open_results(tmp_path / "out")
    assert results.run["status"] == "complete"
    assert results.run["cohort_tables"] == {"files": ["cohort.h5ad", "patients.h5ad", "metrics.csv"], "error": None}
    obs = results.cohort().obs
    assert obs["status"].tolist() == ["done", "error"] and "A_post.ome.tif" in obs.loc["A_post", "error"]
    patients = results.patients()
    assert patients.obs.loc["A", "response"] == "responder" and not patients.obs.loc["A", "complete"]
    assert patients.obs.loc["A", "reason"].startswith("post slide A_post error:")
    # nothing to pair: no analysis, and that is no error
    assert results.run["cohort_analysis"] == {"folder": None, "error": None,
                                              "reason": "no patient has both timepoints done"}
    assert not (tmp_path / "out" / "analysis").exists()


def test_run_cohort_analyses_complete_patients(tiny_cohort, tmp_path):
    from tme_pipeline.cohort import run_cohort
    from tme_pipeline.stages import Stage

    manifest = tiny_cohort / "paired.csv"
    manifest.write_text("patient_id,timepoint,slide,slide_id\nA,pre,A_pre.ome.tif,A_pre\nA,post,A_pre.ome.tif,A_post\n")
    stage = Stage("metrics", _fake_metrics_stage, reads=(), writes=(METRICS_JSON,))
    run_cohort(manifest, tmp_path / "out", stages=(stage,))
    run = open_results(tmp_path / "out").run
    assert run["cohort_analysis"] == {"folder": "analysis", "error": None}
    assert (tmp_path / "out" / "analysis" / "paired_tests.csv").is_file()
    assert run["cohort_report"]["error"] is None


def test_run_cohort_records_the_tables_failure_and_keeps_run_json(tiny_cohort, tmp_path):
    from tme_pipeline.cohort import run_cohort
    from tme_pipeline.stages import Stage

    manifest = tiny_cohort / "twice.csv"
    manifest.write_text("patient_id,timepoint,slide,slide_id\nA,pre,A_pre.ome.tif,one\nA,pre,A_pre.ome.tif,two\n")
    stage = Stage("metrics", _fake_metrics_stage, reads=(), writes=(METRICS_JSON,))
    run_cohort(manifest, tmp_path / "out", stages=(stage,))
    run = open_results(tmp_path / "out").run
    assert run["status"] == "complete" and [s["status"] for s in run["slides"]] == ["done", "done"]
    assert run["cohort_tables"]["files"] == []
    assert "patient 'A' at 'pre': one, two" in run["cohort_tables"]["error"]
    assert not (tmp_path / "out" / "cohort.h5ad").exists()


def test_an_interrupted_run_lists_the_slides_it_did_not_reach(tmp_path):
    out, _ = write_results(tmp_path)
    run = json.loads((out / RUN_JSON).read_text())
    run["status"], run["slides"] = "running", run["slides"][:3]
    (out / RUN_JSON).write_text(json.dumps(run))
    write_cohort_tables(out)
    cohort = open_results(out).cohort()
    assert list(cohort.obs_names) == [s[0] for s in SLIDES] and cohort.uns["run_status"] == "running"
    late = cohort.obs.iloc[3:]
    assert (late["status"] == "error").all() and late["error"].str.contains("did not reach").all()
    assert np.isnan(cohort[late.index].X).all()


def test_without_the_manifest_file_the_tables_keep_run_json_columns(tmp_path, caplog):
    out, _ = write_results(tmp_path)
    (tmp_path / "manifest.csv").unlink()
    write_cohort_tables(out)
    assert "without the manifest's own columns" in caplog.text
    cohort = open_results(out).cohort()
    assert list(cohort.obs_names) == [s[0] for s in SLIDES] and "response" not in cohort.obs
    assert cohort.obs.loc["P1_pre", "slide"].endswith("P1_pre.ome.tif")
    assert open_results(out).patients().obs.loc["P1", "complete"]


def test_a_failed_write_leaves_the_previous_table_whole(tmp_path, monkeypatch):
    import anndata

    out, _ = write_results(tmp_path)
    write_cohort_tables(out)
    before = (out / "cohort.h5ad").read_bytes()

    def half_written(self, filename, **kwargs):
        Path(filename).write_bytes(b"half an HDF5 file")
        raise OSError("No space left on device")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", half_written)
    with pytest.raises(OSError, match="No space left"):
        write_cohort_tables(out)
    assert (out / "cohort.h5ad").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
