"""Train our StarDist nuclei model on synthetic mIF slides (CPU, 2 cores).

Usage::

    python scripts/train_stardist.py --out models/stardist_fluo_synth_stage1 --steps 1600 --seed 0 \\
        --train-slides 24 --val-slides 4
    python scripts/train_stardist.py --out models/stardist_fluo_synth_stage2 \\
        --init models/stardist_fluo_synth_stage1 --steps 1500 --seed 1

``--init`` continues from a model folder with a new cosine cycle; ``--steps 0``
with ``--init`` only chooses thresholds and validates. The shipped model's
exact recipe (three cycles, 4600 steps, ~30 min on an idle 2-core CPU) is in
``models/stardist_fluo_synth/README.md``.

Synthetic slides (``--slide-mm`` square, 0.5 µm/px) with generator seeds
10000.. (training) and 20000.. (validation) are written once to ``--cache``.
The net (official Config2D architecture, ``pixel_um=0.5``) is trained with the
official StarDist loss; weights are saved to ``--out`` every ``--val-every``
steps (so that a usable model exists early), then the probability and NMS
thresholds are chosen on the validation slides (F1 at IoU 0.5) and
``train_log.json`` records steps, time, losses, thresholds and validation
scores. Held-out evaluation is ``scripts/eval_stardist.py`` (seeds 30000..).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

# Generator seed ranges of the three synthetic sets: disjoint by construction.
TRAIN_SEED0, VAL_SEED0, TEST_SEED0 = 10_000, 20_000, 30_000
IOU_THRESHOLDS = (0.5, 0.7, 0.9)

logger = logging.getLogger("train_stardist")


def main(argv: list[str] | None = None) -> int:
    from tme_pipeline.segment.train.augment import AugmentConfig, source_window_px

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0, help="net initialisation, patch sampling, augmentation")
    ap.add_argument("--train-slides", type=int, default=24)
    ap.add_argument("--val-slides", type=int, default=4)
    ap.add_argument("--slide-mm", type=float, default=0.6, help="edge of each synthetic slide, mm")
    ap.add_argument("--patch", type=int, default=128, help="patch edge, px")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nms", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                    help="NMS thresholds tried when choosing the thresholds")
    ap.add_argument("--scale", type=float, nargs=2, default=list(AugmentConfig().scale),
                    help="zoom range of the augmentation (log-uniform)")
    ap.add_argument("--nucleus-contrast-sd", type=float, default=AugmentConfig().nucleus_contrast_sd,
                    help="log-normal SD of the per-nucleus brightness factor of the augmentation")
    ap.add_argument("--shifted-copies", type=int, default=3,
                    help="domain-shifted copies of each validation slide added to the threshold search")
    ap.add_argument("--init", type=Path, default=None,
                    help="model folder to start from (with --steps 0: only choose thresholds and validate)")
    ap.add_argument("--real", type=Path, default=None,
                    help="shared real-nuclei folder (index.csv, images/, masks/) to train on beside the synthetic "
                         "slides; validation and test images are whole appearance groups (split.json in --out)")
    ap.add_argument("--real-fraction", type=float, default=0.5, help="share of training patches from real images")
    ap.add_argument("--real-groups", type=int, default=40, help="appearance groups the real images are cut into")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the group split of the real images")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tme_stardist_synth"), help="synthetic slide cache")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from tme_pipeline.segment.net import StarDistConfig
    from tme_pipeline.segment.train.training import TrainConfig, synthetic_images, train_stardist
    from tme_pipeline.segment.train.tuning import evaluate_model, optimize_thresholds, shifted_images
    from tme_pipeline.segment.weights import Thresholds, load_model, save_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    size = (args.slide_mm, args.slide_mm)
    train = synthetic_images(args.cache, [TRAIN_SEED0 + i for i in range(args.train_slides)], size_mm=size)
    val = synthetic_images(args.cache, [VAL_SEED0 + i for i in range(args.val_slides)], size_mm=size)
    net_config = StarDistConfig(pixel_um=0.5, train_patch_size=(args.patch, args.patch))
    augment = AugmentConfig(scale=tuple(args.scale), nucleus_contrast_sd=args.nucleus_contrast_sd)
    weights, real_val, split_log = None, [], None
    if args.real is not None:
        train_real, real_val, split_log = real_split(args.real, n_groups=args.real_groups, seed=args.split_seed,
                                                     min_edge_px=source_window_px(args.patch, augment),
                                                     min_patch_px=args.patch)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "split.json").write_text(json.dumps(split_log, indent=1) + "\n")
        # Each source gets its share of patches whatever its number of images.
        weights = np.r_[np.full(len(train), (1 - args.real_fraction) / len(train)),
                        np.full(len(train_real), args.real_fraction / len(train_real))]
        train = train + train_real
    t_data = time.perf_counter() - t0
    logger.info("data: %d training images, %d validation slides, %d real validation images in %.0f s", len(train),
                len(val), len(real_val), t_data)
    config = TrainConfig(steps=args.steps, patch_px=args.patch, batch_size=args.batch, learning_rate=args.lr,
                         seed=args.seed, augment=augment)
    default_thr = Thresholds(prob=net_config.prob_thresh, nms=net_config.nms_thresh)

    def checkpoint(net, step):
        save_model(args.out, net, net_config, default_thr)

    t1 = time.perf_counter()
    init = load_model(args.init).net.state_dict() if args.init else None
    net, history = train_stardist(train, net_config=net_config, config=config, val_images=val + real_val,
                                  val_every=args.val_every, on_checkpoint=checkpoint, init_state=init,
                                  image_weights=weights)
    t_train = time.perf_counter() - t1
    save_model(args.out, net, net_config, default_thr)

    t2 = time.perf_counter()
    model = load_model(args.out)
    # Thresholds are chosen on the clean validation slides plus shifted copies of them
    # (the training augmentation): a pair that only fits crisp synthetic nuclei would
    # cost recall on real slides.
    val_shifted = val + shifted_images(val, copies=args.shifted_copies, seed=args.seed, augment=augment)
    sets = {"synthetic": val_shifted, "real": real_val} if real_val else val_shifted
    thresholds, tried = optimize_thresholds(model, sets, nms_threshs=tuple(args.nms))
    save_model(args.out, net, net_config, thresholds)
    model = load_model(args.out)
    val_scores = evaluate_model(model, val, iou_thresholds=IOU_THRESHOLDS)
    real_scores = evaluate_model(model, real_val, iou_thresholds=IOU_THRESHOLDS) if real_val else {}
    t_thr = time.perf_counter() - t2

    log = {
        "command": " ".join(sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_seeds": [im.seed for im in train], "val_seeds": [im.seed for im in val],
        "slide_size_mm": list(size), "pixel_um": 0.5,
        "net_config": net_config.to_dict(),
        "train_config": {k: v for k, v in vars(config).items() if k != "augment"},
        "augment": vars(config.augment),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "thresholds_and_val": round(t_thr, 1)},
        "seconds_per_step": round(t_train / max(args.steps, 1), 3),
        "history": history,
        "thresholds": {"prob": thresholds.prob, "nms": thresholds.nms,
                       "objective": "pooled F1 at IoU 0.5 on the validation slides and "
                                    f"{args.shifted_copies} shifted copies of each (training augmentation)"
                                    + ("; mean with the pooled F1 of the real validation groups" if real_val else "")},
        "threshold_search": tried,
        "val": {f"iou{t}": {k: round(float(v), 4) for k, v in s.items()} for t, s in val_scores.items()},
        "val_real": {f"iou{t}": {k: round(float(v), 4) for k, v in s.items()} for t, s in real_scores.items()},
        "real": None if split_log is None else {k: v for k, v in split_log.items() if k != "images"},
        "weights_sha256": model.sha256,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    logger.info("done in %.0f s: thresholds %s, val F1@0.5 %.4f", time.perf_counter() - t0, thresholds,
                val_scores[0.5]["f1"])
    return 0


def real_split(folder: Path, *, n_groups: int, seed: int, min_edge_px: int, min_patch_px: int):
    """Real training and validation images (test groups left out) and the split's record."""
    from tme_pipeline.segment.train.real import appearance_groups, read_index, real_images, split_by_group

    records = read_index(folder)
    groups = appearance_groups(folder, records, n_groups=n_groups)
    split = split_by_group(groups, seed=seed)
    train = real_images(folder, [records[i] for i in split["train"]], min_edge_px=min_edge_px, seed0=100_000)
    # Validation images are padded to one patch too: the validation loss draws unaugmented patches.
    val = real_images(folder, [records[i] for i in split["val"]], min_edge_px=min_patch_px, seed0=200_000)
    log = {"folder": str(folder), "n_groups": n_groups, "split_seed": seed,
           "method": "Ward clustering of standardised appearance features (shape, nucleus size, intensity, "
                     "texture, crowding); test, then validation, take whole groups in a seeded order",
           "counts": {k: {"images": len(v), "nuclei": int(sum(records[i].n_nuclei for i in v)),
                          "groups": sorted({int(groups[i]) for i in v})} for k, v in split.items()},
           "images": {k: [records[i].image_id for i in v] for k, v in split.items()}}
    return train, val, log


if __name__ == "__main__":
    sys.exit(main())
