"""The Dask training service: a scheduler-side parameter server and long-running shard tasks.

    from diagode_dist.service import submit, attach, fit_distributed, ProblemFiles

See ``client`` (submit / attach / RunHandle), ``server`` (the scheduler plugin),
``shard`` (the worker loop), ``files`` (problems in files), ``checkpoint``.
"""

from diagode_dist.service.client import (
    RunHandle,
    attach,
    connect,
    fit_distributed,
    list_runs,
    submit,
)
from diagode_dist.service.files import ProblemFiles
from diagode_dist.service.server import ParameterServer

__all__ = ["submit", "attach", "fit_distributed", "connect", "list_runs", "RunHandle",
           "ProblemFiles", "ParameterServer"]
