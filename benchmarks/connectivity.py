"""The forum's connectivity UDE (``examples/connectivity_ude.py``) as two benchmark rows.

1. n = 100, 10^4 generator weights, S = 1: ours against the exact dense reference, the forum's
   answer (``torch.linalg.matrix_exp`` + autograd on A(p)) and torchdiffeq's adjoint.
2. A random geometric graph, n = 10^4, ~5 x 10^4 weights, S = 16, 3 observation times: ours
   alone (a dense n x n operator is 0.75 GiB, its exponential O(n^3)), with its directional
   derivatives checked against ``scipy.sparse.linalg.expm_multiply`` and its peak memory.

The problems are built by the example itself (loaded from its file), so the table and the
example measure the same thing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from .table import render_table

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "connectivity_ude.py"


def _example():
    spec = importlib.util.spec_from_file_location("connectivity_ude", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def connectivity_table(repeat: int = 3, quick: bool = False, markdown: bool = False,
                       threads: int = 2, log: Callable[[str], None] = print) -> str:
    """Both cases as one table: time (wall and CPU), accuracy, memory; torch peers on
    ``threads`` threads."""
    example = _example()
    args = example.parse_args(["--quick"] if quick else [])
    args.repeats, args.threads = repeat, threads
    log(f"connectivity: forum case (n = {args.n_small})")
    with contextlib.redirect_stdout(sys.stderr):  # the example's lines are progress here
        forum = example.run_forum(args)
    rows = []
    for row in forum["rows"]:
        rows.append([f"forum n={forum['n']}, {forum['weights']} weights, S=1", row["method"],
                     f"{row['seconds']:.3g}", f"{row['cpu_seconds']:.3g}",
                     f"{row['grad_rel_error']:.1e} (exact reference)", "-"])
    log(f"connectivity: graph case (n = {args.n_graph})")
    prob, param, _, theta0 = example.graph_case(args.n_graph, args.degree, args.S, args.noise,
                                                args.seed)
    graph = example.measure_graph_gradient(prob, param, theta0, args.rtol, repeat, args.seed)
    worst = max(graph["directional_rel_errors"])
    rows.append([f"graph n={prob.n}, {param.theta_size(prob.n)} weights, S={prob.S}",
                 "diagode-dist (Krylov adjoint)", f"{graph['seconds']:.3g}",
                 f"{graph['cpu_seconds']:.3g}", f"{worst:.1e} (directional, expm_multiply)",
                 f"{graph['peak_bytes'] / 2**20:.0f}"])
    dense_gib = 8 * prob.n**2 / 2**30
    if dense_gib > 0.5:  # not at --quick sizes, where dense still runs
        rows.append([rows[-1][0], "dense matrix_exp / expm", "out of reach", "-",
                     f"- (n x n dense: {dense_gib:.2g} GiB, O(n^3) work)", "-"])
    header = ("case", "method", "time [s]", "CPU [s]", "gradient rel. error", "peak MiB")
    return render_table(header, rows, markdown)
