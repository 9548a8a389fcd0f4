"""Shift-and-invert (rational) Krylov: accuracy against the exact dense reference on stiff
operators, honest error estimates, mesh independence, the automatic choice of method."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import scipy.sparse as sp

import diagode_dist as dd
from diagode_dist import gallery
from diagode_dist._array import gpu_available
from diagode_dist.rational import choose_method, rightmost_estimate, shift_for
from diagode_dist.reference import exact_loss_and_grad, inverse_softplus, relative_error

STIFF = ("laplacian_1d", "laplacian_1d_x0", "laplacian_2d_mse", "convection_diffusion",
         "mse_obs")


@cache
def _exact(name):
    case = gallery.case(name)
    return case, exact_loss_and_grad(case.problem, case.theta, case.param, precise=True)


def _check_against_reference(prob, theta, param, ref, rtol, k=30):
    loss, grad, info = dd.loss_and_grad(prob, theta, param=param, k=k, rtol=rtol,
                                        method="rational", return_info=True)
    loss_ref, grad_ref = ref
    err = relative_error(grad, grad_ref)
    assert info["method"] == "rational" and info["rtol_met"]
    assert err <= 10 * rtol, f"gradient error {err:.2e} at rtol {rtol}"
    assert info["error_estimate"] >= err / 10, (info["error_estimate"], err)  # honest
    assert abs(loss - loss_ref) <= 10 * rtol * abs(loss_ref)
    return info


@pytest.mark.parametrize("rtol", [1e-8, 1e-10])
@pytest.mark.parametrize("name", STIFF)
def test_rational_matches_exact_reference_on_stiff_gallery(name, rtol):
    """1-D Laplacians with and without x0 (||TA|| = 1e4), the 2-D Laplacian with x0 and an MSE
    loss at three observation times, upwind convection-diffusion, a sparse MSE problem."""
    case, ref = _exact(name)
    info = _check_against_reference(case.problem, case.theta, case.param, ref, rtol)
    if name in ("laplacian_1d", "laplacian_1d_x0", "convection_diffusion"):
        # one space covers the whole interval (polynomial Krylov: 15+ sub-steps at k = 30)
        assert info["substeps"] == 1


def _laplacian_1d(m, stiffness, x0=False, S=3, seed=0):
    """1-D Dirichlet Laplacian (m points) with T chosen so that ||T A||_2 ~ stiffness."""
    h = 1.0 / (m + 1)
    A0 = sp.diags([np.ones(m - 1), np.ones(m - 1)], [-1, 1], format="csr") / h**2
    rng = np.random.default_rng(seed)
    theta = inverse_softplus((2.0 / h**2) * (1 + 0.05 * rng.uniform(-1, 1, m)))
    T = stiffness * h**2 / 4.0
    X0 = rng.standard_normal((m, S)) if x0 else None
    prob = dd.Problem(A0, rng.standard_normal((m, S)), rng.integers(0, m, S), T=T, beta=1e3,
                      x0=X0)
    return prob, theta


def test_dimension_does_not_grow_with_stiffness():
    """Mesh independence: ||TA|| from 1e3 to 1e5, one forward step of at most the same
    dimension, and the gradient exact to rtol at each. (At 1e5 the adjoint decays by e^-150
    over T, and its rounding floor, not its convergence, makes it sub-step.)"""
    dims = []
    for stiffness in (1e3, 1e4, 1e5):
        prob, theta = _laplacian_1d(40, stiffness, x0=True)
        ref = exact_loss_and_grad(prob, theta, precise=True)
        info = _check_against_reference(prob, theta, None, ref, 1e-8)
        assert info["substeps"] == 1
        dims.append(info["forward_dim"])
    assert max(dims) <= 16 and dims[-1] <= dims[0], dims


def test_polynomial_needs_substeps_where_rational_does_not():
    prob, theta = _laplacian_1d(40, 1e4)
    *_, poly = dd.loss_and_grad(prob, theta, k=30, rtol=1e-8, method="polynomial",
                                return_info=True)
    *_, rat = dd.loss_and_grad(prob, theta, k=30, rtol=1e-8, method="rational",
                               return_info=True)
    assert poly["substeps"] >= 4 and rat["substeps"] == 1


def test_observation_loss_with_user_callable():
    prob, theta = _laplacian_1d(30, 3e3, x0=True)
    times = [prob.T / 3, prob.T]
    targets = np.random.default_rng(1).standard_normal((2, 30, 3))

    def loss(states, cols):
        diff = states - targets[:, :, cols].transpose(0, 2, 1)
        return (diff**2).sum(axis=(0, 2)), 2 * diff

    obs = dd.Problem(prob.A0, prob.F, T=prob.T, x0=prob.x0, obs_times=times, loss=loss)
    _check_against_reference(obs, theta, None, exact_loss_and_grad(obs, theta, precise=True),
                             1e-8)


# ---- the automatic choice ---------------------------------------------------------------------

def _method(prob, theta, k=30):
    return dd.loss_and_grad(prob, theta, k=k, rtol=1e-8, method="auto",
                            return_info=True)[2]["method"]


def test_polynomial_is_the_default_everywhere():
    stiff, theta = _laplacian_1d(40, 1e3)
    assert dd.loss_and_grad(stiff, theta, rtol=1e-8, return_info=True)[2]["method"] == \
        "polynomial"
    assert dd.TrainOptions().method == "polynomial"


def test_auto_chooses_by_stiffness_on_both_sides_of_the_threshold():
    mild, theta = _laplacian_1d(40, 1.0)  # ||T A||_1 ~ 2
    stiff, _ = _laplacian_1d(40, 1e3)
    assert _method(mild, theta) == "polynomial"
    assert _method(stiff, theta) == "rational"
    # the same stiff problem with a maximum dimension below a converged rational space
    assert _method(stiff, theta, k=10) == "polynomial"


def test_auto_threshold_of_the_cost_model():
    """The switch sits where the model's costs cross: between ||TA|| = 5 and 50 on a 2-D
    grid at n = 16384 (measured there: rational 20x+ faster at ||TA|| = 5000)."""
    m = 128
    A0 = sp.diags([np.ones(m * m - 1)], [1], format="csr")
    A0 = (A0 + A0.T + sp.diags([np.ones(m * m - m)], [m]) + sp.diags([np.ones(m * m - m)], [-m]))
    A0 = A0.tocsr()
    assert choose_method("auto", A0, 5.0, 30) == "polynomial"
    assert choose_method("auto", A0, 50.0, 30) == "rational"
    assert choose_method("auto", A0.toarray(), 1e6, 30) == "polynomial"  # dense: never
    assert choose_method("polynomial", A0, 1e6, 30) == "polynomial"


def test_seed_demo_stays_polynomial():
    prob = dd.demo_problem()
    assert _method(prob, np.zeros(prob.n)) == "polynomial"
    sparse = dd.demo_problem(sparse=True)
    assert _method(sparse, np.zeros(sparse.n)) == "polynomial"


def test_bad_method_is_refused_before_work():
    prob, theta = _laplacian_1d(10, 10.0)
    with pytest.raises(ValueError, match="method must be one of"):
        dd.loss_and_grad(prob, theta, method="shift-invert")
    dense = dd.demo_problem(n=8, S=2)
    with pytest.raises(ValueError, match="method='rational' needs a sparse A0"):
        dd.loss_and_grad(dense, np.zeros(8), method="rational")


# ---- the accuracy contract -------------------------------------------------------------------

def test_never_accepts_an_estimate_above_rtol():
    prob, theta = _laplacian_1d(40, 1e4)
    with pytest.raises(dd.AccuracyError, match="rtol"):
        dd.loss_and_grad(prob, theta, k=8, rtol=1e-12, method="rational")


def test_float32_certified_or_refused():
    prob, theta = _laplacian_1d(30, 1e3, x0=True)
    ref = exact_loss_and_grad(prob, theta, precise=True)
    prob32 = dd.Problem(prob.A0.astype(np.float32), prob.F.astype(np.float32),
                        prob.labels, T=prob.T, beta=prob.beta, x0=prob.x0.astype(np.float32))
    loss, grad, info = dd.loss_and_grad(prob32, theta.astype(np.float32), rtol=1e-4,
                                        method="rational", return_info=True)
    assert grad.dtype == np.float32 and info["rtol_met"]
    err = relative_error(grad, ref[1])
    assert err <= 10 * info["rtol"] and info["error_estimate"] >= err / 10


def test_columns_and_chunks_do_not_change_the_result():
    prob, theta = _laplacian_1d(30, 1e3, x0=True, S=6)
    _, whole = dd.loss_and_grad(prob, theta, rtol=1e-10, method="rational")
    _, chunked = dd.loss_and_grad(prob, theta, rtol=1e-10, method="rational",
                                  max_chunk_columns=2)
    assert relative_error(chunked, whole) < 1e-13


@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")
def test_rational_on_gpu_matches_cpu():  # pragma: no cover - GPU only
    import cupy

    prob, theta = _laplacian_1d(40, 1e4, x0=True)
    _, cpu = dd.loss_and_grad(prob, theta, rtol=1e-10, method="rational")
    gpu_prob = prob.to_device(cupy)
    _, gpu = dd.loss_and_grad(gpu_prob, cupy.asarray(theta), rtol=1e-10, method="rational")
    assert relative_error(cupy.asnumpy(gpu), cpu) < 1e-9


def test_pattern_x0_and_forcing_gradients_on_the_rational_path():
    """Edge weights and dL/dx0, dL/dF read the rational space's recovered operator."""
    prob, theta_d = _laplacian_1d(30, 1e3, x0=True)
    pattern = sp.csr_matrix(np.eye(30, k=1) + np.eye(30, k=-1))
    param = dd.Stack(dd.SoftplusParam(), dd.EdgeParam(pattern, transform="identity"))
    theta = np.concatenate([theta_d, np.zeros(pattern.nnz)])
    wrt = ("theta", "x0", "F")
    _, got = dd.loss_and_grad(prob, theta, param=param, rtol=1e-10, method="rational", wrt=wrt)
    _, ref = exact_loss_and_grad(prob, theta, param, wrt=wrt)
    for name in wrt:
        assert relative_error(got[name], ref[name]) <= 1e-8, name


def _pole_on_an_eigenvalue(m=120, S=4, seed=0):
    """A 1-D Laplacian with a random potential, moved right until its second eigenvalue sits
    at 1/gamma for gamma = shift_for(T), where an unshifted pole would make I - gamma A
    singular; its rightmost eigenvalue is then positive (a growing mode)."""
    h = 1.0 / (m + 1)
    A0 = sp.diags([np.ones(m - 1), np.ones(m - 1)], [-1, 1], format="csr") / h**2
    rng = np.random.default_rng(seed)
    magnitude = (2.0 / h**2) * (1 + 0.1 * rng.uniform(-1, 1, m))
    T = 3000 * h**2 / 4
    eigenvalues = np.linalg.eigvalsh((A0 + sp.diags(-magnitude)).toarray())
    magnitude -= 1.0 / shift_for([T]) - eigenvalues[-2]
    prob = dd.Problem(A0, rng.standard_normal((m, S)), rng.integers(0, m, S), T=T, beta=1.0)
    return prob, inverse_softplus(magnitude), eigenvalues[-1] - eigenvalues[-2] + 1 / shift_for([T])


def test_the_pole_is_moved_right_of_the_spectrum():
    """An eigenvalue at the unshifted pole: the shifted space converges as on a dissipative
    operator, and the result is right against the exact reference."""
    prob, theta, rightmost = _pole_on_an_eigenvalue()
    gamma = shift_for([prob.T])
    d = -np.logaddexp(0.0, theta)
    estimate = rightmost_estimate(prob.A0, d, gamma)
    assert rightmost - 0.5 / gamma <= estimate <= rightmost * (1 + 1e-8)
    ref = exact_loss_and_grad(prob, theta, precise=False)
    info = _check_against_reference(prob, theta, None, ref, 1e-8)
    assert info["substeps"] == 1 and info["forward_dim"] <= 20, info


def test_last_interval_adjoint_is_certified_by_its_integrals_unless_lambda0_is_read():
    """On a growing operator, the adjoint over the interval that ends at t = 0 delivers
    lambda(0), which only dL/dx0 and dL/dF read: without them the adjoint space is accepted on
    its Van Loan integrals (a smaller space), with x0 asked for it stays right relative to
    itself; both right against ball arithmetic at rtol 1e-12."""
    prob, theta, _ = _pole_on_an_eigenvalue()
    _, ref = exact_loss_and_grad(prob, theta, precise=True, wrt=("theta", "x0"))
    _, grad, info = dd.loss_and_grad(prob, theta, k=60, rtol=1e-12, method="rational",
                                     return_info=True)
    _, both, info_x0 = dd.loss_and_grad(prob, theta, k=60, rtol=1e-12, method="rational",
                                        return_info=True, wrt=("theta", "x0"))
    assert info["rtol_met"] and info_x0["rtol_met"]
    assert info["adjoint_dim"] < info_x0["adjoint_dim"], (info, info_x0)
    for got, estimate in ((grad, info), (both["theta"], info_x0)):
        err = relative_error(got, ref["theta"])
        assert err <= 1e-12 and estimate["error_estimate"] >= err / 10, err
    assert relative_error(both["x0"], ref["x0"]) <= 1e-12


def test_a_dissipative_operator_gets_no_shift():
    """Gershgorin proves a 1-D Laplacian with absorption dissipative: mu = 0; with a potential
    that makes some rows non-dissipative, mu is the (positive or zero) rightmost estimate."""
    m = 200
    A0 = sp.diags([np.ones(m - 1), np.ones(m - 1)], [-1, 1], format="csr")
    absorbing = -2.0 * (1 + 0.05 * np.random.default_rng(0).uniform(0, 1, m))
    assert rightmost_estimate(A0, absorbing, 0.1) == 0.0
    lifted = absorbing + 0.5
    expected = np.linalg.eigvalsh((A0 + sp.diags(lifted)).toarray()).max()
    assert expected > 0  # the pole must move: short of the rightmost by far less than 1/gamma
    assert expected - 0.01 / 0.1 <= rightmost_estimate(A0, lifted, 0.1) <= expected + 1e-9


def test_an_unconverged_space_is_refused_at_once_instead_of_crawling(monkeypatch):
    """k too small for rtol on a stiff grid: one refused step (the old march shrank its steps
    64 times to ~1e-20 T before its work limit refused it, 50x slower)."""
    from benchmarks.stiff import stiff_problem
    from diagode_dist import _march

    steps = []
    choose = _march._choose_steps
    monkeypatch.setattr(_march, "_choose_steps", lambda *a: steps.append(1) or choose(*a))
    prob, theta = stiff_problem(24, 5000.0, S=8)
    with pytest.raises(dd.AccuracyError, match="shift-and-invert space did not converge"):
        dd.loss_and_grad(prob, theta, k=8, rtol=1e-10, method="rational", max_substeps=2000)
    assert len(steps) <= 2


def test_rational_gradient_on_a_dissipative_grid_matches_the_exact_reference():
    """The adjoint decays by e^-350 over T: its exponentials underflowed, a 4-dimensional
    adjoint space was certified on the difference of two zeros and its states were wrong by
    8 % a hundredth of the way along the step (gradient error 2.2e-7 reported within rtol
    1e-8). Now an underflowed state certifies nothing, and the lag-2 difference of every time
    integral checks the states along the step."""
    from benchmarks.stiff import stiff_problem

    prob, theta = stiff_problem(16, 1e4, S=4, dissipative=True)
    ref = exact_loss_and_grad(prob, theta, precise=False)
    for k in (30, 60):
        _check_against_reference(prob, theta, None, ref, 1e-8, k=k)


def test_the_integral_check_refuses_a_space_wrong_along_its_step(monkeypatch):
    """Without the underflow rule the state test accepts the dissipative grid's adjoint space
    at dimension 4 again where the adjoint is followed relative to itself (dL/dx0 asked for).
    The acceptor's integral test then grows the space, and the answer is right; without that
    test too, the integrals' lag-2 difference (5e-3) refuses the answer."""
    from benchmarks.stiff import stiff_problem
    from diagode_dist import _chain, rational

    for module in (rational, _chain):
        monkeypatch.setattr(module, "_underflow", lambda array: 0.0)
    prob, theta = stiff_problem(16, 1e4, S=4, dissipative=True)
    wrt = ("theta", "x0")
    _, grads = dd.loss_and_grad(prob, theta, k=60, rtol=1e-8, method="rational", wrt=wrt)
    ref = exact_loss_and_grad(prob, theta, precise=False)[1]
    assert relative_error(grads["theta"], ref) <= 1e-7
    monkeypatch.setattr(_chain._IntegralAcceptor, "__call__",
                        lambda self, hessenberg, basis, rows=None:
                        self.state_test(hessenberg, basis, rows))
    with pytest.raises(dd.AccuracyError, match="exceeds rtol"):
        dd.loss_and_grad(prob, theta, k=60, rtol=1e-8, method="rational", wrt=wrt)


def test_a_column_accepted_early_keeps_its_own_subdiagonal():
    """A projection records each column's own h_{d+1,d}: a column accepted below the chunk's
    largest dimension is not an invariant subspace (it used to read as one, h = 0, which
    certified any later estimate of it as exact)."""
    from diagode_dist.krylov import arnoldi

    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 40))
    start = rng.standard_normal((2, 40))
    apply = lambda rows: rows @ A.T  # noqa: E731
    both = arnoldi(apply, start, 12, accept=lambda h, basis, rows: np.asarray(rows) == 0,
                   check_every=4)
    alone = arnoldi(apply, start[:1], 4)
    assert list(both.dims) == [4, 12]
    assert both.next_subdiag[0] == pytest.approx(alone.next_subdiag[0], rel=1e-12)
    assert both.next_subdiag[0] > 0


def test_van_loan_with_a_general_adjoint_start():
    """int_0^tau exp((tau - s) G) z (exp(s H) y)^T ds against Simpson's rule."""
    from scipy.integrate import simpson
    from scipy.linalg import expm

    from diagode_dist.time_integral import van_loan

    rng = np.random.default_rng(1)
    G, H = rng.standard_normal((1, 5, 5)), rng.standard_normal((1, 4, 4))
    y, z = rng.standard_normal((1, 4)), rng.standard_normal((1, 5))
    tau = 0.7
    s = np.linspace(0.0, tau, 2001)
    integrand = np.stack([np.outer(expm((tau - t) * G[0]) @ z[0], expm(t * H[0]) @ y[0])
                          for t in s])
    expected = simpson(integrand, x=s, axis=0)
    got = van_loan(G, H, np.array([tau]), y, z)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_auto_falls_back_where_the_rational_estimate_misses_rtol(monkeypatch):
    """A rational march that completes with a summed estimate above rtol (here: its
    integral estimate made to fail) is computed again on the polynomial path under "auto",
    and refused under "rational"."""
    from diagode_dist import _chain

    add = _chain._LinkIntegral.add_integrals

    def failing(self, acc, columns):
        add(self, acc, columns)
        acc.integral[0, columns] = np.inf

    monkeypatch.setattr(_chain._LinkIntegral, "add_integrals", failing)
    prob, theta = _laplacian_1d(60, 1e4)
    assert choose_method("auto", prob.A0, 1e4, 30) == "rational"
    with pytest.raises(dd.AccuracyError, match="exceeds rtol"):
        dd.loss_and_grad(prob, theta, k=30, rtol=1e-8, method="rational")
    _, grad, info = dd.loss_and_grad(prob, theta, k=30, rtol=1e-8, method="auto",
                                     return_info=True)
    assert info["method"] == "polynomial" and info["rtol_met"]
    ref = exact_loss_and_grad(prob, theta)[1]
    assert relative_error(grad, ref) <= 1e-7
