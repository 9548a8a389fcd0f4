"""The same numerics on CuPy arrays (dense and cupyx CSR) against the exact dense reference.

Skipped, with the reason, where CuPy is not installed or no CUDA device is visible.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense, random_arrays

from diagode_dist.reference import reference_loss_and_grad, relative_error

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (the gpu extra)")


def _device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, no device
        return 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_device_count() == 0, reason="CuPy imports but no CUDA device is visible"),
]

import cupyx.scipy.sparse  # noqa: E402

import diagode_dist as dd  # noqa: E402

T, BETA = 2.0, 10.0


def _param(name):
    return {"softplus": dd.SoftplusParam, "exp": dd.ExpParam}[name]()


def _on_gpu(A0, F, labels, theta):
    A0_gpu = (cupyx.scipy.sparse.csr_matrix(A0) if hasattr(A0, "tocsr")
              else cupy.asarray(A0))
    prob = dd.Problem(A0_gpu, cupy.asarray(F), labels, T=T, beta=BETA)
    return prob, cupy.asarray(theta)


def _check(A0, F, labels, theta, param_name, columns=None, grad_rtol=1e-8, **kwargs):
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    assert prob.xp is cupy
    loss, grad = dd.loss_and_grad(prob, theta_gpu, param=_param(param_name), columns=columns,
                                  **kwargs)
    assert type(loss) is float
    assert isinstance(grad, cupy.ndarray) and grad.shape == theta.shape
    ref_loss, ref_grad = reference_loss_and_grad(dense(A0), F, labels, T, BETA, theta,
                                                 param_name, columns=columns)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (loss, ref_loss)
    err = relative_error(cupy.asnumpy(grad), ref_grad)
    assert err <= grad_rtol, f"gradient relative error {err:.3e}"
    return loss, cupy.asnumpy(grad)


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("columns", [None, [4, 1, 2]], ids=["all", "subset"])
def test_small_problem_default_settings(param_name, sparse, columns):
    A0, F, labels, theta = random_arrays(10, 6, scale=0.3, seed=11, sparse=sparse)
    _check(A0, F, labels, theta, param_name, columns=columns)


@pytest.mark.parametrize("param_name", ["softplus", "exp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_k_equal_n_is_exact(param_name, sparse):
    A0, F, labels, theta = random_arrays(10, 6, scale=0.3, seed=12, sparse=sparse)
    _check(A0, F, labels, theta, param_name, k=10, grad_rtol=1e-11)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_larger_than_k_matches_reference_and_cpu(sparse):
    A0, F, labels, theta = random_arrays(64, 12, scale=0.05, seed=13, sparse=sparse)
    loss_gpu, grad_gpu = _check(A0, F, labels, theta, "softplus")
    cpu = dd.Problem(A0, F, labels, T=T, beta=BETA)
    loss_cpu, grad_cpu = dd.loss_and_grad(cpu, theta)
    assert abs(loss_gpu - loss_cpu) <= 1e-13 * abs(loss_cpu)
    assert relative_error(grad_gpu, grad_cpu) <= 1e-12


def test_breakdown_columns_on_gpu():
    """A0 = 0 with two diagonal values, and a zero forcing column: exact, nothing dropped."""
    n, S = 40, 6
    _, F, labels, _ = random_arrays(n, S, seed=22)
    F[:, 3] = 0.0
    theta = np.where(np.arange(n) % 2 == 0, 0.3, -0.4)
    loss, _ = _check(np.zeros((n, n)), F, labels, theta, "softplus", grad_rtol=1e-11)
    prob, theta_gpu = _on_gpu(np.zeros((n, n)), F, labels, theta)
    per_column = [dd.loss_and_grad(prob, theta_gpu, columns=[j])[0] for j in range(S)]
    assert abs(loss - np.mean(per_column)) <= 1e-13 * abs(loss)


def test_chunking_and_repeatability_on_gpu():
    A0, F, labels, theta = random_arrays(48, 7, scale=0.05, seed=31)
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    results = {c: dd.loss_and_grad(prob, theta_gpu, max_chunk_columns=c) for c in (1, 3, 7)}
    for c in (1, 3):
        assert abs(results[c][0] - results[7][0]) <= 1e-13 * abs(results[7][0])
        assert relative_error(cupy.asnumpy(results[c][1]), cupy.asnumpy(results[7][1])) <= 1e-13
    again = dd.loss_and_grad(prob, theta_gpu, max_chunk_columns=3)
    assert again[0] == results[3][0]
    assert bool((again[1] == results[3][1]).all())


def test_fit_on_gpu_matches_cpu():
    A0, F, labels, theta = random_arrays(16, 10, scale=0.1, seed=51)
    prob, theta_gpu = _on_gpu(A0, F, labels, theta)
    kw = dict(epochs=2, lr=0.05, batch_size=4, seed=0)
    theta_g, hist_g = dd.fit(prob, theta_gpu, **kw)
    theta_c, hist_c = dd.fit(dd.Problem(A0, F, labels, T=T, beta=BETA), theta, **kw)
    np.testing.assert_allclose(cupy.asnumpy(theta_g), theta_c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist_g, hist_c, rtol=1e-12)
