"""GPU efficiency of the orthogonalisation: bytes moved, achieved bandwidth, roofline fraction.

At large n the batched Arnoldi's classical Gram-Schmidt, applied twice (CGS2), dominates and is
memory-bound: every column has its own basis, so each projection is a batched matvec, not a GEMM.

Byte count (float64, 8 bytes; c columns, state length N, m basis vectors at that step), for
CGS2 as written in ``diagode_dist.krylov`` (two passes of "project, then combine"):

    one pass:  project  h = V^T w      reads V (m c N) and w (c N)
               combine  y = V h        reads V (m c N), writes y (c N)
               update   w = w - y      reads w, y, writes w (3 c N)
    CGS2 = two passes:  bytes(m) = 8 c N (4 m + 10)

so the basis is read four times per step (twice per pass). Over an Arnoldi sweep of k steps
(m = 1..k): 8 c N (2 k (k+1) + 10 k). Flops of one step: 8 m c N (a multiply-add per read
basis entry), i.e. about 0.25 flop/byte: far below any GPU's ridge point, hence memory-bound.
The roofline is the device's measured copy bandwidth (a large device-to-device copy reads and
writes each byte once: 2 x size bytes per copy).

Every function here takes the array module ``xp`` (NumPy or CuPy): the same code measures a
CPU for tests and a GPU for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ITEMSIZE = 8  # float64


def cgs2_step_bytes(c: int, N: int, m: int, itemsize: int = ITEMSIZE) -> int:
    """Bytes moved by one CGS2 step of c columns, state length N, against m basis vectors."""
    return itemsize * c * N * (4 * m + 10)


def cgs2_sweep_bytes(c: int, N: int, k: int, itemsize: int = ITEMSIZE) -> int:
    """Bytes moved by the CGS2 steps of a k-step Arnoldi sweep (m = 1..k)."""
    return itemsize * c * N * (2 * k * (k + 1) + 10 * k)


def cgs2_step_flops(c: int, N: int, m: int) -> int:
    """Floating-point operations of one CGS2 step (two projections, two combinations)."""
    return 8 * m * c * N


def _synchronizer(xp: Any) -> Callable[[], None]:
    if xp.__name__ == "cupy":
        return xp.cuda.Device().synchronize
    return lambda: None


def _best_time(run: Callable[[], Any], sync: Callable[[], None], repeat: int) -> float:
    """Fastest of ``repeat`` timed calls (after one warm-up), device synchronised."""
    run()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(xp: Any, nbytes: int = 2 << 30, repeat: int = 5) -> float:
    """Measured copy bandwidth in bytes/s: 2 x nbytes (read + write) per device-to-device copy."""
    src = xp.ones(nbytes // ITEMSIZE)
    dst = xp.empty_like(src)
    seconds = _best_time(lambda: xp.copyto(dst, src), _synchronizer(xp), repeat)
    return 2 * src.nbytes / seconds


def gemm_flops(xp: Any, size: int = 8192, repeat: int = 3) -> float:
    """Measured float64 GEMM rate in flop/s (size x size x size)."""
    a = xp.ones((size, size))
    b = xp.ones((size, size))
    seconds = _best_time(lambda: a @ b, _synchronizer(xp), repeat)
    return 2.0 * size**3 / seconds


@dataclass
class SweepMeasurement:
    """One timed CGS2 sweep: shape, seconds, bytes, flops and the derived rates."""

    columns: int
    state: int
    steps: int
    seconds: float
    bytes: int
    flops: int

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def cgs2_sweep(xp: Any, columns: int, state: int, steps: int, repeat: int = 3,
               seed: int = 0) -> SweepMeasurement:
    """Time the package's CGS2 over one Arnoldi sweep (m = 1..steps) on random data.

    Uses ``diagode_dist.krylov._cgs2`` (the function the Arnoldi loop calls), on a basis of
    shape (steps, columns, state), the layout of ``krylov.arnoldi``. Values do not matter for
    the traffic; the operator product is left out, so this is the orthogonalisation alone.
    """
    from diagode_dist import krylov

    rng = xp.random.default_rng(seed) if hasattr(xp.random, "default_rng") else xp.random
    basis = rng.standard_normal((steps, columns, state))
    w = rng.standard_normal((columns, state))

    def sweep() -> None:
        for m in range(1, steps + 1):
            krylov._cgs2(basis[:m], w)

    seconds = _best_time(sweep, _synchronizer(xp), repeat)
    return SweepMeasurement(
        columns=columns, state=state, steps=steps, seconds=seconds,
        bytes=cgs2_sweep_bytes(columns, state, steps),
        flops=sum(cgs2_step_flops(columns, state, m) for m in range(1, steps + 1)),
    )


def columns_that_fit(free_bytes: int, state: int, steps: int, wanted: int,
                     fraction: float = 0.5) -> int:
    """Largest column count <= wanted whose basis (steps x columns x state doubles) and work
    vectors use at most ``fraction`` of ``free_bytes``."""
    per_column = ITEMSIZE * state * (steps + 4)
    return max(1, min(wanted, int(fraction * free_bytes // per_column)))
