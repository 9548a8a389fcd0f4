"""Single-process training: minibatch Adam on the exact gradient.

The minibatch schedule (``epoch_batches``) is shared with the distributed service, so both
visit the same columns in the same order for the same seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from .adjoint import check_inputs, loss_grad_sums
from .optim import Adam
from .options import TrainOptions, takes_options, with_options
from .problem import Problem

logger = logging.getLogger(__name__)


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


@takes_options(service=False)
def fit(prob: Problem, theta0, param=None, *, options: TrainOptions | None = None,
        callback: Callable | None = None, return_info: bool = False, **kwargs):
    """Train theta with Adam on minibatches of columns.

    Parameters
    ----------
    prob : Problem
    theta0 : (p,) float array (NumPy or CuPy), p = ``param.theta_size(n)``; not modified
    param : operator parametrisation (``diagode_dist.param``; default: ``options.param``,
        i.e. ``SoftplusParam()``)
    options : ``TrainOptions``; keyword arguments (``epochs=``, ``lr=``, ``k=``,
        ``batch_size=``, ``weight_decay=``, ``clamp=``, ``seed=``, ``rtol=``,
        ``max_chunk_columns=``, ``method=``, ``log_every=``) replace its fields (see
        ``diagode_dist.options.TrainOptions`` for their meaning and defaults). The same seed
        gives the same result bit for bit; the Dask-only fields of an options object
        (n_shards, checkpoint_every, step_timeout) are ignored here.
    callback : ``callback(epoch, mean_loss, theta)`` after every epoch (epoch counts from 0,
        as in ``epoch_batches``)
    return_info : also return a per-epoch log of the gradient's accuracy: lists
        ``error_estimate`` (largest relative Krylov error estimate of the epoch), ``substeps``
        (most sub-steps), ``rtol_met`` (every step met rtol), ``method`` (the Krylov
        method of the epoch's steps: "polynomial", "rational", or "polynomial+rational" when
        ``method="auto"`` chose both)

    Returns
    -------
    theta : (p,) array like theta0
    history : list of float, per-epoch mean loss over all columns (theta changing within the
        epoch, as each step's loss is taken before its update)
    info : dict of per-epoch lists, only with ``return_info=True``
    """
    if param is not None:
        kwargs["param"] = param
    opts = with_options("fit", options, kwargs, service=False)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable(epoch, loss, theta)")
    param = opts.diagonal_map()
    adam = Adam(lr=opts.lr, weight_decay=opts.weight_decay, clamp=opts.clamp)
    check_inputs(prob, theta0, param, opts.k, opts.rtol, opts.max_chunk_columns,
                 method=opts.method)
    theta = theta0
    state = adam.init(theta0)
    history, log = [], {"error_estimate": [], "substeps": [], "rtol_met": [], "method": []}
    step = 0
    for epoch in range(opts.epochs):
        epoch_loss, infos = 0.0, []
        for batch in epoch_batches(prob.S, opts.batch_size, opts.seed, epoch):
            loss_sum, grad_sum, count, info = loss_grad_sums(
                prob, theta, param, batch, opts.k, opts.rtol, opts.max_chunk_columns,
                method=opts.method)
            epoch_loss += loss_sum
            infos.append(info)
            theta, state = adam.step(theta, grad_sum / count, state)
            step += 1
            if opts.log_every and step % opts.log_every == 0:
                logger.info("step %d (epoch %d): mean loss %.6g", step, epoch, loss_sum / count)
        history.append(epoch_loss / prob.S)
        log["error_estimate"].append(max(i["error_estimate"] for i in infos))
        log["substeps"].append(max(i["substeps"] for i in infos))
        log["rtol_met"].append(all(i["rtol_met"] for i in infos))
        log["method"].append("+".join(sorted({i["method"] for i in infos})))
        if callback is not None:
            callback(epoch, history[-1], theta)
    return (theta, history, log) if return_info else (theta, history)
