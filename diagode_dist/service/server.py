"""The parameter server: a Dask scheduler plugin that holds each run's theta and Adam state.

It lives in the scheduler process and adds RPC handlers to ``scheduler.handlers`` (the way
distributed's own ``event.py`` / ``queues.py`` extensions do). ``diagode_dist.service.plugin``
installs it (from a client, which ``submit`` does, or as a scheduler preload).

Protocol (all handlers run on the scheduler's event loop, so no locks are needed):

- ``diagode_create_run(spec, theta0, token)``: a new run (or one resumed from its
  checkpoint); ``spec`` is ``RunSpec.to_wire()`` (see ``protocol.py``), checked again here;
  ``token`` is the run's secret, which only the submitter and the shard tasks hold.
- ``diagode_pull(uid, want, timeout)``: waits (without blocking the loop) until the run's
  step is >= ``want`` or the run has ended; replies with the current step and theta.
- ``diagode_push(uid, token, step, shard, loss_sum, grad_sum, count, timings)``: one shard's
  sums for one step; refused without the run's token. Pushes for another step or a shard
  already in are ignored, so a rerun task can never count twice. The last push of a step sums
  the shards in shard order, divides by the total count, takes one (pure) Adam step and
  releases the new theta to waiting shards.
- ``diagode_cancel(run_id, token, reason)``: refused without the run's token.
- ``diagode_status``, ``diagode_wait``, ``diagode_result``, ``diagode_runs``: read-only, by
  ``run_id``.

Identity and admission (labels, checkpoint folders, tokens): ``admission.py``. Step
timeouts, stalled workers and lock heartbeats: ``watchdog.py``. A shard task that errs
(including Dask's ``KilledWorker``) fails the run through the ``transition`` hook; a
worker death while the run progresses does not use up ``allowed-failures`` (``watchdog``);
``Client.restart`` fails running runs. theta is never modified in place: replies being sent
may still reference the old array. Ended runs are kept within a memory budget (config
``diagode.service.ended-runs-memory``), without their Adam state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from typing import Any

import dask
import numpy as np
from dask.utils import parse_bytes
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import ToPickle

from diagode_dist.service.admission import claim_folder, known_timings, label_refusal, same_secret
from diagode_dist.service.checkpoint import (
    CheckpointError,
    lock_record,
    release_lock,
    save_checkpoint,
)
from diagode_dist.service.protocol import (
    OPERATOR_PREFIX,
    SERVER_PLUGIN,
    SHARD_PREFIX,
    RunSpec,
    RunStatus,
    push_problem,
)
from diagode_dist.service.runs import Run, checked_theta0, ended_beyond, status_of
from diagode_dist.service.watchdog import exception_text, forgive_worker_death, watch

logger = logging.getLogger(__name__)

_ENDED_RUNS_MEMORY = "256MiB"  # default of config diagode.service.ended-runs-memory
_MIN_TOKEN = 16
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
        self.runs: dict[str, Run] = {}  # run_id (label) -> its latest submission
        self.by_uid: dict[str, Run] = {}  # uid -> run, for the shards' calls
        self.server_id = uuid.uuid4().hex  # names this server in checkpoint locks
        self._watchdog: asyncio.Task | None = None
        self.last_heartbeat = 0.0  # of the checkpoint locks (watchdog)
        self.writes: dict[str, asyncio.Task] = {}  # checkpoint path -> last write
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
        self._watchdog = asyncio.create_task(watch(self))

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for run in list(self.by_uid.values()):
            if run.status == "running":
                self.fail(run, "the scheduler closed")
        pending = [task for task in self._background if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=30)

    def restart(self, scheduler) -> None:
        for run in list(self.by_uid.values()):
            if run.status == "running":
                self.fail(run, _RESTARTED)

    def transition(self, key, start, finish, *args, stimulus_id=None, **kwargs) -> None:
        """Fail a run whose shard task errs or is dropped; forgive worker deaths with progress."""
        run, shard = self._run_of_key(key)
        if run is None or run.status != "running":
            return
        what = f"shard {shard} task" if shard is not None else "A0 (operator) task"
        if finish == "erred":
            self.fail(run, f"{what} {key!r} failed: {exception_text(self.scheduler, key, kwargs)}")
        elif finish == "forgotten" and "restart" in (stimulus_id or ""):
            self.fail(run, _RESTARTED)  # Client.restart forgets every task
        elif finish == "forgotten":
            self.fail(run, f"{what} {key!r} was released before the run ended (cancelled?)")
        elif start == "processing" and finish == "released" and shard is not None:
            forgive_worker_death(self.scheduler, run, shard, key)

    # ---- handlers --------------------------------------------------------------------------

    async def create_run(self, spec: Any = None, theta0: Any = None, token: Any = None) -> dict:
        """Register a run. Returns {"run_id", "uid", "step", "resumed_from_step"} or
        {"error": ...} (with "path" when a checkpoint is to blame).

        ``spec`` is ``RunSpec.to_wire()``; a malformed spec, theta0 or token is refused here,
        before anything is registered.
        """
        try:
            run_spec = RunSpec.from_wire(spec)
            theta0 = checked_theta0(theta0, run_spec.theta_size)
            if not isinstance(token, str) or len(token) < _MIN_TOKEN:
                raise ValueError(f"token must be a str of >= {_MIN_TOKEN} characters")
        except (TypeError, ValueError) as err:
            return {"error": f"invalid run spec: {err}"}
        refused = label_refusal(self, run_spec)
        if refused:
            return {"error": refused}
        path, lock = None, None
        if run_spec.checkpoint_dir is not None:
            folder = os.path.abspath(os.path.expanduser(run_spec.checkpoint_dir))  # used here
            lock = lock_record(run_spec.uid, run_spec.run_id, self.server_id)
            path, refused = await claim_folder(self, folder, run_spec, lock)
            if refused:
                return refused
        try:
            run = Run.create(run_spec, theta0, path, token)
        except (ValueError, FileNotFoundError) as err:
            if lock is not None:
                release_lock(os.path.dirname(path), run_spec.uid)
            reply = {"error": str(err)}
            if isinstance(err, CheckpointError):
                reply.update(path=err.path, problem=err.problem)
            return reply
        run.lock = lock
        self.runs[run.run_id] = self.by_uid[run.uid] = run
        self._drop_old_runs()
        logger.info("diagode run %s (uid %s): %d shards, %d steps, starting at step %d",
                    run.run_id, run.uid, run.n_shards, run.n_steps, run.step)
        if run.step >= run.n_steps:
            self._finish(run)
        return {"run_id": run.run_id, "uid": run.uid, "step": run.step,
                "resumed_from_step": run.resumed_from_step}

    async def pull(self, uid: str, want: int, timeout: float = 10.0) -> dict:
        """theta once the run reaches step ``want`` (or after ``timeout`` s, or the run ends)."""
        run = self.by_uid.get(uid)
        if run is None:
            return {"status": "unknown", "step": -1, "theta": None,
                    "error": f"no run with uid {uid!r} on this scheduler"}
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

    def push(self, uid: str, token: str, step: int, shard: int, loss_sum: float,
             grad_sum: np.ndarray, count: int, timings: dict | None = None) -> dict:
        """One shard's (loss_sum, grad_sum, count) for ``step``; see the module docstring."""
        run = self.by_uid.get(uid)
        if run is None:
            return {"accepted": False, "status": "unknown"}
        if not same_secret(run.token, token):
            logger.warning("diagode run %s: refused a push without the run's token (step %r, "
                           "shard %r)", run.run_id, step, shard)
            return {"accepted": False, "status": run.status,
                    "error": "push refused: wrong or missing token"}
        malformed = push_problem(step, shard, loss_sum, grad_sum, count, timings)
        if malformed is not None:  # refused; the run is not touched
            return {"accepted": False, "status": run.status, "error": malformed}
        if (run.status != "running" or step != run.step or step >= run.n_steps
                or shard in run.pushes):
            return {"accepted": False, "status": run.status}
        if not 0 <= shard < run.n_shards:
            self.fail(run, f"push from shard {shard}, but the run has {run.n_shards} shards")
            return {"accepted": False, "status": run.status}
        grad_sum = np.asarray(grad_sum)
        if grad_sum.shape != run.theta.shape:
            self.fail(run, f"shard {shard} pushed a gradient of shape {grad_sum.shape}, "
                            f"expected {run.theta.shape}")
            return {"accepted": False, "status": run.status}
        if not (math.isfinite(loss_sum) and bool(np.isfinite(grad_sum).all())):
            self.fail(run, f"shard {shard} pushed a non-finite loss or gradient at step {step} "
                            f"(loss_sum={loss_sum}); lower lr or check the problem's scaling")
            return {"accepted": False, "status": run.status}
        run.pushes[shard] = (float(loss_sum), grad_sum, int(count))
        run.shard_timings[shard] = known_timings(timings)
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

    def cancel(self, run_id: str, token: str | None = None,
               reason: str = "cancelled by a client") -> dict | None:
        """Fail a running run on purpose (its shard loops exit at their next pull); refused
        ({"refused": why}) without the run's token."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        if not same_secret(run.token, token):
            logger.warning("diagode run %s: refused a cancel without the run's token", run_id)
            return {"refused": f"cancel of run {run_id!r} refused: wrong or missing token (only "
                             f"the submitting RunHandle, or attach(..., token=...), can cancel)"}
        if run.status == "running":
            self.fail(run, reason, cancelled=True)
        return status_of(run)

    def list_runs(self) -> list[RunStatus]:
        """Status dicts of every run the server holds, oldest first."""
        return self.statuses()

    def statuses(self) -> list[RunStatus]:
        """Status dicts of all runs, oldest first (for the dashboard page and metrics)."""
        return [status_of(run) for run in self.runs.values()]

    def run_of_uid(self, uid: str) -> Run | None:
        """The run of a submission (for tests and tools on the scheduler)."""
        return self.by_uid.get(uid)

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
        """Last step done: write the final checkpoint, free the folder, report "finished"."""
        task = self._write_checkpoint(run) if run.checkpoint_path else None

        async def finish_after_write():
            if task is not None:
                await asyncio.wait([task])  # a failed write has failed the run
            if run.status == "running":
                if run.lock is not None:  # free once "finished" is seen; renewals stop first
                    run.lock = None
                    await self._release_after_writes(run)
                self._end(run, "finished")

        self.in_background(finish_after_write())

    def fail(self, run: Run, error: str, cancelled: bool = False) -> None:
        """End a run as failed with ``error`` (logged as info when it was a cancel)."""
        # A cancel is asked for: no error, and no noise for the one who asked.
        (logger.info if cancelled else logger.error)(
            "diagode run %s %s at step %d: %s", run.run_id,
            "cancelled" if cancelled else "failed", run.step, error)
        run.error = error
        self._end(run, "failed")

    def _end(self, run: Run, status: str) -> None:
        run.status, run.ended = status, time.time()
        run.pushes = {}
        run.opt_state = None  # pending checkpoint writes hold their own reference
        run.ended_event.set()
        run.notify()
        if run.lock is not None:
            self.in_background(self._release_after_writes(run))
        self._drop_old_runs()

    async def _release_after_writes(self, run: Run) -> None:
        write = self.writes.get(run.checkpoint_path)
        if write is not None:
            await asyncio.wait([write])
        folder = os.path.dirname(run.checkpoint_path)
        await asyncio.to_thread(release_lock, folder, run.uid)

    def _write_checkpoint(self, run: Run) -> asyncio.Task:
        """Write theta, Adam state, step, history and RNG state in a thread, in order."""
        path, meta = run.checkpoint_path, run.checkpoint_meta()
        theta, state, previous = run.theta, run.opt_state, self.writes.get(path)

        async def write():
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await asyncio.to_thread(save_checkpoint, path, theta, state, meta, run.uid)
            except OSError as err:  # PermissionError: another run took the folder's lock
                if run.status == "running":
                    self.fail(run, f"could not write checkpoint {path}: {err}")
                return
            run.checkpoint_step = meta["step"]

        task = self.in_background(write())
        self.writes[path] = task
        return task

    def in_background(self, coroutine) -> asyncio.Task:
        """Run a coroutine on the loop, keeping a reference until it is done."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _drop_old_runs(self) -> None:
        budget = parse_bytes(dask.config.get("diagode.service.ended-runs-memory",
                                             _ENDED_RUNS_MEMORY))
        for run in ended_beyond(self.by_uid.values(), budget):
            del self.by_uid[run.uid]
            if self.runs.get(run.run_id) is run:
                del self.runs[run.run_id]

    # ---- worker deaths and task errors ----------------------------------------------------

    def _run_of_key(self, key) -> tuple[Run | None, int | None]:
        if not (isinstance(key, tuple) and len(key) >= 2 and isinstance(key[1], str)):
            return None, None
        if key[0] == SHARD_PREFIX and len(key) == 3:
            return self.by_uid.get(key[1]), int(key[2])
        if key[0] == OPERATOR_PREFIX and len(key) == 2:
            return self.by_uid.get(key[1]), None
        return None, None
