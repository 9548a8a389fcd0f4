"""solve / predict / predict_proba against states from the exact dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp

import diagode_dist as dd
from diagode_dist.reference import exact_loss_and_grad, observed_states, relative_error

N, S = 12, 5


def _classification(seed=0):
    rng = np.random.default_rng(seed)
    A0 = 0.3 * rng.standard_normal((N, N))
    np.fill_diagonal(A0, 0.0)
    x0 = rng.standard_normal((N, S))
    return dd.Problem(A0, rng.standard_normal((N, S)), rng.integers(0, N, S), T=2.0, beta=4.0,
                      x0=x0)


def test_solve_matches_reference_states_at_any_times():
    prob = _classification()
    theta = np.random.default_rng(1).standard_normal(N)
    times = [0.3, 2.0, 3.5]  # 3.5 > T: a forecast
    states = dd.solve(prob, theta, times=times)
    exact = observed_states(prob.A0, prob.F, prob.x0, times, theta)
    assert states.shape == (3, N, S)
    for i in range(3):
        assert relative_error(states[i], exact[i]) <= 1e-11
    default = dd.solve(prob, theta)  # the loss's observation times: T
    assert default.shape == (1, N, S)
    assert relative_error(default[0], exact[1]) <= 1e-11


def test_solve_with_a_generator_and_columns():
    prob = _classification()
    P = sp.random(N, N, density=0.3, random_state=2, format="csr")
    param = dd.Stack(dd.SoftplusParam(), dd.GeneratorParam(P, "exp"))
    theta = 0.3 * np.random.default_rng(3).standard_normal(param.theta_size(N))
    states = dd.solve(prob, theta, param, times=[1.0], columns=[4, 1])
    W = np.zeros((N, N))
    W[P.nonzero()] = np.exp(theta[N:])
    A = prob.A0 - np.diag(np.logaddexp(0.0, theta[:N])) + W - np.diag(W.sum(axis=1))
    for out, j in enumerate([4, 1]):
        M = np.zeros((N + 1, N + 1))
        M[:N, :N], M[:N, N] = A, prob.F[:, j]
        exact = (scipy.linalg.expm(M) @ np.append(prob.x0[:, j], 1.0))[:N]
        assert relative_error(states[0, :, out], exact) <= 1e-11


def test_predict_and_predict_proba():
    prob = _classification()
    theta = np.random.default_rng(1).standard_normal(N)
    XT = observed_states(prob.A0, prob.F, prob.x0, [prob.T], theta)[0]
    labels = dd.predict(prob, theta)
    np.testing.assert_array_equal(labels, XT.argmax(axis=0))
    proba = dd.predict_proba(prob, theta)
    z = prob.beta * XT
    exact = np.exp(z - z.max(axis=0)) / np.exp(z - z.max(axis=0)).sum(axis=0)
    assert proba.shape == (N, S)
    np.testing.assert_allclose(proba, exact, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(proba.sum(axis=0), 1.0, rtol=1e-14)


def test_bad_inputs():
    prob = _classification()
    theta = np.zeros(N)
    with pytest.raises(ValueError, match="times"):
        dd.solve(prob, theta, times=[1.0, 0.5])
    with pytest.raises(ValueError, match="times"):
        dd.solve(prob, theta, times=[0.0])
    with pytest.raises(ValueError, match="shape"):
        dd.solve(prob, np.zeros(N + 1))
    mse = dd.Problem(prob.A0, prob.F, T=1.0, obs_times=[1.0], loss="mse",
                     targets=np.zeros((1, N, S)))
    with pytest.raises(ValueError, match="classification"):
        dd.predict(mse, theta)
    with pytest.raises(TypeError, match="prob"):
        dd.predict_proba("problem", theta)


def _linear_problem(A0, upstream, times, seed=0):
    """A problem whose loss is sum_i <upstream[i], x(t_i)> (its jumps are ``upstream``)."""
    n, S = upstream.shape[1:]
    rng = np.random.default_rng(seed)

    def linear(states, columns):
        jumps = upstream[:, :, columns].transpose(0, 2, 1)
        return (jumps * states).sum(axis=(0, 2)), jumps

    return dd.Problem(A0, rng.standard_normal((n, S)), x0=rng.standard_normal((n, S)),
                      T=times[-1], obs_times=times, loss=linear)


@pytest.mark.parametrize("method", ["polynomial", "rational"])
def test_forward_and_adjoint_pass_match_the_exact_reference(method):
    """forward_pass (states) then adjoint_pass (upstream gradient as the jumps), as a layer's
    forward and backward: states, dL/dtheta, dL/dx0, dL/dF of the dense reference. A column
    without jumps (zero upstream) is part of it."""
    from diagode_dist.adjoint import adjoint_pass, forward_pass

    A0 = 20.0 * sp.csr_matrix(sp.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(N, N)))  # stiff
    rng = np.random.default_rng(4)
    upstream = rng.standard_normal((2, N, S))
    upstream[:, :, 1] = 0.0
    times = [0.5, 1.5]
    prob = _linear_problem(A0, upstream, times)
    theta = rng.standard_normal(N)
    fwd = forward_pass(prob, theta, method=method)
    exact = observed_states(A0.toarray(), prob.F, prob.x0, times, theta)
    for i in range(2):
        assert relative_error(fwd.states[i], exact[i]) <= 1e-11
    grads, info = adjoint_pass(fwd, upstream, ("theta", "x0", "F"))
    assert info["method"] == method and info["rtol_met"]
    _, ref = exact_loss_and_grad(prob, theta, wrt=("theta", "x0", "F"))
    for name in ("theta", "x0", "F"):  # the reference: means over the columns
        assert relative_error(grads[name], ref[name] * S) <= 1e-10
    again, _ = adjoint_pass(fwd, 2.0 * upstream)  # the kept marches serve any upstream
    assert relative_error(again["theta"], 2.0 * ref["theta"] * S) <= 1e-10


def test_adjoint_pass_keeps_within_the_budget_and_rebuilds_the_rest(monkeypatch):
    """The kept bases of every chunk together stay within half the memory budget (the chunks'
    intervals all live until the adjoint pass); bases beyond it are rebuilt, exactly."""
    import diagode_dist.adjoint as core
    from diagode_dist._march import projection_bytes

    budget = 40_000  # bytes: a chunk of 1 column; a few bases kept in all
    monkeypatch.setattr(core, "memory_budget", lambda xp: budget)
    rng = np.random.default_rng(5)
    upstream = rng.standard_normal((1, N, S))
    prob = _linear_problem(rng.standard_normal((N, N)), upstream, [3.0])
    theta = rng.standard_normal(N)
    fwd = core.forward_pass(prob, theta, k=12)  # k < n + 1: sub-steps
    assert len(fwd.chunks) > 1
    intervals = [iv for chunk in fwd.chunks for iv in chunk.intervals]
    bases = sum(int(iv.dims.max()) * iv.start.nbytes for iv in intervals)
    assert bases > budget  # all would not fit (one chunk's share each would have kept more)
    kept = [projection_bytes(iv.projection) for iv in intervals if iv.projection is not None]
    assert 0 < sum(kept) <= budget // 2
    grads, _ = core.adjoint_pass(fwd, upstream)
    _, ref = exact_loss_and_grad(prob, theta)
    assert relative_error(grads["theta"], ref * S) <= 1e-10
    with pytest.raises(ValueError, match="keep=True"):
        core.adjoint_pass(core.forward_pass(prob, theta, keep=False), upstream)
