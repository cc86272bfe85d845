"""Evaluate a StarDist model: held-out synthetic slides (vs the classic segmenter) and a real image.

Usage::

    python scripts/eval_stardist.py --model models/stardist_fluo_synth --out eval.json
    python scripts/eval_stardist.py --model models/stardist_fluo_synth --style external_lab \
        --seed0 40000 --no-real --out eval_external.json

Held-out synthetic slides use generator seeds 30000.. (training uses 10000..,
validation 20000..), so none was seen in training or threshold selection;
``--seed0`` moves them (40000.. were never used before issue 10). ``--style``
draws them in a slide style of :mod:`tme_pipeline.synth.style` (``external_lab``:
another lab's look, wider priors than training). Each slide has at least one TLS,
and the report adds the recall of lymphocyte nuclei (truth CD8/CD4 T, Treg and B
cells whose centre lies inside a truth TLS) at IoU 0.5 and 0.7 and the area of
matched predicted nuclei over their truth area (median, quartiles).
Each slide's whole level-0 DAPI is segmented with ``segment_nuclei`` (the
user path, at 0.5 µm/px) and, for comparison, with the classic segmenter
(global Otsu threshold from a 4x block-averaged copy + watershed, its default
parameters); both are matched to the exact truth at IoU 0.5, 0.7 and 0.9.

The real image is ``stardist.data.test_image_nuclei_2d(return_mask=True)``, a
manually annotated fluorescence nuclei image (512 x 512) that records no pixel
size; its nuclei are ~24 px across, so it is segmented as 0.35 µm/px (8 µm
nuclei), which makes ``segment_nuclei`` resample it to the model's 0.5 µm/px.
It is a judge only: never used for training, thresholds or checkpoints.
Scores are pooled counts (tp, fp, fn summed over images).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

TEST_SEED0 = 30_000
IOU_THRESHOLDS = (0.5, 0.7, 0.9)
LYMPHOCYTES = ("cd8_t", "cd4_t", "treg", "b_cell")
# Pixel size assumed for the real test image (see the module docstring), µm.
REAL_IMAGE_PIXEL_UM = 0.35
# Block size of the low-resolution copy the classic threshold is computed on,
# as the pipeline does from a pyramid level (~2 µm/px).
CLASSIC_LOWRES_BLOCK = 4

logger = logging.getLogger("eval_stardist")


def pooled(truths: list[np.ndarray], preds: list[np.ndarray]) -> dict:
    """Pooled scores at every IoU threshold, rounded for the report."""
    from tme_pipeline.segment.metrics import pooled_scores

    return {f"iou{t}": {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
            for t, s in pooled_scores(truths, preds, iou_thresholds=IOU_THRESHOLDS).items()}


def test_slides(cache: Path, seeds: list[int], *, size_mm: float, style: str) -> list[dict]:
    """Held-out slides of ``style`` (written once to a folder named by generator version and style).

    Each is a dict: seed, image ((H, W) uint16 level-0 DAPI), labels ((H, W) uint32 truth
    nuclei), cells (truth cell table).
    """
    import dataclasses

    import tifffile

    from tme_pipeline.segment.train.training import condition_for_seed
    from tme_pipeline.synth import load_truth, render_truth_labels, synth_slide
    from tme_pipeline.synth.slide import GENERATOR_VERSION

    folder = cache / f"gen{GENERATOR_VERSION}_{style}_{size_mm:g}mm"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in seeds:
        path, truth_dir = folder / f"s{seed}.ome.tif", folder / f"s{seed}_truth"
        if path.is_file() and (truth_dir / "truth.json").is_file():
            truth = load_truth(truth_dir)
        else:
            cond = dataclasses.replace(condition_for_seed(seed), min_tls=1)
            truth = synth_slide(path, size_mm=(size_mm, size_mm), seed=seed, condition=cond, style=style,
                                truth_dir=truth_dir)
        with tifffile.TiffFile(path) as tf:
            dapi = tf.series[0].levels[0].pages[0].asarray()
        labels = render_truth_labels(truth, (slice(0, dapi.shape[0]), slice(0, dapi.shape[1])), kind="nuclei")
        out.append({"seed": seed, "image": dapi, "labels": labels, "cells": truth.cells})
    return out


def tls_lymphocyte_recall(slides: list[dict], preds: list[np.ndarray]) -> dict:
    """Recall of truth lymphocyte nuclei whose centre lies in a TLS, pooled, per IoU 0.5 and 0.7."""
    from tme_pipeline.segment.metrics import matched_pairs

    out = {}
    for t in (0.5, 0.7):
        n = found = 0
        for sl, pred in zip(slides, preds):
            c = sl["cells"]
            ids = c["cell_id"].to_numpy()[(c["tls_id"].to_numpy() > 0) & c["cell_type"].isin(LYMPHOCYTES).to_numpy()]
            ids = np.intersect1d(ids, np.unique(sl["labels"]))  # a nucleus fully hidden by overlap has no pixel
            matched, _, _ = matched_pairs(sl["labels"], pred, iou_threshold=t)
            n += ids.size
            found += int(np.isin(ids, matched).sum())
        out[f"iou{t}"] = {"n_true": n, "found": found, "recall": round(found / n, 4) if n else None}
    return out


def matched_area_ratio(truths: list[np.ndarray], preds: list[np.ndarray]) -> dict:
    """Predicted / truth area of the nuclei matched at IoU 0.5: median and quartiles."""
    from tme_pipeline.segment.metrics import matched_pairs

    ratios = []
    for truth, pred in zip(truths, preds):
        it, ip, _ = matched_pairs(truth, pred, iou_threshold=0.5)
        ratios.append(np.bincount(pred.ravel())[ip] / np.bincount(truth.ravel())[it])
    r = np.concatenate(ratios)
    q25, q50, q75 = np.percentile(r, [25, 50, 75]) if r.size else (np.nan,) * 3
    return {"median": round(float(q50), 4), "q25": round(float(q25), 4), "q75": round(float(q75), 4), "n": int(r.size)}


def classic(image: np.ndarray, pixel_um: float) -> np.ndarray:
    """The classic segmenter as the pipeline runs it (threshold from a low-resolution copy)."""
    from skimage.measure import block_reduce

    from tme_pipeline.segment.classic import classic_threshold, segment_nuclei_classic

    img = image.astype(np.float32)
    lowres = block_reduce(img, (CLASSIC_LOWRES_BLOCK, CLASSIC_LOWRES_BLOCK), np.mean)
    return segment_nuclei_classic(img, pixel_um, threshold=classic_threshold(lowres))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model folder")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--test-slides", type=int, default=6)
    ap.add_argument("--seed0", type=int, default=TEST_SEED0, help="first held-out generator seed")
    ap.add_argument("--style", default="default", help="slide style (tme_pipeline.synth.style.STYLES)")
    ap.add_argument("--slide-mm", type=float, default=0.6)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tme_stardist_synth"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-real", action="store_true", help="skip the real image")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="arithmetic of the net on the CPU (default: segment_nuclei's for this machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from tme_pipeline.segment.predict import segment_nuclei
    from tme_pipeline.segment.weights import load_model
    from tme_pipeline.synth.style import check_style

    check_style(args.style, "--style")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    report = {"model": str(args.model), "weights_sha256": model.sha256,
              "thresholds": {"prob": model.thresholds.prob, "nms": model.thresholds.nms},
              "precision": args.precision or "default"}

    seeds = [args.seed0 + i for i in range(args.test_slides)]
    test = test_slides(args.cache, seeds, size_mm=args.slide_mm, style=args.style)
    pixel_um = 0.5
    t0 = time.perf_counter()
    sd = [segment_nuclei(im["image"], pixel_um, model=model, precision=args.precision) for im in test]
    t_sd = time.perf_counter() - t0
    t0 = time.perf_counter()
    cl = [classic(im["image"], pixel_um) for im in test]
    t_cl = time.perf_counter() - t0
    truths = [im["labels"] for im in test]
    report["synthetic_heldout"] = {
        "style": args.style, "seeds": seeds, "slide_size_mm": [args.slide_mm] * 2, "pixel_um": pixel_um,
        "n_true_nuclei": int(sum(len(np.unique(y)) - 1 for y in truths)),
        "stardist": pooled(truths, sd), "classic": pooled(truths, cl),
        "area_ratio_pred_over_truth": {"stardist": matched_area_ratio(truths, sd),
                                       "classic": matched_area_ratio(truths, cl)},
        "tls_lymphocyte_recall": {"stardist": tls_lymphocyte_recall(test, sd),
                                  "classic": tls_lymphocyte_recall(test, cl)},
        "seconds": {"stardist": round(t_sd, 1), "classic": round(t_cl, 1)},
        "per_slide_f1_iou0.5": [{"seed": im["seed"], "stardist": pooled([im["labels"]], [a])["iou0.5"]["f1"],
                                 "classic": pooled([im["labels"]], [b])["iou0.5"]["f1"]}
                                for im, a, b in zip(test, sd, cl)],
    }
    logger.info("held-out synthetic F1@0.5: stardist %.4f, classic %.4f",
                report["synthetic_heldout"]["stardist"]["iou0.5"]["f1"],
                report["synthetic_heldout"]["classic"]["iou0.5"]["f1"])

    if not args.no_real:
        from stardist.data import test_image_nuclei_2d

        img, mask = test_image_nuclei_2d(return_mask=True)
        pred = segment_nuclei(img, REAL_IMAGE_PIXEL_UM, model=model, precision=args.precision)
        report["real_image"] = {
            "source": "stardist.data.test_image_nuclei_2d(return_mask=True)", "shape": list(img.shape),
            "assumed_pixel_um": REAL_IMAGE_PIXEL_UM, "n_true_nuclei": int(len(np.unique(mask)) - 1),
            "n_pred_nuclei": int(len(np.unique(pred)) - 1),
            "stardist": pooled([mask], [pred]),
            "classic": pooled([mask], [classic(img, REAL_IMAGE_PIXEL_UM)]),
        }
        logger.info("real image F1@0.5: stardist %.4f", report["real_image"]["stardist"]["iou0.5"]["f1"])

    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
