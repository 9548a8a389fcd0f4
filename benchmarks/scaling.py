"""Our time against n, S and k, on sparse 2-D grid problems (``cases.grid_arrays``).

n is too large here for the dense reference, so this table reports time and our own accuracy
record (Krylov dimensions used, sub-steps, error estimate), not an error against a reference.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from .cases import grid_arrays
from .table import render_table

# (grid side m, S, k): n = m^2. One baseline (64, 64, 30), varied in n, then S, then k.
CONFIGS = (
    (32, 64, 30), (64, 64, 30), (128, 64, 30), (256, 64, 30),
    (64, 16, 30), (64, 256, 30),
    (64, 64, 10), (64, 64, 20), (64, 64, 40),
)
QUICK_CONFIGS = ((8, 4, 10), (8, 4, 20), (16, 4, 20))

HEADER = ("n", "S", "k (max)", "time [s]", "per column [ms]", "dims fwd/adj", "sub-steps",
          "error estimate")


def _time_one(m: int, S: int, k: int, repeat: int) -> list[str]:
    import diagode_dist as dd

    a = grid_arrays(m, S)
    prob = dd.Problem(a["A0"], a["F"], a["labels"], T=a["T"], beta=a["beta"])
    info = dd.loss_and_grad(prob, a["theta"], k=k, return_info=True)[2]  # also the warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dd.loss_and_grad(prob, a["theta"], k=k)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return [str(m * m), str(S), str(k), f"{median:.3g}", f"{1e3 * median / S:.3g}",
            f"{info['forward_dim']}/{info['adjoint_dim']}", str(info["substeps"]),
            f"{info['error_estimate']:.0e}"]


def scaling_table(repeat: int = 3, markdown: bool = False, quick: bool = False,
                  log: Callable[[str], None] | None = None) -> str:
    """Median time of ``dd.loss_and_grad`` per (n, S, k) configuration, as a table."""
    body = []
    for m, S, k in QUICK_CONFIGS if quick else CONFIGS:
        if log:
            log(f"[scaling] n={m * m} S={S} k={k} ...")
        body.append(_time_one(m, S, k, repeat))
    return render_table(HEADER, body, markdown)
