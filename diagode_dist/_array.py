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


def row_product(A, width: int):
    """``product(v)`` = rows of A x for rows v = [x, rest] (c, width), x = v[:, :n]: A (n, n)
    dense or sparse, width >= n. Returns (c, n).

    A sparse CSR A is widened once to (n, width) by zero columns that share its arrays, so the
    product takes v.T, an F-ordered view of contiguous rows, as it lies: cupyx hands a dense
    operand to cuSPARSE through ``asfortranarray``, which copied the strided x.T (c n per
    product, as much memory traffic as the product itself). A dense A takes x.T where it lies
    (BLAS reads it with a leading dimension; a copy on CuPy is c n next to its c n^2 product).
    """
    n = A.shape[1]
    if is_sparse(A) and getattr(A, "format", None) == "csr" and width > n:
        wide = type(A)((A.data, A.indices, A.indptr), shape=(A.shape[0], width), copy=False)

        def product(v):
            return (wide @ v.T).T
    else:
        def product(v):
            return (A @ v[:, :n].T).T
    return product


def solve_stack(a, b):
    """x with a[i] x[i] = b[i] for a stack: a (c, s, s), b (c, s, r) -> (c, s, r), any s.

    One batched LU on either backend: CuPy's ``linalg.solve`` loops over the stack on the host
    (one cuSOLVER call and sync per matrix) above s = 256, its batched LU's default limit,
    which the Padé solves reach at Krylov dimensions above 255 (Van Loan blocks above 127).
    """
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy_batched_solve(a, b)
    return np.linalg.solve(a, b)


def _cupy_batched_solve(a, b):  # pragma: no cover - GPU only
    from cupy.cublas import batched_gesv

    _quiet_gesv_limit()
    return batched_gesv(a, b)


def _quiet_gesv_limit():  # pragma: no cover - GPU only
    """CuPy's batched LU warns above its default size (a note on speed, not on results): it is
    used on purpose there, so that one message is filtered, once per process."""
    global _GESV_QUIET
    if not _GESV_QUIET:
        import warnings

        warnings.filterwarnings("ignore", message=r"The matrix size \(\d+\) exceeds the set "
                                r"limit", category=UserWarning)
        _GESV_QUIET = True


_GESV_QUIET = False


def basis_dot(basis, w):
    """Coefficients <v_l, w_i> per column: basis (m, c, N'), w (c, N') -> (c, m).

    ``basis`` may be a slice of a larger (K, c, N) basis (``basis[a:b]`` or ``[..., :N']``):
    row l of column i sits at a fixed stride, so no copy of it is needed. NumPy's matmul
    multiplies the transposed view in place (BLAS with a leading dimension); CuPy's matmul would
    first copy any non-contiguous operand of ndim > 2 (a copy of the whole basis per call, m c N
    more memory), so on CuPy one strided-batched GEMM reads the basis where it lies.
    """
    if _cupy is not None and isinstance(basis, _cupy.ndarray) and _strided_ok(basis):
        return _cublas_basis_product(basis, w, transpose=True)
    return (basis.transpose(1, 0, 2) @ w[:, :, None])[:, :, 0]


def basis_combine(basis, coeffs):
    """Combinations of the basis vectors per column: basis (m, c, N'), coeffs (c, m) ->
    (c, N') (sum_l coeffs[i, l] v_l[i]), or coeffs (c, r, m) -> (c, r, N') (r combinations).

    Same layouts and the same reason as ``basis_dot``."""
    rows = coeffs if coeffs.ndim == 3 else coeffs[:, None, :]
    if _cupy is not None and isinstance(basis, _cupy.ndarray) and _strided_ok(basis):
        out = _cublas_basis_product(basis, rows, transpose=False)
    else:
        out = rows @ basis.transpose(1, 0, 2)
    return out if coeffs.ndim == 3 else out[:, 0, :]


def _strided_ok(basis) -> bool:
    """True when one strided-batched GEMM can read ``basis`` (m, c, N') as it lies: float32/64,
    unit stride along the state, and row/column strides that are whole items."""
    item = basis.dtype.itemsize
    return (basis.dtype.char in "fd" and basis.ndim == 3 and basis.size > 0
            and basis.strides[2] == item and basis.strides[0] % item == 0
            and basis.strides[1] % item == 0 and basis.strides[0] >= basis.shape[2] * item
            and basis.strides[0] // item < 2**31)  # cuBLAS's int leading dimension


def gemm_plan(basis_shape, basis_strides, itemsize, transpose, r=1):
    """Arguments of a column-major strided-batched GEMM (cuBLAS) for ``basis_dot``
    (``transpose``) or ``basis_combine`` (r combinations), one batch entry per column.

    Column i's basis is read as the column-major N' x m matrix X_i (X_i[n, l] = v_l[i, n]):
    leading dimension = the basis's row stride (c N for a (K, c, N) basis), batch stride = its
    column stride (N). ``basis_dot`` computes X_i^T w_i (m x 1); ``basis_combine`` X_i Y_i
    (N' x r) with Y_i the column-major m x r matrix of coeffs[i] (r, m). The other operand
    and the result are contiguous C arrays (c, .) / (c, r, .). Returns a dict of the GEMM's m,
    n, k, trans_a, lda, stride_a, ldb, stride_b, ldc, stride_c and batch (in items); a pure
    function, so its arithmetic is tested without a GPU.
    """
    m_vectors, c, length = basis_shape
    lda, stride_a = basis_strides[0] // itemsize, basis_strides[1] // itemsize
    if transpose:  # (m x N') @ (N' x 1)
        return dict(m=m_vectors, n=1, k=length, trans_a=True, lda=lda, stride_a=stride_a,
                    ldb=length, stride_b=length, ldc=m_vectors, stride_c=m_vectors, batch=c)
    return dict(m=length, n=r, k=m_vectors, trans_a=False, lda=lda, stride_a=stride_a,
                ldb=m_vectors, stride_b=r * m_vectors, ldc=length, stride_c=r * length,
                batch=c)


def _cublas_basis_product(basis, other, transpose):  # pragma: no cover - GPU only
    from cupy_backends.cuda.libs import cublas

    cp = _cupy
    m_vectors, c, length = basis.shape
    other = cp.ascontiguousarray(other, dtype=basis.dtype)  # w (c, N') or coeffs (c, r, m)
    r = 1 if transpose else other.shape[1]
    out = cp.empty((c, m_vectors) if transpose else (c, r, length), dtype=basis.dtype)
    plan = gemm_plan(basis.shape, basis.strides, basis.dtype.itemsize, transpose, r)
    gemm = cublas.dgemmStridedBatched if basis.dtype.char == "d" else cublas.sgemmStridedBatched
    one, zero = np.ones(1, dtype=basis.dtype), np.zeros(1, dtype=basis.dtype)
    handle = cp.cuda.device.get_cublas_handle()
    transposed, plain = 1, 0  # cublasOperation_t: CUBLAS_OP_T, CUBLAS_OP_N
    gemm(handle, transposed if plan["trans_a"] else plain, plain, plan["m"], plan["n"],
         plan["k"], one.ctypes.data, basis.data.ptr, plan["lda"], plan["stride_a"],
         other.data.ptr, plan["ldb"], plan["stride_b"], zero.ctypes.data, out.data.ptr,
         plan["ldc"], plan["stride_c"], plan["batch"])
    return out


def visible_gpus() -> list[str]:
    """PCI bus ids of the CUDA devices this process sees, in CuPy's device order ([] without
    CuPy or a device): two processes name the same GPU alike whatever their
    CUDA_VISIBLE_DEVICES."""
    if _cupy is None:
        return []
    try:
        count = _cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return []
    return [_bus_id(ordinal) for ordinal in range(count)]


def _bus_id(ordinal: int) -> str:
    try:
        return str(_cupy.cuda.Device(ordinal).pci_bus_id)
    except Exception:  # pragma: no cover - an old CuPy or driver
        return f"device-{ordinal}"


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
