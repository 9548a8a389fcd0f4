"""The problem: dx_j/dt = (A0 + diag(d)) x_j + f_j over columns j, and its loss.

``Problem`` holds and validates the data; it computes nothing expensive.
"""

from __future__ import annotations

import numpy as np

from ._array import array_module, is_sparse, sparse_to_module, to_module, to_numpy
from ._checks import finite_real
from .losses import Classification, MeanSquared, UserLoss


class Problem:
    """A linear ODE system with one column (trajectory) per right-hand side, and its loss.

    Parameters
    ----------
    A0 : (n, n) array or sparse matrix (SciPy / CuPy CSR), float
        Fixed base operator, never modified. The trained diagonal is added to it.
    F : (n, S) array, float
        Constant forcing, one column per trajectory. S >= 1. Its dtype (float64 by default,
        float32 as an opt-in for the GPU) sets the precision of the whole computation.
    labels : (S,) integer array, values in [0, n), optional
        Class of each column for the classification loss (the default loss).
    T : float > 0
        Final time (same time unit as 1/A).
    beta : float
        Logit scale of the classification loss: z_j = beta * x_j(T).
    x0 : (n, S) array or None
        Initial states (default zero).
    obs_times : increasing floats in (0, T], optional
        Observation times of ``loss="mse"`` or a user loss.
    targets : (m, n, S) array, optional
        Observed states for ``loss="mse"``: targets[i, :, j] is column j at obs_times[i].
    loss : None (classification), "mse", or a callable ``fn(states, columns) -> (loss, dL/dx)``
        (see ``diagode_dist.losses``).
    symmetric : bool or None
        Whether A0 is symmetric (then the Krylov projections use Lanczos, O(k n) per step).
        None detects it.

    The array module (NumPy or CuPy) is taken from ``F``; every other array must live there too.
    """

    def __init__(self, A0, F, labels=None, T: float = 2.0, beta: float = 10.0, x0=None, *,
                 obs_times=None, targets=None, loss=None, symmetric: bool | None = None):
        self.xp = xp = array_module(F)
        self.F = _float_matrix(F, "F", xp)
        n, S = self.F.shape
        if S < 1 or n < 1:
            raise ValueError(f"F must have at least one row and one column, got shape {F.shape}")
        self.A0 = _operator(A0, n, xp, self.F.dtype)
        self.x0 = None if x0 is None else _float_matrix(x0, "x0", xp, (n, S), self.F.dtype)
        self.T = _positive_time(T)
        self.beta = finite_real(beta, "beta")
        self.loss = _make_loss(loss, labels, obs_times, targets, self, xp)
        self._derive_from_operator()
        self.symmetric = _is_symmetric(self.A0, xp) if symmetric is None else bool(symmetric)

    @property
    def dtype(self):
        """Floating-point type of the computation (F's dtype)."""
        return self.F.dtype

    @property
    def n(self) -> int:
        """State dimension."""
        return self.F.shape[0]

    @property
    def S(self) -> int:
        """Number of columns (right-hand sides)."""
        return self.F.shape[1]

    n_columns = S

    @property
    def labels(self):
        """(S,) integer labels of the classification loss, on the problem's device."""
        return getattr(self.loss, "labels", None)

    def select(self, columns) -> Problem:
        """A problem with only the given columns (A0 shared, not copied)."""
        cols = check_columns(columns, self.S)
        sub = object.__new__(Problem)
        sub.__dict__.update(self.__dict__)
        dev = self.xp.asarray(cols)
        sub.F = self.F[:, dev]
        sub.x0 = None if self.x0 is None else self.x0[:, dev]
        sub.loss = self.loss.select(cols)
        return sub

    def with_operator(self, A0, check: bool = True) -> Problem:
        """The same columns and loss with another operator A0 (n, n), not copied.

        ``A0=None`` gives a problem without operator, to ship columns separately from a shared
        A0 (the Dask service); ``check=False`` skips validating an A0 already validated once.
        """
        moved = object.__new__(Problem)
        moved.__dict__.update(self.__dict__)
        if A0 is None:
            moved.A0 = moved.A0T = moved.A0_abs_col_sums = None
            return moved
        moved.A0 = _operator(A0, self.n, self.xp, self.dtype) if check else A0
        moved._derive_from_operator()
        return moved

    def _derive_from_operator(self) -> None:
        """What the numerics read off A0 on every call, computed once per operator: A0^T (CSR
        when sparse, so adjoint products are as fast as forward ones) and the column sums of
        |A0| (n,) that bound ||A||_1 (a dense A0 is read in blocks of 64 rows, so no n x n
        temporary is made)."""
        A0, xp = self.A0, self.xp
        self.A0T = A0.T.tocsr() if is_sparse(A0) else A0.T
        if is_sparse(A0):
            self.A0_abs_col_sums = xp.asarray(abs(A0).sum(axis=0)).ravel()
        else:
            self.A0_abs_col_sums = sum(xp.abs(A0[i: i + 64]).sum(axis=0)
                                       for i in range(0, A0.shape[0], 64))

    def to_device(self, xp) -> Problem:
        """The same problem with its arrays moved to ``xp`` (``numpy`` or ``cupy``)."""
        if xp is self.xp:
            return self
        moved = object.__new__(Problem)
        moved.__dict__.update(self.__dict__)
        moved.xp = xp
        if self.A0 is not None:  # a problem without operator (with_operator(None)): columns only
            moved.A0 = (sparse_to_module(self.A0, xp) if is_sparse(self.A0)
                        else to_module(self.A0, xp))
            moved._derive_from_operator()
        moved.F = to_module(self.F, xp)
        moved.x0 = None if self.x0 is None else to_module(self.x0, xp)
        moved.loss = self.loss.to_device(lambda a: to_module(a, xp))
        return moved

    def __repr__(self) -> str:
        kind = "sparse" if is_sparse(self.A0) else "dense"
        return (f"Problem(n={self.n}, S={self.S}, T={self.T}, beta={self.beta}, A0={kind}, "
                f"backend={self.xp.__name__})")


def demo_problem(n: int = 256, S: int = 64, T: float = 2.0, beta: float = 10.0,
                 scale: float = 0.01, seed: int = 0, sparse: bool = False) -> Problem:
    """The seed package's classification demo.

    A0 = scale * randn(n, n) with a zero diagonal, F = randn(n, S), labels uniform in [0, n).
    Start training from ``theta0 = np.zeros(n)``.
    """
    rng = np.random.default_rng(seed)
    A0 = scale * rng.standard_normal((n, n))
    np.fill_diagonal(A0, 0.0)
    F = rng.standard_normal((n, S))
    labels = rng.integers(0, n, size=S)
    if sparse:
        import scipy.sparse as sp
        A0 = sp.csr_matrix(A0)
    return Problem(A0, F, labels, T=T, beta=beta)


def check_columns(columns, S: int) -> np.ndarray:
    """Validate a column selection; returns a host int64 array (None means all columns)."""
    if columns is None:
        return np.arange(S)
    cols = to_numpy(columns)
    if cols.ndim != 1 or cols.size == 0:
        raise ValueError(
            f"columns must be a non-empty 1-D sequence of ints, got shape {cols.shape}")
    if not np.issubdtype(cols.dtype, np.integer):
        raise TypeError(f"columns must be integers, got dtype {cols.dtype}")
    if cols.min() < 0 or cols.max() >= S:
        raise ValueError(f"columns must lie in [0, {S}), got range [{cols.min()}, {cols.max()}]")
    return cols.astype(np.int64)


def _make_loss(loss, labels, obs_times, targets, prob, xp):
    n, S, T = prob.n, prob.S, prob.T
    if loss is None:
        if labels is None:
            raise ValueError("labels are required for the classification loss "
                             "(or pass loss='mse' with obs_times and targets, or a callable)")
        if obs_times is not None or targets is not None:
            raise ValueError("obs_times/targets need loss='mse' or a callable loss")
        return Classification(to_module(_labels(labels, n, S), xp), prob.beta, T)
    times = _obs_times(obs_times, T)
    if isinstance(loss, str):
        if loss != "mse":
            raise ValueError(f"loss must be None, 'mse' or a callable, got {loss!r}")
        if targets is None:
            raise ValueError("loss='mse' needs targets of shape (m, n, S)")
        Y = _float_array(targets, "targets", xp, (len(times), n, S), prob.F.dtype)
        return MeanSquared(times, Y)
    if not callable(loss):
        raise TypeError(f"loss must be None, 'mse' or a callable, got {type(loss).__name__}")
    return UserLoss(loss, times)


def _obs_times(obs_times, T):
    if obs_times is None:
        raise ValueError("obs_times are required for loss='mse' or a callable loss")
    times = np.asarray(obs_times, dtype=float).ravel()
    if times.size == 0 or not np.isfinite(times).all():
        raise ValueError(
            f"obs_times must be a non-empty sequence of finite floats, got {obs_times!r}")
    if times[0] <= 0 or times[-1] > T or np.any(np.diff(times) <= 0):
        raise ValueError(f"obs_times must increase strictly within (0, T] = (0, {T}], got {times}")
    return tuple(float(t) for t in times)


def _is_symmetric(A0, xp) -> bool:
    """Exact symmetry of A0 (then Lanczos replaces Arnoldi)."""
    if is_sparse(A0):
        diff = A0 - A0.T
        return bool(diff.nnz == 0 or float(abs(diff).max()) == 0.0)
    return bool(xp.array_equal(A0, A0.T))


def _float_matrix(x, name, xp, shape=None, dtype=None):
    x = _float_array(x, name, xp, shape, dtype)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    return x


def _float_array(x, name, xp, shape=None, dtype=None):
    if is_sparse(x):
        raise TypeError(f"{name} must be a dense array, got a sparse matrix")
    if not hasattr(x, "dtype") and not isinstance(x, list | tuple):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if array_module(x) is not xp:
        raise TypeError(f"{name} must live on the same device as F ({xp.__name__})")
    x = xp.asarray(x)
    if x.dtype.kind not in "fiu" or x.dtype == bool:
        raise TypeError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if dtype is None:
        dtype = xp.float64 if x.dtype.kind in "iu" or x.dtype == xp.float16 else x.dtype
    x = x.astype(dtype, copy=False)
    if not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _operator(A0, n, xp, dtype):
    if array_module(A0) is not xp:
        raise TypeError(f"A0 must live on the same device as F ({xp.__name__})")
    if is_sparse(A0):
        if A0.shape != (n, n):
            raise ValueError(f"A0 must be square (n, n) = ({n}, {n}) to match F, got {A0.shape}")
        if A0.dtype.kind not in "fiu":
            raise TypeError(f"A0 must be real, got dtype {A0.dtype}")
        A = sparse_to_module(A0, xp).astype(dtype)
        if not bool(xp.isfinite(A.data).all()):
            raise ValueError("A0 contains NaN or inf")
        return A
    if not hasattr(A0, "shape") or getattr(A0, "ndim", 0) != 2 or A0.shape[0] != A0.shape[1]:
        raise ValueError(f"A0 must be a square 2-D matrix, got shape {getattr(A0, 'shape', None)}")
    return _float_matrix(A0, "A0", xp, (n, n), dtype)


def _positive_time(T):
    T = finite_real(T, "T")
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    return T


def _labels(labels, n, S):
    lab = to_numpy(labels)
    if lab.ndim != 1 or lab.shape[0] != S:
        raise ValueError(f"labels must have shape (S,) = ({S},), got {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.min() < 0 or lab.max() >= n:
        raise ValueError(f"labels must lie in [0, n) = [0, {n}), got [{lab.min()}, {lab.max()}]")
    return lab.astype(np.int64)
