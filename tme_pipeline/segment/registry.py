"""Find a nucleus model folder by path or by the name of a shipped model."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["model_folder", "shipped_models_dir"]


def shipped_models_dir() -> Path:
    """The shipped models: the package's ``models/`` data folder.

    In an installed wheel it holds a copy of every folder of the repository's
    ``models/``; in a checkout, ``tme_pipeline/models`` is a link to that folder,
    so a model the training scripts have just written there is found by name.
    """
    return Path(__file__).resolve().parents[1] / "models"


def model_folder(model: str | Path) -> Path:
    """Resolve ``model`` to a folder: an existing path, else a name looked up in
    ``$TME_MODELS`` (if set) and then in the shipped ``models/``.

    Raises
    ------
    FileNotFoundError
        Naming every place that was searched.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    searched = [str(path)]
    roots = [Path(os.environ["TME_MODELS"])] if os.environ.get("TME_MODELS") else []
    for root in [*roots, shipped_models_dir()]:
        candidate = root / str(model)
        if candidate.is_dir():
            return candidate
        searched.append(str(candidate))
    raise FileNotFoundError(f"nucleus model {str(model)!r} not found (looked in: {', '.join(searched)})")
