"""Phenotyping accuracy against synthetic truth, and robustness to stain gain.

    .venv/bin/python scripts/eval_phenotype.py --out bench_out/phenotype.json

Held-out synthetic slides (generator seeds 40000.., used for no choice) go
through :func:`tme_pipeline.pipeline.run_slide`, the user path, with the
default configuration (or ``--config``). Every predicted nucleus is matched to
the truth one-to-one at IoU >= 0.5 over the whole slide; on the matched cells,
each phenotype is scored against the truth cell type (``cd8_t`` -> CD8_T,
``treg`` -> Treg, ``cd4_t`` -> CD4_T, ``b_cell`` -> B, ``tumor`` -> tumor,
fibroblasts and macrophages -> other). The PD-L1 tumour proportion score
(% of tumour cells that are PD-L1+) is compared with the truth's, over the
whole slide and over matched cells.

Robustness: the first slide is rendered again with every channel's stain
gain scaled by 0.85 and by 1.15 (same cells, same noise draws) and the CD8_T
count is compared with the unscaled slide's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

TEST_SEED0 = 40_000
TRUTH_PHENOTYPE = {"cd8_t": "CD8_T", "treg": "Treg", "cd4_t": "CD4_T", "b_cell": "B", "tumor": "tumor",
                   "fibroblast": "other", "macrophage": "other"}
# A TLS-rich responder, a cold biopsy, a non-responder resection: small and large
# positive fractions both occur.
SAMPLES = (("post", "responder"), ("pre", "non_responder"), ("post", "non_responder"))
GAIN_SCALES = (0.85, 1.15)

logger = logging.getLogger("eval_phenotype")


def _synth(cache: Path, seed: int, sample: tuple[str, str], size_mm: float, gain_scale: float = 1.0):
    from tme_pipeline.synth import SlideCondition, load_truth, synth_slide

    name = f"s{seed}_{size_mm}mm_g{gain_scale}"
    path, truth_dir = cache / f"{name}.ome.tif", cache / f"{name}_truth"
    if not (truth_dir / "truth.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        condition = SlideCondition.for_sample(*sample)
        synth_slide(path, size_mm=(size_mm, size_mm), seed=seed, condition=condition, truth_dir=truth_dir,
                    gain_scale=gain_scale)
    return path, load_truth(truth_dir)


def _score(truth, slide_dir: Path) -> dict:
    """Per-phenotype counts on matched cells, and the PD-L1 tumour proportion scores."""
    import anndata as ad
    import zarr

    from tme_pipeline.segment.metrics import matched_pairs
    from tme_pipeline.synth import render_truth_labels

    labels = np.asarray(zarr.open_group(str(slide_dir / "labels.ome.zarr"), mode="r")["labels/nuclei/0"][:])
    truth_labels = render_truth_labels(truth, (slice(0, labels.shape[0]), slice(0, labels.shape[1])),
                                       kind="nuclei")
    t_ids, p_ids, _ = matched_pairs(truth_labels, labels, iou_threshold=0.5)
    cells = ad.read_h5ad(slide_dir / "cells.h5ad")
    obs = cells.obs.set_index("cell_id")
    tcells = truth.cells.set_index("cell_id")
    expected = tcells.loc[t_ids, "cell_type"].astype(str).map(TRUTH_PHENOTYPE).to_numpy()
    predicted = obs.loc[p_ids, "phenotype"].astype(str).to_numpy()
    counts = {}
    for name in sorted(set(TRUTH_PHENOTYPE.values())):
        e, p = expected == name, predicted == name
        counts[name] = {"tp": int((e & p).sum()), "fp": int((~e & p).sum()), "fn": int((e & ~p).sum())}
    tumor = obs["phenotype"].astype(str).to_numpy() == "tumor"
    matched_tumor = expected == "tumor"
    viable = tcells.loc[t_ids, "state"].astype(str).to_numpy() != "pyknotic"
    pdl1_true = tcells.loc[t_ids, "PDL1_pos"].to_numpy()
    pdl1_pred = obs.loc[p_ids, "PD-L1_pos"].to_numpy()
    return {
        "n_true_nuclei": int(len(truth.cells)), "n_cells": int(cells.n_obs), "n_matched": int(len(t_ids)),
        "counts": counts,
        "n_CD8_T": int((obs["phenotype"].astype(str) == "CD8_T").sum()),
        "tps_truth_pct": round(float(truth.metrics["fraction_pdl1_pos_tumor"]), 3),
        "tps_pct": round(100 * float(obs["PD-L1_pos"].to_numpy()[tumor].mean()), 3) if tumor.any() else None,
        "tps_matched_truth_pct": round(100 * float(pdl1_true[matched_tumor & viable].mean()), 3),
        "tps_matched_pct": round(100 * float(pdl1_pred[predicted == "tumor"].mean()), 3),
        "gates": {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in g.items()}
                  for m, g in cells.uns.get("gates", {}).items()},
    }


def _f1(counts: dict) -> dict:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {**counts, "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--config", type=Path, default=None, help="YAML merged over the defaults")
    ap.add_argument("--size-mm", type=float, default=1.5, help="edge of each square slide, mm")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tme_eval_phenotype"), help="slides and outputs")
    ap.add_argument("--no-robustness", action="store_true", help="skip the gain-scaled re-renders")
    ap.add_argument("--seed0", type=int, default=TEST_SEED0,
                    help="generator seed of the first slide (the others follow); default the test seeds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from tme_pipeline.config import load_config
    from tme_pipeline.pipeline import run_slide

    config = load_config(args.config)
    report: dict = {"config": str(args.config or "default"), "segmentation": config.segmentation.method, "seed0": args.seed0,
                    "size_mm": args.size_mm, "slides": []}
    pooled = {}
    t0 = time.perf_counter()
    for i, sample in enumerate(SAMPLES):
        seed = args.seed0 + i
        path, truth = _synth(args.work / "slides", seed, sample, args.size_mm)
        out_dir = args.work / "runs" / path.name.removesuffix(".ome.tif")
        run_slide(path, out_dir, config=config, overwrite=True)
        scores = _score(truth, out_dir)
        report["slides"].append({"seed": seed, "sample": list(sample), **scores,
                                 "f1": {k: _f1(v)["f1"] for k, v in scores["counts"].items()}})
        for name, c in scores["counts"].items():
            acc = pooled.setdefault(name, {"tp": 0, "fp": 0, "fn": 0})
            for k in acc:
                acc[k] += c[k]
        logger.info("seed %d: %s", seed, report["slides"][-1]["f1"])
    report["pooled"] = {name: _f1(c) for name, c in pooled.items()}
    report["tps_abs_error_pct_points"] = [round(abs(s["tps_pct"] - s["tps_truth_pct"]), 3)
                                          for s in report["slides"] if s["tps_pct"] is not None]

    if not args.no_robustness:
        base = report["slides"][0]
        rob = {"seed": base["seed"], "n_CD8_T": {"1.0": base["n_CD8_T"]}}
        for g in GAIN_SCALES:
            path, truth = _synth(args.work / "slides", base["seed"], SAMPLES[0], args.size_mm, gain_scale=g)
            out_dir = args.work / "runs" / path.name.removesuffix(".ome.tif")
            run_slide(path, out_dir, config=config, overwrite=True)
            s = _score(truth, out_dir)
            rob["n_CD8_T"][str(g)] = s["n_CD8_T"]
            rob[f"f1_gain{g}"] = {k: _f1(v)["f1"] for k, v in s["counts"].items()}
        rob["relative_change_pct"] = {g: round(100 * (n / base["n_CD8_T"] - 1), 3)
                                      for g, n in rob["n_CD8_T"].items() if g != "1.0"}
        report["robustness"] = rob
    report["seconds"] = round(time.perf_counter() - t0, 1)

    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
