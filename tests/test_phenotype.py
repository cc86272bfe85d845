import anndata as ad
import numpy as np
import pytest
from phenotype_fixtures import MARKERS, cell_types, make_cells

from tme_pipeline.config import CompensationConfig, GatingConfig, load_config
from tme_pipeline import autogate
from tme_pipeline.autogate import estimate_background, fit_two_gaussians
from tme_pipeline.autogate import Gate
from tme_pipeline.phenotype import gate_score, phenotype_cells, resolve_exclusive, weak_gate

RULES = load_config().phenotypes


def _f1(called: np.ndarray, truth: np.ndarray) -> float:
    return 2 * (called & truth).sum() / max(called.sum() + truth.sum(), 1)


def _one_marker(p: float, *, seed: int, n: int = 20000, **kw):
    truth = {"CD8": np.random.default_rng([seed, 9]).random(n) < p}
    cells, _ = make_cells(truth, seed=seed, markers=("DAPI", "CD8"), **kw)
    return cells, truth["CD8"]


# ----------------------------------------------------------------- building blocks

def test_mixture_em_recovers_two_gaussians_raw_and_binned():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0.0, 0.3, 7000), rng.normal(3.0, 0.5, 3000)])
    mix = fit_two_gaussians(x)
    assert mix.converged
    np.testing.assert_allclose(mix.means, [0.0, 3.0], atol=0.03)
    np.testing.assert_allclose(mix.sds, [0.3, 0.5], atol=0.03)
    np.testing.assert_allclose(mix.weights, [0.7, 0.3], atol=0.015)
    counts, edges = np.histogram(x, bins=np.arange(x.min(), x.max() + 0.01, 0.01))
    binned = fit_two_gaussians((edges[:-1] + edges[1:]) / 2, counts)
    np.testing.assert_allclose(binned.means, mix.means, atol=0.01)
    np.testing.assert_allclose(binned.sds, mix.sds, atol=0.01)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.6])
def test_background_is_the_negative_mode_at_any_positive_fraction(p):
    rng = np.random.default_rng(4)
    n = 20000
    pos = rng.random(n) < p
    x = np.where(pos, rng.lognormal(np.log(3000), 0.35, n), rng.normal(300.0, 15.0, n))
    bg, sd = estimate_background(x)
    assert abs(bg - 300.0) < 3.0
    assert abs(sd - 15.0) < 1.5


def test_background_of_empty_and_constant_input():
    assert np.isnan(estimate_background(np.array([np.nan]))).all()
    assert estimate_background(np.full(10, 7.0)) == (7.0, 0.0)


# ----------------------------------------------------------------- automatic gates

@pytest.mark.parametrize("p", [0.01, 0.02, 0.2, 0.5, 0.6])
def test_automatic_gate_recovers_positivity(p):
    cells, truth = _one_marker(p, seed=int(p * 100))
    result = phenotype_cells(cells, gating=GatingConfig(), phenotypes=(), slide_id="S1")
    assert _f1(cells.obs["CD8_pos"].to_numpy(), truth) >= 0.95
    gate = result.gates["CD8"]
    assert gate.background < gate.gate < np.quantile(cells.X[truth, 1], 0.05)
    assert gate.positive_fraction == pytest.approx(cells.obs["CD8_pos"].mean())


def test_separated_population_gets_a_data_driven_gate_and_high_quality():
    cells, _ = _one_marker(0.2, seed=1)
    gate = phenotype_cells(cells, gating=GatingConfig(), phenotypes=(), slide_id="S1").gates["CD8"]
    assert gate.method in ("valley", "mixture") and gate.quality > 0.8 and not gate.flagged


def test_channel_without_positives_is_flagged_and_calls_almost_none():
    cells, _ = _one_marker(0.0, seed=2)
    result = phenotype_cells(cells, gating=GatingConfig(), phenotypes=(), slide_id="S7")
    gate = result.gates["CD8"]
    assert gate.method == "fallback" and gate.flagged
    assert gate.n_positive <= 0.002 * cells.n_obs
    assert any("'S7'" in f and "'CD8'" in f for f in result.flags)


def test_log_transform_gates_too():
    cells, truth = _one_marker(0.2, seed=5)
    result = phenotype_cells(cells, gating=GatingConfig(transform="log"), phenotypes=(), slide_id="S1")
    assert result.gates["CD8"].transform == "log"
    assert _f1(cells.obs["CD8_pos"].to_numpy(), truth) >= 0.95


@pytest.mark.parametrize("scale", [0.85, 1.15])
def test_gate_moves_with_intensity_scale(scale):
    ref, _ = _one_marker(0.2, seed=6)
    scaled, _ = _one_marker(0.2, seed=6, scale=scale)
    g_ref = phenotype_cells(ref, gating=GatingConfig(), phenotypes=(), slide_id="S").gates["CD8"]
    g = phenotype_cells(scaled, gating=GatingConfig(), phenotypes=(), slide_id="S").gates["CD8"]
    assert g.gate / g_ref.gate == pytest.approx(scale, rel=0.01)
    assert g.background / g_ref.background == pytest.approx(scale, rel=0.01)
    assert abs(g.n_positive - g_ref.n_positive) <= 0.03 * g_ref.n_positive


def test_all_zero_channel_has_no_positives_and_is_flagged():
    types, truth = cell_types(3000, seed=8)
    cells, _ = make_cells(truth, seed=8)
    cells.X[:, list(cells.var_names).index("CD20")] = 0.0
    result = phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, slide_id="P03_pre")
    gate = result.gates["CD20"]
    assert gate.method == "none" and gate.flagged and gate.n_positive == 0
    assert not cells.obs["CD20_pos"].any()
    assert result.counts["B"] == 0
    assert any("'P03_pre'" in f and "'CD20'" in f for f in result.flags)


# ----------------------------------------------------------------- manual gates

def test_manual_gates_per_slide_beat_global_beat_automatic():
    cells, _ = _one_marker(0.2, seed=9, n=3000)
    gating = GatingConfig(manual={"CD8": 900.0}, per_slide={"S1": {"CD8": 2500.0}})
    x = cells.X[:, 1]
    g1 = phenotype_cells(cells, gating=gating, phenotypes=(), slide_id="S1").gates["CD8"]
    assert (g1.gate, g1.method, g1.flagged) == (2500.0, "manual", False)
    np.testing.assert_array_equal(cells.obs["CD8_pos"], x > 2500.0)
    g2 = phenotype_cells(cells, gating=gating, phenotypes=(), slide_id="S2").gates["CD8"]
    assert (g2.gate, g2.method) == (900.0, "manual")
    np.testing.assert_array_equal(cells.obs["CD8_pos"], x > 900.0)
    g3 = phenotype_cells(cells, gating=GatingConfig(), phenotypes=(), slide_id="S1").gates["CD8"]
    assert g3.method in ("valley", "mixture") and g3.gate not in (900.0, 2500.0)


# ----------------------------------------------------------------- compensation

def _spill():
    spill = np.eye(len(MARKERS))
    cd3, cd8 = MARKERS.index("CD3"), MARKERS.index("CD8")
    spill[cd8, cd3] = 0.12  # CD3 light seen in the CD8 channel
    spill[cd3, cd8] = 0.02
    return spill


def test_compensation_restores_true_layers_and_removes_spillover_positives():
    types, truth = cell_types(6000, seed=10)
    spill = _spill()
    comp = CompensationConfig(markers=MARKERS, spillover=tuple(map(tuple, spill)))
    cells, true = make_cells(truth, seed=10, spill=spill)
    result = phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, compensation=comp, slide_id="S")
    assert result.compensated
    for layer, values in true.items():
        np.testing.assert_allclose(cells.layers[layer], values, rtol=1e-5, atol=0.05)
    k8, kf = MARKERS.index("CD8"), MARKERS.index("FOXP3")
    np.testing.assert_array_equal(cells.X[:, k8], cells.layers["membrane"][:, k8])
    np.testing.assert_array_equal(cells.X[:, kf], cells.layers["nucleus"][:, kf])
    assert _f1(cells.obs["CD8_pos"].to_numpy(), truth["CD8"]) >= 0.95
    # One gate just above every true CD8-negative cell: CD3 light makes CD4 T cells (CD3+ CD8-)
    # cross it before compensation, not after.
    gating = GatingConfig(manual={"CD8": float(true["membrane"][~truth["CD8"], k8].max()) + 20.0})
    raw, _ = make_cells(truth, seed=10, spill=spill)
    phenotype_cells(raw, gating=gating, phenotypes=RULES, slide_id="S")
    phenotype_cells(cells, gating=gating, phenotypes=RULES, slide_id="S")
    cd4 = types == "cd4_t"
    assert raw.obs["CD8_pos"].to_numpy()[cd4].mean() > 0.2
    assert not cells.obs["CD8_pos"].to_numpy()[cd4].any()


def test_negative_shoulder_does_not_swallow_the_gate():
    # Uncompensated CD3 light lifts a quarter of the cells into a shoulder right of the
    # CD8-negative peak: the mixture must still find the CD8+ population beyond it.
    types, truth = cell_types(6000, seed=10)
    cells, _ = make_cells(truth, seed=10, spill=_spill())
    gate = phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, slide_id="S").gates["CD8"]
    assert gate.method in ("valley", "mixture") and not gate.flagged
    assert _f1(cells.obs["CD8_pos"].to_numpy(), truth["CD8"]) >= 0.9


@pytest.mark.parametrize("seed", range(4))
def test_sparse_dim_positives_in_a_wide_gap_are_gated_with_the_positives(seed, monkeypatch):
    # A few dim positives (0.4 % of cells) spread thinly between the negatives' tail and the
    # bright mode: the density's lowest point may lie between dim and bright positives, but
    # the gate belongs at the start of the gap, where the negatives end.
    rng = np.random.default_rng(seed)
    neg = 200 + 10 * rng.standard_normal(8000) + rng.exponential(60, 8000)
    dim = rng.uniform(600, 1300, 40)
    bright = 3000 * rng.lognormal(0, 0.2, 1200)
    x = np.concatenate([neg, dim, bright])
    gate = autogate.auto_gate(x, "SATB2", "arcsinh")
    assert gate.method == "valley"
    assert (dim > gate.gate).mean() >= 0.8 and (bright > gate.gate).all()
    assert (neg > gate.gate).mean() < 0.002
    monkeypatch.setattr(autogate, "VALLEY_FLOOR", 0.0)  # the bottom of the dip alone
    assert (dim > autogate.auto_gate(x, "SATB2", "arcsinh").gate).mean() < 0.5


def test_compensation_is_not_applied_twice():
    types, truth = cell_types(2000, seed=11)
    spill = _spill()
    comp = CompensationConfig(markers=MARKERS, spillover=tuple(map(tuple, spill)))
    cells, true = make_cells(truth, seed=11, spill=spill)
    phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, compensation=comp, slide_id="S")
    again = phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, compensation=comp, slide_id="S")
    assert not again.compensated and any("already compensated" in f for f in again.flags)
    np.testing.assert_allclose(cells.layers["membrane"], true["membrane"], rtol=1e-5, atol=0.05)
    other = CompensationConfig(markers=MARKERS, spillover=tuple(map(tuple, np.eye(len(MARKERS)))))
    with pytest.raises(ValueError, match="already compensated"):
        phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, compensation=other, slide_id="S")


# ----------------------------------------------------------------- phenotypes

def test_rules_in_precedence_order_and_categories():
    types, truth = cell_types(6000, seed=12)
    triple = np.flatnonzero(types == "cd8_t")[:60]
    truth["FOXP3"][triple] = True  # CD3+ CD8+ FOXP3+
    cells, _ = make_cells(truth, seed=12, dim_fraction=0.0)
    result = phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, slide_id="S")
    phen = cells.obs["phenotype"]
    assert list(phen.cat.categories) == [r.name for r in RULES] + ["other"]
    assert (phen.to_numpy()[triple] == "CD8_T").all()
    expected = {"cd8_t": "CD8_T", "treg": "Treg", "cd4_t": "CD4_T", "b_cell": "B", "fibroblast": "other"}
    for cell_type, name in expected.items():
        assert (phen.to_numpy()[types == cell_type] == name).mean() > 0.97, cell_type
    assert "DAPI" not in result.gates and "DAPI_pos" not in cells.obs
    assert {"CD21", "PD-L1"} <= set(result.gates) and cells.obs["PD-L1_pos"].dtype == bool
    assert sum(result.counts.values()) == cells.n_obs


def test_co_expression_rule_tolerates_one_weak_marker():
    """CD8_T = CD3+ CD8+: one marker may sit between its weak gate and its gate, not both."""
    types, truth = cell_types(4000, seed=15)
    cells, _ = make_cells(truth, seed=15)
    gating = GatingConfig(weak_fraction=0.6)
    result = phenotype_cells(cells, gating=gating, phenotypes=RULES, slide_id="S")
    x = {m: cells.X[:, list(cells.var_names).index(m)].astype(float) for m in ("CD3", "CD8", "FOXP3")}
    full = {m: x[m] > result.gates[m].gate for m in x}
    weak = {m: x[m] > weak_gate(result.gates[m].background, result.gates[m].gate, 0.6) for m in x}
    g = result.gates["CD3"]
    assert g.background < weak_gate(g.background, g.gate, 0.6) < g.gate
    np.testing.assert_allclose(weak_gate(g.background, g.gate, 0.6), g.background + 0.6 * (g.gate - g.background))
    expected = (full["CD3"] & weak["CD8"]) | (weak["CD3"] & full["CD8"])
    phen = cells.obs["phenotype"].to_numpy()
    np.testing.assert_array_equal(phen == "CD8_T", expected)
    # both markers only weak: not CD8_T; faint CD3 alone does not make a CD4 T cell either
    both_weak = weak["CD3"] & ~full["CD3"] & weak["CD8"] & ~full["CD8"]
    assert not (phen[both_weak] == "CD8_T").any()
    assert (phen[~full["CD3"]] != "CD4_T").all()
    # dim CD3 or CD8 (12 % of positives each) no longer loses a CD8 T cell; precision holds
    t8 = types == "cd8_t"
    strict = phenotype_cells(cells.copy(), gating=GatingConfig(weak_fraction=1.0), phenotypes=RULES, slide_id="S")
    assert strict.counts["CD8_T"] < result.counts["CD8_T"]
    recall = (phen[t8] == "CD8_T").mean()
    assert recall > 0.95 and (t8[phen == "CD8_T"]).mean() > 0.97
    assert cells.uns["phenotyping"]["params"]["weak_fraction"] == 0.6


def test_weak_fraction_one_is_the_plain_conjunction():
    types, truth = cell_types(3000, seed=16)
    cells, _ = make_cells(truth, seed=16)
    phenotype_cells(cells, gating=GatingConfig(weak_fraction=1.0), phenotypes=RULES, slide_id="S")
    obs = cells.obs
    np.testing.assert_array_equal(obs["phenotype"] == "CD8_T", obs["CD3_pos"] & obs["CD8_pos"])


def test_missing_optional_marker_skips_its_rule_with_a_flag():
    types, truth = cell_types(3000, seed=13)
    cells, _ = make_cells(truth, seed=13, markers=tuple(m for m in MARKERS if m != "SATB2"))
    result = phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, slide_id="P9_post",
                             skip_markers=("SATB2",))
    assert result.skipped_rules == ("tumor",)
    assert any("'P9_post'" in f and "'tumor'" in f and "SATB2" in f for f in result.flags)
    assert "tumor" in cells.obs["phenotype"].cat.categories and result.counts["tumor"] == 0
    assert "SATB2_pos" not in cells.obs
    assert list(cells.uns["phenotyping"]["rules"]["applied"]) == [r.name != "tumor" for r in RULES]


def test_rule_marker_absent_without_skip_is_an_error():
    types, truth = cell_types(500, seed=14)
    cells, _ = make_cells(truth, seed=14, markers=tuple(m for m in MARKERS if m != "SATB2"))
    with pytest.raises(ValueError, match="P1_pre.*SATB2"):
        phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, slide_id="P1_pre")


# ----------------------------------------------------------------- uns

def test_uns_round_trips_through_h5ad(tmp_path):
    types, truth = cell_types(3000, seed=15)
    cells, _ = make_cells(truth, seed=15)
    cells.X[:, list(cells.var_names).index("CD21")] = 0.0  # a 'none' gate: NaN values in uns
    gating = GatingConfig(manual={"CD8": 800.0})
    phenotype_cells(cells, gating=gating, phenotypes=RULES, slide_id="S", compensation=CompensationConfig(
        markers=("CD8", "CD3"), spillover=((1.0, 0.02), (0.05, 1.0))))
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert set(back.uns["gates"]) == set(cells.uns["gates"])
    for marker, values in cells.uns["gates"].items():
        for key, value in values.items():
            got = back.uns["gates"][marker][key]
            if isinstance(value, float):
                np.testing.assert_equal(float(got), value)
            else:
                assert got == value, (marker, key)
    assert back.uns["gates"]["CD8"]["method"] == "manual"
    assert back.uns["gates"]["CD21"]["method"] == "none"
    params = back.uns["phenotyping"]["params"]
    assert params["slide_id"] == "S" and float(params["manual"]["CD8"]) == 800.0
    np.testing.assert_allclose(params["compensation"]["spillover"], [[1.0, 0.02], [0.05, 1.0]])
    assert list(back.uns["phenotyping"]["flags"]) == cells.uns["phenotyping"]["flags"]
    assert list(back.obs["phenotype"].cat.categories) == [r.name for r in RULES] + ["other"]
    assert back.obs["CD8_pos"].dtype == bool


# ----------------------------------------------------------------- gating within a phenotype

def _tumour_pdl1(seed: int, n: int = 8000, fractions: dict | None = None):
    """Cells whose tumour cells carry extra PD-L1-channel autofluorescence (+600 counts)."""
    types, truth = cell_types(n, seed=seed, fractions=fractions)
    cells, _ = make_cells(truth, seed=seed)
    k = list(cells.var_names).index("PD-L1")
    tumour = types == "tumor"
    cells.X[tumour, k] += 600.0
    for layer in cells.layers.values():
        layer[tumour, k] += 600.0
    return cells, types, truth


def test_pdl1_gated_within_tumour_cells_recovers_the_tumour_proportion_score():
    cells, types, truth = _tumour_pdl1(seed=16)
    tumour = types == "tumor"
    true_tps = truth["PD-L1"][tumour].mean()
    everyone = cells.copy()
    phenotype_cells(everyone, gating=GatingConfig(), phenotypes=RULES, slide_id="S")
    result = phenotype_cells(cells, gating=GatingConfig(within={"PD-L1": "tumor"}), phenotypes=RULES, slide_id="S")
    gate = result.gates["PD-L1"]
    called_tumour = (cells.obs["phenotype"] == "tumor").to_numpy()
    assert gate.population == "tumor" and gate.n_fitted == called_tumour.sum()
    assert gate.method in ("valley", "mixture") and not gate.flagged
    within_f1 = _f1(cells.obs["PD-L1_pos"].to_numpy()[tumour], truth["PD-L1"][tumour])
    everyone_f1 = _f1(everyone.obs["PD-L1_pos"].to_numpy()[tumour], truth["PD-L1"][tumour])
    assert within_f1 >= 0.93 and within_f1 > everyone_f1 + 0.05
    tps = cells.obs["PD-L1_pos"].to_numpy()[called_tumour].mean()
    assert abs(tps - true_tps) < 0.03
    # the lineage markers are gated exactly as without `within`
    for m in ("CD3", "CD8", "SATB2"):
        assert result.gates[m].gate == everyone.uns["gates"][m]["gate"]
    assert cells.uns["gates"]["PD-L1"]["population"] == "tumor"
    assert cells.uns["phenotyping"]["params"]["within"] == {"PD-L1": "tumor"}


def test_within_a_rare_phenotype_falls_back_to_all_cells_with_a_flag():
    fractions = {"tumor": 0.003, "fibroblast": 0.3, "macrophage": 0.1, "cd8_t": 0.2, "cd4_t": 0.2,
                 "treg": 0.05, "b_cell": 0.15}
    cells, _, _ = _tumour_pdl1(seed=17, n=4000, fractions=fractions)
    result = phenotype_cells(cells, gating=GatingConfig(within={"PD-L1": "tumor"}), phenotypes=RULES,
                             slide_id="P2_pre")
    assert result.gates["PD-L1"].population == "all" and result.gates["PD-L1"].n_fitted == cells.n_obs
    assert any("'P2_pre'" in f and "'PD-L1'" in f and "gated on all cells" in f for f in result.flags)


def test_within_a_marker_of_the_rules_is_an_error():
    types, truth = cell_types(500, seed=18)
    cells, _ = make_cells(truth, seed=18)
    with pytest.raises(ValueError, match="P4_post.*'CD8' within 'tumor'"):
        phenotype_cells(cells, gating=GatingConfig(within={"CD8": "tumor"}), phenotypes=RULES, slide_id="P4_post")


# ----------------------------------------------------------------- lineage-exclusive calls

def _gate(marker, gate, background):
    return Gate(marker, gate, background, 10.0, 50.0, "arcsinh", "valley", 0.9, 0.0, 0, False)


def test_gate_score_by_hand():
    g = _gate("CD3", 1000.0, 200.0)
    np.testing.assert_allclose(gate_score(np.array([200.0, 600.0, 1000.0, 2600.0]), g), [0, 0.5, 1, 3])
    assert np.isnan(gate_score(np.array([5.0]), _gate("CD3", 200.0, 200.0))).all()


def test_exclusive_pair_goes_to_the_marker_higher_above_its_gate():
    # CD20 gate 1000 (background 200), CD3 gate 500 (background 100). Scores by hand:
    # cell 0: CD20 (2600-200)/800 = 3,   CD3 (700-100)/400 = 1.5 -> CD20
    # cell 1: CD20 (1200-200)/800 = 1.25, CD3 (1300-100)/400 = 3  -> CD3
    # cell 2: CD20 (1000-200)... below gate; CD3 only -> untouched
    # cell 3: CD20 (1800-200)/800 = 2,   CD3 (900-100)/400 = 2    -> tie: the first marker (CD20)
    cells = ad.AnnData(np.array([[2600, 700], [1200, 1300], [900, 1300], [1800, 900]], np.float32),
                       var={"compartment": ["perinuclear", "perinuclear"]})
    cells.var_names = ["CD20", "CD3"]
    gates = {"CD20": _gate("CD20", 1000.0, 200.0), "CD3": _gate("CD3", 500.0, 100.0)}
    positive = {"CD20": np.array([True, True, False, True]), "CD3": np.array([True, True, True, True])}
    weak = {m: v.copy() for m, v in positive.items()}
    counts, flags = resolve_exclusive(cells, [("CD20", "CD3")], gates, positive, weak, slide_id="S")
    assert counts == {"CD20|CD3": {"n_both": 3, "to_CD20": 2, "to_CD3": 1}} and flags == []
    assert positive["CD20"].tolist() == [True, False, False, True]
    assert positive["CD3"].tolist() == [False, True, True, False]
    assert weak["CD20"].tolist() == [True, False, False, True]
    counts, flags = resolve_exclusive(cells, [("CD20", "FOXP3")], gates, positive, weak, slide_id="S")
    assert counts == {} and "FOXP3" in flags[0]
    with pytest.raises(ValueError, match="twice"):
        resolve_exclusive(cells, [("CD3", "CD3")], gates, positive, weak, slide_id="S")


def test_exclusive_calls_give_double_positive_b_cells_back_to_b():
    """B cells reading a T neighbour's CD3 (above gate, below their own CD20) are B, not T."""
    types, truth = cell_types(6000, seed=21)
    b = np.flatnonzero(types == "b_cell")
    spill = b[: b.size // 3]
    truth["CD3"][spill] = True  # CD3 at a T cell's level on a third of the B cells
    cells, _ = make_cells(truth, seed=21, dim_fraction=0.0)
    col = {m: list(cells.var_names).index(m) for m in ("CD3", "CD20")}
    for name in cells.layers:  # at half their CD20 strength: a neighbour's share, not their own stain
        cells.layers[name][spill, col["CD3"]] = 0.5 * cells.layers[name][spill, col["CD20"]]
    cells.X[spill, col["CD3"]] = cells.layers["membrane"][spill, col["CD3"]]
    plain = cells.copy()
    before = phenotype_cells(plain, gating=GatingConfig(), phenotypes=RULES, slide_id="S")
    gating = GatingConfig(exclusive=(("CD20", "CD3"),))
    result = phenotype_cells(cells, gating=gating, phenotypes=RULES, slide_id="S")
    phen, phen0 = cells.obs["phenotype"].to_numpy(), plain.obs["phenotype"].to_numpy()
    t_cells = np.isin(phen0[spill], ["CD8_T", "CD4_T", "Treg"])
    assert t_cells.mean() > 0.9  # without it, they are T cells
    assert (phen[spill] == "B").mean() > 0.95
    # real T cells (CD20-) are untouched; CD3_pos still reports CD3's own gate
    t = np.isin(types, ["cd8_t", "cd4_t", "treg"])
    np.testing.assert_array_equal(phen[t], phen0[t])
    assert cells.obs["CD3_pos"].to_numpy()[spill].mean() > 0.9
    pair = result.exclusive["CD20|CD3"]
    assert pair["n_both"] == pair["to_CD20"] + pair["to_CD3"] and pair["to_CD20"] >= 0.95 * spill.size
    assert before.exclusive == {} and result.to_json()["exclusive"] == result.exclusive
    assert cells.uns["phenotyping"]["exclusive"] == result.exclusive
    assert cells.uns["phenotyping"]["params"]["exclusive"] == [["CD20", "CD3"]]


def test_dim_dapi_debris_gets_no_phenotype():
    """Autofluorescent fragments (dim DAPI, bright in every marker) are 'other', not CD8 T cells."""
    types, truth = cell_types(3000, seed=21)
    cells, _ = make_cells(truth, seed=21, dim_fraction=0.0)
    rng = np.random.default_rng(21)
    dapi = rng.normal(5000.0, 600.0, cells.n_obs)
    cd8 = np.flatnonzero(types == "cd8_t")
    debris, kept = cd8[:40], cd8[40:]
    dapi[debris] = 0.3 * 5000.0
    dapi[kept[:20]] = 0.45 * 5000.0  # dim but above the cut: still a cell
    cells.obs["dapi_mean"] = dapi
    plain = cells.copy()

    phenotype_cells(cells, gating=GatingConfig(), phenotypes=RULES, slide_id="S")
    phen = cells.obs["phenotype"].to_numpy()
    assert (phen[debris] == "other").all()
    assert (phen[kept[:20]] == "CD8_T").mean() > 0.9
    assert cells.uns["phenotyping"]["params"]["n_low_dapi"] == 40
    assert cells.obs["CD8_pos"].to_numpy()[debris].mean() > 0.9  # the marker's own call is kept

    phenotype_cells(plain, gating=GatingConfig(min_dapi_fraction=0.0), phenotypes=RULES, slide_id="S")
    assert (plain.obs["phenotype"].to_numpy()[debris] == "CD8_T").mean() > 0.9
