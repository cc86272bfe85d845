"""CPU seconds of each stage of one slide's run, in-process, optionally with cProfile per stage.

Usage::

    python scripts/profile_stages.py SLIDE OUT_DIR --json stages_cpu.json [--from STAGE] \
        [--config FILE] [--cprofile DIR]

Runs the slide's stages as `tme run` does (:func:`tme_pipeline.pipeline.run_slide`, Dask
scheduler of the config) and records, per stage that ran, its wall seconds and the
process's CPU seconds (user + system, every thread: Dask's, torch's, zarr's). CPU time is
what this measures because it hardly changes with other processes' load, unlike wall time.
``--from`` forces that stage and those after it and reuses the earlier ones (copy a
finished folder with ``cp -al`` first); ``--cprofile DIR`` writes one ``<stage>.prof`` per
stage (``python -m pstats``), timed in CPU seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", type=Path)
    parser.add_argument("out", type=Path, help="the slide's output folder")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--from", dest="from_stage", default=None, metavar="STAGE")
    parser.add_argument("--cprofile", type=Path, default=None, metavar="DIR")
    args = parser.parse_args(argv)

    from tme_pipeline.config import load_config
    from tme_pipeline.parallel import dask_scheduler
    from tme_pipeline.pipeline import run_slide
    from tme_pipeline.stages import STAGES

    config = load_config(args.config)
    figures: dict[str, dict] = {}

    def timed(stage):
        def run(inputs, folder):
            profile = cProfile.Profile(time.process_time) if args.cprofile else None
            wall, cpu = time.perf_counter(), _cpu()
            if profile:
                profile.enable()
            try:
                return stage.run(inputs, folder)
            finally:
                if profile:
                    profile.disable()
                    args.cprofile.mkdir(parents=True, exist_ok=True)
                    profile.dump_stats(args.cprofile / f"{stage.name}.prof")
                figures[stage.name] = {"wall_s": round(time.perf_counter() - wall, 2),
                                       "cpu_s": round(_cpu() - cpu, 2)}
        return replace(stage, run=run)

    start, cpu0 = time.perf_counter(), _cpu()
    with dask_scheduler(config.run.scheduler, n_workers=config.run.n_workers) as scheduler:
        result = run_slide(args.slide, args.out, config=config, stages=[timed(s) for s in STAGES],
                           force_from=args.from_stage, force=args.from_stage is None)
    record = {"slide": str(args.slide), "scheduler": scheduler.record() if hasattr(scheduler, "record") else scheduler, "n_nuclei": result.n_nuclei,
              "stages": figures, "total_wall_s": round(time.perf_counter() - start, 2),
              "total_cpu_s": round(_cpu() - cpu0, 2)}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
