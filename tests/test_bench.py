"""The benchmark harness: its exact reference, its peers, its command line, its byte counts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.special

import diagode_dist as dd
from benchmarks import cases as bench_cases
from benchmarks import roofline
from benchmarks.cli import main
from benchmarks.compare import Row, _measure
from diagode_dist.reference import exact_loss_and_grad, relative_error

ROOT = Path(__file__).resolve().parents[1]  # the checkout: ``python -m benchmarks`` runs there


def _small_problem(n=6, S=3, scale=0.3, x0=True, seed=1):
    """A dense, non-symmetric problem with a non-zero x0: every term of the reference used."""
    rng = np.random.default_rng(seed)
    A0 = scale * rng.standard_normal((n, n))
    np.fill_diagonal(A0, 0.0)
    prob = dd.Problem(A0, rng.standard_normal((n, S)), rng.integers(0, n, S), T=1.5, beta=2.0,
                      x0=rng.standard_normal((n, S)) if x0 else None)
    return prob, rng.standard_normal(n)


def _central_differences(loss, theta, step):
    grad = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = step * max(1.0, abs(theta[i]))
        grad[i] = (loss(theta + e) - loss(theta - e)) / (2 * e[i])
    return grad


class _ExpMap:
    """d = -exp(theta): a map other than the default, passed as an object."""

    def diag_from_theta(self, theta):
        return -np.exp(theta)

    def dtheta_from_ddiag(self, theta, g):
        return -np.exp(theta) * g


@pytest.mark.parametrize("param", [None, _ExpMap()], ids=["softplus", "exp"])
def test_reference_matches_central_differences(param):
    prob, theta = _small_problem()
    loss, grad = exact_loss_and_grad(prob, theta, param)
    fd = _central_differences(lambda t: exact_loss_and_grad(prob, t, param)[0], theta, 1e-5)
    assert relative_error(grad, fd) < 1e-8
    assert np.isfinite(loss) and loss > 0


def test_reference_loss_matches_an_ode_solve():
    """The forward half against an independent integrator (solve_ivp at tight tolerance)."""
    from scipy.integrate import solve_ivp

    prob, theta = _small_problem()
    n, S = prob.F.shape
    A = prob.A0 - np.diag(np.logaddexp(0.0, theta))
    sol = solve_ivp(lambda _t, x: (A @ x.reshape(n, S) + prob.F).ravel(), (0, prob.T),
                    prob.x0.ravel(), method="DOP853", rtol=1e-12, atol=1e-14)
    Z = prob.beta * sol.y[:, -1].reshape(n, S).T
    expected = np.mean(scipy.special.logsumexp(Z, axis=1) - Z[np.arange(S), prob.labels])
    assert abs(exact_loss_and_grad(prob, theta)[0] - expected) < 1e-9 * abs(expected)


def test_reference_on_a_stiff_grid_matches_central_differences():
    a = bench_cases.stiff2d_arrays(m=5, S=4, T=0.4, beta=50.0)
    prob = dd.Problem(a["A0"], a["F"], a["labels"], T=a["T"], beta=a["beta"])
    theta = a["theta"]
    A = a["A0"].toarray() - np.diag(bench_cases.softplus(theta))
    assert a["T"] * np.abs(np.linalg.eigvalsh(A)).max() > 50  # really stiff
    _, grad = exact_loss_and_grad(prob, theta)
    fd = _central_differences(lambda t: exact_loss_and_grad(prob, t)[0], theta, 1e-5)
    assert relative_error(grad, fd) < 1e-8


def test_inverse_softplus_round_trips_including_large_values():
    y = np.array([1e-3, 0.5, 3.0, 1156.0, 5e4])
    assert np.allclose(bench_cases.softplus(bench_cases.inverse_softplus(y)), y, rtol=1e-13)


def test_stiff_case_is_as_described():
    a = bench_cases.stiff2d_arrays()
    n = a["theta"].size
    h = 1.0 / 17
    assert n == 256 and a["A0"].nnz == 4 * 16 * 15
    d = -bench_cases.softplus(a["theta"])
    assert np.all(np.abs(d / (-4 / h**2) - 1) <= 0.1 + 1e-12)
    A = a["A0"].toarray() + np.diag(d)
    assert 200 < a["T"] * np.abs(np.linalg.eigvalsh(A)).max() < 260


# ---- peers (the bench extra) ------------------------------------------------------------------


@pytest.mark.slow
def test_torch_peers_agree_with_the_reference():
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    from benchmarks import peers

    peers.configure_torch(2)
    prob, theta = _small_problem(n=8, S=3, scale=0.2)
    ref_loss, ref_grad = exact_loss_and_grad(prob, theta)
    # dopri5 at rtol = atol = 1e-9 measured 1e-8 (adjoint) and 4e-9 (backprop) here
    tolerances = {peers.odeint_adjoint: 1e-7, peers.odeint_backprop: 1e-7,
                  peers.matrix_exp: 1e-11}
    for peer, tol in tolerances.items():
        loss, grad = peer(prob, theta)
        assert abs(loss - ref_loss) < tol * abs(ref_loss), peer.__name__
        assert relative_error(grad, ref_grad) < tol, peer.__name__


@pytest.mark.slow  # imports torch (about 5 s)
def test_sparse_adjoint_peer_agrees_with_the_reference():
    """The GPU report's peer (A0 as a torch sparse CSR tensor), here on the CPU."""
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    from benchmarks import peers

    a = bench_cases.grid_arrays(4, 3)
    prob = dd.Problem(a["A0"], a["F"], a["labels"], T=a["T"], beta=a["beta"])
    _, ref_grad = exact_loss_and_grad(prob, a["theta"])
    _, grad = peers.odeint_adjoint(prob, a["theta"], sparse=True)
    assert relative_error(grad, ref_grad) < 1e-7


@pytest.mark.slow  # imports torch (about 5 s)
def test_peer_past_its_deadline_is_stopped_and_reported():
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    from benchmarks import peers

    prob, theta = _small_problem()
    with pytest.raises(peers.PeerTimeout):
        peers.odeint_backprop(prob, theta, deadline=time.perf_counter() - 1.0)
    row = _measure(Row("c", "m"), lambda d: peers.odeint_backprop(prob, theta, d - 1e3), 3, 1.0)
    assert row.times == [] and row.note.startswith("stopped (>1 s;")


def test_failing_method_is_reported_not_hidden():
    def broken(_deadline):
        raise FloatingPointError("underflow in dt")

    row = _measure(Row("c", "m"), broken, 3, 10.0)
    assert row.times == [] and "FloatingPointError: underflow in dt" in row.note


def test_measure_repeats_and_takes_the_median():
    calls = []

    def call(_deadline):
        calls.append(1)
        return 1.0, np.zeros(2)

    row = _measure(Row("c", "m"), call, 4, 60.0)
    assert len(calls) == 4 and len(row.times) == 4 and row.note == "median of 4"
    assert row.median == sorted(row.times)[1] / 2 + sorted(row.times)[2] / 2


# ---- the command ------------------------------------------------------------------------------

EXPECTED_COLUMNS = ("case", "method", "time [s]", "rel. grad error", "rel. loss error",
                    "time / ours", "note")


def test_quick_command_prints_the_table(capsys):
    start = time.perf_counter()
    assert main(["--quick", "--no-peers"]) == 0
    out = capsys.readouterr().out
    assert time.perf_counter() - start < 20
    header = next(line for line in out.splitlines() if line.startswith("case"))
    assert all(column in header for column in EXPECTED_COLUMNS)
    assert "CPU:" in out and "numpy" in out and "scipy" in out
    ours = next(line for line in out.splitlines() if "loss_and_grad (Krylov" in line)
    assert ours.split()[0] == "tiny"
    # our gradient is exact: scored against the dense reference
    assert float(_cell(out, ours, "rel. grad error")) <= 1e-10
    quad = next(line for line in out.splitlines() if "trapezoid" in line)
    assert float(_cell(out, quad, "rel. grad error")) > 1e-8  # the quadrature is not exact


def _cell(out: str, line: str, column: str) -> str:
    """The text of ``column`` in ``line`` of the aligned table in ``out`` (by header offsets)."""
    header = next(h for h in out.splitlines() if h.startswith("case  "))
    start = header.index(column)
    following = EXPECTED_COLUMNS[EXPECTED_COLUMNS.index(column) + 1]
    return line[start:header.index(following)].strip()


def test_markdown_output_from_the_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-peers", "--markdown"],
        capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    lines = result.stdout.splitlines()
    assert "| " + " | ".join(EXPECTED_COLUMNS) + " |" in lines
    rows = [line for line in lines if line.startswith("| tiny |")]
    # the reference, ours (default rtol), ours at rtol=1e-8, the seed's trapezoid rule
    assert len(rows) == 4 and all(row.count("|") == len(EXPECTED_COLUMNS) + 1 for row in rows)
    assert any(line.startswith("- CPU:") for line in lines)


def test_unknown_case_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--cases", "demo,nope"])
    assert exit_info.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_gpu_mode_without_a_gpu_prints_a_skip_line(capsys):
    if roofline.gpu_unavailable() is None:
        pytest.skip("a GPU is present: the skip line is not printed")
    assert main(["--quick", "--no-peers", "--gpu"]) == 0
    assert "GPU benchmark skipped:" in capsys.readouterr().out


# ---- byte counts of the orthogonalisation -----------------------------------------------------


def test_cgs2_sweep_bytes_sum_the_steps():
    c, N, k = 7, 101, 12
    steps = sum(roofline.cgs2_step_bytes(c, N, m) for m in range(1, k + 1))
    assert roofline.cgs2_sweep_bytes(c, N, k) == steps
    # four basis reads of m c N doubles per step dominate for large m
    assert roofline.cgs2_step_bytes(c, N, 1000) / (4 * 1000 * c * N * 8) == pytest.approx(1, 3e-3)


def test_cgs2_sweep_runs_on_numpy():
    sweep = roofline.cgs2_sweep(np, columns=4, state=300, steps=5, repeat=1)
    assert sweep.bytes == roofline.cgs2_sweep_bytes(4, 300, 5)
    assert sweep.seconds > 0 and sweep.bytes_per_s > 0


@pytest.mark.parametrize("symmetric", [False, True], ids=["arnoldi", "lanczos"])
def test_sweep_byte_model_counts_the_vectors_arnoldi_orthogonalises_against(symmetric,
                                                                           monkeypatch):
    """The model against the package's own sweep: every _cgs2 call's basis size, recorded."""
    from diagode_dist import krylov

    c, N, k = 3, 40, 9
    rng = np.random.default_rng(0)
    A = rng.standard_normal((N, N))
    A = A + A.T if symmetric else A
    sizes = []
    original = krylov._cgs2

    def recording(basis, w):
        sizes.append(basis.shape[0])
        return original(basis, w)

    monkeypatch.setattr(krylov, "_cgs2", recording)
    krylov.arnoldi(lambda v: v @ A.T, rng.standard_normal((c, N)), k, symmetric=symmetric)
    assert len(sizes) == k
    counted = sum(roofline.cgs2_step_bytes(c, N, m) for m in sizes)
    assert roofline.sweep_bytes(c, N, k, symmetric) == counted
    measured = roofline.cgs2_sweep(np, columns=c, state=N, steps=k, repeat=1,
                                   symmetric=symmetric)
    assert measured.bytes == counted


def test_gradient_byte_count_uses_lanczos_where_the_package_does():
    info = {"substeps": 2, "forward_dim": 20, "adjoint_dim": 16}
    S, n = 8, 1000
    arnoldi = roofline._ortho_bytes(S, n, info, symmetric=False)
    lanczos = roofline._ortho_bytes(S, n, info, symmetric=True)
    assert arnoldi == 2 * (roofline.cgs2_sweep_bytes(S, n + 1, 20)
                           + roofline.cgs2_sweep_bytes(S, n, 16))
    # first forward sweep (zero start) and both adjoint sweeps Lanczos, second forward Arnoldi
    assert lanczos == (roofline.lanczos_sweep_bytes(S, n + 1, 20)
                       + roofline.cgs2_sweep_bytes(S, n + 1, 20)
                       + 2 * roofline.lanczos_sweep_bytes(S, n, 16))
    one = {**info, "substeps": 1}  # one sub-step: Lanczos throughout, ~3x fewer bytes here
    assert roofline._ortho_bytes(S, n, one, True) < 0.4 * roofline._ortho_bytes(S, n, one, False)


@pytest.mark.slow
def test_service_benchmark_fills_its_table():
    """``--service`` at toy sizes: three fresh LocalClusters, one row per case (no targets)."""
    from benchmarks.service import bench_service, format_table

    rows = bench_service(overhead_sizes=(1000,), overhead_shards=(2,), overhead_steps=4,
                         speedup_n=32, speedup_S=8, speedup_steps=2)
    assert [row["case"] for row in rows] == ["overhead (tiny compute)",
                                             "compute-bound (demo problem)",
                                             "compute-bound (demo problem)"]
    assert all(row["ms_per_step"] > 0 and row["compute_ms"] > 0 for row in rows)
    assert rows[-1]["speedup"] > 0 and isinstance(rows[-1]["met"], bool)
    table = format_table(rows).splitlines()
    assert table[0].startswith("| case | n | S |") and len(table) == 2 + len(rows)
