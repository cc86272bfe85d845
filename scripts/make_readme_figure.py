"""Draw the README picture: a false-colour field of a slide beside the nuclei the run found.

Usage::

    python scripts/make_readme_figure.py demo/data/slides/P01_post.ome.tif \
        demo/out/slides/P01_post --out docs/images/demo.png [--field-um 400] [--center-um X Y]

Left: DAPI blue, CD3 green, CD20 red, SATB2 yellow, CD8 magenta. Right: the same field
with the outlines of the segmented nuclei in white.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from skimage.io import imsave
from skimage.segmentation import find_boundaries

from tme_pipeline.config import load_config
from tme_pipeline.io.slides import open_slide
from tme_pipeline.panel import match_panel
from tme_pipeline.results import SlideResults

# marker -> RGB colour of its channel in the composite
COLOURS = {
    "DAPI": (0.15, 0.35, 1.0),
    "CD3": (0.0, 1.0, 0.0),
    "CD20": (1.0, 0.1, 0.1),
    "SATB2": (1.0, 0.85, 0.0),
    "CD8": (1.0, 0.0, 1.0),
}


def composite(field: np.ndarray, markers: list[str]) -> np.ndarray:
    """(C, Y, X) intensities -> (Y, X, 3) float RGB, each channel scaled to its 0.5–99.7 percentiles."""
    rgb = np.zeros((*field.shape[1:], 3))
    for channel, marker in zip(field, markers):
        lo, hi = np.percentile(channel, (0.5, 99.7))
        scaled = np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb += scaled[..., None] * np.asarray(COLOURS[marker])
    return np.clip(rgb, 0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", type=Path)
    parser.add_argument("slide_out", type=Path, help="OUT/slides/<slide_id>")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--field-um", type=float, default=400.0)
    parser.add_argument("--center-um", type=float, nargs=2, default=None, metavar=("X", "Y"))
    args = parser.parse_args(argv)

    slide = open_slide(args.slide)
    config = load_config()
    panel = match_panel(slide.channel_names, config.panel, channel_map=config.channel_map, source=str(args.slide))
    markers = [m for m in COLOURS if m in panel.channels]
    half = int(args.field_um / slide.pixel_um / 2)
    if args.center_um:
        cx, cy = (int(v / slide.pixel_um) for v in args.center_um)
    else:
        cy, cx = (s // 2 for s in slide.shape_yx)
    y0, x0 = max(cy - half, 0), max(cx - half, 0)
    window = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
    field = np.asarray(slide.levels[0][[panel.channels[m] for m in markers]][(slice(None), *window)].compute())
    labels = np.asarray(SlideResults(args.slide_out.name, args.slide_out).labels("nuclei")[window])

    rgb = composite(field.astype(np.float32), markers)
    outlined = rgb.copy()
    outlined[find_boundaries(labels, mode="inner")] = 1.0
    gap = np.ones((rgb.shape[0], 8, 3))
    picture = (np.concatenate([rgb, gap, outlined], axis=1) * 255).astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    imsave(args.out, picture, check_contrast=False)
    print(f"wrote {args.out}: {args.field_um:.0f} µm field at ({x0 * slide.pixel_um:.0f}, {y0 * slide.pixel_um:.0f}) µm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
