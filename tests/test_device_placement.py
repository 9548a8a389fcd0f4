"""Where shards compute: the device each shard is given at submission, the memory budget
shared by the shards computing at once on one device, CPU clusters that hide GPUs from their
workers, the files path that keeps the validated operator, RMM pools wired to CuPy. All on
the CPU."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
from distributed import Client

import diagode_dist as dd
from diagode_dist import adjoint
from diagode_dist.files import ProblemFiles
from diagode_dist.options import TrainOptions
from diagode_dist.service import _gpu_options as options_module
from diagode_dist.service import cluster as cluster_module
from diagode_dist.service import shard, submit
from diagode_dist.service._gpu_options import plan_devices, resolve_device
from diagode_dist.service.protocol import RunSpec, ShardSpec


def test_cpu_cluster_workers_see_no_gpu():
    """A plain LocalCluster's workers would all take GPU 0 (shards use a GPU whenever their
    process sees one): the CPU fallback starts them with CUDA_VISIBLE_DEVICES=""."""
    with cluster_module.local_cluster(n_workers=1, gpu=False, dashboard_address=None) as cl, \
            Client(cl) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert list(seen.values()) == [""]


def test_cpu_worker_env_keeps_user_env_and_threads():
    kwargs = options_module.cpu_worker_env({"env": {"A": "1"}, "n_workers": 2})
    assert kwargs["env"] == {"A": "1", "CUDA_VISIBLE_DEVICES": ""}
    threads = {"processes": False}
    assert options_module.cpu_worker_env(threads) == threads


def test_rmm_pool_is_wired_to_cupy_or_refused(monkeypatch):
    assert options_module.pool_size("0.8") == 0.8  # parse_bytes("0.8") would be 0 bytes
    assert options_module.pool_size("24GB") == "24GB"
    with pytest.raises(ValueError, match="fraction of device memory"):
        options_module.pool_size("3")
    monkeypatch.setattr(options_module.importlib.util, "find_spec",
                        lambda name: None if name == "rmm" else object())
    with pytest.raises(ImportError, match="rmm_pool_size='24GB' needs RMM"):
        options_module.rmm_options("24GB")
    monkeypatch.setattr(options_module.importlib.util, "find_spec", lambda name: object())
    assert options_module.rmm_options(0.5) == {
        "rmm_pool_size": 0.5, "rmm_allocator_external_lib_list": ["cupy"]}


def _integer_files(tmp_path, n=12, S=6):
    rng = np.random.default_rng(3)
    A0 = sp.random(n, n, density=0.3, random_state=4, format="csr")
    A0.data = rng.integers(-3, 4, A0.nnz).astype(np.int64)
    sp.save_npz(tmp_path / "A0.npz", A0)
    np.save(tmp_path / "F.npy", rng.standard_normal((n, S)))
    np.save(tmp_path / "labels.npy", rng.integers(0, n, S))
    return ProblemFiles(tmp_path / "A0.npz", tmp_path / "F.npy", tmp_path / "labels.npy", T=1.0)


def test_files_path_keeps_the_validated_cast_operator(tmp_path, monkeypatch):
    """An integer A0 file: every shard of a worker gets the one validated float64 operator
    (the raw integer matrix was attached before, cast on every product, and on a GPU cupyx
    refuses it)."""
    monkeypatch.setattr(shard, "_operators", type(shard._operators)())
    files = _integer_files(tmp_path)
    first = shard._load_problem(SimpleNamespace(lo=0, hi=3, device="cpu"), files, None, None)
    second = shard._load_problem(SimpleNamespace(lo=3, hi=6, device="cpu"), files, None, None)
    assert first.A0.dtype == np.float64 and first.A0T.dtype == np.float64
    assert second.A0 is first.A0
    assert first.xp is np and first.S == 3


def test_device_turn_only_on_a_device():
    assert isinstance(shard._device_turn(np), type(shard.contextlib.nullcontext()))


# ---- the device of each shard ------------------------------------------------------------------

def _spec(**kwargs):
    run = RunSpec(run_id="r", n=4, S=4, n_shards=2, options=TrainOptions())
    return ShardSpec(run=run, shard=0, lo=0, hi=2, **kwargs)


def test_shard_spec_device_is_checked():
    assert _spec().device == "cpu" and _spec().device_shares == 1
    assert _spec(device="gpu").device == "gpu"
    assert _spec(device="gpu:3", device_shares=2).device == "gpu:3"
    for bad in ("GPU", "gpu:", "gpu:-1", "gpu:01", "cuda:0", "", None, 0):
        with pytest.raises(ValueError, match="device must be 'cpu', 'gpu' or 'gpu:<i>'"):
            _spec(device=bad)
    with pytest.raises(ValueError, match="device_shares must be >= 1"):
        _spec(device_shares=0)
    with pytest.raises(TypeError, match="device_shares must be an int"):
        _spec(device_shares=1.5)


def test_resolve_device_uses_exactly_the_planned_device():
    """"cpu" stays on the CPU even where GPUs are visible; a GPU the process does not see is
    an error naming the device, never another device."""
    assert resolve_device("cpu", 0) is None and resolve_device("cpu", 4) is None
    assert resolve_device("gpu", 1) == 0 and resolve_device("gpu:2", 4) == 2
    with pytest.raises(RuntimeError, match="planned for device 'gpu'.*sees 0 GPU"):
        resolve_device("gpu", 0)
    with pytest.raises(RuntimeError, match="planned for device 'gpu:2'.*sees 2 GPU"):
        resolve_device("gpu:2", 2)


def _workers(*gpus_per_worker, hosts=None):
    """{address: worker_devices()} for workers that see the given GPU ids."""
    hosts = hosts or ["h"] * len(gpus_per_worker)
    return {f"tcp://w{i}": {"host": host, "gpus": list(gpus)}
            for i, (host, gpus) in enumerate(zip(hosts, gpus_per_worker, strict=True))}


def test_plan_devices_cpu_clusters():
    """A CPU cluster: every shard on "cpu", sharing its host's budget with the shards placed
    on the same host (they all compute at once)."""
    assert plan_devices(_workers([], []), 3) == [("cpu", 3)] * 3
    two_hosts = _workers([], [], [], hosts=["a", "b", "a"])  # w0, w2 on a; w1 on b
    assert plan_devices(two_hosts, 4) == [("cpu", 3), ("cpu", 1), ("cpu", 3), ("cpu", 3)]
    mixed = _workers(["h/0"], [])  # a shard may move anywhere: all of them on the CPU
    assert plan_devices(mixed, 2) == [("cpu", 2)] * 2
    with pytest.raises(ValueError, match="no workers yet"):
        plan_devices({}, 2)


def test_plan_devices_gpu_clusters():
    # dask-cuda: one worker per GPU, each sees its own first: shards never share a device
    assert plan_devices(_workers(["h/0", "h/1"], ["h/1", "h/0"]), 4) == [("gpu", 1)] * 4
    # two worker processes of a plain LocalCluster on a one-GPU machine: they share GPU 0
    assert plan_devices(_workers(["h/0"], ["h/0"]), 3) == [("gpu", 2)] * 3
    # one worker process that sees two GPUs: its shards spread over them
    assert plan_devices(_workers(["h/0", "h/1"]), 3) == [("gpu:0", 1), ("gpu:1", 1),
                                                         ("gpu:0", 1)]
    # two plain worker processes that both see two GPUs: they start on different ones
    assert plan_devices(_workers(["h/0", "h/1"], ["h/0", "h/1"]), 4) == [
        ("gpu:0", 2), ("gpu:1", 2), ("gpu:1", 2), ("gpu:0", 2)]
    # only ordinals every worker has (and the one-GPU worker has its own)
    assert plan_devices(_workers(["h/0", "h/1"], ["g/0"], hosts=["h", "g"]), 2) == [
        ("gpu", 1), ("gpu", 1)]
    assert plan_devices(_workers(["h/0", "h/1"], ["h/0"]), 2) == [("gpu", 2), ("gpu", 2)]


def test_memory_share_divides_the_budget_also_in_chunk_threads(monkeypatch):
    assert adjoint.budget_share(10 << 30, 4) == 10 << 28 and adjoint.budget_share(7, 2) == 3
    monkeypatch.setattr(adjoint, "_BUDGETS", {("numpy", -1): 1 << 30})
    assert adjoint.memory_budget(np) == 1 << 30
    with adjoint.memory_share(4):
        assert adjoint.memory_budget(np) == 1 << 28
        assert adjoint._default_chunk(dd.demo_problem(n=8, S=2), 30) > 0
    assert adjoint.memory_budget(np) == 1 << 30
    with pytest.raises(ValueError, match="shares must be >= 1"), adjoint.memory_share(0):
        pass
    seen = []
    original = adjoint._chunk_loss_grad

    def recording(*args, **kwargs):
        seen.append(adjoint.memory_budget(np))
        return original(*args, **kwargs)

    monkeypatch.setattr(adjoint, "_chunk_loss_grad", recording)
    monkeypatch.setattr(adjoint, "_PARALLEL_WORK", 1)  # chunks on a thread pool
    monkeypatch.setattr(adjoint.os, "cpu_count", lambda: 2)
    prob = dd.demo_problem(n=16, S=4)
    with adjoint.memory_share(8):
        dd.loss_and_grad(prob, np.zeros(prob.n), max_chunk_columns=1)
    assert seen == [1 << 27] * 4


def test_cpu_cluster_shards_report_cpu():
    """A plain LocalCluster of worker processes (no GPU here): each shard says where it
    computed, and the run gives dd.fit's answer."""
    from distributed import LocalCluster

    prob = dd.demo_problem(n=24, S=8, seed=1)
    options = dict(epochs=1, lr=0.05, batch_size=8, seed=0)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cl, \
            Client(cl) as client:
        assert plan_devices(options_module.cluster_devices(client), 2) == [("cpu", 2)] * 2
        run = submit(client, prob, np.zeros(prob.n), n_shards=2, **options)
        theta, _ = run.wait(timeout=120)
        timings = run.status()["shard_timings"]
    assert [t["device"] for t in timings] == ["cpu", "cpu"]
    assert {t["backend"] for t in timings} == {"numpy"}
    theta_ref, _ = dd.fit(prob, np.zeros(prob.n), **options)
    assert np.max(np.abs(theta - theta_ref)) <= 1e-10 * np.max(np.abs(theta_ref))
