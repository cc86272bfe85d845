"""The stages of a slide run: what each reads, computes and writes.

A stage is a function ``(SlideInputs, folder) -> StageOutput`` that reads the files its
upstream stages wrote in ``folder`` (through :class:`tme_pipeline.results.SlideResults`)
and writes its own files there. It declares the config sections it reads, the files it
writes and its upstream stages, so that the runner (:func:`tme_pipeline.pipeline.run_slide`)
can tell from ``stages.json`` which stages a changed config makes stale, and start a re-run
from the files of the stages before them:

=========  =======================  ===================================  ==========
stage      reads (config)           writes                               upstream
=========  =======================  ===================================  ==========
segment    segmentation,            labels.ome.zarr (nuclei, overview)   -
           + the slide, its
           nuclear channel and the
           model's files
cells      cells.expand_um          labels.ome.zarr/labels/cells         segment
measure    cells, panel             measured.h5ad                        cells
phenotype  gating, phenotypes,      phenotyped.h5ad                      measure
           compensation
tls        tls                      tls.geojson, tls.json, tls.npz       phenotype
regions    regions, + a low-res     regions.geojson, regions.json,       phenotype,
           level of the slide       regions.npz                          tls
annotate   -                        cells.h5ad (+ tls_id, region)        tls, regions
qc         regions.grid_um          gates.png, cd3_cd8.png,              annotate
                                    overview.png, tls/
metrics    metrics                  metrics.json                         annotate
report     report                   report.html                          metrics, qc
=========  =======================  ===================================  ==========
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np

from .config import Config
from .io.slides import Slide
from .panel import PanelMatch
from .progress import progress
from .results import (
    CD3_CD8_PNG, CELLS, GATES_PNG, LABELS, MEASURED, ORIGINAL_DIR, OVERVIEW_PNG, PHENOTYPED, REGIONS_GEOJSON, REGIONS_JSON,
    METRICS_JSON, REGIONS_NPZ, REPORT_HTML, TLS_CLOSEUPS, TLS_GEOJSON, TLS_JSON, TLS_NPZ, SlideResults,
)
from .tiling import TileGrid

__all__ = [
    "Stage", "StageOutput", "SlideInputs", "STAGES", "check_stages", "lowres_channel", "lowres_image", "segmentation_function",
    "segment_stage", "cells_stage", "measure_stage", "phenotype_stage", "tls_stage", "regions_stage",
    "annotate_stage", "qc_stage", "metrics_stage", "report_stage", "CELL_REGIONS",
]

# The largest level used to estimate slide-wide statistics (threshold, normalisation
# percentiles): big enough to see nuclei, small enough to hold.
_LOWRES_MAX_PX = 4096


@dataclass(frozen=True)
class SlideInputs:
    """What every stage of one slide is given.

    Attributes
    ----------
    slide : Slide
        Opened lazily; stages read only the pixels they need.
    slide_id : str
    config : Config
    nuclear_channel : int
        Index of the channel nuclei are segmented on.
    grid : TileGrid
        The tile grid of every tiled stage (level-0 px).
    panel : PanelMatch or None
        Markers -> channel indices; ``None`` for a nuclei-only run (``tme segment``).
    corrections : tuple of tme_pipeline.corrections.Correction
        The slide's review corrections, in order; ``phenotype``, ``tls`` and ``regions``
        apply theirs and keep the uncorrected files under ``original/``.
    """

    slide: Slide
    slide_id: str
    config: Config
    nuclear_channel: int
    grid: TileGrid
    panel: PanelMatch | None = None
    corrections: tuple = ()
    patient_id: str | None = None
    timepoint: str | None = None


@dataclass(frozen=True)
class StageOutput:
    """What a stage reports besides its files (kept in ``stages.json`` and ``run.json``).

    info : JSON-serialisable summary (e.g. ``n_nuclei``; the gates and flags of phenotyping).
    warnings : messages naming the slide, for a person to read.
    """

    info: Mapping[str, object] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One named step of a slide run.

    Attributes
    ----------
    name : str
    run : callable
        ``(SlideInputs, folder: Path) -> StageOutput``; reads its upstream stages' files
        in ``folder`` and writes ``writes`` there.
    reads : tuple of str
        Config sections it depends on, dotted (``"cells.expand_um"``).
    writes : tuple of str
        Paths relative to the slide folder; a path may lie inside another stage's folder
        (``labels.ome.zarr/labels/cells``), and then belongs to this stage alone.
    upstream : tuple of str
        Stages whose files it reads; they come earlier in the stage list.
    inputs : callable, optional
        ``SlideInputs -> dict``: what else its result depends on (the slide file, the
        model's files), as JSON for the record.
    """

    name: str
    run: Callable[[SlideInputs, Path], StageOutput]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    inputs: Callable[[SlideInputs], dict] | None = None


def check_stages(stages: Sequence[Stage]) -> None:
    """``ValueError`` unless names are unique and every upstream stage comes earlier."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is listed twice")
        missing = [u for u in stage.upstream if u not in seen]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing}, which do not come before it")
        seen.add(stage.name)


def lowres_channel(slide: Slide, channel: int, *, max_px: int = _LOWRES_MAX_PX) -> tuple[np.ndarray, float]:
    """One channel at the finest pyramid level no larger than ``max_px`` on a side.

    A slide without such a level is block-averaged from its smallest level, chunk by chunk.

    Returns
    -------
    image : ndarray, shape (Y', X'), float32
    pixel_um : float
        Its pixel size (µm).
    """
    for index, level in enumerate(slide.levels):
        if max(level.shape[1:]) <= max_px:
            return np.asarray(level[channel].astype(np.float32).compute()), slide.level_pixel_um(index)
    last = len(slide.levels) - 1
    base = slide.levels[last][channel].astype(np.float32)
    factor = int(np.ceil(max(base.shape) / max_px))
    image = da.coarsen(np.mean, base, {0: factor, 1: factor}, trim_excess=True).compute()
    return np.asarray(image), slide.level_pixel_um(last) * factor


def lowres_image(slide: Slide, *, target_um: float = 4.0) -> tuple[np.ndarray, float]:
    """Every channel at a coarse pixel of about ``target_um``, from the pyramid, never level 0 whole.

    Takes the coarsest level whose pixel is at most ``target_um`` and block-averages it by
    the integer factor that brings its pixel closest to ``target_um`` from below, chunk by
    chunk (a level with a coarser pixel than ``target_um`` is taken as it is when it is the
    finest one).

    Parameters
    ----------
    slide : Slide
    target_um : float
        Wanted pixel size (µm).

    Returns
    -------
    image : ndarray, shape (C, Y', X'), float32
        Means of the level-0 counts; pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` times
        ``pixel_um`` µm from the slide's top left corner (trailing partial blocks dropped).
    pixel_um : float
    """
    index = slide.coarsest_level_within(target_um)
    level_um = slide.level_pixel_um(index)
    factor = max(1, int(np.floor(target_um / level_um + 1e-6)))
    level = slide.levels[index].astype(np.float32)
    if factor > 1:
        level = da.coarsen(np.mean, level, {1: factor, 2: factor}, trim_excess=True)
    return np.asarray(level.compute(), np.float32), level_um * factor


def segmentation_function(config: Config, *, pixel_um: float, nuclear_lowres: np.ndarray):
    """The per-tile nucleus segmenter the config asks for, with slide-wide parameters bound.

    Parameters
    ----------
    config : Config
    pixel_um : float
        Level-0 pixel size (µm).
    nuclear_lowres : ndarray, shape (Y', X')
        The nuclear channel at low resolution, for slide-wide statistics: one
        threshold per slide, so that tiles agree at their seams.

    Returns
    -------
    callable
        Picklable; maps a padded tile (Y, X) to int32 labels.
    """
    seg = config.segmentation
    if seg.method == "stardist":
        from .segment.predict import make_tile_segmenter, slide_norm
        from .segment.registry import model_folder
        from .segment.weights import cached_model

        settings = seg.stardist
        model = cached_model(model_folder(settings.model))
        return make_tile_segmenter(
            model,
            pixel_um=pixel_um,
            norm=slide_norm(nuclear_lowres, percentiles=model.config.norm_percentiles),
            device=None if settings.device == "auto" else settings.device,
            prob_thresh=settings.prob_thresh,
            nms_thresh=settings.nms_thresh,
            precision=None if settings.precision == "auto" else settings.precision,
            batch_size=settings.batch_size,
            n_threads=config.run.torch_threads,
            concurrent_passes=settings.concurrent_passes,
        )
    if seg.method == "classic":
        from .segment.classic import classic_threshold, segment_nuclei_classic

        threshold = classic_threshold(nuclear_lowres)
        params = seg.classic
        return functools.partial(
            segment_nuclei_classic,
            pixel_um=pixel_um,
            threshold=threshold,
            sigma_um=params.sigma_um,
            min_distance_um=params.min_distance_um,
            min_area_um2=params.min_area_um2,
            max_area_um2=params.max_area_um2,
        )
    raise ValueError(f"unknown segmentation method {seg.method!r}")


# What decides the nuclei: how a run executes (device, batch size, concurrent passes) does
# not, since fp32 gives the same nuclei on every device and tiling; so a new execution
# setting, or moving a run to a GPU server, never re-segments finished slides.
_SEGMENT_READS = (
    "segmentation.method", "segmentation.channel", "segmentation.tile_um", "segmentation.overlap_um",
    "segmentation.classic", "segmentation.stardist.model", "segmentation.stardist.prob_thresh",
    "segmentation.stardist.nms_thresh", "segmentation.stardist.precision",
)


def _segment_inputs(inputs: SlideInputs) -> dict:
    """The slide file and, for StarDist, a digest of the model folder (weights and thresholds)."""
    path = Path(inputs.slide.path)
    stat = path.stat()
    record = {"slide": {"name": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
              "nuclear_channel": inputs.nuclear_channel, "pixel_um": float(inputs.slide.pixel_um)}
    seg = inputs.config.segmentation
    if seg.method == "stardist":
        from .segment.registry import model_folder

        record["model_sha256"] = _folder_digest(model_folder(seg.stardist.model))
    return record


def _folder_digest(folder: Path) -> str:
    """SHA-256 over every file of a model folder, names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def segment_stage(inputs: SlideInputs, folder: Path, *, viewable: bool = True) -> StageOutput:
    """Segment the nuclei tile by tile into ``labels.ome.zarr/labels/nuclei``.

    Creates the label store (``nuclei`` and an empty ``cells``), the nuclei's
    pyramid and the low-resolution overview of the nuclear channel.

    Parameters
    ----------
    inputs : SlideInputs
    folder : Path
        The slide folder being built.
    viewable : bool
        Write the pyramid and the overview, what viewers show; `tme segment`, which
        exports level 0 alone from a scratch folder, leaves them out (False).

    Returns
    -------
    StageOutput
        ``info['n_nuclei']``.
    """
    from .io.labels import create_labels_zarr, write_label_pyramid, write_overview_image
    from .tiling import segment_tiled, window_source

    slide, grid, channel = inputs.slide, inputs.grid, inputs.nuclear_channel
    lowres, lowres_um = lowres_channel(slide, channel)
    segment_tile = segmentation_function(inputs.config, pixel_um=slide.pixel_um, nuclear_lowres=lowres)
    root = create_labels_zarr(folder / LABELS, shape_yx=slide.shape_yx, pixel_um=slide.pixel_um, chunk_px=grid.tile_px)
    with progress(f"{inputs.slide_id} segment", mode=inputs.config.run.progress,
                  every_s=inputs.config.run.progress_every_s):
        # straight from the file: one read per window, not one per 1024² dask chunk it touches
        stitched = segment_tiled(window_source(slide.levels[0], channel), segment_tile, grid=grid,
                                 store=root["labels/nuclei"])
    if viewable:
        write_label_pyramid(root, "nuclei", pixel_um=slide.pixel_um)
        write_overview_image(root, lowres, pixel_um=lowres_um, channel_names=(slide.channel_names[channel],))
    return StageOutput(info={"n_nuclei": int(stitched.n_objects)})


def cells_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """Grow every nucleus into its cell (``cells.expand_um``) into ``labels/cells``.

    Reads ``labels/nuclei`` level 0; writes ``labels/cells`` and its pyramid.
    """
    import zarr

    from .cells import expand_nuclei_tiled
    from .io.labels import create_labels_zarr, write_label_pyramid

    slide, grid = inputs.slide, inputs.grid
    store = folder / LABELS
    target = store / "labels" / "cells"
    if not target.is_dir():
        # A re-run that reuses the nuclei carries the store without the cells' group: make a
        # fresh one exactly as the store's creator does, then move it in.
        scratch = folder / ".cells.scratch.zarr"
        create_labels_zarr(scratch, shape_yx=slide.shape_yx, pixel_um=slide.pixel_um, chunk_px=grid.tile_px,
                           names=("cells",))
        os.replace(scratch / "labels" / "cells", target)
        shutil.rmtree(scratch)
    root = zarr.open_group(str(store), mode="r+")
    nuclei = SlideResults(inputs.slide_id, folder).labels("nuclei")
    with progress(f"{inputs.slide_id} cells", mode=inputs.config.run.progress,
                  every_s=inputs.config.run.progress_every_s):
        expand_nuclei_tiled(nuclei, grid=grid, pixel_um=slide.pixel_um, expand_um=inputs.config.cells.expand_um,
                            store=root["labels/cells"], component="0")
    write_label_pyramid(root, "cells", pixel_um=slide.pixel_um)
    return StageOutput()


def _panel(inputs: SlideInputs, stage: str) -> PanelMatch:
    if inputs.panel is None:
        raise ValueError(f"slide {inputs.slide_id!r}: stage {stage!r} needs the panel's markers; none were matched")
    return inputs.panel


def measure_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """Measure every cell (areas µm², shape, intensities per compartment) into ``measured.h5ad``.

    Reads the nuclei and cells labels and the slide's pixels; with
    ``cells.neighbour_correction``, the ``cells.neighbour_markers`` are corrected for
    touching neighbours' signal. The table has no compensation and no gates, so that a
    change of gating starts from it.
    """
    from .quantify import measure_cells

    slide, config, panel = inputs.slide, inputs.config, _panel(inputs, "measure")
    results = SlideResults(inputs.slide_id, folder)
    with progress(f"{inputs.slide_id} measure", mode=inputs.config.run.progress,
                  every_s=inputs.config.run.progress_every_s):
        cells = measure_cells(
            results.labels("nuclei"), results.labels("cells"), slide.levels[0], grid=inputs.grid,
            pixel_um=slide.pixel_um, markers=panel.channels,
            compartments={m: config.panel[m].compartment for m in panel.channels},
            nuclear_channel=inputs.nuclear_channel, expand_um=config.cells.expand_um,
            membrane_um=config.cells.membrane_um, perinuclear_um=config.cells.perinuclear_um,
            channel_names=slide.channel_names,
            neighbour_markers=config.cells.neighbour_markers if config.cells.neighbour_correction else (),
            neighbour_boundary_um=config.cells.neighbour_boundary_um,
        )
    cells.write_h5ad(folder / MEASURED)
    return StageOutput(info={"n_cells": int(cells.n_obs)})


def slide_info(inputs: SlideInputs, n_nuclei: int | None) -> dict[str, object]:
    """The slide's description for ``cells.uns['slide']`` and ``run.json``."""
    slide, panel = inputs.slide, inputs.panel
    return {
        "slide_id": inputs.slide_id,
        "path": str(slide.path),
        "format": slide.format,
        "pixel_um": float(slide.pixel_um),
        "shape_yx": [int(v) for v in slide.shape_yx],
        "size_mm": [round(float(v), 4) for v in slide.size_mm],
        "channels": list(slide.channel_names),
        "markers": {m: slide.channel_names[c] for m, c in panel.channels.items()} if panel else {},
        "missing_optional_markers": list(panel.missing_optional) if panel else [],
        "n_nuclei": n_nuclei,
    }


def phenotype_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """Gate every marker and call phenotypes on ``measured.h5ad``; write ``phenotyped.h5ad``.

    Returns
    -------
    StageOutput
        ``info['phenotyping']``: gates, flags, counts (:meth:`PhenotypeResult.to_json`);
        the flags are also the warnings.
    """
    from .corrections import apply_gates, apply_reassignments, for_stage
    from .phenotype import phenotype_cells

    config, panel = inputs.config, _panel(inputs, "phenotype")
    measured = SlideResults(inputs.slide_id, folder).measured()
    fixes = for_stage(inputs.corrections, "phenotype")

    def typed_cells(gating):
        cells = measured.copy() if fixes else measured
        typed = phenotype_cells(
            cells, gating=gating, phenotypes=config.phenotypes, compensation=config.compensation,
            slide_id=inputs.slide_id, skip_markers=panel.missing_optional,
            segmentation_markers=(config.segmentation.channel,),
        )
        cells.uns["slide"] = slide_info(inputs, int(cells.n_obs))
        return cells, typed

    cells, typed = typed_cells(config.gating)
    info, warnings = {}, []
    if fixes:
        (folder / ORIGINAL_DIR).mkdir(exist_ok=True)
        cells.write_h5ad(folder / ORIGINAL_DIR / PHENOTYPED)
        cells, typed = typed_cells(apply_gates(config.gating, fixes, slide_id=inputs.slide_id))
        info["reassigned"], warnings = apply_reassignments(cells, fixes)
        cells.uns["corrections"] = [c.id for c in fixes]
    cells.write_h5ad(folder / PHENOTYPED)
    return StageOutput(info={"phenotyping": {**typed.to_json(), **info}}, warnings=(*typed.flags, *warnings))


def tls_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """Find and stage the tertiary lymphoid structures on the phenotyped cells.

    Writes ``tls.geojson`` (QuPath), ``tls.json`` (the table, rejected candidates, parameters)
    and ``tls.npz`` (``cell_id``, ``tls_id`` per cell, 0 = none).

    Returns
    -------
    StageOutput
        ``info['tls']``: count and count per maturity; a slide without TLS says why in a warning.
    """
    from .geojson import write_geojson
    from .io.results import write_json
    from .tls import find_tls, tls_geojson

    from .corrections import apply_tls_corrections, for_stage

    cells = SlideResults(inputs.slide_id, folder).phenotyped()
    result = find_tls(cells, inputs.config.tls)
    fixes, fixed = for_stage(inputs.corrections, "tls"), []

    def write(target: Path) -> dict:
        target.mkdir(exist_ok=True)
        write_geojson(target / TLS_GEOJSON, tls_geojson(result, pixel_um=inputs.slide.pixel_um,
                                                        slide_id=inputs.slide_id))
        write_json(target / TLS_JSON, result.to_json())
        np.savez_compressed(target / TLS_NPZ, cell_id=cells.obs["cell_id"].to_numpy(np.int64),
                            tls_id=np.asarray(result.cell_tls_id, np.int32))
        return result.to_json()

    if fixes:
        write(folder / ORIGINAL_DIR)
        result, fixed = apply_tls_corrections(result, fixes, cells, config=inputs.config.tls)
    summary = write(folder)
    counts = result.table["maturity"].astype(str).value_counts().to_dict() if len(result.table) else {}
    info = {"count": int(len(result.table)),
            **{f"{m}_count": int(counts.get(m, 0)) for m in dict.fromkeys([*TLS_MATURITIES, *counts])}}
    warnings = tuple(fixed)
    if fixes:
        info["corrections"] = summary["corrections"]
    if not len(result.table):
        reason = summary.get("reason") or f"{len(result.rejected)} candidate(s) rejected"
        info["reason"] = reason
        warnings += (f"slide {inputs.slide_id!r}: no TLS ({reason})",)
    return StageOutput(info={"tls": info}, warnings=warnings)


def regions_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """Tissue, tumour bed (viable, necrosis, fibrosis), margin, core and stroma from the cells and a low-res level.

    Writes ``regions.geojson`` (QuPath), ``regions.json`` (areas mm², % necrosis, absent
    regions with reasons) and ``regions.npz`` (the grids; per ``cell_id`` its region,
    ``in_tumor`` and signed ``border_distance_um``).

    Returns
    -------
    StageOutput
        ``info['regions']``: areas (mm²), percents and absent regions; each absent region is
        a warning.
    """
    from .corrections import apply_bed_edit, for_stage
    from .geojson import write_geojson
    from .io.results import write_json
    from .regions import find_regions, regions_geojson

    slide, config = inputs.slide, inputs.config
    results = SlideResults(inputs.slide_id, folder)
    cells = results.phenotyped()
    tls_features, _ = results.tls()
    image, image_um = lowres_image(slide, target_um=config.regions.grid_um)
    height_mm, width_mm = slide.size_mm
    regions = find_regions(
        cells.obs, image, image_um, channel_names=slide.channel_names,
        nuclear_channel=slide.channel_names[inputs.nuclear_channel], size_um=(width_mm * 1000.0, height_mm * 1000.0),
        tls_polygons_um=[geom for geom, _ in tls_features], config=config.regions,
    )

    def write(target: Path) -> None:
        target.mkdir(exist_ok=True)
        write_geojson(target / REGIONS_GEOJSON, regions_geojson(regions, pixel_um=slide.pixel_um,
                                                                slide_id=inputs.slide_id))
        write_json(target / REGIONS_JSON, regions.to_json())
        names = sorted(regions.masks)
        np.savez_compressed(
            target / REGIONS_NPZ, grid_um=np.float64(regions.grid_um), mask_names=np.array(names),
            **{f"mask_{n}": np.asarray(regions.masks[n], bool) for n in names},
            cell_id=cells.obs["cell_id"].to_numpy(np.int64), region=np.asarray(regions.cell_region, dtype="U16"),
            in_tumor=np.asarray(regions.in_tumor, bool),
            border_distance_um=np.asarray(regions.border_distance_um, np.float32),
        )

    fixes = for_stage(inputs.corrections, "regions")
    if fixes:
        write(folder / ORIGINAL_DIR)
        regions = apply_bed_edit(regions, fixes, cells.obs, tls_polygons_um=[geom for geom, _ in tls_features],
                                 config=config.regions)
    write(folder)
    info = {"areas_mm2": {k: round(float(v), 6) for k, v in regions.areas_mm2.items()},
            "percent_necrosis": regions.percent_necrosis, "percent_viable_tumor": regions.percent_viable_tumor,
            "absent": dict(regions.absent)}
    warnings = tuple(f"slide {inputs.slide_id!r}: region {name} absent: {why}" for name, why in regions.absent.items())
    return StageOutput(info={"regions": info}, warnings=warnings)


#: TLS maturities, least to most mature; every one is counted in ``run.json``, even at 0.
TLS_MATURITIES = ("aggregate", "primary", "secondary", "unstaged")

#: The per-cell region labels of ``cells.h5ad``, in this order.
CELL_REGIONS = ("tumor_core", "margin", "stroma")


def annotate_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """Join phenotypes, TLS and regions per cell into ``cells.h5ad``, the table users open.

    Adds ``obs['tls_id']`` (0 = none), ``obs['region']`` (categorical :data:`CELL_REGIONS`),
    ``obs['in_tumor']`` and ``obs['border_distance_um']`` (signed, negative inside the bed;
    NaN without a bed) to ``phenotyped.h5ad``; ``uns['regions']`` holds the areas (mm²) and
    percents, ``uns['tls']`` the TLS counts.
    """
    import pandas as pd

    results = SlideResults(inputs.slide_id, folder)
    cells = results.phenotyped()
    ids = cells.obs["cell_id"].to_numpy(np.int64)
    with np.load(folder / TLS_NPZ, allow_pickle=False) as tls, np.load(folder / REGIONS_NPZ, allow_pickle=False) as reg:
        for name, z in ((TLS_NPZ, tls), (REGIONS_NPZ, reg)):
            if not np.array_equal(z["cell_id"], ids):
                raise ValueError(f"{folder / name}: its cells are not those of {PHENOTYPED} (slide {inputs.slide_id!r})")
        cells.obs["tls_id"] = tls["tls_id"].astype(np.int32)
        cells.obs["region"] = pd.Categorical(reg["region"].astype(str), categories=CELL_REGIONS)
        cells.obs["in_tumor"] = reg["in_tumor"].astype(bool)
        cells.obs["border_distance_um"] = reg["border_distance_um"].astype(np.float32)
    regions, (_, tls_summary) = results.regions(), results.tls()
    cells.uns["regions"] = _h5ad_safe({k: regions.get(k) for k in ("areas_mm2", "percent_necrosis",
                                                                   "percent_viable_tumor", "absent")})
    cells.uns["tls"] = _h5ad_safe({k: v for k, v in tls_summary.items() if not isinstance(v, list)})
    cells.write_h5ad(folder / CELLS)
    return StageOutput(info={"n_cells_in_tls": int((cells.obs["tls_id"] > 0).sum())})


def _h5ad_safe(value):
    """A JSON summary as AnnData's ``uns`` stores it: None -> NaN, lists of dicts dropped."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items()
                if not (isinstance(v, list) and v and isinstance(v[0], dict))}
    if value is None:
        return float("nan")
    return value


def qc_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """The pictures a pathologist checks first.

    ``gates.png`` and, with CD3 and CD8, ``cd3_cd8.png`` (the gating); ``overview.png`` (the
    slide in false colour with the regions and TLS outlined, TLS labelled by maturity) and
    one close-up per TLS in ``tls/``.
    """
    from .qc_plots import plot_cd3_cd8, plot_gates
    from .slide_plots import DEFAULT_COLOURS, plot_overview, plot_tls_closeups

    slide = inputs.slide
    results = SlideResults(inputs.slide_id, folder)
    cells = results.cells()
    plot_gates(cells, folder / GATES_PNG)
    if {"CD3_pos", "CD8_pos"} <= set(cells.obs.columns):
        plot_cd3_cd8(cells, folder / CD3_CD8_PNG)
    colours = _slide_colours(inputs, DEFAULT_COLOURS)
    names = list(slide.channel_names)
    image, image_um = lowres_image(slide, target_um=inputs.config.regions.grid_um)
    masks, grid_um = results.region_grids()
    features, _ = results.tls()
    tls = [(int(p["tls_id"]), p["classification"]["name"], geom) for geom, p in features]
    plot_overview(image, image_um, names, folder / OVERVIEW_PNG, colours=colours, region_masks=masks,
                  grid_um=grid_um, tls=tls, title=inputs.slide_id)
    closeups = folder / TLS_CLOSEUPS
    closeups.mkdir(exist_ok=True)
    shown = ("n_B", "n_T", "fdc_fraction", "gc_score")  # what tells the maturity; the rest is in tls.json
    plot_tls_closeups(slide, [(t, m, g, {k: v for k, v in p.get("measurements", {}).items() if k in shown})
                              for (t, m, g), (_, p) in zip(tls, features)],
                      closeups, colours=colours, channel_names=names)
    return StageOutput()


def metrics_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """Per-slide metrics with units into ``metrics.json`` (:func:`tme_pipeline.metrics.slide_metrics`).

    Reads ``cells.h5ad`` (its ``obs``), ``regions.json``, ``regions.npz`` and ``tls.json``.
    A slide without a bed, TLS or PD-L1 gate gets nulls with reasons, never an error.

    Returns
    -------
    StageOutput
        ``info['metrics']``: ``immune_class``, ``n_metrics``, ``n_absent`` (metrics that are
        null); config names that match no phenotype of the slide are warnings.
    """
    from .io.results import write_json
    from .metrics import metrics_json, slide_metrics

    results = SlideResults(inputs.slide_id, folder)
    cells = results.cells(backed=True)  # obs only: the intensities stay on disk
    try:
        result = slide_metrics(cells, results.regions(), results.region_grids(), results.tls()[1],
                               inputs.config.metrics)
    finally:
        cells.file.close()
    write_json(folder / METRICS_JSON, metrics_json(result, slide_id=inputs.slide_id))
    info = {"immune_class": result.immune_class, "n_metrics": len(result.metrics), "n_absent": len(result.absent)}
    return StageOutput(info={"metrics": info},
                       warnings=tuple(f"slide {inputs.slide_id!r}: {w}" for w in result.warnings))


def report_stage(inputs: SlideInputs, folder: Path) -> StageOutput:
    """The slide's self-contained ``report.html`` (:func:`tme_pipeline.report.write_slide_report`).

    Reads ``metrics.json``, the obs of ``cells.h5ad``, the regions and TLS files and the
    ``qc`` pictures; reads no pixels (the phenotype map is drawn from the cell centroids).

    Returns
    -------
    StageOutput
        ``info['report']``: the page's size (kB).
    """
    from .report import write_slide_report

    path = write_slide_report(folder, slide_id=inputs.slide_id, config=inputs.config.report,
                              patient_id=inputs.patient_id, timepoint=inputs.timepoint)
    return StageOutput(info={"report": {"kb": round(path.stat().st_size / 1024)}})


def _slide_colours(inputs: SlideInputs, defaults) -> dict:
    """The overview's marker colours keyed by the slide's channel names, for the markers it has."""
    channels = inputs.panel.channels if inputs.panel else {}
    return {inputs.slide.channel_names[channels[m]]: colour for m, colour in defaults.items() if m in channels}


def _with_originals(*names: str) -> tuple[str, ...]:
    """A correctable stage's files and, under ``original/``, their uncorrected versions (written when corrected)."""
    return (*names, *(f"{ORIGINAL_DIR}/{n}" for n in names))


def _corrections_of(stage: str) -> Callable[[SlideInputs], dict]:
    """The record ``inputs`` of a stage's review corrections (empty without any: keys unchanged)."""
    def inputs(slide_inputs: SlideInputs) -> dict:
        from .corrections import correction_inputs

        return correction_inputs(slide_inputs.corrections, stage)
    return inputs


#: The stages of ``tme run``, in order.
STAGES: tuple[Stage, ...] = (
    Stage("segment", segment_stage, reads=_SEGMENT_READS, writes=(LABELS,), inputs=_segment_inputs),
    Stage("cells", cells_stage, reads=("cells.expand_um",), writes=(f"{LABELS}/labels/cells",), upstream=("segment",)),
    Stage("measure", measure_stage, reads=("cells", "panel", "channel_map", "channel_names"), writes=(MEASURED,),
          upstream=("cells",), inputs=lambda inputs: {"markers": dict(_panel(inputs, "measure").channels)}),
    Stage("phenotype", phenotype_stage, reads=("gating", "phenotypes", "compensation"),
          writes=_with_originals(PHENOTYPED), upstream=("measure",), inputs=_corrections_of("phenotype")),
    Stage("tls", tls_stage, reads=("tls",), writes=_with_originals(TLS_GEOJSON, TLS_JSON, TLS_NPZ),
          upstream=("phenotype",), inputs=_corrections_of("tls")),
    Stage("regions", regions_stage, reads=("regions",),
          writes=_with_originals(REGIONS_GEOJSON, REGIONS_JSON, REGIONS_NPZ), upstream=("phenotype", "tls"),
          inputs=_corrections_of("regions")),
    Stage("annotate", annotate_stage, reads=(), writes=(CELLS,), upstream=("tls", "regions")),
    Stage("qc", qc_stage, reads=("regions.grid_um",), writes=(GATES_PNG, CD3_CD8_PNG, OVERVIEW_PNG, TLS_CLOSEUPS),
          upstream=("annotate",)),
    Stage("metrics", metrics_stage, reads=("metrics",), writes=(METRICS_JSON,), upstream=("annotate",)),
    Stage("report", report_stage, reads=("report",), writes=(REPORT_HTML,), upstream=("metrics", "qc")),
)
