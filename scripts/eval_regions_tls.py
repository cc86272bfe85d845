"""Regions and TLS against the synthetic truth: areas, % necrosis, TLS detection and maturity.

    .venv/bin/tme synth --out C --patients 3 --seed 80000 --size-mm 2 1.5 --post-size-mm 4 3 [--style external_lab]
    .venv/bin/tme run C/manifest.csv --out OUT
    .venv/bin/python scripts/eval_regions_tls.py --cohort C --results OUT --out bench_out/regions_tls.json

Per slide, from ``OUT/slides/<id>/`` (what the pipeline wrote: ``regions.json``,
``regions.npz``, ``tls.geojson``) against ``C/truth/<id>/`` (``regions.npz`` with the
``tumor_bed`` grid, ``tls.geojson``, ``cells.csv.gz``):

* areas (mm²) of tissue, the tumour bed and the margin, relative error; the truth margin is
  the issue's definition computed on the truth grid: tissue within ``--margin-um`` (250 µm)
  of the bed's border on either side, the border against glass excluded; truth bed pieces
  without a viable tumour cell (the generator's 5 µm tissue specks) are not bed
  (:func:`truth_bed_with_tumour`; ``margin_rel_error_raw_truth`` keeps them);
* % necrosis of the bed (truth: necrosis grid / bed grid), error in points;
* TLS: detections matched one-to-one to true TLS by polygon IoU >= 0.3 (largest IoU
  first); precision, recall, F1; a false detection whose outline holds more decoy cells
  (truth zone ``cluster`` or ``b_patch``) than TLS cells is a reported decoy; maturity
  accuracy on matched pairs, with the confusion.

Acceptance (issue 12): tissue and bed within 5 %, margin within 10 %, necrosis within 5
points, TLS F1 >= 0.9, no decoy, maturity accuracy >= 0.85.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from shapely.strtree import STRtree

IOU_MATCH = 0.3


def truth_margin(tissue: np.ndarray, bed: np.ndarray, grid_um: float, half_width_um: float) -> np.ndarray:
    """Tissue within ``half_width_um`` of the bed's border with other tissue, on both sides."""
    other = tissue & ~bed
    if not bed.any() or not other.any():
        return np.zeros_like(tissue)
    d_in = ndi.distance_transform_edt(~other) * grid_um  # bed pixels: distance to non-bed tissue
    d_out = ndi.distance_transform_edt(~bed) * grid_um  # other pixels: distance to the bed
    return tissue & ((bed & (d_in <= half_width_um)) | (other & (d_out <= half_width_um)))


def truth_bed_with_tumour(bed: np.ndarray, cells: pd.DataFrame, grid_um: float) -> tuple[np.ndarray, int]:
    """The truth bed's connected pieces that hold at least one viable tumour cell, and how many were dropped.

    The generator fills every small non-tumour tissue piece inside its tumour compartment,
    so 5 µm specks of tissue left between its air spaces become "tumour" without a cell; a
    pathologist draws no bed there, and each speck would add a 250 µm margin disc.
    """
    lab, n = ndi.label(bed)
    viable = (cells["cell_type"].astype(str) == "tumor").to_numpy() & (cells["state"].astype(str) != "pyknotic").to_numpy()
    ii = np.clip((cells["y_um"].to_numpy()[viable] // grid_um).astype(np.int64), 0, bed.shape[0] - 1)
    jj = np.clip((cells["x_um"].to_numpy()[viable] // grid_um).astype(np.int64), 0, bed.shape[1] - 1)
    held = np.bincount(lab[ii, jj], minlength=n + 1) > 0
    held[0] = False
    return held[lab], int(n - held[1:].sum())


def _truth_tls(truth_dir: Path) -> tuple[list[Polygon], list[str]]:
    gj = json.loads((truth_dir / "tls.geojson").read_text())
    px = float(gj["pixel_um"])
    polys, mats = [], []
    for f in gj["features"]:
        ring = np.asarray(f["geometry"]["coordinates"][0], float) * px
        polys.append(Polygon(ring))
        mats.append(f["properties"]["maturity"])
    return polys, mats


def match_tls(pred: list, truth: list) -> list[tuple[int, int, float]]:
    """One-to-one (pred index, truth index, IoU) with IoU >= 0.3, largest IoU first."""
    pairs = []
    if pred and truth:
        tree = STRtree(truth)
        for i, p in enumerate(pred):
            for j in tree.query(p):
                inter = p.intersection(truth[j]).area
                iou = inter / (p.area + truth[j].area - inter) if inter > 0 else 0.0
                if iou >= IOU_MATCH:
                    pairs.append((iou, i, int(j)))
    pairs.sort(reverse=True)
    used_p, used_t, out = set(), set(), []
    for iou, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i); used_t.add(j); out.append((i, j, iou))
    return out


def score_slide(truth_dir: Path, slide_dir: Path, *, margin_um: float) -> dict:
    from tme_pipeline.results import SlideResults

    res = SlideResults(slide_dir.name, slide_dir)
    with np.load(truth_dir / "regions.npz", allow_pickle=False) as z:
        t_tissue, t_bed, t_nec = z["tissue"], z["tumor_bed"], z["necrosis"]
        t_um = float(z["um_per_px"])
    px_mm2 = (t_um / 1000.0) ** 2
    cells = pd.read_csv(truth_dir / "cells.csv.gz", usecols=["x_um", "y_um", "zone", "cell_type", "state"])
    raw_margin = truth_margin(t_tissue, t_bed, t_um, margin_um).sum() * px_mm2
    t_bed, n_specks = truth_bed_with_tumour(t_bed, cells, t_um)
    t_margin = truth_margin(t_tissue, t_bed, t_um, margin_um)
    truth_areas = {"tissue": t_tissue.sum() * px_mm2, "tumor": t_bed.sum() * px_mm2, "margin": t_margin.sum() * px_mm2}
    t_bed_area = truth_areas["tumor"]
    truth_nec = 100.0 * t_nec.sum() * px_mm2 / t_bed_area if t_bed_area > 0 else None
    regions = res.regions()
    areas = regions["areas_mm2"]
    out = {"slide_id": slide_dir.name, "areas_mm2": {}, "rel_error": {}}
    for name, true in truth_areas.items():
        pred = float(areas.get(name, 0.0))
        out["areas_mm2"][name] = {"pred": round(pred, 4), "truth": round(float(true), 4)}
        out["rel_error"][name] = round((pred - true) / true, 4) if true > 0 else (0.0 if pred == 0 else None)
    pred_nec = regions.get("percent_necrosis")
    out["percent_necrosis"] = {"pred": pred_nec, "truth": None if truth_nec is None else round(truth_nec, 2),
                               "error_points": None if (pred_nec is None or truth_nec is None)
                               else round(pred_nec - truth_nec, 2)}
    out["absent"] = regions.get("absent", {})
    out["truth_bed_specks_dropped"] = n_specks
    out["margin_rel_error_raw_truth"] = (round((float(areas.get("margin", 0.0)) - raw_margin) / raw_margin, 4)
                                         if raw_margin > 0 else None)

    features, _ = res.tls()
    pred = [g for g, _ in features]
    pred_mat = [p["classification"]["name"] for _, p in features]
    t_polys, t_mats = _truth_tls(truth_dir)
    pairs = match_tls(pred, t_polys)
    matched_p = {i for i, _, _ in pairs}
    tp, fp, fn = len(pairs), len(pred) - len(pairs), len(t_polys) - len(pairs)
    decoys = []
    from shapely import contains_xy

    for i, g in enumerate(pred):
        if i in matched_p:
            continue
        inside = contains_xy(g, cells["x_um"].to_numpy(), cells["y_um"].to_numpy())
        zones = cells["zone"].to_numpy()[inside]
        n_decoy = int(np.isin(zones, ("cluster", "b_patch")).sum())
        n_tls = int(np.isin(zones, ("tls_t", "tls_b", "tls_gc")).sum())
        if n_decoy > n_tls:
            decoys.append({"pred_index": i, "decoy_cells": n_decoy, "tls_cells": n_tls,
                           "centroid_um": [round(g.centroid.x, 1), round(g.centroid.y, 1)]})
    confusion: dict[str, dict[str, int]] = {}
    for i, j, _ in pairs:
        confusion.setdefault(t_mats[j], {}).setdefault(pred_mat[i], 0)
        confusion[t_mats[j]][pred_mat[i]] += 1
    correct = sum(pred_mat[i] == t_mats[j] for i, j, _ in pairs)
    out["tls"] = {"n_pred": len(pred), "n_truth": len(t_polys), "tp": tp, "fp": fp, "fn": fn,
                  "decoys_reported": decoys, "maturity_correct": int(correct), "maturity_confusion": confusion,
                  "mean_iou": round(float(np.mean([iou for *_, iou in pairs])), 3) if pairs else None}
    return out


def summarise(rows: list[dict]) -> dict:
    tp = sum(r["tls"]["tp"] for r in rows); fp = sum(r["tls"]["fp"] for r in rows); fn = sum(r["tls"]["fn"] for r in rows)
    prec = tp / (tp + fp) if tp + fp else 1.0
    rec = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    correct = sum(r["tls"]["maturity_correct"] for r in rows)
    out = {"tls": {"tp": tp, "fp": fp, "fn": fn, "precision": round(prec, 3), "recall": round(rec, 3),
                   "f1": round(f1, 3), "decoys_reported": sum(len(r["tls"]["decoys_reported"]) for r in rows),
                   "maturity_accuracy": round(correct / tp, 3) if tp else None}}
    for name, limit in (("tissue", 0.05), ("tumor", 0.05), ("margin", 0.10)):
        errs = [abs(r["rel_error"][name]) for r in rows if r["rel_error"].get(name) is not None]
        out[f"{name}_abs_rel_error"] = {"median": round(float(np.median(errs)), 4) if errs else None,
                                        "max": round(float(np.max(errs)), 4) if errs else None,
                                        "within": f"{sum(e <= limit for e in errs)}/{len(errs)}", "limit": limit}
    raw = [abs(r["margin_rel_error_raw_truth"]) for r in rows if r.get("margin_rel_error_raw_truth") is not None]
    out["margin_abs_rel_error_raw_truth"] = {"median": round(float(np.median(raw)), 4) if raw else None,
                                             "max": round(float(np.max(raw)), 4) if raw else None,
                                             "within": f"{sum(e <= 0.10 for e in raw)}/{len(raw)}", "limit": 0.10}
    nec = [abs(r["percent_necrosis"]["error_points"]) for r in rows if r["percent_necrosis"]["error_points"] is not None]
    out["necrosis_abs_error_points"] = {"median": round(float(np.median(nec)), 2) if nec else None,
                                        "max": round(float(np.max(nec)), 2) if nec else None,
                                        "within": f"{sum(e <= 5 for e in nec)}/{len(nec)}", "limit": 5}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, required=True, help="folder of `tme synth` (manifest.csv, truth/)")
    ap.add_argument("--results", type=Path, required=True, help="OUT of `tme run`")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--margin-um", type=float, default=250.0, help="margin half-width of the truth (µm)")
    args = ap.parse_args(argv)
    with open(args.cohort / "manifest.csv", newline="") as fh:
        slide_ids = [Path(r["slide"]).name.split(".")[0] for r in csv.DictReader(fh)]
    rows = []
    for sid in slide_ids:
        rows.append(score_slide(args.cohort / "truth" / sid, args.results / "slides" / sid, margin_um=args.margin_um))
        r = rows[-1]
        print(f"{sid}: tissue {r['rel_error']['tissue']:+.3f} bed {r['rel_error']['tumor']} margin "
              f"{r['rel_error']['margin']} necrosis {r['percent_necrosis']} TLS tp {r['tls']['tp']} fp "
              f"{r['tls']['fp']} fn {r['tls']['fn']} decoys {len(r['tls']['decoys_reported'])} "
              f"maturity {r['tls']['maturity_confusion']}")
    result = {"cohort": str(args.cohort), "results": str(args.results), "summary": summarise(rows), "slides": rows}
    truth_meta = json.loads((args.cohort / "truth" / slide_ids[0] / "truth.json").read_text())
    result["style"] = truth_meta.get("style", {}).get("name", "default") if isinstance(truth_meta.get("style"), dict) else "default"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
