"""Score a StarDist model on real annotated nuclei: the held-out groups of the shared set and img2d.

Usage::

    python scripts/eval_real_nuclei.py --model models/stardist_fluo_real \\
        --real ../shared/data/dsb2018-fluo-train --out bench_out/real_nuclei.json

- **Held-out groups.** The model folder's ``split.json`` (written by
  ``scripts/train_stardist.py --real``) names the images of the test groups:
  whole appearance groups that neither training, checkpoints nor thresholds
  saw. Each image goes through the user path, ``segment_nuclei``, with the
  pixel size that makes its median nucleus 8 µm (``8 / median diameter px``;
  the index measures that diameter on the masks), so the image is resampled
  to the model's 0.5 µm/px inside, and the labels come back on the image's
  own grid, where they are scored.
- **img2d**: ``stardist.data.test_image_nuclei_2d(return_mask=True)`` at an
  assumed 0.35 µm/px (its nuclei are ~24 px, so ~8 µm). A judge only.

Scores are pooled counts (tp, fp, fn summed over images) at IoU 0.5, 0.7 and
0.9, with the median area ratio (ours / drawn) of the nuclei matched at IoU
0.5 and its quartiles: how much smaller or larger than an annotator we draw.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

IOU_THRESHOLDS = (0.5, 0.7, 0.9)
# Nucleus diameter each held-out image is taken to have, µm (as at training).
NUCLEUS_UM = 8.0
IMG2D_PIXEL_UM = 0.35

logger = logging.getLogger("eval_real_nuclei")


def area_ratios(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Area of each predicted nucleus matched at IoU 0.5 over its truth's area."""
    from tme_pipeline.segment.metrics import matched_pairs

    t_ids, p_ids, _ = matched_pairs(truth, pred, iou_threshold=0.5)
    t_area = np.bincount(truth.ravel().astype(np.int64))
    p_area = np.bincount(pred.ravel().astype(np.int64))
    return p_area[p_ids] / t_area[t_ids]


def score(truths: list[np.ndarray], preds: list[np.ndarray]) -> dict:
    """Pooled scores at each IoU threshold and the matched area ratio."""
    from tme_pipeline.segment.metrics import pooled_scores

    out = {f"iou{t}": {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
           for t, s in pooled_scores(truths, preds, iou_thresholds=IOU_THRESHOLDS).items()}
    ratios = np.concatenate([area_ratios(t, p) for t, p in zip(truths, preds)])
    q = np.percentile(ratios, [25, 50, 75]) if len(ratios) else [float("nan")] * 3
    out["area_ratio_matched"] = {"median": round(float(q[1]), 3), "q25": round(float(q[0]), 3),
                                 "q75": round(float(q[2]), 3), "n": int(len(ratios))}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model folder (with split.json)")
    ap.add_argument("--real", type=Path, required=True, help="shared real-nuclei folder")
    ap.add_argument("--part", default="test", choices=("test", "val"), help="which held-out groups to score")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--no-img2d", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import tifffile
    import torch

    from tme_pipeline.segment.predict import segment_nuclei
    from tme_pipeline.segment.train.real import read_index
    from tme_pipeline.segment.weights import load_model

    torch.set_num_threads(args.threads)
    split_path = args.model / "split.json"
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path}: missing; train the model with --real to record its split")
    split = json.loads(split_path.read_text())
    model = load_model(args.model)
    records = {r.image_id: r for r in read_index(args.real)}
    ids = split["images"][args.part]
    t0 = time.perf_counter()
    truths, preds = [], []
    for image_id in ids:
        rec = records[image_id]
        img = tifffile.imread(args.real / "images" / f"{image_id}.tif")
        truths.append(tifffile.imread(args.real / "masks" / f"{image_id}.tif"))
        preds.append(segment_nuclei(img, NUCLEUS_UM / rec.median_diameter_px, model=model))
    report = {"model": str(args.model), "weights_sha256": model.sha256,
              "thresholds": {"prob": model.thresholds.prob, "nms": model.thresholds.nms},
              "real_heldout": {"part": args.part, "groups": split["counts"][args.part]["groups"],
                               "n_images": len(ids), "n_true_nuclei": int(sum(len(np.unique(t)) - 1 for t in truths)),
                               "nucleus_um": NUCLEUS_UM, "seconds": round(time.perf_counter() - t0, 1),
                               **score(truths, preds)}}
    logger.info("real held-out (%s) F1@0.5 %.4f F1@0.7 %.4f", args.part, report["real_heldout"]["iou0.5"]["f1"],
                report["real_heldout"]["iou0.7"]["f1"])
    if not args.no_img2d:
        from stardist.data import test_image_nuclei_2d

        img, mask = test_image_nuclei_2d(return_mask=True)
        report["img2d"] = {"assumed_pixel_um": IMG2D_PIXEL_UM,
                           **score([mask], [segment_nuclei(img, IMG2D_PIXEL_UM, model=model)])}
        logger.info("img2d F1@0.5 %.4f", report["img2d"]["iou0.5"]["f1"])
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
