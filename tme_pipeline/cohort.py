"""Run every slide of a manifest; one bad slide never stops the batch."""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .cohort_tables import write_cohort_tables
from .config import Config, load_config
from .io.manifest import Manifest, read_manifest
from .io.results import remove_stale_partials, write_json
from .lock import output_lock
from .parallel import LOCAL_SCHEDULERS, SchedulerInfo, run_scheduler
from .pipeline import SlideResult, run_slide
from .progress import batch_progress
from .provenance import provenance
from .results import RUN_JSON, SLIDES_DIR, slide_folder
from .stages import STAGES, Stage, check_stages
from .tiling import tile_grid

__all__ = ["CohortResult", "run_cohort", "slides_at_once"]

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
    force: bool = False,
    force_from: str | None = None,
    stages: Sequence[Stage] = STAGES,
) -> CohortResult:
    """Run the pipeline on every slide of a manifest and write ``OUT/run.json``.

    Each slide's stages whose record in ``stages.json`` no longer matches the config and
    code are recomputed, with every stage downstream of them; the others are reused.
    Folders an interrupted run left half-written are removed and redone. The output
    folder is locked for the whole run: a second run on it stops with
    :class:`tme_pipeline.lock.OutputInUse`. A slide that fails is recorded with its error
    in ``run.json`` and the batch goes on.

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
    force : bool
        Recompute every stage of every slide.
    force_from : str, optional
        Recompute this stage and the stages after it on every slide.
    stages : sequence of Stage
        Defaults to :data:`tme_pipeline.stages.STAGES`.

    Returns
    -------
    CohortResult

    Raises
    ------
    FileNotFoundError, ValueError
        Before any slide runs: a bad manifest, a tile size the overlap does not fit, an
        output folder that cannot be written, a StarDist model that is missing or does not
        load (the message names the file).
    """
    config = config or load_config(config_path)
    manifest = read_manifest(manifest_path, timepoints=config.timepoints)
    check_stages(stages)
    names = [s.name for s in stages]
    if force_from is not None and force_from not in names:
        raise ValueError(f"--from {force_from!r}: not a stage ({', '.join(names)})")
    out = Path(out)
    _check_tiles(config, config_path)
    _check_in_flight(config, scheduler, config_path)
    _check_model(config)
    _check_writable(out)
    with output_lock(out):
        return _run_locked(manifest, out, config, config_path, scheduler, pixel_um,
                           force_from=names[0] if force else force_from, stages=stages)


def _run_locked(manifest: Manifest, out: Path, config: Config, config_path, scheduler, pixel_um, *,
                force_from: str | None, stages: Sequence[Stage]) -> CohortResult:
    slides_dir = out / SLIDES_DIR
    slides_dir.mkdir(parents=True, exist_ok=True)
    # Under the lock, every partial folder is an interrupted run's: no live run owns it.
    for stale in remove_stale_partials(slides_dir):
        log.warning("removed the partial output of an interrupted run: %s", stale)

    started = datetime.now(timezone.utc)
    header = {
        "manifest": str(manifest.path),
        "config_file": str(Path(config_path).resolve()) if config_path else None,
        **provenance(config),
    }
    finished: dict[int, SlideResult] = {}
    with run_scheduler(config, scheduler) as scheduler_info, \
            batch_progress(len(manifest.rows), mode=config.run.progress) as batch:
        at_once = slides_at_once(config.run.slides_in_flight, scheduler_info, len(manifest.rows))
        header["slides_in_flight"] = at_once

        def record(index: int, result: SlideResult) -> None:
            finished[index] = result
            batch.slide_done(result.slide_id, seconds=result.seconds, failed=result.status == "error")
            done = [finished[i] for i in sorted(finished)]  # manifest order, whatever order they finish in
            write_json(out / RUN_JSON, _run_record(manifest, header, done, started, scheduler_info))

        def one(row) -> SlideResult:
            return _run_one(row, out, config, pixel_um, stages=stages, force_from=force_from)

        if at_once == 1:
            for index, row in enumerate(manifest.rows):
                record(index, one(row))
        else:
            log.info("%d slides in flight", at_once)
            _run_concurrently(manifest.rows, one, record, at_once)
    results = [finished[i] for i in sorted(finished)]
    result = CohortResult(out=out, manifest=manifest, slides=tuple(results))
    record = _run_record(manifest, header, results, started, scheduler_info, done=True)
    write_json(out / RUN_JSON, record)
    # the tables read the run.json just written; then run.json says whether they were
    record["cohort_tables"] = _cohort_tables(out, manifest)
    write_json(out / RUN_JSON, record)
    if not record["cohort_tables"]["error"]:
        record["cohort_analysis"] = _cohort_analysis(out)
        write_json(out / RUN_JSON, record)
    # last: the page shows what the steps before it left (tables, analysis) and says what is missing
    record["cohort_report"] = _cohort_report(out)
    write_json(out / RUN_JSON, record)
    return result


def _run_one(row, out: Path, config: Config, pixel_um, *, stages, force_from) -> SlideResult:
    """One slide, start to end; its failure becomes an ``error`` result, never an exception."""
    t0 = time.perf_counter()
    try:
        return run_slide(
            row.path,
            slide_folder(out, row.slide_id),
            config=config,
            slide_id=row.slide_id,
            pixel_um=row.pixel_um or pixel_um,
            stages=stages,
            force_from=force_from,
            patient_id=row.patient_id,
            timepoint=row.timepoint,
        )
    except Exception as error:  # one bad slide must not stop the batch
        log.error("slide %s failed: %s", row.slide_id, error)
        log.debug("%s", traceback.format_exc())
        return SlideResult(
            slide_id=row.slide_id,
            status="error",
            out_dir=slide_folder(out, row.slide_id),
            seconds=round(time.perf_counter() - t0, 3),
            error=_describe(error, slide_folder(out, row.slide_id)),
        )


def _run_concurrently(rows, one: Callable, record: Callable[[int, SlideResult], None], at_once: int) -> None:
    """``one(row)`` for every row, ``at_once`` at a time from threads; ``record`` each as it ends.

    The threads only submit graphs to the distributed client and wait; the pixels are
    worked on by the cluster's workers. ``record`` runs in this thread, so ``run.json`` and
    the batch bar are written by one thread only. On an interrupt the slides not started
    are dropped and the running ones are waited for, so that no folder is left mid-write.
    """
    from .progress import distributed_progress

    with distributed_progress(), \
            ThreadPoolExecutor(at_once, thread_name_prefix="tme-slide") as pool:
        futures = {pool.submit(one, row): index for index, row in enumerate(rows)}
        try:
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def slides_at_once(asked: int | None, scheduler: SchedulerInfo, n_slides: int) -> int:
    """How many slides run at once: ``run.slides_in_flight`` on a distributed scheduler, else 1.

    Parameters
    ----------
    asked : int or None
        ``config.run.slides_in_flight``; None: one slide per worker of the cluster
        (an existing cluster's workers as counted when the run starts; SLURM: the jobs).
    scheduler : SchedulerInfo
        What :func:`tme_pipeline.parallel.run_scheduler` started.
    n_slides : int
        Slides in the manifest (never more at once than these).

    Returns
    -------
    int
        At least 1. Always 1 on a local scheduler (threads, synchronous, processes), whose
        pools are per calling thread and would oversubscribe the cores.
    """
    if scheduler.kind in LOCAL_SCHEDULERS or n_slides <= 1:
        return 1
    wanted = asked or scheduler.workers or 1  # an existing cluster without workers yet: 1
    return max(1, min(wanted, n_slides))


def _check_in_flight(config: Config, scheduler: str | None, config_path) -> None:
    """Refuse ``slides_in_flight > 1`` on a local scheduler before any slide runs."""
    asked = config.run.slides_in_flight
    chosen = scheduler or config.run.scheduler
    if asked and asked > 1 and config.run.cluster is None and chosen in LOCAL_SCHEDULERS:
        raise ValueError(
            f"{config_path or 'configuration'}: run.slides_in_flight: {asked} slides at once needs a distributed "
            f"scheduler (tme run --workers N, --scheduler ADDRESS or --cluster FILE); the {chosen!r} scheduler "
            "runs one slide at a time with all its threads"
        )


def _cohort_tables(out: Path, manifest: Manifest) -> dict:
    """Write ``cohort.h5ad``, ``patients.h5ad``, ``metrics.csv``; a failure is recorded, not raised."""
    try:
        paths = write_cohort_tables(out, manifest=manifest)
    except Exception as error:  # the slides' results stand without the tables
        log.error("cohort tables not written: %s", error)
        return {"files": [], "error": f"{type(error).__name__}: {error}"}
    return {"files": [path.name for path in paths.values()], "error": None}


def _cohort_analysis(out: Path) -> dict:
    """The paired analysis (:func:`tme_pipeline.analysis.analyze`) when a patient has both timepoints.

    A failure is recorded, not raised; no complete patient is no error (nothing to pair).
    """
    import anndata as ad

    from .analysis import analyze
    from .results import PATIENTS_H5AD

    try:
        patients = ad.read_h5ad(out / PATIENTS_H5AD, backed="r")
        complete = bool(patients.obs["complete"].astype(bool).any()) if "complete" in patients.obs else False
        patients.file.close()
        if not complete:
            return {"folder": None, "error": None, "reason": "no patient has both timepoints done"}
        folder = analyze(out)
    except Exception as error:  # the tables stand without the statistics
        log.error("cohort analysis not written: %s", error)
        return {"folder": None, "error": f"{type(error).__name__}: {error}"}
    return {"folder": folder.name, "error": None}


def _cohort_report(out: Path) -> dict:
    """Write ``OUT/report.html`` (:func:`tme_pipeline.cohort_report.write_cohort_report`); a failure is recorded."""
    from .cohort_report import write_cohort_report

    try:
        path = write_cohort_report(out)
    except Exception as error:  # the results stand without their page
        log.error("cohort report not written: %s", error)
        return {"file": None, "error": f"{type(error).__name__}: {error}"}
    return {"file": path.name, "error": None}


def _check_tiles(config: Config, config_path) -> None:
    """Every slide's tile grid follows the same rules: a tile/overlap it refuses fails the run, not each slide."""
    seg = config.segmentation
    try:
        tile_grid((1, 1), pixel_um=1.0, tile_um=seg.tile_um, overlap_um=seg.overlap_um)
    except ValueError as error:
        raise ValueError(f"{config_path or 'configuration'}: segmentation: {error}") from None


def _check_model(config: Config) -> None:
    """Load the nucleus model once: a missing or broken model fails the run, not every slide."""
    if config.segmentation.method == "stardist":
        from .segment.registry import model_folder
        from .segment.weights import cached_model

        cached_model(model_folder(config.segmentation.stardist.model))


def _check_writable(out: Path) -> None:
    """``ValueError`` naming ``out`` unless a file can be created in it (made if missing)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tme.write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{out}: output folder cannot be written ({error.strerror or error})") from error


def _describe(error: Exception, folder: Path) -> str:
    """The error as ``run.json`` records it, with the stage it happened in.

    An OS error that names no file (a full disk) gets the slide's folder.
    """
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) and not error.filename:
        text += f" (slide folder {folder})"
    notes = getattr(error, "__notes__", ())
    if notes:
        text += f" [{'; '.join(notes)}]"
    return text


def _run_record(
    manifest: Manifest,
    header: dict,
    results: list[SlideResult],
    started: datetime,
    scheduler: SchedulerInfo,
    *,
    done: bool = False,
) -> dict:
    rows = {r.slide_id: r for r in manifest.rows}
    return {
        "status": "complete" if done else "running",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds") if done else None,
        "scheduler": scheduler.record(),
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
                "stages": {"ran": list(r.ran), "reused": list(r.reused)},
                "timings": r.timings,
                "info": r.info,
            }
            for r in results
        ],
    }
