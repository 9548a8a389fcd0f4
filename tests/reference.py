"""Exact dense reference for the classification loss and its theta-gradient (DESIGN.md 1, 6).

Independent of the package's numerics: only NumPy and SciPy (``scipy.linalg.expm``).
Meant for small n (the largest matrix exponential here is (2n + S) square).

Problem (DESIGN.md section 1), for every column j = 1..S::

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
