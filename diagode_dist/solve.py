"""Use a trained model: states at chosen times, and the classification loss's predictions.

    states = dd.solve(prob, theta, param)                   # (m, n, S) at the observation times
    labels = dd.predict(prob, theta, param)                 # (S,) argmax of x_j(T)
    proba = dd.predict_proba(prob, theta, param)            # (n, S) softmax(beta x_j(T))

The forward Krylov march alone (no adjoint), with the same error control as ``loss_and_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._array import to_numpy
from ._march import MAX_SUBSTEPS, march_forward
from .adjoint import (
    DEFAULT_RTOL,
    _default_chunk,
    _single_threaded_blas,
    check_inputs,
    chunk_operators,
    effective_rtol,
    operator_norm,
    operator_of,
)
from .errors import AccuracyError
from .losses import Classification
from .problem import Problem, check_columns


def solve(prob: Problem, theta, param=None, times: Sequence[float] | None = None, *,
          columns=None, k: int = 30, rtol: float = DEFAULT_RTOL,
          max_substeps: int = MAX_SUBSTEPS):
    """States x_j(t_i) of the model A(theta) at the given times.

    Parameters
    ----------
    prob : Problem (its A0, F, x0; its loss is not evaluated)
    theta : (p,) array, p = ``param.theta_size(n)``
    param : operator parametrisation, default ``SoftplusParam()``
    times : increasing times > 0 (any, also beyond T: a forecast); default the problem's
        observation times (T for the classification loss)
    columns : int sequence or None (all columns)
    k, rtol, max_substeps : as in ``loss_and_grad`` (relative accuracy of every state)

    Returns
    -------
    states : (m, n, c) array of the problem's module: states[i, :, j] = x_{columns[j]}(t_i)

    Raises AccuracyError when ``rtol`` cannot be certified.
    """
    param, theta_dev = check_inputs(prob, theta, param, k, rtol, None, "vanloan", 2,
                                    max_substeps)
    at = prob.loss.obs_times if times is None else _check_times(times)
    cols = check_columns(columns, prob.S)
    d, op_prob = operator_of(prob, param, theta_dev)
    rtol = effective_rtol(rtol, prob.dtype)
    a_norm = operator_norm(op_prob, d)
    chunk = _default_chunk(prob, k)
    xp = prob.xp
    out = xp.empty((len(at), prob.n, cols.size), dtype=prob.dtype)
    with _single_threaded_blas(xp):
        for lo in range(0, cols.size, chunk):
            part = cols[lo: lo + chunk]
            forcing, u0, make_apply, _ = chunk_operators(op_prob, d, part)
            states, _, acc = march_forward(
                make_apply, u0, at, at[-1], k, rtol, 0, op_prob.symmetric and prob.x0 is None,
                forcing_norms=to_numpy(xp.linalg.norm(forcing, axis=1)), a_norm=a_norm,
                max_substeps=max_substeps)
            _check_accuracy(acc, rtol, k)
            out[:, :, lo: lo + part.size] = states.transpose(0, 2, 1)
    return out


def predict_proba(prob: Problem, theta, param=None, *, columns=None, k: int = 30,
                  rtol: float = DEFAULT_RTOL):
    """Class probabilities softmax(beta x_j(T)) (n, c) of the classification loss (columns sum
    to one); ValueError for a problem with another loss."""
    states = _final_states(prob, theta, param, columns, k, rtol)
    logits = prob.beta * states
    xp = prob.xp
    shifted = xp.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def predict(prob: Problem, theta, param=None, *, columns=None, k: int = 30,
            rtol: float = DEFAULT_RTOL):
    """Predicted labels argmax_i x_j(T)_i (c,) of the classification loss (int64, problem's
    module); ValueError for a problem with another loss."""
    return _final_states(prob, theta, param, columns, k, rtol).argmax(axis=0)


def _final_states(prob, theta, param, columns, k, rtol):
    if not isinstance(prob, Problem):
        raise TypeError(f"prob must be a diagode_dist.Problem, got {type(prob).__name__}")
    if not isinstance(prob.loss, Classification):
        raise ValueError("predict and predict_proba need the classification loss (labels); "
                         "use dd.solve for the states of a problem with another loss")
    return solve(prob, theta, param, (prob.T,), columns=columns, k=k, rtol=rtol)[0]


def _check_times(times) -> tuple[float, ...]:
    values = np.asarray(to_numpy(times) if hasattr(times, "shape") else times, dtype=float)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"times must be a non-empty 1-D sequence of finite floats, got {times!r}")
    if values[0] <= 0 or np.any(np.diff(values) <= 0):
        raise ValueError(f"times must increase strictly from > 0, got {values}")
    return tuple(float(t) for t in values)


def _check_accuracy(acc, rtol, k) -> None:
    estimate = float(np.max(acc.forward))
    if not estimate <= rtol * (1 + 1e-9):
        raise AccuracyError(f"the error estimate {estimate:.3g} of the states exceeds "
                            f"rtol={rtol:g} (k={k}, {acc.steps} sub-steps); increase k or loosen "
                            "rtol")
