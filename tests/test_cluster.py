"""Same answer everywhere: a cohort on every Dask scheduler, a LocalCluster of worker processes included.

Issue 15 items 1 and 6: identical nuclei labels, cells.h5ad (X and obs) and metrics.json on
synchronous, threads (1 and 2), processes and a LocalCluster of 2 worker processes, run
to run; the model loaded at most once per worker; torch threads per worker as configured.
"""

import json
import sys

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from tme_pipeline.cohort import run_cohort
from tme_pipeline.config import load_config
from tme_pipeline.parallel import dask_scheduler
from tme_pipeline.results import open_results
from tme_pipeline.stages import STAGES
from tme_pipeline.synth import synth_slide

SLIDES = ("P1_pre", "P2_pre")
# Small tiles, so each slide is a dozen tile tasks spread over the workers and seams are crossed.
TILE = {"tile_um": 128.0, "overlap_um": 40.0}
# Every stage that computes a number; the pictures and the page only draw them (and take time).
STAGES_TESTED = tuple(s for s in STAGES if s.name not in ("qc", "report"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    for seed, slide in enumerate(SLIDES):
        synth_slide(root / f"{slide}.ome.tif", size_mm=(0.3, 0.2), seed=500 + seed)
    (root / "manifest.csv").write_text(
        "patient_id,timepoint,slide\n" + "".join(f"{s.split('_')[0]},pre,{s}.ome.tif\n" for s in SLIDES)
    )
    return root


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes with 2 threads each, as ``tme run --workers 2`` starts it."""
    # the workers cannot import this test module: its probes travel by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with dask_scheduler("local-cluster", n_workers=2, threads_per_worker=2) as info:
        yield info


def _config(method):
    config = load_config()
    seg = config.segmentation.model_copy(update={"method": method, **TILE})
    return config.model_copy(update={"segmentation": seg})


def _run(cohort, out, method, scheduler, n_workers=None):
    config = _config(method)
    config = config.model_copy(update={"run": config.run.model_copy(update={"n_workers": n_workers})})
    result = run_cohort(cohort / "manifest.csv", out, config=config, scheduler=scheduler, stages=STAGES_TESTED)
    assert [s.status for s in result.slides] == ["done", "done"], [s.error for s in result.slides]
    return open_results(out)


def _outputs(results):
    """Per slide: nuclei labels, cells X and obs, metrics.json, as plain values."""
    out = {}
    for slide_id in SLIDES:
        slide = results.slide(slide_id)
        cells = slide.cells()
        out[slide_id] = {
            "labels": np.asarray(slide.labels("nuclei")),
            "X": np.asarray(cells.X),
            "obs": cells.obs,
            "metrics": json.dumps(slide.metrics(), sort_keys=True),
        }
    return out


def _assert_identical(got, want, where):
    for slide_id in SLIDES:
        a, b = got[slide_id], want[slide_id]
        assert a["labels"].max() > 50, f"{where} {slide_id}: too few nuclei for a meaningful comparison"
        np.testing.assert_array_equal(a["labels"], b["labels"], err_msg=f"{where} {slide_id}: nuclei labels")
        np.testing.assert_array_equal(a["X"], b["X"], err_msg=f"{where} {slide_id}: cells X")
        pd.testing.assert_frame_equal(a["obs"], b["obs"], check_exact=True, obj=f"{where} {slide_id}: cells obs")
        assert a["metrics"] == b["metrics"], f"{where} {slide_id}: metrics.json differs"


def _count_model_loads():
    """Installed on each worker: count calls of ``weights.load_model`` in that process."""
    from tme_pipeline.segment import weights

    if not hasattr(weights.load_model, "calls"):
        original = weights.load_model

        def counting(*args, **kwargs):
            counting.calls += 1
            return original(*args, **kwargs)

        counting.calls = 0
        weights.load_model = counting
    weights.load_model.calls = 0


def _model_loads():
    from tme_pipeline.segment import weights

    return weights.load_model.calls


def _torch_threads():
    import torch

    return torch.get_num_threads()


# Besides threads (2 workers) and the LocalCluster, both methods run on threads with 1 worker and on
# processes; the scheduler's own determinism (stitching, measuring) is seen with the fast classical
# segmenter on the synchronous scheduler too, and the network's run to run (torch threads: below).
OTHER_RUNS = {
    "classic": [("sync", "synchronous", None), ("threads1", "threads", 1), ("processes", "processes", 2)],
    "stardist": [("threads1", "threads", 1), ("processes", "processes", 2), ("again", "threads", 2)],
}


@pytest.mark.parametrize("method", ["classic", "stardist"])
def test_same_answer_on_every_scheduler(cohort, cluster, tmp_path, method):
    from distributed import get_client

    reference = _outputs(_run(cohort, tmp_path / "threads2", method, "threads", 2))
    client = get_client()
    client.run(_count_model_loads)
    on_cluster = _run(cohort, tmp_path / "cluster", method, cluster.address)
    loads = client.run(_model_loads)
    _assert_identical(_outputs(on_cluster), reference, "LocalCluster (2 workers)")
    run = on_cluster.run
    assert run["scheduler"]["kind"] == "distributed" and run["scheduler"]["workers"] == 2
    assert run["scheduler"]["address"] == cluster.address
    assert run["slides_in_flight"] == 2  # one slide per worker, at once: the same answer
    if method == "stardist":
        # the model is loaded at most once per worker process, not once per tile
        assert len(loads) == 2 and all(n <= 1 for n in loads.values()), loads
        assert sum(loads.values()) >= 1, loads
        assert run["models"]["stardist"]["sha256"]
    for name, scheduler, workers in OTHER_RUNS[method]:
        _assert_identical(_outputs(_run(cohort, tmp_path / name, method, scheduler, workers)), reference, name)
    assert run["versions"]["torch"] and run["versions"]["dask"] and run["versions"]["distributed"]
    assert run["config_sha256"] and run["config"]["segmentation"]["method"] == method


def test_local_cluster_workers_and_threads(cluster):
    from distributed import get_client

    assert cluster.kind == "local-cluster" and cluster.workers == 2 and cluster.threads_per_worker == 2
    info = get_client().scheduler_info(n_workers=-1)["workers"]
    assert sorted(w["nthreads"] for w in info.values()) == [2, 2]
    # torch in each worker uses its share of the cores, not all of them
    assert list(get_client().run(_torch_threads).values()) == [2, 2]


def test_network_pass_does_not_depend_on_torch_threads(cohort):
    # a worker's torch threads are its threads_per_worker: 1 on one machine, 2 or 8 on another
    import tifffile
    import torch

    from tme_pipeline.segment.predict import predict_prob_dist, slide_norm
    from tme_pipeline.segment.registry import model_folder
    from tme_pipeline.segment.weights import load_model

    model = load_model(model_folder("stardist_fluo_real"))
    dapi = tifffile.imread(cohort / f"{SLIDES[0]}.ome.tif", series=0, level=0)[0][:256, :320]
    lo, hi = slide_norm(dapi)
    image = (dapi.astype(np.float32) - lo) / (hi - lo)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(predict_prob_dist(image, model=model, device="cpu"))
    finally:
        torch.set_num_threads(before)
    assert outputs[0][0].max() > 0.5  # nuclei found: the comparison is not of empty maps
    for prob, dist in outputs[1:]:
        np.testing.assert_array_equal(prob, outputs[0][0])
        np.testing.assert_array_equal(dist, outputs[0][1])
