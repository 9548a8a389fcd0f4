"""Exponentials of shift-and-invert projected operators from the eigensystem of H, against
ball arithmetic (python-flint) on the operator that the float64 H represents exactly."""

import flint
import numpy as np
import pytest

import diagode_dist as dd
from diagode_dist.rational import ShiftInvertSpace
from diagode_dist.reference import exact_loss_and_grad, relative_error
from diagode_dist.spectral import EIGEN_FROM, exp_and_rounding, exp_apply, phi1
from diagode_dist.time_integral import van_loan

GAMMA, SHIFT, T = 0.1, 29.0, 1.0
EPS = float(np.finfo(np.float64).eps)


def _hessenberg(m, seed, nonnormal=0.0):
    """H = (I - gamma (A - mu I))^{-1} (1, m, m) of an A with eigenvalues from -5000 to +29
    (||TA|| = 5000, one growing mode e^29, the pole right next to it): the shape of a
    shift-and-invert projection of the stiff growing grid."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((m, m)))[0]
    lam = -np.geomspace(1.0, 5000.0, m)
    lam[0] = 28.9
    A = Q @ np.diag(lam) @ Q.T + nonnormal * np.triu(rng.standard_normal((m, m)), 1)
    return np.linalg.inv(np.eye(m) - GAMMA * (A - SHIFT * np.eye(m)))[None]


def _exact_operator(H):
    """A_m = mu I + (I - H^{-1}) / gamma of the float64 H (m, m), as a flint arb_mat."""
    m = H.shape[0]
    inv = flint.arb_mat(H.tolist()).inv()
    eye = flint.arb_mat(np.eye(m).tolist())
    return eye * SHIFT + (eye - inv) * (1 / flint.arb(GAMMA))


def _to_numpy(M):
    return np.array([[float(M[i, j].mid()) for j in range(M.ncols())] for i in range(M.nrows())])


@pytest.fixture(autouse=True)
def _precision():
    previous, flint.ctx.prec = flint.ctx.prec, 200
    yield
    flint.ctx.prec = previous


def _relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("nonnormal", [0.0, 30.0])
def test_exponential_from_the_eigensystem_has_no_scaling_and_squaring_floor(nonnormal):
    """exp(T A_m) e1 with ||T A_m|| = 5000 on 8 random H: scaling and squaring loses up to
    eps ||TA|| / 5, the eigensystem of a normal H about 10 eps; the eigensystem serves only
    where its charged rounding is below the squarings' and then covers its error, so the
    answer is never much worse than the matrix's."""
    space = ShiftInvertSpace(GAMMA, SHIFT)
    rows = []
    for m in (24, 40):
        for seed in range(4):
            H = _hessenberg(m, seed, nonnormal)
            op = space.spectral(H)
            assert op.ok.all() and T * op.size[0] >= EIGEN_FROM
            start = np.zeros((1, m))
            start[0, 0] = 1.0
            exact = _to_numpy((_exact_operator(H[0]) * T).exp())[:, 0]
            y, rounding = exp_and_rounding(op, np.array([[T]]), start)
            err = _relative(y[0, 0], exact)
            err_matrix = _relative(exp_apply(op.matrix, np.array([[T]]), start)[0, 0], exact)
            charged = rounding[0, 0] / np.linalg.norm(exact)
            if charged > 0:  # the eigensystem served: its charge covers it
                assert charged >= err / 10, (m, seed, charged, err)
            assert err <= max(err_matrix, 200 * EPS), (m, seed, err, err_matrix)
            rows.append((err, err_matrix, charged > 0))
    err, err_matrix, eigen = (np.array(column) for column in zip(*rows, strict=True))
    if nonnormal == 0.0:
        assert eigen.all() and err.max() < 200 * EPS, err
        assert err_matrix.max() > 10 * err.max(), (err_matrix, err)


def test_short_steps_and_nondiagonalizable_operators_use_scaling_and_squaring():
    H = _hessenberg(12, 1)
    space = ShiftInvertSpace(GAMMA, SHIFT)
    op = space.spectral(H)
    start = np.zeros((1, 12))
    start[0, 0] = 1.0
    short = np.array([[0.5 * EIGEN_FROM / op.size[0]]])
    assert np.array_equal(exp_apply(op, short, start), exp_apply(op.matrix, short, start))
    assert exp_and_rounding(op, short, start)[1][0, 0] == 0.0
    jordan = np.eye(6)[None] * 0.5 + np.eye(6, k=1)[None]  # one defective eigenvalue
    assert not space.spectral(jordan).ok.any()


@pytest.mark.parametrize("z_start", [False, True])
def test_van_loan_integral_from_the_eigensystems_matches_ball_arithmetic(z_start):
    """M = int_0^T exp((T - s) G) z y^T exp(s H^T) ds from Van Loan's block exponential,
    computed in ball arithmetic on the exact operators."""
    HG, HF = _hessenberg(14, 2), _hessenberg(16, 3, nonnormal=10.0)
    space = ShiftInvertSpace(GAMMA, SHIFT)
    G, F = space.spectral(HG), space.spectral(HF)
    rng = np.random.default_rng(4)
    y = rng.standard_normal((1, 16))
    z = rng.standard_normal((1, 14)) if z_start else None
    M = van_loan(G, F, np.array([T]), y, z)
    top = np.zeros((14, 16))
    if z_start:
        top = np.outer(z[0], y[0])
    else:
        top[0] = y[0]
    exact_G, exact_F = _exact_operator(HG[0]), _exact_operator(HF[0])
    block = flint.arb_mat(30, 30)
    for i in range(14):
        for j in range(14):
            block[i, j] = exact_G[i, j] * T
        for j in range(16):
            block[i, 14 + j] = top[i, j] * T
    for i in range(16):
        for j in range(16):
            block[14 + i, 14 + j] = exact_F[j, i] * T
    exact = _to_numpy(block.exp())[:14, 14:]
    err = np.linalg.norm(M[0] - exact) / np.linalg.norm(exact)
    assert err < 500 * EPS, err
    matrix = van_loan(G.matrix, F.matrix, np.array([T]), y, z)
    assert np.linalg.norm(matrix[0] - exact) / np.linalg.norm(exact) > 10 * err


def test_phi1_against_ball_arithmetic_on_both_sides_of_its_series():
    z = np.array([0.0, -1e-9, -0.49 + 0.1j, -0.51 + 0.1j, 0.3j, -3.0 + 4.0j, -700.0])
    got = phi1(z.astype(complex))
    for value, zi in zip(got, z, strict=True):
        w = flint.acb(zi.real, zi.imag)
        want = complex(1.0) if zi == 0 else complex((w.exp() - 1) / w)
        assert abs(value - want) <= 4 * EPS * abs(want), (zi, value, want)


def test_growing_grid_certified_at_rtol_1e_13_against_ball_arithmetic():
    """The stiff growing grid (||TA|| = 5000, the state grows e^13): the lag-2 estimates of
    exponentials by scaling and squaring stagnated near eps ||TA|| (refused at rtol 1e-12 on
    the 64 x 64 grid); from the eigensystem the answer is right to 1e-14 and certified at
    rtol 1e-13 (the polynomial path refuses there: 2.3e-13)."""
    from benchmarks.stiff import stiff_problem

    prob, theta = stiff_problem(16, 5000.0, S=4)
    ref_loss, ref = exact_loss_and_grad(prob, theta, precise=True)
    loss, grad, info = dd.loss_and_grad(prob, theta, k=60, rtol=1e-13, method="rational",
                                        return_info=True)
    err = relative_error(grad, ref)
    assert info["rtol_met"] and err <= 1e-13, err
    assert info["error_estimate"] >= err / 10
    assert abs(loss - ref_loss) <= 1e-13 * abs(ref_loss)
