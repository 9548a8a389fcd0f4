"""The Dask service trains an operator parametrisation (theta of length n + nnz) like dd.fit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import diagode_dist as dd
from diagode_dist.service import fit_distributed

TRAIN = {"epochs": 2, "lr": 2e-2, "batch_size": 6, "seed": 3}


def _problem_and_param():
    rng = np.random.default_rng(4)
    n, S = 24, 14
    A0 = sp.csr_matrix(0.2 * sp.random(n, n, density=0.2, random_state=1).toarray())
    times = (0.5, 1.0)
    prob = dd.Problem(A0, rng.standard_normal((n, S)), x0=rng.standard_normal((n, S)), T=1.0,
                      obs_times=times, loss="mse",
                      targets=rng.standard_normal((len(times), n, S)))
    pattern = sp.random(n, n, density=0.15, random_state=2, format="csr")
    param = dd.Stack(dd.SoftplusParam(), dd.GeneratorParam(pattern, "softplus"))
    return prob, param


def test_fit_distributed_with_a_generator_equals_fit(client):
    prob, param = _problem_and_param()
    theta0 = np.zeros(param.theta_size(prob.n))
    assert theta0.size > prob.n
    theta_ref, history_ref = dd.fit(prob, theta0, param, **TRAIN)
    theta, history = fit_distributed(client, prob, theta0, param, n_shards=3, step_timeout=60,
                                     **TRAIN)
    assert np.max(np.abs(theta - theta_ref)) <= 1e-12 * np.max(np.abs(theta_ref))
    np.testing.assert_allclose(history, history_ref, rtol=1e-12)
    assert not np.array_equal(theta[prob.n:], theta0[prob.n:])  # the edge weights trained


def test_theta0_of_the_wrong_length_is_refused(client):
    prob, param = _problem_and_param()
    with pytest.raises(ValueError, match="theta_size"):
        fit_distributed(client, prob, np.zeros(prob.n), param, n_shards=2, **TRAIN)
