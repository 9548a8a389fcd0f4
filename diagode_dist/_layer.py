"""The one adapter between framework layers (PyTorch, JAX) and the Krylov core.

A layer call is the linear ODE

    dx_j/dt = (A0 + W(w) + diag(d)) x_j + f_j,   x_j(0) = x0_j,   j = 1..S,

observed at times 0 <= t_1 < ... < t_m, with W(w) the values w (nnz,) placed at the entries
(rows[e], cols[e]) (repeats add up). Its forward pass is the core's forward march; its backward
pass is the core's adjoint pass for the linear loss L = sum_i <G_i, x(t_i)> with G_i the
upstream gradient of the states: the adjoint jumps by G_i at t_i, and the core returns

    dL/dd_i = sum_j int lambda_j,i x_j,i dt,   dL/dw_e = sum_j int lambda_j,rows[e] x_j,cols[e] dt,
    dL/dx0_j = lambda_j(0),   dL/df_j = int lambda_j dt,

exact up to the Krylov tolerance (no tape through the solver). The time derivative is read off
the ODE: dL/dt_i = <G_i, dx/dt(t_i)> = <G_i, A x(t_i) + f>.

Everything here works on NumPy or CuPy arrays (the module of ``f`` or ``x0``); the frameworks
convert their tensors without copies and call ``states`` and ``vjp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._array import array_module
from .adjoint import ForwardPass, adjoint_pass, forward_pass
from .param import EdgeParam, Stack, _DiagonalMap
from .pattern import Pattern
from .problem import Problem
from .rational import DEFAULT_METHOD

GRADIENTS = ("values", "d", "f", "x0", "t")
"""Names of the inputs ``vjp`` can differentiate by."""


@dataclass
class ODE:
    """One layer call, on the device of its arrays.

    base : (n, n) dense array, sparse CSR matrix (SciPy / CuPy), or None (zero operator)
    rows, cols : (nnz,) host int64 entries of the trained values, or None (none trained)
    values : (nnz,) values at those entries (added to ``base``), or None
    d : (n,) diagonal added to the operator, or None
    f : (n, S) constant forcing, or None;  x0 : (n, S) initial states, or None
    times : (m,) host floats, 0 <= t_1 < ... < t_m (the states are reported there)
    rtol, k : the core's relative tolerance and maximum Krylov dimension
    method : the core's method, "polynomial", "rational" or "auto" (forward and backward)
    """

    base: object
    rows: np.ndarray | None
    cols: np.ndarray | None
    values: object
    d: object
    f: object
    x0: object
    times: np.ndarray
    rtol: float
    k: int
    method: str = DEFAULT_METHOD
    n: int = field(init=False)
    S: int = field(init=False)

    def __post_init__(self):
        like = self.f if self.f is not None else self.x0
        self.n, self.S = like.shape
        self.xp = array_module(like)
        self.dtype = like.dtype

    @property
    def at_zero(self) -> int:
        """How many leading times are 0 (0 or 1): their states are x0, not the core's."""
        return int(self.times.size > 0 and self.times[0] == 0.0)


class _Identity(_DiagonalMap):
    """The diagonal map d(theta) = theta (the layer hands d itself to the core)."""

    def diag_from_theta(self, theta):
        return theta

    def dtheta_from_ddiag(self, theta, g):
        return g


def states(ode: ODE, keep: bool = False):
    """(states x(t_i) (m, n, S) on the arrays' device, the core's forward pass or None).

    keep : keep the forward marches for ``vjp`` (a backward that does not march forward again)
    """
    xp = ode.xp
    x0 = ode.x0 if ode.x0 is not None else xp.zeros((ode.n, ode.S), dtype=ode.dtype)
    out = xp.empty((ode.times.size, ode.n, ode.S), dtype=ode.dtype)
    if ode.at_zero:
        out[0] = x0
    kept = None
    if ode.times.size > ode.at_zero:
        kept = _forward(ode, keep)
        out[ode.at_zero:] = kept.states
    return out, (kept if keep else None)


def vjp(ode: ODE, observed, upstream, needed, kept=None) -> dict:
    """Gradients of L = sum_i <upstream[i], x(t_i)> for the names in ``needed`` (a subset of
    ``GRADIENTS``): values (nnz,), d (n,), f (n, S), x0 (n, S), t (m,), on the arrays' device.

    observed : (m, n, S) the states from ``states(ode)``;  upstream : (m, n, S) dL/dx(t_i);
    kept : the forward pass from ``states(ode, keep=True)``, or None (marched again here).
    """
    needed = set(needed)
    at_zero = ode.at_zero
    grads = {}
    if needed & {"values", "d", "f", "x0"}:
        if ode.times.size > at_zero:
            grads = _core_vjp(ode, upstream[at_zero:], needed, kept)
        else:  # every time is 0: the states are x0
            grads = _zero_vjp(ode, needed)
        if "x0" in needed and at_zero:
            grads["x0"] = grads["x0"] + upstream[0]
    if "t" in needed:
        rates = _operator_times(ode, observed)
        if ode.f is not None:
            rates = rates + ode.f
        grads["t"] = (upstream * rates).sum(axis=(1, 2))
    return grads


def _operator_times(ode: ODE, X):
    """(A0 + W + diag(d)) X for states X (m, n, S)."""
    xp = ode.xp
    flat = X.transpose(1, 0, 2).reshape(ode.n, -1)  # (n, m S): one product for all times
    out = xp.zeros_like(flat)
    if ode.base is not None:
        out = out + ode.base @ flat
    if ode.values is not None:
        out = out + _edge_matrix(ode) @ flat
    out = out.reshape(ode.n, X.shape[0], ode.S).transpose(1, 0, 2)
    if ode.d is not None:
        out = out + ode.d[None, :, None] * X
    return out


def _edge_matrix(ode: ODE):
    """W (n, n) sparse CSR of the values' module: W[rows[e], cols[e]] += values[e]."""
    return Pattern._of_entries(ode.rows, ode.cols, ode.n).matrix(ode.values)


def _problem(ode: ODE):
    """The core problem on the positive times (its loss is never evaluated: the layer's
    backward hands the upstream gradient to the adjoint pass as the jumps)."""
    xp = ode.xp
    base = ode.base
    if base is None:
        base = _zero_operator(ode)
    forcing = ode.f if ode.f is not None else xp.zeros((ode.n, ode.S), dtype=ode.dtype)
    times = ode.times[ode.at_zero:]
    return Problem(base, forcing, T=float(times[-1]), x0=ode.x0, obs_times=times,
                   loss=_no_loss)


def _no_loss(states, columns):
    raise RuntimeError("the layer's problem has no loss of its own")


def _zero_operator(ode: ODE):
    """An n x n sparse zero of the arrays' module (no n x n dense array)."""
    empty = np.zeros(0, dtype=np.int64)
    return Pattern._of_entries(empty, empty, ode.n).matrix(ode.xp.zeros(0, dtype=ode.dtype))


def _param_and_theta(ode: ODE):
    """The core parametrisation d = theta[:n] (identity), w = theta[n:] (identity edges)."""
    xp = ode.xp
    d = ode.d if ode.d is not None else xp.zeros(ode.n, dtype=ode.dtype)
    if ode.rows is None:
        return _Identity(), d
    pattern = Pattern._of_entries(ode.rows, ode.cols, ode.n)
    return Stack(_Identity(), EdgeParam(pattern, "identity")), xp.concatenate([d, ode.values])


def _forward(ode: ODE, keep: bool) -> ForwardPass:
    """The core's forward pass to the positive times (states (m', n, S))."""
    param, theta = _param_and_theta(ode)
    return forward_pass(_problem(ode), theta, param, k=ode.k, rtol=ode.rtol, method=ode.method,
                        keep=keep)


def _core_vjp(ode: ODE, upstream, needed, kept=None) -> dict:
    """dL/d(values, d, x0, f) from the core's adjoint pass (sums over the columns)."""
    if kept is None:
        kept = _forward(ode, keep=True)
    wrt = ("theta",) + tuple(core for name, core in (("x0", "x0"), ("f", "F")) if name in needed)
    grads, _ = adjoint_pass(kept, upstream, wrt)
    out = {"d": grads["theta"][: ode.n]}
    if ode.rows is not None:
        out["values"] = grads["theta"][ode.n:]
    if "x0" in needed:
        out["x0"] = grads["x0"]
    if "f" in needed:
        out["f"] = grads["F"]
    return out


def _zero_vjp(ode: ODE, needed) -> dict:
    """The gradients when every time is 0: only x0's (added by the caller) is not zero."""
    xp = ode.xp
    zeros = {"d": (ode.n,), "values": (0 if ode.rows is None else ode.rows.size,),
             "f": (ode.n, ode.S), "x0": (ode.n, ode.S)}
    return {name: xp.zeros(shape, dtype=ode.dtype) for name, shape in zeros.items()
            if name in needed}
