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

Identity: ``run_id`` is the user's label; every submission has a fresh ``uid`` that keys its
tasks, the workers' caches and the shards' calls. A label is refused while a run with it is
running, and while an ended run's record is kept unless ``resume=True``.

Failure handling: a step that takes longer than the run's ``step_timeout`` fails the run; a
shard that has not pushed for the run's stall timeout has its worker removed from the
cluster (and restarted by its nanny), so Dask reruns the shard elsewhere, as after a death
(``_check_stalls``); a shard task that errs (including Dask's ``KilledWorker``) fails the run
through the plugin's ``transition`` hook; a worker death while the run keeps making progress
does not use up Dask's ``allowed-failures`` budget (see ``_forgive_worker_death``);
``Client.restart`` fails running runs (their tasks are gone). theta is never modified in
place: replies being sent may still reference the old array. Ended runs are kept for
``status``/``result`` within a memory budget (config ``diagode.service.ended-runs-memory``),
without their Adam state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import pickle
import statistics
import time
import uuid
from typing import Any

import dask
import numpy as np
from dask.utils import parse_bytes
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import ToPickle

from diagode_dist.service.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    lock_record,
    refresh_lock,
    release_lock,
    remove_stale_temporaries,
    save_checkpoint,
    take_lock,
)
from diagode_dist.service.protocol import (
    OPERATOR_PREFIX,
    SERVER_PLUGIN,
    SHARD_PREFIX,
    SHARD_TIMING_TYPES,
    RunSpec,
    RunStatus,
    push_problem,
    shard_key,
)
from diagode_dist.service.runs import Run, checked_theta0, status_of

logger = logging.getLogger(__name__)

_ENDED_RUNS_MEMORY = "256MiB"  # default of config diagode.service.ended-runs-memory
_WATCHDOG_PERIOD_S = 0.1
_LOCK_HEARTBEAT_S = 5.0  # how often the checkpoint locks of running runs are renewed
# Default stall timeout: this many median step times, within these bounds (s). The first
# step (loading, warm-up) has no median yet and gets the upper bound.
_STALL_STEPS, _STALL_MIN_S, _STALL_MAX_S = 10.0, 30.0, 120.0
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
        self._last_heartbeat = 0.0
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
        self._watchdog = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for run in list(self.by_uid.values()):
            if run.status == "running":
                self._fail(run, "the scheduler closed")
        pending = [task for task in self._background if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=30)

    def restart(self, scheduler) -> None:
        for run in list(self.by_uid.values()):
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

    async def create_run(self, spec: Any = None, theta0: Any = None, token: Any = None) -> dict:
        """Register a run. Returns {"run_id", "uid", "step", "resumed_from_step"} or
        {"error": ...} (with "path" when a checkpoint is to blame).

        ``spec`` is ``RunSpec.to_wire()``; a malformed spec, theta0 or token is refused here,
        before anything is registered.
        """
        try:
            run_spec = RunSpec.from_wire(spec)
            theta0 = checked_theta0(theta0, run_spec.n)
            if not isinstance(token, str) or len(token) < _MIN_TOKEN:
                raise ValueError(f"token must be a str of >= {_MIN_TOKEN} characters")
        except (TypeError, ValueError) as err:
            return {"error": f"invalid run spec: {err}"}
        refused = self._label_refusal(run_spec)
        if refused:
            return {"error": refused}
        path, lock = None, None
        if run_spec.checkpoint_dir is not None:
            folder = os.path.abspath(os.path.expanduser(run_spec.checkpoint_dir))  # used here
            lock = lock_record(run_spec.uid, run_spec.run_id, self.server_id)
            path, refused = await self._claim_folder(folder, run_spec, lock)
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

    def _label_refusal(self, spec: RunSpec) -> str | None:
        """Why ``spec``'s run_id or uid may not be used now, or None."""
        if spec.uid in self.by_uid:
            return f"uid {spec.uid} is already registered (a submission is never repeated)"
        previous = self.runs.get(spec.run_id)
        if previous is None:
            return None
        if previous.status == "running":
            return f"run_id {spec.run_id!r} is already running on this scheduler"
        if not spec.resume:
            return (f"run_id {spec.run_id!r} was used by a run that {previous.status} on this "
                    f"scheduler (uid {previous.uid}); choose another run_id, or pass "
                    f"resume=True with its checkpoint_dir to continue it")
        return None

    async def _claim_folder(self, folder: str, spec: RunSpec,
                            lock: dict) -> tuple[str | None, dict | None]:
        """Create, check and lock the checkpoint folder: (checkpoint path, None) or
        (None, the error reply)."""
        path = str(checkpoint_path(folder))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            return None, {"error": f"checkpoint_dir: cannot create {folder} on the scheduler: "
                                   f"{err}"}
        if not os.access(folder, os.W_OK):
            return None, {"error": f"checkpoint_dir {folder} is not writable by the scheduler"}
        if path in self._writes:  # a previous run's last write must land before we read
            await asyncio.wait([self._writes[path]])
        try:
            await asyncio.to_thread(take_lock, folder, lock, self._ended_here)
        except OSError as err:  # PermissionError: a live run holds it
            return None, {"error": str(err), "locked": isinstance(err, PermissionError)}
        removed = await asyncio.to_thread(remove_stale_temporaries, folder)
        if removed:
            logger.warning("diagode run %s: removed %d temporary file(s) of interrupted "
                           "checkpoint writes in %s", spec.run_id, len(removed), folder)
        if not spec.resume and os.path.exists(path):
            writer = await asyncio.to_thread(_writer_of, path)
            if writer == spec.run_id:
                release_lock(folder, spec.uid)
                return None, {"error": f"checkpoint {path} was written by a run named "
                                       f"{spec.run_id!r}: pass resume=True to continue it, or "
                                       f"choose another run_id or checkpoint_dir",
                              "path": path}
        return path, None

    def _ended_here(self, uid: str | None) -> bool:
        run = self.by_uid.get(uid) if uid else None
        return run is None or run.status != "running"

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
        if not _same_secret(run.token, token):
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
        run.shard_timings[shard] = _known_timings(timings)
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
        if not _same_secret(run.token, token):
            logger.warning("diagode run %s: refused a cancel without the run's token", run_id)
            return {"refused": f"cancel of run {run_id!r} refused: wrong or missing token (only "
                             f"the submitting RunHandle, or attach(..., token=...), can cancel)"}
        if run.status == "running":
            self._fail(run, reason, cancelled=True)
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
        run.opt_state = None  # pending checkpoint writes hold their own reference
        run.ended_event.set()
        run.notify()
        if run.lock is not None:
            self._in_background(self._release_after_writes(run))
        self._drop_old_runs()

    async def _release_after_writes(self, run: Run) -> None:
        write = self._writes.get(run.checkpoint_path)
        if write is not None:
            await asyncio.wait([write])
        folder = os.path.dirname(run.checkpoint_path)
        await asyncio.to_thread(release_lock, folder, run.uid)

    def _write_checkpoint(self, run: Run) -> asyncio.Task:
        """Write theta, Adam state, step, history and RNG state in a thread, in order."""
        path, meta = run.checkpoint_path, run.checkpoint_meta()
        theta, state, previous = run.theta, run.opt_state, self._writes.get(path)

        async def write():
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await asyncio.to_thread(save_checkpoint, path, theta, state, meta, run.uid)
            except OSError as err:  # PermissionError: another run took the folder's lock
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
        """Forget the oldest ended runs beyond the memory budget of ended runs."""
        budget = parse_bytes(dask.config.get("diagode.service.ended-runs-memory",
                                             _ENDED_RUNS_MEMORY))
        ended = sorted((r for r in self.by_uid.values() if r.status != "running"),
                       key=lambda r: r.ended or 0.0, reverse=True)
        used = 0
        for run in ended:  # newest first: they are kept while the budget lasts
            used += _held_bytes(run)
            if used > budget:
                del self.by_uid[run.uid]
                if self.runs.get(run.run_id) is run:
                    del self.runs[run.run_id]

    # ---- the watchdog: step timeouts, stalled shards, lock heartbeats -------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            now = time.monotonic()
            for run in [r for r in self.by_uid.values() if r.status == "running"]:
                self._check_step_timeout(run, now)
                if run.status == "running":
                    self._check_stalls(run, now)
            if now - self._last_heartbeat > _LOCK_HEARTBEAT_S:
                self._last_heartbeat = now
                self._in_background(self._renew_locks())

    def _check_step_timeout(self, run: Run, now: float) -> None:
        timeout = run.spec.options.step_timeout
        if now - run.step_started > timeout:
            missing = [s for s in range(run.n_shards) if s not in run.pushes]
            self._fail(run, f"step {run.step} did not complete within step_timeout="
                            f"{timeout:g} s: no push from shard(s) {missing} (a shard "
                            f"task is lost or stuck, no worker can run it, or one step "
                            f"takes longer than step_timeout)")

    def stall_timeout(self, run: Run) -> float:
        """Seconds a shard may go without pushing before its worker is replaced: the run's
        ``stall_timeout``, else ``_STALL_STEPS`` median step times within
        [``_STALL_MIN_S``, ``_STALL_MAX_S``]."""
        if run.spec.stall_timeout is not None:
            return run.spec.stall_timeout
        if not run.step_seconds:
            return _STALL_MAX_S
        median = statistics.median(run.step_seconds)
        return min(max(_STALL_STEPS * median, _STALL_MIN_S), _STALL_MAX_S)

    def _check_stalls(self, run: Run, now: float) -> None:
        """Remove the worker of each shard that has not pushed for the stall timeout."""
        if self.scheduler is None:
            return
        limit = self.stall_timeout(run)
        for shard in range(run.n_shards):
            since = max(run.step_started, run.waiting_since.get(shard, 0.0))
            if shard in run.pushes or now - since <= limit:
                continue
            task = self.scheduler.tasks.get(shard_key(run.uid, shard))
            worker = getattr(task, "processing_on", None)
            if worker is None:  # not running anywhere: nothing to heal, step_timeout decides
                continue
            run.waiting_since[shard] = now
            run.stalls += 1
            logger.warning("diagode run %s: shard %d made no progress for %.1f s (stall "
                           "timeout %.1f s) on worker %s; removing that worker so the shard "
                           "reruns elsewhere", run.run_id, shard, now - since, limit,
                           worker.address)
            self._in_background(self._replace_worker(worker.address, worker.nanny))

    async def _replace_worker(self, address: str, nanny: str | None) -> None:
        """Take a stalled worker out (its tasks are rescheduled at once), then have its nanny
        kill the process (SIGKILL works on a stopped one) and start a fresh worker."""
        stimulus = f"diagode-stall-{time.time()}"
        with contextlib.suppress(Exception):
            await self.scheduler.remove_worker(address, stimulus_id=stimulus,
                                               close=nanny is None)
        if nanny is not None:
            try:
                await self.scheduler.rpc(nanny).restart(timeout=20, reason="diagode-stall")
            except Exception as err:  # the nanny may be gone or stuck too
                logger.warning("diagode: could not restart stalled worker %s through its "
                               "nanny %s: %s", address, nanny, err)

    async def _renew_locks(self) -> None:
        for run in [r for r in self.by_uid.values() if r.status == "running" and r.lock]:
            folder = os.path.dirname(run.checkpoint_path)
            try:
                held = await asyncio.to_thread(refresh_lock, folder, run.lock)
            except OSError as err:
                logger.warning("diagode run %s: could not renew the lock of %s: %s",
                               run.run_id, folder, err)
                continue
            if not held and run.status == "running":
                self._fail(run, f"checkpoint_dir {folder} was taken over by another run; "
                                f"this run stopped so that the two do not overwrite each "
                                f"other's checkpoints")

    # ---- worker deaths and task errors ----------------------------------------------------

    def _forgive_worker_death(self, run: Run, shard: int, key) -> None:
        """A worker died under this shard's task, which Dask will rerun elsewhere.

        Dask counts every death toward ``allowed-failures`` and fails the task for good after
        that many, even across a long run with unrelated deaths hours apart. Reset the count
        when the run has made progress since this shard's previous death, so that only a shard
        that kills worker after worker without progress ends as KilledWorker (and fails the run).
        """
        run.shard_restarts[shard] += 1
        run.waiting_since[shard] = time.monotonic()  # its stall clock restarts with the rerun
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
            return self.by_uid.get(key[1]), int(key[2])
        if key[0] == OPERATOR_PREFIX and len(key) == 2:
            return self.by_uid.get(key[1]), None
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


def _same_secret(expected: str, given: Any) -> bool:
    """Constant-time comparison of a run's token with a caller's."""
    return isinstance(given, str) and bool(expected) and hmac.compare_digest(
        expected.encode(), given.encode())


def _known_timings(timings: dict | None) -> dict:
    """The entries of ``ShardTiming`` with values of their type (pages and gauges show them)."""
    kept = {}
    for key, kind in SHARD_TIMING_TYPES.items():
        value = (timings or {}).get(key)
        wanted = (int, float) if kind is float else kind
        if isinstance(value, wanted) and (kind is bool or not isinstance(value, bool)):
            kept[key] = value[:200] if isinstance(value, str) else value
    return kept


def _held_bytes(run: Run) -> int:
    """What an ended run keeps in the scheduler's memory, roughly (theta, losses, history)."""
    per_entry = 64  # a (step, loss) tuple or a float in a list, with its object overhead
    return int(run.theta.nbytes) + per_entry * (len(run.loss_trace) + len(run.history))


def _writer_of(path: str) -> str | None:
    """The run_id that wrote the checkpoint at ``path`` (None if unreadable)."""
    try:
        return load_checkpoint(path)[2].get("run_id")
    except (OSError, ValueError):
        return None
