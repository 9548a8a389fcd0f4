"""Where shards compute: CPU clusters hide GPUs from their workers, the files path keeps the
validated operator, RMM pools are wired to CuPy. All on the CPU."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
from distributed import Client

from diagode_dist.files import ProblemFiles
from diagode_dist.service import _gpu_options as options_module
from diagode_dist.service import cluster as cluster_module
from diagode_dist.service import shard


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
    first = shard._load_problem(SimpleNamespace(lo=0, hi=3), files, None, None)
    second = shard._load_problem(SimpleNamespace(lo=3, hi=6), files, None, None)
    assert first.A0.dtype == np.float64 and first.A0T.dtype == np.float64
    assert second.A0 is first.A0
    assert first.xp is np and first.S == 3


def test_device_turn_only_on_a_device():
    assert isinstance(shard._device_turn(np), type(shard.contextlib.nullcontext()))
