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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._array import array_module, to_numpy
from .errors import AccuracyError
from .expm import expm_batched
from .krylov import combine
from .rational import _underflow

_CANDIDATES = 0.25 ** np.arange(12)
"""Fractions of the remaining time tried as a link's step (down to 2.4e-7)."""
_LAG = 2
_ROUNDING = 2.0
_ROUNDING_SHARE = 0.2


@dataclass
class ChainResult:
    """What one adjoint space delivered for its columns (host arrays (c,) unless noted)."""

    covered: np.ndarray  # adjoint time covered from the space's start
    lam: object  # (c, n) adjoint at the end of the chain
    error: np.ndarray  # relative error estimate: largest truncation + summed rounding
    links: int


def chain_links(adj, space, remaining, T, rtol, on_link):
    """March each column's adjoint inside the projection ``adj`` for up to ``remaining``.

    adj : adjoint Projection (from lambda at the chain's start); space : ShiftInvertSpace;
    remaining (c,) host: time left in the forward interval; rtol: the adjoint's share.
    on_link(live, tau, done, start, start_small) is called per link with the live column
    indices (host), the link steps tau (c_l,) host, the time already covered before the link
    (c_l,) host and the start coefficients (c_l, m) of the link (norms included), in the space
    and in its chain two dimensions smaller.
    A column stops where its interval ends or where no candidate step meets its tolerance; a
    column that cannot take its first step raises AccuracyError.
    """
    xp = array_module(adj.norms)
    c, m = adj.norms.shape[0], adj.square.shape[-1]
    eps = float(np.finfo(adj.norms.dtype).eps)
    G = space.operator(adj.square, adj.dims)
    G_small = space.operator(adj.square, np.maximum(adj.dims - _LAG, 1))
    exact = to_numpy(adj.next_subdiag == 0)  # an invariant subspace (breakdown): no error
    unknown = (adj.dims <= _LAG) & ~exact  # no smaller space to compare with
    coef = xp.zeros((c, m), dtype=adj.norms.dtype)
    coef[:, 0] = adj.norms
    coef_small = coef.copy()
    covered, error = np.zeros(c), np.zeros(c)
    truncation = np.zeros(c)
    live, links = np.arange(c), 0
    while live.size:
        rows = xp.asarray(live)
        rest = remaining[live] - covered[live]
        # A space covers its interval as a whole, so its truncation (relative to the state
        # delivered, along the chain) gets the share of the time it is meant to cover; a chain
        # that stops short is charged its largest truncation all the same, and the summed
        # estimate is checked against rtol at the end.
        tol = rtol * remaining[live] / T
        pick = _pick_steps((G[rows], G_small[rows]), (coef[rows], coef_small[rows]), rest, tol,
                           rtol / T, eps, exact[live], unknown[live])
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
        links += 1
        live = moving[covered[moving] < remaining[moving] * (1 - 1e-12)]
    lam = combine(adj.basis, coef)
    return ChainResult(covered, lam, error + truncation, links)


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


def _pick_steps(operators, starts, rest, tol, rate, eps, exact, unknown):
    """The longest candidate step rest x _CANDIDATES[j] of each column whose truncation
    (lag-2, relative to the state it delivers) is within 0.8 tol (c_l,) and whose rounding
    floor is within its share 0.2 rate x tau (at least 8 x the floor of a step without
    cancellation)."""
    xp = array_module(starts[0])
    taus = rest[:, None] * _CANDIDATES[None, :]  # (c_l, J)
    y, y_small = (_advance(op, z, taus) for op, z in zip(operators, starts, strict=True))
    trunc, floor = _estimates(y, y_small, starts[0], eps)
    trunc[exact] = 0.0
    trunc[unknown] = np.inf
    budget = np.maximum(_ROUNDING_SHARE * rate * taus, 8 * _ROUNDING * eps)
    ok = (trunc <= (1 - _ROUNDING_SHARE) * tol[:, None]) & (floor <= budget)
    found = ok.any(axis=1)
    index = np.where(found, ok.argmax(axis=1), -1)
    j = np.maximum(index, 0)
    at = np.arange(index.size)
    sel = xp.asarray(at), xp.asarray(j)
    return _Pick(index, taus[at, j], trunc[at, j], floor[at, j], y[sel], y_small[sel])


def _advance(operator, start, taus):
    """exp(tau_j A) start for every candidate: operator (c, m, m), start (c, m), taus (c, J)
    host -> (c, J, m)."""
    xp = array_module(operator)
    scaled = xp.asarray(taus, dtype=operator.dtype)[:, :, None, None] * operator[:, None]
    finite = xp.isfinite(operator).all(axis=(1, 2))
    with np.errstate(over="ignore", invalid="ignore"):
        E = expm_batched(xp.where(finite[:, None, None, None], scaled, 0.0))
        y = (E @ start[:, None, :, None])[..., 0]
    return xp.where(finite[:, None, None], y, xp.nan)


def _estimates(y, y_small, start, eps):
    """Relative truncation (lag-2 difference) and rounding floor (eps times the norms that
    cancel in exp(tau A_m) start) of each candidate, host (c, J); inf where not finite."""
    xp = array_module(y)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        size = xp.linalg.norm(y, axis=2)  # the basis is orthonormal: ||V y|| = ||y||
        start_norm = xp.linalg.norm(start, axis=1)[:, None]
        lost = (size < _underflow(y)) & (start_norm > 0)  # underflowed: certifies nothing
        size = xp.where(size > 0, size, start_norm)
        scale = xp.where(size > 0, size, 1.0)
        trunc = xp.linalg.norm(y - y_small, axis=2) / scale
        floor = _ROUNDING * eps * (start_norm + xp.abs(y).sum(axis=2)) / scale
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
