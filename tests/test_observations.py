"""Initial states, observation times, MSE and user losses.

First the dense reference of ``diagode_dist.reference`` is checked against finite differences of a
loss computed with plain ``expm`` (and against ``reference.py`` where both apply); then the
package against that reference and against finite differences of its own loss. Relative errors
are ||value - exact||_2 / ||exact||_2.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from conftest import dense, random_arrays

import diagode_dist as dd
from diagode_dist.reference import (
    loss_only,
    mse_loss,
    observed_states,
    reference_loss_and_grad,
    reference_obs_loss_and_grad,
    relative_error,
)

T = 2.0
TIMES = [0.5, 1.0, 2.0]
GRAD_RTOL = 1e-8  # the bound on gradient errors against the reference and FD


def _xp(a):
    """The array module of ``a`` (a user loss must work on NumPy and CuPy alike)."""
    try:
        import cupy

        return cupy.get_array_module(a)
    except ImportError:
        return np


def _param(name):
    return {"softplus": dd.SoftplusParam, "exp": dd.ExpParam}[name]()


def _unit(n, k):
    e = np.zeros(n)
    e[k] = 1.0
    return e


def _central_fd(loss_of, theta, h, order=4):
    """Central differences: 4th order (-L(2h) + 8L(h) - 8L(-h) + L(-2h)) / 12h, or 2nd order."""
    grad = np.empty(theta.size)
    for k in range(theta.size):
        e = h * _unit(theta.size, k)
        if order == 4:
            grad[k] = (-loss_of(theta + 2 * e) + 8 * loss_of(theta + e)
                       - 8 * loss_of(theta - e) + loss_of(theta - 2 * e)) / (12 * h)
        else:
            grad[k] = (loss_of(theta + e) - loss_of(theta - e)) / (2 * h)
    return grad


def _observation_data(n, S, seed, sparse=False, scale=0.3):
    """(A0, F, x0, targets, theta): targets are noisy states of a perturbed theta."""
    A0, F, _, theta = random_arrays(n, S, scale=scale, seed=seed, sparse=sparse)
    rng = np.random.default_rng(seed + 1000)
    x0 = rng.standard_normal((n, S))
    true_states = observed_states(dense(A0), F, x0, TIMES, theta + 0.3 * rng.standard_normal(n))
    targets = true_states + 0.05 * rng.standard_normal(true_states.shape)
    return A0, F, x0, targets, theta


def pseudo_huber(delta=0.5, column_weights=None):
    """A user loss: time-weighted pseudo-Huber, per-column weights by *global* column id.

    l_j = w_j sum_i a_i sum_k delta^2 (sqrt(1 + (x_k(t_i) / delta)^2) - 1), a_i = i + 1.
    Written with the array module of ``states``; smooth, so finite differences apply.
    """

    def fn(states, columns):
        xp = _xp(states)
        m = states.shape[0]
        a = xp.arange(1, m + 1, dtype=states.dtype)[:, None, None]
        w = (xp.ones(len(columns), dtype=states.dtype) if column_weights is None
             else xp.asarray(column_weights[np.asarray(columns)], dtype=states.dtype))
        r = states / delta
        root = xp.sqrt(1.0 + r * r)
        loss = w * (a * delta**2 * (root - 1.0)).sum(axis=(0, 2))
        jumps = w[None, :, None] * a * (states / root)
        return loss, jumps

    return fn


# --------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("loss_kind", ["mse", "huber"])
def test_reference_matches_finite_differences(param_name, loss_kind):
    A0, F, x0, targets, theta = _observation_data(6, 3, seed=1)
    fn = mse_loss(targets) if loss_kind == "mse" else pseudo_huber(column_weights=np.arange(1, 4.))
    columns = [2, 0, 2]  # a repeated column counts twice
    loss, grad = reference_obs_loss_and_grad(A0, F, x0, TIMES, fn, theta, param_name, columns)
    assert abs(loss - loss_only(A0, F, x0, TIMES, fn, theta, param_name, columns)) \
        <= 1e-13 * abs(loss)
    fd = _central_fd(lambda th: loss_only(A0, F, x0, TIMES, fn, th, param_name, columns),
                     theta, 1e-5, order=2)
    assert relative_error(grad, fd) <= 1e-7  # 2nd-order FD: O(h^2) + O(eps / h) ~ 1e-10


def test_reference_agrees_with_the_classification_reference():
    """A user loss equal to the classification loss at t_1 = T gives reference.py's answer."""
    A0, F, labels, theta = random_arrays(7, 4, scale=0.3, seed=2)
    x0 = np.random.default_rng(3).standard_normal((7, 4))
    beta = 10.0

    def classification(states, columns):
        z = beta * states[0]
        lse = scipy.special.logsumexp(z, axis=1)
        rows = np.arange(z.shape[0])
        softmax = scipy.special.softmax(z, axis=1)
        softmax[rows, labels[columns]] -= 1.0
        return lse - z[rows, labels[columns]], (beta * softmax)[None]

    loss, grad = reference_obs_loss_and_grad(A0, F, x0, [T], classification, theta)
    ref_loss, ref_grad = reference_loss_and_grad(A0, F, labels, T, beta, theta, x0=x0)
    assert abs(loss - ref_loss) <= 1e-13 * abs(ref_loss)
    assert relative_error(grad, ref_grad) <= 1e-12


def test_reference_sees_the_jumps():
    """Dropping the early observations' jumps changes the gradient far beyond 1e-8."""
    A0, F, x0, targets, theta = _observation_data(6, 3, seed=4)
    _, grad = reference_obs_loss_and_grad(A0, F, x0, TIMES, mse_loss(targets), theta)

    def last_only(states, columns):
        loss, jumps = mse_loss(targets)(states, columns)
        jumps[:-1] = 0.0
        return loss, jumps

    _, grad_last = reference_obs_loss_and_grad(A0, F, x0, TIMES, last_only, theta)
    assert relative_error(grad_last, grad) > 1e-2


# --------------------------------------------------------------------------------------------
# The package against the reference and finite differences
# --------------------------------------------------------------------------------------------

def _mse_problem(A0, F, x0, targets, **kw):
    return dd.Problem(A0, F, x0=x0, T=T, obs_times=TIMES, targets=targets, loss="mse", **kw)


def _check(prob, A0, F, x0, fn, theta, param_name, columns=None, **kwargs):
    loss, grad, info = dd.loss_and_grad(prob, theta, param=_param(param_name), columns=columns,
                                        return_info=True, **kwargs)
    ref_loss, ref_grad = reference_obs_loss_and_grad(dense(A0), F, x0, TIMES, fn, theta,
                                                     param_name, columns)
    assert type(loss) is float and grad.shape == theta.shape and grad.dtype == np.float64
    assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss), (loss, ref_loss)
    err = relative_error(grad, ref_grad)
    assert err <= GRAD_RTOL, f"gradient relative error {err:.3e} > {GRAD_RTOL:.0e}"
    assert info["rtol_met"], info
    return loss, grad


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("columns", [None, [4, 1, 4]], ids=["all", "repeated"])
def test_mse_with_x0_matches_reference(param_name, sparse, columns):
    A0, F, x0, targets, theta = _observation_data(12, 6, seed=5, sparse=sparse)
    prob = _mse_problem(A0, F, x0, targets)
    _check(prob, A0, F, x0, mse_loss(targets), theta, param_name, columns)


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
def test_mse_larger_than_k(param_name):
    """n = 64 > k: real Krylov approximations, sub-steps between observation times."""
    A0, F, x0, targets, theta = _observation_data(64, 8, seed=6, scale=0.1)
    prob = _mse_problem(A0, F, x0, targets)
    _check(prob, A0, F, x0, mse_loss(targets), theta, param_name, k=12, rtol=1e-10)


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
def test_mse_matches_finite_differences(param_name):
    A0, F, x0, targets, theta = _observation_data(8, 4, seed=7)
    prob = _mse_problem(A0, F, x0, targets)
    param = _param(param_name)
    _, grad = dd.loss_and_grad(prob, theta, param=param)
    fd = _central_fd(lambda th: dd.loss_and_grad(prob, th, param=param)[0], theta, 1e-3)
    assert relative_error(grad, fd) <= GRAD_RTOL


def test_user_loss_matches_reference_and_finite_differences():
    A0, F, x0, _, theta = _observation_data(10, 5, seed=8)
    weights = np.array([1.0, 0.5, 2.0, 1.5, 0.25])
    fn = pseudo_huber(column_weights=weights)
    prob = dd.Problem(A0, F, x0=x0, T=T, obs_times=TIMES, loss=fn)
    columns = [3, 0, 4]  # the callable must receive these global ids
    loss, grad = _check(prob, A0, F, x0, fn, theta, "softplus", columns)
    fd = _central_fd(lambda th: dd.loss_and_grad(prob, th, columns=columns)[0], theta, 1e-3)
    assert relative_error(grad, fd) <= GRAD_RTOL
    # a selected sub-problem still hands the user loss global column ids
    loss_sel, grad_sel = dd.loss_and_grad(prob.select(np.array([4, 3, 0])), theta,
                                          columns=[1, 2, 0])
    assert abs(loss_sel - loss) <= 1e-13 * abs(loss)
    assert relative_error(grad_sel, grad) <= 1e-13


def test_user_loss_sees_the_states_at_the_observation_times():
    A0, F, x0, _, theta = _observation_data(9, 3, seed=9)
    seen = {}

    def spy(states, columns):
        seen["states"], seen["columns"] = states.copy(), np.array(columns)
        return (states ** 2).sum(axis=(0, 2)), 2 * states

    prob = dd.Problem(A0, F, x0=x0, T=T, obs_times=TIMES, loss=spy)
    dd.loss_and_grad(prob, theta, max_chunk_columns=3)
    exact = observed_states(A0, F, x0, TIMES, theta)  # (m, n, S)
    assert seen["states"].shape == (3, 3, 9)
    np.testing.assert_array_equal(seen["columns"], [0, 1, 2])
    assert relative_error(seen["states"], exact.transpose(0, 2, 1)) <= 1e-10


def test_last_observation_before_T():
    """Observations ending at t_m < T: nothing after t_m enters the loss or the gradient."""
    A0, F, x0, targets, theta = _observation_data(10, 4, seed=10)
    loss, grad = dd.loss_and_grad(_mse_problem(A0, F, x0, targets), theta)
    later = dd.Problem(A0, F, x0=x0, T=5.0, obs_times=TIMES, targets=targets, loss="mse")
    loss5, grad5 = dd.loss_and_grad(later, theta)
    assert abs(loss5 - loss) <= 1e-13 * abs(loss)
    assert relative_error(grad5, grad) <= 1e-12


def test_classification_with_x0_matches_reference():
    A0, F, labels, theta = random_arrays(12, 5, scale=0.3, seed=12)
    x0 = np.random.default_rng(13).standard_normal((12, 5))
    prob = dd.Problem(A0, F, labels, T=T, beta=10.0, x0=x0)
    loss, grad = dd.loss_and_grad(prob, theta)
    ref_loss, ref_grad = reference_loss_and_grad(A0, F, labels, T, 10.0, theta, x0=x0)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert relative_error(grad, ref_grad) <= GRAD_RTOL


# --------------------------------------------------------------------------------------------
# Bad input names the argument
# --------------------------------------------------------------------------------------------

@pytest.fixture
def obs_arrays():
    A0, F, x0, targets, _ = _observation_data(5, 3, seed=14)
    return A0, F, x0, targets


BAD_OBS_TIMES = {
    "decreasing": [1.0, 0.5, 2.0],
    "repeated": [0.5, 0.5, 2.0],
    "zero": [0.0, 1.0, 2.0],
    "negative": [-0.5, 1.0, 2.0],
    "after T": [0.5, 1.0, 2.5],
    "nan": [0.5, np.nan, 2.0],
    "inf": [0.5, 1.0, np.inf],
    "empty": [],
}


@pytest.mark.parametrize("case", list(BAD_OBS_TIMES))
def test_bad_obs_times(obs_arrays, case):
    A0, F, x0, targets = obs_arrays
    times = BAD_OBS_TIMES[case]
    with pytest.raises(ValueError, match="obs_times"):
        dd.Problem(A0, F, x0=x0, T=T, obs_times=times, targets=targets[: max(len(times), 1)],
                   loss="mse")


def test_missing_obs_times(obs_arrays):
    A0, F, x0, targets = obs_arrays
    with pytest.raises(ValueError, match="obs_times"):
        dd.Problem(A0, F, x0=x0, T=T, targets=targets, loss="mse")
    with pytest.raises(ValueError, match="obs_times"):
        dd.Problem(A0, F, x0=x0, T=T, loss=pseudo_huber())


def test_obs_times_without_a_loss(obs_arrays):
    A0, F, x0, targets = obs_arrays
    with pytest.raises(ValueError, match="obs_times"):
        dd.Problem(A0, F, labels=[0, 1, 2], T=T, obs_times=TIMES)


BAD_TARGETS = {
    "missing": (lambda Y: None, ValueError),
    "too few times": (lambda Y: Y[:2], ValueError),
    "wrong n": (lambda Y: Y[:, :-1], ValueError),
    "wrong S": (lambda Y: Y[:, :, :-1], ValueError),
    "2-D": (lambda Y: Y[0], ValueError),
    "nan": (lambda Y: np.where(np.arange(Y.size).reshape(Y.shape) == 7, np.nan, Y), ValueError),
    "inf": (lambda Y: np.where(np.arange(Y.size).reshape(Y.shape) == 3, np.inf, Y), ValueError),
    "complex": (lambda Y: Y + 1j, TypeError),
    "string": (lambda Y: "targets.npy", TypeError),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_targets(obs_arrays, case):
    A0, F, x0, targets = obs_arrays
    make, error = BAD_TARGETS[case]
    with pytest.raises(error, match="targets"):
        dd.Problem(A0, F, x0=x0, T=T, obs_times=TIMES, targets=make(targets), loss="mse")


@pytest.mark.parametrize("loss, error", [("mae", ValueError), (3.0, TypeError),
                                         (["mse"], TypeError)], ids=["unknown", "number", "list"])
def test_bad_loss(obs_arrays, loss, error):
    A0, F, x0, targets = obs_arrays
    with pytest.raises(error, match="loss"):
        dd.Problem(A0, F, x0=x0, T=T, obs_times=TIMES, targets=targets, loss=loss)


@pytest.mark.parametrize("case", ["x0 shape", "x0 nan"])
def test_bad_x0(obs_arrays, case):
    A0, F, x0, targets = obs_arrays
    bad = x0[:, :-1] if case == "x0 shape" else np.where(x0 > 0.5, np.nan, x0)
    with pytest.raises(ValueError, match="x0"):
        dd.Problem(A0, F, x0=bad, T=T, obs_times=TIMES, targets=targets, loss="mse")


@pytest.mark.parametrize("case", ["loss shape", "jump shape", "nan"])
def test_bad_user_loss_output(obs_arrays, case):
    A0, F, x0, _ = obs_arrays

    def broken(states, columns):
        loss, jumps = (states ** 2).sum(axis=(0, 2)), 2 * states
        if case == "loss shape":
            return loss[:-1], jumps
        if case == "jump shape":
            return loss, jumps[:-1]
        return loss * np.nan, jumps

    prob = dd.Problem(A0, F, x0=x0, T=T, obs_times=TIMES, loss=broken)
    with pytest.raises(ValueError, match="user loss"):
        dd.loss_and_grad(prob, np.zeros(5))
