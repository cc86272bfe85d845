"""A PROMIS-like synthetic cohort: patients, pre/post slides, response classes, manifest."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from .condition import SlideCondition
from .slide import synth_slide
from .style import check_style

logger = logging.getLogger(__name__)


def synth_cohort(out_dir: str | Path, *, n_patients: int = 2, seed: int = 0,
                 size_mm: tuple[float, float] = (2.0, 1.5), pixel_um: float = 0.5,
                 style: str = "default", post_size_mm: tuple[float, float] | None = None,
                 partial_responders: bool = False) -> Path:
    """Write a synthetic cohort: a pre-SBRT biopsy and a post-treatment resection per patient.

    Half the patients (rounded up) are responders, assigned at random; with
    ``partial_responders`` a third (rounded up) are responders, a third partial responders
    and the rest non-responders. Each patient has its own immune baseline (log-normal),
    shared by its two slides.

    Parameters
    ----------
    out_dir : output folder (created).
    n_patients : int >= 1.
    seed : int.
    size_mm : (width, height) of every slide in mm (the pre-SBRT biopsies' when
        ``post_size_mm`` is given).
    post_size_mm : (width, height) in mm of the post-treatment resections; None: ``size_mm``.
    pixel_um : level-0 pixel size in µm.
    style : slide style of every slide, see :func:`synth_slide`.
    partial_responders : three response classes instead of two (see above).

    Returns
    -------
    Path of ``out_dir/manifest.csv`` (columns patient_id, timepoint, slide, response; slide
    paths relative to the manifest folder). Slides go to ``out_dir/slides/<slide_id>.ome.tif``
    and their truth to ``out_dir/truth/<slide_id>/``.
    """
    if n_patients < 1:
        raise ValueError(f"{out_dir}: n_patients must be >= 1, got {n_patients}")
    check_style(style, str(out_dir))
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 606])
    if partial_responders:
        n_resp = (n_patients + 2) // 3
        n_part = (n_patients - n_resp + 1) // 2
        classes = ["responder"] * n_resp + ["partial_responder"] * n_part
    else:
        classes = ["responder"] * ((n_patients + 1) // 2)
    responses = rng.permutation(classes + ["non_responder"] * (n_patients - len(classes)))
    immune = rng.lognormal(0.0, 0.3, n_patients)
    rows = []
    for p in range(n_patients):
        pid = f"P{p + 1:02d}"
        for t, timepoint in enumerate(("pre", "post")):
            slide_id = f"{pid}_{timepoint}"
            slide_seed = int(np.random.SeedSequence([seed, p, t]).generate_state(1)[0])
            cond = SlideCondition.for_sample(timepoint, str(responses[p]), immune_scale=round(float(immune[p]), 4))
            rel = Path("slides") / f"{slide_id}.ome.tif"
            size = post_size_mm if (timepoint == "post" and post_size_mm) else size_mm
            synth_slide(out / rel, size_mm=size, seed=slide_seed, pixel_um=pixel_um, condition=cond,
                        truth_dir=out / "truth" / slide_id, style=style)
            rows.append({"patient_id": pid, "timepoint": timepoint, "slide": rel.as_posix(),
                         "response": str(responses[p])})
            logger.info("cohort: wrote %s (%s)", slide_id, responses[p])
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["patient_id", "timepoint", "slide", "response"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return manifest
