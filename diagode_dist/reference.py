"""Exact dense references for the loss and its gradient: small n, independent of the Krylov core.

Used by the tests and the benchmarks to score the package against exact answers, and by users
who want to certify a result on a small instance of their own operator.

Part 1: the classification loss at T.

Independent of the package's numerics: only NumPy and SciPy (``scipy.linalg.expm``).
Meant for small n (the largest matrix exponential here is (2n + S) square).

Problem, for every column j = 1..S::

    dx_j/dt = A x_j + f_j,  x_j(0) = x0_j (default 0),  t in [0, T],  A = A0 + diag(d(theta))
    L = (1/|B|) sum_{j in B} [ logsumexp(beta x_j(T)) - beta x_j(T)[label_j] ]

over the chosen columns B (all by default; a column listed twice counts twice).

Derivation of the gradient
--------------------------
1. Forward, all columns in one exponential.  Let Â = [[A, F], [0, 0]] ((n+S) square) and
   U0 = [X0; I_S] ((n+S) x S).  Then U(t) = exp(t Â) U0 = [X(t); I_S]: the bottom block stays
   I_S because its derivative is 0, and the top block obeys dX/dt = A X + F I_S = A X + F.
   So X(T) = [I_n 0] exp(T Â) U0.

2. Terminal adjoint.  z_j = beta x_j(T); d/dz_j [lse(z_j) - z_j[l_j]] = softmax(z_j) - e_{l_j},
   so g_j = dL/dx_j(T) = beta (softmax(z_j) - e_{l_j}) / |B| for j in B, and g_j = 0 otherwise.
   G = [g_1 .. g_S] (n x S).

3. Perturbation.  For A -> A + dA, the variation of constants formula gives
   dx_j(T) = int_0^T exp((T-t) A) dA x_j(t) dt, so
   dL = sum_j g_j^T dx_j(T) = sum_j int_0^T lambda_j(t)^T dA x_j(t) dt,
   lambda_j(t) = exp((T-t) A^T) g_j.  With dA = diag(dd):
   dL/dd_i = sum_j int_0^T lambda_j(t)_i x_j(t)_i dt = [ K ]_ii,
   K = sum_j int_0^T lambda_j(t) x_j(t)^T dt = int_0^T exp((T-t) A^T) G X(t)^T dt   (n x n).

4. K by one exponential (Van Loan 1978).  For a block upper-triangular
   C = [[P, Q], [0, R]],  exp(T C) = [[exp(T P), E], [0, exp(T R)]] with
   E = int_0^T exp((T-t) P) Q exp(t R) dt.
   Since X(t)^T = U0^T exp(t Â^T) [I_n; 0], take P = A^T (n x n), Q = G U0^T (n x (n+S)),
   R = Â^T ((n+S) square): then E = int exp((T-t)A^T) G U0^T exp(t Â^T) dt (n x (n+S)) and
   K = E[:, :n], the top-left n x n part of the top-right block of exp(T C), C of size 2n+S.
   E is linear in Q, so Q is scaled to unit size before the exponential and the block rescaled
   after it (|G| can be 1e-6 while |A| is O(1); scaling keeps the exponential's error relative
   to the block we read).

5. Per-column variant (size 2n+1): the same with Â_j = [[A, f_j], [0, 0]], u0_j = [x0_j; 1],
   Q_j = g_j u0_j^T, C_j = [[A^T, Q_j], [0, Â_j^T]]; K = sum_j E_j[:, :n].  The two must agree.

6. Chain rule: dL/dtheta = d'(theta) * diag(K), with
   softplus: d = -softplus(theta) = -logaddexp(0, theta), d' = -sigmoid(theta);
   exp:      d = -exp(theta),                          d' = -exp(theta).

``expm_loss`` computes L alone with one (n+1)-augmented exponential per column (no adjoint), and
accepts complex theta, so finite differences and complex-step derivatives of it check the above.

Part 2: losses at observation times, with initial states.

Independent of the package's numerics: only NumPy and SciPy (``scipy.linalg.expm``), meant for
small n (the largest exponential is (2n + S) square). The classification loss at T alone is
part 1; this module covers x0 != 0, observation times 0 < t_1 < ... < t_m, the MSE
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

6. Chain rule: dL/dtheta = d'(theta) * diag(K) (``diag_and_slope``).

``loss_only`` computes L from one (n+1)-augmented exponential per column and interval, with
no adjoint, so central finite differences of it check the derivation.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special

PARAM_NAMES = ("softplus", "exp")


def diag_and_slope(theta: np.ndarray, param_name: str) -> tuple[np.ndarray, np.ndarray]:
    """d(theta) and d'(theta) (both (n,)) for ``param_name`` in PARAM_NAMES (real theta)."""
    theta = np.asarray(theta, dtype=np.float64)
    if param_name == "softplus":
        return -np.logaddexp(0.0, theta), -scipy.special.expit(theta)
    if param_name == "exp":
        d = -np.exp(theta)
        return d, d
    raise ValueError(f"param_name must be one of {PARAM_NAMES}, got {param_name!r}")


def _softplus_complex(theta: np.ndarray) -> np.ndarray:
    """softplus(theta) = log(1 + e^theta) for complex theta, stable for large |Re theta|.

    For Re theta >= 0: theta + log(1 + e^-theta); else log(1 + e^theta).  Both are the same
    analytic function, so a complex step through either gives the exact derivative.
    """
    pos = theta.real >= 0
    out = np.empty_like(theta)
    out[pos] = theta[pos] + np.log1p(np.exp(-theta[pos]))
    out[~pos] = np.log1p(np.exp(theta[~pos]))
    return out


def _diag_any(theta: np.ndarray, param_name: str) -> np.ndarray:
    """d(theta) for real or complex theta."""
    if np.iscomplexobj(theta):
        if param_name == "softplus":
            return -_softplus_complex(theta)
        if param_name == "exp":
            return -np.exp(theta)
        raise ValueError(f"param_name must be one of {PARAM_NAMES}, got {param_name!r}")
    return diag_and_slope(theta, param_name)[0]


def _as_inputs(A0_dense, F, labels, x0, columns):
    A0 = np.asarray(A0_dense.toarray() if hasattr(A0_dense, "toarray") else A0_dense,
                    dtype=np.float64)
    F = np.asarray(F, dtype=np.float64)
    n, S = F.shape
    if A0.shape != (n, n):
        raise ValueError(f"A0_dense has shape {A0.shape}, expected {(n, n)}")
    labels = np.asarray(labels, dtype=np.int64)
    X0 = np.zeros((n, S)) if x0 is None else np.asarray(x0, dtype=np.float64)
    cols = np.arange(S) if columns is None else np.asarray(columns, dtype=np.int64).ravel()
    if cols.size == 0:
        raise ValueError("columns is empty")
    return A0, F, labels, X0, cols


def _lse(z: np.ndarray) -> np.ndarray:
    """logsumexp over axis 0, for real or complex z (analytic in z)."""
    m = z.real.max(axis=0)
    return m + np.log(np.exp(z - m).sum(axis=0))


def _terminal(A, F, X0, T):
    """X(T) (n x S) from exp(T Â) [X0; I], Â = [[A, F], [0, 0]]."""
    n, S = F.shape
    A_hat = np.zeros((n + S, n + S), dtype=np.result_type(A, F))
    A_hat[:n, :n] = A
    A_hat[:n, n:] = F
    U0 = np.vstack([X0, np.eye(S)])
    return (scipy.linalg.expm(T * A_hat) @ U0)[:n], A_hat, U0


def _loss_and_adjoint(XT, labels, beta, cols):
    """Mean loss over cols and terminal adjoint G (n x S, zero outside cols)."""
    n, S = XT.shape
    Z = beta * XT[:, cols]
    loss = float(np.mean(_lse(Z) - Z[labels[cols], np.arange(cols.size)]))
    P = scipy.special.softmax(Z, axis=0)
    P[labels[cols], np.arange(cols.size)] -= 1.0
    G = np.zeros((n, S))
    np.add.at(G.T, cols, (beta / cols.size) * P.T)  # a repeated column adds up
    return loss, G


def _van_loan_top_right(P, Q, R, T):
    """E = int_0^T exp((T-t)P) Q exp(tR) dt, from the top-right block of exp(T [[P,Q],[0,R]])."""
    p, r = P.shape[0], R.shape[0]
    q_scale = np.abs(Q).max()
    if q_scale == 0.0:
        return np.zeros((p, r))
    # E is linear in Q: exponentiate with Q of size ~|P|, |R| and rescale (see module docstring)
    target = max(1.0, np.abs(P).sum(axis=0).max(), np.abs(R).sum(axis=0).max())
    C = np.zeros((p + r, p + r))
    C[:p, :p] = P
    C[:p, p:] = Q * (target / q_scale)
    C[p:, p:] = R
    return scipy.linalg.expm(T * C)[:p, p:] * (q_scale / target)


def reference_loss_and_grad(A0_dense, F, labels, T, beta, theta, param_name="softplus",
                            x0=None, columns=None):
    """Exact (loss, dL/dtheta) from one (n+S) and one (2n+S) exponential (module docstring).

    A0_dense: (n, n) array (or scipy.sparse, densified); F: (n, S); labels: (S,) ints;
    theta: (n,) real; x0: None or (n, S); columns: None or 1-D ints (chosen columns).
    Returns (float, ndarray (n,)).
    """
    A0, F, labels, X0, cols = _as_inputs(A0_dense, F, labels, x0, columns)
    n = A0.shape[0]
    d, slope = diag_and_slope(theta, param_name)
    A = A0 + np.diag(d)
    XT, A_hat, U0 = _terminal(A, F, X0, T)
    loss, G = _loss_and_adjoint(XT, labels, beta, cols)
    K = _van_loan_top_right(A.T, G @ U0.T, A_hat.T, T)[:, :n]
    return loss, slope * np.diag(K).copy()


def reference_loss_and_grad_per_column(A0_dense, F, labels, T, beta, theta,
                                       param_name="softplus", x0=None, columns=None):
    """Same as ``reference_loss_and_grad``, with one (2n+1) Van Loan exponential per column."""
    A0, F, labels, X0, cols = _as_inputs(A0_dense, F, labels, x0, columns)
    n, S = F.shape
    d, slope = diag_and_slope(theta, param_name)
    A = A0 + np.diag(d)
    XT = np.empty((n, S))
    for j in range(S):
        XT[:, j] = _terminal(A, F[:, j:j + 1], X0[:, j:j + 1], T)[0][:, 0]
    loss, G = _loss_and_adjoint(XT, labels, beta, cols)
    diag_K = np.zeros(n)
    for j in np.unique(cols):
        _, A_hat_j, u0_j = _terminal(A, F[:, j:j + 1], X0[:, j:j + 1], T)
        E = _van_loan_top_right(A.T, G[:, j:j + 1] @ u0_j.T, A_hat_j.T, T)
        diag_K += np.diag(E[:, :n])
    return loss, slope * diag_K


def expm_loss(A0_dense, F, labels, T, beta, theta, param_name="softplus", x0=None,
              columns=None):
    """The loss alone, one (n+1)-augmented ``expm`` per column; theta may be complex.

    No adjoint and no shared exponential, so its finite differences (real theta) and complex-step
    derivatives (Im of loss(theta + i h e_k) / h) check the gradient derivation independently.
    Returns a float for real theta, a complex for complex theta.
    """
    A0, F, labels, X0, cols = _as_inputs(A0_dense, F, labels, x0, columns)
    n = A0.shape[0]
    theta = np.asarray(theta)
    A = A0 + np.diag(_diag_any(theta, param_name))
    total = 0.0
    for j in cols:
        M = np.zeros((n + 1, n + 1), dtype=A.dtype)
        M[:n, :n] = A
        M[:n, n] = F[:, j]
        u = scipy.linalg.expm(T * M) @ np.append(X0[:, j], 1.0)
        z = beta * u[:n]
        total = total + _lse(z[:, None])[0] - z[labels[j]]
    loss = total / cols.size
    return complex(loss) if np.iscomplexobj(loss) else float(loss)


def relative_error(value, reference) -> float:
    """||value - reference||_2 / ||reference||_2 (both flattened; |.| for scalars)."""
    value = np.asarray(value, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))

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


def _march(A, F, X0, times, expm=scipy.linalg.expm):
    n, S = F.shape
    A_hat = _augmented(A, F)
    U = np.vstack([X0, np.eye(S)])
    starts, states, prev = [], [], 0.0
    for t in times:
        starts.append(U)
        U = expm((t - prev) * A_hat) @ U
        states.append(U[:n])
        prev = t
    return np.stack(states), starts, A_hat


def _van_loan(P, Q, R, tau, expm=scipy.linalg.expm):
    """(exp(tau P), E = int_0^tau exp((tau-s)P) Q exp(sR) ds) from one block exponential."""
    p, r = P.shape[0], R.shape[0]
    q_scale = np.abs(Q).max()
    target = max(1.0, np.abs(P).sum(axis=0).max(), np.abs(R).sum(axis=0).max())
    scale = target / q_scale if q_scale > 0 else 1.0
    C = np.zeros((p + r, p + r))
    C[:p, :p] = P
    C[:p, p:] = Q * scale
    C[p:, p:] = R
    E = expm(tau * C)
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
    loss, diag_K = _obs_loss_and_diag_grad(A, F, X0, times, loss_fn, cols)
    return loss, slope * diag_K


def _obs_loss_and_diag_grad(A, F, X0, times, loss_fn, cols, expm=scipy.linalg.expm):
    """(loss, dL/dd) for the full operator A (n, n) (steps 1-5 of part 2)."""
    loss, K, _, _ = _obs_loss_and_integrals(A, F, X0, times, loss_fn, cols, expm)
    return loss, np.diag(K).copy()


def _obs_loss_and_integrals(A, F, X0, times, loss_fn, cols, expm=scipy.linalg.expm):
    """(loss, K = dL/dA (n, n), dL/dX0 = Lambda(0) (n, S), dL/dF = int Lambda dt (n, S)).

    K_i = E_i[:, :n] as in step 5; since U(t)^T = [X(t)^T, I_S], the last S columns of the same
    block are E_i[:, n:] = int Lambda(t) dt over the interval (part 3, part 7 of the design:
    dL/df_j = int lambda_j dt), and the top-left block carries Lambda back to t = 0.
    """
    n, S = F.shape
    states, starts, A_hat = _march(A, F, X0, times, expm)
    per_col, jumps = loss_fn(states[:, :, cols].transpose(0, 2, 1), cols)
    loss = float(np.mean(per_col))
    G = np.zeros((times.size, n, S))
    for i in range(times.size):  # a repeated column adds up
        np.add.at(G[i].T, cols, np.asarray(jumps[i]) / cols.size)
    K, grad_F = np.zeros((n, n)), np.zeros((n, S))
    lam = np.zeros((n, S))
    prev_times = np.concatenate([[0.0], times[:-1]])
    for i in reversed(range(times.size)):
        lam = lam + G[i]
        back, E = _van_loan(A.T, lam @ starts[i].T, A_hat.T, times[i] - prev_times[i], expm)
        K += E[:, :n]
        grad_F += E[:, n:]
        lam = back @ lam
    return loss, K, lam, grad_F


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


# --------------------------------------------------------------------------------------------
# Any Problem
# --------------------------------------------------------------------------------------------

def _host(a):
    """NumPy/CuPy array (or None) as a float64 host ndarray."""
    if a is None:
        return None
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)


def _on_host(a):
    """NumPy/CuPy array as a host ndarray of its own dtype (labels stay integers)."""
    return np.asarray(a.get() if hasattr(a, "get") else a)


def dense_matrix(A0) -> np.ndarray:
    """A0 (NumPy/CuPy, dense or SciPy/CuPy sparse) as a dense float64 host array."""
    if hasattr(A0, "get"):
        A0 = A0.get()
    if hasattr(A0, "toarray"):
        A0 = A0.toarray()
    return np.asarray(A0, dtype=np.float64)


def expm_arb(a: np.ndarray, bits: int = 160) -> np.ndarray:
    """exp(a) for a float64 matrix, in ball arithmetic (python-flint's ``arb_mat.exp``) with
    ``bits`` of working precision, rounded to float64: correct to the last bit or two even
    where float64 scaling and squaring loses digits (stiff operators, ||a|| up to 1e6)."""
    try:
        import flint
    except ImportError as exc:  # pragma: no cover - python-flint is in the test extra
        raise ImportError("precise=True needs python-flint (pip install python-flint)") from exc
    previous = flint.ctx.prec
    flint.ctx.prec = bits
    try:
        E = flint.arb_mat(np.asarray(a, dtype=np.float64).tolist()).exp()
        return np.array([[float(E[i, j].mid()) for j in range(E.ncols())]
                         for i in range(E.nrows())])
    finally:
        flint.ctx.prec = previous


def exact_loss_and_grad(prob, theta, param=None, columns=None, precise: bool = False,
                        wrt=None):
    """Exact (loss, dL/dtheta) of a ``diagode_dist.Problem`` with any of its losses.

    prob : Problem (classification, MSE or user loss; x0 or not; NumPy or CuPy, any float
        dtype -- the reference always computes in float64 on the host).
    theta : (p,) real; param : default d = -softplus(theta); a diagonal map with
        ``diag_from_theta`` and ``dtheta_from_ddiag``, or one of the package's operator
        parametrisations (``EdgeParam``, ``GeneratorParam``, ``Stack`` of those and the diagonal
        maps), whose operator the reference builds densely with its own code (part 3 below);
        columns : None (all) or 1-D ints.
    wrt : None, or names among "theta", "x0", "F": then a dict of gradients (x0 and F: (n, S)).

    One (n+S) exponential per observation interval for the states and one (2n+S) Van Loan
    exponential per interval for the gradient (part 2 of the module docstring): O((2n+S)^3),
    small n only. The loss's values and jumps come from ``prob.loss`` evaluated on the exact
    states (float64, host). ``precise=True`` computes the exponentials in ball arithmetic
    (``expm_arb``): slower (about 0.5 s for a 64-square matrix) but exact to float64 on stiff
    operators, where ``scipy.linalg.expm`` loses digits (measured: 9e-8 relative gradient error
    at ||T A|| = 1e6).

    Part 3: operator parametrisations. dL/dA = K (n x n) is exact (part 2, step 3, for any
    perturbation dA). For a parametrisation A(theta) = A0 + D(theta), the reference builds
    D(theta) densely from the parametrisation's description (pattern entries, transform,
    generator row sums; complex-capable transforms), and dL/dtheta_p = sum_ik K_ik dD_ik/dtheta_p
    with dD/dtheta_p = Im D(theta + i h e_p) / h, h = 1e-30 (a complex step: exact to rounding).
    """
    theta = _host(theta)
    F = _host(prob.F)
    n = F.shape[0]
    dense_terms = _dense_terms_of(param, n)
    if dense_terms is not None:
        D = dense_terms(theta.astype(complex)).real
    elif param is None:
        D = np.diag(diag_and_slope(theta, "softplus")[0])
    else:
        D = np.diag(np.asarray(_host(param.diag_from_theta(theta))))
    loss = prob.loss.to_device(_on_host)

    def loss_fn(states, cols):
        per_col, jumps = loss.evaluate(states, cols)
        return _host(per_col), _host(jumps)

    X0 = np.zeros_like(F) if prob.x0 is None else _host(prob.x0)
    cols = np.arange(prob.S) if columns is None else np.asarray(columns, dtype=np.int64).ravel()
    value, K, grad_x0, grad_F = _obs_loss_and_integrals(
        dense_matrix(prob.A0) + D, F, X0, np.asarray(loss.obs_times, dtype=np.float64),
        loss_fn, cols, expm_arb if precise else scipy.linalg.expm)
    if dense_terms is not None:
        grad = _complex_step_chain(dense_terms, theta, K)
    elif param is None:
        grad = diag_and_slope(theta, "softplus")[1] * np.diag(K)
    else:
        grad = _host(param.dtheta_from_ddiag(theta, np.diag(K).copy()))
    if wrt is None:
        return value, grad
    grads = {"theta": grad, "x0": grad_x0, "F": grad_F}
    return value, {name: grads[name] for name in wrt}


def _complex_step_chain(dense_terms, theta, K) -> np.ndarray:
    """sum_ik K_ik dD_ik/dtheta_p for every p, by complex steps of the dense map D(theta)."""
    h = 1e-30
    grad = np.empty(theta.size)
    for p in range(theta.size):
        step = theta.astype(complex)
        step[p] += 1j * h
        grad[p] = float((K * dense_terms(step).imag).sum() / h)
    return grad


def _transform_complex(name: str, theta: np.ndarray) -> np.ndarray:
    if name == "softplus":
        return _softplus_complex(theta)
    if name == "exp":
        return np.exp(theta)
    if name == "identity":
        return theta
    raise ValueError(f"unknown transform {name!r}")


def _dense_terms_of(param, n: int):
    """A function complex theta (p,) -> D(theta) (n, n) complex for the package's
    parametrisations (by class name and description), or None for a plain diagonal map."""
    kind = type(param).__name__
    if kind in ("SoftplusParam", "ExpParam"):
        name = "softplus" if kind == "SoftplusParam" else "exp"
        return lambda theta: np.diag(_diag_any(theta, name))
    if kind in ("EdgeParam", "GeneratorParam"):
        rows, cols, transform = param.pattern.rows, param.pattern.cols, param.transform

        def pattern_terms(theta):
            W = np.zeros((n, n), dtype=complex)
            np.add.at(W, (rows, cols), _transform_complex(transform, theta))
            return W - np.diag(W.sum(axis=1)) if kind == "GeneratorParam" else W

        return pattern_terms
    if kind == "Stack":
        parts = [_dense_terms_of(part, n) for part in param.parts]
        if any(part is None for part in parts):
            raise TypeError("the reference builds a Stack of the package's parametrisations only")
        sizes = np.cumsum([0] + [part.theta_size(n) for part in param.parts])

        def stack_terms(theta):
            return sum(part(theta[lo:hi]) for part, lo, hi in zip(parts, sizes[:-1], sizes[1:],
                                                                  strict=True))

        return stack_terms
    return None
