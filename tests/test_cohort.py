"""`tme run` end to end on small slides of every format, with bad slides in the batch."""

import numpy as np
import pytest
import zarr

from blobs import PANEL_NAMES as NAMES
from blobs import panel_image
from slide_writers import write_ome_tiff, write_ome_zarr, write_plain_tiff, write_qptiff
from tme_pipeline.cli import main
from tme_pipeline.results import open_results
from tme_pipeline.segment.metrics import match_labels
from tme_pipeline.stages import STAGES



@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    data, truth = panel_image((768, 640), seed=3)
    (root / "slides").mkdir()
    write_ome_tiff(root / "slides" / "A_pre.ome.tif", data, pixel_um=0.5, channel_names=NAMES)
    write_qptiff(
        root / "slides" / "A_post.qptiff",
        data,
        pixel_um=0.5,
        channel_names=["DAPI", "Opal 520", "Opal 540", "Opal 570", "Opal 620", "Opal 650", "Opal 690", "Opal 780"],
        biomarkers=[None, *NAMES[1:]],
    )
    write_ome_zarr(root / "slides" / "B_pre.ome.zarr", data, pixel_um=0.5, channel_names=NAMES)
    write_plain_tiff(root / "slides" / "B_post.tif", data)  # no pixel size: the manifest gives it
    write_plain_tiff(root / "slides" / "C_pre.tif", data)  # no pixel size anywhere: refused
    (root / "manifest.csv").write_text(
        "patient_id,timepoint,slide,pixel_um,arm\n"
        "A,pre,slides/A_pre.ome.tif,,1\n"
        "A,post,slides/A_post.qptiff,,1\n"
        "B,pre,slides/B_pre.ome.zarr,,2\n"
        "B,post,slides/B_post.tif,0.5,2\n"
        "C,pre,slides/C_pre.tif,,3\n"
        "C,post,slides/C_post.ome.tif,,3\n"
    )
    # the classical segmenter: this module tests formats and batch behaviour, and the
    # truth comparison below needs a segmenter independent of any training run
    (root / "plain.yaml").write_text(
        "channel_names: [" + ", ".join(NAMES) + "]\nsegmentation: {method: classic}\n"
    )
    code = main(["run", str(root / "manifest.csv"), "--out", str(root / "out"), "--config", str(root / "plain.yaml")])
    return root, truth, code


def test_bad_slides_recorded_and_batch_goes_on(cohort):
    root, _, code = cohort
    assert code == 1  # some slides failed
    run = open_results(root / "out").run
    status = {s["slide_id"]: s for s in run["slides"]}
    assert run["status"] == "complete"
    assert [status[k]["status"] for k in ("A_pre", "A_post", "B_pre", "B_post")] == ["done"] * 4
    assert status["C_pre"]["status"] == "error" and "pixel size" in status["C_pre"]["error"]
    assert "C_pre.tif" in status["C_pre"]["error"]
    assert status["C_post"]["status"] == "error" and "C_post.ome.tif" in status["C_post"]["error"]
    assert not (root / "out" / "slides" / "C_pre").exists()
    assert [p.name for p in (root / "out" / "slides").iterdir() if p.name.startswith(".")] == []
    assert run["versions"]["numpy"] and run["config"]["channel_names"] == NAMES
    assert run["config_sha256"] and status["A_pre"]["timings"]["segment"] >= 0
    assert list(status["A_pre"]["timings"]) == [s.name for s in STAGES]
    assert status["A_pre"]["stages"] == {"ran": [s.name for s in STAGES], "reused": []}
    assert status["A_pre"]["info"]["phenotyping"]["gates"]["CD8"]["gate"] > 0


def test_every_format_gives_the_same_cells(cohort):
    root, truth, _ = cohort
    results = open_results(root / "out")
    assert results.slide_ids == ["A_pre", "A_post", "B_pre", "B_post"]
    tables = {k: results.slide(k).cells() for k in ("A_pre", "A_post", "B_pre", "B_post")}
    reference = tables["A_pre"]
    assert reference.n_obs > 100
    for key, cells in tables.items():
        assert list(cells.var_names) == ["DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PD-L1", "SATB2"], key
        np.testing.assert_allclose(cells.obsm["spatial"], reference.obsm["spatial"], err_msg=key)
        np.testing.assert_allclose(cells.X, reference.X, rtol=1e-6, err_msg=key)
    assert tables["A_post"].uns["slide"]["markers"]["CD8"] == "CD8"  # <Biomarker> over the Opal name
    cd8 = reference[:, "CD8"]
    assert np.median(cd8.layers["nucleus"]) > 300  # nuclei carry the CD8 signal written under them
    # The panel reads CD8 in the perinuclear band (1 µm outside the nucleus): X is that layer,
    # which misses the signal written under the nuclei that the whole cell includes.
    np.testing.assert_array_equal(cd8.X, cd8.layers["perinuclear"])
    assert np.median(cd8.X) < np.median(cd8.layers["cell"]) < np.median(cd8.layers["nucleus"])
    assert (reference.obs["area_um2"] > reference.obs["nucleus_area_um2"]).all()
    assert reference.obsm["nucleus_polygon_um"].shape == (reference.n_obs, 32, 2)


def test_labels_match_truth_and_are_ngff(cohort):
    root, truth, _ = cohort
    slide = open_results(root / "out").slide("A_pre")
    group = zarr.open_group(str(slide.folder / "labels.ome.zarr"), mode="r")
    labels = slide.labels("nuclei").compute()
    assert labels.shape == truth.shape
    stats = match_labels(truth, labels, iou_threshold=0.5)
    assert stats.f1 >= 0.9
    scale = group["labels/nuclei"].attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [0.5, 0.5]
    assert group["labels"].attrs["labels"] == ["nuclei", "cells"]
    cells = slide.labels("cells").compute()
    np.testing.assert_array_equal(cells[labels > 0], labels[labels > 0])


def test_rerun_skips_complete_and_redoes_partial(cohort):
    root, _, _ = cohort
    out = root / "out"
    before = (out / "slides" / "A_pre" / "cells.h5ad").stat().st_mtime_ns
    gates = open_results(out).record("A_pre")["info"]["phenotyping"]["gates"]
    (out / "slides" / ".B_pre.partial").mkdir()  # an interrupted run's leftovers
    code = main(["run", str(root / "manifest.csv"), "--out", str(out), "--config", str(root / "plain.yaml")])
    assert code == 1
    results = open_results(out)
    status = {s["slide_id"]: s["status"] for s in results.run["slides"]}
    assert status["A_pre"] == "skipped" and status["C_pre"] == "error"
    assert results.record("A_pre")["stages"]["reused"] == [s.name for s in STAGES]
    assert results.record("A_pre")["info"]["phenotyping"]["gates"] == gates  # a reused stage's gates are kept
    assert (out / "slides" / "A_pre" / "cells.h5ad").stat().st_mtime_ns == before
    assert not (out / "slides" / ".B_pre.partial").exists()
