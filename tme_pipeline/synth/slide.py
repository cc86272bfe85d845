"""One synthetic mIF slide: layout, cells, rendering, pyramid and truth."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon

from .cells import MARKERS, make_artefacts, make_cells
from .condition import SlideCondition
from .layout import Layout, make_layout
from .render import Acquisition, make_scene, render_block
from .style import check_style, draw_style
from .truth import SlideTruth, compute_metrics, tls_table, write_truth
from .write import release_free_memory, write_pyramid

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "3"  # 2: dense overlapping follicles, DAPI summed over overlaps, styles;
# 3: cd8_factor multiplies the CD8 density of the tumour compartment and the 250 µm band around it (clusters and TLS counted)
CROP_PX = 1024


def synth_slide(path: str | Path, *, size_mm: tuple[float, float] = (2.0, 1.5), seed: int = 0,
                pixel_um: float = 0.5, condition: SlideCondition | None = None, block_px: int = 1024,
                truth_dir: str | Path | None = None, gain_scale: float = 1.0,
                style: str = "default") -> SlideTruth:
    """Write one synthetic pyramidal OME-TIFF slide and return its ground truth.

    Parameters
    ----------
    path : output ``.ome.tif`` path (its folder must exist).
    size_mm : (width, height) of the slide in mm.
    seed : int; equal seeds give identical pixels and truth.
    pixel_um : level-0 pixel size in µm.
    condition : SlideCondition, default ``SlideCondition()`` (a resection with TLS).
    block_px : rendering block edge in px (multiple of 256); does not change the pixels.
    truth_dir : folder for the truth files (see :mod:`tme_pipeline.synth.truth`); None
        writes none.
    gain_scale : every channel's stain gain is multiplied by this (the same slide
        stained or scanned brighter or dimmer: a batch-effect test); cells, layout
        and noise draws are unchanged.
    style : one of :data:`tme_pipeline.synth.style.STYLES`: ``"default"`` (the look we
        train on) or ``"external_lab"`` (another lab's look, drawn per slide from wider
        priors; for validation). Recorded in truth.json under ``style``.

    Returns
    -------
    SlideTruth

    Examples
    --------
    >>> truth = synth_slide("s.ome.tif", size_mm=(0.6, 0.5), seed=1)  # doctest: +SKIP
    >>> truth.metrics["tls_count"] >= 1  # doctest: +SKIP
    True
    """
    if size_mm[0] <= 0 or size_mm[1] <= 0 or pixel_um <= 0:
        raise ValueError(f"{path}: size_mm and pixel_um must be positive, got {size_mm}, {pixel_um}")
    check_style(style, str(path))
    condition = condition or SlideCondition()
    look, acq_overrides = draw_style(style, seed=seed)
    t0 = time.perf_counter()
    w_px, h_px = int(round(size_mm[0] * 1000 / pixel_um)), int(round(size_mm[1] * 1000 / pixel_um))
    layout = make_layout(size_mm, condition=condition, seed=seed)
    cells = make_cells(layout, condition, seed=seed, look=look)
    layout = layout.for_rendering()
    artefacts = make_artefacts(layout, seed=seed, debris_scale=look.debris_scale)
    if not gain_scale > 0:
        raise ValueError(f"{path}: gain_scale must be positive, got {gain_scale}")
    acq = Acquisition.draw(seed=seed, look=look, overrides=acq_overrides)
    if gain_scale != 1.0:
        acq = dataclasses.replace(acq, gain=np.round(acq.gain * gain_scale, 6))
    release_free_memory()  # the generation's temporaries, before the long rendering phase
    t1 = time.perf_counter()
    scene = make_scene(layout, cells, artefacts, acq, pixel_um=pixel_um, shape_px=(h_px, w_px), seed=seed,
                       fibrosis=condition.fibrosis, look=look)
    uuid_seed = f"{seed}:{size_mm}:{pixel_um}:{condition}" + (f":{gain_scale}" if gain_scale != 1.0 else "") \
        + (f":{style}" if style != "default" else "")
    write_pyramid(path, lambda win: render_block(scene, win), shape=(h_px, w_px), channel_names=list(MARKERS),
                  pixel_um=pixel_um, block_px=block_px, uuid_seed=uuid_seed)
    t2 = time.perf_counter()
    tls = tls_table(layout.tls, cells, pixel_um)
    crop = _choose_crop(layout, tls, pixel_um, (h_px, w_px))
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "pixel_um": pixel_um,
            "size_mm": list(size_mm), "size_px": [w_px, h_px], "channels": list(MARKERS),
            "condition": dataclasses.asdict(condition), "response": condition.response,
            "timepoint": condition.timepoint, "acquisition": acq.to_dict(),
            "crop": {"y0": crop[0], "x0": crop[1], "size": crop[2]},
            "region_um": layout.coarse_um, "n_cells": len(cells), "style": look.to_dict()}
    masks = layout.masks
    metrics = compute_metrics(cells, masks, layout.coarse_um, tls)
    # The tumour bed as a pathologist draws it: the whole tumour compartment, its necrosis included.
    masks["tumor_bed"] = layout.tumor_comp.copy()
    metrics["area_tumor_bed_mm2"] = layout.area_mm2(layout.tumor_comp)
    truth = SlideTruth(cells, tls, masks, layout.coarse_um, {r: metrics[f"area_{r}_mm2"] for r in masks},
                       metrics, meta)
    if truth_dir is not None:
        write_truth(truth_dir, truth, crop=crop)
    logger.info("%s: %d cells, %d TLS; layout+cells %.1f s, pixels %.1f s, truth %.1f s", Path(path).name,
                len(cells), len(tls), t1 - t0, t2 - t1, time.perf_counter() - t2)
    return truth


def _choose_crop(layout: Layout, tls, pixel_um: float, shape_px: tuple[int, int]) -> tuple[int, int, int]:
    """Crop (y0, x0, size) px holding tumour, stroma and, where possible, a TLS."""
    size = min(CROP_PX, *shape_px)
    cu = layout.coarse_um
    k = max(1, int(round(size * pixel_um / cu)))
    masks = layout.masks
    tls_mask = np.zeros_like(masks["tissue"])
    for poly in tls["polygon_px"]:
        rr, cc = draw_polygon(poly[:, 1] * pixel_um / cu, poly[:, 0] * pixel_um / cu, tls_mask.shape)
        tls_mask[rr, cc] = True
    comp = {"t": layout.tumor_comp & ~masks["necrosis"], "s": masks["tissue"] & ~layout.tumor_comp,
            "l": tls_mask}
    # Mean of each mask over every k x k window (top-left anchored), by uniform filtering.
    frac = {n: ndi.uniform_filter(m.astype(np.float32), k, mode="constant", origin=-(k // 2)) for n, m in comp.items()}
    score = np.minimum(frac["t"], 0.4) + np.minimum(frac["s"], 0.4) + 2.0 * np.minimum(frac["l"], 0.15)
    hc, wc = masks["tissue"].shape
    score[max(hc - k, 0) + 1:, :] = -1
    score[:, max(wc - k, 0) + 1:] = -1
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    y0 = min(int(round(iy * cu / pixel_um)), shape_px[0] - size)
    x0 = min(int(round(ix * cu / pixel_um)), shape_px[1] - size)
    return max(y0, 0), max(x0, 0), size
