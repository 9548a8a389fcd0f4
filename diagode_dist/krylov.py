"""Batched Arnoldi (CGS2) with per-column truncation, and the a posteriori error estimate.

All columns of a chunk are processed together: vectors are stored as rows, the basis of a
chunk is an array ``basis`` of shape (m, c, N) (Krylov index, column, state), so that one
operator product acts on all columns at once (one GEMM for a dense operator) and every
projection is a batched matvec. There is no Python loop over columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._array import array_module, basis_combine, basis_dot, to_numpy
from .expm import expm_batched

BREAKDOWN_RTOL = 1e-12
"""A column breaks down ("happy breakdown") when h_{j+1,j} <= BREAKDOWN_RTOL * ||A v_j||
(in float32: 50 eps)."""


@dataclass
class Projection:
    """Krylov projections of a chunk of columns.

    basis : (m, c, N)  orthonormal basis vectors of each column, zero beyond its dimension
    hessenberg : (c, m + 1, m)  projected operator; rows/columns beyond a column's dimension
        are zero, so exp of its square part acts on that column's own dimension only
    next_subdiag : (c,)  each column's own h_{d+1,d} (d its dimension; 0 at a breakdown)
    norms : (c,)  norm of each start vector
    dims : (c,) host ints, each column's own Krylov dimension
    converged : (c,) host bools, True where ``accept`` (or a breakdown) ended the column
    """

    basis: object
    hessenberg: object
    next_subdiag: object
    norms: object
    dims: np.ndarray
    converged: np.ndarray

    @property
    def square(self):
        """(c, m, m) square part of the Hessenberg matrices."""
        return self.hessenberg[:, :-1, :]


def arnoldi(apply, start, k_max: int, accept=None, check_every: int = 4,
            fixed_dims=None, symmetric: bool = False) -> Projection:
    """Batched Arnoldi with classical Gram-Schmidt applied twice.

    Parameters
    ----------
    apply : callable, (c, N) -> (c, N)
        The operator applied to every row.
    start : (c, N) start vectors (any norm; a zero vector gives a zero projection).
    k_max : maximum Krylov dimension (capped at N).
    accept : callable (hessenberg (c, m+1, m), basis (m, c, N), rows) -> host bool (c,),
        optional. Says which of the columns ``rows`` (host ints; the others are not computed)
        meet their error estimate at dimension m. A column is asked every
        ``check_every`` dimensions, at ``k_max`` and whenever some h_{m+1,m} is tiny (a
        breakdown ends a column only when the estimate with that h accepts it); an accepted
        column keeps dimension m. Without it every column runs to ``k_max`` or its breakdown.
    fixed_dims : (c,) host ints, optional
        Rebuild a projection whose dimensions are known (no checks): identical floats.
    symmetric : bool
        The operator is symmetric on the Krylov space (Lanczos): orthogonalise against the last
        two vectors only (still twice), O(N) per step instead of O(j N); H is tridiagonal.
    """
    xp = array_module(start)
    c, N = start.shape
    k_max = int(min(k_max, N))
    basis = xp.zeros((k_max + 1, c, N), dtype=start.dtype)
    hess = xp.zeros((c, k_max + 1, k_max), dtype=start.dtype)
    norms = xp.linalg.norm(start, axis=1)
    basis[0] = _divide_rows(start, norms, xp)
    breakdown_rtol = max(BREAKDOWN_RTOL, 50 * float(np.finfo(start.dtype).eps))
    if fixed_dims is not None:
        fixed_dims = np.asarray(fixed_dims)
        k_max = int(np.max(fixed_dims))
    dims = np.full(c, k_max)
    done = np.zeros(c, dtype=bool)
    m = k_max
    schedule = _Schedule(c, check_every)
    for j in range(k_max):
        w = apply(basis[j])
        scale = xp.linalg.norm(w, axis=1)
        first = max(0, j - 1) if symmetric else 0
        h, w = _cgs2(basis[first: j + 1], w)
        h_next = xp.linalg.norm(w, axis=1)
        if j + 1 == N:  # the basis spans the whole space: exact, whatever rounding left in w
            h_next = xp.zeros_like(h_next)
        hess[:, first: j + 1, j] = h
        hess[:, j + 1, j] = h_next
        tiny = to_numpy(h_next <= breakdown_rtol * scale) & ~done
        if fixed_dims is not None:
            newly = fixed_dims == j + 1
        elif accept is None:
            newly = tiny.copy()
        else:
            # A column is checked on its own schedule only (every ``check_every`` dimensions,
            # earlier where its own estimates predict success, at k_max, and at a tiny
            # h_{j+1,j}), so its dimension does not depend on the other columns of the chunk.
            # A tiny h is a breakdown (an invariant subspace, exact at this dimension) only if
            # the estimate computed with that h agrees: a component 1e-13 in a slow direction
            # behind a stiff one may be all that is left after the decay.
            due = ~done & (schedule.due(j + 1) | tiny | (j + 1 == k_max))
            newly = np.zeros(c, dtype=bool)
            if due.any():
                ok = np.asarray(accept(hess[:, : j + 2, : j + 1], basis[: j + 1],
                                       np.nonzero(due)[0]))
                newly = ok & due
                schedule.checked(due & ~newly, j + 1, accept)
        broken = xp.asarray(newly & tiny)
        hess[:, j + 1, j] = xp.where(broken, 0.0, h_next)
        basis[j + 1] = _divide_rows(w, hess[:, j + 1, j], xp)
        dims[newly] = j + 1
        done |= newly
        if done.all():
            m = j + 1
            break
    if fixed_dims is not None:
        dims, done = np.asarray(fixed_dims).copy(), np.ones(c, dtype=bool)
    return _truncate(basis, hess, norms, dims, done, m, xp)


class _Schedule:
    """Per-column check dimensions: every ``check_every``, or earlier where the column's own
    last two estimates, decaying geometrically, predict that it meets its tolerance."""

    def __init__(self, c, check_every):
        self.every = check_every
        self.next = np.full(c, check_every)
        self.last = np.zeros((2, c), dtype=np.int64)  # the column's last two checked dimensions

    def due(self, m):
        return self.next <= m

    def checked(self, rows, m, accept):
        """Columns ``rows`` were checked at dimension m and not accepted: plan their next."""
        self.last[0, rows], self.last[1, rows] = self.last[1, rows], m
        plan = np.full(rows.size, (m // self.every + 1) * self.every, dtype=float)  # aligned
        predict = getattr(accept, "predict_dimensions", None)
        if predict is not None:
            guess = predict(self.last[0], self.last[1])
            early = np.clip(np.ceil(guess), m + 1, plan)
            # an early check must save at least two dimensions to pay for itself
            plan = np.where(np.isfinite(guess) & (early <= plan - 2), early, plan)
        self.next[rows] = plan[rows].astype(np.int64)


def _truncate(basis, hess, norms, dims, converged, m, xp) -> Projection:
    # each column's own h_{d+1,d} (0 only where it broke down or spans the space): a column
    # accepted below m is not an invariant subspace, and a later estimate at another step
    # must not read it as one
    rows, at = xp.arange(dims.size), xp.asarray(np.maximum(dims, 1))
    next_subdiag = hess[rows, at, at - 1]
    d = xp.asarray(dims)[:, None, None]
    keep = (xp.arange(m + 1)[None, :, None] < d) & (xp.arange(m)[None, None, :] < d)
    hessenberg = hess[:, : m + 1, :m] * keep
    return Projection(basis[:m], hessenberg, next_subdiag, norms, dims, converged)


def _cgs2(basis, w):
    """Orthogonalise rows of w (c, N) against basis (j, c, N), twice. Returns (c, j), (c, N)."""
    h = project(basis, w)
    w = w - combine(basis, h)
    h2 = project(basis, w)
    return h + h2, w - combine(basis, h2)


def project(basis, w):
    """Coefficients <v_i, w> per column: basis (m, c, N), w (c, N) -> (c, m). The basis is
    read where it lies (a slice of the (k+1, c, N) array), never copied."""
    return basis_dot(basis, w)


def combine(basis, coeffs):
    """Sum_i coeffs[:, i] v_i per column: basis (m, c, N), coeffs (c, m) -> (c, N); the
    basis is read where it lies, never copied."""
    return basis_combine(basis, coeffs)


def _divide_rows(w, norms, xp):
    """w / norms row by row, with exact zeros where the norm is zero."""
    safe = xp.where(norms > 0, norms, 1.0)
    inverse = (norms > 0).astype(w.dtype) / safe  # in w's precision: no float64 (c, N) copy
    return w * inverse[:, None]


def exp_and_error(hessenberg, next_subdiag, norms, tau, dims=None):
    """Projected solution and error estimate of ``exp(tau A) v`` for every column.

    hessenberg : (c, m, m) square Hessenberg matrices H (or (c, m+1, m): the last row is
        ignored); next_subdiag : (c,) h = h_{m+1,m}; norms : (c,) beta = ||v||; tau : (c,)
        steps (each column may take its own); dims : (c,) host ints, each column's own
        dimension d (default m): the estimate reads row d of phi1 (zero padding beyond it).

        y   = beta exp(tau H) e1                          (c, m)  coefficients in the basis
        err = beta tau h |e_m^T phi1(tau H) e1|           (c,)    (Saad 1992; Expokit's expv)

    Both are read off one exponential of the augmented matrix [[tau H, e1], [0, 0]].
    """
    xp = array_module(hessenberg)
    c, _, m = hessenberg.shape
    block = xp.zeros((c, m + 1, m + 1), dtype=hessenberg.dtype)
    block[:, :m, :m] = tau[:, None, None] * hessenberg[:, :m, :]
    block[:, 0, m] = 1.0
    E = expm_batched(block)
    y = norms[:, None] * E[:, :m, 0]
    last = xp.full(c, m - 1) if dims is None else xp.asarray(np.asarray(dims) - 1)
    err = norms * tau * xp.abs(next_subdiag) * xp.abs(E[xp.arange(c), last, m])
    return y, err
