"""Benchmark problems and the exact dense reference gradient they are scored against.

A case is a problem (anything with the attributes ``A0, F, labels, T, beta, x0`` of
:class:`diagode_dist.Problem`) plus the theta at which the gradient is taken.

The reference needs no Krylov space and no quadrature:

* forward: with the augmented operator Â = [[A, F], [0, 0]] ((n+S) square) and U0 = [X0; I],
  X(T) is the top n rows of exp(T Â) U0;
* gradient: with the terminal adjoints G (n x S) and C = [[A^T, G U0^T], [0, Â^T]] (2n+S square),
  the top-right block of exp(T C) is ∫_0^T exp((T-s) A^T) G U0^T exp(s Â^T) ds, whose first n
  columns are Σ_j ∫ λ_j(s) x_j(s)^T ds; its diagonal is dL/dd (Van Loan 1978).

Both exponentials come from ``scipy.linalg.expm``: two dense exponentials, of sizes n+S and 2n+S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.special

CASE_NAMES = ("tiny", "demo", "n1024", "stiff2d")
DEFAULT_CASES = ("demo", "n1024", "stiff2d")


@dataclass
class Case:
    """One benchmark problem.

    name: short id used on the command line; description: one line for the table;
    problem: a ``diagode_dist.Problem`` (or any object with its attributes);
    theta: (n,) float64, where the gradient is taken.
    """

    name: str
    description: str
    problem: Any
    theta: np.ndarray


def softplus(theta: np.ndarray) -> np.ndarray:
    """softplus(θ) = log(1 + e^θ), stable for |θ| up to 1e3."""
    return np.logaddexp(0.0, theta)


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    """θ with softplus(θ) = y, for y > 0 (y + log(1 - e^-y), stable for large y)."""
    y = np.asarray(y, dtype=np.float64)
    return y + np.log(-np.expm1(-y))


def _softplus_diag(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d = -softplus(θ) and d'(θ) = -sigmoid(θ) (the SoftplusParam map)."""
    return -softplus(theta), -scipy.special.expit(theta)


def dense_matrix(A0: Any) -> np.ndarray:
    """A0 (NumPy/CuPy, dense or SciPy/CuPy sparse) as a dense float64 host array."""
    if hasattr(A0, "get"):  # CuPy, dense or sparse: the reference is a CPU computation
        A0 = A0.get()
    if scipy.sparse.issparse(A0):
        A0 = A0.toarray()
    return np.asarray(A0, dtype=np.float64)


def host_array(a: Any) -> np.ndarray | None:
    """A NumPy/CuPy array as float64 host ndarray (None stays None)."""
    if a is None:
        return None
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)


def exact_loss_and_grad(prob: Any, theta: np.ndarray,
                        param: Any = None) -> tuple[float, np.ndarray]:
    """Exact loss and dL/dθ by two dense exponentials (sizes n+S and 2n+S).

    prob: object with ``A0`` (n, n) dense/sparse, ``F`` (n, S), ``labels`` (S,), ``T``, ``beta``,
    ``x0`` (None or (n, S)). theta: (n,). param: object with ``diag_from_theta`` and
    ``dtheta_from_ddiag`` (default: d = -softplus(θ), as ``SoftplusParam``).
    Returns (loss, grad) with grad an (n,) float64 ndarray. Cost O((2n+S)^3): small n only.
    """
    A0 = dense_matrix(prob.A0)
    F = host_array(prob.F)
    labels = np.asarray(host_array(prob.labels), dtype=np.int64)
    theta = np.asarray(host_array(theta), dtype=np.float64)
    n, S = F.shape
    if A0.shape != (n, n) or theta.shape != (n,) or labels.shape != (S,):
        raise ValueError(f"shapes disagree: A0 {A0.shape}, F {F.shape}, labels {labels.shape}, "
                         f"theta {theta.shape}")
    T, beta = float(prob.T), float(prob.beta)
    x0 = host_array(getattr(prob, "x0", None))

    if param is None:
        d, dprime = _softplus_diag(theta)
    else:
        d = np.asarray(param.diag_from_theta(theta), dtype=np.float64)
    A = A0 + np.diag(d)

    N = n + S
    A_hat = np.zeros((N, N))
    A_hat[:n, :n] = A
    A_hat[:n, n:] = F
    U0 = np.zeros((N, S))
    if x0 is not None:
        U0[:n] = x0
    U0[n:] = np.eye(S)

    XT = (scipy.linalg.expm(T * A_hat) @ U0)[:n]  # (n, S)
    Z = beta * XT.T  # (S, n) logits, one row per column
    lse = scipy.special.logsumexp(Z, axis=1)
    loss = float(np.mean(lse - Z[np.arange(S), labels]))
    P = np.exp(Z - lse[:, None])
    P[np.arange(S), labels] -= 1.0
    G = (beta / S) * P.T  # (n, S) terminal adjoints dL/dX(T)

    C = np.zeros((2 * n + S, 2 * n + S))
    C[:n, :n] = A.T
    C[:n, n:] = G @ U0.T
    C[n:, n:] = A_hat.T
    top_right = scipy.linalg.expm(T * C)[:n, n:]
    grad_d = np.diag(top_right[:, :n]).copy()  # Σ_j ∫ λ_j,i x_j,i dt

    if param is None:
        return loss, grad_d * dprime
    return loss, np.asarray(param.dtheta_from_ddiag(theta, grad_d), dtype=np.float64)


def _demo(n: int, S: int, name: str) -> Case:
    from diagode_dist.problem import demo_problem

    prob = demo_problem(n=n, S=S)
    return Case(
        name=name,
        description=(
            f"demo_problem n={n}, S={S}, T={prob.T:g}, beta={prob.beta:g}, A0 = 0.01 randn, theta=0"
        ),
        problem=prob,
        theta=np.zeros(n),
    )


def laplacian_offdiag_2d(m: int, h: float) -> scipy.sparse.csr_matrix:
    """Off-diagonal part of the 5-point Laplacian on an m x m grid, divided by h^2.

    Returns an (m^2, m^2) CSR matrix with 1/h^2 at each grid neighbour (Dirichlet boundary).
    """
    ones = np.ones(m - 1)
    path = scipy.sparse.diags([ones, ones], [-1, 1], shape=(m, m))
    eye = scipy.sparse.identity(m)
    return ((scipy.sparse.kron(eye, path) + scipy.sparse.kron(path, eye)) / h**2).tocsr()


def stiff2d_arrays(
    m: int = 16, S: int = 64, T: float = 0.1, beta: float = 250.0, seed: int = 0
) -> dict[str, Any]:
    """Arrays of the stiff 2-D diffusion case: A0 = Laplacian off-diagonal / h^2 (sparse),
    theta with d = -softplus(theta) = -(4/h^2)(1 + 0.1 u), u uniform in [-1, 1].

    Returns dict(A0=csr (n, n), F=(n, S), labels=(S,), T, beta, theta=(n,)), n = m^2.
    """
    rng = np.random.default_rng(seed)
    n = m * m
    h = 1.0 / (m + 1)
    A0 = laplacian_offdiag_2d(m, h)
    diag_magnitude = (4.0 / h**2) * (1.0 + 0.1 * rng.uniform(-1.0, 1.0, n))
    F = rng.standard_normal((n, S))
    labels = rng.integers(0, n, S)
    return dict(A0=A0, F=F, labels=labels, T=T, beta=beta, theta=inverse_softplus(diag_magnitude))


def _stiff2d() -> Case:
    from diagode_dist.problem import Problem

    a = stiff2d_arrays()
    n = a["theta"].shape[0]
    A = a["A0"].toarray() - np.diag(softplus(a["theta"]))
    norm_TA = a["T"] * float(np.max(np.abs(np.linalg.eigvalsh(A))))  # A is symmetric
    prob = Problem(a["A0"], a["F"], a["labels"], T=a["T"], beta=a["beta"])
    return Case(
        name="stiff2d",
        description=(
            f"2-D diffusion 16x16 (n={n}), S={a['F'].shape[1]}, T={a['T']:g}, "
            f"beta={a['beta']:g}, ||T A||_2 = {norm_TA:.0f}, sparse A0"
        ),
        problem=prob,
        theta=a["theta"],
    )


def build_case(name: str) -> Case:
    """The benchmark case called ``name`` (one of CASE_NAMES)."""
    if name == "tiny":
        return _demo(32, 8, "tiny")
    if name == "demo":
        return _demo(256, 64, "demo")
    if name == "n1024":
        return _demo(1024, 64, "n1024")
    if name == "stiff2d":
        return _stiff2d()
    raise ValueError(f"cases: unknown case {name!r}; choose from {', '.join(CASE_NAMES)}")


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """‖value - reference‖_2 / ‖reference‖_2 (inf when value has NaN/inf)."""
    value = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(value)):
        return math.inf
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def grid_arrays(m: int, S: int, T: float = 2.0, beta: float = 10.0, coupling: float = 0.25,
                seed: int = 0) -> dict[str, Any]:
    """A large sparse, non-stiff problem for timing: n = m^2 grid points, A0 = coupling times the
    5-point neighbour matrix (h = 1), theta = 0 (d = -log 2), so ||T A|| stays O(1).

    Returns dict(A0=csr (n, n), F=(n, S), labels=(S,), T, beta, theta=(n,)).
    """
    rng = np.random.default_rng(seed)
    n = m * m
    return dict(
        A0=(coupling * laplacian_offdiag_2d(m, 1.0)).tocsr(), F=rng.standard_normal((n, S)),
        labels=rng.integers(0, n, S), T=T, beta=beta, theta=np.zeros(n),
    )
