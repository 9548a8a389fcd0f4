"""Loss and gradient accuracy: the dense reference itself, then the package against it.

Relative errors are ||value - exact||_2 / ||exact||_2 (``reference.relative_error``).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from conftest import dense, random_arrays

from diagode_dist import reference
from diagode_dist.reference import (
    PARAM_NAMES,
    expm_loss,
    reference_loss_and_grad,
    reference_loss_and_grad_per_column,
    relative_error,
)

T, BETA = 2.0, 10.0


def _unit(n: int, k: int) -> np.ndarray:
    e = np.zeros(n)
    e[k] = 1.0
    return e


def _central_fd(loss_of_theta, theta: np.ndarray, h: float) -> np.ndarray:
    """Fourth-order central differences: (-L(+2h) + 8L(+h) - 8L(-h) + L(-2h)) / (12h)."""
    grad = np.empty(theta.size)
    for k in range(theta.size):
        e = h * _unit(theta.size, k)
        grad[k] = (-loss_of_theta(theta + 2 * e) + 8 * loss_of_theta(theta + e)
                   - 8 * loss_of_theta(theta - e) + loss_of_theta(theta - 2 * e)) / (12 * h)
    return grad


def _second_order_fd(loss_of_theta, theta: np.ndarray, h: float) -> np.ndarray:
    """Plain central differences (L(+h) - L(-h)) / (2h)."""
    return np.array([(loss_of_theta(theta + h * _unit(theta.size, k))
                      - loss_of_theta(theta - h * _unit(theta.size, k))) / (2 * h)
                     for k in range(theta.size)])


# --------------------------------------------------------------------------------------------
# The reference, checked against derivatives of a loss computed with plain expm (no adjoint)
# --------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    # (n, S, scale, seed, with_x0, columns)
    (6, 3, 0.3, 1, False, None),
    (8, 5, 0.3, 2, True, None),
    (10, 4, 0.5, 3, False, [3, 0, 3]),  # a repeated column counts twice
    (7, 6, 0.3, 4, True, [5, 1]),
]


@pytest.mark.parametrize("param_name", PARAM_NAMES)
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_matches_complex_step(param_name, case):
    n, S, scale, seed, with_x0, columns = case
    A0, F, labels, theta = random_arrays(n, S, scale=scale, seed=seed)
    x0 = np.random.default_rng(seed + 100).standard_normal((n, S)) if with_x0 else None
    loss, grad = reference_loss_and_grad(A0, F, labels, T, BETA, theta, param_name, x0, columns)
    h = 1e-30
    complex_step = np.array([
        expm_loss(A0, F, labels, T, BETA, theta + 1j * h * _unit(n, k), param_name, x0,
                  columns).imag / h
        for k in range(n)])
    assert relative_error(grad, complex_step) <= 1e-12
    assert abs(loss - expm_loss(A0, F, labels, T, BETA, theta, param_name, x0, columns)) \
        <= 1e-14 * abs(loss)


@pytest.mark.parametrize("param_name", PARAM_NAMES)
@pytest.mark.parametrize("case", REFERENCE_CASES[:2])
def test_reference_matches_central_fd(param_name, case):
    n, S, scale, seed, with_x0, columns = case
    A0, F, labels, theta = random_arrays(n, S, scale=scale, seed=seed)
    x0 = np.random.default_rng(seed + 100).standard_normal((n, S)) if with_x0 else None
    _, grad = reference_loss_and_grad(A0, F, labels, T, BETA, theta, param_name, x0, columns)

    def loss_of(th):
        return expm_loss(A0, F, labels, T, BETA, th, param_name, x0, columns)

    assert relative_error(grad, _second_order_fd(loss_of, theta, 1e-5)) <= 1e-7


@pytest.mark.parametrize("param_name", PARAM_NAMES)
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_one_exponential_matches_per_column(param_name, case):
    n, S, scale, seed, with_x0, columns = case
    A0, F, labels, theta = random_arrays(n, S, scale=scale, seed=seed)
    x0 = np.random.default_rng(seed + 100).standard_normal((n, S)) if with_x0 else None
    loss, grad = reference_loss_and_grad(A0, F, labels, T, BETA, theta, param_name, x0, columns)
    loss_c, grad_c = reference_loss_and_grad_per_column(A0, F, labels, T, BETA, theta,
                                                        param_name, x0, columns)
    assert abs(loss - loss_c) <= 1e-14 * abs(loss)
    assert relative_error(grad_c, grad) <= 1e-12


def test_seed_package_adjoint_sign_bug_is_far_outside_tolerance():
    """An adjoint on -A0^T + diag(d) (the seed package's bug) misses by far more than 1e-8 on
    the n = 10, scale 0.3 problems used below, so those tests would catch it."""
    A0, F, labels, theta = random_arrays(10, 6, scale=0.3, seed=11)
    _, grad = reference_loss_and_grad(A0, F, labels, T, BETA, theta)
    d, slope = reference.diag_and_slope(theta, "softplus")
    A = A0 + np.diag(d)
    XT, A_hat, U0 = reference._terminal(A, F, np.zeros_like(F), T)
    _, G = reference._loss_and_adjoint(XT, labels, BETA, np.arange(F.shape[1]))
    wrong_adjoint = (-A0 + np.diag(d)).T
    K = reference._van_loan_top_right(wrong_adjoint, G @ U0.T, A_hat.T, T)[:, :10]
    assert relative_error(slope * np.diag(K), grad) > 1e-2


# --------------------------------------------------------------------------------------------
# The package against the reference and against finite differences
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dd():
    import diagode_dist

    return diagode_dist


def _param(dd, name):
    return {"softplus": dd.SoftplusParam, "exp": dd.ExpParam}[name]()


def _check_against_reference(dd, A0, F, labels, theta, param_name, columns=None,
                             grad_rtol=1e-8, **kwargs):
    prob = dd.Problem(A0, F, labels, T=T, beta=BETA)
    theta_before = theta.copy()
    loss, grad = dd.loss_and_grad(prob, theta, param=_param(dd, param_name), columns=columns,
                                  **kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(dense(A0), F, labels, T, BETA, theta,
                                                 param_name, columns=columns)
    assert type(loss) is float
    assert isinstance(grad, np.ndarray) and grad.shape == theta.shape
    assert grad.dtype == np.float64
    assert np.array_equal(theta, theta_before), "loss_and_grad modified theta"
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (loss, ref_loss)
    err = relative_error(grad, ref_grad)
    assert err <= grad_rtol, f"gradient relative error {err:.3e} > {grad_rtol:.0e}"
    return loss, grad


@pytest.mark.parametrize("param_name", PARAM_NAMES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("columns", [None, [4, 1, 2]], ids=["all", "subset"])
def test_small_problem_default_settings(dd, param_name, sparse, columns):
    """n = 10, A0 scale 0.3: a wrong-sign adjoint (seed package) errs by tens of percent here."""
    A0, F, labels, theta = random_arrays(10, 6, scale=0.3, seed=11, sparse=sparse)
    _check_against_reference(dd, A0, F, labels, theta, param_name, columns=columns)


@pytest.mark.parametrize("param_name", PARAM_NAMES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_k_equal_n_is_exact(dd, param_name, sparse):
    A0, F, labels, theta = random_arrays(10, 6, scale=0.3, seed=12, sparse=sparse)
    _check_against_reference(dd, A0, F, labels, theta, param_name, k=10, grad_rtol=1e-11)


@pytest.mark.parametrize("param_name", PARAM_NAMES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0])
def test_larger_than_k_default_settings(dd, param_name, sparse, scale):
    """n = 64 > k = 30: the Krylov projection is a real approximation here.

    At scale 0.3 the forward space needs ~28 of the 30 dimensions; at scale 1.0 (||T A|| ~ 30)
    one step of dimension 30 is not enough, so the result rests on the error control.
    """
    A0, F, labels, theta = random_arrays(64, 12, scale=scale, seed=13, sparse=sparse)
    _check_against_reference(dd, A0, F, labels, theta, param_name)


@pytest.mark.parametrize("param_name", PARAM_NAMES)
def test_larger_than_k_column_subset(dd, param_name):
    A0, F, labels, theta = random_arrays(64, 12, scale=0.3, seed=17)
    _check_against_reference(dd, A0, F, labels, theta, param_name, columns=[11, 0, 5, 7])


@pytest.mark.parametrize("param_name", PARAM_NAMES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_gradient_matches_finite_differences(dd, param_name, sparse):
    """Fourth-order central differences of the package's own loss (h = 1e-3)."""
    A0, F, labels, theta = random_arrays(8, 5, scale=0.3, seed=14, sparse=sparse)
    prob = dd.Problem(A0, F, labels, T=T, beta=BETA)
    param = _param(dd, param_name)
    _, grad = dd.loss_and_grad(prob, theta, param=param)
    fd = _central_fd(lambda th: dd.loss_and_grad(prob, th, param=param)[0], theta, 1e-3)
    assert relative_error(grad, fd) <= 1e-8


def test_loss_grad_sums_are_sums(dd):
    A0, F, labels, theta = random_arrays(12, 7, scale=0.3, seed=15)
    prob = dd.Problem(A0, F, labels, T=T, beta=BETA)
    columns = np.array([6, 2, 3])
    loss, grad = dd.loss_and_grad(prob, theta, columns=columns)
    loss_sum, grad_sum, count, info = dd.loss_grad_sums(prob, theta, columns=columns)
    assert count == 3 and isinstance(info, dict)
    assert type(loss_sum) is float
    assert abs(loss_sum / count - loss) <= 1e-15 * abs(loss)
    np.testing.assert_allclose(grad_sum / count, grad, rtol=1e-15, atol=0)
    # and the sum is the sum: the same as adding one-column sums
    parts = [dd.loss_grad_sums(prob, theta, columns=[j]) for j in columns]
    assert abs(sum(p[0] for p in parts) - loss_sum) <= 1e-13 * abs(loss_sum)
    assert relative_error(sum(p[1] for p in parts), grad_sum) <= 1e-13


def test_custom_param_protocol(dd):
    """Any object with diag_from_theta / dtheta_from_ddiag works; an exp map equals ExpParam."""

    class MyExp:
        def diag_from_theta(self, theta):
            return -np.exp(theta)

        def dtheta_from_ddiag(self, theta, g):
            return g * -np.exp(theta)

    A0, F, labels, theta = random_arrays(10, 4, scale=0.3, seed=16)
    prob = dd.Problem(A0, F, labels, T=T, beta=BETA)
    loss, grad = dd.loss_and_grad(prob, theta, param=MyExp())
    loss_e, grad_e = dd.loss_and_grad(prob, theta, param=dd.ExpParam())
    assert abs(loss - loss_e) <= 1e-15 * abs(loss_e)
    assert relative_error(grad, grad_e) <= 1e-15


def test_softplus_param_is_stable_for_large_theta(dd):
    theta = np.array([-1e3, -30.0, 0.0, 30.0, 1e3])
    p = dd.SoftplusParam()
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        d = p.diag_from_theta(theta)
        slope = p.dtheta_from_ddiag(theta, np.ones_like(theta))
    # a few ulps: exp(-x) turns x's rounding (x ~ 30) into ~2e-15 relative
    np.testing.assert_allclose(d, -np.logaddexp(0.0, theta), rtol=1e-14, atol=0)
    np.testing.assert_allclose(slope, -scipy.special.expit(theta), rtol=1e-14, atol=0)
    e = dd.ExpParam()
    np.testing.assert_allclose(e.diag_from_theta(theta[1:4]), -np.exp(theta[1:4]), rtol=1e-15)
    np.testing.assert_allclose(e.dtheta_from_ddiag(theta[1:4], 2.0 * np.ones(3)),
                               -2.0 * np.exp(theta[1:4]), rtol=1e-15)
