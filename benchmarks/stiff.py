"""Stiff problems: rational (shift-and-invert) against polynomial Krylov on 2-D diffusion.

The case: the 5-point Laplacian on an m x m grid (n = m^2, sparse CSR), diagonal
d = -(4/h^2)(1 + 0.1 u), S right-hand sides, T chosen so that ||T A||_2 ~ ``stiffness``
(||A||_2 ~ 8/h^2), classification loss. Accuracy against a reference independent of the Krylov
core: ``scipy.sparse.linalg.expm_multiply`` on the (n + S)-augmented operator for the loss, and
its complex-step derivative (theta + i 1e-30 v, exact to rounding) for the directional
derivative of the gradient along a random v.

    python -m benchmarks --cases none --stiff [--quick]
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import expm_multiply

import diagode_dist as dd

from .cases import laplacian_offdiag_2d
from .table import heading, render_table

__all__ = ["stiff_problem", "reference_loss_and_slope", "time_call", "stiff_tables"]


def stiff_problem(m: int, stiffness: float, S: int = 64, seed: int = 0):
    """(Problem, theta (n,)) of the 2-D diffusion case on an m x m grid."""
    rng = np.random.default_rng(seed)
    n, h = m * m, 1.0 / (m + 1)
    magnitude = (4.0 / h**2) * (1.0 + 0.1 * rng.uniform(-1.0, 1.0, n))
    theta = magnitude + np.log(-np.expm1(-magnitude))  # softplus(theta) = magnitude
    T = stiffness * h**2 / 8.0
    prob = dd.Problem(laplacian_offdiag_2d(m, h), rng.standard_normal((n, S)),
                      rng.integers(0, n, S), T=T, beta=250.0)
    return prob, theta


def _loss_of_states(X, labels, beta):
    """Mean classification loss of states X (n, S), real or complex (complex step)."""
    z = beta * X
    top = z.real.max(axis=0)
    lse = top + np.log(np.exp(z - top).sum(axis=0))
    return np.mean(lse - z[labels, np.arange(X.shape[1])])


def reference_loss_and_slope(prob, theta, direction, step: float = 1e-30):
    """(loss, dL/dtheta . direction) with expm_multiply and a complex step, for a softplus map.

    One complex expm_multiply of T [[A, F], [0, 0]] on [0; I] ((n + S) square).
    """
    n, S = prob.n, prob.S
    th = theta + 1j * step * direction
    d = -np.logaddexp(0.0, th.real) - 1j * step * direction / (1 + np.exp(-th.real))
    A = prob.A0.astype(complex) + sp.diags(d)
    aug = sp.bmat([[A, sp.csr_matrix(prob.F)], [None, sp.csr_matrix((S, S))]]).tocsr()
    start = np.vstack([np.zeros((n, S)), np.eye(S)]).astype(complex)
    X = expm_multiply(prob.T * aug, start)[:n]
    value = _loss_of_states(X, np.asarray(prob.labels), prob.beta)
    return float(value.real), float(value.imag / step)


def time_call(fn: Callable[..., object], *args) -> tuple[float, float, object]:
    """fn(*args) timed: (seconds, peak MiB traced by tracemalloc -- NumPy arrays, not
    SuperLU's factors --, result)."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, result


def _ours(prob, theta, method, rtol, k=30):
    return dd.loss_and_grad(prob, theta, k=k, rtol=rtol, method=method, return_info=True)


def accuracy_rows(m: int, stiffness: float, rtols, polynomial_rtols, log) -> list[list[str]]:
    """Rows: method, rtol, seconds, loss error, slope error, estimate, dims, sub-steps."""
    prob, theta = stiff_problem(m, stiffness)
    direction = np.random.default_rng(1).standard_normal(prob.n)
    log(f"stiff: reference (expm_multiply, complex step) n={prob.n}")
    ref_seconds, _, (loss_ref, slope_ref) = time_call(
        reference_loss_and_slope, prob, theta, direction)
    rows = []
    runs = [("rational", r) for r in rtols] + [("polynomial", r) for r in polynomial_rtols]
    for method, rtol in runs:
        log(f"stiff: {method} rtol={rtol:g}")
        try:
            seconds, peak, (loss, grad, info) = time_call(_ours, prob, theta, method, rtol)
        except dd.AccuracyError as exc:  # refused: reported as such, never as a time
            tracemalloc.stop()
            rows.append([method, f"{rtol:g}", "refused", "-", "-", str(exc)[:60], "-", "-", "-"])
            continue
        slope = float(grad @ direction)
        rows.append([method, f"{rtol:g}", f"{seconds:.2f}",
                     f"{abs(loss - loss_ref) / abs(loss_ref):.1e}",
                     f"{abs(slope - slope_ref) / abs(slope_ref):.1e}",
                     f"{info['error_estimate']:.1e}",
                     f"{info['forward_dim']}/{info['adjoint_dim']}", str(info["substeps"]),
                     f"{peak:.0f}"])
    rows.append(["expm_multiply (reference)", "-", f"{ref_seconds:.1f}", "0", "0", "-", "-", "-",
                 "-"])
    return rows


def flatness_rows(m: int, stiffnesses, rtol: float, log) -> list[list[str]]:
    """Rows: ||TA||, seconds, dims, sub-steps of the rational method on one grid."""
    rows = []
    for stiffness in stiffnesses:
        prob, theta = stiff_problem(m, stiffness)
        log(f"stiff: flatness ||TA|| = {stiffness:g}")
        seconds, peak, (_, _, info) = time_call(_ours, prob, theta, "rational", rtol)
        rows.append([f"{stiffness:g}", f"{seconds:.2f}",
                     f"{info['forward_dim']}/{info['adjoint_dim']}", str(info["substeps"]),
                     f"{info['error_estimate']:.1e}"])
    return rows


def scaling_rows(sizes, stiffness: float, rtol: float, log) -> list[list[str]]:
    """Rows: n, seconds, seconds per n (us), factorization fill, peak MiB (NumPy, traced)."""
    from diagode_dist.rational import ShiftInvert, shift_for

    rows = []
    for m in sizes:
        prob, theta = stiff_problem(m, stiffness)
        log(f"stiff: scaling n = {prob.n}")
        seconds, peak, _ = time_call(_ours, prob, theta, "rational", rtol)
        d = -np.logaddexp(0.0, theta)
        factor_seconds, _, factor = time_call(
            ShiftInvert, prob.A0, d, shift_for(prob.loss.obs_times))
        block = np.random.default_rng(0).standard_normal((prob.S, prob.n))
        solve_seconds, _, _ = time_call(factor.solve, block)
        rows.append([str(prob.n), f"{seconds:.2f}", f"{1e6 * seconds / prob.n:.1f}",
                     f"{factor_seconds:.3f}", f"{solve_seconds:.3f}",
                     f"{factor.fill / prob.n:.0f}", f"{peak + factor.fill * 12 / 2**20:.0f}"])
    return rows


def stiff_tables(quick: bool = False, markdown: bool = False, polynomial: bool = True,
                 log=print) -> str:
    """The three stiff tables: accuracy and speed against the polynomial path, time against
    ||TA|| on one grid, and time against n."""
    m = 32 if quick else 128
    acc = accuracy_rows(m, 5000.0, (1e-8, 1e-12), (1e-8,) if polynomial else (), log)
    flat = flatness_rows(m, (1e3, 1e4, 1e5), 1e-8, log)
    scale = scaling_rows((16, 32) if quick else (64, 128, 256, 512), 5000.0, 1e-8, log)
    parts = [
        heading(f"2-D diffusion n = {m * m}, S = 64, ||TA|| ~ 5000, k = 30", markdown),
        render_table(["method", "rtol", "s", "loss err", "slope err", "estimate", "dims f/a",
                "sub-steps", "peak MiB"], acc, markdown),
        "",
        heading(f"rational: time against ||TA|| (n = {m * m}, rtol 1e-8)", markdown),
        render_table(["||TA||", "s", "dims f/a", "sub-steps", "estimate"], flat, markdown),
        "",
        heading("rational: time against n (||TA|| ~ 5000, rtol 1e-8)", markdown),
        render_table(["n", "s", "us / n", "factor s", "solve 64 s", "fill / n", "peak MiB"], scale,
               markdown),
    ]
    return "\n".join(parts)
