"""Write outputs so that a partial result never looks complete."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["partial_dir", "write_json", "remove_stale_partials"]

_PARTIAL = ".partial"


def _partial_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{_PARTIAL}")


def remove_stale_partials(parent: str | Path) -> list[Path]:
    """Delete partial folders an interrupted run left behind; returns what was removed.

    Call it only while holding the output folder's lock (:func:`tme_pipeline.lock.output_lock`):
    a live run's partial folders look the same.
    """
    parent = Path(parent)
    removed = []
    if parent.is_dir():
        for path in parent.iterdir():
            if path.name.startswith(".") and path.name.endswith(_PARTIAL):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def partial_dir(final: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary folder that becomes ``final`` only if the block succeeds.

    On an exception the temporary folder is removed and ``final`` is left as it was;
    on success an existing ``final`` is replaced: moved aside, the new one renamed in, the
    old one deleted, so that no reader ever sees a half-deleted folder under ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(final)
    for leftover in (tmp, final.with_name(f".{final.name}.old{_PARTIAL}")):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old{_PARTIAL}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, data: object) -> None:
    """Write JSON through a temporary file and an atomic rename.

    JSON has no NaN or infinity: a non-finite float (a gate of an empty channel, a
    percentage without a denominator) is written as ``null``; numpy scalars and arrays
    become plain numbers and lists. Where the write fails (a full disk, no permission)
    the temporary file is removed, ``path`` keeps its old content, and the ``OSError``
    names ``path``.

    Parameters
    ----------
    path : str or Path
        The JSON file to write.
    data : object
        Dicts, lists, strings, numbers (Python or numpy); anything else is written as its
        ``str``.

    Raises
    ------
    OSError
        Where the file cannot be written; same ``errno``, ``filename`` is ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(_plain(data), indent=2, sort_keys=False, allow_nan=False, default=str) + "\n"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path.name}: {error.strerror or error}", str(path)) from error


def _plain(value: object) -> object:
    """``value`` with every non-finite float as None and numpy values as Python ones."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
