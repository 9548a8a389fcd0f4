"""The examples run (``--quick``) as a user runs them, and what they print and write is sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, out: Path) -> tuple[str, dict]:
    """Run examples/<name> --quick --out <out> in a fresh interpreter; (stdout, summary)."""
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, json.loads((out / "summary.json").read_text())


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


@pytest.mark.slow
def test_synthetic_demo(tmp_path):
    stdout, summary = run_example("synthetic_demo.py", tmp_path)
    assert _is_png(tmp_path / "loss.png")
    assert (tmp_path / "theta.npy").is_file() and (tmp_path / "history.csv").is_file()
    assert stdout.count("mean loss") == 3  # one line per epoch
    assert summary["n"] == 256 and summary["S"] == 64 and len(summary["history"]) == 3
    assert summary["final_loss"] < 0.95 * summary["initial_loss"]
    assert summary["history"][-1] < summary["history"][0]


@pytest.mark.slow
def test_reaction_diffusion_inverse(tmp_path):
    stdout, summary = run_example("reaction_diffusion_inverse.py", tmp_path)
    assert _is_png(tmp_path / "field.png")
    assert "field relative error" in stdout
    assert 0.1 < summary["initial_field_error"] < 1.0
    # a few Adam steps already recover a good part of the field
    assert summary["final_field_error"] < 0.6 * summary["initial_field_error"]
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "step,mse,field_error" and len(lines) == 1 + summary["steps"]
    assert float(lines[-1].split(",")[1]) < float(lines[1].split(",")[1])


@pytest.mark.slow
def test_fit_trajectories(tmp_path):
    stdout, summary = run_example("fit_trajectories.py", tmp_path)
    assert _is_png(tmp_path / "fit.png")
    assert "time per gradient" in stdout
    assert summary["n"] == 100
    for key in ("seconds_per_gradient_all_columns", "seconds_per_gradient_batch"):
        assert 0.0 < summary[key] < 30.0
    assert summary["final_mse"] < 0.2 * summary["initial_mse"]
    assert summary["final_rate_error"] < summary["initial_rate_error"]


@pytest.mark.parametrize("name", ["synthetic_demo.py", "reaction_diffusion_inverse.py",
                                  "fit_trajectories.py"])
def test_example_help(name):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout
