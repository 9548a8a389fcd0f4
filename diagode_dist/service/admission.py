"""What the parameter server admits: run labels, checkpoint folders, tokens, shard timings.

- A ``run_id`` is a label, a ``uid`` an identity: a uid is never registered twice, a label is
  refused while its run is running, and while an ended run's record is held unless the new
  submission resumes (``label_refusal``).
- A checkpoint folder is created and checked on the scheduler (where a relative path is
  resolved), locked for the run, cleared of temporary files of interrupted writes, and a
  checkpoint written by a run of the same name is not overwritten without ``resume``
  (``claim_folder``).
- Pushes and cancels must carry the run's token (``same_secret``, constant time); shard
  timings keep only the documented entries with values of their type (``known_timings``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Any

from diagode_dist.service.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    release_lock,
    remove_stale_temporaries,
    take_lock,
)
from diagode_dist.service.protocol import SHARD_TIMING_TYPES, RunSpec

logger = logging.getLogger("diagode_dist.service.server")


def label_refusal(server, spec: RunSpec) -> str | None:
    """Why ``spec``'s run_id or uid may not be used now, or None."""
    if spec.uid in server.by_uid:
        return f"uid {spec.uid} is already registered (a submission is never repeated)"
    previous = server.runs.get(spec.run_id)
    if previous is None:
        return None
    if previous.status == "running":
        return f"run_id {spec.run_id!r} is already running on this scheduler"
    if not spec.resume:
        return (f"run_id {spec.run_id!r} was used by a run that {previous.status} on this "
                f"scheduler (uid {previous.uid}); choose another run_id, or pass "
                f"resume=True with its checkpoint_dir to continue it")
    return None

async def claim_folder(server, folder: str, spec: RunSpec,
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
    if path in server.writes:  # a previous run's last write must land before we read
        await asyncio.wait([server.writes[path]])
    try:
        await asyncio.to_thread(take_lock, folder, lock,
                                lambda uid: _ended_on(server, uid))
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

def _ended_on(server, uid: str | None) -> bool:
    run = server.by_uid.get(uid) if uid else None
    return run is None or run.status != "running"


def same_secret(expected: str, given: Any) -> bool:
    """Constant-time comparison of a run's token with a caller's."""
    return isinstance(given, str) and bool(expected) and hmac.compare_digest(
        expected.encode(), given.encode())


def known_timings(timings: dict | None) -> dict:
    """The entries of ``ShardTiming`` with values of their type (pages and gauges show them)."""
    kept = {}
    for key, kind in SHARD_TIMING_TYPES.items():
        value = (timings or {}).get(key)
        wanted = (int, float) if kind is float else kind
        if isinstance(value, wanted) and (kind is bool or not isinstance(value, bool)):
            kept[key] = value[:200] if isinstance(value, str) else value
    return kept


def _writer_of(path: str) -> str | None:
    """The run_id that wrote the checkpoint at ``path`` (None if unreadable)."""
    try:
        return load_checkpoint(path)[2].get("run_id")
    except (OSError, ValueError):
        return None
