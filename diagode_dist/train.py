"""Single-process training: minibatch Adam on the exact gradient.

The minibatch schedule (``epoch_batches``) is shared with the distributed service, so both
visit the same columns in the same order for the same seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

from ._checks import check_int
from .adjoint import DEFAULT_RTOL, check_inputs, loss_grad_sums
from .optim import Adam
from .param import SoftplusParam
from .problem import Problem


def epoch_batches(n_columns: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The minibatches of one epoch: a seeded permutation of the columns, cut in order.

    Returns ceil(n_columns / batch_size) int64 arrays of global column indices (the last one
    may be shorter). Depends only on (n_columns, batch_size, seed, epoch), so a run can resume
    at any step without saving a generator.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n_columns)
    return [order[i: i + batch_size] for i in range(0, n_columns, batch_size)]


def steps_per_epoch(n_columns: int, batch_size: int) -> int:
    """Number of optimiser steps in one epoch."""
    return math.ceil(n_columns / batch_size)


def fit(prob: Problem, theta0, param=None, epochs: int = 20, lr: float = 1e-3, k: int = 30,
        batch_size: int = 32, weight_decay: float = 0.0,
        clamp: tuple[float, float] | None = (-50.0, 50.0), seed: int = 0,
        callback: Callable | None = None, rtol: float = DEFAULT_RTOL,
        max_chunk_columns: int | None = None, return_info: bool = False):
    """Train theta with Adam on minibatches of columns.

    Parameters
    ----------
    prob : Problem
    theta0 : (n,) float array (NumPy or CuPy); not modified
    param : diagonal map (default ``SoftplusParam()``)
    epochs, batch_size : passes over the columns, columns per step
    lr, weight_decay, clamp : Adam settings (see ``diagode_dist.optim.Adam``)
    k, rtol, max_chunk_columns : gradient settings (see ``loss_and_grad``)
    seed : minibatch permutation seed; the same seed gives the same result bit for bit
    callback : ``callback(epoch, mean_loss, theta)`` after every epoch (epoch counts from 0,
        as in ``epoch_batches``)
    return_info : also return a per-epoch log of the gradient's accuracy: lists
        ``error_estimate`` (largest relative Krylov error estimate of the epoch), ``substeps``
        (most sub-steps), ``rtol_met`` (every step met rtol)

    Returns
    -------
    theta : (n,) array like theta0
    history : list of float, per-epoch mean loss over all columns (theta changing within the
        epoch, as each step's loss is taken before its update)
    info : dict of per-epoch lists, only with ``return_info=True``
    """
    param = SoftplusParam() if param is None else param
    check_int(epochs, "epochs", 1)
    check_int(batch_size, "batch_size", 1)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable(epoch, loss, theta)")
    adam = Adam(lr=lr, weight_decay=weight_decay, clamp=clamp)
    check_inputs(prob, theta0, param, k, rtol, max_chunk_columns)
    theta = theta0
    state = adam.init(theta0)
    history, log = [], {"error_estimate": [], "substeps": [], "rtol_met": []}
    for epoch in range(epochs):
        epoch_loss, infos = 0.0, []
        for batch in epoch_batches(prob.S, batch_size, seed, epoch):
            loss_sum, grad_sum, count, info = loss_grad_sums(
                prob, theta, param, batch, k, rtol, max_chunk_columns)
            epoch_loss += loss_sum
            infos.append(info)
            theta, state = adam.step(theta, grad_sum / count, state)
        history.append(epoch_loss / prob.S)
        log["error_estimate"].append(max(i["error_estimate"] for i in infos))
        log["substeps"].append(max(i["substeps"] for i in infos))
        log["rtol_met"].append(all(i["rtol_met"] for i in infos))
        if callback is not None:
            callback(epoch, history[-1], theta)
    return (theta, history, log) if return_info else (theta, history)
