"""The trust table: true error against rtol and against the reported estimate, per operator class.

Each case of ``diagode_dist.gallery`` is solved at rtol in {1e-6, 1e-8, 1e-10, 1e-12} and
k in {10, 30} and compared with the exact reference in ball arithmetic
(``diagode_dist.reference.exact_loss_and_grad(..., precise=True)``). A row reports the worst
true error / rtol and true error / estimate over the cells that returned, and how many cells
were refused (``AccuracyError``, which the library raises instead of returning an answer it
cannot certify). The guarantees the tests hold the library to: error / rtol <= 10 and
error / estimate <= 10 in every returned cell.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import diagode_dist as dd
from diagode_dist import gallery
from diagode_dist.reference import exact_loss_and_grad, relative_error

from .table import render_table

RTOLS = (1e-6, 1e-8, 1e-10, 1e-12)
KS = (10, 30)


@dataclass
class TrustRow:
    """One operator class: worst ratios over the returned cells, refusals, time (s)."""

    name: str
    description: str
    worst_error_over_rtol: float
    worst_error_over_estimate: float
    returned: int
    refused: int
    seconds: float


def trust_rows(names: Sequence[str] | None = None, rtols=RTOLS, ks=KS) -> list[TrustRow]:
    """Run the gallery grid (all cases by default) and return one row per case."""
    rows = []
    for case in gallery.cases(names):
        _, grad_ref = exact_loss_and_grad(case.problem, case.theta, case.param, precise=True)
        over_rtol, over_est, returned, refused = 0.0, 0.0, 0, 0
        start = time.perf_counter()
        for k in ks:
            for rtol in rtols:
                try:
                    _, grad, info = dd.loss_and_grad(case.problem, case.theta, param=case.param,
                                                     k=k, rtol=rtol, return_info=True)
                except dd.AccuracyError:
                    refused += 1
                    continue
                err = relative_error(grad, grad_ref)
                over_rtol = max(over_rtol, err / info["rtol"])
                over_est = max(over_est, err / info["error_estimate"])
                returned += 1
        rows.append(TrustRow(case.name, case.description, over_rtol, over_est, returned,
                             refused, time.perf_counter() - start))
    return rows


def trust_table(rows: Sequence[TrustRow], markdown: bool) -> str:
    """The rows as a table, with a last line for the worst case over all classes."""
    header = ["case", "operator class", "worst error / rtol", "worst error / estimate",
              "returned", "refused", "time [s]"]
    body = [[r.name, r.description, f"{r.worst_error_over_rtol:.2g}",
             f"{r.worst_error_over_estimate:.2g}", str(r.returned), str(r.refused),
             f"{r.seconds:.2f}"] for r in rows]
    body.append(["**all**" if markdown else "ALL", f"{len(rows)} classes",
                 f"{max(r.worst_error_over_rtol for r in rows):.2g}",
                 f"{max(r.worst_error_over_estimate for r in rows):.2g}",
                 str(sum(r.returned for r in rows)), str(sum(r.refused for r in rows)),
                 f"{sum(r.seconds for r in rows):.1f}"])
    return render_table(header, body, markdown)
