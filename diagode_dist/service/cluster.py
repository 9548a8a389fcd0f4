"""Dask clusters for training: a workstation (one worker per GPU) and SLURM jobs.

Both functions only configure Dask's own deployers (``dask_cuda.LocalCUDACluster``,
``distributed.LocalCluster``, ``dask_jobqueue.SLURMCluster``); they check their arguments first,
so a typo fails with a ``ValueError``/``TypeError`` naming the argument before anything starts.

``local_cluster`` picks a GPU cluster when it can and falls back to the CPU cores otherwise, and
logs which one it started and why (logger ``diagode_dist.service.cluster``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import dask
import psutil
from dask.utils import parse_bytes
from distributed import LocalCluster

from diagode_dist._checks import check_int
from diagode_dist.service._gpu_options import cpu_worker_env, pool_size, rmm_options

logger = logging.getLogger(__name__)

_UCX_PROTOCOLS = ("ucx", "ucxx")


# ---------------------------------------------------------------------------------------------
# workstation


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    gpu: bool | str = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    *,
    cuda_visible_devices: str | Sequence[int] | None = None,
    rmm_pool_size: str | int | float | None = None,
    protocol: str | None = None,
    **kw: Any,
) -> LocalCluster:
    """Start a cluster on this machine: one worker per GPU if it can, else on the CPU cores.

    n_workers: workers to start. GPU: at most one per visible GPU (default: all of them);
        CPU: default ``os.cpu_count() // threads_per_worker`` (at least 1).
    threads_per_worker: threads per worker (>= 1). Keep 1 on GPUs: one stream of work per GPU.
    gpu: ``"auto"`` (GPU cluster when ``dask_cuda`` imports and a GPU is visible, else CPU, with a
        logged reason), ``True`` (GPU or ``RuntimeError``), ``False`` (CPU only).
    dashboard_address: ``"127.0.0.1:0"`` (default): this machine only, a free port (see
        ``cluster.dashboard_link``); ``":0"``: every interface; ``None``: no dashboard.
    cuda_visible_devices: GPUs to use, e.g. ``"0,2"`` or ``[0, 2]`` (default: the process's own
        ``CUDA_VISIBLE_DEVICES``, i.e. all GPUs); one worker each, pinned to it.
    rmm_pool_size: per-GPU RMM pool CuPy allocates from ("24GB", bytes, or a fraction of device
        memory in (0, 1], also as a str); needs ``rmm``. Ignored (logged) on a CPU cluster.
    protocol: ``None``/``"tcp"``, ``"tls"``, or ``"ucx"``; UCX is used only when a UCX backend
        (``distributed-ucxx``) is installed, else TCP with a logged message.
    kw: passed on to the cluster class (``memory_limit``, ``security``, ``processes``, ...).

    Returns the started cluster; ``Client(cluster)`` connects to it. Close it (or use ``with``).
    """
    _check_local_args(n_workers, threads_per_worker, gpu, dashboard_address, rmm_pool_size,
                      protocol)
    rmm_pool_size = pool_size(rmm_pool_size)
    devices = _normalise_devices(cuda_visible_devices)
    common = dict(threads_per_worker=threads_per_worker, dashboard_address=dashboard_address,
                  **kw)
    if gpu is not False:
        cluster, why_not = _try_cuda_cluster(n_workers, devices, rmm_pool_size, protocol, common)
        if cluster is not None:
            return cluster
        if gpu is True:
            raise RuntimeError(f"local_cluster(gpu=True): no GPU cluster possible: {why_not}")
        logger.warning("No GPU cluster (%s): starting a LocalCluster on the CPU cores instead.",
                       why_not)
    return _cpu_cluster(n_workers, rmm_pool_size, protocol, common)


def _check_local_args(n_workers, threads_per_worker, gpu, dashboard_address, rmm_pool_size,
                      protocol) -> None:
    if n_workers is not None:
        check_int(n_workers, "n_workers", minimum=1)
    check_int(threads_per_worker, "threads_per_worker", minimum=1)
    if not (isinstance(gpu, bool) or gpu == "auto"):
        raise ValueError(f"gpu must be 'auto', True or False, got {gpu!r}")
    if dashboard_address is not None and not isinstance(dashboard_address, str):
        raise TypeError(f"dashboard_address must be a str like ':0' or None, got "
                        f"{type(dashboard_address).__name__}")
    if rmm_pool_size is not None:
        _check_pool_size(rmm_pool_size)
    if protocol is not None and (not isinstance(protocol, str) or not protocol):
        raise ValueError(f"protocol must be a non-empty str like 'tcp' or 'ucx', got {protocol!r}")


def _check_pool_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, (str, int, float)):
        raise TypeError(f"rmm_pool_size must be a str like '24GB', an int or a float, got "
                        f"{type(size).__name__}")
    if isinstance(size, float):
        if not 0.0 < size <= 1.0:
            raise ValueError(f"rmm_pool_size as a float is a fraction of device memory in "
                             f"(0, 1], got {size}")
        return
    if isinstance(size, str):
        _parse_memory("rmm_pool_size", size)
    elif size <= 0:
        raise ValueError(f"rmm_pool_size must be > 0 bytes, got {size}")


def _normalise_devices(devices) -> str | None:
    if devices is None:
        return None
    if isinstance(devices, str):
        items = [d.strip() for d in devices.split(",") if d.strip()]
    elif isinstance(devices, Sequence):
        items = [str(d) for d in devices]
    else:
        raise TypeError(f"cuda_visible_devices must be a str like '0,1' or a list of ints, got "
                        f"{type(devices).__name__}")
    if not items:
        raise ValueError("cuda_visible_devices is empty: name at least one GPU, or use gpu=False")
    if len(set(items)) != len(items):
        raise ValueError(f"cuda_visible_devices lists a GPU twice: {devices!r}")
    return ",".join(items)


def _try_cuda_cluster(n_workers, devices, rmm_pool_size, protocol, common):
    """(LocalCUDACluster, None) or (None, the reason it is not possible)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" and devices is None:
        return None, "CUDA_VISIBLE_DEVICES is set empty"
    try:
        from dask_cuda import LocalCUDACluster
    except Exception as exc:  # ImportError, or a CUDA library that fails while importing
        return None, f"dask_cuda not importable ({type(exc).__name__}: {exc})"
    kwargs = dict(common, protocol=_pick_protocol(protocol))
    if n_workers is not None:
        kwargs["n_workers"] = n_workers
    if devices is not None:
        kwargs["CUDA_VISIBLE_DEVICES"] = devices
    if rmm_pool_size is not None:
        kwargs.update(rmm_options(rmm_pool_size))
    try:
        cluster = LocalCUDACluster(**kwargs)
    except Exception as exc:
        if not _means_no_gpu(exc):
            raise
        return None, f"{type(exc).__name__}: {exc}"
    logger.info("Started LocalCUDACluster: %d worker(s), one per GPU (%s), protocol %s, "
                "RMM pool %s; dashboard %s", len(cluster.workers),
                devices or os.environ.get("CUDA_VISIBLE_DEVICES", "all GPUs"),
                kwargs["protocol"] or "tcp", rmm_pool_size, cluster.dashboard_link)
    return cluster, None


def _means_no_gpu(exc: BaseException) -> bool:
    """True for the errors a machine without a usable GPU or driver raises (NVML, CUDA)."""
    names = [cls.__name__ for cls in type(exc).__mro__]
    if any(name.startswith("NVMLError") or name.startswith("CUDA") for name in names):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("nvml", "no cuda", "cuda driver", "no gpu", "cudaerror"))


def _cpu_cluster(n_workers, rmm_pool_size, protocol, common) -> LocalCluster:
    if rmm_pool_size is not None:
        logger.warning("rmm_pool_size=%r ignored: RMM pools need a GPU cluster.", rmm_pool_size)
    if n_workers is None:
        n_workers = max(1, (os.cpu_count() or 1) // common["threads_per_worker"])
    chosen = _pick_protocol(protocol)
    kwargs = cpu_worker_env(dict(common, n_workers=n_workers))
    if chosen is not None:
        kwargs["protocol"] = chosen
    cluster = LocalCluster(**kwargs)
    logger.info("Started LocalCluster on the CPU: %d worker(s) x %d thread(s); dashboard %s",
                n_workers, common["threads_per_worker"], cluster.dashboard_link)
    return cluster


def _pick_protocol(protocol: str | None) -> str | None:
    if protocol is None or protocol not in _UCX_PROTOCOLS:
        return protocol
    if ucx_available():
        return protocol
    logger.warning("protocol=%r requested but no UCX backend (distributed-ucxx) is installed: "
                   "using tcp.", protocol)
    return "tcp"


def ucx_available() -> bool:
    """True when a working UCX comm backend for Dask (``distributed_ucxx``) is installed."""
    return importlib.util.find_spec("distributed_ucxx") is not None


# ---------------------------------------------------------------------------------------------
# SLURM


def slurm_cluster(
    jobs: int,
    cores: int = 1,
    memory: str = "2GB",
    processes: int | None = None,
    queue: str | None = None,
    walltime: str = "01:00:00",
    interface: str | None = None,
    local_directory: str | None = None,
    gpus_per_job: int = 0,
    *,
    submit: bool = True,
    **kw: Any,
):
    """Submit ``jobs`` SLURM jobs running Dask workers (``dask_jobqueue.SLURMCluster``), scaled.

    jobs: number of SLURM jobs (>= 1); each job is one allocation of cores/memory/GPUs.
    cores: CPU cores per job (``--cpus-per-task``); split evenly over the job's worker processes.
    memory: memory per job, e.g. "2GB", "500MiB" (``--mem``); split over the worker processes.
    processes: worker processes per CPU job (default 1, at most ``cores``). A GPU job always runs
        one worker per GPU, so leave it unset there (or equal to ``gpus_per_job``).
    queue: SLURM partition (``-p``); default: the cluster's default partition.
    walltime: job time limit, "HH:MM:SS", "D-HH:MM:SS", "MM:SS" or minutes. Workers are told to
        retire (``--lifetime``) a little before it, so SLURM's kill is not counted as a worker
        failure; for runs longer than the walltime use ``cluster.adapt(minimum_jobs=jobs,
        maximum_jobs=jobs)`` so retired jobs are replaced.
    interface: network interface the scheduler and workers listen on ("ib0", "eth0", "lo"), as
        named on this host; default: the host's default route.
    local_directory: scratch directory for the workers' spill files, as seen on the compute nodes
        (e.g. "$TMPDIR" or "/tmp"); not checked here.
    gpus_per_job: GPUs per job (``--gres=gpu:N``); > 0 starts ``dask cuda worker`` (one worker
        per GPU, pinned via the ``CUDA_VISIBLE_DEVICES`` SLURM sets), 0 a plain ``dask worker``.
    submit: False returns the cluster without submitting jobs (to read ``cluster.job_script()``).
    kw: passed on to ``SLURMCluster`` (``account``, ``job_extra_directives``, ``worker_extra_args``,
        ``job_script_prologue``, ``scheduler_options``, ``security``, ``python``, ...); lists given
        for ``job_extra_directives``/``worker_extra_args`` are extended, not replaced.

    Returns the ``SLURMCluster`` after ``cluster.scale(jobs=jobs)``; the jobs are queued, not
    necessarily running yet: ``client.wait_for_workers(n)`` waits for them (n = jobs x worker
    processes per job). Close it to cancel the jobs.
    """
    check_int(jobs, "jobs", minimum=1)
    check_int(cores, "cores", minimum=1)
    check_int(gpus_per_job, "gpus_per_job", minimum=0)
    memory_bytes = _parse_memory("memory", memory)
    processes = _worker_processes(processes, cores, gpus_per_job)
    if memory_bytes // processes < 2**20:
        raise ValueError(f"memory={memory!r} leaves under 1 MiB per worker process "
                         f"({processes} per job)")
    seconds = walltime_seconds(walltime)
    _check_interface(interface)
    if local_directory is not None and not isinstance(local_directory, (str, os.PathLike)):
        raise TypeError(f"local_directory must be a path, got {type(local_directory).__name__}")
    if queue is not None and (not isinstance(queue, str) or not queue.strip()):
        raise ValueError(f"queue must be a partition name, got {queue!r}")

    options = _slurm_options(kw, cores=cores, memory=memory, processes=processes, queue=queue,
                             walltime=walltime, interface=interface,
                             local_directory=local_directory, gpus_per_job=gpus_per_job,
                             seconds=seconds)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ImportError("slurm_cluster needs dask-jobqueue: pip install 'diagode-dist[slurm]'") \
            from exc
    if gpus_per_job > 0:
        if kw.get("death_timeout") is not None:
            raise ValueError("death_timeout is not an option of dask cuda worker: leave it unset "
                             "when gpus_per_job > 0")
        options.setdefault("job_cls", _cuda_slurm_job_class())
    cluster = SLURMCluster(**options)
    if not submit:
        return cluster
    cluster.scale(jobs=jobs)
    logger.info("SLURMCluster: %d job(s) of %d core(s), %s, %d GPU(s), partition %s, walltime %s"
                "; scheduler %s, dashboard %s", jobs, cores, memory, gpus_per_job,
                queue or "(default)", walltime, cluster.scheduler_address, cluster.dashboard_link)
    return cluster


def _worker_processes(processes, cores, gpus_per_job) -> int:
    if gpus_per_job > 0:
        # dask cuda worker starts one process per visible GPU whatever we ask; 1 means "unset".
        if processes not in (None, 1, gpus_per_job):
            raise ValueError(f"processes={processes} conflicts with gpus_per_job={gpus_per_job}: "
                             "a GPU job runs one worker per GPU")
        processes = gpus_per_job
    elif processes is None:
        processes = 1
    check_int(processes, "processes", minimum=1)
    if processes > cores:
        raise ValueError(f"cores={cores} is less than the {processes} worker process(es) per job: "
                         "each worker needs at least one core")
    return processes


def _slurm_options(kw, *, cores, memory, processes, queue, walltime, interface, local_directory,
                   gpus_per_job, seconds) -> dict:
    options = dict(kw)
    lifetime, stagger = _lifetime(seconds)
    directives = list(options.get("job_extra_directives", None) or [])
    if gpus_per_job > 0:
        directives.append(f"--gres=gpu:{gpus_per_job}")
        # `python -m dask cuda worker <scheduler> --name ... --nthreads ... --memory-limit ...`.
        # dask cuda worker has no --lifetime option: the workers read it from Dask's config.
        options.setdefault("worker_command", "dask cuda worker")
        options["job_script_prologue"] = [
            *(options.get("job_script_prologue", None) or []),
            f"export DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION={lifetime}s",
            f"export DASK_DISTRIBUTED__WORKER__LIFETIME__STAGGER={stagger}s"]
    else:
        options["worker_extra_args"] = [*(options.get("worker_extra_args", None) or []),
                                        "--lifetime", f"{lifetime}s",
                                        "--lifetime-stagger", f"{stagger}s"]
    options["job_extra_directives"] = directives
    scheduler_options = dict(options.get("scheduler_options", None) or {})
    scheduler_options.setdefault("dashboard_address", ":0")
    options["scheduler_options"] = scheduler_options
    options.update(cores=cores, memory=memory, processes=processes, walltime=walltime)
    for name, value in (("queue", queue), ("interface", interface),
                        ("local_directory", local_directory)):
        if value is not None:
            options[name] = os.fspath(value) if name == "local_directory" else value
    return options


def _cuda_slurm_job_class():
    """A SLURMJob whose worker command line suits ``dask cuda worker``.

    dask-jobqueue always adds ``--death-timeout`` (from its config) unless that config is None,
    and ``dask cuda worker`` rejects the option; so build each job with it unset.
    """
    from dask_jobqueue.slurm import SLURMJob  # optional: the slurm extra

    class CUDASLURMJob(SLURMJob):
        def __init__(self, *args, **kwargs):
            config_name = kwargs.get("config_name") or SLURMJob.config_name
            with dask.config.set({f"jobqueue.{config_name}.death-timeout": None}):
                super().__init__(*args, **kwargs)

    return CUDASLURMJob


def _lifetime(walltime_s: int) -> tuple[int, int]:
    """Worker lifetime and stagger (s) that retire workers before SLURM kills the job."""
    margin = min(max(walltime_s // 10, 30), 300)
    return walltime_s - margin, margin // 4


def walltime_seconds(walltime: str) -> int:
    """Seconds in a SLURM time limit; at least 60.

    SLURM's formats: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS".
    """
    if not isinstance(walltime, str):
        raise TypeError(f"walltime must be a str like '01:00:00', got {type(walltime).__name__}")
    text = walltime.strip()
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    fields = clock.split(":")
    if not all(f.isdigit() for f in [days, *fields]) or len(fields) > 3:
        raise ValueError(f"walltime={walltime!r} is not a SLURM time: use 'HH:MM:SS', "
                         "'D-HH:MM:SS', 'MM:SS' or minutes")
    numbers = [int(f) for f in fields]
    if "-" in text:  # after days come hours, then minutes, then seconds
        h, m, sec = (numbers + [0, 0])[:3]
    else:  # without days: minutes, minutes:seconds, or hours:minutes:seconds
        h, m, sec = ([0, *numbers, 0] if len(numbers) == 1 else
                     [0, *numbers] if len(numbers) == 2 else numbers)
    seconds = ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if seconds < 60:
        raise ValueError(f"walltime={walltime!r} is under a minute: too short for a Dask worker")
    return seconds


def _check_interface(interface) -> None:
    if interface is None:
        return
    if not isinstance(interface, str):
        raise TypeError(f"interface must be a str like 'ib0', got {type(interface).__name__}")
    known = sorted(psutil.net_if_addrs())
    if interface not in known:
        raise ValueError(f"interface={interface!r} does not exist on this host "
                         f"(known: {', '.join(known)})")


# ---------------------------------------------------------------------------------------------
# argument checks


def _parse_memory(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a str like '2GB', got {type(value).__name__}")
    try:
        size = parse_bytes(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}={value!r} is not a memory size like '2GB' or '500MiB'") from exc
    if size <= 0:
        raise ValueError(f"{name}={value!r} must be more than 0 bytes")
    return size
