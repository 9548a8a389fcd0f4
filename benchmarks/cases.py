"""Benchmark problems: a case is a ``diagode_dist.Problem`` plus the theta at which the gradient
is taken. Each is scored against ``diagode_dist.reference.exact_loss_and_grad`` (the exact dense
reference the tests use too: two dense exponentials, of sizes n+S and 2n+S, no Krylov space and
no quadrature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse

from diagode_dist.reference import inverse_softplus

__all__ = ["CASE_NAMES", "DEFAULT_CASES", "Case", "build_case", "softplus", "inverse_softplus",
           "laplacian_offdiag_2d", "stiff2d_arrays", "grid_arrays"]

CASE_NAMES = ("tiny", "demo", "n1024", "stiff2d")
DEFAULT_CASES = ("demo", "n1024", "stiff2d")


@dataclass
class Case:
    """One benchmark problem.

    name: short id used on the command line; description: one line for the table;
    problem: a ``diagode_dist.Problem``;
    theta: (n,) float64, where the gradient is taken.
    """

    name: str
    description: str
    problem: Any
    theta: np.ndarray


def softplus(theta: np.ndarray) -> np.ndarray:
    """softplus(θ) = log(1 + e^θ), stable for |θ| up to 1e3."""
    return np.logaddexp(0.0, theta)


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
