"""Loss and exact adjoint gradient with respect to theta (and x0, F).

    dL/dA_ik = sum_j ∫_0^T lambda_j(t)_i x_j(t)_k dt,   dL/dtheta = (dA/dtheta)^T dL/dA

on the diagonal (always) and on a parametrisation's pattern (``diagode_dist.pattern``);
dL/dx0_j = lambda_j(0) and dL/df_j = ∫ lambda_j dt,

with x_j from the forward Krylov march and lambda_j from the adjoint march on A^T, the time
integral exact per sub-step (Van Loan 1978; Saad 1992 and Sidje 1998 for the error estimates).
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from threadpoolctl import ThreadpoolController

from ._array import array_module, is_sparse, row_product, to_module, to_numpy
from ._checks import check_int
from ._march import (
    MAX_SUBSTEPS,
    Accuracy,
    march_adjoint,
    march_forward,
    reads_adjoint,
)
from .errors import AccuracyError
from .param import OperatorTerms, SoftplusParam, as_operator_param
from .pattern import AdjointExtras
from .problem import Problem, check_columns
from .rational import (
    DEFAULT_METHOD,
    ShiftInvert,
    ShiftInvertSpace,
    check_method,
    choose_method,
    is_contractive,
    rightmost_estimate,
    shift_for,
    shift_invert_operators,
    substep_limit,
)

DEFAULT_RTOL = 1e-12
"""Default relative tolerance of the Krylov error control (near machine precision)."""

MIN_K = 8
"""Smallest maximum Krylov dimension accepted: below it a tight rtol needs tens of thousands of
sub-steps (measured: k = 4 on a 30-state diagonal operator, 60k sub-steps)."""

_PARALLEL_WORK = 1 << 21  # n * columns above which CPU chunks run on a thread pool


WRT = ("theta", "x0", "F")
"""What ``loss_and_grad(..., wrt=...)`` can differentiate by."""


def loss_and_grad(prob: Problem, theta, param=None, k: int = 30, columns=None,
                  rtol: float = DEFAULT_RTOL, max_chunk_columns: int | None = None,
                  time_integral: str = "vanloan", quad_points: int = 32,
                  return_info: bool = False, max_substeps: int = MAX_SUBSTEPS,
                  wrt: Sequence[str] | None = None, method: str = DEFAULT_METHOD):
    """Mean loss over the chosen columns and its exact gradient with respect to theta.

    Parameters
    ----------
    prob : Problem
    theta : (p,) array (NumPy or CuPy), p = ``param.theta_size(n)`` (n for a diagonal map)
    param : operator parametrisation (``diagode_dist.param``), default ``SoftplusParam()``
    k : maximum Krylov dimension per sub-step, >= 8 (each column stops earlier once its error
        estimate meets ``rtol``; sub-steps are taken when k is too small for one step)
    columns : int sequence or None (all columns)
    rtol : relative accuracy target of each Krylov projection, summed over sub-steps
    max_chunk_columns : columns processed at once (bounds memory); default from free memory
    time_integral : "vanloan" (exact) or "trapezoid" (the seed package's rule, for comparison)
    quad_points : trapezoid points per sub-step when time_integral="trapezoid"
    return_info : also return a dict with dimensions, sub-steps and error estimates
    max_substeps : work limit: Krylov sub-steps of one forward or adjoint march
    wrt : None, or a sequence of names among "theta", "x0", "F": then the gradient is a dict
        of those: dL/dtheta (p,), dL/dx0 = lambda(0) / |B| (n, S) and dL/dF = int lambda dt / |B|
        (n, S) (zero outside the chosen columns B; both on the problem's device), all from the
        one adjoint pass
    method : "polynomial" (the default: Krylov spaces of A: matrix-free), "auto" (rational for
        a sparse A0 when an a-priori cost model from ||T A||_1, nnz and n says it is cheaper,
        else polynomial; a rational march that fails falls back to the polynomial one; see
        ``diagode_dist.rational.choose_method``) or "rational"
        (shift-and-invert spaces of (I - gamma (A - mu I))^{-1}, one sparse factorization per
        call: for stiff sparse A0, where their dimension does not grow with ||T A||)

    Returns
    -------
    loss : float
    grad : (p,) array of theta's module, or a dict when ``wrt`` is given
    info : dict, only with ``return_info=True``

    Raises
    ------
    AccuracyError
        When ``rtol`` cannot be certified: the work limit is reached, or the accumulated error
        estimate (truncation with a safety factor, plus a rounding floor) exceeds ``rtol``.
        A result is never returned with an estimate above ``rtol``.
    FloatingPointError
        When the solution leaves the floating-point range (A has eigenvalues with a large
        positive real part).
    """
    names = ("theta",) if wrt is None else _check_wrt(wrt)
    loss_sum, grads, count, info = _loss_grad_parts(
        prob, theta, param, columns, k, rtol, max_chunk_columns, time_integral, quad_points,
        max_substeps, names, method)
    loss = loss_sum / count  # mean over the chosen columns
    means = {name: grads[name] / count for name in names}
    grad = means["theta"] if wrt is None else means
    return (loss, grad, info) if return_info else (loss, grad)


def loss_grad_sums(prob: Problem, theta, param=None, columns=None, k: int = 30,
                   rtol: float = DEFAULT_RTOL, max_chunk_columns: int | None = None,
                   time_integral: str = "vanloan", quad_points: int = 32,
                   max_substeps: int = MAX_SUBSTEPS, method: str = DEFAULT_METHOD):
    """Sums (not means) over the chosen columns: what a shard pushes to the parameter server.

    Returns (loss_sum: float, grad_sum: (p,) array like theta, count: int, info: dict), with
    ``loss_and_grad == (loss_sum / count, grad_sum / count)``.
    """
    loss_sum, grads, count, info = _loss_grad_parts(
        prob, theta, param, columns, k, rtol, max_chunk_columns, time_integral, quad_points,
        max_substeps, ("theta",), method)
    return loss_sum, grads["theta"], count, info


def _loss_grad_parts(prob, theta, param, columns, k, rtol, max_chunk_columns, time_integral,
                     quad_points, max_substeps, names, method=DEFAULT_METHOD):
    """(loss_sum, {name: gradient sum}, count, info) for the names in ``names``."""
    param, theta_dev = check_inputs(prob, theta, param, k, rtol, max_chunk_columns,
                                    time_integral, quad_points, max_substeps, method)
    cols = check_columns(columns, prob.S)
    theta_module = array_module(theta)
    d, op_prob = operator_of(prob, param, theta_dev)
    rtol = effective_rtol(rtol, prob.dtype)
    threads = _chunk_threads(prob, cols.size)
    quad = quad_points if time_integral == "trapezoid" else None
    chunk = max_chunk_columns or min(_default_chunk(prob, k, quad), -(-cols.size // threads))
    chunks = [cols[lo: lo + chunk] for lo in range(0, cols.size, chunk)]

    a_norm = operator_norm(op_prob, d)
    chosen = choose_method(method, op_prob.A0, a_norm * prob.loss.obs_times[-1], k)

    def run_chunks(rational, substeps):
        def run(part):
            extras = AdjointExtras(param.pattern, "F" in names, prob.n, "x0" in names)
            return _chunk_loss_grad(op_prob, d, part, k, rtol, time_integral, quad_points,
                                    a_norm, substeps, extras, rational)

        return _map_chunks(run, chunks, threads, prob.xp)

    chosen, parts = _by_method(method, chosen, op_prob, d, max_substeps,
                               len(prob.loss.obs_times), run_chunks)
    if method == "auto" and chosen == "rational" and \
            not _rtol_met([part[2] for part in parts], rtol, prob.dtype):
        # "auto" is never less accurate than the polynomial path: a rational answer whose
        # summed estimate misses rtol is not refused but computed again
        chosen, parts = "polynomial", run_chunks(None, max_substeps)
    loss_sum, grads = _gather(prob, param, theta_dev, chunks, parts, names)
    _check_finite(loss_sum, grads, prob.xp)
    info = _certified_info([part[2] for part in parts], rtol, k, prob.dtype, chosen)
    grads["theta"] = to_module(grads["theta"], theta_module)
    return loss_sum, grads, int(cols.size), info


@dataclass
class ForwardPass:
    """The forward marches of one call, kept for adjoint passes with any upstream gradient of
    the states (``forward_pass`` then ``adjoint_pass``: a framework layer's forward and
    backward, which then march forward once)."""

    prob: Problem  # its operator is A0 + W(theta)
    param: object
    theta: object  # on the problem's device
    theta_module: object  # the array module theta came in
    states: object  # (m, n, c) at the times, c = the chosen columns
    chunks: list  # a _ChunkForward per chunk of columns
    kept: bool  # whether the chunks' intervals were kept (else only the states)
    threads: int
    k: int
    rtol: float  # the effective rtol
    max_substeps: int
    method: str  # the method used: "polynomial" or "rational"
    redo: Callable | None  # the polynomial pass, when "auto" chose rational (its adjoint may
    # crawl where the rational forward did not: then the whole call falls back)


def forward_pass(prob: Problem, theta, param=None, *, times=None, columns=None, k: int = 30,
                 rtol: float = DEFAULT_RTOL, max_substeps: int = MAX_SUBSTEPS,
                 method: str = DEFAULT_METHOD, keep: bool = True) -> ForwardPass:
    """States of the chosen columns at ``times`` (default: the loss's observation times), with
    the error control of ``loss_and_grad`` (same options). With ``keep`` the marches' intervals
    stay for ``adjoint_pass``: their bases within half the memory budget, shared by the chunks
    (beyond it the adjoint rebuilds them), and a start state per sub-step. The rational
    method's shift is chosen from the loss's observation times.

    Raises AccuracyError when the states' error estimate exceeds rtol, FloatingPointError when
    they overflow.
    """
    param, theta_dev = check_inputs(prob, theta, param, k, rtol, None, "vanloan", 2,
                                    max_substeps, method)
    times = tuple(prob.loss.obs_times if times is None else times)
    cols = check_columns(columns, prob.S)
    d, op_prob = operator_of(prob, param, theta_dev)
    rtol = effective_rtol(rtol, prob.dtype)
    a_norm = operator_norm(op_prob, d)
    chosen = choose_method(method, op_prob.A0, a_norm * times[-1], k)
    threads = _chunk_threads(prob, cols.size)
    size = min(_default_chunk(prob, k), -(-cols.size // threads))
    parts = [cols[lo: lo + size] for lo in range(0, cols.size, size)]
    # every chunk's intervals live until the adjoint pass: they share the budget
    keep_bytes = memory_budget(prob.xp) // 2 // len(parts) if keep else 0

    def run(rational, substeps) -> ForwardPass:
        used = "polynomial" if rational is None else "rational"
        # a rational attempt chosen by "auto" may still fail in the adjoint: redo polynomial
        redo = (lambda: run(None, max_substeps)) if method == "auto" and rational else None
        chunks = _map_chunks(
            lambda part: _chunk_forward(op_prob, d, part, k, rtol, a_norm, substeps,
                                        keep_bytes, rational, times), parts, threads, prob.xp)
        states = _forward_states(chunks, prob, len(times), cols.size, rtol, k)
        for chunk in chunks:  # the states are in ``states``; without keep the marches go
            chunk.states = None
            if not keep:
                chunk.intervals = []
        return ForwardPass(op_prob, param, theta_dev, array_module(theta), states, chunks,
                           keep, threads, k, rtol, substeps, used, redo)

    return _by_method(method, chosen, op_prob, d, max_substeps, len(times), run)[1]


def _by_method(method, chosen, op_prob, d, max_substeps, n_obs, run):
    """(the method used, run(rational, substeps)) for the ``chosen`` method; rational is None
    (polynomial Krylov) or (factorization, space): one factorization for every chunk, column,
    step and (transposed) the adjoint. A rational attempt that "auto" chose gives up after
    ``substep_limit`` sub-steps, and the polynomial path takes over where it fails."""
    if chosen == "polynomial":
        return "polynomial", run(None, max_substeps)
    if method == "rational":
        return "rational", run(_shift_invert(op_prob, d), max_substeps)
    try:
        return "rational", run(_shift_invert(op_prob, d), substep_limit(max_substeps, n_obs))
    except AccuracyError:
        return "polynomial", run(None, max_substeps)


def _forward_states(chunks, prob, m, c, rtol, k):
    """The chunks' states (m, n, c); AccuracyError when their estimate exceeds rtol."""
    estimate = _estimate_of(np.concatenate([chunk.acc.forward for chunk in chunks]), prob.dtype)
    if not _certified(estimate, rtol):
        steps = max(chunk.acc.steps for chunk in chunks)
        raise AccuracyError(f"the error estimate {estimate:.3g} of the states exceeds "
                            f"rtol={rtol:g} (k={k}, {steps} sub-steps); increase k or loosen "
                            "rtol")
    xp = prob.xp
    out = xp.empty((m, prob.n, c), dtype=prob.dtype)
    lo = 0
    for chunk in chunks:
        out[:, :, lo: lo + chunk.columns.size] = chunk.states.transpose(0, 2, 1)
        lo += chunk.columns.size
    return out


def adjoint_pass(fwd: ForwardPass, upstream, names: Sequence[str] = ("theta",)):
    """Gradient sums of L = sum_i <upstream[i], x(t_i)> over the forward pass's columns: the
    adjoint march across its kept intervals, with the upstream gradient as the jumps.

    upstream : (m, n, S) dL/dx(t_i) for the problem's columns (only the pass's are read)
    names : among ``WRT``
    Returns ({name: sum over the columns}, info): dL/dtheta (p,) of theta's module, dL/dx0 and
    dL/dF (n, S) (zero outside the columns); info as ``loss_and_grad``'s, forward and adjoint.
    AccuracyError when the gradient cannot be certified.
    """
    if not fwd.kept:
        raise ValueError("adjoint_pass needs a forward_pass(..., keep=True)")
    names = _check_wrt(names)
    try:
        return _adjoint_sums(fwd, upstream, names)
    except AccuracyError:
        if fwd.redo is None:
            raise
        return _adjoint_sums(fwd.redo(), upstream, names)


def _adjoint_sums(fwd: ForwardPass, upstream, names):
    prob, xp = fwd.prob, fwd.prob.xp

    def one(chunk):
        jumps = upstream[:, :, xp.asarray(chunk.columns)].transpose(0, 2, 1)  # (m, c, n)
        extras = AdjointExtras(fwd.param.pattern, "F" in names, prob.n, "x0" in names)
        grad_d, acc = _chunk_adjoint(chunk, jumps, fwd.k, fwd.rtol, "vanloan", 2,
                                     fwd.max_substeps, extras)
        return 0.0, grad_d, acc, extras

    parts = _map_chunks(one, fwd.chunks, fwd.threads, xp)
    _, grads = _gather(prob, fwd.param, fwd.theta, [c.columns for c in fwd.chunks], parts,
                       names)
    _check_finite(0.0, grads, xp)
    info = _certified_info([part[2] for part in parts], fwd.rtol, fwd.k, prob.dtype,
                           fwd.method)
    grads["theta"] = to_module(grads["theta"], fwd.theta_module)
    return grads, info


def _check_finite(loss_sum, grads, xp) -> None:
    if not (np.isfinite(loss_sum) and all(bool(xp.isfinite(g).all()) for g in grads.values())):
        raise FloatingPointError(
            f"the loss ({loss_sum}) or its gradient is not finite: the solution overflows "
            "(does A = A0 + diag(d) have eigenvalues with a large positive real part?)")


def _certified_info(accs, rtol, k, dtype, method) -> dict:
    """``_info`` of the chunks' records, refused (AccuracyError) when rtol is not met."""
    info = _info(accs, rtol, k, dtype)
    info["method"] = method
    if not info["rtol_met"]:
        raise AccuracyError(
            f"the error estimate {info['error_estimate']:.3g} exceeds rtol={rtol:g} "
            f"(k={k}, {info['substeps']} sub-steps): the result is refused; increase k or "
            "loosen rtol")
    return info


def operator_of(prob, param, theta):
    """(d (n,), the problem with A0 + W as its operator) for theta on the problem's device."""
    with np.errstate(over="ignore"):  # an overflow is reported just below, as a ValueError
        terms = param.operator_terms(theta)
    xp = prob.xp
    d = xp.zeros(prob.n, dtype=prob.dtype) if terms.diag is None else terms.diag
    for name, value in (("diagonal d(theta)", d), ("weights W(theta)", terms.weights)):
        if value is not None and not bool(xp.isfinite(value).all()):
            raise ValueError(f"theta gives a non-finite {name} (overflow in the param map)")
    d = d.astype(prob.dtype, copy=False)
    if terms.weights is None:  # the diagonal fast path: A0 as it is
        return d, prob
    W = param.pattern.matrix(terms.weights.astype(prob.dtype, copy=False))
    A = (prob.A0 + W).tocsr() if is_sparse(prob.A0) else prob.A0 + W.toarray()
    op_prob = prob.with_operator(A, check=False)
    op_prob.symmetric = False  # W is not symmetric in general: Arnoldi
    return d, op_prob


def _gather(prob, param, theta, chunks, parts, names):
    """The loss sum and the gradient sums, in chunk order (the sums do not depend on timing)."""
    xp = prob.xp
    loss_sum, grad_d, grad_w = 0.0, xp.zeros(prob.n, dtype=prob.dtype), None
    per_column = {name: xp.zeros((prob.S, prob.n), dtype=prob.dtype)
                  for name in ("x0", "F") if name in names}
    for cols, (loss, part_d, _, extras) in zip(chunks, parts, strict=True):
        loss_sum += loss
        grad_d = grad_d + part_d
        if extras.weights is not None:
            grad_w = extras.weights if grad_w is None else grad_w + extras.weights
        for name, values in (("x0", extras.initial), ("F", extras.forcing)):
            if name in per_column:
                _add_rows(per_column[name], cols, values)
    grads = {name: value.T for name, value in per_column.items()}
    if param.pattern is not None and grad_w is None:
        grad_w = xp.zeros(param.pattern.nnz, dtype=prob.dtype)
    grads["theta"] = param.theta_grad(theta, OperatorTerms(grad_d, grad_w))
    return loss_sum, grads


def _add_rows(target, cols, values):
    """target[cols[i]] += values[i] (target (S, n), values (c, n)), a repeated column adding
    up: one indexed update per repetition rank, each with distinct columns."""
    xp = array_module(target)
    order = np.argsort(cols, kind="stable")
    sorted_cols = cols[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_cols))[0] + 1]
    rank = np.empty(cols.size, dtype=np.int64)
    rank[order] = np.arange(cols.size) - np.repeat(starts, np.diff(np.r_[starts, cols.size]))
    for r in range(int(rank.max()) + 1):
        pick = np.nonzero(rank == r)[0]
        target[xp.asarray(cols[pick])] += values[xp.asarray(pick)]


def _check_wrt(wrt) -> tuple[str, ...]:
    if isinstance(wrt, str) or not isinstance(wrt, Sequence) or not wrt:
        raise TypeError(f"wrt must be a non-empty sequence of names among {WRT}, got {wrt!r}")
    unknown = [name for name in wrt if name not in WRT]
    if unknown:
        raise ValueError(f"wrt names must be among {WRT}, got {unknown}")
    return tuple(dict.fromkeys(wrt))


def operator_norm(prob, d) -> float:
    """||A||_1 bound of A = A0 + diag(d): largest column sum of |A0| plus |d|."""
    return float(prob.xp.max(prob.A0_abs_col_sums + prob.xp.abs(d)))


def _shift_invert(prob, d):
    """(factorization of I - gamma (A - mu I), its space) for the rational method."""
    gamma = shift_for(prob.loss.obs_times)
    shift = rightmost_estimate(prob.A0, d, gamma)
    # a Ritz value right of 0 already shows A is not contractive: no second factorization
    horizon = 0.0 if shift > 0 else float(prob.loss.obs_times[-1])
    space = ShiftInvertSpace(gamma, shift, prob.dtype, is_contractive(prob.A0, d, horizon),
                             prob.symmetric)
    return ShiftInvert(prob.A0, d, gamma, shift), space


def check_inputs(prob, theta, param=None, k=30, rtol=DEFAULT_RTOL, max_chunk_columns=None,
                 time_integral="vanloan", quad_points=32, max_substeps=MAX_SUBSTEPS,
                 method=DEFAULT_METHOD):
    """Validate everything before any work. Returns (param, theta on the problem's device)."""
    if not isinstance(prob, Problem):
        raise TypeError(f"prob must be a diagode_dist.Problem, got {type(prob).__name__}")
    param = as_operator_param(SoftplusParam() if param is None else param)
    _check_options(k, rtol, max_chunk_columns, time_integral, quad_points, max_substeps)
    check_method(method)
    if prob.A0 is not None:  # a problem shipped without operator is checked where it gets one
        choose_method(method, prob.A0, 0.0, k)  # method="rational" needs a sparse A0
    return param, _check_theta(theta, prob, param.theta_size(prob.n))


def _chunk_loss_grad(prob, d, cols, k, rtol, time_integral, quad_points, a_norm, max_substeps,
                     extras=None, rational=None):
    """Loss sum, dL/dd sum, accuracy record and ``extras`` (filled) of one chunk of columns.

    rational : None (polynomial Krylov) or (ShiftInvert, ShiftInvertSpace).
    """
    fwd = _chunk_forward(prob, d, cols, k, rtol, a_norm, max_substeps,
                         memory_budget(prob.xp) // 2, rational)
    loss, jumps = prob.loss.evaluate(fwd.states, cols)
    grad_d, acc = _chunk_adjoint(fwd, jumps, k, rtol, time_integral, quad_points, max_substeps,
                                 extras)
    return float(loss.sum()), grad_d, acc, extras


@dataclass
class _ChunkForward:
    """One chunk's forward march, what its adjoint march needs (the operators, the intervals)."""

    columns: np.ndarray  # (c,) host column indices
    states: object  # (m, c, n) at the observation times
    intervals: list  # the march's sub-steps; bases kept within the memory budget
    acc: Accuracy
    horizon: float  # the last observation time (the march's time scale)
    make_apply: Callable  # the augmented operator (or its shift-and-invert counterpart)
    apply_T: Callable  # A^T on rows (idem)
    space: object  # None (polynomial) or the ShiftInvertSpace
    symmetric: bool  # Lanczos for the adjoint


def _chunk_forward(prob, d, cols, k, rtol, a_norm, max_substeps, keep_bytes, rational=None,
                   times=None) -> _ChunkForward:
    """The forward march of one chunk of columns to ``times`` (default: the loss's), keeping
    sub-step bases of up to ``keep_bytes`` for the adjoint (beyond that they are rebuilt)."""
    xp = prob.xp
    forcing, u0, make_apply, apply_T = chunk_operators(prob, d, cols)
    space, symmetric = None, prob.symmetric
    if rational is not None:  # the same marches on (I - gamma Â)^{-1}, full Arnoldi
        make_apply, apply_T = shift_invert_operators(rational[0], forcing)
        space, symmetric = rational[1], False
    times = prob.loss.obs_times if times is None else times
    # The augmented operator inherits Lanczos structure only from a zero start: u0 = e_{n+1}.
    states, intervals, acc = march_forward(
        make_apply, u0, times, times[-1], k, rtol, keep_bytes, symmetric and prob.x0 is None,
        forcing_norms=to_numpy(xp.linalg.norm(forcing, axis=1)), a_norm=a_norm,
        max_substeps=max_substeps, space=space)
    return _ChunkForward(cols, states, intervals, acc, times[-1], make_apply, apply_T, space,
                         symmetric)


def _chunk_adjoint(fwd: _ChunkForward, jumps, k, rtol, time_integral, quad_points,
                   max_substeps, extras=None):
    """(dL/dd sum (n,), Accuracy) of the adjoint march with ``jumps`` (m, c, n) = dL/dx(t_i)
    across a forward march's intervals; ``extras`` is filled. The forward record is left as it
    is (a second adjoint pass over the same forward march starts afresh)."""
    def march(by_integrals):
        acc = replace(fwd.acc, adjoint=np.zeros_like(fwd.acc.adjoint), adjoint_dim=0,
                      integral=None, adjoint_steps=0, reach=None, reference=None)
        grad_d = march_adjoint(fwd.make_apply, fwd.apply_T, fwd.intervals, jumps,
                               jumps.shape[2], fwd.horizon, k, rtol, acc, time_integral,
                               quad_points, fwd.symmetric, max_substeps, extras, fwd.space,
                               by_integrals)
        return grad_d, acc

    # Where only lambda(t) x(t)^T is read, the adjoint is first certified by the integrals it
    # feeds (a contractive operator's all along, fast under strong decay, but its bounds can
    # be too loose for a tight rtol; any operator's over the interval that ends at t = 0);
    # where that refuses, it is followed relative to itself, as everywhere else.
    if reads_adjoint(extras):
        return march(False)
    try:
        grad_d, acc = march(True)
    except AccuracyError:
        return march(False)
    return (grad_d, acc) if _rtol_met([acc], rtol, jumps.dtype) else march(False)


def chunk_operators(prob, d, cols):
    """forcing (c, n), u0 = [x0; 1] (c, n + 1), make_apply(rows, coupling) (the augmented
    operator of ``march_forward``) and apply_T (A^T on rows) of a chunk of columns."""
    xp, n = prob.xp, prob.n
    forcing = xp.ascontiguousarray(prob.F[:, xp.asarray(cols)].T)  # (c, n)
    u0 = xp.zeros((cols.size, n + 1), dtype=forcing.dtype)
    if prob.x0 is not None:
        u0[:, :n] = prob.x0[:, xp.asarray(cols)].T
    u0[:, n] = 1.0
    A0_rows = row_product(prob.A0, n + 1)  # A0 x of rows [x, s], read where they lie

    def make_apply(rows, coupling):
        f_rows = forcing[xp.asarray(rows)] if rows.size < cols.size else forcing
        f_rows = f_rows * coupling[:, None]

        def apply(v):  # augmented operator [[A, f / eta], [0, 0]] on rows v = [x, s]
            x = v[:, :n]
            out = xp.empty_like(v)
            out[:, :n] = A0_rows(v) + d * x + v[:, n:] * f_rows
            out[:, n] = 0.0
            return out

        return apply

    def apply_T(v):  # A^T = A0^T + diag(d) on rows v
        return (prob.A0T @ v.T).T + d * v

    return forcing, u0, make_apply, apply_T


def _info(accs: list[Accuracy], rtol, k, dtype) -> dict:
    fwd = np.concatenate([a.forward for a in accs])
    adj = np.concatenate([a.adjoint for a in accs])
    estimate = _estimate_of(np.concatenate([fwd, adj]), dtype)
    return {
        "error_estimate": estimate,
        "forward_error_estimate": float(fwd.max()),
        "adjoint_error_estimate": float(adj.max()),
        "rtol": rtol,
        "rtol_met": _certified(estimate, rtol),
        "forward_dim": max(a.forward_dim for a in accs),
        "adjoint_dim": max(a.adjoint_dim for a in accs),
        "k": k,
        "substeps": max(a.steps for a in accs),
    }


def _rtol_met(accs: list[Accuracy], rtol, dtype) -> bool:
    """Whether the chunks' records together meet rtol (``_info``'s "rtol_met")."""
    return _info(accs, rtol, 0, dtype)["rtol_met"]


def _estimate_of(errors, dtype) -> float:
    """The reported error estimate of per-column estimates (host array): their largest,
    floored at 64 eps. NaN propagates (never certified). No float computation of the gradient
    is better than a few dozen eps (measured: 3.7e-14 with a softplus saturated at +-30)."""
    return max(float(np.max(errors)), 64 * float(np.finfo(dtype).eps))


def _certified(estimate: float, rtol: float) -> bool:
    """Whether an error estimate meets rtol (with a margin for the summation's rounding)."""
    return bool(estimate <= rtol * (1 + 1e-9))


def _check_theta(theta, prob, size):
    if not hasattr(theta, "shape") or not hasattr(theta, "dtype"):
        raise TypeError(f"theta must be an array of shape ({size},), got {type(theta).__name__}")
    if theta.shape != (size,):
        what = "(n,)" if size == prob.n else "(param.theta_size(n),)"
        raise ValueError(f"theta must have shape {what} = ({size},), got {theta.shape}")
    if theta.dtype.kind != "f":
        raise TypeError(f"theta must be a float array, got dtype {theta.dtype}")
    theta = to_module(theta, prob.xp)
    if not bool(prob.xp.isfinite(theta).all()):
        raise ValueError("theta contains NaN or inf")
    return theta


def _check_options(k, rtol, max_chunk_columns, time_integral, quad_points, max_substeps):
    check_int(k, "k", MIN_K)  # smaller k needs a sub-step count that grows without bound
    check_int(max_substeps, "max_substeps", 1)
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
    if max_chunk_columns is not None:
        check_int(max_chunk_columns, "max_chunk_columns", 1)
    if time_integral not in ("vanloan", "trapezoid"):
        raise ValueError(f"time_integral must be 'vanloan' or 'trapezoid', got {time_integral!r}")
    check_int(quad_points, "quad_points", 2)


def effective_rtol(rtol: float, dtype) -> float:
    """rtol, raised to 100 eps of the working precision (float32: about 1.2e-5)."""
    return max(float(rtol), 100 * float(np.finfo(dtype).eps))


def _single_threaded_blas(xp):
    """BLAS on one thread inside the numerics (CPU): measured 37 ms -> 4.4 s with default
    OpenBLAS threads on a loaded 2-core machine. Parallelism comes from chunks instead."""
    if xp is not np:
        return contextlib.nullcontext()
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:  # library discovery costs ~1 ms: do it once per process
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


_BLAS_CONTROLLER = None


def _map_chunks(fn, chunks, threads, xp) -> list:
    """[fn(chunk) for chunk in chunks], on a thread pool when ``threads`` > 1 (BLAS on one
    thread each)."""
    with _single_threaded_blas(xp):
        if threads > 1 and len(chunks) > 1:
            # each chunk thread in a copy of this context: a memory_share holds there too
            contexts = [contextvars.copy_context() for _ in chunks]
            with ThreadPoolExecutor(min(threads, len(chunks))) as pool:
                return list(pool.map(lambda ctx, chunk: ctx.run(fn, chunk), contexts, chunks))
        return [fn(chunk) for chunk in chunks]


def _chunk_threads(prob, n_columns) -> int:
    """Threads for CPU chunks: only when the work is large enough to pay for them."""
    if prob.xp is not np or prob.n * n_columns < _PARALLEL_WORK:
        return 1
    return max(1, min(os.cpu_count() or 1, n_columns))


def predict_chunk_bytes(n: int, columns: int, k: int, itemsize: int = 8,
                        quad_points: int | None = None, observations: int = 1) -> int:
    """Predicted peak working memory (bytes) of one chunk, excluding bases kept across sub-steps.

    Per column: the forward and adjoint bases ((k+1)(n+1) each), a restricted copy of the
    forward basis in adjoint sub-steps, the (k, n) product W M and its elementwise product
    with V, about twenty state-sized vectors (balanced starts, states, checks), the Padé
    temporaries of the (2k)-square Van Loan
    block (or of 2 Q k-square exponentials with ``quad_points`` Q for the trapezoid rule),
    and per observation time (``observations`` m) the observed state, its adjoint jump and
    the start vector of the interval that reaches it (each interval keeps its start, from
    which a basis that is not kept is rebuilt): 3 m n held through the adjoint march; while
    the loss makes the jumps, also its copy of the targets and two residuals: 5 m n.
    """
    small = 12 * (2 * k) ** 2 if quad_points is None else 12 * 2 * quad_points * k * k
    marches = 3 * (k + 1) * (n + 1) + 2 * k * n + 20 * (n + 1) + small
    observed = (observations - 1) * 3 * (n + 1)  # one time is among the twenty vectors
    loss_peak = (5 * observations + 20) * (n + 1)
    return int(max(marches + observed, loss_peak) * itemsize * columns)


def memory_budget(xp) -> int:
    """Bytes the numerics may use, fixed once per process and device: a quarter of the host
    memory available at the first call (at most 4 GiB) on the CPU; on the GPU half of what
    was free then, counting the blocks CuPy's pool holds but does not use (a pool keeps freed
    blocks, so the driver's free memory alone shrinks after the first call: another chunk
    size, another summation order, and repeated calls would no longer agree bit for bit).
    Half of the budget is the chunk's working set, the other half bases kept across
    sub-steps (beyond that they are rebuilt). Inside ``memory_share(s)``: 1/s of it."""
    key = (xp.__name__, _device_id(xp))
    with _BUDGET_LOCK:
        if key not in _BUDGETS:
            _BUDGETS[key] = (min(_available_host_bytes() // 4, 4 << 30) if xp is np
                             else _device_available_bytes(xp) // 2)
        return budget_share(_BUDGETS[key], _SHARES.get())


_BUDGETS: dict = {}
_BUDGET_LOCK = threading.Lock()
_SHARES: contextvars.ContextVar[int] = contextvars.ContextVar("memory_shares", default=1)


def budget_share(budget: int, shares: int) -> int:
    """Bytes of ``budget`` one of ``shares`` computations running at once on a device gets."""
    return int(budget) // int(shares)


@contextlib.contextmanager
def memory_share(shares: int):
    """Calls in this context (and their chunk threads) take 1/``shares`` of the device's memory
    budget: ``shares`` computations (e.g. shard tasks in other processes) run on it at once,
    and each sizing its chunks and kept bases from all of it would exhaust it."""
    check_int(shares, "shares", 1)
    token = _SHARES.set(shares)
    try:
        yield
    finally:
        _SHARES.reset(token)


def _device_id(xp) -> int:
    return -1 if xp is np else int(xp.cuda.Device().id)


def _device_available_bytes(xp) -> int:
    """Free device memory plus what the array module's pool holds unused. When CuPy allocates
    through another allocator (RMM's pool under dask-cuda), the driver's free memory does not
    see that pool's unused part: then 80 % of the device (one worker per GPU)."""
    free, total = xp.cuda.runtime.memGetInfo()
    pool = xp.get_default_memory_pool()
    if _external_allocator(xp, pool):
        return int(0.8 * total)
    return int(free + pool.free_bytes())


def _external_allocator(xp, pool) -> bool:
    """True when CuPy's current allocator is not its default pool's (e.g. RMM's)."""
    try:
        current = xp.cuda.get_allocator()
    except Exception:  # an older CuPy without get_allocator: the default pool
        return False
    own = getattr(current, "__self__", None)
    return own is not pool


def _default_chunk(prob, k, quad_points=None) -> int:
    """Columns per chunk so that the predicted working set fits half the memory budget."""
    per_column = predict_chunk_bytes(prob.n, 1, k, prob.dtype.itemsize, quad_points,
                                     len(prob.loss.obs_times))
    fits = max(1, int(memory_budget(prob.xp) // 2 // per_column))
    # A power of two, so that small changes in free memory between calls do not change the
    # chunks (and with them the summation order of the result).
    return 1 << (fits.bit_length() - 1)


def _available_host_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
