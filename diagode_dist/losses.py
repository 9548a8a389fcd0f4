"""Losses on the states at observation times, and their adjoint jumps dL/dx.

A loss knows its observation times ``obs_times`` (ascending, in (0, T]) and evaluates, for a
block of columns, the per-column losses and the adjoint jumps dL_j/dx_j(t_i). Losses are
summed over columns here; callers divide by the number of columns.

A user loss is a callable ``fn(states, columns) -> (loss, jumps)`` with
``states`` (m, c, n) the states x_j(t_i) of the columns ``columns`` (global column indices,
host ints), ``loss`` (c,) and ``jumps`` (m, c, n) = d loss_j / d x_j(t_i). It must use the
array module of ``states`` (NumPy or CuPy).
"""

from __future__ import annotations

from ._array import array_module, to_numpy


class Classification:
    """Softmax cross-entropy of ``beta * x_j(T)`` against ``labels[j]``.

    The per-column loss is logsumexp(z_j) - z_j[label_j]; its gradient (the adjoint jump at T) is
    beta * (softmax(z_j) - e_{label_j}).
    """

    def __init__(self, labels, beta: float, T: float):
        self.labels = labels
        self.beta = beta
        self.obs_times = (T,)

    def select(self, columns):
        return Classification(self.labels[array_module(self.labels).asarray(columns)],
                              self.beta, self.obs_times[-1])

    def to_device(self, move):
        return Classification(move(self.labels), self.beta, self.obs_times[-1])

    def evaluate(self, states, columns):
        """states (1, c, n) = x_j(T); columns (c,). Returns loss (c,), jumps (1, c, n)."""
        xp = array_module(states)
        z = self.beta * states[0]
        zmax = z.max(axis=1, keepdims=True)
        expz = xp.exp(z - zmax)
        total = expz.sum(axis=1, keepdims=True)
        labels = self.labels[xp.asarray(columns)]
        rows = xp.arange(z.shape[0])
        loss = (zmax[:, 0] + xp.log(total[:, 0])) - z[rows, labels]
        softmax = expz / total
        softmax[rows, labels] -= 1.0
        return loss, (self.beta * softmax)[None]


class MeanSquared:
    """Mean squared error against targets at the observation times.

    loss_j = (1 / (m n)) sum_i ||x_j(t_i) - Y[i, :, j]||^2, targets Y of shape (m, n, S).
    """

    def __init__(self, obs_times, targets):
        self.obs_times = tuple(obs_times)
        self.targets = targets

    def select(self, columns):
        return MeanSquared(self.obs_times,
                           self.targets[:, :, array_module(self.targets).asarray(columns)])

    def to_device(self, move):
        return MeanSquared(self.obs_times, move(self.targets))

    def evaluate(self, states, columns):
        """states (m, c, n). Returns loss (c,), jumps (m, c, n)."""
        xp = array_module(states)
        m, _, n = states.shape
        target = self.targets[:, :, xp.asarray(columns)].transpose(0, 2, 1)  # (m, c, n)
        residual = states - target
        loss = (residual * residual).sum(axis=(0, 2)) / (m * n)
        return loss, residual * (2.0 / (m * n))


class UserLoss:
    """A user callable ``fn(states, columns) -> (loss (c,), jumps (m, c, n))``."""

    def __init__(self, fn, obs_times, column_ids=None):
        self.fn = fn
        self.obs_times = tuple(obs_times)
        self.column_ids = column_ids  # host map from local to the user's global column ids

    def select(self, columns):
        ids = to_numpy(columns) if self.column_ids is None else self.column_ids[to_numpy(columns)]
        return UserLoss(self.fn, self.obs_times, ids)

    def to_device(self, move):
        return self

    def evaluate(self, states, columns):
        cols = to_numpy(columns)
        ids = cols if self.column_ids is None else self.column_ids[cols]
        loss, jumps = self.fn(states, ids)
        xp = array_module(states)
        loss, jumps = xp.asarray(loss), xp.asarray(jumps)
        if loss.shape != (states.shape[1],) or jumps.shape != states.shape:
            raise ValueError(
                f"the user loss must return loss of shape {(states.shape[1],)} and dL/dx of "
                f"shape {states.shape}, got {loss.shape} and {jumps.shape}")
        if not bool(xp.isfinite(loss).all() & xp.isfinite(jumps).all()):
            raise ValueError("the user loss returned NaN or inf")
        return loss, jumps
