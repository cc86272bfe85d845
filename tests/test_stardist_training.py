"""StarDist training: targets, augmentation, loss, a few optimiser steps, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("stardist")

from tme_pipeline.segment.train.augment import AugmentConfig, augment_patch, source_window_px  # noqa: E402
from tme_pipeline.segment.net import StarDistConfig  # noqa: E402
from tme_pipeline.segment.train.targets import stardist_targets  # noqa: E402
from tme_pipeline.segment.train.training import (  # noqa: E402
    SynthImage, TrainConfig, sample_batch, stardist_loss, train_stardist)
from tme_pipeline.segment.metrics import pooled_scores  # noqa: E402

from blobs import make_nuclei  # noqa: E402

# Photometric changes off: what is left is geometry only.
GEOMETRY_ONLY = AugmentConfig(nucleus_contrast_sd=0.0, gradient=0.0, intensity_scale=(1.0, 1.0), gamma=(1.0, 1.0),
                              blur_p=0.0, offset=(0.0, 0.0), photons=(1e12, 1e12), read_noise_sd=(0.0, 0.0))
TINY = StarDistConfig(n_rays=8, grid=(2, 2), unet_n_depth=2, unet_n_filter_base=8, net_conv_after_unet=16,
                      pixel_um=0.5)


def _discs() -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Two discs (centre y, centre x, radius px) with large, non-consecutive ids."""
    yy, xx = np.mgrid[:64, :64]
    lbl = np.zeros((64, 64), np.uint32)
    discs = [(20, 20, 10), (44, 46, 6)]
    for k, (cy, cx, r) in enumerate(discs):
        lbl[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = 70_000 + 5 * k
    return lbl, discs


def test_targets_peak_at_centres_zero_on_background():
    lbl, discs = _discs()
    prob, dist = stardist_targets(lbl, n_rays=16, grid=(2, 2))
    assert prob.shape == (32, 32) and dist.shape == (32, 32, 16)
    assert prob.dtype == np.float32 and dist.dtype == np.float32
    bg = lbl[::2, ::2] == 0
    assert np.all(prob[bg] == 0) and np.all(dist[bg] == 0)
    for cy, cx, r in discs:
        y, x = cy // 2, cx // 2
        assert prob[y, x] == pytest.approx(1.0, abs=0.05)
        # Every ray from the centre of a disc ends at its rim.
        np.testing.assert_allclose(dist[y, x], r, atol=1.0)
    assert 0 <= prob.min() and prob.max() <= 1


def test_targets_reject_bad_input():
    with pytest.raises(ValueError, match="multiple of grid"):
        stardist_targets(np.zeros((63, 64), np.int32), n_rays=8, grid=(2, 2))
    with pytest.raises(ValueError, match="integers"):
        stardist_targets(np.zeros((64, 64), np.float32), n_rays=8)


def test_augment_keeps_image_and_labels_aligned():
    lbl, _ = _discs()
    big = np.zeros((200, 200), np.uint32)
    big[60:124, 60:124] = lbl
    img = (big > 0).astype(np.float32)
    for seed in range(20):
        out, out_lbl = augment_patch(img, big, patch_px=128, rng=np.random.default_rng(seed), config=GEOMETRY_ONLY)
        assert out.shape == out_lbl.shape == (128, 128)
        assert out_lbl.dtype == np.int32
        assert set(np.unique(out_lbl)) <= {0, 70_000, 70_005}
        fg, bright = out_lbl > 0, out > 0.5
        if fg.sum() > 50:
            assert (fg & bright).sum() / (fg | bright).sum() > 0.9


def test_augment_is_a_function_of_the_generator():
    img, lbl = make_nuclei((200, 200), seed=3)
    a = augment_patch(img, lbl, patch_px=96, rng=np.random.default_rng(5))
    b = augment_patch(img, lbl, patch_px=96, rng=np.random.default_rng(5))
    c = augment_patch(img, lbl, patch_px=96, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert np.isfinite(a[0]).all()


def test_augment_source_window_too_small():
    with pytest.raises(ValueError, match="smaller"):
        augment_patch(np.zeros((100, 100)), np.zeros((100, 100), np.int32), patch_px=128,
                      rng=np.random.default_rng(0))
    assert source_window_px(128, AugmentConfig(scale=(1.0, 1.0))) == 128


def test_loss_distance_term_vanishes_on_exact_distances():
    lbl, _ = _discs()
    prob, dist = stardist_targets(lbl, n_rays=8, grid=(2, 2))
    p = torch.from_numpy(prob)[None, None]
    d = torch.from_numpy(np.moveaxis(dist, -1, 0))[None]
    _, _, dist_loss = stardist_loss(p, d, p, d, background_reg=0.0)
    assert float(dist_loss) == pytest.approx(0.0, abs=1e-6)
    # The background term penalises distances where the prob target is below 1.
    _, _, reg = stardist_loss(p, d, p, d, background_reg=1.0)
    assert float(reg) == pytest.approx(float(((1 - p) * d.abs()).mean()), rel=1e-5)
    total, prob_loss, dist_loss = stardist_loss(p, d + 2.0, p, d, background_reg=0.0)
    assert float(dist_loss) == pytest.approx(2.0, rel=1e-5)
    assert float(total) == pytest.approx(float(prob_loss) + 0.2 * 2.0, rel=1e-5)


def _blob_images(n: int) -> list[SynthImage]:
    out = []
    for seed in range(n):
        img, lbl = make_nuclei((192, 192), seed=seed)
        counts = (img * 4000 + 200).astype(np.uint16)
        out.append(SynthImage.from_arrays(counts, lbl, tissue=np.ones((4, 4), bool), tissue_px=48.0,
                                          pixel_um=0.5, seed=seed))
    return out


def test_sample_batch_shapes():
    images = _blob_images(1)
    cfg = TrainConfig(patch_px=64, batch_size=3)
    x, prob, dist = sample_batch(images, n_rays=8, grid=(2, 2), config=cfg, rng=np.random.default_rng(0))
    assert x.shape == (3, 1, 64, 64) and prob.shape == (3, 1, 32, 32) and dist.shape == (3, 8, 32, 32)
    assert x.dtype == prob.dtype == dist.dtype == np.float32


def test_a_few_steps_reduce_the_loss_and_are_deterministic():
    torch.set_num_threads(2)
    images = _blob_images(2)
    cfg = TrainConfig(steps=40, patch_px=64, batch_size=4, learning_rate=3e-3, seed=1,
                      augment=dataclasses.replace(AugmentConfig(), scale=(0.9, 1.1)))
    net, history = train_stardist(images, net_config=TINY, config=cfg, val_images=images[:1], val_every=10)
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]

    short = dataclasses.replace(cfg, steps=3)
    a, _ = train_stardist(images, net_config=TINY, config=short)
    b, _ = train_stardist(images, net_config=TINY, config=short)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_pooled_scores_sum_counts_over_images():
    lbl, _ = _discs()
    empty = np.zeros_like(lbl)
    s = pooled_scores([lbl, lbl], [lbl, empty], iou_thresholds=(0.5,))[0.5]
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 2)
    assert s["precision"] == 1.0 and s["recall"] == 0.5
    assert s["mean_matched_iou"] == pytest.approx(1.0)


def test_sample_batch_draws_images_by_weight():
    blobs = _blob_images(1)[0]
    # A second source that is all background: patches from it have an all-zero prob target.
    blank = SynthImage.from_arrays(np.full((192, 192), 200, np.uint16), np.zeros((192, 192), np.uint32),
                                   tissue=np.ones((4, 4), bool), tissue_px=48.0, pixel_um=0.5, seed=9)
    cfg = TrainConfig(patch_px=64, batch_size=6, augment=GEOMETRY_ONLY)
    kw = dict(n_rays=8, grid=(2, 2), config=cfg)
    _, prob, _ = sample_batch([blobs, blank], rng=np.random.default_rng(0), weights=np.array([0.0, 1.0]), **kw)
    assert prob.max() == 0
    _, prob, _ = sample_batch([blobs, blank], rng=np.random.default_rng(0), weights=np.array([1.0, 0.0]), **kw)
    assert all(p.max() > 0 for p in prob)


def test_train_rejects_bad_image_weights():
    images = _blob_images(2)
    cfg = TrainConfig(steps=1, patch_px=64, batch_size=2)
    with pytest.raises(ValueError, match="image_weights"):
        train_stardist(images, net_config=TINY, config=cfg, image_weights=np.array([1.0]))
    with pytest.raises(ValueError, match="image_weights"):
        train_stardist(images, net_config=TINY, config=cfg, image_weights=np.array([1.0, -1.0]))
