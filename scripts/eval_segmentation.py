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

from tme_pipeline.segment.metrics import pooled_scores

THRESHOLDS = (0.5, 0.7, 0.9)


def read_crops(truth_dir: Path, slide_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The truth crop of a slide and the same window of the run's stitched nuclei."""
    meta = json.loads((truth_dir / "truth.json").read_text())
    truth = tifffile.imread(truth_dir / "nuclei_crop.tif")
    y0, x0 = meta["crop"]["y0"], meta["crop"]["x0"]
    labels = zarr.open_group(str(slide_dir / "labels.ome.zarr"), mode="r")["labels/nuclei/0"]
    return truth, np.asarray(labels[y0 : y0 + truth.shape[0], x0 : x0 + truth.shape[1]])


def _scores(truths: list[np.ndarray], preds: list[np.ndarray]) -> dict:
    return {
        f"iou{t}": {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
        for t, scores in pooled_scores(truths, preds, iou_thresholds=THRESHOLDS).items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic cohort folder (with truth/)")
    parser.add_argument("--run", type=Path, required=True, help="the `tme run --out` folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)

    slides, truths, preds = [], [], []
    for truth_dir in sorted((args.data / "truth").iterdir()):
        slide_dir = args.run / "slides" / truth_dir.name
        if (truth_dir / "nuclei_crop.tif").is_file() and slide_dir.is_dir():
            truth, pred = read_crops(truth_dir, slide_dir)
            slides.append({"slide_id": slide_dir.name, "crop_shape": list(truth.shape), **_scores([truth], [pred])})
            truths.append(truth)
            preds.append(pred)
    if not slides:
        print("no slide with both truth and output found", file=sys.stderr)
        return 1
    summary = _scores(truths, preds)
    report = {"run": str(args.run), "data": str(args.data), "summary": summary, "slides": slides}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
