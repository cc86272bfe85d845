"""The package installs whole: a wheel carries the shipped models and the default config,
and ``tme segment`` runs from a non-editable install with the StarDist model found by name.

The wheel is built offline (no build isolation, no index) from a copy of the project's
sources, so that the checkout gets no build/ folder; it is installed with ``--target`` and
run with that folder first on PYTHONPATH, over the project venv's dependencies.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from blobs import make_nuclei
from tme_pipeline.cli import main
from tme_pipeline.segment.metrics import match_labels

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "tme_pipeline", "models", "configs")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shipped_files() -> dict[str, str]:
    """Every file of every folder under the repository's models/, and the default config:
    their path inside the wheel -> SHA-256 of their bytes."""
    files = {f"tme_pipeline/configs/{p.name}": _sha256(p.read_bytes()) for p in (ROOT / "configs").glob("*.yaml")}
    for model in sorted(p for p in (ROOT / "models").iterdir() if p.is_dir()):
        for f in sorted(p for p in model.iterdir() if p.is_file()):
            files[f"tme_pipeline/models/{model.name}/{f.name}"] = _sha256(f.read_bytes())
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("tme_pipeline-*.whl")
    return built


def test_wheel_holds_every_shipped_model_and_the_default_config(wheel):
    expected = _shipped_files()
    assert any(k.endswith("stardist_fluo_synth/weights.pt") for k in expected)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = sorted(set(expected) - names)
        assert not missing, f"not in the wheel: {missing}"
        changed = sorted(k for k in expected if _sha256(zf.read(k)) != expected[k])
        assert not changed, f"differ from the repository: {changed}"
        # Links are resolved at build time: the wheel holds files, not links to the checkout.
        assert all(i.external_attr >> 16 & 0o170000 != 0o120000 for i in zf.infolist())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "tme = tme_pipeline.cli:main" in entry_points


def test_tme_segment_runs_from_a_non_editable_install(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--target",
         str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    image, truth = make_nuclei((240, 260), seed=3)
    png = tmp_path / "dapi.png"
    imsave(png, (image / image.max() * 255).astype(np.uint8), check_contrast=False)
    # The installed package first on the path; cwd away from the checkout, so that nothing of
    # it can be imported by accident.
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("TME_MODELS", None)
    where = subprocess.run(
        [sys.executable, "-c", "import tme_pipeline.segment.registry as r; print(r.__file__); "
         "print(r.model_folder('stardist_fluo_synth'))"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert where.returncode == 0, where.stderr
    module_file, model_dir = (Path(line) for line in where.stdout.split())
    assert module_file.is_relative_to(target) and model_dir == target / "tme_pipeline/models/stardist_fluo_synth"

    args = ["segment", str(png), "--pixel-um", "0.5", "--method", "stardist", "--device", "cpu", "--out"]
    out = tmp_path / "nuclei.tif"
    run = subprocess.run([str(target / "bin" / "tme"), *args, str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    labels = tifffile.imread(out)
    assert labels.shape == truth.shape
    assert match_labels(truth, labels, iou_threshold=0.5).recall >= 0.95
    # The same nuclei as the checkout finds: the installed model is the shipped one.
    assert main([*args, str(tmp_path / "checkout.tif")]) == 0
    np.testing.assert_array_equal(labels, tifffile.imread(tmp_path / "checkout.tif"))


def test_in_a_checkout_the_shipped_models_are_the_repository_folder():
    from tme_pipeline.segment.registry import model_folder, shipped_models_dir

    # Training scripts write models/<name>/ at the root; the run path finds them by name.
    assert shipped_models_dir().resolve() == (ROOT / "models").resolve()
    assert model_folder("stardist_fluo_synth").resolve() == (ROOT / "models" / "stardist_fluo_synth").resolve()
