"""Training checkpoints: one ``.npz`` per checkpoint directory, replaced atomically.

A checkpoint holds everything the parameter server needs to continue a run bit for bit:
theta, the optimiser state (Adam's m, v, t), the step, the per-epoch history and the partial
loss sum of the current epoch, and the RNG state, which is (seed, epoch): minibatches are a
pure function of them (``diagode_dist.train.epoch_batches``).

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over
the old checkpoint (``diagode_dist._io.atomic_write``), so a reader (or a crash) only ever
sees a whole file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diagode_dist._io import atomic_write, plain

FILENAME = "checkpoint.npz"
FORMAT_VERSION = 1


def checkpoint_path(checkpoint_dir: str | os.PathLike) -> Path:
    """The checkpoint file of a run writing to ``checkpoint_dir``."""
    return Path(checkpoint_dir) / FILENAME


def save_checkpoint(path: str | os.PathLike, theta: np.ndarray, optimizer_state: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temp file + fsync + os.replace).

    theta: (n,) float64. optimizer_state: arrays (stored as arrays) and scalars (stored in the
    JSON metadata). meta: JSON-serialisable run state (step, history, seed, epoch, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """Read a checkpoint: (theta, optimizer_state, meta). FileNotFoundError if absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with np.load(path, allow_pickle=False) as members:
        meta = json.loads(members["meta"].tobytes().decode())
        theta = members["theta"]
        state = {key[len("opt."):]: members[key] for key in members.files
                 if key.startswith("opt.")}
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r} is not "
                         f"{FORMAT_VERSION}")
    state.update(meta.pop("optimizer_scalars"))
    return theta, state, meta

