"""Which Dask scheduler a run uses. Distribution is Dask's job; nothing home-made."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask

__all__ = ["dask_scheduler"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_scheduler(scheduler: str = "threads", *, n_workers: int | None = None) -> Iterator[str]:
    """Run the enclosed computations on the named Dask scheduler.

    Parameters
    ----------
    scheduler : str
        ``threads`` (default: one process, tiles in parallel threads; torch, NumPy
        and scikit-image release the GIL), ``synchronous`` (debugging),
        ``processes``, ``local-cluster`` (a ``distributed.LocalCluster`` started and
        stopped here) or the address of a running distributed scheduler
        (``tcp://host:8786``, e.g. one started by dask-jobqueue on SLURM).
    n_workers : int, optional
        Threads, processes or cluster workers; default one per core.

    Yields
    ------
    str
        A description of the scheduler, for ``run.json``.
    """
    workers = n_workers or os.cpu_count() or 1
    if scheduler in ("threads", "synchronous", "processes"):
        options = {"scheduler": scheduler}
        if scheduler != "synchronous":
            options["num_workers"] = workers
        with dask.config.set(options):
            yield scheduler if scheduler == "synchronous" else f"{scheduler} ({workers} workers)"
        return

    from distributed import Client, LocalCluster

    if scheduler == "local-cluster":
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                log.info("started a local Dask cluster with %d workers", workers)
                yield f"local-cluster ({workers} workers)"
                client.close()
        return
    if "://" not in scheduler:
        raise ValueError(
            f"unknown scheduler {scheduler!r}: use threads, synchronous, processes, local-cluster "
            "or a distributed scheduler address such as tcp://host:8786"
        )
    with Client(scheduler) as client:
        log.info("connected to Dask scheduler %s", scheduler)
        yield f"distributed ({client.scheduler.address})"
