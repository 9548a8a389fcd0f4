"""JAX layer: exp(tA) B and linear ODE solutions with exact adjoint gradients.

    import jax
    from diagode_dist.jax import expm_multiply, odeint_linear

    A = jax.experimental.sparse.BCOO((values, indices), shape=(n, n))   # or a dense array
    X = jax.jit(expm_multiply)(A, B, 0.5)                                 # (n, S)
    g = jax.grad(lambda v: expm_multiply(BCOO((v, indices), shape=(n, n)), B).sum())(values)

Both functions are ``jax.custom_vjp``s around ``jax.pure_callback``: the forward pass is the
package's Krylov march, the backward pass its adjoint pass with the upstream gradient of the
states as the adjoint jumps (exact up to ``rtol``; no tape through the solver). They work under
``jit`` and ``grad``; under ``vmap`` the callback runs once per batch element (a loop).
The callback computes on the host with NumPy: arrays on a GPU are copied to the host and back
(the zero-copy device path is the PyTorch layer's). Gradients flow to A's stored values (a BCOO
matrix's ``data``; every entry of a dense A), B / x0, f, d and t.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from . import _layer
from ._checks import check_int
from .adjoint import DEFAULT_RTOL, MIN_K
from .rational import DEFAULT_METHOD, check_method

__all__ = ["expm_multiply", "odeint_linear"]


def expm_multiply(A, B, t=1.0, *, rtol: float = DEFAULT_RTOL, k: int = 30,
                  method: str = DEFAULT_METHOD):
    """exp(t A) B, differentiable in A's stored values, B and t (t >= 0).

    A : (n, n) dense array or ``jax.experimental.sparse.BCOO``, float32 or float64
    B : (n, S) or (n,) array of A's dtype;  t : real scalar >= 0 (may be traced)
    rtol, k : relative accuracy (raised to 100 eps of the dtype) and maximum Krylov dimension
    method : "polynomial", "rational" (stiff problems: one sparse LU of I - gamma A per call)
        or "auto", as in ``diagode_dist.torch.expm_multiply``
    Returns an array like B. A negative t is refused (ValueError when concrete).
    """
    return odeint_linear(A, x0=B, t=jnp.reshape(jnp.asarray(t), (1,)), rtol=rtol, k=k,
                         method=method)[0]


def odeint_linear(A, f=None, x0=None, t=1.0, d=None, *, rtol: float = DEFAULT_RTOL,
                  k: int = 30, method: str = DEFAULT_METHOD):
    """States of dx/dt = (A + diag(d)) x + f, x(0) = x0, at the times t: (m, n, S).

    A : (n, n) dense array or BCOO; f, x0 : (n, S) or (n,) arrays or None (at least one);
    t : increasing times >= 0 (number, sequence or 1-D array; may be traced);
    d : (n,) or None; rtol, k, method : as in ``expm_multiply``. Differentiable in A's
    values, f, x0, d and t. When every given f / x0 is 1-D the result is (m, n).
    The backward marches forward again (a callback's residuals are arrays, so the forward
    march cannot be kept for it as the PyTorch layer does).
    """
    rows, cols, values, n = _entries(A)
    f, x0, vector = _columns(f, x0, n, values.dtype)
    d = _vector(d, n, values.dtype)
    times = _times(t)
    _check_tolerances(rtol, k)
    check_method(method)
    config = (n, f.shape[1] if f is not None else x0.shape[1], float(rtol), int(k), method)
    out = _solve(config, values, rows, cols, d, f, x0, times.astype(values.dtype))
    return out[..., 0] if vector else out


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve(config, values, rows, cols, d, f, x0, times):
    return _forward_callback(config, values, rows, cols, d, f, x0, times)


def _forward_callback(config, values, rows, cols, d, f, x0, times):
    n, S = config[:2]
    shape = jax.ShapeDtypeStruct((times.shape[0], n, S), values.dtype)
    return jax.pure_callback(partial(_host_states, config), shape, values, rows, cols, d, f,
                             x0, times, vmap_method="sequential")


def _solve_fwd(config, values, rows, cols, d, f, x0, times):
    out = _forward_callback(config, values, rows, cols, d, f, x0, times)
    return out, (values, rows, cols, d, f, x0, times, out)


def _solve_bwd(config, residuals, upstream):
    values, rows, cols, d, f, x0, times, out = residuals
    like = {"values": values, "d": d, "f": f, "x0": x0, "t": times}
    names = tuple(name for name, a in like.items() if a is not None)
    shapes = tuple(jax.ShapeDtypeStruct(like[name].shape, like[name].dtype) for name in names)
    grads = jax.pure_callback(partial(_host_vjp, config, names), shapes, values, rows, cols,
                              d, f, x0, times, out, upstream, vmap_method="sequential")
    got = dict(zip(names, grads, strict=True))
    return (got["values"], None, None, got.get("d"), got.get("f"), got.get("x0"), got["t"])


_solve.defvjp(_solve_fwd, _solve_bwd)


def _ode(config, values, rows, cols, d, f, x0, times) -> _layer.ODE:
    """The layer call on host NumPy arrays (operator = W(values) on (rows, cols))."""
    _, _, rtol, k, method = config
    host = [None if a is None else np.asarray(a) for a in (values, d, f, x0)]
    return _layer.ODE(None, np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64),
                      *host, np.asarray(times, dtype=np.float64), rtol, k, method)


def _host_states(config, values, rows, cols, d, f, x0, times):
    _check_concrete_times(times)
    return _layer.states(_ode(config, values, rows, cols, d, f, x0, times))[0]


def _host_vjp(config, names, values, rows, cols, d, f, x0, times, out, upstream):
    ode = _ode(config, values, rows, cols, d, f, x0, times)
    grads = _layer.vjp(ode, np.asarray(out), np.asarray(upstream), names)
    return tuple(np.asarray(grads[name], dtype=ode.dtype) for name in names)


def _entries(A):
    """(rows, cols, values, n): A's stored entries (a dense A: all of them, row-major)."""
    if isinstance(A, jsparse.BCOO):
        if A.n_batch or A.n_dense or A.ndim != 2:
            raise ValueError("A must be a 2-D BCOO matrix without batch or dense dimensions")
        n = _square(A.shape)
        _check_float(A.dtype)
        return A.indices[:, 0], A.indices[:, 1], A.data, n
    if not hasattr(A, "shape") or not hasattr(A, "dtype"):
        raise TypeError(f"A must be a jax array or a BCOO matrix, got {type(A).__name__}")
    A = jnp.asarray(A)
    n = _square(A.shape)
    _check_float(A.dtype)
    rows, cols = np.divmod(np.arange(n * n, dtype=np.int64), n)
    return jnp.asarray(rows), jnp.asarray(cols), A.reshape(-1), n


def _square(shape) -> int:
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"A must be a square (n, n) matrix, got shape {tuple(shape)}")
    return int(shape[0])


def _check_float(dtype):
    if dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"A must be float32 or float64, got {dtype}")


def _columns(f, x0, n, dtype):
    if f is None and x0 is None:
        raise ValueError("odeint_linear needs f or x0 (with neither, every state is zero)")
    checked = [None if a is None else _dense(a, name, n, dtype)
               for a, name in ((f, "f"), (x0, "x0"))]
    widths = {a.shape[1] for a in checked if a is not None and a.ndim == 2}
    if len(widths) > 1:
        raise ValueError(f"f and x0 must have the same number of columns, got {sorted(widths)}")
    S = widths.pop() if widths else 1
    vector = all(a is None or a.ndim == 1 for a in checked)
    out = [None if a is None else jnp.broadcast_to(a[:, None] if a.ndim == 1 else a, (n, S))
           for a in checked]
    return out[0], out[1], vector


def _dense(a, name, n, dtype):
    a = jnp.asarray(a)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have A's dtype {dtype}, got {a.dtype}")
    if a.ndim not in (1, 2) or a.shape[0] != n:
        raise ValueError(f"{name} must have shape (n, S) or (n,) with n = {n}, "
                         f"got {tuple(a.shape)}")
    return a


def _vector(d, n, dtype):
    if d is None:
        return None
    d = _dense(d, "d", n, dtype)
    if d.ndim != 1:
        raise ValueError(f"d must have shape (n,) = ({n},), got {tuple(d.shape)}")
    return d


def _times(t):
    """The times as a 1-D array; concrete times are checked here, traced ones in the callback."""
    if isinstance(t, numbers.Real | Sequence | np.ndarray) and not isinstance(t, bool):
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        _check_concrete_times(t)
        return jnp.asarray(t)
    if not hasattr(t, "dtype") or not jnp.issubdtype(t.dtype, jnp.floating):
        raise TypeError(f"t must be a number, a sequence or a float array, got {t!r}")
    times = jnp.reshape(t, (-1,))
    if not isinstance(times, jax.core.Tracer):
        _check_concrete_times(np.asarray(times))
    return times


def _check_concrete_times(times):
    host = np.asarray(times, dtype=np.float64)
    if host.size == 0 or not np.isfinite(host).all():
        raise ValueError(f"t must be a non-empty sequence of finite times, got {host}")
    if host[0] < 0 or np.any(np.diff(host) <= 0):
        raise ValueError(f"t must increase strictly from t_1 >= 0, got {host}")


def _check_tolerances(rtol, k):
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
    check_int(k, "k", MIN_K)
