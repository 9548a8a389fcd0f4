"""The parameter server: a Dask scheduler plugin that holds each run's theta and Adam state.

It lives in the scheduler process and adds RPC handlers to ``scheduler.handlers`` (the way
distributed's own ``event.py`` / ``queues.py`` extensions do). Install it either way:

- from a client: ``client.register_plugin(ParameterServer())`` (idempotent; ``submit`` does it);
- on the scheduler's command line: ``dask scheduler --preload diagode_dist.service.server``.

Protocol (all handlers run on the scheduler's event loop, so no locks are needed):

- ``diagode_create_run(spec, theta0)``: a new run (or one resumed from its checkpoint).
- ``diagode_pull(run_id, want, timeout)``: waits (without blocking the loop) until the run's
  step is >= ``want`` or the run has ended; replies with the current step and theta.
- ``diagode_push(run_id, step, shard, loss_sum, grad_sum, count, timings)``: one shard's sums
  for one step. Pushes for another step or a shard already in are ignored, so a rerun task
  can never count twice. The last push of a step sums the shards in shard order, divides by
  the total count, takes one (pure) Adam step and releases the new theta to waiting shards.
- ``diagode_status``, ``diagode_wait``, ``diagode_result``, ``diagode_cancel``, ``diagode_runs``.

Failure handling: a step that takes longer than the run's ``step_timeout`` fails the run; a
shard task that errs (including Dask's ``KilledWorker``) fails the run through the plugin's
``transition`` hook; a worker death while the run keeps making progress does not use up
Dask's ``allowed-failures`` budget (see ``_forgive_worker_death``); ``Client.restart`` fails
running runs (their tasks are gone). theta is never modified in place: replies being sent may
still reference the old array.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import ToPickle

from diagode_dist.service.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

PLUGIN_NAME = "diagode-parameter-server"
SHARD_PREFIX = "diagode-shard"
OPERATOR_PREFIX = "diagode-operator"
_KEEP_ENDED_RUNS = 100  # ended runs kept for status/result; older ones are dropped
_WATCHDOG_PERIOD_S = 0.1
_RATE_WINDOW = 20  # steps over which steps_per_s is measured
_TRACE_STEPS = 5000  # per-step losses kept for plots (the latest ones)
_RESTARTED = ("the cluster was restarted (Client.restart) and its shard tasks were cancelled; "
              "submit again with resume=True to continue from the last checkpoint")


def shard_key(run_id: str, shard: int) -> tuple[str, str, int]:
    """Dask key of a shard's loop task; the task stream shows the prefix ``diagode-shard``."""
    return (SHARD_PREFIX, run_id, int(shard))


def operator_key(run_id: str) -> tuple[str, str]:
    """Dask key of the in-memory A0 of a run (shared by the shards of one worker)."""
    return (OPERATOR_PREFIX, run_id)


def get_server(scheduler) -> ParameterServer | None:
    """The installed ParameterServer of a scheduler, or None (for dashboards and metrics)."""
    return scheduler.plugins.get(PLUGIN_NAME)


@dataclass
class _Run:
    """State of one training run, held by the server."""

    spec: dict[str, Any]
    adam: Any
    theta: np.ndarray
    opt_state: dict[str, Any]
    step: int = 0
    history: list[float] = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    last_loss: float | None = None
    grad_norm: float | None = None
    status: str = "running"
    error: str | None = None
    pushes: dict[int, tuple[float, np.ndarray, int]] = field(default_factory=dict)
    shard_timings: list[dict[str, float]] = field(default_factory=list)
    shard_restarts: list[int] = field(default_factory=list)
    death_step: dict[int, int] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    ended: float | None = None
    step_started: float = field(default_factory=time.monotonic)
    step_done_times: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=_RATE_WINDOW + 1))
    last_step_s: float | None = None
    loss_trace: collections.deque = field(  # (steps done, mean loss of that step)
        default_factory=lambda: collections.deque(maxlen=_TRACE_STEPS))
    timed_steps: int = 0  # steps after the first (which includes start-up), for the means
    timed_wall_s: float = 0.0
    timed_compute_s: float = 0.0  # slowest shard's compute time, summed over timed steps
    resumed_from_step: int | None = None
    checkpoint_step: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def run_id(self) -> str:
        return self.spec["run_id"]

    @property
    def n_shards(self) -> int:
        return self.spec["n_shards"]

    @property
    def steps_per_epoch(self) -> int:
        return self.spec["steps_per_epoch"]

    @property
    def n_steps(self) -> int:
        return self.spec["epochs"] * self.spec["steps_per_epoch"]

    def notify(self) -> None:
        """Wake every waiter (pull / wait) on this run; later waiters get a fresh event."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()


class ParameterServer(SchedulerPlugin):
    """Scheduler plugin holding training runs; see the module docstring for the protocol."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.scheduler = None
        self.runs: dict[str, _Run] = {}
        self._watchdog: asyncio.Task | None = None
        self._writes: dict[str, asyncio.Task] = {}  # checkpoint path -> last write
        self._background: set[asyncio.Task] = set()

    # ---- plugin hooks ----------------------------------------------------------------------

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update({
            "diagode_create_run": self.create_run,
            "diagode_pull": self.pull,
            "diagode_push": self.push,
            "diagode_status": self.status,
            "diagode_wait": self.wait,
            "diagode_result": self.result,
            "diagode_cancel": self.cancel,
            "diagode_runs": self.list_runs,
        })
        self._watchdog = asyncio.create_task(self._watch_step_timeouts())

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for run in self.runs.values():
            if run.status == "running":
                self._fail(run, "the scheduler closed")
        pending = [task for task in self._writes.values() if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=30)

    def restart(self, scheduler) -> None:
        for run in list(self.runs.values()):
            if run.status == "running":
                self._fail(run, _RESTARTED)

    def transition(self, key, start, finish, *args, stimulus_id=None, **kwargs) -> None:
        """Fail a run whose shard task errs or is dropped; forgive worker deaths with progress."""
        run, shard = self._run_of_key(key)
        if run is None or run.status != "running":
            return
        what = f"shard {shard} task" if shard is not None else "A0 (operator) task"
        if finish == "erred":
            self._fail(run, f"{what} {key!r} failed: {self._exception_text(key, kwargs)}")
        elif finish == "forgotten" and "restart" in (stimulus_id or ""):
            self._fail(run, _RESTARTED)  # Client.restart forgets every task
        elif finish == "forgotten":
            self._fail(run, f"{what} {key!r} was released before the run ended (cancelled?)")
        elif start == "processing" and finish == "released" and shard is not None:
            self._forgive_worker_death(run, shard, key)

    # ---- handlers --------------------------------------------------------------------------

    async def create_run(self, spec: dict, theta0: np.ndarray) -> dict:
        """Register a run. Returns {"run_id", "step", "resumed_from_step"} or {"error": ...}."""
        run_id = spec["run_id"]
        if run_id in self.runs and self.runs[run_id].status == "running":
            return {"error": f"run_id {run_id!r} is already running on this scheduler"}
        path = None
        if spec["checkpoint_dir"] is not None:
            path = str(checkpoint_path(spec["checkpoint_dir"]))
            busy = [r.run_id for r in self.runs.values()
                    if r.status == "running" and r.spec.get("checkpoint_path") == path]
            if busy:
                return {"error": f"checkpoint_dir {spec['checkpoint_dir']} is in use by running "
                                 f"run {busy[0]!r}"}
            try:
                os.makedirs(spec["checkpoint_dir"], exist_ok=True)
            except OSError as err:
                return {"error": f"checkpoint_dir: cannot create {spec['checkpoint_dir']} on "
                                 f"the scheduler: {err}"}
            if not os.access(spec["checkpoint_dir"], os.W_OK):
                return {"error": f"checkpoint_dir {spec['checkpoint_dir']} is not writable by "
                                 f"the scheduler"}
            if path in self._writes:  # a previous run's last write must land before we read
                await asyncio.wait([self._writes[path]])
        spec = {**spec, "checkpoint_path": path}
        try:
            run = self._new_run(spec, np.asarray(theta0, dtype=np.float64))
        except (ValueError, FileNotFoundError) as err:
            return {"error": str(err)}
        self._drop_old_runs()
        self.runs[run_id] = run
        logger.info("diagode run %s: %d shards, %d steps, starting at step %d", run_id,
                    run.n_shards, run.n_steps, run.step)
        if run.step >= run.n_steps:
            self._finish(run)
        return {"run_id": run_id, "step": run.step, "resumed_from_step": run.resumed_from_step}

    async def pull(self, run_id: str, want: int, timeout: float = 10.0) -> dict:
        """theta once the run reaches step ``want`` (or after ``timeout`` s, or the run ends)."""
        run = self.runs.get(run_id)
        if run is None:
            return {"status": "unknown", "step": -1, "theta": None,
                    "error": f"no run {run_id!r} on this scheduler"}
        deadline = time.monotonic() + timeout
        # step == n_steps: the last step is done and the final checkpoint is being written;
        # there is nothing left to compute, so wait for the run to end.
        while run.status == "running" and (run.step < want or run.step >= run.n_steps):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            event = run.changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                break
        theta = ToPickle(run.theta) if run.status == "running" else None
        return {"status": run.status, "step": run.step, "theta": theta, "error": run.error}

    def push(self, run_id: str, step: int, shard: int, loss_sum: float, grad_sum: np.ndarray,
             count: int, timings: dict | None = None) -> dict:
        """One shard's (loss_sum, grad_sum, count) for ``step``; see the module docstring."""
        run = self.runs.get(run_id)
        if run is None:
            return {"accepted": False, "status": "unknown"}
        if (run.status != "running" or step != run.step or step >= run.n_steps
                or shard in run.pushes):
            return {"accepted": False, "status": run.status}
        if not 0 <= shard < run.n_shards:
            self._fail(run, f"push from shard {shard}, but the run has {run.n_shards} shards")
            return {"accepted": False, "status": run.status}
        grad_sum = np.asarray(grad_sum)
        if grad_sum.shape != run.theta.shape:
            self._fail(run, f"shard {shard} pushed a gradient of shape {grad_sum.shape}, "
                            f"expected {run.theta.shape}")
            return {"accepted": False, "status": run.status}
        if not (math.isfinite(loss_sum) and bool(np.isfinite(grad_sum).all())):
            self._fail(run, f"shard {shard} pushed a non-finite loss or gradient at step {step} "
                            f"(loss_sum={loss_sum}); lower lr or check the problem's scaling")
            return {"accepted": False, "status": run.status}
        run.pushes[shard] = (float(loss_sum), grad_sum, int(count))
        run.shard_timings[shard] = dict(timings or {})
        if len(run.pushes) == run.n_shards:
            self._complete_step(run)
        return {"accepted": True, "status": run.status}

    def status(self, run_id: str) -> dict | None:
        """The run's status dict (see ``_status``), or None if there is no such run."""
        run = self.runs.get(run_id)
        return None if run is None else self._status(run)

    async def wait(self, run_id: str, timeout: float = 0.5) -> dict | None:
        """Status after the run ends or ``timeout`` seconds, whichever comes first."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        if run.status == "running":
            try:
                await asyncio.wait_for(run.ended_event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self._status(run)

    def result(self, run_id: str) -> dict | None:
        """{"status", "error", "theta", "history"} of a run (theta is the current one)."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        return {"status": run.status, "error": run.error, "theta": ToPickle(run.theta),
                "history": list(run.history), "step": run.step}

    def cancel(self, run_id: str, reason: str = "cancelled by a client") -> dict | None:
        """Fail a running run on purpose (its shard loops exit at their next pull)."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        if run.status == "running":
            self._fail(run, reason)
        return self._status(run)

    def list_runs(self) -> list[dict]:
        """Status dicts of every run the server holds, oldest first."""
        return self.statuses()

    def statuses(self) -> list[dict]:
        """Status dicts of all runs (for the dashboard page and metrics)."""
        return [self._status(run) for run in self.runs.values()]

    # ---- run life cycle --------------------------------------------------------------------

    def _new_run(self, spec: dict, theta0: np.ndarray) -> _Run:
        from diagode_dist.optim import Adam

        adam = Adam(lr=spec["lr"], weight_decay=spec["weight_decay"], clamp=spec["clamp"])
        n_shards = spec["n_shards"]
        run = _Run(spec=spec, adam=adam, theta=theta0, opt_state=adam.init(theta0),
                   shard_timings=[{} for _ in range(n_shards)],
                   shard_restarts=[0] * n_shards)
        if spec["resume"] and spec["checkpoint_path"] is not None:
            if os.path.exists(spec["checkpoint_path"]):
                self._restore(run, spec["checkpoint_path"])
            else:
                logger.warning("diagode run %s: resume=True but no checkpoint at %s; starting "
                               "from theta0", spec["run_id"], spec["checkpoint_path"])
        return run

    def _restore(self, run: _Run, path: str) -> None:
        theta, state, meta = load_checkpoint(path)
        for name in ("n", "S", "batch_size", "seed"):
            if meta[name] != run.spec[name]:
                raise ValueError(f"resume: checkpoint {path} has {name}={meta[name]}, this run "
                                 f"has {name}={run.spec[name]}")
        if meta["steps_per_epoch"] != run.steps_per_epoch or meta["step"] > run.n_steps:
            raise ValueError(f"resume: checkpoint {path} is at step {meta['step']}, beyond this "
                             f"run's {run.n_steps} steps (epochs={run.spec['epochs']})")
        run.theta, run.opt_state = theta, state
        run.step = run.resumed_from_step = run.checkpoint_step = int(meta["step"])
        run.history = [float(h) for h in meta["history"]]
        run.epoch_loss_sum = float(meta["epoch_loss_sum"])
        run.last_loss = meta["last_loss"]
        logger.info("diagode run %s: resumed from %s at step %d", run.run_id, path, run.step)

    def _complete_step(self, run: _Run) -> None:
        """All shards are in: sum in shard order, one Adam step, release the new theta."""
        loss_sum, count, grad_sum = 0.0, 0, None
        for shard in range(run.n_shards):
            shard_loss, shard_grad, shard_count = run.pushes[shard]
            loss_sum += shard_loss
            count += shard_count
            grad_sum = shard_grad if grad_sum is None else grad_sum + shard_grad
        grad = grad_sum / count
        # Adam.step is pure: the old theta may still be referenced by replies being sent.
        run.theta, run.opt_state = run.adam.step(run.theta, grad, run.opt_state)
        run.pushes = {}
        run.last_loss = loss_sum / count
        run.grad_norm = float(np.linalg.norm(grad))
        run.epoch_loss_sum += loss_sum
        run.step += 1
        run.loss_trace.append((run.step, run.last_loss))
        if run.step % run.steps_per_epoch == 0:
            run.history.append(run.epoch_loss_sum / run.spec["S"])
            run.epoch_loss_sum = 0.0
        now = time.monotonic()
        run.last_step_s = now - run.step_started
        run.step_started = now
        if run.step > 1 and run.resumed_from_step != run.step - 1:
            run.timed_steps += 1
            run.timed_wall_s += run.last_step_s
            run.timed_compute_s += max(t.get("compute_s", 0.0) for t in run.shard_timings)
        run.step_done_times.append(now)
        if run.step >= run.n_steps:
            self._finish(run)
            return
        if run.spec["checkpoint_path"] and run.step % run.spec["checkpoint_every"] == 0:
            self._write_checkpoint(run)
        run.notify()

    def _finish(self, run: _Run) -> None:
        """Last step done: write the final checkpoint, then report "finished"."""
        task = self._write_checkpoint(run) if run.spec["checkpoint_path"] else None

        async def finish_after_write():
            if task is not None:
                await asyncio.wait([task])  # a failed write has failed the run
            if run.status == "running":
                self._end(run, "finished")

        self._in_background(finish_after_write())

    def _fail(self, run: _Run, error: str) -> None:
        logger.error("diagode run %s failed at step %d: %s", run.run_id, run.step, error)
        run.error = error
        self._end(run, "failed")

    def _end(self, run: _Run, status: str) -> None:
        run.status = status
        run.ended = time.time()
        run.pushes = {}
        run.ended_event.set()
        run.notify()

    def _write_checkpoint(self, run: _Run) -> asyncio.Task:
        """Write theta, Adam state, step, history and RNG state in a thread, in order."""
        path = run.spec["checkpoint_path"]
        meta = {name: run.spec[name] for name in
                ("run_id", "n", "S", "n_shards", "batch_size", "seed", "epochs",
                 "steps_per_epoch", "lr", "weight_decay")}
        meta.update(clamp=list(run.spec["clamp"]) if run.spec["clamp"] is not None else None,
                    step=run.step, epoch=run.step // run.steps_per_epoch,
                    history=list(run.history), epoch_loss_sum=run.epoch_loss_sum,
                    last_loss=run.last_loss, written=time.time())
        theta, state, previous = run.theta, run.opt_state, self._writes.get(path)

        async def write():
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await asyncio.to_thread(save_checkpoint, path, theta, state, meta)
            except OSError as err:
                if run.status == "running":
                    self._fail(run, f"could not write checkpoint {path}: {err}")
                return
            run.checkpoint_step = meta["step"]

        task = self._in_background(write())
        self._writes[path] = task
        return task

    def _in_background(self, coroutine) -> asyncio.Task:
        """Run a coroutine on the loop, keeping a reference until it is done."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _drop_old_runs(self) -> None:
        ended = sorted((r for r in self.runs.values() if r.status != "running"),
                       key=lambda r: r.ended or 0.0)
        for run in ended[:max(0, len(ended) - _KEEP_ENDED_RUNS + 1)]:
            del self.runs[run.run_id]

    async def _watch_step_timeouts(self) -> None:
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            now = time.monotonic()
            for run in list(self.runs.values()):
                timeout = run.spec["step_timeout"]
                if run.status == "running" and now - run.step_started > timeout:
                    missing = [s for s in range(run.n_shards) if s not in run.pushes]
                    self._fail(run, f"step {run.step} did not complete within step_timeout="
                                    f"{timeout:g} s: no push from shard(s) {missing} (a shard "
                                    f"task is lost or stuck, no worker can run it, or one step "
                                    f"takes longer than step_timeout)")

    # ---- worker deaths and task errors ----------------------------------------------------

    def _forgive_worker_death(self, run: _Run, shard: int, key) -> None:
        """A worker died under this shard's task, which Dask will rerun elsewhere.

        Dask counts every death toward ``allowed-failures`` and fails the task for good after
        that many, even across a long run with unrelated deaths hours apart. Reset the count
        when the run has made progress since this shard's previous death, so that only a shard
        that kills worker after worker without progress ends as KilledWorker (and fails the run).
        """
        run.shard_restarts[shard] += 1
        task = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        if task is not None and run.step > run.death_step.get(shard, -1):
            task.suspicious = 0
        run.death_step[shard] = run.step
        logger.warning("diagode run %s: shard %d task lost its worker at step %d; Dask reruns "
                       "it", run.run_id, shard, run.step)

    def _run_of_key(self, key) -> tuple[_Run | None, int | None]:
        if not (isinstance(key, tuple) and len(key) >= 2 and isinstance(key[1], str)):
            return None, None
        if key[0] == SHARD_PREFIX and len(key) == 3:
            return self.runs.get(key[1]), int(key[2])
        if key[0] == OPERATOR_PREFIX and len(key) == 2:
            return self.runs.get(key[1]), None
        return None, None

    def _exception_text(self, key, kwargs: dict) -> str:
        text = kwargs.get("exception_text")
        task = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        if not text and task is not None:
            blame = task.exception_blame or task
            text = blame.exception_text
        if not text:
            exception = kwargs.get("exception")
            try:
                text = repr(pickle.loads(exception)) if isinstance(exception, bytes) else None
            except Exception:
                text = None
        return text or "unknown error (see the worker logs)"

    # ---- status ----------------------------------------------------------------------------

    def _status(self, run: _Run) -> dict:
        times = run.step_done_times
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and \
            times[-1] > times[0] else None
        remaining = run.n_steps - run.step
        end = run.ended if run.ended is not None else time.time()
        return {
            "run_id": run.run_id,
            "status": run.status,
            "step": run.step,
            "n_steps": run.n_steps,
            "epoch": run.step // run.steps_per_epoch,
            "epochs": run.spec["epochs"],
            "loss": run.last_loss,
            "history": list(run.history),
            "steps_per_s": rate,
            "error": run.error,
            "n": run.spec["n"],
            "S": run.spec["S"],
            "n_shards": run.n_shards,
            "batch_size": run.spec["batch_size"],
            "steps_per_epoch": run.steps_per_epoch,
            "grad_norm": run.grad_norm,
            "last_step_s": run.last_step_s,
            "mean_step_s": run.timed_wall_s / run.timed_steps if run.timed_steps else None,
            "mean_compute_s": (run.timed_compute_s / run.timed_steps if run.timed_steps
                               else None),
            "shard_timings": [dict(t) for t in run.shard_timings],
            "shard_restarts": list(run.shard_restarts),
            "started": run.created,
            "elapsed_s": end - run.created,
            "eta_s": remaining / rate if rate and run.status == "running" else None,
            "checkpoint": run.spec["checkpoint_path"],
            "checkpoint_step": run.checkpoint_step,
            "resumed_from_step": run.resumed_from_step,
        }


def dask_setup(scheduler) -> None:
    """Scheduler preload entry point: ``dask scheduler --preload diagode_dist.service.server``."""
    scheduler.add_plugin(ParameterServer(), idempotent=True)
