"""The automatic gate's fallback: scale-aware, silent on negative-only markers, still flagged.

Intensities are drawn as the generator renders a cell's mean: a dark offset and read noise that
do not scale with the stain gain, plus ``gain`` times the stain (non-specific on negatives,
specific on positives), log-normal per cell.
"""

from __future__ import annotations

import numpy as np
import pytest

from phenotype_fixtures import make_cells

from tme_pipeline.autogate import auto_gate
from tme_pipeline.config import GatingConfig
from tme_pipeline.phenotype import phenotype_cells

OFFSET, READ_SD = 1500.0, 80.0


def _channel(*, seed: int, gain: float = 1.0, n_neg: int = 9000, n_pos: int = 1000,
             pos_stain: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """(n,) raw intensities and (n,) bool truth of one channel; the same draws at every gain.

    Half the negatives carry almost no stain, half a non-specific one with a long log-normal
    tail (median 220, log sd 0.6); positives are log-normal (log sd 0.4) around ``pos_stain``.
    Shaped on another lab's dim CD8 (development slide 61000: background + 1 000 counts
    positives over a negative tail reaching + 950 at its 99th percentile).
    """
    rng = np.random.default_rng(seed)
    half = n_neg // 2
    stain = np.concatenate([rng.lognormal(np.log(20.0), 0.5, n_neg - half),
                            rng.lognormal(np.log(220.0), 0.6, half),
                            rng.lognormal(np.log(pos_stain), 0.4, n_pos)])
    truth = np.arange(stain.size) >= n_neg
    return OFFSET + rng.normal(0.0, READ_SD, stain.size) + gain * stain, truth


def _f1(called: np.ndarray, truth: np.ndarray) -> float:
    tp = (called & truth).sum()
    return 2 * tp / (called.sum() + truth.sum())


@pytest.mark.parametrize("s", [0.85, 1.15, 3.0])
def test_fitted_gate_scales_with_all_intensities(s):
    # Positives far brighter than the negatives' tail: a valley or a separated mixture.
    x, _ = _channel(seed=1, pos_stain=8000.0)
    ref = auto_gate(x, "CD8", "arcsinh")
    g = auto_gate(s * x, "CD8", "arcsinh")
    assert ref.method in ("valley", "mixture") and g.method == ref.method
    assert g.gate / ref.gate == pytest.approx(s, rel=0.02)


@pytest.mark.parametrize("s", [0.85, 1.15, 3.0])
def test_fallback_gate_scales_with_all_intensities(s):
    # Dim positives on a long non-specific tail: no valley, no separated mixture.
    x, truth = _channel(seed=2)
    ref = auto_gate(x, "CD8", "arcsinh")
    g = auto_gate(s * x, "CD8", "arcsinh")
    assert ref.method == "fallback" and g.method == "fallback"
    assert g.gate / ref.gate == pytest.approx(s, rel=0.02)
    # The gate of the log-space split, not the noise rule's (which calls almost no positive).
    assert _f1(s * x > g.gate, truth) > 0.75


@pytest.mark.parametrize("seed", [3, 4])
def test_fallback_calls_dim_positives(seed):
    # The noise rule alone (background + up to 20 noise sd) called almost none of them.
    x, truth = _channel(seed=seed)
    gate = auto_gate(x, "CD8", "arcsinh")
    assert gate.method == "fallback"
    assert _f1(x > gate.gate, truth) > 0.75


@pytest.mark.parametrize("seed", [5, 6, 7])
@pytest.mark.parametrize("tail_sd", [0.0, 0.45, 0.6])
def test_negative_only_marker_calls_almost_none(seed, tail_sd):
    # One population: read noise alone, or with a skewed (log-normal) non-specific stain, which
    # EM in log space would happily split in two.
    rng = np.random.default_rng(seed)
    x = OFFSET + rng.normal(0.0, READ_SD, 10000)
    if tail_sd:
        x += rng.lognormal(np.log(150.0), tail_sd, x.size)
    gate = auto_gate(x, "CD21", "arcsinh")
    assert gate.method == "fallback"
    assert (x > gate.gate).mean() < 0.02


def test_fallback_keeps_its_method_for_the_flags():
    # phenotype.py flags a marker whose method is 'fallback'; the log-space split must not
    # disguise itself as a fitted gate.
    x, _ = _channel(seed=8)
    gate = auto_gate(x, "CD8", "log")
    assert gate.method == "fallback" and gate.quality < 0.5
    assert gate.background < gate.gate


def test_fallback_split_is_flagged_by_phenotyping():
    x, truth = _channel(seed=9)
    cells, _ = make_cells({"CD8": truth}, seed=9, markers=("DAPI", "CD8"))
    cells.X[:, list(cells.var_names).index("CD8")] = x
    result = phenotype_cells(cells, gating=GatingConfig(), phenotypes=(), slide_id="S9")
    gate = result.gates["CD8"]
    assert gate.method == "fallback" and gate.flagged
    assert any("'S9'" in f and "'CD8'" in f and "fallback" in f for f in result.flags)
    assert _f1(cells.obs["CD8_pos"].to_numpy(), truth) > 0.75
