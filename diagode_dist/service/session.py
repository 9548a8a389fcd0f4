"""Client and cluster lifecycle: one context manager for every way of reaching workers.

    with open_client(scheduler="tcp://host:8786") as session:         # a running scheduler
    with open_client(scheduler_file="scheduler.json") as session:     # written by dask scheduler
    with open_client(slurm=SlurmOptions(jobs=2)) as session:          # SLURM jobs as workers
    with open_client(n_workers=2, gpu=False) as session:              # a cluster started here
        theta, history = fit_distributed(session.client, problem, theta0, options=options)

``session.client`` is a connected ``distributed.Client``; ``session.kind`` says what it reaches
("external", "slurm", or the local cluster's class name). A cluster started here is closed on
exit, after the shard tasks of finished runs have returned. The CLI and the deploy scripts are
built on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client

from diagode_dist.config import SlurmOptions
from diagode_dist.service.cluster import local_cluster, slurm_cluster

__all__ = ["Session", "open_client", "connect", "let_tasks_finish"]


@dataclass(frozen=True)
class Session:
    """A connected client and what it reaches."""

    client: Client
    kind: str  # "external", "slurm", or the class name of a local cluster started here

    @property
    def external(self) -> bool:
        """True on a scheduler that outlives this session (runs go on after it)."""
        return self.kind == "external"

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    def describe(self) -> str:
        """Two lines: cluster kind, workers and scheduler address; the dashboard link."""
        return (f"cluster: {self.kind}, {self.n_workers} worker(s), scheduler "
                f"{self.client.scheduler.address}\ndashboard: {self.client.dashboard_link}")


@contextlib.contextmanager
def open_client(scheduler: str | None = None, scheduler_file: str | os.PathLike | None = None,
                *, slurm: SlurmOptions | None = None, n_workers: int | None = None,
                gpu: bool | str = "auto", connect_timeout: float = 10.0,
                worker_timeout: float = 300.0, min_workers: int = 0,
                slurm_logs: str | os.PathLike | None = None, security: Any = None,
                **cluster_options: Any) -> Iterator[Session]:
    """A client to a running scheduler, to SLURM jobs, or to a local cluster started here.

    scheduler / scheduler_file: a running scheduler (the file may appear a moment later: it is
        waited for up to ``connect_timeout`` s); the session never closes that cluster.
    slurm: start ``slurm.jobs`` SLURM jobs (``dask_jobqueue.SLURMCluster``) and wait up to
        ``worker_timeout`` s for all their workers; ``slurm_logs``: folder for their logs.
    otherwise: ``local_cluster(n_workers, gpu=gpu, **cluster_options)`` (one worker per GPU,
        else per core).
    min_workers: on a running scheduler, wait up to ``worker_timeout`` s for that many workers.
    security: a ``distributed.Security`` for a running TLS scheduler (default: Dask's config).
    """
    if slurm is not None and not isinstance(slurm, SlurmOptions):
        raise TypeError(f"slurm must be SlurmOptions, got {type(slurm).__name__}")
    if scheduler is not None or scheduler_file is not None:
        started_here = {"slurm": slurm, "n_workers": n_workers, "slurm_logs": slurm_logs,
                        **cluster_options}
        given = sorted(name for name, value in started_here.items() if value is not None)
        if given:
            raise ValueError(f"open_client: {', '.join(given)} start a cluster here; a running "
                             f"scheduler takes none of them")
        if scheduler_file is not None:
            _wait_for_file(Path(scheduler_file), connect_timeout)
        client = connect(scheduler, scheduler_file, connect_timeout, security=security)
        with client:
            if min_workers:
                _wait_for_workers(client, min_workers, worker_timeout)
            yield Session(client, "external")
        return
    if security is not None:
        cluster_options["security"] = security
    if slurm is not None:
        options = dataclasses.asdict(slurm)
        if slurm_logs is not None:
            options["log_directory"] = os.fspath(slurm_logs)
        with slurm_cluster(**options, **cluster_options) as cluster, Client(cluster) as client:
            hint = f"; the jobs' logs are in {slurm_logs}" if slurm_logs is not None else ""
            _wait_for_workers(client, slurm.n_workers, worker_timeout, hint)
            yield Session(client, "slurm")
            let_tasks_finish(client)
        return
    with _workers_ignore_sigint():
        cluster = local_cluster(n_workers=n_workers, gpu=gpu, **cluster_options)
    with cluster, Client(cluster) as client:
        yield Session(client, type(cluster).__name__)
        let_tasks_finish(client)


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (they inherit it): a Ctrl-C in the terminal
    reaches the whole process group, and it is this process's to handle (end the run, close
    the cluster), not a KeyboardInterrupt traceback in every worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def let_tasks_finish(client: Client, timeout: float = 10.0) -> None:
    """Before closing a cluster started here, let the shard tasks of ended runs return.

    They return a moment after the server reports the run ended; closing the cluster under
    them cancels them and Dask logs a warning per task, which looks like a failure.
    """
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):  # a cluster already going down has nothing to wait for
        while time.monotonic() < deadline:
            if client.run_on_scheduler(_count_tasks) == 0:
                return
            time.sleep(0.05)


def _count_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def connect(address: str | None = None, scheduler_file: str | os.PathLike | None = None,
            timeout: float = 10, *, security: Any = None) -> Client:
    """A Client to a running scheduler, with clear errors.

    Exactly one of ``address`` ("tcp://host:port") or ``scheduler_file`` is needed.
    ``security``: a ``distributed.Security`` (default: Dask's config, e.g. the
    ``DASK_DISTRIBUTED__COMM__TLS__*`` variables). FileNotFoundError for a missing scheduler
    file; ConnectionError naming the scheduler if it cannot be reached within ``timeout``
    seconds, at once if it speaks TLS and no certificates are configured.
    """
    if (address is None) == (scheduler_file is None):
        raise ValueError("connect needs exactly one of address= or scheduler_file=")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if scheduler_file is not None:
        if not Path(scheduler_file).is_file():
            raise FileNotFoundError(f"scheduler_file: no such file: {scheduler_file}")
        target, kwargs = f"scheduler file {scheduler_file}", {"scheduler_file": str(scheduler_file)}
    else:
        if not isinstance(address, str):
            raise TypeError(f"address must be a str, got {type(address).__name__}")
        target, kwargs = f"scheduler at {address}", {"address": address}
    security = _security_for(address or _address_in(scheduler_file), target, security)
    try:
        return Client(timeout=timeout, set_as_default=False, security=security, **kwargs)
    except Exception as err:  # OSError / TimeoutError mostly; a non-Dask peer gives anything
        raise ConnectionError(f"cannot reach the Dask {target} within {timeout} s: "
                              f"{type(err).__name__}: {err}") from None


def _security_for(address: str | None, target: str, security):
    """``security``, or Dask's configured one; ConnectionError for a TLS scheduler when no
    certificates are configured (Dask would time out, then print a traceback at exit)."""
    from distributed import Security

    chosen = security if security is not None else Security()
    if (address or "").startswith("tls://") and not chosen.tls_ca_file:
        raise ConnectionError(
            f"the Dask {target} speaks TLS ({address}) but no certificates are configured: "
            f"pass --tls-ca-file, --tls-cert and --tls-key (or security=distributed.Security"
            f"(...), or set DASK_DISTRIBUTED__COMM__TLS__CA_FILE and "
            f"DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT/KEY)")
    return chosen


def _address_in(scheduler_file) -> str | None:
    try:
        return json.loads(Path(scheduler_file).read_text()).get("address")
    except (OSError, ValueError, AttributeError):
        return None


def _wait_for_file(path: Path, timeout: float) -> None:
    # A scheduler started in the background (sbatch scripts) writes its file a moment later.
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"scheduler_file: {path} does not exist (waited "
                                    f"{timeout:g} s)")
        time.sleep(0.1)


def _wait_for_workers(client: Client, count: int, timeout: float, hint: str = "") -> None:
    try:
        client.wait_for_workers(count, timeout=timeout)
    except TimeoutError:
        raise TimeoutError(f"fewer than {count} Dask worker(s) joined the scheduler "
                           f"{client.scheduler.address} within {timeout:g} s{hint}") from None
