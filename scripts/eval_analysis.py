"""Acceptance of ``tme analyze`` on the planted cohort (issue 13): the CD8 increase is found,
a metric with no planted effect is not, and the immune-class transitions.

    .venv/bin/tme synth --out C --patients 10 --seed 90000 --size-mm 2 1.5 --post-size-mm 3 2 --partial-responders
    # on the pipeline's results (a finished `tme run C/manifest.csv --out RESULTS`):
    .venv/bin/python scripts/eval_analysis.py --cohort C --results RESULTS --work COPY --out bench_out/analysis.json
    # before the pipeline has run: on a patients.h5ad built from the synthetic truth
    .venv/bin/python scripts/eval_analysis.py --cohort C --work TRUTH_OUT --out bench_out/analysis_truth.json

With ``--results``, RESULTS is hard-linked into COPY (``cp -al``; stages never write into a
shared file), ``tme run`` brings COPY up to date (only stale stages run), and
``tme analyze COPY --group response`` writes ``COPY/analysis``. Without it, COPY gets a
``patients.h5ad`` built from ``C/truth/<slide>/metrics.json`` (the generator's own counts;
names mapped to the pipeline's, e.g. ``density_cd8_t_tumor`` -> ``density_CD8_T_tumor``;
the truth's immune class uses the tumour compartment's CD8 density for the core, thresholds
100 / 200 CD8/mm² as the metrics config's defaults), plus the primary endpoint
``density_CD8_T_tumor_margin`` computed from the truth's grid and cells with the metrics'
definition (viable bed + margin, ``eval_metrics.truth_densities``), and is analysed the same way.
``--no-update`` analyses RESULTS' copy as it is (no ``tme run``), e.g. after re-running only the
metrics stage and the cohort tables.

The planted effect (``tme_pipeline/synth/condition.py``): post-treatment CD8 density x3
(responders), x1.8 (partial), x1.15 (non-responders) against the same slide unplanted, in the
tumour bed, its 250 µm margin and so in tumour + margin, clusters and TLS counted (generator
version 3; before it the factor acted on the diffuse cells of the generator's own 100 µm
margin and viable tumour only, so the measured tumour + margin density did not carry it).
The pre -> post fold also holds what differs between a biopsy and a resection (more TLS in
responders' resections, the mix of tumour edge and stroma in the band). Null metrics: the CD4 T
density in the tumour (core), which no condition changes (``synth/cells.py``: ``35 * imm``
in viable tumour, ``imm`` shared by a patient's two slides), and the PD-L1 tumour proportion
(``pdl1_fraction`` 0.3 at both timepoints).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

EFFECT = ("density_CD8_T_tumor_margin", "density_CD8_T_tumor", "density_CD8_T_margin", "density_CD8_T_tumor_core")
NULL = ("density_CD4_T_tumor_core", "pdl1_tps", "density_CD4_T_tumor", "fraction_pdl1_pos_tumor")
GROUPS = {"cd8_t": "CD8_T", "cd4_t": "CD4_T", "treg": "Treg", "b_cell": "B", "t_cell": "t_cells", "tumor": "tumor"}
PSEUDO = {"cells/mm2": 1.0, "%": 0.1, "count": 0.5, "mm2": 0.001, "ratio": 0.1, "1/mm2": 0.1}


def _truth_name(name: str) -> tuple[str, str, float]:
    """Pipeline name, unit and scale of a truth metric."""
    parts = name.split("_")
    if name.startswith(("density_", "fraction_")) and name != "fraction_pdl1_pos_tumor":
        kind, region = parts[0], parts[-1]
        group = "_".join(parts[1:-1])
        unit = "cells/mm2" if kind == "density" else "%"
        return f"{kind}_{GROUPS.get(group, group)}_{region}", unit, 1.0
    if name.startswith("area_"):
        return name, "mm2", 1.0
    if name.startswith("ratio_"):
        return name, "ratio", 1.0
    if name == "tls_per_mm2":
        return name, "1/mm2", 1.0
    if name == "tls_area_fraction":
        return name, "%", 100.0          # the truth's is a fraction, the pipeline's a percentage
    if name == "fraction_pdl1_pos_tumor":
        return name, "%", 1.0
    return name, "count", 1.0


def _truth_class(m: dict) -> str:
    core, margin = m["density_cd8_t_tumor"], m["density_cd8_t_margin"]
    return "inflamed" if core > 100 else "excluded" if margin > 200 else "desert"


def truth_patients(cohort: Path):
    """patients.h5ad (the issue-13 contract) from the truth metrics of a synthetic cohort."""
    import anndata as ad

    manifest = pd.read_csv(cohort / "manifest.csv", dtype=str)
    manifest["slide_id"] = manifest["slide"].map(lambda s: Path(s).name.split(".")[0])
    truth = {sid: json.loads((cohort / "truth" / sid / "metrics.json").read_text()) for sid in manifest["slide_id"]}
    first = truth[manifest["slide_id"].iloc[0]]
    mapped = {k: _truth_name(k) for k in sorted(first)}
    names = [v[0] for v in mapped.values()]
    units = [v[1] for v in mapped.values()]
    patients = sorted(manifest["patient_id"].unique())
    layers = {}
    slide = {}
    for tp in ("pre", "post"):
        rows = manifest[manifest["timepoint"] == tp].set_index("patient_id")
        slide[tp] = [rows.loc[p, "slide_id"] for p in patients]
        layers[tp] = np.array([[np.nan if truth[s][k] is None else truth[s][k] * mapped[k][2] for k in mapped]
                               for s in slide[tp]], np.float64)
    from eval_metrics import truth_densities

    from tme_pipeline.config import load_config

    min_core = load_config().regions.min_region_area_mm2
    names.append("density_CD8_T_tumor_margin")
    units.append("cells/mm2")
    for tp in ("pre", "post"):
        extra = [truth_densities(cohort / "truth" / sid, margin_um=250.0, min_core_mm2=min_core)["density"]
                 ["CD8_T_tumor_margin"] for sid in slide[tp]]
        layers[tp] = np.column_stack([layers[tp], np.array([np.nan if v is None else v for v in extra])])
    c = np.array([PSEUDO[u] for u in units])
    layers["delta"] = layers["post"] - layers["pre"]
    layers["log2_fold_change"] = np.log2((layers["post"] + c) / (layers["pre"] + c))
    response = manifest.drop_duplicates("patient_id").set_index("patient_id").loc[patients, "response"]
    obs = pd.DataFrame({"response": response.to_numpy(), "pre_slide_id": slide["pre"], "post_slide_id": slide["post"],
                        "immune_class_pre": [_truth_class(truth[s]) for s in slide["pre"]],
                        "immune_class_post": [_truth_class(truth[s]) for s in slide["post"]],
                        "complete": True, "reason": ""}, index=pd.Index(patients, name="patient_id"))
    var = pd.DataFrame({"unit": units, "description": "synthetic truth"}, index=pd.Index(names))
    uns = {"log2_pseudocount": {"unit": np.array(list(PSEUDO)), "pseudocount": np.array(list(PSEUDO.values()))}}
    return ad.AnnData(X=layers["delta"].copy(), obs=obs, var=var, layers=layers, uns=uns)


def summarise(folder: Path) -> dict:
    """The acceptance figures from ``OUT/analysis``."""
    tests = pd.read_csv(folder / "paired_tests.csv")
    tests[["method", "reason"]] = tests[["method", "reason"]].fillna("")
    summary = json.loads((folder / "analysis.json").read_text())
    cols = ["n_pairs", "median_pre", "median_post", "hl_estimate", "ci_low", "ci_high", "ci_level", "p_value",
            "p_adjusted", "rank_biserial", "method"]

    def rows(metrics):
        out = {}
        for m in metrics:
            sel = tests[tests["metric"] == m]
            if len(sel):
                out[m] = {g: {c: None if (c != "method" and pd.isna(r[c])) else r[c] for c in cols}
                          for g, r in sel.set_index("group").iterrows()}
        return out

    overall = tests[tests["group"] == "all"]
    between = folder / "group_tests.csv"
    return {
        "effect": rows(EFFECT),
        "null": rows(NULL),
        "n_metrics": int(len(overall)),
        "n_significant": int((overall["p_adjusted"] < 0.05).sum()),
        "primary": summary["parameters"].get("primary_metrics"),
        "primary_results": summary.get("primary_results"),
        "significant": [r["metric"] for r in summary["significant"]],
        "transitions": summary["transitions"],
        "cold_to_hot": summary["cold_to_hot"],
        "cold_to_hot_by_group": summary.get("cold_to_hot_by_group"),
        "group_tests": (pd.read_csv(between).set_index("metric").loc[[m for m in (*EFFECT, *NULL) if m in
                        set(pd.read_csv(between)["metric"])], ["test", "p_value", "p_adjusted"]]
                        .to_dict(orient="index") if between.is_file() else None),
        "patients": summary["patients"],
    }


def key_family(path: Path, group: str) -> dict:
    """The same tests with the BH family the pre-specified key metrics (plus the null metrics),
    as ``tme analyze --metrics`` would give; and the median log2 fold change per group."""
    import anndata as ad

    from tme_pipeline.analysis import KEY_METRICS, paired_tests

    patients = ad.read_h5ad(path)
    family = [m for m in (*KEY_METRICS, *EFFECT, *NULL) if m in set(patients.var_names)]
    family = list(dict.fromkeys(family))
    tests = paired_tests(patients, metrics=family).set_index("metric")
    lfc = pd.DataFrame(np.asarray(patients.layers["log2_fold_change"]), index=patients.obs_names,
                       columns=patients.var_names)
    complete = np.asarray(patients.obs["complete"], bool)
    by_group = lfc[complete].groupby(patients.obs.loc[complete, group].astype(str).to_numpy()).median()
    return {"key_family": {"metrics": family,
                           "p_adjusted": {m: None if pd.isna(v) else float(v) for m, v in tests["p_adjusted"].items()}},
            "median_log2fc_by_group": {m: by_group[m].round(3).to_dict() for m in (*EFFECT, *NULL) if m in by_group}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, required=True, help="synthetic cohort (manifest.csv, truth/)")
    ap.add_argument("--results", type=Path, default=None, help="a finished tme run of the cohort (read-only)")
    ap.add_argument("--work", type=Path, required=True, help="folder analysed: a hard-linked copy, or the truth's")
    ap.add_argument("--group", default="response")
    ap.add_argument("--no-update", action="store_true", help="analyse the copy as it is: no tme run")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args(argv)
    from tme_pipeline.analysis import analyze
    from tme_pipeline.results import LOCK_FILE

    if args.results is not None:
        if not args.work.exists():
            subprocess.run(["cp", "-al", str(args.results), str(args.work)], check=True)
            # A hard-linked lock file is the same inode: its flock would tie the copy to the
            # original's (and every other copy's) runs.
            (args.work / LOCK_FILE).unlink(missing_ok=True)
        if not args.no_update:
            tme = Path(sys.executable).with_name("tme")
            subprocess.run([str(tme), "run", str(args.cohort / "manifest.csv"), "--out", str(args.work)], check=True)
        mode = "pipeline"
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        truth_patients(args.cohort).write_h5ad(args.work / "patients.h5ad")
        mode = "truth"
    folder = analyze(args.work, group=args.group)
    result = {"mode": mode, "cohort": str(args.cohort), "work": str(args.work), "group": args.group,
              **summarise(folder), **key_family(args.work / "patients.h5ad", args.group)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("mode", "n_metrics", "n_significant", "cold_to_hot", "transitions")}))
    key = result["key_family"]["p_adjusted"]
    for kind in ("effect", "null"):
        for m, by in result[kind].items():
            a = by["all"]
            print(f"{kind:<6} {m:<28} n={a['n_pairs']} HL {a['hl_estimate']:.4g} [{a['ci_low']:.4g}, {a['ci_high']:.4g}] "
                  f"p={a['p_value']:.4g} BH p (its family) {a['p_adjusted']:.4g}, (key family) {key.get(m, float('nan')):.4g}; "
                  f"median log2 fold by group {result['median_log2fc_by_group'].get(m)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
