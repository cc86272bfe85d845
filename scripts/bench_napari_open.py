"""Time to first picture and peak memory of opening a slide's result folder in napari.

Each folder is opened in a fresh Python process: the napari viewer is created and shown, its
peak RSS reset (``/proc/self/clear_refs``), then the reader's layers are built
(:func:`tme_napari.layers.result_folder_layers`, what ``viewer.open(folder, plugin="tme-napari")``
runs) and added one by one, timed per layer type, until the first screenshot of the canvas is
drawn (every layer at the zoom that shows the whole slide). Peak RSS is that of the open
(Linux ``VmHWM``). Run it under ``xvfb-run -a``.

A larger result folder can be made from a finished one by tiling it ``k x k`` (labels with
offset ids, cells with offset positions and ids, regions and TLS shifted) over a slide file
of the matching size (e.g. ``tme synth --size-mm 6 6``): the reader then sees k² times the
cells and k² times the pixels, which is what its cost depends on.

    xvfb-run -a .venv/bin/python scripts/bench_napari_open.py OUT2/slides/P01_pre \\
        --tile 3 --tile-slide c6/slides/P01_pre.ome.tif --tile-out /tmp/tiled --json bench.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(folder: str, without: tuple[str, ...] = (), window: tuple[int, int] = (1200, 900)) -> dict:
    import napari

    from tme_napari.layers import result_folder_layers

    viewer = napari.Viewer(show=True)
    viewer.window.resize(*window)  # the canvas is what the docks leave of it
    viewer.screenshot(canvas_only=True, flash=False)  # the empty canvas drawn once: startup is not counted
    before_mb = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) restarts from here
    start, cpu_start = time.perf_counter(), time.process_time()
    # What the reader does (viewer.open(folder, plugin="tme-napari")), step by step to time each part.
    layers = [layer for layer in result_folder_layers(folder) if layer[2] not in without]
    read = time.perf_counter() - start
    added = {}
    for data, kwargs, kind in layers:
        t0 = time.perf_counter()
        getattr(viewer, f"add_{kind}")(data, **kwargs)
        added[kind] = added.get(kind, 0.0) + time.perf_counter() - t0
    viewer.reset_view()
    picture = viewer.screenshot(canvas_only=True, flash=False)
    first = time.perf_counter() - start
    points = next((ly for ly in viewer.layers if ly.name == "cells (phenotype)"), None)
    images = [layer for layer in viewer.layers if layer._type_string == "image" and layer.multiscale] or [None]
    result = {"folder": folder, "without": list(without), "window": list(window),
              "canvas_yx": [int(v) for v in viewer.canvas.size], "n_layers": len(viewer.layers),
              "n_cells": None if points is None else int(points.metadata.get("n_cells", len(points.data))),
              "n_points_shown": 0 if points is None else int(len(points.data)),
              "slide_extent_um": None if images[0] is None
              else [float(v) for v in images[0].extent.world[1] - images[0].extent.world[0]],
              "data_level_shown": None if images[0] is None else int(images[0].data_level),
              "level_shape_shown": None if images[0] is None else [int(v) for v in
                                                                   images[0].level_shapes[images[0].data_level]],
              "n_levels": None if images[0] is None else len(images[0].data),
              "seconds_layer_data": round(read, 2),
              "seconds_add_by_type": {k: round(v, 2) for k, v in added.items()},
              "seconds_to_first_picture": round(first, 2), "picture_nonblank": bool(picture[..., :3].max() > 0),
              "rss_mb_before_open": round(before_mb, 1), "peak_rss_mb_during_open": round(_rss_mb("VmHWM"), 1)}
    result["peak_rss_mb_over_before"] = round(result["peak_rss_mb_during_open"] - before_mb, 1)
    result["cpu_seconds_open"] = round(time.process_time() - cpu_start, 2)
    viewer.close()
    return result


def _measure_points(n: int) -> dict:
    """What a napari Points layer of ``n`` cells costs: add + first picture, CPU and peak RSS over before."""
    import napari
    import numpy as np
    import pandas as pd

    from tme_napari.cells_view import CellTable, points_kwargs

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1200, 900)
    viewer.screenshot(canvas_only=True, flash=False)
    rng = np.random.default_rng(0)
    side = float(np.sqrt(n / 3000.0)) * 1000.0  # 3000 cells/mm², a tissue-like density
    table = CellTable.from_obs(pd.DataFrame({
        "x_um": rng.random(n) * side, "y_um": rng.random(n) * side,
        "phenotype": pd.Categorical.from_codes(rng.integers(0, 6, n),
                                               ["CD8_T", "CD4_T", "Treg", "B", "tumor", "other"]),
    }))
    before_mb = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    cpu, start = time.process_time(), time.perf_counter()
    data, kwargs = points_kwargs(table, np.arange(n))
    viewer.add_points(data, **kwargs)
    viewer.reset_view()
    viewer.screenshot(canvas_only=True, flash=False)
    result = {"n_points": n, "seconds_to_first_picture": round(time.perf_counter() - start, 2),
              "cpu_seconds": round(time.process_time() - cpu, 2),
              "peak_rss_mb_over_before": round(_rss_mb("VmHWM") - before_mb, 1)}
    viewer.close()
    return result


def tile_result_folder(src: Path, dst: Path, k: int, slide: Path) -> Path:
    """A result folder of ``k x k`` copies of ``src`` over ``slide`` (which should be k times as large)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import zarr

    from tme_pipeline.geojson import feature_collection, write_geojson
    from tme_pipeline.io.labels import create_labels_zarr, write_label_pyramid
    from tme_pipeline.io.slides import open_slide
    from tme_pipeline.results import (
        CELLS,
        LABELS,
        REGIONS_GEOJSON,
        REGIONS_NPZ,
        STAGES_JSON,
        TLS_GEOJSON,
        SlideResults,
    )

    results = SlideResults(src.name, src)
    cells = results.cells()
    info = dict(cells.uns["slide"])
    pixel_um = float(info["pixel_um"])
    nuclei = results.labels("nuclei")
    h, w = nuclei.shape
    big = open_slide(slide)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / STAGES_JSON).write_text((src / STAGES_JSON).read_text())
    root = create_labels_zarr(dst / LABELS, shape_yx=(max(big.shape_yx[0], k * h), max(big.shape_yx[1], k * w)),
                              pixel_um=pixel_um, chunk_px=1024)
    offset_id = int(cells.obs["cell_id"].max())
    for name in ("nuclei", "cells"):
        level0 = np.asarray(zarr.open_group(str(src / LABELS), mode="r")[f"labels/{name}/0"])
        for t in range(k * k):
            ty, tx = divmod(t, k)
            root[f"labels/{name}/0"][ty * h:(ty + 1) * h, tx * w:(tx + 1) * w] = np.where(
                level0 > 0, level0 + t * offset_id, 0).astype(np.uint32)
        write_label_pyramid(root, name, pixel_um=pixel_um)
    copies = []
    for t in range(k * k):
        ty, tx = divmod(t, k)
        part = cells.copy()
        part.obs["x_um"] = part.obs["x_um"] + tx * w * pixel_um
        part.obs["y_um"] = part.obs["y_um"] + ty * h * pixel_um
        part.obs["cell_id"] = part.obs["cell_id"] + t * offset_id
        part.obs_names = [f"{t}_{n}" for n in part.obs_names]
        copies.append(part)
    tiled = ad.concat(copies, merge="first")
    tiled.obs["phenotype"] = pd.Categorical(tiled.obs["phenotype"], categories=cells.obs["phenotype"].cat.categories)
    tiled.uns["slide"] = {**info, "path": str(slide), "shape_yx": list(big.shape_yx),
                          "channels": list(big.channel_names)}
    tiled.write_h5ad(dst / CELLS)
    if (src / REGIONS_NPZ).is_file():
        with np.load(src / REGIONS_NPZ, allow_pickle=False) as z:
            names = [str(n) for n in z["mask_names"]]
            np.savez_compressed(dst / REGIONS_NPZ, mask_names=z["mask_names"], grid_um=z["grid_um"],
                                **{f"mask_{n}": np.tile(z[f"mask_{n}"], (k, k)) for n in names})
    for name in (REGIONS_GEOJSON, TLS_GEOJSON):
        collection = json.loads((src / name).read_text())
        features = []
        for t in range(k * k):
            ty, tx = divmod(t, k)
            for feature in collection["features"]:
                shifted = json.loads(json.dumps(feature))
                shifted["geometry"]["coordinates"] = _shift(shifted["geometry"]["coordinates"], tx * w, ty * h)
                features.append(shifted)
        write_geojson(dst / name, feature_collection(features, pixel_um=pixel_um))
    return dst


def _shift(coords, dx, dy):
    if coords and isinstance(coords[0], (int, float)):
        return [coords[0] + dx, coords[1] + dy]
    return [_shift(c, dx, dy) for c in coords]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="slide result folders OUT/slides/<id>")
    parser.add_argument("--tile", type=int, default=0, help="also open the first folder tiled k x k")
    parser.add_argument("--tile-slide", type=Path, help="slide file k times the size, for --tile")
    parser.add_argument("--tile-out", type=Path, default=Path("/tmp/bench_napari_tiled"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--window", nargs=2, type=int, default=[1200, 900], metavar=("W", "H"),
                        help="viewer window size, px (the canvas is what the docks leave of it)")
    parser.add_argument("--without", nargs="*", default=[], metavar="TYPE",
                        help="leave out layers of these types (image, labels, shapes, points)")
    parser.add_argument("--points", nargs="*", type=int, default=[], metavar="N",
                        help="also measure a Points layer of N cells alone (RSS and CPU against N)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--measure-points", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, tuple(args.without), tuple(args.window))))
        return
    if args.measure_points:
        print(json.dumps(_measure_points(args.measure_points)))
        return
    folders = list(args.folders)
    if args.tile:
        if not (args.tile_out / "cells.h5ad").is_file():
            tile_result_folder(Path(folders[0]), args.tile_out, args.tile, args.tile_slide)
        folders.append(str(args.tile_out))
    runs = []
    for folder in folders:
        for _ in range(args.repeats):
            done = subprocess.run([sys.executable, __file__, "--measure", folder, "--window", *map(str, args.window),
                                   "--without", *args.without],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]))
    points = []
    for n in args.points:
        done = subprocess.run([sys.executable, __file__, "--measure-points", str(n)],
                              capture_output=True, text=True, check=True)
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(points[-1]))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "points_layer": points, "summary": _summary(runs)},
                                        indent=2) + "\n")


def _summary(runs: list[dict]) -> dict:
    """Per folder the best of its repeats, and the largest over the smallest (by cell count, then extent)."""
    best = {}
    for run in runs:
        b = best.setdefault(run["folder"], dict(run))
        for key in ("seconds_to_first_picture", "cpu_seconds_open", "peak_rss_mb_during_open",
                    "peak_rss_mb_over_before"):
            b[key] = min(b[key], run[key])
    rows = sorted(best.values(), key=lambda r: (r["n_cells"] or 0, r["slide_extent_um"] or [0.0]))
    out = {"folders": [{k: r[k] for k in ("folder", "n_cells", "n_points_shown", "slide_extent_um",
                                          "seconds_to_first_picture", "cpu_seconds_open",
                                          "peak_rss_mb_during_open", "peak_rss_mb_over_before")} for r in rows]}
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        out["largest_over_smallest"] = {
            key: round(large[key] / small[key], 2) if small[key] else None
            for key in ("n_cells", "seconds_to_first_picture", "cpu_seconds_open", "peak_rss_mb_during_open",
                        "peak_rss_mb_over_before")}
    return out


if __name__ == "__main__":
    main()
