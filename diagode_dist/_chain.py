"""Adjoint sub-steps chained inside one shift-and-invert space.

A shift-and-invert space built from lambda(t) approximates exp(s A^T) lambda(t) for every s up
to the whole interval at once (van den Eshof & Hochbruck 2006); what limits a step there is not
the space but the rounding of exp(s A_m) e1 relative to a state that decays by many orders
(stiff dissipative operators: e^-240 over T at ||TA|| = 1e4). Such a step is split into links
that all read the same basis: each link starts from the coefficients the previous one ended
with, so its rounding is relative to its own start, and no basis is rebuilt. A link's
truncation estimate follows the space of dimension m - 2 along the same chain (the lag-2
difference of ``rational.ShiftInvertSpace``), relative to the state it delivers.

Step choice: the error of a shift-and-invert space is not monotone in the step (shorter steps
than gamma converge worse), so the longest step is picked from a geometric set of candidates
instead of shrinking until the estimate meets its tolerance (which can shrink to 1e-17 T and
crawl). A link's rounding gets its share of rtol per unit time, as on the polynomial path; the
chain's truncation gets the share of the whole time the space is meant to cover.

The estimates at a link's end do not see the states inside it, where a shift-and-invert space
is least accurate (early in a step), and the gradient's time integral reads them all: each
link's Van Loan integral is computed again with the space two dimensions smaller, and the
difference, summed over the march relative to the integrals' size, is a second estimate
(``Accuracy.integral``) that must meet rtol as well.

Certified by the integrals it feeds. Where ||exp(t A^T)||_2 <= 1 is proven and only the
diagonal and pattern gradients are asked for (``_march.certified_by_integrals``), the adjoint
need not be right relative to itself while it decays by e^-240: what the gradient reads is
lambda(t) x(t)^T. There a space is accepted when its whole step's Van Loan integral meets the
lag-2 test (``_IntegralAcceptor``), the states' estimates are relative to the largest adjoint
norm of the march so far (``Accuracy.reference``) instead of to themselves, and the error of
each state a chain delivers is charged to the integral estimate as what it can still change:
its norm x a bound of ||x(t)|| (``Accuracy.reach``) x the time left to t = 0. On the 128 x 128
dissipative grid this took the time at ||TA|| = 1e4 from 102 s (k = 60; refused at k = 30) to
2-3 s. Where that certification refuses (its bounds are loose for a tight rtol), the adjoint
is marched again relative to itself (``adjoint._chunk_adjoint``).

The end of the march. Over the interval that ends at t = 0, the state a chain delivers is
lambda(0), which only dL/dx0 and dL/dF read; where neither is asked for, that interval's
adjoint is certified by its integrals alone, on any operator (``_reference``: its states'
estimates relative to inf). On a growing operator this matters: the adjoint's start can
weigh the growing mode so little that lambda(0) is determined only to eps / that weight,
while the gradient is not (the 128 x 128 growing grid: rtol 1e-12 refused, then certified).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._array import array_module, to_numpy
from ._march import (
    _Acceptor,
    _check_work,
    _diagonal_sum,
    _forward_coefficients,
    _products,
    _rows_of,
    _van_loan_rounding,
    adjoint_space,
)
from .errors import AccuracyError
from .krylov import combine
from .rational import _underflow
from .spectral import exp_and_rounding, exp_apply, van_loan_choice
from .time_integral import van_loan

_CANDIDATES = 0.5 ** np.arange(24)
"""Fractions of the remaining time tried as a link's step (down to 1.2e-7): a factor 2 apart,
as a factor 4 missed steps that meet both the truncation and the rounding test (measured on
the 128 x 128 dissipative grid at ||TA|| = 1e4)."""
_LAG = 2
_ROUNDING = 2.0
_ROUNDING_SHARE = 0.2


@dataclass
class ChainResult:
    """What one adjoint space delivered for its columns (host arrays (c,) unless noted)."""

    covered: np.ndarray  # adjoint time covered from the space's start
    lam: object  # (c, n) adjoint at the end of the chain
    error: np.ndarray  # relative error estimate: largest truncation + summed rounding


def adjoint_interval(apply_T, fwd, iv, lam, n, T, k, rtol, acc, symmetric, max_substeps,
                     extras, space):
    """``_march._adjoint_interval`` in a shift-and-invert space: each basis serves a chain of
    sub-steps (``chain_links``), a new one is built only where a chain stops short of the
    interval's start. Only the Van Loan time integral (the trapezoid rule is a polynomial-path
    comparison)."""
    xp = array_module(lam)
    grad = xp.zeros(n, dtype=lam.dtype)
    step_rtol = rtol * space.adjoint_share
    elapsed = np.zeros(iv.columns.size)  # adjoint time covered, from the interval's end
    active = np.arange(iv.columns.size)
    while active.size:
        _check_work(acc.adjoint_steps, max_substeps, k, rtol, "adjoint")
        rows = xp.asarray(iv.columns[active])
        remaining = iv.tau[active] - elapsed[active]
        sub = fwd if active.size == iv.columns.size else _rows_of(fwd, xp.asarray(active))
        H = space.spectral(sub.square, sub.dims)
        reference = _reference(acc, iv.columns[active], lam[rows], iv.begin[active])
        norms = xp.linalg.norm(lam[rows], axis=1)
        state_test = None if reference is not None else _Acceptor(
            norms, remaining, step_rtol, T, n, space)
        accept = _IntegralAcceptor(norms, remaining, step_rtol, T, H, space, reference,
                                   state_test)
        adj, _ = adjoint_space(apply_T, lam[rows], remaining, step_rtol, T, k, symmetric, acc,
                               space, accept)
        link = _LinkIntegral(adj, sub, H, space, remaining, iv.columns[active], n, acc, extras,
                             iv.begin[active])
        allowance = rtol - acc.adjoint[iv.columns[active]]
        chain = chain_links(adj, link.lagged, space, remaining, T, step_rtol, link, allowance,
                            reference)
        acc.adjoint[iv.columns[active]] += chain.error
        if acc.reach is not None:  # what the error of the state delivered can still change
            link.diff += link.bound(np.arange(active.size), chain.error * to_numpy(reference),
                                    chain.covered)
        link.add_integrals(acc, iv.columns[active])
        _refuse_early(acc.adjoint[iv.columns[active]], rtol, k)
        grad += link.grad
        lam[rows] = chain.lam
        elapsed[active] += chain.covered
        active = active[elapsed[active] < iv.tau[active] * (1 - 1e-12)]
    return grad


def _reference(acc, columns, lam, begin):
    """None, or (where the adjoint is certified by the integrals it feeds) the norms (device
    (c,)) its estimates are relative to where its state is smaller: where ``acc.reach`` is
    known (a contractive operator), the largest adjoint norm of each column's march so far,
    ``lam`` (c, n) included (``acc.reference`` updated); where nothing reads lambda(0)
    (``acc.unread_end``) and the interval begins at t = 0 (``begin`` (c,) host) for all
    columns, inf: the states delivered there are read by nothing, and what the gradient reads,
    the integrals, is checked by their own lag-2 test (``_IntegralAcceptor``,
    ``_LinkIntegral``). Measured on the 128 x 128 growing grid at ||TA|| = 5000: the adjoint
    start, two spikes, weighs the growing mode by ~1e-5, so lambda(0) is determined to only
    ~eps / 1e-5 (lag-2 differences stagnate at 1e-11 to k = 100) while the gradient agrees
    with an independent reference to 1e-13; relative to lambda(0), rtol 1e-12 was refused."""
    xp = array_module(lam)
    if acc.reach is None:
        if acc.unread_end and not np.any(begin):
            return xp.full(lam.shape[0], xp.inf, dtype=lam.dtype)
        return None
    if acc.reference is None:
        acc.reference = np.zeros(acc.adjoint.size)
    norms = to_numpy(xp.linalg.norm(lam, axis=1)).astype(float)
    acc.reference[columns] = np.maximum(acc.reference[columns], norms)
    return xp.asarray(acc.reference[columns], dtype=lam.dtype)


class _IntegralAcceptor:
    """``accept`` for ``krylov.arnoldi`` building an adjoint space: dimension m is accepted
    where, over the whole remaining step, the Van Loan integral -- what the gradient reads --
    differs from that of the space of dimension m - 2 by at most its share of rtol relative to
    its size (the second estimate would refuse it otherwise: measured, 1.7e-8 at rtol 1e-8 on
    the 64 x 64 grid with a space the state test alone accepted), and the state at the step's
    end meets ``state_test`` (``_march._Acceptor``: relative to itself). Where the adjoint is
    certified by the integrals it feeds (``Accuracy.reach``), the state is instead tested
    relative to the reference: its own relative accuracy at the step's end, which a decay by
    e^-240 puts out of reach, is not asked for."""

    def __init__(self, norms, remaining, rtol, T, H, space, reference, state_test=None):
        """norms (c,) device: of the adjoint at the step's start; remaining (c,) host; H
        (c, mf, mf) the forward's operator over the interval (the step starts where it does);
        reference (c,) device, or None with a ``state_test``."""
        self.norms = norms
        self.remaining, self.H, self.space, self.reference = remaining, H, space, reference
        self.tol = (1 - _ROUNDING_SHARE) * rtol * remaining / T
        self.state_test = state_test
        self.predict_dimensions = getattr(state_test, "predict_dimensions", None)

    def __call__(self, hessenberg, basis, rows=None):
        c = self.remaining.size
        rows = np.arange(c) if rows is None else np.asarray(rows)
        xp = array_module(hessenberg)
        at = xp.asarray(rows)
        m = hessenberg.shape[-1]
        ok = np.zeros(c, dtype=bool)
        # the state test first, always: its records serve predict_dimensions
        state_ok = None if self.state_test is None else self.state_test(hessenberg, basis, rows)
        if m <= _LAG:
            return ok
        square = hessenberg[at, :-1, :]
        G = self.space.spectral(square)
        G_small = self.space.spectral(square, np.full(rows.size, m - _LAG))
        steps = xp.asarray(self.remaining[rows], dtype=square.dtype)
        H = self.H[at]
        unit = xp.zeros((rows.size, H.shape[-1]), dtype=square.dtype)
        unit[:, 0] = 1.0
        with np.errstate(over="ignore", invalid="ignore"):
            M, M_small = (van_loan(op, H, steps, unit) for op in (G, G_small))
            diff = xp.linalg.norm(M - M_small, axis=(1, 2))
            size = xp.linalg.norm(M, axis=(1, 2))
        ratio = to_numpy(xp.where(size > 0, diff / size, xp.where(diff > 0, xp.inf, 0.0)))
        if state_ok is not None:
            ok[rows] = state_ok[rows] & (ratio <= self.tol[rows])
            return ok
        start = xp.zeros((rows.size, m), dtype=square.dtype)
        start[:, 0] = self.norms[at]
        taus = self.remaining[rows, None]
        y, y_small = (exp_apply(op, taus, start) for op in (G, G_small))
        trunc, _ = _estimates(y, y_small, start, float(np.finfo(square.dtype).eps),
                              self.reference[at])
        ok[rows] = (ratio <= self.tol[rows]) & (trunc[:, 0] <= self.tol[rows])
        return ok


class _Lagged:
    """A shift-and-invert adjoint projection's operator, the operator of its space two
    dimensions smaller, and per column (host (c,)) whether the space is invariant (exact) or
    too small to compare with a smaller one (unknown)."""

    def __init__(self, adj, space):
        self.operator = space.spectral(adj.square, adj.dims)
        self.smaller = space.spectral(adj.square, np.maximum(adj.dims - _LAG, 1))
        self.exact = to_numpy(adj.next_subdiag == 0)  # an invariant subspace: no error
        self.unknown = (adj.dims <= _LAG) & ~self.exact


class _LinkIntegral:
    """The Van Loan integral (and the extras) of each link of a chain in one adjoint space."""

    def __init__(self, adj, fwd, H, space, remaining, columns, n, acc, extras, begin):
        """adj, fwd: the adjoint and forward Projections of the chain's columns (chunk indices
        ``columns``), H the forward's projected operator (``spectral.Spectral``); remaining
        (c,) host: adjoint time left in the forward interval, which begins at times ``begin``
        (c,) host."""
        self.adj, self.fwd, self.remaining, self.columns = adj, fwd, remaining, columns
        self.n, self.acc, self.extras, self.begin = n, acc, extras, begin
        self.H = H
        # the adjoint space two dimensions smaller: the lag-2 difference of each link's
        # integral is the adjoint's truncation as the gradient integral weighs it (a
        # shift-and-invert space is least accurate early in a step, which the estimate at the
        # step's end does not see); the chain's steps read the same operators
        self.lagged = _Lagged(adj, space)
        self.G, self.G_small = self.lagged.operator, self.lagged.smaller
        self.grad = array_module(adj.norms).zeros(n, dtype=adj.norms.dtype)
        c = adj.norms.shape[0]
        self.diff, self.size = np.zeros(c), np.zeros(c)

    def add_integrals(self, acc, columns):
        """Add the chain's integral difference (0 for an invariant subspace, inf where no
        smaller space exists) and size to ``acc.integral`` for the chunk's ``columns``."""
        if acc.integral is None:
            acc.integral = np.zeros((2, acc.adjoint.size))
        diff = np.where(self.lagged.exact, 0.0, self.diff)
        diff = np.where(self.lagged.unknown | ~np.isfinite(diff), np.inf, diff)
        acc.integral[0, columns] += diff
        acc.integral[1, columns] += self.size

    def bound(self, live, norms, covered):
        """Host (c_l,): how much an adjoint of norms (c_l,) host at adjoint time ``covered``
        into the interval, columns ``live``, can change the integrals from there to t = 0
        (``Accuracy.reach``)."""
        time = self.begin[live] + np.maximum(self.remaining[live] - covered, 0.0)
        return norms * self.acc.reach[self.columns[live]] * time

    def __call__(self, live, tau, done, start, start_small):
        """Add the link of columns ``live`` (host indices into the chain's columns): steps tau
        (host), adjoint time done before it (host), adjoint coefficients at its start (c_l, m)
        in the space and in its chain two dimensions smaller."""
        xp = array_module(start)
        picked = xp.asarray(live)
        if live.size == self.adj.norms.shape[0]:  # all of them: no copy of the bases
            adj, fwd = self.adj, self.fwd
        else:
            adj, fwd = _rows_of(self.adj, picked), _rows_of(self.fwd, picked)
        G, H = self.G[picked], self.H[picked]
        begin = np.maximum(self.remaining[live] - done - tau, 0.0)  # forward-local start
        y_start, y_norm = _forward_coefficients(H, fwd.norms, begin)
        z_norm = xp.linalg.norm(start, axis=1)
        z_start = start / xp.where(z_norm > 0, z_norm, 1.0)[:, None]
        steps = xp.asarray(tau, dtype=start.dtype)
        choice = van_loan_choice(G, H, tau, y_start, z_start)  # once for both uses
        M = van_loan(G, H, steps, y_start, z_start, eigen=choice[0])
        M *= (z_norm * y_norm)[:, None, None]
        other = self._smaller(picked, steps, y_start, y_norm, start_small)
        self.diff[live] += to_numpy(xp.linalg.norm(M - other, axis=(1, 2)))
        self.size[live] += to_numpy(xp.linalg.norm(M, axis=(1, 2)))
        WM = _products(adj.basis, M)
        if self.extras is not None:  # reads W M before the diagonal reuses it in place
            self.extras.substep(self.columns[live], adj, WM, fwd, tau, G.matrix, start)
        self.grad += _diagonal_sum(WM, fwd.basis[:, :, : self.n])
        self.acc.adjoint[self.columns[live]] += _van_loan_rounding(G, tau, H, choice)

    def _smaller(self, picked, steps, y_start, y_norm, start_small):
        """The link's integral (norms applied) with the adjoint space two dimensions smaller,
        from its own chain's start coefficients (c_l, m)."""
        xp = array_module(steps)
        size = xp.linalg.norm(start_small, axis=1)
        unit = start_small / xp.where(size > 0, size, 1.0)[:, None]
        M = van_loan(self.G_small[picked], self.H[picked], steps, y_start, unit)
        return M * (size * y_norm)[:, None, None]


def chain_links(adj, lagged, space, remaining, T, rtol, on_link, allowance=None,
                reference=None):
    """March each column's adjoint inside the projection ``adj`` for up to ``remaining``.

    adj : adjoint Projection (from lambda at the chain's start); lagged : its ``_Lagged``;
    space : ShiftInvertSpace;
    remaining (c,) host: time left in the forward interval; rtol: the adjoint's share.
    on_link(live, tau, done, start, start_small) is called per link with the live column
    indices (host), the link steps tau (c_l,) host, the time already covered before the link
    (c_l,) host and the start coefficients (c_l, m) of the link (norms included), in the space
    and in its chain two dimensions smaller.
    A column stops where its interval ends or where no candidate step meets its tolerance; a
    column that cannot take its first step raises AccuracyError, and so does one whose
    estimate exceeds its ``allowance`` (c,) host (what rtol leaves after the earlier steps).
    """
    xp = array_module(adj.norms)
    c, m = adj.norms.shape[0], adj.square.shape[-1]
    eps = float(np.finfo(adj.norms.dtype).eps)
    G, G_small, exact, unknown = lagged.operator, lagged.smaller, lagged.exact, lagged.unknown
    coef = xp.zeros((c, m), dtype=adj.norms.dtype)
    coef[:, 0] = adj.norms
    coef_small = coef.copy()
    covered, error = np.zeros(c), np.zeros(c)
    truncation = np.zeros(c)
    live = np.arange(c)
    while live.size:
        rows = xp.asarray(live)
        rest = remaining[live] - covered[live]
        # A space covers its interval as a whole, so its truncation (relative to the state
        # delivered, along the chain) gets the share of the time it is meant to cover; a chain
        # that stops short is charged its largest truncation all the same, and the summed
        # estimate is checked against rtol at the end.
        tol = rtol * remaining[live] / T
        pick = _pick_steps((G[rows], G_small[rows]), (coef[rows], coef_small[rows]), rest, tol,
                           rtol / T, eps, exact[live], unknown[live],
                           None if reference is None else reference[rows])
        _refuse_unstarted(pick.index, covered[live], rest, space)
        go = pick.index >= 0
        if not go.any():
            break
        moving, tau = live[go], pick.tau[go]
        on_link(moving, tau, covered[moving].copy(), coef[xp.asarray(moving)],
                coef_small[xp.asarray(moving)])
        keep = xp.asarray(np.nonzero(go)[0])
        coef[xp.asarray(moving)] = pick.y[keep]
        coef_small[xp.asarray(moving)] = pick.y_small[keep]
        covered[moving] += tau
        error[moving] += pick.floor[go]
        truncation[moving] = np.maximum(truncation[moving], pick.trunc[go])
        if allowance is not None:
            _refuse_early(error[moving] + truncation[moving] - allowance[moving], 0.0, None)
        live = moving[covered[moving] < remaining[moving] * (1 - 1e-12)]
    lam = combine(adj.basis, coef)
    return ChainResult(covered, lam, error + truncation)


@dataclass
class _Pick:
    """Per column (c_l,): index of the longest candidate that meets (-1: none), its step,
    estimates and coefficients (device (c_l, m), rows of non-picked columns unspecified)."""

    index: np.ndarray
    tau: np.ndarray
    trunc: np.ndarray
    floor: np.ndarray
    y: object
    y_small: object


def _pick_steps(operators, starts, rest, tol, rate, eps, exact, unknown, reference=None):
    """The longest candidate step rest x _CANDIDATES[j] of each column whose truncation
    (lag-2, relative to the state it delivers) is within 0.8 tol (c_l,) and whose rounding
    floor is within its share 0.2 rate x tau (at least 8 x the floor of a step without
    cancellation). The whole rest is tried first (most links take it), the other candidates
    only for the columns where it fails."""
    xp = array_module(starts[0])
    c, m = starts[0].shape
    pick = _Pick(np.full(c, -1), np.zeros(c), np.zeros(c), np.zeros(c),
                 xp.zeros((c, m), dtype=starts[0].dtype), xp.zeros((c, m), dtype=starts[0].dtype))
    for lo, hi in ((0, 1), (1, _CANDIDATES.size)):
        todo = np.nonzero(pick.index < 0)[0]
        if not todo.size:
            break
        rows = xp.asarray(todo)
        taus = rest[todo, None] * _CANDIDATES[None, lo:hi]  # (c_t, J)
        y, rounding = exp_and_rounding(operators[0][rows], taus, starts[0][rows])
        y_small = exp_apply(operators[1][rows], taus, starts[1][rows])
        trunc, floor = _estimates(y, y_small, starts[0][rows], eps,
                                  None if reference is None else reference[rows], rounding)
        trunc[exact[todo]] = 0.0
        trunc[unknown[todo]] = np.inf
        budget = np.maximum(_ROUNDING_SHARE * rate * taus, 8 * _ROUNDING * eps)
        ok = (trunc <= (1 - _ROUNDING_SHARE) * tol[todo, None]) & (floor <= budget)
        found = ok.any(axis=1)
        j, at = ok.argmax(axis=1)[found], np.nonzero(found)[0]
        hit = todo[found]
        pick.index[hit], pick.tau[hit] = lo + j, taus[at, j]
        pick.trunc[hit], pick.floor[hit] = trunc[at, j], floor[at, j]
        sel = xp.asarray(at), xp.asarray(j)
        pick.y[xp.asarray(hit)], pick.y_small[xp.asarray(hit)] = y[sel], y_small[sel]
    return pick


def _estimates(y, y_small, start, eps, reference=None, rounding=None):
    """Relative truncation (lag-2 difference) and rounding floor (eps times the norms that
    cancel in exp(tau A_m) start, plus ``rounding`` (c, J) host: the eigendecomposition's,
    ``spectral.exp_and_rounding``) of each candidate, host (c, J); inf where not finite.
    Relative to the state delivered, or to reference (c,) where that is larger."""
    xp = array_module(y)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        size = xp.linalg.norm(y, axis=2)  # the basis is orthonormal: ||V y|| = ||y||
        start_norm = xp.linalg.norm(start, axis=1)[:, None]
        # underflowed: certifies nothing, unless the integrals are checked along the step
        # (with a reference: _IntegralAcceptor and the link integrals)
        lost = (size < _underflow(y)) & (start_norm > 0) & (reference is None)
        size = xp.where(size > 0, size, start_norm)
        if reference is not None:
            size = xp.maximum(size, reference[:, None])
        scale = xp.where(size > 0, size, 1.0)
        trunc = xp.linalg.norm(y - y_small, axis=2) / scale
        floor = _ROUNDING * eps * (start_norm + xp.abs(y).sum(axis=2))
        if rounding is not None:
            floor = floor + xp.asarray(rounding, dtype=floor.dtype)
        floor = floor / scale
        finite = xp.isfinite(y).all(axis=2) & xp.isfinite(trunc) & ~lost
        both = xp.where(finite[None], xp.stack([trunc, floor]), xp.inf)
    both = to_numpy(both).astype(float)
    return both[0], both[1]


def _refuse_unstarted(first, covered, rest, space):
    """AccuracyError for a column that cannot take any step from a fresh space."""
    stuck = (first < 0) & (covered == 0)
    if stuck.any():
        shortest = float(rest[stuck].min() * _CANDIDATES[-1])
        raise AccuracyError(
            "the shift-and-invert space did not meet the tolerance on any step down to "
            f"{shortest:.3g} (gamma = {space.gamma:.3g}; shorter steps converge worse): "
            "increase k, loosen rtol, or use method='polynomial'")


def _refuse_early(errors, rtol, k):
    """AccuracyError as soon as a column's summed estimate (host (c,)) exceeds rtol: it only
    grows from here, and a march through strong decay at a tight rtol can otherwise take
    minutes to be refused (measured: 323 s on the 128 x 128 grid at rtol 1e-12, k = 60).
    Within a chain, errors are the excess over the column's allowance and rtol is 0."""
    worst = float(np.max(errors)) if errors.size else -np.inf
    if worst > rtol * (1 + 1e-9):
        what = "exceeds rtol" if k is None else f"{worst:.3g} exceeds rtol={rtol:g} (k={k})"
        raise AccuracyError(
            f"the adjoint's error estimate already {what}: the result would be refused; "
            "increase k, loosen rtol, or use method='polynomial'")
