"""The one place that installs the service on a Dask scheduler.

Installed, the scheduler holds the parameter server (``server.ParameterServer``: the RPC
handlers of the runs) and serves the training page, its JSON and the Prometheus gauges
(``dashboard.py``, ``metrics.py``). Two ways, same result:

- from a client: ``install(client)`` (``submit``, ``attach`` and ``list_runs`` do it); it is
  idempotent, and a no-op when the scheduler already has the service;
- as a scheduler preload: ``dask scheduler --preload diagode_dist.service.plugin``.

The client side only pickles ``ServicePlugin``; the scheduler-side modules (the server, the
web handlers) are imported on the scheduler when the plugin starts, so a client never imports
them.
"""

from __future__ import annotations

import importlib

import dask
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from diagode_dist.service.protocol import SERVICE_PLUGIN

__all__ = ["ServicePlugin", "ProfilerOff", "install", "install_on_workers", "dask_setup"]


class ServicePlugin(SchedulerPlugin):
    """Adds the parameter server to the scheduler and installs its web pages and gauges."""

    name = SERVICE_PLUGIN
    idempotent = True

    async def start(self, scheduler) -> None:
        # Scheduler side only: imported here, on the scheduler, not by the client.
        server = importlib.import_module("diagode_dist.service.server")
        dashboard = importlib.import_module("diagode_dist.service.dashboard")
        if server.get_server(scheduler) is None:
            parameter_server = server.ParameterServer()
            await parameter_server.start(scheduler)
            scheduler.add_plugin(parameter_server, idempotent=True)
        dashboard.install(scheduler)


class ProfilerOff(WorkerPlugin):
    """Stops Dask's statistical profiler on a worker that trains.

    A shard is one task that runs for the whole run; the profiler samples its stack every
    10 ms and keeps an hour of per-second call trees: worker memory grew ~7 MB per 1000 steps
    with it (flat without). Opt out with ``diagode.service.keep-profiler: true`` (read on the
    worker), e.g. to look at the dashboard's Profile page.
    """

    name = "diagode-profiler-off"
    idempotent = True

    def setup(self, worker) -> None:
        if dask.config.get("diagode.service.keep-profiler", False):
            return
        for name in ("profile", "profile-cycle"):
            callback = worker.periodic_callbacks.pop(name, None)
            if callback is not None:
                callback.stop()


def install_on_workers(client: Client) -> None:
    """What a run needs on the workers (idempotent; workers that join later get it too)."""
    client.register_plugin(ProfilerOff())


def install(client: Client) -> None:
    """Install the service on the client's scheduler (idempotent)."""
    client.register_plugin(ServicePlugin())


def dask_setup(scheduler) -> None:
    """Scheduler preload entry point: ``dask scheduler --preload diagode_dist.service.plugin``."""
    scheduler.add_plugin(ServicePlugin(), idempotent=True)
