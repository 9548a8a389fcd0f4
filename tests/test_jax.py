"""The JAX layer: gradients against jax.scipy.linalg.expm + grad, check_grads, jit, vmap."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.experimental.sparse import BCOO  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from diagode_dist import jax as ddj  # noqa: E402

jax.config.update("jax_enable_x64", True)
pytestmark = pytest.mark.slow  # JAX compiles every new shape (seconds each on a loaded machine)


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _operator(n, seed=0, density=0.4):
    rng = np.random.default_rng(seed)
    dense = 0.5 * rng.standard_normal((n, n)) * (rng.random((n, n)) < density)
    return BCOO.fromdense(jnp.asarray(dense))


def _augmented_states(A, f, x0, times):
    """States (m, n, S) of x' = A x + f by jax.scipy.linalg.expm of [[A, F], [0, 0]]."""
    n, S = f.shape
    augmented = jnp.block([[A, f], [jnp.zeros((S, n)), jnp.zeros((S, S))]])
    start = jnp.concatenate([x0, jnp.eye(S)])
    return jnp.stack([(jax.scipy.linalg.expm(t * augmented) @ start)[:n] for t in times])


def test_expm_multiply_matches_jax_expm_grad_under_jit():
    n, S = 12, 3
    sparse = _operator(n)
    rng = np.random.default_rng(1)
    B, upstream = (jnp.asarray(rng.standard_normal((n, S))) for _ in range(2))

    def ours(values, B, t):
        return (ddj.expm_multiply(BCOO((values, sparse.indices), shape=(n, n)), B, t)
                * upstream).sum()

    def peer(values, B, t):
        A = BCOO((values, sparse.indices), shape=(n, n)).todense()
        return ((jax.scipy.linalg.expm(t * A) @ B) * upstream).sum()

    args = (sparse.data, B, 0.7)
    assert abs(ours(*args) - peer(*args)) < 1e-12 * abs(peer(*args))
    mine = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
    theirs = jax.grad(peer, argnums=(0, 1, 2))(*args)
    for a, b in zip(mine, theirs, strict=True):
        assert _rel(a, b) < 1e-10


def test_odeint_linear_matches_jax_expm_grad_for_every_input():
    n, S = 9, 2
    rng = np.random.default_rng(2)
    A = _operator(n, seed=2).todense()
    f, x0 = (jnp.asarray(rng.standard_normal((n, S))) for _ in range(2))
    d = -jnp.asarray(rng.random(n))
    times = jnp.asarray([0.0, 0.5, 1.25])
    upstream = jnp.asarray(rng.standard_normal((3, n, S)))

    def ours(A, f, x0, d, t):
        return (ddj.odeint_linear(A, f=f, x0=x0, t=t, d=d) * upstream).sum()

    def peer(A, f, x0, d, t):
        return (_augmented_states(A + jnp.diag(d), f, x0, t) * upstream).sum()

    args = (A, f, x0, d, times)
    mine = jax.grad(ours, argnums=range(5))(*args)
    theirs = jax.grad(peer, argnums=range(5))(*args)
    for a, b in zip(mine, theirs, strict=True):
        assert _rel(a, b) < 1e-10


def test_rational_method_matches_jax_expm_grad_on_a_stiff_grid():
    """method="rational" (forward and backward) on a 3 x 3 grid Laplacian, ||t A|| ~ 100."""
    import scipy.sparse as sp

    path = sp.diags([np.ones(2), -2 * np.ones(3), np.ones(2)], [-1, 0, 1])
    L = sp.coo_matrix(sp.kron(path, sp.identity(3)) + sp.kron(sp.identity(3), path))
    indices = jnp.asarray(np.stack([L.row, L.col], axis=1))
    n, S = 9, 2
    rng = np.random.default_rng(6)
    B, upstream = (jnp.asarray(rng.standard_normal((n, S))) for _ in range(2))

    def ours(values, B, t):
        A = BCOO((values, indices), shape=(n, n))
        return (ddj.expm_multiply(A, B, t, method="rational") * upstream).sum()

    def peer(values, B, t):
        A = BCOO((values, indices), shape=(n, n)).todense()
        return ((jax.scipy.linalg.expm(t * A) @ B) * upstream).sum()

    args = (jnp.asarray(L.data), B, 15.0)
    mine = jax.grad(ours, argnums=(0, 1, 2))(*args)
    theirs = jax.grad(peer, argnums=(0, 1, 2))(*args)
    for a, b in zip(mine, theirs, strict=True):
        assert _rel(a, b) < 1e-10


def test_check_grads_reverse_mode():
    n, S = 6, 2
    sparse = _operator(n, seed=3)
    rng = np.random.default_rng(3)
    f = jnp.asarray(rng.standard_normal((n, S)))
    d = -jnp.asarray(rng.random(n))

    def layer(values, f, d, t):
        A = BCOO((values, sparse.indices), shape=(n, n))
        return ddj.odeint_linear(A, f=f, t=t, d=d)

    check_grads(layer, (sparse.data, f, d, jnp.asarray([0.4, 1.0])), order=1, modes=["rev"])


def test_vmap_loops_over_the_batch():
    n, S = 8, 2
    A = _operator(n, seed=4)
    batch = jnp.asarray(np.random.default_rng(4).standard_normal((3, n, S)))
    out = jax.vmap(lambda B: ddj.expm_multiply(A, B, 0.3))(batch)
    expm = jax.scipy.linalg.expm(0.3 * A.todense())
    assert _rel(out, jnp.einsum("ij,bjs->bis", expm, batch)) < 1e-12


def test_float32():
    n, S = 10, 3
    A = _operator(n, seed=5)
    B = jnp.asarray(np.random.default_rng(5).standard_normal((n, S)))
    out = ddj.expm_multiply(BCOO((A.data.astype(jnp.float32), A.indices), shape=(n, n)),
                            B.astype(jnp.float32))
    assert out.dtype == jnp.float32
    assert _rel(out.astype(jnp.float64), jax.scipy.linalg.expm(A.todense()) @ B) < 1e-5


def test_bad_arguments_raise_clear_errors():
    A = _operator(5).todense()
    B = jnp.ones((5, 2))
    cases = [
        (lambda: ddj.expm_multiply("A", B), TypeError, "A must be a jax array"),
        (lambda: ddj.expm_multiply(A[:, :4], B), ValueError, "square"),
        (lambda: ddj.expm_multiply(A.astype(jnp.int32), B), TypeError, "float32 or float64"),
        (lambda: ddj.expm_multiply(A, B.astype(jnp.float32)), TypeError, "x0 must have"),
        (lambda: ddj.expm_multiply(A, B, -1.0), ValueError, "t must increase"),
        (lambda: ddj.odeint_linear(A), ValueError, "needs f or x0"),
        (lambda: ddj.odeint_linear(A, f=B, t=[1.0, 0.2]), ValueError, "t must increase"),
        (lambda: ddj.odeint_linear(A, f=B, d=B), ValueError, "d must have shape"),
        (lambda: ddj.odeint_linear(A, f=B, k=2), ValueError, "k must be >= 8"),
        (lambda: ddj.odeint_linear(A, f=B, method="lu"), ValueError, "method must be one of"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
