"""``tme recompute OUT``: bring a results folder up to date after review corrections.

It re-runs the manifest with the config recorded in ``OUT/run.json``, so that only the stages
the corrections (or anything else) made stale run, then rewrites the cohort tables.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .results import RUN_JSON, slide_folder

__all__ = ["RecomputeResult", "recompute"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecomputeResult:
    """What ``recompute`` did.

    Attributes
    ----------
    out : Path
    slides : tuple of tme_pipeline.pipeline.SlideResult
        The slides brought up to date (one with ``slide_id``); ``ran``/``reused`` per slide.
    tables : dict
        Cohort file name -> path, as :func:`tme_pipeline.cohort_tables.write_cohort_tables`
        returned them; empty when that module is not installed.
    """

    out: Path
    slides: tuple
    tables: dict

    @property
    def n_failed(self) -> int:
        return sum(s.status == "error" for s in self.slides)


def _recorded_config(run: dict, out: Path):
    """The resolved config of ``run.json``; the config file it names when that no longer validates."""
    from pydantic import ValidationError

    from .config import Config, load_config

    try:
        return Config.model_validate(run["config"])
    except (KeyError, ValidationError) as error:
        log.warning("%s: the recorded config does not load (%s); reading %s", out / RUN_JSON, error,
                    run.get("config_file"))
        return load_config(run.get("config_file"))


def recompute(out: str | Path, *, slide_id: str | None = None, progress: str | None = None) -> RecomputeResult:
    """Re-run the manifest and config recorded in ``OUT/run.json``: only stale stages run.

    Parameters
    ----------
    out : str or Path
        A results folder of ``tme run``.
    slide_id : str, optional
        Only this slide; the other slides' entries of ``run.json`` are kept as they are.
    progress : str, optional
        ``run.progress`` for this recompute (auto | bars | log | quiet); default: as recorded.

    Returns
    -------
    RecomputeResult

    Raises
    ------
    FileNotFoundError
        No ``run.json`` or manifest.
    ValueError
        ``slide_id`` not in the manifest.
    """
    from .cohort import run_cohort
    from .io.manifest import read_manifest
    from .io.results import write_json
    from .lock import output_lock
    from .pipeline import SlideResult, run_slide

    out = Path(out)
    run_path = out / RUN_JSON
    if not run_path.is_file():
        raise FileNotFoundError(f"{run_path}: no run record; recompute needs a folder `tme run` wrote")
    run = json.loads(run_path.read_text(encoding="utf-8"))
    manifest_path = Path(run.get("manifest") or "")
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_path}: the manifest it names ({manifest_path}) is not found")
    config = _recorded_config(run, out)
    if progress is not None:
        # how progress is shown is not part of what was computed, so it may differ from the record
        config = config.model_copy(update={"run": config.run.model_copy(update={"progress": progress})})
    if slide_id is None:
        result = run_cohort(manifest_path, out, config=config, config_path=run.get("config_file"))
        slides = result.slides
    else:
        manifest = read_manifest(manifest_path, timepoints=config.timepoints)
        row = next((r for r in manifest.rows if r.slide_id == slide_id), None)
        if row is None:
            raise ValueError(f"{manifest_path}: no slide {slide_id!r} (slides: "
                             f"{', '.join(r.slide_id for r in manifest.rows)})")
        with output_lock(out):
            try:
                done = run_slide(row.path, slide_folder(out, slide_id), config=config, slide_id=slide_id,
                                 pixel_um=row.pixel_um, patient_id=row.patient_id, timepoint=row.timepoint)
            except Exception as error:  # recorded, as the batch runner records it
                done = SlideResult(slide_id=slide_id, status="error", out_dir=slide_folder(out, slide_id),
                                   error=f"{type(error).__name__}: {error}")
            run = json.loads(run_path.read_text(encoding="utf-8"))
            for entry in run.get("slides", []):
                if entry["slide_id"] == slide_id:
                    entry.update({"status": done.status, "error": done.error, "n_nuclei": done.n_nuclei,
                                  "seconds": done.seconds, "stages": {"ran": list(done.ran),
                                                                      "reused": list(done.reused)},
                                  "timings": done.timings, "info": done.info or entry.get("info", {})})
            run["recomputed"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_json(run_path, run)
        slides = (done,)
    try:
        from .cohort_tables import write_cohort_tables
    except ImportError:
        tables = {}
    else:
        tables = dict(write_cohort_tables(out))
    return RecomputeResult(out=out, slides=tuple(slides), tables=tables)
