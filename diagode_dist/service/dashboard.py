"""The training page on the Dask dashboard, its JSON, and the Prometheus gauges of the runs.

Once installed on a scheduler (``install(scheduler)``, done by ``plugin.ServicePlugin``), its
web server (the dashboard port) serves:

- ``/diagode``: one card per run with status, step / n_steps, epoch, last loss, gradient norm,
  steps/s, ETA, step time, per-shard compute time and the loss curve (``page.render_page``);
  it reloads itself every 2 s (``?refresh=SECONDS``, 0 to stop).
- ``/diagode/status.json``: ``{"time", "parameter_server", "runs": [status, ...]}``, each status
  as ``RunHandle.status()`` returns it (NaN and inf as null).
- ``/metrics`` (Dask's own route) gains the ``diagode_*`` gauges of ``metrics.py``.

Everything is GET only: any other method is answered 405, and the handlers only read the
parameter server's public status. Both pages leave out what tells an outsider about the
machines: the checkpoint shows as its folder's name, not its absolute path, and the shards'
worker addresses are dropped, unless the operator opts in with the Dask config
``diagode.service.expose-paths: true`` (``DASK_DIAGODE__SERVICE__EXPOSE_PATHS=True``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import weakref

import dask
from distributed.http.utils import RequestHandler

from diagode_dist._io import plain
from diagode_dist.service.metrics import register_collector
from diagode_dist.service.page import DEFAULT_REFRESH_S, STATUS_JSON, render_page
from diagode_dist.service.server import get_server

logger = logging.getLogger(__name__)

PAGE = "diagode"
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # scheduler -> page path


def install(scheduler, prefix: str | None = None) -> str | None:
    """Add the training page, its JSON and the Prometheus collector to ``scheduler``.

    Idempotent. ``prefix`` is the dashboard's URL prefix (default: the one the scheduler's own
    routes use, e.g. ``dask scheduler --dashboard-prefix``). Returns the page's path, or None
    when the scheduler has no web server (the gauges are registered all the same).
    """
    register_collector(scheduler)
    if scheduler in _INSTALLED:
        return _INSTALLED[scheduler]
    application = getattr(scheduler, "http_application", None)
    if application is None:
        logger.info("diagode dashboard: the scheduler has no web server; page not installed")
        return None
    prefix = _route_prefix(application) if prefix is None else "/" + prefix.strip("/") + "/"
    prefix = prefix.replace("//", "/")
    options = {"dask_server": scheduler, "extra": {"prefix": prefix}}
    application.add_handlers(r".*", [
        (re.escape(prefix + PAGE) + "/?", TrainingPageHandler, options),
        (re.escape(prefix + STATUS_JSON), StatusJSONHandler, options),
    ])
    _INSTALLED[scheduler] = prefix + PAGE
    logger.info("diagode dashboard: training page at %s%s", prefix, PAGE)
    return prefix + PAGE


# ---- HTTP handlers -------------------------------------------------------------------------

class _ReadOnlyHandler(RequestHandler):
    """GET only (tornado answers 405 to anything else); never cached; no scripts or fetches."""

    SUPPORTED_METHODS = ("GET",)

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy",
                        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                        "base-uri 'none'; form-action 'none'; frame-ancestors 'self'")


def public_statuses(server) -> list:
    """The runs' statuses as the web pages show them (see the module docstring)."""
    statuses = server.statuses() if server is not None else []
    if dask.config.get("diagode.service.expose-paths", False):
        return statuses
    return [without_locations(status) for status in statuses]


def without_locations(status: dict) -> dict:
    """``status`` without the checkpoint's absolute path and the shards' worker addresses."""
    checkpoint = status.get("checkpoint")
    if checkpoint:
        folder, name = os.path.split(checkpoint)
        checkpoint = f".../{os.path.basename(folder)}/{name}"
    timings = [{key: value for key, value in timing.items() if key != "worker"}
               for timing in status.get("shard_timings") or []]
    return {**status, "checkpoint": checkpoint, "shard_timings": timings}


class TrainingPageHandler(_ReadOnlyHandler):
    def get(self) -> None:
        server = get_server(self.server)
        statuses = public_statuses(server)
        traces = {s["run_id"]: server.loss_trace(s["run_id"]) for s in statuses}
        refresh = _refresh_seconds(self.get_query_argument("refresh", None))
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.write(render_page(statuses, server is not None, prefix=self.extra.get("prefix", "/"),
                               refresh=refresh, address=getattr(self.server, "address", ""),
                               traces=traces))


class StatusJSONHandler(_ReadOnlyHandler):
    def get(self) -> None:
        server = get_server(self.server)
        statuses = public_statuses(server)
        body = {"time": time.time(), "parameter_server": server is not None,
                "runs": plain(statuses, finite=True)}
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(body, allow_nan=False))


def _refresh_seconds(text: str | None) -> int:
    try:
        return min(max(int(text), 0), 3600) if text is not None else DEFAULT_REFRESH_S
    except ValueError:
        return DEFAULT_REFRESH_S


def _route_prefix(application) -> str:
    """The URL prefix of the scheduler's own routes ("/" unless --dashboard-prefix was given)."""
    try:
        for rule in application.wildcard_router.rules:
            path = getattr(rule.matcher, "_path", None) or ""
            if path.endswith("/health"):
                return path[: -len("health")]
    except AttributeError:
        pass
    return "/"
