"""A gallery of small operator classes on which accuracy claims are checked.

Each case is a :class:`~diagode_dist.Problem` with the theta and diagonal map at which the
gradient is taken, small enough (n <= 40) for the exact references of
:mod:`diagode_dist.reference`. The classes are those on which Krylov exponential integrators
are known to be fragile, not only the friendly random and Laplacian ones: non-normal operators
with transient growth (Jordan, Grcar, upwind convection), oscillatory and non-normal ones
(skew-symmetric, first-order wave equation), stiff ones (Laplacians up to ||T A|| = 1e4, with
and without initial states, strong decay), near-breakdown multi-scale forcing, saturated
parametrisations, observation-time losses and float32.

    for case in dd.gallery.cases():
        loss, grad = dd.loss_and_grad(case.problem, case.theta, param=case.param)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .param import ExpParam, SoftplusParam
from .problem import Problem


@dataclass(frozen=True)
class Case:
    """One gallery problem: ``problem``, ``theta`` (n,) and ``param`` (the diagonal map)."""

    name: str
    description: str
    problem: Problem
    theta: np.ndarray
    param: Any


def _inverse_softplus(y):
    """theta with softplus(theta) = y > 0, stable for large y."""
    y = np.asarray(y, dtype=np.float64)
    return y + np.log(-np.expm1(-y))


def _laplacian_1d(m: int) -> np.ndarray:
    """Off-diagonal part of the 1-D Dirichlet Laplacian on m interior points, h = 1/(m+1)."""
    h = 1.0 / (m + 1)
    return (np.eye(m, k=1) + np.eye(m, k=-1)) / h**2


def _diffusion_theta(diag_size, rng, noise=0.05):
    """Softplus theta for a diagonal -diag_size (1 + noise xi)."""
    return _inverse_softplus(diag_size * (1 + noise * rng.standard_normal(np.size(diag_size))))


def _convection_diffusion():
    m, peclet = 40, 100.0
    h = 1.0 / (m + 1)
    nu, a = 1.0, peclet  # Peclet number a L / nu on the unit interval
    A0 = (nu / h**2 + a / h) * np.eye(m, k=-1) + (nu / h**2) * np.eye(m, k=1)
    rng = np.random.default_rng(1)
    theta = _diffusion_theta(np.full(m, 2 * nu / h**2 + a / h), rng)
    F = rng.standard_normal((m, 4))
    prob = Problem(sp.csr_matrix(A0), F, rng.integers(0, m, 4), T=0.05, beta=50.0)
    return prob, theta, SoftplusParam(), "upwind convection-diffusion, Peclet 100, ||TA|| ~ 750"


def _jordan():
    n = 30
    rng = np.random.default_rng(2)
    A0 = 3.0 * np.eye(n, k=1)  # bidiagonal: transient growth ||exp(tA)|| up to ~1e5
    theta = np.log(1.0 + 0.01 * rng.random(n))
    F = rng.standard_normal((n, 3))
    prob = Problem(A0, F, rng.integers(0, n, 3), T=3.0, beta=0.01, x0=rng.standard_normal((n, 3)))
    return prob, theta, ExpParam(), "Jordan block -1 + 3 N (non-normal, transient growth)"


def _grcar():
    n = 30
    A0 = -np.eye(n, k=-1) + sum(np.eye(n, k=j) for j in (1, 2, 3))
    rng = np.random.default_rng(3)
    theta = np.log(3.0 + 0.1 * rng.random(n))  # diagonal -3: Grcar's matrix shifted to stable
    F = rng.standard_normal((n, 3))
    prob = Problem(A0, F, rng.integers(0, n, 3), T=2.0, beta=1.0, x0=rng.standard_normal((n, 3)))
    return prob, theta, ExpParam(), "Grcar matrix shifted by -4 (non-normal, pseudospectra)"


def _skew():
    n = 30
    rng = np.random.default_rng(4)
    B = rng.standard_normal((n, n))
    A0 = 10.0 * (B - B.T)  # eigenvalues up to ~ +-150 i
    np.fill_diagonal(A0, 0.0)
    theta = _inverse_softplus(0.1 + 0.05 * rng.random(n))
    F = rng.standard_normal((n, 3))
    prob = Problem(A0, F, rng.integers(0, n, 3), T=1.0, beta=1.0, x0=rng.standard_normal((n, 3)))
    return prob, theta, SoftplusParam(), "skew-symmetric, |eigenvalues| up to ~150 (oscillatory)"


def _wave():
    m = 15
    L = _laplacian_1d(m) - 2.0 * (m + 1) ** 2 * np.eye(m)
    A0 = np.block([[np.zeros((m, m)), np.eye(m)], [L, np.zeros((m, m))]])
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(2 * m) - 3.0
    F = rng.standard_normal((2 * m, 4))
    prob = Problem(A0, F, rng.integers(0, 2 * m, 4), T=0.35, beta=1.0)
    return prob, theta, SoftplusParam(), "first-order wave [[0, I], [L, 0]] (stable, non-normal)"


def _laplacian(x0: bool):
    m = 30
    h = 1.0 / (m + 1)
    rng = np.random.default_rng(5)
    theta = _diffusion_theta(np.full(m, 2.0 / h**2), rng)
    T = 1e4 / (4.0 / h**2)  # ||T A|| = 1e4
    F = rng.standard_normal((m, 4))
    X0 = rng.standard_normal((m, 4)) if x0 else None
    prob = Problem(sp.csr_matrix(_laplacian_1d(m)), F, rng.integers(0, m, 4), T=T, beta=10.0,
                   x0=X0)
    what = "with x0" if x0 else "x0 = 0"
    return prob, theta, SoftplusParam(), f"stiff 1-D Laplacian, ||TA|| = 1e4, {what}"


def _laplacian_2d():
    N = 5
    h = 1.0 / (N + 1)
    shift = sp.diags([np.ones(N - 1), np.ones(N - 1)], [-1, 1])
    eye = sp.identity(N)
    A0 = sp.csr_matrix((sp.kron(eye, shift) + sp.kron(shift, eye)) / h**2)
    n = N * N
    rng = np.random.default_rng(6)
    theta = _diffusion_theta(np.full(n, 4.0 / h**2), rng)
    T = 1e4 / (8.0 / h**2)
    times = [T / 4, T / 2, T]
    X0 = rng.standard_normal((n, 3))
    targets = 0.1 * rng.standard_normal((3, n, 3))
    prob = Problem(A0, rng.standard_normal((n, 3)), T=T, x0=X0, obs_times=times,
                   targets=targets, loss="mse")
    return prob, theta, SoftplusParam(), "stiff 2-D Laplacian, ||TA|| = 1e4, x0, MSE at 3 times"


def _decay_x0():
    n, S, T = 30, 4, 0.2
    rng = np.random.default_rng(0)
    d = -(200.0 + 100.0 * np.arange(n))
    X0 = rng.standard_normal((n, S))
    targets = 0.5 * (np.exp(d * T)[:, None] * X0)[None]
    prob = Problem(np.zeros((n, n)), np.zeros((n, S)), T=T, x0=X0, obs_times=[T],
                   targets=targets, loss="mse")
    return prob, np.log(-d), ExpParam(), "strong decay from x0 (to 1e-17 in one step), f = 0"


def _multiscale():
    n = 20
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    mu = -np.logspace(0, 4, n)
    A0 = Q @ np.diag(mu) @ Q.T
    F = (Q[:, -1] + 5e-13 * Q[:, 0])[:, None]  # a slow component behind a stiff one
    theta = np.full(n, -40.0)  # d = -softplus(-40) ~ -4e-18: A = A0
    prob = Problem(A0, F, [3], T=1.0, beta=1e4)  # beta: logits of order 1 (x(T) ~ 1e-4)
    return prob, theta, SoftplusParam(), "multi-scale, mu in [-1e4, -1], f = q_stiff + 5e-13 q_slow"


def _random(seed, n=20, S=4, scale=0.3, dtype=np.float64, x0=False):
    rng = np.random.default_rng(seed)
    A0 = scale * rng.standard_normal((n, n))
    np.fill_diagonal(A0, 0.0)
    F = rng.standard_normal((n, S)).astype(dtype)
    X0 = rng.standard_normal((n, S)).astype(dtype) if x0 else None
    return rng, A0.astype(dtype), F, X0


def _softplus_saturated():
    rng, A0, F, X0 = _random(7, x0=True)
    theta = np.where(np.arange(A0.shape[0]) % 2 == 0, 30.0, -30.0)  # d ~ -30 and ~ -1e-13
    theta = theta + 0.1 * rng.standard_normal(theta.size)
    prob = Problem(A0, F, rng.integers(0, 20, F.shape[1]), T=1.0, beta=5.0, x0=X0)
    return prob, theta, SoftplusParam(), "softplus saturated: theta = +-30"


def _exp_large():
    rng, A0, F, X0 = _random(8, x0=True)
    theta = 5.0 + 0.1 * rng.standard_normal(A0.shape[0])  # d ~ -150
    prob = Problem(A0, F, rng.integers(0, 20, F.shape[1]), T=1.0, beta=100.0, x0=X0)
    return prob, theta, ExpParam(), "exp map at theta ~ 5 (d ~ -150)"


def _mse_obs():
    rng, A0, F, X0 = _random(9, x0=True, scale=0.5)
    A0 = sp.csr_matrix(A0 * (rng.random(A0.shape) < 0.3))
    targets = rng.standard_normal((3, 20, F.shape[1]))
    prob = Problem(A0, F, T=2.0, x0=X0, obs_times=[0.5, 1.0, 2.0], targets=targets,
                   loss="mse")
    return prob, 0.5 * rng.standard_normal(20), SoftplusParam(), "sparse, x0, MSE at 3 times"


def _cross_entropy():
    rng, A0, F, _ = _random(10, n=30, S=6, scale=0.3)
    prob = Problem(A0, F, rng.integers(0, 30, 6), T=2.0, beta=10.0)
    return prob, 0.5 * rng.standard_normal(30), SoftplusParam(), "random dense, cross-entropy"


def _float32():
    rng, A0, F, X0 = _random(11, dtype=np.float32, x0=True)
    prob = Problem(A0, F, rng.integers(0, 20, F.shape[1]), T=2.0, beta=5.0, x0=X0)
    theta = (0.5 * rng.standard_normal(20)).astype(np.float32)
    return prob, theta, SoftplusParam(), "float32, random dense, x0"


_BUILDERS = {
    "convection_diffusion": _convection_diffusion,
    "jordan": _jordan,
    "grcar": _grcar,
    "skew": _skew,
    "wave": _wave,
    "laplacian_1d": lambda: _laplacian(False),
    "laplacian_1d_x0": lambda: _laplacian(True),
    "laplacian_2d_mse": _laplacian_2d,
    "decay_x0": _decay_x0,
    "multiscale": _multiscale,
    "softplus_saturated": _softplus_saturated,
    "exp_large": _exp_large,
    "mse_obs": _mse_obs,
    "cross_entropy": _cross_entropy,
    "float32": _float32,
}

NAMES = tuple(_BUILDERS)
"""Names of the gallery's cases, in a fixed order."""


def case(name: str) -> Case:
    """The gallery case called ``name`` (one of ``NAMES``), built afresh (deterministic)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown gallery case {name!r}; choose from {', '.join(NAMES)}")
    prob, theta, param, description = _BUILDERS[name]()
    return Case(name, description, prob, theta, param)


def cases(names=None) -> list[Case]:
    """Gallery cases (all by default), in ``NAMES`` order."""
    return [case(name) for name in (NAMES if names is None else names)]
