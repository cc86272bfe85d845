"""Run every slide of a manifest; one bad slide never stops the batch."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .config import Config, load_config
from .io.manifest import Manifest, read_manifest
from .io.results import remove_stale_partials, write_json
from .parallel import dask_scheduler
from .pipeline import SlideResult, run_slide
from .provenance import provenance

__all__ = ["CohortResult", "run_cohort"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortResult:
    out: Path
    manifest: Manifest
    slides: tuple[SlideResult, ...]

    @property
    def n_failed(self) -> int:
        return sum(r.status == "error" for r in self.slides)


def run_cohort(
    manifest_path: str | Path,
    out: str | Path,
    *,
    config: Config | None = None,
    config_path: str | Path | None = None,
    scheduler: str | None = None,
    pixel_um: float | None = None,
    overwrite: bool = False,
) -> CohortResult:
    """Run the pipeline on every slide of a manifest and write ``OUT/run.json``.

    Slides whose folder is already complete are skipped (unless ``overwrite``);
    folders an interrupted run left half-written are redone. A slide that fails is
    recorded with its error in ``run.json`` and the batch goes on.

    Parameters
    ----------
    manifest_path : str or Path
        CSV with ``patient_id,timepoint,slide`` (see :func:`read_manifest`).
    out : str or Path
        Output folder.
    config : Config, optional
        Defaults to ``load_config(config_path)``.
    config_path : str or Path, optional
        YAML file merged over the defaults; recorded in ``run.json``.
    scheduler : str, optional
        Overrides ``config.run.scheduler``.
    pixel_um : float, optional
        Pixel size (µm) for slides whose metadata and manifest row give none.
    overwrite : bool
        Redo complete slides.

    Returns
    -------
    CohortResult
    """
    config = config or load_config(config_path)
    manifest = read_manifest(manifest_path, timepoints=config.timepoints)
    out = Path(out)
    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(slides_dir):
        log.warning("removed the partial output of an interrupted run: %s", stale)

    started = datetime.now(timezone.utc)
    header = {
        "manifest": str(manifest.path),
        "config_file": str(Path(config_path).resolve()) if config_path else None,
        **provenance(config),
    }
    results: list[SlideResult] = []
    scheduler = scheduler or config.run.scheduler
    with dask_scheduler(scheduler, n_workers=config.run.n_workers) as scheduler_info:
        for row in manifest.rows:
            t0 = time.perf_counter()
            try:
                result = run_slide(
                    row.path,
                    slides_dir / row.slide_id,
                    config=config,
                    slide_id=row.slide_id,
                    pixel_um=row.pixel_um or pixel_um,
                    overwrite=overwrite,
                )
            except Exception as error:  # one bad slide must not stop the batch
                log.error("slide %s failed: %s", row.slide_id, error)
                log.debug("%s", traceback.format_exc())
                result = SlideResult(
                    slide_id=row.slide_id,
                    status="error",
                    out_dir=slides_dir / row.slide_id,
                    seconds=round(time.perf_counter() - t0, 3),
                    error=f"{type(error).__name__}: {error}",
                )
            results.append(result)
            write_json(out / "run.json", _run_record(manifest, header, results, started, scheduler_info))
    result = CohortResult(out=out, manifest=manifest, slides=tuple(results))
    write_json(out / "run.json", _run_record(manifest, header, results, started, scheduler_info, done=True))
    return result


def _run_record(
    manifest: Manifest,
    header: dict,
    results: list[SlideResult],
    started: datetime,
    scheduler: str,
    *,
    done: bool = False,
) -> dict:
    rows = {r.slide_id: r for r in manifest.rows}
    return {
        "status": "complete" if done else "running",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds") if done else None,
        "scheduler": scheduler,
        **header,
        "slides": [
            {
                "slide_id": r.slide_id,
                "patient_id": rows[r.slide_id].patient_id,
                "timepoint": rows[r.slide_id].timepoint,
                "path": str(rows[r.slide_id].path),
                "status": r.status,
                "error": r.error,
                "n_nuclei": r.n_nuclei,
                "seconds": r.seconds,
                "timings": r.timings,
                "info": r.info,
            }
            for r in results
        ],
    }
