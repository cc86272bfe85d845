"""Re-runs recompute exactly the stale stages; a killed run leaves nothing that looks complete."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tme_pipeline.cli import main
from tme_pipeline.cohort import run_cohort
from tme_pipeline.results import open_results
from tme_pipeline.stages import STAGES, Stage, StageOutput, check_stages
from tme_pipeline.synth import synth_slide

ALL = ["segment", "cells", "measure", "phenotype", "tls", "regions", "annotate", "qc", "metrics", "report"]
FROM_PHENOTYPE = ("phenotype", "tls", "regions", "annotate", "qc", "metrics", "report")
CLASSIC = "segmentation: {method: classic}\n"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One small synthetic slide run once with the classical segmenter (fast, deterministic)."""
    root = tmp_path_factory.mktemp("stages")
    synth_slide(root / "S.ome.tif", size_mm=(0.4, 0.4), seed=3)
    (root / "m.csv").write_text("patient_id,timepoint,slide\nP,pre,S.ome.tif\n")
    (root / "c.yaml").write_text(CLASSIC)
    result = run_cohort(root / "m.csv", root / "out", config_path=root / "c.yaml")
    assert [s.ran for s in result.slides] == [tuple(ALL)]
    return root


def _copy(baseline, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(baseline / "out", out)
    return out


def _run(baseline, out, config_text=CLASSIC, **kwargs):
    (out.parent / "c.yaml").write_text(config_text)
    result = run_cohort(baseline / "m.csv", out, config_path=out.parent / "c.yaml", **kwargs)
    (slide,) = result.slides
    assert slide.status in ("done", "skipped"), slide.error
    return slide


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_record_names_every_stage_its_inputs_and_files(baseline):
    slide = open_results(baseline / "out").slide("S")
    stages = slide.stages["stages"]
    assert list(stages) == ALL
    assert stages["cells"]["upstream"] == {"segment": stages["segment"]["key"]}
    assert stages["segment"]["inputs"]["slide"]["name"] == "S.ome.tif"
    for name, record in stages.items():
        for entry in record["files"]:
            assert entry["bytes"] > 0 and (slide.folder / entry["path"]).exists(), (name, entry)
    assert stages["segment"]["info"]["n_nuclei"] == slide.cells().n_obs == slide.measured().n_obs
    assert slide.labels("nuclei").shape == slide.labels("cells").shape == (800, 800)
    with pytest.raises(ValueError, match="has no label level 'labels/nuclei/5'"):
        slide.labels("nuclei", level=5)
    with pytest.raises(ValueError, match="no finished slide 'T'"):
        open_results(baseline / "out").slide("T")
    assert "gates" in stages["phenotype"]["info"]["phenotyping"]


def test_new_gate_reruns_phenotype_onwards_only(baseline, tmp_path):
    out = _copy(baseline, tmp_path)
    before = open_results(out).slide("S")
    old = before.cells()
    cd8 = old[:, "CD8"].X.ravel()
    gate = float(np.quantile(cd8, 0.5))  # far from the automatic gate: many cells change
    nuclei_before = {k: p.read_bytes() for k, p in _files(before.folder / "labels.ome.zarr" / "labels" / "nuclei").items()}
    record_before = before.stages["stages"]["segment"]

    slide = _run(baseline, out, CLASSIC + f"gating: {{manual: {{CD8: {gate}}}}}\n")
    assert slide.reused == ("segment", "cells", "measure") and slide.ran == FROM_PHENOTYPE
    after = open_results(out).slide("S")
    nuclei_after = _files(after.folder / "labels.ome.zarr" / "labels" / "nuclei")
    assert list(nuclei_after) == list(nuclei_before) and len(nuclei_before) > 2
    for key, path in nuclei_after.items():
        assert path.read_bytes() == nuclei_before[key], key
    assert after.stages["stages"]["segment"] == record_before  # reused as recorded, not re-run

    new = after.cells()
    np.testing.assert_array_equal(new.X, old.X)
    for layer in old.layers:
        np.testing.assert_array_equal(new.layers[layer], old.layers[layer])
    np.testing.assert_array_equal(new.obsm["nucleus_polygon_um"], old.obsm["nucleus_polygon_um"])
    # CD8_T and CD4_T are both T cells: the TLS and the regions, hence tls_id and region, stay
    changed = {"CD8_pos", "phenotype"}
    pd.testing.assert_frame_equal(new.obs.drop(columns=list(changed)), old.obs.drop(columns=list(changed)))
    assert (new.obs["CD8_pos"].to_numpy() == (cd8 > gate)).all()
    assert (new.obs["CD8_pos"] != old.obs["CD8_pos"]).sum() > 10
    assert new.uns["gates"]["CD8"]["method"] == "manual" and new.uns["gates"]["CD8"]["gate"] == pytest.approx(gate)
    for marker in set(old.uns["gates"]) - {"CD8"}:
        assert new.uns["gates"][marker] == pytest.approx(old.uns["gates"][marker]), marker
    # run.json keeps the new gates; the reused stages keep their record
    assert open_results(out).record("S")["info"]["phenotyping"]["gates"]["CD8"]["method"] == "manual"


def test_new_segmentation_parameters_rerun_everything(baseline, tmp_path):
    out = _copy(baseline, tmp_path)
    slide = _run(baseline, out, "segmentation: {method: classic, classic: {sigma_um: 0.9}}\n")
    assert slide.ran == tuple(ALL) and slide.reused == ()
    assert open_results(out).record("S")["stages"] == {"ran": ALL, "reused": []}


def test_execution_settings_do_not_rerun_segmentation(baseline, tmp_path):
    # A run moved to another device or batch size, or given another bound on concurrent
    # passes, gives the same nuclei: the finished slide is left alone.
    out = _copy(baseline, tmp_path)
    execution = ("segmentation: {method: classic, stardist: {device: cpu, batch_size: 3, "
                 "concurrent_passes: 2}}\n")
    slide = _run(baseline, out, execution)
    assert slide.status == "skipped" and slide.reused == tuple(ALL)
    # ...while a threshold that decides the nuclei does rerun it
    slide = _run(baseline, out, "segmentation: {method: classic, stardist: {prob_thresh: 0.4}}\n")
    assert slide.ran == tuple(ALL)


def test_up_to_date_slide_is_left_alone(baseline, tmp_path):
    out = _copy(baseline, tmp_path)
    stamp = (out / "slides" / "S" / "cells.h5ad").stat().st_mtime_ns
    slide = _run(baseline, out)
    assert slide.status == "skipped" and slide.ran == () and slide.reused == tuple(ALL)
    assert slide.n_nuclei == open_results(out).slide("S").stages["stages"]["segment"]["info"]["n_nuclei"]
    assert (out / "slides" / "S" / "cells.h5ad").stat().st_mtime_ns == stamp


def test_missing_file_reruns_its_stage_and_downstream(baseline, tmp_path):
    out = _copy(baseline, tmp_path)
    (out / "slides" / "S" / "measured.h5ad").unlink()
    slide = _run(baseline, out)
    assert slide.ran == ("measure", *FROM_PHENOTYPE)
    assert (out / "slides" / "S" / "measured.h5ad").is_file()


def test_force_and_from(baseline, tmp_path):
    out = _copy(baseline, tmp_path)
    assert _run(baseline, out, force_from="cells").ran == ("cells", "measure", *FROM_PHENOTYPE)
    labels = open_results(out).slide("S").labels("cells").compute()
    np.testing.assert_array_equal(labels, open_results(baseline / "out").slide("S").labels("cells").compute())
    assert _run(baseline, out, force=True).ran == tuple(ALL)
    with pytest.raises(ValueError, match="'region': not a stage"):
        _run(baseline, out, force_from="region")


def _count_cells(inputs, folder: Path) -> StageOutput:
    """A stage added after the slide was finished: reads the phenotyped table, writes a CSV."""
    from tme_pipeline.results import SlideResults

    cells = SlideResults(inputs.slide_id, folder).cells()
    counts = cells.obs["phenotype"].value_counts().sort_index()
    counts.to_csv(folder / "counts.csv")
    return StageOutput(info={"counts": {k: int(v) for k, v in counts.items()}})


def test_a_new_stage_runs_alone_on_a_finished_slide(baseline, tmp_path):
    out = _copy(baseline, tmp_path)
    extended = (*STAGES, Stage("counts", _count_cells, reads=("phenotypes",), writes=("counts.csv",),
                               upstream=("annotate",)))
    folder = out / "slides" / "S"
    inode = (folder / "cells.h5ad").stat().st_ino
    slide = _run(baseline, out, stages=extended)
    assert slide.ran == ("counts",) and slide.reused == tuple(ALL)
    counts = pd.read_csv(folder / "counts.csv", index_col=0).iloc[:, 0]
    assert counts.sum() == open_results(out).slide("S").cells().n_obs
    assert slide.info["counts"] == {k: int(v) for k, v in counts.items()}
    # the reused files are the finished folder's own, hard-linked into the new one, not rewritten
    assert (folder / "cells.h5ad").stat().st_ino == inode
    assert json.loads((folder / "stages.json").read_text())["stages"]["counts"]["files"][0]["path"] == "counts.csv"
    assert _run(baseline, out, stages=extended).status == "skipped"


def _tme_run(root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tme_pipeline.cli", "run", str(root / "m.csv"), "--out", str(out),
         "--config", str(root / "c.yaml"), "--scheduler", "synchronous"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.01)


def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(baseline, tmp_path):
    out = tmp_path / "out"
    run = _tme_run(baseline, out)
    # the cells are written: the cells stage is finishing or measure has begun
    _wait_for(out / "slides" / ".S.partial" / "labels.ome.zarr" / "labels" / "cells" / "0" / "0" / "0", run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (out / "slides" / "S").exists() and (out / "slides" / ".S.partial").exists()
    assert json.loads((out / ".tme.lock").read_text())["pid"] == run.pid  # a dead holder's lock

    (tmp_path / "c.yaml").write_text(CLASSIC)
    assert main(["run", str(baseline / "m.csv"), "--out", str(out), "--config", str(baseline / "c.yaml")]) == 0
    assert not (out / "slides" / ".S.partial").exists()
    done, reference = open_results(out).slide("S"), open_results(baseline / "out").slide("S")
    for name in ("nuclei", "cells"):
        np.testing.assert_array_equal(done.labels(name).compute(), reference.labels(name).compute())
    new, old = done.cells(), reference.cells()
    np.testing.assert_array_equal(new.X, old.X)
    pd.testing.assert_frame_equal(new.obs, old.obs)
    assert new.uns["gates"] == old.uns["gates"]
    assert [s["key"] for s in done.stages["stages"].values()] == [s["key"] for s in reference.stages["stages"].values()]


def test_second_concurrent_run_refused_and_first_unharmed(baseline, tmp_path, capsys):
    out = tmp_path / "out"
    first = _tme_run(baseline, out)
    _wait_for(out / "slides" / ".S.partial" / "labels.ome.zarr", first)
    code = main(["run", str(baseline / "m.csv"), "--out", str(out), "--config", str(baseline / "c.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"in use by another tme run (pid {first.pid} on host " in err and "started 20" in err
    assert (out / "slides" / ".S.partial").exists()  # the live run's partial folder was left alone
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert open_results(out).record("S")["stages"]["ran"] == ALL


def test_stage_list_checked():
    check_stages(STAGES)
    with pytest.raises(ValueError, match=f"stage '{STAGES[-1].name}' is listed twice"):
        check_stages((*STAGES, STAGES[-1]))
    with pytest.raises(ValueError, match=r"stage 'cells' needs \['segment'\], which do not come before it"):
        check_stages(STAGES[1:])


def test_open_results_lists_finished_slides_only(tmp_path):
    (tmp_path / "slides" / ".A.partial").mkdir(parents=True)
    (tmp_path / "slides" / "B").mkdir()  # no stages.json: not finished
    (tmp_path / "slides" / "C").mkdir()
    (tmp_path / "slides" / "C" / "stages.json").write_text('{"format": 1, "stages": {}}')
    results = open_results(tmp_path)
    assert results.run == {} and results.slide_ids == ["C"]
    with pytest.raises(ValueError, match="no finished slide 'B'"):
        results.slide("B")
    with pytest.raises(FileNotFoundError, match="cells.h5ad"):
        results.slide("C").cells()
    with pytest.raises(FileNotFoundError, match="no such results folder"):
        open_results(tmp_path / "absent")


def test_neighbour_correction_reruns_measure_onwards(baseline, tmp_path):
    out = _copy(baseline, tmp_path)
    slide = _run(baseline, out, CLASSIC + "cells: {neighbour_correction: true, neighbour_markers: [CD8]}\n")
    assert slide.ran == ("measure", *FROM_PHENOTYPE)
    new, old = open_results(out).slide("S").measured(), open_results(baseline / "out").slide("S").measured()
    others = [m for m in old.var_names if m != "CD8"]
    np.testing.assert_array_equal(new[:, others].X, old[:, others].X)
    assert not np.array_equal(new[:, "CD8"].X, old[:, "CD8"].X)
