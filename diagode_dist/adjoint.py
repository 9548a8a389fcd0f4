"""Loss and exact adjoint gradient with respect to theta.

    dL/dd_i = sum_j ∫_0^T lambda_j(t)_i x_j(t)_i dt,   dL/dtheta = d'(theta) ⊙ dL/dd

with x_j from the forward Krylov march and lambda_j from the adjoint march on A^T, the time
integral exact per sub-step (Van Loan 1978; Saad 1992 and Sidje 1998 for the error estimates).
"""

from __future__ import annotations

import contextlib
import numbers
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from ._array import array_module, to_module, to_numpy
from ._checks import check_int
from ._march import MAX_SUBSTEPS, Accuracy, march_adjoint, march_forward
from .errors import AccuracyError
from .param import SoftplusParam, check_param
from .problem import Problem, check_columns
from .rational import (
    ShiftInvert,
    ShiftInvertSpace,
    check_method,
    choose_method,
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


def loss_and_grad(prob: Problem, theta, param=None, k: int = 30, columns=None,
                  rtol: float = DEFAULT_RTOL, max_chunk_columns: int | None = None,
                  time_integral: str = "vanloan", quad_points: int = 32,
                  return_info: bool = False, max_substeps: int = MAX_SUBSTEPS,
                  method: str = "auto"):
    """Mean loss over the chosen columns and its exact gradient with respect to theta.

    Parameters
    ----------
    prob : Problem
    theta : (n,) array (NumPy or CuPy)
    param : diagonal map, default ``SoftplusParam()``
    k : maximum Krylov dimension per sub-step, >= 8 (each column stops earlier once its error
        estimate meets ``rtol``; sub-steps are taken when k is too small for one step)
    columns : int sequence or None (all columns)
    rtol : relative accuracy target of each Krylov projection, summed over sub-steps
    max_chunk_columns : columns processed at once (bounds memory); default from free memory
    time_integral : "vanloan" (exact) or "trapezoid" (the seed package's rule, for comparison)
    quad_points : trapezoid points per sub-step when time_integral="trapezoid"
    return_info : also return a dict with dimensions, sub-steps and error estimates
    max_substeps : work limit: Krylov sub-steps of one forward or adjoint march
    method : "polynomial" (Krylov spaces of A: matrix-free, for non-stiff problems),
        "rational" (shift-and-invert spaces of (I - gamma A)^{-1}, one sparse factorization per
        call: for stiff sparse A0, where their dimension does not grow with ||T A||), or
        "auto" (rational for a sparse A0 when an a-priori cost model from ||T A||_1, nnz and n
        says it is cheaper; see ``diagode_dist.rational.choose_method``)

    Returns
    -------
    loss : float
    grad : (n,) array of theta's module
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
    loss_sum, grad_sum, count, info = loss_grad_sums(
        prob, theta, param, columns, k, rtol, max_chunk_columns, time_integral, quad_points,
        max_substeps, method)
    loss, grad = loss_sum / count, grad_sum / count  # mean over the chosen columns
    return (loss, grad, info) if return_info else (loss, grad)


def loss_grad_sums(prob: Problem, theta, param=None, columns=None, k: int = 30,
                   rtol: float = DEFAULT_RTOL, max_chunk_columns: int | None = None,
                   time_integral: str = "vanloan", quad_points: int = 32,
                   max_substeps: int = MAX_SUBSTEPS, method: str = "auto"):
    """Sums (not means) over the chosen columns: what a shard pushes to the parameter server.

    Returns (loss_sum: float, grad_sum: (n,) array like theta, count: int, info: dict), with
    ``loss_and_grad == (loss_sum / count, grad_sum / count)``.
    """
    param, theta_dev = check_inputs(prob, theta, param, k, rtol, max_chunk_columns,
                                    time_integral, quad_points, max_substeps, method)
    cols = check_columns(columns, prob.S)
    theta_module = array_module(theta)
    with np.errstate(over="ignore"):  # an overflow is reported just below, as a ValueError
        d = param.diag_from_theta(theta_dev)
    if not bool(prob.xp.isfinite(d).all()):
        raise ValueError("theta gives a non-finite diagonal d(theta) (overflow in the param map)")
    d = d.astype(prob.dtype, copy=False)
    rtol = effective_rtol(rtol, prob.dtype)
    threads = _chunk_threads(prob, cols.size)
    quad = quad_points if time_integral == "trapezoid" else None
    chunk = max_chunk_columns or min(_default_chunk(prob, k, quad), -(-cols.size // threads))
    chunks = [cols[lo: lo + chunk] for lo in range(0, cols.size, chunk)]

    a_norm = _operator_norm(prob, d)
    chosen = choose_method(method, prob.A0, a_norm * prob.loss.obs_times[-1], k)

    def run_chunks(rational, substeps):
        def run(part):
            return _chunk_loss_grad(prob, d, part, k, rtol, time_integral, quad_points, a_norm,
                                    substeps, rational)

        with _single_threaded_blas(prob.xp):
            if threads > 1 and len(chunks) > 1:
                with ThreadPoolExecutor(min(threads, len(chunks))) as pool:
                    return list(pool.map(run, chunks))
            return [run(part) for part in chunks]

    if chosen == "polynomial":
        parts = run_chunks(None, max_substeps)
    elif method == "rational":
        # one factorization for every chunk, column, step and (transposed) the adjoint
        parts = run_chunks(_shift_invert(prob, d), max_substeps)
    else:  # chosen by the a-priori model: give up early where its sub-steps pile up
        try:
            parts = run_chunks(_shift_invert(prob, d),
                               substep_limit(max_substeps, len(prob.loss.obs_times)))
        except AccuracyError:
            chosen, parts = "polynomial", run_chunks(None, max_substeps)
    method = chosen
    loss_sum, grad_d = 0.0, prob.xp.zeros(prob.n, dtype=d.dtype)
    for part in parts:  # chunk order: the sum does not depend on timing
        loss_sum += part[0]
        grad_d = grad_d + part[1]
    acc = [part[2] for part in parts]
    grad = param.dtheta_from_ddiag(theta_dev, grad_d)
    if not (np.isfinite(loss_sum) and bool(prob.xp.isfinite(grad).all())):
        raise FloatingPointError(
            f"the loss ({loss_sum}) or its gradient is not finite: the solution overflows "
            "(does A = A0 + diag(d) have eigenvalues with a large positive real part?)")
    info = _info(acc, rtol, k, prob.dtype)
    info["method"] = method
    if not info["rtol_met"]:
        raise AccuracyError(
            f"the error estimate {info['error_estimate']:.3g} exceeds rtol={rtol:g} "
            f"(k={k}, {info['substeps']} sub-steps): the result is refused; increase k or "
            "loosen rtol")
    return loss_sum, to_module(grad, theta_module), int(cols.size), info


def _operator_norm(prob, d) -> float:
    """||A||_1 bound of A = A0 + diag(d): largest column sum of |A0| plus |d|."""
    return float(prob.xp.max(prob.A0_abs_col_sums + prob.xp.abs(d)))


def _shift_invert(prob, d):
    """(factorization of I - gamma A, its space) for the rational method."""
    gamma = shift_for(prob.loss.obs_times)
    return ShiftInvert(prob.A0, d, gamma), ShiftInvertSpace(gamma)


def check_inputs(prob, theta, param=None, k=30, rtol=DEFAULT_RTOL, max_chunk_columns=None,
                 time_integral="vanloan", quad_points=32, max_substeps=MAX_SUBSTEPS,
                 method="auto"):
    """Validate everything before any work. Returns (param, theta on the problem's device)."""
    if not isinstance(prob, Problem):
        raise TypeError(f"prob must be a diagode_dist.Problem, got {type(prob).__name__}")
    param = SoftplusParam() if param is None else param
    check_param(param)
    _check_options(k, rtol, max_chunk_columns, time_integral, quad_points, max_substeps)
    check_method(method)
    if prob.A0 is not None:  # a problem shipped without operator is checked where it gets one
        choose_method(method, prob.A0, 0.0, k)  # method="rational" needs a sparse A0
    return param, _check_theta(theta, prob)


def _chunk_loss_grad(prob, d, cols, k, rtol, time_integral, quad_points, a_norm, max_substeps,
                     rational=None):
    """Loss sum, dL/dd sum and accuracy record of one chunk of columns.

    rational : None (polynomial Krylov) or (ShiftInvert, ShiftInvertSpace).
    """
    xp, n = prob.xp, prob.n
    forcing = xp.ascontiguousarray(prob.F[:, xp.asarray(cols)].T)  # (c, n)
    u0 = xp.zeros((cols.size, n + 1), dtype=forcing.dtype)
    if prob.x0 is not None:
        u0[:, :n] = prob.x0[:, xp.asarray(cols)].T
    u0[:, n] = 1.0

    def make_apply(rows, coupling):
        f_rows = forcing[xp.asarray(rows)] if rows.size < cols.size else forcing
        f_rows = f_rows * coupling[:, None]

        def apply(v):  # augmented operator [[A, f / eta], [0, 0]] on rows v = [x, s]
            x = v[:, :n]
            out = xp.empty_like(v)
            out[:, :n] = (prob.A0 @ x.T).T + d * x + v[:, n:] * f_rows
            out[:, n] = 0.0
            return out

        return apply

    def apply_T(v):  # A^T = A0^T + diag(d) on rows v
        return (prob.A0T @ v.T).T + d * v

    space, symmetric = None, prob.symmetric
    if rational is not None:  # the same marches on (I - gamma Â)^{-1}, full Arnoldi
        make_apply, apply_T = shift_invert_operators(rational[0], forcing)
        space, symmetric = rational[1], False

    # The augmented operator inherits Lanczos structure only from a zero start: u0 = e_{n+1}.
    horizon = prob.loss.obs_times[-1]
    keep_bytes = memory_budget(xp) // 2
    states, intervals, acc = march_forward(
        make_apply, u0, prob.loss.obs_times, horizon, k, rtol, keep_bytes,
        symmetric and prob.x0 is None, forcing_norms=to_numpy(xp.linalg.norm(forcing, axis=1)),
        a_norm=a_norm, max_substeps=max_substeps, space=space)
    loss, jumps = prob.loss.evaluate(states, cols)
    grad_d = march_adjoint(make_apply, apply_T, intervals, jumps, n, horizon, k, rtol, acc,
                           time_integral, quad_points, symmetric, max_substeps, space)
    return float(loss.sum()), grad_d, acc


def _info(accs: list[Accuracy], rtol, k, dtype) -> dict:
    fwd = np.concatenate([a.forward for a in accs])
    adj = np.concatenate([a.adjoint for a in accs])
    # NaN propagates: never "met". No float computation of the gradient is better than a few
    # dozen eps (measured: 3.7e-14 with a softplus saturated at theta = +-30).
    estimate = max(float(np.max(np.concatenate([fwd, adj]))), 64 * float(np.finfo(dtype).eps))
    return {
        "error_estimate": estimate,
        "forward_error_estimate": float(fwd.max()),
        "adjoint_error_estimate": float(adj.max()),
        "rtol": rtol,
        "rtol_met": bool(estimate <= rtol * (1 + 1e-9)),
        "forward_dim": max(a.forward_dim for a in accs),
        "adjoint_dim": max(a.adjoint_dim for a in accs),
        "k": k,
        "substeps": max(a.steps for a in accs),
    }


def _check_theta(theta, prob):
    if not hasattr(theta, "shape") or not hasattr(theta, "dtype"):
        raise TypeError(f"theta must be an array of shape ({prob.n},), got {type(theta).__name__}")
    if theta.shape != (prob.n,):
        raise ValueError(f"theta must have shape (n,) = ({prob.n},), got {theta.shape}")
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


def _chunk_threads(prob, n_columns) -> int:
    """Threads for CPU chunks: only when the work is large enough to pay for them."""
    if prob.xp is not np or prob.n * n_columns < _PARALLEL_WORK:
        return 1
    return max(1, min(os.cpu_count() or 1, n_columns))


def predict_chunk_bytes(n: int, columns: int, k: int, itemsize: int = 8,
                        quad_points: int | None = None) -> int:
    """Predicted peak working memory (bytes) of one chunk, excluding bases kept across sub-steps.

    Per column: the forward and adjoint bases ((k+1)(n+1) each), a restricted copy of the
    forward basis in adjoint sub-steps, the (k, n) product W M and its elementwise product
    with V, about twenty state-sized vectors (balanced starts, states, checks), and the Padé
    temporaries of the (2k)-square Van Loan
    block (or of 2 Q k-square exponentials with ``quad_points`` Q for the trapezoid rule).
    """
    small = 12 * (2 * k) ** 2 if quad_points is None else 12 * 2 * quad_points * k * k
    per_column = (3 * (k + 1) * (n + 1) + 2 * k * n + 20 * (n + 1) + small) * itemsize
    return int(per_column * columns)


def memory_budget(xp) -> int:
    """Bytes the numerics may use: a quarter of available host memory (at most 4 GiB) on the
    CPU, half of the free device memory on the GPU. Half of it is the chunk's working set,
    the other half bases kept across sub-steps (beyond that they are rebuilt)."""
    if xp is np:
        return min(_available_host_bytes() // 4, 4 << 30)
    free, _ = xp.cuda.runtime.memGetInfo()  # pragma: no cover - GPU only
    return int(free // 2)  # pragma: no cover


def _default_chunk(prob, k, quad_points=None) -> int:
    """Columns per chunk so that the predicted working set fits half the memory budget."""
    per_column = predict_chunk_bytes(prob.n, 1, k, prob.dtype.itemsize, quad_points)
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
