"""Training checkpoints: one ``.npz`` per checkpoint directory, replaced atomically, owned by
one live run at a time.

A checkpoint holds everything the parameter server needs to continue a run bit for bit:
theta, the optimiser state (Adam's m, v, t), the step, the per-epoch history and the partial
loss sum of the current epoch, and the RNG state, which is (seed, epoch): minibatches are a
pure function of them (``diagode_dist.train.epoch_batches``). It also records what
determines theta -- the problem's fingerprint (shapes and content hashes), the diagonal map,
and the options in ``DETERMINING`` -- so that a resume can refuse a checkpoint of another
problem or other options (``mismatches``).

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over
the old checkpoint and the directory is fsynced (``diagode_dist._io.atomic_write``), so a
reader (or a crash) only ever sees a whole file. Temporary files a killed writer left behind
are removed when a run takes the directory (``remove_stale_temporaries``).

Ownership: a run that writes to a directory holds its lock file (``checkpoint.lock``: owner
uid, run_id, host, pid, server id, heartbeat time), refreshed by the server every few
seconds; a second live run is refused the directory (``take_lock``) and a writer that lost
its lock stops writing (``save_checkpoint(owner=...)``).

Every way a checkpoint can be unreadable or inconsistent raises ``CheckpointError`` (a
ValueError) naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from diagode_dist._io import atomic_write, plain

__all__ = ["CheckpointError", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "mismatches", "take_lock", "refresh_lock", "release_lock", "lock_owner",
           "remove_stale_temporaries", "DETERMINING"]

FILENAME = "checkpoint.npz"
LOCKNAME = "checkpoint.lock"
FORMAT_VERSION = 2
LOCK_STALE_S = 30.0  # a lock whose heartbeat is older than this belongs to a dead run
# Options that determine theta, recorded in a checkpoint and compared on resume.
DETERMINING = ("lr", "weight_decay", "clamp", "batch_size", "seed", "k", "rtol", "method")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, inconsistent, or of another run.

    ``path`` is the file; the message names it and what is wrong.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"checkpoint {self.path}: {problem}")


def checkpoint_path(checkpoint_dir: str | os.PathLike) -> Path:
    """The checkpoint file of a run writing to ``checkpoint_dir``."""
    return Path(checkpoint_dir) / FILENAME


def lock_path(checkpoint_dir: str | os.PathLike) -> Path:
    """The lock file of ``checkpoint_dir``."""
    return Path(checkpoint_dir) / LOCKNAME


# ---- writing and reading -------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, theta: np.ndarray, optimizer_state: dict[str, Any],
                    meta: dict[str, Any], owner: str | None = None) -> Path:
    """Write a checkpoint atomically (temp file + fsync + os.replace + fsync of the folder).

    theta: (p,) float64. optimizer_state: arrays (stored as arrays) and scalars (stored in the
    JSON metadata). meta: JSON-serialisable run state (step, history, seed, epoch, ...).
    owner: the uid that must hold the folder's lock; if another run holds it, nothing is
    written and PermissionError names that run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        holder = lock_owner(path.parent)
        if holder is None or holder.get("uid") != owner:
            who = "nobody" if holder is None else f"run {holder.get('run_id')!r} (uid " \
                                                  f"{holder.get('uid')}, host " \
                                                  f"{holder.get('host')}, pid {holder.get('pid')})"
            raise PermissionError(f"the lock of {path.parent} is now held by {who}; this run "
                                  f"stopped writing there")
    arrays = {"theta": np.asarray(theta)}
    scalars = {}
    for key, value in optimizer_state.items():
        if isinstance(value, np.ndarray):
            arrays[f"opt.{key}"] = value
        else:
            scalars[key] = plain(value)
    header = {"format": FORMAT_VERSION, "optimizer_scalars": scalars, **meta}
    arrays["meta"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    return atomic_write(path, lambda stream: np.savez(stream, **arrays), durable=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Read and check a checkpoint: (theta, optimizer_state, meta).

    FileNotFoundError if absent; CheckpointError naming the file if it is not a whole, valid
    checkpoint: not a zip, truncated, a member missing or pickled, metadata not JSON or
    lacking a field, theta or the Adam moments not finite float vectors of one length.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as members:
            names = set(members.files)
            missing = {"meta", "theta"} - names
            if missing:
                raise CheckpointError(path, f"no {' or '.join(sorted(missing))} member "
                                            f"(not a diagode checkpoint)")
            meta = json.loads(members["meta"].tobytes().decode())
            theta = members["theta"]
            state = {key[len("opt."):]: members[key] for key in members.files
                     if key.startswith("opt.")}
    except CheckpointError:
        raise
    except Exception as err:  # BadZipFile, EOFError, zlib/JSON/Unicode errors, pickled members
        raise CheckpointError(path, f"unreadable ({type(err).__name__}: {err}); it is not a "
                                    f"whole checkpoint file") from None
    _check_contents(path, theta, state, meta)
    state.update(meta.pop("optimizer_scalars"))
    return theta, state, meta


_META_FIELDS = {"step": int, "history": list, "epoch_loss_sum": (int, float),
                "steps_per_epoch": int, "optimizer_scalars": dict}


def _check_contents(path: Path, theta, state: dict, meta: Any) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(path, "its metadata is not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(path, f"format {meta.get('format')!r} is not {FORMAT_VERSION} "
                                    f"(written by another version)")
    for name, kind in _META_FIELDS.items():
        if name not in meta:
            raise CheckpointError(path, f"its metadata has no {name!r}")
        if isinstance(meta[name], bool) or not isinstance(meta[name], kind):
            raise CheckpointError(path, f"its metadata field {name!r} is "
                                        f"{type(meta[name]).__name__}")
    if meta["step"] < 0:
        raise CheckpointError(path, f"step {meta['step']} < 0")
    if not all(isinstance(h, (int, float)) and math.isfinite(h) for h in meta["history"]):
        raise CheckpointError(path, "its history holds non-numbers or NaN")
    for name, array in {"theta": theta, **{f"Adam {k}": v for k, v in state.items()}}.items():
        if array.dtype.kind != "f" or array.ndim != 1 or array.shape != theta.shape:
            raise CheckpointError(path, f"{name} is not a float vector of theta's length "
                                        f"(dtype {array.dtype}, shape {array.shape})")
        if not np.isfinite(array).all():
            raise CheckpointError(path, f"{name} contains NaN or inf")
    if set(state) != {"m", "v"} or meta["optimizer_scalars"].get("t") != meta["step"]:
        raise CheckpointError(path, f"its Adam state (members {sorted(state)}, t = "
                                    f"{meta['optimizer_scalars'].get('t')!r}) does not match "
                                    f"step {meta['step']}")


def mismatches(meta: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """"name: checkpoint X, this run Y" for each entry of ``expected`` the checkpoint differs in
    (nested dicts compared entry by entry, named "problem.A0.blake2b").

    ``expected`` holds plain values (lists, not tuples); an entry the checkpoint lacks counts
    as a difference.
    """
    missing = object()
    found = []
    for name, value in expected.items():
        recorded = meta.get(name, missing)
        if recorded is missing:
            found.append(f"{prefix}{name}: not recorded in the checkpoint, this run {value!r}")
        elif isinstance(recorded, dict) and isinstance(value, dict):
            found += mismatches(recorded, value, f"{prefix}{name}.")
            found += [f"{prefix}{name}.{extra}: checkpoint {recorded[extra]!r}, not in this run"
                      for extra in recorded if extra not in value]
        elif plain(recorded) != plain(value):
            found.append(f"{prefix}{name}: checkpoint {recorded!r}, this run {value!r}")
    return found


def remove_stale_temporaries(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Delete the temporary files of interrupted checkpoint writes; returns their names.

    Only the folder's owner calls this (it holds the lock), so no write is in flight.
    """
    removed = []
    for temporary in Path(checkpoint_dir).glob(f".{FILENAME}.*.tmp"):
        with contextlib.suppress(OSError):
            temporary.unlink()
            removed.append(temporary.name)
    return removed


# ---- the lock --------------------------------------------------------------------------------

def lock_owner(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lock's record, or None if there is none (an unreadable lock reads as no owner)."""
    try:
        record = json.loads(lock_path(checkpoint_dir).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def take_lock(checkpoint_dir: str | os.PathLike, record: dict[str, Any],
              is_mine_and_ended=lambda uid: False) -> None:
    """Make ``record`` (uid, run_id, server) the owner of ``checkpoint_dir``.

    PermissionError naming the holder if a live run holds it. A lock is free when absent, when
    its heartbeat is older than ``LOCK_STALE_S``, when its process on this host is gone, or
    when ``is_mine_and_ended(uid)`` says its run (of this server) has ended.
    """
    path = lock_path(checkpoint_dir)
    holder = lock_owner(checkpoint_dir)
    if holder is not None and holder.get("uid") != record["uid"] and _alive(
            holder, record, is_mine_and_ended):
        age = time.time() - float(holder.get("heartbeat", 0.0))
        raise PermissionError(
            f"checkpoint_dir {checkpoint_dir} is in use by run {holder.get('run_id')!r} (uid "
            f"{holder.get('uid')}, host {holder.get('host')}, pid {holder.get('pid')}, "
            f"heartbeat {age:.0f} s ago): one live run per directory")
    _write_lock(path, record)
    if (lock_owner(checkpoint_dir) or {}).get("uid") != record["uid"]:  # lost a race
        raise PermissionError(f"checkpoint_dir {checkpoint_dir} was just taken by another run")


def refresh_lock(checkpoint_dir: str | os.PathLike, record: dict[str, Any]) -> bool:
    """Renew the heartbeat if ``record`` still holds the lock; False if it lost it."""
    if (lock_owner(checkpoint_dir) or {}).get("uid") != record["uid"]:
        return False
    _write_lock(lock_path(checkpoint_dir), record)
    return True


def release_lock(checkpoint_dir: str | os.PathLike, uid: str) -> None:
    """Remove the lock if ``uid`` holds it."""
    if (lock_owner(checkpoint_dir) or {}).get("uid") == uid:
        with contextlib.suppress(OSError):
            lock_path(checkpoint_dir).unlink()


def lock_record(uid: str, run_id: str, server: str) -> dict[str, Any]:
    """The lock record of a run of this process."""
    return {"uid": uid, "run_id": run_id, "server": server, "host": socket.gethostname(),
            "pid": os.getpid()}


def _write_lock(path: Path, record: dict[str, Any]) -> None:
    body = json.dumps({**record, "heartbeat": time.time()})
    atomic_write(path, lambda stream: stream.write(body), text=True)


def _alive(holder: dict[str, Any], me: dict[str, Any], is_mine_and_ended) -> bool:
    if holder.get("server") == me["server"]:
        return not is_mine_and_ended(holder.get("uid"))
    if time.time() - float(holder.get("heartbeat", 0.0)) > LOCK_STALE_S:
        return False
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True
