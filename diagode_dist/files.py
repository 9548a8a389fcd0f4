"""A problem kept in files, so that each shard worker reads only its own columns.

Supported formats
-----------------
- ``A0``: ``.npy`` (dense (n, n)), ``.npz`` (written by ``scipy.sparse.save_npz``) or ``.mtx``
  (Matrix Market, sparse or dense).
- ``F``: ``.npy`` (n, S), read memory-mapped, or a ``.zarr`` array (needs ``zarr``; chunk it
  by columns): either way a shard reads only its own columns.
- ``labels``: ``.npy`` or ``.zarr`` (S,) integers in [0, n).
- ``x0`` (optional): ``.npy`` or ``.zarr`` (n, S), read like ``F``.
- ``targets`` (the ``loss="mse"`` problem, with ``obs_times``; then no ``labels``): ``.npy``
  (m, n, S), memory-mapped: a shard reads its own columns.

Paths are stored absolute, so they mean the same file on every worker of a shared file system.
``validate`` reads headers only; ``preflight`` also reads every value once, in bounded chunks,
and refuses NaN/inf or complex values naming the file and the first bad index; it returns the
problem's fingerprint (shapes, dtypes and a content hash per file), which the training
service records in checkpoints. ``array_fingerprint`` does the same for an in-memory array.
This module does not import Dask: loading a problem from files needs NumPy/SciPy (and zarr for
``.zarr``) only.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

from diagode_dist._checks import finite_real
from diagode_dist.problem import Problem

__all__ = ["ProblemFiles"]

_A0_SUFFIXES = (".npy", ".npz", ".mtx")
_COLUMN_SUFFIXES = (".npy", ".zarr")
_SCAN_BYTES = 32 * 2**20  # values read at a time by preflight (memory-safe on any size)


class ProblemFiles:
    """Paths of a problem's arrays plus its scalars; loads shards on demand.

    Parameters
    ----------
    A0 : path to the (n, n) base operator (.npy dense, .npz scipy.sparse, .mtx Matrix Market).
    F : path to the (n, S) forcing (.npy or .zarr).
    labels : path to the (S,) integer labels (.npy or .zarr).
    T : float > 0, final time.
    beta : float, logit scale.
    x0 : optional path to the (n, S) initial states (.npy or .zarr).
    loss : None (classification, needs ``labels``) or "mse" (needs ``obs_times`` and
        ``targets``; ``labels`` must be None).
    obs_times : increasing floats in (0, T], for ``loss="mse"``.
    targets : path to the (m, n, S) observed states (.npy), for ``loss="mse"``.

    Nothing is read until :meth:`validate` or a ``load_*`` method is called; ``validate`` reads
    only headers (and the S labels), never the whole of ``F``.
    """

    def __init__(self, A0: str | os.PathLike, F: str | os.PathLike,
                 labels: str | os.PathLike | None = None, T: float = 2.0, beta: float = 10.0,
                 x0: str | os.PathLike | None = None, *, loss: str | None = None,
                 obs_times=None, targets: str | os.PathLike | None = None):
        self.A0 = _path(A0, "A0")
        self.F = _path(F, "F")
        self.x0 = None if x0 is None else _path(x0, "x0")
        self.T = finite_real(T, "T")
        if self.T <= 0:
            raise ValueError(f"T must be > 0, got {self.T}")
        self.beta = finite_real(beta, "beta")
        self.loss = loss
        self.labels = self.targets = self.obs_times = None
        if loss is None:
            if labels is None:
                raise ValueError("labels are required for the classification loss (or pass "
                                 "loss='mse' with obs_times and targets)")
            self.labels = _path(labels, "labels")
        elif loss == "mse":
            if labels is not None or targets is None or obs_times is None:
                raise ValueError("loss='mse' needs obs_times and targets, and no labels")
            self.targets = _path(targets, "targets", (".npy",))
            self.obs_times = _times(obs_times, self.T)
        else:
            raise ValueError(f"loss must be None (classification) or 'mse', got {loss!r}")
        self._shape: tuple[int, int] | None = None
        self._preflight: tuple[tuple, dict] | None = None  # (files' stat, fingerprint)

    # ---- validation ------------------------------------------------------------------------

    def validate(self) -> ProblemFiles:
        """Check that the files exist and their shapes agree, reading headers only.

        Raises FileNotFoundError (missing file), ValueError (wrong suffix, shape mismatch, labels
        out of range) or TypeError (wrong dtype), naming the argument. Returns ``self``.
        """
        self.check_exist()
        F = _open_columns(self.F, "F")
        if F.ndim != 2 or F.shape[0] < 1 or F.shape[1] < 1:
            raise ValueError(f"F must be a non-empty 2-D (n, S) array, got shape {F.shape}")
        if F.dtype.kind not in "fiu":
            raise TypeError(f"F must be a real numeric array, got dtype {F.dtype}")
        n, S = F.shape
        a0_shape = _operator_shape(self.A0)
        if a0_shape != (n, n):
            raise ValueError(f"A0 has shape {a0_shape} but F has shape {F.shape}: "
                             f"A0 must be (n, n) = ({n}, {n})")
        if self.loss == "mse":
            self._validate_targets(n, S)
        else:
            self._validate_labels(n, S)
        if self.x0 is not None:
            x0 = _open_columns(self.x0, "x0")
            if x0.shape != (n, S):
                raise ValueError(f"x0 must have shape (n, S) = ({n}, {S}) to match F, "
                                 f"got {x0.shape}")
        self._shape = (n, S)
        return self

    def _validate_targets(self, n: int, S: int) -> None:
        targets = _open_npy(self.targets, "targets")
        want = (len(self.obs_times), n, S)
        if targets.shape != want:
            raise ValueError(f"targets must have shape (m, n, S) = {want} (m = the "
                             f"{len(self.obs_times)} obs_times), got {targets.shape}")
        if targets.dtype.kind not in "fiu":
            raise TypeError(f"targets must be a real numeric array, got dtype {targets.dtype}")

    def _validate_labels(self, n: int, S: int) -> None:
        labels = _read_all(self.labels, "labels")
        if labels.ndim != 1 or labels.shape[0] != S:
            raise ValueError(f"labels must have shape (S,) = ({S},) to match F, "
                             f"got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"labels must lie in [0, n) = [0, {n}), "
                             f"got [{labels.min()}, {labels.max()}]")

    def preflight(self) -> dict:
        """``validate``, then read every value once in chunks of ~32 MB: ValueError naming the
        file and the first bad index if one is NaN or inf, TypeError if A0 is complex or not
        numeric. Returns the fingerprint ``{name: {"shape", "dtype", "blake2b"}}`` of A0, F,
        labels or targets (and x0); the result is kept while the files' sizes and mtimes do not
        change.
        """
        self.validate()
        stat = self._stat()
        if self._preflight is not None and self._preflight[0] == stat:
            return self._preflight[1]
        prints = {"A0": _scan_operator(self.A0)}
        for name in ("F", "labels", "x0"):
            path = getattr(self, name)
            if path is not None:
                prints[name] = array_fingerprint(_open_columns(path, name), name, path)
        if self.targets is not None:
            prints["targets"] = array_fingerprint(_open_npy(self.targets, "targets"), "targets",
                                                  self.targets)
            prints["obs_times"] = list(self.obs_times)
        self._preflight = (stat, prints)
        return prints

    def _stat(self) -> tuple:
        paths = [p for p in (self.A0, self.F, self.labels, self.x0, self.targets) if p is not None]
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)

    def check_exist(self) -> ProblemFiles:
        """FileNotFoundError naming the first argument whose file (or .zarr folder) is missing."""
        for name in ("A0", "F", "labels", "x0", "targets"):
            path = getattr(self, name)
            found = path is None or (path.is_dir() if path.suffix.lower() == ".zarr"
                                     else path.is_file())
            if not found:
                raise FileNotFoundError(f"{name}: no such file: {path}")
        return self

    @property
    def n(self) -> int:
        """State dimension (rows of F); validates on first use."""
        return self._validated_shape()[0]

    @property
    def S(self) -> int:
        """Number of columns of F; validates on first use."""
        return self._validated_shape()[1]

    n_columns = S

    def _validated_shape(self) -> tuple[int, int]:
        if self._shape is None:
            self.validate()
        return self._shape

    # ---- loading ---------------------------------------------------------------------------

    def load_operator(self):
        """A0 as a NumPy array (.npy, dense .mtx) or a SciPy CSR matrix (.npz, sparse .mtx)."""
        return _load_operator(self.A0)

    def load_columns(self, columns) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Host copies of F[:, columns], labels[columns], x0[:, columns] (x0 may be None).

        ``columns``: 1-D ints, or a ``slice``. F and x0 are memory-mapped (.npy) or read by
        chunks (.zarr), so only the selected columns are read.
        """
        cols = columns if isinstance(columns, slice) else np.asarray(columns, dtype=np.int64)
        F = _columns(_open_columns(self.F, "F"), cols)
        labels = None if self.labels is None else np.asarray(_read_all(self.labels,
                                                                       "labels")[cols])
        x0 = None if self.x0 is None else _columns(_open_columns(self.x0, "x0"), cols)
        return F, labels, x0

    def load_shard(self, columns, A0=None):
        """A ``Problem`` holding only ``columns`` (global ids, or a slice) of this problem.

        ``A0``: an operator already loaded (shared between shards of one process); read from
        its file when None.
        """
        F, labels, x0 = self.load_columns(columns)
        A0 = self.load_operator() if A0 is None else A0
        if self.loss == "mse":
            cols = columns if isinstance(columns, slice) else np.asarray(columns, dtype=np.int64)
            targets = np.array(_open_npy(self.targets, "targets")[:, :, cols])
            return Problem(A0, F, T=self.T, beta=self.beta, x0=x0, loss="mse",
                           obs_times=self.obs_times, targets=targets)
        return Problem(A0, F, labels, T=self.T, beta=self.beta, x0=x0)

    def operator_token(self) -> tuple:
        """Identifies A0's file contents for per-process caching (path, size, mtime)."""
        stat = self.A0.stat()
        return ("file", str(self.A0), stat.st_size, stat.st_mtime_ns)

    def __repr__(self) -> str:
        x0 = "" if self.x0 is None else f", x0={str(self.x0)!r}"
        what = (f"labels={str(self.labels)!r}" if self.loss is None else
                f"loss='mse', obs_times={list(self.obs_times)}, targets={str(self.targets)!r}")
        return (f"ProblemFiles(A0={str(self.A0)!r}, F={str(self.F)!r}, "
                f"{what}, T={self.T}, beta={self.beta}{x0})")


def _times(obs_times, T: float) -> tuple[float, ...]:
    """Observation times: a non-empty increasing sequence of floats in (0, T]."""
    try:
        times = np.asarray(obs_times, dtype=float).ravel()
    except (TypeError, ValueError):
        raise TypeError(f"obs_times must be a sequence of numbers, got {obs_times!r}") from None
    if times.size == 0 or not np.isfinite(times).all() or times[0] <= 0 or times[-1] > T \
            or np.any(np.diff(times) <= 0):
        raise ValueError(f"obs_times must increase strictly within (0, T] = (0, {T}], "
                         f"got {obs_times!r}")
    return tuple(float(t) for t in times)


def _load_operator(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        try:
            return sp.load_npz(path).tocsr()
        except (ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"A0: {path} is not a scipy.sparse.save_npz file ({err})") from None
    A = scipy.io.mmread(path)
    return sp.csr_matrix(A) if sp.issparse(A) else np.asarray(A)


def _path(value, name: str, allowed=None) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    path = Path(value).expanduser().absolute()
    allowed = allowed or (_A0_SUFFIXES if name == "A0" else _COLUMN_SUFFIXES)
    if path.suffix.lower() not in allowed:
        raise ValueError(f"{name}: {path} must end in {' / '.join(allowed)}")
    return path


def _open_npy(path: Path, name: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{name}: {path} is not a readable .npy array ({err})") from None


def _open_zarr(path: Path, name: str):
    try:
        import zarr  # optional: pip install 'diagode-dist[zarr]'
    except ImportError:
        raise ImportError(f"{name}: reading {path} needs zarr: pip install "
                          f"'diagode-dist[zarr]'") from None
    try:
        return zarr.open_array(str(path), mode="r")
    except Exception as err:  # zarr raises its own errors for a folder that is not an array
        raise ValueError(f"{name}: {path} is not a readable zarr array ({err})") from None


def _open_columns(path: Path, name: str):
    """A lazily read 2-D (or 1-D) array: a memory map (.npy) or a zarr array (.zarr)."""
    return _open_zarr(path, name) if path.suffix.lower() == ".zarr" else _open_npy(path, name)


def _read_all(path: Path, name: str) -> np.ndarray:
    if path.suffix.lower() == ".zarr":
        return np.asarray(_open_zarr(path, name)[...])
    return np.load(path, allow_pickle=False)


def _columns(array, cols) -> np.ndarray:
    """Host copy of array[:, cols] (cols a slice or int indices), reading only those columns."""
    if isinstance(cols, slice) or isinstance(array, np.ndarray):
        return np.array(array[:, cols])
    return np.asarray(array.get_orthogonal_selection((slice(None), cols)))


def _operator_shape(path: Path) -> tuple[int, ...]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return tuple(_open_npy(path, "A0").shape)
    if suffix == ".npz":  # save_npz stores the shape as its own small member
        try:
            with np.load(path, allow_pickle=False) as members:
                return tuple(int(s) for s in members["shape"])
        except (KeyError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"A0: {path} is not a scipy.sparse.save_npz file ({err})") from None
    try:
        rows, cols = scipy.io.mminfo(path)[:2]
    except Exception as err:  # scipy raises ValueError or its own parse errors
        raise ValueError(f"A0: {path} is not a Matrix Market file ({err})") from None
    return (int(rows), int(cols))


# ---- pre-flight: every value read once, in chunks ------------------------------------------

def array_fingerprint(array, name: str, where=None) -> dict:
    """{"shape", "dtype", "blake2b"} of a NumPy, memory-mapped or zarr array, read in chunks
    along its last axis (columns) of ~32 MB.

    ValueError naming ``name`` (and the file ``where``) and the first (row, column) index of a
    NaN or inf; TypeError for a complex or non-numeric dtype.
    """
    dtype = np.dtype(array.dtype)
    label = name if where is None else f"{name}: {where}"
    if dtype.kind not in "fiub":
        raise TypeError(f"{label} must hold real numbers, got dtype {dtype}")
    shape = tuple(int(s) for s in array.shape)
    digest = hashlib.blake2b(repr((shape, dtype.str)).encode(), digest_size=16)
    if len(shape) == 0 or 0 in shape:
        return {"shape": list(shape), "dtype": dtype.str, "blake2b": digest.hexdigest()}
    rows = int(np.prod(shape[:-1]))
    width = max(1, _SCAN_BYTES // max(1, rows * dtype.itemsize))
    for lo in range(0, shape[-1], width):
        block = np.ascontiguousarray(np.asarray(array[..., lo:lo + width]))
        if dtype.kind == "f":
            bad = ~np.isfinite(block)
            if bad.any():
                index = np.unravel_index(int(np.argmax(bad)), block.shape)
                first = (*index[:-1], index[-1] + lo)
                raise ValueError(f"{label} has a NaN or inf at index "
                                 f"{tuple(int(i) for i in first)}")
        digest.update(block.data)
    return {"shape": list(shape), "dtype": dtype.str, "blake2b": digest.hexdigest()}


def operator_fingerprint(A0, where=None) -> dict:
    """``array_fingerprint`` of a dense A0, or of a SciPy sparse A0's (data, indices, indptr)."""
    if not sp.issparse(A0):
        return array_fingerprint(A0, "A0", where)
    csr = sp.csr_matrix(A0)
    csr.sort_indices()  # one content, one hash, however the entries were ordered
    label = "A0" if where is None else f"A0: {where}"
    if csr.dtype.kind not in "fiub":
        raise TypeError(f"{label} must hold real numbers, got dtype {csr.dtype}")
    bad = np.flatnonzero(~np.isfinite(csr.data)) if csr.dtype.kind == "f" else ()
    if len(bad):
        row = int(np.searchsorted(csr.indptr, bad[0], side="right") - 1)
        raise ValueError(f"{label} has a NaN or inf at index ({row}, {int(csr.indices[bad[0]])})")
    parts = {name: array_fingerprint(getattr(csr, name), f"A0 {name}", where)["blake2b"]
             for name in ("data", "indices", "indptr")}
    digest = hashlib.blake2b(repr(sorted(parts.items())).encode(), digest_size=16)
    return {"shape": list(csr.shape), "dtype": csr.dtype.str, "sparse": True,
            "blake2b": digest.hexdigest()}


def _scan_operator(path: Path) -> dict:
    if path.suffix.lower() == ".npy":
        return array_fingerprint(_open_npy(path, "A0"), "A0", path)  # memory-mapped
    return operator_fingerprint(_load_operator(path), path)
