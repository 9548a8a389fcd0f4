"""Strong decay on the rational path: on a provably contractive operator the adjoint is
certified by the integrals it feeds (the gradient reads lambda(t) x(t)^T), not relative to
itself while it decays by e^-240 or more; checked against the exact reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import scipy.sparse as sp

import diagode_dist as dd
from diagode_dist import _march, adjoint
from diagode_dist.rational import is_contractive
from diagode_dist.reference import exact_loss_and_grad, relative_error

STIFFNESS = (1e3, 1e4, 1e5)


def _grid_2d(N):
    h = 1.0 / (N + 1)
    shift = sp.diags([np.ones(N - 1), np.ones(N - 1)], [-1, 1])
    eye = sp.identity(N)
    return sp.csr_matrix((sp.kron(eye, shift) + sp.kron(shift, eye)) / h**2), h


def _dissipative_mse(stiffness, N=5, seed=6):
    """A 2-D diffusion (N x N) whose diagonal dominates its rows (contractive), with x0 and an
    MSE loss at three observation times; ||TA|| ~ stiffness."""
    A0, h = _grid_2d(N)
    n, rng = N * N, np.random.default_rng(seed)
    magnitude = (4.0 / h**2) * (1.0 + 0.1 * rng.uniform(0.0, 1.0, n))
    theta = magnitude + np.log(-np.expm1(-magnitude))  # softplus(theta) = magnitude
    T = stiffness / (8.0 / h**2)
    prob = dd.Problem(A0, rng.standard_normal((n, 3)), T=T, x0=rng.standard_normal((n, 3)),
                      obs_times=[T / 4, T / 2, T], targets=0.1 * rng.standard_normal((3, n, 3)),
                      loss="mse")
    return prob, theta


def test_contractive_is_proven_by_gershgorin_or_by_the_pivots_of_the_symmetric_part():
    A0, h = _grid_2d(4)  # its largest eigenvalue: 4 cos(pi h) / h^2 = 3.24 / h^2
    assert is_contractive(A0, np.full(16, -4.0 / h**2))  # a dominant diagonal
    assert not is_contractive(A0, np.full(16, -3.9 / h**2))  # stable, but not by Gershgorin
    assert is_contractive(A0, np.full(16, -3.9 / h**2), horizon=1.0)  # by the pivots
    assert not is_contractive(A0, np.full(16, -3.0 / h**2), horizon=1.0)  # lambda_max > 0
    upwind = sp.csr_matrix(sp.diags([np.full(15, 3.0)], [1]))
    assert not is_contractive(upwind, np.full(16, -2.0))  # Gershgorin on (A + A^T) / 2: -2 + 3 > 0
    assert is_contractive(upwind, np.full(16, -3.0))


@pytest.mark.parametrize("stiffness", STIFFNESS)
def test_classification_on_a_dissipative_grid_matches_the_exact_reference(stiffness):
    """The benchmark's dissipative variant on a 16 x 16 grid (the adjoint decays by e^-35 ..
    e^-3500 over T): right to rtol with an honest estimate, and the adjoint space covers the
    interval well below k (followed relative to itself it needed k = 60 at ||TA|| = 1e4, and
    k = 30 was refused)."""
    from benchmarks.stiff import stiff_problem

    prob, theta = stiff_problem(16, stiffness, S=4, dissipative=True)
    # At ||TA|| = 1e5 SciPy's expm is off by eps ||TA|| (1.7e-11 measured), more than the
    # answer (2.8e-15): ball arithmetic there (29 s), SciPy below.
    loss_ref, grad_ref = exact_loss_and_grad(prob, theta, precise=stiffness >= 1e5)
    loss, grad, info = dd.loss_and_grad(prob, theta, k=30, rtol=1e-8, method="rational",
                                        return_info=True)
    err = relative_error(grad, grad_ref)
    assert info["rtol_met"] and err <= 1e-7, err
    assert info["error_estimate"] >= err / 10, (info["error_estimate"], err)
    assert abs(loss - loss_ref) <= 1e-7 * abs(loss_ref)
    assert info["adjoint_dim"] < 20


@pytest.mark.parametrize("stiffness", STIFFNESS)
def test_observation_times_and_x0_on_a_contractive_operator(stiffness):
    """Three observation intervals, x0 and MSE, ||TA|| = 1e3 .. 1e5, against the exact
    reference in ball arithmetic. Only theta asked for: certified by the integrals (a small
    adjoint space). dL/dx0 asked for too: lambda(0) has no x to weigh it, so the adjoint is
    followed relative to itself, and dL/dx0 is right as well."""
    prob, theta = _dissipative_mse(stiffness)
    ref = exact_loss_and_grad(prob, theta, precise=True, wrt=("theta", "x0"))[1]
    for rtol in (1e-8, 1e-10):
        _, grad, info = dd.loss_and_grad(prob, theta, k=30, rtol=rtol, method="rational",
                                         return_info=True)
        err = relative_error(grad, ref["theta"])
        assert info["rtol_met"] and err <= 10 * rtol, (rtol, err)
        assert info["error_estimate"] >= err / 10, (rtol, info["error_estimate"], err)
        by_integrals = info["adjoint_dim"]
        _, grads, info = dd.loss_and_grad(prob, theta, k=30, rtol=rtol, method="rational",
                                          return_info=True, wrt=("theta", "x0"))
        assert relative_error(grads["theta"], ref["theta"]) <= 10 * rtol
        if np.linalg.norm(ref["x0"]) > 0:  # at 1e5 lambda(0) underflows to zero
            assert relative_error(grads["x0"], ref["x0"]) <= 10 * rtol
        assert info["adjoint_dim"] > by_integrals


def test_a_refusal_by_the_integrals_falls_back_to_following_the_adjoint(monkeypatch):
    """With the bound of ||x(t)|| inflated 1e12 times, the charges for the states' errors
    refuse the march certified by the integrals; the chunk's adjoint is then marched again
    relative to itself, and the answer is still right."""
    reach = _march._reach
    monkeypatch.setattr(_march, "_reach",
                        lambda *a: None if reach(*a) is None else 1e12 * reach(*a))
    calls, march = [], adjoint.march_adjoint

    def spy(*args, **kwargs):
        grad = march(*args, **kwargs)
        acc = args[8]
        calls.append((acc.reach is not None, float(np.max(acc.adjoint))))
        return grad

    monkeypatch.setattr(adjoint, "march_adjoint", spy)
    prob, theta = _dissipative_mse(1e4)
    ref = exact_loss_and_grad(prob, theta, precise=True)[1]
    _, grad, info = dd.loss_and_grad(prob, theta, k=30, rtol=1e-8, method="rational",
                                     return_info=True)
    assert [certified for certified, _ in calls] == [True, False]
    assert calls[0][1] > 1e-8 >= calls[1][1]
    assert relative_error(grad, ref) <= 1e-7


def test_the_symmetric_bound_of_the_state_along_a_step():
    """For a symmetric contractive A each eigencomponent of x(t) = e^(tA) x0 + phi(t) f is
    monotone in t, so ||x(t)|| <= (||x(a)||^2 + ||x(b)||^2)^(1/2) on [a, b]; a state that
    first decays and then builds up under the forcing comes close to it."""
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    A = Q @ np.diag(-np.logspace(-1, 3, 12)) @ Q.T
    x0, f = 5.0 * rng.standard_normal(12), rng.standard_normal(12)
    aug = np.zeros((13, 13))
    aug[:12, :12], aug[:12, 12] = A, f
    times = np.linspace(0.0, 20.0, 401)
    xs = np.array([(sla.expm(t * aug) @ np.r_[x0, 1.0])[:12] for t in times])
    norms = np.linalg.norm(xs, axis=1)
    steps = np.array([20.0 * np.linalg.norm(f)])
    for symmetric in (True, False):  # the bound for a symmetric A, and the general one
        bound = _march._reach_bounds(xs[:1], xs[-1:], steps, symmetric)
        assert norms.max() <= bound[0] * (1 + 1e-12)
    assert norms.min() < 0.5 * min(norms[0], norms[-1])  # not monotone itself


def test_edge_weights_certified_by_the_integrals(monkeypatch):
    """Edge-weight gradients read lambda(t) x(t)^T on the pattern's entries, as the diagonal's
    do: certified by the integrals too (with the bound of ||x(t)|| for a general A, as W makes
    A non-symmetric), against the exact reference."""
    reach, used = _march._reach, []
    monkeypatch.setattr(_march, "_reach", lambda *a: used.append(reach(*a)) or used[-1])
    prob, theta_d = _dissipative_mse(1e4)
    pattern = sp.csr_matrix(prob.A0 != 0, dtype=float)
    param = dd.Stack(dd.SoftplusParam(), dd.EdgeParam(pattern, transform="identity"))
    theta = np.concatenate([theta_d, np.zeros(pattern.nnz)])
    _, grad, info = dd.loss_and_grad(prob, theta, param=param, k=30, rtol=1e-8,
                                     method="rational", return_info=True)
    ref = exact_loss_and_grad(prob, theta, param, precise=True)[1]
    assert used and all(r is not None for r in used)
    err = relative_error(grad, ref)
    assert info["rtol_met"] and err <= 1e-7 and info["error_estimate"] >= err / 10, err
