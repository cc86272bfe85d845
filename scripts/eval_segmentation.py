"""Score a run's nuclei against the synthetic ground truth crops, as JSON.

Usage::

    python scripts/eval_segmentation.py --data demo/data --run demo/out --out eval.json

For every slide that has ``truth/<slide_id>/nuclei_crop.tif``, the same window of the
run's ``labels.ome.zarr`` (the stitched, tiled result the pipeline wrote) is matched to
the truth at IoU 0.5, 0.7 and 0.9. The report adds each slide's style (truth.json; see
``tme synth --style``) and the recall of lymphocyte nuclei inside TLS (truth CD8/CD4 T,
Treg and B cells whose centre lies in a truth TLS, with a nucleus in the crop) at IoU 0.5
and 0.7, per slide and pooled; ``--style`` keeps only the slides of one style.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import zarr

from tme_pipeline.segment.metrics import matched_pairs, pooled_scores

THRESHOLDS = (0.5, 0.7, 0.9)
LYMPHOCYTES = ("cd8_t", "cd4_t", "treg", "b_cell")


def read_crops(truth_dir: Path, slide_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The truth crop of a slide and the same window of the run's stitched nuclei."""
    meta = json.loads((truth_dir / "truth.json").read_text())
    truth = tifffile.imread(truth_dir / "nuclei_crop.tif")
    y0, x0 = meta["crop"]["y0"], meta["crop"]["x0"]
    labels = zarr.open_group(str(slide_dir / "labels.ome.zarr"), mode="r")["labels/nuclei/0"]
    return truth, np.asarray(labels[y0 : y0 + truth.shape[0], x0 : x0 + truth.shape[1]])


def tls_lymphocyte_counts(truth_dir: Path, truth: np.ndarray, pred: np.ndarray) -> dict:
    """Truth lymphocyte nuclei inside TLS in the crop, and how many are matched, per IoU 0.5 and 0.7."""
    cells = pd.read_csv(truth_dir / "cells.csv.gz", usecols=["cell_id", "cell_type", "tls_id"])
    lymph = cells["cell_id"].to_numpy()[(cells["tls_id"].to_numpy() > 0) & cells["cell_type"].isin(LYMPHOCYTES).to_numpy()]
    ids = np.intersect1d(lymph, np.unique(truth))
    out = {}
    for t in (0.5, 0.7):
        matched, _, _ = matched_pairs(truth, pred, iou_threshold=t)
        out[f"iou{t}"] = {"n_true": int(ids.size), "found": int(np.isin(ids, matched).sum())}
    return out


def _recall(counts: list[dict]) -> dict:
    out = {}
    for t in ("iou0.5", "iou0.7"):
        n, f = sum(c[t]["n_true"] for c in counts), sum(c[t]["found"] for c in counts)
        out[t] = {"n_true": n, "found": f, "recall": round(f / n, 4) if n else None}
    return out


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
    parser.add_argument("--style", default=None, help="score only the slides of this style (truth.json)")
    args = parser.parse_args(argv)

    slides, truths, preds, counts = [], [], [], []
    for truth_dir in sorted((args.data / "truth").iterdir()):
        slide_dir = args.run / "slides" / truth_dir.name
        if (truth_dir / "nuclei_crop.tif").is_file() and slide_dir.is_dir():
            style = json.loads((truth_dir / "truth.json").read_text()).get("style", {}).get("name", "default")
            if args.style is not None and style != args.style:
                continue
            truth, pred = read_crops(truth_dir, slide_dir)
            c = tls_lymphocyte_counts(truth_dir, truth, pred)
            slides.append({"slide_id": slide_dir.name, "style": style, "crop_shape": list(truth.shape),
                           **_scores([truth], [pred]), "tls_lymphocyte_recall": _recall([c])})
            truths.append(truth)
            preds.append(pred)
            counts.append(c)
    if not slides:
        print("no slide with both truth and output found", file=sys.stderr)
        return 1
    summary = {**_scores(truths, preds), "tls_lymphocyte_recall": _recall(counts)}
    report = {"run": str(args.run), "data": str(args.data), "style": args.style, "summary": summary,
              "slides": slides}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
