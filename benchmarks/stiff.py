"""Stiff problems: rational (shift-and-invert) against polynomial Krylov and peers on 2-D diffusion.

The case: the 5-point Laplacian on an m x m grid (n = m^2, sparse CSR), diagonal
d = -(4/h^2)(1 + 0.1 u), S right-hand sides, T chosen so that ||T A||_2 ~ ``stiffness``
(||A||_2 ~ 8/h^2), classification loss. With u uniform in [-1, 1] the operator is not
dissipative (its rightmost eigenvalue is positive: the states grow like exp(T lambda_max), which
each table heading prints); the dissipative variant draws u in [0, 1], so d <= -4/h^2 and every
eigenvalue is negative.

Accuracy against a reference independent of the Krylov core: ``scipy.sparse.linalg.
expm_multiply`` (Al-Mohy & Higham 2011) on the (n + S)-augmented operator for the loss, and its
complex-step derivative (theta + i 1e-30 v, exact to rounding; Squire & Trapp 1998) for the
directional derivative of the gradient along a random v. Every method -- ours and the peers of
``benchmarks.stiff_peers`` -- runs in its own process with a time budget and a memory cap.

    python -m benchmarks --cases none --stiff [--quick] [--stiff-sizes 4096,16384,65536,262144]
        [--stiff-budget 300] [--stiff-mem-gib 12] [--stiff-dissipative] [--no-peers]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh, expm_multiply

import diagode_dist as dd

from .cases import laplacian_offdiag_2d
from .stiff_peers import PEER_TOL, PEERS, Outcome, run_isolated
from .table import heading, render_table

__all__ = ["stiff_problem", "rightmost_eigenvalue", "reference_loss_and_slope", "StiffOptions",
           "stiff_tables"]


def stiff_problem(m: int, stiffness: float, S: int = 64, seed: int = 0,
                  dissipative: bool = False):
    """(Problem, theta (n,)) of the 2-D diffusion case on an m x m grid (n = m^2).

    d = -softplus(theta) = -(4/h^2)(1 + 0.1 u), u uniform in [-1, 1] ([0, 1] if
    ``dissipative``); T = stiffness h^2 / 8.
    """
    rng = np.random.default_rng(seed)
    n, h = m * m, 1.0 / (m + 1)
    u = rng.uniform(0.0 if dissipative else -1.0, 1.0, n)
    magnitude = (4.0 / h**2) * (1.0 + 0.1 * u)
    theta = magnitude + np.log(-np.expm1(-magnitude))  # softplus(theta) = magnitude
    T = stiffness * h**2 / 8.0
    prob = dd.Problem(laplacian_offdiag_2d(m, h), rng.standard_normal((n, S)),
                      rng.integers(0, n, S), T=T, beta=250.0)
    return prob, theta


def rightmost_eigenvalue(prob, theta) -> float:
    """T lambda_max(A0 + diag(-softplus(theta))) (A symmetric; ARPACK, 'LA')."""
    A = sp.csr_matrix(prob.A0) - sp.diags(np.logaddexp(0.0, theta))
    value = eigsh(A, k=1, which="LA", tol=1e-8, return_eigenvectors=False)[0]
    return float(prob.T * value)


def _loss_of_states(X, labels, beta):
    """Mean classification loss of states X (n, S), real or complex (complex step)."""
    z = beta * X
    top = z.real.max(axis=0)
    lse = top + np.log(np.exp(z - top).sum(axis=0))
    return np.mean(lse - z[labels, np.arange(X.shape[1])])


def _augmented(A0, d, F) -> LinearOperator:
    """[[A0 + diag(d), F], [0, 0]] ((n + S) square, complex d) as a LinearOperator.

    Why not a sparse matrix: its dense F block would hold 13x the entries of A0 (S = 64) and a
    complex A0 doubles the work; here A0 stays real (applied to the real view of the complex
    columns) and the F block is a scaling whenever the bottom block is c I, which it is all
    along expm_multiply (its start is I and its shift keeps it a multiple of I).
    """
    n, S = F.shape
    A0 = sp.csr_matrix(A0, dtype=np.float64)
    A0_T = A0.T.tocsr()
    identity = np.eye(S)

    def real_times(M, X):
        X = np.ascontiguousarray(X, dtype=complex)
        return (M @ X.view(np.float64)).view(complex)

    def matmat(X):
        top, bottom = X[:n], X[n:]
        scale = bottom[0, 0]
        forcing = F * scale if np.array_equal(bottom, scale * identity) else F @ bottom
        return np.vstack([real_times(A0, top) + d[:, None] * top + forcing,
                          np.zeros((S, X.shape[1]), complex)])

    def rmatmat(Y):
        top = Y[:n]
        return np.vstack([real_times(A0_T, top) + np.conj(d)[:, None] * top, F.T @ top])

    return LinearOperator((n + S, n + S), matvec=lambda x: matmat(x.reshape(-1, 1)).ravel(),
                          rmatvec=lambda y: rmatmat(y.reshape(-1, 1)).ravel(), matmat=matmat,
                          rmatmat=rmatmat, dtype=complex)


def reference_loss_and_slope(prob, theta, direction, step: float = 1e-30):
    """(loss, dL/dtheta . direction) with expm_multiply and a complex step, for a softplus map.

    X(T) = top rows of exp(T [[A, F], [0, 0]]) [0; I], with theta + i step direction.
    """
    n, S = prob.n, prob.S
    th = theta + 1j * step * direction
    d = -np.logaddexp(0.0, th.real) - 1j * step * direction / (1 + np.exp(-th.real))
    aug = _augmented(prob.A0, d, np.asarray(prob.F, dtype=np.float64))
    start = np.vstack([np.zeros((n, S)), np.eye(S)]).astype(complex)
    X = expm_multiply(prob.T * aug, start, traceA=prob.T * d.sum())[:n]
    value = _loss_of_states(X, np.asarray(prob.labels), prob.beta)
    return float(value.real), float(value.imag / step)


STIFF_TABLES = ("accuracy", "flatness", "scaling")
"""The stiff section's tables (``StiffOptions.tables``)."""


@dataclass
class StiffOptions:
    """What the stiff section measures.

    grid: m of the accuracy and flatness tables (n = m^2); sizes: grids m of the table against
    n; stiffnesses: ||TA|| of the flatness table; budget: seconds per method (after its
    set-up); mem_gib: address-space cap of each method's process; peers: run the peers;
    polynomial_rtols: rtols of the polynomial baseline; dissipative: add the dissipative
    variant's rows; k_rational / k_tight: our rational Krylov dimension limit at rtol >= 1e-8 /
    below; k_polynomial: the polynomial one; threads: threads per method; tables: which of
    STIFF_TABLES to measure.
    """

    grid: int = 128
    sizes: Sequence[int] = (64, 128, 256, 512)
    stiffnesses: Sequence[float] = (1e3, 1e4, 1e5)
    rtols: Sequence[float] = (1e-8, 1e-10, 1e-12)
    polynomial_rtols: Sequence[float] = (1e-8, 1e-12)
    budget: float = 300.0
    mem_gib: float = 12.0
    peers: bool = True
    dissipative: bool = False
    k_rational: int = 30
    k_tight: int = 60
    k_polynomial: int = 30
    threads: int = 2
    S: int = 64
    stiffness: float = 5000.0
    tables: Sequence[str] = STIFF_TABLES

    @classmethod
    def quick(cls) -> StiffOptions:
        """A small grid, short budgets: the harness's smoke test (a few minutes with peers)."""
        return cls(grid=16, sizes=(8, 16), stiffnesses=(1e3, 1e4), rtols=(1e-8,),
                   polynomial_rtols=(1e-8,), budget=60.0, mem_gib=4.0, S=8, stiffness=1000.0)


def _spec(options: StiffOptions, m: int, stiffness: float, dissipative: bool, **extra) -> dict:
    return dict(m=m, stiffness=stiffness, S=options.S, seed=0, dissipative=dissipative,
                threads=options.threads, **extra)


def _rel(value: float, exact: float) -> str:
    return f"{abs(value - exact) / abs(exact):.1e}"


def _memory(outcome: Outcome) -> str:
    """Peak RSS (MiB) and, in brackets, what the call added over imports and set-up."""
    if np.isnan(outcome.rss_mib):
        return "-"
    if np.isnan(outcome.base_mib):
        return f"{outcome.rss_mib:.0f}"
    return f"{outcome.rss_mib:.0f} (+{outcome.rss_mib - outcome.base_mib:.0f})"


def _failure(outcome: Outcome, budget: float) -> str:
    if outcome.status == "timeout":
        where = "" if np.isnan(outcome.progress) else f", at t = {outcome.progress:.0%} of T"
        if outcome.message == "set-up":
            return "set-up did not finish"
        return f"did not finish in {budget:.0f} s{where}"
    return outcome.message


def _row(name: str, rtol: str, outcome: Outcome, exact: tuple[float, float], ours: float | None,
         budget: float) -> list[str]:
    """method, rtol, s, loss err, slope err, peak MiB, time / ours, note."""
    if outcome.status != "ok":
        lower = ""
        if outcome.status == "timeout" and ours:  # a lower bound on the ratio
            lower = f"> {outcome.seconds / ours:.0f}x"
        seconds = f"> {outcome.seconds:.0f}" if outcome.status == "timeout" else (
            "-" if np.isnan(outcome.seconds) else f"{outcome.seconds:.1f}")
        return [name, rtol, seconds, "-", "-", _memory(outcome), lower or "-",
                _failure(outcome, budget)]
    r = outcome.result
    note = r.get("note") or (f"dims {r['dims']}, {r['substeps']} sub-step(s), "
                             f"estimate {r['estimate']:.0e}")
    ratio = f"{outcome.seconds / ours:.1f}x" if ours else "-"
    return [name, rtol, f"{outcome.seconds:.2f}", _rel(r["loss"], exact[0]),
            _rel(r["slope"], exact[1]), _memory(outcome), ratio, note]


def accuracy_rows(options: StiffOptions, dissipative: bool,
                  log: Callable[[str], None]) -> tuple[list[list[str]], float]:
    """Rows of the accuracy table for one variant, and T lambda_max of its operator."""
    m, stiffness = options.grid, options.stiffness
    prob, theta = stiff_problem(m, stiffness, options.S, dissipative=dissipative)
    direction = np.random.default_rng(1).standard_normal(prob.n)
    reach = rightmost_eigenvalue(prob, theta)
    log(f"stiff: reference (expm_multiply, complex step) n={prob.n}, T lambda_max = {reach:.1f}")
    start = time.perf_counter()
    exact = reference_loss_and_slope(prob, theta, direction)
    ref_seconds = time.perf_counter() - start
    runs = ([("rational", r, options.k_rational if r >= 1e-8 else options.k_tight)
             for r in options.rtols]
            + [("polynomial", r, options.k_polynomial) for r in options.polynomial_rtols])
    rows, ours = [], {}  # rtol -> seconds of our rational run
    for method, rtol, k in runs:
        log(f"stiff: ours {method} k={k} rtol={rtol:g}")
        spec = _spec(options, m, stiffness, dissipative, method=method, rtol=rtol, k=k)
        outcome = run_isolated("ours", spec, options.budget, options.mem_gib)
        if method == "rational" and outcome.status == "ok":
            ours[rtol] = outcome.seconds
        # ratios to our rational run at the same rtol (the peers: at the loosest)
        reference = ours.get(rtol, next(iter(ours.values()), None))
        rows.append(_row(f"ours {method} k={k}", f"{rtol:g}", outcome, exact, reference,
                         options.budget))
    for name in PEERS if options.peers else ():
        log(f"stiff: peer {name} (budget {options.budget:.0f} s, cap {options.mem_gib:g} GiB)")
        spec = _spec(options, m, stiffness, dissipative, tol=PEER_TOL)
        outcome = run_isolated(name, spec, options.budget, options.mem_gib)
        loosest = ours.get(max(options.rtols)) if ours else None
        rows.append(_row(name, f"{PEER_TOL:g}", outcome, exact, loosest, options.budget))
    rows.append(["expm_multiply + complex step (reference)", "-", f"{ref_seconds:.1f}", "0",
                 "0", "-", "-", "in the parent process"])
    return rows, reach


def flatness_rows(options: StiffOptions, dissipative: bool,
                  log: Callable[[str], None]) -> list[list[str]]:
    """Rows: ||TA||, T lambda_max, seconds, dims, sub-steps, estimate of the rational method."""
    rows = []
    for stiffness in options.stiffnesses:
        prob, theta = stiff_problem(options.grid, stiffness, options.S, dissipative=dissipative)
        reach = rightmost_eigenvalue(prob, theta)
        log(f"stiff: flatness ||TA|| = {stiffness:g} (T lambda_max = {reach:.0f})")
        spec = _spec(options, options.grid, stiffness, dissipative, method="rational",
                     rtol=options.rtols[0], k=options.k_rational)
        outcome = run_isolated("ours", spec, options.budget, options.mem_gib)
        if outcome.status != "ok":
            rows.append([f"{stiffness:g}", f"{reach:.0f}", "-", "-", "-", "-",
                         _failure(outcome, options.budget)])
            continue
        r = outcome.result
        rows.append([f"{stiffness:g}", f"{reach:.0f}", f"{outcome.seconds:.2f}", r["dims"],
                     str(r["substeps"]), f"{r['estimate']:.0e}", _memory(outcome)])
    return rows


def scaling_rows(options: StiffOptions, log: Callable[[str], None]) -> list[list[str]]:
    """Rows: n, s, us / n, factor s, solve s, (L + U) / n, factor MiB, peak RSS MiB."""
    rows = []
    for m in options.sizes:
        log(f"stiff: scaling n = {m * m}")
        spec = _spec(options, m, options.stiffness, False, method="rational",
                     rtol=options.rtols[0], k=options.k_rational, factor=True)
        outcome = run_isolated("ours", spec, options.budget, options.mem_gib)
        if outcome.status != "ok":
            rows.append([str(m * m), "-", "-", "-", "-", "-", "-", _memory(outcome),
                         _failure(outcome, options.budget)])
            continue
        r = outcome.result
        factor_mib = r["fill"] * 12 / 2**20  # a float64 value and an int32 index per entry
        rows.append([str(m * m), f"{outcome.seconds:.2f}",
                     f"{1e6 * outcome.seconds / (m * m):.1f}", f"{r['factor_seconds']:.3f}",
                     f"{r['solve_seconds']:.3f}", f"{r['fill'] / (m * m):.0f}",
                     f"{factor_mib:.0f}", _memory(outcome), f"dims {r['dims']}"])
    return rows


def stiff_tables(options: StiffOptions | None = None, markdown: bool = False,
                 log: Callable[[str], None] = print) -> str:
    """The stiff tables: accuracy and speed against the polynomial path and the peers (per
    variant), time against ||TA|| on one grid, and time and memory against n."""
    o = options or StiffOptions()
    n = o.grid * o.grid
    parts = []
    variants = (False, True) if o.dissipative else (False,)
    for dissipative in variants if "accuracy" in o.tables else ():
        rows, reach = accuracy_rows(o, dissipative, log)
        kind = "dissipative, u in [0, 1]" if dissipative else "u in [-1, 1]"
        parts += [heading(f"2-D diffusion n = {n}, S = {o.S}, ||TA|| ~ {o.stiffness:g} "
                          f"({kind}; T lambda_max = {reach:.1f})", markdown),
                  render_table(["method", "rtol", "s", "loss err", "slope err",
                                "peak RSS MiB (+call)", "time / ours", "note"], rows, markdown),
                  ""]
    for dissipative in variants if "flatness" in o.tables else ():
        kind = "dissipative" if dissipative else "u in [-1, 1]"
        parts += [heading(f"rational: time against ||TA|| (n = {n}, {kind}, "
                          f"rtol {o.rtols[0]:g}, k = {o.k_rational})", markdown),
                  render_table(["||TA||", "T lambda_max", "s", "dims f/a", "sub-steps",
                                "estimate", "peak RSS MiB (+call)"],
                               flatness_rows(o, dissipative, log), markdown), ""]
    if "scaling" in o.tables:
        parts += [heading(f"rational: time and memory against n (||TA|| ~ {o.stiffness:g}, "
                          f"rtol {o.rtols[0]:g}, k = {o.k_rational})", markdown),
                  render_table(["n", "s", "us / n", "factor s", "solve S cols s",
                                "(L+U) / n", "L+U MiB", "peak RSS MiB (+call)", "note"],
                               scaling_rows(o, log), markdown)]
    return "\n".join(parts)
