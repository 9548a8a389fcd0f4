"""Shared helpers for the numerical-core tests: small random problems with known structure."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse


def random_arrays(n: int, S: int, scale: float = 0.3, seed: int = 0, sparse: bool = False,
                  density: float = 0.4, symmetric: bool = False):
    """(A0, F, labels, theta) for a random problem.

    A0: scale * randn(n, n) with zero diagonal (dense), or a random CSR matrix with that
    distribution on ``density`` of its off-diagonal entries; symmetric on request.
    F: randn(n, S); labels: ints in [0, n); theta: 0.5 * randn(n).
    """
    rng = np.random.default_rng(seed)
    A0 = scale * rng.standard_normal((n, n))
    if sparse:
        A0 = A0 * (rng.random((n, n)) < density)
    if symmetric:
        A0 = np.triu(A0, 1)
        A0 = A0 + A0.T
    np.fill_diagonal(A0, 0.0)
    F = rng.standard_normal((n, S))
    labels = rng.integers(0, n, S)
    theta = 0.5 * rng.standard_normal(n)
    if sparse:
        A0 = scipy.sparse.csr_matrix(A0)
    return A0, F, labels, theta


def dense(A0) -> np.ndarray:
    """A0 as a dense ndarray (scipy.sparse or ndarray in)."""
    return A0.toarray() if scipy.sparse.issparse(A0) else np.asarray(A0)


@pytest.fixture
def small_arrays():
    """n = 10, S = 6, A0 scale 0.3 (large enough to expose a wrong-sign adjoint)."""
    return random_arrays(10, 6, scale=0.3, seed=11)


# ---- Dask: one LocalCluster of worker processes per test module ------------------------------
# A module may set DASK_CONFIG = {...} (e.g. {"distributed.scheduler.allowed-failures": 1}) for
# the cluster its tests share.


@pytest.fixture(scope="module")
def cluster(request):
    """A LocalCluster of 2 single-thread worker processes, its dashboard on a free port."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(getattr(request.module, "DASK_CONFIG", {})), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    """A Client of the module's cluster, once both workers are up."""
    from distributed import Client

    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield client
