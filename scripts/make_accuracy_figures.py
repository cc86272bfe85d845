"""Draw the accuracy pictures: predicted nuclei against the truth, and phenotypes over a follicle.

Usage::

    python scripts/make_accuracy_figures.py --out-dir docs/images --model models/stardist_fluo_real \
        [--real ../shared/data/dsb2018-fluo-train] [--pipeline-out /tmp/fig_follicle]

Writes, each on a µm scale with a scale bar:

- ``nuclei_tls_default.png``, ``nuclei_tls_external_lab.png``: a 150 µm square centred on the
  largest TLS of a held-out synthetic slide (seed 40000.., as ``scripts/eval_stardist.py
  --seed0 40000``, so the cached slides are shared), default and ``external_lab`` style; DAPI
  grey, predicted outlines magenta (drawn just inside), truth outlines green (just outside);
  the title gives the crop's F1@0.5.
- ``nuclei_tumour_border.png``: the same over the tumour border of the default-style slide (the
  margin pixel whose window is closest to half tumour).
- ``nuclei_real_heldout.png``: four images of the real held-out test groups of the model's
  ``split.json`` (one per appearance cluster of the test images), outlines against the hand-drawn
  masks, each segmented at ``8 / median diameter px`` µm/px as ``scripts/eval_real_nuclei.py`` does.
- ``phenotypes_follicle.png``: CD20 red, CD3 green, DAPI blue over the largest truth TLS of a
  one-patient cohort run through ``tme run`` (``--pipeline-out``: the folder of ``tme synth
  --out W --patients 1 --seed 11 --size-mm 1.5 1.5`` after ``tme run W/manifest.csv --out
  W/out``), cell centroids coloured by phenotype.

Each crop's match counts and a breakdown of its errors (false positives on background, extra
fragments of a found nucleus, merges, misses) are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

CROP_UM = 150.0
# Extra context segmented around a crop so that StarDist sees no artificial image edge, µm.
CONTEXT_UM = 30.0
SEED0 = 40_000
SLIDE_MM = 0.6
NUCLEUS_UM = 8.0
PRED_RGB = (1.0, 0.15, 1.0)
TRUTH_RGB = (0.1, 1.0, 0.2)
PHENOTYPE_COLOURS = {"B": "#ff4040", "CD8_T": "#ffff00", "CD4_T": "#40ff40", "Treg": "#00ffff",
                     "tumour": "#ff9900", "tumor": "#ff9900", "other": "#bbbbbb"}
DPI = 110
# Pixel repeat of the synthetic crops before outlining (300 px crops drawn 600 px wide).
ZOOM = 2
# Side of the window of each real image drawn, px of the image.
REAL_WINDOW_PX = 160

logger = logging.getLogger("make_accuracy_figures")


def grey(image: np.ndarray) -> np.ndarray:
    """(Y, X) intensities -> (Y, X, 3) float grey scaled to the 1–99.8 percentiles."""
    lo, hi = np.percentile(image, (1, 99.8))
    g = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat(g[..., None], 3, axis=2)


def overlay(rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray, zoom: int = 1) -> np.ndarray:
    """Truth outlines just outside each nucleus, predicted ones just inside, so both stay visible.

    Outlines are found on the image's grid, then every pixel is repeated ``zoom`` times, so a
    line is ``zoom`` px wide and still one image pixel.
    """
    out = rgb.copy()
    out[find_boundaries(truth, mode="outer") & (truth == 0)] = TRUTH_RGB
    out[find_boundaries(pred, mode="inner")] = PRED_RGB
    return np.repeat(np.repeat(out, zoom, 0), zoom, 1)


def save(fig, out: Path, keep: tuple[str, ...] = ()) -> None:
    """Write a figure as a 256-colour PNG (a few hundred KB at most) and close it.

    ``keep`` are colours (matplotlib names or hex) put in the palette exactly, so that rare
    legend colours are not folded into common ones.
    """
    from matplotlib.colors import to_rgb
    from PIL import Image

    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    fixed = [round(255 * v) for c in dict.fromkeys(keep) for v in to_rgb(c)]
    common = image.quantize(256 - len(fixed) // 3, method=Image.Quantize.MEDIANCUT).getpalette()
    palette = Image.new("P", (1, 1))
    palette.putpalette(fixed + common[: 768 - len(fixed)])
    image.quantize(palette=palette, dither=Image.Dither.NONE).save(out, optimize=True)
    plt.close(fig)


def figure_for(width_px: int, height_px: int, ncols: int = 1, extra_w: float = 0.3,
               extra_h: float = 0.75):
    """A figure whose panels are about their images' size at DPI, so no outline is resampled away."""
    return plt.subplots(1, ncols, figsize=(ncols * width_px / DPI + extra_w, height_px / DPI + extra_h), dpi=DPI)


def show(ax, rgb: np.ndarray, pixel_um: float, bar_um: float, zoom: int = 1) -> None:
    """An image on a µm scale (``pixel_um`` before ``zoom``) with a scale bar and no ticks."""
    pixel_um = pixel_um / zoom
    h, w = rgb.shape[:2]
    ax.imshow(rgb, extent=(0, w * pixel_um, h * pixel_um, 0), interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    ax.add_artist(AnchoredSizeBar(ax.transData, bar_um, f"{bar_um:g} µm", "lower right", pad=0.4,
                                  color="white", frameon=False, size_vertical=bar_um / 12))


def outline_legend(ax) -> None:
    ax.legend(handles=[Line2D([], [], color=PRED_RGB, lw=2, label="predicted"),
                       Line2D([], [], color=TRUTH_RGB, lw=2, label="truth")],
              loc="upper right", fontsize=8, framealpha=0.6)


def error_breakdown(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Counts of what the errors at IoU 0.5 are, from the overlap of unmatched objects.

    A false positive is *background* when under 20 % of it lies on truth nuclei, part of a
    *merge* when it covers at least 30 % of two or more truth nuclei, part of a *split* when
    the truth nucleus it mostly lies on is covered (>= 20 % each) by two or more predictions,
    else *misshapen* (one prediction on one nucleus, IoU < 0.5). A miss is *unseen* when under
    20 % of it is covered by predictions, else *merged*, *split* or *misshapen* by the same rules.
    """
    from tme_pipeline.segment.metrics import matched_pairs

    t_ids, p_ids, _ = matched_pairs(truth, pred, iou_threshold=0.5)
    nt, npred = int(truth.max()) + 1, int(pred.max()) + 1
    # overlap[t, p]: pixels shared by truth t and prediction p (row/column 0 is background)
    overlap = np.bincount(truth.ravel().astype(np.int64) * npred + pred.ravel(), minlength=nt * npred)
    overlap = overlap.reshape(nt, npred)
    t_area, p_area = overlap.sum(1), overlap.sum(0)
    covers = overlap >= 0.2 * np.maximum(t_area, 1)[:, None]
    covers[:, 0] = False
    split_truth = covers.sum(1) >= 2
    merge_pred = (overlap[1:] >= 0.3 * np.maximum(t_area[1:], 1)[:, None]).sum(0) >= 2
    fp_ids = np.setdiff1d(np.unique(pred[pred > 0]), p_ids)
    fn_ids = np.setdiff1d(np.unique(truth[truth > 0]), t_ids)
    out = {"tp": int(len(t_ids)), "fp": int(len(fp_ids)), "fn": int(len(fn_ids))}
    for kind, ids, on_other, main_of in (
            ("fp", fp_ids, lambda p: overlap[1:, p].sum() / p_area[p], lambda p: int(np.argmax(overlap[1:, p])) + 1),
            ("fn", fn_ids, lambda t: overlap[t, 1:].sum() / t_area[t], lambda t: int(np.argmax(overlap[t, 1:])) + 1)):
        counts = dict.fromkeys(("background" if kind == "fp" else "unseen", "merge", "split", "misshapen"), 0)
        for i in ids:
            main = main_of(i)
            pred_id, truth_id = (i, main) if kind == "fp" else (main, i)
            if on_other(i) < 0.2:
                counts["background" if kind == "fp" else "unseen"] += 1
            elif merge_pred[pred_id]:
                counts["merge"] += 1
            elif split_truth[truth_id]:
                counts["split"] += 1
            else:
                counts["misshapen"] += 1
        out.update({f"{kind}_{k}": v for k, v in counts.items()})
    return out


def held_out_slide(cache: Path, seed: int, style: str):
    """A held-out slide as ``scripts/eval_stardist.py`` makes it (same cache layout and condition)."""
    from tme_pipeline.segment.train.training import condition_for_seed
    from tme_pipeline.synth import load_truth, synth_slide
    from tme_pipeline.synth.slide import GENERATOR_VERSION

    folder = cache / f"gen{GENERATOR_VERSION}_{style}_{SLIDE_MM:g}mm"
    folder.mkdir(parents=True, exist_ok=True)
    path, truth_dir = folder / f"s{seed}.ome.tif", folder / f"s{seed}_truth"
    if path.is_file() and (truth_dir / "truth.json").is_file():
        return path, load_truth(truth_dir)
    cond = dataclasses.replace(condition_for_seed(seed), min_tls=1)
    return path, synth_slide(path, size_mm=(SLIDE_MM, SLIDE_MM), seed=seed, condition=cond, style=style,
                             truth_dir=truth_dir)


def read_channels(path: Path, markers: tuple[str, ...], window: tuple[slice, slice]) -> tuple[np.ndarray, float]:
    """(C, Y, X) float32 level-0 intensities of ``markers`` in ``window``, and the pixel size in µm."""
    from tme_pipeline.config import load_config
    from tme_pipeline.io.slides import open_slide
    from tme_pipeline.panel import match_panel

    slide = open_slide(path)
    config = load_config()
    panel = match_panel(slide.channel_names, config.panel, channel_map=config.channel_map, source=str(path))
    field = slide.levels[0][[panel.channels[m] for m in markers]][(slice(None), *window)].compute()
    return np.asarray(field, dtype=np.float32), slide.pixel_um


def square(centre_um: tuple[float, float], size_um: float, pixel_um: float, shape: tuple[int, int]):
    """A (rows, cols) window of ``size_um`` around (x, y) µm, shifted to lie inside ``shape``."""
    n = int(round(size_um / pixel_um))
    x0 = int(np.clip(round(centre_um[0] / pixel_um) - n // 2, 0, max(shape[1] - n, 0)))
    y0 = int(np.clip(round(centre_um[1] / pixel_um) - n // 2, 0, max(shape[0] - n, 0)))
    return slice(y0, y0 + n), slice(x0, x0 + n)


def nuclei_crop(path: Path, truth, centre_um: tuple[float, float], model) -> dict:
    """DAPI, truth and predicted nuclei of a CROP_UM square, segmented with CONTEXT_UM around it."""
    from tme_pipeline.io.slides import open_slide
    from tme_pipeline.segment.predict import segment_nuclei
    from tme_pipeline.synth import render_truth_labels

    shape = open_slide(path).shape_yx
    pixel_um = truth.pixel_um
    window = square(centre_um, CROP_UM, pixel_um, tuple(shape))
    c = int(round(CONTEXT_UM / pixel_um))
    outer = tuple(slice(max(w.start - c, 0), min(w.stop + c, n)) for w, n in zip(window, shape))
    (dapi,), _ = read_channels(path, ("DAPI",), outer)
    inner = tuple(slice(w.start - o.start, w.stop - o.start) for w, o in zip(window, outer))
    pred = segment_nuclei(dapi, pixel_um, model=model)[inner]
    return {"dapi": dapi[inner], "pred": pred, "truth": render_truth_labels(truth, window, kind="nuclei"),
            "pixel_um": pixel_um, "origin_um": (window[1].start * pixel_um, window[0].start * pixel_um)}


def crop_figure(crop: dict, title: str, out: Path, *, region=None) -> dict:
    """Write one outlined crop with its F1@0.5 in the title; return its counts and error breakdown.

    ``region``: optional (mask, µm per mask px) of a truth region whose edge is drawn dashed.
    """
    from tme_pipeline.segment.metrics import match_labels

    m = match_labels(crop["truth"], crop["pred"], iou_threshold=0.5)
    fig, ax = figure_for(*(ZOOM * np.array(crop["dapi"].shape[::-1])))
    show(ax, overlay(grey(crop["dapi"]), crop["truth"], crop["pred"], ZOOM), crop["pixel_um"], 20, ZOOM)
    if region is not None:
        mask, region_um = region
        x0, y0 = crop["origin_um"]
        h_um, w_um = (n * crop["pixel_um"] for n in crop["dapi"].shape)
        cols = np.arange(int(x0 // region_um), int((x0 + w_um) // region_um) + 1).clip(0, mask.shape[1] - 1)
        rows = np.arange(int(y0 // region_um), int((y0 + h_um) // region_um) + 1).clip(0, mask.shape[0] - 1)
        ax.contour((cols + 0.5) * region_um - x0, (rows + 0.5) * region_um - y0,
                   mask[np.ix_(rows, cols)].astype(float), levels=[0.5], colors="yellow", linestyles="--")
        ax.set_xlim(0, w_um), ax.set_ylim(h_um, 0)
    outline_legend(ax)
    ax.set_title(f"{title}\nF1@0.5 {m.f1:.2f} (P {m.precision:.2f}, R {m.recall:.2f}, {m.tp + m.fn} nuclei)",
                 fontsize=9)
    fig.tight_layout()
    save(fig, out, keep=(PRED_RGB, TRUTH_RGB))
    stats = {"f1": round(m.f1, 4), "precision": round(m.precision, 4), "recall": round(m.recall, 4),
             "origin_um": [round(v, 1) for v in crop["origin_um"]], **error_breakdown(crop["truth"], crop["pred"])}
    logger.info("%s: %s", out.name, stats)
    return stats


def largest_tls(truth):
    """The truth table row of the slide's largest TLS."""
    if not len(truth.tls):
        raise ValueError("slide has no TLS in its truth")
    return truth.tls.sort_values("area_um2", ascending=False).iloc[0]


def largest_tls_centre(truth) -> tuple[float, float]:
    row = largest_tls(truth)
    return float(row.x_um), float(row.y_um)


def border_centre(truth) -> tuple[float, float]:
    """Centre (x, y) µm of the margin pixel whose CROP_UM window is closest to half tumour."""
    from scipy.ndimage import uniform_filter

    tumour = truth.regions["tumor"].astype(np.float32)
    k = max(int(round(CROP_UM / truth.region_um)), 1)
    frac = uniform_filter(tumour, size=k, mode="constant")
    tissue = uniform_filter(truth.regions["tissue"].astype(np.float32), size=k, mode="constant")
    # penalise windows near the slide edge or off tissue, so the crop is all tissue
    score = np.abs(frac - 0.5) + (tissue < 0.95) + ~truth.regions["margin"]
    iy, ix = np.unravel_index(int(np.argmin(score)), score.shape)
    return (ix + 0.5) * truth.region_um, (iy + 0.5) * truth.region_um


def densest_window(labels: np.ndarray, size: int) -> tuple[slice, slice]:
    """The ``size`` square (or the whole image if smaller) with the most labelled pixels."""
    from scipy.ndimage import uniform_filter

    h, w = min(size, labels.shape[0]), min(size, labels.shape[1])
    frac = uniform_filter((labels > 0).astype(np.float32), size=(h, w), mode="constant")
    valid = frac[h // 2: labels.shape[0] - (h - 1 - h // 2), w // 2: labels.shape[1] - (w - 1 - w // 2)]
    y, x = np.unravel_index(int(np.argmax(valid)), valid.shape)
    return slice(y, y + h), slice(x, x + w)


def real_panel(model, real: Path, model_dir: Path, out: Path) -> list[dict]:
    """Four held-out real images (one per appearance cluster of the test images) with outlines."""
    import tifffile

    from tme_pipeline.segment.metrics import match_labels
    from tme_pipeline.segment.predict import segment_nuclei
    from tme_pipeline.segment.train.real import appearance_groups, read_index

    split_path = model_dir / "split.json"
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path}: missing; the model records its held-out images there")
    ids = json.loads(split_path.read_text())["images"]["test"]
    records = {r.image_id: r for r in read_index(real)}
    test = [records[i] for i in ids]
    clusters = appearance_groups(real, test, n_groups=4)
    fig, axes = figure_for(REAL_WINDOW_PX * 2, REAL_WINDOW_PX * 2, ncols=4, extra_w=0.4, extra_h=1.0)
    stats = []
    for ax, g in zip(axes, range(1, 5)):
        members = sorted((r for r, c in zip(test, clusters) if c == g), key=lambda r: (r.n_nuclei, r.image_id))
        rec = members[len(members) // 2]  # the median crowding of its cluster
        img = tifffile.imread(real / "images" / f"{rec.image_id}.tif")
        truth = tifffile.imread(real / "masks" / f"{rec.image_id}.tif")
        pixel_um = NUCLEUS_UM / rec.median_diameter_px
        pred = segment_nuclei(img, pixel_um, model=model)
        m = match_labels(truth, pred, iou_threshold=0.5)
        # draw the REAL_WINDOW_PX square with the most truth nuclei pixels (scores are the whole image's)
        win = densest_window(truth, REAL_WINDOW_PX)
        show(ax, overlay(grey(img)[win], truth[win], pred[win], 2), pixel_um, 10, 2)
        ax.set_title(f"{rec.image_id[:8]} (1 of {len(members)} alike)\nwhole image: F1@0.5 {m.f1:.2f}, "
                     f"{m.tp + m.fn} nuclei", fontsize=8)
        stats.append({"image_id": rec.image_id, "pixel_um": round(pixel_um, 4), "f1": round(m.f1, 4),
                      **error_breakdown(truth, pred)})
    outline_legend(axes[-1])
    fig.suptitle("Real held-out nuclei (test groups), predicted vs hand-drawn; pixel size set for 8 µm nuclei",
                 fontsize=10)
    fig.tight_layout()
    save(fig, out, keep=(PRED_RGB, TRUTH_RGB))
    logger.info("%s: %s", out.name, stats)
    return stats


def phenotype_figure(pipeline_out: Path, out: Path) -> dict:
    """CD20/CD3/DAPI composite over the largest truth TLS with cell centroids by phenotype."""
    import pandas as pd

    from tme_pipeline import open_results
    from tme_pipeline.io.slides import open_slide
    from tme_pipeline.synth import load_truth

    manifest = pd.read_csv(pipeline_out / "manifest.csv")
    results = open_results(pipeline_out / "out")
    best = None
    for slide_rel in manifest["slide"]:
        slide_id = Path(slide_rel).name.removesuffix(".ome.tif")
        truth = load_truth(pipeline_out / "truth" / slide_id)
        if len(truth.tls) and (best is None or truth.tls["area_um2"].max() > best[2].tls["area_um2"].max()):
            best = (slide_id, pipeline_out / slide_rel, truth)
    if best is None:
        raise ValueError(f"{pipeline_out}: no slide has a TLS in its truth")
    slide_id, path, truth = best
    centre = largest_tls_centre(truth)
    size_um = 2 * CROP_UM
    window = square(centre, size_um, truth.pixel_um, tuple(open_slide(path).shape_yx))
    field, pixel_um = read_channels(path, ("CD20", "CD3", "DAPI"), window)
    rgb = np.zeros((*field.shape[1:], 3), np.float32)
    for k, channel in enumerate(field):
        lo, hi = np.percentile(channel, (0.5, 99.7))
        rgb[..., k] = np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1)
    cells = results.slide(slide_id).cells()
    xy = np.asarray(cells.obsm["spatial"]) - np.array([window[1].start, window[0].start]) * pixel_um
    w_um, h_um = rgb.shape[1] * pixel_um, rgb.shape[0] * pixel_um
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w_um) & (xy[:, 1] >= 0) & (xy[:, 1] < h_um)
    phen = cells.obs["phenotype"].astype(str).to_numpy()[inside]
    xy = xy[inside]
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 5.0), dpi=DPI)
    for ax in axes:
        show(ax, rgb * (0.35 if ax is axes[1] else 1.0), pixel_um, 50)
    names, counts = np.unique(phen, return_counts=True)
    handles = []
    for name in names[np.argsort(-counts)]:
        colour = PHENOTYPE_COLOURS.get(name, "#bbbbbb")
        sel = phen == name
        axes[1].scatter(xy[sel, 0], xy[sel, 1], s=9, c=colour, linewidths=0)
        handles.append(Line2D([], [], marker="o", ls="", color=colour, label=f"{name} ({sel.sum()})"))
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="phenotype")
    axes[0].set_title("CD20 red, CD3 green, DAPI blue", fontsize=9)
    axes[1].set_title("cell centroids by phenotype (tme run)", fontsize=9)
    fig.suptitle(f"{slide_id}: largest truth TLS (maturity {largest_tls(truth).maturity}), {size_um:g} µm field",
                 fontsize=10)
    fig.tight_layout()
    save(fig, out, keep=tuple(PHENOTYPE_COLOURS.values()))
    stats = {"slide": slide_id, "centre_um": [round(v, 1) for v in centre],
             "counts": {str(n): int(c) for n, c in zip(names, counts)}}
    logger.info("%s: %s", out.name, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("docs/images"))
    ap.add_argument("--model", type=Path, default=Path("models/stardist_fluo_real"))
    ap.add_argument("--seed", type=int, default=SEED0, help="generator seed of the held-out synthetic slide")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tme_stardist_synth"),
                    help="held-out slides, shared with scripts/eval_stardist.py")
    ap.add_argument("--real", type=Path, default=Path("../shared/data/dsb2018-fluo-train"))
    ap.add_argument("--pipeline-out", type=Path, default=None,
                    help="folder of `tme synth --patients 1 --seed 11 --size-mm 1.5 1.5` with `tme run` in out/")
    ap.add_argument("--only", nargs="*", default=None, choices=("tls", "border", "real", "phenotypes"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from tme_pipeline.segment.weights import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    todo = set(args.only or ("tls", "border", "real", "phenotypes"))
    model = load_model(args.model) if todo - {"phenotypes"} else None
    report = {}
    if "tls" in todo:
        for style in ("default", "external_lab"):
            path, truth = held_out_slide(args.cache, args.seed, style)
            crop = nuclei_crop(path, truth, largest_tls_centre(truth), model)
            report[f"tls_{style}"] = crop_figure(crop, f"TLS core, held-out slide s{args.seed}, {style} style",
                                                 args.out_dir / f"nuclei_tls_{style}.png")
    if "border" in todo:
        path, truth = held_out_slide(args.cache, args.seed, "default")
        crop = nuclei_crop(path, truth, border_centre(truth), model)
        report["tumour_border"] = crop_figure(crop, f"Tumour border (yellow dashes), held-out slide s{args.seed}, "
                                              "default style", args.out_dir / "nuclei_tumour_border.png",
                                              region=(truth.regions["tumor"], truth.region_um))
    if "real" in todo:
        report["real"] = real_panel(model, args.real, args.model, args.out_dir / "nuclei_real_heldout.png")
    if "phenotypes" in todo:
        if args.pipeline_out is None:
            raise ValueError("--pipeline-out is needed for the phenotype picture")
        report["phenotypes"] = phenotype_figure(args.pipeline_out, args.out_dir / "phenotypes_follicle.png")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
