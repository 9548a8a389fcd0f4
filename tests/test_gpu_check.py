"""benchmarks/gpu_check.sh, the one-shot GPU acceptance check, on a machine without a GPU.

Without a GPU it stops after the environment step and says so (exit status 2); with --dry-run
it runs every step on the CPU at small sizes and writes the same report, which checks the
script, its probes and its report without a GPU.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_probes
from benchmarks.roofline import gpu_unavailable

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["install", "environment", "pytest-gpu", "probes", "demo", "roofline"]

needs_no_gpu = pytest.mark.skipif(gpu_unavailable() is None,
                                  reason="a GPU is present: the no-GPU path does not run")


def _check(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    return subprocess.run(["bash", str(SCRIPT), "--install", "none", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def _report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "report.json").read_text())


@needs_no_gpu
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    done = _check(tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no GPU:" in done.stderr and "--dry-run" in done.stderr
    report = _report(tmp_path)
    assert report["ok"] is False and report["verdict"].startswith("NO GPU")
    assert [step["name"] for step in report["steps"]] == STEPS
    assert all(step["status"].startswith("skipped") for step in report["steps"]
               if step["name"] not in ("install", "environment"))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "NO GPU" in markdown and "| environment | ok |" in markdown


def test_usage_errors_exit_64(tmp_path):
    for args in (["--bogus"], ["--install", "sometimes"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=30, cwd=tmp_path)
        assert done.returncode == 64 and "gpu_check.sh:" in done.stderr, args


@pytest.mark.slow
@needs_no_gpu
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    done = _check(tmp_path, "--dry-run", timeout=480)
    report = _report(tmp_path)
    steps = {step["name"]: step["status"] for step in report["steps"]}
    assert done.returncode == 0, (steps, done.stderr[-3000:])
    assert list(steps) == STEPS and report["ok"] is True
    assert "dry run" in report["verdict"] and "no GPU" in report["gpu"]
    probes = report["probes"]
    assert {name: probes[name]["status"] for name in gpu_probes.PROBES} == dict.fromkeys(
        gpu_probes.PROBES, "ok")
    assert probes["cgs2_step"]["peak_extra_bytes"] > 0
    assert probes["chunk"]["chunk_stable"] and probes["chunk"]["two_calls_bit_for_bit"]
    assert probes["mse_obs"]["intervals"] >= gpu_probes.MSE_TIMES
    assert probes["demo"]["cluster"] == "LocalCluster"
    assert probes["demo"]["theta_rel_diff_vs_fit"] < 1e-10
    assert report["pytest_gpu"]["failures"] == report["pytest_gpu"]["errors"] == 0
    assert "GPU benchmark skipped" in report["roofline_markdown"]
    assert report["total_seconds"] < 300
    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert len(files) <= 8  # what the report folder holds comes back whole from a GPU machine


def test_peak_memory_meter_counts_what_a_block_allocates():
    with gpu_probes.PeakMemory(np) as meter:
        block = np.ones(1_000_000)
        del block
    assert 8_000_000 <= meter.peak < 8_200_000


def test_report_of_an_empty_folder_is_not_ok(tmp_path):
    report = gpu_probes.write_report(tmp_path)
    assert report["ok"] is False and report["steps"] == []
    assert (tmp_path / "report.md").read_text().startswith("# diagode-dist GPU acceptance check")
