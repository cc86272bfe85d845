"""Positivity per marker (manual or automatic gates) and rule-based cell types.

One slide at a time, in place on its cell table:

1. spectral compensation of every compartment layer (when configured), ``X`` rebuilt;
2. per marker, the background (the negative cells' mode) and its noise, from the slide;
3. an automatic gate on ``arcsinh`` (or ``log``) of the background-subtracted intensity:
   the valley before a second mode, else a two-Gaussian mixture (on all cells, else on the
   cells right of the negative peak), else the background plus 5 times the negatives'
   right-hand spread (:mod:`tme_pipeline.autogate`);
4. manual gates override it (``gating.per_slide`` over ``gating.manual``);
5. lineage-exclusive markers (``gating.exclusive``, e.g. CD20 and CD3): a cell above both
   gates keeps only the marker that stands higher above its gate, by
   :func:`gate_score`, ``(x - background) / (gate - background)`` (1 at the gate, 0 at the
   negatives' mode: free of stain gain and offset); in a crowded follicle a B cell's band
   reads its T neighbours' CD3 and vice versa, whereas a real cell is of one lineage;
6. ``obs['phenotype']``: the first rule that holds, else ``other``; in a rule with several
   ``+`` markers, one may pass only its weak gate (``gating.weak_fraction`` of the way from
   the background to the gate) when the others pass theirs; objects whose nuclear DAPI is
   under ``gating.min_dapi_fraction`` of the slide's median nucleus are debris and stay
   ``other`` (:func:`low_dapi`);
7. markers of ``gating.within`` (in no rule) are gated last, on the cells of their phenotype
   only: PD-L1 on tumour cells, whose own background and positive fraction (~30 %) give a
   clear gate where all cells (~4 % positive, most of them lymphocytes) give a vague one;
8. ``obs['<marker>_pos']`` (each marker's own gate, before 5); gates, flags and parameters go to ``uns['gates']`` and
   ``uns['phenotyping']``.

Gates are recorded in raw ``X`` units, so any of them can be typed back as a manual gate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from .autogate import COFACTOR_SD, FALLBACK_SD, MIN_SEPARATION_D, Gate, auto_gate
from .config import CompensationConfig, GatingConfig, PhenotypeRule
from .quantify import COMPARTMENT_LAYERS

__all__ = ["phenotype_cells", "PhenotypeResult", "Gate", "compensate", "gate_score", "resolve_exclusive",
           "weak_gate", "low_dapi"]

logger = logging.getLogger(__name__)

#: Fewest cells of its phenotype a ``gating.within`` marker is gated on; below it, all cells.
WITHIN_MIN_CELLS = 50
@dataclass(frozen=True)
class PhenotypeResult:
    """What :func:`phenotype_cells` decided for one slide (for ``run.json``).

    gates : marker -> Gate, for every gated marker.
    flags : warnings naming the slide (low-quality or empty channels, skipped rules, ...).
    counts : phenotype -> number of cells, in category order.
    compensated : whether spillover compensation was applied by this call.
    skipped_rules : names of rules skipped because a marker is missing from the slide.
    exclusive : ``'A|B'`` -> ``{'n_both': cells above both gates, 'to_A': ..., 'to_B': ...}``,
        per pair of ``gating.exclusive`` (how the ambiguous cells were resolved).
    """

    slide_id: str
    gates: Mapping[str, Gate]
    flags: tuple[str, ...]
    counts: Mapping[str, int]
    compensated: bool
    skipped_rules: tuple[str, ...]
    exclusive: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-serialisable summary."""
        return {"slide_id": self.slide_id, "flags": list(self.flags), "counts": dict(self.counts),
                "compensated": self.compensated, "skipped_rules": list(self.skipped_rules),
                "gates": {m: g.to_uns() for m, g in self.gates.items()},
                "exclusive": {k: dict(v) for k, v in self.exclusive.items()}}


# --------------------------------------------------------------------------- compensation

def compensate(cells: ad.AnnData, compensation: CompensationConfig, *, slide_id: str) -> list[str]:
    """Undo spectral spillover in place: solve ``observed = S @ true`` for every cell.

    Every compartment layer (``nucleus``, ``membrane``, ...) is compensated on its own
    (a layer's means of all markers average the same pixels, so the pixel-wise linear model
    holds for the means); ``X`` is then rebuilt from the layers by ``var['compartment']``.
    The dark offset, added after spillover, becomes ``S^-1 @ offset``: still one constant per
    marker, which the background estimate absorbs. Markers of ``compensation`` absent from
    the slide are dropped from ``S`` (their dye is absent, so is its spillover). Without
    layers, ``X`` itself is compensated, approximately, with a flag.

    Returns
    -------
    flags : list of str
    """
    flags: list[str] = []
    present = [m for m in compensation.markers if m in cells.var_names]
    missing = [m for m in compensation.markers if m not in cells.var_names]
    if missing:
        flags.append(f"slide {slide_id!r}: compensation markers {missing} are not on the slide; "
                     "their rows and columns of the spillover matrix are ignored")
    if len(present) < 2:
        return flags
    keep = [compensation.markers.index(m) for m in present]
    spill = np.asarray(compensation.spillover, dtype=np.float64)[np.ix_(keep, keep)]
    if not np.isfinite(spill).all() or np.linalg.cond(spill) > 1e8:
        raise ValueError(f"slide {slide_id!r}: the compensation spillover matrix is singular")
    cols = [cells.var_names.get_loc(m) for m in present]

    def solve(values: np.ndarray) -> np.ndarray:
        out = np.array(values, copy=True)
        out[:, cols] = np.linalg.solve(spill, np.asarray(values[:, cols], np.float64).T).T
        return out

    compartments = cells.var["compartment"] if "compartment" in cells.var else None
    needed = set() if compartments is None else {COMPARTMENT_LAYERS[compartments.iloc[c]] for c in cols}
    if compartments is None or not needed <= set(cells.layers):
        flags.append(f"slide {slide_id!r}: compartment layers missing; compensation applied to X "
                     "directly (approximate where markers live in different compartments)")
        cells.X = solve(np.asarray(cells.X))
        return flags
    for name in [n for n in COMPARTMENT_LAYERS.values() if n in cells.layers]:
        cells.layers[name] = solve(np.asarray(cells.layers[name]))
    x = np.array(cells.X, copy=True)
    for c in cols:
        x[:, c] = cells.layers[COMPARTMENT_LAYERS[compartments.iloc[c]]][:, c]
    cells.X = x
    return flags


# --------------------------------------------------------------------------- gating

def _manual_gate(marker: str, gating: GatingConfig, slide_id: str) -> float | None:
    per_slide = gating.per_slide.get(slide_id, {})
    if marker in per_slide:
        return float(per_slide[marker])
    if marker in gating.manual:
        return float(gating.manual[marker])
    return None


def _gate_markers(cells, markers, gating, slide_id, populations: Mapping[str, tuple[str, np.ndarray]] | None = None,
                  ) -> tuple[dict[str, Gate], dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Gate every marker: automatic, then manual override, then positivity and flags.

    ``populations``: marker -> (name, (n,) bool) of the cells its automatic gate is found on.
    Returns gates, positivity, weak positivity (above :func:`weak_gate`) and flags.
    """
    gates, positive, weak, flags = {}, {}, {}, []
    x_all = np.asarray(cells.X)
    populations = populations or {}
    for m in markers:
        x = np.asarray(x_all[:, cells.var_names.get_loc(m)], dtype=np.float64)
        name, members = populations.get(m, ("all", None))
        gate = auto_gate(x if members is None else x[members], m, gating.transform)
        gate = Gate(**{**asdict(gate), "population": name})
        manual = _manual_gate(m, gating, slide_id)
        if manual is not None:
            gate = Gate(**{**asdict(gate), "gate": manual, "method": "manual"})
        with np.errstate(invalid="ignore"):
            pos = x > gate.gate if gate.method != "none" else np.zeros(x.size, bool)
        flagged = gate.method in ("none", "fallback") or (
            gate.method in ("mixture", "valley") and gate.quality < gating.min_quality)
        gates[m] = Gate(**{**asdict(gate), "positive_fraction": float(pos.mean()) if pos.size else 0.0,
                           "n_positive": int(pos.sum()), "flagged": bool(flagged)})
        positive[m] = pos
        with np.errstate(invalid="ignore"):
            weak[m] = pos | (x > weak_gate(gate.background, gate.gate, gating.weak_fraction))
        if gate.method == "none":
            flags.append(f"slide {slide_id!r}: marker {m!r}: empty or constant channel; no cell is called positive")
        elif flagged:
            why = ("no separated positive population, gate from the negatives' noise" if gate.method == "fallback"
                   else f"gate quality {gate.quality:.2f} < min_quality {gating.min_quality}")
            flags.append(f"slide {slide_id!r}: marker {m!r}: {why} ({gate.method} gate {gate.gate:.1f}, "
                         f"{pos.sum()} positive cells); review the gate or set a manual one")
    return gates, positive, weak, flags


def low_dapi(cells: ad.AnnData, min_fraction: float) -> np.ndarray:
    """Objects too dim in DAPI to be a cell's nucleus: debris, never a phenotype.

    On necrotic and pyknotic ground the segmenter finds fragments whose autofluorescence lifts
    every marker at once; lymphocyte nuclei are small but dense, so they are never the dim ones.

    Parameters
    ----------
    cells : AnnData with ``obs['dapi_mean']`` (nuclear DAPI mean, slide units).
    min_fraction : float, fraction of the median ``dapi_mean``; 0 disables.

    Returns
    -------
    (n_obs,) bool, True where ``dapi_mean < min_fraction * median(dapi_mean)``.
    """
    if min_fraction <= 0 or "dapi_mean" not in cells.obs or cells.n_obs == 0:
        return np.zeros(cells.n_obs, bool)
    dapi = cells.obs["dapi_mean"].to_numpy(np.float64)
    return dapi < min_fraction * float(np.nanmedian(dapi))


def weak_gate(background: float, gate: float, weak_fraction: float) -> float:
    """``background + weak_fraction * (gate - background)``, raw ``X`` units; NaN without a background."""
    return float(background + weak_fraction * (gate - background))


def gate_score(x: np.ndarray, gate: Gate) -> np.ndarray:
    """How far above its gate a marker stands: ``(x - background) / (gate - background)``.

    0 at the negatives' mode, 1 at the gate; unchanged by a stain gain or offset that moves
    intensities, background and gate together, so two markers' scores compare. (n,) float;
    NaN where the gate has no background or sits on it.
    """
    span = gate.gate - gate.background
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(x, np.float64) - gate.background) / (span if span > 0 else np.nan)


def resolve_exclusive(cells: ad.AnnData, pairs: Sequence[Sequence[str]], gates: Mapping[str, Gate],
                      positive: dict[str, np.ndarray], weak: dict[str, np.ndarray], *, slide_id: str,
                      ) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Give each cell above both gates of an exclusive pair to the marker with the higher :func:`gate_score`.

    The other marker is cleared in ``positive`` and ``weak`` (in place) for those cells, so the
    rules see one lineage; a tie goes to the pair's first marker. Pairs with a marker that was
    not gated are skipped with a flag. Returns the counts per pair (``'A|B'`` ->
    ``{'n_both', 'to_A', 'to_B'}``) and the flags.
    """
    counts, flags = {}, []
    for a, b in pairs:
        if a == b:
            raise ValueError(f"slide {slide_id!r}: exclusive pair {a}|{b} names one marker twice")
        if a not in gates or b not in gates:
            flags.append(f"slide {slide_id!r}: exclusive pair {a}|{b} skipped: "
                         f"{sorted({a, b} - set(gates))} not gated on this slide")
            continue
        both = positive[a] & positive[b]
        score = {m: gate_score(np.asarray(cells.X[:, cells.var_names.get_loc(m)]).ravel()[both], gates[m])
                 for m in (a, b)}
        to_a = np.zeros(both.size, bool)
        to_a[both] = ~(score[b] > score[a])
        to_b = both & ~to_a
        for loser, won_by_other in ((b, to_a), (a, to_b)):
            positive[loser] = positive[loser] & ~won_by_other
            weak[loser] = weak[loser] & ~won_by_other
        counts[f"{a}|{b}"] = {"n_both": int(both.sum()), f"to_{a}": int(to_a.sum()), f"to_{b}": int(to_b.sum())}
    return counts, flags


# --------------------------------------------------------------------------- phenotypes

def _assign_phenotypes(positive: Mapping[str, np.ndarray], weak: Mapping[str, np.ndarray],
                       rules: Sequence[PhenotypeRule | None], n: int) -> np.ndarray:
    """Code of the first rule (in order) that holds, ``len(rules)`` (other) where none does.

    A rule holds where its ``-`` markers are negative, its ``+`` markers weakly positive and
    all of them but at most one (none, for a rule with one ``+`` marker) positive.
    A skipped rule is ``None`` in ``rules``: it keeps its code but takes no cell.
    """
    codes = np.full(n, len(rules), dtype=np.int64)
    free = np.ones(n, bool)
    for k, rule in enumerate(rules):
        if rule is None:
            continue
        hit = free.copy()
        plus = [m for m, sign in rule.signs().items() if sign]
        for marker, sign in rule.signs().items():
            hit &= weak[marker] if sign else ~positive[marker]
        if plus:
            n_full = np.sum([positive[m] for m in plus], axis=0)
            hit &= n_full >= max(len(plus) - 1, 1)
        codes[hit] = k
        free &= ~hit
    return codes


def phenotype_cells(
    cells: ad.AnnData,
    *,
    gating: GatingConfig,
    phenotypes: Sequence[PhenotypeRule],
    compensation: CompensationConfig | None = None,
    slide_id: str,
    skip_markers: Sequence[str] = (),
    segmentation_markers: Sequence[str] = ("DAPI",),
) -> PhenotypeResult:
    """Gate every marker of one slide and give each cell a phenotype, in place.

    Gated markers: every marker of ``cells`` except ``skip_markers`` and the
    ``segmentation_markers`` (DAPI only delineates nuclei), unless a rule or a manual gate
    names one of those. A marker whose automatic gate is a fallback (no separated positive
    population) or a mixture with ``quality < gating.min_quality`` keeps its gate but is
    flagged (in the result, ``uns['gates'][m]['flagged']`` and ``uns['phenotyping']['flags']``):
    zeroing it would silently turn "unclear" into "absent", whereas a pathologist wants the
    number and the warning, and can then set a manual gate. Manual gates are never flagged.
    An empty or constant channel has no positives (method ``'none'``) and is flagged.
    A marker of ``gating.within`` is gated after the phenotypes, on the cells of its
    phenotype (on all cells, with a flag, where fewer than ``WITHIN_MIN_CELLS`` have it).

    Parameters
    ----------
    cells : AnnData
        One row per cell; ``X`` (n_cells, n_markers) float, raw mean intensity of each marker
        in its compartment; ``var['compartment']`` and layers ``nucleus``, ``membrane``,
        ``cytoplasm``, ``cell`` (needed for compensation only).
    gating : GatingConfig
    phenotypes : sequence of PhenotypeRule
        In precedence order.
    compensation : CompensationConfig, optional
        Spillover to undo first (``X`` and the layers are replaced by compensated values).
    slide_id : str
        Names the slide in flags and selects ``gating.per_slide[slide_id]``.
    skip_markers : sequence of str
        Optional markers missing from the slide; rules that need one are skipped.
    segmentation_markers : sequence of str
        Markers used only for segmentation, not gated.

    Returns
    -------
    PhenotypeResult

    Notes
    -----
    Writes ``obs['<marker>_pos']`` (bool, ``X > gate``) per gated marker, ``obs['phenotype']``
    (categorical: rule names in order, then ``other``; skipped rules keep their category so
    slides concatenate), ``uns['gates']`` (marker -> :meth:`Gate.to_uns`) and
    ``uns['phenotyping']`` (``params``, ``flags``, ``rules``, ``exclusive``: per pair of
    ``gating.exclusive``, the cells above both gates and to which marker each went).
    """
    if not isinstance(cells, ad.AnnData):
        raise ValueError(f"slide {slide_id!r}: phenotype_cells expects an AnnData, got {type(cells).__name__}")
    names = [r.name for r in phenotypes]
    if "other" in names or len(set(names)) != len(names):
        raise ValueError(f"slide {slide_id!r}: phenotype names must be unique and not 'other', got {names}")
    skip = set(skip_markers)
    present = set(cells.var_names) - skip
    rules: list[PhenotypeRule | None] = []
    flags: list[str] = []
    for rule in phenotypes:
        needed = set(rule.signs())
        absent = sorted(needed - present - skip)
        if absent:
            raise ValueError(f"slide {slide_id!r}: phenotype {rule.name!r} needs {absent}, which the cell table "
                             f"lacks (markers: {list(cells.var_names)}); list optional markers in skip_markers")
        if needed & skip:
            flags.append(f"slide {slide_id!r}: phenotype {rule.name!r} skipped: "
                         f"marker(s) {sorted(needed & skip)} missing from the slide")
        rules.append(None if needed & skip else rule)
    used = {m for r in rules if r is not None for m in r.signs()}
    in_rules = {m for r in phenotypes for m in r.signs()}
    for m, name in gating.within.items():
        if name not in names or m in in_rules:
            raise ValueError(f"slide {slide_id!r}: gating.within gates {m!r} within {name!r}: it must name a "
                             f"phenotype ({names}) and a marker that no rule uses")
    manual = set(gating.manual) | set(gating.per_slide.get(slide_id, {}))
    for m in sorted(manual - present):
        flags.append(f"slide {slide_id!r}: manual gate for {m!r} ignored: the marker is not on the slide")
    markers = [m for m in cells.var_names if m in present
               and (m not in segmentation_markers or m in used or m in manual)]

    # A table phenotyped before (e.g. cells.h5ad re-gated) must not be compensated twice.
    done = cells.uns.get("phenotyping", {}).get("params", {}).get("compensation", "none")
    comp_params = done if isinstance(done, Mapping) else "none"
    compensated = False
    if compensation is not None and compensation.markers:
        wanted = {"markers": list(compensation.markers), "spillover": np.asarray(compensation.spillover, float)}
        if isinstance(done, Mapping):
            if list(done["markers"]) != wanted["markers"] or not np.allclose(done["spillover"], wanted["spillover"]):
                raise ValueError(f"slide {slide_id!r}: cells were already compensated with another spillover matrix")
            flags.append(f"slide {slide_id!r}: cells already compensated with this matrix; not applied again")
        else:
            flags += compensate(cells, compensation, slide_id=slide_id)
            comp_params, compensated = wanted, True

    later = [m for m in markers if m in gating.within]
    gates, positive, weak, gate_flags = _gate_markers(cells, [m for m in markers if m not in later], gating, slide_id)
    flags += gate_flags
    # The rules see the exclusive-resolved positivity; obs['<m>_pos'] keeps each marker's own gate.
    lineage_pos, lineage_weak = dict(positive), dict(weak)
    exclusive, exclusive_flags = resolve_exclusive(cells, gating.exclusive, gates, lineage_pos, lineage_weak,
                                                   slide_id=slide_id)
    flags += exclusive_flags
    codes = _assign_phenotypes(lineage_pos, lineage_weak, rules, cells.n_obs)
    debris = low_dapi(cells, gating.min_dapi_fraction)
    codes[debris] = len(names)
    populations = {}
    for m in later:
        name = gating.within[m]
        members = codes == names.index(name)
        if members.sum() < WITHIN_MIN_CELLS:
            flags.append(f"slide {slide_id!r}: marker {m!r}: only {int(members.sum())} {name} cells "
                         f"(fewer than {WITHIN_MIN_CELLS}); gated on all cells instead")
        else:
            populations[m] = (name, members)
    later_gates, later_positive, _, later_flags = _gate_markers(cells, later, gating, slide_id, populations)
    gates.update(later_gates)
    positive.update(later_positive)
    flags += later_flags
    for m in markers:
        cells.obs[f"{m}_pos"] = positive[m]
    categories = names + ["other"]
    cells.obs["phenotype"] = pd.Categorical.from_codes(codes, categories=categories)
    counts = {c: int(k) for c, k in zip(categories, np.bincount(codes, minlength=len(categories)))}
    for flag in flags:
        logger.warning(flag)

    cells.uns["gates"] = {m: g.to_uns() for m, g in gates.items()}
    cells.uns["phenotyping"] = {
        "params": {
            "slide_id": slide_id, "transform": gating.transform, "min_quality": float(gating.min_quality),
            "cofactor_sd": COFACTOR_SD, "fallback_sd": FALLBACK_SD, "min_separation_d": MIN_SEPARATION_D,
            "gated_markers": list(markers), "skip_markers": sorted(skip),
            "segmentation_markers": list(segmentation_markers),
            "manual": {m: float(g) for m, g in gating.manual.items()},
            "per_slide": {m: float(g) for m, g in gating.per_slide.get(slide_id, {}).items()},
            "within": dict(gating.within), "weak_fraction": float(gating.weak_fraction),
            "min_dapi_fraction": float(gating.min_dapi_fraction), "n_low_dapi": int(debris.sum()),
            "compensation": comp_params, "exclusive": [list(p) for p in gating.exclusive],
        },
        "flags": list(flags),
        "exclusive": exclusive,
        "rules": {"name": names, "markers": [r.markers for r in phenotypes],
                  "applied": [r is not None for r in rules]},
    }
    return PhenotypeResult(slide_id, gates, tuple(flags), counts, compensated,
                           tuple(r.name for r, u in zip(phenotypes, rules) if u is None), exclusive)
