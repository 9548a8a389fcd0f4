"""PyTorch layer: exp(tA) B and linear ODE solutions with exact adjoint gradients.

    import torch
    from diagode_dist.torch import expm_multiply, odeint_linear, LinearODE

    A = torch.sparse_csr_tensor(crow, col, values, (n, n))   # values may require grad
    X = expm_multiply(A, B, t=0.5)                           # (n, S), differentiable in A, B, t
    states = odeint_linear(A, f=F, x0=X0, t=[0.5, 1.0], d=d)  # (m, n, S)

The forward pass is the package's batched Krylov march; the backward pass is its adjoint pass
with the upstream gradient of the states as the adjoint jumps, so gradients are exact up to the
tolerance ``rtol`` and no autograd tape is kept through the solver (memory O(n S k)).

CPU tensors reach NumPy without copies (``Tensor.numpy`` / ``torch.from_numpy``); CUDA tensors
reach CuPy through DLPack without copies, on the tensor's device and current stream. float32
and float64 (float32 computes to about 1e-5 relative accuracy). The sparse index arrays are read
on the host (once per call).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _layer
from ._array import is_sparse
from ._checks import check_int
from .adjoint import DEFAULT_RTOL, MIN_K
from .rational import DEFAULT_METHOD, check_method

__all__ = ["expm_multiply", "odeint_linear", "LinearODE"]

_FLOATS = (torch.float32, torch.float64)


def expm_multiply(A: torch.Tensor, B: torch.Tensor, t=1.0, *, rtol: float = DEFAULT_RTOL,
                  k: int = 30, method: str = DEFAULT_METHOD) -> torch.Tensor:
    """exp(t A) B, differentiable in A's stored values (on its pattern), B and t.

    Parameters
    ----------
    A : (n, n) tensor: sparse CSR, sparse COO, or dense (strided); float32 or float64
    B : (n, S) or (n,) dense tensor of A's dtype and device
    t : real number or 0-d tensor (any sign; t < 0 runs exp(|t| (-A)))
    rtol : relative accuracy of the Krylov projections (raised to 100 eps of the dtype)
    k : maximum Krylov dimension per sub-step (>= 8)
    method : "polynomial" (the default; Krylov spaces of A, matrix-free), "rational"
        (shift-and-invert spaces of (I - gamma A)^{-1}, one sparse LU per call, on the host:
        for stiff problems, ||t A|| in the thousands; A sparse or requiring grad) or "auto"
        (chosen per call from ||t A||_1, nnz and n), as ``diagode_dist.loss_and_grad``'s; the
        backward uses the forward's

    Returns
    -------
    (n, S) or (n,) tensor like B. Raises ``diagode_dist.AccuracyError`` when the tolerance
    cannot be certified.
    """
    value = float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
    sign = -1.0 if value < 0 else 1.0  # exp(t A) = exp(|t| (sign A)); the time stays >= 0
    times = t * sign if isinstance(t, torch.Tensor) else abs(value)
    states = odeint_linear(_scaled(A, sign), x0=B, t=_as_times(times, A), rtol=rtol, k=k,
                           method=method)
    return states[0]


def odeint_linear(A: torch.Tensor, f: torch.Tensor | None = None,
                  x0: torch.Tensor | None = None, t=1.0, d: torch.Tensor | None = None, *,
                  rtol: float = DEFAULT_RTOL, k: int = 30,
                  method: str = DEFAULT_METHOD) -> torch.Tensor:
    """States of dx/dt = (A + diag(d)) x + f, x(0) = x0, at the times t.

    Parameters
    ----------
    A : (n, n) tensor: sparse CSR, sparse COO, or dense; float32 or float64. Gradients flow to
        its stored values (a sparse A's gradient lives on its pattern).
    f : (n, S) or (n,) constant forcing, or None (zero)
    x0 : (n, S) or (n,) initial states, or None (zero). At least one of f, x0 is required.
    t : real number, sequence or 1-D tensor of times, 0 <= t_1 < ... < t_m (same unit as 1/A);
        a tensor requiring grad gets dL/dt_i = <dL/dx(t_i), dx/dt(t_i)>
    d : (n,) diagonal added to A, or None
    rtol, k, method : as in ``expm_multiply``

    Returns
    -------
    (m, n, S) tensor (or (m, n) when every given f / x0 is 1-D), differentiable in A's values,
    d, f, x0 and t.
    """
    spec, values = _operator(A)
    f, x0, vector = _columns(f, x0, spec)
    d = _vector(d, "d", spec)
    times = _as_times(t, A)
    dense_fixed = spec["base"] is not None and not is_sparse(spec["base"])
    _check_tolerances(rtol, k, method, dense_fixed)
    spec.update(rtol=float(rtol), k=int(k), method=method)
    out = _LinearODEFunction.apply(spec, values, d, f, x0, times)
    return out[..., 0] if vector else out


class LinearODE(torch.nn.Module):
    """dx/dt = (A0 + diag(d(theta_d)) + W(theta_w)) x + f with trainable diagonal and edges.

    Parameters
    ----------
    A0 : (n, n) fixed base operator: SciPy sparse, NumPy array, or torch tensor (any layout)
    pattern : (n, n) SciPy sparse / 0-1 mask / torch tensor whose stored entries are the trained
        edges W (one weight each, row-major order), or None (no edges)
    diagonal : "softplus" (d = -softplus(theta), stabilising), "exp" (d = -exp(theta)),
        "identity" (d = theta) or None (no trained diagonal)
    edges : transform of the edge weights: "identity", "softplus" or "exp" (positive rates)
    generator : subtract the edges' row sums from the diagonal (A0 + W - diag(W 1): rows of the
        added part sum to zero -- graph Laplacians, Markov generators, exchange between nodes)
    times : observation times 0 <= t_1 < ... < t_m
    dtype : torch.float64 (default) or torch.float32
    rtol, k, method : as in ``expm_multiply``

    ``forward(f=None, x0=None)`` returns the states (m, n, S). Parameters: ``theta_diag`` (n,)
    and ``theta_edges`` (nnz,), both initialised to zero.
    """

    def __init__(self, A0, pattern=None, *, diagonal: str | None = "softplus",
                 edges: str = "identity", generator: bool = False, times=(1.0,),
                 dtype: torch.dtype = torch.float64, rtol: float = DEFAULT_RTOL, k: int = 30,
                 method: str = DEFAULT_METHOD):
        super().__init__()
        if dtype not in _FLOATS:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        _check_choice(diagonal, "diagonal", ("softplus", "exp", "identity", None))
        _check_choice(edges, "edges", ("identity", "softplus", "exp"))
        self.register_buffer("A0", _as_torch_operator(A0, "A0", dtype))
        _check_tolerances(rtol, k, method, self.A0.layout == torch.strided, "A0")
        n = self.A0.shape[0]
        rows, cols = _pattern_entries(pattern, n)
        self.register_buffer("edge_rows", rows)
        self.register_buffer("edge_cols", cols)
        self.register_buffer("times", _as_times(times, self.A0))
        self.diagonal, self.edges, self.generator = diagonal, edges, bool(generator)
        self.rtol, self.k, self.method = float(rtol), int(k), method
        self.theta_diag = torch.nn.Parameter(torch.zeros(n, dtype=dtype)) if diagonal else None
        self.theta_edges = (torch.nn.Parameter(torch.zeros(rows.numel(), dtype=dtype))
                            if rows.numel() else None)

    def diag(self) -> torch.Tensor | None:
        """The trained diagonal d (n,) (with the generator's row sums), or None."""
        d = None
        if self.theta_diag is not None:
            d = _DIAGONAL_MAPS[self.diagonal](self.theta_diag)
        if self.generator and self.theta_edges is not None:
            rowsum = torch.zeros(self.A0.shape[0], dtype=self.theta_edges.dtype,
                                 device=self.theta_edges.device)
            rowsum = rowsum.index_add(0, self.edge_rows, self.weights())
            d = -rowsum if d is None else d - rowsum
        return d

    def weights(self) -> torch.Tensor | None:
        """The edge weights W at the pattern's entries (nnz,), or None."""
        if self.theta_edges is None:
            return None
        return _EDGE_MAPS[self.edges](self.theta_edges)

    def forward(self, f: torch.Tensor | None = None,
                x0: torch.Tensor | None = None) -> torch.Tensor:
        spec, base_values = _operator(self.A0)
        if self.theta_edges is not None:
            spec["rows"] = self.edge_rows.cpu().numpy()
            spec["cols"] = self.edge_cols.cpu().numpy()
        f, x0, vector = _columns(f, x0, spec)
        spec.update(rtol=self.rtol, k=self.k, method=self.method)
        d = self.diag()
        out = _LinearODEFunction.apply(spec, self.weights(), d, f, x0, self.times)
        return out[..., 0] if vector else out


_DIAGONAL_MAPS = {
    "softplus": lambda theta: -torch.nn.functional.softplus(theta),
    "exp": lambda theta: -torch.exp(theta),
    "identity": lambda theta: theta,
}
_EDGE_MAPS = {
    "identity": lambda theta: theta,
    "softplus": torch.nn.functional.softplus,
    "exp": torch.exp,
}


class _LinearODEFunction(torch.autograd.Function):
    """The layer as one autograd node: forward march, adjoint pass in backward."""

    @staticmethod
    def forward(ctx, spec, values, d, f, x0, times):
        ctx.spec = spec
        # the backward's adjoint march reuses the forward march (one march each way)
        keep = any(ctx.needs_input_grad[1:5])
        with _on_device(spec["device"]):
            ode = _ode(spec, values, d, f, x0, times)
            states, ctx.kept = _layer.states(ode, keep=keep)
            out = _from_xp(states, spec["device"])
        ctx.save_for_backward(values, d, f, x0, times, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream):
        spec = ctx.spec
        values, d, f, x0, times, out = ctx.saved_tensors
        names = ("values", "d", "f", "x0", "t")
        needed = [name for name, need in zip(names, ctx.needs_input_grad[1:], strict=True)
                  if need]
        with _on_device(spec["device"]):
            ode = _ode(spec, values, d, f, x0, times)
            # the kept marches go with this backward (a second one, retain_graph=True,
            # marches forward again): their memory is not held as long as the graph
            kept, ctx.kept = ctx.kept, None
            grads = _layer.vjp(ode, _to_xp(out), _to_xp(upstream.contiguous()), needed, kept)
            result = [_from_xp(grads[name], spec["device"]) if name in needed else None
                      for name in names]
        if result[4] is not None:
            result[4] = result[4].to(times)
        return (None, *result)


def _ode(spec, values, d, f, x0, times) -> _layer.ODE:
    """The layer call on NumPy / CuPy views of the tensors (no copies)."""
    rows = cols = None
    if values is not None:
        rows, cols = spec["rows"], spec["cols"]
    return _layer.ODE(spec["base"], rows, cols, _to_xp(values), _to_xp(d), _to_xp(f),
                      _to_xp(x0), times.detach().cpu().numpy().astype(np.float64),
                      spec["rtol"], spec["k"], spec["method"])


def _to_xp(tensor):
    """A NumPy (CPU) or CuPy (CUDA, via DLPack) view of a tensor, sharing its memory."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.numpy()
    import cupy

    return cupy.from_dlpack(tensor)


def _from_xp(array, device):
    """A tensor sharing the memory of a NumPy / CuPy array."""
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(array))
    return torch.from_dlpack(array)


def _on_device(device):
    """CuPy on the tensor's device and current stream (CUDA); nothing to do on the CPU."""
    if device.type == "cpu":
        return contextlib.nullcontext()
    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(device.index))
    stream = torch.cuda.current_stream(device)
    stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, device.index))
    return stack


def _operator(A):
    """(spec, values) of an operator tensor: values is the differentiable tensor of its stored
    entries when A requires grad (else None, and A goes to the core as a fixed base operator).
    spec holds the device, dtype, n, the base operator and the entries (host int64)."""
    _check_operator(A, "A")
    spec = {"device": A.device, "dtype": A.dtype, "n": A.shape[0], "base": None}
    if A.layout == torch.sparse_coo:
        A = A.coalesce()
    if not A.requires_grad:
        with _on_device(A.device):
            spec["base"] = _core_operator(A)
        return spec, None
    rows, cols, values = _entries(A)
    spec["rows"], spec["cols"] = rows, cols
    return spec, values


def _entries(A):
    """(rows, cols) host int64 and the differentiable values of A's stored entries."""
    n = A.shape[0]
    if A.layout == torch.sparse_csr:
        crow = A.crow_indices().cpu().numpy()
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(crow))
        return rows, A.col_indices().cpu().numpy().astype(np.int64), A.values()
    if A.layout == torch.sparse_coo:
        index = A.indices().cpu().numpy().astype(np.int64)
        return index[0], index[1], A.values()
    rows, cols = np.divmod(np.arange(n * n, dtype=np.int64), n)  # dense: row-major
    return rows, cols, A.reshape(-1)


def _core_operator(A):
    """A fixed operator in the core's format: CSR (SciPy / CuPy) or a dense array view."""
    if A.layout == torch.strided:
        return _to_xp(A)
    A = A.detach()
    if A.layout == torch.sparse_coo:
        A = A.to_sparse_csr()
    data, indices, indptr = (_to_xp(A.values()), _to_xp(A.col_indices()),
                             _to_xp(A.crow_indices()))
    if A.device.type == "cpu":
        import scipy.sparse as sp

        return sp.csr_matrix((data, indices, indptr), shape=tuple(A.shape))
    import cupyx.scipy.sparse as cusp

    return cusp.csr_matrix((data, indices, indptr), shape=tuple(A.shape))


def _scaled(A, sign: float):
    """sign * A (a view when sign = 1), differentiable, in A's layout."""
    if sign == 1.0:
        return A
    return -A


def _columns(f, x0, spec):
    """f, x0 as (n, S) tensors of the operator's dtype and device; ``vector``: both 1-D."""
    if f is None and x0 is None:
        raise ValueError("odeint_linear needs f or x0 (with neither, every state is zero)")
    checked = [_dense(a, name, spec) for a, name in ((f, "f"), (x0, "x0"))]
    widths = {a.shape[1] for a in checked if a is not None and a.dim() == 2}
    if len(widths) > 1:
        raise ValueError(f"f and x0 must have the same number of columns, got {sorted(widths)}")
    S = widths.pop() if widths else 1
    vector = all(a is None or a.dim() == 1 for a in checked)
    out = [None if a is None else (a[:, None] if a.dim() == 1 else a).expand(spec["n"], S)
           for a in checked]
    return out[0], out[1], vector


def _dense(a, name, spec):
    if a is None:
        return None
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {a.layout}")
    if a.dtype != spec["dtype"] or a.device != spec["device"]:
        raise TypeError(f"{name} must have A's dtype and device ({spec['dtype']}, "
                        f"{spec['device']}), got ({a.dtype}, {a.device})")
    if a.dim() not in (1, 2) or a.shape[0] != spec["n"]:
        raise ValueError(f"{name} must have shape (n, S) or (n,) with n = {spec['n']}, "
                         f"got {tuple(a.shape)}")
    return a


def _vector(d, name, spec):
    d = _dense(d, name, spec)
    if d is not None and d.dim() != 1:
        raise ValueError(f"{name} must have shape (n,) = ({spec['n']},), got {tuple(d.shape)}")
    return d


def _as_times(t, A):
    """The times as a 1-D float64 tensor on the host (a tensor keeps its autograd graph)."""
    if isinstance(t, torch.Tensor):
        if not t.dtype.is_floating_point:
            raise TypeError(f"t must be a float tensor, got dtype {t.dtype}")
        times = t.reshape(-1)
    elif isinstance(t, numbers.Real) and not isinstance(t, bool):
        times = torch.tensor([float(t)], dtype=torch.float64)
    elif isinstance(t, Sequence | np.ndarray):
        times = torch.as_tensor(np.asarray(t, dtype=np.float64).reshape(-1))
    else:
        raise TypeError(f"t must be a number, a sequence or a tensor, got {type(t).__name__}")
    host = times.detach().cpu().numpy().astype(np.float64)
    if host.size == 0 or not np.isfinite(host).all():
        raise ValueError(f"t must be a non-empty sequence of finite times, got {host}")
    if host[0] < 0 or np.any(np.diff(host) <= 0):
        raise ValueError(f"t must increase strictly from t_1 >= 0, got {host}")
    return times


def _check_operator(A, name):
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (sparse CSR/COO or dense), "
                        f"got {type(A).__name__}")
    if A.layout not in (torch.strided, torch.sparse_csr, torch.sparse_coo):
        raise TypeError(f"{name} must be sparse CSR, sparse COO or dense, got {A.layout}")
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {tuple(A.shape)}")
    if A.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {A.dtype}")


def _check_tolerances(rtol, k, method, dense_fixed: bool, name="A"):
    """rtol, k and method; dense_fixed: the operator ``name`` is dense and does not require
    grad (the core gets it as a dense array, which the rational method cannot factorize)."""
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
    check_int(k, "k", MIN_K)
    check_method(method)
    if method == "rational" and dense_fixed:
        raise ValueError(f"method='rational' needs a sparse {name} (CSR or COO), or one that "
                         "requires grad: the shift-and-invert space factorizes I - gamma A")


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _as_torch_operator(A0, name, dtype):
    """A fixed operator as a torch tensor (sparse CSR for SciPy sparse input)."""
    import scipy.sparse as sp

    if sp.issparse(A0):
        A0 = sp.csr_matrix(A0)
        with warnings.catch_warnings():  # torch's notice that sparse CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            A0 = torch.sparse_csr_tensor(torch.from_numpy(A0.indptr.astype(np.int64)),
                                         torch.from_numpy(A0.indices.astype(np.int64)),
                                         torch.from_numpy(A0.data), A0.shape)
    elif isinstance(A0, np.ndarray):
        A0 = torch.from_numpy(A0)
    _check_operator(A0.to(dtype) if isinstance(A0, torch.Tensor) else A0, name)
    return A0.detach().to(dtype)


def _pattern_entries(pattern, n):
    """(rows, cols) int64 tensors of the trained edges, row-major (empty for None)."""
    import scipy.sparse as sp

    if pattern is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    if isinstance(pattern, torch.Tensor):
        pattern = pattern.detach().cpu()
        pattern = (pattern.to_dense() if pattern.layout != torch.strided else pattern).numpy()
    if sp.issparse(pattern):
        coo = sp.csr_matrix(pattern, copy=True)
        coo.sum_duplicates()
        coo = coo.tocoo()
        rows, cols = coo.row, coo.col
    else:
        mask = np.asarray(pattern)
        rows, cols = np.nonzero(mask)
        shape = mask.shape
        if shape != (n, n):
            raise ValueError(f"pattern must be (n, n) = ({n}, {n}), got {shape}")
    if sp.issparse(pattern) and pattern.shape != (n, n):
        raise ValueError(f"pattern must be (n, n) = ({n}, {n}), got {pattern.shape}")
    return (torch.from_numpy(np.asarray(rows, dtype=np.int64)),
            torch.from_numpy(np.asarray(cols, dtype=np.int64)))
