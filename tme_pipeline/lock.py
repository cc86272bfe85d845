"""One run per output folder: a lock file that names its holder.

The lock is an ``flock`` on ``OUT/.tme.lock``, so the kernel releases it when the holding
process dies, however it dies (SIGKILL included): a lock file whose lock nobody holds is
stale and the next run takes it over. The file's text names the holder (pid, host, start
time) for the message a second run prints. ``flock`` is advisory and held per open file;
on NFS, Linux maps it to a POSIX lock that the server arbitrates across hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from .results import LOCK_FILE

__all__ = ["OutputInUse", "output_lock"]

log = logging.getLogger(__name__)


class OutputInUse(RuntimeError):
    """Another live run holds the output folder's lock."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _unshare(path: Path) -> None:
    """Give ``path`` its own inode when it is hard-linked elsewhere.

    A folder copied with ``cp -al`` shares its lock file with the original, and ``flock``
    locks the inode: a run into the copy would then lock out runs into the original. A
    fresh file is renamed over the link (atomic), leaving the other folder's lock alone.
    """
    try:
        if path.stat().st_nlink <= 1:
            return
    except FileNotFoundError:
        return
    fresh = path.with_name(f"{path.name}.{os.getpid()}.new")
    fresh.write_bytes(b"")
    os.replace(fresh, path)


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[dict]:
    """Hold ``OUT/.tme.lock`` for the duration of the block.

    Parameters
    ----------
    out : str or Path
        The output folder (created if absent).

    Yields
    ------
    dict
        This run's holder record: ``pid``, ``host``, ``started`` (UTC, ISO 8601).

    Raises
    ------
    OutputInUse
        When a live process holds the lock; the message names it (pid, host, start time).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    _unshare(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUse(
                f"{out} is in use by another tme run ({_describe(_holder(path))}); "
                f"wait for it to finish or write to another folder (lock: {path})"
            ) from None
        previous = _holder(path)
        if previous:
            log.warning("%s: taking over the lock of a run that is no longer alive (%s)", out, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield me
        finally:
            # Emptied before unlocking: a lock file with text and no lock means a dead holder.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
