"""``diagode-dist bench``: our gradient against its peers, side by side in one run.

    python -m diagode_dist.bench [--quick] [--cases demo,n1024,stiff2d|none] [--repeat R]
                                 [--peer-budget SECONDS] [--no-peers] [--scaling] [--service]
                                 [--gpu] [--markdown]

For every case it times ``dd.loss_and_grad`` (median of R runs) and scores its gradient against
the exact dense reference (``cases.exact_loss_and_grad``). With torch + torchdiffeq installed
(the ``bench`` extra) the peers of ``peers.py`` run on the identical loss and gradient in the
same process, float64, 2 threads; each row gives time, relative gradient error and the ratio
peer time / our time. ``--scaling`` adds our time against n, S and k on sparse problems;
``--gpu`` adds the orthogonalisation's bytes, achieved bandwidth and roofline fraction on CuPy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cases as _cases
from .machine import describe_machine
from .table import heading, render_table

__all__ = ["main", "run_case", "format_table"]

DENSE_PEER_MAX = 2048  # n + S above which the dense matrix_exp peer is not run (> 60 s here)
QUAD_POINTS = 32  # the seed package's trapezoid rule
OURS = "diagode-dist loss_and_grad (Krylov + Van Loan)"
OURS_LOOSE = "diagode-dist loss_and_grad, rtol=1e-8"
SEED_QUAD = f"diagode-dist, seed's trapezoid integral Q={QUAD_POINTS}"
REFERENCE = "exact dense reference (scipy expm, size 2n+S)"


@dataclass
class Row:
    """One method on one case: its run times (s), result, errors against the reference, note."""

    case: str
    method: str
    times: list[float] = field(default_factory=list)
    loss: float | None = None
    grad: np.ndarray | None = None
    rel_grad: float | None = None
    rel_loss: float | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


# ---- measuring --------------------------------------------------------------------------------


def _measure(row: Row, call: Callable[[float], tuple[float, Any]], repeat: int,
             budget: float) -> Row:
    """Fill ``row`` with up to ``repeat`` timed calls, stopping before the budget (s) runs out.

    ``call(deadline)`` returns (loss, grad); a peer that checks the deadline raises
    ``PeerTimeout``. Any other failure is reported in the row's note, not hidden.
    """
    from .peers import PeerTimeout

    deadline = time.perf_counter() + budget
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            loss, grad = call(deadline)
        except PeerTimeout as exc:
            if not row.times:
                row.note = f"stopped (>{budget:.0f} s; see --peer-budget): {exc}"
            break
        except Exception as exc:  # a peer failing is a result to report
            row.note = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:80]}"
            break
        row.times.append(time.perf_counter() - start)
        row.loss, row.grad = float(loss), _host_array(grad)
        if time.perf_counter() + row.times[-1] > deadline:
            break
    if row.times and not row.note:
        row.note = f"median of {len(row.times)}" if len(row.times) > 1 else "1 run"
    return row


def _host_array(a: Any) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)


def _score(row: Row, ref_loss: float, ref_grad: np.ndarray) -> Row:
    if row.grad is not None:
        row.rel_grad = _cases.relative_error(row.grad, ref_grad)
        finite = math.isfinite(row.loss)
        row.rel_loss = abs(row.loss - ref_loss) / abs(ref_loss) if finite else math.inf
    return row


_WARM: set[str] = set()


def _warm_up(method: str, call: Callable[[Any, np.ndarray], Any]) -> None:
    """One untimed call per method and process on a small problem: first calls pay for
    imports and lazy initialisation (2.7 s for torchdiffeq's adjoint on this machine)."""
    if method in _WARM:
        return
    tiny = _cases.build_case("tiny")
    call(tiny.problem, tiny.theta)
    _WARM.add(method)


def _ours(prob: Any, theta: np.ndarray, **options: Any) -> tuple[float, Any]:
    import diagode_dist as dd

    return dd.loss_and_grad(prob, theta, **options)


def _our_methods() -> dict[str, Callable[[Any, np.ndarray], Any]]:
    return {
        OURS: lambda prob, theta: _ours(prob, theta),
        OURS_LOOSE: lambda prob, theta: _ours(prob, theta, rtol=1e-8),
        SEED_QUAD: lambda prob, theta: _ours(
            prob, theta, time_integral="trapezoid", quad_points=QUAD_POINTS),
    }


def _peer_methods(case: _cases.Case) -> dict[str, Callable | str]:
    """Torch peers by table name: a callable(prob, theta, deadline), or why it is skipped."""
    from . import peers

    reason = peers.available()
    if reason:
        return {"torch peers": f"skipped: {reason}"}
    methods: dict[str, Callable | str] = dict(peers.TORCH_PEERS)
    n, S = case.problem.F.shape
    if n + S > DENSE_PEER_MAX:
        methods[peers.DENSE_PEER] = (f"skipped (>60 s): dense exponential of size n+S = {n + S} "
                                     f"> {DENSE_PEER_MAX}")
    return methods


def run_case(case: _cases.Case, repeat: int = 5, budget: float = 60.0,
             with_peers: bool = True, log: Callable[[str], None] | None = None) -> list[Row]:
    """Reference, ours, the seed's quadrature and (optionally) the torch peers on one case."""
    log = log or (lambda _msg: None)
    log(f"[{case.name}] exact reference ...")
    reference = Row(case.name, REFERENCE)
    _measure(reference, lambda _d: _cases.exact_loss_and_grad(case.problem, case.theta), 1, budget)
    if reference.grad is not None:
        reference.note = f"the reference (1 run); loss = {reference.loss:.6g}"
    rows = [reference]
    for method, call in _our_methods().items():
        log(f"[{case.name}] {method} ...")
        _warm_up(method, call)
        rows.append(_measure(Row(case.name, method),
                             lambda _d, call=call: call(case.problem, case.theta), repeat, budget))
    if with_peers:
        for method, peer in _peer_methods(case).items():
            if isinstance(peer, str):
                rows.append(Row(case.name, method, note=peer))
                continue
            log(f"[{case.name}] {method} ...")
            _warm_up(method, lambda prob, theta, peer=peer: peer(prob, theta, None))
            rows.append(_measure(Row(case.name, method),
                                 lambda d, peer=peer: peer(case.problem, case.theta, d),
                                 repeat, budget))
    if reference.grad is not None:
        for row in rows[1:]:
            _score(row, reference.loss, reference.grad)
    _add_accuracy_note(rows, case)
    return rows


def _add_accuracy_note(rows: list[Row], case: _cases.Case) -> None:
    """Append our own accuracy record (Krylov dimensions, sub-steps, error estimate) to our rows,
    and to the rtol=1e-8 row how much faster it is than each peer that ran."""
    for method, options in ((OURS, {}), (OURS_LOOSE, {"rtol": 1e-8})):
        row = next((r for r in rows if r.method == method and r.times), None)
        if row is None:
            continue
        info = _ours(case.problem, case.theta, return_info=True, **options)[2]
        met = "met" if info["rtol_met"] else "NOT met"
        row.note += (f"; dims fwd {info['forward_dim']}/adj {info['adjoint_dim']} of "
                     f"k={info['k']}, {info['substeps']} sub-step(s), est. "
                     f"{info['error_estimate']:.0e} (rtol {info['rtol']:g} {met})")
        if method == OURS_LOOSE:
            faster = [f"{r.method.split(' dopri5')[0]} {r.median / row.median:.2g}x"
                      for r in rows if r.method.startswith("torch") and r.times]
            if faster:
                row.note += "; peers' time / this: " + ", ".join(faster)


# ---- formatting -------------------------------------------------------------------------------

COLUMNS = ("case", "method", "time [s]", "rel. grad error", "rel. loss error", "time / ours",
           "note")


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _cells(row: Row, ours: float | None) -> list[str]:
    median = row.median
    ratio = median / ours if (median is not None and ours) else None
    return [row.case, row.method, _fmt(median, ".3g"), _fmt(row.rel_grad, ".1e"),
            _fmt(row.rel_loss, ".1e"), _fmt(ratio, ".3g"), row.note]


def format_table(rows: Sequence[Row], markdown: bool = False,
                 columns: Sequence[str] = COLUMNS) -> str:
    """The rows as a text (aligned) or Markdown table; ratios relative to OURS on each case."""
    ours = {row.case: row.median for row in rows if row.method == OURS}
    body = [_cells(row, ours.get(row.case)) for row in rows]
    return render_table(columns, body, markdown)


# ---- command line -----------------------------------------------------------------------------


def _case_list(text: str) -> list[str]:
    if text.strip() == "none":  # e.g. --gpu alone
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _cases.CASE_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown) or text!r}; choose from "
            f"{', '.join(_cases.CASE_NAMES)}")
    return names


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diagode-dist bench",
        description="Time dd.loss_and_grad against its exact reference and its peers "
        "(torchdiffeq, dense matrix_exp, the seed's quadrature) on identical problems.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny case, one run each (a smoke test of the harness)")
    parser.add_argument("--cases", type=_case_list, default=None,
                        help=f"comma-separated, from {','.join(_cases.CASE_NAMES)}, or none "
                        f"(default: {','.join(_cases.DEFAULT_CASES)})")
    parser.add_argument("--repeat", type=_positive(int), default=None,
                        help="timed runs per method (default 5; 1 with --quick)")
    parser.add_argument("--peer-budget", type=_positive(float), default=60.0,
                        help="seconds a method may take on a case before it is stopped or not "
                        "repeated (default: %(default)s)")
    parser.add_argument("--no-peers", action="store_true", help="skip the torch peers")
    parser.add_argument("--threads", type=_positive(int), default=2,
                        help="torch threads for the peers (default: %(default)s)")
    parser.add_argument("--scaling", action="store_true",
                        help="also time ours against n, S and k on sparse grid problems")
    parser.add_argument("--gpu", action="store_true",
                        help="also run ours on CuPy (n ~ 1e5, S = 1024) with the "
                        "orthogonalisation's bytes moved, bandwidth and roofline fraction")
    parser.add_argument("--service", action="store_true",
                        help="also measure the Dask service: parameter-server overhead per "
                        "step (n = 1e4, 1e6) and the speed-up of 2 workers over 1 (~2 min)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark command line ``argv`` (default ``sys.argv[1:]``); returns 0."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    names = args.cases
    if names is None:
        names = ["tiny"] if args.quick else list(_cases.DEFAULT_CASES)
    repeat = args.repeat or (1 if args.quick else 5)
    with_peers = not args.no_peers
    if with_peers:
        from . import peers

        if peers.available() is None:
            peers.configure_torch(args.threads)

    print(heading("diagode-dist benchmark", args.markdown))
    print(describe_machine(args.markdown, torch_threads=args.threads if with_peers else None))
    print()
    if names:
        print(_cases_section(names, repeat, args.peer_budget, with_peers, args.markdown))
    if args.scaling:
        from .scaling import scaling_table

        print()
        print(heading("Scaling of our time with n, S and k (sparse grid problems)", args.markdown))
        print(scaling_table(repeat=min(repeat, 3), markdown=args.markdown, quick=args.quick,
                            log=_log))
    if args.service:
        from diagode_dist.service.bench import bench_service, format_table

        print()
        print(heading("Dask service: parameter-server overhead and speed-up", args.markdown))
        print(format_table(bench_service(overhead_sizes=(10_000,) if args.quick
                                         else (10_000, 1_000_000))))
    if args.gpu:
        from .roofline import gpu_report

        print()
        print(heading("GPU: orthogonalisation bandwidth against the roofline", args.markdown))
        print(gpu_report(repeat=min(repeat, 3), markdown=args.markdown, budget=args.peer_budget,
                         log=_log))
    return 0


def _log(message: str) -> None:
    """Progress goes to stderr, so that stdout is the report alone."""
    print(message, file=sys.stderr, flush=True)


def _cases_section(names: Sequence[str], repeat: int, budget: float, with_peers: bool,
                   markdown: bool) -> str:
    """Build and run every case; the legend of cases and the table."""
    rows: list[Row] = []
    legend: dict[str, str] = {}
    for name in names:
        case = _cases.build_case(name)
        legend[name] = case.description
        _log(f"[{name}] {case.description}")
        rows.extend(run_case(case, repeat=repeat, budget=budget, with_peers=with_peers, log=_log))
    return _case_legend(legend, markdown) + "\n\n" + format_table(rows, markdown)


def _case_legend(descriptions: dict[str, str], markdown: bool) -> str:
    bullet = "- " if markdown else "  "
    lines = ["Cases:\n" if markdown else "Cases:"]
    lines += [f"{bullet}{name}: {text}" for name, text in descriptions.items()]
    return "\n".join(lines)
