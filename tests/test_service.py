"""The Dask training service on a real LocalCluster of worker processes.

Reference results come from ``dd.fit`` (single process) or from an undisturbed run of the
service itself where the claim is "the same bits" (worker count, client changes, resume).
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

import diagode_dist as dd
from diagode_dist._array import gpu_available
from diagode_dist.files import ProblemFiles
from diagode_dist.service import (
    attach,
    connect,
    fit_distributed,
    list_runs,
    submit,
)
from diagode_dist.service.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from diagode_dist.service.shard import shard_columns

TRAIN = {"epochs": 3, "lr": 2e-2, "batch_size": 8, "seed": 5}


@pytest.fixture(scope="module")
def prob():
    return dd.demo_problem(n=40, S=28, seed=2)


@pytest.fixture(scope="module")
def reference(prob):
    """dd.fit on one process: the single-process answer the service must reproduce."""
    return dd.fit(prob, np.zeros(prob.n), **TRAIN)


def _files(tmp_path, prob, sparse=False):
    import scipy.sparse as sp

    if sparse:
        sp.save_npz(tmp_path / "A0.npz", sp.csr_matrix(prob.A0))
    else:
        np.save(tmp_path / "A0.npy", prob.A0)
    np.save(tmp_path / "F.npy", prob.F)
    np.save(tmp_path / "labels.npy", np.asarray(prob.labels))
    a0 = tmp_path / ("A0.npz" if sparse else "A0.npy")
    return ProblemFiles(a0, tmp_path / "F.npy", tmp_path / "labels.npy", T=prob.T,
                        beta=prob.beta)


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---- results ----------------------------------------------------------------------------------

def test_matches_single_process_fit_with_more_shards_than_threads(client, prob, reference):
    # 4 shards on 2 one-thread workers: shard loops secede, so this cannot deadlock.
    theta_ref, history_ref = reference
    theta, history = fit_distributed(client, prob, np.zeros(prob.n), n_shards=4,
                                     step_timeout=60, **TRAIN)
    assert _relative(theta, theta_ref) <= 1e-12
    assert np.allclose(history, history_ref, rtol=1e-12, atol=0)
    assert len(history) == TRAIN["epochs"]
    assert not np.array_equal(theta, np.zeros(prob.n))  # it trained


@pytest.mark.slow
def test_same_bits_whatever_the_number_of_workers(client, prob):
    theta_two, hist_two = fit_distributed(client, prob, np.zeros(prob.n), n_shards=3, **TRAIN)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as one, Client(one) as single:
        theta_one, hist_one = fit_distributed(single, prob, np.zeros(prob.n), n_shards=3,
                                              **TRAIN)
    assert np.array_equal(theta_one, theta_two)
    assert hist_one == hist_two


@pytest.mark.slow
def test_files_give_the_same_bits_as_memory(client, prob, tmp_path):
    files = _files(tmp_path, prob, sparse=True)
    from_files = fit_distributed(client, files, np.zeros(prob.n), n_shards=2, **TRAIN)
    from_memory = fit_distributed(client, prob, np.zeros(prob.n), n_shards=2, **TRAIN)
    assert _relative(from_files[0], from_memory[0]) <= 1e-12  # sparse vs dense A0 products
    dense = _files(tmp_path, prob, sparse=False)
    assert np.array_equal(fit_distributed(client, dense, np.zeros(prob.n), n_shards=2,
                                          **TRAIN)[0], from_memory[0])


@pytest.mark.slow
def test_status_fields_and_progress(client, prob):
    seen = []
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, run_id="status-check", **TRAIN)
    assert run.run_id == "status-check"
    theta, history = run.wait(timeout=60, progress=seen.append)
    status = run.status()
    assert seen and seen[-1]["status"] == "finished"
    assert status["status"] == "finished" and status["error"] is None
    n_steps = TRAIN["epochs"] * -(-prob.S // TRAIN["batch_size"])
    assert status["step"] == status["n_steps"] == n_steps
    assert status["epoch"] == status["epochs"] == TRAIN["epochs"]
    assert status["history"] == history and status["loss"] > 0
    assert status["steps_per_s"] > 0
    assert len(status["shard_timings"]) == 2
    assert all(t["compute_s"] > 0 for t in status["shard_timings"])
    assert {t["backend"] for t in status["shard_timings"]} <= {"numpy", "cupy"}
    assert status["mean_step_s"] >= status["mean_compute_s"] > 0
    assert np.array_equal(run.result()[0], theta)
    assert "status-check" in {s["run_id"] for s in list_runs(client)}


def test_shard_activities_show_in_fine_performance_metrics(client, prob):
    fit_distributed(client, prob, np.zeros(prob.n), n_shards=2, **TRAIN)

    def shard_metrics(dask_scheduler):
        return {key[2]: value for key, value in dask_scheduler.cumulative_worker_metrics.items()
                if key[:2] == ("execute", "diagode-shard") and key[-1] == "seconds"}

    deadline = time.monotonic() + 20  # workers report them with their heartbeats
    while not {"pull-theta", "forward-adjoint", "push-gradient"} <= set(
            metrics := client.run_on_scheduler(shard_metrics)):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)
    assert metrics["forward-adjoint"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a visible CUDA GPU")
def test_shards_compute_on_the_gpu_when_workers_see_one(client, prob, reference):
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, **TRAIN)
    theta, _ = run.wait(timeout=120)
    assert {t["backend"] for t in run.status()["shard_timings"]} == {"cupy"}
    assert _relative(theta, reference[0]) <= 1e-10


def test_run_outlives_its_client_and_another_attaches(cluster, prob, reference):
    with Client(cluster) as first:
        run_id = submit(first, prob, np.zeros(prob.n), n_shards=2, **TRAIN).run_id
    # the submitting client is closed; the run goes on
    with Client(cluster) as second:
        handle = attach(second, run_id)
        theta, history = handle.wait(timeout=60)
        assert handle.status()["status"] == "finished"
        with pytest.raises(ValueError, match="no run"):
            attach(second, "no-such-run")
    assert _relative(theta, reference[0]) <= 1e-12


def test_step_errors_fail_the_run_clearly(client, prob):
    # exp(800) overflows: loss_grad_sums raises on the worker; the transition hook fails the run
    run = submit(client, prob, np.full(prob.n, 800.0), param=dd.ExpParam(), n_shards=2,
                 **TRAIN)
    with pytest.raises(RuntimeError, match="non-finite diagonal"):
        run.wait(timeout=60)
    assert run.status()["status"] == "failed"


def test_duplicate_run_id_is_refused(client, prob):
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, run_id="twice",
                 **{**TRAIN, "epochs": 20})
    with pytest.raises(ValueError, match="already running"):
        submit(client, prob, np.zeros(prob.n), n_shards=2, run_id="twice", **TRAIN)
    run.cancel()


# ---- checkpoints --------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_from_checkpoint_ends_at_the_same_bits(client, prob, tmp_path):
    options = {**TRAIN, "epochs": 10}
    theta_ref, history_ref = fit_distributed(client, prob, np.zeros(prob.n), n_shards=2,
                                             **options)
    ckpt = tmp_path / "ckpt"
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=ckpt,
                 checkpoint_every=3, **options)
    deadline = time.monotonic() + 60
    while run.status()["step"] < 7:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopped = run.cancel("interrupted by the test")
    assert stopped["status"] == "failed"
    last = stopped["step"] // 3 * 3  # checkpoints land in a thread: wait for the last one
    while run.status()["checkpoint_step"] != last:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    theta_ck, state_ck, meta = load_checkpoint(checkpoint_path(ckpt))
    assert meta["step"] == last and 6 <= last < stopped["n_steps"]
    assert state_ck["t"] == meta["step"] and meta["seed"] == options["seed"]
    resumed = submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=ckpt,
                     checkpoint_every=3, resume=True, **options)
    assert resumed.status()["resumed_from_step"] == meta["step"]
    theta, history = resumed.wait(timeout=60)
    assert np.array_equal(theta, theta_ref)
    assert history == history_ref
    final_theta, _, final_meta = load_checkpoint(checkpoint_path(ckpt))
    assert final_meta["step"] == stopped["n_steps"] and np.array_equal(final_theta, theta)


def test_resume_edge_cases(client, prob, tmp_path):
    options = {**TRAIN, "epochs": 1}
    ckpt = tmp_path / "fresh"
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=ckpt, resume=True,
                 **options)  # nothing to resume from yet: starts from theta0
    assert run.status()["resumed_from_step"] is None
    run.wait(timeout=60)
    assert load_checkpoint(checkpoint_path(ckpt))[2]["step"] == run.status()["n_steps"]
    with pytest.raises(CheckpointError, match="batch_size: checkpoint 8, this run 4"):
        submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=ckpt, resume=True,
               **{**options, "batch_size": 4})
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="checkpoint_dir: cannot create"):
        submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=tmp_path / "a-file",
               **options)


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.npz"
    theta = np.arange(5.0)
    state = {"m": np.ones(5), "v": np.full(5, 2.0), "t": 7}
    meta = {"history": [1.5], "epoch_loss_sum": 0.0, "steps_per_epoch": 4}
    save_checkpoint(path, theta, state, {"step": 7, **meta})
    loaded_theta, loaded_state, meta = load_checkpoint(path)
    assert np.array_equal(loaded_theta, theta) and loaded_state["t"] == 7
    assert np.array_equal(loaded_state["v"], state["v"]) and meta["history"] == [1.5]

    def broken_savez(handle, **arrays):
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, theta + 1, {**state, "t": 8}, {"step": 8, **meta})
    assert np.array_equal(load_checkpoint(path)[0], theta)  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temp file left


# ---- validation before any work ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_shards": 29}, ValueError, "n_shards must be <= S = 28"),
    ({"n_shards": 0}, ValueError, "n_shards must be >= 1"),
    ({"n_shards": 2.0}, TypeError, "n_shards must be an int"),
    ({"epochs": 0}, ValueError, "epochs"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"step_timeout": 0}, ValueError, "step_timeout"),
    ({"resume": True}, ValueError, "resume=True needs checkpoint_dir"),
    ({"run_id": "bad id!"}, ValueError, "run_id"),
    ({"param": object()}, TypeError, "param"),
])
def test_bad_options_raise_before_any_work(client, prob, kwargs, error, match):
    before = len(list_runs(client))
    with pytest.raises(error, match=match):
        submit(client, prob, np.zeros(prob.n), **kwargs)
    assert len(list_runs(client)) == before


@pytest.mark.parametrize("theta0, error, match", [
    (np.zeros(3), ValueError, r"theta0 must have shape \(n,\) = \(40,\)"),
    (np.full(40, np.nan), ValueError, "theta0 contains NaN"),
    (np.zeros((40, 1)), ValueError, "theta0 must have shape"),
])
def test_bad_theta0(client, prob, theta0, error, match):
    with pytest.raises(error, match=match):
        submit(client, prob, theta0, n_shards=2)


def test_bad_files_raise_before_any_work(client, prob, tmp_path):
    files = _files(tmp_path, prob)
    before = len(list_runs(client))
    os.remove(tmp_path / "labels.npy")
    with pytest.raises(FileNotFoundError, match="labels"):
        submit(client, files, np.zeros(prob.n), n_shards=2)
    np.save(tmp_path / "labels.npy", np.zeros(prob.S + 1, dtype=int))
    with pytest.raises(ValueError, match="labels must have shape"):
        submit(client, files, np.zeros(prob.n), n_shards=2)
    assert len(list_runs(client)) == before


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        connect(f"tcp://127.0.0.1:{port}", timeout=1)
    assert time.monotonic() - started < 15
    with pytest.raises(FileNotFoundError, match="scheduler_file"):
        connect(scheduler_file=tmp_path / "nope.json")
    with pytest.raises(ValueError, match="exactly one"):
        connect()


def test_connect_reaches_a_running_scheduler(cluster):
    with connect(cluster.scheduler_address, timeout=5) as client:
        assert client.scheduler_info()["workers"]


def test_preload_installs_the_parameter_server():
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0",
                      scheduler_kwargs={"preload": ["diagode_dist.service.plugin"]}) as cluster, \
            Client(cluster) as client:
        handlers = client.run_on_scheduler(
            lambda dask_scheduler: sorted(h for h in dask_scheduler.handlers
                                          if h.startswith("diagode_")))
    assert "diagode_pull" in handlers and "diagode_push" in handlers


def test_shard_columns_are_array_split():
    assert shard_columns(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_columns(3, 3) == [(0, 1), (1, 2), (2, 3)]
