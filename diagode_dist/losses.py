"""Losses on the states at observation times, and their adjoint jumps dL/dx.

A loss knows its observation times ``obs_times`` (ascending, the last one is T) and evaluates,
for a block of columns, per-column losses and the adjoint jumps dL_j/dx_j(t_i).
"""

from __future__ import annotations

from ._array import array_module


class Classification:
    """Softmax cross-entropy of ``beta * x_j(T)`` against ``labels[j]``.

    The per-column loss is logsumexp(z_j) - z_j[label_j]; its gradient (the adjoint jump at T) is
    beta * (softmax(z_j) - e_{label_j}). Summed, not averaged: callers divide by the count.
    """

    def __init__(self, labels, beta: float, T: float):
        self.labels = labels
        self.beta = beta
        self.obs_times = (T,)

    def evaluate(self, states, columns):
        """Per-column loss and adjoint jumps.

        states : (1, c, n) x_j(T) of the columns, rows are columns.
        columns : (c,) indices of these columns in the problem (to find their labels).
        Returns loss (c,) and jumps (1, c, n).
        """
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
