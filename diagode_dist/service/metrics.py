"""Prometheus gauges of the training runs, served on the scheduler's ``/metrics``.

Dask's scheduler serves ``prometheus_client``'s process-wide ``REGISTRY`` at ``/metrics``, so one
collector registered there (once per process) shows every run of the parameter server::

    diagode_step{run_id="6a3c..."} 205.0
    diagode_loss{run_id="6a3c..."} 6.55

Gauges, all labelled ``run_id`` (``diagode_shard_*`` also ``shard``; see ``GAUGES``):
step, n_steps, epoch, epochs, loss (last step's mean loss), epoch_loss (last epoch's mean loss),
grad_norm (2-norm of the last step's mean gradient), step_seconds (wall time of the last step),
mean_step_seconds, steps_per_second, eta_seconds, elapsed_seconds, run_status (1, labelled with
the status), shard_compute_seconds, shard_pull_seconds, shard_restarts. A value the server has
not measured yet (the loss before the first step) is left out rather than reported as NaN.

The values are read from ``ParameterServer.statuses()`` when Prometheus scrapes; nothing is
stored here and nothing here can change a run.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Iterable, Iterator

from prometheus_client.core import REGISTRY, GaugeMetricFamily

from diagode_dist.service.protocol import RunStatus
from diagode_dist.service.server import get_server

logger = logging.getLogger(__name__)

# metric name -> (help text, key in the run's status dict)
GAUGES: dict[str, tuple[str, str]] = {
    "diagode_step": ("Completed optimisation steps of the run", "step"),
    "diagode_n_steps": ("Total steps of the run (epochs x steps per epoch)", "n_steps"),
    "diagode_epoch": ("Completed epochs of the run", "epoch"),
    "diagode_epochs": ("Epochs the run was asked for", "epochs"),
    "diagode_loss": ("Mean loss over the last step's minibatch", "loss"),
    "diagode_epoch_loss": ("Mean loss over the last completed epoch", "epoch_loss"),
    "diagode_grad_norm": ("2-norm of the last step's mean gradient d loss / d theta",
                          "grad_norm"),
    "diagode_step_seconds": ("Wall time of the last step, push to push (s)", "last_step_s"),
    "diagode_mean_step_seconds": ("Mean wall time per step after the first (s)",
                                  "mean_step_s"),
    "diagode_steps_per_second": ("Steps per second over the last steps", "steps_per_s"),
    "diagode_eta_seconds": ("Estimated time to the end of the run (s)", "eta_s"),
    "diagode_elapsed_seconds": ("Time since the run was created (s)", "elapsed_s"),
}
# metric name -> (help text, key in each shard's timings dict, or None for restarts)
SHARD_GAUGES: dict[str, tuple[str, str | None]] = {
    "diagode_shard_compute_seconds": ("Forward + adjoint time of the shard's last step (s)",
                                      "compute_s"),
    "diagode_shard_pull_seconds": ("Time the shard waited for theta before its last step (s)",
                                   "pull_s"),
    "diagode_shard_restarts": ("Times the shard's task lost its worker and was rerun", None),
}
STATUS_GAUGE = "diagode_run_status"

_CLOSED = {"closing", "closed", "failed"}


class RunCollector:
    """A ``prometheus_client`` collector of the runs of every scheduler it watches.

    Normally one scheduler per process; tests may start several in turn, so schedulers are
    held weakly and closed ones are skipped. A run id seen on two schedulers is reported once.
    """

    def __init__(self) -> None:
        self._schedulers: weakref.WeakSet = weakref.WeakSet()

    def watch(self, scheduler) -> None:
        """Report the runs of ``scheduler`` from now on."""
        self._schedulers.add(scheduler)

    def describe(self) -> list[GaugeMetricFamily]:
        """The (empty) families, so the registry reserves their names."""
        return list(_families().values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = _families()
        try:
            for status in _unique_runs(self._statuses()):
                _add_run(families, status)
        except Exception:  # never break Dask's own /metrics because of ours
            logger.exception("diagode metrics: could not read the runs")
            families = _families()
        yield from families.values()

    def _statuses(self) -> Iterator[RunStatus]:
        for scheduler in list(self._schedulers):
            if getattr(getattr(scheduler, "status", None), "name", "") in _CLOSED:
                continue
            server = get_server(scheduler)
            if server is not None:
                yield from server.statuses()


_COLLECTOR: RunCollector | None = None
_LOCK = threading.Lock()


def register_collector(scheduler) -> RunCollector:
    """Make ``/metrics`` report the runs of ``scheduler`` (idempotent).

    The collector is registered in ``prometheus_client.REGISTRY`` once per process; later calls
    only add the scheduler to the ones it watches.
    """
    global _COLLECTOR
    with _LOCK:
        if _COLLECTOR is None:
            collector = RunCollector()
            REGISTRY.register(collector)  # DuplicateTimeseries if someone else took our names
            _COLLECTOR = collector
        _COLLECTOR.watch(scheduler)
        return _COLLECTOR


def _families() -> dict[str, GaugeMetricFamily]:
    families = {name: GaugeMetricFamily(name, text, labels=["run_id"])
                for name, (text, _) in GAUGES.items()}
    families.update({name: GaugeMetricFamily(name, text, labels=["run_id", "shard"])
                     for name, (text, _) in SHARD_GAUGES.items()})
    families[STATUS_GAUGE] = GaugeMetricFamily(
        STATUS_GAUGE, "1 for the run's current status (running, finished, failed)",
        labels=["run_id", "status"])
    return families


def _unique_runs(statuses: Iterable[RunStatus]) -> Iterator[RunStatus]:
    seen = set()
    for status in statuses:
        if status["run_id"] not in seen:
            seen.add(status["run_id"])
            yield status


def _add_run(families: dict[str, GaugeMetricFamily], status: RunStatus) -> None:
    run_id = str(status["run_id"])
    history = status.get("history") or []
    values = {**status, "epoch_loss": history[-1] if history else None}
    for name, (_, key) in GAUGES.items():
        _add(families[name], [run_id], values.get(key))
    timings = status.get("shard_timings") or []
    restarts = status.get("shard_restarts") or [0] * len(timings)
    for shard, (timing, restart) in enumerate(zip(timings, restarts, strict=False)):
        for name, (_, key) in SHARD_GAUGES.items():
            value = restart if key is None else (timing or {}).get(key)
            _add(families[name], [run_id, str(shard)], value)
    families[STATUS_GAUGE].add_metric([run_id, str(status["status"])], 1.0)


def _add(family: GaugeMetricFamily, labels: list[str], value) -> None:
    """One sample, unless the value is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if math.isfinite(value):
        family.add_metric(labels, float(value))
