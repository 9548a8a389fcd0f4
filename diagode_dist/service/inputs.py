"""Dask-native inputs: a problem whose columns are ``dask.array`` chunks that stay on the workers.

The ``xgboost.dask`` convention: hand the service Dask collections, and each partition is used
where it lives. ``DaskProblem(A0, F, labels, ...)`` takes ``F`` (and ``labels``, ``x0``,
``targets``) as ``dask.array``s (from ``da.from_zarr``, ``da.from_npy_stack``, an HDF5 dataset,
or any graph); ``submit`` persists them on the workers, and each column chunk of ``F`` becomes
one shard whose task runs where that chunk is held. The client never gathers ``F``; only
metadata (shapes, dtypes, chunks) is read here. A0 (the shared operator) is a NumPy or SciPy
matrix, shipped once per worker.

    import dask.array as da
    F = da.from_zarr("F.zarr")                      # (n, S), chunked by columns
    problem = DaskProblem(A0, F, labels, T=2.0, beta=10.0)
    theta, history = dd.fit_distributed(client, problem, theta0, epochs=20)

Values are checked by the workers when they load their chunk (NaN in F, labels out of range):
such a run fails with the worker's message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import scipy.sparse as sp
from distributed import Client, futures_of

from diagode_dist.problem import Problem

__all__ = ["DaskProblem", "DaskShard"]


class DaskProblem:
    """A problem whose column data are dask arrays (see the module docstring).

    Parameters
    ----------
    A0 : (n, n) NumPy array or SciPy sparse matrix
    F : (n, S) dask array (or NumPy, wrapped); its column chunks are the shards
    labels : (S,) integers in [0, n) for the classification loss (dask or NumPy), or None
    T, beta : final time, logit scale
    x0 : (n, S) initial states (dask or NumPy), or None
    obs_times, targets, loss : ``loss="mse"`` with targets (m, n, S) (dask or NumPy)
    """

    def __init__(self, A0, F, labels=None, T: float = 2.0, beta: float = 10.0, x0=None, *,
                 obs_times=None, targets=None, loss=None):
        self.F = _dask_array(F, "F", ndim=2)
        n, S = self.F.shape
        if any(np.isnan(size) for size in self.F.shape):
            raise ValueError("F must have a known shape (call F.compute_chunk_sizes())")
        if self.F.dtype.kind not in "fiu" or self.F.dtype == bool:
            raise TypeError(f"F must be a real numeric array, got dtype {self.F.dtype}")
        if loss is not None and loss != "mse":
            raise TypeError("DaskProblem supports the classification loss (labels) and "
                            "loss='mse'; use a Problem for a callable loss")
        dtype = np.float32 if self.F.dtype == np.float32 else np.float64
        # A0 is validated once here, on a one-column stand-in problem, and then shipped as is.
        self.template = Problem(A0, np.zeros((n, 1), dtype=dtype), np.zeros(1, dtype=np.int64),
                                T=T, beta=beta)
        self.T, self.beta, self.loss = self.template.T, self.template.beta, loss
        self.obs_times = None if obs_times is None else tuple(float(t) for t in obs_times)
        col_chunks = self.F.chunks[1]
        self.F = self.F.rechunk({0: -1})  # whole columns per chunk (a no-op if they are)
        self.labels = None if labels is None else _columns_like(labels, "labels", (S,),
                                                                col_chunks)
        self.x0 = None if x0 is None else _columns_like(x0, "x0", (n, S), col_chunks)
        self.targets = None
        if targets is not None:
            m = len(self.obs_times or ())
            self.targets = _columns_like(targets, "targets", (m, n, S), col_chunks)
        if loss is None and self.labels is None:
            raise ValueError("labels are required for the classification loss (or pass "
                             "loss='mse' with obs_times and targets)")
        if loss == "mse" and (self.targets is None or self.obs_times is None):
            raise ValueError("loss='mse' needs obs_times and targets of shape (m, n, S)")

    @property
    def n(self) -> int:
        return int(self.F.shape[0])

    @property
    def S(self) -> int:
        return int(self.F.shape[1])

    @property
    def column_chunks(self) -> tuple[int, ...]:
        """Columns per shard: the column chunks of F."""
        return tuple(int(c) for c in self.F.chunks[1])

    def shard_ranges(self) -> list[tuple[int, int]]:
        """[lo, hi) global columns of each shard (each column chunk of F)."""
        bounds = np.cumsum((0, *self.column_chunks))
        return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def persist(self, client: Client) -> list[dict[str, Any]]:
        """Persist the column arrays on the workers; per shard, the futures of its chunks
        (keys "F", "labels", "x0", "targets"; absent arrays are None)."""
        names = [name for name in ("F", "labels", "x0", "targets")
                 if getattr(self, name) is not None]
        persisted = dict(zip(names, client.persist([getattr(self, name) for name in names]),
                             strict=True))
        blocks = []
        for shard in range(len(self.column_chunks)):
            mine: dict[str, Any] = dict.fromkeys(("F", "labels", "x0", "targets"))
            for name, array in persisted.items():
                by_key = {future.key: future for future in futures_of(array)}
                keys = array.__dask_keys__()
                for _ in range(array.ndim - 1):  # one chunk along every axis but the last
                    keys = keys[0]
                mine[name] = by_key[keys[shard]]
            blocks.append(mine)
        return blocks

    def shard_data(self) -> DaskShard:
        """What each shard task needs besides its chunks and A0 (small, picklable)."""
        return DaskShard(n=self.n, T=self.T, beta=self.beta, obs_times=self.obs_times,
                         loss=self.loss, symmetric=self.template.symmetric,
                         dtype=str(self.template.dtype))

    def __repr__(self) -> str:
        return (f"DaskProblem(n={self.n}, S={self.S}, column chunks={len(self.column_chunks)}, "
                f"T={self.T}, beta={self.beta})")


@dataclass(frozen=True)
class DaskShard:
    """Scalars of a DaskProblem, for building a shard's Problem on its worker."""

    n: int
    T: float
    beta: float
    obs_times: tuple[float, ...] | None
    loss: str | None
    symmetric: bool
    dtype: str

    def build(self, A0, blocks: dict[str, Any]) -> Problem:
        """The shard's Problem from its chunks and the (already validated) host A0."""
        # A stand-in empty operator keeps the constructor from checking A0 once per shard;
        # the real A0 is attached unchecked (it was validated on the client).
        empty = sp.csr_matrix((self.n, self.n), dtype=np.dtype(self.dtype))
        piece = Problem(empty, blocks["F"], blocks["labels"], T=self.T, beta=self.beta,
                        x0=blocks["x0"], obs_times=self.obs_times, targets=blocks["targets"],
                        loss=self.loss, symmetric=self.symmetric)
        return piece.with_operator(A0, check=False)


def _dask_array(value, name: str, ndim: int) -> da.Array:
    if not isinstance(value, da.Array):
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name} must be a dask or NumPy array, got {type(value).__name__}")
        value = da.from_array(np.asarray(value), chunks=-1)
    if value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {value.shape}")
    return value


def _columns_like(value, name: str, shape: tuple[int, ...], col_chunks) -> da.Array:
    """``value`` as a dask array of ``shape`` chunked like F's columns (whole otherwise)."""
    array = _dask_array(value, name, len(shape))
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} to match F, got {array.shape}")
    return array.rechunk((*((size,) for size in shape[:-1]), tuple(col_chunks)))
