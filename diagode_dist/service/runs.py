"""The state of one training run on the parameter server, and its public status."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diagode_dist.optim import Adam
from diagode_dist.service.checkpoint import (
    DETERMINING,
    CheckpointError,
    load_checkpoint,
    mismatches,
)
from diagode_dist.service.protocol import OVERRIDABLE, RunSpec, RunStatus

logger = logging.getLogger("diagode_dist.service.server")

_RATE_WINDOW = 20  # steps over which steps_per_s is measured
_TRACE_STEPS = 5000  # per-step losses kept for plots (the latest ones)


@dataclass
class Run:
    """State of one training run, held by the server."""

    spec: RunSpec
    adam: Adam
    theta: np.ndarray
    opt_state: dict[str, Any] | None  # None once the run has ended (its checkpoint has it)
    token: str = field(default="", repr=False)  # the run's secret: pushes and cancels need it
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
    step_seconds: collections.deque = field(  # recent step durations, for the stall timeout
        default_factory=lambda: collections.deque(maxlen=_RATE_WINDOW))
    loss_trace: collections.deque = field(  # (steps done, mean loss of that step)
        default_factory=lambda: collections.deque(maxlen=_TRACE_STEPS))
    timed_steps: int = 0  # steps after the first (which includes start-up), for the means
    timed_wall_s: float = 0.0
    timed_compute_s: float = 0.0  # slowest shard's compute time, summed over timed steps
    resumed_from_step: int | None = None
    checkpoint_step: int | None = None
    checkpoint_path: str | None = None
    lock: dict[str, Any] | None = None  # the checkpoint folder's lock record while running
    waiting_since: dict[int, float] = field(default_factory=dict)  # shard -> rerun started
    stalls: int = 0  # workers removed because a shard of this run stalled on them
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def uid(self) -> str:
        return self.spec.uid

    @property
    def n_shards(self) -> int:
        return self.spec.n_shards

    @property
    def steps_per_epoch(self) -> int:
        return self.spec.steps_per_epoch

    @property
    def n_steps(self) -> int:
        return self.spec.n_steps

    @classmethod
    def create(cls, spec: RunSpec, theta0: np.ndarray, path: str | None,
               token: str = "") -> Run:
        """A new run at step 0, or resumed from the checkpoint at ``path``.

        CheckpointError (naming the file) if that checkpoint is unusable or was written for
        another problem or other options.
        """
        options = spec.options
        adam = Adam(lr=options.lr, weight_decay=options.weight_decay, clamp=options.clamp)
        run = cls(spec=spec, adam=adam, theta=theta0, opt_state=adam.init(theta0), token=token,
                   shard_timings=[{} for _ in range(spec.n_shards)],
                   shard_restarts=[0] * spec.n_shards, checkpoint_path=path)
        if spec.resume and path is not None:
            if os.path.exists(path):
                run.restore(path)
            else:
                logger.warning("diagode run %s: resume=True but no checkpoint at %s; starting "
                               "from theta0", spec.run_id, path)
        return run

    def notify(self) -> None:
        """Wake every waiter (pull / wait) on this run; later waiters get a fresh event."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    def apply_pushes(self) -> None:
        """All shards are in: sum in shard order, one Adam step, advance the step."""
        loss_sum, count, grad_sum = 0.0, 0, None
        for shard in range(self.n_shards):
            shard_loss, shard_grad, shard_count = self.pushes[shard]
            loss_sum += shard_loss
            count += shard_count
            grad_sum = shard_grad if grad_sum is None else grad_sum + shard_grad
        grad = grad_sum / count
        # Adam.step is pure: the old theta may still be referenced by replies being sent.
        self.theta, self.opt_state = self.adam.step(self.theta, grad, self.opt_state)
        self.pushes = {}
        self.last_loss = loss_sum / count
        self.grad_norm = float(np.linalg.norm(grad))
        self.epoch_loss_sum += loss_sum
        self.step += 1
        self.loss_trace.append((self.step, self.last_loss))
        if self.step % self.steps_per_epoch == 0:
            self.history.append(self.epoch_loss_sum / self.spec.S)
            self.epoch_loss_sum = 0.0
        now = time.monotonic()
        self.last_step_s = now - self.step_started
        self.step_started = now
        if self.step > 1 and self.resumed_from_step != self.step - 1:
            self.step_seconds.append(self.last_step_s)
            self.timed_steps += 1
            self.timed_wall_s += self.last_step_s
            self.timed_compute_s += max(t.get("compute_s", 0.0) for t in self.shard_timings)
        self.step_done_times.append(now)

    def identity(self) -> dict[str, Any]:
        """What determines theta (JSON-plain): recorded in checkpoints, compared on resume."""
        spec, wire = self.spec, self.spec.options.to_wire()
        fingerprint = spec.fingerprint or {}
        return {"n": spec.n, "S": spec.S, "n_shards": spec.n_shards,
                "steps_per_epoch": spec.steps_per_epoch,
                **{name: wire[name] for name in DETERMINING},
                "param": fingerprint.get("param"), "problem": fingerprint.get("problem")}

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint records besides theta and the Adam state (JSON-plain)."""
        spec = self.spec
        return {"run_id": spec.run_id, "uid": spec.uid, **self.identity(),
                "epochs": spec.options.epochs,
                "step": self.step, "epoch": self.step // self.steps_per_epoch,
                "history": list(self.history), "epoch_loss_sum": self.epoch_loss_sum,
                "last_loss": self.last_loss, "written": time.time()}

    def restore(self, path: str) -> None:
        """Continue from the checkpoint at ``path``; CheckpointError listing every way it was
        written for another problem or other options (except the ``resume_override`` ones)."""
        theta, state, meta = load_checkpoint(path)
        meta.setdefault("method", "polynomial")  # written before the option: polynomial
        spec = self.spec
        expected = {name: value for name, value in self.identity().items()
                    if name not in spec.resume_override}
        different = mismatches(meta, expected)
        if different:
            hint = (f" (resume_override may accept changes of {', '.join(OVERRIDABLE)})"
                    if any(d.split(":")[0] in OVERRIDABLE for d in different) else "")
            raise CheckpointError(path, "written for another problem or other options: "
                                        + "; ".join(different) + hint)
        if theta.shape != self.theta.shape:
            raise CheckpointError(path, f"theta has shape {theta.shape}, this run's theta0 "
                                        f"{self.theta.shape}")
        if meta["step"] > self.n_steps:
            raise CheckpointError(path, f"it is at step {meta['step']}, beyond this run's "
                                        f"{self.n_steps} steps (epochs={spec.options.epochs})")
        self.theta, self.opt_state = np.array(theta, dtype=np.float64), state
        self.step = self.resumed_from_step = self.checkpoint_step = int(meta["step"])
        self.history = [float(h) for h in meta["history"]]
        self.epoch_loss_sum = float(meta["epoch_loss_sum"])
        self.last_loss = meta["last_loss"]
        logger.info("diagode run %s: resumed from %s at step %d", self.run_id, path, self.step)


def status_of(run: Run) -> RunStatus:
    """The run's public status (what RunHandle.status(), the page and the gauges show)."""
    times = run.step_done_times
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and \
        times[-1] > times[0] else None
    remaining = run.n_steps - run.step
    end = run.ended if run.ended is not None else time.time()
    return {
        "run_id": run.run_id,
        "uid": run.uid,
        "status": run.status,
        "step": run.step,
        "n_steps": run.n_steps,
        "epoch": run.step // run.steps_per_epoch,
        "epochs": run.spec.options.epochs,
        "loss": run.last_loss,
        "history": list(run.history),
        "steps_per_s": rate,
        "error": run.error,
        "n": run.spec.n,
        "S": run.spec.S,
        "n_shards": run.n_shards,
        "batch_size": run.spec.options.batch_size,
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
        "checkpoint": run.checkpoint_path,
        "checkpoint_step": run.checkpoint_step,
        "resumed_from_step": run.resumed_from_step,
    }


def ended_beyond(runs, budget: int) -> list[Run]:
    """The ended runs to forget: the oldest ones, once the newer ones fill ``budget`` bytes
    (theta, per-step losses and history, roughly)."""
    ended = sorted((r for r in runs if r.status != "running"), key=lambda r: r.ended or 0.0,
                   reverse=True)
    per_entry = 64  # a (step, loss) tuple or a float in a list, with its object overhead
    used, dropped = 0, []
    for run in ended:  # newest first: kept while the budget lasts
        used += int(run.theta.nbytes) + per_entry * (len(run.loss_trace) + len(run.history))
        if used > budget:
            dropped.append(run)
    return dropped


def checked_theta0(theta0: Any, n: int) -> np.ndarray:
    """theta0 as received: a finite float64 vector of length n."""
    theta = np.asarray(theta0) if isinstance(theta0, np.ndarray) else None
    if theta is None or theta.dtype.kind != "f" or theta.shape != (n,):
        raise ValueError(f"theta0 must be a float array of shape ({n},), got "
                         f"{getattr(theta0, 'shape', type(theta0).__name__)}")
    if not np.isfinite(theta).all():
        raise ValueError("theta0 contains NaN or inf")
    return np.array(theta, dtype=np.float64)
