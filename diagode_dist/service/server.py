"""The parameter server: a Dask scheduler plugin that holds each run's theta and Adam state.

It lives in the scheduler process and adds RPC handlers to ``scheduler.handlers`` (the way
distributed's own ``event.py`` / ``queues.py`` extensions do). ``diagode_dist.service.plugin``
installs it (from a client, which ``submit`` does, or as a scheduler preload).

Protocol (all handlers run on the scheduler's event loop, so no locks are needed):

- ``diagode_create_run(spec, theta0)``: a new run (or one resumed from its checkpoint);
  ``spec`` is ``RunSpec.to_wire()`` (see ``protocol.py``), checked again here.
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
import logging
import math
import os
import pickle
import time
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import ToPickle

from diagode_dist.service.checkpoint import checkpoint_path, save_checkpoint
from diagode_dist.service.protocol import (
    OPERATOR_PREFIX,
    SERVER_PLUGIN,
    SHARD_PREFIX,
    RunSpec,
    RunStatus,
    push_problem,
)
from diagode_dist.service.runs import Run, checked_theta0, status_of

logger = logging.getLogger(__name__)

_KEEP_ENDED_RUNS = 100  # ended runs kept for status/result; older ones are dropped
_WATCHDOG_PERIOD_S = 0.1
_RESTARTED = ("the cluster was restarted (Client.restart) and its shard tasks were cancelled; "
              "submit again with resume=True to continue from the last checkpoint")


def get_server(scheduler) -> ParameterServer | None:
    """The installed ParameterServer of a scheduler, or None (for dashboards and metrics)."""
    return scheduler.plugins.get(SERVER_PLUGIN)


class ParameterServer(SchedulerPlugin):
    """Scheduler plugin holding training runs; see the module docstring for the protocol."""

    name = SERVER_PLUGIN
    idempotent = True

    def __init__(self) -> None:
        self.scheduler = None
        self.runs: dict[str, Run] = {}
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

    async def create_run(self, spec: Any = None, theta0: Any = None) -> dict:
        """Register a run. Returns {"run_id", "step", "resumed_from_step"} or {"error": ...}.

        ``spec`` is ``RunSpec.to_wire()``; a malformed spec or theta0 is refused here, before
        anything is registered.
        """
        try:
            run_spec = RunSpec.from_wire(spec)
            theta0 = checked_theta0(theta0, run_spec.theta_size)
        except (TypeError, ValueError) as err:
            return {"error": f"invalid run spec: {err}"}
        run_id = run_spec.run_id
        if run_id in self.runs and self.runs[run_id].status == "running":
            return {"error": f"run_id {run_id!r} is already running on this scheduler"}
        path, folder = None, run_spec.checkpoint_dir
        if folder is not None:
            path = str(checkpoint_path(folder))
            busy = [r.run_id for r in self.runs.values()
                    if r.status == "running" and r.checkpoint_path == path]
            if busy:
                return {"error": f"checkpoint_dir {folder} is in use by running run {busy[0]!r}"}
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                return {"error": f"checkpoint_dir: cannot create {folder} on the scheduler: "
                                 f"{err}"}
            if not os.access(folder, os.W_OK):
                return {"error": f"checkpoint_dir {folder} is not writable by the scheduler"}
            if path in self._writes:  # a previous run's last write must land before we read
                await asyncio.wait([self._writes[path]])
        try:
            run = Run.create(run_spec, theta0, path)
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
        malformed = push_problem(step, shard, loss_sum, grad_sum, count, timings)
        if malformed is not None:  # refused; the run is not touched
            return {"accepted": False, "status": run.status, "error": malformed}
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

    def status(self, run_id: str) -> RunStatus | None:
        """The run's status dict (see ``_status``), or None if there is no such run."""
        run = self.runs.get(run_id)
        return None if run is None else status_of(run)

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
        return status_of(run)

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
            self._fail(run, reason, cancelled=True)
        return status_of(run)

    def list_runs(self) -> list[RunStatus]:
        """Status dicts of every run the server holds, oldest first."""
        return self.statuses()

    def statuses(self) -> list[RunStatus]:
        """Status dicts of all runs, oldest first (for the dashboard page and metrics)."""
        return [status_of(run) for run in self.runs.values()]

    def loss_trace(self, run_id: str) -> list[tuple[int, float]]:
        """(step, mean loss of that step) of the run's latest steps; empty if unknown."""
        run = self.runs.get(run_id)
        return [] if run is None else list(run.loss_trace)

    # ---- run life cycle --------------------------------------------------------------------

    def _complete_step(self, run: Run) -> None:
        """All shards are in: sum in shard order, one Adam step, release the new theta."""
        run.apply_pushes()
        log_every = run.spec.options.log_every
        if log_every and run.step % log_every == 0:
            logger.info("diagode run %s: step %d/%d, mean loss %.6g", run.run_id, run.step,
                        run.n_steps, run.last_loss)
        if run.step >= run.n_steps:
            self._finish(run)
            return
        if run.checkpoint_path and run.step % run.spec.options.checkpoint_every == 0:
            self._write_checkpoint(run)
        run.notify()

    def _finish(self, run: Run) -> None:
        """Last step done: write the final checkpoint, then report "finished"."""
        task = self._write_checkpoint(run) if run.checkpoint_path else None

        async def finish_after_write():
            if task is not None:
                await asyncio.wait([task])  # a failed write has failed the run
            if run.status == "running":
                self._end(run, "finished")

        self._in_background(finish_after_write())

    def _fail(self, run: Run, error: str, cancelled: bool = False) -> None:
        # A cancel is asked for: no error, and no noise for the one who asked.
        (logger.info if cancelled else logger.error)(
            "diagode run %s %s at step %d: %s", run.run_id,
            "cancelled" if cancelled else "failed", run.step, error)
        run.error = error
        self._end(run, "failed")

    def _end(self, run: Run, status: str) -> None:
        run.status = status
        run.ended = time.time()
        run.pushes = {}
        run.ended_event.set()
        run.notify()

    def _write_checkpoint(self, run: Run) -> asyncio.Task:
        """Write theta, Adam state, step, history and RNG state in a thread, in order."""
        path, meta = run.checkpoint_path, run.checkpoint_meta()
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
                timeout = run.spec.options.step_timeout
                if run.status == "running" and now - run.step_started > timeout:
                    missing = [s for s in range(run.n_shards) if s not in run.pushes]
                    self._fail(run, f"step {run.step} did not complete within step_timeout="
                                    f"{timeout:g} s: no push from shard(s) {missing} (a shard "
                                    f"task is lost or stuck, no worker can run it, or one step "
                                    f"takes longer than step_timeout)")

    # ---- worker deaths and task errors ----------------------------------------------------

    def _forgive_worker_death(self, run: Run, shard: int, key) -> None:
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

    def _run_of_key(self, key) -> tuple[Run | None, int | None]:
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
