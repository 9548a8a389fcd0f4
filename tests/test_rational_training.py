"""Training with the rational (shift-and-invert) Krylov method: the ``method`` option in
``dd.fit``, the Dask service (LocalCluster of worker processes, checkpoints) and the CLI, and
float32 on the rational path.

Accuracy is judged against an Adam loop on the exact gradients of ``diagode_dist.reference``
(same minibatches, same optimiser): both methods must land on its theta within what their
gradient accuracy allows.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import diagode_dist as dd
from diagode_dist import adjoint, rational
from diagode_dist._array import gpu_available
from diagode_dist.config import parse_config
from diagode_dist.optim import Adam
from diagode_dist.options import TrainOptions
from diagode_dist.reference import exact_loss_and_grad, inverse_softplus, relative_error
from diagode_dist.service import fit_distributed, submit
from diagode_dist.service.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from diagode_dist.service.shard import shard_columns
from diagode_dist.train import epoch_batches

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-10
TRAIN = {"epochs": 2, "lr": 0.05, "batch_size": 4, "seed": 3, "rtol": RTOL}
# Adam normalises each component of the gradient, so a relative gradient error e moves theta
# by about e x lr per step: after 6 steps of lr 0.05 with e <= 10 rtol, 3e-9 x |theta|.
THETA_TOL = 1e-8


def _stiff_problem(m=30, stiffness=1e3, S=12, seed=0):
    """The 1-D Dirichlet Laplacian (m points, sparse) as A0 with T such that ||T A||_2 ~
    stiffness (polynomial Krylov at k = 30 sub-steps, the rational space covers T in one
    step), and theta0 = 0 (d = -log 2: stable, as the CLI starts)."""
    h = 1.0 / (m + 1)
    A0 = sp.diags([np.ones(m - 1), -2 * np.ones(m), np.ones(m - 1)], [-1, 0, 1],
                  format="csr") / h**2
    rng = np.random.default_rng(seed)
    prob = dd.Problem(A0, rng.standard_normal((m, S)), rng.integers(0, m, S),
                      T=stiffness * h**2 / 4.0, beta=50.0)
    return prob, np.zeros(m)


def _exact_fit(prob, theta0, epochs, lr, batch_size, seed, rtol=None):
    """dd.fit's schedule and optimiser on the exact gradients of the reference."""
    adam = Adam(lr=lr, weight_decay=0.0, clamp=TrainOptions().clamp)
    theta, state = theta0, adam.init(theta0)
    for epoch in range(epochs):
        for batch in epoch_batches(prob.S, batch_size, seed, epoch):
            _, grad = exact_loss_and_grad(prob, theta, columns=batch, precise=True)
            theta, state = adam.step(theta, grad, state)
    return theta


@pytest.fixture(scope="module")
def stiff():
    return _stiff_problem()


@pytest.fixture(scope="module")
def fits(stiff):
    """theta of dd.fit with each method (and its per-epoch log), and of the exact loop."""
    prob, theta0 = stiff
    out = {method: dd.fit(prob, theta0, options=TrainOptions(method=method, **TRAIN),
                          return_info=True)
           for method in ("polynomial", "rational")}
    out["exact"] = _exact_fit(prob, theta0, **{k: v for k, v in TRAIN.items() if k != "rtol"})
    return out


# ---- the option --------------------------------------------------------------------------------

def test_method_option_default_checks_and_wire():
    assert TrainOptions().method == "polynomial"
    assert set(rational.METHODS) == {"auto", "polynomial", "rational"}
    for method in rational.METHODS:
        options = TrainOptions(method=method)
        assert TrainOptions.from_wire(options.to_wire()).method == method
        assert options.describe()["method"] == method
    for bad in ("shift-invert", "Rational", 1, None):
        with pytest.raises(ValueError, match=r"^method must be one of auto, polynomial, "
                                             r"rational, got"):
            TrainOptions(method=bad)


def test_config_key_and_flag(tmp_path):
    from diagode_dist.cli import _build_parser
    from diagode_dist.options import options_from_flags

    for name in ("A0.npz", "F.npy", "labels.npy"):
        (tmp_path / name).write_bytes(b"")
    problem = {"A0": "A0.npz", "F": "F.npy", "labels": "labels.npy", "T": 1.0}
    config = parse_config({"problem": problem, "train": {"method": "rational"}},
                          base_dir=tmp_path)
    assert config.train.method == "rational"
    with pytest.raises(ValueError, match=r"\[train\] method must be one of"):
        parse_config({"problem": problem, "train": {"method": "krylov"}}, base_dir=tmp_path)
    parser = _build_parser()
    args = parser.parse_args(["train", "run.toml", "--method", "auto"])
    assert options_from_flags(args, config.train).method == "auto"  # the flag overrides
    args = parser.parse_args(["train", "run.toml"])
    assert options_from_flags(args, config.train).method == "rational"  # the config's
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "run.toml", "--method", "krylov"])


def test_fit_refuses_rational_with_a_dense_operator_before_work(monkeypatch):
    prob = dd.demo_problem(n=8, S=4)
    monkeypatch.setattr(importlib.import_module("diagode_dist.train"), "loss_grad_sums",
                        None)  # any work would fail differently
    with pytest.raises(ValueError, match="method='rational' needs a sparse A0"):
        dd.fit(prob, np.zeros(8), method="rational", epochs=1)


def test_submit_refuses_rational_with_a_dense_operator(client):
    prob = dd.demo_problem(n=8, S=4)
    with pytest.raises(ValueError, match="method='rational' needs a sparse A0"):
        submit(client, prob, np.zeros(8), method="rational", n_shards=2)


# ---- dd.fit --------------------------------------------------------------------------------------

def test_fit_with_each_method_matches_the_exact_gradient_loop(stiff, fits):
    """Both methods train to the theta of the exact-gradient loop within their accuracy, and
    the rational one really ran rational (one step per interval, where polynomial sub-steps)."""
    _, theta0 = stiff
    exact = fits["exact"]
    assert np.abs(exact - theta0).max() > 0.1  # it trained
    for method in ("polynomial", "rational"):
        theta, _, log = fits[method]
        assert log["method"] == [method] * TRAIN["epochs"]
        assert all(log["rtol_met"])
        assert relative_error(theta, exact) <= THETA_TOL, method
    assert max(fits["rational"][2]["substeps"]) == 1
    assert min(fits["polynomial"][2]["substeps"]) >= 2
    theta_p, theta_r = fits["polynomial"][0], fits["rational"][0]
    assert relative_error(theta_r, theta_p) <= 2 * THETA_TOL
    assert not np.array_equal(theta_r, theta_p)  # two computations, not one
    np.testing.assert_allclose(fits["rational"][1], fits["polynomial"][1], rtol=1e-8)


def test_fit_factorizes_once_per_step(stiff, monkeypatch):
    """One LU of I - gamma A per optimiser step, shared by every chunk of the minibatch."""
    prob, theta0 = stiff
    made = []

    class Counting(rational.ShiftInvert):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(adjoint, "ShiftInvert", Counting)
    dd.fit(prob, theta0, method="rational", epochs=1, batch_size=6, max_chunk_columns=2,
           rtol=RTOL)
    assert len(made) == 2  # S = 12 columns, 2 steps of 6 columns in 3 chunks each


# ---- float32 ----------------------------------------------------------------------------------

def _float32(prob):
    loss = prob.loss
    kwargs = {"T": prob.T, "beta": prob.beta}
    if prob.x0 is not None:
        kwargs["x0"] = prob.x0.astype(np.float32)
    if prob.labels is None:
        kwargs.update(obs_times=list(loss.obs_times), loss="mse",
                      targets=loss.targets.astype(np.float32))
    else:
        kwargs["labels"] = prob.labels
    return dd.Problem(prob.A0.astype(np.float32), prob.F.astype(np.float32), **kwargs)


def _observed_2d(N=5, stiffness=1e4):
    """2-D Laplacian with x0 and an MSE loss at three times: between them the adjoint decays
    by e^-170, which underflows to exactly zero in float32."""
    h = 1.0 / (N + 1)
    shift = sp.diags([np.ones(N - 1), np.ones(N - 1)], [-1, 1])
    A0 = sp.csr_matrix((sp.kron(sp.identity(N), shift) + sp.kron(shift, sp.identity(N))) / h**2)
    rng = np.random.default_rng(6)
    n = N * N
    theta = inverse_softplus((4.0 / h**2) * (1 + 0.05 * rng.standard_normal(n)))
    T = stiffness / (8.0 / h**2)
    prob = dd.Problem(A0, rng.standard_normal((n, 3)), T=T, x0=rng.standard_normal((n, 3)),
                      obs_times=[T / 4, T / 2, T], targets=0.1 * rng.standard_normal((3, n, 3)),
                      loss="mse")
    return prob, theta


FLOAT32_CASES = {"laplacian-1d": _stiff_problem, "laplacian-2d-observed": _observed_2d}


class _Dtypes:
    """Records the dtype of what the rational path computes: the LU, the solves, A_m, y."""

    def __init__(self, monkeypatch):
        self.seen: dict[str, set] = {}
        record = self.record

        class Factor(rational.ShiftInvert):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                record("factor L, U", self._lu.L, self._lu.U)

            def solve(self, rows, transpose=False):
                out = super().solve(rows, transpose)
                record("solve", rows, out)
                return out

        class Space(rational.ShiftInvertSpace):
            def operator(self, square, dims=None):
                out = super().operator(square, dims)
                record("A_m", square, out)
                return out

            def exp_and_error(self, *args, **kwargs):
                y, err = super().exp_and_error(*args, **kwargs)
                record("y, error", y, err)
                return y, err

        monkeypatch.setattr(adjoint, "ShiftInvert", Factor)
        monkeypatch.setattr(adjoint, "ShiftInvertSpace", Space)

    def record(self, name, *arrays):
        self.seen.setdefault(name, set()).update(str(a.dtype) for a in arrays)


@pytest.mark.parametrize("case", list(FLOAT32_CASES))
def test_float32_rational_stays_float32_and_is_right(case, monkeypatch):
    """Every intermediate of the rational path is float32, and the result meets its float32
    rtol against the exact reference -- or is refused, never wrong. (Before: the 2-D case
    raised LinAlgError on the zero H of an underflowed adjoint, and then crawled, since the
    space's growth limit 1e60 was inf in float32 and inf x 0 refused every step.)"""
    prob, theta = FLOAT32_CASES[case]()
    ref_loss, ref_grad = exact_loss_and_grad(prob, theta, precise=True)
    dtypes = _Dtypes(monkeypatch)
    p32 = _float32(prob)
    for rtol in (1e-5, 1e-4, 1e-3):  # the first that float32 can certify on this case
        try:
            loss, grad, info = dd.loss_and_grad(p32, theta.astype(np.float32), rtol=rtol,
                                                method="rational", return_info=True)
            break
        except dd.AccuracyError:
            continue
    else:
        pytest.fail("float32 refused even rtol = 1e-3")
    assert info["method"] == "rational" and info["rtol_met"]
    assert set(dtypes.seen) == {"factor L, U", "solve", "A_m", "y, error"}
    assert all(found == {"float32"} for found in dtypes.seen.values()), dtypes.seen
    assert grad.dtype == np.float32
    err = relative_error(grad, ref_grad)
    assert err <= 10 * info["rtol"], (err, info)
    assert info["error_estimate"] >= err / 10  # honest
    assert abs(loss - ref_loss) <= 10 * info["rtol"] * abs(ref_loss)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a visible CUDA device (the gpu "
                                                "extra)")
def test_float32_rational_on_gpu_is_right():  # pragma: no cover - GPU only
    """cupyx's splu factorizes on the host and solves on the device: float32 throughout, and
    the result as right as on the CPU."""
    import cupy

    prob, theta = _observed_2d()
    ref_loss, ref_grad = exact_loss_and_grad(prob, theta, precise=True)
    on_gpu = _float32(prob).to_device(cupy)
    for rtol in (1e-4, 1e-3):
        try:
            loss, grad, info = dd.loss_and_grad(on_gpu, cupy.asarray(theta, dtype=cupy.float32),
                                                rtol=rtol, method="rational", return_info=True)
            break
        except dd.AccuracyError:
            continue
    else:
        pytest.fail("float32 on the GPU refused even rtol = 1e-3")
    assert isinstance(grad, cupy.ndarray) and grad.dtype == cupy.float32
    err = relative_error(cupy.asnumpy(grad), ref_grad)
    assert info["rtol_met"] and err <= 10 * info["rtol"]
    assert abs(loss - ref_loss) <= 10 * info["rtol"] * abs(ref_loss)


def test_float32_growth_limit_is_finite():
    assert rational.ShiftInvertSpace(0.1, dtype=np.float32).growth_limit < np.finfo(np.float32).max
    assert rational.ShiftInvertSpace(0.1).growth_limit == 1e60


# ---- the Dask service ---------------------------------------------------------------------------

def _count_factorizations():
    """On a worker: count ShiftInvert objects made from now on (returns nothing)."""
    from diagode_dist import adjoint as worker_adjoint
    from diagode_dist import rational as worker_rational

    class Counting(worker_rational.ShiftInvert):
        made = 0

        def __init__(self, *args, **kwargs):
            Counting.made += 1
            super().__init__(*args, **kwargs)

    worker_adjoint.ShiftInvert = Counting


def _factorizations_and_restore():
    from diagode_dist import adjoint as worker_adjoint
    from diagode_dist import rational as worker_rational

    made = getattr(worker_adjoint.ShiftInvert, "made", 0)
    worker_adjoint.ShiftInvert = worker_rational.ShiftInvert
    return made


def _shard_steps(S, n_shards, epochs, batch_size, seed):
    """Steps x shards in which a shard has columns of the minibatch (each factorizes once)."""
    ranges = shard_columns(S, n_shards)
    return sum(any(lo <= c < hi for c in batch) for epoch in range(epochs)
               for batch in epoch_batches(S, batch_size, seed, epoch) for lo, hi in ranges)


def test_dask_run_with_rational_matches_fit_and_checkpoints_the_method(client, stiff, fits,
                                                                       tmp_path):
    prob, theta0 = stiff
    client.run(_count_factorizations)
    try:
        theta, history = fit_distributed(client, prob, theta0, method="rational", n_shards=3,
                                         checkpoint_dir=tmp_path, step_timeout=120, **TRAIN)
    finally:
        made = sum(client.run(_factorizations_and_restore).values())
    theta_fit, history_fit, _ = fits["rational"]
    assert relative_error(theta, theta_fit) <= 1e-12
    np.testing.assert_allclose(history, history_fit, rtol=1e-12)
    # the shards ran rational: nearer to the rational fit than the methods are to each other
    assert relative_error(theta, theta_fit) < relative_error(theta, fits["polynomial"][0]) / 10
    assert made == _shard_steps(prob.S, 3, TRAIN["epochs"], TRAIN["batch_size"], TRAIN["seed"])

    path = checkpoint_path(tmp_path)
    theta_ck, state, meta = load_checkpoint(path)
    assert meta["method"] == "rational"
    options = {**TRAIN, "n_shards": 3}
    with pytest.raises(CheckpointError, match="method: checkpoint 'rational', this run "
                                              "'polynomial'"):
        submit(client, prob, theta0, checkpoint_dir=tmp_path, resume=True,
               method="polynomial", **options)
    # A checkpoint written before the option existed holds a polynomial run.
    meta.pop("method")
    save_checkpoint(path, theta_ck, state, meta)
    with pytest.raises(CheckpointError, match="method: checkpoint 'polynomial', this run "
                                              "'rational'"):
        submit(client, prob, theta0, checkpoint_dir=tmp_path, resume=True,
               method="rational", **options)
    run = submit(client, prob, theta0, checkpoint_dir=tmp_path, resume=True,
                 method="polynomial", **options)
    resumed, _ = run.wait(timeout=60)  # at its last step already: nothing left to compute
    assert np.array_equal(resumed, theta)


# ---- the CLI ------------------------------------------------------------------------------------

def test_cli_train_with_method_rational(tmp_path, stiff, fits):
    prob, theta0 = stiff
    sp.save_npz(tmp_path / "A0.npz", prob.A0)
    np.save(tmp_path / "F.npy", prob.F)
    np.save(tmp_path / "labels.npy", np.asarray(prob.labels))
    train = "\n".join(f"{key} = {value}" for key, value in TRAIN.items())
    (tmp_path / "run.toml").write_text(
        f'[problem]\nA0 = "A0.npz"\nF = "F.npy"\nlabels = "labels.npy"\nT = {prob.T!r}\n'
        f"beta = {prob.beta!r}\n\n[train]\n{train}\nn_shards = 2\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "diagode_dist.cli", "train", "run.toml", "--method", "rational",
         "--workers", "2", "--cpu", "--quiet", "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["options"]["method"] == "rational"
    theta = np.load(tmp_path / "out" / "theta.npy")
    assert not theta0.any()  # the CLI starts from theta0 = 0, as the fits did
    assert relative_error(theta, fits["rational"][0]) <= 1e-12
    assert relative_error(theta, fits["rational"][0]) < \
        relative_error(theta, fits["polynomial"][0]) / 10
