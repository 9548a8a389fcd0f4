"""Our gradient against the exact reference and its peers on the benchmark cases: one row each.

For every case it times ``dd.loss_and_grad`` (median of R runs) and scores its gradient against
the exact dense reference. With torch + torchdiffeq installed (the ``bench`` extra) the peers of
``peers.py`` run on the identical loss and gradient in the same process, float64, 2 threads;
each row gives time, relative gradient error and the ratio peer time / our time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diagode_dist.reference import exact_loss_and_grad, relative_error

from . import cases as _cases
from .table import render_table

__all__ = ["Row", "run_case", "format_table", "cases_section"]

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
        row.rel_grad = relative_error(row.grad, ref_grad)
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
    _measure(reference, lambda _d: exact_loss_and_grad(case.problem, case.theta), 1, budget)
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


# ---- the section of the report -----------------------------------------------------------------


def cases_section(names: Sequence[str], repeat: int, budget: float, with_peers: bool,
                  markdown: bool, log: Callable[[str], None] | None = None) -> str:
    """Build and run every case; the legend of cases and the table."""
    log = log or (lambda _msg: None)
    rows: list[Row] = []
    legend: dict[str, str] = {}
    for name in names:
        case = _cases.build_case(name)
        legend[name] = case.description
        log(f"[{name}] {case.description}")
        rows.extend(run_case(case, repeat=repeat, budget=budget, with_peers=with_peers, log=log))
    return _case_legend(legend, markdown) + "\n\n" + format_table(rows, markdown)


def _case_legend(descriptions: dict[str, str], markdown: bool) -> str:
    bullet = "- " if markdown else "  "
    lines = ["Cases:\n" if markdown else "Cases:"]
    lines += [f"{bullet}{name}: {text}" for name, text in descriptions.items()]
    return "\n".join(lines)
