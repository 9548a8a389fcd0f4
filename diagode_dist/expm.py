"""Batched exponentials of small dense matrices.

One call exponentiates a whole stack ``(..., s, s)`` on NumPy or CuPy with the same code:
Padé-13 scaling and squaring (Higham 2005), with the scaling chosen per matrix so that a
matrix's result does not depend on which other matrices share the stack.
"""

from __future__ import annotations

import numpy as np

from ._array import array_module, solve_stack, to_numpy

# Padé-13 coefficients b_0..b_13 and the 1-norm bound theta_13 (Higham 2005, Table 2.3).
_B = (
    64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0,
    129060195264000.0, 10559470521600.0, 670442572800.0, 33522128640.0,
    1323241920.0, 40840800.0, 960960.0, 16380.0, 182.0, 1.0,
)
THETA13 = 5.371920351148152


def expm_batched(a):
    """``exp(a[i])`` for every matrix of a stack.

    Parameters
    ----------
    a : array (..., s, s), real float, NumPy or CuPy
        Must be finite.

    Returns
    -------
    array (..., s, s) of the same module and dtype.
    """
    xp = array_module(a)
    shape = a.shape
    s = shape[-1]
    stack = a.reshape(-1, s, s)
    norm1 = xp.abs(stack).sum(axis=-2).max(axis=-1)
    squarings = _squarings(norm1, xp)
    scaled = stack * xp.ldexp(xp.ones_like(norm1), -squarings)[:, None, None]
    result = _pade13(scaled, xp)
    for idx in _squaring_rows(squarings, xp):
        sub = result[idx]
        result[idx] = sub @ sub
    return result.reshape(shape)


def _squaring_rows(squarings, xp):
    """Per squaring i, the (device) indices of the matrices that need it, from one transfer of
    the counts each way (a nonzero() per squaring would stop the host at each): the matrices
    in ascending order of their counts, so those of squaring i are a tail of that order."""
    counts = to_numpy(squarings)
    if not counts.size or counts.max() == 0:
        return []
    order_host = np.argsort(counts, kind="stable")
    order = xp.asarray(order_host)
    sorted_counts = counts[order_host]
    return [order[int(np.searchsorted(sorted_counts, i, side="right")):]
            for i in range(int(counts.max()))]


def _squarings(norm1, xp):
    """Squarings per matrix: the smallest j >= 0 with ||a / 2^j||_1 <= theta_13. A non-finite
    norm gets 0 (its result is NaN anyway) instead of a count that would never end on CUDA."""
    ratio = xp.maximum(norm1 / THETA13, 1.0)
    squarings = xp.ceil(xp.log2(xp.where(xp.isfinite(ratio), ratio, 1.0))).astype(xp.int64)
    return xp.clip(squarings, 0, 1100)


def _pade13(a, xp):
    """[13/13] Padé approximant of exp for a stack with ||a||_1 <= theta_13."""
    b = _B
    eye = xp.broadcast_to(xp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    a2 = a @ a
    a4 = a2 @ a2
    a6 = a4 @ a2
    u = a @ (a6 @ (b[13] * a6 + b[11] * a4 + b[9] * a2) + b[7] * a6 + b[5] * a4 + b[3] * a2
             + b[1] * eye)
    v = a6 @ (b[12] * a6 + b[10] * a4 + b[8] * a2) + b[6] * a6 + b[4] * a4 + b[2] * a2 + b[0] * eye
    return solve_stack(v - u, v + u)


def expm_block_upper(a, b, d):
    """Blocks of ``exp([[a, b], [0, d]])`` for stacks, at half the cost of the full exponential.

    Parameters
    ----------
    a : (c, p, p), b : (c, p, q), d : (c, q, q) real float arrays (NumPy or CuPy)

    Returns
    -------
    (ea, eb): the (c, p, p) and (c, p, q) top blocks of the exponential. Powers, the Padé
    solve and the squarings of a block upper-triangular matrix stay block upper-triangular,
    so every product is done on the three blocks (4 block products instead of 8).
    """
    xp = array_module(a)
    norm1 = xp.maximum(xp.abs(a).sum(axis=-2).max(axis=-1),
                       (xp.abs(b).sum(axis=-2) + xp.abs(d).sum(axis=-2)).max(axis=-1))
    squarings = _squarings(norm1, xp)
    scale = xp.ldexp(xp.ones_like(norm1), -squarings)[:, None, None]
    x = (a * scale, b * scale, d * scale)
    ea, eb, ed = _pade13_block(x, xp)
    for idx in _squaring_rows(squarings, xp):
        sa, sb, sd = _block_mul((ea[idx], eb[idx], ed[idx]), (ea[idx], eb[idx], ed[idx]))
        ea[idx], eb[idx], ed[idx] = sa, sb, sd
    return ea, eb


def _block_mul(x, y):
    """[[xa, xb], [0, xd]] @ [[ya, yb], [0, yd]] on the blocks."""
    return x[0] @ y[0], x[0] @ y[1] + x[1] @ y[2], x[2] @ y[2]


def _block_comb(*terms):
    """Sum of coefficient * block-matrix terms, blockwise."""
    return tuple(sum(coef * m[i] for coef, m in terms) for i in range(3))


def _pade13_block(x, xp):
    """Padé-13 of a block upper-triangular stack (see ``_pade13``), on the blocks."""
    b = _B
    p, q = x[0].shape[-1], x[2].shape[-1]
    eye = (xp.broadcast_to(xp.eye(p, dtype=x[0].dtype), x[0].shape), xp.zeros_like(x[1]),
           xp.broadcast_to(xp.eye(q, dtype=x[2].dtype), x[2].shape))
    x2 = _block_mul(x, x)
    x4 = _block_mul(x2, x2)
    x6 = _block_mul(x4, x2)
    inner_u = _block_mul(x6, _block_comb((b[13], x6), (b[11], x4), (b[9], x2)))
    u = _block_mul(x, _block_comb((1.0, inner_u), (b[7], x6), (b[5], x4), (b[3], x2),
                                  (b[1], eye)))
    inner_v = _block_mul(x6, _block_comb((b[12], x6), (b[10], x4), (b[8], x2)))
    v = _block_comb((1.0, inner_v), (b[6], x6), (b[4], x4), (b[2], x2), (b[0], eye))
    lhs = _block_comb((1.0, v), (-1.0, u))
    rhs = _block_comb((1.0, v), (1.0, u))
    ed = solve_stack(lhs[2], rhs[2])
    ea = solve_stack(lhs[0], rhs[0])
    eb = solve_stack(lhs[0], rhs[1] - lhs[1] @ ed)
    return ea, eb, ed
