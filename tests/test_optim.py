"""Adam against steps written out by hand (coupled L2 weight decay, bias correction, clamp).

For step t = 1, 2, ... with gradient g_t:
    g'  = g_t + wd * theta
    m_t = b1 m_{t-1} + (1 - b1) g'          v_t = b2 v_{t-1} + (1 - b2) g'^2
    m^  = m_t / (1 - b1^t)                  v^  = v_t / (1 - b2^t)
    theta <- clip(theta - lr m^ / (sqrt(v^) + eps), lo, hi)
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from diagode_dist.optim import Adam


def _hand_adam(theta, grads, lr, b1, b2, eps, wd, lo, hi):
    """The formulas above, one scalar at a time with math (no NumPy broadcasting)."""
    theta = [float(x) for x in theta]
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    trace = []
    for t, g in enumerate(grads, start=1):
        for i in range(len(theta)):
            gi = float(g[i]) + wd * theta[i]
            m[i] = b1 * m[i] + (1.0 - b1) * gi
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi
            m_hat = m[i] / (1.0 - b1 ** t)
            v_hat = v[i] / (1.0 - b2 ** t)
            theta[i] = min(max(theta[i] - lr * m_hat / (math.sqrt(v_hat) + eps), lo), hi)
        trace.append((list(theta), list(m), list(v), t))
    return trace


def _run(opt, theta, grads):
    state = opt.init(theta)
    trace = []
    for g in grads:
        theta, state = opt.step(theta, g, state)
        trace.append((theta, state))
    return trace


GRADS = [np.array([0.3, -1.2, 1e-6, 0.0, 5.0]),
         np.array([-0.1, -0.8, 2e-6, 0.0, -4.0]),
         np.array([0.7, 0.05, -1e-6, 0.0, 3.0])]
THETA0 = np.array([0.5, -2.0, 0.0, 1.0, 49.99])


def test_init_state():
    state = Adam().init(THETA0)
    assert state["t"] == 0
    assert np.array_equal(state["m"], np.zeros(5)) and np.array_equal(state["v"], np.zeros(5))


def test_defaults_match_the_seed_package():
    """lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay, clamp (-50, 50)."""
    got = _run(Adam(), THETA0, GRADS)
    want = _hand_adam(THETA0, GRADS, 1e-3, 0.9, 0.999, 1e-8, 0.0, -50.0, 50.0)
    for (theta, state), (theta_h, m_h, v_h, t_h) in zip(got, want, strict=True):
        np.testing.assert_allclose(theta, theta_h, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(state["m"], m_h, rtol=1e-14, atol=0)
        np.testing.assert_allclose(state["v"], v_h, rtol=1e-14, atol=0)
        assert state["t"] == t_h


@pytest.mark.parametrize("lr, betas, eps, wd, clamp", [
    (0.05, (0.8, 0.99), 1e-6, 0.0, (-50.0, 50.0)),
    (0.01, (0.9, 0.999), 1e-8, 0.1, (-50.0, 50.0)),        # weight decay
    (0.5, (0.9, 0.999), 1e-8, 0.0, (-0.7, 0.6)),           # clamp bites
    (0.2, (0.5, 0.9), 1e-3, 0.3, (-1.5, 49.995)),          # everything together
])
def test_steps_match_hand_computation(lr, betas, eps, wd, clamp):
    opt = Adam(lr=lr, betas=betas, eps=eps, weight_decay=wd, clamp=clamp)
    got = _run(opt, THETA0, GRADS)
    want = _hand_adam(THETA0, GRADS, lr, betas[0], betas[1], eps, wd, *clamp)
    for (theta, state), (theta_h, m_h, v_h, t_h) in zip(got, want, strict=True):
        np.testing.assert_allclose(theta, theta_h, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(state["m"], m_h, rtol=1e-14, atol=0)
        np.testing.assert_allclose(state["v"], v_h, rtol=1e-14, atol=0)
        assert state["t"] == t_h


def test_clamp_holds_and_first_step_is_lr_times_sign():
    """Step 1: m^ = g, v^ = g^2, so the move is lr * sign(g) (up to eps), then clipped."""
    theta0 = np.array([0.0, 0.0, 0.95, -0.95])
    grad = np.array([2.0, -3.0, -1.0, 1.0])
    theta, _ = Adam(lr=0.1, clamp=(-1.0, 1.0)).step(theta0, grad, Adam().init(theta0))
    np.testing.assert_allclose(theta[:2], [-0.1, 0.1], rtol=1e-7)
    assert theta[2] == 1.0 and theta[3] == -1.0


def test_weight_decay_moves_theta_with_zero_gradient():
    theta0 = np.array([2.0, -3.0])
    opt = Adam(lr=0.1, weight_decay=0.5)
    theta, _ = opt.step(theta0, np.zeros(2), opt.init(theta0))
    # g' = wd * theta; step 1 has m^ = g', v^ = g'^2: theta - lr g' / (|g'| + eps)
    g = 0.5 * theta0
    np.testing.assert_allclose(theta, theta0 - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-15)
    np.testing.assert_allclose(theta, [1.9, -2.9], rtol=1e-8)


def test_step_does_not_modify_its_inputs():
    opt = Adam(lr=0.1, weight_decay=0.2, clamp=(-1.0, 1.0))
    theta = THETA0.copy()
    state = opt.init(theta)
    theta, state = opt.step(theta, GRADS[0], state)  # a non-trivial state
    theta_copy, state_copy = theta.copy(), copy.deepcopy(state)
    grad = GRADS[1].copy()
    new_theta, new_state = opt.step(theta, grad, state)
    assert np.array_equal(theta, theta_copy)
    assert np.array_equal(grad, GRADS[1])
    assert state["t"] == state_copy["t"]
    assert np.array_equal(state["m"], state_copy["m"])
    assert np.array_equal(state["v"], state_copy["v"])
    assert new_state["t"] == state["t"] + 1
    for new, old in ((new_theta, theta), (new_state["m"], state["m"]),
                     (new_state["v"], state["v"])):
        assert not np.shares_memory(new, old)
    # the same inputs again give the same outputs (no hidden state in the optimizer)
    again_theta, again_state = opt.step(theta, grad, state)
    assert np.array_equal(again_theta, new_theta)
    assert np.array_equal(again_state["m"], new_state["m"])
