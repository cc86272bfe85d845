"""Several slides in flight on a distributed scheduler (issue 15 item 1, ``run.slides_in_flight``).

The orchestration is tested here with a stand-in for ``run_slide`` (no pixels); that slides
run at once on a real LocalCluster with the same answer is tested in ``test_cluster.py``.
"""

import contextlib
import json
import threading
import time

import pytest

from tme_pipeline import cohort as cohort_module
from tme_pipeline.cohort import run_cohort, slides_at_once
from tme_pipeline.config import load_config
from tme_pipeline.parallel import SchedulerInfo
from tme_pipeline.pipeline import SlideResult

SLIDES = ("P1_pre", "P1_post", "P2_pre", "P2_post", "P3_pre")


@pytest.fixture
def manifest(tmp_path):
    rows = "".join(f"{s.split('_')[0]},{s.split('_')[1]},{s}.tif\n" for s in SLIDES)
    path = tmp_path / "manifest.csv"
    path.write_text("patient_id,timepoint,slide\n" + rows)
    return path


def _config(slides_in_flight=None, scheduler="threads"):
    config = load_config()
    seg = config.segmentation.model_copy(update={"method": "classic"})  # no model to load
    run = config.run.model_copy(update={"slides_in_flight": slides_in_flight, "scheduler": scheduler,
                                        "progress": "quiet"})
    return config.model_copy(update={"segmentation": seg, "run": run})


@pytest.fixture
def fake_cluster(monkeypatch):
    """A 'local-cluster' of 3 workers that starts nothing, and a run_slide that records when it ran."""
    calls = []
    lock = threading.Lock()

    @contextlib.contextmanager
    def scheduler(config, scheduler=None):
        yield SchedulerInfo("local-cluster", workers=3, threads_per_worker=1)

    def run_slide(path, folder, *, slide_id, **kwargs):
        start = time.monotonic()
        # later slides finish first, so that the order of completion is not the manifest's
        time.sleep(0.05 * (len(SLIDES) - SLIDES.index(slide_id)))
        with lock:
            calls.append((slide_id, start, time.monotonic(), threading.get_ident()))
        if slide_id == "P2_pre":
            raise ValueError(f"{path}: not a slide")
        return SlideResult(slide_id=slide_id, status="done", out_dir=folder, n_nuclei=1, seconds=0.1)

    monkeypatch.setattr(cohort_module, "run_scheduler", scheduler)
    monkeypatch.setattr(cohort_module, "run_slide", run_slide)
    return calls


def _max_overlap(calls):
    events = sorted([(s, 1) for _, s, _, _ in calls] + [(e, -1) for _, _, e, _ in calls])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_slides_run_at_once_and_run_json_keeps_manifest_order(manifest, tmp_path, fake_cluster):
    result = run_cohort(manifest, tmp_path / "out", config=_config(slides_in_flight=2, scheduler="local-cluster"))
    assert [r.slide_id for r in result.slides] == list(SLIDES)
    assert [r.status for r in result.slides] == ["done", "done", "error", "done", "done"]
    assert "not a slide" in result.slides[2].error
    assert _max_overlap(fake_cluster) == 2  # two at once, never more than asked
    assert len({thread for *_, thread in fake_cluster}) == 2
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "complete" and run["slides_in_flight"] == 2
    assert [s["slide_id"] for s in run["slides"]] == list(SLIDES)


def test_default_is_one_slide_per_worker(manifest, tmp_path, fake_cluster):
    run_cohort(manifest, tmp_path / "out", config=_config(scheduler="local-cluster"))
    assert _max_overlap(fake_cluster) == 3
    assert json.loads((tmp_path / "out" / "run.json").read_text())["slides_in_flight"] == 3


def test_slides_at_once():
    cluster = SchedulerInfo("local-cluster", workers=4)
    assert slides_at_once(None, cluster, 10) == 4
    assert slides_at_once(2, cluster, 10) == 2
    assert slides_at_once(None, cluster, 3) == 3  # never more than the slides
    assert slides_at_once(8, SchedulerInfo("slurm", workers=2), 10) == 8  # asked wins over workers
    assert slides_at_once(None, SchedulerInfo("distributed", workers=0), 10) == 1
    for local in ("threads", "synchronous", "processes"):
        assert slides_at_once(None, SchedulerInfo(local, workers=2), 10) == 1


def test_more_than_one_on_a_local_scheduler_is_refused(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"slides_in_flight: 2 .*distributed scheduler.*'threads'"):
        run_cohort(manifest, tmp_path / "out", config=_config(slides_in_flight=2))
    assert not (tmp_path / "out" / "run.json").exists()
