"""The ``diagode-dist`` command: user errors, result files, the real subcommands end to end.

End-to-end tests run ``python -m diagode_dist.cli`` in a subprocess against real Dask clusters
(an embedded one, or a LocalCluster of worker processes started here) and check the trained theta
against the single-process trainer ``dd.fit`` on the same data and options.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diagode_dist.cli import main
from diagode_dist.report import write_outputs

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 180  # seconds for one CLI subprocess on 2 loaded cores


def _closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: str, cwd: Path | None = None, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "diagode_dist.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"diagode-dist {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def _run_id(stdout: str) -> str:
    match = re.search(r"^run id: (\S+)$", stdout, re.MULTILINE)
    assert match, f"no run id printed:\n{stdout}"
    return match.group(1)


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run main(argv) in-process; assert it failed with one error line; return that line."""
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 1, captured
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("diagode-dist: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[-1]


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _history_csv(path: Path) -> list[float]:
    with path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["epoch"]) for row in rows] == list(range(1, len(rows) + 1))
    return [float(row["mean_loss"]) for row in rows]


def _check_outputs(out: Path, theta_ref: np.ndarray, history_ref: list[float]) -> dict:
    """The four result files exist, theta and history match the reference; returns the summary."""
    theta = np.load(out / "theta.npy")
    assert theta.shape == theta_ref.shape
    assert _relative_error(theta, theta_ref) <= 1e-12
    history = _history_csv(out / "history.csv")
    np.testing.assert_allclose(history, history_ref, rtol=1e-12)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "summary.json").read_text())


# ---- a problem in files ------------------------------------------------------------------------


SMALL = {"n": 40, "S": 12, "T": 1.5, "beta": 4.0}
SMALL_TRAIN = {"epochs": 2, "lr": 0.05, "k": 12, "batch_size": 5, "seed": 3, "n_shards": 3,
               "checkpoint_every": 2}


def _write_problem(folder: Path, sparse: bool = True) -> dict[str, np.ndarray]:
    """A small problem in files (A0 as scipy.sparse .npz or dense .npy); returns the arrays."""
    import scipy.sparse

    rng = np.random.default_rng(7)
    n, S = SMALL["n"], SMALL["S"]
    A0 = 0.2 * rng.standard_normal((n, n)) * (rng.random((n, n)) < 0.3)
    np.fill_diagonal(A0, 0.0)
    F = rng.standard_normal((n, S))
    labels = rng.integers(0, n, S)
    folder.mkdir(parents=True, exist_ok=True)
    if sparse:
        scipy.sparse.save_npz(folder / "A0.npz", scipy.sparse.csr_matrix(A0))
    else:
        np.save(folder / "A0.npy", A0)
    np.save(folder / "F.npy", F)
    np.save(folder / "labels.npy", labels)
    return {"A0": A0, "F": F, "labels": labels}


def _write_config(folder: Path, a0_name: str = "A0.npz", extra: str = "", **train) -> Path:
    options = {**SMALL_TRAIN, **train}
    lines = ["[problem]", f'A0 = "{a0_name}"', 'F = "F.npy"', 'labels = "labels.npy"',
             f"T = {SMALL['T']}", f"beta = {SMALL['beta']}", "", "[train]"]
    lines += [f"{key} = {value}" for key, value in options.items()]
    path = folder / "run.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _fit_reference(arrays: dict[str, np.ndarray], **train) -> tuple[np.ndarray, list[float]]:
    """theta and history of the single-process trainer on the same data and options."""
    import diagode_dist as dd

    options = {**SMALL_TRAIN, **train}
    for service_only in ("n_shards", "checkpoint_every"):
        options.pop(service_only, None)
    prob = dd.Problem(arrays["A0"], arrays["F"], arrays["labels"], T=SMALL["T"],
                      beta=SMALL["beta"])
    theta, history = dd.fit(prob, np.zeros(SMALL["n"]), **options)
    return np.asarray(theta), list(history)


# ---- user errors: one line, exit status 1, before any cluster --------------------------------


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "status", "result"):
        assert command in out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--epochs", "0"])
    assert info.value.code == 2
    assert "--epochs: epochs must be >= 1, got 0" in capsys.readouterr().err


def test_train_config_errors_are_one_line(tmp_path, capsys):
    _write_problem(tmp_path)
    config = _write_config(tmp_path, extra="[output]\ndirectory = 'x'\n")
    line = _one_line_error(capsys, ["train", str(config)])
    assert "unknown key [output] directory" in line and str(config) in line

    config = _write_config(tmp_path, lr='"big"')
    assert "[train] lr must be a number" in _one_line_error(capsys, ["train", str(config)])

    (tmp_path / "labels.npy").unlink()
    config = _write_config(tmp_path)
    line = _one_line_error(capsys, ["train", str(config)])
    assert "[problem] labels: no such file" in line and str(tmp_path / "labels.npy") in line

    assert "config file not found" in _one_line_error(capsys, ["train", "nope.toml"])


def test_train_checks_files_before_contacting_the_scheduler(tmp_path, capsys):
    arrays = _write_problem(tmp_path)
    np.save(tmp_path / "labels.npy", arrays["labels"][:-1])  # one label short
    config = _write_config(tmp_path)
    start = time.monotonic()
    line = _one_line_error(capsys, ["train", str(config),
                                    "--scheduler", f"tcp://127.0.0.1:{_closed_port()}"])
    assert "labels must have shape (S,) = (12,)" in line
    assert time.monotonic() - start < 5  # no connection attempt (that would wait 10 s)

    np.save(tmp_path / "labels.npy", arrays["labels"])
    config = _write_config(tmp_path, n_shards=13)
    line = _one_line_error(capsys, ["train", str(config),
                                    "--scheduler", f"tcp://127.0.0.1:{_closed_port()}"])
    assert "[train] n_shards = 13 is more than the S = 12 columns" in line


def test_unreachable_scheduler_fails_clearly_and_quickly(capsys):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    line = _one_line_error(capsys, ["status", "some-run", "--scheduler", address,
                                    "--connect-timeout", "2"])
    assert time.monotonic() - start < 10
    assert "cannot reach the Dask scheduler" in line and address in line


def test_missing_scheduler_file(tmp_path, capsys):
    path = tmp_path / "scheduler.json"
    line = _one_line_error(capsys, ["result", "r", "--scheduler-file", str(path),
                                    "--connect-timeout", "0.3"])
    assert f"scheduler_file: {path} does not exist" in line


def test_option_combinations(tmp_path, capsys):
    _write_problem(tmp_path)
    config = str(_write_config(tmp_path))
    assert "--jobs, --queue need(s) --slurm" in _one_line_error(
        capsys, ["train", config, "--jobs", "2", "--queue", "debug"])
    assert "--slurm needs --jobs N" in _one_line_error(capsys, ["train", config, "--slurm"])
    assert "--detach needs --scheduler" in _one_line_error(capsys, ["train", config, "--detach"])
    assert "--n-shards 9 is more than the S = 8 columns" in _one_line_error(
        capsys, ["demo", "--S", "8", "--n-shards", "9"])
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        main(["train", config, "--slurm", "--scheduler", "tcp://127.0.0.1:1"])
    capsys.readouterr()


def test_traceback_flag_shows_the_exception(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        main(["train", str(tmp_path / "nope.toml"), "--traceback"])


# ---- result files --------------------------------------------------------------------------


def test_write_outputs_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(17)
    history = [2.5, 1.0 / 3.0, np.float64(0.125)]
    summary = {"run_id": "abc", "n": np.int64(17), "clamp": (-50.0, 50.0),
               "final": np.float32(0.5), "path": tmp_path / "x", "nested": {"arr": np.arange(3)}}
    out = tmp_path / "new" / "out"
    paths = write_outputs(out, theta, history, summary)

    assert set(paths) == {"theta", "history", "plot", "summary"}
    assert all(path.parent == out for path in paths.values())
    np.testing.assert_array_equal(np.load(paths["theta"]), theta)
    assert _history_csv(paths["history"]) == [2.5, 1.0 / 3.0, 0.125]  # exact round trip
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["plot"].stat().st_size > 1000
    assert json.loads(paths["summary"].read_text()) == {
        "run_id": "abc", "n": 17, "clamp": [-50.0, 50.0], "final": 0.5,
        "path": str(tmp_path / "x"), "nested": {"arr": [0, 1, 2]},
    }
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_write_outputs_overwrites_and_keeps_nonfinite_values(tmp_path):
    write_outputs(tmp_path, np.zeros(4), [1.0, 2.0, 3.0], {})
    paths = write_outputs(tmp_path, np.ones(4), [float("nan"), -1.0], {"loss": float("inf")})
    np.testing.assert_array_equal(np.load(paths["theta"]), np.ones(4))
    history = _history_csv(paths["history"])
    assert len(history) == 2 and math.isnan(history[0]) and history[1] == -1.0
    assert json.loads(paths["summary"].read_text())["loss"] == math.inf


@pytest.mark.parametrize(
    ("theta", "history", "summary", "error", "words"),
    [
        (np.zeros((2, 2)), [1.0], {}, ValueError, "theta must be a non-empty 1-D array"),
        (np.zeros(0), [1.0], {}, ValueError, "theta must be a non-empty 1-D array"),
        (np.arange(3), [1.0], {}, TypeError, "theta must hold floats"),
        (np.zeros(3), ["a"], {}, TypeError, "history must be a sequence of numbers"),
        (np.zeros(3), [1.0], [1], TypeError, "summary must be a mapping"),
        (np.zeros(3), [1.0], {"x": object()}, TypeError, "not JSON-able"),
    ],
)
def test_write_outputs_rejects_bad_input(tmp_path, theta, history, summary, error, words):
    with pytest.raises(error, match=words):
        write_outputs(tmp_path / "out", theta, history, summary)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_write_outputs_refuses_a_file_as_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir exists and is not a folder"):
        write_outputs(tmp_path / "file", np.zeros(2), [1.0], {})


# ---- the real subcommands, end to end ---------------------------------------------------------


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    import diagode_dist as dd

    out = tmp_path / "demo"
    result = _cli("demo", "--epochs", "2", "--n", "64", "--S", "16", "--batch-size", "8",
                  "--workers", "2", "--n-shards", "3", "--cpu", "--out", str(out))
    assert re.search(r"^dashboard: http://\S+:\d+/status$", result.stdout, re.MULTILINE), \
        result.stdout
    assert str(out) in result.stdout
    assert "training" in result.stderr  # the progress bar

    prob = dd.demo_problem(n=64, S=16, seed=0)
    theta_ref, history_ref = dd.fit(prob, np.zeros(64), epochs=2, lr=0.1, k=30, batch_size=8,
                                    seed=0)
    summary = _check_outputs(out, np.asarray(theta_ref), list(history_ref))
    assert summary["command"] == "demo" and summary["status"] == "finished"
    assert summary["n_workers"] == 2 and summary["options"]["n_shards"] == 3
    assert summary["steps"] == 4 and summary["problem"]["n"] == 64


@pytest.mark.slow
def test_train_end_to_end_on_an_embedded_cluster(tmp_path):
    arrays = _write_problem(tmp_path / "data")
    config = _write_config(tmp_path / "data", extra='[output]\ndir = "../results"\n')
    result = _cli("train", str(config), "--workers", "2", "--cpu", "--quiet", cwd=tmp_path)
    out = tmp_path / "results"
    assert str(out) in result.stdout
    theta_ref, history_ref = _fit_reference(arrays)
    summary = _check_outputs(out, theta_ref, history_ref)
    assert summary["command"] == "train" and summary["problem"]["config"] == str(config)
    assert (out / "checkpoints").is_dir()


@pytest.mark.slow
def test_train_dense_operator_with_out_flag(tmp_path):
    arrays = _write_problem(tmp_path, sparse=False)
    config = _write_config(tmp_path, a0_name="A0.npy", n_shards=2, param='"exp"', epochs=1)
    _cli("train", str(config), "--workers", "1", "--cpu", "--quiet", "--out", "elsewhere",
         cwd=tmp_path)
    theta_ref, history_ref = _fit_reference(arrays, epochs=1, param=_exp_param())
    _check_outputs(tmp_path / "elsewhere", theta_ref, history_ref)


def _exp_param():
    import diagode_dist as dd

    return dd.ExpParam()


@pytest.fixture
def scheduler_address(cluster):
    """The module's LocalCluster (2 single-thread worker processes), as a scheduler to attach to."""
    return cluster.scheduler_address


@pytest.mark.slow
def test_train_detach_status_result_on_a_running_scheduler(tmp_path, scheduler_address):
    arrays = _write_problem(tmp_path)
    config = _write_config(tmp_path)
    submitted = _cli("train", str(config), "--scheduler", scheduler_address, "--detach",
                     "--out", str(tmp_path / "ckpt-home"))
    run_id = _run_id(submitted.stdout)
    assert f"status {run_id} --scheduler {scheduler_address}" in submitted.stdout

    status = json.loads(_cli("status", run_id, "--scheduler", scheduler_address).stdout)
    assert status["run_id"] == run_id and status["status"] in ("running", "finished")
    assert status["n_steps"] == 2 * math.ceil(SMALL["S"] / SMALL_TRAIN["batch_size"])

    # a scheduler file with the same address: what `dask scheduler --scheduler-file` writes
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": scheduler_address}))
    out = tmp_path / "fetched"
    _cli("result", run_id, "--scheduler-file", str(scheduler_file), "--wait", "--quiet",
         "--out", str(out))
    theta_ref, history_ref = _fit_reference(arrays)
    summary = _check_outputs(out, theta_ref, history_ref)
    assert summary["run_id"] == run_id and summary["command"] == "result"

    status = json.loads(_cli("status", run_id, "--scheduler", scheduler_address).stdout)
    assert status["status"] == "finished" and status["step"] == status["n_steps"]
    np.testing.assert_allclose(status["history"], history_ref, rtol=1e-12)

    unknown = _cli("status", "no-such-run", "--scheduler", scheduler_address, check=False)
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "no-such-run" in unknown.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_train_on_a_running_scheduler_and_resume(tmp_path, scheduler_address):
    """One epoch in the foreground, then --resume with two: the theta of two epochs in one go."""
    arrays = _write_problem(tmp_path)
    out = tmp_path / "out"
    config = _write_config(tmp_path, epochs=1)
    first = _cli("train", str(config), "--scheduler", scheduler_address, "--quiet",
                 "--out", str(out))
    assert (out / "checkpoints" / "checkpoint.npz").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cluster"] == "external" and summary["run_id"] == _run_id(first.stdout)
    assert len(_history_csv(out / "history.csv")) == 1
    config = _write_config(tmp_path, epochs=2)
    _cli("train", str(config), "--scheduler", scheduler_address, "--quiet", "--out", str(out),
         "--resume")
    theta_ref, history_ref = _fit_reference(arrays, epochs=2)
    _check_outputs(out, theta_ref, history_ref)



@pytest.mark.slow
def test_ctrl_c_leaves_the_run_going_on_a_running_scheduler(tmp_path, scheduler_address):
    """Interrupting `train --scheduler` stops the command, not the run: its result comes later."""
    arrays = _write_problem(tmp_path)
    config = _write_config(tmp_path, epochs=10)  # 30 steps: still running when interrupted
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "diagode_dist.cli", "train", str(config), "--scheduler",
         scheduler_address, "--quiet", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        printed = []
        for line in process.stdout:  # wait until the run is submitted
            printed.append(line)
            if line.startswith("run id: "):
                break
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    run_id = _run_id("".join(printed))
    assert f"run {run_id} goes on on the scheduler" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out" / "theta.npy").exists()

    _cli("result", run_id, "--scheduler", scheduler_address, "--wait", "--quiet",
         "--out", str(tmp_path / "later"))
    theta_ref, history_ref = _fit_reference(arrays, epochs=10)
    _check_outputs(tmp_path / "later", theta_ref, history_ref)


@pytest.mark.slow
def test_ctrl_c_on_an_embedded_cluster_prints_one_line_and_no_tracebacks(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the command and its workers."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "diagode_dist.cli", "demo", "--cpu", "--workers", "2",
         "--n", "64", "--S", "16", "--batch-size", "4", "--epochs", "5000", "--log-every", "1",
         "--quiet", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        for line in process.stdout:  # wait until the run has taken a few steps
            if re.search(r"step 3/20000", line):
                break
        os.killpg(process.pid, signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, rest
    assert "Traceback" not in rest and "ERROR" not in rest, rest
    lines = [line for line in rest.splitlines() if not re.search(r": step \d+/20000", line)]
    assert len(lines) == 1 and re.fullmatch(
        r"diagode-dist: interrupted: run \w+ cancelled at step \d+", lines[0]), rest
    assert not (tmp_path / "out").exists()
