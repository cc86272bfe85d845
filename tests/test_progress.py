"""Progress: tile counts of a tiled stage, bars, log lines, quiet, the batch, `tme run --quiet`."""

import io
import logging

import dask
import dask.array as da
import numpy as np
import pytest
from tqdm import tqdm

from blobs import PANEL_NAMES as NAMES
from blobs import panel_image
from slide_writers import write_ome_tiff
from tme_pipeline.cli import main
from tme_pipeline.cohort import run_cohort
from tme_pipeline.config import load_config
from tme_pipeline.progress import batch_progress, progress, resolve_mode, tile_keys
from tme_pipeline.stages import STAGES
from tme_pipeline.tiling import map_tiles, tile_grid

LOGGER = "tme_pipeline.progress"


def _window_sum(window, tile, box):
    return int(window.sum())


def _fails_on_tile_4(window, tile, box):
    if tile.index == 4:
        raise RuntimeError("tile 4 is broken")
    return 0


@pytest.fixture
def nine_tiles():
    """A 3 x 3 tile grid, its lazily read image and the expected per-tile sums."""
    grid = tile_grid((30, 30), pixel_um=1.0, tile_um=10, overlap_um=1, max_object_um=1)
    image = np.arange(900, dtype=np.int64).reshape(30, 30)
    expected = []
    for tile in grid.tiles:
        y0, x0, y1, x1 = tile.padded
        expected.append(int(image[y0:y1, x0:x1].sum()))
    return grid, da.from_array(image, chunks=7), expected


def _tasks_with_a_reduction(grid, image, func=_window_sum):
    """The tiles' tasks plus one that reduces them: a stage's graph has more tasks than tiles."""
    tiles = map_tiles(func, [image], grid=grid, margin_px=grid.overlap_px)
    return tiles, dask.delayed(sum)(tiles)


def test_tile_keys_are_the_tile_tasks_only(nine_tiles):
    grid, image, _ = nine_tiles
    assert grid.n_tiles == 9
    tiles, total = _tasks_with_a_reduction(grid, image)
    graph = dict(total.__dask_graph__())
    assert len(graph) > 9
    assert sorted(tile_keys(graph)) == sorted(t.key for t in tiles)


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_a_tiled_stage_counts_its_tiles(nine_tiles, scheduler):
    grid, image, expected = nine_tiles
    tiles, total = _tasks_with_a_reduction(grid, image)
    with progress("P01_pre segment", mode="quiet") as counted:
        got = dask.compute(total, *tiles, scheduler=scheduler)
    assert got[0] == sum(expected) and list(got[1:]) == expected
    assert (counted.done, counted.total) == (9, 9)


def test_bar_reaches_nine_of_nine_and_is_cleared(nine_tiles, capsys):
    grid, image, _ = nine_tiles
    _, total = _tasks_with_a_reduction(grid, image)
    with progress("P01_pre segment", mode="bars") as counted:
        dask.compute(total, scheduler="threads")
    err = capsys.readouterr().err
    assert (counted.done, counted.total) == (9, 9)
    assert "P01_pre segment 0/9 tiles" in err and "P01_pre segment 9/9 tiles" in err
    assert err.endswith("\r")  # the finished bar gives its line back (leave=False)
    assert not tqdm._instances


def test_bar_closes_and_logging_is_restored_on_error(nine_tiles, capsys):
    grid, image, _ = nine_tiles
    handlers = list(logging.root.handlers)
    _, total = _tasks_with_a_reduction(grid, image, func=_fails_on_tile_4)
    with pytest.raises(RuntimeError, match="tile 4 is broken"):
        with progress("P01_pre segment", mode="bars"):
            dask.compute(total, scheduler="threads")
    assert not tqdm._instances
    assert logging.root.handlers == handlers


def test_log_lines_when_not_a_terminal(nine_tiles, caplog, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert resolve_mode("auto", stream=io.StringIO()) == "log"
    assert resolve_mode("auto", stream=Terminal()) == "bars"
    assert resolve_mode("quiet", stream=Terminal()) == "quiet"
    with pytest.raises(ValueError, match="run.progress: unknown mode 'loud'"):
        resolve_mode("loud")

    grid, image, _ = nine_tiles
    _, total = _tasks_with_a_reduction(grid, image)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with progress("P01_pre measure", mode="auto", every_s=0.0):  # pytest's stderr is no terminal
            dask.compute(total, scheduler="threads")
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages[0] == "P01_pre measure: 9 tiles"
    steps = [m for m in messages[1:-1]]
    assert len(steps) == 9 and steps[-1].startswith("P01_pre measure 9/9 tiles [")
    assert [int(m.split()[2].split("/")[0]) for m in steps] == list(range(1, 10))
    assert messages[-1].startswith("P01_pre measure done: 9/9 tiles in ")
    assert capsys.readouterr().err == ""  # no bar


def test_log_lines_are_rate_limited(nine_tiles, caplog):
    grid, image, _ = nine_tiles
    _, total = _tasks_with_a_reduction(grid, image)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with progress("P01_pre cells", mode="log", every_s=3600.0):
            dask.compute(total, scheduler="threads")
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages == [messages[0], messages[-1]]  # start and end, nothing between
    assert messages[-1].startswith("P01_pre cells done: 9/9 tiles")


def test_quiet_shows_nothing(nine_tiles, caplog, capsys):
    grid, image, _ = nine_tiles
    _, total = _tasks_with_a_reduction(grid, image)
    with caplog.at_level(logging.DEBUG):
        with progress("P01_pre segment", mode="quiet", every_s=0.0) as counted:
            dask.compute(total, scheduler="threads")
        with batch_progress(2, mode="quiet") as batch:
            batch.slide_done("P01_pre", seconds=1.0)
            batch.slide_done("P01_post", seconds=1.0, failed=True)
    assert (counted.done, counted.total) == (9, 9) and (batch.done, batch.failed) == (2, 1)
    assert [r for r in caplog.records if r.name == LOGGER] == []
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_batch_counts_done_and_failed(caplog, capsys):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with batch_progress(3, mode="log") as batch:
            batch.slide_done("P01_pre", seconds=61.0)
            batch.slide_done("P01_post", seconds=2.4, failed=True)
            batch.slide_done("P02_pre", seconds=3725.0)
    assert (batch.total, batch.done, batch.failed) == (3, 3, 1)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert [m.split(" (")[0] for m in messages] == [
        "P01_pre done in 01:01", "P01_post failed in 00:02", "P02_pre done in 1:02:05"]
    assert "(2/3 slides, 1 failed, ~" in messages[1] and "(3/3 slides, 1 failed, ~00:00 left)" in messages[2]

    with batch_progress(2, mode="bars") as batch:
        batch.slide_done("P01_pre", seconds=1.0, failed=True)
        batch.slide_done("P01_post", seconds=1.0)
    err = capsys.readouterr().err
    assert "slides 2/2" in err and "1 failed" in err
    assert not tqdm._instances


def test_distributed_client_counts_its_tiles(nine_tiles):
    distributed = pytest.importorskip("distributed")
    grid, image, expected = nine_tiles
    tiles, total = _tasks_with_a_reduction(grid, image)
    # in-process workers: the distributed scheduler runs no local callbacks, as on a real cluster
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            distributed.Client(cluster):
        with progress("P01_pre segment", mode="quiet") as counted:
            got = dask.compute(total, *tiles)
    assert got[0] == sum(expected) and list(got[1:]) == expected
    assert (counted.done, counted.total) == (9, 9)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """One good slide of 9 tiles and one missing slide; classic segmentation; bars asked for."""
    root = tmp_path_factory.mktemp("tiny")
    data, _ = panel_image((360, 360), seed=11)
    write_ome_tiff(root / "A_pre.ome.tif", data, pixel_um=0.5, channel_names=NAMES)
    (root / "manifest.csv").write_text("patient_id,timepoint,slide\nA,pre,A_pre.ome.tif\nA,post,A_post.ome.tif\n")
    (root / "bars.yaml").write_text(
        "segmentation: {method: classic, tile_um: 60, overlap_um: 30}\nrun: {progress: bars}\n")
    return root


def test_batch_bar_over_a_cohort_with_a_failing_slide(tiny_cohort, caplog, capsys):
    root = tiny_cohort
    config = load_config(root / "bars.yaml")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = run_cohort(root / "manifest.csv", root / "segment_only", config=config, stages=STAGES[:1])
    assert [s.status for s in result.slides] == ["done", "error"]
    err = capsys.readouterr().err
    assert "A_pre segment 0/9 tiles" in err and "A_pre segment 9/9 tiles" in err
    assert "slides 0/2 |" in err and "slides 1/2 |" in err and "slides 2/2 |" in err
    assert "| 0 failed [" in err and "| 1 failed [" in err
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines[-2].startswith("A_pre done in ") and "(1/2 slides, 0 failed" in lines[-2]
    assert lines[-1].startswith("A_post failed in ") and "(2/2 slides, 1 failed" in lines[-1]
    assert not tqdm._instances
    run_json = (root / "segment_only" / "run.json").read_text()
    assert "\r" not in run_json and "tiles |" not in run_json


def test_tme_segment_bars_unless_quiet(tiny_cohort, capsys):
    root = tiny_cohort
    args = ["segment", str(root / "A_pre.ome.tif"), "--config", str(root / "bars.yaml")]
    assert main([*args, "--out", str(root / "loud.tif")]) == 0
    loud = capsys.readouterr()
    assert "A_pre.ome.tif segment 9/9 tiles" in loud.err and "nuclei ->" in loud.out
    assert main([*args, "--out", str(root / "quiet.tif"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert (quiet.out, quiet.err) == ("", "")
    assert (root / "quiet.tif").is_file()


def test_tme_run_quiet_shows_warnings_and_errors_only(tiny_cohort, caplog, capsys):
    root = tiny_cohort
    caplog.set_level(logging.INFO)
    code = main(["run", str(root / "manifest.csv"), "--config", str(root / "bars.yaml"), "--out", str(root / "quiet"),
                 "--quiet"])
    assert code == 1  # the missing slide
    quiet = capsys.readouterr()
    assert quiet.out == ""
    assert "tiles" not in quiet.err and "|" not in quiet.err and "\r" not in quiet.err
    assert "1 slide(s) failed: see run.json" in quiet.err
    assert not [r for r in caplog.records if r.levelno < logging.WARNING]
    assert any(r.levelno == logging.ERROR and "A_post" in r.getMessage() for r in caplog.records)
    assert (root / "quiet" / "slides" / "A_pre" / "cells.h5ad").is_file()
