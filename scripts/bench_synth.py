"""Benchmark the synthetic slide generator: wall time and peak RSS per slide size.

Each size runs in its own child process so that its peak RSS (``ru_maxrss``) is its own.

    python scripts/bench_synth.py --sizes 4x3 2x2 6x6 --out bench.json
    python scripts/bench_synth.py --sizes 2x2 --style external_lab --out bench_external.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench_synth")


def _child(size: str, seed: int, workdir: str, style: str) -> None:
    """Write one slide and print its timings and peak RSS as one JSON line."""
    from tme_pipeline.synth import synth_slide

    w, h = (float(v) for v in size.split("x"))
    path = Path(workdir) / f"bench_{size}.ome.tif"
    t0 = time.perf_counter()
    truth = synth_slide(path, size_mm=(w, h), seed=seed, truth_dir=Path(workdir) / f"truth_{size}", style=style)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    print(json.dumps({"size_mm": [w, h], "style": style, "wall_s": round(wall, 2), "peak_rss_mb": round(rss_mb, 1),
                      "n_cells": len(truth.cells), "n_tls": len(truth.tls),
                      "file_mb": round(path.stat().st_size / 2**20, 1),
                      "mpx_per_s": round(w * h * 4e6 / 1e6 / wall, 2)}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["4x3", "2x2", "6x6"], help="WxH in mm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", default="default", help="slide style (tme_pipeline.synth.style.STYLES)")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.seed, args.workdir, args.style)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        for size in args.sizes:
            proc = subprocess.run([sys.executable, __file__, "--child", size, "--seed", str(args.seed),
                                   "--style", args.style, "--workdir", tmp], capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode:
                logger.error("size %s failed:\n%s", size, proc.stderr)
                return proc.returncode
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            logger.info("%s mm: %.1f s, peak RSS %.0f MB, %d cells", size, res["wall_s"], res["peak_rss_mb"],
                        res["n_cells"])
            results.append(res)
            for f in Path(tmp).glob("bench_*"):
                f.unlink()
    out = {"host_cpus": os.cpu_count(), "results": results}
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
