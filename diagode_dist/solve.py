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
from ._march import MAX_SUBSTEPS
from .adjoint import DEFAULT_RTOL, forward_pass
from .losses import Classification
from .problem import Problem


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
    at = None if times is None else _check_times(times)
    return forward_pass(prob, theta, param, times=at, columns=columns, k=k, rtol=rtol,
                        max_substeps=max_substeps, keep=False).states


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
