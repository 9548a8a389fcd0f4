"""Symmetric A0: detection, the Lanczos path, and its accuracy.

For a symmetric A0 the forward projection (from x0 = 0, whose augmented Krylov space is
e_{n+1} plus the Krylov space of A on f) and the adjoint projection are Lanczos: each new
vector is orthogonalised against the last two only (O(k n) per column, not O(k^2 n)). The
results must match the dense reference to the same accuracy as Arnoldi's.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from conftest import random_arrays

import diagode_dist as dd
from diagode_dist import _march, krylov
from diagode_dist.reference import (
    inverse_softplus,
    laplacian_2d,
    mse_loss,
    reference_loss_and_grad,
    reference_obs_loss_and_grad,
    relative_error,
)

RTOL = 1e-8
BOUND = 10 * RTOL


@pytest.fixture
def spy(monkeypatch):
    """Records every Krylov projection's ``symmetric`` flag and CGS2 basis length."""
    record = {"symmetric": [], "ortho_len": []}
    arnoldi, cgs2 = _march.arnoldi, krylov._cgs2

    def arnoldi_spy(*args, symmetric=False, **kwargs):
        record["symmetric"].append(symmetric)
        return arnoldi(*args, symmetric=symmetric, **kwargs)

    def cgs2_spy(basis, w):
        record["ortho_len"].append(basis.shape[0])
        return cgs2(basis, w)

    monkeypatch.setattr(_march, "arnoldi", arnoldi_spy)
    monkeypatch.setattr(krylov, "_cgs2", cgs2_spy)
    return record


def _symmetric_random(n, S, seed, sparse=False):
    A0, F, labels, theta = random_arrays(n, S, scale=0.2, seed=seed, sparse=sparse,
                                         symmetric=True)
    return A0, F, labels, theta


# ---- detection -------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_detects_exact_symmetry(sparse):
    A0, F, labels, _ = _symmetric_random(12, 3, seed=1, sparse=sparse)
    assert dd.Problem(A0, F, labels).symmetric is True


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_detects_asymmetry_of_one_ulp(sparse):
    A0, F, labels, _ = _symmetric_random(12, 3, seed=2)
    A0 = A0.copy()
    i, j = np.argwhere(A0 != 0)[0]
    A0[i, j] = np.nextafter(A0[i, j], np.inf)
    A0 = scipy.sparse.csr_matrix(A0) if sparse else A0
    assert dd.Problem(A0, F, labels).symmetric is False


def test_random_matrix_is_not_symmetric():
    A0, F, labels, _ = random_arrays(12, 3, seed=3)
    assert dd.Problem(A0, F, labels).symmetric is False


def test_laplacian_is_symmetric_and_declaration_wins():
    A0, _ = laplacian_2d(6)
    F = np.ones((36, 2))
    assert dd.Problem(A0, F, [0, 1]).symmetric is True
    assert dd.Problem(A0, F, [0, 1], symmetric=False).symmetric is False


# ---- the Lanczos path ------------------------------------------------------------------------

def test_lanczos_is_used_and_orthogonalises_against_two_vectors(spy):
    A0, F, labels, theta = _symmetric_random(40, 5, seed=4)
    dd.loss_and_grad(dd.Problem(A0, F, labels), theta, k=30)  # one forward step: from t = 0
    assert spy["symmetric"] and all(spy["symmetric"]), spy["symmetric"]
    assert max(spy["ortho_len"]) <= 2
    spy["symmetric"].clear()
    spy["ortho_len"].clear()
    dd.loss_and_grad(dd.Problem(A0, F, labels, symmetric=False), theta, k=30)
    assert not any(spy["symmetric"])
    assert max(spy["ortho_len"]) > 2  # Arnoldi: against the whole basis


def test_x0_keeps_lanczos_for_the_adjoint_only(spy):
    """From x0 != 0 the augmented forward space is not Lanczos-structured: Arnoldi there."""
    A0, F, labels, theta = _symmetric_random(30, 4, seed=5)
    x0 = np.random.default_rng(6).standard_normal(F.shape)
    dd.loss_and_grad(dd.Problem(A0, F, labels, x0=x0), theta, k=20)
    assert False in spy["symmetric"] and True in spy["symmetric"]


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_lanczos_matches_reference_random(param_name, sparse):
    """n = 64 > k = 20: a real approximation, against the dense reference."""
    A0, F, labels, theta = _symmetric_random(64, 6, seed=7, sparse=sparse)
    param = {"softplus": dd.SoftplusParam(), "exp": dd.ExpParam()}[param_name]
    prob = dd.Problem(A0, F, labels, T=2.0, beta=10.0)
    assert prob.symmetric
    loss, grad, info = dd.loss_and_grad(prob, theta, param=param, k=20, rtol=RTOL,
                                        return_info=True)
    ref_loss, ref_grad = reference_loss_and_grad(A0, F, labels, 2.0, 10.0, theta, param_name)
    assert info["rtol_met"] is True
    assert abs(loss - ref_loss) <= BOUND * abs(ref_loss)
    assert relative_error(grad, ref_grad) <= BOUND


@pytest.fixture(scope="module")
def stiff_laplacian():
    """16 x 16 Laplacian, T = 1 (||T A||_1 ~ 2.3e3), S = 6, and its dense reference."""
    A0, diag = laplacian_2d(16)
    rng = np.random.default_rng(8)
    theta = inverse_softplus(diag * (1.0 + 0.1 * rng.standard_normal(256)))
    F = rng.standard_normal((256, 6))
    labels = rng.integers(0, 256, 6)
    return A0, F, labels, theta, reference_loss_and_grad(A0, F, labels, 1.0, 10.0, theta)


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [None, False], ids=["lanczos", "arnoldi"])
@pytest.mark.parametrize("k", [30, 10])
def test_stiff_laplacian_lanczos_and_arnoldi_within_10_rtol(stiff_laplacian, symmetric, k):
    A0, F, labels, theta, (ref_loss, ref_grad) = stiff_laplacian
    prob = dd.Problem(A0, F, labels, T=1.0, beta=10.0, symmetric=symmetric)
    loss, grad, info = dd.loss_and_grad(prob, theta, k=k, rtol=RTOL, return_info=True)
    assert info["rtol_met"] is True, info
    assert abs(loss - ref_loss) <= BOUND * abs(ref_loss)
    assert relative_error(grad, ref_grad) <= BOUND


def test_lanczos_with_observations_and_x0():
    A0, F, _, theta = _symmetric_random(40, 4, seed=9, sparse=True)
    rng = np.random.default_rng(10)
    x0 = rng.standard_normal(F.shape)
    times = [0.5, 1.0, 2.0]
    targets = rng.standard_normal((3, 40, 4))
    prob = dd.Problem(A0, F, x0=x0, T=2.0, obs_times=times, targets=targets, loss="mse")
    assert prob.symmetric
    loss, grad = dd.loss_and_grad(prob, theta, k=16, rtol=RTOL)
    ref_loss, ref_grad = reference_obs_loss_and_grad(A0, F, x0, times, mse_loss(targets), theta)
    assert abs(loss - ref_loss) <= BOUND * abs(ref_loss)
    assert relative_error(grad, ref_grad) <= BOUND
