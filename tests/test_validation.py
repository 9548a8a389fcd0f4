"""Bad input raises a clear ValueError / TypeError that names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from conftest import random_arrays

import diagode_dist as dd

N, S = 6, 4


@pytest.fixture
def arrays():
    A0, F, labels, theta = random_arrays(N, S, scale=0.3, seed=41)
    return A0, F, labels, theta


@pytest.fixture
def prob(arrays):
    A0, F, labels, _ = arrays
    return dd.Problem(A0, F, labels, T=2.0, beta=10.0)


def _with(a, index, value):
    a = np.array(a, dtype=float)
    a[index] = value
    return a


# ---- Problem ---------------------------------------------------------------------------------

BAD_A0 = {
    "non-square": (lambda A0: A0[:, :-1], ValueError),
    "1-D": (lambda A0: A0[0], ValueError),
    "3-D": (lambda A0: A0[None], ValueError),
    "wrong size": (lambda A0: np.zeros((N + 1, N + 1)), ValueError),
    "nan": (lambda A0: _with(A0, (1, 2), np.nan), ValueError),
    "inf": (lambda A0: _with(A0, (0, 3), np.inf), ValueError),
    "-inf": (lambda A0: _with(A0, (2, 0), -np.inf), ValueError),
    "complex": (lambda A0: A0 + 1j, TypeError),
    "sparse non-square": (lambda A0: scipy.sparse.csr_matrix(A0[:, :-1]), ValueError),
    "sparse wrong size": (lambda A0: scipy.sparse.csr_matrix((N + 2, N + 2)), ValueError),
    "sparse nan": (lambda A0: scipy.sparse.csr_matrix(_with(A0, (1, 2), np.nan)), ValueError),
    "sparse inf": (lambda A0: scipy.sparse.csr_matrix(_with(A0, (1, 2), np.inf)), ValueError),
}


@pytest.mark.parametrize("case", list(BAD_A0))
def test_bad_A0(arrays, case):
    A0, F, labels, _ = arrays
    make, error = BAD_A0[case]
    with pytest.raises(error, match=r"\bA0\b"):
        dd.Problem(make(A0), F, labels)


BAD_F = {
    "1-D": (lambda F: F[:, 0], ValueError),
    "no columns": (lambda F: F[:, :0], ValueError),
    "nan": (lambda F: _with(F, (0, 1), np.nan), ValueError),
    "inf": (lambda F: _with(F, (3, 2), np.inf), ValueError),
    "sparse": (lambda F: scipy.sparse.csr_matrix(F), TypeError),
    "complex": (lambda F: F + 0j, TypeError),
}


@pytest.mark.parametrize("case", list(BAD_F))
def test_bad_F(arrays, case):
    A0, F, labels, _ = arrays
    make, error = BAD_F[case]
    bad = make(F)
    labels = labels[: bad.shape[1]] if bad.ndim == 2 else labels
    with pytest.raises(error, match=r"\bF\b"):
        dd.Problem(A0, bad, labels)


def test_F_rows_must_match_A0(arrays):
    """A0 (n, n) with F of n + 1 rows: an error naming A0 or F."""
    A0, F, labels, _ = arrays
    with pytest.raises(ValueError, match=r"\b(A0|F)\b"):
        dd.Problem(A0, np.vstack([F, F[:1]]), labels)


BAD_LABELS = {
    "too short": (lambda lab: lab[:-1], ValueError),
    "too long": (lambda lab: np.append(lab, 0), ValueError),
    "2-D": (lambda lab: lab[None], ValueError),
    "equal to n": (lambda lab: _with(lab, 1, N).astype(np.int64), ValueError),
    "negative": (lambda lab: _with(lab, 2, -1).astype(np.int64), ValueError),
    "float": (lambda lab: lab + 0.5, TypeError),
    "strings": (lambda lab: np.array(["a"] * S), TypeError),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_labels(arrays, case):
    A0, F, labels, _ = arrays
    make, error = BAD_LABELS[case]
    with pytest.raises(error, match=r"\blabels\b"):
        dd.Problem(A0, F, make(labels))


@pytest.mark.parametrize("T, error", [(0.0, ValueError), (-1.0, ValueError),
                                      (np.nan, ValueError), (np.inf, ValueError),
                                      ("2", TypeError), (None, TypeError)])
def test_bad_T(arrays, T, error):
    A0, F, labels, _ = arrays
    with pytest.raises(error, match=r"\bT\b"):
        dd.Problem(A0, F, labels, T=T)


@pytest.mark.parametrize("beta", [np.nan, np.inf])
def test_bad_beta(arrays, beta):
    A0, F, labels, _ = arrays
    with pytest.raises(ValueError, match=r"\bbeta\b"):
        dd.Problem(A0, F, labels, beta=beta)


@pytest.mark.parametrize("case", ["shape", "nan"])
def test_bad_x0(arrays, case):
    A0, F, labels, _ = arrays
    x0 = np.zeros((N, S + 1)) if case == "shape" else _with(np.zeros((N, S)), (0, 0), np.nan)
    with pytest.raises(ValueError, match=r"\bx0\b"):
        dd.Problem(A0, F, labels, x0=x0)


def test_problem_does_not_modify_or_copy_A0(arrays):
    A0, F, labels, _ = arrays
    before = A0.copy()
    prob = dd.Problem(A0, F, labels)
    assert np.array_equal(A0, before)
    assert prob.n == N and prob.S == S and prob.n_columns == S


# ---- loss_and_grad ---------------------------------------------------------------------------

BAD_THETA = {
    "too short": (lambda th: th[:-1], ValueError),
    "too long": (lambda th: np.append(th, 0.0), ValueError),
    "2-D": (lambda th: th[None], ValueError),
    "nan": (lambda th: _with(th, 2, np.nan), ValueError),
    "inf": (lambda th: _with(th, 0, np.inf), ValueError),
    "-inf": (lambda th: _with(th, 0, -np.inf), ValueError),
}


@pytest.mark.parametrize("case", list(BAD_THETA))
def test_bad_theta(prob, arrays, case):
    theta = arrays[3]
    make, error = BAD_THETA[case]
    with pytest.raises(error, match=r"\btheta\b"):
        dd.loss_and_grad(prob, make(theta))
    with pytest.raises(error, match=r"\btheta\b"):
        dd.loss_grad_sums(prob, make(theta))


def test_theta_overflowing_exp_param(prob, arrays):
    """ExpParam: d = -exp(theta) overflows for theta > ~709; documented as a ValueError."""
    theta = _with(arrays[3], 1, 800.0)
    with pytest.raises(ValueError, match=r"\btheta\b"):
        dd.loss_and_grad(prob, theta, param=dd.ExpParam())


@pytest.mark.parametrize("k", [0, -1])
def test_bad_k(prob, arrays, k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        dd.loss_and_grad(prob, arrays[3], k=k)


BAD_COLUMNS = {
    "empty": ([], ValueError),
    "equal to S": ([0, S], ValueError),
    "negative": ([-1, 0], ValueError),
    "2-D": ([[0, 1]], ValueError),
    "float": ([0.0, 1.5], TypeError),
}


@pytest.mark.parametrize("case", list(BAD_COLUMNS))
def test_bad_columns(prob, arrays, case):
    columns, error = BAD_COLUMNS[case]
    with pytest.raises(error, match=r"\bcolumns\b"):
        dd.loss_and_grad(prob, arrays[3], columns=np.asarray(columns))
    with pytest.raises(error, match=r"\bcolumns\b"):
        dd.loss_grad_sums(prob, arrays[3], columns=np.asarray(columns))


@pytest.mark.parametrize("chunk", [0, -2])
def test_bad_max_chunk_columns(prob, arrays, chunk):
    with pytest.raises(ValueError, match=r"\bmax_chunk_columns\b"):
        dd.loss_and_grad(prob, arrays[3], max_chunk_columns=chunk)


def test_bad_param(prob, arrays):
    with pytest.raises(TypeError, match=r"\bparam\b"):
        dd.loss_and_grad(prob, arrays[3], param="softplus")


# ---- fit and Adam ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    ({"epochs": 0}, ValueError, "epochs"),
    ({"epochs": 2.5}, TypeError, "epochs"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"lr": 0.0}, ValueError, "lr"),
    ({"lr": -1e-3}, ValueError, "lr"),
    ({"lr": np.nan}, ValueError, "lr"),
    ({"lr": np.inf}, ValueError, "lr"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"weight_decay": np.nan}, ValueError, "weight_decay"),
    ({"weight_decay": np.inf}, ValueError, "weight_decay"),
    ({"clamp": (1.0, -1.0)}, ValueError, "clamp"),
    ({"clamp": (np.nan, 1.0)}, ValueError, "clamp"),
    ({"k": 0}, ValueError, "k"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"callback": "print"}, TypeError, "callback"),
    ({"param": object()}, TypeError, "param"),
])
def test_bad_fit_arguments(prob, arrays, kwargs, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        dd.fit(prob, arrays[3], **kwargs)


@pytest.mark.parametrize("case", ["too short", "nan"])
def test_bad_theta0_in_fit(prob, arrays, case):
    make, error = BAD_THETA[case]
    with pytest.raises(error, match="theta"):
        dd.fit(prob, make(arrays[3]))


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": 0.0}, "lr"),
    ({"lr": np.inf}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas"),
    ({"betas": (0.9, -0.1)}, r"betas"),
    ({"betas": (np.nan, 0.999)}, r"betas"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"weight_decay": np.nan}, "weight_decay"),
    ({"clamp": (2.0, 2.0)}, "clamp"),
])
def test_bad_adam_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        dd.Adam(**kwargs)
