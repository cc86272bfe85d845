"""The report's own pictures: the phenotype map and the infiltration profile.

The phenotype map draws every cell at its nucleus centroid (``obs['x_um']``,
``obs['y_um']`` of ``cells.h5ad``) on a coarse grid, coloured by phenotype, with the
tumour bed outlined: the slide's pixels are never read. The infiltration profile plots a
slide's ``metrics.json`` ``infiltration_profile`` (lymphocyte densities in bins of signed
distance to the bed's border) above the tissue area behind each bin. Both return a
matplotlib ``Figure`` on an Agg canvas (no pyplot state); :func:`png_bytes` encodes one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from .slide_plots import draw_mask_outline, draw_scale_bar

__all__ = ["PHENOTYPE_COLOURS", "PROFILE_COLOURS", "phenotype_raster", "phenotype_map_figure",
           "infiltration_profile_figure", "png_bytes"]

#: Phenotype -> colour of the map, in drawing order: where cells share a map pixel the one
#: drawn last shows. The many unlabelled and tumour cells are pale and go first, so that the
#: scarcer immune cells a reader looks for stay visible over them; CD8_T last.
PHENOTYPE_COLOURS: dict[str, str] = {
    "other": "#c6c6c6",
    "tumor": "#5e9fd8",
    "CD4_T": "#f28e2b",
    "B": "#d62728",
    "Treg": "#8c3fc0",
    "CD8_T": "#1b8a2e",
}

#: Colours of the infiltration profile's groups (the map's where the group is a phenotype).
PROFILE_COLOURS: dict[str, str] = {
    "CD8_T": PHENOTYPE_COLOURS["CD8_T"], "B": PHENOTYPE_COLOURS["B"], "t_cells": "#555555", "lymphocytes": "#000000",
}

_TISSUE = "#f0f0f0"

# Colours for phenotypes the config adds beyond the defaults (drawn after tumour, before T cells).
_EXTRA_COLOURS = ("#bcbd22", "#17becf", "#e377c2", "#8c564b", "#7f7f7f", "#aec7e8")


def _draw_order(names: Sequence[str], colours: Mapping[str, str]) -> list[str]:
    """Phenotypes in drawing order: those of ``colours`` in its order, any others after its first two."""
    known = [n for n in colours if n in names]
    extra = sorted(n for n in names if n not in colours)
    return known[:2] + extra + known[2:]


def _resample(mask: np.ndarray, mask_um: float, shape: tuple[int, int], pixel_um: float) -> np.ndarray:
    """``mask`` (pixel ``mask_um``) at the centres of a grid of ``shape`` with pixel ``pixel_um``; outside is False."""
    out = np.zeros(shape, bool)
    rows = np.floor((np.arange(shape[0]) + 0.5) * pixel_um / mask_um).astype(np.int64)
    cols = np.floor((np.arange(shape[1]) + 0.5) * pixel_um / mask_um).astype(np.int64)
    r_in, c_in = rows < mask.shape[0], cols < mask.shape[1]
    out[np.ix_(r_in, c_in)] = mask[np.ix_(rows[r_in], cols[c_in])]
    return out


def phenotype_raster(x_um: np.ndarray, y_um: np.ndarray, codes: np.ndarray, *, size_um: tuple[float, float],
                     pixel_um: float) -> np.ndarray:
    """Per map pixel, the highest code of the cells whose centroid falls in it.

    Parameters
    ----------
    x_um, y_um : ndarray, shape (n,)
        Cell centroids (µm from the slide's top left corner).
    codes : ndarray, shape (n,), int
        Each cell's drawing rank (>= 0); the highest rank in a pixel wins.
    size_um : (width, height)
        The slide's extent (µm); cells outside it are dropped.
    pixel_um : float
        Map pixel size (µm); pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` times it.

    Returns
    -------
    ndarray, shape (ceil(height / pixel_um), ceil(width / pixel_um)), int32
        -1 where no cell lies.

    Examples
    --------
    >>> phenotype_raster(np.array([1.0, 2.0, 15.0]), np.array([1.0, 3.0, 1.0]), np.array([0, 2, 1]),
    ...                  size_um=(20.0, 10.0), pixel_um=10.0)
    array([[2, 1]], dtype=int32)
    """
    x_um, y_um, codes = (np.asarray(v) for v in (x_um, y_um, codes))
    if not (x_um.shape == y_um.shape == codes.shape and x_um.ndim == 1):
        raise ValueError(f"x_um, y_um and codes must be 1-D of one length, got {x_um.shape}, {y_um.shape}, "
                         f"{codes.shape}")
    if not pixel_um > 0:
        raise ValueError(f"pixel_um must be positive, got {pixel_um}")
    width, height = (float(v) for v in size_um)
    if not (width > 0 and height > 0):
        raise ValueError(f"size_um must be positive (width, height), got {size_um}")
    shape = (max(1, math.ceil(height / pixel_um)), max(1, math.ceil(width / pixel_um)))
    raster = np.full(shape, -1, np.int32)
    col = np.floor(x_um / pixel_um).astype(np.int64)
    row = np.floor(y_um / pixel_um).astype(np.int64)
    inside = (col >= 0) & (col < shape[1]) & (row >= 0) & (row < shape[0]) & np.isfinite(x_um) & np.isfinite(y_um)
    np.maximum.at(raster.reshape(-1), row[inside] * shape[1] + col[inside], codes[inside].astype(np.int32))
    return raster


def phenotype_map_figure(x_um: np.ndarray, y_um: np.ndarray, phenotype: Sequence[str], *,
                         size_um: tuple[float, float], bed_mask: np.ndarray | None = None,
                         tissue_mask: np.ndarray | None = None, grid_um: float | None = None,
                         colours: Mapping[str, str] | None = None, min_pixel_um: float = 10.0, max_px: int = 1000,
                         title: str = ""):
    """Cells coloured by phenotype on a coarse grid, with the tumour bed outlined and a scale bar.

    Parameters
    ----------
    x_um, y_um : ndarray, shape (n,)
        Nucleus centroids (µm), e.g. ``cells.obs['x_um']``.
    phenotype : sequence of str, length n
    size_um : (width, height)
        The slide's extent (µm).
    bed_mask : ndarray (H, W) bool, optional
        The tumour bed on a grid of ``grid_um`` µm (``regions.npz`` ``mask_tumor``);
        outlined in black when given and not empty.
    tissue_mask : ndarray (H, W) bool, optional
        The tissue on the same grid (``mask_tissue``); shaded light grey under the cells,
        so that tissue without a cell in a map pixel reads as tissue, not glass.
    grid_um : float, optional
        Pixel of the masks (µm); required with either.
    colours : mapping phenotype -> colour, optional
        Defaults to :data:`PHENOTYPE_COLOURS`; phenotypes it lacks get colours of their own.
    min_pixel_um : float
        Smallest map pixel (µm): about a cell, so a dense area reads as a surface.
    max_px : int
        Most map pixels on the longer side: the map pixel grows with the slide, so the
        picture's size is bounded whatever the slide.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
        About 1000 px wide at 100 dpi; a legend counts the cells per phenotype.

    Raises
    ------
    ValueError
        If the coordinates and phenotypes differ in length, the size or pixel is not
        positive, or ``bed_mask`` comes without a positive ``grid_um``.
    """
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    phenotype = np.asarray(phenotype, dtype=str)
    if phenotype.shape != np.shape(x_um):
        raise ValueError(f"phenotype has {phenotype.shape} entries but there are {np.shape(x_um)} coordinates")
    if max_px < 1 or not min_pixel_um > 0:
        raise ValueError(f"max_px must be >= 1 and min_pixel_um > 0, got {max_px}, {min_pixel_um}")
    if (bed_mask is not None or tissue_mask is not None) and not (grid_um is not None and grid_um > 0):
        raise ValueError(f"grid_um must be positive with a mask, got {grid_um}")
    colours = dict(PHENOTYPE_COLOURS if colours is None else colours)
    names, counts = np.unique(phenotype, return_counts=True)
    spare = iter(_EXTRA_COLOURS * (1 + len(names) // len(_EXTRA_COLOURS)))
    for name in names:
        colours.setdefault(str(name), next(spare))
    order = _draw_order([str(n) for n in names], colours)
    rank = {name: k for k, name in enumerate(order)}
    codes = np.array([rank[str(n)] for n in names], np.int32)[np.searchsorted(names, phenotype)] if len(names) else \
        np.zeros(0, np.int32)
    width_um, height_um = (float(v) for v in size_um)
    pixel_um = max(float(min_pixel_um), max(width_um, height_um) / max_px)
    raster = phenotype_raster(x_um, y_um, codes, size_um=size_um, pixel_um=pixel_um)
    rgb = np.ones(raster.shape + (3,), np.float32)
    if tissue_mask is not None:
        rgb[_resample(np.asarray(tissue_mask, bool), grid_um, raster.shape, pixel_um)] = to_rgb(_TISSUE)
    palette = np.array([to_rgb(colours[n]) for n in order] or np.zeros((0, 3)), np.float32)
    drawn = raster >= 0
    rgb[drawn] = palette[raster[drawn]]

    width_mm, height_mm = width_um / 1000.0, height_um / 1000.0
    fig_w, ax_w = 10.0, 7.6
    fig = Figure(figsize=(fig_w, min(max(ax_w * height_mm / width_mm + 0.9, 3.0), 12.0)), layout="constrained")
    ax = fig.subplots()
    extent = (0, raster.shape[1] * pixel_um / 1000.0, raster.shape[0] * pixel_um / 1000.0, 0)
    ax.imshow(rgb, extent=extent, interpolation="nearest")
    handles = []
    if bed_mask is not None and draw_mask_outline(ax, bed_mask, grid_um, colour="black", linestyle="solid",
                                                  linewidth=1.4, min_ring_um2=2500.0):
        handles.append(Line2D([], [], color="black", linewidth=1.4, label="tumour bed"))
    count = dict(zip(names.tolist(), counts.tolist()))
    for name in reversed(order):
        handles.append(Line2D([], [], color=colours[name], marker="s", linestyle="none", markersize=8,
                              label=f"{name} ({count[name]:,})"))
    ax.set_xlim(0, width_mm)
    ax.set_ylim(height_mm, 0)
    ax.set_facecolor("white")
    draw_scale_bar(ax, width_mm, colour="black")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    heading = f"{len(phenotype):,} cells by phenotype"
    ax.set_title(f"{title}: {heading}" if title else heading, fontsize=11)
    if tissue_mask is not None:
        handles.append(Line2D([], [], color=_TISSUE, marker="s", linestyle="none", markersize=8,
                              label="tissue, no cell"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="cells",
              title_fontsize=8)
    ax.text(1.01, 0.0, f"one square = {pixel_um:.0f} µm;\nwhere cells share one,\nthe one listed higher\nshows",
            transform=ax.transAxes, fontsize=7, va="bottom", ha="left")
    return fig


def infiltration_profile_figure(profile: Mapping[str, object], *, title: str = "",
                                groups: Sequence[str] = ("CD8_T", "B", "t_cells", "lymphocytes")):
    """Densities against signed distance to the tumour bed's border, above the area behind each bin.

    Parameters
    ----------
    profile : mapping
        ``metrics.json`` ``infiltration_profile``: ``bin_edges_um`` (m + 1 edges, µm,
        negative inside the bed), ``area_mm2`` (m), ``density`` {group: m values in
        cells/mm², None where the bin holds no tissue}.
    title : str
    groups : sequence of str
        Groups drawn, in this order, when the profile has them.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If the profile lacks a key, or its lists disagree in length.
    """
    from matplotlib.figure import Figure

    missing = [k for k in ("bin_edges_um", "area_mm2", "density") if k not in profile]
    if missing:
        raise ValueError(f"infiltration_profile lacks {missing}")
    edges = np.asarray(profile["bin_edges_um"], float)
    area = np.asarray([np.nan if v is None else v for v in profile["area_mm2"]], float)
    if edges.ndim != 1 or len(edges) != len(area) + 1 or len(area) == 0:
        raise ValueError(f"infiltration_profile: {len(edges)} bin edges for {len(area)} areas (need one more edge)")
    density = {}
    for group, values in dict(profile["density"]).items():
        values = np.asarray([np.nan if v is None else v for v in values], float)
        if values.shape != area.shape:
            raise ValueError(f"infiltration_profile: density of {group!r} has {values.size} bins, areas {area.size}")
        density[group] = values
    centres = 0.5 * (edges[:-1] + edges[1:])
    fig = Figure(figsize=(10.0, 5.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for ax in (top, bottom):
        ax.axvspan(edges[0], 0.0, color="#8fb9d9", alpha=0.25, linewidth=0)
        ax.axvline(0.0, color="black", linewidth=1)
    shown = [g for g in groups if g in density] + sorted(g for g in density if g not in groups)
    for k, group in enumerate(shown):
        colour = PROFILE_COLOURS.get(group, _EXTRA_COLOURS[k % len(_EXTRA_COLOURS)])
        top.plot(centres, density[group], marker="o", markersize=3.5, linewidth=1.6, color=colour,
                 linestyle="--" if group == "lymphocytes" else "-", label=group)
    top.set_ylabel("cells / mm²")
    top.set_ylim(bottom=0)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="density of", title_fontsize=8)
    # x in µm, y in axes fractions: the labels sit either side of the border wherever it falls.
    along = top.get_xaxis_transform()
    top.text(-8.0, 0.97, "inside the tumour bed", transform=along, fontsize=8, va="top", ha="right")
    top.text(8.0, 0.97, "outside", transform=along, fontsize=8, va="top", ha="left")
    top.set_title(title or "infiltration profile", fontsize=11)
    bottom.bar(centres, np.nan_to_num(area), width=np.diff(edges) * 0.9, color="#999999")
    bottom.set_ylabel("tissue (mm²)", fontsize=8)
    bottom.set_xlabel("signed distance to the tumour bed's border (µm; negative inside the bed)")
    bottom.set_xlim(edges[0], edges[-1])
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (100 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
