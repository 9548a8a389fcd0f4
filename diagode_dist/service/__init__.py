"""The Dask training service: a scheduler-side parameter server and long-running shard tasks.

    from diagode_dist.service import submit, attach, fit_distributed, open_client, DaskProblem

Modules: ``client`` (submit / attach / RunHandle), ``session`` (open_client, connect),
``inputs`` (DaskProblem), ``protocol`` (RunSpec, RunStatus), ``plugin`` (installs the service
on a scheduler), ``server`` (the parameter server), ``shard`` (the worker loop), ``dashboard``
and ``page`` (the training page), ``metrics``, ``checkpoint``, ``cluster`` (local and SLURM
clusters). Names are imported on first use, so importing this package loads nothing heavy.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "submit": "client", "attach": "client", "fit_distributed": "client", "list_runs": "client",
    "RunHandle": "client", "connect": "session", "open_client": "session", "Session": "session",
    "DaskProblem": "inputs", "RunSpec": "protocol", "RunStatus": "protocol",
    "ParameterServer": "server", "ProblemFiles": "diagode_dist.files",
    "CheckpointError": "checkpoint",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        where = _WHERE[name]
        module = where if "." in where else f"diagode_dist.service.{where}"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'diagode_dist.service' has no attribute {name!r}")
