"""Benchmark: our StarDist (PyTorch) against the official one (TensorFlow), same weights.

    .venv/bin/python scripts/bench_segment.py --out bench_out/segment.json

Both segment the same 4096×4096 DAPI image (a 2×2 mm crop of a synthetic slide
at 0.5 µm/px, from ``tme_pipeline.synth``; the test blob maker as fallback)
from raw intensities to labels: percentile normalisation (1, 99.8), net,
NMS, rendering. Each runs in its own subprocess so that its peak RSS is its
own: ours in this environment, the official ``StarDist2D.predict_instances``
in ``.venv-tf`` (TensorFlow CPU). Wall and CPU seconds are the minimum over
``--repeats`` runs in one process. The model is an official Keras folder
(default: the one ``make_stardist_reference.py`` trains), which ours loads
with ``load_model``. Each side first segments a 512×512 crop (warm-up:
imports, graph tracing) and is timed on the full image.

The worker part of this script runs under either interpreter, so its
module-level imports stay within numpy and the standard library.
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
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "segment.json")
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
    ap.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--labels", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
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
