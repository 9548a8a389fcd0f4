"""Shift-and-invert (rational) Krylov projections for stiff sparse operators.

The space is span{(I - gamma Â)^{-j} u0} (van den Eshof & Hochbruck 2006; Moret & Novati 2004;
Güttel 2013): for sectorial A its convergence does not depend on ||A||, so one space of
dimension 10-20 covers a whole interval where a polynomial space needs sub-steps with
tau ||A|| of order k. Its price is one sparse LU factorization of I - gamma A per call, shared
by every column, every step and (transposed) the adjoint, and batched triangular solves.

Arnoldi is run on S = (I - gamma (Â - mu I))^{-1} (``krylov.arnoldi`` with the solve as the
operator), so S V_m = V_m H_m + h v_{m+1} e_m^T; the projected operator is recovered as

    A_m = mu I + (I - H_m^{-1}) / gamma                           (m x m per column)

The pole 1/gamma + mu must lie to the right of A's spectrum: the convergence theory assumes a
spectrum in the left half-plane, and a pole among the eigenvalues makes the space erratic
(measured on the 128 x 128 grid below, whose rightmost eigenvalue is 31/T: the error rose to
1e140 at dimension 32 with mu = 0). ``rightmost_estimate`` gives mu: 0 where a Gershgorin
bound proves A dissipative, else the rightmost Ritz value of a short shift-and-invert Arnoldi.

and everything downstream (sub-steps, observation times, the Van Loan integral, the diagonal
gradient) works on A_m exactly as on the polynomial Hessenberg. Its exponentials over long
steps are taken from the eigensystem of H rather than from the formed A_m, whose entries are
of the size of ||A|| (``spectral``: scaling and squaring would lose eps tau ||A||).

Error estimate: the difference between the approximations from the spaces of dimension m and
m - 2 (the leading block of H_m is the Hessenberg of the smaller space), an estimate of the
error of the smaller space and so, for a converging rational Krylov method, larger than the
error of the answer returned.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ._array import array_module, is_sparse, to_numpy
from .errors import AccuracyError
from .krylov import arnoldi
from .spectral import Spectral, decompose, exp_and_rounding

METHODS = ("auto", "polynomial", "rational")
"""Values of the ``method`` option of ``loss_and_grad``."""
DEFAULT_METHOD = "polynomial"
"""The ``method`` every entry point (``loss_and_grad``, ``TrainOptions``, the layers) uses when
none is given."""

_LAG = 2
"""The estimate compares dimensions m and m - _LAG."""
_GAMMA_FRACTION = 0.1
"""Shift gamma = _GAMMA_FRACTION x the longest interval between observation times (van den
Eshof & Hochbruck 2006 recommend gamma of order tau / 10 for tolerances 1e-6 .. 1e-12; measured
with the pole shifted right of the spectrum, true error 1e-8 at dimension 10 / 14 / 16 on
32^2 / 64^2 / 128^2 grids at 0.1, against 12 / 16 / 18 at 0.05 and 16 / 20 / 26 at 0.02)."""
_ESTIMATE_STEPS = 20
"""Dimension of the Arnoldi run that estimates the rightmost eigenvalue."""
_RATIONAL_STEPS = 16
"""Sub-steps per observation interval of an automatically chosen rational march."""
_RATIONAL_DIM = 16
"""Typical dimension of a converged shift-and-invert space (cost model)."""


def check_method(method) -> str:
    """The method name, or a ValueError naming the argument."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


def choose_method(method: str, A0, stiffness: float, k: int) -> str:
    """"polynomial" or "rational" for this call, from an a-priori cost model when "auto".

    stiffness : T ||A||_1 (an upper estimate of T ||A||); A0 : the problem's operator.
    Costs are in flops per column, forward plus adjoint. Polynomial: max(1, stiffness / k)
    sub-steps of dimension min(k, _RATIONAL_DIM + stiffness), each dimension one sparse
    product plus CGS2 over about that many vectors. Rational: one factorization (fill^2 / n
    flops, fill guessed as nnz log2 n, the nested-dissection order on 2-D grids) shared by
    the columns, _RATIONAL_DIM dimensions, each a pair of triangular solves (2 fill) plus
    CGS2. Below k = _RATIONAL_DIM the rational space would have to sub-step, where it
    converges worse (steps shorter than gamma): polynomial.
    """
    if method == "rational" and not is_sparse(A0):
        raise ValueError("method='rational' needs a sparse A0 (SciPy or CuPy CSR): the "
                         "shift-and-invert space factorizes I - gamma A")
    if method != "auto":
        return method
    if not is_sparse(A0) or k < _RATIONAL_DIM:
        return "polynomial"
    n, nnz = A0.shape[0], A0.nnz + A0.shape[0]
    steps = max(1.0, stiffness / k)
    dim = min(k, _RATIONAL_DIM + stiffness)
    polynomial = 2 * steps * dim * (2 * nnz + 4 * dim * n)
    fill = nnz * max(1.0, math.log2(n))
    m = _RATIONAL_DIM
    rational = 2 * m * (4 * fill + 4 * m * n) + fill * fill / n / 64
    return "rational" if rational < polynomial else "polynomial"


def substep_limit(max_substeps: int, n_obs: int) -> int:
    """Sub-steps a rational march chosen by ``method="auto"`` may take before the polynomial
    path takes over. A shift-and-invert space converges for steps tau >~ gamma and worse for
    shorter ones; where a stiff solution decays by many orders within an interval, the
    rounding floor forces short steps and the march crawls (measured: 5000 ever shorter steps,
    10 minutes, on a 16 x 16 grid with x0 and three observation times, where the polynomial
    path takes seconds)."""
    return min(max_substeps, _RATIONAL_STEPS * n_obs)


def shift_for(obs_times) -> float:
    """gamma for a march between 0 and the observation times (host floats)."""
    times = np.concatenate([[0.0], np.asarray(obs_times, dtype=float)])
    return _GAMMA_FRACTION * float(np.max(np.diff(times)))


def _host_operator(A0, d):
    """A = A0 + diag(d) as a SciPy CSC matrix on the host."""
    host = A0.get() if hasattr(A0, "get") else A0
    return sp.csc_matrix(host + sp.diags(to_numpy(d).astype(host.dtype)))


def _abscissa_bound(A) -> float:
    """An upper bound of max Re W(A), the field of values (Gershgorin on (A + A^H) / 2)."""
    diag = A.diagonal().real
    off = abs(A - sp.diags(A.diagonal()))
    radius = 0.5 * (np.asarray(off.sum(axis=0)).ravel() + np.asarray(off.sum(axis=1)).ravel())
    return float(np.max(diag + radius))


def is_contractive(A0, d, horizon: float = 0.0) -> bool:
    """Whether A = A0 + diag(d) provably satisfies ||exp(t A)||_2 <= 1 for t >= 0 (and so does
    A^T): its field of values lies in the closed left half-plane, i.e. the symmetric part
    (A + A^T) / 2 is negative semidefinite. Proven by the Gershgorin bound, or else (with a
    ``horizon`` T > 0) by the pivots of an LU factorization of -(A + A^T) / 2 + I / (1000 T)
    with symmetric, diagonal pivoting: all positive means positive definite (Sylvester's law of
    inertia), so ||exp(t A)||_2 <= e^(t / (1000 T)) <= 1.001 on [0, T]."""
    A = _host_operator(A0, d)
    if not _abscissa_bound(A) > 0.0:
        return True
    if not horizon > 0.0:
        return False
    n = A.shape[0]
    M = sp.csc_matrix(-0.5 * (A + A.T) + sp.identity(n, dtype=A.dtype) / (1000.0 * horizon))
    try:
        lu = spla.splu(M, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                       options={"SymmetricMode": True})
    except RuntimeError:  # exactly singular: not definite
        return False
    pivots = lu.U.diagonal()
    return bool(np.array_equal(lu.perm_r, lu.perm_c) and np.all(pivots > 0))


def rightmost_estimate(A0, d, gamma: float) -> float:
    """mu >= 0 for the pole 1/gamma + mu: 0 when A = A0 + diag(d) is provably dissipative,
    else the largest real part among the Ritz values of a short shift-and-invert Arnoldi run
    with its pole right of the Gershgorin bound of the field of values (eigenvalues near the
    pole, i.e. the rightmost, converge first). A fixed start vector keeps it reproducible; an
    estimate a little short of the true abscissa only moves the pole closer to the spectrum
    (it stays right of it while the shortfall is below 1/gamma), and accuracy never rests on
    it: the a-posteriori estimate still decides."""
    A = _host_operator(A0, d)
    bound = _abscissa_bound(A)
    if not bound > 0.0:
        return 0.0
    factor = ShiftInvert(A0, to_numpy(d), gamma, bound)
    start = np.random.default_rng(0).standard_normal((1, A.shape[0])).astype(A.dtype)
    proj = arnoldi(factor.solve, start, min(_ESTIMATE_STEPS, A.shape[0] - 1))
    m = int(proj.dims[0])  # shorter at a breakdown: an invariant subspace, exact eigenvalues
    ritz = np.linalg.eigvals(proj.square[0, :m, :m])
    ritz = ritz[np.abs(ritz) > 0]
    eigen = bound + (1.0 - 1.0 / ritz) / gamma
    return max(0.0, float(np.max(eigen.real))) if eigen.size else 0.0


class ShiftInvert:
    """One LU factorization of I - gamma (A - mu I), A = A0 + diag(d), and batched solves.

    CPU: SciPy's SuperLU (``splu``). GPU: ``cupyx.scipy.sparse.linalg.splu`` (it factorizes on
    the host with SuperLU and solves on the device); the factorization is on the CPU either way.
    SuperLU takes no symbolic analysis from a previous call, so every call refactorizes
    (measured on the n = 16384 grid: 0.08 s, about one solve of 64 columns).
    """

    def __init__(self, A0, d, gamma: float, shift: float = 0.0):
        xp = array_module(d)
        self.xp, self.gamma, self.shift, self.n = xp, float(gamma), float(shift), A0.shape[0]
        host = A0.get() if hasattr(A0, "get") else A0
        A = _host_operator(A0, d)
        matrix = sp.csc_matrix((1.0 + self.gamma * self.shift)
                               * sp.identity(self.n, dtype=A.dtype, format="csc")
                               - self.gamma * A)
        # A structurally symmetric pattern (grids, diffusion) fills least with a minimum
        # degree order on A^T + A; otherwise COLAMD, SuperLU's default.
        order = "MMD_AT_PLUS_A" if _pattern_symmetric(host) else "COLAMD"
        if xp is np:
            self._lu = spla.splu(matrix, permc_spec=order)
        else:  # pragma: no cover - GPU only
            import cupyx.scipy.sparse as cusp
            import cupyx.scipy.sparse.linalg as cuspla

            self._lu = cuspla.splu(cusp.csc_matrix(matrix), permc_spec=order)
        self.fill = int(self._lu.L.nnz + self._lu.U.nnz)

    def solve(self, rows, transpose: bool = False):
        """(I - gamma A)^{-1} (or its transpose) on every row of rows (c, n) -> (c, n)."""
        xp = self.xp
        rhs = xp.asfortranarray(rows.T)
        out = self._lu.solve(rhs, trans="T" if transpose else "N")
        return xp.ascontiguousarray(out.T)


def _pattern_symmetric(A) -> bool:
    pattern = (A != 0).astype(np.int8)
    return (pattern - pattern.T).nnz == 0


def shift_invert_operators(factor: ShiftInvert, forcing):
    """make_solve(rows, coupling) and solve_T, the shift-and-invert counterparts of the
    augmented operator and A^T (see adjoint's make_apply / apply_T).

    forcing : (c, n) the chunk's f_j as rows. On u = [x; s] (rows (c_q, n + 1)), with
    B = I - gamma (A - mu I) and s' = s / (1 + gamma mu):
    (I - gamma (Â - mu I))^{-1} [x; s] = [B^{-1} (x + gamma s' f coupling); s'].
    """
    xp = array_module(forcing)
    c, n = forcing.shape
    gamma, scale = factor.gamma, 1.0 / (1.0 + factor.gamma * factor.shift)

    def make_solve(rows, coupling):
        f_rows = forcing[xp.asarray(rows)] if rows.size < c else forcing
        f_rows = f_rows * (gamma * scale * coupling)[:, None]

        def solve(v):
            out = xp.empty_like(v)
            out[:, :n] = factor.solve(v[:, :n] + v[:, n:] * f_rows)
            out[:, n] = scale * v[:, n]
            return out

        return solve

    def solve_T(v):
        return factor.solve(v, transpose=True)

    return make_solve, solve_T


class ShiftInvertSpace:
    """How the marches read a shift-and-invert projection (``space=`` of ``_march``).

    The projections hold H_m, the Hessenberg of S = (I - gamma (Â - mu I))^{-1}; ``operator``
    gives A_m = mu I + (I - H_m^{-1}) / gamma and ``exp_and_error`` the coefficients and error
    estimate.
    """

    growth_limit = 1e60
    """Largest growth ||exp(tau A_m) e1|| of one step. Higher than the polynomial path's: one
    step spans a whole interval, over which a slightly unstable mode may grow legitimately
    (gallery's 1-D Laplacian: 1e26 over T), and A_m's eigenvalues are Ritz values of the
    shift-inverted operator, which lie in its field of values, so a non-normal H cannot push
    them far to the right."""

    safety = 1.0
    """Factor on the estimate. The polynomial path's factor 3 corrects the Saad estimate, which
    can sit below the true error; the lag-2 difference estimates the error of the space two
    dimensions smaller, already an overestimate while the space converges (checked against the
    exact reference in tests/test_rational.py), and a factor on top would multiply the
    rounding noise of the exponentials into a floor (measured, when they were all taken by
    scaling and squaring, whose noise is eps ||tau A_m|| / 5: dimension 52 where 22 suffices,
    then refused, on a 32 x 32 grid at ||TA|| = 5000 and rtol = 1e-12)."""

    adjoint_share = 0.8
    """Share of rtol an adjoint step's Krylov estimate may take. The rest is kept for the
    rounding of the step's Van Loan integral: 0.1 eps sigma ||A_m||_1 by a block exponential,
    which for one step over a whole interval grows with ||TA|| (the polynomial path's
    sub-steps keep it near k eps), or what the eigensystems charge where they compute it
    (``spectral.van_loan_choice``)."""

    def __init__(self, gamma: float, shift: float = 0.0, dtype=np.float64,
                 contractive: bool = False, symmetric: bool = False):
        """gamma, shift: the pole is 1/gamma + shift; dtype: the working precision;
        contractive: ||exp(t A^T)||_2 <= 1 is proven (``is_contractive``); symmetric: A is."""
        self.gamma, self.shift = float(gamma), float(shift)
        self.contractive, self.symmetric = bool(contractive), bool(symmetric)
        # The march multiplies the limit by the start norms in the working precision: 1e60
        # is inf in float32, and inf x a zero norm (an underflowed start) NaN, which refuses
        # every step. sqrt(max) (1.8e19 in float32) stays finite and still exceeds what a
        # float32 state may grow to before its overflow check (max^0.4).
        self.growth_limit = min(self.growth_limit, float(np.finfo(dtype).max) ** 0.5)

    shortest_step = 0.01
    """Steps shorter than this x gamma are refused where truncation limits them. A
    shift-and-invert space converges worse on shorter steps, so a space that has not converged
    over a whole interval rarely does over a sliver of it, and the march would crawl
    (measured: sub-steps of 1e-23 T on the 128 x 128 grid at rtol 1e-10, k = 30, each 30
    solves of 64 columns) instead of failing. Where rounding limits a step (float32, a state
    that decays by e^-170 between observation times), shorter steps do help: allowed."""

    def check_steps(self, tau, remaining, unconverged):
        """AccuracyError where a step (host (c,)) is shorter than both shortest_step x gamma
        and the remaining time while its truncation estimate over the remaining time (not its
        rounding) failed: ``unconverged`` (c,) bools."""
        floor = self.shortest_step * self.gamma
        short = unconverged & (tau < np.minimum(remaining, floor) * (1 - 1e-12))
        if short.any():
            raise AccuracyError(
                f"the shift-and-invert space did not converge within the Krylov dimension over "
                f"a step of {floor:.3g} (gamma / {1 / self.shortest_step:.0f}; shorter steps "
                "converge worse): increase k, loosen rtol, or use method='polynomial'")

    def operator(self, square, dims=None):
        """A_m (c, m, m) from H_m (c, m, m); zero beyond each column's dimension dims (c,)."""
        xp = array_module(square)
        c, m, _ = square.shape
        dims = np.full(c, m) if dims is None else np.asarray(dims)
        # A zero start (a state or adjoint that underflowed to 0, as stiff decay does in
        # float32) projects to H = 0, which has no inverse: its A_m is zero (so are its
        # coefficients, beta = 0).
        started = xp.any(square[:, :, 0] != 0, axis=1)  # (c,)
        inside = xp.asarray(np.arange(m)[None, :] < dims[:, None]) & started[:, None]  # (c, m)
        keep = inside[:, :, None] & inside[:, None, :]
        eye = xp.eye(m, dtype=square.dtype)
        # identity beyond the column's dimension, so that H is invertible and A_m zero there
        padded = xp.where(keep, square, eye)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            inverse = xp.linalg.inv(padded)
        return xp.where(keep, (eye - inverse) / self.gamma + self.shift * eye, 0.0)

    def spectral(self, square, dims=None) -> Spectral:
        """A_m of H_m (c, m, m) as a ``spectral.Spectral``: the formed matrix (``operator``)
        and, where H is well diagonalizable, its eigensystem, from which exponentials lose
        eps (1 + tau / gamma) instead of the eps tau ||A_m|| of scaling and squaring."""
        c, m, _ = square.shape
        dims = np.full(c, m) if dims is None else np.asarray(dims)
        return decompose(square, dims, self.operator(square, dims), self.gamma, self.shift)

    def exp_and_error(self, square, next_subdiag, norms, tau, dims=None):
        """y = beta exp(tau A_m) e1 (c, m) and err (c,) = ||y - y_{m-2}||, the difference to
        the answer of the space of dimension m - 2 (inf where m <= 2; 0 where h_{m+1,m} = 0,
        an invariant subspace: exact), plus the rounding of the eigendecomposition where y
        comes from it (``spectral.exp_and_rounding``).

        A state that underflowed (below finfo.tiny / eps, where gradual underflow eats its
        digits) from a nonzero start gets err = inf: the difference of two such states
        certifies nothing (measured: a dissipative 2-D grid at ||TA|| =
        1e4 accepted a 4-dimensional adjoint space on it whose states were wrong by 8 % a
        hundredth of the way along the step). What the estimate at the step's end cannot see
        along the step, the lag-2 difference of each step's time integral checks
        (``_march``)."""
        xp = array_module(square)
        c, m, _ = square.shape
        dims = np.full(c, m) if dims is None else np.asarray(dims)
        y, rounding = self._coefficients(square, dims, norms, tau)
        smaller = dims - _LAG
        y_small, _ = self._coefficients(square, np.maximum(smaller, 1), norms, tau)
        with np.errstate(over="ignore", invalid="ignore"):
            err = xp.linalg.norm(y - y_small, axis=1) + rounding
        lost = (xp.linalg.norm(y, axis=1) < _underflow(y)) & (norms > 0)
        err = xp.where(lost, xp.inf, err)
        err = xp.where(xp.asarray(smaller >= 1), err, xp.inf)
        err = xp.where(next_subdiag == 0, 0.0, err)
        return y, err

    def _coefficients(self, square, dims, norms, tau):
        """beta exp(tau A_dims) e1 per column, zero beyond its dimension (c, m), and the
        rounding of the eigendecomposition (c,) device (0 where the matrix serves)."""
        xp = array_module(square)
        c, m, _ = square.shape
        op = self.spectral(square, dims)
        unit = xp.zeros((c, m), dtype=square.dtype)
        unit[:, 0] = 1.0
        taus = to_numpy(tau).astype(float)[:, None]
        y, rounding = exp_and_rounding(op, taus, unit)
        y = y[:, 0, :] * norms[:, None]
        rounding = xp.asarray(rounding[:, 0], dtype=square.dtype)
        return y, rounding * norms


def _underflow(array) -> float:
    """Norms below this have lost digits to gradual underflow (finfo.tiny / eps)."""
    info = np.finfo(array.dtype)
    return float(info.tiny / info.eps)
