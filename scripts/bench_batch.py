"""Benchmark a batch of slides on a LocalCluster: one slide at a time against several in flight.

Usage (one command; the figure of docs/benchmarks.md, issue 15 item 1)::

    python scripts/bench_batch.py --out bench_out/batch.json --workdir bench_work/batch

Writes ``--slides`` synthetic slides (default 4, 2 x 1.5 mm, seeds 31..; once, reused) and a
manifest, then runs the whole ``tme run MANIFEST --out OUT --force --workers N`` as a user
would, once with ``run.slides_in_flight: 1`` and once with the default (one slide per worker),
alternating ``--repeats`` times. Each run is measured like ``bench_pipeline.py`` (wall,
CPU and peak RSS of the process tree). The JSON also checks that both runs wrote the same
``metrics.json`` for every slide. With several slides in flight the workers keep computing
tiles of one slide while the calling process does another slide's untiled stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import measure  # noqa: E402  (the same process-tree measurement)


def _cohort(workdir: Path, n: int, size_mm: tuple[float, float]) -> Path:
    """``n`` synthetic slides and their manifest under ``workdir`` (written once)."""
    from tme_pipeline.synth import synth_slide

    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        slide = workdir / f"S{i}.ome.tif"
        if not slide.exists():
            partial = workdir / f".partial_{slide.name}"
            synth_slide(partial, size_mm=size_mm, seed=31 + i)
            os.replace(partial, slide)
        rows.append(f"P{i // 2},{('pre', 'post')[i % 2]},{slide.name}\n")
    manifest = workdir / "manifest.csv"
    manifest.write_text("patient_id,timepoint,slide\n" + "".join(rows))
    return manifest


def _run(manifest: Path, out: Path, workers: int, in_flight: int | None) -> dict:
    config = out.with_suffix(".yaml")
    config.write_text(f"run:\n  slides_in_flight: {'null' if in_flight is None else in_flight}\n")
    tme = str(Path(sys.executable).with_name("tme"))
    result = measure([tme, "run", str(manifest), "--out", str(out), "--force", "--workers", str(workers),
                      "--config", str(config), "--quiet"])
    tail = result.pop("output_tail")
    if result["returncode"] != 0:
        return {**result, "status": "failed", "output_tail": tail}
    record = json.loads((out / "run.json").read_text())
    result["slides_in_flight"] = record.get("slides_in_flight")
    result["statuses"] = [s["status"] for s in record["slides"]]
    return result


def _metrics(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "slides").glob("*/metrics.json"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size-mm", type=float, nargs=2, default=(2.0, 1.5))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    manifest = _cohort(args.workdir, args.slides, tuple(args.size_mm))
    runs = {"one_at_a_time": [], "in_flight": []}
    for _ in range(args.repeats):
        for name, in_flight in (("one_at_a_time", 1), ("in_flight", None)):
            runs[name].append(_run(manifest, args.workdir / f"out_{name}", args.workers, in_flight))
            print(name, runs[name][-1], flush=True)
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    same = _metrics(args.workdir / "out_one_at_a_time") == _metrics(args.workdir / "out_in_flight")
    summary = {
        "slides": args.slides, "size_mm": list(args.size_mm), "workers": args.workers,
        "best_seconds": best, "speedup": round(best["one_at_a_time"] / best["in_flight"], 3),
        "same_metrics": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                    "runs": runs, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
