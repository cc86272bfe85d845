"""Cell placement, cell types, nucleus shapes and marker positivity.

Cells are drawn as Poisson counts per coarse pixel from per-type density maps (cells/mm²),
plus dense disc-shaped populations (TLS, T-cell clusters, loose B-cell patches). Nuclei are
then packed by greedy priority (TLS first, then clusters, tumour, the rest): a nucleus is
dropped when it comes closer than ``0.92 * (s_i + s_j)`` to a kept one, ``s`` being its
effective radius plus a per-type spacing. The result equals sequential random adsorption
in priority order, computed in parallel rounds on a KD-tree's conflict pairs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import points_in_poly

from .condition import CD8_EFFECT_BAND_UM, SlideCondition
from .layout import Layout
from .style import SlideStyle

MARKERS = ("DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PDL1", "SATB2")
CELL_TYPES = ("tumor", "fibroblast", "macrophage", "cd8_t", "cd4_t", "treg", "b_cell")
T_TYPES = ("cd8_t", "cd4_t", "treg")
ZONES = ("none", "tls_t", "tls_b", "tls_gc", "cluster", "b_patch")

#: Per-type morphology: nucleus mean radius and sd (µm), aspect range, harmonic amplitude,
#: cytoplasm width mean and sd (µm), extra packing spacing range (µm), DAPI level and log-sd.
_MORPH = {
    "tumor": (6.4, 0.9, (1.0, 1.5), 0.10, (4.5, 0.7), (0.0, 3.0), 2600.0, 0.35),
    "fibroblast": (3.3, 0.35, (2.4, 4.2), 0.03, (1.5, 0.3), (0.0, 0.6), 3400.0, 0.2),
    "macrophage": (4.6, 0.5, (1.0, 1.5), 0.12, (4.0, 0.6), (1.0, 3.0), 2200.0, 0.25),
    "lymph": (3.25, 0.22, (1.0, 1.18), 0.04, (1.0, 0.15), (0.0, 0.25), 4600.0, 0.2),
    "gc": (4.5, 0.35, (1.0, 1.25), 0.05, (1.4, 0.2), (0.0, 0.5), 2300.0, 0.2),
    "pyknotic": (2.6, 0.5, (1.0, 1.4), 0.15, (1.0, 0.3), (0.0, 1.0), 6500.0, 0.3),
}
#: Scene level of a positive cell per marker (counts before gain, blur and noise).
MARKER_LEVEL = {"CD3": 4200.0, "CD8": 3600.0, "CD20": 4200.0, "CD21": 3000.0,
                "FOXP3": 3000.0, "PDL1": 2600.0, "SATB2": 2800.0}
NUCLEAR_MARKERS = ("FOXP3", "SATB2")
MEMBRANE_MARKERS = ("CD3", "CD8", "CD20", "PDL1")

_TLS_ZONE_DENSITY = {  # candidate cells/mm² of (cd4, cd8, treg, b, gc_b) by zone; packing thins them
    "aggregate": {"mix": (18000, 8000, 2200, 24000, 0)},
    "primary": {"core": (1600, 500, 150, 56000, 0), "tzone": (26000, 11000, 4000, 5000, 0)},
    "secondary": {"gc": (1100, 150, 0, 0, 30000), "core": (1100, 300, 100, 60000, 0),
                  "tzone": (26000, 11000, 4000, 5000, 0)},
}


#: Range of the packing size multiplier of follicle (B core and germinal centre) nuclei,
#: drawn per TLS: real follicles pack touching, partly overlapping 6-8 µm nuclei at
#: 13 000-25 000 per mm², closer than lymphocytes elsewhere; 0.64-0.9 gives B cores of
#: about 15 000-25 000 per mm² (tests/test_synth_follicles.py counts them).
FOLLICLE_PACKING = (0.64, 0.9)

_TLS_ZONE_RHO = {"mix": (0.0, 1.15), "gc": (0.0, 0.33), "core": (0.0, 0.62), "tzone": (0.62, 1.15)}


def _poisson_points(rng, density_mm2: np.ndarray, coarse_um: float, *, band: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Points (x_um, y_um) with Poisson counts per coarse pixel at ``density_mm2``.

    Drawn in bands of coarse rows so that no slide-sized temporary is made.
    """
    xs, ys = [], []
    area = (coarse_um / 1000.0) ** 2
    for r0 in range(0, density_mm2.shape[0], band):
        counts = rng.poisson(density_mm2[r0:r0 + band].astype(np.float64) * area)
        idx = np.repeat(np.arange(counts.size, dtype=np.int64), counts.ravel())
        iy, ix = np.divmod(idx, density_mm2.shape[1])
        j = rng.random((idx.size, 2))
        xs.append((ix + j[:, 0]) * coarse_um)
        ys.append((iy + r0 + j[:, 1]) * coarse_um)
    return np.concatenate(xs), np.concatenate(ys)


def _disc_points(rng, x0, y0, r_um, density_mm2):
    """Uniform Poisson points in the bounding square of a disc; caller filters by shape."""
    n = rng.poisson(density_mm2 * (2 * r_um / 1000.0) ** 2)
    p = rng.uniform(-r_um, r_um, (n, 2))
    return x0 + p[:, 0], y0 + p[:, 1]


def effect_pieces(layout: Layout, band_um: float = CD8_EFFECT_BAND_UM) -> np.ndarray:
    """Where a condition's ``cd8_factor`` acts, in three pieces: the tumour compartment deeper
    than ``band_um`` from its border with other tissue (1), the compartment within it (2), the
    other tissue within it (3); 0 elsewhere. Bed = 1 | 2, margin = 2 | 3, as the metrics
    define them (``regions.margin_um`` on both sides of the bed's border).

    Parameters
    ----------
    layout : Layout
    band_um : float, half-width of the margin band, µm.

    Returns
    -------
    (Hc, Wc) uint8 on the layout's coarse grid.
    """
    tissue = layout.masks["tissue"]
    bed = layout.tumor_comp & tissue
    other = tissue & ~bed
    out = np.zeros(tissue.shape, np.uint8)
    if not bed.any():
        return out
    out[bed] = 1
    if other.any():
        d_in = ndi.distance_transform_edt(~other) * layout.coarse_um
        d_out = ndi.distance_transform_edt(~bed) * layout.coarse_um
        out[bed & (d_in <= band_um)] = 2
        out[other & (d_out <= band_um)] = 3
    return out


def _planted_gain(layout: Layout, cond: SlideCondition, seed: int, look: SlideStyle) -> np.ndarray:
    """Multiplier map (Hc, Wc) float32 on the diffuse CD8 T-cell density that plants ``cd8_factor``.

    The measured CD8 density of each piece of :func:`effect_pieces` must be ``cd8_factor``
    times the unplanted one. T-cell clusters and TLS are left as they are (they are packed
    full: more CD8 T cells there would only push other cells out), so the diffuse CD8 T cells
    carry the whole effect: in a piece with ``n_diffuse`` diffuse and ``n_dense`` cluster or
    TLS CD8 T cells on the unplanted slide (drawn with a stream of its own), the diffuse
    density is multiplied by ``f + (f - 1) * n_dense / n_diffuse``.
    """
    f = float(cond.cd8_factor)
    pieces = effect_pieces(layout)
    gain = np.ones(pieces.shape, np.float32)
    c, kept = _packed(layout, dataclasses.replace(cond, cd8_factor=1.0), np.random.default_rng([seed, 203]), look, None)
    g, (hc, wc) = layout.coarse_um, pieces.shape
    x, y = c["x"][kept], c["y"][kept]
    piece = pieces[np.clip((y // g).astype(np.int64), 0, hc - 1), np.clip((x // g).astype(np.int64), 0, wc - 1)]
    cd8 = c["type"][kept] == CELL_TYPES.index("cd8_t")
    dense = c["zone"][kept] != ZONES.index("none")
    for k in (1, 2, 3):
        n_diffuse = np.count_nonzero(cd8 & ~dense & (piece == k))
        n_dense = np.count_nonzero(cd8 & dense & (piece == k))
        gain[pieces == k] = max(f + (f - 1.0) * n_dense / n_diffuse, 0.0) if n_diffuse else f
    return gain


def _candidates(layout: Layout, cond: SlideCondition, rng, cd8_gain: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All candidate cells before packing: x_um, y_um, type, zone, rank, state.

    ``cd8_gain`` multiplies the diffuse CD8 T-cell density map (None: 1)."""
    m = layout.masks
    tc = layout.tumor_comp & ~m["necrosis"]
    st = m["tissue"] & ~layout.tumor_comp
    mg, nec = m["margin"].astype(np.float32), m["necrosis"].astype(np.float32)
    tc, st = tc.astype(np.float32), st.astype(np.float32)
    imm = layout.immune.astype(np.float32) * np.float32(cond.immune_scale)

    def cd8_map():
        base = imm * (120 * st + 220 * mg + 45 * tc)
        return base if cd8_gain is None else base * cd8_gain

    # Density maps (cells/mm²) per type, made one at a time to keep the peak memory small.
    dens = {
        "tumor": lambda: 5200 * tc,
        "fibroblast": lambda: 4000 * (1 + 0.5 * cond.fibrosis) * st + 120 * tc + 150 * cond.fibrosis * nec,
        "macrophage": lambda: 260 * st + 100 * tc + 120 * mg + 350 * nec,
        "cd8_t": cd8_map,
        "cd4_t": lambda: imm * (200 * st + 250 * mg + 35 * tc),
        "treg": lambda: imm * (35 * st + 50 * mg + 10 * tc),
        "b_cell": lambda: imm * (30 * st + 30 * mg + 3 * tc),
    }
    xs, ys, types, zones, ranks, states, packs = [], [], [], [], [], [], []

    def add(x, y, t, zone, rank, state=0, pack=1.0):
        xs.append(np.asarray(x, float)); ys.append(np.asarray(y, float))
        n = len(xs[-1])
        packs.append(np.full(n, pack))
        types.append(np.full(n, t, np.int8) if np.isscalar(t) else np.asarray(t, np.int8))
        zones.append(np.full(n, zone, np.int8)); ranks.append(np.full(n, rank, np.int8))
        states.append(np.full(n, state, np.int8) if np.isscalar(state) else np.asarray(state, np.int8))

    for t, make_density in dens.items():
        x, y = _poisson_points(rng, make_density(), layout.coarse_um)
        add(x, y, CELL_TYPES.index(t), 0, 2 if t == "tumor" else 3)
    # Pyknotic remnants in necrosis.
    x, y = _poisson_points(rng, 200 * nec, layout.coarse_um)
    add(x, y, CELL_TYPES.index("tumor"), 0, 2, state=2)

    # TLS zones by normalised radius rho; the outer T zone fades over rho 0.85-1.15.
    t_idx = [CELL_TYPES.index(t) for t in ("cd4_t", "cd8_t", "treg", "b_cell", "b_cell")]
    for tls in layout.tls:
        tight = rng.uniform(*FOLLICLE_PACKING)
        for zone_name, comp in _TLS_ZONE_DENSITY[tls.maturity].items():
            lo, hi = _TLS_ZONE_RHO[zone_name]
            if zone_name == "core" and tls.maturity == "secondary":
                lo = _TLS_ZONE_RHO["gc"][1]
            for k, dk in enumerate(comp):
                if dk == 0:
                    continue
                x, y = _disc_points(rng, tls.x_um, tls.y_um, tls.radius_um * 1.3, dk)
                rho = tls.rho(x, y)
                keep = (rho >= lo) & (rho < hi)
                if hi > 1.0:
                    keep &= rng.random(rho.size) < np.clip((1.15 - rho) / 0.3, 0, 1)
                zone = ZONES.index("tls_gc" if zone_name == "gc" else "tls_b" if k >= 3 else "tls_t")
                follicle = zone != ZONES.index("tls_t")
                add(x[keep], y[keep], t_idx[k], zone, 0, state=1 if k == 4 else 0, pack=tight if follicle else 1.0)
    for cx, cy, r in layout.clusters:
        for t, dk in (("cd4_t", 5500), ("cd8_t", 4200), ("treg", 500)):
            x, y = _disc_points(rng, cx, cy, r, dk)
            keep = rng.random(x.size) < np.exp(-((np.hypot(x - cx, y - cy) / r) ** 2) * 1.5)
            add(x[keep], y[keep], CELL_TYPES.index(t), ZONES.index("cluster"), 1)
    for cx, cy, r in layout.b_patches:
        x, y = _disc_points(rng, cx, cy, r, 320)
        keep = np.hypot(x - cx, y - cy) < r
        add(x[keep], y[keep], CELL_TYPES.index("b_cell"), ZONES.index("b_patch"), 1)
    return {k: np.concatenate(v) for k, v in
            zip(("x", "y", "type", "zone", "rank", "state", "pack"), (xs, ys, types, zones, ranks, states, packs))}


def pack_greedy(x: np.ndarray, y: np.ndarray, size: np.ndarray, priority: np.ndarray, *,
                factor: float = 0.92) -> np.ndarray:
    """Keep points so that no two kept are closer than ``factor * (size_i + size_j)``.

    Greedy in priority order (lowest ``priority`` first), computed in parallel rounds.

    Parameters
    ----------
    x, y, size, priority : (n,) float arrays (µm for the first three).
    factor : float

    Returns
    -------
    keep : (n,) bool
    """
    n = x.size
    if n == 0:
        return np.zeros(0, bool)
    i, j = _conflicts(x, y, size, factor=factor)
    swap = priority[i] > priority[j]
    i, j = np.where(swap, j, i), np.where(swap, i, j)  # i has the higher priority
    state = np.zeros(n, np.int8)  # 0 undecided, 1 kept, -1 dropped
    while True:
        undecided = state == 0
        if not undecided.any():
            break
        active = undecided[i] & undecided[j]
        blocked = np.zeros(n, bool)
        blocked[j[active]] = True
        state[undecided & ~blocked] = 1
        drop = (state[i] == 1) & (state[j] == 0)
        state[j[drop]] = -1
    return state == 1


def _conflicts(x: np.ndarray, y: np.ndarray, size: np.ndarray, *, factor: float,
               strip_um: float = 400.0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) closer than ``factor * (size_i + size_j)``.

    Searched in horizontal strips so that the KD-tree's candidate pairs (far more than
    the conflicts) never exist for the whole slide at once; a pair belongs to the strip
    holding its larger y.
    """
    r = 2 * float(size.max()) * factor
    order = np.argsort(y, kind="stable")
    ys = y[order]
    out_i, out_j = [], []
    for y0 in np.arange(ys[0], ys[-1] + strip_um, strip_um):
        lo, mid, hi = np.searchsorted(ys, [y0 - r, y0, y0 + strip_um])  # mid: first y >= y0
        if hi == mid:
            continue
        idx = order[lo:hi]
        pairs = cKDTree(np.column_stack([x[idx], y[idx]])).query_pairs(r=r, output_type="ndarray")
        if pairs.size == 0:
            continue
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        hit = (np.maximum(y[i], y[j]) >= y0) & (np.hypot(x[i] - x[j], y[i] - y[j]) < factor * (size[i] + size[j]))
        out_i.append(i[hit]); out_j.append(j[hit])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def _packed(layout: Layout, condition: SlideCondition, rng, look: SlideStyle,
            cd8_gain: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Candidates inside tissue with their morphology draws, and the kept ones' indices in (y, x) order."""
    masks = layout.masks
    c = _candidates(layout, condition, rng, cd8_gain)
    # Only cells inside tissue exist (TLS discs may poke out of the outline).
    ci = np.clip((c["x"] // layout.coarse_um).astype(np.int64), 0, masks["tissue"].shape[1] - 1)
    cj = np.clip((c["y"] // layout.coarse_um).astype(np.int64), 0, masks["tissue"].shape[0] - 1)
    inside = masks["tissue"][cj, ci] & (c["x"] >= 0) & (c["y"] >= 0) \
        & (c["x"] < layout.size_um[0]) & (c["y"] < layout.size_um[1])
    c = {k: v[inside] for k, v in c.items()}
    n0 = c["x"].size

    # Morphology class per candidate (small int codes into _MORPH), then its parameters.
    names = list(_MORPH)
    by_type = np.array([names.index(k) for k in ("tumor", "fibroblast", "macrophage", "lymph", "lymph",
                                                  "lymph", "lymph")], np.int8)
    kind = np.where(c["state"] == 1, names.index("gc"),
                    np.where(c["state"] == 2, names.index("pyknotic"), by_type[c["type"]])).astype(np.int8)
    table = np.array([(rm, rs, ql, qh, ha, cm, cs, sl, sh, dl, ds)
                      for rm, rs, (ql, qh), ha, (cm, cs), (sl, sh), dl, ds in _MORPH.values()])
    r_mean, r_sd, q_lo, q_hi, hamp, cy_m, cy_sd, sp_lo, sp_hi, dapi, dapi_sd = table[kind].T
    radius = np.clip(rng.normal(r_mean, r_sd), 0.6 * r_mean, 1.45 * r_mean)
    aspect = rng.uniform(q_lo, q_hi)
    spindle = (kind == names.index("tumor")) & (rng.random(n0) < 0.2)
    aspect[spindle] = rng.uniform(1.8, 2.6, spindle.sum())
    a = radius * np.sqrt(aspect)
    b = radius / np.sqrt(aspect)
    size = (np.sqrt(a * b) + rng.uniform(sp_lo, sp_hi)) * c["pack"]
    priority = c["rank"] + rng.random(n0)
    keep = pack_greedy(c["x"], c["y"], size, priority, factor=look.pack_factor)

    sel = np.flatnonzero(keep)
    order = sel[np.lexsort((c["x"][sel], c["y"][sel]))]
    c.update(kind=kind, a=a, b=b, hamp=hamp, spindle=spindle, dapi=dapi, dapi_sd=dapi_sd, cy_m=cy_m, cy_sd=cy_sd)
    return c, order


def make_cells(layout: Layout, condition: SlideCondition, *, seed: int, look: SlideStyle | None = None) -> pd.DataFrame:
    """Draw the cell table of one slide.

    Parameters
    ----------
    layout : Layout
    condition : SlideCondition
    seed : int
    look : SlideStyle, default ``SlideStyle()``; its nucleus irregularity and packing apply.

    Notes
    -----
    A ``condition.cd8_factor`` other than 1 (the planted effect) first draws the same slide
    unplanted, from a random stream of its own, to count its CD8 T cells in each piece of
    :func:`effect_pieces`, then multiplies the diffuse CD8 density there so that the count,
    clusters and TLS included, is ``cd8_factor`` times that (:func:`_planted_gain`). A slide
    with factor 1 takes nothing from that stream: it is the same as before the effect existed.

    Returns
    -------
    cells : DataFrame, one row per cell sorted by (y, x), ``cell_id`` 1..n. Columns: x_um,
        y_um (nucleus centre; column index of the pixel centre times pixel size), cell_type,
        region, tls_id, zone, state, nucleus shape (nuc_a_um, nuc_b_um semi-axes, nuc_angle
        radians, h2..h4 amp/phase harmonics), cyto_um, and per marker ``<m>_int`` (float32
        scene level) and ``<m>_pos`` (bool).
    """
    look = look or SlideStyle()
    rng = np.random.default_rng([seed, 202])
    masks = layout.masks
    gain = _planted_gain(layout, condition, seed, look) if condition.cd8_factor != 1.0 else None
    k, order = _packed(layout, condition, rng, look, gain)
    n = order.size
    x, y = k["x"][order], k["y"][order]
    types, zones, states, kind = k["type"][order], k["zone"][order], k["state"][order], k["kind"][order]
    a, b, hamp_o = k["a"][order], k["b"][order], k["hamp"][order]
    spindle = k["spindle"][order]
    dapi, dapi_sd, cy_m, cy_sd = k["dapi"], k["dapi_sd"], k["cy_m"], k["cy_sd"]
    names = list(_MORPH)
    ci = np.clip((x // layout.coarse_um).astype(np.int64), 0, masks["tissue"].shape[1] - 1)
    cj = np.clip((y // layout.coarse_um).astype(np.int64), 0, masks["tissue"].shape[0] - 1)
    flow = layout.flow_angle[cj, ci].astype(float)
    oriented = (kind == names.index("fibroblast")) | spindle
    angle = np.where(oriented, flow + rng.normal(0, 0.2, n), rng.uniform(0, np.pi, n))
    amps = rng.uniform(0, 1, (n, 3)) * hamp_o[:, None] * np.array([1.0, 0.6, 0.4]) * look.shape_scale
    phases = rng.uniform(0, 2 * np.pi, (n, 3))
    cyto = np.clip(rng.normal(cy_m[order], cy_sd[order]), 0.5, None)

    region = np.full(n, "stroma", dtype=object)
    for name in ("tumor", "necrosis", "margin"):
        region[masks[name][cj, ci]] = name
    tls_id = np.zeros(n, np.int32)
    for t in layout.tls:
        near = np.flatnonzero(np.hypot(x - t.x_um, y - t.y_um) < t.radius_um * 1.5)
        inside = points_in_poly(np.column_stack([x[near], y[near]]), t.polygon_um())
        tls_id[near[inside]] = t.tls_id

    df = pd.DataFrame({
        "cell_id": np.arange(1, n + 1, dtype=np.uint32),
        "x_um": x, "y_um": y,
        "cell_type": pd.Categorical.from_codes(types, CELL_TYPES),
        "region": pd.Categorical(region, categories=("tumor", "margin", "stroma", "necrosis")),
        "tls_id": tls_id,
        "zone": pd.Categorical.from_codes(zones, ZONES),
        "state": pd.Categorical.from_codes(states, ("normal", "gc", "pyknotic")),
        "nuc_a_um": a, "nuc_b_um": b, "nuc_angle": angle,
        "h2_amp": amps[:, 0], "h2_phase": phases[:, 0], "h3_amp": amps[:, 1], "h3_phase": phases[:, 1],
        "h4_amp": amps[:, 2], "h4_phase": phases[:, 2],
        "cyto_um": cyto,
    })
    _assign_markers(df, layout, rng, dapi[order], dapi_sd[order], cj, ci)
    return _round_trip_safe(df)


def _assign_markers(df: pd.DataFrame, layout: Layout, rng, dapi_level, dapi_sd, cj, ci) -> None:
    """Positivity and log-normal intensities; 12% of positives are dim (0.15-0.35x)."""
    n = len(df)
    t = df["cell_type"].to_numpy().astype(str)
    pos = {m: np.zeros(n, bool) for m in MARKERS}
    pos["DAPI"][:] = True
    pos["CD3"][np.isin(t, T_TYPES)] = True
    pos["CD8"][t == "cd8_t"] = True
    pos["FOXP3"][t == "treg"] = True
    pos["CD20"][t == "b_cell"] = True
    tumor = t == "tumor"
    viable = df["state"].to_numpy() != "pyknotic"
    pos["SATB2"][tumor & (rng.random(n) < 0.92)] = True
    in_patch = layout.pdl1[cj, ci]
    pos["PDL1"][tumor & viable & (rng.random(n) < np.where(in_patch, 0.85, 0.03))] = True
    pos["PDL1"][(t == "macrophage") & (rng.random(n) < 0.3)] = True
    df["DAPI_int"] = (dapi_level * rng.lognormal(0, 1, n) ** dapi_sd).astype(np.float32)
    for m in MARKERS[1:]:
        level = MARKER_LEVEL[m] * rng.lognormal(0.0, 0.35, n)
        dim = rng.random(n) < 0.12
        level = np.where(dim, level * rng.uniform(0.15, 0.35, n), level)
        neg = MARKER_LEVEL[m] * 0.012 * rng.lognormal(0.0, 0.5, n)
        df[f"{m}_int"] = np.where(pos[m], level, neg).astype(np.float32)
    for m in MARKERS:
        df[f"{m}_pos"] = pos[m]


_GEOM_COLUMNS = ("x_um", "y_um", "nuc_a_um", "nuc_b_um", "nuc_angle", "h2_amp", "h2_phase",
                 "h3_amp", "h3_phase", "h4_amp", "h4_phase", "cyto_um")


def _round_trip_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Round geometry to 1e-4 µm/rad via text so the CSV reloads bit-identically."""
    for col in _GEOM_COLUMNS:
        df[col] = np.char.mod("%.4f", df[col].to_numpy()).astype(np.float64)
    for col in df.columns:
        if col.endswith("_int"):
            df[col] = np.char.mod("%.1f", df[col].to_numpy()).astype(np.float64).astype(np.float32)
    return df


def make_artefacts(layout: Layout, *, seed: int, debris_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Non-cell objects: red blood cells (in vessels and necrosis) and necrotic debris.

    ``debris_scale`` multiplies the density of necrotic debris (6000 per mm² of necrosis).

    Returns
    -------
    dict of (n,) arrays: x_um, y_um, r_um (float64), kind (int8: 0 red blood cell,
    1 debris), amp (float32: autofluorescence level, or DAPI level for debris).
    """
    rng = np.random.default_rng([seed, 404])
    xs, ys, rs, ks, amps = [], [], [], [], []
    for cx, cy, r in layout.vessels:
        x, y = _disc_points(rng, cx, cy, r, 14000)
        keep = np.hypot(x - cx, y - cy) < r
        xs.append(x[keep]); ys.append(y[keep]); ks.append(np.zeros(keep.sum(), np.int8))
    nec = layout.masks["necrosis"].astype(np.float32)
    x, y = _poisson_points(rng, 500 * nec, layout.coarse_um)
    xs.append(x); ys.append(y); ks.append(np.zeros(x.size, np.int8))
    n_rbc = sum(k.size for k in ks)
    rs.append(rng.normal(3.6, 0.3, n_rbc)); amps.append(rng.lognormal(np.log(900), 0.3, n_rbc))
    x, y = _poisson_points(rng, (6000 * debris_scale) * nec, layout.coarse_um)
    xs.append(x); ys.append(y); ks.append(np.ones(x.size, np.int8))
    rs.append(rng.uniform(0.4, 1.3, x.size)); amps.append(rng.lognormal(np.log(5000), 0.4, x.size))
    out = {"x_um": np.concatenate(xs), "y_um": np.concatenate(ys), "r_um": np.concatenate(rs),
           "kind": np.concatenate(ks), "amp": np.concatenate(amps).astype(np.float32)}
    order = np.argsort(out["y_um"], kind="stable")
    return {k: v[order] for k, v in out.items()}
