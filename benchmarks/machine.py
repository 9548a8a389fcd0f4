"""The machine a benchmark ran on, in words: CPU, cores, memory, load, library versions, BLAS."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    described = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
                 for p in pools]
    return ", ".join(described) or "unknown"


def describe_machine(markdown: bool = False, torch_threads: int | None = None) -> str:
    """Lines describing this machine and the software versions, for the benchmark header."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gib()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    versions = [f"Python {platform.python_version()}"]
    for name in ("numpy", "scipy", "torch", "torchdiffeq", "cupy", "diagode-dist"):
        version = _version(name)
        if version is None and name == "cupy":  # the wheels are named cupy-cudaXXx
            version = next((_version(d) for d in ("cupy-cuda13x", "cupy-cuda12x") if _version(d)),
                           None)
        if version is not None:
            versions.append(f"{name} {version}")
    items = [
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable)"
                + (f", {memory:.0f} GiB memory" if memory else "")),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("load average at start", " ".join(f"{x:.2f}" for x in load) if load else "unknown"),
        ("software", ", ".join(versions)),
        ("BLAS", _blas()),
    ]
    if torch_threads is not None:
        items.append(("peers", f"torch float64, torch.set_num_threads({torch_threads})"))
    bullet = "- " if markdown else "  "
    return "\n".join(f"{bullet}{key}: {value}" for key, value in items)
