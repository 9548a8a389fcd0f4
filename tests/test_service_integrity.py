"""Integrity of the service under an operator's probes, on real worker processes.

Identity (a reused run_id never meets the old run's tasks or cached A0), the per-run token
(forged pushes and cancels from another client are refused), owned and fingerprinted
checkpoints, self-healing when a worker stalls (SIGSTOP), and bounded memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.protocol.serialize import ToPickle
from test_service_faults import StallingParam, _wait_for_step

import diagode_dist as dd
from diagode_dist.service import attach, list_runs, submit
from diagode_dist.service.checkpoint import CheckpointError, checkpoint_path, lock_owner
from diagode_dist.service.client import _call
from diagode_dist.service.protocol import shard_key

TRAIN = {"epochs": 4, "lr": 2e-2, "batch_size": 8, "seed": 7}


@pytest.fixture(scope="module")
def problems():
    """Two problems of one shape that differ only in A0 (and F)."""
    return dd.demo_problem(n=36, S=24, seed=4), dd.demo_problem(n=36, S=24, seed=5)


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---- identity -------------------------------------------------------------------------------

def test_a_reused_run_id_never_trains_on_the_previous_problem(client, problems, tmp_path):
    first, second = problems
    submit(client, first, np.zeros(first.n), n_shards=2, run_id="reused", **TRAIN).wait(60)
    with pytest.raises(ValueError, match="run_id 'reused' was used by a run that finished"):
        submit(client, second, np.zeros(second.n), n_shards=2, run_id="reused", **TRAIN)
    # resume=True on a fresh folder: the label is taken over and the run starts cleanly,
    # on the new problem's A0 (the workers cache A0 by submission uid, not by label).
    theta, history = submit(client, second, np.zeros(second.n), n_shards=2, run_id="reused",
                            checkpoint_dir=tmp_path / "fresh", resume=True, **TRAIN).wait(60)
    expected, expected_history = dd.fit(second, np.zeros(second.n), **TRAIN)
    assert _relative(theta, expected) <= 1e-12
    assert np.allclose(history, expected_history, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_immediate_resubmits_of_one_label_all_finish(client, problems, tmp_path):
    prob = problems[0]
    expected = dd.fit(prob, np.zeros(prob.n), **{**TRAIN, "epochs": 1})[0]
    for attempt in range(4):  # each right after the previous one ended
        folder = tmp_path / f"attempt-{attempt}"
        theta, _ = submit(client, prob, np.zeros(prob.n), n_shards=2, run_id="again",
                          checkpoint_dir=folder, resume=True,
                          **{**TRAIN, "epochs": 1}).wait(60)
        assert _relative(theta, expected) <= 1e-12


# ---- the per-run token ------------------------------------------------------------------------

@pytest.mark.slow
def test_forged_pushes_and_cancels_from_another_client_are_refused(cluster, client, problems):
    prob = problems[0]
    options = {**TRAIN, "epochs": 8}
    undisturbed = submit(client, prob, np.zeros(prob.n), n_shards=2, **options).wait(60)
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, **options)
    uid = run.status()["uid"]
    verdicts, stop = [], threading.Event()
    with Client(cluster) as intruder:
        def forge():  # a push for the current step, for every shard, as fast as it can
            while not stop.is_set():
                step = _call(intruder, "diagode_status", run_id=run.run_id)["step"]
                for shard in (0, 1):
                    reply = _call(intruder, "diagode_push", uid=uid, token="guessed-" * 4,
                                  step=step, shard=shard, loss_sum=1e6,
                                  grad_sum=ToPickle(np.full(prob.n, 1e3)), count=1,
                                  timings={})
                    verdicts.append(reply["accepted"])

        forger = threading.Thread(target=forge)
        forger.start()
        try:
            read_only = attach(intruder, run.run_id)
            with pytest.raises(PermissionError, match="wrong or missing token"):
                read_only.cancel("hostile")
            theta, history = run.wait(60)
        finally:
            stop.set()
            forger.join()
    assert verdicts and not any(verdicts)
    assert np.array_equal(theta, undisturbed[0]) and history == undisturbed[1]


def test_the_token_holder_can_cancel_from_another_client(cluster, client, problems):
    prob = problems[0]
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, **{**TRAIN, "epochs": 200})
    with Client(cluster) as other:
        status = attach(other, run.run_id, token=run.token).cancel("stopped by its owner")
    assert status["status"] == "failed" and status["error"] == "stopped by its owner"


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_clusters_cannot_share_a_checkpoint_dir(client, problems, tmp_path):
    prob = problems[0]
    folder = tmp_path / "shared"
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, run_id="owner",
                 checkpoint_dir=folder, checkpoint_every=1, **{**TRAIN, "epochs": 300})
    _wait_for_step(run, 2)
    assert lock_owner(folder)["run_id"] == "owner"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as other, Client(other) as second:
        for resume in (False, True):
            with pytest.raises(PermissionError, match=r"in use by run 'owner' \(uid .*pid "
                                                      f"{os.getpid()}"):
                submit(second, prob, np.zeros(prob.n), n_shards=1, checkpoint_dir=folder,
                       resume=resume, **TRAIN)
    status = run.cancel("done")
    deadline = time.monotonic() + 10
    while lock_owner(folder) is not None:  # released once the last write has landed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["step"] >= 2


def test_resume_refuses_another_problem_or_other_options(client, problems, tmp_path):
    first, second = problems
    folder = tmp_path / "ckpt"
    submit(client, first, np.zeros(first.n), n_shards=2, checkpoint_dir=folder,
           **{**TRAIN, "epochs": 1}).wait(60)
    before = len(list_runs(client))
    with pytest.raises(CheckpointError, match=r"problem\.A0\.blake2b: checkpoint '[0-9a-f]+', "
                                              r"this run '[0-9a-f]+'") as error:
        submit(client, second, np.zeros(second.n), n_shards=2, checkpoint_dir=folder,
               resume=True, **TRAIN)
    assert error.value.path == str(checkpoint_path(folder))
    with pytest.raises(CheckpointError) as error:
        submit(client, first, np.zeros(first.n), n_shards=3, checkpoint_dir=folder,
               resume=True, **{**TRAIN, "lr": 0.5, "weight_decay": 0.1, "seed": 8, "k": 12})
    for words in ("n_shards: checkpoint 2, this run 3", "lr: checkpoint 0.02, this run 0.5",
                  "weight_decay: checkpoint 0.0, this run 0.1", "seed: checkpoint 7, this run 8",
                  "k: checkpoint 30, this run 12", "resume_override"):
        assert words in str(error.value)
    with pytest.raises(CheckpointError, match="param: checkpoint 'softplus', this run 'exp'"):
        submit(client, first, np.zeros(first.n), n_shards=2, checkpoint_dir=folder,
               resume=True, param="exp", **TRAIN)
    assert len(list_runs(client)) == before  # nothing registered
    # An explicit override of lr is fine; more epochs are fine.
    run = submit(client, first, np.zeros(first.n), n_shards=2, checkpoint_dir=folder,
                 resume=True, resume_override=["lr"], **{**TRAIN, "lr": 0.01})
    assert run.status()["resumed_from_step"] == 3
    run.wait(60)


def _corrupt(folder, how):
    """Replace the folder's checkpoint by a broken one."""
    path = checkpoint_path(folder)
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "pickled":
        np.savez(path, theta=np.array([object()] * 36, dtype=object), meta=np.zeros(3))
    else:
        with np.load(path) as members:
            arrays = {name: members[name] for name in members.files}
        meta = json.loads(arrays["meta"].tobytes().decode())
        if how == "no step":
            del meta["step"]
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        if how == "nan theta":
            arrays["theta"] = np.full_like(arrays["theta"], np.nan)
        if how == "short theta":
            arrays["theta"], arrays["opt.m"], arrays["opt.v"] = (
                arrays[name][:-1] for name in ("theta", "opt.m", "opt.v"))
        with open(path, "wb") as stream:
            np.savez(stream, **arrays)


@pytest.mark.parametrize("how, words", [
    ("truncated", "unreadable"), ("garbage", "unreadable"), ("empty", "unreadable"),
    ("pickled", "unreadable"), ("no step", "no 'step'"), ("nan theta", "theta contains NaN"),
    ("short theta", r"theta has shape \(35,\), this run's theta0 \(36,\)"),
])
def test_every_corrupt_checkpoint_is_one_error_naming_the_file(client, problems, tmp_path, how,
                                                               words):
    prob = problems[0]
    folder = tmp_path / how.replace(" ", "-")
    submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=folder,
           **{**TRAIN, "epochs": 1}).wait(60)
    _corrupt(folder, how)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=words) as error:
        submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=folder, resume=True,
               **TRAIN)
    assert str(checkpoint_path(folder)) in str(error.value)
    assert time.monotonic() - started < 10  # refused at once, not by a shard steps later
    assert lock_owner(folder) is None  # a refused run does not keep the folder


def test_stale_temporaries_are_removed_and_bad_paths_refused(client, problems, tmp_path,
                                                             monkeypatch):
    prob = problems[0]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    stale = folder / ".checkpoint.npz.0123456789ab.tmp"  # a writer killed mid-save
    stale.write_bytes(b"\0" * 1000)
    submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=folder,
           **{**TRAIN, "epochs": 1}).wait(60)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.npz"]  # lock released too
    with pytest.raises(ValueError, match="checkpoint_dir must be a non-empty path"):
        submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir="", **TRAIN)
    monkeypatch.chdir(tmp_path)  # this test's scheduler runs in this process: same cwd
    submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir="relative",
           **{**TRAIN, "epochs": 1}).wait(60)
    assert (tmp_path / "relative" / "checkpoint.npz").is_file()


def test_a_checkpoint_of_the_same_run_id_is_not_overwritten_without_resume(client, problems,
                                                                          tmp_path):
    prob = problems[0]
    folder = tmp_path / "mine"
    submit(client, prob, np.zeros(prob.n), n_shards=2, run_id="keeper", checkpoint_dir=folder,
           **{**TRAIN, "epochs": 1}).wait(60)
    written = checkpoint_path(folder).read_bytes()
    # Another scheduler (no record of "keeper"): the checkpoint itself says whose it is.
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as other, \
            Client(other) as second:
        with pytest.raises(ValueError, match="was written by a run named 'keeper': pass "
                                             "resume=True"):
            submit(second, prob, np.zeros(prob.n), n_shards=1, run_id="keeper",
                   checkpoint_dir=folder, **TRAIN)
    assert checkpoint_path(folder).read_bytes() == written
    assert lock_owner(folder) is None


# ---- status pages -----------------------------------------------------------------------------

def _get(client, path):
    base = client.dashboard_link[: -len("/status")]
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(base + path, timeout=10) as response:
        return response.read().decode()


def test_status_json_hides_paths_and_addresses_unless_asked(client, problems, tmp_path):
    prob = problems[0]
    folder = tmp_path / "hidden-folder"
    run = submit(client, prob, np.zeros(prob.n), n_shards=2, checkpoint_dir=folder,
                 **{**TRAIN, "epochs": 1})
    run.wait(60)
    workers = list(client.scheduler_info()["workers"])
    for path in ("/diagode/status.json", "/diagode"):
        text = _get(client, path)
        assert str(tmp_path) not in text and "hidden-folder" in text
        assert not any(address in text for address in workers)
    with dask.config.set({"diagode.service.expose-paths": True}):  # the scheduler is in-process
        text = _get(client, "/diagode/status.json")
    assert str(folder) in text and any(address in text for address in workers)
    assert run.status()["checkpoint"] == str(checkpoint_path(folder))  # clients see it all


# ---- memory -----------------------------------------------------------------------------------

def test_ended_runs_are_kept_within_a_memory_budget(client, problems):
    prob = problems[0]
    ids = []
    with dask.config.set({"diagode.service.ended-runs-memory": "1KiB"}):
        for _ in range(4):
            run = submit(client, prob, np.zeros(prob.n), n_shards=1, **{**TRAIN, "epochs": 1})
            run.wait(60)
            ids.append(run.run_id)
        held = {status["run_id"] for status in list_runs(client)}
    assert ids[-1] in held and ids[0] not in held  # the newest kept, the oldest dropped

    def adam_states(dask_scheduler):
        server = dask_scheduler.plugins["diagode-parameter-server"]
        return [run.opt_state is None for run in server.by_uid.values()
                if run.status != "running"]

    assert all(client.run_on_scheduler(adam_states))


def _longest_metrics_ledger() -> int:
    """Entries in the largest of Dask's per-task metrics ledgers of this worker process."""
    import gc

    from distributed.metrics import DelayedMetricsLedger

    return max([len(o.metrics) for o in gc.get_objects()
                if isinstance(o, DelayedMetricsLedger)], default=0)


def test_a_long_shard_task_keeps_no_per_step_metrics(client):
    """Dask's metrics ledger of a running task keeps every value metered inside it (the
    shard loop's activities and its RPCs' serialisation): it must not grow with the steps,
    or worker memory grows without bound over a long run (the soak benchmark measures RSS)."""
    import scipy.sparse as sp

    n = 200
    prob = dd.Problem(sp.csr_matrix((n, n)), np.random.default_rng(0).standard_normal((n, 2)),
                      np.array([0, 1]), T=1.0)
    run = submit(client, prob, np.zeros(n), n_shards=2, batch_size=2, k=8, lr=1e-3,
                 epochs=10_000)
    _wait_for_step(run, 20, timeout=120)
    early = client.run(_longest_metrics_ledger)
    _wait_for_step(run, 220, timeout=300)
    late = client.run(_longest_metrics_ledger)
    run.cancel("measured")
    growth = max(late[w] - early[w] for w in early)
    assert growth <= 4, f"a shard task's metrics ledger grew by {growth} entries in 200 steps"


# ---- stalls -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_stopped_worker_is_replaced_and_the_run_ends_with_the_same_bits(problems):
    """SIGSTOP the worker of shard 0: the server removes it after stall_timeout, its nanny
    restarts it, Dask reruns the shard elsewhere, and theta is the undisturbed one."""
    prob = problems[0]
    options = {**TRAIN, "epochs": 20}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        undisturbed = submit(client, prob, np.zeros(prob.n), n_shards=2, **options).wait(120)
        run = submit(client, prob, np.zeros(prob.n), n_shards=2, stall_timeout=2.0, **options)
        _wait_for_step(run, 5)
        key = shard_key(run.status()["uid"], 0)
        address = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.tasks[key].processing_on.address)
        pid = client.run(os.getpid, workers=[address])[address]
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            theta, history = run.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):  # its nanny has killed it
                os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - started < 60  # not Dask's 300 s worker timeout
        assert np.array_equal(theta, undisturbed[0]) and history == undisturbed[1]
        assert run.status()["shard_restarts"][0] >= 1
        # The cluster heals: a new run (any label) finishes on the replaced worker too.
        client.wait_for_workers(2, timeout=60)
        again = submit(client, prob, np.zeros(prob.n), n_shards=2, **options).wait(120)
        assert np.array_equal(again[0], undisturbed[0])


def test_when_every_worker_is_slow_none_is_removed(client, problems):
    """Stalls on all workers at once are not one bad worker: removing them all would lose
    the cluster, so the run just goes on (and step_timeout stays the limit)."""
    prob = problems[0]
    run = submit(client, prob, np.zeros(prob.n), param=StallingParam(1.0), n_shards=2,
                 stall_timeout=0.3, **{**TRAIN, "epochs": 1})
    theta, _ = run.wait(60)
    assert run.status()["shard_restarts"] == [0, 0]
    assert len(client.scheduler_info()["workers"]) == 2
    expected = dd.fit(prob, np.zeros(prob.n), **{**TRAIN, "epochs": 1})[0]
    assert _relative(theta, expected) <= 1e-12


def test_training_workers_stop_the_sampling_profiler(client, problems):
    """The profiler's per-second call trees of the never-ending shard task grew worker memory
    ~7 MB per 1000 steps; a run turns it off on its workers."""
    prob = problems[0]
    submit(client, prob, np.zeros(prob.n), n_shards=2, **{**TRAIN, "epochs": 1}).wait(60)
    running = client.run(lambda dask_worker: sorted(
        name for name in dask_worker.periodic_callbacks if name.startswith("profile")))
    assert running and all(names == [] for names in running.values()), running
