from pathlib import Path

import dask
import dask.array as da
import pytest

from tme_pipeline.parallel import ClusterPlan, dask_scheduler, local_cluster_plan, read_slurm_spec, slurm_cluster


@pytest.mark.parametrize("name", ["threads", "synchronous"])
def test_local_schedulers_give_the_same_answer(name):
    x = da.arange(1000, chunks=100)
    with dask_scheduler(name, n_workers=2) as info:
        assert info.kind == name
        assert dask.config.get("scheduler") == name
        assert int(x.sum().compute()) == 499500


def test_unknown_scheduler_refused():
    with pytest.raises(ValueError, match="unknown scheduler 'gpu-please'"):
        with dask_scheduler("gpu-please"):
            pass


def test_local_cluster_plan_one_worker_per_gpu_only_with_several():
    # the CPU twin of the GPU server: every combination of GPU count, device and dask-cuda
    assert local_cluster_plan(0, "auto", dask_cuda_installed=True) == ClusterPlan("local-cluster")
    assert local_cluster_plan(1, "cuda", dask_cuda_installed=True) == ClusterPlan("local-cluster")
    assert local_cluster_plan(4, "auto", dask_cuda_installed=True) == ClusterPlan("local-cuda-cluster")
    assert local_cluster_plan(2, "cuda", dask_cuda_installed=True).kind == "local-cuda-cluster"
    # a pinned GPU or the CPU keeps the plain cluster, with nothing to say
    assert local_cluster_plan(4, "cuda:1", dask_cuda_installed=True) == ClusterPlan("local-cluster")
    assert local_cluster_plan(4, "cpu", dask_cuda_installed=True) == ClusterPlan("local-cluster")
    fallback = local_cluster_plan(2, "auto", dask_cuda_installed=False)
    assert fallback.kind == "local-cluster" and "2 GPUs" in fallback.note and "pip install dask-cuda" in fallback.note
    with pytest.raises(ValueError, match="n_gpus"):
        local_cluster_plan(-1, "auto", dask_cuda_installed=True)


def test_threads_scheduler_records_its_workers():
    with dask_scheduler("threads", n_workers=3) as info:
        assert info.record() == {"kind": "threads", "workers": 3, "threads_per_worker": None,
                                 "address": None, "dashboard": None}
    with pytest.raises(ValueError, match="threads_per_worker"):
        with dask_scheduler("local-cluster", threads_per_worker=0):
            pass


SLURM = """\
cores: 8
memory: 16GB
processes: 2
walltime: "02:00:00"
queue: short
account: lab42
job_extra_directives: ["--gres=gpu:1"]
job_script_prologue: ["module load cuda"]
local_directory: $TMPDIR
"""


def test_slurm_file_read_and_checked(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text(SLURM)
    spec = read_slurm_spec(path)
    assert (spec.cores, spec.memory, spec.processes, spec.queue) == (8, "16GB", 2, "short")
    assert spec.job_extra_directives == ("--gres=gpu:1",)
    path.write_text(SLURM + "gpus: 2\n")
    with pytest.raises(ValueError, match=r"slurm.yaml: invalid cluster file: gpus: unknown key"):
        read_slurm_spec(path)
    path.write_text(SLURM.replace("processes: 2", "processes: 9"))
    with pytest.raises(ValueError, match=r"processes \(9\) exceeds cores \(8\)"):
        read_slurm_spec(path)
    path.write_text(SLURM.replace("cores: 8", "cores: -1"))
    with pytest.raises(ValueError, match="cores"):
        read_slurm_spec(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml: cluster file not found"):
        read_slurm_spec(tmp_path / "nope.yaml")


def test_shipped_slurm_file_is_valid():
    spec = read_slurm_spec(Path(__file__).parents[1] / "configs" / "cluster-slurm.yaml")
    assert spec.cores % spec.processes == 0


def test_slurm_job_script_built_without_slurm(tmp_path):
    pytest.importorskip("dask_jobqueue")  # the cluster extra; `make test` installs it
    path = tmp_path / "slurm.yaml"
    path.write_text(SLURM)
    # no job is submitted: the cluster is never scaled; its scheduler listens on loopback only
    with slurm_cluster(path, scheduler_options={"host": "127.0.0.1"}) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    for directive in ("--cpus-per-task=8", "-t 02:00:00", "-p short", "-A lab42", "--gres=gpu:1"):
        assert f"#SBATCH {directive}" in lines, directive
    # torch in each of the 2 processes gets 8 / 2 cores, set before the worker starts
    worker = next(i for i, line in enumerate(lines) if "dask_worker" in line)
    assert lines.index("export OMP_NUM_THREADS=4") < worker and lines.index("module load cuda") < worker
    assert "--nworkers 2" in lines[worker] and "--nthreads 4" in lines[worker]
    assert "--local-directory $TMPDIR" in lines[worker]


def test_cli_workers_start_a_local_cluster():
    from tme_pipeline.cli import _with_run_options, build_parser
    from tme_pipeline.config import load_config

    def run_options(*argv):
        args = build_parser().parse_args(["run", "m.csv", "--out", "o", *argv])
        return _with_run_options(load_config(), args).run

    assert run_options().scheduler == "threads"  # the default stays in-process
    run = run_options("--workers", "2")
    assert (run.scheduler, run.n_workers, run.threads_per_worker) == ("local-cluster", 2, 1)
    run = run_options("--cluster", "configs/cluster-slurm.yaml", "--workers", "3")
    assert (run.cluster, run.n_workers) == ("configs/cluster-slurm.yaml", 3)
    with pytest.raises(ValueError, match="--workers and --cluster start one"):
        run_options("--scheduler", "tcp://host:8786", "--workers", "2")
    with pytest.raises(SystemExit):
        run_options("--workers", "0")
