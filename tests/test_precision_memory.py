"""float32 accuracy against float64, and the memory of a chunk.

float32 is the GPU opt-in; on the CPU a problem built from float32 arrays runs the very same
code (one numerics path over the array module), so its accuracy is tested here and on the GPU
where one is visible. Requested tolerances are raised to 100 eps(float32) ~ 1.19e-5
(``effective_rtol``); the stated accuracy is 10 x that: 1.19e-4 relative to float64.
Measured on the cases below (2026-11, this machine): 2e-8 .. 7e-6.

Memory: ``predict_chunk_bytes(n, c, k)`` must bound the working set of one chunk. It is
measured with ``tracemalloc`` (NumPy reports its array buffers to it; LAPACK's internal
workspaces are not seen, so this is a lower bound of the process's real peak).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import random_arrays

import diagode_dist as dd
from diagode_dist import adjoint
from diagode_dist.reference import inverse_softplus, laplacian_2d, relative_error

F32_BOUND = 10 * adjoint.effective_rtol(1e-8, np.float32)


def _dissipative_laplacian(N, S, seed):
    A0, diag = laplacian_2d(N)
    rng = np.random.default_rng(seed)
    theta = inverse_softplus(diag * (1.0 + 0.1 * np.abs(rng.standard_normal(N * N))))
    F = rng.standard_normal((N * N, S))
    return A0, F, rng.integers(0, N * N, S), theta


def _f32_cases():
    A0, F, labels, theta = random_arrays(64, 12, scale=0.3, seed=13)
    yield "random-dense", A0, F, labels, theta, 2.0
    A0, F, labels, theta = random_arrays(64, 12, scale=0.3, seed=14, sparse=True)
    yield "random-csr", A0, F, labels, theta, 2.0
    A0, F, labels, theta = _dissipative_laplacian(16, 6, seed=15)
    yield "stiff-laplacian", A0, F, labels, theta, 1.0


F32_CASES = {case[0]: case[1:] for case in _f32_cases()}


def test_effective_rtol():
    assert adjoint.effective_rtol(1e-8, np.float64) == 1e-8
    assert adjoint.effective_rtol(1e-8, np.float32) == pytest.approx(100 * 2.0**-23)
    assert adjoint.effective_rtol(1e-3, np.float32) == 1e-3


def _float32_run(p32, theta, k, rtol, refusable):
    """loss_and_grad in float32 and the accuracy it states (10 x its effective rtol).

    100 eps cannot be certified in float32 once eps * ||T A|| (rounding of a stiff time
    integral; 3e-4 on the 16 x 16 grid, whose float32 gradient is 1.3e-3 off at k = 30 in one
    step) is larger: where ``refusable``, an AccuracyError is accepted and rtol = 1e-3 must then
    be met.
    """
    try:
        loss, grad, info = dd.loss_and_grad(p32, theta, k=k, rtol=rtol, return_info=True)
    except dd.AccuracyError:
        assert refusable
        rtol = 1e-3
        loss, grad, info = dd.loss_and_grad(p32, theta, k=k, rtol=rtol, return_info=True)
    return loss, grad, info, 10 * adjoint.effective_rtol(rtol, np.float32)


@pytest.mark.parametrize("theta_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [30, 10])
@pytest.mark.parametrize("case", list(F32_CASES))
def test_float32_against_float64(case, k, theta_dtype):
    A0, F, labels, theta, T = F32_CASES[case]
    p64 = dd.Problem(A0, F, labels, T=T, beta=10.0)
    p32 = dd.Problem(A0.astype(np.float32), F.astype(np.float32), labels, T=T, beta=10.0)
    assert p32.dtype == np.float32 and p32.A0.dtype == np.float32
    loss, grad = dd.loss_and_grad(p64, theta, k=60, rtol=1e-12)
    loss32, grad32, info, bound = _float32_run(p32, theta.astype(theta_dtype), k, 1e-8,
                                               refusable=case == "stiff-laplacian")
    assert type(loss32) is float
    assert grad32.dtype == theta_dtype  # the gradient comes back in theta's dtype
    assert info["rtol"] == adjoint.effective_rtol(bound / 10, np.float32)
    assert info["rtol_met"] is True, info
    assert abs(loss32 - loss) <= bound * abs(loss)
    assert relative_error(grad32, grad) <= bound


def test_float32_observations_with_x0():
    A0, F, _, theta = _dissipative_laplacian(16, 4, seed=16)
    rng = np.random.default_rng(17)
    x0 = rng.standard_normal(F.shape)
    targets = 0.01 * rng.standard_normal((3, 256, 4))
    kw = dict(T=1.0, obs_times=[0.1, 0.5, 1.0], loss="mse")
    p64 = dd.Problem(A0, F, x0=x0, targets=targets, **kw)
    p32 = dd.Problem(A0.astype(np.float32), F.astype(np.float32), x0=x0.astype(np.float32),
                     targets=targets.astype(np.float32), **kw)
    loss, grad = dd.loss_and_grad(p64, theta, k=60, rtol=1e-12)
    loss32, grad32, _, bound = _float32_run(p32, theta.astype(np.float32), 30, 1e-12, True)
    assert grad32.dtype == np.float32
    assert abs(loss32 - loss) <= bound * abs(loss)
    assert relative_error(grad32, grad) <= bound


def test_float32_is_really_float32():
    """The float32 run differs from float64 by more than float64 rounding: it ran in float32."""
    A0, F, labels, theta, T = F32_CASES["random-dense"]
    loss, grad = dd.loss_and_grad(dd.Problem(A0, F, labels, T=T), theta)
    p32 = dd.Problem(A0.astype(np.float32), F.astype(np.float32), labels, T=T)
    loss32, grad32 = dd.loss_and_grad(p32, theta)
    assert relative_error(grad32, grad) > 1e-9


# ---- GPU (CuPy): the same numerics on the device ---------------------------------------------

def _cupy_with_device():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


@pytest.mark.gpu
@pytest.mark.skipif(_cupy_with_device() is None,
                    reason="needs CuPy and a visible CUDA device (the gpu extra)")
@pytest.mark.parametrize("case", list(F32_CASES))
def test_float32_on_gpu_against_float64(case):
    cupy = _cupy_with_device()
    import cupyx.scipy.sparse

    A0, F, labels, theta, T = F32_CASES[case]
    loss, grad = dd.loss_and_grad(dd.Problem(A0, F, labels, T=T), theta, k=60, rtol=1e-12)
    A0_32 = A0.astype(np.float32)
    A0_gpu = (cupyx.scipy.sparse.csr_matrix(A0_32) if hasattr(A0_32, "tocsr")
              else cupy.asarray(A0_32))
    prob = dd.Problem(A0_gpu, cupy.asarray(F, dtype=cupy.float32), labels, T=T)
    loss32, grad32, info = dd.loss_and_grad(prob, cupy.asarray(theta, dtype=cupy.float32),
                                            return_info=True)
    assert isinstance(grad32, cupy.ndarray) and grad32.dtype == cupy.float32
    assert info["rtol_met"] is True
    assert abs(loss32 - loss) <= F32_BOUND * abs(loss)
    assert relative_error(cupy.asnumpy(grad32), grad) <= F32_BOUND


# ---- memory ----------------------------------------------------------------------------------

def _traced_peak(fn):
    """(peak bytes allocated above the starting level while fn runs, fn's result)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


def _scaled_random(n, S, seed):
    """A0 with spectral radius ~0.5 (scale 0.5 / sqrt(n)): stable, needs k ~ 12-36."""
    return random_arrays(n, S, scale=0.5 / np.sqrt(n), seed=seed)


# (n, k, T, c): T = 20 makes the projections use all k dimensions (several sub-steps)
MEMORY_CASES = [
    pytest.param(1024, 30, 2.0, 8, id="n1024-k30-one-step"),
    pytest.param(1024, 30, 20.0, 8, id="n1024-k30-substeps"),
    pytest.param(1024, 10, 20.0, 8, id="n1024-k10-substeps"),
    pytest.param(256, 30, 2.0, 8, id="n256-k30-one-step"),
    pytest.param(256, 30, 20.0, 8, id="n256-k30-substeps"),
    pytest.param(64, 30, 20.0, 8, id="n64-k30-substeps"),
]


@pytest.mark.parametrize("n, k, T, c", MEMORY_CASES)
def test_chunk_peak_within_prediction(monkeypatch, n, k, T, c):
    """One chunk of c columns, no bases kept across sub-steps (budget 0): peak <= predicted."""
    A0, F, labels, theta = _scaled_random(n, c, seed=20)
    prob = dd.Problem(A0, F, labels, T=T)
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: 0)
    peak, (_, _, info) = _traced_peak(lambda: dd.loss_and_grad(
        prob, theta, k=k, rtol=1e-8, max_chunk_columns=c, return_info=True))
    predicted = adjoint.predict_chunk_bytes(n, c, k)
    assert peak <= predicted, (
        f"peak {peak} B > predicted {predicted} B ({peak / predicted:.2f}x); info {info}")


@pytest.mark.slow
@pytest.mark.parametrize("k", [30, 10], ids=["k30-bases-kept", "k10-bases-rebuilt"])
def test_default_chunks_fit_the_memory_budget(monkeypatch, k):
    """A problem 'larger than memory': budget = 2 x predict(n, 4, k) gives chunks of 4 columns,
    kept bases within the other half (k = 10: more sub-steps than fit, so some are rebuilt),
    a whole-call peak within the budget, and the one-chunk result."""
    n, S = 1024, 16
    A0, F, labels, theta = _scaled_random(n, S, seed=21)
    prob = dd.Problem(A0, F, labels, T=20.0)
    loss1, grad1 = dd.loss_and_grad(prob, theta, k=k, rtol=1e-8, max_chunk_columns=S)
    budget = 2 * adjoint.predict_chunk_bytes(n, 4, k)
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: budget)
    assert adjoint._default_chunk(prob, k) == 4
    peak, (loss, grad, info) = _traced_peak(lambda: dd.loss_and_grad(
        prob, theta, k=k, rtol=1e-8, return_info=True))
    assert info["substeps"] > 1, info  # so that bases are kept or rebuilt across sub-steps
    assert peak <= budget, f"peak {peak} B > budget {budget} B"
    assert abs(loss - loss1) <= 1e-13 * abs(loss1)
    assert relative_error(grad, grad1) <= 1e-13


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("obs", [False, True], ids=["classification", "mse-x0"])
def test_small_chunks_give_the_one_chunk_result(chunk, obs):
    n, S = 128, 7
    A0, F, labels, theta = _scaled_random(n, S, seed=22)
    if obs:
        rng = np.random.default_rng(23)
        prob = dd.Problem(A0, F, x0=rng.standard_normal((n, S)), T=20.0,
                          obs_times=[2.0, 5.0, 20.0], targets=rng.standard_normal((3, n, S)),
                          loss="mse")
    else:
        prob = dd.Problem(A0, F, labels, T=20.0)
    loss1, grad1 = dd.loss_and_grad(prob, theta, k=20, rtol=1e-8, max_chunk_columns=S)
    loss, grad = dd.loss_and_grad(prob, theta, k=20, rtol=1e-8, max_chunk_columns=chunk)
    assert abs(loss - loss1) <= 1e-13 * abs(loss1)
    assert relative_error(grad, grad1) <= 1e-13


def test_rebuilt_bases_give_identical_floats(monkeypatch):
    """Bases kept across sub-steps or rebuilt from checkpoints (budget 0): the same floats."""
    A0, F, labels, theta = _scaled_random(200, 6, seed=24)
    prob = dd.Problem(A0, F, labels, T=20.0)
    loss_kept, grad_kept, info = dd.loss_and_grad(prob, theta, k=12, rtol=1e-8,
                                                  return_info=True)
    assert info["substeps"] > 1, info
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: 0)
    loss_rebuilt, grad_rebuilt = dd.loss_and_grad(prob, theta, k=12, rtol=1e-8,
                                                  max_chunk_columns=6)
    assert loss_rebuilt == loss_kept
    assert np.array_equal(grad_rebuilt, grad_kept)


def test_predict_chunk_bytes_scales():
    """Linear in columns, at least the two bases (k+1)(n+1) per column, itemsize-aware."""
    one = adjoint.predict_chunk_bytes(1000, 1, 30)
    assert adjoint.predict_chunk_bytes(1000, 16, 30) == 16 * one
    assert one >= 2 * 31 * 1001 * 8
    assert adjoint.predict_chunk_bytes(1000, 1, 30, itemsize=4) * 2 == one


# ---- basis products: no copy of the basis --------------------------------------------------

def _column_major_gemm(plan, a_flat, a_offset, b_flat, alpha=1.0):
    """What cuBLAS's strided-batched GEMM computes from flat buffers (column-major, items)."""
    m, n, k = plan["m"], plan["n"], plan["k"]
    out = np.zeros(plan["batch"] * plan["stride_c"])
    rows_a, cols_a = (k, m) if plan["trans_a"] else (m, k)
    for b in range(plan["batch"]):
        idx = (a_offset + b * plan["stride_a"] + np.arange(rows_a)[:, None]
               + plan["lda"] * np.arange(cols_a)[None, :])
        A = a_flat[idx]
        A = A.T if plan["trans_a"] else A
        B = b_flat[b * plan["stride_b"] + np.arange(k)[:, None]
                   + plan["ldb"] * np.arange(n)[None, :]]
        C = alpha * A @ B
        out[b * plan["stride_c"] + np.arange(m)[:, None]
            + plan["ldc"] * np.arange(n)[None, :]] = C
    return out


@pytest.mark.parametrize("r", [1, 3])
def test_gemm_plan_reads_a_sliced_basis_in_place(r):
    """The GPU path's cuBLAS arguments, emulated on the host buffers: they give what the
    NumPy products give, for a slice of a (K, c, N) basis (rows 1..3, state cut to N - 1)."""
    from diagode_dist import _array

    K, c, N = 6, 5, 11
    rng = np.random.default_rng(0)
    full = rng.standard_normal((K, c, N))
    basis = full[1:4, :, : N - 1]  # what arnoldi's checks and _contract pass
    offset = (basis.__array_interface__["data"][0] - full.ctypes.data) // 8
    w = rng.standard_normal((c, N - 1))
    plan = _array.gemm_plan(basis.shape, basis.strides, 8, transpose=True)
    dots = _column_major_gemm(plan, full.ravel(), offset, w.ravel())
    np.testing.assert_allclose(dots.reshape(c, 3), _array.basis_dot(basis, w), rtol=1e-13)
    coeffs = rng.standard_normal((c, r, 3))
    plan = _array.gemm_plan(basis.shape, basis.strides, 8, transpose=False, r=r)
    sums = _column_major_gemm(plan, full.ravel(), offset, coeffs.ravel())
    np.testing.assert_allclose(sums.reshape(c, r, N - 1),
                               _array.basis_combine(basis, coeffs), rtol=1e-13)
    assert plan["lda"] == c * N and plan["stride_a"] == N  # the basis where it lies


def test_basis_products_make_no_copy_of_the_basis():
    """A CGS2 step and the gradient contraction allocate a few state vectors, not the basis
    (a transposed copy would add m c N items)."""
    from diagode_dist import _march, krylov

    m, c, N = 16, 8, 20_000
    rng = np.random.default_rng(1)
    full = rng.standard_normal((m + 1, c, N))
    w = rng.standard_normal((c, N))
    vector = 8 * c * N
    peak, _ = _traced_peak(lambda: krylov._cgs2(full[:m], w))
    assert peak <= 6 * vector, peak / vector
    M = rng.standard_normal((c, m, 4))
    peak, _ = _traced_peak(lambda: _march._contract(full[:m, :, : N - 1], M,
                                                     full[:4, :, : N - 1]))
    assert peak <= 1.1 * 4 * vector, peak / vector  # W M (c, 4, N) only


def _held_while_kept(intervals):
    """Bytes really held (each buffer under a kept basis once -- a view holds its whole base
    array -- plus the start vectors, always held) at the last interval whose basis was kept,
    and how many were kept."""
    buffers, starts, kept, held = {}, 0, 0, 0
    for iv in intervals:
        starts += iv.start.nbytes
        if iv.projection is not None:
            kept += 1
            basis = iv.projection.basis
            owner = basis if basis.base is None else basis.base
            buffers[id(owner)] = owner.nbytes
            held = sum(buffers.values()) + starts
    return held, kept


def _mse_many_times(n=400, S=4, times=40, seed=25):
    A0, F, _, theta = _scaled_random(n, S, seed=seed)
    rng = np.random.default_rng(seed)
    obs = np.linspace(2.0 / times, 2.0, times)
    prob = dd.Problem(A0, F, x0=rng.standard_normal((n, S)), T=2.0, obs_times=obs,
                      targets=rng.standard_normal((times, n, S)), loss="mse")
    return prob, theta


def test_kept_bases_are_counted_as_held(monkeypatch):
    """MSE at 40 observation times (short steps, few dimensions each): what the kept bases and
    start vectors really hold stays within the half of the budget given to them."""
    prob, theta = _mse_many_times()
    loss_all, grad_all = dd.loss_and_grad(prob, theta, k=30, max_chunk_columns=prob.S)
    seen = []
    original = adjoint.march_forward

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append((args[6], _held_while_kept(result[1])))  # keep_bytes, (held, kept)
        return result

    monkeypatch.setattr(adjoint, "march_forward", recording)
    one_basis = 31 * prob.S * (prob.n + 1) * 8
    budget = 2 * 6 * one_basis  # room for about 6 full bases, or ~20 of the short ones
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: budget)
    loss, grad = dd.loss_and_grad(prob, theta, k=30, max_chunk_columns=prob.S)
    (keep_bytes, (held, kept)), = seen
    assert kept >= 6, kept  # the budget is used...
    assert held <= keep_bytes, f"held {held} B > {keep_bytes} B ({held / keep_bytes:.2f}x)"
    assert loss == loss_all and np.array_equal(grad, grad_all)  # ...and nothing changes


# ---- float32: every intermediate in float32 --------------------------------------------------

def _record_dtypes(monkeypatch):
    """Wrap the numerics' building blocks; returns the set of (function, dtype) of every float
    array they received or returned."""
    from diagode_dist import _march, krylov, time_integral

    seen = set()

    def note(name, value):
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                seen.add((name, v.dtype))

    def wrap(module, name):
        original = getattr(module, name, None)
        if original is None:
            return

        def recorded(*args, **kwargs):
            for a in args:
                note(name, a)
            result = original(*args, **kwargs)
            note(name, result)
            return result

        monkeypatch.setattr(module, name, recorded)

    for module, names in ((krylov, ("expm_batched", "basis_dot", "basis_combine",
                                    "_divide_rows")),
                          (_march, ("expm_batched", "basis_combine", "van_loan", "trapezoid",
                                    "combine")),
                          (time_integral, ("expm_batched", "expm_block_upper"))):
        for name in names:
            wrap(module, name)
    return seen


@pytest.mark.parametrize("time_integral", ["vanloan", "trapezoid"])
def test_float32_intermediates_stay_float32(monkeypatch, time_integral):
    """Steps, exponentials, the Van Loan integral and every basis product run in float32 (a
    float64 step length made the whole time integral and a copy of the adjoint basis float64)."""
    A0, F, labels, theta = _scaled_random(256, 4, seed=26)
    prob = dd.Problem(A0.astype(np.float32), F.astype(np.float32), labels, T=20.0)
    seen = _record_dtypes(monkeypatch)
    _, grad = dd.loss_and_grad(prob, theta.astype(np.float32), k=10, rtol=1e-3,
                               time_integral=time_integral)
    assert grad.dtype == np.float32
    names = {name for name, _ in seen}
    assert {"combine", "expm_batched"} <= names
    assert {"vanloan": "van_loan"}.get(time_integral, time_integral) in names
    assert {dtype for _, dtype in seen} == {np.dtype(np.float32)}, sorted(
        (name, str(dtype)) for name, dtype in seen if dtype != np.float32)


def test_float32_chunk_peak_within_prediction(monkeypatch):
    """float32 working set against predict_chunk_bytes with 4-byte items (float64 temporaries
    of the adjoint basis would double part of it)."""
    n, k, c = 1024, 30, 8
    A0, F, labels, theta = _scaled_random(n, c, seed=20)
    prob = dd.Problem(A0.astype(np.float32), F.astype(np.float32), labels, T=20.0)
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: 0)
    peak, _ = _traced_peak(lambda: dd.loss_and_grad(
        prob, theta.astype(np.float32), k=k, rtol=1e-3, max_chunk_columns=c))
    predicted = adjoint.predict_chunk_bytes(n, c, k, itemsize=4)
    assert peak <= predicted, f"peak {peak} B > predicted {predicted} B ({peak / predicted:.2f}x)"


@pytest.mark.parametrize("k, times", [(8, 40), (8, 120)], ids=["k8-40-times", "k8-120-times"])
def test_observed_states_and_jumps_are_predicted(monkeypatch, k, times):
    """MSE at many observation times: the observed states, their adjoint jumps and the
    intervals' start vectors (m (c, n) each) are in predict_chunk_bytes (they were not: the
    peak was 2.9x / 8.7x the prediction)."""
    n, c = 400, 4
    prob, theta = _mse_many_times(n=n, S=c, times=times)
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: 0)
    held = {}
    original = adjoint.march_forward

    def recording(*args, **kwargs):
        states, intervals, acc = original(*args, **kwargs)
        held["states"] = states.nbytes
        held["starts"] = sum(iv.start.nbytes for iv in intervals)
        return states, intervals, acc

    monkeypatch.setattr(adjoint, "march_forward", recording)
    peak, _ = _traced_peak(lambda: dd.loss_and_grad(prob, theta, k=k, max_chunk_columns=c))
    predicted = adjoint.predict_chunk_bytes(n, c, k, observations=times)
    one_time = adjoint.predict_chunk_bytes(n, c, k)
    # states + jumps (same size) + starts, measured, within what the observations add
    assert 2 * held["states"] + held["starts"] <= predicted - one_time + 20 * (n + 1) * 8 * c
    assert peak <= predicted, f"peak {peak} B > predicted {predicted} B ({peak / predicted:.2f}x)"
    assert peak > 2 * one_time  # what the prediction without them missed


def test_default_chunk_counts_the_observation_times(monkeypatch):
    """Chunks sized with the observations counted (without them: 8 columns, 2.7x too many)."""
    prob, _ = _mse_many_times(n=400, S=4, times=40)
    budget = 2 * adjoint.predict_chunk_bytes(400, 4, 8, observations=40)
    monkeypatch.setattr(adjoint, "memory_budget", lambda xp: budget)
    assert adjoint._default_chunk(prob, 8) == 4


# ---- the sparse product reads the rows where they lie; solves of any size in one batch ------

def test_sparse_product_gets_the_rows_as_they_lie(monkeypatch):
    """The augmented forward operator hands the sparse product v.T, an F-ordered view of the
    basis row (cupyx copies any other layout with asfortranarray before cuSPARSE); the
    widened operator shares A0's arrays. The strided x.T = v[:, :n].T was handed before."""
    import scipy.sparse as sp
    from scipy.sparse._compressed import _cs_matrix

    from diagode_dist import _array

    layouts = []
    original = _cs_matrix._matmul_multivector

    def recording(self, other):
        layouts.append((other.flags.f_contiguous, other.base is not None))
        return original(self, other)

    monkeypatch.setattr(_cs_matrix, "_matmul_multivector", recording)
    A0, F, labels, theta = _scaled_random(64, 3, seed=27)
    A0 = sp.csr_matrix(A0)
    prob = dd.Problem(A0, F, labels, T=2.0)
    loss, grad = dd.loss_and_grad(prob, theta, k=12, rtol=1e-8)
    assert layouts and all(f and view for f, view in layouts), set(layouts)
    dense_loss, dense_grad = dd.loss_and_grad(dd.Problem(A0.toarray(), F, labels, T=2.0),
                                              theta, k=12, rtol=1e-8)
    assert abs(loss - dense_loss) <= 1e-13 * abs(dense_loss)
    assert relative_error(grad, dense_grad) <= 1e-12
    v = np.random.default_rng(0).standard_normal((3, 65))
    wide = _array.row_product(A0, 65)
    np.testing.assert_allclose(wide(v), (A0.toarray() @ v[:, :64].T).T, rtol=1e-13)


def test_solve_stack_beyond_256():
    """One batched solve for any size (CuPy's solve loops on the host above 256)."""
    from diagode_dist import _array

    rng = np.random.default_rng(28)
    a = rng.standard_normal((3, 300, 300)) + 30 * np.eye(300)
    b = rng.standard_normal((3, 300, 2))
    x = _array.solve_stack(a, b)
    for i in range(3):
        np.testing.assert_allclose(a[i] @ x[i], b[i], rtol=0, atol=1e-12)


def test_exponentials_beyond_256_through_the_batched_solve(monkeypatch):
    """Krylov dimension 300 (an augmented block of 301) and a Van Loan block of 2 x 150: the
    exponentials' solves all go through solve_stack, and agree with SciPy's expm."""
    import scipy.linalg

    from diagode_dist import _array, expm, krylov

    sizes = []
    original = _array.solve_stack

    def recording(a, b):
        sizes.append(a.shape[-1])
        return original(a, b)

    monkeypatch.setattr(expm, "solve_stack", recording)
    rng = np.random.default_rng(29)
    m, c = 300, 2
    H = np.triu(rng.standard_normal((c, m, m)) / np.sqrt(m), -1)
    norms, tau = np.array([1.0, 2.0]), np.array([0.5, 1.5])
    y, _ = krylov.exp_and_error(H, np.zeros(c), norms, tau)
    for i in range(c):
        expected = norms[i] * scipy.linalg.expm(tau[i] * H[i])[:, 0]
        np.testing.assert_allclose(y[i], expected, rtol=0, atol=1e-11 * np.abs(expected).max())
    a, bb, d = (rng.standard_normal((c, 150, 150)) / 15, rng.standard_normal((c, 150, 150)),
                rng.standard_normal((c, 150, 150)) / 15)
    ea, eb = expm.expm_block_upper(a, bb, d)
    full = scipy.linalg.expm(np.block([[a[0], bb[0]], [np.zeros((150, 150)), d[0]]]))
    np.testing.assert_allclose(eb[0], full[:150, 150:], rtol=0, atol=1e-11 * abs(full).max())
    assert sizes and max(sizes) == m + 1


def test_the_numerics_solve_only_through_solve_stack():
    """No direct ``linalg.solve`` in the numerics (CuPy's host loop above 256), but the one in
    _array.solve_stack; the dense reference is NumPy-only."""
    from pathlib import Path

    package = Path(dd.__file__).parent
    offenders = [path.name for path in package.glob("*.py")
                 if path.name not in ("_array.py", "reference.py")
                 and "linalg.solve(" in path.read_text()]
    assert offenders == []


def test_squarings_cost_no_host_sync_each(monkeypatch):
    """The squarings of a stack whose matrices need 0..6 of them: the same floats as squaring
    each matrix on its own, with one transfer of the counts (no nonzero() per squaring, each
    a host sync on a GPU)."""
    import scipy.linalg

    from diagode_dist import expm

    rng = np.random.default_rng(30)
    scales = np.array([0.01, 1.0, 30.0, 200.0, 5.0, 0.3])
    a = rng.standard_normal((6, 10, 10)) / 10 * scales[:, None, None]
    calls = []
    original = np.nonzero
    monkeypatch.setattr(np, "nonzero", lambda *args: calls.append(1) or original(*args))
    stack = expm.expm_batched(a)
    ea, eb = expm.expm_block_upper(a, a[::-1].copy(), a)
    monkeypatch.undo()
    assert calls == []
    for i in range(6):
        alone = expm.expm_batched(a[i:i + 1])[0]
        assert np.array_equal(stack[i], alone)  # a matrix's result does not depend on others
        np.testing.assert_allclose(stack[i], scipy.linalg.expm(a[i]), rtol=0,
                                   atol=1e-11 * np.abs(stack[i]).max())
        block = scipy.linalg.expm(np.block([[a[i], a[5 - i]], [np.zeros((10, 10)), a[i]]]))
        np.testing.assert_allclose(eb[i], block[:10, 10:], rtol=0,
                                   atol=1e-11 * np.abs(block).max())
