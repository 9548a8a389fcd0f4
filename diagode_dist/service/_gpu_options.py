"""Where shards compute: CPU workers that see no GPU and RMM pools that CuPy really allocates
from (cluster options, used by ``cluster``), and the device of each shard, chosen at submission
from what the workers see (``plan_devices``) and resolved on its worker (``resolve_device``)."""

from __future__ import annotations

import collections
import importlib.util
import os
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


# ---- the device of each shard, decided at submission ----------------------------------------

def worker_devices() -> dict:
    """What one worker process can compute on (run on every worker by ``cluster_devices``):
    {"host": its host name, "gpus": ["host/PCI bus id", ...] in CuPy's device order, [] when
    it sees no GPU or has no CuPy}."""
    import socket

    from diagode_dist._array import visible_gpus

    host = socket.gethostname()
    return {"host": host, "gpus": [f"{host}/{bus}" for bus in visible_gpus()]}


def cluster_devices(client) -> dict[str, dict]:
    """``worker_devices()`` of every worker that answers (worker address -> dict)."""
    replies = client.run(worker_devices, on_error="return")
    return {address: reply for address, reply in replies.items() if isinstance(reply, dict)}


def plan_devices(workers: dict[str, dict], n_shards: int) -> list[tuple[str, int]]:
    """(device, concurrent shards on that device) of each shard, placed round robin on the
    sorted workers as the client submits them.

    workers: ``cluster_devices``' answer. Every worker sees a GPU: when each has its own first
    one and its host has a worker per GPU it sees (dask-cuda's pinning), "gpu"; else the
    shards take the GPUs their worker sees in turn, starting at its position ("gpu:<i>", i
    below the smallest count, so that it exists wherever the shard moves). Otherwise (no GPU,
    or only some workers with one) every shard computes on the CPU, "cpu". The count divides
    the memory budget: shards of one worker process take turns on a GPU (so it counts the
    processes with a shard on that GPU), and on a host's CPU they all compute at once (so it
    counts them all).
    """
    addresses = sorted(workers)
    if not addresses:
        raise ValueError("the cluster has no workers yet: the shards' device (CPU or GPU) is "
                         "chosen from its workers; wait for them (client.wait_for_workers(n))")
    per_worker = min(len(workers[address]["gpus"]) for address in addresses)
    pinned = per_worker > 0 and _one_worker_per_gpu(workers)
    placed, turns = [], collections.Counter()
    for shard in range(n_shards):
        position = shard % len(addresses)
        address = addresses[position]
        if per_worker:
            index = 0 if pinned else (turns[address] + position) % per_worker
            turns[address] += 1
            device = "gpu" if pinned or per_worker == 1 else f"gpu:{index}"
            placed.append((device, workers[address]["gpus"][index], address))
        else:
            placed.append(("cpu", workers[address]["host"], address))
    sharing = collections.defaultdict(set)
    for shard, (_, where, address) in enumerate(placed):
        sharing[where].add(address if per_worker else shard)
    return [(device, len(sharing[where])) for device, where, _ in placed]


def _one_worker_per_gpu(workers: dict[str, dict]) -> bool:
    """True when on every host the workers see different first GPUs, one worker per GPU."""
    hosts = collections.defaultdict(list)
    for reply in workers.values():
        hosts[reply["host"]].append(reply["gpus"])
    return all(len({gpus[0] for gpus in seen}) == len(seen) >= max(map(len, seen))
               for seen in hosts.values())


def resolve_device(device: str, visible: int) -> int | None:
    """The CuPy device ordinal a shard with ``device`` computes on (None: the CPU), in a worker
    process that sees ``visible`` GPUs; RuntimeError when it cannot."""
    if device == "cpu":
        return None
    ordinal = 0 if device == "gpu" else int(device.split(":", 1)[1])
    if ordinal >= visible:
        raise RuntimeError(f"the shard was planned for device {device!r}, but this worker "
                           f"process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return ordinal
