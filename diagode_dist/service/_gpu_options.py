"""Cluster options that decide where shards compute: CPU workers that see no GPU, and RMM
pools that CuPy really allocates from (used by ``cluster``)."""

from __future__ import annotations

import importlib.util
import sys


def pool_size(size):
    """rmm_pool_size as dask-cuda reads it: a fraction given as a str ("0.8", from a command
    line) becomes a float (dask's parse_bytes would read it as 0 bytes)."""
    if isinstance(size, str):
        try:
            fraction = float(size)
        except ValueError:
            return size
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"rmm_pool_size={size!r}: a number without unit is a fraction of "
                             "device memory in (0, 1]; give bytes with a unit, e.g. '24GB'")
        return fraction
    return size


def rmm_options(rmm_pool_size) -> dict:
    """LocalCUDACluster options of an RMM pool that CuPy really allocates from: without
    ``rmm_allocator_external_lib_list`` dask-cuda reserves the pool and CuPy keeps its own."""
    if not _importable("rmm"):
        raise ImportError(f"rmm_pool_size={rmm_pool_size!r} needs RMM (pip install rmm-cu12 or "
                          "rmm-cu13, matching CuPy's CUDA); leave it unset to use CuPy's own "
                          "memory pool")
    return {"rmm_pool_size": rmm_pool_size, "rmm_allocator_external_lib_list": ["cupy"]}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules without a spec (a stand-in)
        return name in sys.modules


def cpu_worker_env(kwargs: dict) -> dict:
    """Worker processes of a CPU cluster see no GPU (CUDA_VISIBLE_DEVICES=""): shards use a GPU
    whenever their process sees one, and every worker of a plain LocalCluster would land on
    GPU 0. Threads in this process (processes=False) keep its environment."""
    if not kwargs.get("processes", True):
        return kwargs
    env = dict(kwargs.get("env") or {})
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return dict(kwargs, env=env)
