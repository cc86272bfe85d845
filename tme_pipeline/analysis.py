"""Paired pre/post analysis of a cohort: ``OUT/patients.h5ad`` -> ``OUT/analysis/``.

Per metric, over the patients with both timepoints (``obs['complete']``), the statistics of
:mod:`tme_pipeline.analysis_stats` (Wilcoxon signed-rank with zero differences dropped, exact
for small n; Hodges–Lehmann estimate and interval with its achieved level; matched-pairs
rank-biserial correlation), then **Benjamini–Hochberg** (:func:`scipy.stats.false_discovery_control`)
over the metrics tested within one family. The **primary endpoints** (``analysis.primary_metrics``,
declared before the data are seen; default the CD8 T-cell density of tumour + margin, the
issue's "CD8 fold in tumour + margin") are their own family, reported first; every other
metric is exploratory, BH over all of them. Families are split again by group: the whole
cohort (``group == "all"``) and, with ``group``, each level of that column. Metrics not tested
(fewer than 3 complete pairs, all differences zero) have NaN p-values with the ``reason`` and
are not in the family.

With ``group`` the deltas of the levels are compared per metric (Kruskal–Wallis, or
Mann–Whitney U for two levels) into ``group_tests.csv``, BH-adjusted across metrics.
The immune-class transitions (pre class x post class) and the cold -> hot count (cold =
desert or excluded, hot = inflamed) come from ``obs['immune_class_pre'/'_post']``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis_stats import EXACT_MAX_N, MIN_PAIRS, ZERO_METHOD, bh_adjust, paired_test
from .results import ANALYSIS_DIR, PATIENTS_H5AD
from .settings.analysis import AnalysisConfig

__all__ = ["paired_tests", "group_tests", "transitions", "analyze", "AnalysisConfig", "KEY_METRICS", "COLUMNS",
           "ANALYSIS_DIR", "PRIMARY", "EXPLORATORY"]

log = logging.getLogger(__name__)

#: Metrics drawn as slope plots by default (those present in patients.h5ad).
KEY_METRICS = ("density_CD8_T_tumor", "density_CD8_T_margin", "density_lymphocytes_tumor",
               "tls_count", "tls_per_mm2", "percent_necrosis")
IMMUNE_CLASSES = ("inflamed", "excluded", "desert")
COLD, HOT = ("desert", "excluded"), ("inflamed",)
PRIMARY, EXPLORATORY = "primary", "exploratory"
COLUMNS = ("metric", "unit", "group", "family", "n_pairs", "n_nonzero", "median_pre", "median_post",
           "median_difference", "hl_estimate", "ci_low", "ci_high", "ci_level", "statistic", "p_value",
           "p_adjusted", "rank_biserial", "method", "zero_method", "reason")


def _check_patients(patients, source: str) -> None:
    missing = [f"layers[{k!r}]" for k in ("pre", "post") if k not in patients.layers]
    missing += [f"obs[{k!r}]" for k in ("complete",) if k not in patients.obs]
    missing += ["var['unit']"] if "unit" not in patients.var else []
    if missing:
        raise ValueError(f"{source}: not a patients table: no {', '.join(missing)}")


def _select_metrics(patients, metrics, source: str) -> list[str]:
    names = list(patients.var_names)
    if metrics is None:
        return names
    unknown = [m for m in metrics if m not in set(names)]
    if unknown:
        raise ValueError(f"{source}: no metric {', '.join(map(repr, unknown))} (it has {len(names)} metrics, "
                         f"e.g. {', '.join(names[:5])})")
    return list(dict.fromkeys(metrics))


def _levels(patients, group: str, source: str) -> tuple[pd.Series, list[str]]:
    if group not in patients.obs:
        raise ValueError(f"{source}: no column {group!r} in obs (columns: {', '.join(map(str, patients.obs.columns))})")
    col = patients.obs[group]
    levels = [str(c) for c in col.cat.categories] if isinstance(col.dtype, pd.CategoricalDtype) \
        else sorted({str(v) for v in col.dropna()})
    # The cohort tables write "" where a patient has no value of a manifest column.
    labels = col.astype(object).where(col.notna(), None).map(lambda v: None if v is None or v == "" else str(v))
    return labels, [lv for lv in levels if lv and (labels == lv).any()]


def paired_tests(patients, *, metrics: list[str] | None = None, group: str | None = None,
                 alpha: float = 0.05, primary: tuple[str, ...] | list[str] = (),
                 source: str = "patients") -> pd.DataFrame:
    """Paired tests of every metric, for the cohort and, with ``group``, per level.

    Parameters
    ----------
    patients : AnnData, one row per patient, layers ``pre`` and ``post`` (patients x metrics),
        ``obs['complete']``, ``var['unit']`` (the ``patients.h5ad`` contract).
    metrics : metric names (var names) to test; None: all.
    group : obs column whose levels are tested separately (e.g. ``"response"``).
    alpha : float, 1 - the nominal confidence level of the Hodges–Lehmann interval.
    primary : metric names of the primary family (tested even when ``metrics`` leaves them out);
        the rest of ``metrics`` is the exploratory family.
    source : str, named in errors (the file).

    Returns
    -------
    DataFrame with :data:`COLUMNS`: per group value (``"all"``, then each level of ``group``)
    the primary metrics, then the exploratory ones; ``family`` says which; ``p_adjusted`` is
    BH within each group value and family.
    """
    _check_patients(patients, source)
    primary = _select_metrics(patients, list(primary), source)
    names = list(dict.fromkeys([*primary, *_select_metrics(patients, metrics, source)]))
    family = np.where(np.isin(names, primary), PRIMARY, EXPLORATORY)
    complete = np.asarray(patients.obs["complete"], dtype=bool)
    families = [("all", complete)]
    if group is not None:
        labels, levels = _levels(patients, group, source)
        families += [(lv, complete & (labels == lv).to_numpy()) for lv in levels]
    cols = [patients.var_names.get_loc(m) for m in names]
    pre = np.asarray(patients.layers["pre"], np.float64)[:, cols]
    post = np.asarray(patients.layers["post"], np.float64)[:, cols]
    units = patients.var["unit"].astype(str).to_numpy()[cols]
    frames = []
    for label, rows in families:
        tests = [asdict(paired_test(pre[rows, k], post[rows, k], alpha=alpha)) for k in range(len(names))]
        frame = pd.DataFrame(tests)
        frame.insert(0, "metric", names)
        frame.insert(1, "unit", units)
        frame.insert(2, "group", label)
        frame.insert(3, "family", family)
        frame["p_adjusted"] = np.nan
        for kind in (PRIMARY, EXPLORATORY):
            rows_k = (family == kind)
            frame.loc[rows_k, "p_adjusted"] = bh_adjust(frame.loc[rows_k, "p_value"].to_numpy())
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)]


def group_tests(patients, group: str, *, metrics: list[str] | None = None,
                source: str = "patients") -> pd.DataFrame:
    """Compare the paired differences between the levels of ``group``, per metric.

    Kruskal–Wallis H (three or more levels with data) or two-sided Mann–Whitney U (two), on the
    differences ``post - pre`` of the complete patients; BH across the metrics.

    Parameters
    ----------
    patients : AnnData, the ``patients.h5ad`` contract.
    group : obs column.
    metrics : metric names; None: all.
    source : str, named in errors.

    Returns
    -------
    DataFrame: metric, unit, test, n_levels, n_patients, statistic, p_value, p_adjusted, reason.
    """
    from scipy.stats import kruskal, mannwhitneyu

    _check_patients(patients, source)
    names = _select_metrics(patients, metrics, source)
    labels, levels = _levels(patients, group, source)
    complete = np.asarray(patients.obs["complete"], dtype=bool)
    cols = [patients.var_names.get_loc(m) for m in names]
    delta = (np.asarray(patients.layers["post"], np.float64) - np.asarray(patients.layers["pre"], np.float64))[:, cols]
    units = patients.var["unit"].astype(str).to_numpy()[cols]
    rows = []
    for k, name in enumerate(names):
        samples = [delta[complete & (labels == lv).to_numpy(), k] for lv in levels]
        samples = [s[np.isfinite(s)] for s in samples]
        samples = [s for s in samples if s.size]
        row = dict(metric=name, unit=units[k], test="", n_levels=len(samples),
                   n_patients=int(sum(s.size for s in samples)), statistic=np.nan, p_value=np.nan, reason="")
        if len(samples) < 2:
            row["reason"] = f"{len(samples)} level(s) of {group!r} with a complete pair (< 2)"
        elif np.unique(np.concatenate(samples)).size == 1:
            row["reason"] = "all differences are equal"
        else:
            test = mannwhitneyu if len(samples) == 2 else kruskal
            row["test"] = "Mann-Whitney U" if len(samples) == 2 else "Kruskal-Wallis H"
            res = test(*samples) if len(samples) > 2 else test(*samples, alternative="two-sided")
            row["statistic"], row["p_value"] = float(res.statistic), float(res.pvalue)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.insert(7, "p_adjusted", bh_adjust(frame["p_value"].to_numpy()))
    return frame


def _class_labels(values) -> np.ndarray:
    out = pd.Series(values, dtype=object).astype(object)
    return np.array([None if (v is None or (isinstance(v, float) and np.isnan(v)) or str(v) in ("", "null", "nan"))
                     else str(v) for v in out], dtype=object)


def transitions(patients) -> tuple[pd.DataFrame, int]:
    """Immune-class transition table and the number of patients that went cold -> hot.

    Parameters
    ----------
    patients : AnnData with ``obs['immune_class_pre']`` and ``obs['immune_class_post']``.

    Returns
    -------
    table : DataFrame of int, index = pre class, columns = post class (inflamed, excluded,
        desert, then any other label), counts of patients with a class at both timepoints.
    cold_to_hot : int, patients from desert or excluded to inflamed.
    """
    for k in ("immune_class_pre", "immune_class_post"):
        if k not in patients.obs:
            raise ValueError(f"patients: no obs[{k!r}]")
    pre = _class_labels(patients.obs["immune_class_pre"])
    post = _class_labels(patients.obs["immune_class_post"])
    both = np.array([a is not None and b is not None for a, b in zip(pre, post)], dtype=bool)
    extra = sorted({str(v) for v in (*pre[both], *post[both])} - set(IMMUNE_CLASSES))
    classes = [*IMMUNE_CLASSES, *extra]
    table = pd.DataFrame(0, index=pd.Index(classes, name="immune_class_pre"),
                         columns=pd.Index(classes, name="immune_class_post"), dtype=np.int64)
    for a, b in zip(pre[both], post[both]):
        table.loc[a, b] += 1
    cold_to_hot = int(table.loc[list(COLD), list(HOT)].to_numpy().sum())
    return table, cold_to_hot


def _pseudocount(patients, metric: str, unit: str) -> float:
    """The log2 fold change's pseudo-count of ``metric`` from ``uns['log2_pseudocount']``.

    The cohort tables store it as two parallel arrays ``unit`` and ``pseudocount`` (a unit
    such as ``cells/mm2`` is no HDF5 key); a plain {unit or metric: c} mapping is read too.
    0.1 where it names neither, the contract's default.
    """
    table = patients.uns.get("log2_pseudocount", {})
    if not isinstance(table, dict):
        return float(table)
    if "unit" in table and "pseudocount" in table:
        table = dict(zip(np.asarray(table["unit"]).astype(str), np.asarray(table["pseudocount"], np.float64)))
    return float(table.get(metric, table.get(unit, 0.1)))


def _primary_first(column: pd.Series) -> pd.Series:
    """Sort key: the primary family before the exploratory one; other columns as they are."""
    return column.map({PRIMARY: 0, EXPLORATORY: 1}) if column.name == "family" else column


def _plain(value):
    """JSON-ready: NaN -> None, numpy scalars -> Python."""
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _declared_primary(out: Path) -> tuple[tuple[str, ...], str]:
    """The primary endpoints of the run's config (``run.json``), else the default, and where they came from."""
    from .results import RUN_JSON

    path = out / RUN_JSON
    try:
        config = json.loads(path.read_text(encoding="utf-8")).get("config") or {}
        declared = (config.get("analysis") or {}).get("primary_metrics")
    except (OSError, ValueError, AttributeError):
        declared = None
    if declared is not None:
        return tuple(str(m) for m in declared), f"{path} (config analysis.primary_metrics)"
    return AnalysisConfig().primary_metrics, "default (analysis.primary_metrics)"


def analyze(out_dir: str | Path, *, group: str | None = None, metrics: list[str] | None = None,
            alpha: float = 0.05, key_metrics: list[str] | None = None,
            primary_metrics: list[str] | None = None) -> Path:
    """Paired pre/post analysis of a results folder's ``patients.h5ad`` into ``OUT/analysis/``.

    Parameters
    ----------
    out_dir : the results folder (``tme run --out``); only ``OUT/patients.h5ad`` is read.
    group : obs column (a manifest column, e.g. ``"response"``) to test per level and between
        levels; None: the whole cohort only.
    metrics : metric names to test (the BH family); None: every metric.
    alpha : float in (0, 1): the interval is at 1 - alpha; ``significant`` in analysis.json is
        ``p_adjusted < alpha``.
    key_metrics : metrics drawn as slope plots; None: the primary ones and :data:`KEY_METRICS`
        (those present).
    primary_metrics : the pre-declared primary endpoints (their own BH family, reported first);
        None: ``analysis.primary_metrics`` of the run's config in ``OUT/run.json``, else
        :class:`AnalysisConfig`'s default. One the table lacks is left out with a warning and
        listed in ``analysis.json`` (``primary_missing``).

    Returns
    -------
    Path of ``OUT/analysis``, swapped in whole: ``paired_tests.csv``, ``group_tests.csv``
    (with ``group``), ``transitions.csv``, ``slope_<metric>.png``, ``heatmap_log2fc.png``,
    ``analysis.json`` (parameters, patients, key results, cold -> hot count, files).
    """
    import anndata as ad

    from . import __version__
    from .analysis_plots import plot_analysis
    from .io.results import partial_dir, write_json

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    out = Path(out_dir)
    source = out / PATIENTS_H5AD
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no patients table (tme run writes it at the end of a run)")
    patients = ad.read_h5ad(source)
    _check_patients(patients, str(source))
    complete = np.asarray(patients.obs["complete"], dtype=bool)
    if not complete.any():
        raise ValueError(f"{source}: no patient has both timepoints done; nothing to pair")
    if primary_metrics is None:
        declared, primary_source = _declared_primary(out)
    else:
        declared, primary_source = tuple(primary_metrics), "argument"
    primary = [m for m in dict.fromkeys(declared) if m in set(patients.var_names)]
    primary_missing = [m for m in declared if m not in set(patients.var_names)]
    if primary_missing:
        log.warning("analysis: primary metric(s) %s not in %s; left out", primary_missing, source)
    names = list(dict.fromkeys([*primary, *_select_metrics(patients, metrics, str(source))]))
    tests = paired_tests(patients, metrics=names, group=group, alpha=alpha, primary=primary, source=str(source))
    between = group_tests(patients, group, metrics=names, source=str(source)) if group else None
    has_classes = {"immune_class_pre", "immune_class_post"} <= set(patients.obs.columns)
    table, cold_to_hot = transitions(patients) if has_classes else (None, None)
    labels, levels = _levels(patients, group, str(source)) if group else (None, [])
    labels = labels.to_numpy() if labels is not None else None
    keys = [m for m in dict.fromkeys(key_metrics if key_metrics is not None else (*primary, *KEY_METRICS))
            if m in names]
    units = dict(zip(patients.var_names, patients.var["unit"].astype(str)))
    reasons = patients.obs["reason"].astype(str) if "reason" in patients.obs else pd.Series("", patients.obs_names)
    overall = tests[tests["group"] == "all"].set_index("metric")
    files = []
    target = out / ANALYSIS_DIR
    with partial_dir(target) as tmp:
        tests.to_csv(tmp / "paired_tests.csv", index=False)
        files.append("paired_tests.csv")
        if between is not None:
            between.to_csv(tmp / "group_tests.csv", index=False)
            files.append("group_tests.csv")
        if table is not None:
            table.to_csv(tmp / "transitions.csv", index_label="pre \\ post")
            files.append("transitions.csv")
        pseudocounts = np.array([_pseudocount(patients, m, units[m]) for m in names])
        files += plot_analysis(patients, overall, tmp, metrics=names, key_metrics=keys, complete=complete,
                               pseudocounts=pseudocounts, groups=labels,
                               group_order=levels or None)
        significant = overall[overall["p_adjusted"] < alpha]
        summary = {
            "format": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tme_version": __version__,
            "source": str(source),
            "parameters": {"group": group, "metrics": metrics, "n_metrics": len(names), "alpha": alpha,
                           "ci_level_nominal": 1.0 - alpha, "zero_method": ZERO_METHOD, "min_pairs": MIN_PAIRS,
                           "exact_max_n": EXACT_MAX_N,
                           "key_metrics": keys, "primary_metrics": primary, "primary_source": primary_source,
                           "adjustment": "Benjamini-Hochberg within each group and family (primary, exploratory)"},
            "primary_missing": primary_missing,
            "primary_results": _records(tests[tests["family"] == PRIMARY]),
            "patients": {"n": int(patients.n_obs), "complete": int(complete.sum()),
                         "incomplete": int((~complete).sum()),
                         "excluded": {str(p): reasons[p] for p in patients.obs_names[~complete]}},
            "key_results": _records(overall.loc[keys].reset_index()),
            "significant": [{"metric": m, "family": r.family, "p_adjusted": float(r.p_adjusted),
                             "hl_estimate": float(r.hl_estimate), "unit": r.unit}
                            for m, r in significant.sort_values(["family", "p_adjusted"],
                                                                key=_primary_first).iterrows()],
            "cold_to_hot": cold_to_hot,
            "transitions": None if table is None else {a: {b: int(v) for b, v in r.items()}
                                                      for a, r in table.iterrows()},
            "files": files,
        }
        if group and has_classes:
            summary["cold_to_hot_by_group"] = {
                lv: transitions(patients[np.asarray(labels == lv, dtype=bool)])[1] for lv in levels}
        write_json(tmp / "analysis.json", summary)
    log.info("analysis: %d metrics, %d complete patients -> %s", len(names), int(complete.sum()), target)
    return target
