"""Benchmark the whole `tme run` as a user runs it, against the network's forward pass alone.

Usage (one command, unattended, resumable; the figures of docs/benchmarks.md)::

    python scripts/bench_pipeline.py --out bench_out/pipeline.json --workdir bench_work

For each synthetic slide (``--sizes``, default 2x2 4x4 6x6 mm; `synth_slide`, seed 11, as
``bench_run.py``; written once into ``--workdir`` and reused), it measures, each in its own
process:

- ``run``: ``tme run MANIFEST --out OUT --force`` (default configuration unless
  ``--config``): wall seconds, mm²/min, CPU seconds of the process tree, **peak RSS of the
  process tree** (the process and all its descendants, LocalCluster workers included,
  sampled every 0.2 s with psutil and summed), and each stage's seconds (``run.json``
  ``timings``);
- ``network``: a process that reads the same tiles as `tme run` (same grid, windows,
  slide-wide normalisation, batch size, Dask scheduler and workers) and runs only the
  network's forward pass on each, with no NMS, no rendering and no writing. The wall time of
  that pass over all tiles, after imports and model loading, is the denominator of
  ``total_over_network`` (the acceptance: ≤ 1.3 on a 4 × 4 mm slide);
- ``workers`` (on ``--workers-slide``, default 4x4): ``tme run --workers N`` for each N of
  ``--workers-compare`` (default 1 2) and the speed-up of the last over the first.

``--only run network workers`` selects parts, ``--repeats`` repeats each measurement (the
best wall time is summarised). The JSON is rewritten after every measurement; a second
invocation with the same ``--out`` skips the measurements it already holds (``--fresh``
discards them), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

SAMPLE_S = 0.2  # RSS sampling period of the process tree, s
PARTS = ("run", "network", "workers")


def measure(cmd: list[str], *, env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds and peak summed RSS of its process tree.

    RSS is sampled every :data:`SAMPLE_S` s over the process and all its descendants and
    summed per sample (shared pages count once per process, as ``ps`` shows them). CPU
    seconds are the waited-for descendants' user + system time (``RUSAGE_CHILDREN``).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                tree = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for p in tree:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak[0] = max(peak[0], total)
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"returncode": proc.returncode, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_tree_mb": round(peak[0] / 2**20, 1), "output_tail": output[-2000:]}


def network_forward(slide: Path, config_path: Path | None, out_json: Path) -> None:
    """The network's forward pass alone over `tme run`'s tiles of `slide`; JSON to `out_json`.

    Same grid and windows (``map_tiles`` with the segmentation's overlap), same slide-wide
    normalisation, segmenter settings (device, precision, batch, patch size, threads) and
    Dask scheduler as the segment stage; each tile's window is normalised and passed through
    the net (:func:`tme_pipeline.segment.predict.predict_prob_dist`), and nothing else.
    """
    t0 = time.perf_counter()
    import dask
    import numpy as np

    from tme_pipeline.config import load_config
    from tme_pipeline.parallel import run_scheduler
    from tme_pipeline.pipeline import slide_inputs
    from tme_pipeline.stages import lowres_channel, segmentation_function
    from tme_pipeline.tiling import map_tiles

    config = load_config(config_path)
    if config.segmentation.method != "stardist":
        raise ValueError(f"{config_path}: the network benchmark needs segmentation.method: stardist")
    inputs = slide_inputs(slide, config=config, slide_id=slide.stem)
    level0, channel, grid = inputs.slide.levels[0], inputs.nuclear_channel, inputs.grid
    lowres, _ = lowres_channel(inputs.slide, channel)
    seg = segmentation_function(config, pixel_um=inputs.slide.pixel_um, nuclear_lowres=lowres)
    model = seg.model()
    if abs(inputs.slide.pixel_um / model.config.pixel_um - 1) > 0.05:
        raise ValueError(f"{slide}: pixel size {inputs.slide.pixel_um} µm; this benchmark needs the model's "
                         f"{model.config.pixel_um} µm (no resampling)")
    ready = time.perf_counter()
    tasks = map_tiles(_forward_tile, [level0[channel]], grid=grid, margin_px=grid.overlap_px, args=(seg,))
    # the scheduler `tme run` would set up from this config (threads per worker included)
    with run_scheduler(config) as scheduler:
        start = time.perf_counter()
        per_tile = dask.compute(*tasks)
        forward_wall = time.perf_counter() - start
    per_tile = np.array(per_tile)
    out_json.write_text(json.dumps({
        "n_tiles": grid.n_tiles, "scheduler": _plain(scheduler),
        "forward_wall_s": round(forward_wall, 2),
        "forward_sum_s": round(float(per_tile[:, 1].sum()), 2),
        "read_sum_s": round(float(per_tile[:, 0].sum()), 2),
        "window_mpx": round(float(per_tile[:, 2].sum()) / 1e6, 2),
        "setup_s": round(ready - t0, 2),
    }) + "\n")


def _plain(value) -> object:
    """A JSON-able form of the scheduler description (a dataclass or a string)."""
    import dataclasses

    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def _forward_tile(window, tile, box, seg) -> tuple[float, float, int]:
    """(read+normalise seconds, forward seconds, pixels) of one tile, as the segmenter would see it."""
    import numpy as np

    from tme_pipeline.segment.predict import predict_prob_dist

    start = time.perf_counter()
    lo, hi = seg.norm
    if not hi > lo or np.ptp(window) == 0:  # the segmenter skips a flat window too
        return time.perf_counter() - start, 0.0, window.size
    x = (window.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    if seg.n_threads is not None:
        import torch

        torch.set_num_threads(int(seg.n_threads))
    mid = time.perf_counter()
    predict_prob_dist(x, model=seg.model(), device=seg.device, precision=seg.precision, tile_px=seg.tile_px,
                      batch_size=seg.batch_size)
    return mid - start, time.perf_counter() - mid, window.size


def _slide(workdir: Path, size: str, seed: int) -> tuple[Path, float, float]:
    """The cached synthetic slide of `size` (``WxH`` mm), written on first use."""
    width, height = (float(v) for v in size.lower().split("x"))
    folder = workdir / size
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / f"S_{size}.ome.tif"
    if not slide.exists():
        from tme_pipeline.synth import synth_slide

        print(f"writing the {size} mm synthetic slide (seed {seed}) to {slide}", flush=True)
        partial = folder / f".partial_{slide.name}"
        synth_slide(partial, size_mm=(width, height), seed=seed)
        os.replace(partial, slide)
    (folder / "manifest.csv").write_text(f"patient_id,timepoint,slide\nP,pre,{slide.name}\n")
    return slide, width, height


def _tme_run(folder: Path, out_name: str, config: Path | None, workers: int | None) -> dict:
    tme = str(Path(sys.executable).with_name("tme"))
    cmd = [tme, "run", str(folder / "manifest.csv"), "--out", str(folder / out_name), "--force"]
    cmd += ["--config", str(config)] if config else []
    cmd += ["--workers", str(workers)] if workers else []
    run = measure(cmd)
    if run["returncode"] != 0:
        return {**run, "status": "failed"}
    record = json.loads((folder / out_name / "run.json").read_text())
    slide = record["slides"][0]
    run.pop("output_tail")
    return {**run, "status": slide["status"], "n_nuclei": slide.get("n_nuclei"),
            "stage_seconds": slide.get("timings", {}), "scheduler": record.get("scheduler")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2x2", "4x4", "6x6"], help="slides, W x H mm, e.g. 4x4")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to measure")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each kind")
    parser.add_argument("--workers-compare", nargs="+", type=int, default=[1, 2], metavar="N",
                        help="`tme run --workers N` for each N, on --workers-slide")
    parser.add_argument("--workers-slide", default="4x4", help="slide of the workers comparison")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--config", type=Path, default=None, help="YAML passed to `tme run --config`")
    parser.add_argument("--out", type=Path, required=True, help="JSON report, rewritten after each measurement")
    parser.add_argument("--workdir", type=Path, default=Path("bench_work"), help="slides and run outputs (cached)")
    parser.add_argument("--fresh", action="store_true", help="discard the measurements already in --out")
    parser.add_argument("--network-only", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--network-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.network_only is not None:
        network_forward(args.network_only, args.config, args.network_json)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    report = {} if args.fresh or not args.out.exists() else json.loads(args.out.read_text())
    report.update({
        "benchmark": "tme run whole process vs the network's forward pass",
        "config": str(args.config or "default"),
        "machine": {"cpu_count": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "platform": platform.platform(), "load_average": os.getloadavg()},
    })
    measurements = report.setdefault("measurements", {})

    def save() -> None:
        report["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        report["summary"] = _summary(measurements)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    jobs = []
    for size in args.sizes:
        for r in range(args.repeats):
            if "run" in args.only:
                jobs.append((f"run/{size}/{r}", size, "run", None))
            if "network" in args.only:
                jobs.append((f"network/{size}/{r}", size, "network", None))
    if "workers" in args.only:
        for r in range(args.repeats):
            for n in args.workers_compare:
                jobs.append((f"workers/{args.workers_slide}/{n}/{r}", args.workers_slide, "workers", n))
    for key, size, kind, workers in jobs:
        if key in measurements and measurements[key].get("returncode") == 0:
            print(f"{key}: kept from {args.out}", flush=True)
            continue
        slide, width, height = _slide(args.workdir, size, args.seed)
        folder = slide.parent
        if kind == "network":
            result = measure([sys.executable, __file__, "--out", str(args.out), "--network-only", str(slide),
                              "--network-json", str(folder / "network.json")]
                             + (["--config", str(args.config)] if args.config else []))
            if result["returncode"] == 0:
                result.pop("output_tail")
                result.update(json.loads((folder / "network.json").read_text()))
        else:
            result = _tme_run(folder, "out" if kind == "run" else f"out_w{workers}", args.config, workers)
        result.update({"size_mm": [width, height], "area_mm2": width * height, "kind": kind, "workers": workers})
        if result["returncode"] == 0:
            result["mm2_per_minute"] = round(width * height / result["seconds"] * 60, 2)
        measurements[key] = result
        print(f"{key}: {json.dumps({k: v for k, v in result.items() if k != 'output_tail'})}", flush=True)
        save()
    save()
    return 0


def _area(size: str) -> float:
    """mm² of a ``WxH`` size."""
    width, height = (float(v) for v in size.lower().split("x"))
    return width * height


def _summary(measurements: dict) -> dict:
    """Per slide: best run and network times, their ratio, peak RSS; the workers' speed-up."""
    def best(kind: str, size: str, field: str = "seconds") -> dict | None:
        done = [m for k, m in measurements.items()
                if m.get("kind") == kind and k.split("/")[1] == size and m.get("returncode") == 0]
        return min(done, key=lambda m: m[field]) if done else None

    sizes = sorted({k.split("/")[1] for k in measurements}, key=_area)
    out: dict = {"slides": {}}
    for size in sizes:
        run, net = best("run", size), best("network", size, "forward_wall_s")
        entry: dict = {}
        if run:
            entry.update({"run_seconds": run["seconds"], "run_cpu_seconds": run["cpu_seconds"],
                          "mm2_per_minute": run["mm2_per_minute"], "peak_rss_tree_mb": run["peak_rss_tree_mb"],
                          "n_nuclei": run.get("n_nuclei"), "stage_seconds": run.get("stage_seconds")})
        if net:
            entry.update({"network_forward_s": net["forward_wall_s"], "network_forward_sum_s": net["forward_sum_s"],
                          "network_process_peak_rss_mb": net["peak_rss_tree_mb"]})
        if run and net and net["forward_wall_s"] > 0:
            entry["total_over_network"] = round(run["seconds"] / net["forward_wall_s"], 3)
        if entry:
            out["slides"][size] = entry
    rss = {s: e["peak_rss_tree_mb"] for s, e in out["slides"].items() if "peak_rss_tree_mb" in e}
    if len(rss) >= 2:
        small, large = min(rss, key=_area), max(rss, key=_area)
        out["peak_rss_largest_over_smallest"] = round(rss[large] / rss[small], 3)
    workers: dict[int, float] = {}
    for key, m in measurements.items():
        if m.get("kind") == "workers" and m.get("returncode") == 0:
            n = m["workers"]
            workers[n] = min(workers.get(n, float("inf")), m["seconds"])
    if workers:
        out["workers_seconds"] = {str(n): s for n, s in sorted(workers.items())}
        ns = sorted(workers)
        if len(ns) >= 2:
            out["workers_speedup"] = round(workers[ns[0]] / workers[ns[-1]], 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
