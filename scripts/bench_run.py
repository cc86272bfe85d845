"""Benchmark `tme run` on synthetic slides of growing size: wall time, peak RSS, mm²/min.

Usage::

    python scripts/bench_run.py --sizes 2x2 6x6 --out bench_run.json [--workdir DIR] [--config FILE]

The default configuration (StarDist) unless ``--config`` gives another (e.g. one with
``segmentation: {method: classic}``).

Each slide is written by the synthetic generator first (not timed), then one
`tme run` per slide runs in its own process, whose peak RSS is read from the kernel
(`ru_maxrss` of the waited-for child), so the figures are per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tme_pipeline.results import open_results
from tme_pipeline.synth import synth_slide


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh wrapper process; return its wall time and the child's peak RSS."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'returncode': code, 'seconds': time.perf_counter() - t, 'peak_rss_mb': rss / 1024}))\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2x2", "6x6"], help="W x H in mm, e.g. 4x3")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None, help="YAML passed to `tme run --config`")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tme-bench-"))
    tme = str(Path(sys.executable).with_name("tme"))
    results = []
    for size in args.sizes:
        width, height = (float(v) for v in size.lower().split("x"))
        folder = workdir / size
        folder.mkdir(parents=True, exist_ok=True)
        slide = folder / f"S_{size}.ome.tif"
        if not slide.exists():
            synth_slide(slide, size_mm=(width, height), seed=args.seed)
        (folder / "manifest.csv").write_text(f"patient_id,timepoint,slide\nP,pre,{slide.name}\n")
        cmd = [tme, "run", str(folder / "manifest.csv"), "--out", str(folder / "out"), "--force"]
        run = measure(cmd + (["--config", str(args.config)] if args.config else []))
        run_json = open_results(folder / "out").run
        record = run_json["slides"][0]
        method = run_json["config"]["segmentation"]["method"]
        area_mm2 = width * height
        results.append(
            {
                "size_mm": [width, height],
                "area_mm2": area_mm2,
                "seconds": round(run["seconds"], 2),
                "peak_rss_mb": round(run["peak_rss_mb"], 1),
                "mm2_per_minute": round(area_mm2 / run["seconds"] * 60, 2),
                "n_nuclei": record["n_nuclei"],
                "stage_seconds": record["timings"],
                "status": record["status"],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    report = {
        "benchmark": f"tme run ({method} segmenter, threads scheduler)",
        "config": str(args.config or "default"),
        "machine": {
            "cpu_count": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
