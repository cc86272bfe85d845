"""One slide through every stage: open, segment tile by tile, stitch, grow cells, measure, write."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np

from .cells import expand_nuclei_tiled
from .config import Config
from .io.labels import create_labels_zarr, write_label_pyramid, write_overview_image
from .io.results import is_complete, partial_dir
from .io.slides import Slide, open_slide
from .panel import PanelMatch, match_panel
from .phenotype import phenotype_cells
from .progress import progress
from .quantify import measure_cells
from .segment.classic import classic_threshold, segment_nuclei_classic
from .tiling import segment_tiled, tile_grid

__all__ = ["SlideResult", "run_slide", "segmentation_function", "lowres_channel"]

log = logging.getLogger(__name__)

# The largest level used to estimate slide-wide statistics (threshold, later
# normalisation percentiles): big enough to see nuclei, small enough to hold.
_LOWRES_MAX_PX = 4096


@dataclass(frozen=True)
class SlideResult:
    """What happened to one slide, as recorded in ``run.json``."""

    slide_id: str
    status: str  # "done", "skipped" (complete from an earlier run) or "error"
    out_dir: Path
    n_nuclei: int | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    error: str | None = None


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
        from .segment.weights import load_model

        settings = seg.stardist
        model = load_model(model_folder(settings.model))
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
        )
    if seg.method == "classic":
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


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    config: Config,
    slide_id: str | None = None,
    pixel_um: float | None = None,
    overwrite: bool = False,
) -> SlideResult:
    """Segment nuclei, grow them into cells and measure one slide, writing its folder atomically.

    Parameters
    ----------
    slide_path : str or Path
        Any format :func:`tme_pipeline.io.slides.open_slide` reads.
    out_dir : str or Path
        The slide's output folder (``OUT/slides/<slide_id>``); it appears only once
        complete, with ``labels.ome.zarr`` and ``cells.h5ad``.
    config : Config
    slide_id : str, optional
        Defaults to the folder name of ``out_dir``.
    pixel_um : float, optional
        Level-0 pixel size (µm) when the file's metadata lacks it.
    overwrite : bool
        Redo a slide whose folder is already complete.

    Returns
    -------
    SlideResult
        Errors are raised, not returned: the batch runner records them.
    """
    out_dir = Path(out_dir)
    slide_id = slide_id or out_dir.name
    if is_complete(out_dir) and not overwrite:
        return _skipped(slide_id, out_dir)

    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 3)
        return now

    slide = open_slide(slide_path, pixel_um=pixel_um)
    if slide.format == "tiff" and config.channel_names is not None:
        # plain TIFFs carry no channel names: the config's, in page order, apply
        slide = open_slide(slide_path, pixel_um=pixel_um, channel_names=config.channel_names)
    panel = match_panel(
        slide.channel_names, config.panel, channel_map=config.channel_map, source=f"{slide.path} (slide {slide_id})"
    )
    seg = config.segmentation
    nuclear_channel = panel.channels[seg.channel]
    nuclear_lowres, lowres_um = lowres_channel(slide, nuclear_channel)
    segment_tile = segmentation_function(config, pixel_um=slide.pixel_um, nuclear_lowres=nuclear_lowres)
    t = lap("open_and_threshold", start)

    grid = tile_grid(slide.shape_yx, pixel_um=slide.pixel_um, tile_um=seg.tile_um, overlap_um=seg.overlap_um)
    with partial_dir(out_dir) as tmp:
        labels_root = create_labels_zarr(
            tmp / "labels.ome.zarr", shape_yx=slide.shape_yx, pixel_um=slide.pixel_um, chunk_px=grid.tile_px
        )
        with progress(f"{slide_id}: segmenting {grid.n_tiles} tiles"):
            stitched = segment_tiled(
                slide.levels[0][nuclear_channel], segment_tile, grid=grid, store=labels_root["labels/nuclei"], component="0"
            )
        t = lap("segment", t)
        with progress(f"{slide_id}: growing cells in {grid.n_tiles} tiles"):
            cell_labels = expand_nuclei_tiled(
                stitched.labels, grid=grid, pixel_um=slide.pixel_um, expand_um=config.cells.expand_um,
                store=labels_root["labels/cells"], component="0",
            )
        t = lap("expand", t)
        write_label_pyramid(labels_root, "nuclei", pixel_um=slide.pixel_um)
        write_label_pyramid(labels_root, "cells", pixel_um=slide.pixel_um)
        write_overview_image(
            labels_root, nuclear_lowres, pixel_um=lowres_um, channel_names=(slide.channel_names[nuclear_channel],)
        )
        t = lap("label_pyramid", t)

        with progress(f"{slide_id}: measuring cells in {grid.n_tiles} tiles"):
            cells = measure_cells(
                stitched.labels, cell_labels, slide.levels[0], grid=grid, pixel_um=slide.pixel_um,
                markers=panel.channels, compartments={m: config.panel[m].compartment for m in panel.channels},
                nuclear_channel=nuclear_channel, expand_um=config.cells.expand_um,
                membrane_um=config.cells.membrane_um, perinuclear_um=config.cells.perinuclear_um,
                channel_names=slide.channel_names,
            )
        t = lap("measure", t)

        typed = phenotype_cells(
            cells, gating=config.gating, phenotypes=config.phenotypes, compensation=config.compensation,
            slide_id=slide_id, skip_markers=panel.missing_optional, segmentation_markers=(seg.channel,),
        )
        _qc_plots(cells, tmp)
        info = _slide_info(slide, panel, slide_id, int(cells.n_obs))
        info["phenotyping"] = typed.to_json()
        cells.uns["slide"] = {k: v for k, v in info.items() if k != "phenotyping"}
        cells.write_h5ad(tmp / "cells.h5ad")
        lap("phenotype", t)
    seconds = round(time.perf_counter() - start, 3)
    log.info("%s: %d cells in %.1f s", slide_id, cells.n_obs, seconds)
    return SlideResult(
        slide_id=slide_id,
        status="done",
        out_dir=out_dir,
        n_nuclei=int(cells.n_obs),
        seconds=seconds,
        timings=timings,
        info=info,
    )


def _qc_plots(cells, folder: Path) -> None:
    """The gating pictures a pathologist checks first (the report links them)."""
    from .qc_plots import plot_cd3_cd8, plot_gates

    plot_gates(cells, folder / "gates.png")
    if {"CD3_pos", "CD8_pos"} <= set(cells.obs.columns):
        plot_cd3_cd8(cells, folder / "cd3_cd8.png")


def _slide_info(slide: Slide, panel: PanelMatch, slide_id: str, n_nuclei: int) -> dict[str, object]:
    return {
        "slide_id": slide_id,
        "path": str(slide.path),
        "format": slide.format,
        "pixel_um": float(slide.pixel_um),
        "shape_yx": [int(v) for v in slide.shape_yx],
        "size_mm": [round(float(v), 4) for v in slide.size_mm],
        "channels": list(slide.channel_names),
        "markers": {m: slide.channel_names[c] for m, c in panel.channels.items()},
        "missing_optional_markers": list(panel.missing_optional),
        "n_nuclei": n_nuclei,
    }


def _skipped(slide_id: str, out_dir: Path) -> SlideResult:
    import anndata as ad

    cells = ad.read_h5ad(out_dir / "cells.h5ad", backed="r")
    try:
        info = dict(cells.uns.get("slide", {}))
        n = int(cells.n_obs)
    finally:
        cells.file.close()
    return SlideResult(slide_id=slide_id, status="skipped", out_dir=out_dir, n_nuclei=n, info=info)
