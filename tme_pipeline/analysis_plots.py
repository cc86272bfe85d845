"""Pictures of the paired analysis: slope plots per metric and the log2 fold-change heat map.

matplotlib is imported inside the functions (Agg canvas, no pyplot state), as in
:mod:`tme_pipeline.qc_plots`; files are written through :func:`tme_pipeline.qc_plots.save_png`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_analysis", "plot_slopes", "plot_log2fc_heatmap"]

#: Units drawn on a log axis (value + pseudo-count): densities span orders of magnitude.
LOG_UNITS = ("cells/mm2",)


def _group_colours(groups: np.ndarray | None) -> tuple[list, dict]:
    """Colour per patient and the legend's level -> colour (grey when ungrouped)."""
    if groups is None:
        return [], {}
    levels = list(dict.fromkeys(str(g) for g in groups if g is not None))
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
    colours = {lv: palette[i % len(palette)] for i, lv in enumerate(levels)}
    return [colours.get(str(g), "#999999") if g is not None else "#999999" for g in groups], colours


def plot_slopes(pre: np.ndarray, post: np.ndarray, path: str | Path, *, metric: str, unit: str,
                pseudocount: float, groups: np.ndarray | None = None, note: str = "") -> Path:
    """One line per patient from its pre to its post value of one metric.

    Parameters
    ----------
    pre, post : (n_patients,) float, metric units; patients with a NaN side are left out.
    path : PNG to write.
    metric, unit : str, for the title and axis.
    pseudocount : float, metric units, added to both sides on the log axis (densities).
    groups : (n_patients,) object or None, group label per patient (None entries: no group);
        lines are coloured by it.
    note : str, a second title line (e.g. the test result).

    Returns
    -------
    Path written.
    """
    from matplotlib.figure import Figure

    from .qc_plots import save_png

    pre, post = np.asarray(pre, np.float64), np.asarray(post, np.float64)
    ok = np.isfinite(pre) & np.isfinite(post)
    log = unit in LOG_UNITS
    shift = pseudocount if log else 0.0
    colours, legend = _group_colours(None if groups is None else np.asarray(groups, dtype=object))
    fig = Figure(figsize=(4.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for i in np.flatnonzero(ok):
        ax.plot([0, 1], [pre[i] + shift, post[i] + shift], "-o", color=colours[i] if colours else "#555555",
                alpha=0.8, lw=1.4, ms=4)
    if ok.any():
        ax.plot([0, 1], [np.median(pre[ok]) + shift, np.median(post[ok]) + shift], "-", color="black", lw=3,
                alpha=0.5, label="median")
    for level, colour in legend.items():
        ax.plot([], [], "-o", color=colour, label=level)
    if ok.any():
        ax.legend(fontsize=7, frameon=False, loc="best")
    if log:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # Densities often span less than a decade: label the 2s and 5s so the axis has numbers.
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xticks([0, 1], ["pre", "post"])
    ax.set_xlim(-0.25, 1.25)
    ylabel = f"{metric} ({unit})" if unit else metric
    ax.set_ylabel(f"{ylabel} + {pseudocount:g}" if log else ylabel, fontsize=8)
    title = f"{metric}: {int(ok.sum())} patients"
    ax.set_title(f"{title}\n{note}" if note else title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def plot_log2fc_heatmap(log2fc: np.ndarray, path: str | Path, *, patient_ids: list[str],
                        metrics: list[str], groups: np.ndarray | None = None) -> Path:
    """Heat map of log2 fold changes, patients (rows, in the given order) x metrics.

    Parameters
    ----------
    log2fc : (n_patients, n_metrics) float, log2((post + c) / (pre + c)); NaN drawn grey.
    path : PNG to write.
    patient_ids : n_patients row labels.
    metrics : n_metrics column labels.
    groups : (n_patients,) labels or None; shown beside the patient ids (rows are expected
        ordered by group).

    Returns
    -------
    Path written.
    """
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from .qc_plots import save_png

    values = np.asarray(log2fc, np.float64)
    if values.shape != (len(patient_ids), len(metrics)):
        raise ValueError(f"log2fc heat map: values {values.shape} do not match {len(patient_ids)} patients x "
                         f"{len(metrics)} metrics")
    finite = values[np.isfinite(values)]
    # Symmetric limits so that white is no change; the 98th percentile keeps one outlier
    # from washing the rest out.
    vmax = float(np.percentile(np.abs(finite), 98)) if finite.size else 1.0
    vmax = max(vmax, 0.1)
    rows = [f"{p} ({g})" if groups is not None and g is not None else str(p)
            for p, g in zip(patient_ids, groups if groups is not None else [None] * len(patient_ids))]
    width = min(4.0 + 0.16 * len(metrics), 40.0)
    fig = Figure(figsize=(width, max(4.0, 2.4 + 0.28 * len(rows))), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap,
                   norm=TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax), interpolation="nearest")
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=7)
    ax.set_xticks(np.arange(len(metrics)), metrics, rotation=90, fontsize=6)
    ax.set_title("log2 fold change post / pre (grey: not available)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="log2((post + c) / (pre + c))", extend="both")
    return save_png(fig, path)


def plot_analysis(patients, overall, folder: str | Path, *, metrics: list[str], key_metrics: list[str],
                  complete: np.ndarray, pseudocounts: np.ndarray, groups: np.ndarray | None = None,
                  group_order: list[str] | None = None) -> list[str]:
    """Draw the slope plots of the key metrics and the heat map into ``folder``.

    Parameters
    ----------
    patients : AnnData, the ``patients.h5ad`` contract (layers ``pre``, ``post``, and
        ``log2_fold_change`` when present).
    overall : DataFrame indexed by metric, the whole cohort's rows of
        :func:`tme_pipeline.analysis.paired_tests` (for the slope plots' notes).
    folder : where the PNGs go.
    metrics : (n_metrics,) names, the heat map's columns (those with any finite value shown).
    key_metrics : names drawn as ``slope_<metric>.png``.
    complete : (n_patients,) bool, patients drawn.
    pseudocounts : (n_metrics,) float, metric units, per ``metrics`` entry.
    groups : (n_patients,) group labels or None; heat-map rows are ordered by it.
    group_order : the levels in the order the heat map shows them (default: sorted).

    Returns
    -------
    list of the file names written.
    """
    folder = Path(folder)
    units = patients.var["unit"].astype(str)
    cols = [patients.var_names.get_loc(m) for m in metrics]
    pre = np.asarray(patients.layers["pre"], np.float64)[:, cols]
    post = np.asarray(patients.layers["post"], np.float64)[:, cols]
    files = []
    for m in key_metrics:
        k, row = metrics.index(m), overall.loc[m]
        note = (f"HL {row.hl_estimate:.3g} [{row.ci_low:.3g}, {row.ci_high:.3g}] ({100 * row.ci_level:.1f} %), "
                f"BH p = {row.p_adjusted:.3g}" if np.isfinite(row.p_value) else row.reason)
        plot_slopes(pre[complete, k], post[complete, k], folder / f"slope_{m}.png", metric=m, unit=units.iloc[cols[k]],
                    pseudocount=float(pseudocounts[k]), groups=groups[complete] if groups is not None else None,
                    note=note)
        files.append(f"slope_{m}.png")
    if "log2_fold_change" in patients.layers:
        lfc = np.asarray(patients.layers["log2_fold_change"], np.float64)[:, cols]
    else:
        lfc = np.log2((post + pseudocounts) / (pre + pseudocounts))
    order = np.flatnonzero(complete)
    if groups is not None:
        rank = {lv: i for i, lv in enumerate(group_order or sorted({str(g) for g in groups}))}
        order = order[np.argsort([rank.get(str(groups[i]), len(rank)) for i in order], kind="stable")]
    shown = np.isfinite(lfc[order]).any(axis=0)
    if shown.any():
        plot_log2fc_heatmap(lfc[np.ix_(order, np.flatnonzero(shown))], folder / "heatmap_log2fc.png",
                            patient_ids=[str(patients.obs_names[i]) for i in order],
                            metrics=[n for n, s in zip(metrics, shown) if s],
                            groups=groups[order] if groups is not None else None)
        files.append("heatmap_log2fc.png")
    return files
