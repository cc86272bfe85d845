"""Paired pre/post statistics of one metric: signed-rank test, Hodges–Lehmann, effect size.

For the paired differences ``d = post - pre`` of the patients with a finite value at both
timepoints:

- the **Wilcoxon signed-rank test** (:func:`scipy.stats.wilcoxon`, two-sided). **Zero
  differences are dropped** before ranking (``zero_method="wilcox"``, Wilcoxon 1945; R's
  default): a zero carries no sign, and dropping it keeps the exact null distribution
  available; ``n_nonzero`` says how many pairs were ranked. The p-value is **exact** (the
  signed-rank distribution) when the non-zero differences have no ties in absolute value and
  ``n_nonzero <= 50``; with ties (and ``n_nonzero <= 50``) it is the **exact permutation**
  p-value (all ``2**n`` sign flips of the tied mid-ranks); above 50 the **normal
  approximation** with the tie-corrected variance and no continuity correction. The ``statistic`` is W+, the
  sum of the ranks of the positive differences (R's V).
- the **Hodges–Lehmann** median paired difference (median of the ``n(n+1)/2`` Walsh averages
  of all ``n`` differences, zeros included) and its distribution-free confidence interval
  ``[W_(c), W_(M+1-c)]`` of the sorted Walsh averages, ``c`` from the signed-rank null
  distribution (exact for ``n <= 50``, normal otherwise; Hollander, Wolfe & Chicken,
  *Nonparametric Statistical Methods*, 3rd ed., §3.2). With few pairs the nominal level is not
  attainable (``n <= 5`` at 95 %): the interval is then ``[min, max]`` and ``ci_level`` gives
  the level achieved (``1 - 2**(1-n)``), as it does for every result.
- the **matched-pairs rank-biserial correlation** ``(W+ - W-) / (W+ + W-)`` over the non-zero
  differences (Kerby 2014), in [-1, 1].

Fewer than :data:`MIN_PAIRS` pairs, or differences that are all zero, give NaN p-values with
the reason.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedTest", "paired_test", "hodges_lehmann", "rank_biserial", "signed_rank_cdf", "bh_adjust",
           "ZERO_METHOD", "MIN_PAIRS"]

ZERO_METHOD = "wilcox"
MIN_PAIRS = 3
#: Largest n for the exact signed-rank distribution (p-value without ties, and the HL interval).
EXACT_MAX_N = 50


@dataclass(frozen=True)
class PairedTest:
    """One metric's paired pre/post result (see the module notes for each method).

    Attributes
    ----------
    n_pairs : int, pairs with a finite value at both timepoints.
    n_nonzero : int, of those, pairs whose difference is not zero (the ranked ones).
    median_pre, median_post, median_difference : float, metric units; NaN without pairs.
    hl_estimate, ci_low, ci_high : float, metric units; Hodges–Lehmann estimate and interval.
    ci_level : float in (0, 1), the confidence level the interval achieves.
    statistic : float, W+ (sum of the ranks of the positive differences).
    p_value : float, two-sided; NaN with a ``reason`` when not tested.
    rank_biserial : float in [-1, 1].
    method : str, ``"exact"``, ``"exact permutation"``, ``"normal approximation"`` or ``""``.
    zero_method : str, ``"wilcox"`` (zero differences dropped).
    reason : str, why a value is NaN; ``""`` when tested.
    """

    n_pairs: int
    n_nonzero: int
    median_pre: float
    median_post: float
    median_difference: float
    hl_estimate: float
    ci_low: float
    ci_high: float
    ci_level: float
    statistic: float
    p_value: float
    rank_biserial: float
    method: str
    zero_method: str
    reason: str


def signed_rank_cdf(n: int) -> np.ndarray:
    """Exact null distribution of the signed-rank statistic W+ for ``n`` untied pairs.

    Parameters
    ----------
    n : int >= 0, number of non-zero differences (at most ~60: counts stay exact in int64).

    Returns
    -------
    (n(n+1)/2 + 1,) float64, ``P(W+ <= t)`` for t = 0, 1, ..., n(n+1)/2.

    Examples
    --------
    >>> float(signed_rank_cdf(5)[0])  # all five signs negative: 1/32
    0.03125
    """
    if n < 0 or n > 60:
        raise ValueError(f"signed_rank_cdf: n must be in 0..60, got {n}")
    m = n * (n + 1) // 2
    counts = np.zeros(m + 1, np.int64)
    counts[0] = 1
    # Generating function prod_k (1 + x^k): rank k either is a positive difference or not.
    for k in range(1, n + 1):
        counts[k:] = counts[k:] + counts[:-k].copy()
    return np.cumsum(counts) / float(2 ** n)


def _tied_exact_p(ranks: np.ndarray, w_plus: float) -> float:
    """Two-sided exact p of W+ over all ``2**n`` sign flips of tied mid-ranks.

    Mid-ranks are multiples of 1/2, so the doubled ranks are integers and the distribution of
    2 W+ follows from the same generating function as :func:`signed_rank_cdf`; it equals
    scipy's exhaustive ``PermutationMethod`` (the test oracle) at a fraction of the time.
    """
    weights = np.rint(2.0 * np.asarray(ranks)).astype(np.int64)
    counts = np.zeros(int(weights.sum()) + 1, np.int64)
    counts[0] = 1
    for w in weights:
        counts[w:] = counts[w:] + counts[:-w].copy()
    total = float(2 ** weights.size)
    t = int(np.rint(2.0 * w_plus))
    return min(1.0, 2.0 * min(counts[: t + 1].sum() / total, counts[t:].sum() / total))


def hodges_lehmann(differences: np.ndarray, *, alpha: float = 0.05) -> tuple[float, float, float, float]:
    """Hodges–Lehmann estimate of the median paired difference and its confidence interval.

    Parameters
    ----------
    differences : (n,) float, finite paired differences (post - pre), metric units; n >= 1.
    alpha : float in (0, 1), 1 - the nominal confidence level.

    Returns
    -------
    estimate, low, high : float, metric units.
    level : float, the confidence level achieved (>= 1 - alpha unless n is too small, see the
        module notes).

    Examples
    --------
    >>> hodges_lehmann(np.array([1.0, 2.0, 4.0, 8.0]))  # n = 4: 95 % unattainable
    (3.5, 1.0, 8.0, 0.875)
    """
    d = np.asarray(differences, np.float64)
    n = d.size
    if n == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"hodges_lehmann: need >= 1 finite difference, got {d!r}")
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    m = walsh.size
    if n <= EXACT_MAX_N:
        cdf = signed_rank_cdf(n)
        c = int(np.count_nonzero(cdf <= alpha / 2.0))
        c = max(c, 1)
        level = 1.0 - 2.0 * float(cdf[c - 1])
    else:
        from scipy.stats import norm

        z = norm.ppf(1.0 - alpha / 2.0)
        c = max(int(np.floor(n * (n + 1) / 4.0 - z * np.sqrt(n * (n + 1) * (2 * n + 1) / 24.0))), 1)
        level = 1.0 - alpha
    return float(np.median(walsh)), float(walsh[c - 1]), float(walsh[m - c]), level


def rank_biserial(differences: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of the non-zero paired differences.

    Parameters
    ----------
    differences : (n,) float, paired differences (post - pre); zeros are dropped.

    Returns
    -------
    float in [-1, 1]: +1 when every non-zero difference is positive; NaN when none is non-zero.
    """
    from scipy.stats import rankdata

    d = np.asarray(differences, np.float64)
    d = d[d != 0]
    if d.size == 0:
        return float("nan")
    ranks = rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def paired_test(pre: np.ndarray, post: np.ndarray, *, alpha: float = 0.05) -> PairedTest:
    """Paired signed-rank test, Hodges–Lehmann interval and effect size of one metric.

    Parameters
    ----------
    pre, post : (n_patients,) float, the metric at each timepoint (metric units); pairs with a
        NaN at either side are left out.
    alpha : float, 1 - the nominal confidence level of the interval.

    Returns
    -------
    PairedTest; with fewer than 3 complete pairs or no non-zero difference, NaN statistics
    and the ``reason``.
    """
    pre, post = np.asarray(pre, np.float64), np.asarray(post, np.float64)
    if pre.shape != post.shape or pre.ndim != 1:
        raise ValueError(f"paired_test: pre and post must be 1-D of one length, got {pre.shape}, {post.shape}")
    ok = np.isfinite(pre) & np.isfinite(post)
    n = int(ok.sum())
    d = post[ok] - pre[ok]
    nz = d[d != 0]
    nan = float("nan")
    medians = (float(np.median(pre[ok])), float(np.median(post[ok])), float(np.median(d))) if n else (nan,) * 3
    base = dict(n_pairs=n, n_nonzero=int(nz.size), median_pre=medians[0], median_post=medians[1],
                median_difference=medians[2], zero_method=ZERO_METHOD)
    if n < MIN_PAIRS:
        why = "no complete pair" if n == 0 else f"{n} complete pair(s) < {MIN_PAIRS}"
        return PairedTest(**base, hl_estimate=nan, ci_low=nan, ci_high=nan, ci_level=nan, statistic=nan,
                          p_value=nan, rank_biserial=nan, method="", reason=why)
    hl, low, high, level = hodges_lehmann(d, alpha=alpha)
    if nz.size == 0:
        return PairedTest(**base, hl_estimate=hl, ci_low=low, ci_high=high, ci_level=level, statistic=nan,
                          p_value=nan, rank_biserial=nan, method="", reason="all paired differences are zero")
    from scipy.stats import rankdata, wilcoxon

    ranks = rankdata(np.abs(nz))
    w_plus = float(ranks[nz > 0].sum())
    tied = np.unique(np.abs(nz)).size < nz.size
    if nz.size > EXACT_MAX_N:
        method = "normal approximation"
        with warnings.catch_warnings():
            # scipy warns about small samples for the normal approximation; the method column says it.
            warnings.simplefilter("ignore", UserWarning)
            p = float(wilcoxon(nz, zero_method=ZERO_METHOD, method="asymptotic").pvalue)
    elif tied:
        method, p = "exact permutation", _tied_exact_p(ranks, w_plus)
    else:
        method = "exact"
        p = float(wilcoxon(nz, zero_method=ZERO_METHOD, method="exact").pvalue)
    return PairedTest(**base, hl_estimate=hl, ci_low=low, ci_high=high, ci_level=level,
                      statistic=w_plus, p_value=min(p, 1.0),
                      rank_biserial=rank_biserial(nz), method=method, reason="")


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values of the finite entries; NaN stays NaN."""
    from scipy.stats import false_discovery_control

    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = false_discovery_control(p[ok], method="bh")
    return out
