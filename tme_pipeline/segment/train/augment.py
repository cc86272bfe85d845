"""Training augmentation of an (image, labels) patch for StarDist.

Chosen to carry a model trained on synthetic slides over to real ones: the
geometry changes (flips, 90° rotations, scale) act on image and labels alike,
before the targets are computed; the photometric changes act on the image
only and mimic what differs between scanners, stains and focus planes:
per-nucleus brightness (chromatin, cell cycle), smooth illumination gradients,
global contrast and gamma, out-of-focus blur, photon (Poisson-like) and read
(Gaussian) noise, background offsets.

Every random draw comes from the ``numpy.random.Generator`` passed in, so a
patch is a pure function of its input and the generator's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["AugmentConfig", "augment_patch", "source_window_px"]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentations (a range ``(a, a)`` switches one off).

    Attributes
    ----------
    scale : (float, float)
        Zoom factor range (output px per input px), drawn log-uniformly:
        > 1 makes nuclei larger.
    flips : bool
        Random flips along both axes and a random transpose (the 8 symmetries
        of the square, i.e. flips and 90° rotations).
    nucleus_contrast_sd : float
        Log-normal SD of an independent brightness factor per nucleus.
    gradient : float
        Largest relative change of a linear illumination ramp across the patch.
    intensity_scale : (float, float)
        Global multiplicative factor, log-uniform.
    gamma : (float, float)
        Gamma exponent range, log-uniform, applied to the non-negative part.
    blur_p : float
        Probability of a Gaussian (out-of-focus) blur.
    blur_sigma_px : (float, float)
        Its sigma range, output px.
    offset : (float, float)
        Additive background offset range (normalised units).
    photons : (float, float)
        Photon count per normalised unit, log-uniform: Poisson-like noise of
        variance ``x / photons`` (fewer photons, more noise).
    read_noise_sd : (float, float)
        Additive Gaussian noise SD range (normalised units).
    """

    scale: tuple[float, float] = (0.7, 1.4)
    flips: bool = True
    nucleus_contrast_sd: float = 0.3
    gradient: float = 0.4
    intensity_scale: tuple[float, float] = (0.6, 1.6)
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_p: float = 0.3
    blur_sigma_px: tuple[float, float] = (0.5, 2.0)
    offset: tuple[float, float] = (-0.05, 0.15)
    photons: tuple[float, float] = (20.0, 1000.0)
    read_noise_sd: tuple[float, float] = (0.0, 0.04)

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"AugmentConfig: scale must satisfy 0 < lo <= hi, got {self.scale}")
        if not 0 <= self.blur_p <= 1:
            raise ValueError(f"AugmentConfig: blur_p must be in [0, 1], got {self.blur_p}")


def source_window_px(patch_px: int, config: AugmentConfig) -> int:
    """Edge of the source window :func:`augment_patch` needs for ``patch_px`` outputs, px.

    The smallest zoom reads the widest window: ``ceil(patch_px / scale_min)``.

    >>> source_window_px(128, AugmentConfig())
    183
    """
    return int(math.ceil(patch_px / config.scale[0] - 1e-9))


def augment_patch(
    image: np.ndarray,
    label_image: np.ndarray,
    *,
    patch_px: int,
    rng: np.random.Generator,
    config: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training patch from a source window.

    Parameters
    ----------
    image : (S, S) float ndarray
        Normalised nuclear channel (background ~0, bright nuclei ~1), at least
        :func:`source_window_px` wide.
    label_image : (S, S) int ndarray
        Instance labels aligned with ``image``, 0 background.
    patch_px : int
        Output edge, px.
    rng : numpy.random.Generator
        Source of every random choice.
    config : AugmentConfig, optional
        Ranges; default ``AugmentConfig()``.

    Returns
    -------
    image : (patch_px, patch_px) float32 ndarray
    label_image : (patch_px, patch_px) int32 ndarray
        Labels of the same pixels (nearest-neighbour resampled, so ids stay
        integers and objects keep their identity).
    """
    config = config or AugmentConfig()
    img = np.asarray(image, dtype=np.float32)
    lbl = np.asarray(label_image)
    if img.shape != lbl.shape or img.ndim != 2:
        raise ValueError(f"augment_patch: image {img.shape} and labels {lbl.shape} must be equal 2-D shapes")
    if not np.issubdtype(lbl.dtype, np.integer):
        raise ValueError(f"augment_patch: labels must be integers, got {lbl.dtype}")
    if min(img.shape) < source_window_px(patch_px, config):
        raise ValueError(f"augment_patch: source {img.shape} smaller than {source_window_px(patch_px, config)} px")

    img, lbl = _zoom_crop(img, lbl, patch_px, _log_uniform(rng, config.scale), rng)
    if config.flips:
        if rng.random() < 0.5:
            img, lbl = img[::-1], lbl[::-1]
        if rng.random() < 0.5:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        if rng.random() < 0.5:
            img, lbl = img.T, lbl.T
    img, lbl = np.ascontiguousarray(img), np.ascontiguousarray(lbl, dtype=np.int32)
    return _photometric(img, lbl, rng, config), lbl


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)


def _zoom_crop(img, lbl, patch_px, scale, rng):
    """Crop ``patch_px / scale`` source px at a random position, resampled to ``patch_px``."""
    n = min(img.shape[0], max(2, int(round(patch_px / scale))))
    y0 = int(rng.integers(0, img.shape[0] - n + 1))
    x0 = int(rng.integers(0, img.shape[1] - n + 1))
    img, lbl = img[y0:y0 + n, x0:x0 + n], lbl[y0:y0 + n, x0:x0 + n]
    if n == patch_px:
        return img, lbl
    # One coordinate map for both, pixel centres aligned ((p + 0.5) / s - 0.5),
    # so that labels stay on their nuclei; linear for intensities, nearest for ids.
    s = patch_px / n
    c = (np.arange(patch_px) + 0.5) / s - 0.5
    if s < 1:
        # Downscaling: low-pass first, or thin nuclear texture aliases.
        img = ndi.gaussian_filter(img, sigma=0.5 * (1 / s - 1) ** 0.5 + 1e-3, mode="reflect")
    yy, xx = np.meshgrid(c, c, indexing="ij")
    out = ndi.map_coordinates(img, [yy, xx], order=1, mode="reflect")
    ri = np.clip(np.rint(c).astype(int), 0, n - 1)
    return out.astype(np.float32), lbl[np.ix_(ri, ri)]


def _photometric(img: np.ndarray, lbl: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    h, w = img.shape
    if cfg.nucleus_contrast_sd > 0 and lbl.any():
        ids, inv = np.unique(lbl, return_inverse=True)
        factors = np.exp(rng.normal(0.0, cfg.nucleus_contrast_sd, len(ids))).astype(np.float32)
        factors[ids == 0] = 1.0
        # Softened edges: a hard step of brightness at the label border would be a
        # give-away that real images never offer.
        gain = ndi.gaussian_filter(factors[inv.reshape(h, w)], sigma=1.0)
        img = img * gain
    if cfg.gradient > 0:
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (np.cos(theta) * (yy / max(h - 1, 1) - 0.5) + np.sin(theta) * (xx / max(w - 1, 1) - 0.5))
        img = img * (1 + rng.uniform(-cfg.gradient, cfg.gradient) * ramp)
    gamma = _log_uniform(rng, cfg.gamma)
    img = np.maximum(img, 0) ** gamma * _log_uniform(rng, cfg.intensity_scale)
    if rng.random() < cfg.blur_p:
        img = ndi.gaussian_filter(img, sigma=rng.uniform(*cfg.blur_sigma_px))
    img = img + rng.uniform(*cfg.offset)
    photons = _log_uniform(rng, cfg.photons)
    noise_sd = np.sqrt(np.maximum(img, 0) / photons + rng.uniform(*cfg.read_noise_sd) ** 2)
    img = img + noise_sd * rng.standard_normal(img.shape)
    return img.astype(np.float32)
