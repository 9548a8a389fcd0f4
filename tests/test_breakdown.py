"""Happy breakdown: an invariant Krylov space gives the exact answer and the column stays in.

Cases: A0 = 0 (diagonal A), a forcing column that is an eigenvector of A,
and a zero forcing column.  Each is compared with the exact dense reference, and the loss must be
the mean over ALL columns (the seed package dropped such columns).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from conftest import dense, random_arrays

import diagode_dist as dd
from diagode_dist.reference import reference_loss_and_grad, relative_error

T, BETA = 2.0, 10.0
LOSS_RTOL, GRAD_RTOL = 1e-12, 1e-11


def _param(name):
    return {"softplus": dd.SoftplusParam, "exp": dd.ExpParam}[name]()


def _assert_exact(A0, F, labels, theta, param_name="softplus", columns=None):
    prob = dd.Problem(A0, F, labels, T=T, beta=BETA)
    loss, grad = dd.loss_and_grad(prob, theta, param=_param(param_name), columns=columns)
    ref_loss, ref_grad = reference_loss_and_grad(dense(A0), F, labels, T, BETA, theta,
                                                 param_name, columns=columns)
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (loss, ref_loss)
    err = relative_error(grad, ref_grad)
    assert err <= GRAD_RTOL, f"gradient relative error {err:.3e}"
    return prob, loss, grad


def _assert_no_column_dropped(prob, theta, loss, param_name="softplus"):
    """The all-column loss is the mean of the one-column losses, and every column is counted."""
    param = _param(param_name)
    per_column = [dd.loss_and_grad(prob, theta, param=param, columns=[j])[0]
                  for j in range(prob.S)]
    assert abs(loss - np.mean(per_column)) <= 1e-13 * abs(loss)
    _, _, count, _ = dd.loss_grad_sums(prob, theta, param=param)
    assert count == prob.S


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_zero_A0_distinct_diagonal(param_name, sparse):
    n, S = 12, 5
    _, F, labels, theta = random_arrays(n, S, seed=21)
    A0 = scipy.sparse.csr_matrix((n, n)) if sparse else np.zeros((n, n))
    prob, loss, _ = _assert_exact(A0, F, labels, theta, param_name)
    _assert_no_column_dropped(prob, theta, loss, param_name)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_zero_A0_two_distinct_diagonal_values(sparse):
    """A = diag with two values: forward and adjoint spaces break down at dimension 3 and 2."""
    n, S = 40, 6
    _, F, labels, _ = random_arrays(n, S, seed=22)
    theta = np.where(np.arange(n) % 2 == 0, 0.3, -0.4)
    A0 = scipy.sparse.csr_matrix((n, n)) if sparse else np.zeros((n, n))
    prob, loss, _ = _assert_exact(A0, F, labels, theta)
    _assert_no_column_dropped(prob, theta, loss)


def _real_eigenvector(A: np.ndarray) -> np.ndarray:
    """A real unit eigenvector of real A (odd size, so a real eigenvalue exists)."""
    w, V = np.linalg.eig(A)
    i = int(np.argmin(np.abs(w.imag)))
    assert abs(w[i].imag) == 0.0
    v = np.real(V[:, i])
    v /= np.linalg.norm(v)
    assert np.linalg.norm(A @ v - w[i].real * v) <= 1e-13 * np.linalg.norm(A, 1)
    return v


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "nonsymmetric"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_forcing_is_an_eigenvector(symmetric, sparse):
    n, S = 41, 6
    A0, F, labels, theta = random_arrays(n, S, scale=0.05, seed=23, symmetric=symmetric,
                                         sparse=sparse)
    A = dense(A0) - np.diag(np.logaddexp(0.0, theta))
    F[:, 2] = 1.5 * _real_eigenvector(A)
    prob, loss, _ = _assert_exact(A0, F, labels, theta)
    _assert_no_column_dropped(prob, theta, loss)
    _assert_exact(A0, F, labels, theta, columns=[2])


def test_zero_forcing_column():
    """f_j = 0 (x0 = 0): x_j(T) = 0, its loss is log(n), it counts in the mean."""
    n, S = 12, 5
    A0, F, labels, theta = random_arrays(n, S, scale=0.3, seed=24)
    F[:, 3] = 0.0
    prob, loss, _ = _assert_exact(A0, F, labels, theta)
    _assert_no_column_dropped(prob, theta, loss)
    single, grad_single = dd.loss_and_grad(prob, theta, columns=[3])
    assert abs(single - np.log(n)) <= 1e-14 * np.log(n)
    # x_3(t) = 0 for all t, so the column contributes nothing to the gradient
    _, grad_all = dd.loss_and_grad(prob, theta)
    assert np.all(np.isfinite(grad_single))
    assert np.linalg.norm(grad_single) <= 1e-14 * np.linalg.norm(grad_all)
