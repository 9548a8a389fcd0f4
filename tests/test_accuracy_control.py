"""Accuracy control on stiff operators: error estimates, sub-stepping, rtol met.

The operator is the 2-D 5-point Dirichlet Laplacian: A0 = its off-diagonal part / h^2 and
theta = softplus^-1 of its diagonal 4/h^2 with 10% noise, so A = A0 - diag(softplus(theta))
is a (slightly perturbed) Laplacian. On the 16 x 16 grid (n = 256), T = 0.01 gives
||T A||_1 ~ 23 and T = 1 gives ||T A||_1 ~ 2.3e3 (stiff). Every result must be within
10 * rtol of the exact dense reference (``diagode_dist.reference``) and report
rtol_met. On the 32 x 32 grid (n = 1024, S = 4) the dense reference is one (2n + S) = 2052
square exponential (4 s on a quiet 2-core machine, ~20 s on a loaded one); that grid is also
compared with a much tighter run of our own (rtol = 1e-12, k = 60), itself checked against
the dense reference on the 16 x 16 grid.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagode_dist as dd
from diagode_dist.reference import (
    inverse_softplus,
    laplacian_2d,
    mse_loss,
    reference_loss_and_grad,
    reference_obs_loss_and_grad,
    relative_error,
)

RTOL = 1e-8
BOUND = 10 * RTOL  # the acceptance bound
BETA = 10.0


def laplacian_problem(N, T, S, seed=0, noise="normal", **problem_kw):
    """(A0, F, labels, theta, Problem) on the N x N grid (classification loss).

    noise="normal": diagonal 4/h^2 (1 + 0.1 xi), xi ~ N(0, 1); the
    diagonal can then fall below the off-diagonal row sum, and A has a few eigenvalues > 0
    (at most +6.1 on the 16 x 16 grids here, +89 on 32 x 32: x grows, still fine over T).
    noise="dissipative": 4/h^2 (1 + 0.1 |xi|), diagonally dominant, every eigenvalue < 0.
    """
    A0, diag = laplacian_2d(N)
    n = N * N
    rng = np.random.default_rng(seed)
    xi = rng.standard_normal(n)
    theta = inverse_softplus(diag * (1.0 + 0.1 * (np.abs(xi) if noise == "dissipative" else xi)))
    F = rng.standard_normal((n, S))
    labels = rng.integers(0, n, S)
    return A0, F, labels, theta, dd.Problem(A0, F, labels, T=T, beta=BETA, **problem_kw)


def _norm_TA(A0, theta, T):
    """||T A||_1 of A = A0 - diag(softplus(theta))."""
    A = A0.toarray() - np.diag(np.logaddexp(0.0, theta))
    return T * np.abs(A).sum(axis=0).max()


def _assert_within(loss, grad, ref_loss, ref_grad, bound=BOUND):
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    grad_err = relative_error(grad, ref_grad)
    assert loss_err <= bound, f"loss relative error {loss_err:.3e} > {bound:.0e}"
    assert grad_err <= bound, f"gradient relative error {grad_err:.3e} > {bound:.0e}"


@pytest.fixture(scope="module")
def mild():
    """16 x 16 grid, T = 0.01, S = 8, with its dense reference."""
    A0, F, labels, theta, prob = laplacian_problem(16, 0.01, 8)
    return prob, theta, reference_loss_and_grad(A0, F, labels, 0.01, BETA, theta)


@pytest.fixture(scope="module", params=["normal", "dissipative"])
def stiff(request):
    """16 x 16 grid, T = 1 (||T A||_1 >= 2e3), S = 8, with its dense reference."""
    A0, F, labels, theta, prob = laplacian_problem(16, 1.0, 8, seed=1, noise=request.param)
    assert _norm_TA(A0, theta, 1.0) >= 2e3
    return prob, theta, reference_loss_and_grad(A0, F, labels, 1.0, BETA, theta)


@pytest.mark.parametrize("k", [30, 10])
def test_mild_grid_within_10_rtol(mild, k):
    prob, theta, (ref_loss, ref_grad) = mild
    loss, grad, info = dd.loss_and_grad(prob, theta, k=k, rtol=RTOL, return_info=True)
    _assert_within(loss, grad, ref_loss, ref_grad)
    assert info["rtol_met"] is True and info["error_estimate"] <= RTOL * (1 + 1e-9), info
    assert info["rtol"] == RTOL and info["k"] == k
    assert info["forward_dim"] <= k and info["adjoint_dim"] <= k


def test_stiff_grid_within_10_rtol(stiff):
    prob, theta, (ref_loss, ref_grad) = stiff
    loss, grad, info = dd.loss_and_grad(prob, theta, k=30, rtol=RTOL, return_info=True)
    _assert_within(loss, grad, ref_loss, ref_grad)
    assert info["rtol_met"] is True, info


def test_stiff_grid_k_too_small_sub_steps(stiff):
    """k = 10 cannot cover ||T A|| ~ 2e3 in one step: sub-steps, and still within 10 rtol."""
    prob, theta, (ref_loss, ref_grad) = stiff
    loss, grad, info = dd.loss_and_grad(prob, theta, k=10, rtol=RTOL, return_info=True)
    assert info["substeps"] > 1, info
    assert info["forward_dim"] <= 10 and info["adjoint_dim"] <= 10, info
    assert info["rtol_met"] is True, info
    _assert_within(loss, grad, ref_loss, ref_grad)


def test_one_step_of_k_10_would_be_wrong(stiff):
    """The sub-steps are needed: a single k = 10 projection over [0, T] is far off.

    Checked independently of the package: exp(T A) f from a plain 10-dimensional Arnoldi
    projection of A on f, against the dense solution (x0 = 0, x(T) = T phi_1(T A) f).
    """
    import scipy.linalg

    prob, theta, _ = stiff
    A = prob.A0.toarray() - np.diag(np.logaddexp(0.0, theta))
    f = prob.F[:, 0]
    n, k, T = A.shape[0], 10, prob.T
    aug = np.zeros((n + 1, n + 1))
    aug[:n, :n], aug[:n, n] = A, f
    exact = scipy.linalg.expm(T * aug)[:n, n]
    V, H = np.zeros((n + 1, k)), np.zeros((k, k))
    V[n, 0] = 1.0  # u0 = e_{n+1}
    for j in range(k - 1):
        w = aug @ V[:, j]
        for _ in range(2):
            h = V[:, : j + 1].T @ w
            w -= V[:, : j + 1] @ h
            H[: j + 1, j] += h
        H[j + 1, j] = np.linalg.norm(w)
        V[:, j + 1] = w / H[j + 1, j]
    H[:, k - 1] = V.T @ (aug @ V[:, k - 1])
    one_step = (V @ scipy.linalg.expm(T * H)[:, 0])[:n]
    assert relative_error(one_step, exact) > 1e3 * BOUND


@pytest.mark.parametrize("rtol", [1e-4, 1e-6, 1e-10])
def test_error_follows_the_requested_rtol(mild, rtol):
    """The estimate is honest at every tolerance: actual error within 10 rtol, rtol_met."""
    prob, theta, (ref_loss, ref_grad) = mild
    loss, grad, info = dd.loss_and_grad(prob, theta, k=10, rtol=rtol, return_info=True)
    assert info["rtol_met"] is True, info
    _assert_within(loss, grad, ref_loss, ref_grad, bound=10 * rtol)


def test_stiff_observations_with_x0_within_10_rtol():
    """MSE at t = 0.1, 0.5, 1 from x0 != 0 on the stiff grid, against the exact reference."""
    A0, F, _, theta, _ = laplacian_problem(16, 1.0, 4, seed=2, noise="dissipative")
    rng = np.random.default_rng(3)
    n, S = F.shape
    x0 = rng.standard_normal((n, S))
    times = [0.1, 0.5, 1.0]
    targets = 0.01 * rng.standard_normal((3, n, S))
    prob = dd.Problem(A0, F, x0=x0, T=1.0, obs_times=times, targets=targets, loss="mse")
    loss, grad, info = dd.loss_and_grad(prob, theta, k=20, rtol=RTOL, return_info=True)
    ref_loss, ref_grad = reference_obs_loss_and_grad(A0, F, x0, times, mse_loss(targets), theta)
    assert info["rtol_met"] is True, info
    _assert_within(loss, grad, ref_loss, ref_grad)


def test_tight_run_is_exact_on_the_stiff_grid(stiff):
    """Justifies using rtol = 1e-12, k = 60 as the reference at n = 1024 (next test)."""
    prob, theta, (ref_loss, ref_grad) = stiff
    loss, grad = dd.loss_and_grad(prob, theta, k=60, rtol=1e-12)
    _assert_within(loss, grad, ref_loss, ref_grad, bound=1e-11)


@pytest.fixture(scope="module")
def grid_1024():
    A0, F, labels, theta, prob = laplacian_problem(32, 0.01, 4, seed=4)
    return A0, F, labels, theta, prob


@pytest.mark.parametrize("k", [30, 10])
def test_32x32_grid_against_a_tight_run(grid_1024, k):
    """n = 1024, T = 0.01, against rtol = 1e-12, k = 60."""
    *_, theta, prob = grid_1024
    tight_loss, tight_grad = dd.loss_and_grad(prob, theta, k=60, rtol=1e-12)
    loss, grad, info = dd.loss_and_grad(prob, theta, k=k, rtol=RTOL, return_info=True)
    assert info["rtol_met"] is True, info
    if k == 10:
        assert info["substeps"] > 1, info
    _assert_within(loss, grad, tight_loss, tight_grad)


@pytest.mark.slow
def test_32x32_grid_against_the_dense_reference(grid_1024):
    """The n = 1024 case against the exact reference: one 2052-square expm (4-20 s)."""
    A0, F, labels, theta, prob = grid_1024
    ref_loss, ref_grad = reference_loss_and_grad(A0, F, labels, 0.01, BETA, theta)
    loss, grad, info = dd.loss_and_grad(prob, theta, k=30, rtol=RTOL, return_info=True)
    assert info["rtol_met"] is True, info
    _assert_within(loss, grad, ref_loss, ref_grad)


def test_overflowing_solution_is_never_reported_accurate():
    """x(t) overflows float64 (A0 = 1000 I, T = 0.5: growth e^500 x ||f||, MSE ~ e^1000).

    The user must not get a non-finite loss or gradient flagged rtol_met=True: either a clear
    error, or finite values, or rtol_met False.
    """
    n, S = 8, 3
    rng = np.random.default_rng(0)
    A0 = 1000.0 * np.eye(n) + 0.1 * rng.standard_normal((n, n))
    F = rng.standard_normal((n, S))
    prob = dd.Problem(A0, F, x0=F, T=0.5, obs_times=[0.5], targets=np.zeros((1, n, S)),
                      loss="mse")
    try:
        with np.errstate(all="ignore"):
            loss, grad, info = dd.loss_and_grad(prob, np.zeros(n), return_info=True)
    except (ArithmeticError, ValueError, RuntimeError):
        return
    finite = np.isfinite(loss) and bool(np.isfinite(grad).all())
    assert finite or info["rtol_met"] is False, (loss, grad, info)
