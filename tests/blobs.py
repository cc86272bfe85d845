"""Test-only maker of DAPI-like images of touching nuclei with known truth."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# (semi-axis a, semi-axis b) ranges in µm and share of each nucleus kind.
_KINDS = {
    "lymphocyte": ((3.0, 3.5), (3.0, 3.5), 0.5),
    "tumour": ((5.0, 8.0), (4.5, 7.0), 0.35),
    "spindle": ((5.5, 6.5), (1.8, 2.2), 0.15),
}


def make_nuclei(
    shape_yx: tuple[int, int], *, pixel_um: float = 0.5, density: float = 0.9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Blurred noisy ellipses that touch in dense clusters.

    Parameters
    ----------
    shape_yx : (int, int)
        Image shape in px.
    pixel_um : float
        Pixel size, µm.
    density : float
        Relative number of placement attempts; ~1 gives dense, touching packing
        in the cluster regions.
    seed : int
        Random seed.

    Returns
    -------
    image : (Y, X) float32 ndarray
        Intensities, background ~0.05, nuclei ~0.5-1.0.
    truth : (Y, X) int32 ndarray
        True labels 1..n (0 background).
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape_yx
    area_um2 = ny * nx * pixel_um**2
    n_try = int(density * area_um2 / 60.0)
    # Dense clusters: placement probability follows a smooth random field.
    field = ndi.gaussian_filter(rng.random((max(ny // 64, 2), max(nx // 64, 2))), 1.0)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    kinds = list(_KINDS)
    p = np.array([_KINDS[k][2] for k in kinds])
    truth = np.zeros(shape_yx, dtype=np.int32)
    intensity = np.zeros(shape_yx, dtype=np.float32)
    centres = np.empty((0, 2))
    radii = np.empty(0)
    n = 0
    for _ in range(n_try):
        cy, cx = rng.random(2) * (ny, nx)
        if rng.random() > 0.15 + 0.85 * field[int(cy) * field.shape[0] // ny, int(cx) * field.shape[1] // nx]:
            continue
        kind = kinds[rng.choice(len(kinds), p=p)]
        (a0, a1), (b0, b1), _ = _KINDS[kind]
        a = rng.uniform(a0, a1) / pixel_um
        b = min(rng.uniform(b0, b1) / pixel_um, a)
        r_eq = np.sqrt(a * b)
        # Touching allowed (centres as close as the sum of the radii along the
        # line between them allows), heavy overlap not.
        if len(centres) and np.any(np.hypot(*(centres - (cy, cx)).T) < radii + b):
            continue
        theta = rng.uniform(0, np.pi)
        r = int(np.ceil(a)) + 1
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, ny)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, nx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        inside &= truth[y0:y1, x0:x1] == 0
        if inside.sum() < 0.8 * np.pi * a * b:
            continue
        n += 1
        truth[y0:y1, x0:x1][inside] = n
        intensity[y0:y1, x0:x1][inside] = rng.uniform(0.5, 1.0)
        centres = np.vstack([centres, (cy, cx)])
        radii = np.append(radii, r_eq)
    texture = 1.0 + 0.15 * ndi.gaussian_filter(rng.standard_normal(shape_yx), 1.0)
    image = ndi.gaussian_filter(intensity * texture, 0.7 / pixel_um * 0.5)
    image = image + 0.05 + 0.03 * rng.standard_normal(shape_yx)
    return image.astype(np.float32), truth


#: The trial's eight-channel panel, in the order :func:`panel_image` writes it.
PANEL_NAMES = ["DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PDL1", "SATB2"]


def panel_image(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (8, Y, X) slide of :data:`PANEL_NAMES`: DAPI nuclei, low noise in the other markers and
    CD8 bright (+400) on every nucleus, to check intensities; with the nuclei's truth labels."""
    dapi, truth = make_nuclei(shape, seed=seed)
    rng = np.random.default_rng(0)
    others = rng.integers(0, 50, size=(7, *dapi.shape)).astype(dapi.dtype)
    others[1][truth > 0] += 400
    return np.concatenate([dapi[None], others]), truth
