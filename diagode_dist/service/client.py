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
validated before the cluster is asked to do any work. Works with synchronous Clients. What
crosses the wire is defined in ``protocol.py``.

Identity and trust: each submission gets a fresh ``uid`` (its task keys and the workers'
caches use it) and a secret ``token`` that only the returned ``RunHandle`` and the run's
shard tasks hold; the server refuses pushes and cancels without it. ``attach`` without a
token gives a read-only handle; ``attach(client, run_id, token=run.token)`` can cancel.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from distributed import Client, fire_and_forget, span
from distributed.protocol.serialize import ToPickle

from diagode_dist._array import is_sparse, to_numpy
from diagode_dist.files import ProblemFiles, array_fingerprint, operator_fingerprint
from diagode_dist.options import TrainOptions, takes_options, with_options
from diagode_dist.param import as_operator_param
from diagode_dist.problem import Problem
from diagode_dist.service._gpu_options import cluster_devices, plan_devices
from diagode_dist.service.checkpoint import CheckpointError
from diagode_dist.service.inputs import DaskProblem
from diagode_dist.service.plugin import install, install_on_workers
from diagode_dist.service.protocol import (
    RunSpec,
    RunStatus,
    ShardSpec,
    check_run_id,
    new_uid,
    operator_key,
    shard_key,
    status_from_wire,
)
from diagode_dist.service.shard import detach_operator, shard_columns, shard_loop

__all__ = ["RunHandle", "submit", "attach", "list_runs", "fit_distributed"]

_POLL_S = 0.5


class RunHandle:
    """A training run on the scheduler, addressed by its ``run_id``.

    ``token`` is the run's secret (set on the handle ``submit`` returns, or given to
    ``attach``); without it the handle can read but not cancel.
    """

    def __init__(self, client: Client, run_id: str, token: str | None = None):
        self.client = client
        self.run_id = run_id
        self.token = token

    def status(self) -> RunStatus:
        """Current status: run_id, status ("running" | "finished" | "failed"), step, n_steps,
        epoch (completed epochs), epochs, loss (last step's mean loss or None), history
        (per-epoch mean loss), steps_per_s, error (str or None), plus shard timings, ETA,
        checkpoint information."""
        status = _call(self.client, "diagode_status", run_id=self.run_id)
        if status is None:
            raise ValueError(f"the scheduler has no run {self.run_id!r} (it may have been "
                             f"dropped after a scheduler restart)")
        return status_from_wire(status)

    def wait(self, timeout: float | None = None,
             progress: Callable[[RunStatus], Any] | None = None) -> tuple[np.ndarray, list[float]]:
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
            status = status_from_wire(status)
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

    def cancel(self, reason: str = "cancelled by a client") -> RunStatus:
        """Stop the run: it is marked failed with ``reason`` and its shard tasks exit.

        PermissionError without the run's token (a handle from ``attach`` without ``token``).
        """
        status = _call(self.client, "diagode_cancel", run_id=self.run_id, token=self.token,
                       reason=str(reason))
        if status is None:
            raise ValueError(f"the scheduler has no run {self.run_id!r}")
        if "refused" in status:
            raise PermissionError(status["refused"])
        return status_from_wire(status)

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r})"



@takes_options(service=True)
def submit(client: Client, problem, theta0, param=None, *, options: TrainOptions | None = None,
           checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
           run_id: str | None = None, resume_override: Iterable[str] = (),
           stall_timeout: float | None = None, **kwargs) -> RunHandle:
    """Start a training run on the cluster; returns at once with its handle (which holds the
    run's secret token: only it, and the run's shard tasks, can push or cancel).

    Parameters
    ----------
    client : a connected synchronous ``distributed.Client``
    problem : ``Problem`` (its columns travel to the workers inside the shard tasks),
        ``ProblemFiles`` (each shard reads its own columns; paths must be readable on every
        worker) or ``DaskProblem`` (dask arrays persisted on the workers; each column chunk
        of F is a shard, run where it is held)
    theta0 : (p,) float initial theta (ignored when resuming from a checkpoint)
    param : operator parametrisation (default: ``options.param``, i.e. ``SoftplusParam()``);
        theta0 has its ``theta_size(n)``
    options : ``TrainOptions``; keyword arguments (epochs, lr, k, batch_size, weight_decay,
        clamp, seed, rtol, max_chunk_columns, method, log_every, n_shards, checkpoint_every,
        step_timeout) replace its fields. ``n_shards``: column shards, one long-running task
        each (default: one per worker; a DaskProblem's column chunks). The result depends on
        n_shards (summation order), not on the number of workers.
    checkpoint_dir : directory on the scheduler's file system for ``checkpoint.npz``, written
        atomically every ``checkpoint_every`` steps and at the end; a relative path is
        resolved by the scheduler, where it is used. One live run per directory (a lock).
    resume : continue from ``checkpoint_dir``'s checkpoint (start from theta0 if none yet);
        the checkpoint must have been written for the same problem (content hashes) and the
        same options that determine theta, else ``CheckpointError`` lists each difference
    resume_override : options among "lr", "weight_decay", "clamp" that may differ from the
        checkpoint's on resume (the new values apply from the checkpoint's step on)
    run_id : name of the run (default: a random hex id). A name is refused while a run with
        it is running, or has ended and is still held by the scheduler (unless ``resume``)
    stall_timeout : seconds a shard may go without pushing before its worker is removed and
        the shard rerun elsewhere (default: 10 median step times, within 30-120 s)
    """
    return _submit("submit", client, problem, theta0, param, options, checkpoint_dir, resume,
                   run_id, kwargs, resume_override, stall_timeout)


@takes_options(service=True)
def fit_distributed(client: Client, problem, theta0, param=None, *,
                    options: TrainOptions | None = None,
                    checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
                    run_id: str | None = None, resume_override: Iterable[str] = (),
                    stall_timeout: float | None = None,
                    **kwargs) -> tuple[np.ndarray, list[float]]:
    """Train on the cluster and wait: (theta, history) like ``dd.fit``.

    The parameters are ``submit``'s; this is ``submit(...).wait()``.
    """
    return _submit("fit_distributed", client, problem, theta0, param, options, checkpoint_dir,
                   resume, run_id, kwargs, resume_override, stall_timeout).wait()


def attach(client: Client, run_id: str, token: str | None = None) -> RunHandle:
    """Handle of an existing run; ValueError if the scheduler has no such run.

    Without ``token`` the handle reads (status, wait, result); with the run's token
    (``RunHandle.token`` of the submitter) it can also cancel.
    """
    if not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str, got {type(run_id).__name__}")
    if token is not None and not isinstance(token, str):
        raise TypeError(f"token must be a str or None, got {type(token).__name__}")
    install(client)
    handle = RunHandle(client, run_id, token)
    handle.status()  # raises ValueError if unknown
    return handle


def list_runs(client: Client) -> list[RunStatus]:
    """Status dicts of every run the scheduler holds."""
    install(client)
    return [status_from_wire(status) for status in _call(client, "diagode_runs")]


# ---- submission --------------------------------------------------------------------------------

def _submit(caller: str, client, problem, theta0, param, options, checkpoint_dir, resume,
            run_id, kwargs, resume_override=(), stall_timeout=None) -> RunHandle:
    """Check everything (errors in the caller's name), register the run, submit its shards."""
    if param is not None:
        kwargs = {**kwargs, "param": param}
    options = with_options(caller, options, kwargs)
    n, S = _check_problem(problem)
    theta_size = as_operator_param(options.diagonal_map(), "param").theta_size(n)
    theta0 = _check_theta0(theta0, theta_size, n)
    if not isinstance(client, Client):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
    if isinstance(resume_override, str):
        resume_override = (resume_override,)
    fingerprint = {"problem": _fingerprint(problem), "param": _param_name(options)}
    _check_method(options.method, fingerprint["problem"]["A0"])
    spec = RunSpec(
        run_id=check_run_id(run_id) if run_id is not None else new_uid()[:12],
        n=n, S=S, n_shards=_n_shards(client, problem, options.n_shards, S), options=options,
        checkpoint_dir=_checkpoint_dir(checkpoint_dir), resume=resume,
        resume_override=tuple(resume_override), stall_timeout=stall_timeout,
        n_theta=None if theta_size == n else theta_size, fingerprint=fingerprint)
    devices = plan_devices(cluster_devices(client), spec.n_shards)  # before registering
    token = secrets.token_urlsafe(24)
    install(client)
    install_on_workers(client)
    created = _call(client, "diagode_create_run", spec=spec.to_wire(), theta0=ToPickle(theta0),
                    token=token)
    if "error" in created:
        if "path" in created and "problem" in created:
            raise CheckpointError(created["path"], created["problem"])
        raise (PermissionError if created.get("locked") else ValueError)(created["error"])
    try:
        _submit_shards(client, problem, spec, token, devices)
    except BaseException:
        with contextlib.suppress(Exception):
            _call(client, "diagode_cancel", run_id=spec.run_id, token=token,
                  reason="submitting shard tasks failed")
        raise
    return RunHandle(client, spec.run_id, token)


def _checkpoint_dir(value) -> str | None:
    """The folder as given (str): resolved by the scheduler, which uses it."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path, got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"checkpoint_dir must be a non-empty path (an empty one would mean "
                         f"the scheduler's working directory), got {value!r}")
    return text


def _param_name(options: TrainOptions) -> str:
    param = options.param
    return param if isinstance(param, str) else f"{type(param).__module__}." \
                                                f"{type(param).__qualname__}"


def _fingerprint(problem) -> dict:
    """Shapes and content hashes of the problem's arrays (what a checkpoint belongs to)."""
    if isinstance(problem, ProblemFiles):
        return {"kind": "files", **problem.preflight(), "T": problem.T, "beta": problem.beta}
    if isinstance(problem, DaskProblem):  # graph tokens: the data stay on the workers
        from dask.base import tokenize

        arrays = {name: getattr(problem, name) for name in ("F", "labels", "x0", "targets")}
        return {"kind": "dask", "A0": operator_fingerprint(_host(problem.template.A0)),
                **{name: {"shape": list(array.shape), "dask_token": tokenize(array)}
                   for name, array in arrays.items() if array is not None},
                "T": problem.T, "beta": problem.beta}
    host = problem.to_device(np)
    loss = host.loss
    arrays = {"F": host.F, "x0": host.x0, "labels": getattr(loss, "labels", None),
              "targets": getattr(loss, "targets", None)}
    return {"kind": "memory", "A0": operator_fingerprint(host.A0),
            **{name: array_fingerprint(np.asarray(array), name)
               for name, array in arrays.items() if array is not None},
            "loss": type(loss).__name__, "obs_times": list(loss.obs_times),
            "T": host.T, "beta": host.beta}


def _host(A0):
    return A0 if is_sparse(A0) else np.asarray(A0)


def _call(client: Client, op: str, **kwargs):
    """Call a parameter-server handler on the scheduler and return its reply."""
    return client.sync(getattr(client.scheduler, op), **kwargs)


def _submit_shards(client: Client, problem, spec: RunSpec, token: str,
                   devices: list[tuple[str, int]]) -> None:
    """One fire-and-forget task per shard, on the (device, shares) ``plan_devices`` chose.

    A DaskProblem's shards run where their chunks are held; the others are spread over the
    workers round robin (loosely: they may move).
    """
    run_id, uid, n_shards = spec.run_id, spec.uid, spec.n_shards
    workers = sorted(client.scheduler_info()["workers"])
    operator, blocks = None, [None] * n_shards
    with span(f"diagode-run-{run_id}"), warnings.catch_warnings():
        # Columns and A0 deliberately travel in the graph (recomputable after a worker dies).
        warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
        if isinstance(problem, DaskProblem):
            ranges = problem.shard_ranges()
            blocks = problem.persist(client)
            operator = client.submit(_same, problem.template.A0, key=operator_key(uid),
                                     pure=False)
        else:
            ranges = shard_columns(spec.S, n_shards)
        if isinstance(problem, Problem):
            problem = problem.to_device(np)  # host copy once (a no-op for NumPy problems)
            operator = client.submit(_same, problem.A0, key=operator_key(uid), pure=False)
        for shard, (lo, hi) in enumerate(ranges):
            shard_spec = ShardSpec(run=spec, shard=shard, lo=lo, hi=hi, token=token,
                                   device=devices[shard][0], device_shares=devices[shard][1])
            if isinstance(problem, Problem):
                data = detach_operator(problem.select(np.arange(lo, hi)))
            elif isinstance(problem, DaskProblem):
                data = problem.shard_data()
            else:
                data = problem
            place = {}
            if workers and not isinstance(problem, DaskProblem):
                place = {"workers": [workers[shard % len(workers)]], "allow_other_workers": True}
            future = client.submit(shard_loop, shard_spec, data, operator, blocks[shard],
                                   key=shard_key(uid, shard), pure=False, **place)
            fire_and_forget(future)


def _same(value):
    """Task body that hands its argument on (A0 as a recomputable graph value)."""
    return value


# ---- validation (before any work on the cluster) ---------------------------------------------

def _check_problem(problem) -> tuple[int, int]:
    if isinstance(problem, ProblemFiles):
        problem.preflight()  # every value read once, on the client, before any work
        return problem.n, problem.S
    if isinstance(problem, (Problem, DaskProblem)):
        return problem.n, problem.S
    raise TypeError(f"problem must be a diagode_dist.Problem, ProblemFiles or DaskProblem, got "
                    f"{type(problem).__name__}")


def _check_method(method: str, operator_print: dict) -> None:
    """method="rational" factorizes on every shard: refuse a dense A0 before any shard runs."""
    if method == "rational" and not operator_print.get("sparse", False):
        raise ValueError("method='rational' needs a sparse A0 (SciPy CSR, a .npz or sparse .mtx "
                         "file): the shift-and-invert space factorizes I - gamma A; use "
                         "method='polynomial' or 'auto' for a dense A0")


def _check_theta0(theta0, size: int, n: int) -> np.ndarray:
    theta = to_numpy(theta0)
    if theta.dtype.kind not in "fiu" or theta.dtype == bool:
        raise TypeError(f"theta0 must be a real float array, got dtype {theta.dtype}")
    if theta.shape != (size,):
        what = "(n,)" if size == n else "(param.theta_size(n),)"
        raise ValueError(f"theta0 must have shape {what} = ({size},), got {theta.shape}")
    if not np.isfinite(theta).all():
        raise ValueError("theta0 contains NaN or inf")
    return np.array(theta, dtype=np.float64)


def _n_shards(client: Client, problem, n_shards: int | None, S: int) -> int:
    if isinstance(problem, DaskProblem):
        chunks = len(problem.column_chunks)
        if n_shards is not None and n_shards != chunks:
            raise ValueError(f"n_shards={n_shards}, but F has {chunks} column chunks, which are "
                             f"the shards: rechunk F (F.rechunk({{1: ...}})) or leave n_shards "
                             f"unset")
        return chunks
    if n_shards is None:
        n_shards = len(client.scheduler_info()["workers"])
        if n_shards == 0:
            raise ValueError("n_shards=None means one shard per worker, but the cluster has "
                             "no workers yet; pass n_shards or wait for workers")
        n_shards = min(n_shards, S)
    if n_shards > S:
        raise ValueError(f"n_shards must be <= S = {S} (the number of columns), got {n_shards}")
    return n_shards
