"""Which Dask scheduler a run uses. Distribution is Dask's job; nothing home-made.

A laptop or workstation runs the tiles in threads of one process (the default), or on a
``distributed.LocalCluster`` of worker processes (``tme run --workers N``); a GPU server
with several GPUs on ``dask_cuda.LocalCUDACluster`` (one worker per GPU); a SLURM
cluster through ``dask-jobqueue`` (``tme run --cluster configs/cluster-slurm.yaml``);
any running cluster by its scheduler's address (``--scheduler tcp://host:8786``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dask
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "LOCAL_SCHEDULERS",
    "ClusterPlan",
    "SchedulerInfo",
    "SlurmSpec",
    "dask_scheduler",
    "local_cluster_plan",
    "read_slurm_spec",
    "run_scheduler",
    "slurm_cluster",
]

log = logging.getLogger(__name__)

#: Where a LocalCluster serves its dashboard; distributed moves to a free port if taken.
DASHBOARD_ADDRESS = "localhost:8787"
_NO_DASHBOARD = "dashboard unavailable (pip install bokeh)"
#: Schedulers that run in this process (no distributed client).
LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")


@dataclass(frozen=True)
class SchedulerInfo:
    """What ran the tiles, as ``run.json`` records it under ``scheduler``.

    Attributes
    ----------
    kind : str
        ``threads``, ``synchronous``, ``processes``, ``local-cluster``,
        ``local-cuda-cluster``, ``slurm`` or ``distributed`` (an existing cluster).
    workers : int or None
        Threads (``threads``), processes, cluster workers or SLURM jobs asked for;
        ``None`` when unknown (an existing cluster's workers come and go).
    threads_per_worker : int or None
        Dask threads, and torch intra-op threads, in each worker process.
    address : str or None
        The distributed scheduler's address.
    dashboard : str or None
        The Dask dashboard's URL; ``None`` without one (no bokeh, or not distributed).
    """

    kind: str
    workers: int | None = None
    threads_per_worker: int | None = None
    address: str | None = None
    dashboard: str | None = None

    def record(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class ClusterPlan:
    """Which local cluster to start: ``kind`` and, when it is a fallback, why."""

    kind: str
    note: str | None = None


def local_cluster_plan(n_gpus: int, device: str, *, dask_cuda_installed: bool) -> ClusterPlan:
    """The local cluster for ``--workers``: one worker per GPU when there are several.

    Parameters
    ----------
    n_gpus : int
        CUDA devices visible (``torch.cuda.device_count()``).
    device : str
        The nucleus model's device setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
        (``cpu`` for the classical segmenter, which uses no GPU). A pinned ``cuda:N``
        keeps every worker on that GPU.
    dask_cuda_installed : bool
        Whether ``dask_cuda`` can be imported.

    Returns
    -------
    ClusterPlan
        ``local-cuda-cluster`` (``dask_cuda.LocalCUDACluster``) with more than one GPU,
        device ``auto`` or ``cuda`` and dask-cuda installed; otherwise
        ``local-cluster`` (``distributed.LocalCluster``), with a note saying how to
        use every GPU when several are present but dask-cuda is not.

    Examples
    --------
    >>> local_cluster_plan(2, "auto", dask_cuda_installed=True).kind
    'local-cuda-cluster'
    >>> local_cluster_plan(1, "auto", dask_cuda_installed=True).kind
    'local-cluster'
    """
    if n_gpus < 0:
        raise ValueError(f"n_gpus must be >= 0, got {n_gpus}")
    if n_gpus <= 1 or device not in ("auto", "cuda"):
        return ClusterPlan("local-cluster")
    if dask_cuda_installed:
        return ClusterPlan("local-cuda-cluster")
    return ClusterPlan(
        "local-cluster",
        f"{n_gpus} GPUs found but dask-cuda is not installed: every worker uses the first GPU; "
        "pip install dask-cuda (or tme-pipeline[gpu]) for one worker per GPU",
    )


class SlurmSpec(BaseModel):
    """A SLURM job of Dask workers (``dask_jobqueue.SLURMCluster``), as ``configs/cluster-slurm.yaml`` gives it.

    One job runs ``processes`` worker processes sharing ``cores`` cores and ``memory``;
    each worker gets ``cores // processes`` threads, and as many torch threads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cores: int = Field(gt=0, description="cores per job")
    memory: str = Field(description="memory per job, e.g. '32GB' (split between its processes)")
    processes: int = Field(1, gt=0, description="worker processes per job (at most cores)")
    walltime: str = Field("01:00:00", description="job time limit, HH:MM:SS")
    queue: str | None = Field(None, description="SLURM partition (sbatch -p); null: the cluster's default")
    account: str | None = Field(None, description="SLURM account (sbatch -A); null: none")
    job_extra_directives: tuple[str, ...] = Field((), description="more #SBATCH options, e.g. '--gres=gpu:1'")
    job_script_prologue: tuple[str, ...] = Field((), description="shell lines run before the worker starts")
    local_directory: str | None = Field(None, description="node-local scratch for spilled data, e.g. $TMPDIR")
    log_directory: str | None = Field(None, description="folder for the jobs' stdout/stderr; null: the submit folder")
    interface: str | None = Field(None, description="network interface workers and scheduler talk on, e.g. ib0")
    death_timeout: float = Field(60.0, gt=0, description="seconds a worker waits for a lost scheduler before exiting")


def read_slurm_spec(path: str | Path) -> SlurmSpec:
    """Read and check a SLURM cluster file (``configs/cluster-slurm.yaml``).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not YAML, not a mapping, or a key unknown or invalid; the message names the file and the keys.
    """
    from .config import read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path, kind="cluster")
    try:
        spec = SlurmSpec.model_validate(data)
    except ValidationError as error:
        keys = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'file'}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in error.errors()
        )
        raise ValueError(f"{path}: invalid cluster file: {keys}") from None
    if spec.processes > spec.cores:
        raise ValueError(f"{path}: processes ({spec.processes}) exceeds cores ({spec.cores})")
    return spec


def slurm_cluster(spec: SlurmSpec | str | Path, **kwargs):
    """A ``dask_jobqueue.SLURMCluster`` from a cluster file; no job is submitted until it is scaled.

    Parameters
    ----------
    spec : SlurmSpec, str or Path
        The settings, or a cluster file to read them from.
    **kwargs
        Passed to ``SLURMCluster`` (e.g. ``scheduler_options``).

    Returns
    -------
    dask_jobqueue.SLURMCluster
        ``cluster.job_script()`` shows the batch script; ``cluster.scale(jobs=n)`` submits.

    Raises
    ------
    ImportError
        dask-jobqueue is not installed (``pip install tme-pipeline[cluster]``).
    """
    if not isinstance(spec, SlurmSpec):
        spec = read_slurm_spec(spec)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ImportError("--cluster needs dask-jobqueue: pip install 'tme-pipeline[cluster]'") from None
    threads = spec.cores // spec.processes
    settings = spec.model_dump()
    settings["job_extra_directives"] = list(spec.job_extra_directives)
    # Torch reads these when it starts: one worker's intra-op threads are its share of the
    # job's cores, so the job's processes never oversubscribe them.
    settings["job_script_prologue"] = [
        *(f"export {var}={value}" for var, value in _thread_env(threads).items()),
        *spec.job_script_prologue,
    ]
    settings = {k: v for k, v in settings.items() if v is not None}
    return SLURMCluster(**settings, **kwargs)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _dashboard(cluster) -> str | None:
    """Log and return the dashboard URL of a cluster or client (or that there is none)."""
    link = cluster.dashboard_link if _have("bokeh") else None
    log.info("Dask dashboard: %s", link or _NO_DASHBOARD)
    return link


def _thread_env(threads: int) -> dict[str, str]:
    # Torch, OpenMP and MKL size their pools from these when a worker first uses them.
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _gpu_count(device: str) -> int:
    if device not in ("auto", "cuda") or not _have("torch"):
        return 0
    import torch

    return torch.cuda.device_count()


@contextlib.contextmanager
def dask_scheduler(
    scheduler: str = "threads",
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    cluster_file: str | Path | None = None,
    device: str = "cpu",
) -> Iterator[SchedulerInfo]:
    """Run the enclosed computations on the named Dask scheduler.

    Parameters
    ----------
    scheduler : str
        ``threads`` (default: one process, tiles in parallel threads; torch, NumPy
        and scikit-image release the GIL), ``synchronous`` (debugging),
        ``processes``, ``local-cluster`` (a ``distributed.LocalCluster``, or a
        ``dask_cuda.LocalCUDACluster`` on several GPUs, started and stopped here) or
        the address of a running distributed scheduler (``tcp://host:8786``).
        Ignored when `cluster_file` is given.
    n_workers : int, optional
        Threads (``threads``), processes, cluster workers, or SLURM jobs with
        `cluster_file`; default one per core (a local cluster: cores //
        `threads_per_worker`), one job on SLURM.
    threads_per_worker : int
        Dask threads, and torch intra-op threads, in each worker process of a
        local cluster, so that workers × threads never oversubscribe the cores.
    cluster_file : str or Path, optional
        A SLURM cluster file (see :func:`read_slurm_spec`): a
        ``dask_jobqueue.SLURMCluster`` scaled to `n_workers` jobs.
    device : str
        The nucleus model's device (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``cpu``
        for the classical segmenter): with several GPUs and ``auto``/``cuda``, a
        local cluster runs one worker per GPU (see :func:`local_cluster_plan`).

    Yields
    ------
    SchedulerInfo
        What runs the tiles, for ``run.json``. A distributed cluster's dashboard
        address is logged at INFO.

    Raises
    ------
    ValueError
        An unknown scheduler name, or ``threads_per_worker`` below 1.
    """
    if threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
    cores = os.cpu_count() or 1
    if cluster_file is None and scheduler in LOCAL_SCHEDULERS:
        workers = n_workers or cores
        options = {"scheduler": scheduler}
        if scheduler != "synchronous":
            options["num_workers"] = workers
        with dask.config.set(options):
            yield SchedulerInfo(scheduler, None if scheduler == "synchronous" else workers)
        return
    if cluster_file is None and scheduler != "local-cluster" and "://" not in scheduler:
        raise ValueError(
            f"unknown scheduler {scheduler!r}: use threads, synchronous, processes, local-cluster "
            "or a distributed scheduler address such as tcp://host:8786"
        )

    from distributed import Client

    if cluster_file is not None:
        spec = read_slurm_spec(cluster_file)
        jobs = n_workers or 1
        with slurm_cluster(spec) as cluster, Client(cluster) as client:
            cluster.scale(jobs=jobs)
            log.info("submitted %d SLURM job(s) of %d worker(s) each (%s)", jobs, spec.processes, cluster_file)
            yield SchedulerInfo("slurm", jobs * spec.processes, spec.cores // spec.processes,
                                client.scheduler.address, _dashboard(cluster))
        return
    if scheduler != "local-cluster":
        with Client(scheduler) as client:
            log.info("connected to Dask scheduler %s", scheduler)
            yield SchedulerInfo("distributed", len(client.scheduler_info(n_workers=-1)["workers"]), None,
                                client.scheduler.address, _dashboard(client))
        return

    plan = local_cluster_plan(_gpu_count(device), device, dask_cuda_installed=_have("dask_cuda"))
    if plan.note:
        log.warning("%s", plan.note)
    workers = n_workers or max(1, cores // threads_per_worker)
    dashboard = DASHBOARD_ADDRESS if _have("bokeh") else None
    if plan.kind == "local-cuda-cluster":
        from dask_cuda import LocalCUDACluster

        workers = min(workers, _gpu_count(device))
        cluster = LocalCUDACluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                   dashboard_address=dashboard, env=_thread_env(threads_per_worker))
    else:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=dashboard, env=_thread_env(threads_per_worker))
    with cluster, Client(cluster) as client:
        log.info("started a %s of %d worker process(es), %d thread(s) each", plan.kind, workers, threads_per_worker)
        yield SchedulerInfo(plan.kind, workers, threads_per_worker, client.scheduler.address, _dashboard(cluster))


def run_scheduler(config: "Config", scheduler: str | None = None) -> contextlib.AbstractContextManager[SchedulerInfo]:
    """:func:`dask_scheduler` as a run's config (``run:`` section) asks for it.

    Parameters
    ----------
    config : Config
    scheduler : str, optional
        Overrides ``config.run.scheduler`` (``tme run --scheduler``).
    """
    run, seg = config.run, config.segmentation
    return dask_scheduler(
        scheduler or run.scheduler,
        n_workers=run.n_workers,
        threads_per_worker=run.threads_per_worker,
        cluster_file=run.cluster,
        device=seg.stardist.device if seg.method == "stardist" else "cpu",
    )
