"""Exact dense reference for losses at observation times, with initial states (DESIGN.md 1, 6).

Independent of the package's numerics: only NumPy and SciPy (``scipy.linalg.expm``), meant for
small n (the largest exponential is (2n + S) square). The classification loss at T alone is
``reference.py``; this module covers x0 != 0, observation times 0 < t_1 < ... < t_m, the MSE
loss and any loss given by its values and jumps.

Problem, for every column j = 1..S::

    dx_j/dt = A x_j + f_j,   x_j(0) = x0_j,   A = A0 + diag(d(theta))
    L = (1/|B|) sum_{j in B} l_j(x_j(t_1), ..., x_j(t_m))

over the chosen columns B. MSE: l_j = (1/(m n)) sum_i ||x_j(t_i) - Y[i, :, j]||^2. A generic
loss is a callable ``fn(states (m, c, n), columns (c,)) -> (l (c,), jumps (m, c, n))`` with
jumps[i, :, j] = dl_j / dx_j(t_i) -- the package's user-loss signature, so one function
serves both.

Derivation of the gradient
--------------------------
1. Forward. Â = [[A, F], [0, 0]] ((n+S) square), U(t) = [X(t); I_S] = exp(t Â) [X0; I_S]
   (the bottom block has zero derivative; the top obeys X' = A X + F). Marching interval by
   interval, U(t_i) = exp((t_i - t_{i-1}) Â) U(t_{i-1}), t_0 = 0, gives X(t_i) exactly.

2. Jumps. G_i = dL/dX(t_i) (n x S): column j is jumps[i, :, j] / |B| for j in B, zero
   otherwise (a column listed twice counts twice).

3. Perturbation. For A -> A + dA, variation of constants gives
   dx_j(t_i) = int_0^{t_i} exp((t_i - t) A) dA x_j(t) dt, so
   dL = sum_i sum_j g_ij^T dx_j(t_i) = sum_j int_0^{t_m} lambda_j(t)^T dA x_j(t) dt,
   lambda_j(t) = sum_{i: t_i >= t} exp((t_i - t) A^T) g_ij.
   lambda solves -lambda' = A^T lambda between observation times, is zero after t_m, and jumps
   by g_ij going backwards through t_i. With dA = diag(dd):
   dL/dd = diag(K),  K = int_0^{t_m} Lambda(t) X(t)^T dt  (n x n, Lambda = [lambda_1..lambda_S]).

4. Per interval. On (t_{i-1}, t_i], Lambda(t) = exp((t_i - t) A^T) Lam_i with
   Lam_i = Lambda(t_i^-) = G_i + exp((t_{i+1} - t_i) A^T) Lam_{i+1},  Lam_m = G_m,
   and X(t)^T = U_{i-1}^T exp((t - t_{i-1}) Â^T) [I_n; 0], U_{i-1} = U(t_{i-1}). With
   s = t - t_{i-1} and tau_i = t_i - t_{i-1}:
   K_i = int_0^{tau_i} exp((tau_i - s) A^T) (Lam_i U_{i-1}^T) exp(s Â^T) ds [:, :n].

5. Van Loan (1978). exp(tau [[P, Q], [0, R]]) = [[exp(tau P), E], [0, exp(tau R)]] with
   E = int_0^tau exp((tau - s) P) Q exp(s R) ds. Take P = A^T, Q = Lam_i U_{i-1}^T
   (n x (n+S)), R = Â^T: K_i = E[:, :n], and the top-left block exp(tau_i A^T) carries
   Lam_i back to t_{i-1} for the next interval, from the same exponential (it does not depend
   on Q, which is scaled to unit size before the exponential and the block rescaled after: E is
   linear in Q). K = sum_i K_i: one (2n+S) exponential per observation interval.

6. Chain rule: dL/dtheta = d'(theta) * diag(K) (``reference.diag_and_slope``).

``loss_only`` computes L from one (n+1)-augmented exponential per column and interval, with
no adjoint, so central finite differences of it check the derivation (tests/test_observations).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from reference import diag_and_slope


def mse_loss(targets: np.ndarray):
    """The MSE loss against ``targets`` (m, n, S), as a generic loss callable (NumPy)."""
    Y = np.asarray(targets, dtype=np.float64)

    def fn(states, columns):
        m, _, n = states.shape
        residual = states - Y[:, :, np.asarray(columns)].transpose(0, 2, 1)
        return (residual * residual).sum(axis=(0, 2)) / (m * n), residual * (2.0 / (m * n))

    return fn


def _inputs(A0_dense, F, x0, obs_times, theta, param_name, columns):
    A0 = np.asarray(A0_dense.toarray() if hasattr(A0_dense, "toarray") else A0_dense,
                    dtype=np.float64)
    F = np.asarray(F, dtype=np.float64)
    n, S = F.shape
    X0 = np.zeros((n, S)) if x0 is None else np.asarray(x0, dtype=np.float64)
    times = np.asarray(obs_times, dtype=np.float64).ravel()
    if times.size == 0 or times[0] <= 0 or np.any(np.diff(times) <= 0):
        raise ValueError(f"obs_times must increase strictly from > 0, got {times}")
    cols = np.arange(S) if columns is None else np.asarray(columns, dtype=np.int64).ravel()
    d, slope = diag_and_slope(theta, param_name)
    return A0 + np.diag(d), F, X0, times, cols, slope


def _augmented(A, F):
    n, S = F.shape
    A_hat = np.zeros((n + S, n + S))
    A_hat[:n, :n] = A
    A_hat[:n, n:] = F
    return A_hat


def observed_states(A0_dense, F, x0, obs_times, theta, param_name="softplus"):
    """X(t_i) for every observation time: (m, n, S), by exp of the (n+S) augmented operator."""
    A, F, X0, times, _, _ = _inputs(A0_dense, F, x0, obs_times, theta, param_name, None)
    return _march(A, F, X0, times)[0]


def _march(A, F, X0, times):
    n, S = F.shape
    A_hat = _augmented(A, F)
    U = np.vstack([X0, np.eye(S)])
    starts, states, prev = [], [], 0.0
    for t in times:
        starts.append(U)
        U = scipy.linalg.expm((t - prev) * A_hat) @ U
        states.append(U[:n])
        prev = t
    return np.stack(states), starts, A_hat


def _van_loan(P, Q, R, tau):
    """(exp(tau P), E = int_0^tau exp((tau-s)P) Q exp(sR) ds) from one block exponential."""
    p, r = P.shape[0], R.shape[0]
    q_scale = np.abs(Q).max()
    target = max(1.0, np.abs(P).sum(axis=0).max(), np.abs(R).sum(axis=0).max())
    scale = target / q_scale if q_scale > 0 else 1.0
    C = np.zeros((p + r, p + r))
    C[:p, :p] = P
    C[:p, p:] = Q * scale
    C[p:, p:] = R
    E = scipy.linalg.expm(tau * C)
    return E[:p, :p], E[:p, p:] / scale


def reference_obs_loss_and_grad(A0_dense, F, x0, obs_times, loss_fn, theta,
                                param_name="softplus", columns=None):
    """Exact (loss, dL/dtheta) for a loss at observation times (module docstring).

    A0_dense: (n, n) (scipy.sparse is densified); F, x0: (n, S) (x0 None = zeros);
    obs_times: (m,) increasing, > 0; loss_fn: ``fn(states (m, c, n), columns (c,))
    -> (l (c,), jumps (m, c, n))`` (e.g. ``mse_loss(targets)``); theta: (n,);
    columns: None (all) or 1-D ints. Returns (float, ndarray (n,)).
    """
    A, F, X0, times, cols, slope = _inputs(A0_dense, F, x0, obs_times, theta, param_name,
                                           columns)
    n, S = F.shape
    states, starts, A_hat = _march(A, F, X0, times)
    per_col, jumps = loss_fn(states[:, :, cols].transpose(0, 2, 1), cols)
    loss = float(np.mean(per_col))
    G = np.zeros((times.size, n, S))
    for i in range(times.size):  # a repeated column adds up
        np.add.at(G[i].T, cols, np.asarray(jumps[i]) / cols.size)
    diag_K = np.zeros(n)
    lam = np.zeros((n, S))
    prev_times = np.concatenate([[0.0], times[:-1]])
    for i in reversed(range(times.size)):
        lam = lam + G[i]
        back, E = _van_loan(A.T, lam @ starts[i].T, A_hat.T, times[i] - prev_times[i])
        diag_K += np.diag(E[:, :n])
        lam = back @ lam
    return loss, slope * diag_K


def loss_only(A0_dense, F, x0, obs_times, loss_fn, theta, param_name="softplus", columns=None):
    """L alone, one (n+1)-augmented ``expm`` per column and interval (no adjoint, no sharing)."""
    A, F, X0, times, cols, _ = _inputs(A0_dense, F, x0, obs_times, theta, param_name, columns)
    n, S = F.shape
    states = np.empty((times.size, n, S))
    for j in range(S):
        M = np.zeros((n + 1, n + 1))
        M[:n, :n] = A
        M[:n, n] = F[:, j]
        u, prev = np.append(X0[:, j], 1.0), 0.0
        for i, t in enumerate(times):
            u = scipy.linalg.expm((t - prev) * M) @ u
            states[i, :, j] = u[:n]
            prev = t
    per_col, _ = loss_fn(states[:, :, cols].transpose(0, 2, 1), cols)
    return float(np.mean(per_col))


# --------------------------------------------------------------------------------------------
# Test operators with known structure
# --------------------------------------------------------------------------------------------

def laplacian_2d(N: int):
    """The 5-point Laplacian on an N x N interior grid of the unit square, h = 1/(N+1).

    Returns (A0, diagonal): A0 = the off-diagonal part / h^2 (CSR, n = N^2, symmetric,
    +1/h^2 between grid neighbours) and the magnitude 4/h^2 of the Laplacian's diagonal, so
    that A0 - (4/h^2) I is the Dirichlet Laplacian.
    """
    import scipy.sparse as sp

    h = 1.0 / (N + 1)
    ones = np.ones(N - 1)
    shift = sp.diags([ones, ones], [-1, 1])
    eye = sp.identity(N)
    return sp.csr_matrix((sp.kron(eye, shift) + sp.kron(shift, eye)) / h**2), 4.0 / h**2


def inverse_softplus(d):
    """theta with softplus(theta) = d > 0, stable for large d: d + log(-expm1(-d))."""
    d = np.asarray(d, dtype=np.float64)
    return d + np.log(-np.expm1(-d))
