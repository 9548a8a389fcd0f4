"""The deploy scripts, run as a user runs them (subprocesses, real clusters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import diagode_dist as dd
from diagode_dist.options import DEMO_OPTIONS

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_workstation_demo_trains_like_fit_with_the_demo_options(tmp_path):
    result = _run(str(REPO / "deploy" / "local" / "workstation.py"), "--demo", "--cpu",
                  "--workers", "2", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "cluster: LocalCluster, 2 worker(s)" in result.stdout
    prob = dd.demo_problem()
    theta_ref, history_ref = dd.fit(prob, np.zeros(prob.n), options=DEMO_OPTIONS)
    theta = np.load(tmp_path / "out" / "theta.npy")
    assert np.max(np.abs(theta - theta_ref)) <= 1e-12 * np.max(np.abs(theta_ref))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["options"]["lr"] == DEMO_OPTIONS.lr


def test_slurmcluster_dry_run_prints_the_job_script(tmp_path):
    (tmp_path / "A0.npy").write_bytes(b"")
    for name in ("F.npy", "labels.npy"):
        (tmp_path / name).write_bytes(b"")
    config = tmp_path / "run.toml"
    config.write_text('[problem]\nA0 = "A0.npy"\nF = "F.npy"\nlabels = "labels.npy"\nT = 1\n'
                      'beta = 1\n')
    result = _run(str(REPO / "deploy" / "slurm" / "slurmcluster.py"), str(config), "--jobs",
                  "1", "--cores", "2", "--memory", "1GB", "--gpus-per-job", "0",
                  "--walltime", "00:30:00", "--dry-run", cwd=tmp_path)
    assert result.stdout.startswith("#!/usr/bin/env bash")
    assert "#SBATCH --cpus-per-task=2" in result.stdout and "--lifetime" in result.stdout
