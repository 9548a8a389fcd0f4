"""Forward and adjoint marches of one chunk of columns across error-controlled sub-steps.

Each column takes its own steps: an interval ends at the column's next observation time when
the Krylov error estimate allows, else earlier (Expokit's error per unit time: the tolerance of
a step of length tau is rtol * tau / T, so errors summed over steps stay within rtol). A
column's steps depend only on that column, so results do not depend on chunking or sharding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._array import array_module, basis_combine, to_numpy
from .errors import AccuracyError
from .krylov import Projection, arnoldi, combine, exp_and_error
from .spectral import exp_apply, matrix_of
from .time_integral import trapezoid, van_loan

MAX_SUBSTEPS = 5_000
"""Default work limit: Krylov sub-steps of one march (forward, or adjoint over all intervals)."""
_SHRINK_TRIES = 60
_ROUNDING = 2.0
"""Rounding floor of a step: _ROUNDING * eps * (||v|| + ||y||_1), the size of the terms that
cancel in V y (Expokit's ``expv`` carries a similar roundoff term)."""
_ROUNDING_SHARE = 0.2
"""Share of a step's tolerance rtol * tau / T given to its rounding floor (at least 8 x the floor
of a step without cancellation, which no step size can lower); truncation gets the rest, so the
sum over steps stays within rtol."""
_SAFETY = 3.0
"""Safety factor on the Saad/Expokit truncation estimate, which can sit 10-20x below the true
local error on strongly non-normal Hessenberg matrices. With the rounding share it makes the
truncation test 3.75x stricter than rtol; on the trust gallery (tests/test_trust.py) the true
gradient error then stays within 1x rtol and within 2.6x the reported estimate."""
_GROWTH_LIMIT = 1e13
"""Largest growth ||exp(tau H) e1|| of one step: a strongly non-normal operator has Ritz values
with large positive real part (first-order wave equation: +1100 for a stable operator), and a
long step would amplify them until exp(tau H) overflows; such a step is shrunk instead."""


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
    coupling: object = None  # (c_q,) 1 / eta, the balancing of the augmented coordinate
    reach: np.ndarray | None = None  # (c_q,) host bound of ||x(t)|| along the sub-step
    # when ||exp(t A)|| <= 1 (``_reach_bounds``); only on the shift-and-invert path
    begin: np.ndarray | None = None  # (c_q,) host t_q


@dataclass
class Accuracy:
    """Per-column accumulated relative error estimates and largest dimensions, for ``info``."""

    forward: np.ndarray
    adjoint: np.ndarray
    forward_dim: int = 0
    adjoint_dim: int = 0
    steps: int = 0
    adjoint_steps: int = 0
    integral: np.ndarray | None = None
    """(2, c) on the shift-and-invert path: the lag-2 difference of the adjoint's time
    integrals and their size, summed over the march (``_LinkIntegral``)."""
    reach: np.ndarray | None = None
    """(c,) where the shift-and-invert adjoint is certified by the integrals it feeds
    (``_chain``): a bound of ||x(t)|| over the march, so that an adjoint error of norm r at
    time t changes the integrals still to come by at most r x reach x t."""
    reference: np.ndarray | None = None
    """(c,) with reach: the largest adjoint norm of the march so far (``_chain``)."""
    unread_end: bool = False
    """lambda(0) is read by nothing (neither dL/dx0 nor dL/dF asked for): a shift-and-invert
    adjoint over the interval that ends at t = 0 is certified by its integrals (``_chain``)."""


class _Acceptor:
    """``accept`` for arnoldi: relative error estimate at step tau below tol (per column).

    It remembers what each check computed, so that the step choice after the Arnoldi loop
    starts from the values at each column's final dimension instead of recomputing them.
    """

    def __init__(self, norms, tau, rtol, T, n_rows, space=None):
        """norms (c,) device; tau (c,) host steps; rtol, T floats; space: see march_forward."""
        self.norms, self.tau_host, self.rtol, self.T = norms, tau, rtol, T
        self.n_rows, self.space = n_rows, space
        self.tau = array_module(norms).asarray(tau, dtype=norms.dtype)  # float32 stays float32
        self.checks = {}  # dimension m -> (y (c, m), Estimate)

    def __call__(self, hessenberg, basis, rows=None):
        """Which columns meet their tolerance at dimension m = basis.shape[0] (host bools (c,));
        only ``rows`` (host ints) are computed when given, the others are False."""
        c = self.tau_host.size
        if rows is None or rows.size == c:
            y, est = _estimate(hessenberg[:, :-1, :], hessenberg[:, -1, -1], self.norms,
                               self.tau, basis, self.n_rows, self.space)
        else:
            xp = array_module(self.norms)
            sub = xp.asarray(rows)
            y_rows, est_rows = _estimate(hessenberg[sub, :-1, :], hessenberg[sub, -1, -1],
                                         self.norms[sub], self.tau[sub], basis[:, sub],
                                         self.n_rows, self.space)
            y = xp.zeros((c, basis.shape[0]), dtype=y_rows.dtype)
            y[sub] = y_rows
            est = Estimate(np.full(c, np.nan), np.full(c, np.nan), est_rows.eps)
            est.put(rows, est_rows)
        self.checks[basis.shape[0]] = (y, est)
        return est.meets(self.rtol * self.tau_host / self.T)

    def predict_dimensions(self, d1, d2):
        """Per column (host (c,)), the dimension at which its truncation estimate should meet
        its tolerance, extrapolating the geometric decay between its checks at dimensions d1 and
        d2 (host ints, 0 = not checked); NaN where that cannot be told."""
        e1, e2 = np.full(d1.size, np.nan), np.full(d1.size, np.nan)
        for dims, values in ((d1, e1), (d2, e2)):
            for dim in np.unique(dims[dims > 0]):
                rows = dims == dim
                values[rows] = self.checks[int(dim)][1].truncation[rows]
        tol = (1 - _ROUNDING_SHARE) * self.rtol * self.tau_host / self.T
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = (np.log(e2) - np.log(e1)) / (d2 - d1)
            need = d2 + (np.log(tol) - np.log(e2)) / rate
        return np.where((rate < 0) & np.isfinite(need), need, np.nan)

    def at_final_dims(self, proj):
        """(y (c, m), Estimate) at each column's final dimension, from the checks where
        available (a column whose dimension was not checked is computed afresh)."""
        xp = array_module(proj.norms)
        c, m = proj.norms.shape[0], proj.basis.shape[0]
        y = xp.zeros((c, m), dtype=proj.norms.dtype)
        est = Estimate(np.full(c, np.nan), np.full(c, np.nan), _eps(proj.norms))
        for dim, (y_dim, est_dim) in self.checks.items():
            rows = np.nonzero(proj.dims == dim)[0]
            if rows.size:
                y[xp.asarray(rows), :dim] = y_dim[xp.asarray(rows)]
                est.put(rows, est_dim.take(rows))
        missing = np.nonzero(np.isnan(est.truncation))[0]
        if missing.size:
            y_new, est_new = _relative_error(_rows_of(proj, xp.asarray(missing)),
                                             self.tau_host[missing], self.n_rows, self.space)
            y[xp.asarray(missing)] = y_new
            est.put(missing, est_new)
        return y, est


@dataclass
class Estimate:
    """Per-column relative error estimate of a step (host arrays (c,)).

    truncation : safety factor x Saad/Expokit estimate, / ||x(tau)||
    rounding : rounding floor (eps times the norms that cancel in V y), / ||x(tau)||
    A non-finite coefficient, state or estimate, or a growth beyond _GROWTH_LIMIT in one step,
    gives inf in both: never accepted.
    """

    truncation: np.ndarray
    rounding: np.ndarray
    eps: float = float(np.finfo(np.float64).eps)

    @property
    def total(self) -> np.ndarray:
        return self.truncation + self.rounding

    def meets(self, tol) -> np.ndarray:
        """Truncation within the step's share ``tol`` (c,), rounding within its budget."""
        return ((self.truncation <= (1 - _ROUNDING_SHARE) * tol)
                & (self.rounding <= self.rounding_budget(tol)))

    def rounding_budget(self, tol):
        return np.maximum(_ROUNDING_SHARE * tol, 8 * _ROUNDING * self.eps)

    def take(self, rows) -> Estimate:
        return Estimate(self.truncation[rows], self.rounding[rows], self.eps)

    def put(self, rows, other: Estimate) -> None:
        self.truncation[rows] = other.truncation
        self.rounding[rows] = other.rounding


def _estimate(square, next_subdiag, norms, tau, basis, n_rows, space=None, dims=None):
    """y = beta exp(tau H) e1 (c, m) and the relative Estimate of x(tau) = V[:n_rows] y."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # refused below
        return _estimate_unchecked(square, next_subdiag, norms, tau, basis, n_rows, space, dims)


def _estimate_unchecked(square, next_subdiag, norms, tau, basis, n_rows, space, dims):
    xp = array_module(norms)
    if space is None:
        y, err = exp_and_error(square, next_subdiag, norms, tau, dims)
    else:
        y, err = space.exp_and_error(square, next_subdiag, norms, tau, dims)
    size = xp.linalg.norm(combine(basis[:, :, :n_rows], y), axis=1)
    eps = _eps(norms)
    floor = _ROUNDING * eps * (norms + xp.abs(y).sum(axis=1))
    # A state that underflows to zero (strong decay, float32) is measured against the start.
    size = xp.where(size > 0, size, norms)
    finite = xp.isfinite(y).all(axis=1) & xp.isfinite(size) & xp.isfinite(err)
    growth_limit, safety = ((_GROWTH_LIMIT, _SAFETY) if space is None
                            else (space.growth_limit, space.safety))
    finite &= xp.linalg.norm(y, axis=1) <= growth_limit * norms
    scale = xp.where(size > 0, size, 1.0)
    trunc = xp.where(finite, safety * err / scale, xp.inf)
    floor = xp.where(finite, floor / scale, xp.inf)
    both = to_numpy(xp.stack([trunc, floor])).astype(float)  # one host transfer, not two
    return y, Estimate(both[0], both[1], eps)


def _eps(array) -> float:
    return float(np.finfo(array.dtype).eps)


def _relative_error(proj, tau, n_rows, space=None):
    """y and the relative Estimate per column at (host) steps tau."""
    xp = array_module(proj.norms)
    return _estimate(proj.square, proj.next_subdiag, proj.norms,
                     xp.asarray(tau, dtype=proj.norms.dtype), proj.basis, n_rows, space,
                     proj.dims)


def _operator(proj, space):
    """The projected operator (c, m, m): H itself, or what ``space`` recovers from it."""
    return proj.square if space is None else space.operator(proj.square, proj.dims)


def _choose_steps(proj, accept, remaining, T, rtol, n_rows):
    """Per-column step: the whole remaining time if the estimate allows, else shrink.

    Returns host tau (c,), the coefficients y (c, m) at those steps and their Estimate.
    """
    xp = array_module(proj.norms)
    tau = remaining.copy()
    y, est = accept.at_final_dims(proj)
    full_step = est.take(np.arange(len(tau)))  # a copy: what limits each column at first
    for _ in range(_SHRINK_TRIES):
        tol = rtol * tau / T
        bad = np.nonzero(~est.meets(tol))[0]
        if not bad.size:
            break
        worst = np.maximum(
            est.truncation[bad] / np.maximum((1 - _ROUNDING_SHARE) * tol[bad], 1e-300),
            est.rounding[bad] / est.rounding_budget(tol[bad]))
        ratio = np.where(np.isfinite(worst), 1.0 / np.maximum(worst, 1e-300), 0.0)
        # each column by its own dimension: a step does not depend on the chunk's other columns
        tau[bad] *= np.clip(0.9 * ratio ** (1.0 / np.maximum(proj.dims[bad], 1)), 0.05, 0.9)
        rows = xp.asarray(bad)
        y_bad, est_bad = _relative_error(_rows_of(proj, rows), tau[bad], n_rows,
                                         accept.space)  # only these
        y[rows] = y_bad
        est.put(bad, est_bad)
    if accept.space is not None:
        tol = (1 - _ROUNDING_SHARE) * rtol * remaining / T
        unconverged = (full_step.truncation > tol) & (full_step.rounding <= tol)
        accept.space.check_steps(tau, remaining, unconverged)
    return tau, y, est


def march_forward(make_apply, u0, obs_times, T, k, rtol, keep_bytes, symmetric=False, *,
                  forcing_norms, a_norm, max_substeps=MAX_SUBSTEPS, space=None):
    """Integrate u' = Â u from u0 = [x0; 1] (c, N) to every observation time.

    make_apply(rows, coupling) -> callable (c_q, N) -> (c_q, N): the augmented operator
    [[A, f coupling], [0, 0]] of those columns (coupling (c_q,) device).
    forcing_norms : (c,) host ||f_j||; a_norm : float, an estimate of ||A|| (any norm).
    space : None (polynomial Krylov: make_apply gives the operator) or a shift-and-invert space
    (``rational.ShiftInvertSpace``: make_apply gives (I - gamma Â)^{-1}, and the space reads the
    projected operator and the error estimate off its Hessenberg).

    Each step is balanced: the augmented coordinate is eta = max(||x||, ||f|| min(tau, 1/||A||))
    instead of 1 (with coupling 1/eta), so that a state far below 1 -- strong decay, or data of
    any scale -- is not computed as the small difference of O(1) terms (x(t) scales with x0 and
    f exactly, whatever their scale).

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
        _check_work(len(intervals), max_substeps, k, rtol, "forward", t[active].min() / T)
        remaining = obs[next_obs[active]] - t[active]
        begin = t[active].copy()
        start, coupling = _balanced_start(u, active, remaining, forcing_norms, a_norm)
        norms = xp.linalg.norm(start, axis=1)
        accept = _Acceptor(norms, remaining, rtol, T, N - 1, space)
        # Lanczos structure of the augmented operator holds only from u0 = e_{n+1} (t = 0).
        lanczos = symmetric and not t[active].any()
        apply = make_apply(active, coupling)
        proj = arnoldi(apply, start, k, symmetric=lanczos, accept=accept)
        tau, y, est = _choose_steps(proj, accept, remaining, T, rtol, N - 1)
        reached = tau >= remaining
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow raises just below
            x_new = combine(proj.basis, y)[:, : N - 1]
            _check_growth(start[:, : N - 1], x_new, tau, t[active])
        u = u.copy()  # never in place: `start` of this interval may be u itself
        u[xp.asarray(active), : N - 1] = x_new
        observed = active[reached]
        states[xp.asarray(next_obs[observed]), xp.asarray(observed)] = \
            x_new[xp.asarray(np.nonzero(reached)[0])]
        t[active] = np.where(reached, obs[next_obs[active]], t[active] + tau)
        stop = np.where(reached, next_obs[active], -1)
        next_obs[observed] += 1
        kept += start.nbytes  # always held: a basis that is not kept is rebuilt from it
        keep = kept + projection_bytes(proj) <= keep_bytes
        if keep:
            kept += projection_bytes(proj)
        reach = (None if space is None  # only a shift-and-invert adjoint reads it
                 else _reach_bounds(start[:, : N - 1], x_new, forcing_norms[active] * tau,
                                    space.symmetric))
        intervals.append(Interval(active, tau, start, _owned(proj) if keep else None,
                                  proj.dims, stop, lanczos, coupling, reach, begin))
        acc.forward[active] += est.total
        acc.forward_dim = max(acc.forward_dim, int(proj.dims.max()))
        active = active[next_obs[active] < obs.size]
    acc.steps = len(intervals)
    return states, intervals, acc


def _reach_bounds(x_start, x_end, forcing_steps, symmetric):
    """``Interval.reach`` (c,) host from the states at a sub-step's ends (c, n) and
    tau ||f|| (c,) host: ||x(t_q)|| + tau ||f||, or for a symmetric A
    (||x(t_q)||^2 + ||x(t_q+1)||^2)^(1/2) (each eigencomponent is monotone in t)."""
    xp = array_module(x_start)
    start, end = (to_numpy(xp.linalg.norm(x, axis=1)).astype(float) for x in (x_start, x_end))
    return np.hypot(start, end) if symmetric else start + forcing_steps


def projection_bytes(proj) -> int:
    """Bytes a kept projection holds once ``_owned``: its m basis rows, not the k + 1 rows of
    the array they were built in, and its small matrices."""
    m, c, N = proj.basis.shape
    small = proj.hessenberg.nbytes + proj.next_subdiag.nbytes + proj.norms.nbytes
    return m * c * N * proj.basis.dtype.itemsize + small


def _owned(proj):
    """The projection with a basis that owns exactly its m rows: ``arnoldi`` returns a view
    of its (k+1, c, N) work array, which would hold all of it (3.9x the counted bytes with
    40 observation times, whose short steps need few dimensions)."""
    basis = proj.basis
    if basis.base is not None:
        basis = basis.copy()
    return Projection(basis, proj.hessenberg, proj.next_subdiag, proj.norms, proj.dims,
                      proj.converged)


def _balanced_start(u, active, remaining, forcing_norms, a_norm):
    """Start vectors [x; eta] (c_q, N) of a step and the couplings 1/eta (0 where eta = 0)."""
    xp = array_module(u)
    rows = xp.asarray(active)
    x = u[rows, :-1]
    x_norm = xp.linalg.norm(x, axis=1)
    horizon = np.minimum(remaining, 1.0 / a_norm) if a_norm > 0 else remaining
    eta = xp.maximum(x_norm, xp.asarray(forcing_norms[active] * horizon, dtype=u.dtype))
    start = xp.empty_like(u[rows])
    start[:, :-1] = x
    start[:, -1] = eta
    coupling = xp.where(eta > 0, 1.0 / xp.where(eta > 0, eta, 1.0), 0.0).astype(u.dtype)
    return start, coupling


def _check_growth(x_start, x_new, tau, t):
    """Refuse a state that left the floating-point range: A itself grows that fast."""
    xp = array_module(x_new)
    limit = float(np.finfo(x_new.dtype).max) ** 0.4  # its norm must not overflow either
    size = to_numpy(xp.linalg.norm(x_new.astype(xp.float64, copy=False), axis=1))
    bad = ~np.isfinite(size) | (size > limit)
    if bad.any():
        before = to_numpy(xp.linalg.norm(x_start.astype(xp.float64), axis=1))[bad]
        grow = np.log(np.minimum(size[bad], limit) / np.maximum(before, 1e-300)) / tau[bad]
        raise FloatingPointError(
            f"the state grows beyond the floating-point range near t = {float(t[bad][0]):.3g} "
            f"(growth rate about {float(np.max(grow)):.3g} per unit time): A = A0 + diag(d) has "
            "eigenvalues with a large positive real part, so the solution overflows over T")


def _check_work(steps, max_substeps, k, rtol, what, progress=None):
    """Refuse when the march exceeds max_substeps, or (forward, after 64 steps) is on course to
    exceed it four times over: fail in seconds, not after the whole budget."""
    on_course = (progress is not None and steps >= 64
                 and steps > 4 * max_substeps * max(progress, 1e-300))
    if steps >= max_substeps or on_course:
        raise AccuracyError(
            f"the {what} march needs more than max_substeps={max_substeps} Krylov sub-steps "
            f"to meet rtol={rtol:g} with k={k}: increase k (e.g. k={2 * k}), loosen rtol, or "
            "raise max_substeps")


def march_adjoint(make_apply, apply_T, intervals, jumps, n, T, k, rtol, acc,
                  time_integral="vanloan", quad_points=32, symmetric=False,
                  max_substeps=MAX_SUBSTEPS, extras=None, space=None, by_integrals=True):
    """March the adjoint back across the intervals and sum the exact sub-step integrals.

    jumps : (m_obs, c, n) dL/dx at the observation times; apply_T: (c_q, n) -> (c_q, n), A^T on
    rows (or its shift-and-invert counterpart with ``space``, as in march_forward).
    Returns dL/dd (n,), summed over the chunk's columns in a fixed order.
    extras : optional ``pattern.AdjointExtras``, given every sub-step and lambda(0).
    by_integrals : where ``_reach`` allows, certify the adjoint by the integrals it feeds
    (``_chain``) instead of relative to itself.
    """
    xp = array_module(jumps)
    lam = xp.zeros((jumps.shape[1], n), dtype=jumps.dtype)
    grad = xp.zeros(n, dtype=jumps.dtype)
    if extras is not None:
        extras.start(jumps.shape[1], xp, jumps.dtype)
    acc.reach = _reach(intervals, jumps.shape[1], space, extras) if by_integrals else None
    acc.unread_end = by_integrals and not reads_adjoint(extras)
    for iv in reversed(intervals):
        hit = iv.stop >= 0
        if hit.any():
            rows = xp.asarray(iv.columns[hit])
            lam[rows] += jumps[xp.asarray(iv.stop[hit]), rows]
        fwd = iv.projection or arnoldi(make_apply(iv.columns, iv.coupling), iv.start, k,
                                       fixed_dims=iv.dims, symmetric=iv.symmetric)
        grad += _adjoint_interval(apply_T, fwd, iv, lam, n, T, k, rtol, acc, time_integral,
                                  quad_points, symmetric, max_substeps, extras, space)
    if acc.integral is not None:
        # The integrals' error, relative to the whole march's integrals per column, is a
        # second estimate next to the states' (what the next step and the x0 gradient read):
        # each must meet rtol, and the reported estimate is the larger.
        diff, size = acc.integral
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(size > 0, diff / size, np.where(diff > 0, np.inf, 0.0))
        acc.adjoint = np.maximum(acc.adjoint, ratio)
    if extras is not None:
        extras.finish(lam)
    return grad


def certified_by_integrals(space, extras) -> bool:
    """Whether the adjoint march may be certified by the integrals it feeds (``_reach``)."""
    return getattr(space, "contractive", False) and not reads_adjoint(extras)


def reads_adjoint(extras) -> bool:
    """Whether something reads the adjoint itself, not only lambda(t) x(t)^T: lambda(0)
    (dL/dx0) or its integral alone (dL/dF)."""
    return extras is not None and bool(extras.needs_initial or extras.integral)


def _reach(intervals, c, space, extras):
    """``Accuracy.reach`` (c,) host, or None where the adjoint must be right relative to
    itself all the way to t = 0.

    Only where ||exp(t A^T)||_2 <= 1 is proven (``space.contractive``), so that an adjoint
    error keeps its norm bound all the way back, and only the diagonal and pattern gradients
    are asked for: they read lambda(t) x(t)^T, which that bound times the bound of ||x(t)||
    (``Interval.reach``) bounds; lambda(0) (dL/dx0) and its integral alone (dL/dF) have no x
    to weigh them.
    """
    if not certified_by_integrals(space, extras):
        return None
    reach = np.zeros(c)
    for iv in intervals:
        np.maximum.at(reach, iv.columns, iv.reach)
    return reach


def _adjoint_interval(apply_T, fwd, iv, lam, n, T, k, rtol, acc, time_integral, quad_points,
                      symmetric, max_substeps, extras=None, space=None):
    """Adjoint across one forward interval, in as many error-controlled sub-steps as needed.

    Updates lam (c, n) in place for the interval's columns; returns the gradient part (n,).
    """
    if space is not None and time_integral == "vanloan":
        from ._chain import adjoint_interval  # it builds on this module's helpers

        return adjoint_interval(apply_T, fwd, iv, lam, n, T, k, rtol, acc, symmetric,
                                max_substeps, extras, space)
    xp = array_module(lam)
    grad = xp.zeros(n, dtype=lam.dtype)
    elapsed = np.zeros(iv.columns.size)  # adjoint time covered, from the interval's end
    active = np.arange(iv.columns.size)
    while active.size:
        _check_work(acc.adjoint_steps, max_substeps, k, rtol, "adjoint")
        rows = xp.asarray(iv.columns[active])
        remaining = iv.tau[active] - elapsed[active]
        adj, accept = adjoint_space(apply_T, lam[rows], remaining, rtol, T, k, symmetric, acc,
                                    space)
        sigma, z, est = _choose_steps(adj, accept, remaining, T, rtol, n)
        reached = sigma >= remaining
        begin = np.where(reached, 0.0, remaining - sigma)  # forward-local start of the sub-step
        sub = fwd if active.size == iv.columns.size else _rows_of(fwd, xp.asarray(active))
        G, H = _operator(adj, space), _operator(sub, space)
        acc.adjoint[iv.columns[active]] += est.total + _van_loan_rounding(G, sigma, H)
        y_start, y_norm = _forward_coefficients(H, sub.norms, begin)
        steps = xp.asarray(sigma, dtype=lam.dtype)  # host float64 -> the working precision
        if time_integral == "vanloan":
            M = van_loan(G, H, steps, y_start)
        else:
            M = trapezoid(G, H, steps, y_start, quad_points)
        WM = _products(adj.basis, M * (adj.norms * y_norm)[:, None, None])
        if extras is not None:  # reads W M before the diagonal reuses it in place
            extras.substep(iv.columns[active], adj, WM, sub, sigma, G)
        grad += _diagonal_sum(WM, sub.basis[:, :, :n])
        lam[rows] = combine(adj.basis, z)
        elapsed[active] = np.where(reached, iv.tau[active], elapsed[active] + sigma)
        active = active[~reached]
    return grad


def adjoint_space(apply_T, start, remaining, rtol, T, k, symmetric, acc, space,
                  accept=None):
    """(the adjoint Projection from the rows ``start`` (c, n) for steps up to ``remaining``,
    its _Acceptor), counted in ``acc``; ``accept`` replaces the default _Acceptor."""
    if accept is None:
        norms = array_module(start).linalg.norm(start, axis=1)
        accept = _Acceptor(norms, remaining, rtol, T, start.shape[1], space)
    adj = arnoldi(apply_T, start, k, symmetric=symmetric, accept=accept)
    acc.adjoint_steps += 1
    acc.adjoint_dim = max(acc.adjoint_dim, int(adj.dims.max()))
    return adj, accept


def _van_loan_rounding(G, sigma, H, choice=None):
    """Relative rounding of the step's Van Loan integral (host (c,)) of the projected adjoint
    and forward operators G, H (c, m, m): scaling and squaring of a stiff block loses about
    0.1 eps sigma ||G||_1 (measured: 5e-11 at sigma ||G|| = 1e6). Where the eigensystems of
    ``spectral.Spectral`` operators compute it, their charge: ``choice`` is the step's
    ``spectral.van_loan_choice`` (where, charge)."""
    A, B = matrix_of(G), matrix_of(H)
    xp = array_module(A)
    eps = _eps(A)
    size = xp.maximum(xp.abs(A).sum(axis=1).max(axis=1), xp.abs(B).sum(axis=1).max(axis=1))
    value = 0.1 * eps * sigma * to_numpy(size).astype(float)
    if choice is not None:
        eigen, charge = choice
        value = np.where(eigen, charge, value)
    return value


def _rows_of(proj, rows):
    """The projection restricted to some columns."""
    dims = None if proj.dims is None else proj.dims[to_numpy(rows)]
    return Projection(proj.basis[:, rows], proj.hessenberg[rows], proj.next_subdiag[rows],
                      proj.norms[rows], dims, None)


def _forward_coefficients(H, norms, begin):
    """Unit forward coefficients y(a)/||y(a)|| at forward-local times a (c,), and ||y(a)||,
    of the projected forward operators H (c, m, m) started from norms (c,) times e1."""
    xp = array_module(norms)
    unit = xp.zeros((norms.shape[0], H.shape[-1]), dtype=norms.dtype)
    unit[:, 0] = 1.0
    if not begin.any():  # the whole interval: y(0) = beta e1
        return unit, norms
    y = exp_apply(H, np.asarray(begin, dtype=float)[:, None], unit)[:, 0]
    y_norm = xp.linalg.norm(y, axis=1)
    return y / xp.where(y_norm > 0, y_norm, 1.0)[:, None], y_norm * norms


def _contract(adjoint_basis, M, forward_basis):
    """sum_c rowsum((W_c M_c) ⊙ V_c): W (ma, c, n), M (c, ma, mf), V (mf, c, n) -> (n,).
    The bases are read where they lie (no transposed copies); W M is the one (c, mf, n)
    temporary, multiplied in place."""
    return _diagonal_sum(_products(adjoint_basis, M), forward_basis)


def _products(adjoint_basis, M):
    """W_c M_c per column, as rows: W (ma, c, n), M (c, ma, mf) -> (c, mf, n)."""
    return basis_combine(adjoint_basis, M.transpose(0, 2, 1))


def _diagonal_sum(WM, forward_basis):
    """sum_c rowsum(WM_c ⊙ V_c) (n,), V (mf, c, n); WM is overwritten."""
    WM *= forward_basis.transpose(1, 0, 2)
    return WM.sum(axis=(0, 1))
