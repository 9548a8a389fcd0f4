"""Exponentials of a shift-and-invert projected operator from the eigendecomposition of H.

A shift-and-invert space holds H_m, the Hessenberg of S = (I - gamma (A - mu I))^{-1}, and the
projected operator is A_m = mu I + (I - H_m^{-1}) / gamma. Formed as a matrix, A_m has entries
of the size of ||A|| (its stiff Ritz values), so scaling and squaring exp(tau A_m) takes about
log2(tau ||A_m|| / 5.4) squarings, each of which doubles the relative rounding of the modes that
matter -- the slow ones: about eps tau ||A|| / 5 of the answer (Higham 2005's backward error
eps ||tau A_m||; measured: noise 2e-13 .. 7e-13 relative on exp(T A_m) e1 for a 64 x 64
diffusion grid at ||TA|| = 5000, so that lag-2 differences stagnate there, above rtol = 1e-12).

The eigenvalues theta of H, on the other hand, lie in the unit disc, and the slow modes are the
ones near the pole, theta ~ 1; lambda = mu + (1 - 1/theta) / gamma maps an error delta of theta
to delta / (gamma |theta|^2), so exp(tau A_m) = P exp(tau Lambda) P^{-1}, with P and theta
computed from H, loses only about eps cond(P) (1 + tau / gamma) on those modes (measured on the
same grid: lag-2 differences down to 1e-14 and answers consistent to 1e-14 from dimension 22
to 60). The stiff modes (theta small) get larger eigenvalue errors, exactly as they do in the
formed A_m, where they sit in H^{-1}; their contribution to the exponential is small whenever
tau |lambda| is large, and the rounding charged here (``_eigen_rounding``) counts it.

The decomposition is used for a column where H restricted to its dimension is diagonalizable
with cond(P) <= ``COND_LIMIT``; elsewhere (a zero start, a nearly defective H) the formed A_m
and Padé scaling and squaring (``expm``) serve as before. Eigendecompositions run on the host
(NumPy; c matrices of dimension <= k, a few kB) and their factors move to the arrays' module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._array import array_module, to_numpy
from .expm import THETA13, expm_batched

COND_LIMIT = 1e4
"""Largest 2-norm condition number of the eigenvector matrix P for which the decomposition
is used."""
EIGEN_FROM = 256.0
"""The decomposition serves a step only where tau ||A_m||_1 >= EIGEN_FROM (at least 5
squarings, whose rounding grows as tau ||A_m||_1 / 5.4 eps): on shorter steps scaling and
squaring is as accurate and has no eigenvalue errors to charge (measured: in float32 a 1-D
Laplacian's forward steps of 1e-8 T were refused on the decomposition's rounding)."""
_PHI_SERIES = 18
"""Taylor terms of phi1(z) = (e^z - 1) / z for |z| < 1/2 (the last one below eps / 1e5)."""


@dataclass
class Spectral:
    """Projected operators of c columns, each as a matrix and, where ``ok``, its eigensystem.

    matrix : (c, m, m) real, A_m (zero beyond each column's dimension)
    values : (c, m) complex, eigenvalues lambda_i of A_m (0 beyond the column's dimension)
    vectors, inverse : (c, m, m) complex, P and P^{-1} (identity beyond the dimension)
    theta : (c, m) complex, the eigenvalues of H they come from (1 beyond the dimension)
    kappa : (c, m) real, each eigenvalue's condition number ||P e_i|| ||e_i^T P^{-1}||
        (0 beyond the dimension)
    norm : (c,) host, ||H||_F
    size : (c,) host, ||A_m||_1
    cond : (c,) host, cond(P) (inf where the decomposition is not used)
    ok : (c,) host bools, where the decomposition is used
    gamma : the shift-and-invert parameter
    """

    matrix: object
    values: object
    vectors: object
    inverse: object
    theta: object
    kappa: object
    norm: np.ndarray
    size: np.ndarray
    cond: np.ndarray
    ok: np.ndarray
    gamma: float

    def __getitem__(self, rows) -> Spectral:
        host = to_numpy(rows)
        return Spectral(self.matrix[rows], self.values[rows], self.vectors[rows],
                        self.inverse[rows], self.theta[rows], self.kappa[rows],
                        self.norm[host], self.size[host], self.cond[host], self.ok[host],
                        self.gamma)

    @property
    def shape(self):
        return self.matrix.shape

    @property
    def dtype(self):
        return self.matrix.dtype


def decompose(square, dims, matrix, gamma: float, shift: float) -> Spectral:
    """The Spectral form of shift-and-invert Hessenbergs square (c, m, m) with dimensions dims
    (c,) host, whose formed operators are ``matrix`` (c, m, m); the pole is 1/gamma + shift."""
    xp = array_module(square)
    H = to_numpy(square)
    c, m, _ = H.shape
    dims = np.asarray(dims)
    cplx = np.result_type(H.dtype, np.complex64)
    theta = np.ones((c, m), dtype=cplx)
    vectors = np.broadcast_to(np.eye(m, dtype=cplx), (c, m, m)).copy()
    inverse = vectors.copy()
    cond = np.full(c, np.inf)
    for d in np.unique(dims[dims >= 1]):  # a loop over distinct dimensions, not over columns
        at = np.nonzero(dims == d)[0]
        block = H[at, :d, :d]
        usable = np.isfinite(block).all(axis=(1, 2)) & (np.abs(block[:, :, 0]).sum(axis=1) > 0)
        if not usable.any():  # a zero start projects to H = 0: A_m = 0, from the matrix
            continue
        at, block = at[usable], block[usable]
        with np.errstate(all="ignore"):
            try:
                values, P = np.linalg.eig(block)
                kappa = np.linalg.cond(P)
                good = np.isfinite(kappa) & (kappa <= COND_LIMIT) & (np.abs(values) > 0).all(1)
                Pinv = np.linalg.inv(np.where(good[:, None, None], P, np.eye(d, dtype=P.dtype)))
            except np.linalg.LinAlgError:
                continue
        sel = at[good]
        theta[sel, :d], vectors[sel, :d, :d] = values[good], P[good]
        inverse[sel, :d, :d], cond[sel] = Pinv[good], kappa[good]
    ok = np.isfinite(cond)
    inside = np.arange(m)[None, :] < dims[:, None]
    kappa = np.where(inside & ok[:, None], np.linalg.norm(vectors, axis=1)
                     * np.linalg.norm(inverse, axis=2), 0.0)
    with np.errstate(invalid="ignore"):
        norm = np.linalg.norm(np.where(np.isfinite(H), H, 0.0), axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(inside & ok[:, None], shift + (1.0 - 1.0 / theta) / gamma, 0.0)
    return Spectral(matrix, xp.asarray(values.astype(cplx)), xp.asarray(vectors),
                    xp.asarray(inverse), xp.asarray(theta), xp.asarray(kappa.astype(H.dtype)),
                    norm, _norm1(matrix), cond, ok, float(gamma))


def _norm1(matrix) -> np.ndarray:
    """||A||_1 of each matrix of a stack (c, m, m), host (c,) (inf where not finite)."""
    xp = array_module(matrix)
    with np.errstate(invalid="ignore"):
        size = to_numpy(xp.abs(matrix).sum(axis=1).max(axis=1)).astype(float)
    return np.where(np.isfinite(size), size, np.inf)


def matrix_of(operator):
    """The formed operator (c, m, m) of a Spectral, or the array itself."""
    return operator.matrix if isinstance(operator, Spectral) else operator


def phi1(z):
    """(e^z - 1) / z elementwise for complex z with Re z <= 0 (1 at z = 0), to eps relative."""
    xp = array_module(z)
    small = xp.abs(z) < 0.5
    near = xp.where(small, z, 0.0)
    series = xp.ones_like(z)
    term = xp.ones_like(z)
    for j in range(2, _PHI_SERIES + 2):
        term = term * near / j
        series = series + term
    far = xp.where(small, 1.0, z)
    with np.errstate(over="ignore", invalid="ignore"):
        return xp.where(small, series, (xp.exp(far) - 1.0) / far)


def _candidates(operator, taus) -> np.ndarray:
    """(c, J) host bools: where the eigensystem may serve exp(tau_j A) (tau ||A_m||_1 >=
    EIGEN_FROM and the decomposition usable)."""
    if not isinstance(operator, Spectral):
        return np.zeros(np.shape(taus), dtype=bool)
    return operator.ok[:, None] & (np.asarray(taus) * operator.size[:, None] >= EIGEN_FROM)


def _squaring_rounding(size, taus, eps):
    """Relative rounding (c, J) of exp(tau_j A) by scaling and squaring, ||A||_1 = size (c,):
    each of its log2(tau ||A||_1 / theta_13) squarings doubles it."""
    return eps * np.maximum(np.asarray(taus) * size[:, None] / THETA13, 1.0)


def exp_apply(operator, taus, start):
    """exp(tau_j A) start for every step: operator (c, m, m) array or Spectral, taus (c, J)
    host, start (c, m) -> (c, J, m) real; NaN where the operator or the result is not finite.
    """
    return exp_and_rounding(operator, taus, start)[0]


def exp_and_rounding(operator, taus, start):
    """``exp_apply`` and its absolute rounding (c, J) host beyond the 2 eps floor of a
    well-scaled product. From the eigensystem where it is usable, the step long
    (tau ||A_m||_1 >= EIGEN_FROM) and its charged rounding (``_eigen_rounding``) below that of
    scaling and squaring, eps tau ||A_m||_1 / theta_13 (measured on random non-normal H with
    cond(P) ~ 25: the eigensystem lost 5e-13 where the matrix lost 1e-13; its charge said
    5e-11). Elsewhere by scaling and squaring, charged 0 (its rounding shows in the lag-2
    difference of two such exponentials, as it always has)."""
    A = matrix_of(operator)
    xp = array_module(A)
    taus = to_numpy(taus).astype(float)
    c, m = start.shape
    y = xp.empty((c, taus.shape[1], m), dtype=xp.result_type(A.dtype, start.dtype))
    rounding = np.zeros(taus.shape)
    better = np.zeros(taus.shape, dtype=bool)
    candidates = _candidates(operator, taus)
    if candidates.any():
        host = np.nonzero(candidates.any(axis=1))[0]
        at = xp.asarray(host)
        sub = operator[at]
        y[at] = _exp_apply_spectral(sub, taus[host], start[at])
        charge = _eigen_rounding(sub, taus[host], start[at])
        eps = float(np.finfo(A.dtype).eps)
        with np.errstate(invalid="ignore"):
            size = to_numpy(xp.linalg.norm(y[at], axis=2)).astype(float)
            better[host] = candidates[host] & (
                charge < _squaring_rounding(sub.size, taus[host], eps) * size)
        rounding[host] = np.where(better[host], charge, 0.0)
    rest = np.nonzero(~better.all(axis=1))[0]  # scaling and squaring only where it serves
    if rest.size:
        at = xp.asarray(rest)
        matrix = _exp_apply_matrix(A[at], taus[rest], start[at])
        y[at] = xp.where(xp.asarray(better[rest])[:, :, None], y[at], matrix)
    return y, rounding


def _exp_apply_matrix(A, taus, start):
    xp = array_module(A)
    scaled = xp.asarray(taus, dtype=A.dtype)[:, :, None, None] * A[:, None]
    finite = xp.isfinite(A).all(axis=(1, 2))
    with np.errstate(over="ignore", invalid="ignore"):
        E = expm_batched(xp.where(finite[:, None, None, None], scaled, 0.0))
        y = (E @ start[:, None, :, None])[..., 0]
    return xp.where(finite[:, None, None], y, xp.nan)


def _exp_apply_spectral(op: Spectral, taus, start):
    xp = array_module(op.values)
    coef = (op.inverse @ start.astype(op.values.dtype)[:, :, None])[..., 0]  # (c, m)
    steps = xp.asarray(taus, dtype=op.values.real.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        growth = xp.exp(steps[:, :, None] * op.values[:, None, :])  # (c, J, m)
        y = (op.vectors[:, None] @ (growth * coef[:, None, :])[..., None])[..., 0]
    return y.real.astype(start.dtype)


def _eigen_rounding(operator: Spectral, taus, start):
    """Absolute rounding (c, J) host of exp(tau_j A) start from the eigensystem, beyond the
    2 eps floor of a well-scaled product (operator.ok everywhere). Each mode's own share:
    its eigenvalue theta_i is exact for H + E with ||E|| <= eps ||H||, off by up to
    eps kappa_i ||H||, which moves lambda_i by that / (gamma |theta_i|^2) and the mode's size
    |c_i e^(tau lambda_i)| ||x_i|| by tau times as much; and 2 eps kappa_i for its combination;
    the coefficients c = P^{-1} start are off by about eps kappa_i ||start||, which the most
    amplified mode magnifies. The cross terms of the first-order expansion (an eigenvalue
    error of one mode feeding another) are left to the lag-2 difference, which compares two
    independently rounded decompositions: bounded with absolute values they overestimated
    80-fold against random eps-perturbations of H (5e-15 measured, 4e-13 bounded, on the
    64 x 64 grid at ||TA|| = 5000)."""
    xp = array_module(operator.values)
    eps = float(np.finfo(operator.dtype).eps)
    steps = xp.asarray(to_numpy(taus), dtype=operator.kappa.dtype)  # (c, J)
    coef = (operator.inverse @ start.astype(operator.values.dtype)[:, :, None])[..., 0]
    weights = operator.kappa * xp.abs(coef) * xp.linalg.norm(operator.vectors, axis=1)
    norm = xp.asarray(operator.norm, dtype=steps.dtype)[:, None, None]
    start_norm = xp.linalg.norm(start, axis=1)[:, None]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        size = xp.abs(xp.exp(steps[:, :, None] * operator.values[:, None, :]))  # (c, J, m)
        slope = norm / (operator.gamma * xp.abs(operator.theta[:, None, :]) ** 2)
        modes = (weights[:, None, :] * size * (steps[:, :, None] * slope + 2.0)).sum(axis=2)
        coefficients = 2.0 * start_norm * (operator.kappa[:, None, :] * size).max(axis=2)
    return eps * to_numpy(modes + coefficients).astype(float)


def divided_difference(g, h, tau):
    """D_ij = int_0^tau e^{(tau - s) g_i} e^{s h_j} ds = (e^{tau g_i} - e^{tau h_j}) / (g_i - h_j)
    (tau e^{tau g_i} where equal) for g (c, p), h (c, q) complex, tau (c,) -> (c, p, q): the
    larger real part outside phi1, so that phi1's argument has Re <= 0."""
    xp = array_module(g)
    t = tau[:, None, None]
    a, b = t * g[:, :, None], t * h[:, None, :]
    outer = xp.where(a.real >= b.real, a, b)
    inner = xp.where(a.real >= b.real, b, a)
    with np.errstate(over="ignore", invalid="ignore"):
        return t * xp.exp(outer) * phi1(inner - outer)


def van_loan_choice(G, H, sigma, y_start, z_start=None):
    """Where the eigensystems compute a step's Van Loan integral, (c,) host bools, and their
    relative rounding there (c,) host (NaN elsewhere): both usable, the step long, and the
    charge below the block exponential's, 0.1 eps sigma max(||G||_1, ||H||_1)
    (``_march._van_loan_rounding``). The integral reads the adjoint and forward states along
    the step, so their relative roundings at its end add, plus eps m for the combination.
    sigma (c,) host; y_start (c, mf), z_start (c, ma) or None (e1)."""
    c = np.shape(sigma)[0]
    charge = np.full(c, math.nan)
    if not (isinstance(G, Spectral) and isinstance(H, Spectral)):
        return np.zeros(c, dtype=bool), charge
    size = np.maximum(G.size, H.size)
    candidates = G.ok & H.ok & (np.asarray(sigma) * size >= EIGEN_FROM)
    if not candidates.any():
        return candidates, charge
    xp = array_module(y_start)
    host = np.nonzero(candidates)[0]
    at = xp.asarray(host)
    eps = float(np.finfo(G.dtype).eps)
    z = xp.zeros(G.shape[:2], dtype=y_start.dtype) if z_start is None else z_start
    if z_start is None:
        z[:, 0] = 1.0
    taus = np.asarray(sigma, dtype=float)[host, None]
    charge[host] = eps * max(G.shape[-1], H.shape[-1])
    for op, start in ((G[at], z[at]), (H[at], y_start[at])):
        end = _exp_apply_spectral(op, taus, start)[:, 0]
        norm = xp.maximum(xp.linalg.norm(end, axis=1), xp.linalg.norm(start, axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            charge[host] += _eigen_rounding(op, taus, start)[:, 0] / to_numpy(norm)
    better = candidates & (charge < 0.1 * eps * np.asarray(sigma) * size)
    return better, np.where(better, charge, math.nan)


def van_loan_eigen(G: Spectral, H: Spectral, tau, y_start, z_start=None):
    """``time_integral.van_loan`` from the eigensystems (all columns usable):
    M = P_G [(a b^T) o D] P_H^T, a = P_G^{-1} z, b = P_H^{-1} y,
    D_ij = int_0^tau e^{(tau - s) g_i} e^{s h_j} ds (``divided_difference``)."""
    cplx = G.values.dtype
    if z_start is None:
        a = G.inverse[:, :, 0]
    else:
        a = (G.inverse @ z_start.astype(cplx)[:, :, None])[..., 0]
    b = (H.inverse @ y_start.astype(cplx)[:, :, None])[..., 0]
    t = array_module(y_start).asarray(tau, dtype=G.values.real.dtype)
    D = divided_difference(G.values, H.values, t)
    with np.errstate(over="ignore", invalid="ignore"):
        M = G.vectors @ ((a[:, :, None] * b[:, None, :]) * D) @ H.vectors.transpose(0, 2, 1)
    return M.real.astype(y_start.dtype)


