"""The one progress helper: log how far a Dask computation has got."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from dask.callbacks import Callback

__all__ = ["progress"]

log = logging.getLogger("tme_pipeline.progress")


class _LogProgress(Callback):
    """Logs ``label: N % (done/total tasks)`` at most every ``every_s`` seconds."""

    def __init__(self, label: str, every_s: float) -> None:
        super().__init__()
        self.label = label
        self.every_s = every_s
        self._last = 0.0

    def _start_state(self, dsk, state) -> None:
        self._total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._last = time.monotonic()

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s and self._total:
            done = len(state["finished"])
            log.info("%s: %d %% (%d/%d tasks)", self.label, 100 * done // self._total, done, self._total)
            self._last = now


@contextlib.contextmanager
def progress(label: str, *, every_s: float = 10.0) -> Iterator[None]:
    """Log the progress of Dask computations run inside the block (local schedulers).

    A distributed cluster shows progress on its own dashboard instead.
    """
    with _LogProgress(label, every_s):
        yield
