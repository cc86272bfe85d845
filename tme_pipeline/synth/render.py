"""Render level-0 blocks of the slide: cells, markers, autofluorescence, acquisition.

A block is rendered on its window plus a halo of :attr:`SlideScene.halo_px` pixels (larger
than every smoothing radius plus the PSF radius), then cropped. Every random texture comes
from fixed 256-px noise tiles of the whole slide and every cell from the global cell table,
so a pixel's value does not depend on the block size or on the order of blocks.

Signal model per channel ``c`` (counts, uint16 after rounding)::

    observed = blur_psf( spill @ (gain_c * stain_c + af_strength_c * autofluorescence) )
               + offset_c + noise,   noise ~ N(0, k * signal + read_sd^2)

the noise being the Gaussian approximation of shot noise (counts are >> 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .cells import MARKERS, MEMBRANE_MARKERS, NUCLEAR_MARKERS
from .layout import Layout
from .raster import CellGeometry, rasterize, splat_discs
from .style import SlideStyle

NOISE_TILE = 256
#: Spectral order of the fluorophores (DAPI, Opal 480, 520, 570, 620, 650, 690, 780):
#: spillover goes to the spectral neighbours.
SPECTRAL_ORDER = ("DAPI", "CD8", "CD3", "FOXP3", "CD20", "PDL1", "CD21", "SATB2")
_AF_STRENGTH = {"DAPI": 0.7, "CD8": 1.0, "CD3": 1.2, "FOXP3": 0.9, "CD20": 0.6, "PDL1": 0.5,
                "CD21": 0.4, "SATB2": 0.3}


@dataclass(frozen=True)
class Acquisition:
    """Per-slide acquisition parameters (recorded in truth.json).

    gain : (C,) float, stain gain per channel (log-normal around 1).
    offset : (C,) float, dark level per channel in counts.
    spill : (C, C) float, observed = spill @ true (diagonal 1).
    af_strength : (C,) float, autofluorescence strength per channel.
    psf_sigma_um : float, Gaussian PSF sigma in µm.
    shot_k : float, noise variance per count of signal.
    read_sd : float, read noise sd in counts.
    """

    gain: np.ndarray
    offset: np.ndarray
    spill: np.ndarray
    af_strength: np.ndarray
    psf_sigma_um: float
    shot_k: float = 1.5
    read_sd: float = 8.0

    @classmethod
    def draw(cls, *, seed: int, look: SlideStyle | None = None, overrides: dict | None = None) -> "Acquisition":
        """The default style's draw for ``seed``, then a style's ``overrides`` (see
        :func:`tme_pipeline.synth.style.draw_style`) and autofluorescence scale."""
        rng = np.random.default_rng([seed, 505])
        c = len(MARKERS)
        spill = np.eye(c)
        order = [MARKERS.index(m) for m in SPECTRAL_ORDER]
        for a, b in zip(order[:-1], order[1:]):
            spill[b, a] = round(float(rng.uniform(0.03, 0.06)), 4)  # into the redder neighbour
            spill[a, b] = round(float(rng.uniform(0.01, 0.025)), 4)
        acq = cls(gain=np.round(rng.lognormal(0.0, 0.15, c), 4),
                  offset=np.round(rng.uniform(150, 400, c)),
                  spill=spill,
                  af_strength=np.array([_AF_STRENGTH[m] for m in MARKERS]),
                  psf_sigma_um=round(float(rng.uniform(0.6, 0.8)), 3))
        if not overrides:
            return acq
        spill = np.eye(c)
        for k, (a, b) in enumerate(zip(order[:-1], order[1:])):
            spill[b, a], spill[a, b] = overrides["spill_red"][k], overrides["spill_blue"][k]
        return cls(gain=overrides["gain"], offset=overrides["offset"], spill=spill,
                   af_strength=np.round(acq.af_strength * np.asarray(look.af_scale), 4),
                   psf_sigma_um=overrides["psf_sigma_um"], shot_k=overrides["shot_k"],
                   read_sd=overrides["read_sd"])

    def to_dict(self) -> dict:
        return {"channels": list(MARKERS), "stain_gain": self.gain.tolist(), "offset": self.offset.tolist(),
                "spillover": self.spill.tolist(), "af_strength": self.af_strength.tolist(),
                "psf_sigma_um": self.psf_sigma_um, "shot_k": self.shot_k, "read_sd": self.read_sd}


@dataclass(frozen=True)
class SlideScene:
    """Everything needed to render any window of one slide."""

    layout: Layout
    geom: CellGeometry
    levels: np.ndarray       # (C, n+1) float32 scene level of positive cells, row = cell id
    diffuse: np.ndarray      # (C, n+1) float32 diffuse level of negative cells
    cell_af: np.ndarray      # (n+1,) float32 cytoplasmic autofluorescence per cell
    artefacts: dict
    acq: Acquisition
    pixel_um: float
    shape_px: tuple[int, int]
    seed: int
    fibrosis: float
    look: SlideStyle = SlideStyle()

    @property
    def halo_px(self) -> int:
        return int(np.ceil((16.5 + 4 * self.acq.psf_sigma_um) / self.pixel_um)) + 2  # > 4 sigma of every smoothing


def make_scene(layout: Layout, cells: pd.DataFrame, artefacts: dict, acq: Acquisition, *,
               pixel_um: float, shape_px: tuple[int, int], seed: int, fibrosis: float,
               look: SlideStyle | None = None) -> SlideScene:
    """Bundle the slide description for block rendering."""
    n = len(cells)
    if n and not np.array_equal(cells["cell_id"].to_numpy(), np.arange(1, n + 1)):
        raise ValueError("cell ids must be 1..n in table order")
    # Positive cells carry their marker where it lives (membrane ring or nucleus); the low
    # non-specific signal of negative cells is diffuse over the whole cell instead.
    levels = np.zeros((len(MARKERS), n + 1), np.float32)
    diffuse = np.zeros((len(MARKERS), n + 1), np.float32)
    for k, m in enumerate(MARKERS):
        val, pos = cells[f"{m}_int"].to_numpy(np.float32), cells[f"{m}_pos"].to_numpy(bool)
        levels[k, 1:] = np.where(pos, val, 0)
        diffuse[k, 1:] = np.where(pos, 0, val)
    af_by_type = {"macrophage": 260.0, "tumor": 70.0, "fibroblast": 50.0}
    cell_af = np.zeros(n + 1, np.float32)
    cell_af[1:] = cells["cell_type"].astype(str).map(lambda t: af_by_type.get(t, 30.0)).to_numpy(np.float32)
    return SlideScene(layout, CellGeometry.from_table(cells, pixel_um), levels, diffuse, cell_af, artefacts, acq,
                      pixel_um, shape_px, seed, fibrosis, look or SlideStyle())


def tile_noise(window: tuple[int, int, int, int], *, seed: int, stream: int, channels: int = 0) -> np.ndarray:
    """Standard normal float32 noise for a level-0 window, from fixed global 256-px tiles.

    Returns (h, w), or (channels, h, w) when ``channels > 0``.
    """
    y0, y1, x0, x1 = window
    c = max(channels, 1)
    out = np.empty((c, y1 - y0, x1 - x0), np.float32)
    t = NOISE_TILE
    for ty in range(y0 // t, (y1 - 1) // t + 1):
        for tx in range(x0 // t, (x1 - 1) // t + 1):
            # Tile indices are offset so that halo tiles left of or above the slide are valid seeds.
            rng = np.random.default_rng([seed, stream, ty + 4096, tx + 4096])
            z = rng.standard_normal((c, t, t), dtype=np.float32)
            ya, yb = max(y0, ty * t), min(y1, (ty + 1) * t)
            xa, xb = max(x0, tx * t), min(x1, (tx + 1) * t)
            out[:, ya - y0:yb - y0, xa - x0:xb - x0] = z[:, ya - ty * t:yb - ty * t, xa - tx * t:xb - tx * t]
    return out if channels else out[0]


def _smooth_noise(window, *, seed: int, stream: int, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered tile noise scaled to unit variance by the kernel's own norm."""
    z = ndi.gaussian_filter(tile_noise(window, seed=seed, stream=stream), sigma_px, mode="reflect")
    r = int(4.0 * sigma_px + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    return z / np.float32(np.sum(k * k))


def _coarse_lookup(layout: Layout, window, pixel_um: float) -> np.ndarray:
    """Bilinear lookup of ``layout.soft`` at the window's pixel centres: (4, h, w) float32."""
    y0, y1, x0, x1 = window
    s = pixel_um / (2.0 * layout.coarse_um)  # soft fields live on a 2x coarser grid
    # Sample on a global 4-px lattice and upsample: the fields are smooth at 5 µm anyway,
    # and the lattice does not depend on the window.
    step = 4
    ly0, lx0 = y0 // step, x0 // step
    ly1, lx1 = -(-y1 // step) + 1, -(-x1 // step) + 1
    gy = np.arange(ly0, ly1) * step * s - 0.5
    gx = np.arange(lx0, lx1) * step * s - 0.5
    # Only the coarse pixels around the window are cast to float32; subtracting the integer
    # crop origin is exact, so values equal a lookup on the whole field.
    hc, wc = layout.soft.shape[1:]
    cy0 = int(np.clip(np.floor(gy[0]) - 1, 0, hc - 1)); cy1 = int(np.clip(np.ceil(gy[-1]) + 2, cy0 + 1, hc))
    cx0 = int(np.clip(np.floor(gx[0]) - 1, 0, wc - 1)); cx1 = int(np.clip(np.ceil(gx[-1]) + 2, cx0 + 1, wc))
    sub = layout.soft[:, cy0:cy1, cx0:cx1].astype(np.float32)
    cy, cx = np.meshgrid(gy - cy0, gx - cx0, indexing="ij")
    lat = np.stack([ndi.map_coordinates(f, [cy, cx], order=1, mode="nearest") for f in sub])
    fy = (np.arange(y0, y1) / step - ly0).astype(np.float32)
    fx = (np.arange(x0, x1) / step - lx0).astype(np.float32)
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    wy, wx = (fy - iy)[:, None], (fx - ix)[None, :]
    rows = lat[:, iy] * (1 - wy) + lat[:, iy + 1] * wy  # separable: along y, then x
    return (rows[:, :, ix] * (1 - wx) + rows[:, :, ix + 1] * wx).astype(np.float32)


def _fdc_mesh(scene: SlideScene, window) -> np.ndarray:
    """CD21 follicular dendritic cell network: a fine reticular mesh in follicle cores."""
    y0, y1, x0, x1 = window
    out = np.zeros((y1 - y0, x1 - x0), np.float32)
    pu = scene.pixel_um
    mesh = None
    for t in scene.layout.tls:
        if t.maturity == "aggregate":
            continue
        r = t.radius_um * 1.4 / pu
        cx, cy = t.x_um / pu, t.y_um / pu
        ya, yb = max(y0, int(cy - r)), min(y1, int(cy + r) + 1)
        xa, xb = max(x0, int(cx - r)), min(x1, int(cx + r) + 1)
        if ya >= yb or xa >= xb:
            continue
        if mesh is None:
            # Zero crossings of a smooth random field form a connected reticular network.
            f = _smooth_noise(window, seed=scene.seed, stream=11, sigma_px=1.2 / pu)
            mesh = np.exp(-(f / np.float32(0.22)) ** 2)
        xs = np.arange(xa, xb, dtype=np.float64)[None, :] * pu
        for ra in range(ya, yb, 128):  # row bands bound the temporaries of big follicles
            rb = min(ra + 128, yb)
            rho = t.rho(xs, np.arange(ra, rb, dtype=np.float64)[:, None] * pu)
            if t.maturity == "primary":
                w = np.clip((0.64 - rho) / 0.15, 0, 1)
            else:
                w = np.maximum(np.clip((0.42 - rho) / 0.1, 0, 1), 0.45 * np.clip((0.64 - rho) / 0.12, 0, 1))
            out[ra - y0:rb - y0, xa - x0:xb - x0] += (w * 3200.0).astype(np.float32) * mesh[ra - y0:rb - y0, xa - x0:xb - x0]
    return out


def render_block(scene: SlideScene, window: tuple[int, int, int, int]) -> np.ndarray:
    """Render one level-0 window of the slide.

    Parameters
    ----------
    scene : SlideScene
    window : (y0, y1, x0, x1) int, level-0 pixels inside the slide.

    Returns
    -------
    (C, h, w) uint16 counts, channels in :data:`MARKERS` order.
    """
    y0, y1, x0, x1 = window
    hal = scene.halo_px
    ext = (y0 - hal, y1 + hal, x0 - hal, x1 + hal)
    acq = scene.acq
    owner, v, cover = rasterize(scene.geom, ext, weights=scene.levels[MARKERS.index("DAPI")])
    chrom = _smooth_noise(ext, seed=scene.seed, stream=1, sigma_px=scene.look.chromatin_um / scene.pixel_um)
    stain = _stains(scene, ext, owner, v, chrom, cover)
    stain *= acq.gain.astype(np.float32)[:, None, None]
    af = _autofluorescence(scene, ext, owner, v, chrom)
    for k in range(len(MARKERS)):
        stain[k] += np.float32(acq.af_strength[k]) * af
    if scene.look.rbc_green_yellow > 0:
        # Haem autofluorescence peaks in the green-yellow: red cells glare in Opal 520 and 570.
        rbc = _red_cells(scene, ext)
        for m in ("CD3", "FOXP3"):
            k = MARKERS.index(m)
            stain[k] += np.float32(acq.af_strength[k] * scene.look.rbc_green_yellow) * rbc
    mixed = np.tensordot(acq.spill.astype(np.float32), stain, axes=1)
    del stain, af
    sig = np.float32(acq.psf_sigma_um / scene.pixel_um)
    out = np.empty((len(MARKERS), y1 - y0, x1 - x0), np.float32)
    for k in range(len(MARKERS)):
        out[k] = ndi.gaussian_filter(mixed[k], sig, mode="reflect")[hal:-hal, hal:-hal]
    z = tile_noise(window, seed=scene.seed, stream=3, channels=len(MARKERS))
    noise_sd = np.sqrt(np.float32(acq.shot_k) * np.maximum(out, 0) + np.float32(acq.read_sd ** 2))
    out += acq.offset.astype(np.float32)[:, None, None] + z * noise_sd
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def _stains(scene: SlideScene, ext, owner: np.ndarray, v: np.ndarray, chrom: np.ndarray,
            dapi_cover: np.ndarray) -> np.ndarray:
    """Specific stain per channel before gain: (C, H, W) float32 on the haloed window.

    DAPI is the sum over every nucleus covering a pixel (``dapi_cover``), so where nuclei
    overlap their chromatin adds up and the overlap is brighter.
    """
    pu = scene.pixel_um
    has = owner > 0
    cyto = np.zeros(scene.levels.shape[1], np.float32)
    cyto[1:] = scene.geom.cyto_px
    # Membrane: a ~1.6 µm ring peaking 0.6 µm inside the cell boundary, over a faint cytoplasm.
    ring = np.clip(1.0 - np.abs(v - (cyto[owner] - np.float32(0.6 / pu))) / np.float32(0.8 / pu), 0, 1)
    mem = np.where(has, ring + np.float32(0.15) * (v >= 0), 0).astype(np.float32)
    nuc = np.where(has & (v < 0), np.clip(1.0 + scene.look.chromatin_amp * chrom, 0.25, 2.0), 0).astype(np.float32)
    diffuse_w = np.where(has, np.float32(0.6) + np.float32(0.4) * (v < 0), 0).astype(np.float32)
    stain = np.empty((len(MARKERS),) + owner.shape, np.float32)
    for k, m in enumerate(MARKERS):
        if m == "DAPI":
            stain[k] = dapi_cover * nuc
        elif m in NUCLEAR_MARKERS:
            stain[k] = scene.levels[k][owner] * nuc
        elif m in MEMBRANE_MARKERS:
            stain[k] = scene.levels[k][owner] * mem
        else:
            stain[k] = 0  # CD21 comes from the FDC mesh, not from cells
        stain[k] += scene.diffuse[k][owner] * diffuse_w
    art = scene.artefacts
    debris = art["kind"] == 1
    stain[0] += splat_discs(art["x_um"][debris] / pu, art["y_um"][debris] / pu, art["r_um"][debris] / pu,
                            art["amp"][debris], ext)
    stain[MARKERS.index("CD21")] += _fdc_mesh(scene, ext)
    return stain


def _autofluorescence(scene: SlideScene, ext, owner: np.ndarray, v: np.ndarray, chrom: np.ndarray) -> np.ndarray:
    """Broad-band autofluorescence (H, W) float32: tissue, fibres, necrosis, cells, red cells."""
    pu = scene.pixel_um
    soft = _coarse_lookup(scene.layout, ext, pu)  # tissue, stroma, necrosis, af modulation
    # Elastin/collagen: zero crossings of a smooth field give long, gently curving fibres.
    fib = _smooth_noise(ext, seed=scene.seed, stream=2, sigma_px=4.0 / pu)
    fibres = np.exp(-(fib / np.float32(0.08)) ** 2) * soft[1] * np.float32((0.6 + scene.fibrosis) * scene.look.collagen_scale)
    # Necrosis: granular, patchy autofluorescence rather than a flat glow.
    necro = soft[2] * np.clip(0.55 + 0.25 * fib + 0.35 * chrom, 0.1, None)
    return (soft[0] * soft[3] * 70.0 + fibres * 380.0 + necro * 300.0
            + np.where((owner > 0) & (v >= 0), scene.cell_af[owner], 0)
            + _red_cells(scene, ext)).astype(np.float32)


def _red_cells(scene: SlideScene, ext) -> np.ndarray:
    """Broad-band autofluorescence of the red blood cells, biconcave discs: (H, W) float32."""
    pu = scene.pixel_um
    art = scene.artefacts
    rbc = art["kind"] == 0
    return splat_discs(art["x_um"][rbc] / pu, art["y_um"][rbc] / pu, art["r_um"][rbc] / pu,
                       art["amp"][rbc], ext, ring=0.5)
