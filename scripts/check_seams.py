"""Seams check: a synthetic region segmented as one piece and as tiles must give the same nuclei.

Usage::

    python scripts/check_seams.py --size-mm 3 3 --out seams.json [--method stardist|classic]

The DAPI channel of a synthetic slide is segmented twice with the same slide-wide
parameters: once as a single image (``segment_nuclei`` / the classic segmenter on the
whole array) and once through the tiling stage with the default tile size and
overlap. Reported: objects of each, the share matched at IoU >= 0.9 and >= 0.5, and
the tiled objects that touch a tile seam yet match nothing at IoU >= 0.5 ("cut").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import zarr

from tme_pipeline.config import load_config
from tme_pipeline.stages import segmentation_function
from tme_pipeline.segment.metrics import match_labels, overlap_table
from tme_pipeline.synth import synth_slide
from tme_pipeline.tiling import segment_tiled, tile_grid


def _matched_ids(truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float) -> np.ndarray:
    """Ids of ``pred`` objects overlapping some ``truth`` object at IoU >= the threshold."""
    pairs, inter, ids_a, ids_b = overlap_table(truth, pred)
    area_a = np.bincount(truth.ravel())[pairs[:, 0]]
    area_b = np.bincount(pred.ravel())[pairs[:, 1]]
    iou = inter / (area_a + area_b - inter)
    return np.unique(pairs[iou >= iou_threshold, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mm", type=float, nargs=2, default=(3.0, 3.0), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--method", choices=("stardist", "classic"), default="stardist")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    config = load_config()
    config = config.model_copy(
        update={"segmentation": config.segmentation.model_copy(update={"method": args.method})}
    )
    work = Path(tempfile.mkdtemp(prefix="tme-seams-"))
    slide_path = work / "seams.ome.tif"
    synth_slide(slide_path, size_mm=tuple(args.size_mm), seed=args.seed)
    with tifffile.TiffFile(slide_path) as tif:
        dapi = tif.series[0].levels[0].asarray()[0]
        lowres = tif.series[0].levels[-1].asarray()[0].astype(np.float32)
    pixel_um = 0.5
    segment = segmentation_function(config, pixel_um=pixel_um, nuclear_lowres=lowres)

    t0 = time.perf_counter()
    whole = segment(dapi)
    t_whole = time.perf_counter() - t0

    seg = config.segmentation
    grid = tile_grid(dapi.shape, pixel_um=pixel_um, tile_um=seg.tile_um, overlap_um=seg.overlap_um)
    t0 = time.perf_counter()
    store = zarr.open_group(str(work / "labels.zarr"), mode="w")
    result = segment_tiled(da.from_array(dapi, chunks=1024), segment, grid=grid, store=store, component="0")
    tiled = np.asarray(result.labels[:])
    t_tiled = time.perf_counter() - t0

    strict = match_labels(whole, tiled, iou_threshold=0.9)
    loose = match_labels(whole, tiled, iou_threshold=0.5)
    seams = np.zeros(dapi.shape, dtype=bool)
    for tile in grid.tiles:
        y0, x0, y1, x1 = tile.core
        seams[y0, x0:x1] = seams[y1 - 1, x0:x1] = seams[y0:y1, x0] = seams[y0:y1, x1 - 1] = True
    touching = np.unique(tiled[seams & (tiled > 0)])
    cut = np.setdiff1d(touching, _matched_ids(whole, tiled, iou_threshold=0.5))
    report = {
        "method": args.method,
        "size_mm": list(args.size_mm),
        "shape_px": list(dapi.shape),
        "tiles": grid.n_tiles,
        "tile_um": seg.tile_um,
        "overlap_um": seg.overlap_um,
        "objects_whole": int(np.unique(whole[whole > 0]).size),
        "objects_tiled": int(result.n_objects),
        "matched_iou0.9_fraction": round(strict.tp / max(strict.tp + strict.fn, 1), 5),
        "matched_iou0.5_fraction": round(loose.tp / max(loose.tp + loose.fn, 1), 5),
        "objects_touching_seams": int(len(touching)),
        "seam_objects_unmatched": int(cut.size),
        "seconds_whole": round(t_whole, 1),
        "seconds_tiled": round(t_tiled, 1),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
