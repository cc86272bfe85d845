"""Per-slide metrics against the synthetic truth: densities, post/pre CD8 fold, immune class, response ranking.

    .venv/bin/tme run C/manifest.csv --out OUT        # writes OUT/slides/<id>/metrics.json
    .venv/bin/python scripts/eval_metrics.py --cohort C --results OUT --out bench_out/metrics.json

Truth, computed with our definitions on the truth's grid (``C/truth/<id>/regions.npz``) and
cells (``cells.csv.gz``, a cell in the region of the grid pixel under its centre):

* tumour = the truth's ``tumor_bed``; margin = tissue within ``--margin-um`` (250 µm) of the
  bed's border with other tissue on both sides (``eval_regions_tls.truth_margin``); core = bed
  - margin; stroma = tissue - bed - margin; tumour + margin = bed or margin;
* densities over the viable part, as ``metrics`` defines them: the truth's ``necrosis`` mask
  is taken out of every region's area and its cells out of the counts (the truth's mask, not
  ours); a region whose viable part is under ``metrics.min_viable_area_mm2`` has no density;
* groups: CD8_T = ``cd8_t``, B = ``b_cell``, t_cells = ``T_TYPES`` (cd8_t, cd4_t, treg).

Per slide, the relative error of our ``density_<group>_<region>`` (metrics.json) for those
groups over tumor, margin and stroma, where both exist and the truth region holds at least
``--min-truth-cells`` cells of the group (a relative error on a handful of cells measures
chance); per patient the post/pre CD8 fold in tumour + margin (ours: ``density_CD8_T_tumor_margin``;
truth: the same on the truth grid), our fold over the truth's; PD-L1 TPS against the truth's % of viable tumour cells PD-L1+ (points); the immune
class against the class :func:`tme_pipeline.metrics.immune_class` gives on the truth densities
(the truth core counts as absent under ``regions.min_region_area_mm2``), also over the slides
whose deciding truth density is more than 10 % from its cut-off (``_near_cutoff``); with the manifest's
``response`` column, the Spearman correlation of CD8 fold with non_responder <
partial_responder < responder and the medians per class.

Acceptance (issue 13): median density relative error <= 10 %; CD8 fold within 10 %; class
agreement >= 90 %; responders above partial responders above non-responders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_regions_tls import truth_margin  # noqa: E402

from tme_pipeline.config import load_config  # noqa: E402
from tme_pipeline.metrics import immune_class  # noqa: E402
from tme_pipeline.results import open_results  # noqa: E402
from tme_pipeline.synth.cells import T_TYPES  # noqa: E402

GROUPS = {"CD8_T": ("cd8_t",), "B": ("b_cell",), "t_cells": tuple(T_TYPES)}
REGIONS = ("tumor", "margin", "stroma")
RESPONSE_ORDER = ("non_responder", "partial_responder", "responder")


def truth_densities(truth_dir: Path, *, margin_um: float, min_core_mm2: float) -> dict:
    """Truth cells per mm² of each group over tumor, tumor_core, margin, stroma, and tumour + margin."""
    z = np.load(truth_dir / "regions.npz")
    g = float(z["um_per_px"])
    tissue, bed = z["tissue"].astype(bool), z["tumor_bed"].astype(bool) & z["tissue"].astype(bool)
    margin = truth_margin(tissue, bed, g, margin_um)
    viable = ~z["necrosis"].astype(bool)
    masks = {r: m & viable for r, m in {"tumor": bed, "tumor_core": bed & ~margin, "margin": margin,
                                        "stroma": tissue & ~bed & ~margin, "tumor_margin": bed | margin}.items()}
    cells = pd.read_csv(truth_dir / "cells.csv.gz", usecols=["x_um", "y_um", "cell_type"])
    jj = np.clip((cells["x_um"].to_numpy() // g).astype(np.int64), 0, tissue.shape[1] - 1)
    ii = np.clip((cells["y_um"].to_numpy() // g).astype(np.int64), 0, tissue.shape[0] - 1)
    types = cells["cell_type"].astype(str).to_numpy()
    px_mm2 = (g / 1000.0) ** 2
    min_viable = load_config().metrics.min_viable_area_mm2
    out = {"areas_mm2": {r: float(m.sum()) * px_mm2 for r, m in masks.items()}, "counts": {}, "density": {}}
    for r, m in masks.items():
        inside = m[ii, jj]
        area = out["areas_mm2"][r]
        for name, members in GROUPS.items():
            n = int((inside & np.isin(types, members)).sum())
            out["counts"][f"{name}_{r}"] = n
            out["density"][f"{name}_{r}"] = n / area if area >= max(min_viable, 1e-12) else None
    whole_core_mm2 = float((bed & ~margin).sum()) * px_mm2
    core_ok = whole_core_mm2 >= min_core_mm2 and out["density"]["CD8_T_tumor_core"] is not None
    out["immune_class"], out["immune_class_reason"] = immune_class(
        out["density"]["CD8_T_tumor_core"] if core_ok else None, out["density"]["CD8_T_margin"],
        bed_cd8=out["density"]["CD8_T_tumor"], config=load_config().metrics,
        why_no_core=f"truth core {whole_core_mm2:.3f} mm², {out['areas_mm2']['tumor_core']:.3f} mm² viable")
    return out


def score(cohort: Path, results_dir: Path, *, margin_um: float, min_truth_cells: int) -> dict:
    manifest = pd.read_csv(cohort / "manifest.csv")
    if "slide_id" not in manifest.columns:
        manifest["slide_id"] = [Path(p).name.split(".")[0] for p in manifest["slide"]]
    results = open_results(results_dir)
    min_core = load_config().regions.min_region_area_mm2
    slides, errors = [], []
    for row in manifest.itertuples():
        slide = results.slide(row.slide_id)
        doc = slide.metrics()
        truth = truth_densities(cohort / "truth" / row.slide_id, margin_um=margin_um, min_core_mm2=min_core)
        entry = {"slide_id": row.slide_id, "patient_id": row.patient_id, "timepoint": row.timepoint,
                 "response": getattr(row, "response", None), "immune_class": doc["immune_class"],
                 "immune_class_reason": doc["immune_class_reason"], "truth_immune_class": truth["immune_class"],
                 "truth_immune_class_reason": truth["immune_class_reason"],
                 "cd8_tumor_margin": doc["metrics"].get("density_CD8_T_tumor_margin"),
                 "truth_cd8_tumor_margin": truth["density"]["CD8_T_tumor_margin"],
                 "class_cd8": {r: {"ours": doc["metrics"].get(f"density_CD8_T_{r}"),
                                   "truth": truth["density"][f"CD8_T_{r}"]} for r in ("tumor_core", "margin", "tumor")},
                 "pdl1_tps": doc["metrics"].get("pdl1_tps"),
                 "truth_pdl1_tps": json.loads((cohort / "truth" / row.slide_id / "metrics.json").read_text())
                 .get("fraction_pdl1_pos_tumor"), "densities": {}}
        for name in GROUPS:
            for r in REGIONS:
                ours, exact = doc["metrics"].get(f"density_{name}_{r}"), truth["density"][f"{name}_{r}"]
                n_truth = truth["counts"][f"{name}_{r}"]
                rel = None if ours is None or not exact else (ours - exact) / exact
                if rel is not None:
                    errors.append({"slide_id": row.slide_id, "group": name, "region": r, "rel_error": rel,
                                   "counted": n_truth >= min_truth_cells})
                entry["densities"][f"{name}_{r}"] = {"ours": ours, "truth": exact, "truth_cells": n_truth,
                                                     "rel_error": rel,
                                                     "absent": doc["absent"].get(f"density_{name}_{r}")}
        slides.append(entry)

    every = pd.DataFrame(errors)
    errs = every[every["counted"]] if len(every) else every
    by_slide = pd.DataFrame(slides).set_index("slide_id")
    patients = []
    for pid, rows in by_slide.groupby("patient_id"):
        tp = rows.set_index("timepoint")
        if not {"pre", "post"} <= set(tp.index):
            continue
        ours = _fold(tp.loc["post", "cd8_tumor_margin"], tp.loc["pre", "cd8_tumor_margin"])
        exact = _fold(tp.loc["post", "truth_cd8_tumor_margin"], tp.loc["pre", "truth_cd8_tumor_margin"])
        patients.append({"patient_id": pid, "response": tp["response"].iloc[0], "cd8_fold": ours,
                         "truth_cd8_fold": exact,
                         "fold_rel_error": None if ours is None or not exact else ours / exact - 1.0})
    pat = pd.DataFrame(patients)
    agree = by_slide["immune_class"].astype(str) == by_slide["truth_immune_class"].astype(str)
    near = by_slide.apply(_near_cutoff, axis=1)
    summary = {
        "n_slides": len(by_slide), "n_density_pairs": len(errs),
        "density_median_abs_rel_error": _median(errs["rel_error"].abs()) if len(errs) else None,
        "density_median_rel_error": _median(errs["rel_error"]) if len(errs) else None,
        "density_median_abs_rel_error_every_pair": _median(every["rel_error"].abs()) if len(every) else None,
        "n_density_pairs_every": len(every),
        "density_median_abs_rel_error_by": ({f"{g}_{r}": _median(e["rel_error"].abs())
                                             for (g, r), e in errs.groupby(["group", "region"])} if len(errs) else {}),
        "fold_median_abs_rel_error": _median(pat["fold_rel_error"].dropna().abs()) if len(pat) else None,
        "fold_max_abs_rel_error": float(pat["fold_rel_error"].dropna().abs().max()) if len(pat) else None,
        "fold_within_10pct": int((pat["fold_rel_error"].dropna().abs() <= 0.10).sum()) if len(pat) else 0,
        "n_patients": len(pat),
        "tps_median_abs_error_points": _median((by_slide["pdl1_tps"].astype(float)
                                                - by_slide["truth_pdl1_tps"].astype(float)).abs()),
        "class_agreement": float(agree.mean()) if len(by_slide) else None,
        "class_agreement_away_from_cutoffs": float(agree[~near].mean()) if (~near).any() else None,
        "n_slides_near_cutoffs": int(near.sum()),
        "class_misses_near_cutoffs": [str(s) for s in by_slide.index[~agree & near]],
        "class_confusion": pd.crosstab(by_slide["truth_immune_class"].astype(str),
                                       by_slide["immune_class"].astype(str)).to_dict(),
    }
    if len(pat) and pat["response"].notna().all() and pat["response"].isin(RESPONSE_ORDER).all():
        summary["ranking"] = _ranking(pat)
    return {"summary": summary, "patients": patients, "slides": slides,
            "params": {"margin_um": margin_um, "min_truth_cells": min_truth_cells, "truth_min_core_mm2": min_core}}


def _near_cutoff(slide: pd.Series, *, within: float = 0.10) -> bool:
    """Whether a truth density that decides the slide's class lies within ``within`` (relative)
    of its cut-off: the core's (the bed's without a core) against the inflamed cut-off, and, for a
    core under it, the margin's against the excluded cut-off. There a measurement error of that
    size flips the class whatever the rule."""
    config = load_config().metrics
    core = slide["class_cd8"]["tumor_core"]["truth"]
    if core is None or "core missing" in str(slide["truth_immune_class_reason"]):
        core = slide["class_cd8"]["tumor"]["truth"]
    margin = slide["class_cd8"]["margin"]["truth"]
    hot, cold = config.inflamed_core_cd8_per_mm2, config.excluded_margin_cd8_per_mm2
    if core is not None and abs(core / hot - 1.0) <= within:
        return True
    return bool(core is not None and core <= hot and margin is not None and abs(margin / cold - 1.0) <= within)


def _fold(post, pre) -> float | None:
    post, pre = (np.nan if v is None else float(v) for v in (post, pre))
    if not (np.isfinite(post) and np.isfinite(pre) and pre > 0):
        return None
    return post / pre


def _median(values) -> float | None:
    values = pd.Series(values, dtype=float).dropna()
    return float(values.median()) if len(values) else None


def _ranking(pat: pd.DataFrame) -> dict:
    """Spearman of CD8 fold with the response order, and the median fold per class (ours and truth)."""
    rank = pat["response"].map({r: i for i, r in enumerate(RESPONSE_ORDER)}).to_numpy(float)
    out = {}
    for col in ("cd8_fold", "truth_cd8_fold"):
        fold = pat[col].to_numpy(float)
        ok = np.isfinite(fold)
        rho, p = spearmanr(rank[ok], fold[ok]) if ok.sum() > 2 else (np.nan, np.nan)
        medians = {r: _median(pat.loc[pat["response"] == r, col]) for r in RESPONSE_ORDER}
        present = [m for m in medians.values() if m is not None]
        out[col] = {"spearman_rho": None if not np.isfinite(rho) else float(rho),
                    "spearman_p": None if not np.isfinite(p) else float(p), "median_by_response": medians,
                    "medians_in_order": bool(all(a < b for a, b in zip(present, present[1:])))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, required=True, help="synthetic cohort folder (manifest.csv, truth/)")
    parser.add_argument("--results", type=Path, required=True, help="tme run output folder")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--margin-um", type=float, default=250.0, help="half-width of the truth margin (µm)")
    parser.add_argument("--min-truth-cells", type=int, default=20,
                        help="fewest truth cells of a group in a region for its relative error (count)")
    args = parser.parse_args(argv)
    report = score(args.cohort, args.results, margin_um=args.margin_um, min_truth_cells=args.min_truth_cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=False, default=str) + "\n")
    print(json.dumps(report["summary"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
