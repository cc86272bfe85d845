"""Slide regions from the cells and a low-resolution image: tissue, tumour bed, margin, stroma.

Everything lives on one coarse grid of ``grid_um`` pixels (a 10 x 10 mm slide at 5 µm is
2000 x 2000), never on level-0 pixels. Grid pixel ``(i, j)`` covers
``[j, j+1) x [i, i+1)`` times ``grid_um`` µm from the slide's top left corner.

Definitions (as a pathologist draws them)
-----------------------------------------
* ``tissue``: the section without glass, glass holes (alveoli) and dust. Glass is camera
  offset plus noise; tissue glows in every channel (broad-band autofluorescence). The glass
  level and noise of each channel are measured on pixels far from any detected cell, so no
  intensity constant is fitted to one lab.
* ``tumor`` (the bed): where tumour-phenotype cells are dense, with the necrotic and fibrotic
  foci inside it, small islands and holes removed, TLS carved out. Satellite nests (at least
  ``min_nest_cells`` tumour cells linked within ``nest_link_um``) are bed whatever their
  area: they are tumour, though too small for the density kernel to reach the edge threshold,
  and each adds its own margin band. Fewer cells are a bud (<= 4 tumour cells, ITBCC 2016,
  Lugli et al. Mod Pathol 2017), not a nest.
* ``necrosis``: bed without viable nuclei but with nuclear debris (tiny detected objects);
  ``fibrosis``: bed that is paucicellular and not necrotic; ``viable_tumor``: the rest.
* ``margin``: tissue within ``margin_um`` of the border between the bed and non-tumour
  tissue, on both sides; the bed's edge against glass is not a border.
* ``tumor_core`` = bed - margin; ``stroma`` = tissue - bed - margin; so
  ``tissue = tumor_core + margin + stroma`` exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import shapely
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .geojson import feature, feature_collection, mask_to_geometry
from .settings.regions import RegionsConfig

__all__ = ["RegionsConfig", "Regions", "find_regions", "regions_geojson", "signed_border_distance_um", "REGION_KEYS",
           "REGION_COLORS"]

logger = logging.getLogger(__name__)

REGION_KEYS = ("tissue", "tumor", "tumor_core", "margin", "stroma", "viable_tumor", "necrosis", "fibrosis")
#: Regions a density is computed over; the others are descriptive.
DENSITY_REGIONS = ("tumor", "tumor_core", "margin", "stroma")
#: Each region's RGB (0-255) colour, in its QuPath GeoJSON and in the napari viewer.
REGION_COLORS = {"tissue": (200, 200, 200), "tumor": (200, 0, 0), "tumor_core": (255, 120, 0), "margin": (255, 220, 0),
                 "stroma": (0, 160, 80), "viable_tumor": (230, 50, 150), "necrosis": (90, 60, 30),
                 "fibrosis": (120, 120, 255)}
_MM2_PER_UM2 = 1e-6
#: Fewer glass pixels than this cannot measure a channel's offset and noise.
_MIN_GLASS_REFERENCE_PX = 100


@dataclass(frozen=True)
class Regions:
    """The regions of one slide on the working grid, and each cell's place in them.

    Attributes
    ----------
    grid_um : float
        Edge of a grid pixel (µm).
    masks : dict str -> ndarray of bool, shape (H, W)
        Keys :data:`REGION_KEYS`.
    areas_mm2 : dict str -> float
        Area of each mask (mm²).
    percent_necrosis, percent_viable_tumor : float or None
        Percent of the bed's area; None when there is no bed.
    absent : dict str -> str
        Region -> why it carries no density.
    cell_region : ndarray of str, shape (n_cells,)
        ``"tumor_core"``, ``"margin"`` or ``"stroma"``.
    in_tumor : ndarray of bool, shape (n_cells,)
    border_distance_um : ndarray of float32, shape (n_cells,)
        Signed distance to the bed's border with non-tumour tissue (µm), negative inside;
        NaN when the slide has no such border.
    params : dict
        The configuration used.
    """

    grid_um: float
    masks: dict[str, np.ndarray]
    areas_mm2: dict[str, float]
    percent_necrosis: float | None
    percent_viable_tumor: float | None
    absent: dict[str, str]
    cell_region: np.ndarray
    in_tumor: np.ndarray
    border_distance_um: np.ndarray
    params: dict | None = None

    def to_json(self) -> dict:
        """Areas (mm²), percents, absent reasons, cell counts per region and parameters, JSON-safe."""
        regions, counts = np.unique(self.cell_region.astype(str), return_counts=True)
        return {"grid_um": float(self.grid_um),
                "areas_mm2": {k: round(float(v), 6) for k, v in self.areas_mm2.items()},
                "percent_necrosis": None if self.percent_necrosis is None else round(float(self.percent_necrosis), 3),
                "percent_viable_tumor": (None if self.percent_viable_tumor is None
                                         else round(float(self.percent_viable_tumor), 3)),
                "absent": dict(self.absent),
                "cells": {**{k: 0 for k in ("tumor_core", "margin", "stroma")},
                          **{str(r): int(c) for r, c in zip(regions, counts)}, "in_tumor": int(self.in_tumor.sum())},
                "params": dict(self.params or {})}


def find_regions(obs: pd.DataFrame, image: np.ndarray, image_um: float, *, channel_names: Sequence[str],
                 nuclear_channel: str, size_um: tuple[float, float], tls_polygons_um: Sequence = (),
                 config: RegionsConfig | None = None) -> Regions:
    """Tissue, tumour bed, necrosis, fibrosis, margin and stroma of one slide, and each cell's region.

    Parameters
    ----------
    obs : DataFrame, n_cells rows
        Columns ``x_um``, ``y_um`` (nucleus centroid, µm from the top left corner),
        ``phenotype``; ``nucleus_area_um2`` (µm²) when present tells debris from nuclei.
    image : ndarray, shape (C, Y, X)
        Every channel at ``image_um`` µm per pixel (:func:`tme_pipeline.stages.lowres_image`).
    image_um : float
        Pixel size of ``image`` (µm).
    channel_names : sequence of str, length C
    nuclear_channel : str
        The nuclear stain's channel (e.g. ``"DAPI"``).
    size_um : (width, height)
        Slide size (µm).
    tls_polygons_um : sequence of shapely Polygon
        TLS outlines (µm), carved out of the bed.
    config : RegionsConfig

    Returns
    -------
    Regions
    """
    config = config or RegionsConfig()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != len(channel_names):
        raise ValueError(f"image must be (C, Y, X) with C = {len(channel_names)} channels "
                         f"({list(channel_names)}), got shape {image.shape}")
    if nuclear_channel not in channel_names:
        raise ValueError(f"nuclear channel {nuclear_channel!r} is not among {list(channel_names)}")
    if not image_um > 0:
        raise ValueError(f"image_um must be positive, got {image_um}")
    width_um, height_um = (float(v) for v in size_um)
    if not (width_um > 0 and height_um > 0):
        raise ValueError(f"size_um must be positive (width, height) µm, got {size_um}")
    missing = [c for c in ("x_um", "y_um", "phenotype") if c not in obs.columns]
    if missing:
        raise ValueError(f"obs lacks column(s) {missing}")

    g = config.grid_um
    shape = (max(1, int(np.ceil(height_um / g))), max(1, int(np.ceil(width_um / g))))
    x = obs["x_um"].to_numpy(np.float64)
    y = obs["y_um"].to_numpy(np.float64)
    ii = np.clip((y / g).astype(np.int64), 0, shape[0] - 1)
    jj = np.clip((x / g).astype(np.int64), 0, shape[1] - 1)
    if "nucleus_area_um2" in obs.columns:
        debris = obs["nucleus_area_um2"].to_numpy(np.float64) < config.debris_max_nucleus_um2
    else:
        debris = np.zeros(len(obs), bool)
    phen = obs["phenotype"].astype(str).to_numpy()
    is_tumor = np.isin(phen, list(config.tumor_phenotypes)) & ~debris

    absent: dict[str, str] = {}
    tissue = _tissue(image, image_um, shape, ii, jj, config)
    if not tissue.any():
        absent["tissue"] = "tissue not found (the slide looks like glass)"

    sigma_px = config.density_sigma_um / g
    support = ndi.gaussian_filter(tissue.astype(np.float32), sigma_px)

    def density(select: np.ndarray) -> np.ndarray:
        # Normalised convolution: the density at the tissue's edge is not halved by the glass.
        counts = np.bincount(ii[select] * shape[1] + jj[select], minlength=shape[0] * shape[1])
        smooth = ndi.gaussian_filter(counts.reshape(shape).astype(np.float32), sigma_px)
        return np.where(tissue, smooth / np.maximum(support, 1e-3), 0.0) / (g * g * _MM2_PER_UM2)

    tumor_density = density(is_tumor)
    viable_density = density(~debris)
    debris_density = density(debris)
    # Debris that outnumbers the nuclei left is necrosis too: another lab's blur merges debris
    # into nucleus-sized clumps, which lift the "viable" density over the absolute cap.
    necrotic = tissue & (debris_density > config.necrosis_min_debris_per_mm2) & (
        (viable_density < config.necrosis_max_viable_per_mm2)
        | (debris_density >= config.necrosis_min_debris_ratio * viable_density))
    necrotic = _remove_small(necrotic, config.min_focus_mm2 / (g * g * _MM2_PER_UM2))

    # The bed's edge is where the density falls to a fraction of the nests' own density (half
    # maximum by default), so a lab or tumour with denser or sparser nests gets the same edge;
    # tumor_density_per_mm2 is the floor that scattered tumour-called cells never reach.
    threshold = config.tumor_density_per_mm2
    at_tumour = tumor_density[ii[is_tumor], jj[is_tumor]]
    at_tumour = at_tumour[at_tumour > threshold]
    if at_tumour.size:
        threshold = max(threshold, config.tumor_edge_fraction * float(np.median(at_tumour)))
    dense = tissue & (tumor_density > threshold)
    bed = _smooth(dense, config.smooth_um / g) & tissue
    # Necrotic foci belong to the bed when they touch it (the bed is drawn around them).
    if bed.any() and necrotic.any():
        lab, _ = ndi.label(necrotic)
        touching = np.unique(lab[ndi.binary_dilation(bed, iterations=2) & necrotic])
        bed |= np.isin(lab, touching[touching > 0])
    px_area_mm2 = g * g * _MM2_PER_UM2
    # Satellite nests of a few tumour cells are tumour, but too small for the density kernel:
    # they join the bed by their cells (linked nests), not by their area.
    # A nest against the bed is left to the density edge, so that nests do not push the bed's edge out.
    nest_cells, nest_mask = _nests(x[is_tumor], y[is_tumor], shape, config)
    min_island_px = config.min_tumor_island_mm2 / px_area_mm2
    bed = _remove_small(bed, min_island_px, keep_holding=(nest_cells, config.min_nest_cells))
    bed |= nest_mask & tissue & ~_touching(nest_mask, bed)
    bed = _holes(bed, tissue, necrotic, np.column_stack([x, y])[~debris], is_tumor[~debris], config)
    bed |= _fibrotic_foci(bed, tissue & ~bed, viable_density < config.fibrosis_max_cells_per_mm2)
    bed = _remove_small(bed & ~_rasterise(tls_polygons_um, shape, g), min_island_px,
                        keep_holding=(nest_cells, config.min_nest_cells))
    if not is_tumor.any():
        absent["tumor"] = "no tumour cells"
    elif not bed.any() and tissue.any():
        absent["tumor"] = f"tumour cells never reach {threshold:g} cells/mm²"

    necrosis = necrotic & bed
    fibrosis = _remove_small(bed & ~necrosis & (viable_density < config.fibrosis_max_cells_per_mm2)
                             & (tumor_density <= config.tumor_density_per_mm2), config.min_focus_mm2 / px_area_mm2)
    viable = bed & ~necrosis & ~fibrosis

    distances = _border_distances(tissue, bed, g)
    has_border = distances is not None
    if has_border:
        d_in, d_out = distances
        margin = tissue & np.where(bed, d_in <= config.margin_um, d_out <= config.margin_um)
        signed = _signed(bed, d_in, d_out, g).astype(np.float32)
        border = ndi.map_coordinates(signed, [y / g - 0.5, x / g - 0.5], order=1, mode="nearest").astype(np.float32)
    else:
        margin = np.zeros(shape, bool)
        border = np.full(len(obs), np.nan, np.float32)
    core = bed & ~margin
    stroma = tissue & ~bed & ~margin

    masks = {"tissue": tissue, "tumor": bed, "tumor_core": core, "margin": margin, "stroma": stroma,
             "viable_tumor": viable, "necrosis": necrosis, "fibrosis": fibrosis}
    areas = {k: float(m.sum()) * px_area_mm2 for k, m in masks.items()}
    in_tumor = bed[ii, jj]
    # The interpolated distance may cross zero inside a cell's own grid pixel; its sign follows
    # the pixel, so that in_tumor, region and the distance never disagree.
    border = np.where(in_tumor, -np.abs(border), np.abs(border)).astype(np.float32)
    cell_region = np.where(margin[ii, jj], "margin", np.where(in_tumor, "tumor_core", "stroma")).astype(object)
    cell_counts = {k: int(masks[k][ii, jj].sum()) for k in DENSITY_REGIONS}
    for k in DENSITY_REGIONS:
        if k in absent or absent.get("tumor") and k in ("tumor_core", "margin"):
            absent.setdefault(k, absent.get("tumor", "no tumour bed"))
            continue
        if "tissue" in absent:
            absent[k] = absent["tissue"]
        elif areas[k] < config.min_region_area_mm2:
            absent[k] = f"{k} {areas[k]:.3g} mm² < {config.min_region_area_mm2:g} mm²"
        elif cell_counts[k] < config.min_region_cells:
            absent[k] = f"{k} holds {cell_counts[k]} cells < {config.min_region_cells}"
    bed_area = areas["tumor"]
    pct_nec = 100.0 * areas["necrosis"] / bed_area if bed_area > 0 else None
    pct_viable = 100.0 * areas["viable_tumor"] / bed_area if bed_area > 0 else None
    logger.info("regions: tissue %.3f mm², bed %.3f mm², necrosis %s %%, absent %s", areas["tissue"], bed_area,
                None if pct_nec is None else round(pct_nec, 1), sorted(absent))
    return Regions(grid_um=g, masks=masks, areas_mm2=areas, percent_necrosis=pct_nec, percent_viable_tumor=pct_viable,
                   absent=absent, cell_region=cell_region.astype(str), in_tumor=in_tumor, border_distance_um=border,
                   params=config.model_dump(mode="json"))


def _tissue(image: np.ndarray, image_um: float, shape: tuple[int, int], ii: np.ndarray, jj: np.ndarray,
            config: RegionsConfig) -> np.ndarray:
    """Tissue mask (H, W) bool: broad-band signal above the glass level of every channel."""
    g = config.grid_um
    yy = (np.arange(shape[0], dtype=np.float32) + 0.5) * g / image_um - 0.5
    xx = (np.arange(shape[1], dtype=np.float32) + 0.5) * g / image_um - 0.5
    coords = np.meshgrid(yy, xx, indexing="ij")
    sigma = config.tissue_smooth_um / g
    occupied = np.zeros(shape, bool)
    occupied[ii, jj] = True
    far = (ndi.distance_transform_edt(~occupied) * g > config.glass_reference_um if occupied.any()
           else np.ones(shape, bool))
    if far.sum() < _MIN_GLASS_REFERENCE_PX:
        # No glass to measure the camera offset on: the section covers the slide, and the
        # darkest tissue must not be mistaken for glass.
        logger.info("regions: no glass far from cells; the whole slide is taken as tissue")
        return np.ones(shape, bool)
    z = np.empty((image.shape[0],) + shape, np.float32)
    excess = np.empty_like(z)
    for c in range(image.shape[0]):
        chan = ndi.map_coordinates(np.asarray(image[c], np.float32), coords, order=1, mode="nearest")
        if sigma > 0:
            chan = ndi.gaussian_filter(chan, sigma)
        # Glass reference: far from any detected cell (debris counts, so necrosis is not glass).
        ref = chan[far]
        level = float(np.median(ref))
        noise = float(1.4826 * np.median(np.abs(ref - level)))
        noise = max(noise, 1e-3 * max(abs(level), 1.0))
        z[c] = (chan - level) / noise
        excess[c] = chan - level
    tissue = np.median(z, axis=0) > config.tissue_z
    if tissue.any():
        # The optics blur the tissue's glow over the glass: its edge is where the glow falls to
        # a fraction of the tissue's typical level (half maximum by default), not where it
        # first leaves the noise.
        typical = np.median(excess[:, tissue], axis=1)
        excess /= np.maximum(typical, 1e-6)[:, None, None]
        tissue &= np.median(excess, axis=0) > config.tissue_edge_fraction
    px_area_mm2 = g * g * _MM2_PER_UM2
    tissue = _remove_small(tissue, config.min_tissue_island_mm2 / px_area_mm2)
    tissue |= ~_remove_small(~tissue, config.min_glass_hole_mm2 / px_area_mm2, only_enclosed=tissue)
    return tissue


def _holes(bed: np.ndarray, tissue: np.ndarray, necrotic: np.ndarray, xy_um: np.ndarray, tumour: np.ndarray,
           config: RegionsConfig) -> np.ndarray:
    """The bed (H, W) with its small holes filled and its large holes drawn where the cells put them.

    A hole is tissue outside the bed that the bed encloses: it does not reach the grid's edge
    and most of its rim is bed (a piece rimmed mostly by glass is a notch at the section's edge,
    filled when smaller than ``min_tumor_hole_mm2``, by its own area).
    The density kernel blurs a hole's edge inwards: its half-maximum contour lies about
    ``sigma² / (2 R)`` inside a hole of radius ``R``, and the opening/closing and the noise of a
    few dozen cells per kernel shrink it further, so a 0.013 mm² stroma island reads as
    ~0.009 mm² and would be filled. Each hole's extent is therefore measured on the cells: the
    pixels within ``density_sigma_um`` of it (the most the blur moves an edge of a hole that can
    reach ``min_tumor_hole_mm2``) whose ``hole_vote_cells`` nearest viable cells are mostly not
    tumour join it (necrosis stays bed: its merged debris clumps read as viable non-tumour
    cells). A hole whose extent is at least ``min_tumor_hole_mm2`` stays out of the bed
    with that extent (it gets its own margin band); a smaller one is filled.

    Parameters
    ----------
    bed, tissue, necrotic : ndarray of bool, shape (H, W)
    xy_um : ndarray of float, shape (n, 2)
        Viable (non-debris) cells' centroids (µm).
    tumour : ndarray of bool, shape (n,)
        Which of those cells are tumour.
    config : RegionsConfig

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    g = config.grid_um
    min_px = config.min_tumor_hole_mm2 / (g * g * _MM2_PER_UM2)
    outside = tissue & ~bed
    if not bed.any() or not outside.any():
        return bed
    lab, n = ndi.label(outside)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    # A piece mostly rimmed by glass (a notch at the section's edge) is no island: its own area decides.
    rim = ndi.grey_dilation(lab, size=3) * ~outside
    rim_bed = np.bincount(rim.ravel(), weights=bed.ravel(), minlength=n + 1)
    island = rim_bed > 0.5 * np.bincount(rim.ravel(), minlength=n + 1)
    island[edge] = False
    island[0] = False
    size = np.bincount(lab.ravel(), minlength=n + 1)
    notch = ~island & (size < min_px)
    notch[edge] = False
    notch[0] = False
    bed = bed | notch[lab]
    enclosed = island[lab]
    if not enclosed.any():
        return bed
    reach = max(1, int(round(config.density_sigma_um / g)))
    zone = ndi.binary_dilation(enclosed, _disc(reach)) & bed & ~necrotic
    grown = enclosed.copy()
    k = min(config.hole_vote_cells, len(xy_um))
    if zone.any() and k > 0 and not tumour.all():
        zi, zj = np.nonzero(zone)
        _, idx = cKDTree(xy_um).query(np.column_stack([(zj + 0.5) * g, (zi + 0.5) * g]), k=k)
        idx = np.asarray(idx).reshape(len(zi), k)
        grown[zi, zj] = tumour[idx].sum(axis=1) * 2 < k
    glab, n = ndi.label(grown)
    size = np.bincount(glab.ravel(), minlength=n + 1)
    # Only pieces that grew from an enclosed hole count; stray non-tumour votes in the bed do not.
    seeded = np.bincount(glab.ravel(), weights=enclosed.ravel(), minlength=n + 1) > 0
    hole = seeded & (size >= min_px)
    hole[0] = False
    return (bed | enclosed) & ~hole[glab]


def _fibrotic_foci(bed: np.ndarray, outside: np.ndarray, paucicellular: np.ndarray) -> np.ndarray:
    """Paucicellular pieces of ``outside`` (H, W) that the bed surrounds: scars inside the bed.

    A piece belongs to the bed when most of it is paucicellular and most of its rim is bed
    rather than glass (every piece of tissue outside the bed is bounded by bed or glass);
    paucicellular stroma at the section's edge stays out.
    """
    if not bed.any() or not outside.any():
        return np.zeros_like(bed)
    lab, n = ndi.label(outside)
    size = np.bincount(lab.ravel(), minlength=n + 1)
    sparse = np.bincount(lab.ravel(), weights=paucicellular.ravel(), minlength=n + 1)
    rim = ndi.grey_dilation(lab, size=3) * ~outside  # each rim pixel takes a neighbouring piece's label
    rim_all = np.bincount(rim.ravel(), minlength=n + 1)
    rim_bed = np.bincount(rim.ravel(), weights=bed.ravel(), minlength=n + 1)
    take = (sparse > 0.5 * size) & (rim_bed > 0.5 * np.maximum(rim_all, 1))
    take[0] = False
    return take[lab]


def _nests(x_um: np.ndarray, y_um: np.ndarray, shape: tuple[int, int],
           config: RegionsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tumour nests: tumour cells linked within ``nest_link_um``, at least ``min_nest_cells`` of them.

    Returns the number of nest cells per grid pixel ((H, W) int32) and the nests' outlines
    ((H, W) bool): discs of half the link distance around their cells, so that linked cells'
    discs touch, closed with the same disc.
    """
    g = config.grid_um
    counts = np.zeros(shape, np.int32)
    if len(x_um) < config.min_nest_cells:
        return counts, np.zeros(shape, bool)
    xy = np.column_stack([x_um, y_um])
    pairs = cKDTree(xy).query_pairs(config.nest_link_um, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(xy),) * 2)
    _, comp = connected_components(graph, directed=False)
    in_nest = np.bincount(comp)[comp] >= config.min_nest_cells
    ii = np.clip((y_um[in_nest] / g).astype(np.int64), 0, shape[0] - 1)
    jj = np.clip((x_um[in_nest] / g).astype(np.int64), 0, shape[1] - 1)
    np.add.at(counts, (ii, jj), 1)
    r = max(1, int(round(0.5 * config.nest_link_um / g)))
    disc = _disc(r)
    # Two radii of padding hold the dilations, so the closing does not erode nests at the slide's edge.
    outline = ndi.binary_dilation(np.pad(counts > 0, 2 * r), disc)
    outline = ndi.binary_erosion(ndi.binary_dilation(outline, disc), disc)
    return counts, outline[2 * r:-2 * r, 2 * r:-2 * r]


def _touching(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` (H, W) that touch or overlap ``other`` (8-neighbourhood)."""
    if not mask.any() or not other.any():
        return np.zeros_like(mask)
    lab, _ = ndi.label(mask)
    hit = np.unique(lab[ndi.binary_dilation(other, np.ones((3, 3), bool)) & mask])
    return np.isin(lab, hit[hit > 0])


def _disc(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return yy * yy + xx * xx <= r * r


def _smooth(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Opening then closing with a disc of ``radius_px`` grid pixels."""
    r = int(round(radius_px))
    if r < 1 or not mask.any():
        return mask
    disc = _disc(r)
    padded = np.pad(mask, r)
    out = ndi.binary_closing(ndi.binary_opening(padded, disc), disc)
    return out[r:-r, r:-r]


def _remove_small(mask: np.ndarray, min_px: float, *, only_enclosed: np.ndarray | None = None,
                  keep_holding: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """``mask`` without connected components smaller than ``min_px`` pixels.

    With ``only_enclosed``, a component touching the image edge is kept whatever its size:
    a hole is only a hole when ``only_enclosed`` surrounds it. With ``keep_holding =
    (counts, k)``, a component whose pixels hold at least ``k`` of ``counts`` ((H, W) int) is
    kept whatever its size.
    """
    if min_px <= 0 or not mask.any():
        return mask
    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    if keep_holding is not None:
        counts, k = keep_holding
        keep |= np.bincount(lab.ravel(), weights=counts.ravel(), minlength=n + 1) >= k
    if only_enclosed is not None:
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        keep[edge] = True
    keep[0] = False
    return keep[lab]


def _rasterise(polygons_um: Sequence, shape: tuple[int, int], grid_um: float) -> np.ndarray:
    """Grid pixels whose centre lies inside any of the polygons (µm): (H, W) bool."""
    out = np.zeros(shape, bool)
    for poly in polygons_um:
        if poly is None or poly.is_empty:
            continue
        x0, y0, x1, y1 = poly.bounds
        j0, j1 = max(0, int(x0 // grid_um)), min(shape[1], int(np.ceil(x1 / grid_um)) + 1)
        i0, i1 = max(0, int(y0 // grid_um)), min(shape[0], int(np.ceil(y1 / grid_um)) + 1)
        if j0 >= j1 or i0 >= i1:
            continue
        yy, xx = np.mgrid[i0:i1, j0:j1]
        out[i0:i1, j0:j1] |= shapely.contains_xy(poly, (xx + 0.5) * grid_um, (yy + 0.5) * grid_um)
    return out


def _border_distances(tissue: np.ndarray, bed: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(inside: µm to the nearest non-tumour tissue, outside: µm to the nearest bed pixel); None without a border."""
    nontumor = tissue & ~bed
    if not (bed.any() and nontumor.any()):
        return None
    return ndi.distance_transform_edt(~nontumor) * g, ndi.distance_transform_edt(~bed) * g


def _signed(bed: np.ndarray, d_in: np.ndarray, d_out: np.ndarray, g: float) -> np.ndarray:
    # Pixel centres lie half a pixel from the edge: the signed field is zero on the border.
    return np.where(bed, -(d_in - 0.5 * g), d_out - 0.5 * g)


def signed_border_distance_um(tissue: np.ndarray, bed: np.ndarray, grid_um: float) -> np.ndarray | None:
    """Signed distance (µm) of each grid pixel centre to the bed's border with other tissue.

    Parameters
    ----------
    tissue, bed : ndarray of bool, shape (H, W)
    grid_um : float
        Grid pixel edge (µm).

    Returns
    -------
    ndarray of float64, shape (H, W), or None
        Negative inside the bed, zero on the border (half a pixel from the adjacent centres),
        the field :func:`find_regions` samples at the cells; None when the bed has no border
        with other tissue.
    """
    distances = _border_distances(tissue, bed, grid_um)
    return None if distances is None else _signed(bed, *distances, grid_um)


def regions_geojson(regions: Regions, *, pixel_um: float, slide_id: str) -> dict:
    """The regions as a QuPath-importable FeatureCollection in level-0 pixels.

    Parameters
    ----------
    regions : Regions
    pixel_um : float
        Level-0 pixel size (µm).
    slide_id : str

    Returns
    -------
    dict
        One feature per non-empty region (classification names are the region keys),
        measurements ``"Area mm^2"`` and, for the bed, ``"Necrosis %"`` and
        ``"Viable tumor %"``; absent regions carry ``properties.absent`` with the reason.
    """
    features = []
    for key in REGION_KEYS:
        mask = regions.masks[key]
        if not mask.any():
            continue
        meas = {"Area mm^2": regions.areas_mm2[key]}
        if key == "tumor":
            meas["Necrosis %"] = regions.percent_necrosis
            meas["Viable tumor %"] = regions.percent_viable_tumor
        props = {"region": key, "slide_id": slide_id}
        if key in regions.absent:
            props["absent"] = regions.absent[key]
        # Half a grid pixel straightens the contour's staircase: ~10x smaller files, area within 0.1 %.
        outline = mask_to_geometry(mask, regions.grid_um, simplify_um=0.5 * regions.grid_um)
        features.append(feature(outline, pixel_um=pixel_um, name=key,
                                color=REGION_COLORS[key], measurements=meas, properties=props))
    return feature_collection(features, pixel_um=pixel_um, slide_id=slide_id, grid_um=regions.grid_um)
