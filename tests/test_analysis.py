"""Paired pre/post analysis (tme_pipeline.analysis, analysis_stats) on hand-built patients.h5ad."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tme_pipeline.analysis import _pseudocount, analyze, group_tests, paired_tests, transitions
from tme_pipeline.analysis_stats import hodges_lehmann, paired_test, rank_biserial, signed_rank_cdf
from tme_pipeline.cli import main

PSEUDO = {"cells/mm2": 1.0, "%": 0.1, "count": 0.5, "mm2": 0.001, "ratio": 0.1}


def make_patients(pre, post, metrics, units, *, response=None, class_pre=None, class_post=None,
                  complete=None, reason=None):
    """A patients.h5ad AnnData as the issue-13 contract describes it (patients x metrics)."""
    pre, post = np.asarray(pre, np.float64), np.asarray(post, np.float64)
    n = pre.shape[0]
    ids = [f"P{i + 1:02d}" for i in range(n)]
    complete = np.ones(n, bool) if complete is None else np.asarray(complete, bool)
    obs = pd.DataFrame({"pre_slide_id": [f"{p}_pre" for p in ids], "post_slide_id": [f"{p}_post" for p in ids],
                        "complete": complete,
                        "reason": reason if reason is not None else [""] * n}, index=pd.Index(ids, name="patient_id"))
    if response is not None:
        obs["response"] = pd.Categorical(response)
    if class_pre is not None:
        obs["immune_class_pre"] = pd.Categorical(class_pre, categories=["inflamed", "excluded", "desert"])
        obs["immune_class_post"] = pd.Categorical(class_post, categories=["inflamed", "excluded", "desert"])
    var = pd.DataFrame({"unit": units, "description": [""] * len(metrics)}, index=pd.Index(metrics))
    c = np.array([PSEUDO[u] for u in units])
    layers = {"pre": pre, "post": post, "delta": post - pre, "log2_fold_change": np.log2((post + c) / (pre + c))}
    uns = {"log2_pseudocount": {"unit": np.array(list(PSEUDO)), "pseudocount": np.array(list(PSEUDO.values()))}}
    return ad.AnnData(X=post - pre, obs=obs, var=var, layers=layers, uns=uns)


def planted_cohort(seed=0, n=10):
    """CD8 density x3 post in every patient, PD-L1 TPS with symmetric noise only, TLS count."""
    rng = np.random.default_rng(seed)
    cd8_pre = rng.lognormal(np.log(80), 0.5, n)
    tps_pre = rng.uniform(10, 50, n)
    pre = np.column_stack([cd8_pre, tps_pre, rng.integers(0, 4, n)])
    post = np.column_stack([cd8_pre * rng.uniform(2.0, 4.0, n), tps_pre + rng.normal(0, 5, n), pre[:, 2] + 1])
    return pre, post, ["density_CD8_T_tumor", "pdl1_tps", "tls_count"], ["cells/mm2", "%", "count"]


def test_planted_increase_found_and_null_metric_not():
    found, false_pos = 0, 0
    for seed in range(20):
        pre, post, metrics, units = planted_cohort(seed)
        res = paired_tests(make_patients(pre, post, metrics, units)).set_index("metric")
        found += res.loc["density_CD8_T_tumor", "p_adjusted"] < 0.05
        false_pos += res.loc["pdl1_tps", "p_adjusted"] < 0.05
    # Ten of ten positive: exact p = 2/1024, BH over three metrics keeps it below 0.05 every time.
    assert found == 20
    # A null metric is found at about the nominal rate; 20 cohorts rarely give more than 3.
    assert false_pos <= 3
    pre, post, metrics, units = planted_cohort(0)
    row = paired_tests(make_patients(pre, post, metrics, units)).set_index("metric").loc["density_CD8_T_tumor"]
    assert row.p_value == pytest.approx(2 / 1024) and row.method == "exact" and row.rank_biserial == 1.0
    assert row.ci_low > 0 and row.ci_level >= 0.95


def test_exact_p_matches_scipy_and_hand_value():
    rng = np.random.default_rng(3)
    pre = rng.normal(10, 2, 8)
    post = pre + rng.normal(0.8, 1.5, 8)
    t = paired_test(pre, post)
    assert t.method == "exact" and t.n_pairs == 8 == t.n_nonzero
    assert t.p_value == pytest.approx(stats.wilcoxon(post - pre, method="exact").pvalue, rel=1e-12)
    # n = 5, all positive: P(W+ = 15) = 1/32, two-sided 1/16.
    t5 = paired_test(np.zeros(5), np.array([0.3, 1.0, 2.5, 4.0, 7.0]))
    assert t5.p_value == 1 / 16 and t5.statistic == 15.0 and t5.rank_biserial == 1.0
    assert signed_rank_cdf(5)[0] == 1 / 32 and signed_rank_cdf(5)[-1] == 1.0


def test_hodges_lehmann_interval_by_hand():
    d = np.array([-2.0, 1.0, 3.0, 4.0, 6.0, 9.0, 15.0])
    # 28 Walsh averages, sorted: -2, -0.5, 0.5, 1, 1, 2, 2, 2.5, 3, 3.5, 3.5, 3.5, 4, 4.5 | 5, 5,
    # 6, 6, 6.5, 6.5, 7.5, 8, 9, 9, 9.5, 10.5, 12, 15. Median (4.5 + 5) / 2 = 4.75.
    # n = 7: P(W+ <= 2) = 3/128 <= 0.025 < P(W+ <= 3) = 5/128, so c = 3: [W_(3), W_(26)],
    # level 1 - 6/128.
    est, low, high, level = hodges_lehmann(d)
    assert (est, low, high) == (4.75, 0.5, 10.5) and level == pytest.approx(1 - 6 / 128)
    # W+ = 28 - rank(|-2|) = 26, W- = 2; exact two-sided p = 2 P(W+ <= 2) = 6/128.
    t = paired_test(np.zeros(7), d)
    assert t.statistic == 26 and t.p_value == pytest.approx(6 / 128)
    assert t.rank_biserial == pytest.approx(24 / 28) == rank_biserial(d)
    assert (t.hl_estimate, t.ci_low, t.ci_high) == (4.75, 0.5, 10.5)
    # alpha 0.25: P(W+ <= 6) = 14/128 <= 0.125 < P(W+ <= 7) = 19/128, so c = 7: [W_(7), W_(22)].
    assert hodges_lehmann(d, alpha=0.25) == (4.75, 2.0, 8.0, 1 - 28 / 128)
    # n = 4: 95 % is unattainable; the widest interval [min, max] and its level 1 - 2/16.
    assert hodges_lehmann(np.array([1.0, 2.0, 4.0, 8.0])) == (3.5, 1.0, 8.0, 0.875)


def test_zero_differences_dropped_from_ranks_kept_in_estimate():
    pre = np.array([5.0, 7.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    post = pre + np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    t = paired_test(pre, post)
    # zero_method "wilcox": the five non-zero differences are ranked, all positive -> 1/16.
    assert (t.n_pairs, t.n_nonzero, t.zero_method) == (7, 5, "wilcox")
    assert t.p_value == 1 / 16 and t.method == "exact" and t.rank_biserial == 1.0
    # The Hodges–Lehmann estimate uses all seven differences, zeros included.
    assert t.hl_estimate == hodges_lehmann(post - pre)[0] != hodges_lehmann(post[2:] - pre[2:])[0]
    flat = paired_test(pre, pre.copy())
    assert np.isnan(flat.p_value) and flat.reason == "all paired differences are zero"


def test_untestable_metric_left_out_of_the_bh_family():
    pre, post, metrics, units = planted_cohort(1)
    pre[:, 1], post[:, 1] = np.nan, np.nan             # all-NaN metric
    pre[2:, 2] = np.nan                                # two complete pairs only
    res = paired_tests(make_patients(pre, post, metrics, units)).set_index("metric")
    assert np.isnan(res.loc["pdl1_tps", "p_value"]) and res.loc["pdl1_tps", "reason"] == "no complete pair"
    assert np.isnan(res.loc["tls_count", "p_adjusted"]) and "2 complete pair" in res.loc["tls_count", "reason"]
    # A family of one: BH leaves the only p-value as it is.
    assert res.loc["density_CD8_T_tumor", "p_adjusted"] == res.loc["density_CD8_T_tumor", "p_value"]


def test_ties_use_the_exact_permutation_and_large_n_the_normal_approximation():
    d = np.array([1.0, 1.0, 2.0, 3.0, -4.0, 5.0])
    tied = paired_test(np.zeros(6), d)
    assert tied.method == "exact permutation"
    # Every one of the 64 sign patterns of the mid-ranks (1.5, 1.5, 3, 4, 5, 6), enumerated.
    ranks = np.array([1.5, 1.5, 3, 4, 5, 6])
    w = np.array(np.meshgrid(*[[0, 1]] * 6)).reshape(6, -1).T @ ranks
    assert tied.statistic == 16.0
    expect = 2 * min(np.mean(w >= 16.0), np.mean(w <= 16.0))
    assert tied.p_value == pytest.approx(expect)
    # scipy's exhaustive permutation (slow) is the oracle of the generating-function count.
    rng = np.random.default_rng(8)
    d = rng.integers(-3, 9, 9).astype(float)
    d[d == 0] = 1.0
    oracle = stats.wilcoxon(d, method=stats.PermutationMethod(n_resamples=np.inf)).pvalue
    assert paired_test(np.zeros(9), d).p_value == pytest.approx(oracle, rel=1e-12)
    d60 = rng.normal(0.5, 1, 60)
    big = paired_test(np.zeros(60), d60)
    assert big.method == "normal approximation" and big.ci_level == 0.95
    assert big.p_value == pytest.approx(stats.wilcoxon(d60, method="asymptotic").pvalue, rel=1e-12)


def test_patient_missing_post_excluded_with_reason(tmp_path):
    pre, post, metrics, units = planted_cohort(2, n=6)
    post[5] = np.nan
    complete = [True] * 5 + [False]
    reason = [""] * 5 + ["no post slide"]
    make_patients(pre, post, metrics, units, complete=complete, reason=reason).write_h5ad(tmp_path / "patients.h5ad")
    folder = analyze(tmp_path, key_metrics=[])
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["patients"] == {"n": 6, "complete": 5, "incomplete": 1, "excluded": {"P06": "no post slide"}}
    table = pd.read_csv(folder / "paired_tests.csv")
    assert (table["n_pairs"] == 5).all() and (table["group"] == "all").all()


def test_grouped_rows_per_level_and_between_group_tests():
    pre, post, metrics, units = planted_cohort(4, n=9)
    response = ["responder"] * 3 + ["partial_responder"] * 3 + ["non_responder"] * 3
    post[6:, 0] = pre[6:, 0] * np.array([0.9, 1.05, 1.1])   # non-responders barely change
    patients = make_patients(pre, post, metrics, units, response=response)
    res = paired_tests(patients, group="response")
    counts = res.groupby(["group", "metric"]).size()
    assert set(res["group"]) == {"all", "responder", "partial_responder", "non_responder"}
    assert (counts == 1).all() and len(counts) == 4 * len(metrics)
    assert (res.loc[res["group"] != "all", "n_pairs"] == 3).all()
    between = group_tests(patients, "response").set_index("metric")
    assert between.loc["density_CD8_T_tumor", "test"] == "Kruskal-Wallis H"
    assert between.loc["density_CD8_T_tumor", "p_value"] == pytest.approx(
        stats.kruskal(*[(post - pre)[i:i + 3, 0] for i in (0, 3, 6)]).pvalue)
    two = group_tests(patients[:6], "response").set_index("metric")
    assert two.loc["density_CD8_T_tumor", "test"] == "Mann-Whitney U"


def test_transition_table_and_cold_to_hot():
    pre, post, metrics, units = planted_cohort(5, n=6)
    patients = make_patients(pre, post, metrics, units,
                             class_pre=["desert", "excluded", "desert", "inflamed", "inflamed", None],
                             class_post=["inflamed", "inflamed", "desert", "inflamed", "excluded", "inflamed"])
    table, cold_to_hot = transitions(patients)
    assert cold_to_hot == 2 and int(table.to_numpy().sum()) == 5   # P06 has no pre class
    assert table.loc["desert", "desert"] == 1 and table.loc["inflamed", "excluded"] == 1
    assert list(table.index) == list(table.columns) == ["inflamed", "excluded", "desert"]


def test_cli_writes_the_analysis(tmp_path, capsys):
    pre, post, metrics, units = planted_cohort(6)
    response = ["responder", "non_responder"] * 5
    make_patients(pre, post, metrics, units, response=response, class_pre=["desert"] * 10,
                  class_post=["inflamed"] * 3 + ["desert"] * 7).write_h5ad(tmp_path / "patients.h5ad")
    assert main(["analyze", str(tmp_path), "--group", "response"]) == 0
    folder = tmp_path / "analysis"
    for name in ("paired_tests.csv", "group_tests.csv", "transitions.csv", "heatmap_log2fc.png",
                 "slope_density_CD8_T_tumor.png", "slope_tls_count.png", "analysis.json"):
        assert (folder / name).stat().st_size > 0, name
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["cold_to_hot"] == 3 and summary["parameters"]["group"] == "response"
    assert sum(summary["cold_to_hot_by_group"].values()) == 3
    assert [r["metric"] for r in summary["significant"]][:1] == ["density_CD8_T_tumor"]
    assert set(summary["files"]) == {p.name for p in folder.iterdir()} - {"analysis.json"}
    assert not list(tmp_path.glob(".analysis*"))   # no partial folder left behind
    assert main(["analyze", str(tmp_path), "--metrics", "pdl1_tps"]) == 0
    assert list(pd.read_csv(folder / "paired_tests.csv")["metric"]) == ["pdl1_tps"]


def test_bad_input_names_what_is_wrong(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "patients.h5ad" in capsys.readouterr().err
    pre, post, metrics, units = planted_cohort(7)
    make_patients(pre, post, metrics, units).write_h5ad(tmp_path / "patients.h5ad")
    assert main(["analyze", str(tmp_path), "--metrics", "density_cd8"]) == 2
    assert "'density_cd8'" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--group", "response"]) == 2
    assert "no column 'response'" in capsys.readouterr().err
    make_patients(pre, post, metrics, units, complete=[False] * 10).write_h5ad(tmp_path / "patients.h5ad")
    with pytest.raises(ValueError, match="no patient has both timepoints"):
        analyze(tmp_path)


def test_pseudocount_read_as_the_cohort_tables_write_it(tmp_path):
    pre, post, metrics, units = planted_cohort(9)
    make_patients(pre, post, metrics, units).write_h5ad(tmp_path / "patients.h5ad")
    patients = ad.read_h5ad(tmp_path / "patients.h5ad")
    assert _pseudocount(patients, "density_CD8_T_tumor", "cells/mm2") == 1.0
    assert _pseudocount(patients, "tls_count", "count") == 0.5
    assert _pseudocount(patients, "pdl1_cps", "score") == 0.1     # a unit it does not list


def test_analyze_reads_what_the_cohort_tables_write(tmp_path):
    """The contract end to end: metrics.json per slide -> write_cohort_tables -> analyze."""
    from test_cohort_tables import write_results

    from tme_pipeline.cohort_tables import write_cohort_tables

    classes = {"P1": ("desert", "inflamed"), "P2": ("excluded", "inflamed"), "P3": ("inflamed", "inflamed")}
    slides = [(f"{p}_{t}", p, t, "responder" if i % 2 else "non_responder", "site", "done",
               classes.get(p, ("desert", "desert"))[k])
              for i, p in enumerate(["P1", "P2", "P3", "P4", "P5", "P6"]) for k, t in enumerate(["pre", "post"])]
    slides.append(("P7_pre", "P7", "pre", "responder", "site", "done", "desert"))
    pre_cd8 = {}

    def plant(slide_id, metrics):
        # post CD8 density = 3 x pre + 10 in every patient: six of six pairs increase
        patient, timepoint = slide_id.split("_")
        if timepoint == "pre":
            pre_cd8[patient] = metrics["metrics"]["density_CD8_T_tumor"]
        else:
            metrics["metrics"]["density_CD8_T_tumor"] = 3 * pre_cd8[patient] + 10

    out, _ = write_results(tmp_path, slides, edit=plant)
    write_cohort_tables(out)
    folder = analyze(out, group="response")
    tests = pd.read_csv(folder / "paired_tests.csv").set_index(["group", "metric"])
    row = tests.loc[("all", "density_CD8_T_tumor")]
    assert row.n_pairs == 6 and row.p_value == pytest.approx(2 / 64) and row.unit == "cells/mm2"
    assert set(tests.index.get_level_values("group")) == {"all", "responder", "non_responder"}
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["patients"]["excluded"] == {"P7": "no post slide in the manifest"}
    assert summary["cold_to_hot"] == 2 and sum(map(sum, [r.values() for r in summary["transitions"].values()])) == 6
    patients = ad.read_h5ad(out / "patients.h5ad")
    assert _pseudocount(patients, "density_CD8_T_tumor", "cells/mm2") == 1.0


def test_primary_metrics_are_their_own_bh_family_and_come_first():
    pre, post, metrics, units = planted_cohort(11)
    # many null metrics beside the planted one: BH over all of them dilutes the CD8 p-value
    rng = np.random.default_rng(11)
    nulls = rng.normal(50, 10, (10, 30))
    pre = np.column_stack([pre, nulls])
    post = np.column_stack([post, nulls + rng.normal(0, 5, (10, 30))])
    metrics = metrics + [f"null_{k}" for k in range(30)]
    units = units + ["%"] * 30
    patients = make_patients(pre, post, metrics, units, response=["responder", "non_responder"] * 5)
    pooled = paired_tests(patients).set_index("metric")
    split = paired_tests(patients, primary=["density_CD8_T_tumor"], group="response")
    overall = split[split["group"] == "all"]
    assert list(overall["metric"])[0] == "density_CD8_T_tumor" and list(overall["family"]).count("primary") == 1
    first = overall.iloc[0]
    # a family of one: its adjusted p is its own p, below what BH over 33 metrics gives it
    assert first.p_adjusted == first.p_value == pytest.approx(2 / 1024)
    assert pooled.loc["density_CD8_T_tumor", "p_adjusted"] > first.p_adjusted
    # the exploratory family is BH over the other 32 tested metrics only
    rest = overall[overall["family"] == "exploratory"].set_index("metric")
    np.testing.assert_allclose(rest["p_adjusted"], stats.false_discovery_control(rest["p_value"]), rtol=1e-12)
    # per group: the primary row first in each level too
    for level in ("responder", "non_responder"):
        assert split[split["group"] == level].iloc[0]["family"] == "primary"
    # a primary metric is tested even when --metrics leaves it out
    only = paired_tests(patients, metrics=["pdl1_tps"], primary=["density_CD8_T_tumor"])
    assert list(only["metric"]) == ["density_CD8_T_tumor", "pdl1_tps"]


def test_analyze_takes_the_primary_metrics_from_the_run_config(tmp_path):
    pre, post, metrics, units = planted_cohort(12)
    make_patients(pre, post, metrics, units).write_h5ad(tmp_path / "patients.h5ad")
    # no run.json: the default primary metric, which this table lacks, is left out and listed
    summary = json.loads((analyze(tmp_path) / "analysis.json").read_text())
    assert summary["primary_missing"] == ["density_CD8_T_tumor_margin"] and summary["primary_results"] == []
    (tmp_path / "run.json").write_text(json.dumps({"config": {"analysis": {"primary_metrics": ["tls_count"]}}}))
    folder = analyze(tmp_path)
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["parameters"]["primary_metrics"] == ["tls_count"] and "run.json" in summary["parameters"][
        "primary_source"]
    assert [r["metric"] for r in summary["primary_results"]] == ["tls_count"]
    assert pd.read_csv(folder / "paired_tests.csv").iloc[0][["metric", "family"]].tolist() == ["tls_count", "primary"]
    assert (folder / "slope_tls_count.png").is_file()
    # an explicit argument wins over the run's config
    summary = json.loads((analyze(tmp_path, primary_metrics=["pdl1_tps"]) / "analysis.json").read_text())
    assert [r["metric"] for r in summary["primary_results"]] == ["pdl1_tps"]
    assert summary["parameters"]["primary_source"] == "argument"
