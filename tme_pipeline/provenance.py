"""What produced a result: package versions, the resolved config, model hashes."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata

from .config import Config

__all__ = ["provenance", "config_hash"]

_PACKAGES = (
    "tme-pipeline",
    "numpy",
    "scipy",
    "scikit-image",
    "tifffile",
    "imagecodecs",
    "zarr",
    "dask",
    "distributed",
    "anndata",
    "pandas",
    "pydantic",
    "torch",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def config_hash(config: Config) -> str:
    """SHA-256 of the resolved config as canonical JSON."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _models(config: Config) -> dict:
    """The nucleus model in use: folder, SHA-256 of its weights, thresholds."""
    seg = config.segmentation
    if seg.method != "stardist":
        return {seg.method: None}  # the classical segmenter has no weights
    from .segment.registry import model_folder
    from .segment.weights import cached_model

    try:
        model = cached_model(model_folder(seg.stardist.model))
    except (FileNotFoundError, ValueError) as error:
        return {"stardist": {"model": seg.stardist.model, "error": str(error)}}
    return {
        "stardist": {
            "model": seg.stardist.model,
            "folder": str(model.path),
            "sha256": model.sha256,
            "thresholds": {"prob": model.thresholds.prob, "nms": model.thresholds.nms},
            "pixel_um": model.config.pixel_um,
        }
    }


def provenance(config: Config) -> dict:
    """Versions, platform, resolved config and model hashes, for ``run.json``."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "config": config.model_dump(mode="json"),
        "config_sha256": config_hash(config),
        "models": _models(config),
    }
