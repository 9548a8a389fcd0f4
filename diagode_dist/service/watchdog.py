"""The parameter server's watchdog: step timeouts, stalled shards, checkpoint-lock heartbeats.

- A step that takes longer than the run's ``step_timeout`` fails the run, naming the shards
  that did not push.
- A shard that has not pushed for the run's stall timeout (``stall_timeout``: the run's own,
  else ``_STALL_STEPS`` median step times within [``_STALL_MIN_S``, ``_STALL_MAX_S``]), on a
  worker that has stopped heartbeating while another worker still does, has that worker
  removed from the cluster, so Dask reruns the shard elsewhere as after a death (it
  resumes at the server's step, so theta is unchanged bit for bit); the worker's nanny then
  kills the process (SIGKILL also ends a stopped one) and starts a fresh worker. Without this
  a stopped (SIGSTOP, swapped out, hung in I/O) worker stays registered until Dask's own
  300 s worker timeout, and every resubmission lands on it.
- Every ``_LOCK_HEARTBEAT_S`` the locks of running runs' checkpoint folders are renewed; a run
  whose lock was taken over fails rather than overwrite another run's checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import statistics
import time

from diagode_dist.service.checkpoint import refresh_lock
from diagode_dist.service.protocol import shard_key
from diagode_dist.service.runs import Run

logger = logging.getLogger("diagode_dist.service.server")

_WATCHDOG_PERIOD_S = 0.1
_LOCK_HEARTBEAT_S = 5.0  # how often the checkpoint locks of running runs are renewed
# Default stall timeout: this many median step times, within these bounds (s). The first
# step (loading, warm-up) has no median yet and gets the upper bound.
_STALL_STEPS, _STALL_MIN_S, _STALL_MAX_S = 10.0, 30.0, 120.0


async def watch(server) -> None:
    """Forever, every 0.1 s: step timeouts and stalls of the running runs; every 5 s the
    checkpoint locks' heartbeats."""
    while True:
        await asyncio.sleep(_WATCHDOG_PERIOD_S)
        now = time.monotonic()
        for run in [r for r in server.by_uid.values() if r.status == "running"]:
            _check_step_timeout(server, run, now)
            if run.status == "running":
                _check_stalls(server, run, now)
        if now - server.last_heartbeat > _LOCK_HEARTBEAT_S:
            server.last_heartbeat = now
            server.in_background(_renew_locks(server))

def _check_step_timeout(server, run: Run, now: float) -> None:
    timeout = run.spec.options.step_timeout
    if now - run.step_started > timeout:
        missing = [s for s in range(run.n_shards) if s not in run.pushes]
        server.fail(run, f"step {run.step} did not complete within step_timeout="
                        f"{timeout:g} s: no push from shard(s) {missing} (a shard "
                        f"task is lost or stuck, no worker can run it, or one step "
                        f"takes longer than step_timeout)")

def stall_timeout(run: Run) -> float:
    """Seconds a shard may go without pushing before its worker is replaced: the run's
    ``stall_timeout``, else ``_STALL_STEPS`` median step times within
    [``_STALL_MIN_S``, ``_STALL_MAX_S``]."""
    if run.spec.stall_timeout is not None:
        return run.spec.stall_timeout
    if not run.step_seconds:
        return _STALL_MAX_S
    median = statistics.median(run.step_seconds)
    return min(max(_STALL_STEPS * median, _STALL_MIN_S), _STALL_MAX_S)

def _check_stalls(server, run: Run, now: float) -> None:
    """Remove the workers of the shards that have not pushed for the stall timeout, when such
    a worker has also stopped heartbeating and another worker still does.

    A shard that is slow on a worker that answers the scheduler is busy, not stuck (and
    ``step_timeout`` bounds it); when every worker is silent the cause is not one bad worker
    (a blocked scheduler, an overloaded machine, a long ``client.run``), and removing them all
    would only lose the cluster.
    """
    if server.scheduler is None:
        return
    limit = stall_timeout(run)
    quiet_s = max(limit / 2, 5.0)  # heartbeats come every 0.5-5 s, late on a loaded machine
    wall = time.time()  # WorkerState.last_seen is wall-clock time
    stalled = {}  # shard -> (its worker's state, seconds without a push)
    for shard in range(run.n_shards):
        since = max(run.step_started, run.waiting_since.get(shard, 0.0))
        if shard in run.pushes or now - since <= limit:
            continue
        task = server.scheduler.tasks.get(shard_key(run.uid, shard))
        worker = getattr(task, "processing_on", None)
        if worker is not None and wall - worker.last_seen > quiet_s:
            stalled[shard] = (worker, now - since)
    suspects = {worker.address for worker, _ in stalled.values()}
    answering = [w for w in server.scheduler.workers.values()
                 if w.address not in suspects and wall - w.last_seen <= quiet_s]
    if not stalled or not answering:
        return
    for shard, (worker, silent_s) in stalled.items():
        run.waiting_since[shard] = now
        run.stalls += 1
        logger.warning("diagode run %s: shard %d made no progress for %.1f s (stall timeout "
                       "%.1f s) on worker %s, silent for %.1f s; removing that worker so the "
                       "shard reruns elsewhere", run.run_id, shard, silent_s, limit,
                       worker.address, wall - worker.last_seen)
    for worker in {worker.address: worker for worker, _ in stalled.values()}.values():
        server.in_background(_replace_worker(server.scheduler, worker.address, worker.nanny))


async def _replace_worker(scheduler, address: str, nanny: str | None) -> None:
    """Take a stalled worker out (its tasks are rescheduled at once), then have its nanny
    kill the process (SIGKILL works on a stopped one) and start a fresh worker."""
    stimulus = f"diagode-stall-{time.time()}"
    with contextlib.suppress(Exception):
        await scheduler.remove_worker(address, stimulus_id=stimulus,
                                           close=nanny is None)
    if nanny is not None:
        try:
            await scheduler.rpc(nanny).restart(timeout=20, reason="diagode-stall")
        except Exception as err:  # the nanny may be gone or stuck too
            logger.warning("diagode: could not restart stalled worker %s through its "
                           "nanny %s: %s", address, nanny, err)

async def _renew_locks(server) -> None:
    for run in [r for r in server.by_uid.values() if r.status == "running" and r.lock]:
        folder = os.path.dirname(run.checkpoint_path)
        try:
            held = await asyncio.to_thread(refresh_lock, folder, run.lock)
        except OSError as err:
            logger.warning("diagode run %s: could not renew the lock of %s: %s",
                           run.run_id, folder, err)
            continue
        if not held and run.status == "running":
            server.fail(run, f"checkpoint_dir {folder} was taken over by another run; "
                            f"this run stopped so that the two do not overwrite each "
                            f"other's checkpoints")


# ---- worker deaths and task errors (from the server's transition hook) ---------------------

def forgive_worker_death(scheduler, run: Run, shard: int, key) -> None:
    """A worker died under this shard's task, which Dask will rerun elsewhere.

    Dask counts every death toward ``allowed-failures`` and fails the task for good after
    that many, even across a long run with unrelated deaths hours apart. Reset the count
    when the run has made progress since this shard's previous death, so that only a shard
    that kills worker after worker without progress ends as KilledWorker (and fails the run).
    """
    run.shard_restarts[shard] += 1
    run.waiting_since[shard] = time.monotonic()  # its stall clock restarts with the rerun
    task = scheduler.tasks.get(key) if scheduler is not None else None
    if task is not None and run.step > run.death_step.get(shard, -1):
        task.suspicious = 0
    run.death_step[shard] = run.step
    logger.warning("diagode run %s: shard %d task lost its worker at step %d; Dask reruns "
                   "it", run.run_id, shard, run.step)


def exception_text(scheduler, key, kwargs: dict) -> str:
    """The error text of an erred task, from the transition's arguments or the scheduler."""
    text = kwargs.get("exception_text")
    task = scheduler.tasks.get(key) if scheduler is not None else None
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
