"""Client side of the training service: submit a run, attach to it, wait for its result.

    from dask.distributed import Client, LocalCluster
    from diagode_dist.service.client import submit, attach

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:
        run = submit(client, prob, theta0, n_shards=4, epochs=20, checkpoint_dir="ckpt")
        print(run.run_id, run.status()["step"])
        theta, history = run.wait(progress=print)

A run lives on the scheduler (``diagode_dist.service.server.ParameterServer``) and its shard
tasks are fire-and-forget, so it keeps going when the submitting client disconnects; any
client can ``attach(client, run_id)`` to follow it or collect the result. Everything is
validated before the cluster is asked to do any work. Works with synchronous Clients.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, fire_and_forget
from distributed.protocol.serialize import ToPickle

from diagode_dist._checks import check_int, positive_real
from diagode_dist.service.dashboard import DashboardPlugin
from diagode_dist.service.files import ProblemFiles
from diagode_dist.service.server import ParameterServer, operator_key, shard_key
from diagode_dist.service.shard import ShardSpec, detach_operator, shard_columns, shard_loop

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_POLL_S = 0.5


class RunHandle:
    """A training run on the scheduler, addressed by its ``run_id``."""

    def __init__(self, client: Client, run_id: str):
        self.client = client
        self.run_id = run_id

    def status(self) -> dict[str, Any]:
        """Current status: run_id, status ("running" | "finished" | "failed"), step, n_steps,
        epoch (completed epochs), epochs, loss (last step's mean loss or None), history
        (per-epoch mean loss), steps_per_s, error (str or None), plus shard timings, ETA,
        checkpoint information."""
        status = _call(self.client, "diagode_status", run_id=self.run_id)
        if status is None:
            raise ValueError(f"the scheduler has no run {self.run_id!r} (it may have been "
                             f"dropped after a scheduler restart)")
        return _status_dict(status)

    def wait(self, timeout: float | None = None,
             progress: Callable[[dict], Any] | None = None) -> tuple[np.ndarray, list[float]]:
        """Block until the run ends; returns (theta (n,), history).

        ``progress(status)`` is called about every 0.5 s and once at the end. Raises
        RuntimeError with the server's message if the run failed, TimeoutError after
        ``timeout`` seconds (the run goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            poll = _POLL_S if deadline is None else max(0.0, min(_POLL_S,
                                                                 deadline - time.monotonic()))
            status = _call(self.client, "diagode_wait", run_id=self.run_id, timeout=poll)
            if status is None:
                raise ValueError(f"the scheduler has no run {self.run_id!r}")
            status = _status_dict(status)
            if progress is not None:
                progress(status)
            if status["status"] == "failed":
                raise RuntimeError(f"diagode run {self.run_id} failed at step {status['step']}: "
                                   f"{status['error']}")
            if status["status"] == "finished":
                result = _call(self.client, "diagode_result", run_id=self.run_id)
                return np.asarray(result["theta"]), list(result["history"])
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"diagode run {self.run_id} still running at step "
                                   f"{status['step']}/{status['n_steps']} after {timeout} s")

    def result(self) -> tuple[np.ndarray, list[float]]:
        """(theta, history) once the run has finished (waits for it)."""
        return self.wait()

    def cancel(self, reason: str = "cancelled by a client") -> dict[str, Any]:
        """Stop the run: it is marked failed with ``reason`` and its shard tasks exit."""
        status = _call(self.client, "diagode_cancel", run_id=self.run_id, reason=str(reason))
        if status is None:
            raise ValueError(f"the scheduler has no run {self.run_id!r}")
        return _status_dict(status)

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r})"


def submit(client: Client, problem, theta0, param=None, n_shards: int | None = None,
           epochs: int = 20, lr: float = 1e-3, k: int = 30, batch_size: int = 32,
           weight_decay: float = 0.0, clamp: tuple[float, float] | None = (-50.0, 50.0),
           seed: int = 0, rtol: float = 1e-12, checkpoint_dir: str | os.PathLike | None = None,
           checkpoint_every: int = 10, resume: bool = False, run_id: str | None = None,
           step_timeout: float = 300.0) -> RunHandle:
    """Start a training run on the cluster; returns at once with its handle.

    Parameters
    ----------
    client : a connected synchronous ``distributed.Client``
    problem : ``Problem`` (its columns travel to the workers inside the shard tasks) or
        ``ProblemFiles`` (each shard memory-maps its own columns; paths must be readable on
        every worker)
    theta0 : (n,) float initial theta (ignored when resuming from a checkpoint)
    param : diagonal map (default ``SoftplusParam()``)
    n_shards : column shards, one long-running task each (default: number of workers);
        1 <= n_shards <= S. The result depends on n_shards (summation order), not on the
        number of workers.
    epochs, lr, k, batch_size, weight_decay, clamp, seed, rtol : as ``dd.fit``
    checkpoint_dir : directory (on the scheduler's file system) for ``checkpoint.npz``,
        written atomically every ``checkpoint_every`` steps and at the end; one run per
        directory
    resume : continue from ``checkpoint_dir``'s checkpoint (start from theta0 if none yet)
    run_id : name of the run (default: a random hex id)
    step_timeout : seconds one step may take before the run fails
    """
    from diagode_dist.param import SoftplusParam

    param = SoftplusParam() if param is None else param
    n, S = _check_problem(problem)
    theta0 = _check_theta0(theta0, n)
    options = _check_options(param, epochs, lr, k, batch_size, weight_decay, clamp, seed, rtol,
                             checkpoint_dir, checkpoint_every, resume, run_id, step_timeout)
    if not isinstance(client, Client):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
    n_shards = _check_n_shards(client, n_shards, S)
    run_id = run_id or uuid.uuid4().hex[:12]
    steps_per_epoch = math.ceil(S / batch_size)
    spec = {"run_id": run_id, "n": n, "S": S, "n_shards": n_shards,
            "steps_per_epoch": steps_per_epoch, **options}
    _install_server(client)
    created = _call(client, "diagode_create_run", spec=spec, theta0=ToPickle(theta0))
    if "error" in created:
        raise ValueError(created["error"])
    try:
        _submit_shards(client, problem, spec, param, k, rtol)
    except BaseException:
        with contextlib.suppress(Exception):
            _call(client, "diagode_cancel", run_id=run_id, reason="submitting shard tasks failed")
        raise
    return RunHandle(client, run_id)


def attach(client: Client, run_id: str) -> RunHandle:
    """Handle of an existing run; ValueError if the scheduler has no such run."""
    if not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str, got {type(run_id).__name__}")
    _install_server(client)
    handle = RunHandle(client, run_id)
    handle.status()  # raises ValueError if unknown
    return handle


def list_runs(client: Client) -> list[dict[str, Any]]:
    """Status dicts of every run the scheduler holds."""
    _install_server(client)
    return [_status_dict(status) for status in _call(client, "diagode_runs")]


def fit_distributed(client: Client, problem, theta0, **kwargs) -> tuple[np.ndarray, list[float]]:
    """``submit(client, problem, theta0, **kwargs).wait()``: (theta, history) like ``dd.fit``."""
    return submit(client, problem, theta0, **kwargs).wait()


def connect(address: str | None = None, scheduler_file: str | os.PathLike | None = None,
            timeout: float = 10) -> Client:
    """A Client to a running scheduler, with clear errors.

    Exactly one of ``address`` ("tcp://host:port") or ``scheduler_file`` is needed.
    FileNotFoundError for a missing scheduler file; ConnectionError naming the scheduler if
    it cannot be reached within ``timeout`` seconds.
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
    try:
        return Client(timeout=timeout, set_as_default=False, **kwargs)
    except Exception as err:  # OSError / TimeoutError mostly; a non-Dask peer gives anything
        raise ConnectionError(f"cannot reach the Dask {target} within {timeout} s: "
                              f"{type(err).__name__}: {err}") from None


# ---- submission --------------------------------------------------------------------------------

def _install_server(client: Client) -> None:
    """Register the parameter server plugin (a no-op if it is there, e.g. from a preload)."""
    client.register_plugin(ParameterServer())
    client.register_plugin(DashboardPlugin())  # the /diagode page and /metrics gauges


def _call(client: Client, op: str, **kwargs):
    """Call a parameter-server handler on the scheduler and return its reply."""
    return client.sync(getattr(client.scheduler, op), **kwargs)


def _status_dict(status: dict) -> dict:
    """The wire turns lists into tuples; give them back as lists."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in status.items()}


def _submit_shards(client: Client, problem, spec: dict, param, k: int, rtol: float) -> None:
    """One fire-and-forget task per shard, spread over the workers (loosely: may move)."""
    from distributed import span

    run_id = spec["run_id"]
    workers = sorted(client.scheduler_info()["workers"])
    ranges = shard_columns(spec["S"], spec["n_shards"])
    operator = None
    with span(f"diagode-run-{run_id}"), warnings.catch_warnings():
        # Columns and A0 deliberately travel in the graph (recomputable after a worker dies).
        warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
        if not isinstance(problem, ProblemFiles):
            problem = problem.to_device(np)  # host copy once (a no-op for NumPy problems)
            operator = client.submit(_same, problem.A0, key=operator_key(run_id), pure=False)
        for shard, (lo, hi) in enumerate(ranges):
            shard_spec = ShardSpec(run_id=run_id, shard=shard, n_shards=spec["n_shards"],
                                   lo=lo, hi=hi, S=spec["S"], batch_size=spec["batch_size"],
                                   seed=spec["seed"], steps_per_epoch=spec["steps_per_epoch"],
                                   param=param, k=k, rtol=rtol)
            data = problem if isinstance(problem, ProblemFiles) else \
                detach_operator(problem.select(np.arange(lo, hi)))
            place = {"workers": [workers[shard % len(workers)]],
                     "allow_other_workers": True} if workers else {}
            future = client.submit(shard_loop, shard_spec, data, operator,
                                   key=shard_key(run_id, shard), pure=False, **place)
            fire_and_forget(future)


def _same(value):
    """Task body that hands its argument on (A0 as a recomputable graph value)."""
    return value


# ---- validation (before any work on the cluster) ---------------------------------------------

def _check_problem(problem) -> tuple[int, int]:
    from diagode_dist.problem import Problem

    if isinstance(problem, ProblemFiles):
        problem.validate()
        return problem.n, problem.S
    if isinstance(problem, Problem):
        return problem.n, problem.S
    raise TypeError(f"problem must be a diagode_dist.Problem or a ProblemFiles, got "
                    f"{type(problem).__name__}")


def _check_theta0(theta0, n: int) -> np.ndarray:
    from diagode_dist._array import to_numpy

    theta = to_numpy(theta0)
    if theta.dtype.kind not in "fiu" or theta.dtype == bool:
        raise TypeError(f"theta0 must be a real float array, got dtype {theta.dtype}")
    if theta.shape != (n,):
        raise ValueError(f"theta0 must have shape (n,) = ({n},), got {theta.shape}")
    if not np.isfinite(theta).all():
        raise ValueError("theta0 contains NaN or inf")
    return np.array(theta, dtype=np.float64)


def _check_n_shards(client: Client, n_shards, S: int) -> int:
    if n_shards is None:
        n_shards = len(client.scheduler_info()["workers"])
        if n_shards == 0:
            raise ValueError("n_shards=None means one shard per worker, but the cluster has "
                             "no workers yet; pass n_shards or wait for workers")
        n_shards = min(n_shards, S)
    check_int(n_shards, "n_shards", 1)
    if n_shards > S:
        raise ValueError(f"n_shards must be <= S = {S} (the number of columns), got {n_shards}")
    return int(n_shards)


def _check_options(param, epochs, lr, k, batch_size, weight_decay, clamp, seed, rtol,
                   checkpoint_dir, checkpoint_every, resume, run_id, step_timeout) -> dict:
    from diagode_dist.optim import Adam
    from diagode_dist.param import check_param

    check_param(param)
    check_int(epochs, "epochs", 1)
    check_int(k, "k", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(checkpoint_every, "checkpoint_every", 1)
    check_int(seed, "seed", 0)
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
    positive_real(step_timeout, "step_timeout")
    Adam(lr=lr, weight_decay=weight_decay, clamp=clamp)  # its own ValueErrors name the argument
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path, got {type(checkpoint_dir).__name__}")
    if run_id is not None and (not isinstance(run_id, str) or not _RUN_ID.match(run_id)):
        raise ValueError(f"run_id must be 1-64 characters of letters, digits, '_', '.', '-' "
                         f"(starting with a letter or digit), got {run_id!r}")
    return {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size),
            "weight_decay": float(weight_decay),
            "clamp": None if clamp is None else tuple(float(c) for c in clamp),
            "seed": int(seed),
            "checkpoint_dir": None if checkpoint_dir is None else
            str(Path(checkpoint_dir).expanduser().absolute()),
            "checkpoint_every": int(checkpoint_every), "resume": resume,
            "step_timeout": float(step_timeout)}
