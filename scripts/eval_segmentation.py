"""Score a run's nuclei against the synthetic ground truth crops, as JSON.

Usage::

    python scripts/eval_segmentation.py --data demo/data --run demo/out --out eval.json

For every slide that has ``truth/<slide_id>/nuclei_crop.tif``, the same window of the
run's ``labels.ome.zarr`` (the stitched, tiled result the pipeline wrote) is matched to
the truth at IoU 0.5, 0.7 and 0.9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile
import zarr

from tme_pipeline.segment.metrics import match_labels

THRESHOLDS = (0.5, 0.7, 0.9)


def score_slide(truth_dir: Path, slide_dir: Path) -> dict:
    meta = json.loads((truth_dir / "truth.json").read_text())
    truth = tifffile.imread(truth_dir / "nuclei_crop.tif")
    y0, x0 = meta["crop"]["y0"], meta["crop"]["x0"]
    labels = zarr.open_group(str(slide_dir / "labels.ome.zarr"), mode="r")["labels/nuclei/0"]
    pred = np.asarray(labels[y0 : y0 + truth.shape[0], x0 : x0 + truth.shape[1]])
    result = {"slide_id": slide_dir.name, "crop_origin_yx": [y0, x0], "crop_shape": list(truth.shape)}
    for t in THRESHOLDS:
        stats = match_labels(truth, pred, iou_threshold=t)
        result[f"iou{t}"] = {
            "tp": stats.tp,
            "fp": stats.fp,
            "fn": stats.fn,
            "precision": round(stats.precision, 4),
            "recall": round(stats.recall, 4),
            "f1": round(stats.f1, 4),
            "mean_matched_iou": round(float(stats.mean_matched_iou), 4),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic cohort folder (with truth/)")
    parser.add_argument("--run", type=Path, required=True, help="the `tme run --out` folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)

    slides = []
    for truth_dir in sorted((args.data / "truth").iterdir()):
        slide_dir = args.run / "slides" / truth_dir.name
        if (truth_dir / "nuclei_crop.tif").is_file() and slide_dir.is_dir():
            slides.append(score_slide(truth_dir, slide_dir))
    if not slides:
        print("no slide with both truth and output found", file=sys.stderr)
        return 1
    summary = {}
    for t in THRESHOLDS:
        tp = sum(s[f"iou{t}"]["tp"] for s in slides)
        fp = sum(s[f"iou{t}"]["fp"] for s in slides)
        fn = sum(s[f"iou{t}"]["fn"] for s in slides)
        precision = tp / max(tp + fp, 1)
        recall = tp / max(tp + fn, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        summary[f"iou{t}"] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}
    summary["mean_matched_iou_at_0.5"] = round(float(np.mean([s["iou0.5"]["mean_matched_iou"] for s in slides])), 4)
    report = {"run": str(args.run), "data": str(args.data), "summary": summary, "slides": slides}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
