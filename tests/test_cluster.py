"""local_cluster and slurm_cluster: the CPU fallback runs tasks, bad arguments fail early.

No SLURM needed here: slurm_cluster(..., submit=False) builds the cluster (a local scheduler)
without submitting jobs, so the job script it would submit can be read.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import types

import pytest
from distributed import Client, LocalCluster

from diagode_dist.service.cluster import local_cluster, slurm_cluster, walltime_seconds


@pytest.fixture(autouse=True)
def _keep_environment():
    """Starting nanny workers sets OMP_NUM_THREADS=1 in this process (Dask's pre-spawn
    environment); restore the environment so later tests and their subprocesses don't inherit it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _gpu_visible() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# Where dask_cuda and a GPU are both present, local_cluster() starts a GPU cluster instead.
GPU_CLUSTER_POSSIBLE = importlib.util.find_spec("dask_cuda") is not None and _gpu_visible()


@pytest.mark.skipif(GPU_CLUSTER_POSSIBLE, reason="a GPU cluster would start here")
def test_local_cluster_falls_back_to_cpu_and_runs_a_task(caplog):
    caplog.set_level(logging.INFO, logger="diagode_dist.service.cluster")
    with local_cluster(n_workers=2, protocol="ucx", rmm_pool_size="1GB") as cluster, \
            Client(cluster) as client:
        assert type(cluster) is LocalCluster
        assert len(cluster.workers) == 2
        assert client.submit(pow, 3, 4).result() == 81
        # each worker is its own process
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
        assert cluster.scheduler_address.startswith("tcp://")  # no UCX backend here
        assert cluster.dashboard_link  # a free port was picked
    text = caplog.text
    assert "starting a LocalCluster on the CPU" in text
    assert "rmm_pool_size='1GB' ignored" in text
    if importlib.util.find_spec("distributed_ucxx") is None:
        assert "using tcp" in text


def test_local_cluster_gpu_false_never_tries_cuda(caplog):
    caplog.set_level(logging.INFO, logger="diagode_dist.service.cluster")
    with local_cluster(n_workers=1, gpu=False, processes=False) as cluster, \
            Client(cluster) as client:
        assert type(cluster) is LocalCluster
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert "No GPU cluster" not in caplog.text
    assert "Started LocalCluster on the CPU: 1 worker(s) x 1 thread(s)" in caplog.text


@pytest.mark.skipif(GPU_CLUSTER_POSSIBLE, reason="a GPU cluster would start here")
def test_local_cluster_gpu_true_without_gpu_raises():
    with pytest.raises(RuntimeError, match="no GPU cluster possible"):
        local_cluster(n_workers=1, gpu=True)


class NVMLError(Exception):
    """Stand-in for pynvml's error base class (matched by name, as pynvml's own is)."""


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's spelling
    """What pynvml raises when the NVIDIA driver library is missing."""


def _dask_cuda_without_driver(raises: BaseException, calls: list):
    """A dask_cuda module whose LocalCUDACluster fails the way it does on a machine without a
    usable GPU driver (NVMLError_LibraryNotFound), recording its arguments."""
    module = types.ModuleType("dask_cuda")

    def LocalCUDACluster(**kwargs):  # noqa: N802 - dask_cuda's name
        calls.append(kwargs)
        raise raises

    module.LocalCUDACluster = LocalCUDACluster
    return module


@pytest.mark.skipif(GPU_CLUSTER_POSSIBLE, reason="the real dask_cuda is in use here")
def test_local_cluster_falls_back_when_dask_cuda_finds_no_driver(monkeypatch, caplog):
    calls = []
    error = NVMLError_LibraryNotFound("NVML Shared Library Not Found")
    monkeypatch.setitem(sys.modules, "dask_cuda", _dask_cuda_without_driver(error, calls))
    monkeypatch.setitem(sys.modules, "rmm", types.ModuleType("rmm"))  # the pool needs it
    caplog.set_level(logging.INFO, logger="diagode_dist.service.cluster")
    with local_cluster(n_workers=1, cuda_visible_devices=[1, 3], rmm_pool_size=0.5,
                       processes=False) as cluster, Client(cluster) as client:
        assert type(cluster) is LocalCluster
        assert client.submit(abs, -7).result() == 7
    # LocalCUDACluster was asked for the right GPUs and pool before it failed
    assert calls and calls[0]["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert calls[0]["rmm_pool_size"] == 0.5 and calls[0]["n_workers"] == 1
    assert calls[0]["rmm_allocator_external_lib_list"] == ["cupy"]  # CuPy allocates from it
    assert "NVMLError_LibraryNotFound: NVML Shared Library Not Found" in caplog.text
    with pytest.raises(RuntimeError, match="NVMLError_LibraryNotFound"):
        local_cluster(n_workers=1, gpu=True)


@pytest.mark.skipif(GPU_CLUSTER_POSSIBLE, reason="the real dask_cuda is in use here")
def test_local_cluster_does_not_hide_other_dask_cuda_errors(monkeypatch):
    """Only 'no GPU' errors fall back; a genuine mistake surfaces."""
    error = TypeError("__init__() got an unexpected keyword argument 'bogus'")
    monkeypatch.setitem(sys.modules, "dask_cuda", _dask_cuda_without_driver(error, []))
    with pytest.raises(TypeError, match="bogus"):
        local_cluster(n_workers=1, bogus=1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_workers": 0}, ValueError, "n_workers must be >= 1"),
    ({"n_workers": 1.5}, TypeError, "n_workers must be an int"),
    ({"threads_per_worker": 0}, ValueError, "threads_per_worker must be >= 1"),
    ({"gpu": "yes"}, ValueError, "gpu must be 'auto', True or False"),
    ({"gpu": 1}, ValueError, "gpu must be"),
    ({"dashboard_address": 8787}, TypeError, "dashboard_address"),
    ({"rmm_pool_size": "lots"}, ValueError, "rmm_pool_size='lots' is not a memory size"),
    ({"rmm_pool_size": 1.5}, ValueError, r"fraction of device memory in \(0, 1\]"),
    ({"rmm_pool_size": -5}, ValueError, "rmm_pool_size must be > 0"),
    ({"protocol": ""}, ValueError, "protocol"),
    ({"cuda_visible_devices": ""}, ValueError, "cuda_visible_devices is empty"),
    ({"cuda_visible_devices": [0, 0]}, ValueError, "lists a GPU twice"),
    ({"cuda_visible_devices": 3}, TypeError, "cuda_visible_devices"),
])
def test_local_cluster_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        local_cluster(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"jobs": 0}, ValueError, "jobs must be >= 1"),
    ({"jobs": 2.0}, TypeError, "jobs must be an int"),
    ({"jobs": True}, TypeError, "jobs must be an int"),
    ({"jobs": 1, "cores": 0}, ValueError, "cores must be >= 1"),
    ({"jobs": 1, "memory": "two gigs"}, ValueError, "memory='two gigs' is not a memory size"),
    ({"jobs": 1, "memory": "0GB"}, ValueError, "more than 0 bytes"),
    ({"jobs": 1, "memory": 2.5}, TypeError, "memory must be a str"),
    ({"jobs": 1, "memory": "1kB"}, ValueError, "under 1 MiB per worker"),
    ({"jobs": 1, "processes": 0}, ValueError, "processes must be >= 1"),
    ({"jobs": 1, "cores": 2, "processes": 3}, ValueError, "each worker needs at least one core"),
    ({"jobs": 1, "walltime": "1h"}, ValueError, "not a SLURM time"),
    ({"jobs": 1, "walltime": "00:00:30"}, ValueError, "under a minute"),
    ({"jobs": 1, "walltime": 3600}, TypeError, "walltime must be a str"),
    ({"jobs": 1, "interface": "no-such-nic0"}, ValueError, "interface='no-such-nic0' does not"),
    ({"jobs": 1, "gpus_per_job": -1}, ValueError, "gpus_per_job must be >= 0"),
    ({"jobs": 1, "cores": 4, "gpus_per_job": 2, "processes": 3}, ValueError,
     "conflicts with gpus_per_job"),
    ({"jobs": 1, "cores": 1, "gpus_per_job": 2}, ValueError, "cores=1 is less than the 2"),
    ({"jobs": 1, "cores": 2, "gpus_per_job": 2, "death_timeout": 60}, ValueError,
     "death_timeout is not an option of dask cuda worker"),
    ({"jobs": 1, "queue": ""}, ValueError, "queue must be a partition name"),
])
def test_slurm_cluster_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        slurm_cluster(**kwargs)


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60), ("30:00", 1800), ("01:00:00", 3600), ("1-00:00:00", 86400),
    ("2-6", 2 * 86400 + 6 * 3600), ("1-0:30", 86400 + 1800), ("0-01:02:03", 3723),
])
def test_walltime_formats(text, seconds):
    assert walltime_seconds(text) == seconds


def _worker_line(script: str) -> str:
    return next(line for line in script.splitlines() if " -m " in line)


def test_slurm_cpu_job_script():
    with slurm_cluster(jobs=3, cores=4, memory="8GB", processes=2, queue="batch",
                       walltime="02:00:00", interface="lo", local_directory="$TMPDIR",
                       submit=False, job_extra_directives=["--exclusive"]) as cluster:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")  # interface lo
    assert "#SBATCH -p batch" in script
    assert "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH -t 02:00:00" in script
    assert "#SBATCH --exclusive" in script  # the caller's directives are kept
    assert "gres" not in script
    line = _worker_line(script)
    assert "-m distributed.cli.dask_worker" in line
    assert "--nworkers 2" in line and "--nthreads 2" in line
    assert "--local-directory $TMPDIR" in line and "--interface lo" in line
    # workers retire before SLURM's kill: 2 h minus a margin, stagger inside the margin
    lifetime = int(re.search(r"--lifetime (\d+)s", line)[1])
    stagger = int(re.search(r"--lifetime-stagger (\d+)s", line)[1])
    assert 0 < lifetime + stagger < 7200 and lifetime - stagger > 7200 * 0.8


def test_slurm_gpu_job_script_runs_dask_cuda_worker():
    with slurm_cluster(jobs=2, cores=8, memory="64GB", queue="gpu", walltime="04:00:00",
                       gpus_per_job=4, local_directory="/scratch/me", submit=False,
                       worker_extra_args=["--rmm-pool-size", "30GB"]) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:4" in script
    line = _worker_line(script)
    assert "-m dask cuda worker" in line
    assert "--nthreads 2" in line  # 8 cores over 4 GPU workers
    assert "--rmm-pool-size 30GB" in line
    # options dask cuda worker does not have: its CLI would reject them
    for flag in ("--death-timeout", "--lifetime", "--nworkers", "--nanny"):
        assert flag not in line
    duration = re.search(r"DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION=(\d+)s", script)
    assert duration and 0 < int(duration[1]) < 4 * 3600
