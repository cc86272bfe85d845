"""Our StarDist against the official TensorFlow implementation, on the same weights.

The reference (an official model folder, its predictions and labels for a test
image) is made by ``scripts/make_stardist_reference.py`` in the TensorFlow
environment ``.venv-tf`` (``make test`` builds it) and cached inside that
environment, keyed by the script's hash.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from skimage.transform import resize

from tme_pipeline.segment.metrics import match_labels
from tme_pipeline.segment.predict import predict_prob_dist, segment_nuclei
from tme_pipeline.segment.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_stardist_reference.py"
VENV_TF = Path(os.environ.get("TME_VENV_TF", ROOT / ".venv-tf"))


@pytest.fixture(scope="session")
def reference() -> Path:
    python = VENV_TF / "bin" / "python"
    if not python.exists():
        reason = (f"TensorFlow reference environment {VENV_TF} not found; `make test` builds it "
                  "(tensorflow-cpu, tf-keras, stardist)")
        if os.environ.get("TME_REQUIRE_TF_REFERENCE"):
            pytest.fail(reason)
        pytest.skip(reason)
    key = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]
    out = VENV_TF / f"stardist-reference-{key}"
    if not (out / "meta.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run([str(python), str(SCRIPT), "--out", str(tmp)], env=env, capture_output=True,
                             text=True, timeout=900)
        if run.returncode != 0:
            pytest.fail(f"{SCRIPT.name} failed ({run.returncode}):\n{run.stderr[-4000:]}")
        try:
            tmp.rename(out)
        except OSError:  # another test session made it meanwhile
            shutil.rmtree(tmp)
    return out


@pytest.fixture(scope="session")
def model(reference):
    return load_model(reference / "model", device="cpu")


def test_config_and_weights_load(model, reference):
    assert model.config.grid == (2, 2) and model.config.n_rays == 32 and model.config.unet_n_depth == 3
    assert (model.thresholds.prob, model.thresholds.nms) == (0.5, 0.4)
    assert model.sha256 == hashlib.sha256((reference / "model" / "weights_best.h5").read_bytes()).hexdigest()


def test_prob_and_dist_equal_official(model, reference):
    image = np.load(reference / "image.npy")
    prob, dist = predict_prob_dist(image, model=model, device="cpu", precision="fp32")
    ref_prob, ref_dist = np.load(reference / "prob.npy"), np.load(reference / "dist.npy")
    assert prob.shape == ref_prob.shape and dist.shape == ref_dist.shape
    assert np.abs(prob - ref_prob).max() <= 1e-4
    assert np.abs(dist - ref_dist).max() <= 1e-4
    # In patches (exercises the context and stitching) the output is the same.
    prob_p, dist_p = predict_prob_dist(image, model=model, device="cpu", precision="fp32", tile_px=64,
                                       batch_size=2)
    assert np.abs(prob_p - ref_prob).max() <= 1e-4
    assert np.abs(dist_p - ref_dist).max() <= 1e-4


def test_labels_match_official(model, reference):
    image = np.load(reference / "image.npy")
    ref = np.load(reference / "labels.npy")
    assert ref.max() >= 50, "the reference model should find objects"
    # The reference image is already normalised; (0, 1) leaves it as it is.
    ours = segment_nuclei(image, 0.5, model=model, norm=(0.0, 1.0), device="cpu", precision="fp32")
    stats = match_labels(ref, ours, iou_threshold=0.9)
    assert stats.recall >= 0.99 and stats.precision >= 0.99, stats


def test_trained_model_finds_the_same_objects_after_resampling(model, reference):
    image = np.load(reference / "image.npy")
    at_05 = segment_nuclei(image, 0.5, model=load_model(reference / "model", pixel_um=0.5), norm=(0.0, 1.0),
                           device="cpu")
    fine = resize(image, (2 * image.shape[0], 2 * image.shape[1]), order=1)
    at_025 = segment_nuclei(fine, 0.25, model=load_model(reference / "model", pixel_um=0.5), norm=(0.0, 1.0),
                            device="cpu")
    back = resize(at_025, image.shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    assert match_labels(at_05, back, iou_threshold=0.5).f1 >= 0.9
