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


def provenance(config: Config) -> dict:
    """Versions, platform, resolved config and model hashes, for ``run.json``."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "config": config.model_dump(mode="json"),
        "config_sha256": config_hash(config),
        # segmenter -> SHA-256 of its weights; the classical segmenter has none
        "models": {config.segmentation.method: None},
    }
