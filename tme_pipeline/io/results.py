"""Write outputs so that a partial result never looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["partial_dir", "write_json", "is_complete", "remove_stale_partials"]

_PARTIAL = ".partial"


def _partial_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{_PARTIAL}")


def is_complete(folder: str | Path) -> bool:
    """A slide folder is complete when it exists under its final name."""
    return Path(folder).is_dir()


def remove_stale_partials(parent: str | Path) -> list[Path]:
    """Delete partial folders an interrupted run left behind; returns what was removed."""
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
    on success an existing ``final`` is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path: str | Path, data: object) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
