"""Per-slide metrics with units: areas, densities by region, TLS, PD-L1, the infiltration profile, the immune class.

Every metric is a float or None; None always comes with a reason in ``absent``. A cell's
region is ``obs['region']`` (``tumor_core`` / ``margin`` / ``stroma``); ``tumor`` is
``obs['in_tumor']`` (the bed), ``tumor_margin`` the bed and its margin band together (the
bed plus the margin's outer half: the "tumour + margin" of the Immunoscore and of the trial's
CD8 fold) and ``tissue`` all cells. Groups are the slide's phenotypes, matched by exact name,
plus ``t_cells`` and ``lymphocytes`` (lists of phenotype names in the config).

Densities over viable tissue
----------------------------
``density_<group>_<region>`` is cells per mm² of the region's **viable** part: necrosis
(``regions.npz``'s ``necrosis`` grid) is left out of both the area and the cells (a cell whose
centre lies on a necrotic grid pixel counts nowhere); ``fraction_`` and ``ratio_`` are over the
same cells. This is how pathologists score lymphocytes: the TIL working group excludes necrosis
and crush artefact (Salgado et al., Ann Oncol 2015;26:259-271; Hendry et al., Adv Anat Pathol
2017;24:235-251), and the Immunoscore counts in tumour and margin, not in necrotic areas. It is
also what the measurement can stand behind: necrotic debris is where false lymphocyte calls
gather. One definition, not a parallel ``_viable`` set, so that no analyst compares a
necrosis-diluted density with a viable one by mistake. The areas are kept beside them:
``area_<region>_mm2`` the whole region (``regions.json``), ``area_<region>_without_necrosis_mm2``
the densities' denominator, ``n_cells_in_necrosis`` the cells left out. A region absent in
``regions.json`` (too small), or whose viable part is under ``min_viable_area_mm2``, carries
no density (None, with the reason).

Immune phenotype (``immune_class``)
-----------------------------------
``inflamed`` when the tumour core holds more than ``inflamed_core_cd8_per_mm2`` CD8 T cells
per mm²; otherwise ``excluded`` when the invasive margin holds more than
``excluded_margin_cd8_per_mm2``; otherwise ``desert``. The classes are those of Chen & Mellman
(Nature 2017;541:321-330, "Elements of cancer immunity and the cancer-immune set point") and
Hegde, Karanikas & Evers (Clin Cancer Res 2016;22:1865-1874); the core / invasive-margin split
is the Immunoscore's (Galon et al., Science 2006;313:1960-1964; Pagès et al., Lancet
2018;391:2128-2139). The default cut-offs (100 and 200 CD8/mm²) are a convention of this
project, in the range these studies report, not a published standard: check them per study
and tumour type. On a biopsy the 250 µm inner margin can swallow the whole bed, so that
``tumor_core`` is absent; a pathologist then reads the biopsy's tumour as the core, so the
whole bed's CD8 density stands in for the core's, and the reason says so. Without a bed there
is no class (None, with the reason); with a core at or under the cut-off and no margin,
excluded and desert cannot be told apart (None).

PD-L1 (as scored with the PD-L1 IHC 22C3 pharmDx assay)
--------------------------------------------------------
* ``pdl1_tps``: tumour proportion score, % of viable tumour cells that are PD-L1+ (Garon et
  al., N Engl J Med 2015;372:2018-2028);
* ``pdl1_cps``: combined positive score, PD-L1+ tumour cells plus PD-L1+ lymphocytes and
  macrophages per 100 viable tumour cells, capped at 100 (Kulangara et al., Arch Pathol Lab
  Med 2019;143:330-337). Immune cells count within the tumour and its adjacent stroma (the bed
  and the margin); the default panel has no macrophage marker, so the config's
  ``immune_phenotypes`` are the lymphocytes. The assay needs at least 100 viable tumour cells
  (``min_viable_tumor_cells``); with fewer, both scores are None. Viable: nucleus of at least
  ``min_nucleus_um2`` (smaller objects are pyknotic debris).

Infiltration profile
--------------------
Signed distance to the bed's border with other tissue (µm, negative inside; the bed's edge
against glass is no border) on the region grid, as ``regions`` computes it for the cells; per
``profile_bin_um`` bin from ``-profile_range_um`` to ``+profile_range_um`` the viable tissue
area (mm², necrosis left out as for the densities), the cells of each ``profile_groups`` group (by their ``border_distance_um``) and their
density (cells/mm²), None in a bin with less than ``profile_min_area_mm2`` of tissue.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .regions import REGION_KEYS, signed_border_distance_um
from .settings.metrics import MetricsConfig
from .tls import MATURITIES

__all__ = ["MetricsConfig", "SlideMetrics", "InfiltrationProfile", "slide_metrics", "metrics_json",
           "infiltration_profile", "signed_border_distance_um", "immune_class",
           "METRIC_REGIONS", "METRICS_FORMAT"]

logger = logging.getLogger(__name__)

METRICS_FORMAT = 1
#: Regions every density, fraction and ratio is computed over.
METRIC_REGIONS = ("tissue", "tumor", "tumor_core", "margin", "stroma", "tumor_margin")
_CELL_REGIONS = ("tumor_core", "margin", "stroma")
_REGION_WORDS = {"tissue": "tissue", "tumor": "tumour bed", "tumor_core": "tumour core", "margin": "invasive margin",
                 "tumor_margin": "tumour bed and invasive margin",
                 "stroma": "stroma", "viable_tumor": "viable tumour", "necrosis": "necrosis", "fibrosis": "fibrosis"}
_MM2_PER_UM2 = 1e-6


@dataclass(frozen=True)
class InfiltrationProfile:
    """Cell densities in bins of signed distance to the tumour bed's border.

    Attributes
    ----------
    bin_edges_um : ndarray, shape (n_bins + 1,)
        µm, negative inside the bed.
    area_mm2 : ndarray, shape (n_bins,)
        Tissue area of each bin (mm²); zeros when there is no border.
    counts : dict str -> ndarray of int64, shape (n_bins,)
        Cells of each group per bin.
    density : dict str -> ndarray of float64, shape (n_bins,)
        cells/mm²; NaN where the bin (or the whole profile) has no density.
    bin_absent : list of (str or None), length n_bins
        Why a bin has no density.
    reason : str or None
        Why the whole profile is empty (no bed, no border), else None.
    """

    bin_edges_um: np.ndarray
    area_mm2: np.ndarray
    counts: dict[str, np.ndarray]
    density: dict[str, np.ndarray]
    bin_absent: list
    reason: str | None = None


@dataclass(frozen=True)
class SlideMetrics:
    """The metrics of one slide.

    Attributes
    ----------
    metrics : dict str -> float or None
    units : dict str -> str
        One of ``mm2``, ``cells/mm2``, ``%``, ``ratio``, ``count``, ``1/mm2``, ``score``; a key per metric.
    descriptions : dict str -> str
    absent : dict str -> str
        Metric -> why it is None.
    immune_class : {'inflamed', 'excluded', 'desert'} or None
    immune_class_reason : str
    infiltration_profile : InfiltrationProfile
    warnings : tuple of str
        Config names that match no phenotype of the slide.
    params : dict
        The configuration used.
    """

    metrics: dict[str, float | None]
    units: dict[str, str]
    descriptions: dict[str, str]
    absent: dict[str, str]
    immune_class: str | None
    immune_class_reason: str
    infiltration_profile: InfiltrationProfile
    warnings: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)


class _Table:
    """Metrics, units, descriptions and reasons, filled in one place so that none lacks a unit."""

    def __init__(self) -> None:
        self.values: dict[str, float | None] = {}
        self.units: dict[str, str] = {}
        self.descriptions: dict[str, str] = {}
        self.absent: dict[str, str] = {}

    def put(self, name: str, value, unit: str, description: str, reason: str | None = None) -> None:
        if value is not None and not np.isfinite(value):
            value, reason = None, reason or "not a finite number"
        if value is None:
            self.absent[name] = reason or "not measured"
        self.values[name] = None if value is None else float(value)
        self.units[name] = unit
        self.descriptions[name] = description


def slide_metrics(cells, regions: Mapping, region_grids: tuple[Mapping[str, np.ndarray], float], tls: Mapping,
                  config: MetricsConfig | None = None) -> SlideMetrics:
    """Every per-slide metric, with units and the reason for each missing one.

    Parameters
    ----------
    cells : AnnData, n_cells rows
        ``cells.h5ad``: obs ``phenotype``, ``region``, ``in_tumor``, ``border_distance_um`` (µm),
        ``x_um``, ``y_um`` (µm; needed when the grids hold necrosis), ``nucleus_area_um2`` (µm²,
        optional) and ``<pdl1_marker>_pos`` (optional).
    regions : dict
        ``regions.json``: ``areas_mm2`` (mm²), ``percent_necrosis``, ``percent_viable_tumor``, ``absent``.
    region_grids : (masks, grid_um)
        ``masks`` ``{name: (H, W) bool}`` with at least ``tissue`` and ``tumor``, and ``margin`` and
        ``necrosis`` as ``regions.npz`` has them (without ``margin`` there is no ``tumor_margin``,
        without ``necrosis`` nothing is left out); ``grid_um`` the grid pixel (µm).
    tls : dict
        ``tls.json``: ``count``, ``counts`` by maturity, ``tls`` rows with ``area_um2`` (µm²).
    config : MetricsConfig

    Returns
    -------
    SlideMetrics

    Raises
    ------
    ValueError
        When a required obs column, ``areas_mm2`` or a grid is missing.
    """
    config = config or MetricsConfig()
    obs = cells.obs
    missing = [c for c in ("phenotype", "region", "in_tumor", "border_distance_um") if c not in obs.columns]
    if missing:
        raise ValueError(f"cells.obs lacks column(s) {missing}; metrics need the annotated cells.h5ad")
    if "areas_mm2" not in regions:
        raise ValueError("regions.json has no 'areas_mm2'")
    masks, grid_um = region_grids
    if not {"tissue", "tumor"} <= set(masks):
        raise ValueError(f"region grids lack 'tissue' or 'tumor' (have {sorted(masks)})")

    necrosis = np.asarray(masks["necrosis"], bool) if "necrosis" in masks else None
    if necrosis is not None and necrosis.any() and not {"x_um", "y_um"} <= set(obs.columns):
        raise ValueError("cells.obs lacks x_um / y_um, needed to leave the cells in necrosis out of the densities")

    phen = obs["phenotype"]
    names = [str(c) for c in (phen.cat.categories if isinstance(phen.dtype, pd.CategoricalDtype)
                               else sorted(phen.astype(str).unique())) if str(c) != "other"]
    phen = phen.astype(str).to_numpy()
    groups, warnings = _groups(names, config)
    region = obs["region"].astype(str).to_numpy()
    in_tumor = obs["in_tumor"].to_numpy(bool)
    members = {"tissue": np.ones(len(obs), bool), "tumor": in_tumor,
               **{r: region == r for r in _CELL_REGIONS}, "tumor_margin": in_tumor | (region == "margin")}
    areas = {k: regions["areas_mm2"].get(k) for k in REGION_KEYS}
    region_absent = dict(regions.get("absent") or {})
    in_necrosis = _cells_on(necrosis, obs, grid_um)
    members = {r: m & ~in_necrosis for r, m in members.items()}
    viable_areas, viable_absent, whole_tm = _viable_areas(areas, masks, necrosis, grid_um, region_absent, config)

    t = _Table()
    t.put("n_cells", len(obs), "count", "cells detected on the slide")
    t.put("n_cells_in_necrosis", int(in_necrosis.sum()), "count",
          "cells whose centre lies in necrosis, left out of every density, fraction and ratio")
    for k in REGION_KEYS:
        t.put(f"area_{k}_mm2", areas[k], "mm2", f"area of the {_REGION_WORDS[k]}", None if areas[k] is not None
              else f"regions.json has no area for {k}")
    t.put("area_tumor_margin_mm2", whole_tm, "mm2", f"area of the {_REGION_WORDS['tumor_margin']}",
          None if whole_tm is not None else viable_absent.get("tumor_margin", "no tumour bed"))
    for r in METRIC_REGIONS:
        t.put(f"area_{r}_without_necrosis_mm2", viable_areas[r], "mm2",
              f"area of the {_REGION_WORDS[r]} without necrosis: the denominator of its densities",
              None if viable_areas[r] is not None else viable_absent.get(r, f"{r} has no area"))
    # One bincount per region over phenotype codes; groups are sums of their phenotypes' rows.
    codes = pd.Categorical(phen, categories=names).codes
    per_region = {r: np.bincount(codes[m & (codes >= 0)], minlength=len(names)) for r, m in members.items()}
    totals = {r: int(m.sum()) for r, m in members.items()}
    for r in METRIC_REGIONS:
        why = viable_absent.get(r)
        for g, idx in groups.items():
            n = int(per_region[r][idx].sum()) if idx else 0
            gwhy = why or (None if idx else f"no phenotype of group {g} on this slide")
            t.put(f"density_{g}_{r}", None if gwhy else n / viable_areas[r], "cells/mm2",
                  f"{g} cells per mm² of viable {_REGION_WORDS[r]} (necrosis left out)", gwhy)
            fwhy = gwhy or (None if totals[r] else f"no cells in {r}")
            t.put(f"fraction_{g}_{r}", None if fwhy else 100.0 * n / totals[r], "%",
                  f"{g} cells as % of all cells in viable {_REGION_WORDS[r]}", fwhy)
        _ratio(t, r, why, per_region[r], names, config)
    _tls_metrics(t, tls, areas.get("tissue"), region_absent)
    for k in ("percent_necrosis", "percent_viable_tumor"):
        value = regions.get(k)
        t.put(k, value, "%", f"{k.removeprefix('percent_').replace('_', ' ')} as % of the tumour bed's area",
              None if value is not None else _region_reason("tumor", areas.get("tumor"), region_absent)
              or "no tumour bed")
    _pdl1(t, obs, phen, members, config)
    immune_class, reason = _immune_class(t, config)
    # Cells in necrosis fall in no bin (NaN distance), as necrotic pixels add no area.
    distance = np.where(in_necrosis, np.nan, obs["border_distance_um"].to_numpy(np.float64))
    profile = infiltration_profile(distance, phen, masks, grid_um,
                                   {g: [names[i] for i in groups[g]] for g in config.profile_groups if g in groups},
                                   config, exclude=necrosis)
    for g in config.profile_groups:
        if g not in groups:
            warnings.append(f"metrics.profile_groups names {g!r}, which is neither a phenotype nor a group")
    logger.info("metrics: %d metrics, %d absent, immune class %s", len(t.values), len(t.absent), immune_class)
    return SlideMetrics(metrics=t.values, units=t.units, descriptions=t.descriptions, absent=t.absent,
                        immune_class=immune_class, immune_class_reason=reason, infiltration_profile=profile,
                        warnings=tuple(warnings), params=config.model_dump(mode="json"))


def _groups(names: list[str], config: MetricsConfig) -> tuple[dict[str, list[int]], list[str]]:
    """Group name -> indices into ``names``: each phenotype alone, then t_cells and lymphocytes (exact names)."""
    groups = {n: [i] for i, n in enumerate(names)}
    warnings = []
    for g, listed in (("t_cells", config.t_cells), ("lymphocytes", config.lymphocytes)):
        unknown = [p for p in listed if p not in names]
        if unknown:
            warnings.append(f"metrics.{g} names {unknown}, which are not phenotypes of the slide ({names})")
        groups[g] = [names.index(p) for p in listed if p in names]
    return groups, warnings


def _cells_on(mask: np.ndarray | None, obs: pd.DataFrame, grid_um: float) -> np.ndarray:
    """Cells whose centre lies on a True pixel of ``mask`` (the grid lookup of ``regions``); none without a mask."""
    if mask is None or not mask.any():
        return np.zeros(len(obs), bool)
    ii = np.clip((obs["y_um"].to_numpy(np.float64) / grid_um).astype(np.int64), 0, mask.shape[0] - 1)
    jj = np.clip((obs["x_um"].to_numpy(np.float64) / grid_um).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[ii, jj]


def _viable_areas(areas: Mapping[str, float | None], masks: Mapping[str, np.ndarray], necrosis: np.ndarray | None,
                  grid_um: float, region_absent: Mapping[str, str],
                  config: MetricsConfig) -> tuple[dict[str, float | None], dict[str, str], float | None]:
    """Each metric region's area without necrosis (mm²), why a region carries no density, and
    the whole area of ``tumor_margin`` (mm², None without it).

    The whole area is ``regions.json``'s; the necrosis in it is counted on the grid (both come
    from the same grid in ``regions``). ``tumor_margin`` (bed or margin) is not in
    ``regions.json``: its area is counted on the grid, and it is absent with the bed.
    """
    px_mm2 = grid_um * grid_um * _MM2_PER_UM2
    nec = necrosis if necrosis is not None else np.zeros(np.shape(masks["tissue"]), bool)
    out: dict[str, float | None] = {}
    absent: dict[str, str] = {}
    whole = dict(areas)
    if "margin" in masks:
        union = (np.asarray(masks["tumor"], bool) | np.asarray(masks["margin"], bool)) & np.asarray(masks["tissue"], bool)
        whole["tumor_margin"] = float(union.sum()) * px_mm2 if areas.get("tumor") else None
    else:
        whole["tumor_margin"] = None
        absent["tumor_margin"] = "regions.npz has no margin grid"
    if "tumor_margin" not in absent:
        why_bed = _region_reason("tumor", areas.get("tumor"), region_absent)
        if why_bed:
            absent["tumor_margin"] = why_bed
    whole_tm = None if "tumor_margin" in absent else whole["tumor_margin"]
    for r in METRIC_REGIONS:
        why = absent.get(r) or _region_reason(r, whole.get(r), region_absent)
        if why:
            absent[r] = why
            out[r] = None
            continue
        if r == "tumor_margin":
            inside = union
        elif r in masks:
            inside = np.asarray(masks[r], bool)
        elif nec.any():
            raise ValueError(f"region grids lack {r!r}, needed to take the necrosis out of its area "
                             f"(have {sorted(masks)})")
        else:
            inside = None
        lost = float((inside & nec).sum()) * px_mm2 if inside is not None else 0.0
        out[r] = max(0.0, whole[r] - lost)
        if out[r] < config.min_viable_area_mm2:
            absent[r] = (f"{r} without necrosis {out[r]:.3g} mm² < {config.min_viable_area_mm2:g} mm² "
                         f"(metrics.min_viable_area_mm2)")
    return out, absent, whole_tm


def _region_reason(r: str, area: float | None, region_absent: Mapping[str, str]) -> str | None:
    """Why region ``r`` carries no density, or None."""
    if r in region_absent:
        return f"{r} absent: {region_absent[r]}"
    if r == "tissue" and "tissue" in region_absent:
        return f"tissue absent: {region_absent['tissue']}"
    if area is None or not area > 0:
        return f"{r} has no area"
    return None


def _ratio(t: _Table, r: str, why: str | None, counts: np.ndarray, names: list[str], config: MetricsConfig) -> None:
    cd8, treg = config.cd8_phenotype, config.treg_phenotype
    if why is None and (cd8 not in names or treg not in names):
        why = f"phenotype {cd8 if cd8 not in names else treg!r} not on this slide"
    if why is None and counts[names.index(treg)] == 0:
        why = f"no {treg} cells in {r}"
    value = None if why else counts[names.index(cd8)] / counts[names.index(treg)]
    t.put(f"ratio_cd8_t_treg_{r}", value, "ratio", f"{cd8} cells per {treg} cell in {_REGION_WORDS[r]}", why)


def _tls_metrics(t: _Table, tls: Mapping, tissue_mm2: float | None, region_absent: Mapping[str, str]) -> None:
    count = int(tls.get("count", len(tls.get("tls", []))))
    counts = tls.get("counts") or {}
    t.put("tls_count", count, "count", "tertiary lymphoid structures on the slide")
    for m in MATURITIES:
        t.put(f"tls_{m}_count", int(counts.get(m, 0)), "count", f"TLS of maturity {m}")
    why = _region_reason("tissue", tissue_mm2, region_absent)
    area_um2 = float(sum(float(row.get("area_um2") or 0.0) for row in tls.get("tls", [])))
    t.put("tls_per_mm2", None if why else count / tissue_mm2, "1/mm2", "TLS per mm² of tissue", why)
    t.put("tls_area_fraction", None if why else 100.0 * area_um2 * _MM2_PER_UM2 / tissue_mm2, "%",
          "TLS area as % of the tissue area", why)


def _pdl1(t: _Table, obs: pd.DataFrame, phen: np.ndarray, members: Mapping[str, np.ndarray],
          config: MetricsConfig) -> None:
    column = f"{config.pdl1_marker}_pos"
    tps_text = "tumour proportion score: % of viable tumour cells that are PD-L1+"
    cps_text = "combined positive score: PD-L1+ tumour and immune cells per 100 viable tumour cells, at most 100"
    if column not in obs.columns:
        why = f"no PD-L1 positivity (obs[{column!r}]): the marker {config.pdl1_marker!r} was not gated"
        t.put("pdl1_tps", None, "%", tps_text, why)
        t.put("pdl1_cps", None, "score", cps_text, why)
        return
    positive = obs[column].to_numpy(bool)
    tumour = np.isin(phen, config.tumor_phenotypes)
    if "nucleus_area_um2" in obs.columns:
        tumour &= obs["nucleus_area_um2"].to_numpy(np.float64) >= config.min_nucleus_um2
    n_tumour = int(tumour.sum())
    why = (None if n_tumour >= config.min_viable_tumor_cells
           else f"{n_tumour} viable tumour cells < {config.min_viable_tumor_cells}")
    # CPS counts immune cells in tumour nests and the adjacent stroma: the bed and its margin.
    immune = np.isin(phen, config.immune_phenotypes) & (members["tumor"] | members["margin"])
    pos_tumour, pos_immune = int((tumour & positive).sum()), int((immune & positive).sum())
    t.put("pdl1_tps", None if why else 100.0 * pos_tumour / n_tumour, "%", tps_text, why)
    t.put("pdl1_cps", None if why else min(100.0, 100.0 * (pos_tumour + pos_immune) / n_tumour), "score",
          cps_text, why)


def _immune_class(t: _Table, config: MetricsConfig) -> tuple[str | None, str]:
    cd8 = config.cd8_phenotype
    keys = {r: f"density_{cd8}_{r}" for r in ("tumor_core", "margin", "tumor")}
    return immune_class(t.values.get(keys["tumor_core"]), t.values.get(keys["margin"]),
                        bed_cd8=t.values.get(keys["tumor"]), config=config,
                        why_no_core=t.absent.get(keys["tumor_core"], "no core"),
                        why_no_margin=t.absent.get(keys["margin"], "no margin"),
                        why_no_bed=t.absent.get(keys["tumor"], "no tumour bed"))


def immune_class(core_cd8: float | None, margin_cd8: float | None, *, bed_cd8: float | None = None,
                 config: MetricsConfig | None = None, why_no_core: str = "no core", why_no_margin: str = "no margin",
                 why_no_bed: str = "no tumour bed") -> tuple[str | None, str]:
    """Inflamed / excluded / desert from CD8 T-cell densities (cells/mm²); the rule of the module notes.

    Parameters
    ----------
    core_cd8, margin_cd8, bed_cd8 : float or None
        CD8 T cells per mm² of the tumour core, the invasive margin and the whole bed; None
        where the region carries no density. The bed stands in for a missing core.
    config : MetricsConfig
        The cut-offs (cells/mm²).
    why_no_core, why_no_margin, why_no_bed : str
        Reasons quoted when a density is None.

    Returns
    -------
    (class, reason) : (str or None, str)
    """
    config = config or MetricsConfig()
    core, note, where = core_cd8, "", "core"
    if core is None:
        if bed_cd8 is None:
            return None, f"no CD8 density in the tumour: {why_no_bed}"
        core, where, note = bed_cd8, "bed", f" (tumour core missing, {why_no_core}; the whole bed read as the core)"
    hot, cold = config.inflamed_core_cd8_per_mm2, config.excluded_margin_cd8_per_mm2
    if core > hot:
        return "inflamed", f"{where} CD8 {core:.0f} /mm² > {hot:g}{note}"
    if margin_cd8 is None:
        return None, (f"{where} CD8 {core:.0f} /mm² <= {hot:g} and no margin density ({why_no_margin}): "
                      f"excluded or desert{note}")
    low = f"{where} CD8 {core:.0f} /mm² <= {hot:g}, margin CD8 {margin_cd8:.0f} /mm²"
    if margin_cd8 > cold:
        return "excluded", f"{low} > {cold:g}{note}"
    return "desert", f"{low} <= {cold:g}{note}"


def infiltration_profile(border_distance_um: np.ndarray, phenotype: np.ndarray, masks: Mapping[str, np.ndarray],
                         grid_um: float, groups: Mapping[str, list[str]],
                         config: MetricsConfig, *, exclude: np.ndarray | None = None) -> InfiltrationProfile:
    """Densities of each group in bins of signed distance to the bed's border.

    Parameters
    ----------
    border_distance_um : ndarray, shape (n_cells,)
        Each cell's signed distance (µm, negative inside the bed; NaN without a bed).
    phenotype : ndarray of str, shape (n_cells,)
    masks : dict with ``tissue`` and ``tumor``, (H, W) bool
    grid_um : float
        Grid pixel edge (µm).
    groups : dict group -> phenotype names (exact) in it
    config : MetricsConfig
    exclude : (H, W) bool, optional
        Grid pixels whose area is left out of the bins (necrosis); the distance is still
        measured on the whole tissue. The caller leaves their cells out (NaN distance).

    Returns
    -------
    InfiltrationProfile
    """
    step, reach = config.profile_bin_um, config.profile_range_um
    n_bins = int(round(2 * reach / step))
    edges = -reach + step * np.arange(n_bins + 1)
    nan = np.full(n_bins, np.nan)
    signed = signed_border_distance_um(np.asarray(masks["tissue"], bool), np.asarray(masks["tumor"], bool), grid_um)
    if signed is None:
        reason = "no tumour bed" if not np.asarray(masks["tumor"]).any() else "the bed has no border with other tissue"
        return InfiltrationProfile(edges, np.zeros(n_bins), {g: np.zeros(n_bins, np.int64) for g in groups},
                                   {g: nan.copy() for g in groups}, [reason] * n_bins, reason)

    def bin_of(d: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            k = np.floor((d + reach) / step)
        return np.where(np.isfinite(k) & (k >= 0) & (k < n_bins), k, -1).astype(np.int64)

    counted = np.asarray(masks["tissue"], bool)
    if exclude is not None:
        counted = counted & ~np.asarray(exclude, bool)
    px = bin_of(signed[counted])
    area = np.bincount(px[px >= 0], minlength=n_bins) * grid_um * grid_um * _MM2_PER_UM2
    cell_bin = bin_of(np.asarray(border_distance_um, np.float64))
    small = area < config.profile_min_area_mm2
    bin_absent = [f"tissue {a:.4f} mm² < {config.profile_min_area_mm2:g} mm²" if s else None
                  for a, s in zip(area, small)]
    counts, density = {}, {}
    for g, listed in groups.items():
        sel = np.isin(phenotype, list(listed)) & (cell_bin >= 0)
        counts[g] = np.bincount(cell_bin[sel], minlength=n_bins).astype(np.int64)
        density[g] = np.where(small, np.nan, counts[g] / np.where(small, 1.0, area))
    return InfiltrationProfile(edges, area, counts, density, bin_absent, None)


def metrics_json(result: SlideMetrics, *, slide_id: str) -> dict:
    """``metrics.json`` (format :data:`METRICS_FORMAT`): JSON-safe, nulls for missing values, never NaN.

    Parameters
    ----------
    result : SlideMetrics
    slide_id : str

    Returns
    -------
    dict
    """
    p = result.infiltration_profile

    def listed(values) -> list:
        return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64)]

    return {
        "format": METRICS_FORMAT,
        "slide_id": slide_id,
        "metrics": dict(result.metrics),
        "units": dict(result.units),
        "descriptions": dict(result.descriptions),
        "absent": dict(result.absent),
        "immune_class": result.immune_class,
        "immune_class_reason": result.immune_class_reason,
        "infiltration_profile": {
            "bin_edges_um": listed(p.bin_edges_um), "area_mm2": listed(p.area_mm2),
            "counts": {g: [int(v) for v in c] for g, c in p.counts.items()},
            "density": {g: listed(d) for g, d in p.density.items()},
            "absent": list(p.bin_absent), "reason": p.reason, "unit": "cells/mm2",
        },
        "warnings": list(result.warnings),
        "parameters": dict(result.params),
    }
