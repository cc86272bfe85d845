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

Lineage confusions, on the matched cells: the confusion matrix (truth phenotype ->
called phenotype, cell counts) per slide and pooled, and two rates: true B cells called a
T cell (CD4_T, CD8_T or Treg) over all matched true B cells, and true CD4_T cells called
CD8_T over all matched true CD4_T cells.

Development slides (every choice is made on them): ``--seed0 50000``. ``--style`` renders
the slides in another of the generator's styles (e.g. the different-lab one, on new seeds
such as ``--seed0 60000``).

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
T_CELLS = ("CD4_T", "CD8_T", "Treg")

logger = logging.getLogger("eval_phenotype")

# Phenotypes are scored on the table of the phenotype stage; the stages after it (TLS,
# regions, pictures) change no call, so they are not run.
from tme_pipeline.results import PHENOTYPED  # noqa: E402


def _phenotype_stages():
    from tme_pipeline.stages import STAGES

    names = [s.name for s in STAGES]
    return STAGES[:names.index("phenotype") + 1]


def _synth(cache: Path, seed: int, sample: tuple[str, str], size_mm: float, gain_scale: float = 1.0,
           style: str | None = None):
    from tme_pipeline.synth import SlideCondition, load_truth, synth_slide

    name = f"s{seed}_{size_mm}mm_g{gain_scale}" + (f"_{style}" if style else "")
    path, truth_dir = cache / f"{name}.ome.tif", cache / f"{name}_truth"
    if not (truth_dir / "truth.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        condition = SlideCondition.for_sample(*sample)
        # The default style is the generator's own default: no keyword, so older generators work.
        extra = {"style": style} if style else {}
        synth_slide(path, size_mm=(size_mm, size_mm), seed=seed, condition=condition, truth_dir=truth_dir,
                    gain_scale=gain_scale, **extra)
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
    cells = ad.read_h5ad(slide_dir / PHENOTYPED)
    obs = cells.obs.set_index("cell_id")
    tcells = truth.cells.set_index("cell_id")
    expected = tcells.loc[t_ids, "cell_type"].astype(str).map(TRUTH_PHENOTYPE).to_numpy()
    predicted = obs.loc[p_ids, "phenotype"].astype(str).to_numpy()
    counts, confusion = {}, {}
    for name in sorted(set(TRUTH_PHENOTYPE.values())):
        called = predicted[expected == name]
        confusion[name] = {c: int(k) for c, k in zip(*np.unique(called, return_counts=True))}
        e, p = expected == name, predicted == name
        counts[name] = {"tp": int((e & p).sum()), "fp": int((~e & p).sum()), "fn": int((e & ~p).sum())}
    tumor = obs["phenotype"].astype(str).to_numpy() == "tumor"
    matched_tumor = expected == "tumor"
    viable = tcells.loc[t_ids, "state"].astype(str).to_numpy() != "pyknotic"
    pdl1_true = tcells.loc[t_ids, "PDL1_pos"].to_numpy()
    pdl1_pred = obs.loc[p_ids, "PD-L1_pos"].to_numpy()
    return {
        "n_true_nuclei": int(len(truth.cells)), "n_cells": int(cells.n_obs), "n_matched": int(len(t_ids)),
        "counts": counts, "confusion": confusion, **_confusion_rates(confusion),
        "n_CD8_T": int((obs["phenotype"].astype(str) == "CD8_T").sum()),
        "tps_truth_pct": round(float(truth.metrics["fraction_pdl1_pos_tumor"]), 3),
        "tps_pct": round(100 * float(obs["PD-L1_pos"].to_numpy()[tumor].mean()), 3) if tumor.any() else None,
        "tps_matched_truth_pct": round(100 * float(pdl1_true[matched_tumor & viable].mean()), 3),
        "tps_matched_pct": round(100 * float(pdl1_pred[predicted == "tumor"].mean()), 3),
        "gates": {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in g.items()}
                  for m, g in cells.uns.get("gates", {}).items()},
    }


def _confusion_rates(confusion: dict) -> dict:
    """True B called a T cell, and true CD4_T called CD8_T: counts and fractions of the true cells."""
    b, cd4 = confusion.get("B", {}), confusion.get("CD4_T", {})
    n_b, n_cd4 = sum(b.values()), sum(cd4.values())
    b_t, cd4_cd8 = sum(b.get(t, 0) for t in T_CELLS), cd4.get("CD8_T", 0)
    return {"b_called_t": {"n": b_t, "of": n_b, "rate": round(b_t / n_b, 4) if n_b else None},
            "cd4_called_cd8": {"n": cd4_cd8, "of": n_cd4, "rate": round(cd4_cd8 / n_cd4, 4) if n_cd4 else None}}


def _exclusive_counts(slide_dir: Path) -> dict:
    import anndata as ad

    cells = ad.read_h5ad(slide_dir / PHENOTYPED, backed="r")
    try:
        return {k: {c: int(n) for c, n in v.items()} for k, v in cells.uns["phenotyping"].get("exclusive", {}).items()}
    finally:
        cells.file.close()


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
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the stages the pipeline finds current for this configuration (to compare "
                    "configurations on one checkout); default: recompute every stage")
    ap.add_argument("--style", default=None,
                    help="the generator's rendering style (e.g. its different-lab one); default its default")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from tme_pipeline.config import load_config
    from tme_pipeline.pipeline import run_slide

    config = load_config(args.config)
    report: dict = {"config": str(args.config or "default"), "segmentation": config.segmentation.method, "seed0": args.seed0,
                    "style": args.style or "default",
                    "neighbour_correction": config.cells.neighbour_correction,
                    "exclusive": [list(p) for p in config.gating.exclusive],
                    "size_mm": args.size_mm, "slides": []}
    pooled, pooled_confusion = {}, {}
    t0 = time.perf_counter()
    for i, sample in enumerate(SAMPLES):
        seed = args.seed0 + i
        path, truth = _synth(args.work / "slides", seed, sample, args.size_mm, style=args.style)
        out_dir = args.work / "runs" / path.name.removesuffix(".ome.tif")
        run_slide(path, out_dir, config=config, force=not args.reuse, stages=_phenotype_stages())
        scores = _score(truth, out_dir)
        report["slides"].append({"seed": seed, "sample": list(sample), **scores,
                                 "exclusive_counts": _exclusive_counts(out_dir),
                                 "f1": {k: _f1(v)["f1"] for k, v in scores["counts"].items()}})
        for name, c in scores["counts"].items():
            acc = pooled.setdefault(name, {"tp": 0, "fp": 0, "fn": 0})
            for k in acc:
                acc[k] += c[k]
        for name, row in scores["confusion"].items():
            acc = pooled_confusion.setdefault(name, {})
            for called, k in row.items():
                acc[called] = acc.get(called, 0) + k
        logger.info("seed %d: %s", seed, report["slides"][-1]["f1"])
    report["pooled"] = {name: _f1(c) for name, c in pooled.items()}
    report["pooled_confusion"] = pooled_confusion
    report.update({f"pooled_{k}": v for k, v in _confusion_rates(pooled_confusion).items()})
    report["tps_abs_error_pct_points"] = [round(abs(s["tps_pct"] - s["tps_truth_pct"]), 3)
                                          for s in report["slides"] if s["tps_pct"] is not None]

    if not args.no_robustness:
        base = report["slides"][0]
        rob = {"seed": base["seed"], "n_CD8_T": {"1.0": base["n_CD8_T"]}}
        for g in GAIN_SCALES:
            path, truth = _synth(args.work / "slides", base["seed"], SAMPLES[0], args.size_mm, gain_scale=g,
                                 style=args.style)
            out_dir = args.work / "runs" / path.name.removesuffix(".ome.tif")
            run_slide(path, out_dir, config=config, force=not args.reuse, stages=_phenotype_stages())
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
