"""Automatic gate of one channel of one slide, from its own intensities.

The background is the negative cells' mode (:func:`estimate_background`); intensities are
transformed by ``arcsinh`` (or ``log``) of the background-subtracted value over a cofactor
of :data:`COFACTOR_SD` noise sd, where a two-component Gaussian mixture (EM in numpy,
deterministic, :func:`fit_two_gaussians`) is fitted. A mixture is accepted when its
components are separated populations (Ashman's D >= 2 and disjoint central 95 %).
When the smoothed histogram shows a second mode above the negatives with a dip before it,
the gate is the start of that dip's floor (:func:`_valley_gate`), tried first: positives whose dim
members stretch them towards the negatives, and negatives with a long right tail, are no
pair of Gaussians. Otherwise the mixture. Otherwise the gate falls back (method
``'fallback'``, flagged): where the cells above the noise split into a dim and a bright
log-normal population (:func:`_log_split`, :data:`MIN_LOG_RATIO`), at their crossing, which
moves with the stain's gain; else at the background plus :data:`FALLBACK_SD` times the
negatives' spread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["Gate", "Mixture", "auto_gate", "estimate_background", "fit_two_gaussians",
           "transform_intensity", "inverse_transform"]

#: Cofactor = COFACTOR_SD * noise sd: negatives (within about 2 sd) stay on the linear part of
#: arcsinh, so they form one symmetric peak, while positives are compressed like a log.
COFACTOR_SD = 3.0
#: Fallback gate: background + FALLBACK_SD * the negatives' right-hand sd (a Gaussian negative
#: exceeds it 3e-7 of the time); that sd is from the 90th percentile, within 1-4 left-half sd.
FALLBACK_SD = 5.0
#: The fallback's log-space split counts when the bright population's median (above background)
#: is at least this multiple of the dim one's. EM splits even one skewed (log-normal) negative
#: tail into two overlapping parts, 1.2-1.7x apart on simulated tails; a dim positive
#: population over another lab's autofluorescent negatives sat 2.5x above them (development
#: slide 61000, CD8; 2.7x for CD3 on slide 61002).
MIN_LOG_RATIO = 2.0
#: The fallback's log-space split puts the gate where a cell is this many times likelier to be
#: of the bright population than of the dim one. 1, the crossing: on the development slides
#: (external_lab 61000-61002) odds 4 and 9 raised CD8_T F1 a little (weak gates take the dim
#: ones back) but cost CD4_T more where CD3 itself fell back (61002: 0.69 -> 0.53 -> 0.40).
FALLBACK_ODDS = 1.0
#: Ashman's D below which the mixture's two components are not separated populations.
MIN_SEPARATION_D = 2.0
#: Fraction of the cells in the densest window searched for the negative mode.
MODE_WINDOW = 0.25
#: Fewest cells a positive population (and a gated channel) must hold.
MIN_CELLS = 5
#: Histogram bin of the transformed intensity for the mixture fit (dimensionless).
BIN_T = 0.01
#: Smoothing of the histogram searched for a valley (sd, transformed units): wider than the
#: counting noise of a sparse positive mode, narrower than the gap between the populations.
VALLEY_SMOOTH_T = 0.12
#: A valley counts when the density at its bottom is at most this fraction of the mode above it.
VALLEY_MAX_DEPTH = 0.7
#: The mode above the valley must hold at least this many cells.
VALLEY_MIN_CELLS = 20
#: The gate is the left end of the valley's floor: the bins next to its bottom whose density
#: exceeds the bottom by less than this fraction of the mode's height above it.
VALLEY_FLOOR = 0.025


@dataclass(frozen=True)
class Gate:
    """The gate of one marker on one slide.

    Intensities are in raw ``X`` units. ``gate``, ``background``, ``noise_sd`` and ``cofactor``
    are NaN where they do not exist (an empty or constant channel). ``method`` is one of
    ``'valley'``, ``'mixture'``, ``'fallback'``, ``'manual'``, ``'none'``. ``quality`` in [0, 1] is
    ``D**2 / (D**2 + 4)`` of Ashman's D of the accepted mixture (0.5 at D = 2, the usual
    threshold for two separated populations); without one (fallback, none, or a manual gate
    over those), of the mixture fitted to all cells, or 0 when none could be fitted. It
    describes the slide's data, so a manual gate keeps the automatic analysis' quality.
    ``population`` names the cells the automatic gate was found on (``'all'`` or a phenotype,
    see ``gating.within``) and ``n_fitted`` counts them; the gate applies to every cell.
    """

    marker: str
    gate: float
    background: float
    noise_sd: float
    cofactor: float
    transform: str
    method: str
    quality: float
    positive_fraction: float
    n_positive: int
    flagged: bool
    population: str = "all"
    n_fitted: int = 0

    def to_uns(self) -> dict:
        """Plain, h5ad-writable values (no None)."""
        out = asdict(self)
        del out["marker"]
        return {k: (v if isinstance(v, (str, bool, int)) else float(v)) for k, v in out.items()}


class Mixture(NamedTuple):
    """Two 1-D Gaussians, sorted by mean: ``means``, ``sds``, ``weights`` are (2,) float."""

    means: np.ndarray
    sds: np.ndarray
    weights: np.ndarray
    loglik: float
    converged: bool

    def ashman_d(self) -> float:
        """Ashman's D: ``sqrt(2) |mu1 - mu0| / sqrt(sd0**2 + sd1**2)``."""
        return float(np.sqrt(2.0) * abs(self.means[1] - self.means[0]) / np.hypot(*self.sds))


# --------------------------------------------------------------------------- background

def _half_sample_mode(x: np.ndarray) -> float:
    """Half-sample mode of sorted ``x`` (Bickel & Fruehwirth 2006), stopped at 1 % of it."""
    stop = max(3, x.size // 100)
    while x.size > stop:
        h = (x.size + 1) // 2
        widths = x[h - 1:] - x[:x.size - h + 1]
        i = int(np.argmin(widths))
        x = x[i:i + h]
    return float(np.median(x))


def estimate_background(values: np.ndarray) -> tuple[float, float]:
    """Background (the negative cells' mode) and its noise sd, in the units of ``values``.

    The mode, not a mean or a quantile: a channel's negatives are the one dense peak
    (dark offset + non-specific stain + autofluorescence), while everything that lifts a
    cell (dim positives, spillover, autofluorescent cells) sits on its right. The mode is
    searched in the shortest interval holding :data:`MODE_WINDOW` of the cells, then
    refined by the half-sample mode. The negative peak is far narrower than the positive
    one, so that interval lies in the negatives whether 1 % or 60-70 % of cells are
    positive. The sd comes from the left half of the peak only (median of ``mode - x``
    over ``x <= mode``, divided by 0.6745), which positives never reach.

    Parameters
    ----------
    values : (n,) float array; non-finite entries are ignored.

    Returns
    -------
    background, noise_sd : float
        NaN, NaN for an empty input; ``noise_sd`` is 0 for a constant one.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(200, 10, 6000), rng.normal(3000, 500, 4000)])
    >>> bg, sd = estimate_background(x)
    >>> bool(abs(bg - 200) < 3 and abs(sd - 10) < 1)
    True
    """
    x = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    if x.size == 0:
        return float("nan"), float("nan")
    k = max(2, int(np.ceil(MODE_WINDOW * x.size)))
    if x.size > k:
        i = int(np.argmin(x[k - 1:] - x[:x.size - k + 1]))
        mode = _half_sample_mode(x[i:i + k])
    else:
        mode = _half_sample_mode(x)
    sd = float(np.median(mode - x[x <= mode])) / 0.6745
    if not sd > 0:  # a peak piled on one value (e.g. clipped at 0): the spread around it
        sd = 1.4826 * float(np.median(np.abs(x - mode)))
    if not sd > 0:
        sd = 1e-3 * float(x[-1] - x[0])
    return mode, sd


# --------------------------------------------------------------------------- transform

def transform_intensity(x, *, background: float, cofactor: float, transform: str) -> np.ndarray:
    """``arcsinh((x - background) / cofactor)``, or ``log1p(max(x - background, 0) / cofactor)``.

    Both are 0 at the background, linear near it and logarithmic far above it. The log
    sets cells below the background to 0: unclipped, ``log1p`` would stretch the lower half
    of the negative peak towards minus infinity, into a second, spurious population.
    """
    u = (np.asarray(x, dtype=np.float64) - background) / cofactor
    if transform == "arcsinh":
        return np.arcsinh(u)
    if transform == "log":
        return np.log1p(np.maximum(u, 0.0))
    raise ValueError(f"unknown transform {transform!r} (arcsinh or log)")


def inverse_transform(t, *, background: float, cofactor: float, transform: str) -> np.ndarray:
    """Raw intensity of a transformed one (inverse of :func:`transform_intensity` above the background)."""
    t = np.asarray(t, dtype=np.float64)
    if transform == "arcsinh":
        return background + cofactor * np.sinh(t)
    if transform == "log":
        return background + cofactor * np.expm1(t)
    raise ValueError(f"unknown transform {transform!r} (arcsinh or log)")


# --------------------------------------------------------------------------- mixture

def fit_two_gaussians(values, weights=None, *, init: tuple | None = None, var_floor: float | None = None,
                      max_iter: int = 500, tol: float = 1e-9) -> Mixture:
    """Two-component 1-D Gaussian mixture by EM; deterministic, no random state.

    Parameters
    ----------
    values : (n,) float array
    weights : (n,) float array, optional
        Multiplicity of each value (e.g. histogram counts).
    init : (means, sds, mixing weights), each a pair, optional
        Default: the two halves split at the weighted median.
    var_floor : float, optional
        Smallest variance; default ``(1e-3 * range)**2``.

    Returns
    -------
    Mixture, components sorted by mean.
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if var_floor is None:
        var_floor = max((1e-3 * float(np.ptp(v))) ** 2, np.finfo(float).tiny)
    if init is None:
        order = np.argsort(v, kind="stable")
        low = np.zeros(v.size, bool)
        low[order[np.cumsum(w[order]) <= 0.5]] = True
        low[order[0]] = True
        parts = [low, ~low] if (~low).any() else [low, low]
        mu = np.array([np.average(v[p], weights=w[p]) for p in parts])
        sd = np.array([np.sqrt(max(np.average((v[p] - m) ** 2, weights=w[p]), var_floor)) for p, m in zip(parts, mu)])
        pi = np.array([w[parts[0]].sum(), w[parts[1]].sum()])
    else:
        mu, sd, pi = (np.array(a, dtype=np.float64) for a in init)
    prev, converged = -np.inf, False
    for _ in range(max_iter):
        logp = np.log(np.maximum(pi, 1e-300)) - np.log(sd) - 0.5 * ((v[:, None] - mu) / sd) ** 2
        top = logp.max(axis=1, keepdims=True)
        lse = top + np.log(np.exp(logp - top).sum(axis=1, keepdims=True))
        ll = float((w * lse[:, 0]).sum())
        resp = np.exp(logp - lse) * w[:, None]
        nk = resp.sum(axis=0)
        if (nk <= 1e-12).any():
            break
        pi = nk
        mu = (resp * v[:, None]).sum(axis=0) / nk
        sd = np.sqrt(np.maximum((resp * (v[:, None] - mu) ** 2).sum(axis=0) / nk, var_floor))
        if ll - prev <= tol * max(1.0, abs(ll)):
            converged = True
            break
        prev = ll
    order = np.argsort(mu)
    return Mixture(mu[order], sd[order], pi[order] / pi.sum(), ll, converged)


def _decision_point(mix: Mixture, log_odds: float = 0.0) -> float:
    """Where the high component's weighted density is ``exp(log_odds)`` times the low one's.

    Between the means, by bisection; NaN if nowhere. ``log_odds = 0``: where they cross.
    """
    def diff(t):
        return np.diff(np.log(mix.weights) - np.log(mix.sds) - 0.5 * ((t - mix.means) / mix.sds) ** 2)[0] - log_odds

    lo, hi = float(mix.means[0]), float(mix.means[1])
    if not (diff(lo) < 0 < diff(hi)):
        return float("nan")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if diff(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- gating

def _histogram(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres and counts of the occupied :data:`BIN_T` bins of ``t``.

    EM runs on this histogram: exact enough (a bin is a few % of the negatives' sd in
    ``t``) and its cost does not grow with the number of cells.
    """
    lo = float(t.min())
    counts = np.bincount(np.floor((t - lo) / BIN_T).astype(np.int64))
    centres = lo + (np.arange(counts.size) + 0.5) * BIN_T
    return centres[counts > 0], counts[counts > 0]


def _valley_gate(t: np.ndarray, t_3sd: float) -> tuple[float, float]:
    """Left end of the floor of the deepest dip between the negative peak and a mode above ``t_3sd``.

    Where a few cells are spread thinly over a wide gap (dim positives, below the mode of the
    bright ones), the bottom of the dip can lie anywhere along the gap, even between the dim
    and the bright positives; the negatives' tail falls steeply, so the gate is put where
    it meets the floor (:data:`VALLEY_FLOOR`), the start of the gap.

    Returns
    -------
    gate_t : float
        The gate (transformed units), NaN when there is none.
    depth : float
        ``1 - density(valley) / density(mode)`` in [0, 1]: 1 is an empty gap.
    """
    from scipy.ndimage import gaussian_filter1d

    lo = float(min(t.min(), 0.0))
    counts = np.bincount(np.floor((t - lo) / BIN_T).astype(np.int64)).astype(np.float64)
    centres = lo + (np.arange(counts.size) + 0.5) * BIN_T
    density = gaussian_filter1d(counts, VALLEY_SMOOTH_T / BIN_T, mode="constant")
    above = np.flatnonzero(centres > t_3sd)
    if above.size < 3:
        return float("nan"), 0.0
    # The highest local maximum above background + 3 sd, then the lowest point between the
    # negative peak (t = 0) and it.
    peaks = above[1:-1][(density[above[1:-1]] >= density[above[:-2]]) & (density[above[1:-1]] > density[above[2:]])]
    zero = int(np.clip(np.searchsorted(centres, 0.0), 0, counts.size - 1))
    best = (-1, -1, 0.0)  # valley bin, peak bin, depth
    for peak in peaks[np.argsort(density[peaks])[::-1]]:
        between = np.arange(zero, peak)
        if between.size == 0:
            continue
        valley = between[np.argmin(density[between])]
        depth = 1.0 - density[valley] / density[peak]
        if depth >= 1.0 - VALLEY_MAX_DEPTH and counts[valley:].sum() >= VALLEY_MIN_CELLS \
                and centres[valley] > 0.0 and depth > best[2]:
            best = (int(valley), int(peak), float(depth))
    valley, peak, depth = best
    if valley < 0:
        return float("nan"), 0.0
    floor = density[valley] + VALLEY_FLOOR * (density[peak] - density[valley])
    while valley - 1 > zero and density[valley - 1] <= floor:
        valley -= 1
    return float(centres[valley]), depth


def _log_split(u: np.ndarray, floor: float) -> float:
    """Crossing of two log-normal populations among ``u > floor``; NaN where there are not two.

    Used where neither a valley nor a separated mixture was found: a dim positive population
    merged with the negatives' right tail. Both are mostly stain (specific, non-specific,
    spillover) times the gain, so on ``log u`` a change of gain shifts both without changing
    their shape, and the crossing (in raw units above the background) moves by the gain's
    factor: exactly when every intensity scales, approximately when only the stain does (the
    noise floor and autofluorescence stay). The noise rule it replaces stays a fixed number of
    noise sds above the background whatever the gain, far above dim positives.

    Parameters
    ----------
    u : (n,) float array
        Intensity above the background (raw units).
    floor : float
        Cells at or below it (raw units above background; noise) are left out.

    Returns
    -------
    float
        The gate above the background (raw units), or NaN.
    """
    v = np.log(u[u > floor])
    if v.size < 2 * MIN_CELLS or np.ptp(v) < 2 * BIN_T:
        return float("nan")
    centres, counts = _histogram(v)
    mix = fit_two_gaussians(centres, counts, init=_otsu_init(centres, counts), var_floor=(2 * BIN_T) ** 2)
    g = _decision_point(mix, np.log(FALLBACK_ODDS))
    # No Ashman's D here: overlapping populations are the reason for the fallback; the ratio of
    # the medians is what tells a dim population from a skewed negative tail.
    if not (np.isfinite(g) and mix.weights[1] * v.size >= MIN_CELLS
            and mix.means[1] - mix.means[0] >= np.log(MIN_LOG_RATIO)):
        return float("nan")
    return float(np.exp(g))


def _otsu_init(centres: np.ndarray, counts: np.ndarray) -> tuple:
    """Means, sds and weights of the two classes of Otsu's split (largest between-class variance).

    A median split would put the low component on the crowded start of a truncated tail.
    """
    n = counts.sum()
    w = np.cumsum(counts)[:-1] / n  # weight of the low class, split after each bin
    m = np.cumsum(counts * centres)[:-1] / n
    mean = float((counts * centres).sum() / n)
    k = int(np.argmax((mean * w - m) ** 2 / (w * (1.0 - w))))
    parts = (slice(0, k + 1), slice(k + 1, None))
    mu = [np.average(centres[p], weights=counts[p]) for p in parts]
    sd = [max(np.sqrt(np.average((centres[p] - u) ** 2, weights=counts[p])), 2 * BIN_T) for p, u in zip(parts, mu)]
    return mu, sd, [counts[p].sum() for p in parts]


def auto_gate(x: np.ndarray, marker: str, transform: str) -> Gate:
    """Automatic gate of one channel.

    Parameters
    ----------
    x : (n_cells,) float array
        Raw intensity (``X`` units); non-finite values are ignored.
    marker : str
    transform : {'arcsinh', 'log'}

    Returns
    -------
    Gate
        ``gate`` in raw units; ``positive_fraction``, ``n_positive`` and ``flagged`` are left
        at 0 / False for the caller, which also applies manual gates.
    """
    finite = x[np.isfinite(x)]
    nan = float("nan")
    if finite.size < MIN_CELLS or np.ptp(finite) == 0:
        return Gate(marker, nan, nan, nan, nan, transform, "none", 0.0, 0.0, 0, False, n_fitted=int(finite.size))
    bg, sd = estimate_background(finite)
    cof = COFACTOR_SD * sd
    kw = dict(background=bg, cofactor=cof, transform=transform)
    t = transform_intensity(finite, **kw)
    # The fallback serves small positive fractions, so the 90th percentile lies among the
    # negatives and shows their right skew (autofluorescence, multiplicative non-specific
    # stain), which the left half of the peak cannot. Bounded to 1-4 sd, so that the gate
    # stays within 5-20 sd of the background whatever lifts the upper decile.
    sd_right = float(np.clip((np.quantile(finite, 0.9) - bg) / 1.2816, sd, 4.0 * sd))
    t_sd, t_3sd, t_fallback = transform_intensity(bg + np.array([sd, 3.0 * sd, FALLBACK_SD * sd_right]), **kw)
    gate_t, method, quality = t_fallback, "fallback", 0.0
    above = t > t_3sd
    if above.sum() < MIN_CELLS:
        return Gate(marker, float(inverse_transform(gate_t, **kw)), bg, sd, cof, transform, method, 0.0, 0.0, 0, False,
                    n_fitted=int(finite.size))
    # A visible second mode: gate at the dip before it. Preferred to the mixture's crossing,
    # which a long right tail of the negatives drags into the positives, and to the mixture's
    # accept/reject test, whose verdict can flip with a 15 % change of stain.
    valley_t, depth = _valley_gate(t, t_3sd)
    if np.isfinite(valley_t):
        gate = float(inverse_transform(valley_t, **kw))
        return Gate(marker, gate, bg, sd, cof, transform, "valley", float(depth), 0.0, 0, False, n_fitted=int(finite.size))
    # 1) All cells, the low component started on the negative peak (and required to stay
    #    there), the high one on the cells above background + 3 sd.
    # 2) Else the cells right of the negative peak only, split first by Otsu: where the
    #    negatives' long tail (autofluorescence, spillover, neighbours' membranes) holds
    #    about as many cells as the positives, it becomes the low component there.
    stages = ((t, ((0.0, t[above].mean()), (t_sd, max(t[above].std(), 10 * BIN_T)), (1 - above.mean(), above.mean()))),
              (t[above], None))
    for stage, (values, init) in enumerate(stages):
        centres, counts = _histogram(values)
        mix = fit_two_gaussians(centres, counts, init=init or _otsu_init(centres, counts), var_floor=(2 * BIN_T) ** 2)
        g = _decision_point(mix)
        if not (np.isfinite(g) and mix.weights[1] * values.size >= MIN_CELLS
                and (stage > 0 or abs(mix.means[0]) <= t_3sd)):
            continue
        d = mix.ashman_d()
        if stage == 0:
            quality = d * d / (d * d + 4.0)
        # Separated populations: D >= 2 and the components' central 95 % do not overlap.
        if d >= MIN_SEPARATION_D and mix.means[0] + 2.0 * mix.sds[0] < mix.means[1] - 2.0 * mix.sds[1]:
            gate_t, method, quality = g, "mixture", d * d / (d * d + 4.0)
            break
    if method == "fallback":
        # Cells above background + 3 sd, as for the mixture's high component: below it, log u
        # spreads pure noise towards minus infinity.
        split = _log_split(finite - bg, 3.0 * sd)
        if np.isfinite(split):
            return Gate(marker, bg + split, bg, sd, cof, transform, method, float(quality), 0.0, 0, False,
                        n_fitted=int(finite.size))
    gate = float(inverse_transform(gate_t, **kw))
    return Gate(marker, gate, bg, sd, cof, transform, method, float(quality), 0.0, 0, False, n_fitted=int(finite.size))
