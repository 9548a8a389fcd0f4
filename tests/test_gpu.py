"""The same numerics on CuPy arrays (dense and cupyx CSR) against the exact dense reference.

Skipped, with the reason, where CuPy is not installed or no CUDA device is visible.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense, random_arrays

from diagode_dist.reference import reference_loss_and_grad, relative_error

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (the gpu extra)")


def _device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, no device
        return 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_device_count() == 0, reason="CuPy imports but no CUDA device is visible"),
]

import cupyx.scipy.sparse  # noqa: E402

import diagode_dist as dd  # noqa: E402

T, BETA = 2.0, 10.0


def _param(name):
    return {"softplus": dd.SoftplusParam, "exp": dd.ExpParam}[name]()


def _on_gpu(A0, F, labels, theta):
    A0_gpu = (cupyx.scipy.sparse.csr_matrix(A0) if hasattr(A0, "tocsr")
              else cupy.asarray(A0))
    prob = dd.Problem(A0_gpu, cupy.asarray(F), labels, T=T, beta=BETA)
    return prob, cupy.asarray(theta)


def _check(A0, F, labels, theta, param_name, columns=None, grad_rtol=1e-8, **kwargs):
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    assert prob.xp is cupy
    loss, grad = dd.loss_and_grad(prob, theta_gpu, param=_param(param_name), columns=columns,
                                  **kwargs)
    assert type(loss) is float
    assert isinstance(grad, cupy.ndarray) and grad.shape == theta.shape
    ref_loss, ref_grad = reference_loss_and_grad(dense(A0), F, labels, T, BETA, theta,
                                                 param_name, columns=columns)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (loss, ref_loss)
    err = relative_error(cupy.asnumpy(grad), ref_grad)
    assert err <= grad_rtol, f"gradient relative error {err:.3e}"
    return loss, cupy.asnumpy(grad)


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("columns", [None, [4, 1, 2]], ids=["all", "subset"])
def test_small_problem_default_settings(param_name, sparse, columns):
    A0, F, labels, theta = random_arrays(10, 6, scale=0.3, seed=11, sparse=sparse)
    _check(A0, F, labels, theta, param_name, columns=columns)


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_k_equal_n_is_exact(param_name, sparse):
    A0, F, labels, theta = random_arrays(10, 6, scale=0.3, seed=12, sparse=sparse)
    _check(A0, F, labels, theta, param_name, k=10, grad_rtol=1e-11)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_larger_than_k_matches_reference_and_cpu(sparse):
    A0, F, labels, theta = random_arrays(64, 12, scale=0.05, seed=13, sparse=sparse)
    loss_gpu, grad_gpu = _check(A0, F, labels, theta, "softplus")
    cpu = dd.Problem(A0, F, labels, T=T, beta=BETA)
    loss_cpu, grad_cpu = dd.loss_and_grad(cpu, theta)
    assert abs(loss_gpu - loss_cpu) <= 1e-13 * abs(loss_cpu)
    assert relative_error(grad_gpu, grad_cpu) <= 1e-12


def test_breakdown_columns_on_gpu():
    """A0 = 0 with two diagonal values, and a zero forcing column: exact, nothing dropped."""
    n, S = 40, 6
    _, F, labels, _ = random_arrays(n, S, seed=22)
    F[:, 3] = 0.0
    theta = np.where(np.arange(n) % 2 == 0, 0.3, -0.4)
    loss, _ = _check(np.zeros((n, n)), F, labels, theta, "softplus", grad_rtol=1e-11)
    prob, theta_gpu = _on_gpu(np.zeros((n, n)), F, labels, theta)
    per_column = [dd.loss_and_grad(prob, theta_gpu, columns=[j])[0] for j in range(S)]
    assert abs(loss - np.mean(per_column)) <= 1e-13 * abs(loss)


def test_chunking_and_repeatability_on_gpu():
    A0, F, labels, theta = random_arrays(48, 7, scale=0.05, seed=31)
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    results = {c: dd.loss_and_grad(prob, theta_gpu, max_chunk_columns=c) for c in (1, 3, 7)}
    for c in (1, 3):
        assert abs(results[c][0] - results[7][0]) <= 1e-13 * abs(results[7][0])
        assert relative_error(cupy.asnumpy(results[c][1]), cupy.asnumpy(results[7][1])) <= 1e-13
    again = dd.loss_and_grad(prob, theta_gpu, max_chunk_columns=3)
    assert again[0] == results[3][0]
    assert bool((again[1] == results[3][1]).all())


def test_fit_on_gpu_matches_cpu():
    A0, F, labels, theta = random_arrays(16, 10, scale=0.1, seed=51)
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    kw = dict(epochs=2, lr=0.05, batch_size=4, seed=0)
    theta_g, hist_g = dd.fit(prob, theta_gpu, **kw)
    theta_c, hist_c = dd.fit(dd.Problem(A0, F, labels, T=T, beta=BETA), theta, **kw)
    np.testing.assert_allclose(cupy.asnumpy(theta_g), theta_c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist_g, hist_c, rtol=1e-12)


# ---- GPU readiness: memory, layout, placement ------------------------------------------------

def _peak_pool_bytes(fn):
    """(peak bytes the CuPy pool handed out while fn ran, beyond those in use before, result)."""

    class Peak(cupy.cuda.MemoryHook):
        name = "diagode_test_peak"

        def __init__(self):
            self.current = self.peak = 0

        def malloc_postprocess(self, device_id=None, size=None, mem_size=0, mem_ptr=None,
                               pmem_id=None, **_):
            self.current += int(mem_size)
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, device_id=None, mem_size=0, mem_ptr=None, pmem_id=None, **_):
            self.current -= int(mem_size)

    cupy.cuda.Device().synchronize()
    with Peak() as hook:
        out = fn()
        cupy.cuda.Device().synchronize()
    return hook.peak, out


def test_cgs2_and_contraction_copy_no_basis_on_gpu():
    """CuPy's matmul copies non-contiguous operands of ndim > 2: the projections must read a
    slice of the basis where it lies (strided-batched GEMM), so a CGS2 step allocates a few
    state vectors, not m c N."""
    from diagode_dist import _march, krylov

    m, c, N = 16, 8, 200_000
    full = cupy.random.standard_normal((m + 1, c, N))
    w = cupy.random.standard_normal((c, N))
    vector = 8 * c * N
    peak, (h, w2) = _peak_pool_bytes(lambda: krylov._cgs2(full[:m], w))
    assert peak <= 6 * vector, peak / vector
    ref = cupy.einsum("mcn,cn->cm", full[:m], w)
    assert float(cupy.abs(krylov.project(full[:m, :, :-1], w[:, :-1])
                          - cupy.einsum("mcn,cn->cm", full[:m, :, :-1], w[:, :-1])).max()) < 1e-8
    assert h.shape == ref.shape
    M = cupy.random.standard_normal((c, m, 4))
    peak, grad = _peak_pool_bytes(lambda: _march._contract(full[:m, :, :-1], M, full[:4, :, :-1]))
    assert peak <= 1.2 * 4 * vector, peak / vector
    WM = cupy.einsum("cab,acn->cbn", M, full[:m, :, :-1])
    expect = (WM * full[:4, :, :-1].transpose(1, 0, 2)).sum(axis=(0, 1))
    assert float(cupy.abs(grad - expect).max()) <= 1e-9 * float(cupy.abs(expect).max())


def test_lanczos_on_gpu_matches_reference():
    A0, F, labels, theta = random_arrays(40, 5, scale=0.1, seed=41, symmetric=True)
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    assert prob.symmetric
    _check(A0, F, labels, theta, "softplus", grad_rtol=1e-8)


def test_mse_many_observation_times_on_gpu_within_kept_budget(monkeypatch):
    """40 observation times: bases kept within their budget (pool bytes vs counted), and the
    result equals the one with every basis rebuilt."""
    from diagode_dist import adjoint

    n, S, times = 2000, 4, 40
    rng = np.random.default_rng(42)
    A0, F, _, theta = random_arrays(n, S, scale=0.5 / np.sqrt(n), seed=42, sparse=True,
                                    density=0.01)
    obs = np.linspace(2.0 / times, 2.0, times)
    targets = rng.standard_normal((times, n, S))
    prob = dd.Problem(cupyx.scipy.sparse.csr_matrix(A0), cupy.asarray(F), T=2.0,
                      obs_times=obs, targets=cupy.asarray(targets), loss="mse")
    theta_gpu = cupy.asarray(theta)
    budget = 2 * 6 * 31 * S * (n + 1) * 8
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: budget)
    peak, (loss, grad) = _peak_pool_bytes(
        lambda: dd.loss_and_grad(prob, theta_gpu, k=30, max_chunk_columns=S))
    assert peak <= budget // 2 + adjoint.predict_chunk_bytes(n, S, 30) + 2 * targets.nbytes, peak
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: 0)
    loss0, grad0 = dd.loss_and_grad(prob, theta_gpu, k=30, max_chunk_columns=S)
    assert loss == loss0 and bool((grad == grad0).all())


def test_float32_peak_within_prediction_on_gpu(monkeypatch):
    from diagode_dist import adjoint

    n, k, c = 4096, 30, 8
    A0, F, labels, theta = random_arrays(n, c, scale=0.5 / np.sqrt(n), seed=43, sparse=True,
                                         density=0.005)
    prob = dd.Problem(cupyx.scipy.sparse.csr_matrix(A0.astype(np.float32)),
                      cupy.asarray(F, dtype=cupy.float32), labels, T=20.0)
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: 0)
    peak, (_, grad) = _peak_pool_bytes(lambda: dd.loss_and_grad(
        prob, cupy.asarray(theta, dtype=cupy.float32), k=k, rtol=1e-3, max_chunk_columns=c))
    assert grad.dtype == cupy.float32
    assert peak <= adjoint.predict_chunk_bytes(n, c, k, itemsize=4), peak


def test_budget_and_chunks_stable_across_calls_on_gpu():
    """The pool keeps the first call's blocks; the second call must see the same budget, the
    same chunks and give the same floats."""
    from diagode_dist import adjoint

    A0, F, labels, theta = random_arrays(3000, 16, scale=0.5 / np.sqrt(3000), seed=44,
                                         sparse=True, density=0.005)
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    before = (adjoint.memory_budget(cupy), adjoint._default_chunk(prob, 30))
    first = dd.loss_and_grad(prob, theta_gpu)
    assert cupy.get_default_memory_pool().free_bytes() > 0  # the pool kept blocks
    assert (adjoint.memory_budget(cupy), adjoint._default_chunk(prob, 30)) == before
    available = adjoint._device_available_bytes(cupy)
    second = dd.loss_and_grad(prob, theta_gpu)
    assert abs(adjoint._device_available_bytes(cupy) - available) <= 0.05 * available
    assert first[0] == second[0] and bool((first[1] == second[1]).all())


def test_files_path_with_an_integer_operator_on_gpu(tmp_path):
    """A shard of a ProblemFiles with an integer .npz A0 loads onto the GPU (cupyx refuses an
    integer CSR) with the validated float64 operator."""
    import scipy.sparse as sp

    from diagode_dist.service import shard

    n, S = 30, 6
    rng = np.random.default_rng(45)
    A0 = sp.random(n, n, density=0.2, random_state=45, format="csr")
    A0.data = rng.integers(-2, 3, A0.nnz).astype(np.int64)
    sp.save_npz(tmp_path / "A0.npz", A0)
    F = rng.standard_normal((n, S))
    labels = rng.integers(0, n, S)
    np.save(tmp_path / "F.npy", F)
    np.save(tmp_path / "labels.npy", labels)
    files = dd.ProblemFiles(tmp_path / "A0.npz", tmp_path / "F.npy", tmp_path / "labels.npy",
                            T=T, beta=BETA)
    from types import SimpleNamespace

    prob = shard._load_problem(SimpleNamespace(lo=0, hi=S), files, None, None)
    assert prob.xp is cupy and prob.A0.dtype == cupy.float64
    theta = 0.1 * rng.standard_normal(n)
    loss, grad = dd.loss_and_grad(prob, cupy.asarray(theta))
    ref_loss, ref_grad = reference_loss_and_grad(A0.toarray().astype(float), F, labels, T, BETA,
                                                 theta, "softplus")
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert relative_error(cupy.asnumpy(grad), ref_grad) <= 1e-8


def test_two_shards_on_one_gpu_take_turns():
    """Two shards of one worker process on one GPU: they compute in turn (each with the whole
    budget), and a run with two shards gives the one-shard result."""
    from distributed import Client, LocalCluster

    prob = dd.demo_problem(n=64, S=16)
    options = dict(epochs=2, lr=0.05, batch_size=16, seed=0)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        theta2, _ = dd.fit_distributed(client, prob, np.zeros(prob.n), n_shards=2, **options)
    theta_ref, _ = dd.fit(prob, np.zeros(prob.n), **options)
    assert relative_error(np.asarray(theta2), theta_ref) <= 1e-10


def test_solve_stack_beyond_256_on_gpu_without_the_host_loop(monkeypatch):
    """Krylov dimension 300: the Padé solves are one batched LU (CuPy's own solve would loop
    over the stack on the host above 256)."""
    import scipy.linalg

    from diagode_dist import _array, krylov

    def host_loop(*args, **kwargs):
        raise AssertionError("cupy.linalg.solve called: a host loop above 256")

    monkeypatch.setattr(cupy.linalg, "solve", host_loop)
    rng = np.random.default_rng(46)
    a = rng.standard_normal((3, 300, 300)) + 30 * np.eye(300)
    b = rng.standard_normal((3, 300, 2))
    x = _array.solve_stack(cupy.asarray(a), cupy.asarray(b))
    np.testing.assert_allclose(cupy.asnumpy(x), np.linalg.solve(a, b), rtol=1e-12)
    m, c = 300, 2
    H = np.triu(rng.standard_normal((c, m, m)) / np.sqrt(m), -1)
    y, _ = krylov.exp_and_error(cupy.asarray(H), cupy.zeros(c), cupy.ones(c),
                                cupy.asarray([0.5, 1.5]))
    for i, tau in enumerate((0.5, 1.5)):
        expected = scipy.linalg.expm(tau * H[i])[:, 0]
        np.testing.assert_allclose(cupy.asnumpy(y[i]), expected, rtol=0,
                                   atol=1e-11 * np.abs(expected).max())


def test_sparse_forward_product_needs_no_fortran_copy_on_gpu(monkeypatch):
    """cupyx hands a dense operand to cuSPARSE through asfortranarray: every (N, c) operand of
    the forward and adjoint products is already F-ordered (no copy of the rows)."""
    n, S = 80, 6
    A0, F, labels, theta = random_arrays(n, S, seed=47, sparse=True)
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    seen = []
    original = cupy.asfortranarray

    def recording(a, *args, **kwargs):
        if getattr(a, "ndim", 0) == 2 and a.shape[0] in (n, n + 1) and a.shape[1] <= S:
            seen.append(bool(a.flags.f_contiguous))
        return original(a, *args, **kwargs)

    monkeypatch.setattr(cupy, "asfortranarray", recording)
    dd.loss_and_grad(prob, theta_gpu)
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} operands copied"


def test_shards_of_two_processes_share_one_gpu_budget():
    """A plain LocalCluster of two worker processes on a machine's first GPU: both shards are
    planned on "gpu" with the device's budget shared by two, and report gpu:0."""
    from distributed import Client, LocalCluster

    from diagode_dist.service import submit
    from diagode_dist.service._gpu_options import cluster_devices, plan_devices

    prob = dd.demo_problem(n=48, S=8)
    options = dict(epochs=1, lr=0.05, batch_size=8, seed=0)
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      env=env) as cluster, Client(cluster) as client:
        assert plan_devices(cluster_devices(client), 2) == [("gpu", 2)] * 2
        run = submit(client, prob, np.zeros(prob.n), n_shards=2, **options)
        run.wait(timeout=120)
        timings = run.status()["shard_timings"]
    assert [t["device"] for t in timings] == ["gpu:0", "gpu:0"]
    assert {t["backend"] for t in timings} == {"cupy"}
