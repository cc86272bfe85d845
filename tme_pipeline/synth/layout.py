"""Slide layout on a coarse grid: tissue, tumour, necrosis, invasive margin, stroma and TLS.

Everything here lives on a coarse grid of ``coarse_um`` (5 µm) pixels, small enough to hold
in memory for any slide (a 6x6 mm slide is 1200x1200 coarse pixels). The level-0 renderer
reads these grids by bilinear interpolation (soft masks) or by nearest coarse pixel (truth
regions).

Region definitions (the truth every downstream metric is compared with)
-----------------------------------------------------------------------
A coarse pixel ``(i, j)`` covers ``[j*coarse_um, (j+1)*coarse_um)`` µm in x and the same in y.

* ``tissue``   : inside the tissue outline (everything that is not glass).
* tumour compartment : tissue where tumour cells grow (SATB2+ osteosarcoma nests).
* ``margin``   : the invasive margin, the band of tissue within ``margin_um`` (100 µm) of the
  border between the tumour compartment and non-tumour tissue, on both sides of it. The
  border against glass is not a margin.
* ``necrosis`` : necrotic core inside large tumour areas, outside the margin.
* ``tumor``    : tumour compartment minus margin minus necrosis.
* ``stroma``   : non-tumour tissue minus margin (TLS lie in stroma or margin).

``tumor``, ``margin``, ``stroma`` and ``necrosis`` partition ``tissue``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .condition import SlideCondition

logger = logging.getLogger(__name__)

REGION_NAMES = ("tissue", "tumor", "margin", "stroma", "necrosis")
MATURITIES = ("aggregate", "primary", "secondary")

#: Radius ranges (µm) of TLS per maturity; diameters span 150-500 µm.
_TLS_RADIUS_UM = {"aggregate": (75.0, 130.0), "primary": (100.0, 190.0), "secondary": (140.0, 250.0)}


@dataclass(frozen=True)
class TLSSpec:
    """One tertiary lymphoid structure: a star-convex blob with zones.

    ``radius_um`` is the mean radius; the outline is ``radius_um * (1 + sum_k amp_k
    cos(k*theta + phase_k))`` for k = 2, 3, 4. Normalised radius rho = d / R(theta) sets the
    zone: secondary GC rho < 0.33, B core (mantle) rho < 0.62, T zone up to 1.
    """

    tls_id: int
    x_um: float
    y_um: float
    radius_um: float
    maturity: str
    amps: tuple[float, float, float]
    phases: tuple[float, float, float]

    def polygon_um(self, n: int = 64) -> np.ndarray:
        """Outline as an (n, 2) float64 array of (x, y) in µm, counter-clockwise."""
        theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        r = self.radius_um * self.radial_factor(np.cos(theta), np.sin(theta))
        return np.stack([self.x_um + r * np.cos(theta), self.y_um + r * np.sin(theta)], axis=1)

    def radial_factor(self, cos_t: np.ndarray, sin_t: np.ndarray) -> np.ndarray:
        """``R(theta) / radius_um`` from cos and sin of the angle (any shape)."""
        c2, s2 = cos_t * cos_t - sin_t * sin_t, 2 * sin_t * cos_t
        c3, s3 = c2 * cos_t - s2 * sin_t, s2 * cos_t + c2 * sin_t
        c4, s4 = c3 * cos_t - s3 * sin_t, s3 * cos_t + c3 * sin_t
        out = 1.0
        for (ck, sk), a, p in zip(((c2, s2), (c3, s3), (c4, s4)), self.amps, self.phases):
            out = out + a * (ck * np.cos(p) - sk * np.sin(p))
        return out

    def rho(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Normalised radius ``d / R(theta)`` of points (any shape); < 1 inside."""
        dx, dy = x_um - self.x_um, y_um - self.y_um
        d = np.hypot(dx, dy)
        safe = np.where(d > 0, d, 1.0)
        return d / (self.radius_um * self.radial_factor(np.where(d > 0, dx / safe, 1.0), dy / safe))


@dataclass
class Layout:
    """Coarse description of one slide.

    Attributes
    ----------
    size_um : (width, height) float, slide size in µm.
    coarse_um : float, edge of a coarse pixel in µm.
    region_code : (Hc, Wc) uint8, 0 glass, then 1 + index in ``REGION_NAMES[1:]``; the
        :attr:`masks` property expands it into boolean masks.
    tumor_comp : (Hc, Wc) bool, tumour compartment (tumour cells grow here).
    soft : (4, ceil(Hc/2), ceil(Wc/2)) float16, smoothed tissue, stroma, necrosis masks and
        an autofluorescence modulation field on a grid of ``2 * coarse_um`` pixels, for the
        renderer's bilinear lookup.
    flow_angle : (Hc, Wc) float16, fibre orientation in radians.
    immune : (Hc, Wc) float16, smooth log-normal modulation of lymphocyte density (mean ~1).
    pdl1 : (Hc, Wc) bool, PD-L1+ patches of the tumour.
        These three serve cell placement only; :meth:`for_rendering` drops them.
    tls : list of TLSSpec.
    clusters : (n, 3) float64, T-cell cluster decoys (x_um, y_um, radius_um).
    b_patches : (n, 3) float64, loose B-cell patches (x_um, y_um, radius_um).
    vessels : (n, 3) float64, vessel lumina with red blood cells (x_um, y_um, radius_um).
    """

    size_um: tuple[float, float]
    coarse_um: float
    region_code: np.ndarray
    tumor_comp: np.ndarray
    soft: np.ndarray
    flow_angle: np.ndarray | None
    immune: np.ndarray | None
    pdl1: np.ndarray | None
    tls: list[TLSSpec] = field(default_factory=list)
    clusters: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    b_patches: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    vessels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Boolean (Hc, Wc) masks keyed by :data:`REGION_NAMES` (regions partition tissue)."""
        out = {"tissue": self.region_code > 0}
        out.update({name: self.region_code == k + 1 for k, name in enumerate(REGION_NAMES[1:])})
        return out

    def for_rendering(self) -> "Layout":
        """A copy without the placement-only grids, so they are not kept through rendering."""
        return dataclasses.replace(self, flow_angle=None, immune=None, pdl1=None)

    def area_mm2(self, mask: np.ndarray) -> float:
        """Area of a coarse boolean mask in mm²."""
        return float(np.count_nonzero(mask)) * (self.coarse_um / 1000.0) ** 2


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian random field, float32, correlation length ``sigma_px``."""
    f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


def _threshold_fraction(score: np.ndarray, within: np.ndarray, fraction: float) -> np.ndarray:
    """Pixels of ``within`` whose ``score`` is among the lowest ``fraction``."""
    vals = score[within]
    if vals.size == 0 or fraction <= 0:
        return np.zeros_like(within)
    thr = np.quantile(vals, min(fraction, 1.0))
    return within & (score <= thr)


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def make_layout(size_mm: tuple[float, float], *, condition: SlideCondition, seed: int,
                coarse_um: float = 5.0, margin_um: float = 100.0) -> Layout:
    """Draw the coarse layout of one slide.

    Parameters
    ----------
    size_mm : (width, height) in mm.
    condition : SlideCondition
    seed : int
    coarse_um : float
        Coarse pixel edge in µm.
    margin_um : float
        Half-width of the invasive margin band in µm.

    Returns
    -------
    Layout
    """
    rng = np.random.default_rng([seed, 101])
    w_um, h_um = size_mm[0] * 1000.0, size_mm[1] * 1000.0
    shape = (int(np.ceil(h_um / coarse_um)), int(np.ceil(w_um / coarse_um)))
    px = 1.0 / coarse_um  # coarse pixels per µm
    # Open grids (broadcast on use) keep the transient memory of large slides small.
    yy = ((np.arange(shape[0], dtype=np.float32) + 0.5) / shape[0] - 0.5)[:, None]
    xx = ((np.arange(shape[1], dtype=np.float32) + 0.5) / shape[1] - 0.5)[None, :]

    tissue = _tissue_mask(rng, yy, xx, condition, px)
    # Lung parenchyma next to the metastasis: a few small air spaces (alveoli) of glass.
    holes = _smooth_field(rng, shape, 12.0 * px) > 2.3
    tissue &= ~ndi.binary_dilation(holes, iterations=2)

    # Tumour compartment: one nodule plus satellite nests, from a field biased to the centre.
    cx, cy = rng.uniform(-0.15, 0.15, size=2)
    central = np.hypot(xx - cx, yy - cy)
    t_score = central * 3.0 - 0.45 * _smooth_field(rng, shape, 160.0 * px) - 0.1 * _smooth_field(rng, shape, 40.0 * px)
    tumor_comp = _threshold_fraction(t_score, tissue, condition.tumor_fraction)
    del t_score, central
    tumor_comp = ndi.binary_closing(ndi.binary_opening(tumor_comp, iterations=3), iterations=3) & tissue
    tumor_comp = _remove_small(tumor_comp, int((60.0 * px) ** 2))
    # Small stroma islands inside the nodule close up; large ones stay as intratumoural stroma.
    tumor_comp |= tissue & ~_remove_small(tissue & ~tumor_comp, int((80.0 * px) ** 2))

    nontumor = tissue & ~tumor_comp
    d_to_non = (ndi.distance_transform_edt(~nontumor) * coarse_um).astype(np.float32)  # for tumour pixels
    d_to_tum = (ndi.distance_transform_edt(~tumor_comp) * coarse_um).astype(np.float32)  # for non-tumour pixels
    has_border = nontumor.any() and tumor_comp.any()
    margin = tissue & has_border & ((tumor_comp & (d_to_non <= margin_um)) | (nontumor & (d_to_tum <= margin_um)))

    # Necrosis in the depth of large tumour areas.
    deep = tumor_comp & ~margin & (d_to_non > 1.4 * margin_um)
    n_score = -d_to_non / 200.0 - 0.6 * _smooth_field(rng, shape, 60.0 * px)
    target = condition.necrosis_fraction * np.count_nonzero(tumor_comp)
    frac_of_deep = min(1.0, target / max(np.count_nonzero(deep), 1))
    necrosis = _threshold_fraction(n_score, deep, frac_of_deep)
    necrosis = _remove_small(ndi.binary_opening(necrosis, iterations=1), int((30.0 * px) ** 2))
    del d_to_non, d_to_tum, n_score, deep

    tumor = tumor_comp & ~margin & ~necrosis
    stroma = nontumor & ~margin
    # One code grid instead of five boolean masks: a fifth of the memory for the whole run.
    region_code = np.zeros(shape, np.uint8)
    for k, m in enumerate((tumor, margin, stroma, necrosis)):
        region_code[m] = k + 1

    # Smooth fields for the renderer and for cell placement (sigmas in coarse pixels).
    # These fields are smooth over >= 5 µm: keep them 2x2-pooled (10 µm) in half precision,
    # 1/8 of the memory, as they stay alive through all of the rendering. One at a time, so
    # that no large temporary is ever freed (it would make the allocator keep later blocks'
    # arrays on a fragmented heap).
    soft = np.stack([_pool2_f16(f) for f in (
        lambda: ndi.gaussian_filter(tissue.astype(np.float32), 1.0),
        lambda: ndi.gaussian_filter(nontumor.astype(np.float32), 2.0),
        lambda: ndi.gaussian_filter(necrosis.astype(np.float32), 2.0),
        lambda: np.exp(0.3 * _smooth_field(rng, shape, 50.0 * px)),
    )])
    flow_angle = _flow_angle(rng, tumor_comp, 80.0 * px).astype(np.float16)
    immune = np.exp(0.45 * _smooth_field(rng, shape, 120.0 * px) - 0.1).astype(np.float16)
    pdl1_score = -_smooth_field(rng, shape, 70.0 * px)
    pdl1 = _threshold_fraction(pdl1_score, tumor_comp, condition.pdl1_fraction)

    layout = Layout(size_um=(w_um, h_um), coarse_um=coarse_um, region_code=region_code, tumor_comp=tumor_comp,
                    soft=soft, flow_angle=flow_angle, immune=immune, pdl1=pdl1)
    layout.tls = _place_tls(layout, condition, rng)
    layout.clusters = _place_discs(layout, rng, per_mm2=3.0, r_um=(25.0, 55.0))
    layout.b_patches = _place_discs(layout, rng, per_mm2=1.5, r_um=(60.0, 120.0))
    layout.vessels = _place_discs(layout, rng, per_mm2=12.0, r_um=(6.0, 18.0))
    logger.debug("layout %s: tissue %.2f mm², %d TLS", size_mm, layout.area_mm2(tissue), len(layout.tls))
    return layout


def _pool2_f16(make) -> np.ndarray:
    """2x2 mean (odd edges replicated) of the float field ``make()`` as float16."""
    f = make()
    f = np.pad(f, ((0, f.shape[0] % 2), (0, f.shape[1] % 2)), mode="edge")
    return f.reshape(f.shape[0] // 2, 2, f.shape[1] // 2, 2).mean(axis=(1, 3)).astype(np.float16)


def _tissue_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, condition: SlideCondition,
                 px: float) -> np.ndarray:
    """Tissue outline: an envelope roughened by smooth fields, thresholded to cover
    ``condition.tissue_fraction`` of the slide. Biopsies (pre) are elongated pieces at a
    random angle; resections (post) fill most of the slide with a rounded-square envelope."""
    shape = (yy.shape[0], xx.shape[1])
    ang = rng.uniform(0, np.pi)
    if condition.timepoint == "pre":
        u = (xx * np.cos(ang) + yy * np.sin(ang)) / 2.2
        v = -xx * np.sin(ang) + yy * np.cos(ang)
        envelope = np.hypot(u, v)
    else:
        envelope = 0.6 * np.maximum(np.abs(xx), np.abs(yy)) + 0.4 * np.hypot(xx, yy)
    score = envelope + 0.12 * _smooth_field(rng, shape, 250.0 * px) + 0.03 * _smooth_field(rng, shape, 40.0 * px)
    tissue = _threshold_fraction(score, np.ones(shape, bool), condition.tissue_fraction)
    return _remove_small(tissue, int((150.0 * px) ** 2))


def _flow_angle(rng: np.random.Generator, tumor_comp: np.ndarray, sigma_px: float) -> np.ndarray:
    """Fibre orientation (radians, float32): along iso-lines of a smooth random field,
    turning to run parallel to tumour borders (a capsule of fibroblasts)."""
    flow = _smooth_field(rng, tumor_comp.shape, sigma_px)
    gy, gx = np.gradient(ndi.gaussian_filter(flow, 2.0))
    del flow
    gn = np.hypot(gx, gy) + np.float32(1e-9)
    ty, tx = np.gradient(ndi.gaussian_filter(tumor_comp.astype(np.float32), 6.0))
    tn = np.hypot(tx, ty)
    wrap = np.clip(tn / (tn.max() + 1e-12) * 4.0, 0, 1)
    tn += np.float32(1e-9)
    vx = (1 - wrap) * (-gy) / gn + wrap * (-ty) / tn
    vy = (1 - wrap) * gx / gn + wrap * tx / tn
    return np.arctan2(vy, vx).astype(np.float32)


def _pick_points(layout: Layout, where: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random points (x_um, y_um) uniformly inside the coarse mask ``where``."""
    idx = np.flatnonzero(where)
    if idx.size == 0 or n == 0:
        return np.zeros((0, 2))
    pick = rng.choice(idx, size=n)
    iy, ix = np.unravel_index(pick, where.shape)
    jitter = rng.random((n, 2))
    return np.stack([(ix + jitter[:, 0]) * layout.coarse_um, (iy + jitter[:, 1]) * layout.coarse_um], axis=1)


def _place_tls(layout: Layout, condition: SlideCondition, rng: np.random.Generator) -> list[TLSSpec]:
    """TLS centres in stroma or margin, not overlapping, mostly inside tissue."""
    masks = layout.masks
    host = masks["stroma"] | masks["margin"]
    n = max(int(rng.poisson(condition.tls_per_mm2 * layout.area_mm2(host))), condition.min_tls)
    # Depth inside tissue limits the size of a TLS that fits there.
    depth = (ndi.distance_transform_edt(masks["tissue"]) * layout.coarse_um).astype(np.float32)
    # TLS sit beside tumour nests, not inside them: most of the disc stays out of the tumour.
    d_tum = (ndi.distance_transform_edt(~layout.tumor_comp) * layout.coarse_um).astype(np.float32)
    out: list[TLSSpec] = []
    p = np.asarray(condition.maturity_p, float)
    for _ in range(n):
        maturity = MATURITIES[int(rng.choice(3, p=p / p.sum()))]
        lo, hi = _TLS_RADIUS_UM[maturity]
        radius = rng.uniform(lo, hi)
        for shrink in (1.0, 0.85, 0.7, 0.55):
            r = radius * shrink
            cand = _pick_points(layout, host & (depth >= 0.9 * r) & (d_tum >= 0.8 * r), rng, 30)
            ok = [c for c in cand if all(np.hypot(c[0] - t.x_um, c[1] - t.y_um) > r + t.radius_um + 40.0 for t in out)]
            if ok:
                amps = tuple(float(a) for a in rng.uniform(0.0, 0.09, 3))
                phases = tuple(float(a) for a in rng.uniform(0, 2 * np.pi, 3))
                if r < _TLS_RADIUS_UM["secondary"][0] * 0.8 and maturity == "secondary":
                    maturity = "primary"  # a germinal centre needs room
                out.append(TLSSpec(len(out) + 1, float(ok[0][0]), float(ok[0][1]), float(r), maturity, amps, phases))
                break
    return out


def _place_discs(layout: Layout, rng: np.random.Generator, *, per_mm2: float,
                 r_um: tuple[float, float]) -> np.ndarray:
    """Random discs (x_um, y_um, radius_um) in stroma and margin, away from TLS."""
    host = layout.masks["stroma"] | layout.masks["margin"]
    n = int(rng.poisson(per_mm2 * layout.area_mm2(host)))
    pts = _pick_points(layout, host, rng, n)
    radii = rng.uniform(r_um[0], r_um[1], len(pts))
    keep = np.ones(len(pts), bool)
    for t in layout.tls:
        keep &= np.hypot(pts[:, 0] - t.x_um, pts[:, 1] - t.y_um) > t.radius_um * 1.15 + radii
    return np.column_stack([pts[keep], radii[keep]]) if len(pts) else np.zeros((0, 3))
