"""Reference outputs of the official StarDist 2D (TensorFlow) for our equivalence test.

Runs in the separate TensorFlow environment, not in the project's::

    TF_USE_LEGACY_KERAS=1 .venv-tf/bin/python scripts/make_stardist_reference.py --out DIR

Builds ``StarDist2D(Config2D(grid=(2, 2)))`` (the default architecture with
the output grid of the published ``2D_versatile_fluo`` model; ``Config2D``'s own
default grid is (1, 1)), trains it for a few steps on small synthetic blob
images so that its objects mean something (random weights give junk), and
writes into ``DIR``:

    model/config.json, model/thresholds.json, model/weights_best.h5
        an official model folder (thresholds prob 0.5, nms 0.4)
    image.npy      (Y, X) float32 test image, already normalised (0-1)
    prob.npy       (Y/2, X/2) float32, ``model.predict(image)`` probability
    dist.npy       (Y/2, X/2, n_rays) float32, ``model.predict(image)`` distances
    labels.npy     (Y, X) int32, ``model.predict_instances(image)`` labels
    meta.json      versions, seed, timings

Self-contained (numpy, scipy, stardist): the TensorFlow environment does not
install this project.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

# Odd sizes exercise the padding to a multiple of 16 and the border rule.
IMAGE_SHAPE = (300, 347)
TRAIN_SHAPE = (256, 256)
N_TRAIN = 8


def blobs(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blurred noisy ellipses (nuclei of 4-9 px radius) and their labels."""
    ny, nx = shape
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:ny, :nx]
    n = 0
    for _ in range(ny * nx // 250):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        a, b = rng.uniform(5, 9), rng.uniform(4, 7)
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        if inside.sum() < 10 or np.any(labels[ndi.binary_dilation(inside)]):
            continue
        n += 1
        labels[inside] = n
    intensity = np.where(labels > 0, rng.uniform(0.5, 1.0, n + 1)[labels], 0.0)
    image = ndi.gaussian_filter(intensity, 1.0) + 0.05 + 0.03 * rng.standard_normal(shape)
    return np.clip(image, 0, None).astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

    import tensorflow as tf

    tf.keras.utils.set_random_seed(args.seed)
    import stardist
    from stardist.models import Config2D, StarDist2D

    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    xs, ys = zip(*(blobs(TRAIN_SHAPE, rng) for _ in range(N_TRAIN)))
    # Only training settings differ from the defaults: small patches and a
    # higher learning rate keep training under a minute on two cores.
    conf = Config2D(grid=(2, 2), train_patch_size=(128, 128), train_learning_rate=1e-3,
                    train_tensorboard=False)
    model = StarDist2D(conf, name="model", basedir=str(args.out))
    model.train(list(xs[:-2]), list(ys[:-2]), validation_data=(list(xs[-2:]), list(ys[-2:])),
                epochs=args.epochs, steps_per_epoch=args.steps)
    t_train = time.perf_counter() - t0
    model_dir = args.out / "model"
    model.keras_model.save_weights(str(model_dir / "weights_best.h5"))
    (model_dir / "thresholds.json").write_text(json.dumps({"prob": 0.5, "nms": 0.4}))
    # Reload from the folder, as a user of the official package would.
    model = StarDist2D(None, name="model", basedir=str(args.out))

    image, truth = blobs(IMAGE_SHAPE, rng)
    prob, dist = model.predict(image)
    labels, details = model.predict_instances(image)
    np.save(args.out / "image.npy", image)
    np.save(args.out / "truth.npy", truth)
    np.save(args.out / "prob.npy", prob.astype(np.float32))
    np.save(args.out / "dist.npy", dist.astype(np.float32))
    np.save(args.out / "labels.npy", labels.astype(np.int32))
    meta = {
        "seed": args.seed, "tensorflow": tf.__version__, "stardist": stardist.__version__,
        "train_seconds": round(t_train, 1), "n_objects": int(labels.max()), "n_truth": int(truth.max()),
        "thresholds": {"prob": model.thresholds.prob, "nms": model.thresholds.nms},
        "n_params": int(model.keras_model.count_params()),
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
