"""Faults: killed workers, stuck shards, duplicate and stale pushes, erring tasks.

Runs a real LocalCluster of worker processes (nannies restart killed workers) with
``allowed-failures = 1``, so a second worker death under the same shard task would make Dask
give up on it unless the parameter server forgives deaths between which the run progressed.
"""

from __future__ import annotations

import math
import os
import signal
import time
import urllib.request

import dask.array as da
import numpy as np
import pytest
from distributed import Client
from distributed.protocol.serialize import ToPickle

import diagode_dist as dd
from diagode_dist.optim import Adam
from diagode_dist.options import TrainOptions
from diagode_dist.service import DaskProblem, submit
from diagode_dist.service.client import _call
from diagode_dist.service.plugin import install
from diagode_dist.service.protocol import RunSpec, shard_key

TRAIN = {"epochs": 30, "lr": 2e-2, "batch_size": 8, "seed": 11}
DASK_CONFIG = {"distributed.scheduler.allowed-failures": 1}  # for the shared cluster fixture


@pytest.fixture(scope="module")
def prob():
    return dd.demo_problem(n=48, S=32, seed=3)


@pytest.fixture(scope="module")
def undisturbed(cluster, prob):
    with Client(cluster) as client:
        return submit(client, prob, np.zeros(prob.n), n_shards=3, **TRAIN).wait(timeout=120)


def _wait_for_step(run, step, timeout=60.0):
    deadline = time.monotonic() + timeout
    while (status := run.status())["step"] < step:
        assert status["status"] == "running", status["error"]
        assert time.monotonic() < deadline, f"run stuck at step {status['step']}"
        time.sleep(0.01)
    return status


def _uid(run) -> str:
    return run.status()["uid"]


def _kill_worker_running(client, key) -> int:
    """SIGKILL the worker process that is running task ``key``; returns the step count seen."""
    def where(dask_scheduler, key):
        task = dask_scheduler.tasks.get(key)
        return task.processing_on.address if task is not None and task.processing_on else None

    deadline = time.monotonic() + 30
    while (address := client.run_on_scheduler(where, key=key)) is None:
        assert time.monotonic() < deadline, f"{key} is not running anywhere"
        time.sleep(0.02)
    pid = client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
def test_sigkill_a_worker_mid_run_gives_the_same_bits(client, prob, undisturbed):
    run = submit(client, prob, np.zeros(prob.n), n_shards=3, **TRAIN)
    _wait_for_step(run, 6)
    _kill_worker_running(client, shard_key(_uid(run), 0))
    theta, history = run.wait(timeout=120)
    status = run.status()
    assert status["status"] == "finished"
    assert status["shard_restarts"][0] >= 1  # shard 0 really lost its worker
    assert np.array_equal(theta, undisturbed[0])
    assert history == undisturbed[1]


@pytest.mark.slow
def test_sigkill_the_worker_holding_dask_chunks_gives_the_same_bits(client, prob, undisturbed):
    """The chunks of a DaskProblem live on the workers: a killed worker takes its chunks with
    it, and Dask recomputes them for the rerun shard (from their graph)."""
    F = da.from_array(np.asarray(prob.F), chunks=(prob.n, math.ceil(prob.S / 3)))
    problem = DaskProblem(np.asarray(prob.A0), F, np.asarray(prob.labels), T=prob.T,
                          beta=prob.beta)
    assert len(problem.column_chunks) == 3
    reference = submit(client, problem, np.zeros(prob.n), **TRAIN).wait(timeout=120)
    run = submit(client, problem, np.zeros(prob.n), **TRAIN)
    _wait_for_step(run, 6)
    _kill_worker_running(client, shard_key(_uid(run), 0))
    theta, history = run.wait(timeout=120)
    assert run.status()["shard_restarts"][0] >= 1
    assert np.array_equal(theta, reference[0]) and history == reference[1]
    assert np.max(np.abs(theta - undisturbed[0])) <= 1e-12 * np.max(np.abs(undisturbed[0]))


@pytest.mark.slow
def test_repeated_deaths_with_progress_do_not_exhaust_allowed_failures(client, prob,
                                                                       undisturbed):
    run = submit(client, prob, np.zeros(prob.n), n_shards=3, **TRAIN)
    _wait_for_step(run, 4)
    _kill_worker_running(client, shard_key(_uid(run), 0))
    seen = _wait_for_step(run, 12)
    assert seen["shard_restarts"][0] >= 1
    _kill_worker_running(client, shard_key(_uid(run), 0))  # a 2nd death: > allowed-failures
    theta, history = run.wait(timeout=120)
    assert run.status()["shard_restarts"][0] >= 2
    assert np.array_equal(theta, undisturbed[0])
    assert history == undisturbed[1]


class StallingParam(dd.SoftplusParam):
    """Softplus whose evaluation hangs for ``delay`` seconds: a shard that never pushes."""

    def __init__(self, delay: float):
        self.delay = delay

    def diag_from_theta(self, theta):
        time.sleep(self.delay)
        return super().diag_from_theta(theta)


@pytest.mark.slow
def test_a_stuck_shard_fails_the_run_after_step_timeout(client, prob):
    started = time.monotonic()
    run = submit(client, prob, np.zeros(prob.n), param=StallingParam(4.0), n_shards=2,
                 step_timeout=1.0, **TRAIN)
    with pytest.raises(RuntimeError, match=r"step 0 did not complete within step_timeout=1 s"):
        run.wait(timeout=30)
    assert time.monotonic() - started < 3.5  # the timeout, not the 4 s stall, ended it
    assert "no push from shard(s) [0, 1]" in run.status()["error"]


def test_an_erring_shard_task_fails_the_run(client, prob):
    run = submit(client, prob, np.full(prob.n, 800.0), param=dd.ExpParam(), n_shards=2,
                 step_timeout=60, **TRAIN)
    with pytest.raises(RuntimeError, match=r"shard \d task .* failed: .*non-finite diagonal"):
        run.wait(timeout=30)


# ---- the push protocol, driven by hand (no shard tasks) -----------------------------------

TOKEN = "a-test-token-of-enough-length"


def _create(client, run_id, n=5, n_shards=2, step_timeout=60.0, **options) -> str:
    """Register a run by hand; returns its uid."""
    spec = RunSpec(run_id=run_id, n=n, S=4, n_shards=n_shards,
                   options=TrainOptions(epochs=3, lr=0.1, batch_size=2, weight_decay=0.01,
                                        step_timeout=step_timeout, **options))
    install(client)
    created = _call(client, "diagode_create_run", spec=spec.to_wire(),
                    theta0=ToPickle(np.arange(n) / n), token=TOKEN)
    assert created == {"run_id": run_id, "uid": spec.uid, "step": 0, "resumed_from_step": None}
    return spec.uid


def _wire(**changes) -> dict:
    spec = RunSpec(run_id="malformed", n=5, S=4, n_shards=2, options=TrainOptions(epochs=3))
    wire = spec.to_wire()
    options = {**wire["options"], **changes.pop("options", {})}
    return {**wire, "options": options, **changes}


def _endpoints(client) -> dict[str, int]:
    base = client.dashboard_link[: -len("/status")]
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    codes = {}
    for path in ("/diagode", "/diagode/status.json", "/metrics"):
        with direct.open(base + path, timeout=10) as response:
            codes[path] = response.status
    return codes


@pytest.mark.parametrize("spec, theta0, words", [
    (_wire(options={"epochs": "1"}), np.zeros(5), "epochs must be an integer"),
    (_wire(options={"rtol": 5.0}), np.zeros(5), "rtol must be a number in (0, 1)"),
    (_wire(options={"lr": -1.0}), np.zeros(5), "lr must be > 0"),
    (_wire(options={"surprise": 1}), np.zeros(5), "unexpected keyword argument 'surprise'"),
    (_wire(n_shards=9), np.zeros(5), "n_shards must be <= S = 4"),
    (_wire(n="5"), np.zeros(5), "n must be an int"),
    (_wire(checkpoint_dir=""), np.zeros(5), "checkpoint_dir must be a non-empty path"),
    (_wire(uid="not-hex"), np.zeros(5), "uid must be 32 lowercase hex digits"),
    (_wire(resume_override=["seed"]), np.zeros(5), "resume_override may name"),
    (_wire(run_id="bad id!"), np.zeros(5), "run_id must be"),
    ({"run_id": "malformed"}, np.zeros(5), "a run spec needs the keys"),
    ("not a dict", np.zeros(5), "a run spec must be a dict"),
    (_wire(), np.zeros(4), "theta0 must be a float array of shape (5,)"),
    (_wire(), np.full(5, np.nan), "theta0 contains NaN"),
])
def test_a_malformed_spec_sent_to_the_handler_is_refused(client, spec, theta0, words):
    install(client)
    before = [run["run_id"] for run in _call(client, "diagode_runs")]
    reply = _call(client, "diagode_create_run", spec=spec, theta0=ToPickle(theta0), token=TOKEN)
    assert "invalid run spec" in reply["error"] and words in reply["error"], reply
    after = [run["run_id"] for run in _call(client, "diagode_runs")]
    assert after == before  # nothing registered, not even half
    assert _endpoints(client) == {"/diagode": 200, "/diagode/status.json": 200, "/metrics": 200}


def _push(client, uid, step, shard, loss, grad, count, token=TOKEN):
    return _call(client, "diagode_push", uid=uid, token=token, step=step, shard=shard,
                 loss_sum=loss, grad_sum=ToPickle(np.asarray(grad, dtype=float)), count=count,
                 timings={})


def test_stale_and_duplicate_pushes_are_ignored(client):
    uid = _create(client, "by-hand")
    theta0 = np.arange(5) / 5
    g0, g1 = np.array([1.0, -2.0, 0.5, 0.0, 3.0]), np.array([0.25, 1.0, -1.0, 2.0, 0.0])
    assert _push(client, uid, 0, 0, 1.5, g0, 2)["accepted"]
    assert not _push(client, uid, 0, 0, 9.0, 10 * g0, 2)["accepted"]  # duplicate
    assert not _push(client, uid, 1, 1, 9.0, g1, 1)["accepted"]  # not this step yet
    pending = _call(client, "diagode_pull", uid=uid, want=1, timeout=0.2)
    assert pending["step"] == 0 and np.array_equal(pending["theta"], theta0)
    assert _push(client, uid, 0, 1, 0.5, g1, 1)["accepted"]  # completes step 0

    adam = Adam(lr=0.1, weight_decay=0.01)
    expected, _ = adam.step(theta0, (g0 + g1) / 3, adam.init(theta0))
    pulled = _call(client, "diagode_pull", uid=uid, want=1, timeout=5)
    assert pulled["step"] == 1 and np.array_equal(pulled["theta"], expected)
    status = _call(client, "diagode_status", run_id="by-hand")
    assert status["loss"] == (1.5 + 0.5) / 3 and status["step"] == 1
    assert not _push(client, uid, 0, 1, 0.5, g1, 1)["accepted"]  # stale: step 0 is done
    assert np.array_equal(_call(client, "diagode_result", run_id="by-hand")["theta"], expected)
    _call(client, "diagode_cancel", run_id="by-hand", token=TOKEN)


def test_pushes_and_cancels_without_the_token_are_refused(client):
    uid = _create(client, "guarded")
    for token in (None, "", "a-wrong-token-of-enough-length", TOKEN[:-1]):
        reply = _push(client, uid, 0, 0, 1.0, np.ones(5), 1, token=token)
        assert not reply["accepted"] and "token" in reply["error"], reply
        refused = _call(client, "diagode_cancel", run_id="guarded", token=token)
        assert "wrong or missing token" in refused["refused"], refused
    status = _call(client, "diagode_status", run_id="guarded")
    assert status["status"] == "running" and status["step"] == 0
    assert _push(client, uid, 0, 0, 1.0, np.ones(5), 1)["accepted"]  # the holder still can
    assert _call(client, "diagode_cancel", run_id="guarded", token=TOKEN)["status"] == "failed"


def test_malformed_pushes_are_refused_without_touching_the_run(client):
    uid = _create(client, "malformed-push")
    g = np.ones(5)

    def push(**changes):
        arguments = {"uid": uid, "token": TOKEN, "step": 0, "shard": 0, "loss_sum": 1.0,
                     "grad_sum": ToPickle(g), "count": 2, "timings": {}, **changes}
        return _call(client, "diagode_push", **arguments)

    for changes, words in [({"step": "0"}, "step must be an int"),
                           ({"shard": -1}, "shard must be an int >= 0"),
                           ({"count": 2.5}, "count must be an int"),
                           ({"loss_sum": "1"}, "loss_sum must be a number"),
                           ({"grad_sum": [1.0] * 5}, "grad_sum must be a float array"),
                           ({"timings": "fast"}, "timings must be a dict")]:
        reply = push(**changes)
        assert not reply["accepted"] and words in reply["error"], (changes, reply)
    status = _call(client, "diagode_status", run_id="malformed-push")
    assert status["status"] == "running" and status["step"] == 0
    assert push()["accepted"] and push(shard=1)["accepted"]  # the real pushes still count
    assert _call(client, "diagode_status", run_id="malformed-push")["step"] == 1
    _call(client, "diagode_cancel", run_id="malformed-push", token=TOKEN)


def test_non_finite_push_fails_the_run(client):
    uid = _create(client, "nan-push")
    reply = _push(client, uid, 0, 1, 1.0, [0.0, np.nan, 0.0, 0.0, 0.0], 1)
    assert not reply["accepted"] and reply["status"] == "failed"
    status = _call(client, "diagode_status", run_id="nan-push")
    assert "non-finite" in status["error"] and "shard 1" in status["error"]


def test_a_shard_that_never_pushes_times_out(client):
    uid = _create(client, "silent", step_timeout=0.5)
    started = time.monotonic()
    assert _push(client, uid, 0, 0, 1.0, np.ones(5), 1)["accepted"]
    status = _call(client, "diagode_wait", run_id="silent", timeout=10)
    assert status["status"] == "failed"
    assert time.monotonic() - started < 2.0
    assert "step_timeout=0.5 s: no push from shard(s) [1]" in status["error"]
    assert math.isclose(status["steps_per_s"] or 0.0, 0.0)  # no step ever completed


@pytest.mark.slow
def test_client_restart_fails_running_runs_clearly(client, prob):
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, **TRAIN)
    _wait_for_step(run, 2)
    client.restart(wait_for_workers=False)
    with pytest.raises(RuntimeError, match=r"cluster was restarted .* resume=True"):
        run.wait(timeout=30)
