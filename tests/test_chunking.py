"""Chunk independence and determinism.

Truncation is decided per column, so splitting the columns into chunks of 1, 3 or S changes
nothing but the summation order; and the same call twice gives the same floats.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense, random_arrays

import diagode_dist as dd
from diagode_dist.reference import reference_loss_and_grad, relative_error

T, BETA = 2.0, 10.0


def _problem(sparse: bool):
    """n = 48 > k = 30, S = 7 (not a multiple of 3), A0 scale 0.05."""
    A0, F, labels, theta = random_arrays(48, 7, scale=0.05, seed=31, sparse=sparse)
    return dd.Problem(A0, F, labels, T=T, beta=BETA), A0, F, labels, theta


@pytest.mark.parametrize("param", [dd.SoftplusParam(), dd.ExpParam()], ids=repr)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("columns", [None, [6, 0, 2, 5, 3]], ids=["all", "subset"])
def test_chunk_size_does_not_change_the_result(param, sparse, columns):
    prob, A0, F, labels, theta = _problem(sparse)
    S = prob.S
    results = {c: dd.loss_and_grad(prob, theta, param=param, columns=columns,
                                   max_chunk_columns=c)
               for c in (1, 3, S)}
    loss_S, grad_S = results[S]
    for c in (1, 3):
        loss_c, grad_c = results[c]
        assert abs(loss_c - loss_S) <= 1e-13 * abs(loss_S), (c, loss_c, loss_S)
        assert relative_error(grad_c, grad_S) <= 1e-13, c
    # and all of them are right
    name = "exp" if isinstance(param, dd.ExpParam) else "softplus"
    ref_loss, ref_grad = reference_loss_and_grad(dense(A0), F, labels, T, BETA, theta, name,
                                                 columns=columns)
    assert abs(loss_S - ref_loss) <= 1e-12 * abs(ref_loss)
    assert relative_error(grad_S, ref_grad) <= 1e-8


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_repeated_calls_are_bit_identical(sparse, chunk):
    prob, _, _, _, theta = _problem(sparse)
    first = dd.loss_and_grad(prob, theta, max_chunk_columns=chunk)
    for _ in range(2):
        again = dd.loss_and_grad(prob, theta, max_chunk_columns=chunk)
        assert again[0] == first[0]
        assert np.array_equal(again[1], first[1])
    sums = dd.loss_grad_sums(prob, theta, max_chunk_columns=chunk)
    sums_again = dd.loss_grad_sums(prob, theta, max_chunk_columns=chunk)
    assert sums[0] == sums_again[0] and sums[2] == sums_again[2]
    assert np.array_equal(sums[1], sums_again[1])


def test_select_gives_the_same_as_columns():
    """prob.select(cols) is the same problem restricted; its result matches columns=cols."""
    prob, _, _, _, theta = _problem(False)
    cols = np.array([4, 1, 6])
    loss, grad = dd.loss_and_grad(prob, theta, columns=cols)
    sub = prob.select(cols)
    assert sub.S == 3 and sub.A0 is prob.A0
    loss_sub, grad_sub = dd.loss_and_grad(sub, theta)
    assert abs(loss_sub - loss) <= 1e-14 * abs(loss)
    assert relative_error(grad_sub, grad) <= 1e-13


# ---- the memory budget: fixed once per process and device -----------------------------------

def test_budget_and_chunks_stable_while_free_memory_changes(monkeypatch):
    """Free host memory changes between calls; the budget, the chunks and so the floats do
    not."""
    from diagode_dist import adjoint

    available = iter([8 << 30, 1 << 30, 3 << 30, 200 << 20])
    monkeypatch.setattr(adjoint, "_BUDGETS", {})
    monkeypatch.setattr(adjoint, "_available_host_bytes", lambda: next(available))
    budgets = [adjoint.memory_budget(np) for _ in range(3)]
    assert budgets == [2 << 30] * 3  # a quarter of the first reading, then fixed
    prob, _, _, _, theta = _problem(False)
    assert adjoint._default_chunk(prob, 30) == adjoint._default_chunk(prob, 30)


class _FakeCupy:
    """The CUDA runtime and memory pool as memory_budget sees them (no GPU needed): a pool that
    keeps freed blocks lowers the driver's free memory after a call."""

    __name__ = "cupy"

    def __init__(self, free, pool_free, total=80 << 30, external=False):
        from types import SimpleNamespace

        self.readings = iter(free)
        readings = iter(pool_free)

        class Pool:
            def free_bytes(self):
                return next(readings)

            def malloc(self, size):
                raise AssertionError("nothing is allocated")

        pool = Pool()
        self.get_default_memory_pool = lambda: pool
        allocator = (lambda size: None) if external else pool.malloc
        self.cuda = SimpleNamespace(
            runtime=SimpleNamespace(memGetInfo=lambda: (next(self.readings), total)),
            Device=lambda: SimpleNamespace(id=0), get_allocator=lambda: allocator)


def test_device_budget_counts_the_pool_and_stays_fixed(monkeypatch):
    from diagode_dist import adjoint

    monkeypatch.setattr(adjoint, "_BUDGETS", {})
    # first call: 40 GB free, 10 GB held unused by the pool -> budget (40 + 10) / 2
    fake = _FakeCupy(free=[40 << 30, 30 << 30], pool_free=[10 << 30, 20 << 30])
    assert adjoint._device_available_bytes(fake) == 50 << 30
    assert adjoint._device_available_bytes(fake) == 50 << 30  # the same memory, pool or not
    fake = _FakeCupy(free=[40 << 30, 20 << 30], pool_free=[0, 0])
    first = adjoint.memory_budget(fake)
    assert first == 20 << 30 and adjoint.memory_budget(fake) == first
    rmm = _FakeCupy(free=[1 << 30], pool_free=[0], total=80 << 30, external=True)
    assert adjoint._device_available_bytes(rmm) == int(0.8 * (80 << 30))
