"""What crosses the wire between the client, the parameter server, the shards and the dashboard.

- ``RunSpec``: a run as submitted (frozen, checked when built). It travels to the scheduler as
  the plain dict of ``to_wire()`` and is rebuilt there with ``from_wire()``, which checks every
  type and range again: a malformed call to the handler is refused before anything is
  registered.
- ``ShardSpec``: a run's spec as one shard task gets it (with its columns).
- ``RunStatus``: the status dict of a run, as ``RunHandle.status()``, ``/diagode/status.json``,
  the ``/metrics`` gauges, the training page and ``diagode-dist status`` see it.
- Task keys and plugin names. Keys carry the run's ``uid`` (fresh per submission), never the
  user's ``run_id`` label: a reused label can never meet an old run's tasks or worker caches.

Nothing here imports Dask.
"""

from __future__ import annotations

import math
import numbers
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from diagode_dist.options import TrainOptions

SERVER_PLUGIN = "diagode-parameter-server"
SERVICE_PLUGIN = "diagode-service"
SHARD_PREFIX = "diagode-shard"
OPERATOR_PREFIX = "diagode-operator"

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UID = re.compile(r"^[0-9a-f]{32}$")
_GPU_ORDINAL = re.compile(r"^gpu:(0|[1-9][0-9]{0,3})$")
_WIRE_KEYS = ("run_id", "uid", "n", "S", "n_shards", "checkpoint_dir", "resume",
              "resume_override", "fingerprint", "stall_timeout", "options", "n_theta")
# Options whose change a resume may accept when asked to (resume_override): they steer Adam
# from here on but do not change what the checkpoint's state means.
OVERRIDABLE = ("lr", "weight_decay", "clamp")


def new_uid() -> str:
    """A fresh submission identity (32 hex digits)."""
    return uuid.uuid4().hex


def shard_key(uid: str, shard: int) -> tuple[str, str, int]:
    """Dask key of a shard's loop task; the task stream shows the prefix ``diagode-shard``."""
    return (SHARD_PREFIX, uid, int(shard))


def operator_key(uid: str) -> tuple[str, str]:
    """Dask key of the in-memory A0 of a run (shared by the shards of one worker)."""
    return (OPERATOR_PREFIX, uid)


def check_run_id(run_id: Any) -> str:
    """1-64 letters, digits, '_', '.', '-', starting with a letter or digit."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(f"run_id must be 1-64 characters of letters, digits, '_', '.', '-' "
                         f"(starting with a letter or digit), got {run_id!r}")
    return run_id


def _count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class RunSpec:
    """A training run as the parameter server holds it.

    run_id: the user's label; uid: this submission's identity (keys, caches, checkpoint lock).
    n, S: state size and columns; n_shards: 1 <= n_shards <= S; checkpoint_dir: a path on the
    scheduler's file system (a relative one is resolved there, where it is used), or None;
    resume: continue from its checkpoint; resume_override: options in ``OVERRIDABLE`` that may
    differ from the checkpoint's; fingerprint: what the checkpoint records about the problem
    and the diagonal map (``{"problem": {...}, "param": name}``, plain values), compared on
    resume; stall_timeout: seconds a shard may go without pushing before its worker is
    replaced (None: from the run's median step time, see the server); n_theta:
    length of theta when it is not n (an operator parametrisation with a pattern).
    """

    run_id: str
    n: int
    S: int
    n_shards: int
    options: TrainOptions
    checkpoint_dir: str | None = None
    resume: bool = False
    resume_override: tuple[str, ...] = ()
    fingerprint: dict[str, Any] | None = None
    stall_timeout: float | None = None
    uid: str = field(default_factory=new_uid)
    n_theta: int | None = None

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if not isinstance(self.uid, str) or not _UID.match(self.uid):
            raise ValueError(f"uid must be 32 lowercase hex digits, got {self.uid!r}")
        _count("n", self.n)
        if self.n_theta is not None:
            _count("n_theta", self.n_theta)
        _count("S", self.S)
        _count("n_shards", self.n_shards)
        if self.n_shards > self.S:
            raise ValueError(f"n_shards must be <= S = {self.S} (the number of columns), got "
                             f"{self.n_shards}")
        if not isinstance(self.options, TrainOptions):
            raise TypeError(f"options must be a TrainOptions, got "
                            f"{type(self.options).__name__}")
        if self.checkpoint_dir is not None and (
                not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir.strip()):
            raise ValueError(f"checkpoint_dir must be a non-empty path (str) or None, got "
                             f"{self.checkpoint_dir!r}")
        if not isinstance(self.resume, bool):
            raise TypeError(f"resume must be a bool, got {type(self.resume).__name__}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        override = tuple(self.resume_override)
        unknown = [name for name in override if name not in OVERRIDABLE]
        if unknown:
            raise ValueError(f"resume_override may name {', '.join(OVERRIDABLE)}, got "
                             f"{unknown}")
        object.__setattr__(self, "resume_override", override)
        if self.stall_timeout is not None:
            if isinstance(self.stall_timeout, bool) or not isinstance(
                    self.stall_timeout, numbers.Real) or not 0 < self.stall_timeout < math.inf:
                raise ValueError(f"stall_timeout must be a number of seconds > 0 or None, got "
                                 f"{self.stall_timeout!r}")
            object.__setattr__(self, "stall_timeout", float(self.stall_timeout))
        if self.fingerprint is not None and not isinstance(self.fingerprint, dict):
            raise TypeError(f"fingerprint must be a dict or None, got "
                            f"{type(self.fingerprint).__name__}")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.S / self.options.batch_size)

    @property
    def theta_size(self) -> int:
        """Length of theta (n for a diagonal parametrisation)."""
        return self.n if self.n_theta is None else self.n_theta

    @property
    def n_steps(self) -> int:
        return self.options.epochs * self.steps_per_epoch

    def to_wire(self) -> dict[str, Any]:
        """Plain values (msgpack): what the client sends to ``diagode_create_run``."""
        return {"run_id": self.run_id, "uid": self.uid, "n": self.n, "S": self.S,
                "n_shards": self.n_shards, "checkpoint_dir": self.checkpoint_dir,
                "resume": self.resume, "resume_override": list(self.resume_override),
                "fingerprint": self.fingerprint, "stall_timeout": self.stall_timeout,
                "options": self.options.to_wire(), "n_theta": self.n_theta}

    @classmethod
    def from_wire(cls, data: Any) -> RunSpec:
        """Rebuild and check a spec received by the server; TypeError/ValueError if malformed."""
        if not isinstance(data, dict):
            raise TypeError(f"a run spec must be a dict, got {type(data).__name__}")
        keys = set(data)
        if keys != set(_WIRE_KEYS):
            missing, unknown = sorted(set(_WIRE_KEYS) - keys), sorted(keys - set(_WIRE_KEYS))
            raise ValueError(f"a run spec needs the keys {', '.join(_WIRE_KEYS)} (missing: "
                             f"{missing or 'none'}, unknown: {unknown or 'none'})")
        override = data["resume_override"]
        if not isinstance(override, (list, tuple)):
            raise TypeError(f"resume_override must be a list, got {type(override).__name__}")
        return cls(**{**data, "options": TrainOptions.from_wire(data["options"]),
                      "resume_override": tuple(override)})


def check_device(device: Any) -> str:
    """A shard's device: "cpu", "gpu" (its worker's GPU, CuPy's device 0) or "gpu:<i>" (device
    i of those its worker process sees)."""
    if isinstance(device, str) and (device in ("cpu", "gpu") or _GPU_ORDINAL.match(device)):
        return device
    raise ValueError(f"device must be 'cpu', 'gpu' or 'gpu:<i>' (i >= 0), got {device!r}")


@dataclass(frozen=True)
class ShardSpec:
    """What one shard task needs besides its data: its run (options with the diagonal map
    object as ``param``), its global columns ``[lo, hi)``, the run's secret ``token``, without
    which the server refuses its pushes, the ``device`` it computes on (``check_device``;
    chosen at submission, never "whatever the worker sees") and ``device_shares``, the shards
    that may compute at once on that device (each gets that share of the memory budget)."""

    run: RunSpec
    shard: int
    lo: int
    hi: int
    token: str = field(default="", repr=False)
    device: str = "cpu"
    device_shares: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", check_device(self.device))
        _count("device_shares", self.device_shares)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def uid(self) -> str:
        return self.run.uid

    @property
    def S(self) -> int:
        return self.run.S

    @property
    def steps_per_epoch(self) -> int:
        return self.run.steps_per_epoch

    @property
    def options(self) -> TrainOptions:
        return self.run.options


class ShardTiming(TypedDict, total=False):
    """What a shard reports with each push (all optional)."""

    compute_s: float
    pull_s: float
    load_s: float
    columns: int
    backend: str
    device: str
    worker: str
    error_estimate: float
    rtol_met: bool


# The type of each ShardTiming entry: the server keeps only these (pages and gauges show them).
SHARD_TIMING_TYPES: dict[str, type] = {
    "compute_s": float, "pull_s": float, "load_s": float, "columns": int, "backend": str,
    "device": str, "worker": str, "error_estimate": float, "rtol_met": bool}


class RunStatus(TypedDict):
    """The status of a run (``RunHandle.status()``, status.json, the page, the gauges)."""

    run_id: str
    status: str  # "running" | "finished" | "failed"
    step: int
    n_steps: int
    epoch: int  # completed epochs
    epochs: int
    loss: float | None  # mean loss of the last step
    history: list[float]  # per-epoch mean loss
    steps_per_s: float | None
    error: str | None
    n: int
    S: int
    n_shards: int
    batch_size: int
    steps_per_epoch: int
    grad_norm: float | None
    last_step_s: float | None
    mean_step_s: float | None
    mean_compute_s: float | None
    shard_timings: list[ShardTiming]
    shard_restarts: list[int]
    started: float  # time.time() when the run was created
    elapsed_s: float
    eta_s: float | None
    uid: str  # this submission's identity
    checkpoint: str | None  # checkpoint file on the scheduler, or None
    checkpoint_step: int | None
    resumed_from_step: int | None


def push_problem(step: Any, shard: Any, loss_sum: Any, grad_sum: Any, count: Any,
                 timings: Any) -> str | None:
    """What is malformed in a push (``diagode_push``'s arguments), or None if nothing is."""
    for name, value in (("step", step), ("shard", shard), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            return f"{name} must be an int >= 0, got {value!r}"
    if isinstance(loss_sum, bool) or not isinstance(loss_sum, numbers.Real):
        return f"loss_sum must be a number, got {type(loss_sum).__name__}"
    if not isinstance(grad_sum, np.ndarray) or grad_sum.dtype.kind != "f":
        return f"grad_sum must be a float array, got {type(grad_sum).__name__}"
    if timings is not None and not isinstance(timings, dict):
        return f"timings must be a dict, got {type(timings).__name__}"
    return None


def status_from_wire(status: dict[str, Any]) -> RunStatus:
    """The wire turns lists into tuples; give them back as lists."""
    return {key: list(value) if isinstance(value, tuple) else value  # type: ignore[return-value]
            for key, value in status.items()}
