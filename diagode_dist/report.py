"""The result files of a training run: theta.npy, history.csv, loss.png and summary.json."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diagode_dist._io import atomic_write, plain

__all__ = ["write_outputs"]

THETA_FILE = "theta.npy"
HISTORY_FILE = "history.csv"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"


def write_outputs(
    out_dir: str | Path,
    theta: Any,
    history: Sequence[float],
    summary: Mapping[str, Any],
) -> dict[str, Path]:
    """Write the results of a run into ``out_dir`` (created if needed) and return their paths.

    theta: (n,) trained parameters (NumPy, or anything with ``.get()`` such as a CuPy array).
    history: per-epoch mean loss, epoch 1 first.
    summary: JSON-able facts about the run (NumPy scalars and arrays are converted).

    Files (keys of the returned dict): ``theta`` theta.npy; ``history`` history.csv with columns
    epoch, mean_loss; ``plot`` loss.png (mean loss per epoch, log scale if over a decade);
    ``summary`` summary.json. Each file is written to a temporary name and renamed, so a reader
    never sees a half-written file.
    """
    theta = _host_vector(theta)
    history = _history_floats(history)
    if not isinstance(summary, Mapping):
        raise TypeError(f"summary must be a mapping, got {type(summary).__name__}")
    try:
        summary_text = json.dumps(plain(dict(summary)), indent=2, sort_keys=True, allow_nan=True)
    except TypeError as err:
        raise TypeError(f"summary: {err}") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir exists and is not a folder: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "theta": out_dir / THETA_FILE,
        "history": out_dir / HISTORY_FILE,
        "plot": out_dir / PLOT_FILE,
        "summary": out_dir / SUMMARY_FILE,
    }
    atomic_write(paths["theta"], lambda stream: np.save(stream, theta))
    atomic_write(paths["history"], lambda stream: _write_history(stream, history), text=True)
    atomic_write(paths["plot"], lambda stream: _plot_history(stream, history))
    atomic_write(paths["summary"], lambda stream: stream.write(summary_text + "\n"), text=True)
    return paths


def _host_vector(theta: Any) -> np.ndarray:
    if hasattr(theta, "get") and not isinstance(theta, np.ndarray):
        theta = theta.get()  # CuPy -> NumPy
    theta = np.asarray(theta)
    if theta.ndim != 1 or theta.size == 0:
        raise ValueError(f"theta must be a non-empty 1-D array, got shape {theta.shape}")
    if not np.issubdtype(theta.dtype, np.floating):
        raise TypeError(f"theta must hold floats, got dtype {theta.dtype}")
    return theta


def _history_floats(history: Sequence[float]) -> list[float]:
    try:
        values = [float(value) for value in history]
    except (TypeError, ValueError):
        raise TypeError("history must be a sequence of numbers (per-epoch mean loss)") from None
    return values


def _write_history(stream, history: list[float]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["epoch", "mean_loss"])
    for epoch, loss in enumerate(history, start=1):
        writer.writerow([epoch, repr(loss)])  # repr: round-trips the float exactly


def _plot_history(stream, history: list[float]) -> None:
    # The object API with the Agg canvas: no pyplot global state, no GUI backend needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epochs = np.arange(1, len(history) + 1)
    axes.plot(epochs, history, marker="o", markersize=3)
    finite = [value for value in history if math.isfinite(value)]
    if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        axes.set_yscale("log")  # only when the loss spans more than a decade
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean loss")
    axes.set_title("training loss")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(stream, format="png")


def write_and_announce(out_dir: str | Path, theta: Any, history: Sequence[float],
                       summary: Mapping[str, Any]) -> dict[str, Path]:
    """``write_outputs``, then one line saying how the loss moved and what was written where."""
    paths = write_outputs(out_dir, theta, history, summary)
    print(f"loss per epoch: {history[0]:.6g} -> {history[-1]:.6g}; wrote "
          f"{', '.join(p.name for p in paths.values())} to {Path(out_dir).resolve()}")
    return paths
