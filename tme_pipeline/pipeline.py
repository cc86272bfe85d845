"""One slide through its stages, recomputing only the stale ones, into an atomically swapped folder."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config
from .io.results import partial_dir, write_json
from .io.slides import open_slide
from .panel import match_panel
from .records import FORMAT, carry_files, read_records, stage_keys, stage_record, stale_stages
from .results import SLIDES_DIR, STAGES_JSON, corrections_file
from .stages import STAGES, SlideInputs, Stage, check_stages, slide_info
from .tiling import tile_grid

__all__ = ["SlideResult", "run_slide", "slide_inputs", "run_stages"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideResult:
    """What happened to one slide, as recorded in ``run.json``.

    ``status`` is ``"done"`` (some stage ran), ``"skipped"`` (every stage reused from an
    earlier run) or ``"error"``; ``ran`` and ``reused`` name the stages, in order.
    """

    slide_id: str
    status: str
    out_dir: Path
    n_nuclei: int | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    error: str | None = None
    ran: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()


def slide_inputs(
    slide_path: str | Path, *, config: Config, slide_id: str, pixel_um: float | None = None
) -> SlideInputs:
    """Open a slide, match its channels to the panel and lay out its tile grid.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file and the slide: unreadable file, no pixel size, a panel marker missing.
    """
    slide = open_slide(slide_path, pixel_um=pixel_um)
    if slide.format == "tiff" and config.channel_names is not None:
        # plain TIFFs carry no channel names: the config's, in page order, apply
        slide = open_slide(slide_path, pixel_um=pixel_um, channel_names=config.channel_names)
    panel = match_panel(
        slide.channel_names, config.panel, channel_map=config.channel_map, source=f"{slide.path} (slide {slide_id})"
    )
    seg = config.segmentation
    grid = tile_grid(slide.shape_yx, pixel_um=slide.pixel_um, tile_um=seg.tile_um, overlap_um=seg.overlap_um)
    return SlideInputs(slide=slide, slide_id=slide_id, config=config, nuclear_channel=panel.channels[seg.channel],
                       grid=grid, panel=panel)


def run_stages(
    inputs: SlideInputs,
    out_dir: str | Path,
    *,
    stages: Sequence[Stage] = STAGES,
    force_from: str | None = None,
) -> tuple[list[str], list[str], dict[str, dict]]:
    """Bring a slide folder up to date: run the stale stages, reuse the others.

    The new folder is built beside the old one (``.<name>.partial``): the reused stages'
    files are hard-linked (else copied) in, the stale stages write theirs, then
    ``stages.json``, and the folder is swapped in whole. Nothing is written when nothing
    is stale.

    Parameters
    ----------
    inputs : SlideInputs
    out_dir : str or Path
        The slide's folder (``OUT/slides/<slide_id>``).
    stages : sequence of Stage
        In order; each stage's upstream comes before it.
    force_from : str, optional
        Recompute this stage and all after it.

    Returns
    -------
    ran, reused : list of str
        Stage names.
    records : dict
        Stage name -> its ``stages.json`` entry (reused ones as recorded before).
    """
    check_stages(stages)
    out_dir = Path(out_dir)
    keys = stage_keys(stages, inputs)
    records = read_records(out_dir)
    ran = stale_stages(stages, keys, records, out_dir, force_from=force_from)
    reused = [s.name for s in stages if s.name not in ran]
    records = {s.name: records[s.name] for s in stages if s.name in reused}
    if not ran:
        return ran, reused, records
    with partial_dir(out_dir) as tmp:
        carry_files(out_dir, tmp, [s for s in stages if s.name in reused], stages, ran)
        for stage in stages:
            if stage.name not in ran:
                continue
            start = time.perf_counter()
            try:
                output = stage.run(inputs, tmp)
            except Exception as error:  # the batch runner records which stage failed, not only what
                error.add_note(f"in stage {stage.name}")
                raise
            records[stage.name] = stage_record(stage, keys[stage.name], output, folder=tmp, stages=stages,
                                               seconds=time.perf_counter() - start)
            log.info("%s: %s done in %.1f s", inputs.slide_id, stage.name, records[stage.name]["seconds"])
        write_json(tmp / STAGES_JSON, {"format": FORMAT, "slide_id": inputs.slide_id,
                                       "stages": {s.name: records[s.name] for s in stages}})
    return ran, reused, records


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    config: Config,
    slide_id: str | None = None,
    pixel_um: float | None = None,
    stages: Sequence[Stage] = STAGES,
    force: bool = False,
    force_from: str | None = None,
    patient_id: str | None = None,
    timepoint: str | None = None,
) -> SlideResult:
    """Segment nuclei, grow them into cells, measure and phenotype one slide, recomputing only what is stale.

    Parameters
    ----------
    slide_path : str or Path
        Any format :func:`tme_pipeline.io.slides.open_slide` reads.
    out_dir : str or Path
        The slide's output folder (``OUT/slides/<slide_id>``); it appears only once
        complete, and is replaced whole when a re-run changes it.
    config : Config
    slide_id : str, optional
        Defaults to the folder name of ``out_dir``.
    pixel_um : float, optional
        Level-0 pixel size (µm) when the file's metadata lacks it.
    stages : sequence of Stage
        Defaults to :data:`tme_pipeline.stages.STAGES`.
    force : bool
        Recompute every stage.
    force_from : str, optional
        Recompute this stage and every stage after it.
    patient_id, timepoint : str, optional
        The manifest's, for the slide's report header; no stage's output depends on them.

    Returns
    -------
    SlideResult
        Errors are raised, not returned: the batch runner records them.
    """
    out_dir = Path(out_dir)
    slide_id = slide_id or out_dir.name
    start = time.perf_counter()
    inputs = slide_inputs(slide_path, config=config, slide_id=slide_id, pixel_um=pixel_um)
    inputs = replace(inputs, patient_id=patient_id, timepoint=timepoint)
    corrections = ()
    if out_dir.parent.name == SLIDES_DIR:  # OUT/slides/<id>: the review corrections live in OUT/corrections/<id>
        from .corrections import load_corrections

        corrections = load_corrections(corrections_file(out_dir.parent.parent, slide_id), slide_id=slide_id)
        inputs = replace(inputs, corrections=corrections)
    first = stages[0].name if force and stages else force_from
    ran, reused, records = run_stages(inputs, out_dir, stages=stages, force_from=first)
    n_nuclei = records.get("segment", {}).get("info", {}).get("n_nuclei")
    info = slide_info(inputs, n_nuclei)
    # A reused stage's summary (the gates and flags of phenotyping) is carried forward.
    for record in records.values():
        info.update({k: v for k, v in record.get("info", {}).items() if k not in ("n_nuclei", "n_cells")})
    if corrections:
        from .corrections import corrections_summary

        info["corrections"] = corrections_summary(corrections)
    seconds = round(time.perf_counter() - start, 3)
    if ran:
        log.info("%s: ran %s, reused %s in %.1f s", slide_id, ", ".join(ran), ", ".join(reused) or "nothing", seconds)
    return SlideResult(
        slide_id=slide_id,
        status="done" if ran else "skipped",
        out_dir=out_dir,
        n_nuclei=n_nuclei,
        seconds=seconds,
        timings={name: records[name]["seconds"] for name in ran},
        info=info,
        ran=tuple(ran),
        reused=tuple(reused),
    )
