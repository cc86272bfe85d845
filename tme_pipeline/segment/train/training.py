"""Train StarDist on synthetic mIF slides: data, patch sampling, loss, loop, thresholds.

The recipe is the official ``StarDist2D.train`` one, on our synthetic DAPI:

- targets: :func:`tme_pipeline.segment.train.targets.stardist_targets` (prob =
  normalised EDT, dist = ray lengths, on the output grid);
- loss: ``1 * BCE(prob) + 0.2 * MAE(dist)``, the distance error weighted by
  the prob target and normalised by its mean, plus ``1e-4 * |dist|`` on
  background (``train_loss_weights=(1, 0.2)``, ``train_background_reg=1e-4``);
- Adam, learning rate 3e-4, here with a cosine decay (the step budget of a
  2-core CPU is fixed in advance, so no plateau to wait for);
- patches biased to nuclei and tissue (the official ``train_foreground_only``),
  augmented by :mod:`tme_pipeline.segment.train.augment`;
- thresholds chosen on held-out synthetic slides through the very
  :func:`~tme_pipeline.segment.predict.segment_nuclei` users call
  (:mod:`tme_pipeline.segment.train.tuning`).

Randomness: the net's initialisation from ``seed``; batch ``k`` from
``numpy.random.default_rng([seed, k])``, so a run is reproducible step by step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .augment import AugmentConfig, augment_patch, source_window_px
from ..net import StarDistConfig, StarDistNet
from .targets import stardist_targets

__all__ = ["SynthImage", "TrainConfig", "condition_for_seed", "sample_batch", "stardist_loss", "synthetic_images",
           "train_stardist"]

logger = logging.getLogger(__name__)

# Percentiles of the per-slide normalisation, as the model's default
# ``norm_percentiles`` (what ``slide_norm`` applies at inference).
_NORM_PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class SynthImage:
    """DAPI level 0 of one synthetic slide with its truth.

    Attributes
    ----------
    image : (Y, X) uint16 ndarray
        DAPI counts at ``pixel_um``.
    label_image : (Y, X) uint32 ndarray
        Nucleus instance labels, 0 background.
    tissue : (Yc, Xc) bool ndarray
        Coarse tissue mask (includes necrosis and red blood cells: negatives).
    tissue_px : float
        Level-0 px per tissue-mask px.
    pixel_um : float
        Pixel size, µm.
    seed : int
        The generator seed of the slide.
    norm : (float, float)
        Its 1st and 99.8th DAPI percentiles, counts (the training normalisation).
    foreground_yx : (N, 2) int64 ndarray
        Nucleus pixels on a 4-px lattice, where nucleus-centred patches start.
    """

    image: np.ndarray
    label_image: np.ndarray
    tissue: np.ndarray
    tissue_px: float
    pixel_um: float
    seed: int
    norm: tuple[float, float] = (0.0, 1.0)
    foreground_yx: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))

    @classmethod
    def from_arrays(cls, image: np.ndarray, label_image: np.ndarray, *, tissue: np.ndarray, tissue_px: float,
                    pixel_um: float, seed: int) -> "SynthImage":
        """Build one, computing its normalisation and nucleus pixels once."""
        lo, hi = np.percentile(image[::2, ::2], _NORM_PERCENTILES)
        fg = np.argwhere(label_image[::4, ::4] > 0) * 4
        return cls(image, label_image, tissue, tissue_px, pixel_um, seed, (float(lo), float(max(hi, lo + 1))), fg)


def condition_for_seed(seed: int):
    """A varied :class:`~tme_pipeline.synth.SlideCondition` drawn from ``seed``.

    Pre-treatment biopsies (little tissue) and post-treatment resections of
    responders and non-responders, with a patient-level immune scale, so that
    tumour nests, stroma, TLS, necrosis and red blood cells all appear.
    """
    from tme_pipeline.synth import SlideCondition

    rng = np.random.default_rng([seed, 7])
    timepoint = "pre" if rng.random() < 0.3 else "post"
    response = "responder" if rng.random() < 0.5 else "non_responder"
    return SlideCondition.for_sample(timepoint, response, immune_scale=round(float(rng.lognormal(0.0, 0.3)), 3))


def synthetic_images(
    cache_dir: str | Path, seeds: list[int], *, size_mm: tuple[float, float] = (0.6, 0.6), pixel_um: float = 0.5
) -> list[SynthImage]:
    """Synthetic slides for training or evaluation, written once to ``cache_dir``.

    Parameters
    ----------
    cache_dir : str or Path
        Folder of ``gen<version>_s<seed>_….ome.tif`` and their ``_truth/``; slides already
        there (complete truth) are read, not regenerated.
    seeds : list of int
        Generator seeds; the condition of each is :func:`condition_for_seed`.
    size_mm : (float, float)
        Slide (width, height), mm.
    pixel_um : float
        Level-0 pixel size, µm.

    Returns
    -------
    list of SynthImage
    """
    import tifffile

    from tme_pipeline.synth import load_truth, render_truth_labels, synth_slide
    from tme_pipeline.synth.slide import GENERATOR_VERSION

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in seeds:
        # The generator version is in the name: a changed generator never reuses old slides.
        tag = f"gen{GENERATOR_VERSION}_s{seed}_{size_mm[0]:g}x{size_mm[1]:g}mm_{pixel_um:g}um"
        path, truth_dir = cache / f"{tag}.ome.tif", cache / f"{tag}_truth"
        if path.is_file() and (truth_dir / "truth.json").is_file():
            truth = load_truth(truth_dir)
        else:
            truth = synth_slide(path, size_mm=size_mm, seed=seed, pixel_um=pixel_um,
                                condition=condition_for_seed(seed), truth_dir=truth_dir)
        with tifffile.TiffFile(path) as tf:
            dapi = tf.series[0].levels[0].pages[0].asarray()
        labels = render_truth_labels(truth, (slice(0, dapi.shape[0]), slice(0, dapi.shape[1])), kind="nuclei")
        out.append(SynthImage.from_arrays(dapi, labels, tissue=np.asarray(truth.regions["tissue"], bool),
                                          tissue_px=truth.region_um / pixel_um, pixel_um=pixel_um, seed=int(seed)))
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes
    ----------
    steps : int
        Optimiser steps.
    patch_px : int
        Training patch edge, px at the model's pixel size.
    batch_size : int
    learning_rate : float
        Adam's initial rate, decayed by a cosine to ``learning_rate * lr_floor``.
    lr_floor : float
    loss_weights : (float, float)
        Weights of the prob and dist losses (official ``(1, 0.2)``).
    background_reg : float
        Weight of ``|dist|`` on background (official ``1e-4``).
    nucleus_p, tissue_p : float
        Probability that a patch is centred on a nucleus pixel, on a tissue
        pixel; otherwise anywhere (empty glass included).
    seed : int
    """

    steps: int = 2500
    patch_px: int = 128
    batch_size: int = 8
    learning_rate: float = 3e-4
    lr_floor: float = 0.03
    loss_weights: tuple[float, float] = (1.0, 0.2)
    background_reg: float = 1e-4
    nucleus_p: float = 0.6
    tissue_p: float = 0.3
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def sample_batch(
    images: list[SynthImage], *, n_rays: int, grid: tuple[int, int], config: TrainConfig,
    rng: np.random.Generator, augment: bool = True, weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training batch: images, prob targets, dist targets.

    ``weights`` (one per image, summing to 1) are the probabilities of drawing
    each image for a patch; default uniform.

    Returns
    -------
    x : (B, 1, P, P) float32 ndarray
        Normalised (per-slide 1–99.8 percentiles), augmented patches.
    prob : (B, 1, P/gy, P/gx) float32 ndarray
    dist : (B, n_rays, P/gy, P/gx) float32 ndarray
    """
    p = config.patch_px
    aug = config.augment if augment else AugmentConfig(
        scale=(1.0, 1.0), flips=False, nucleus_contrast_sd=0.0, gradient=0.0, intensity_scale=(1.0, 1.0),
        gamma=(1.0, 1.0), blur_p=0.0, offset=(0.0, 0.0), photons=(1e9, 1e9), read_noise_sd=(0.0, 0.0))
    s = source_window_px(p, aug)
    xs, probs, dists = [], [], []
    for _ in range(config.batch_size):
        k = rng.choice(len(images), p=weights) if weights is not None else rng.integers(len(images))
        im = images[int(k)]
        cy, cx = _patch_centre(im, rng, config)
        y0 = int(np.clip(cy - s // 2, 0, im.image.shape[0] - s))
        x0 = int(np.clip(cx - s // 2, 0, im.image.shape[1] - s))
        lo, hi = im.norm
        window = (im.image[y0:y0 + s, x0:x0 + s].astype(np.float32) - lo) / (hi - lo)
        x, lbl = augment_patch(window, im.label_image[y0:y0 + s, x0:x0 + s], patch_px=p, rng=rng, config=aug)
        prob, dist = stardist_targets(lbl, n_rays=n_rays, grid=grid)
        xs.append(x[None])
        probs.append(prob[None])
        dists.append(np.moveaxis(dist, -1, 0))
    return np.stack(xs), np.stack(probs), np.stack(dists)


def _patch_centre(im: SynthImage, rng: np.random.Generator, config: TrainConfig) -> tuple[int, int]:
    u = rng.random()
    h, w = im.image.shape
    if u < config.nucleus_p:
        if len(im.foreground_yx):
            y, x = im.foreground_yx[int(rng.integers(len(im.foreground_yx)))]
            return int(y), int(x)
    elif u < config.nucleus_p + config.tissue_p and im.tissue.any():
        ty, tx = np.nonzero(im.tissue)
        k = int(rng.integers(len(ty)))
        return (int(min(h - 1, (ty[k] + rng.random()) * im.tissue_px)),
                int(min(w - 1, (tx[k] + rng.random()) * im.tissue_px)))
    return int(rng.integers(h)), int(rng.integers(w))


def stardist_loss(
    prob_pred: torch.Tensor, dist_pred: torch.Tensor, prob_true: torch.Tensor, dist_true: torch.Tensor,
    *, loss_weights: tuple[float, float] = (1.0, 0.2), background_reg: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official StarDist 2D loss.

    Parameters
    ----------
    prob_pred, prob_true : (B, 1, h, w) float tensors
        Predicted probability (after sigmoid) and its target.
    dist_pred, dist_true : (B, n_rays, h, w) float tensors
        Predicted and true ray lengths, px.
    loss_weights : (float, float)
    background_reg : float

    Returns
    -------
    total, prob_loss, dist_loss : scalar tensors
    """
    prob_loss = F.binary_cross_entropy(prob_pred.clamp(1e-7, 1 - 1e-7), prob_true)
    mask = prob_true  # (B, 1, h, w), broadcast over rays
    err = (dist_pred - dist_true).abs()
    dist_loss = (mask * err).mean() / (mask.mean() + 1e-7)
    if background_reg > 0:
        dist_loss = dist_loss + background_reg * ((1 - mask) * dist_pred.abs()).mean()
    total = loss_weights[0] * prob_loss + loss_weights[1] * dist_loss
    return total, prob_loss.detach(), dist_loss.detach()


def train_stardist(
    images: list[SynthImage], *, net_config: StarDistConfig, config: TrainConfig,
    val_images: list[SynthImage] | None = None, val_every: int = 250,
    on_checkpoint: Callable[[StarDistNet, int], None] | None = None,
    init_state: dict[str, torch.Tensor] | None = None, image_weights: np.ndarray | None = None,
) -> tuple[StarDistNet, list[dict]]:
    """Train a StarDist net on synthetic images.

    Parameters
    ----------
    images : list of SynthImage
        Training slides.
    net_config : StarDistConfig
        Architecture (its ``pixel_um`` should be the slides' pixel size).
    config : TrainConfig
    val_images : list of SynthImage, optional
        Slides for a fixed, unaugmented validation batch (loss only).
    val_every : int
        Steps between validation losses and checkpoint calls.
    on_checkpoint : callable(net, step), optional
        Called every ``val_every`` steps and at the end (e.g. to save weights).
    init_state : dict of str -> Tensor, optional
        Initial weights (a state dict of the same architecture) to continue
        from instead of a random initialisation.
    image_weights : (N,) float ndarray, optional
        Probability of drawing each training image for a patch (e.g. to mix
        a few large synthetic slides with many small real images); default
        uniform. Normalised here.

    Returns
    -------
    net : StarDistNet
        In eval mode.
    history : list of dict
        One record per log point: step, seconds, lr, loss, prob_loss,
        dist_loss (running means since the previous record), val_loss.
    """
    torch.manual_seed(config.seed)
    net = StarDistNet(net_config)
    if init_state is not None:
        net.load_state_dict(init_state)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.steps, 1),
                                                       eta_min=config.learning_rate * config.lr_floor)
    kw = dict(n_rays=net_config.n_rays, grid=net_config.grid, config=config)
    weights = None
    if image_weights is not None:
        weights = np.asarray(image_weights, float)
        if weights.shape != (len(images),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"image_weights: need {len(images)} non-negative weights, got shape {weights.shape}")
        weights = weights / weights.sum()
    val_batch = None
    if val_images:
        vb = [sample_batch(val_images, rng=np.random.default_rng([config.seed, 99, k]), augment=False, **kw)
              for k in range(4)]
        val_batch = [tuple(torch.from_numpy(a) for a in b) for b in vb]
    history, run, t0 = [], np.zeros(3), time.perf_counter()
    if config.steps == 0:
        return net.eval(), history
    for step in range(1, config.steps + 1):
        x, prob, dist = (torch.from_numpy(a) for a in
                         sample_batch(images, rng=np.random.default_rng([config.seed, step]), weights=weights, **kw))
        p, d = net(x)
        loss, lp, ld = stardist_loss(p, d, prob, dist, loss_weights=config.loss_weights,
                                     background_reg=config.background_reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run += [float(loss.detach()), float(lp), float(ld)]
        if step % val_every == 0 or step == config.steps:
            n = step - (history[-1]["step"] if history else 0)
            rec = {"step": step, "seconds": round(time.perf_counter() - t0, 1),
                   "lr": float(opt.param_groups[0]["lr"]), "loss": run[0] / n, "prob_loss": run[1] / n,
                   "dist_loss": run[2] / n, "val_loss": _val_loss(net, val_batch, config)}
            history.append(rec)
            run[:] = 0
            logger.info("step %d/%d  %.0f s  loss %.4f (prob %.4f, dist %.3f)  val %s", step, config.steps,
                        rec["seconds"], rec["loss"], rec["prob_loss"], rec["dist_loss"], rec["val_loss"])
            if on_checkpoint is not None:
                net.eval()
                on_checkpoint(net, step)
                net.train()
    return net.eval(), history


def _val_loss(net, val_batch, config: TrainConfig) -> float | None:
    if not val_batch:
        return None
    net.eval()
    with torch.inference_mode():
        losses = [float(stardist_loss(*net(x), prob, dist, loss_weights=config.loss_weights,
                                      background_reg=config.background_reg)[0]) for x, prob, dist in val_batch]
    net.train()
    return round(float(np.mean(losses)), 5)
