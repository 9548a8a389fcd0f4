"""Array-module plumbing: one numerics code path over NumPy or CuPy.

Nothing here computes; it only answers "which module holds this array" and moves data.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as _sp

try:  # CuPy is optional (the ``gpu`` extra)
    import cupy as _cupy
    import cupyx.scipy.sparse as _cusp
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None
    _cusp = None


def array_module(x):
    """Return ``numpy`` or ``cupy``, whichever module holds ``x`` (dense or sparse)."""
    if _cupy is not None:
        if _cusp is not None and _cusp.issparse(x):
            return _cupy
        if isinstance(x, _cupy.ndarray):
            return _cupy
    return np


def is_sparse(x) -> bool:
    """True for SciPy or CuPy sparse matrices/arrays."""
    return _sp.issparse(x) or (_cusp is not None and _cusp.issparse(x))


def to_numpy(x):
    """A NumPy copy (or view) of a NumPy/CuPy array."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_module(x, xp):
    """Move a dense array to module ``xp`` (no copy when it is already there)."""
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def sparse_to_module(A, xp):
    """Move a sparse matrix to ``xp``'s sparse CSR format."""
    if xp is np:
        if _cusp is not None and _cusp.issparse(A):
            A = A.get()
        return _sp.csr_matrix(A)
    if _cusp.issparse(A):
        return A.tocsr()
    return _cusp.csr_matrix(_sp.csr_matrix(A))


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
