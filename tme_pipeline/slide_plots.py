"""Per-slide QC pictures a pathologist judges regions and TLS by: an overview and TLS close-ups.

The overview shows the whole slide in false colour (chosen markers tinted and added) with
the tumour bed, the invasive margin's edges and necrosis outlined, and every TLS outlined
in its maturity's colour and labelled with its id. A close-up shows one TLS at about 1 µm
per pixel in CD20/CD3/CD21/DAPI with its outline and measured features. Geometry is in µm
from the slide's top left corner; axes are in mm. matplotlib is imported inside the
functions (Agg canvas, no pyplot state), as in :mod:`tme_pipeline.qc_plots`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .qc_plots import save_png
from .tls import MATURITY_COLOURS


__all__ = ["DEFAULT_COLOURS", "MATURITY_COLOURS", "false_colour", "read_window", "plot_overview",
           "plot_tls_closeups", "draw_mask_outline", "draw_scale_bar"]

#: Marker -> RGB (0-1) tint of the overview and close-ups, on a black background as under
#: the microscope. Nuclei blue and dimmed, so the immune markers stand out over them;
#: the tumour marker (SATB2 in osteosarcoma) cyan, T cells green, B cells red, the FDC
#: network yellow. A marker the panel lacks is simply not passed.
DEFAULT_COLOURS: dict[str, tuple[float, float, float]] = {
    "DAPI": (0.05, 0.2, 0.75),
    "SATB2": (0.0, 0.55, 0.55),
    "CD3": (0.1, 0.9, 0.1),
    "CD20": (1.0, 0.1, 0.15),
    "CD21": (1.0, 0.85, 0.0),
}


#: The markers of a TLS close-up: B-cell follicle, T-cell zone, FDC network, nuclei.
CLOSEUP_MARKERS: tuple[str, ...] = ("CD20", "CD3", "CD21", "DAPI")

#: Region outlines of the overview: mask key -> (label, colour, line style, width).
_REGION_STYLE = {
    "bed": ("tumour bed", "white", "solid", 1.6),
    "margin": ("margin band edges", "#9fe7ff", (0, (5, 3)), 1.0),
    "necrosis": ("necrosis", "#ff5a1f", (0, (1.5, 1.5)), 1.6),
}


def false_colour(image: np.ndarray, channel_names: Sequence[str], colours: Mapping[str, tuple[float, float, float]],
                 *, percentiles: tuple[float, float] = (1.0, 99.7),
                 limits: Mapping[str, tuple[float, float]] | None = None) -> np.ndarray:
    """Composite of chosen channels, each scaled between two percentiles and tinted.

    Parameters
    ----------
    image : ndarray, shape (C, Y, X)
        Intensities (any real dtype).
    channel_names : sequence of str, length C
    colours : mapping channel name -> (r, g, b) in [0, 1]
        The channels to show; channels not named here are ignored.
    percentiles : (low, high)
        Each channel's intensity at ``low`` maps to 0 and at ``high`` to 1 (percentiles of
        that channel over ``image``), clipped to [0, 1] before tinting.
    limits : mapping channel name -> (low, high), optional
        Intensities to use instead of the percentiles (e.g. one scale shared by several
        pictures), for the channels it names.

    Returns
    -------
    ndarray, shape (Y, X, 3), float32 in [0, 1]
        The sum of the tinted channels, clipped.

    Raises
    ------
    ValueError
        If ``image`` is not (C, Y, X) with C names, a colour names a channel that is not in
        ``channel_names``, a colour is not three numbers in [0, 1], or the percentiles are
        not 0 <= low < high <= 100.

    Examples
    --------
    >>> img = np.stack([np.arange(4.0).reshape(2, 2), np.zeros((2, 2))])
    >>> false_colour(img, ["DAPI", "CD3"], {"DAPI": (0, 0, 1)}, percentiles=(0, 100))[..., 2]
    array([[0.        , 0.33333334],
           [0.6666667 , 1.        ]], dtype=float32)
    """
    image = np.asarray(image)
    names = list(channel_names)
    if image.ndim != 3 or image.shape[0] != len(names):
        raise ValueError(f"image must be (C, Y, X) with C = {len(names)} channel names, got shape {image.shape}")
    low_p, high_p = (float(p) for p in percentiles)
    if not 0.0 <= low_p < high_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    missing = [c for c in colours if c not in names]
    if missing:
        raise ValueError(f"colours name channels {missing} that the image does not have; channels are {names}")
    limits = limits or {}
    out = np.zeros(image.shape[1:] + (3,), np.float32)
    for name, colour in colours.items():
        tint = np.asarray(colour, np.float32)
        if tint.shape != (3,) or not np.all((tint >= 0) & (tint <= 1)):
            raise ValueError(f"colour of {name!r} must be three numbers in [0, 1], got {colour}")
        channel = image[names.index(name)].astype(np.float32, copy=False)
        if name in limits:
            lo, hi = (float(v) for v in limits[name])
        else:
            # Percentiles of a regular subsample (at most ~250 000 pixels) keep large images fast.
            step = max(1, int(math.sqrt(channel.size / 250_000)))
            sample = channel[::step, ::step]
            finite = sample[np.isfinite(sample)]
            lo, hi = (np.percentile(finite, [low_p, high_p]) if finite.size else (0.0, 0.0))
        # A flat channel (empty marker, glass) stays black rather than dividing by zero.
        scaled = np.clip((channel - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(channel)
        out += np.nan_to_num(scaled)[..., None] * tint
    return np.clip(out, 0.0, 1.0, out=out)


def _window_px(slide, x0_um: float, y0_um: float, x1_um: float, y1_um: float, target_um: float):
    """Level index, its pixel (µm) and the clipped pixel window (x0, y0, x1, y1) covering the µm window."""
    if not (x1_um > x0_um and y1_um > y0_um):
        raise ValueError(f"window must have x1 > x0 and y1 > y0 (µm), got ({x0_um}, {y0_um}, {x1_um}, {y1_um})")
    index = slide.coarsest_level_within(target_um)
    um = slide.level_pixel_um(index)
    _, height, width = slide.levels[index].shape
    x0 = min(max(int(math.floor(x0_um / um)), 0), width)
    y0 = min(max(int(math.floor(y0_um / um)), 0), height)
    x1 = min(max(int(math.ceil(x1_um / um)), x0), width)
    y1 = min(max(int(math.ceil(y1_um / um)), y0), height)
    return index, um, (x0, y0, x1, y1)


def read_window(slide, x0_um: float, y0_um: float, x1_um: float, y1_um: float, *,
                target_um: float = 1.0, channels: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Read a rectangle of the slide from the coarsest pyramid level fine enough, and only it.

    Parameters
    ----------
    slide : tme_pipeline.io.slides.Slide
    x0_um, y0_um, x1_um, y1_um : float
        The window (µm from the slide's top left corner), x1 > x0, y1 > y0.
    target_um : float
        Wanted pixel size (µm): the coarsest level whose pixel is at most this is read
        (level 0 when every level is coarser).
    channels : sequence of int, optional
        Channel indices to read (all by default).

    Returns
    -------
    window : ndarray, shape (C, h, w), float32
        Level pixels ``floor(x0_um / p) .. ceil(x1_um / p)`` (and likewise in y), clipped to
        the slide, so the window's top left corner is at ``floor(x0_um / p) * p`` µm;
        empty (h or w 0) for a window outside the slide.
    pixel_um : float
        ``p``, the pixel size of the level read (µm).
    """
    index, um, (x0, y0, x1, y1) = _window_px(slide, x0_um, y0_um, x1_um, y1_um, target_um)
    level = slide.levels[index]
    block = level[:, y0:y1, x0:x1] if channels is None else level[list(channels), y0:y1, x0:x1]
    return np.asarray(block.compute() if hasattr(block, "compute") else block, np.float32), um


def draw_scale_bar(ax, width_mm: float, *, colour: str = "white") -> None:
    """A bar of a round length (about a fifth of ``width_mm``) in the lower left of ``ax``, whose data units are mm."""
    target = width_mm / 5.0
    steps = np.array([1, 2, 5, 10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000], float) / 1000.0
    length_mm = float(steps[steps <= max(target, steps[0])].max())
    label = f"{length_mm:g} mm" if length_mm >= 1 else f"{length_mm * 1000:g} µm"
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    # y is flipped (image rows down): y0 is the bottom edge.
    xs = x0 + 0.04 * (x1 - x0)
    ys = y0 - 0.05 * (y0 - y1)
    ax.plot([xs, xs + length_mm], [ys, ys], color=colour, linewidth=3, solid_capstyle="butt")
    ax.text(xs + length_mm / 2, ys - 0.015 * (y0 - y1), label, color=colour, ha="center", va="bottom", fontsize=9,
            fontweight="bold")


def _maturity_rgb(maturity: str) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in MATURITY_COLOURS.get(maturity, MATURITY_COLOURS["unstaged"]))


def _outline(ax, geometry, *, scale: float, colour, linewidth: float, linestyle="solid") -> None:
    """Draw every ring of a shapely (Multi)Polygon in µm, coordinates divided by ``scale``."""
    polygons = getattr(geometry, "geoms", [geometry])
    for polygon in polygons:
        if polygon.is_empty:
            continue
        for ring in [polygon.exterior, *polygon.interiors]:
            xy = np.asarray(ring.coords) / scale
            ax.plot(xy[:, 0], xy[:, 1], color=colour, linewidth=linewidth, linestyle=linestyle)


def draw_mask_outline(ax, mask: np.ndarray, grid_um: float, *, colour, linestyle, linewidth: float,
             min_ring_um2: float = 0.0) -> bool:
    """Outline a bool grid in mm; pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` times ``grid_um`` µm.

    Rings enclosing less than ``min_ring_um2`` (pinholes, specks) are not drawn. Returns
    whether anything was drawn.
    """
    from matplotlib.collections import LineCollection
    from skimage.measure import find_contours

    mask = np.asarray(mask, bool)
    if not mask.any():
        return False
    # Padding closes rings at the grid's edge.
    rings = []
    for c in find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        xy = np.column_stack([c[:, 1] - 0.5, c[:, 0] - 0.5]) * (grid_um / 1000.0)
        area_um2 = 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1])) * 1e6
        if area_um2 >= min_ring_um2:
            rings.append(xy)
    if not rings:
        return False
    ax.add_collection(LineCollection(rings, colors=[colour], linestyles=[linestyle], linewidths=linewidth))
    return True


def plot_overview(image: np.ndarray, image_um: float, channel_names: Sequence[str], path: str | os.PathLike, *,
                  colours: Mapping[str, tuple[float, float, float]],
                  region_masks: Mapping[str, np.ndarray] | None, grid_um: float | None,
                  tls: Sequence[tuple[int, str, object]], title: str,
                  percentiles: tuple[float, float] = (30.0, 99.95), min_ratio: float = 3.0,
                  min_ring_um2: float = 2500.0) -> None:
    """The whole slide in false colour with the bed, margin, necrosis and TLS outlined.

    Outlines: the tumour bed (``tumor``) solid white; the margin band's outer and inner
    edges (the contour of ``margin``) dashed light blue; necrosis dotted orange; each TLS in
    its maturity's colour (:data:`MATURITY_COLOURS`) with its id beside it. A legend names
    each outline drawn and counts the TLS per maturity; a scale bar sits at the lower left.

    Parameters
    ----------
    image : ndarray, shape (C, Y, X)
        The slide at low resolution (e.g. :func:`tme_pipeline.stages.lowres_image`);
        pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` times ``image_um`` µm.
    image_um : float
        Pixel size of ``image`` (µm).
    channel_names : sequence of str, length C
    path : path-like
        PNG to write (parents are created).
    colours : mapping channel name -> (r, g, b) in [0, 1]
        Channels to show (see :func:`false_colour`), e.g. :data:`DEFAULT_COLOURS` restricted
        to the panel.
    region_masks : mapping name -> bool ndarray (H, W), or None
        Grids of ``grid_um`` µm per pixel keyed ``tumor`` (the bed), ``margin``,
        ``necrosis`` (others, e.g. ``tissue``, ``stroma``, are not drawn); any may be
        missing, and None draws no region.
    grid_um : float or None
        Pixel size of the region grids (µm); required when ``region_masks`` has a grid.
    tls : sequence of (tls_id, maturity, shapely Polygon in µm)
    title : str
    percentiles : (low, high)
        Per-channel scaling (see :func:`false_colour`). The low end at the 30th percentile
        sends glass and unstained tissue to black; the high end at 99.95 keeps a sparse
        marker (CD21, a few FDC networks) from stretching its background over the tissue.
    min_ratio : float
        The high end is at least ``min_ratio`` times the low end, so a marker nowhere
        much brighter than its background (no FDC network on the slide) stays dim rather
        than faking a stain. Assumes intensities without a large camera offset; 1 turns
        the floor off.
    min_ring_um2 : float
        Region outlines enclosing less than this (µm²; pinholes of a mask) are not drawn.

    Raises
    ------
    ValueError
        From :func:`false_colour`, or when ``image_um`` or a needed ``grid_um`` is not
        positive.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    import matplotlib.patheffects as pe

    if not image_um > 0:
        raise ValueError(f"image_um must be positive, got {image_um}")
    masks = {k: v for k, v in (region_masks or {}).items() if v is not None}
    if masks and not (grid_um is not None and grid_um > 0):
        raise ValueError(f"grid_um must be positive when region_masks are given, got {grid_um}")
    names = list(channel_names)
    if image.ndim == 3 and image.shape[0] == len(names):
        step = max(1, int(math.sqrt(image[0].size / 250_000)))
        chosen = [names.index(n) for n in colours if n in names]
        limits = _display_limits([image[chosen, ::step, ::step]], [names[i] for i in chosen], percentiles, min_ratio)
    else:
        limits = None  # false_colour names what is wrong with the image
    rgb = false_colour(image, names, colours, percentiles=percentiles, limits=limits)
    height_mm, width_mm = (n * image_um / 1000.0 for n in rgb.shape[:2])
    # About one screen pixel per image pixel up to 1000 px wide, and room for the legend.
    fig_w = 10.0
    ax_w = fig_w - 2.4
    fig = Figure(figsize=(fig_w, min(max(ax_w * height_mm / width_mm + 0.9, 3.0), 12.0)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(rgb, extent=(0, width_mm, height_mm, 0), interpolation="antialiased")
    handles = []
    for key, mask_key in (("bed", "tumor"), ("margin", "margin"), ("necrosis", "necrosis")):
        label, colour, style, width = _REGION_STYLE[key]
        if mask_key in masks and draw_mask_outline(ax, masks[mask_key], grid_um, colour=colour, linestyle=style,
                                          linewidth=width, min_ring_um2=min_ring_um2):
            handles.append(Line2D([], [], color=colour, linestyle=style, linewidth=width, label=label))
    counts: dict[str, int] = {}
    halo = [pe.withStroke(linewidth=2.5, foreground="black")]
    for tls_id, maturity, polygon in tls:
        colour = _maturity_rgb(maturity)
        counts[maturity] = counts.get(maturity, 0) + 1
        _outline(ax, polygon, scale=1000.0, colour=colour, linewidth=1.5)
        # Right of its own outline at its centre's height, so a label never sits on a neighbour's.
        _, _, maxx, _ = polygon.bounds
        ax.text(maxx / 1000.0 + 0.01 * width_mm, polygon.centroid.y / 1000.0, str(tls_id), color=colour,
                fontsize=8, fontweight="bold", ha="left", va="center", path_effects=halo, clip_on=True)
    order = [m for m in MATURITY_COLOURS if m in counts] + sorted(m for m in counts if m not in MATURITY_COLOURS)
    for maturity in order:
        handles.append(Line2D([], [], color=_maturity_rgb(maturity), linewidth=2,
                              label=f"TLS {maturity} ({counts[maturity]})"))
    if not tls:
        handles.append(Line2D([], [], color="none", label="no TLS"))
    ax.set_xlim(0, width_mm)
    ax.set_ylim(height_mm, 0)
    draw_scale_bar(ax, width_mm)
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_facecolor("black")
    ax.set_title(f"{title}: {width_mm:.2f} x {height_mm:.2f} mm", fontsize=11)
    legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=True,
                       title="outlines", title_fontsize=8)
    legend.get_frame().set_facecolor("#dddddd")
    _colour_key(ax, colours)
    ax.text(1.01, 0.0, f"each channel scaled\nfrom its {percentiles[0]:g}th to\n{percentiles[1]:g}th percentile\n"
            f"(high end >= {min_ratio:g}x\nthe low end)\n"
            f"outlines < {min_ring_um2:g} µm²\nnot drawn", transform=ax.transAxes,
            fontsize=7, va="bottom", ha="left")
    save_png(fig, path)


def _colour_key(ax, colours: Mapping[str, tuple[float, float, float]]) -> None:
    """Marker names in their tint, stacked at the right edge under the legend."""
    for k, (name, colour) in enumerate(colours.items()):
        # Tints are shown against black, as in the image.
        ax.text(1.01, 0.62 - 0.05 * k, f" {name} ", transform=ax.transAxes, color=tuple(colour), fontsize=8,
                fontweight="bold", va="top", ha="left", backgroundcolor="black")


#: Measurements shown first in a close-up's title, with their short labels.
_FEATURE_LABELS = {"n_B": "B", "n_T": "T", "fdc_fraction": "FDC", "gc_score": "GC", "area_um2": "area µm²"}


def _features_text(features: Mapping[str, float]) -> str:
    keys = [k for k in _FEATURE_LABELS if k in features] + sorted(k for k in features if k not in _FEATURE_LABELS)
    parts = []
    for key in keys:
        value = float(features[key])
        label = _FEATURE_LABELS.get(key, key)
        parts.append(f"{label} {value:.0f}" if abs(value) >= 10 or value == int(value) else f"{label} {value:.2f}")
    return ", ".join(parts)


def plot_tls_closeups(slide, tls: Sequence[tuple[int, str, object, Mapping[str, float]]], folder: str | os.PathLike,
                      *, colours: Mapping[str, tuple[float, float, float]], channel_names: Sequence[str],
                      pad_um: float = 100.0, target_um: float = 1.0,
                      percentiles: tuple[float, float] = (30.0, 99.9), min_ratio: float = 3.0) -> list[Path]:
    """One PNG per TLS: the structure in false colour with its outline, maturity and features.

    The close-ups show the channels of ``colours`` among :data:`CLOSEUP_MARKERS` (all of
    ``colours`` when it names none of them). Every channel is scaled between its
    ``percentiles`` over all close-ups of the slide together, so a TLS without an FDC
    network looks dimmer in CD21 than one with it, rather than each picture stretching its
    own noise.

    Parameters
    ----------
    slide : tme_pipeline.io.slides.Slide
    tls : sequence of (tls_id, maturity, shapely Polygon in µm, features)
        ``features`` maps measurement name -> number (e.g. ``n_B``, ``n_T``,
        ``fdc_fraction``, ``gc_score``), shown in the title.
    folder : path-like
        Where ``tls_<id>.png`` are written (created).
    colours : mapping channel name -> (r, g, b) in [0, 1]
    channel_names : sequence of str
        The slide's channel names, in its channel order.
    pad_um : float
        Margin around the TLS's bounding box (µm).
    target_um : float
        Wanted pixel size (µm), see :func:`read_window`.
    percentiles : (low, high)
        Shared per-channel scaling (see :func:`false_colour`); the low end at the 30th
        percentile sends background to black.
    min_ratio : float
        Floor on the high end, as in :func:`plot_overview`.

    Returns
    -------
    list of Path
        The PNGs written, in the order of ``tls`` (empty for no TLS).

    Raises
    ------
    ValueError
        When a colour names a channel not in ``channel_names``, ``channel_names`` does not
        match the slide's channel count, ``pad_um`` is negative, or a TLS lies outside the
        slide.
    """
    from matplotlib.figure import Figure

    names = list(channel_names)
    if len(names) != slide.n_channels:
        raise ValueError(f"channel_names has {len(names)} names but the slide has {slide.n_channels} channels")
    if pad_um < 0:
        raise ValueError(f"pad_um must be >= 0, got {pad_um}")
    missing = [c for c in colours if c not in names]
    if missing:
        raise ValueError(f"colours name channels {missing} that the slide does not have; channels are {names}")
    shown = {k: v for k, v in colours.items() if k in CLOSEUP_MARKERS} or dict(colours)
    shown_names = list(shown)
    indices = [names.index(n) for n in shown_names]
    folder = Path(folder)
    windows = []
    for tls_id, maturity, polygon, features in tls:
        minx, miny, maxx, maxy = polygon.bounds
        box = (minx - pad_um, miny - pad_um, maxx + pad_um, maxy + pad_um)
        image, um = read_window(slide, *box, target_um=target_um, channels=indices)
        if 0 in image.shape[1:]:
            raise ValueError(f"TLS {tls_id} lies outside the slide (bounds {polygon.bounds} µm)")
        # read_window's top left corner, in µm, to place the picture on the slide's axes.
        _, _, (x0, y0, _, _) = _window_px(slide, *box, target_um)
        windows.append((image, um, x0 * um, y0 * um))
    # Every 2nd pixel of each window is plenty for percentiles and halves the work.
    limits = _display_limits([w[0][:, ::2, ::2] for w in windows], shown_names, percentiles, min_ratio)
    paths = []
    for (tls_id, maturity, polygon, features), (image, um, ox_um, oy_um) in zip(tls, windows):
        path = folder / f"tls_{int(tls_id)}.png"
        h, w = image.shape[1:]
        rgb = false_colour(image, shown_names, shown, limits=limits)
        fig = Figure(figsize=(5.6, 5.6 * h / w + 0.9), layout="constrained")
        ax = fig.subplots()
        extent = (ox_um / 1000.0, (ox_um + w * um) / 1000.0, (oy_um + h * um) / 1000.0, oy_um / 1000.0)
        ax.imshow(rgb, extent=extent, interpolation="antialiased")
        _outline(ax, polygon, scale=1000.0, colour=_maturity_rgb(maturity), linewidth=1.2,
                 linestyle=(0, (4, 2)))
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        draw_scale_bar(ax, w * um / 1000.0)
        ax.set_xlabel("x (mm)", fontsize=8)
        ax.set_ylabel("y (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"TLS {tls_id}: {maturity}\n{_features_text(features)}\n"
                     f"(one intensity scale for all TLS of the slide)", fontsize=9,
                     color=tuple(min(c * 0.8, 1.0) for c in _maturity_rgb(maturity)) if maturity != "aggregate"
                     else "black")
        for k, name in enumerate(shown_names):
            ax.text(0.99, 0.99 - 0.055 * k, f" {name} ", transform=ax.transAxes, color=tuple(shown[name]),
                    fontsize=8, fontweight="bold", va="top", ha="right", backgroundcolor="black")
        paths.append(save_png(fig, path))
    return paths


def _display_limits(samples: Sequence[np.ndarray], names: Sequence[str], percentiles: tuple[float, float],
                    min_ratio: float) -> dict[str, tuple[float, float]]:
    """Per-channel (low, high) intensities: percentiles of the pooled samples, high at least ``min_ratio`` x low.

    ``samples`` are (C, ...) arrays pooled per channel. Without the floor, a marker that is
    nowhere much brighter than its background (a slide without any FDC network in CD21)
    would have that background stretched to full colour, faking a stain.
    """
    limits = {}
    for c, name in enumerate(names):
        values = np.concatenate([np.ravel(sample[c]) for sample in samples]) if samples else np.empty(0)
        values = values[np.isfinite(values)]
        if values.size:
            lo, hi = (float(v) for v in np.percentile(values, percentiles))
            limits[name] = (lo, max(hi, min_ratio * lo))
    return limits
