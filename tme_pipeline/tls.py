"""Tertiary lymphoid structures (TLS) from the per-cell table: detection, outline, maturity.

A TLS is a dense B-cell core with a T-cell zone beside it (Sautès-Fridman et al., Nat Rev
Cancer 2019). Detection follows tlsR (Lee et al.): B cells linked within ``link_um`` form
candidates; a candidate is a TLS with >= ``min_b_cells`` B cells and >= ``min_t_cells`` T
cells within ``t_zone_um`` of its B cells. Two guards keep look-alikes out: a B cell joins a
core only with ``min_b_neighbors`` B neighbours within ``link_um`` (so loose B cells never
chain into a core), and the core must be dense (``min_b_density_per_mm2``, an order of
magnitude above loose B-cell infiltrates). T-cell clusters without B cells are reported as
rejected, never as TLS.

Maturity follows the staging of Posch et al. (Oncoimmunology 2018) and Vanhersecke et al.
(Nat Cancer 2021): ``aggregate`` (no CD21+ follicular dendritic cell network), ``primary``
(a CD21+ FDC mesh over a substantial part of the B core) and ``secondary`` (mesh plus a
germinal centre). Without a GC marker, the germinal centre is read from morphology:
centroblasts are larger with paler, open chromatin than resting mantle B cells.

Outline: the B core plus the T cells within ``t_zone_um`` of it, closed with discs of
``outline_um`` and reaching ``cell_radius_um`` beyond the outermost cell centres; holes are
filled, and T cells not packed against the core (gaps wider than ``2 * outline_um``) stay out.

Defaults not taken from a publication, and why: ``link_um`` is 20 µm, above tlsR's 10-15 µm,
because lymphoid aggregates mix B and T cells (~6500 B/mm² on the development slides, median
B-B nearest neighbour 6-7 µm): when a dimmer CD20 loses a third of the B calls, 15 µm links
break aggregates into pieces under 50 B cells (recall 0.79 there) while 20 µm holds them
(0.97), and loose B cells (~300/mm²) still fail the count and density rules.
``min_area_um2`` (7000 µm²) is the area of 50 B cells at follicle density (~2500 µm²) plus a
thin T zone around them;
``min_b_density_per_mm2`` (3000) sits between loose B-cell infiltrates (~300 B/mm²) and
follicles (15 000-25 000 B/mm²). The staging thresholds are fractions, not intensities: on
the development slides (seeds 70000) aggregates had an FDC fraction of 0.00 and primary and
secondary TLS 0.71-0.89 (threshold 0.3; the mesh threshold is the background's median + 4
MAD); primary TLS had a GC score of at most 0.008 and secondary at least 0.042 (another
lab's look, seed 71000, where segmentation blurs the centroblasts' size; 0.146 in the
default look): the threshold, 0.02, sits midway on a log scale.
The GC nucleus ratios (area >= 1.4x, DAPI <= 0.75x the slide's B-cell medians) took 62-82 %
of the true germinal-centre B cells there (64 % in another lab's look, seed 71000) and at
most 0.09 % of the mantle's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import anndata
import numpy as np
import pandas as pd
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from shapely.geometry import Polygon

from .geojson import feature, feature_collection
from .settings.tls import TLSConfig

__all__ = ["TLSConfig", "TLSResult", "find_tls", "tls_geojson", "MATURITIES", "MATURITY_COLOURS"]

#: Stages in order; ``unstaged`` when the panel has no FDC marker to stage with.
MATURITIES = ("aggregate", "primary", "secondary", "unstaged")
#: TLS maturity -> RGB (0-255): the class colours of tls.geojson (QuPath) and of the outlines in
#: the overview and close-ups (tme_pipeline.slide_plots), so a TLS looks the same everywhere.
#: Apart from each other and from the marker tints: aggregate pink, primary orange,
#: secondary magenta; a TLS without a stage grey.
MATURITY_COLOURS: dict[str, tuple[int, int, int]] = {
    "aggregate": (255, 170, 200),
    "primary": (255, 140, 0),
    "secondary": (230, 0, 255),
    "unstaged": (160, 160, 160),
}


@dataclass(frozen=True)
class TLSResult:
    """The TLS of one slide.

    Attributes
    ----------
    table : DataFrame, one row per TLS: ``tls_id`` (1..k), ``maturity``, ``x_um``, ``y_um``
        (centroid, µm), ``area_um2``, ``b_core_area_um2``, ``n_B``, ``n_T``, ``b_density_per_mm2``,
        ``fdc_fraction`` (0-1, NaN when unstaged), ``gc_score`` (0-1, NaN when unstaged).
    polygons_um : list of shapely Polygon (µm), one per row of ``table``.
    cell_tls_id : ndarray of int32, shape (n_cells,), 0 = not in a TLS.
    rejected : list of dict, each a rejected candidate with ``x_um``, ``y_um``, ``n_B``, ``n_T``, ``reason``.
    params : dict, the configuration used.
    notes : dict, slide-level facts (``fdc_threshold``, ``maturity_reason`` when unstaged, ``reason`` when none).
    """

    table: pd.DataFrame
    polygons_um: list
    cell_tls_id: np.ndarray
    rejected: list[dict]
    params: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """Counts by maturity, per-TLS rows (no polygons), rejected candidates and parameters (JSON-safe)."""
        counts = self.table["maturity"].value_counts().to_dict() if len(self.table) else {}
        rows = [{k: _plain(v) for k, v in r.items()} for r in self.table.to_dict(orient="records")]
        out = {"count": len(self.table), "counts": {m: int(counts.get(m, 0)) for m in MATURITIES},
               "tls": rows, "rejected": [{k: _plain(v) for k, v in r.items()} for r in self.rejected],
               "n_rejected": len(self.rejected), "params": self.params}
        out.update({k: _plain(v) for k, v in self.notes.items()})
        return out


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


def find_tls(cells: anndata.AnnData, config: TLSConfig) -> TLSResult:
    """Find, outline and stage the TLS of one slide.

    Parameters
    ----------
    cells : AnnData, n cells; ``obs`` with ``x_um``, ``y_um`` (µm), ``phenotype``; for staging
        ``nucleus_area_um2``, ``dapi_mean`` and ``X`` with the ``config.fdc_marker`` column.
    config : TLSConfig

    Returns
    -------
    TLSResult
        ``cell_tls_id`` marks the cells inside each TLS outline.

    Raises
    ------
    ValueError
        When ``obs`` lacks a required column or coordinates are not finite.
    """
    obs = cells.obs
    missing = [c for c in ("x_um", "y_um", "phenotype") if c not in obs.columns]
    if missing:
        raise ValueError(f"find_tls: cells.obs lacks {missing}")
    xy = np.column_stack([obs["x_um"].to_numpy(np.float64), obs["y_um"].to_numpy(np.float64)])
    if not np.isfinite(xy).all():
        raise ValueError("find_tls: cells.obs x_um/y_um contain NaN or inf")
    pheno = obs["phenotype"].astype(str).to_numpy()
    is_b, is_t = np.isin(pheno, config.b_phenotypes), np.isin(pheno, config.t_phenotypes)
    n = len(xy)
    params = config.model_dump(mode="json")
    empty = pd.DataFrame(columns=["tls_id", "maturity", "x_um", "y_um", "area_um2", "b_core_area_um2", "n_B", "n_T",
                                  "b_density_per_mm2", "fdc_fraction", "gc_score"])
    b_idx, t_idx = np.flatnonzero(is_b), np.flatnonzero(is_t)
    t_tree = cKDTree(xy[t_idx]) if len(t_idx) else None
    if len(b_idx) == 0:
        return TLSResult(empty, [], np.zeros(n, np.int32), _t_clusters(xy, t_idx, t_tree, [], config), params,
                         {"reason": f"no B cells (phenotypes {list(config.b_phenotypes)})"})

    # Cores: B cells with enough B neighbours, linked within link_um (tlsR's linkage).
    b_tree = cKDTree(xy[b_idx])
    pairs = b_tree.query_pairs(config.link_um, output_type="ndarray")
    deg = np.bincount(pairs.ravel(), minlength=len(b_idx))
    core = deg >= config.min_b_neighbors
    pairs = pairs[core[pairs[:, 0]] & core[pairs[:, 1]]]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(b_idx),) * 2)
    _, comp = connected_components(graph, directed=False)
    comp = np.where(core, comp, -1)
    sizes = np.bincount(comp[core], minlength=comp.max() + 1) if core.any() else np.zeros(0, int)

    fdc = _fdc_values(cells, config, xy, b_idx, comp, sizes)
    gc_like = _gc_like(cells, config, is_b, is_t)
    rows, polys, rejected = [], [], []
    # Components far below the minimum are single or loose B cells: summarised, not listed one by one.
    listed = max(config.min_b_cells // 5, 2)
    small = int(((sizes > 0) & (sizes < listed)).sum())
    for k in np.flatnonzero(sizes >= listed):
        members = b_idx[comp == k]
        row, poly, reason = _candidate(xy, members, t_idx, t_tree, config)
        if reason:
            rejected.append({**row, "reason": reason})
            continue
        row["fdc_fraction"], row["gc_score"] = _stage_features(xy[members], members, fdc, gc_like, config)
        rows.append(row)
        polys.append(poly)
    if small:
        rejected.append({"x_um": None, "y_um": None, "n_B": small, "n_T": 0,
                         "reason": f"{small} single or loose B-cell groups (< {listed} linked B cells)"})
    rejected.extend(_t_clusters(xy, t_idx, t_tree, polys, config))

    order = np.argsort([-p.area for p in polys], kind="stable")
    polys = [polys[i] for i in order]
    table = pd.DataFrame([rows[i] for i in order], columns=empty.columns) if rows else empty
    notes: dict = {"fdc_threshold": fdc[1] if fdc is not None else None}
    if len(table):
        table["tls_id"] = np.arange(1, len(table) + 1)
        table["maturity"] = [_maturity(f, g, fdc is not None, config)
                             for f, g in zip(table["fdc_fraction"], table["gc_score"])]
    else:
        notes["reason"] = f"{len(rejected)} candidate(s) rejected" if rejected else "no B-cell core"
    if fdc is None:
        notes["maturity_reason"] = f"panel has no {config.fdc_marker!r}: maturity unstaged"
    cell_tls_id = np.zeros(n, np.int32)
    if polys:
        hit_cell, hit_poly = shapely.STRtree(polys).query(shapely.points(xy), predicate="intersects")
        cell_tls_id[hit_cell] = hit_poly.astype(np.int32) + 1
    return TLSResult(table.reset_index(drop=True), polys, cell_tls_id, rejected, params, notes)


def _outline(points_um: np.ndarray, config: TLSConfig):
    """Closing of discs around the cells: the filled outline (µm) of densely packed cells."""
    discs = shapely.buffer(shapely.points(points_um), config.outline_um, quad_segs=4)
    merged = shapely.union_all(discs).buffer(config.cell_radius_um - config.outline_um, quad_segs=4)
    return merged


def _largest(geom) -> Polygon:
    parts = list(getattr(geom, "geoms", [geom]))
    parts = [p for p in parts if isinstance(p, Polygon) and not p.is_empty]
    return Polygon(max(parts, key=lambda p: p.area).exterior) if parts else Polygon()


def _candidate(xy, members, t_idx, t_tree, config: TLSConfig):
    """Measure one B component; the reason it is rejected, or '' when it is a TLS."""
    core_geom = _largest(_outline(xy[members], config))
    cx, cy = xy[members].mean(axis=0)
    row = {"x_um": float(cx), "y_um": float(cy), "n_B": len(members), "n_T": 0}
    if len(members) < config.min_b_cells:
        return row, None, f"{len(members)} B cells < {config.min_b_cells}"
    density = len(members) / max(core_geom.area, 1e-9) * 1e6
    if density < config.min_b_density_per_mm2:
        return row, None, f"loose B cells: {density:.0f} B/mm² < {config.min_b_density_per_mm2:.0f}"
    near_t = np.zeros(0, np.intp)
    if t_tree is not None:
        hits = t_tree.query_ball_point(xy[members], config.t_zone_um)
        near_t = t_idx[np.unique(np.concatenate([np.asarray(h, np.intp) for h in hits]))]
    row["n_T"] = len(near_t)
    if len(near_t) < config.min_t_cells:
        return row, None, (f"no T-cell zone: {len(near_t)} T cells within {config.t_zone_um:g} µm "
                           f"< {config.min_t_cells}")
    # The T zone is the T cells packed against the core: the outline keeps the piece holding the core.
    whole = _outline(np.vstack([xy[members], xy[near_t]]), config)
    parts = [p for p in getattr(whole, "geoms", [whole]) if p.intersects(core_geom)]
    poly = _largest(shapely.union_all([*parts, core_geom]))
    if poly.area < config.min_area_um2:
        return row, None, f"area {poly.area:.0f} µm² < {config.min_area_um2:.0f}"
    inside_t = shapely.contains_xy(poly, xy[near_t, 0], xy[near_t, 1])
    row.update(x_um=float(poly.centroid.x), y_um=float(poly.centroid.y), area_um2=float(poly.area),
               b_core_area_um2=float(core_geom.area), n_T=int(inside_t.sum()), b_density_per_mm2=float(density))
    return row, poly, ""


def _marker_column(cells: anndata.AnnData, name: str) -> np.ndarray | None:
    names = [str(v) for v in cells.var_names]
    if name not in names:
        return None
    col = cells.X[:, names.index(name)]
    return np.asarray(col.toarray() if hasattr(col, "toarray") else col, np.float64).ravel()


def _fdc_values(cells, config, xy, b_idx, comp, sizes):
    """Per-cell FDC marker intensity and this slide's mesh threshold, or None without the marker.

    The pipeline's CD21 gate is a per-cell positivity call and the FDC mesh is not a cell,
    so the threshold is derived per slide from the background: the CD21 of cells outside
    B-cell cores (``fdc_background_quantile`` plus ``fdc_mad_factor`` robust SDs). Being
    relative, it follows a lab's CD21 level and blur rather than a fitted constant. The
    median, not a high quantile: in another lab's look the tumour cells (a third of the
    background) carry spill-over from the neighbouring PD-L1 and SATB2 dyes into CD21,
    which lifts the 95th percentile by more than the mantle's weaker mesh stands above
    the background, while the median and MAD stay those of the unstained majority.
    """
    values = _marker_column(cells, config.fdc_marker)
    if values is None:
        return None
    in_core = np.zeros(len(xy), bool)
    big = np.flatnonzero(sizes >= config.min_b_cells)
    in_core[b_idx[np.isin(comp, big)]] = True
    if in_core.any():
        # Cells beside a core pick up its mesh through the whole-cell read: keep them out of the background.
        d, _ = cKDTree(xy[in_core]).query(xy, distance_upper_bound=2 * config.link_um)
        in_core |= np.isfinite(d)
    bg = values[~in_core] if (~in_core).sum() >= 10 else values
    med = np.median(bg)
    mad = 1.4826 * np.median(np.abs(bg - med))
    return values, float(np.quantile(bg, config.fdc_background_quantile) + config.fdc_mad_factor * mad)


def _gc_like(cells, config, is_b, is_t) -> np.ndarray:
    """Cells that look germinal-centre: a GC marker when the panel has one, else large pale B nuclei.

    Without a GC marker, a germinal centre's centroblasts have nuclei larger and paler than
    the resting B cells of the mantle and of aggregates, which are most of a slide's B cells;
    both are compared with this slide's B-cell medians, so the ratios carry over between labs
    and scanners. B cells rather than T cells: segmentation and blur change small nuclei
    differently from large ones, and the mantle is the germinal centre's own neighbour (on
    the development slides, default and another lab's look, the germinal centre stood
    1.6-1.8x the B median in area and 0.55-0.6x in DAPI, while its ratios to the T cells
    moved from 1.4-1.6x and 0.6x to 1.36x and 0.7x).
    """
    for name in config.gc_markers:
        values = _marker_column(cells, name)
        if values is not None:
            bg = values[is_t] if is_t.sum() >= 10 else values
            med = np.median(bg)
            return values > med + 3 * 1.4826 * np.median(np.abs(bg - med))
    obs = cells.obs
    if "nucleus_area_um2" not in obs or "dapi_mean" not in obs:
        return np.zeros(len(obs), bool)
    area, dapi = obs["nucleus_area_um2"].to_numpy(np.float64), obs["dapi_mean"].to_numpy(np.float64)
    ref = is_b if is_b.sum() >= 10 else is_t
    return ((area >= config.gc_area_ratio * np.median(area[ref])) &
            (dapi <= config.gc_dapi_ratio * np.median(dapi[ref])) & is_b)


def _stage_features(pts, members, fdc, gc_like, config: TLSConfig) -> tuple[float, float]:
    """FDC fraction of the core's B cells and GC score of the inner core's B cells (fractions 0-1)."""
    if fdc is None:
        return float("nan"), float("nan")
    values, thr = fdc
    fdc_fraction = float((values[members] > thr).mean())
    dist = np.hypot(*(pts - pts.mean(axis=0)).T)
    inner = dist <= config.gc_core_fraction * np.quantile(dist, 0.95)
    gc_score = float(gc_like[members[inner]].mean()) if inner.any() else 0.0
    return fdc_fraction, gc_score


def _maturity(fdc_fraction: float, gc_score: float, staged: bool, config: TLSConfig) -> str:
    if not staged:
        return "unstaged"
    if fdc_fraction < config.primary_min_fdc_fraction:
        return "aggregate"
    return "secondary" if gc_score >= config.secondary_min_gc_score else "primary"


def _t_clusters(xy, t_idx, t_tree, polys, config: TLSConfig) -> list[dict]:
    """T-cell clusters outside every TLS (>= 2 * min_t_cells T cells linked within link_um): no B-cell core."""
    if t_tree is None:
        return []
    pairs = t_tree.query_pairs(config.link_um, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(t_idx),) * 2)
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    out = []
    for k in np.flatnonzero(sizes >= 2 * max(config.min_t_cells, 1)):
        pts = xy[t_idx[comp == k]]
        cx, cy = pts.mean(axis=0)
        if any(p.contains(shapely.Point(cx, cy)) for p in polys):
            continue
        out.append({"x_um": float(cx), "y_um": float(cy), "n_B": 0, "n_T": int(len(pts)),
                    "reason": f"T-cell cluster without a B-cell core ({len(pts)} linked T cells)"})
    return out


def tls_geojson(result: TLSResult, *, pixel_um: float, slide_id: str) -> dict:
    """The TLS as a QuPath-importable FeatureCollection (level-0 pixels), classified by maturity.

    Parameters
    ----------
    result : TLSResult
    pixel_um : float
        Level-0 pixel size (µm).
    slide_id : str
        Recorded in the collection's properties.

    Returns
    -------
    dict, a GeoJSON FeatureCollection; each feature's measurements hold ``area_um2``, ``n_B``,
    ``n_T``, ``fdc_fraction`` and ``gc_score``; its properties ``tls_id`` and ``maturity``.
    """
    features = []
    for row, poly in zip(result.table.to_dict(orient="records"), result.polygons_um):
        meas = {k: row[k] for k in ("area_um2", "b_core_area_um2", "n_B", "n_T", "b_density_per_mm2",
                                    "fdc_fraction", "gc_score") if row.get(k) is not None}
        features.append(feature(poly, pixel_um=pixel_um, name=str(row["maturity"]), color=MATURITY_COLOURS[row["maturity"]],
                                measurements=meas,
                                properties={"tls_id": int(row["tls_id"]), "maturity": str(row["maturity"])}))
    return feature_collection(features, pixel_um=pixel_um, slide_id=slide_id, kind="tls")
