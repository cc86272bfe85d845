"""QC pictures of the gating a pathologist looks at: per-marker histograms and CD3 vs CD8.

Both read what :func:`tme_pipeline.phenotype.phenotype_cells` wrote (``X``,
``uns['gates']``, ``obs['phenotype']``) and draw on the same transformed scale the gates
were set on. matplotlib is imported inside the functions (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np

from .autogate import transform_intensity
from .phenotype import weak_gate

__all__ = ["plot_gates", "plot_cd3_cd8", "save_png"]

GATE_COLOR = "#d62728"
#: Most cells drawn in a scatter (every k-th cell beyond it), to keep files small.
MAX_SCATTER = 50_000


def _gates(cells: ad.AnnData) -> dict:
    if "gates" not in cells.uns:
        raise ValueError("cells carry no uns['gates']: run phenotype_cells first")
    return cells.uns["gates"]


def _transformed(cells: ad.AnnData, marker: str) -> tuple[np.ndarray, float, str]:
    """Transformed intensity of ``marker``, its gate on that scale, and the axis label.

    A channel without a background (empty or constant) is shown raw.
    """
    g = _gates(cells)[marker]
    x = np.asarray(cells.X[:, cells.var_names.get_loc(marker)], dtype=np.float64)
    cofactor = float(g["cofactor"])
    if not np.isfinite(cofactor):
        return x, float(g["gate"]), f"{marker} (raw)"
    kw = dict(background=float(g["background"]), cofactor=cofactor, transform=str(g["transform"]))
    gate = float(transform_intensity(g["gate"], **kw)) if np.isfinite(g["gate"]) else float("nan")
    return transform_intensity(x, **kw), gate, f"{marker} ({g['transform']})"


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to a temporary name beside ``path``, then rename it into place:
    a reader (the HTML report) never sees half a file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_gates(cells: ad.AnnData, path: str | os.PathLike, *, bins: int = 120) -> Path:
    """One histogram per gated marker, on the scale its gate was set on.

    Each panel shows the cells' transformed intensity (log-scaled counts, so a 1 % population
    stays visible), the gate (red line), the background (grey, at 0) and, in its title, the
    background in raw units, the method, the quality and the positive share; flagged
    markers have a red title. A marker gated within a phenotype (``gating.within``) shows
    that phenotype's cells and their positive share.

    Parameters
    ----------
    cells : AnnData
        After :func:`~tme_pipeline.phenotype.phenotype_cells`.
    path : path-like
        PNG to write (parents are created).
    bins : int

    Returns
    -------
    Path
    """
    from matplotlib.figure import Figure

    gates = _gates(cells)
    markers = [m for m in cells.var_names if m in gates]
    if not markers:
        raise ValueError("uns['gates'] names no marker of the cell table")
    ncols = min(4, len(markers))
    nrows = -(-len(markers) // ncols)
    height = 2.8 * nrows
    fig = Figure(figsize=(3.6 * ncols, height))
    # Fixed margins (inches turned into figure fractions) for the two-line titles and the
    # axis labels: constrained layout measured every log-scale tick and took half the stage.
    fig.subplots_adjust(left=0.55 / (3.6 * ncols), right=1 - 0.1 / (3.6 * ncols),
                        bottom=0.5 / height, top=1 - 0.45 / height, wspace=0.28, hspace=0.75)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, marker in zip(axes, markers):
        g = gates[marker]
        t, gate, label = _transformed(cells, marker)
        population = str(g.get("population", "all"))
        share = f"{100 * float(g['positive_fraction']):.1f}% positive"
        if population != "all" and "phenotype" in cells.obs:
            members = (cells.obs["phenotype"] == population).to_numpy()
            t = t[members]
            label = f"{label}, {population} cells"
            if members.any() and np.isfinite(gate):
                share = (f"{100 * float(np.mean(t > gate)):.1f}% of {population} cells positive "
                         f"({100 * float(g['positive_fraction']):.1f}% of all cells)")
        t = t[np.isfinite(t)]
        if t.size:
            # one filled outline, not a patch per bar: a tenth of the drawing and layout time
            ax.hist(t, bins=bins, color="#7f7f7f", log=True, histtype="stepfilled")
        if np.isfinite(g["cofactor"]):
            ax.axvline(0.0, color="#bbbbbb", linestyle="--", linewidth=1)
        if np.isfinite(gate):
            ax.axvline(gate, color=GATE_COLOR, linewidth=2)
        title = f"{marker}: bg {float(g['background']):.0f}, {g['method']}, q {float(g['quality']):.2f}\n{share}"
        ax.set_title(title, fontsize=9, color=GATE_COLOR if bool(g["flagged"]) else "black")
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(markers):]:
        ax.set_axis_off()
    return save_png(fig, path)


def plot_cd3_cd8(cells: ad.AnnData, path: str | os.PathLike) -> Path:
    """Scatter of transformed CD3 against CD8, coloured by phenotype, with both gates (red).

    The weak gates (``gating.weak_fraction``; dotted) show where a CD8 T cell may have only
    one of its two markers.

    Parameters
    ----------
    cells : AnnData
        After :func:`~tme_pipeline.phenotype.phenotype_cells`, with CD3 and CD8 gated.
    path : path-like
        PNG to write.

    Returns
    -------
    Path
    """
    from matplotlib.figure import Figure

    gates = _gates(cells)
    missing = [m for m in ("CD3", "CD8") if m not in gates]
    if missing or "phenotype" not in cells.obs:
        raise ValueError(f"plot_cd3_cd8 needs gated CD3 and CD8 and obs['phenotype'] (missing: {missing})")
    x, gx, xlabel = _transformed(cells, "CD3")
    y, gy, ylabel = _transformed(cells, "CD8")
    phenotype = cells.obs["phenotype"]
    step = max(1, -(-cells.n_obs // MAX_SCATTER))
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    palette = [f"C{k}" for k in range(10) if k != 3]  # C3 is the gates' red
    colors = [palette[k % len(palette)] for k in range(len(phenotype.cat.categories))]
    for name, color in zip(phenotype.cat.categories, colors):
        sel = np.flatnonzero((phenotype == name).to_numpy())[::step]
        if sel.size:
            ax.scatter(x[sel], y[sel], s=3, color=color, alpha=0.6, linewidths=0,
                       label=f"{name} ({(phenotype == name).sum()})")
    for value, line in ((gx, ax.axvline), (gy, ax.axhline)):
        if np.isfinite(value):
            line(value, color=GATE_COLOR, linestyle="--", linewidth=1.5)
    fraction = float(cells.uns.get("phenotyping", {}).get("params", {}).get("weak_fraction", 1.0))
    if fraction < 1.0:  # a CD3+ CD8+ cell may pass one of the two only at its weak gate
        for marker, line in (("CD3", ax.axvline), ("CD8", ax.axhline)):
            g = gates[marker]
            weak = weak_gate(g["background"], g["gate"], fraction)
            if np.isfinite(weak):
                kw = dict(background=g["background"], cofactor=g["cofactor"], transform=g["transform"])
                line(float(transform_intensity(weak, **kw)), color=GATE_COLOR, linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, markerscale=3, loc="best")
    return save_png(fig, path)
