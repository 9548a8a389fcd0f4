"""The time integral M = ∫_0^τ z(τ - s) y(s)^T ds of a sub-step, in projected coordinates.

With the forward x(t_q + s) = V y(s), y(s) = beta exp(s H) e1 and the adjoint
lambda(t_{q+1} - r) = W z(r), z(r) = gamma exp(r G) e1, the interval's gradient contribution is
rowsum((W M) ⊙ V). Van Loan (1978) gives M exactly from one exponential per column:

    exp(τ [[G, e1 e1^T], [0, H^T]]) = [[exp(τG), M / (gamma beta)], [0, exp(τ H^T)]].

When the adjoint needs shorter steps than the forward (stiff problems), an adjoint sub-step
starts at forward coefficients y(a) instead of beta e1, and e1 e1^T becomes e1 y(a)^T / ||y(a)||.
The norms are applied after the exponential, so the scaling and squaring does not depend on
them (||g|| can be 1e-6).
"""

from __future__ import annotations

import numpy as np

from ._array import array_module, to_numpy
from .expm import expm_batched, expm_block_upper
from .spectral import Spectral, van_loan_choice, van_loan_eigen


def van_loan(G, H, tau, y_start, z_start=None, eigen=None):
    """Exact integral over an adjoint sub-step of length tau.

    G : (c, ma, ma) adjoint Hessenberg; H : (c, mf, mf) forward Hessenberg; tau : (c,) steps;
    y_start : (c, mf) unit forward coefficients at the sub-step's start (e1 when the adjoint
    step spans the whole forward interval); z_start : (c, ma) unit adjoint coefficients at the
    sub-step's start (default e1). The coupling block becomes z_start y_start^T.
    Returns M_unit (c, ma, mf) = M / (gamma ||y(start)||).
    G and H may be ``spectral.Spectral`` (shift-and-invert spaces): then the columns ``eigen``
    ((c,) host bools; default ``spectral.van_loan_choice``) are computed from their
    eigensystems (``spectral.van_loan_eigen``), the others from the block exponential.
    """
    if isinstance(G, Spectral):
        return _van_loan_by_columns(G, H, tau, y_start, z_start, eigen)
    xp = array_module(G)
    scale = tau[:, None, None]
    if z_start is None:
        coupling = xp.zeros((G.shape[0], G.shape[1], H.shape[1]), dtype=G.dtype)
        coupling[:, 0, :] = y_start
    else:
        coupling = z_start[:, :, None] * y_start[:, None, :]
    _, M = expm_block_upper(scale * G, scale * coupling, scale * H.transpose(0, 2, 1))
    return M


def _van_loan_by_columns(G, H, tau, y_start, z_start, eigen):
    xp = array_module(y_start)
    if eigen is None:
        eigen, _ = van_loan_choice(G, H, to_numpy(tau).astype(float), y_start, z_start)
    M = xp.empty((G.shape[0], G.shape[1], H.shape[1]), dtype=G.dtype)
    for rows, spectral in ((np.nonzero(~eigen)[0], False), (np.nonzero(eigen)[0], True)):
        if not rows.size:
            continue
        at = xp.asarray(rows)
        z = None if z_start is None else z_start[at]
        if spectral:
            M[at] = van_loan_eigen(G[at], H[at], tau[at], y_start[at], z)
        else:
            M[at] = van_loan(G.matrix[at], H.matrix[at], tau[at], y_start[at], z)
    return M


def trapezoid(G, H, tau, y_start, quad_points: int):
    """The seed package's quadrature of the same integral (Q points), for comparison only.

    Same shapes and returns as ``van_loan``; error O(tau^2 / Q^2).
    """
    xp = array_module(G)
    c, ma, _ = G.shape
    frac = xp.linspace(0.0, 1.0, quad_points, dtype=G.dtype)
    s = tau[:, None] * frac[None, :]  # (c, Q) forward times
    y = (expm_batched(s[:, :, None, None] * H[:, None]) @ y_start[:, None, :, None])[..., 0]
    z = expm_batched((tau[:, None] - s)[:, :, None, None] * G[:, None])[..., 0]  # (c, Q, ma)
    weights = xp.full(quad_points, 1.0 / (quad_points - 1), dtype=G.dtype)
    weights[0] = weights[-1] = 0.5 / (quad_points - 1)
    w = tau[:, None] * weights[None, :]  # (c, Q)
    return (z * w[:, :, None]).transpose(0, 2, 1) @ y  # (c, ma, mf)
