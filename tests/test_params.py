"""Operator parametrisations (EdgeParam, GeneratorParam, Stack) and gradients for x0 and F.

Everything is checked against the exact dense reference (``reference.exact_loss_and_grad``,
which builds A(theta) densely with its own code), and the reference itself against finite
differences of a loss computed with plain ``scipy.linalg.expm``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp

import diagode_dist as dd
from diagode_dist.reference import exact_loss_and_grad, relative_error

N, S = 10, 4
TIMES = (0.4, 1.0, 1.5)


def _problem(sparse_A0=False, with_x0=True, loss="mse", seed=0):
    rng = np.random.default_rng(seed)
    A0 = 0.3 * rng.standard_normal((N, N))
    np.fill_diagonal(A0, 0.0)
    if sparse_A0:
        A0 = sp.csr_matrix(A0 * (rng.random((N, N)) < 0.4))
    F = rng.standard_normal((N, S))
    x0 = rng.standard_normal((N, S)) if with_x0 else None
    if loss == "mse":
        return dd.Problem(A0, F, x0=x0, T=1.5, obs_times=TIMES, loss="mse",
                          targets=rng.standard_normal((len(TIMES), N, S)))
    return dd.Problem(A0, F, rng.integers(0, N, S), T=1.5, beta=3.0, x0=x0)


def _pattern(kind, seed=3):
    """A random pattern with about 30% of the entries, diagonal ones included."""
    P = sp.random(N, N, density=0.3, random_state=seed, format="csr")
    P.data[:] = 1.0
    return P if kind == "csr" else P.toarray()


def _params(kind, transform):
    P = _pattern(kind)
    return {
        "edge": dd.EdgeParam(P, transform),
        "generator": dd.GeneratorParam(P, transform),
        "stack": dd.Stack(dd.SoftplusParam(), dd.GeneratorParam(P, transform)),
    }


def _theta(param, seed=5):
    return 0.4 * np.random.default_rng(seed).standard_normal(param.theta_size(N)) - 0.3


# ---- the package against the exact reference ----------------------------------------------


@pytest.mark.parametrize("transform", ["identity", "softplus", "exp"])
@pytest.mark.parametrize("kind", ["csr", "dense"])
@pytest.mark.parametrize("which", ["edge", "generator", "stack"])
def test_pattern_params_match_reference(which, kind, transform):
    prob = _problem(sparse_A0=kind == "csr")
    param = _params(kind, transform)[which]
    theta = _theta(param)
    loss, grads = dd.loss_and_grad(prob, theta, param, wrt=("theta", "x0", "F"))
    ref_loss, ref = exact_loss_and_grad(prob, theta, param, wrt=("theta", "x0", "F"))
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name in ("theta", "x0", "F"):
        assert grads[name].shape == ref[name].shape
        assert relative_error(grads[name], ref[name]) <= 1e-10, name


def test_classification_with_columns_and_repeats():
    prob = _problem(loss="classification")
    param = _params("csr", "softplus")["stack"]
    theta = _theta(param)
    columns = [3, 0, 3]  # a repeated column counts twice
    loss, grads = dd.loss_and_grad(prob, theta, param, columns=columns, wrt=("theta", "x0", "F"))
    ref_loss, ref = exact_loss_and_grad(prob, theta, param, columns=columns,
                                        wrt=("theta", "x0", "F"))
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name in ("theta", "x0", "F"):
        assert relative_error(grads[name], ref[name]) <= 1e-10, name
    assert not grads["x0"][:, [1, 2]].any()  # unchosen columns


def test_chunking_and_sub_steps_do_not_change_pattern_gradient():
    prob = _problem()
    param = _params("csr", "exp")["generator"]
    theta = _theta(param)
    _, ref = exact_loss_and_grad(prob, theta, param)
    for kwargs in ({"max_chunk_columns": 1}, {"k": 8, "rtol": 1e-11}):
        _, grad = dd.loss_and_grad(prob, theta, param, **kwargs)
        assert relative_error(grad, ref) <= 1e-9, kwargs


def test_diagonal_gradient_unchanged_by_the_protocol():
    """A SoftplusParam, the same map as a user object with the two diagonal methods, and a
    one-part Stack give the same floats."""

    class UserSoftplus:
        def diag_from_theta(self, theta):
            return -np.logaddexp(0.0, theta)

        def dtheta_from_ddiag(self, theta, g):
            return -g * np.exp(-np.logaddexp(0.0, -theta))

    prob = _problem()
    theta = _theta(dd.SoftplusParam())
    _, base = dd.loss_and_grad(prob, theta)
    _, user = dd.loss_and_grad(prob, theta, UserSoftplus())
    _, stacked = dd.loss_and_grad(prob, theta, dd.Stack(dd.SoftplusParam()))
    np.testing.assert_array_equal(base, user)
    np.testing.assert_array_equal(base, stacked)
    _, ref = exact_loss_and_grad(prob, theta)
    assert relative_error(base, ref) <= 1e-10


def test_generator_rows_sum_to_zero_and_stack_order():
    P = _pattern("csr")
    gen = dd.GeneratorParam(P, "softplus")
    theta = _theta(gen)
    terms = gen.operator_terms(theta)
    W = gen.pattern.matrix(terms.weights).toarray()
    np.testing.assert_allclose((W + np.diag(terms.diag)).sum(axis=1), 0.0, atol=1e-14)
    assert (terms.weights > 0).all()
    stack = dd.Stack(dd.ExpParam(), gen)
    both = np.concatenate([np.zeros(N), theta])
    stacked = stack.operator_terms(both)
    np.testing.assert_allclose(stacked.diag, -1.0 + terms.diag)
    np.testing.assert_array_equal(stacked.weights, terms.weights)


# ---- the reference itself, against finite differences of plain expm -------------------------


def _loss_by_expm(prob, A, X0, F):
    """MSE loss from one (n+1)-augmented expm per column and interval (no adjoint)."""
    n, S = F.shape
    Y = prob.loss.targets
    total = 0.0
    for j in range(S):
        M = np.zeros((n + 1, n + 1))
        M[:n, :n], M[:n, n] = A, F[:, j]
        u, prev = np.append(X0[:, j], 1.0), 0.0
        for i, t in enumerate(TIMES):
            u = scipy.linalg.expm((t - prev) * M) @ u
            total += np.sum((u[:n] - Y[i, :, j]) ** 2) / (len(TIMES) * n)
            prev = t
    return total / S


def _generator_matrix(prob, P, theta):
    W = np.zeros((N, N))
    W[P.nonzero()] = np.logaddexp(0.0, theta)  # CSR order = row-major order of nonzero()
    return prob.A0 + W - np.diag(W.sum(axis=1))


def _central(f, x, h=1e-6):
    grad = np.empty(x.size)
    for p in range(x.size):
        e = np.zeros(x.size)
        e.flat[p] = h
        grad[p] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def test_reference_generator_gradient_matches_finite_differences():
    prob = _problem()
    P = _pattern("csr")
    param = dd.GeneratorParam(P, "softplus")
    theta = _theta(param)
    _, ref = exact_loss_and_grad(prob, theta, param)
    fd = _central(lambda t: _loss_by_expm(prob, _generator_matrix(prob, P, t), prob.x0, prob.F),
                  theta)
    assert relative_error(ref, fd) <= 1e-7


def test_x0_and_F_gradients_match_finite_differences():
    """Both the package and the reference, against central differences of plain expm."""
    prob = _problem()
    param = dd.EdgeParam(_pattern("csr"), "identity")
    theta = _theta(param)
    _, grads = dd.loss_and_grad(prob, theta, param, wrt=("x0", "F"))
    assert set(grads) == {"x0", "F"}
    A = prob.A0 + param.pattern.matrix(theta).toarray()
    fd_x0 = _central(lambda x: _loss_by_expm(prob, A, x.reshape(N, S), prob.F),
                     prob.x0.ravel()).reshape(N, S)
    fd_F = _central(lambda f: _loss_by_expm(prob, A, prob.x0, f.reshape(N, S)),
                    prob.F.ravel()).reshape(N, S)
    assert relative_error(grads["x0"], fd_x0) <= 1e-7
    assert relative_error(grads["F"], fd_F) <= 1e-7


def test_x0_gradient_without_x0_and_F_gradient_without_forcing():
    """x0 = None (zero start) still has a gradient; F = 0 has one too (int lambda dt)."""
    rng = np.random.default_rng(2)
    A0 = 0.3 * rng.standard_normal((N, N))
    F = np.zeros((N, S))
    x0 = rng.standard_normal((N, S))
    Y = rng.standard_normal((len(TIMES), N, S))
    for prob in (dd.Problem(A0, F, x0=x0, T=1.5, obs_times=TIMES, loss="mse", targets=Y),
                 dd.Problem(A0, rng.standard_normal((N, S)), T=1.5, obs_times=TIMES,
                            loss="mse", targets=Y)):
        theta = _theta(dd.SoftplusParam())
        _, grads = dd.loss_and_grad(prob, theta, wrt=("theta", "x0", "F"))
        _, ref = exact_loss_and_grad(prob, theta, wrt=("theta", "x0", "F"))
        for name in ("theta", "x0", "F"):
            assert relative_error(grads[name], ref[name]) <= 1e-10, name


# ---- the large-n path: no dense array, directional derivatives ------------------------------


def test_sparse_generator_directional_derivative_at_moderate_n():
    """n = 900 grid graph: the gradient's directional derivative against central differences
    of losses computed with scipy.sparse.linalg.expm_multiply (independent of the Krylov code)."""
    from scipy.sparse.linalg import expm_multiply

    side = 30
    n = side * side
    path = sp.diags([np.ones(side - 1), np.ones(side - 1)], [-1, 1], (side, side))
    grid = sp.kron(sp.identity(side), path) + sp.kron(path, sp.identity(side))
    P = sp.csr_matrix(grid)
    rng = np.random.default_rng(0)
    x0 = rng.random((n, 2))
    times = (1.0, 2.0)
    param = dd.GeneratorParam(P, "softplus")
    planted = 0.3 * rng.standard_normal(param.theta_size(n))
    W = param.pattern.matrix(np.logaddexp(0.0, planted))
    targets = np.stack([expm_multiply(t * (W - sp.diags(np.asarray(W.sum(axis=1)).ravel())), x0)
                        for t in times]) + 0.01 * rng.standard_normal((2, n, 2))
    theta = planted + 0.3 * rng.standard_normal(planted.size)
    prob = dd.Problem(sp.csr_matrix((n, n)), np.zeros((n, 2)), x0=x0, T=2.0, obs_times=times,
                      loss="mse", targets=targets)
    _, grad = dd.loss_and_grad(prob, theta, param)

    def loss(t):
        Wt = param.pattern.matrix(np.logaddexp(0.0, t))
        A = (Wt - sp.diags(np.asarray(Wt.sum(axis=1)).ravel())).tocsc()
        states = [expm_multiply(tt * A, x0) for tt in times]
        return sum(np.sum((s - y) ** 2) for s, y in zip(states, targets, strict=True)) \
            / (2 * n * 2)

    direction = rng.standard_normal(theta.size)
    h = 1e-3  # fourth-order differences: truncation ~h^4, rounding ~eps L / h
    fd = (-loss(theta + 2 * h * direction) + 8 * loss(theta + h * direction)
          - 8 * loss(theta - h * direction) + loss(theta - 2 * h * direction)) / (12 * h)
    assert abs(grad @ direction - fd) <= 1e-8 * abs(fd)


# ---- inputs ----------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_clear_errors():
    prob = _problem()
    with pytest.raises(ValueError, match="transform"):
        dd.EdgeParam(_pattern("csr"), "relu")
    with pytest.raises(ValueError, match="square"):
        dd.EdgeParam(np.ones((3, 4)))
    with pytest.raises(ValueError, match="0/1"):
        dd.EdgeParam(2.0 * np.eye(3))
    with pytest.raises(ValueError, match="no entries"):
        dd.GeneratorParam(sp.csr_matrix((3, 3)))
    with pytest.raises(TypeError, match="pattern"):
        dd.EdgeParam([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="n = 10"):
        dd.loss_and_grad(prob, np.zeros(5), dd.EdgeParam(np.eye(4)))
    param = dd.EdgeParam(_pattern("csr"))
    with pytest.raises(ValueError, match="theta_size"):
        dd.loss_and_grad(prob, np.zeros(N), param)
    with pytest.raises(TypeError, match="wrt"):
        dd.loss_and_grad(prob, np.zeros(N), wrt="x0")
    with pytest.raises(ValueError, match="wrt"):
        dd.loss_and_grad(prob, np.zeros(N), wrt=("theta", "A0"))
    with pytest.raises(TypeError, match="Stack part 1"):
        dd.Stack(dd.SoftplusParam(), object())
    with pytest.raises(ValueError, match="non-finite"):
        dd.loss_and_grad(prob, np.full(param.theta_size(N), 800.0), dd.EdgeParam(
            _pattern("csr"), "exp"))


def test_params_pickle_and_train_with_fit():
    """Picklable (the Dask service ships them); fit lowers the loss of a generator model."""
    param = dd.Stack(dd.SoftplusParam(), dd.GeneratorParam(_pattern("csr"), "softplus"))
    again = pickle.loads(pickle.dumps(param))
    prob = _problem()
    theta = _theta(param)
    np.testing.assert_array_equal(dd.loss_and_grad(prob, theta, param)[1],
                                  dd.loss_and_grad(prob, theta, again)[1])
    trained, history = dd.fit(prob, theta, param, epochs=5, lr=0.05, batch_size=S)
    assert trained.shape == theta.shape
    assert history[-1] < history[0]


# ---- GPU --------------------------------------------------------------------------------------


def _gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() == 0, reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("which", ["edge", "generator", "stack"])
def test_pattern_params_on_gpu_match_reference(which):
    import cupy
    import cupyx.scipy.sparse

    host = _problem(sparse_A0=True)
    prob = host.to_device(cupy)
    assert isinstance(prob.A0, cupyx.scipy.sparse.csr_matrix)
    param = _params("csr", "softplus")[which]
    theta = _theta(param)
    loss, grads = dd.loss_and_grad(prob, cupy.asarray(theta), param, wrt=("theta", "x0", "F"))
    ref_loss, ref = exact_loss_and_grad(host, theta, param, wrt=("theta", "x0", "F"))
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name in ("theta", "x0", "F"):
        assert isinstance(grads[name], cupy.ndarray)
        assert relative_error(cupy.asnumpy(grads[name]), ref[name]) <= 1e-10, name
    states = dd.solve(prob, cupy.asarray(theta), param)
    assert isinstance(states, cupy.ndarray)
