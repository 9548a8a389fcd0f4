"""The stiff benchmark: its reference, its isolated runs (budget, memory cap) and its tables."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks import cli
from benchmarks.stiff import (
    StiffOptions,
    reference_loss_and_slope,
    rightmost_eigenvalue,
    stiff_problem,
    stiff_tables,
)
from benchmarks.stiff_peers import missing, run_isolated
from diagode_dist.reference import exact_loss_and_grad


def _spec(m, stiffness, S=4, dissipative=False, **extra):
    return dict(m=m, stiffness=stiffness, S=S, seed=0, dissipative=dissipative, threads=1,
                **extra)


def _scored(outcome, m, stiffness, S=4):
    prob, theta = stiff_problem(m, stiffness, S)
    direction = np.random.default_rng(1).standard_normal(prob.n)
    loss, grad = exact_loss_and_grad(prob, theta)
    r = outcome.result
    return abs(r["loss"] - loss) / abs(loss), abs(r["slope"] - grad @ direction) / abs(
        grad @ direction)


@pytest.mark.parametrize("dissipative", [False, True])
def test_reference_matches_the_exact_dense_one(dissipative):
    prob, theta = stiff_problem(6, 2000.0, S=5, dissipative=dissipative)
    direction = np.random.default_rng(3).standard_normal(prob.n)
    loss, slope = reference_loss_and_slope(prob, theta, direction)
    exact_loss, exact_grad = exact_loss_and_grad(prob, theta)
    assert abs(loss - exact_loss) <= 1e-11 * abs(exact_loss)
    assert abs(slope - exact_grad @ direction) <= 1e-9 * np.abs(exact_grad).sum()


def test_variants_differ_in_the_sign_of_the_rightmost_eigenvalue():
    grow = rightmost_eigenvalue(*stiff_problem(32, 5000.0, S=2))
    decay = rightmost_eigenvalue(*stiff_problem(32, 5000.0, S=2, dissipative=True))
    prob, theta = stiff_problem(32, 5000.0, S=2)
    dense = prob.A0.toarray() - np.diag(np.logaddexp(0.0, theta))
    assert grow == pytest.approx(prob.T * np.linalg.eigvalsh(dense).max(), rel=1e-8)
    assert grow > 1.0 and decay < -100.0  # grows like e^2.9; decays


def test_ours_in_a_capped_process_is_scored_against_the_exact_reference():
    outcome = run_isolated("ours", _spec(6, 2000.0, method="rational", rtol=1e-8, k=30),
                           budget=60.0, mem_gib=4.0)
    assert outcome.status == "ok", outcome.message
    loss_error, slope_error = _scored(outcome, 6, 2000.0)
    assert loss_error < 1e-7 and slope_error < 1e-6
    assert outcome.rss_mib >= outcome.base_mib > 10  # max RSS of the child, and after imports


@pytest.mark.parametrize("peer, mem_gib", [("torchdiffeq odeint backprop dopri5", 6.0),
                                            ("diffrax Kvaerno5 + GMRES", 8.0)])
def test_a_peer_gets_the_gradient_right_on_a_small_grid(peer, mem_gib):
    if missing(peer) is not None:
        pytest.skip(f"{peer}: {missing(peer)}")
    outcome = run_isolated(peer, _spec(4, 200.0, tol=1e-9), budget=120.0, mem_gib=mem_gib)
    assert outcome.status == "ok", outcome.message
    loss_error, slope_error = _scored(outcome, 4, 200.0)
    assert loss_error < 1e-6 and slope_error < 1e-5


@pytest.mark.skipif(missing("torchdiffeq odeint_adjoint dopri5") is not None,
                    reason="torch / torchdiffeq not installed")
def test_a_peer_past_its_budget_is_stopped_and_reported():
    outcome = run_isolated("torchdiffeq odeint_adjoint dopri5", _spec(32, 1e5, S=16, tol=1e-9),
                           budget=2.0, mem_gib=6.0)
    assert outcome.status == "timeout" and outcome.message == "budget"
    assert outcome.seconds == 2.0 and outcome.rss_mib > 10
    assert 0.0 <= outcome.progress < 1.0  # how far in t it got


@pytest.mark.skipif(missing("torchdiffeq odeint backprop dopri5") is not None,
                    reason="torch / torchdiffeq not installed")
def test_a_peer_over_its_memory_cap_fails_there():
    # backprop through ~1e4 dopri5 steps of a (1024, 64) state keeps ~40 GB of graph
    outcome = run_isolated("torchdiffeq odeint backprop dopri5", _spec(32, 5e4, S=64, tol=1e-9),
                           budget=120.0, mem_gib=3.0)
    assert outcome.status == "oom", (outcome.status, outcome.message)
    assert outcome.message.startswith("out of memory at 3 GiB")


def test_quick_tables_have_their_structure_and_right_numbers():
    options = StiffOptions.quick()
    options.peers, options.polynomial_rtols, options.sizes = False, (1e-8,), (8,)
    lines = []
    text = stiff_tables(options, markdown=True, log=lines.append)
    assert text.count("### ") == 3 and "T lambda_max = " in text
    table = [row.split(" | ") for row in text.splitlines() if row.startswith("| ours")]
    assert [cells[0] for cells in table] == ["| ours rational k=30", "| ours polynomial k=30"]
    for cells in table:
        assert float(cells[3]) < 1e-7 and float(cells[4]) < 1e-6  # loss, slope errors
    flat = [row for row in text.splitlines() if row.startswith(("| 1000 |", "| 10000 |"))]
    assert len(flat) == 2 and all(float(row.split(" | ")[2]) > 0 for row in flat)
    scale = [row.split(" | ") for row in text.splitlines() if row.startswith("| 64 |")]
    assert len(scale) == 1 and int(scale[0][5]) >= 1  # (L + U) / n: SuperLU's factors
    assert any("reference" in line for line in lines)


def test_stiff_sizes_are_squares():
    parser = cli._parser()
    args = parser.parse_args(["--stiff-sizes", "4096,16384"])
    assert args.stiff_sizes == (64, 128)
    with pytest.raises(SystemExit):
        parser.parse_args(["--stiff-sizes", "4097"])
    with pytest.raises(argparse.ArgumentTypeError, match="stiff-sizes"):
        cli._square_sizes("4096,x")


def test_stiff_polynomial_rtols_selects_the_polynomial_rows():
    parser = cli._parser()
    assert parser.parse_args([]).stiff_polynomial_rtols is None
    args = parser.parse_args(["--stiff-polynomial-rtols", "1e-8,1e-12"])
    assert args.stiff_polynomial_rtols == (1e-8, 1e-12)
    assert parser.parse_args(["--stiff-polynomial-rtols", "none"]).stiff_polynomial_rtols == ()
    for bad in ("1e-8,x", "2", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="stiff-polynomial-rtols"):
            cli._rtol_list(bad)
    options = StiffOptions.quick()
    options.tables, options.peers, options.polynomial_rtols = ("accuracy",), False, ()
    text = stiff_tables(options, markdown=True, log=lambda line: None)
    assert "| ours rational" in text and "| ours polynomial" not in text


def test_stiff_tables_selects_the_tables():
    parser = cli._parser()
    assert parser.parse_args(["--stiff-tables", "flatness"]).stiff_tables == ("flatness",)
    with pytest.raises(argparse.ArgumentTypeError, match="stiff-tables"):
        cli._stiff_table_names("flatness,speed")
    options = StiffOptions.quick()
    options.tables, options.stiffnesses, options.dissipative = ("flatness",), (1e3,), True
    text = stiff_tables(options, markdown=True, log=lambda line: None)
    assert text.count("### ") == 2 and "reference" not in text  # no accuracy, no scaling
    assert "dissipative" in text and "| ours" not in text
