"""Benchmark: our StarDist (PyTorch) against the official one (TensorFlow), same weights.

Two modes.

``--mode process`` (default; what issue 15 asks)::

    .venv/bin/python scripts/bench_segment.py --out bench_out/segment.json --repeats 3

Whole processes, start to label file written, on the same DAPI images (a 3000 × 4000
and a 4096 × 4096 crop of synthetic slides at 0.5 µm/px, written as OME-TIFF): ours is
the command a user runs, ``tme segment IMAGE --out LABELS.tif --model MODEL``; the
official is a script in ``.venv-tf`` that reads the TIFF (tifffile), normalises
(csbdeep ``normalize(img, 1, 99.8)``), runs ``StarDist2D.predict_instances`` tiled as
we tile (``n_tiles`` = our tile grid's tiles per axis) and writes the labels with
tifffile (zlib), as a user's script would. Runs alternate ours / official within one
run (after ``--warmup`` untimed runs of each, so that both find their files in the
page cache); each run is one fresh process whose wall time, CPU seconds (user +
system) and peak RSS are read from the kernel by a wrapper process. The labels of
the two are compared (F1 at IoU 0.5 and 0.9).

``--mode inprocess`` (sessions 2-3)::

    .venv/bin/python scripts/bench_segment.py --mode inprocess --out bench_out/segment_inprocess.json

Both segment the same 4096×4096 DAPI image in one warm process each: percentile
normalisation (1, 99.8), net, NMS, rendering; ours ``segment_nuclei`` in this
environment, the official ``StarDist2D.predict_instances`` in ``.venv-tf``. Wall and
CPU seconds are the minimum over ``--repeats`` runs in one process, after a warm-up
on a 512×512 crop.

The model is an official Keras folder (default: the one ``make_stardist_reference.py``
trains), which ours loads with ``load_model``. The worker parts of this script run
under either interpreter, so its module-level imports stay within numpy and the
standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4096, 4096)
PIXEL_UM = 0.5
# Images of the whole-process mode, (Y, X) px.
PROCESS_SHAPES = ((3000, 4000), (4096, 4096))
# Runs one command in a fresh interpreter and reports it alone: RUSAGE_CHILDREN of a
# process that has waited for nothing else is exactly that command's CPU time and peak RSS.
_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "wall = time.perf_counter() - t\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'returncode': code, 'seconds': round(wall, 2), 'cpu_seconds': round(r.ru_utime + r.ru_stime, 2),"
    " 'peak_rss_mb': round(r.ru_maxrss / 1024, 1)}))\n"
)


def _worker(impl: str, image_path: Path, model_dir: Path, labels_path: Path, *, n_tiles: int, repeats: int,
            precision: str, tile_px: int | None) -> dict:
    image = np.load(image_path)
    t0 = time.perf_counter()
    if impl == "ours":
        import torch

        from tme_pipeline.segment._infer import cpu_has_native_bf16, inference_settings
        from tme_pipeline.segment.predict import segment_nuclei
        from tme_pipeline.segment.weights import load_model

        model = load_model(model_dir)

        def run(img):
            return segment_nuclei(img, PIXEL_UM, model=model, device="cpu", precision=precision, tile_px=tile_px)

        info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "precision": precision,
                "autocast_dtype": inference_settings("cpu", precision=precision).autocast_dtype or "float32",
                "cpu_native_bf16": cpu_has_native_bf16(), "tile_px": tile_px}
    else:
        import tensorflow as tf
        from csbdeep.utils import normalize
        from stardist.models import StarDist2D

        model = StarDist2D(None, name=model_dir.name, basedir=str(model_dir.parent))

        def run(img):
            tiles = None if n_tiles == 1 else (n_tiles, n_tiles)
            return model.predict_instances(normalize(img, 1, 99.8), n_tiles=tiles, show_tile_progress=False)[0]

        info = {"tensorflow": tf.__version__, "n_tiles": n_tiles,
                "threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(image[:512, :512])
    t_warm = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        labels = run(image)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        walls.append(round(t1 - t0, 2))
        # CPU time (user + system) is less disturbed than wall time by other
        # processes sharing the cores.
        cpus.append(round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2))
    np.save(labels_path, labels.astype(np.int32))
    return {"impl": impl, "seconds": min(walls), "seconds_all": walls, "cpu_seconds": min(cpus),
            "cpu_seconds_all": cpus, "load_seconds": round(t_load, 2),
            "warmup_seconds": round(t_warm, 2), "n_objects": int(labels.max()),
            # Linux reports ru_maxrss in KiB.
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **info}


def _official_cli(image_path: Path, model_dir: Path, labels_path: Path, n_tiles: tuple[int, int]) -> None:
    """What a user of the official StarDist writes: read, normalise, predict tiled, write."""
    import tifffile
    from csbdeep.utils import normalize
    from stardist.models import StarDist2D

    image = tifffile.imread(image_path)
    model = StarDist2D(None, name=model_dir.name, basedir=str(model_dir.parent))
    tiles = None if n_tiles == (1, 1) else n_tiles
    labels, _ = model.predict_instances(normalize(image, 1, 99.8), n_tiles=tiles, show_tile_progress=False)
    tifffile.imwrite(labels_path, labels.astype(np.uint32), compression="zlib")


def _synth_dapi(shape: tuple[int, int], seed: int) -> np.ndarray:
    """(Y, X) uint16 DAPI of a synthetic slide of at least ``shape`` at PIXEL_UM, cropped."""
    import tifffile

    from tme_pipeline.synth import synth_slide

    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "bench.ome.tif"
        synth_slide(slide, size_mm=(shape[1] * PIXEL_UM / 1000, shape[0] * PIXEL_UM / 1000), seed=seed,
                    pixel_um=PIXEL_UM)
        with tifffile.TiffFile(slide) as tif:
            dapi = tif.series[0].levels[0].asarray()[0]
    if dapi.shape[0] < shape[0] or dapi.shape[1] < shape[1]:
        raise ValueError(f"synthetic slide of {dapi.shape} px is smaller than {shape}")
    return np.ascontiguousarray(dapi[: shape[0], : shape[1]])


def _timed(cmd: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], env=env, capture_output=True, text=True)
    res = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {"returncode": -1}
    if res["returncode"] != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return res


def _process_mode(args, model: Path, work: Path, tf_python: Path, env_tf: dict) -> dict:
    import tifffile

    from tme_pipeline.config import load_config
    from tme_pipeline.segment.metrics import match_labels
    from tme_pipeline.tiling import tile_grid

    seg = load_config(args.config).segmentation
    tme = str(Path(sys.executable).with_name("tme"))
    env_ours = {**os.environ, "PYTHONPATH": str(ROOT)}
    env_official = {**env_tf, "PYTHONPATH": str(ROOT)}
    report = {"mode": "process", "model": str(model), "cpu_count": os.cpu_count(), "repeats": args.repeats,
              "warmup": args.warmup, "images": []}
    for shape in args.shapes:
        image = work / f"dapi_{shape[0]}x{shape[1]}_seed{args.seed}.ome.tif"
        if not image.is_file():
            tifffile.imwrite(image, _synth_dapi(shape, args.seed), ome=True, compression="zlib",
                             metadata={"axes": "YX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeXUnit": "µm",
                                       "PhysicalSizeY": PIXEL_UM, "PhysicalSizeYUnit": "µm"})
        grid = tile_grid(shape, pixel_um=PIXEL_UM, tile_um=seg.tile_um, overlap_um=seg.overlap_um)
        n_tiles = tuple(-(-n // grid.tile_px) for n in shape)
        out = {impl: work / f"labels_{shape[0]}x{shape[1]}_{impl}.tif" for impl in ("ours", "official")}
        cmds = {
            "ours": [tme, "segment", str(image), "--out", str(out["ours"]), "--model", str(model), "-q"]
            + (["--config", str(args.config)] if args.config else []),
            "official": [str(tf_python), __file__, "--official-cli", "--image", str(image), "--model", str(model),
                         "--labels", str(out["official"]), "--n-tiles", *map(str, n_tiles)],
        }
        envs = {"ours": env_ours, "official": env_official}
        runs = {"ours": [], "official": []}
        for i in range(args.warmup + args.repeats):
            for impl in ("ours", "official"):
                res = _timed(cmds[impl], envs[impl])
                if i >= args.warmup:
                    runs[impl].append(res)
                print(f"{shape} {impl} run {i}: {res}", file=sys.stderr, flush=True)
        ours, theirs = (tifffile.imread(out[i]) for i in ("ours", "official"))
        entry = {"shape_yx": list(shape), "pixel_um": PIXEL_UM, "image": str(image),
                 "tile_px": grid.tile_px, "overlap_px": grid.overlap_px, "official_n_tiles": list(n_tiles),
                 "n_objects": {"ours": int(len(np.unique(ours)) - 1), "official": int(len(np.unique(theirs)) - 1)}}
        for impl in ("ours", "official"):
            entry[impl] = {key: [r[key] for r in runs[impl]] for key in ("seconds", "cpu_seconds", "peak_rss_mb")}
            entry[impl].update({f"min_{key}": min(entry[impl][key]) for key in ("seconds", "cpu_seconds")})
        for key in ("seconds", "cpu_seconds"):
            entry[f"ratio_min_{key}_ours_over_official"] = round(
                entry["ours"][f"min_{key}"] / entry["official"][f"min_{key}"], 3)
        for t in (0.5, 0.9):
            entry[f"agreement_f1_iou{t}"] = round(match_labels(theirs, ours, iou_threshold=t).f1, 4)
        report["images"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k.startswith(("ratio", "agree", "n_obj"))}),
              file=sys.stderr, flush=True)
    return report


def _make_image(path: Path, seed: int) -> str:
    try:
        import tifffile

        from tme_pipeline.synth import synth_slide

        with tempfile.TemporaryDirectory() as tmp:
            side_mm = SHAPE[0] * PIXEL_UM / 1000
            slide = Path(tmp) / "bench.ome.tif"
            synth_slide(slide, size_mm=(side_mm, side_mm), seed=seed, pixel_um=PIXEL_UM)
            with tifffile.TiffFile(slide) as tif:
                dapi = tif.series[0].levels[0].asarray()[0]
        source = "tme_pipeline.synth (DAPI, level 0)"
    except ImportError:
        sys.path.insert(0, str(ROOT / "tests"))
        from blobs import make_nuclei

        dapi = (make_nuclei(SHAPE, pixel_um=PIXEL_UM, seed=seed)[0] * 20000).clip(0, 65535).astype(np.uint16)
        source = "tests/blobs.py make_nuclei"
    np.save(path, dapi[: SHAPE[0], : SHAPE[1]])
    return source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("process", "inprocess"), default="process",
                    help="process: whole `tme segment` vs a whole official script, both images (default); "
                    "inprocess: the segmentation call alone, in warm processes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "segment.json")
    ap.add_argument("--config", type=Path, help="process mode: YAML for `tme segment --config` (tile size)")
    ap.add_argument("--warmup", type=int, default=1, help="process mode: untimed runs of each first")
    ap.add_argument("--shapes", nargs="+", type=lambda v: tuple(int(n) for n in v.lower().split("x")),
                    default=PROCESS_SHAPES, help="process mode: image sizes, YxX px (default 3000x4000 4096x4096)")
    ap.add_argument("--model", type=Path, help="official StarDist 2D folder (default: train the reference one)")
    ap.add_argument("--venv-tf", type=Path, default=ROOT / ".venv-tf")
    ap.add_argument("--official-n-tiles", type=int, default=1, help="n_tiles per axis for the official run")
    ap.add_argument("--only", choices=("ours", "official"))
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per implementation (min reported)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="ours: arithmetic of the net (auto: segment_nuclei's default on this CPU)")
    ap.add_argument("--tile-px", type=int, help="ours: patch core size (default: segment_nuclei's)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--worker", choices=("ours", "official"), help=argparse.SUPPRESS)
    ap.add_argument("--official-cli", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n-tiles", type=int, nargs=2, default=(1, 1), help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--labels", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.official_cli:
        _official_cli(args.image, args.model, args.labels, tuple(args.n_tiles))
        return
    if args.worker:
        res = _worker(args.worker, args.image, args.model, args.labels, n_tiles=args.official_n_tiles,
                      repeats=args.repeats, precision=args.precision, tile_px=args.tile_px)
        print(json.dumps(res))
        return

    work = args.out.parent / "bench_segment_work"
    work.mkdir(parents=True, exist_ok=True)
    tf_python = args.venv_tf / "bin" / "python"
    env_tf = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    model = args.model
    if model is None:
        model = work / "reference" / "model"
        if not model.is_dir():
            subprocess.run([str(tf_python), str(ROOT / "scripts" / "make_stardist_reference.py"),
                            "--out", str(work / "reference")], env=env_tf, check=True)
    if args.mode == "process":
        results = _process_mode(args, model, work, tf_python, env_tf)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    image = work / f"dapi_{SHAPE[0]}_seed{args.seed}.npy"
    source = "cached " + image.name
    if not image.is_file():
        source = _make_image(image, args.seed)
    results = {"image": {"shape": list(SHAPE), "pixel_um": PIXEL_UM, "source": source},
               "model": str(model), "cpu_count": os.cpu_count()}
    for impl in ("ours", "official"):
        if args.only and impl != args.only:
            continue
        python, env = (sys.executable, os.environ) if impl == "ours" else (str(tf_python), env_tf)
        cmd = [python, __file__, "--worker", impl, "--image", str(image), "--model", str(model),
               "--labels", str(work / f"labels_{impl}.npy"), "--official-n-tiles", str(args.official_n_tiles),
               "--repeats", str(args.repeats), "--precision", args.precision]
        cmd += ["--tile-px", str(args.tile_px)] if args.tile_px else []
        run = subprocess.run(cmd, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{impl} worker failed:\n{run.stderr[-3000:]}")
        results[impl] = json.loads(run.stdout.strip().splitlines()[-1])
    if "ours" in results and "official" in results:
        from tme_pipeline.segment.metrics import match_labels

        ours, theirs = (np.load(work / f"labels_{i}.npy") for i in ("ours", "official"))
        for key in ("seconds", "cpu_seconds"):
            results[f"ratio_{key}_ours_over_official"] = round(results["ours"][key] / results["official"][key], 3)
        for t in (0.5, 0.9):
            m = match_labels(theirs, ours, iou_threshold=t)
            results[f"agreement_f1_iou{t}"] = round(m.f1, 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
