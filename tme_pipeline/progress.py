"""The one progress helper: how far a slide's tiled stage and a batch of slides have got.

Three ways to show it, chosen by ``run.progress`` in the config and handed in explicitly:

* ``bars``: a `tqdm <https://tqdm.github.io>`_ bar per tiled stage
  (``P01_pre segment 12/36 tiles [00:14<00:28]``) under a bar for the batch; log
  records are written above the bars, not through them.
* ``log``: plain log lines, at most one per stage every ``every_s`` seconds, a line when
  a stage starts and ends and one per slide done or failed, with its time.
* ``quiet``: nothing.

``auto`` is ``bars`` when standard error is a terminal, ``log`` otherwise, so that
nothing but log lines reaches a redirected stream. Bars are only ever written to
standard error.

tqdm rather than rich: it is small, imports fast (startup of the command counts) and
its ``logging_redirect_tqdm`` keeps the CLI's own logging configuration, where rich
would replace it by its own handler and console.

Tile counts come from the Dask graph itself: :func:`tme_pipeline.tiling.map_tiles`
names each tile's task ``<func>-<tile index>-<uuid hex>``, so only those tasks count,
not the stitching, reading or writing tasks around them. Local schedulers report them
through a :class:`dask.callbacks.Callback`; a distributed client runs no local
callbacks, so inside the block its computations go through a scheduler function that
submits the graph, follows the tile tasks' futures with
:func:`distributed.as_completed` and gathers the same results.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Literal, TextIO

from dask.callbacks import Callback

__all__ = ["ProgressMode", "resolve_mode", "progress", "StageProgress", "batch_progress", "BatchProgress",
           "tile_keys", "distributed_progress"]

log = logging.getLogger("tme_pipeline.progress")

ProgressMode = Literal["auto", "bars", "log", "quiet"]
_MODES = ("auto", "bars", "log", "quiet")

# map_tiles' key: the tile function, the tile index, a uuid4 hex
_TILE_KEY = re.compile(r"^.+-\d+-[0-9a-f]{32}$")


def resolve_mode(mode: str, *, stream: TextIO | None = None) -> Literal["bars", "log", "quiet"]:
    """The concrete way to show progress: ``auto`` becomes ``bars`` on a terminal, else ``log``.

    Parameters
    ----------
    mode : {'auto', 'bars', 'log', 'quiet'}
    stream : file-like, optional
        Where bars would go; default ``sys.stderr`` (looked up at call time).

    Returns
    -------
    str
        ``'bars'``, ``'log'`` or ``'quiet'``.

    Raises
    ------
    ValueError
        An unknown mode.
    """
    if mode not in _MODES:
        raise ValueError(f"run.progress: unknown mode {mode!r} (use {', '.join(_MODES)})")
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bars" if isatty is not None and isatty() else "log"


def tile_keys(graph) -> list:
    """The keys of a Dask graph that are tile tasks of :func:`tme_pipeline.tiling.map_tiles`.

    Parameters
    ----------
    graph : mapping or iterable of keys
        A task graph (its keys are read) or its keys.

    Returns
    -------
    list
        The matching keys, in the graph's order.
    """
    return [k for k in graph if isinstance(k, str) and _TILE_KEY.match(k)]


def _clock(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on (tqdm's style)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class StageProgress:
    """The tile count of one stage of one slide, shown as its mode says.

    Made by :func:`progress`, which feeds it from the Dask scheduler.

    Parameters
    ----------
    label : str
        E.g. ``'P01_pre segment'``.
    mode : {'bars', 'log', 'quiet'}
        Resolved (:func:`resolve_mode`).
    every_s : float
        Log mode: at most one line this often (s).

    Attributes
    ----------
    done, total : int
        Tile tasks finished and found so far (``total`` grows with each computation
        of the block that has tile tasks).
    """

    def __init__(self, label: str, *, mode: str, every_s: float) -> None:
        self.label = label
        self.mode = mode
        self.every_s = every_s
        self.done = 0
        self.total = 0
        self._t0 = time.monotonic()
        self._last = self._t0
        self._bar = None

    def add_total(self, n: int) -> None:
        """``n`` more tile tasks are about to run."""
        if n <= 0:
            return
        if self.total == 0 and self.mode == "log":
            log.info("%s: %d tiles", self.label, n)
        self.total += n
        if self.mode == "bars":
            if self._bar is None:
                from tqdm import tqdm

                # leave=False: a finished slide's bar gives its line back to the next one
                self._bar = tqdm(total=self.total, desc=self.label, unit="tiles", leave=False, file=sys.stderr,
                                 dynamic_ncols=True,
                                 bar_format="{desc} {n_fmt}/{total_fmt} {unit} |{bar}| [{elapsed}<{remaining}]")
            else:
                self._bar.total = self.total
                self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        """``n`` tile tasks finished."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last >= self.every_s and self.total:
                elapsed = now - self._t0
                left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
                log.info("%s %d/%d tiles [%s<%s]", self.label, self.done, self.total, _clock(elapsed), _clock(left))
                self._last = now

    def close(self, *, failed: bool = False) -> None:
        """Remove the bar; in log mode, say the stage ended (not when it failed: the error says so)."""
        if self._bar is not None:
            if not failed:
                self._bar.refresh()  # the last updates may have come faster than tqdm redraws
            self._bar.close()
            self._bar = None
        if self.mode == "log" and self.total and not failed:
            log.info("%s done: %d/%d tiles in %s", self.label, self.done, self.total,
                     _clock(time.monotonic() - self._t0))


class _LocalTiles(Callback):
    """Feeds a :class:`StageProgress` from a local scheduler (threads, processes, synchronous)."""

    def __init__(self, stage: StageProgress) -> None:
        super().__init__()
        self.stage = stage

    def _start_state(self, dsk, state) -> None:
        self._tiles = set(tile_keys(dsk))
        self.stage.add_total(len(self._tiles))

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if key in self._tiles:
            self.stage.advance()


class _DistributedTiles:
    """A scheduler function for a distributed client that counts the tile tasks as they finish.

    Called by ``dask.compute`` as ``client.get`` would be, with the same results: the graph
    is submitted once with its tile keys among the wanted keys, so that their futures can
    be followed; every future is released at the end. The stage counted is the calling
    thread's (:func:`progress` sets it), so that several slides run from threads at once
    (``run.slides_in_flight``) each count their own tiles through one installed function.
    """

    def __init__(self, client) -> None:
        self.client = client
        self._local = threading.local()

    @property
    def stage(self) -> StageProgress | None:
        """The calling thread's stage, or None outside a :func:`progress` block."""
        return getattr(self._local, "stage", None)

    @contextlib.contextmanager
    def counting(self, stage: StageProgress) -> Iterator[None]:
        """Count this thread's tile tasks on ``stage`` inside the block."""
        previous, self._local.stage = self.stage, stage
        try:
            yield
        finally:
            self._local.stage = previous

    def __call__(self, dsk, keys, **kwargs):
        from distributed import as_completed

        keys = list(keys)
        graph = dsk.__dask_graph__() if hasattr(dsk, "__dask_graph__") else dsk
        tiles = tile_keys(graph)
        stage = self.stage
        if not tiles or stage is None:
            return self.client.get(dsk, keys, **kwargs)
        futures = self.client.get(dsk, keys + tiles, sync=False, **kwargs)
        try:
            stage.add_total(len(tiles))
            for _ in as_completed(futures[len(keys):]):
                stage.advance()
            return self.client.gather(futures[:len(keys)])
        finally:
            for future in {id(f): f for f in futures}.values():  # a tile that is also an output: one future
                future.release()


@contextlib.contextmanager
def distributed_progress() -> Iterator[None]:
    """Install one tile-counting scheduler function for the current distributed client.

    Needed when slides run from several threads at once: ``dask.config.set`` is
    process-wide, so per-stage installs from concurrent threads would undo each other;
    inside this block :func:`progress` only sets the calling thread's stage. Without a
    distributed client (a local scheduler) the block does nothing.
    """
    client = _distributed_client()
    if client is None or isinstance(client, _DistributedTiles):
        yield
        return
    import dask

    with dask.config.set(scheduler=_DistributedTiles(client)):
        yield


def _distributed_client():
    """The distributed client ``dask.compute`` would use here (or the installed counter), or None (local)."""
    if "distributed" not in sys.modules:  # no client can exist without it; keep the import light
        return None
    from dask.base import get_scheduler
    from distributed import Client

    scheduler = get_scheduler()
    if isinstance(scheduler, _DistributedTiles):
        return scheduler
    owner = getattr(scheduler, "__self__", None)
    return owner if isinstance(owner, Client) else None


@contextlib.contextmanager
def progress(label: str, *, mode: str = "auto", every_s: float = 10.0) -> Iterator[StageProgress]:
    """Show the tiles done of the Dask computations run inside the block.

    Parameters
    ----------
    label : str
        The slide and the stage, e.g. ``'P01_pre segment'``.
    mode : {'auto', 'bars', 'log', 'quiet'}
        See :func:`resolve_mode`; ``config.run.progress``.
    every_s : float
        Log mode: at most one progress line this often (s); ``config.run.progress_every_s``.

    Yields
    ------
    StageProgress
        Its ``done`` and ``total`` tile counts.

    Examples
    --------
    >>> import dask
    >>> tasks = [dask.delayed(abs, pure=False)(-i, dask_key_name=f"f-{i}-{32 * 'a'}") for i in range(3)]
    >>> with progress("demo", mode="quiet") as counted:
    ...     _ = dask.compute(*tasks, scheduler="threads")
    >>> (counted.done, counted.total)
    (3, 3)
    """
    stage = StageProgress(label, mode=resolve_mode(mode), every_s=every_s)
    client = _distributed_client()
    with contextlib.ExitStack() as stack:
        if stage.mode == "bars":
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())
        if isinstance(client, _DistributedTiles):  # installed by distributed_progress: count per thread
            stack.enter_context(client.counting(stage))
        elif client is not None:
            import dask

            dispatch = _DistributedTiles(client)
            stack.enter_context(dask.config.set(scheduler=dispatch))
            stack.enter_context(dispatch.counting(stage))
        else:
            stack.enter_context(_LocalTiles(stage))
        failed = True
        try:
            yield stage
            failed = False
        finally:
            stage.close(failed=failed)


def _batch_format(failed: int) -> str:
    # tqdm's own postfix would read "| , 1 failed": the count goes into the format instead
    return "{desc} {n_fmt}/{total_fmt} |{bar}| %d failed [{elapsed}<{remaining}]" % failed


class BatchProgress:
    """Slides done and failed out of a batch; see :func:`batch_progress`.

    Parameters
    ----------
    total : int
        Slides in the batch.
    mode : {'bars', 'log', 'quiet'}
        Resolved (:func:`resolve_mode`).

    Attributes
    ----------
    done, failed : int
        Slides finished (failed ones included), and failed.
    """

    def __init__(self, total: int, *, mode: str) -> None:
        self.total = total
        self.mode = mode
        self.done = 0
        self.failed = 0
        self._t0 = time.monotonic()
        self._bar = None
        if mode == "bars":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="slides", unit="slides", file=sys.stderr, dynamic_ncols=True,
                             bar_format=_batch_format(0))

    def slide_done(self, slide_id: str, *, seconds: float, failed: bool = False) -> None:
        """Count a slide; log ``<slide> done|failed in MM:SS (n/N slides, k failed, ~MM:SS left)``.

        Parameters
        ----------
        slide_id : str
        seconds : float
            The slide's wall time (s).
        failed : bool
        """
        self.done += 1
        self.failed += bool(failed)
        if self.mode == "quiet":
            return
        elapsed = time.monotonic() - self._t0
        left = elapsed / self.done * (self.total - self.done)
        log.info("%s %s in %s (%d/%d slides, %d failed, ~%s left)", slide_id, "failed" if failed else "done",
                 _clock(seconds), self.done, self.total, self.failed, _clock(left))
        if self._bar is not None:
            self._bar.bar_format = _batch_format(self.failed)
            self._bar.update(1)

    def close(self) -> None:
        """Remove the bar (the block of :func:`batch_progress` does it)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def batch_progress(n_slides: int, *, mode: str = "auto") -> Iterator[BatchProgress]:
    """A bar (or log lines) for a batch of slides; the slides' stage bars nest under it.

    Parameters
    ----------
    n_slides : int
        Slides in the batch.
    mode : {'auto', 'bars', 'log', 'quiet'}
        See :func:`resolve_mode`; ``config.run.progress``.

    Yields
    ------
    BatchProgress
        Call :meth:`BatchProgress.slide_done` once per slide. The bar closes when the
        block ends, on an error too.
    """
    batch = BatchProgress(n_slides, mode=resolve_mode(mode))
    with contextlib.ExitStack() as stack:
        if batch.mode == "bars":
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())
        stack.callback(batch.close)
        yield batch
