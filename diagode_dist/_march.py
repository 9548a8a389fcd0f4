"""Forward and adjoint marches of one chunk of columns across error-controlled sub-steps.

Each column takes its own steps: an interval ends at the column's next observation time when
the Krylov error estimate allows, else earlier (Expokit's error per unit time: the tolerance of
a step of length tau is rtol * tau / T, so errors summed over steps stay within rtol). A
column's steps depend only on that column, so results do not depend on chunking or sharding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._array import array_module, to_numpy
from .expm import expm_batched
from .krylov import Projection, arnoldi, combine, exp_and_error
from .time_integral import trapezoid, van_loan

MAX_STEPS = 100_000
_SHRINK_TRIES = 60


@dataclass
class Interval:
    """One sub-step of a set of columns (indices into the chunk)."""

    columns: np.ndarray  # (c_q,) host ints
    tau: np.ndarray  # (c_q,) host step lengths
    start: object  # (c_q, N) state u(t_q) the basis was built from
    projection: Projection | None  # kept when it fits in memory, else rebuilt
    dims: np.ndarray  # (c_q,) forward Krylov dimensions
    stop: np.ndarray  # (c_q,) index of the observation reached at t_{q+1}, or -1
    symmetric: bool = False  # built with Lanczos


@dataclass
class Accuracy:
    """Per-column accumulated relative error estimates and largest dimensions, for ``info``."""

    forward: np.ndarray
    adjoint: np.ndarray
    forward_dim: int = 0
    adjoint_dim: int = 0
    steps: int = 0


class _Acceptor:
    """``accept`` for arnoldi: relative error estimate at step tau below tol (per column).

    It remembers what each check computed, so that the step choice after the Arnoldi loop
    starts from the values at each column's final dimension instead of recomputing them.
    """

    def __init__(self, norms, tau, tol, n_rows):
        """norms (c,) device; tau, tol (c,) host step and relative tolerance."""
        self.norms, self.tau_host, self.tol, self.n_rows = norms, tau, tol, n_rows
        self.tau = array_module(norms).asarray(tau)
        self.checks = {}  # dimension m -> (y (c, m), rel (c,) host)

    def __call__(self, hessenberg, basis):
        y, rel = _estimate(hessenberg[:, :-1, :], hessenberg[:, -1, -1], self.norms, self.tau,
                           basis, self.n_rows)
        self.checks[basis.shape[0]] = (y, rel)
        return rel <= self.tol

    def at_final_dims(self, proj):
        """(y (c, m), rel (c,)) at each column's final dimension, from the checks where
        available (a breakdown between checks is computed afresh)."""
        xp = array_module(proj.norms)
        c, m = proj.norms.shape[0], proj.basis.shape[0]
        y = xp.zeros((c, m), dtype=proj.norms.dtype)
        rel = np.full(c, np.nan)
        for dim, (y_dim, rel_dim) in self.checks.items():
            rows = np.nonzero(proj.dims == dim)[0]
            if rows.size:
                y[xp.asarray(rows), :dim] = y_dim[xp.asarray(rows)]
                rel[rows] = rel_dim[rows]
        missing = np.nonzero(np.isnan(rel))[0]
        if missing.size:
            y_new, rel_new = _relative_error(_rows_of(proj, xp.asarray(missing)),
                                             self.tau_host[missing], self.n_rows)
            y[xp.asarray(missing)] = y_new
            rel[missing] = rel_new
        return y, rel


def _estimate(square, next_subdiag, norms, tau, basis, n_rows):
    """y = beta exp(tau H) e1 (c, m) and err / ||v(tau)[:n_rows]|| (host (c,))."""
    xp = array_module(norms)
    y, err = exp_and_error(square, next_subdiag, norms, tau)
    size = xp.linalg.norm(combine(basis[:, :, :n_rows], y), axis=1)
    # A state that underflows to zero (strong decay, float32) is measured against the start.
    size = xp.where(size > 0, size, norms)
    rel = xp.where(size > 0, err / xp.where(size > 0, size, 1.0), err)
    return y, to_numpy(rel)


def _relative_error(proj, tau, n_rows):
    """y and err / ||v(tau)[:n_rows]|| per column at (host) steps tau."""
    xp = array_module(proj.norms)
    return _estimate(proj.square, proj.next_subdiag, proj.norms, xp.asarray(tau), proj.basis,
                     n_rows)


def _choose_steps(proj, accept, remaining, T, rtol, n_rows):
    """Per-column step: the whole remaining time if the estimate allows, else shrink.

    Returns host tau (c,) and the coefficients y (c, m) at those steps, and relative errors.
    """
    tau = remaining.copy()
    y, rel = accept.at_final_dims(proj)
    m = max(int(proj.basis.shape[0]), 1)
    for _ in range(_SHRINK_TRIES):
        tol = rtol * tau / T
        bad = rel > tol
        if not bad.any():
            break
        ratio = np.where(rel[bad] > 0, tol[bad] / np.maximum(rel[bad], 1e-300), 1.0)
        tau[bad] *= np.clip(0.9 * ratio ** (1.0 / m), 0.05, 0.9)
        y, rel = _relative_error(proj, tau, n_rows)
    return tau, y, rel


def march_forward(make_apply, u0, obs_times, T, k, rtol, keep_bytes, symmetric=False):
    """Integrate u' = Â u from u0 (c, N) to every observation time.

    make_apply(rows) -> callable (c_q, N) -> (c_q, N): the augmented operator for those columns.

    Returns the observed states (m_obs, c, n) (n = N - 1: the augmented row dropped),
    the list of Intervals, and the per-column Accuracy.
    """
    xp = array_module(u0)
    c, N = u0.shape
    obs = np.asarray(obs_times, dtype=float)
    states = xp.empty((obs.size, c, N - 1), dtype=u0.dtype)
    t, next_obs, u = np.zeros(c), np.zeros(c, dtype=np.int64), u0
    acc = Accuracy(np.zeros(c), np.zeros(c))
    intervals, kept, active = [], 0, np.arange(c)
    while active.size:
        if len(intervals) >= MAX_STEPS:
            raise RuntimeError(f"more than {MAX_STEPS} Krylov sub-steps: increase k")
        start = u[xp.asarray(active)] if active.size < c else u
        remaining = obs[next_obs[active]] - t[active]
        norms = xp.linalg.norm(start, axis=1)
        tol = rtol * remaining / T
        accept = _Acceptor(norms, remaining, tol, N - 1)
        # Lanczos structure of the augmented operator holds only from u0 = e_{n+1} (t = 0).
        lanczos = symmetric and not t[active].any()
        proj = arnoldi(make_apply(active), start, k, symmetric=lanczos, accept=accept)
        tau, y, rel = _choose_steps(proj, accept, remaining, T, rtol, N - 1)
        reached = tau >= remaining
        u_new = combine(proj.basis, y)
        u = u.copy()  # never in place: `start` of this interval may be u itself
        u[xp.asarray(active)] = u_new
        observed = active[reached]
        states[xp.asarray(next_obs[observed]), xp.asarray(observed)] = \
            u_new[xp.asarray(np.nonzero(reached)[0]), : N - 1]
        t[active] = np.where(reached, obs[next_obs[active]], t[active] + tau)
        stop = np.where(reached, next_obs[active], -1)
        next_obs[observed] += 1
        kept += proj.basis.nbytes
        intervals.append(Interval(active, tau, start, proj if kept <= keep_bytes else None,
                                  proj.dims, stop, lanczos))
        acc.forward[active] += rel
        acc.forward_dim = max(acc.forward_dim, int(proj.dims.max()))
        active = active[next_obs[active] < obs.size]
    acc.steps = len(intervals)
    return states, intervals, acc


def march_adjoint(make_apply, apply_T, intervals, jumps, n, T, k, rtol, acc,
                  time_integral="vanloan", quad_points=32, symmetric=False):
    """March the adjoint back across the intervals and sum the exact sub-step integrals.

    jumps : (m_obs, c, n) dL/dx at the observation times; apply_T: (c_q, n) -> (c_q, n), A^T on
    rows. Returns dL/dd (n,), summed over the chunk's columns in a fixed order.
    """
    xp = array_module(jumps)
    lam = xp.zeros((jumps.shape[1], n), dtype=jumps.dtype)
    grad = xp.zeros(n, dtype=jumps.dtype)
    for iv in reversed(intervals):
        hit = iv.stop >= 0
        if hit.any():
            rows = xp.asarray(iv.columns[hit])
            lam[rows] += jumps[xp.asarray(iv.stop[hit]), rows]
        fwd = iv.projection or arnoldi(make_apply(iv.columns), iv.start, k,
                                       fixed_dims=iv.dims, symmetric=iv.symmetric)
        grad += _adjoint_interval(apply_T, fwd, iv, lam, n, T, k, rtol, acc, time_integral,
                                  quad_points, symmetric)
    return grad


def _adjoint_interval(apply_T, fwd, iv, lam, n, T, k, rtol, acc, time_integral, quad_points,
                      symmetric):
    """Adjoint across one forward interval, in as many error-controlled sub-steps as needed.

    Updates lam (c, n) in place for the interval's columns; returns the gradient part (n,).
    """
    xp = array_module(lam)
    grad = xp.zeros(n, dtype=lam.dtype)
    elapsed = np.zeros(iv.columns.size)  # adjoint time covered, from the interval's end
    active = np.arange(iv.columns.size)
    while active.size:
        rows = xp.asarray(iv.columns[active])
        remaining = iv.tau[active] - elapsed[active]
        start = lam[rows]
        norms = xp.linalg.norm(start, axis=1)
        tol = rtol * remaining / T
        accept = _Acceptor(norms, remaining, tol, n)
        adj = arnoldi(apply_T, start, k, symmetric=symmetric, accept=accept)
        sigma, z, rel = _choose_steps(adj, accept, remaining, T, rtol, n)
        acc.adjoint[iv.columns[active]] += rel
        acc.adjoint_dim = max(acc.adjoint_dim, int(adj.dims.max()))
        reached = sigma >= remaining
        begin = np.where(reached, 0.0, remaining - sigma)  # forward-local start of the sub-step
        sub = fwd if active.size == iv.columns.size else _rows_of(fwd, xp.asarray(active))
        y_start, y_norm = _forward_coefficients(sub, begin)
        if time_integral == "vanloan":
            M = van_loan(adj.square, sub.square, xp.asarray(sigma), y_start)
        else:
            M = trapezoid(adj.square, sub.square, xp.asarray(sigma), y_start, quad_points)
        grad += _contract(adj.basis, M * (adj.norms * y_norm)[:, None, None],
                          sub.basis[:, :, :n])
        lam[rows] = combine(adj.basis, z)
        elapsed[active] = np.where(reached, iv.tau[active], elapsed[active] + sigma)
        active = active[~reached]
    return grad


def _rows_of(proj, rows):
    """The projection restricted to some columns."""
    return Projection(proj.basis[:, rows], proj.hessenberg[rows], proj.next_subdiag[rows],
                      proj.norms[rows], None, None)


def _forward_coefficients(proj, begin):
    """Unit forward coefficients y(a)/||y(a)|| at forward-local times a (c,), and ||y(a)||."""
    xp = array_module(proj.norms)
    m = proj.square.shape[-1]
    if not begin.any():  # the whole interval: y(0) = beta e1
        unit = xp.zeros((proj.norms.shape[0], m), dtype=proj.norms.dtype)
        unit[:, 0] = 1.0
        return unit, proj.norms
    y = expm_batched(xp.asarray(begin)[:, None, None] * proj.square)[:, :, 0]
    y_norm = xp.linalg.norm(y, axis=1)
    return y / xp.where(y_norm > 0, y_norm, 1.0)[:, None], y_norm * proj.norms


def _contract(adjoint_basis, M, forward_basis):
    """sum_c rowsum((W_c M_c) ⊙ V_c): W (ma, c, n), M (c, ma, mf), V (mf, c, n) -> (n,)."""
    WM = M.transpose(0, 2, 1) @ adjoint_basis.transpose(1, 0, 2)  # (c, mf, n)
    return (WM * forward_basis.transpose(1, 0, 2)).sum(axis=(0, 1))
