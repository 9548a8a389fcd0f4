"""GPU efficiency of the orthogonalisation: bytes moved, achieved bandwidth, roofline fraction.

At large n the batched Arnoldi's classical Gram-Schmidt, applied twice (CGS2), dominates and is
memory-bound: every column has its own basis, so each projection is a batched matvec, not a GEMM.

Byte count (float64, 8 bytes; c columns, state length N, m basis vectors at that step), for
CGS2 as written in ``diagode_dist.krylov`` (two passes of "project, then combine"):

    one pass:  project  h = V^T w      reads V (m c N) and w (c N)
               combine  y = V h        reads V (m c N), writes y (c N)
               update   w = w - y      reads w, y, writes w (3 c N)
    CGS2 = two passes:  bytes(m) = 8 c N (4 m + 10)

so the basis is read four times per step (twice per pass). The projections read each column's
basis where it lies in the (k+1, c, N) array (on CuPy one strided-batched GEMM: its matmul
would first copy a non-contiguous basis slice, 8 c N (12 m + 10) bytes and m c N more memory).
Over an Arnoldi sweep of k steps (m = 1..k): 8 c N (2 k (k+1) + 10 k). A symmetric operator
uses Lanczos: each step orthogonalises against the last two vectors only (m = min(j, 2)), so
a k-step sweep moves 8 c N (18 k - 4). Flops of one step: 8 m c N (a multiply-add per read
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
from types import SimpleNamespace
from typing import Any

import numpy as np

ITEMSIZE = 8  # float64


def cgs2_step_bytes(c: int, N: int, m: int, itemsize: int = ITEMSIZE) -> int:
    """Bytes moved by one CGS2 step of c columns, state length N, against m basis vectors."""
    return itemsize * c * N * (4 * m + 10)


def cgs2_sweep_bytes(c: int, N: int, k: int, itemsize: int = ITEMSIZE) -> int:
    """Bytes moved by the CGS2 steps of a k-step Arnoldi sweep (m = 1..k)."""
    return itemsize * c * N * (2 * k * (k + 1) + 10 * k)


def lanczos_sweep_bytes(c: int, N: int, k: int, itemsize: int = ITEMSIZE) -> int:
    """Bytes moved by the CGS2 steps of a k-step Lanczos sweep (m = min(j, 2), j = 1..k)."""
    return itemsize * c * N * (18 * k - 4) if k > 0 else 0


def sweep_bytes(c: int, N: int, k: int, symmetric: bool, itemsize: int = ITEMSIZE) -> int:
    """CGS2 bytes of a k-step sweep: Lanczos when ``symmetric``, else Arnoldi."""
    if symmetric:
        return lanczos_sweep_bytes(c, N, k, itemsize)
    return cgs2_sweep_bytes(c, N, k, itemsize)


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
               seed: int = 0, symmetric: bool = False) -> SweepMeasurement:
    """Time the package's CGS2 over one Arnoldi sweep (m = 1..steps) on random data, or over
    a Lanczos sweep (the last two vectors each step) when ``symmetric``.

    Uses ``diagode_dist.krylov._cgs2`` (the function the Arnoldi loop calls), on a basis of
    shape (steps, columns, state), the layout of ``krylov.arnoldi``. Values do not matter for
    the traffic; the operator product is left out, so this is the orthogonalisation alone.
    """
    from diagode_dist import krylov

    rng = xp.random.default_rng(seed) if hasattr(xp.random, "default_rng") else xp.random
    basis = rng.standard_normal((steps, columns, state))
    w = rng.standard_normal((columns, state))

    def first(m: int) -> int:
        return max(0, m - 2) if symmetric else 0

    def sweep() -> None:
        for m in range(1, steps + 1):
            krylov._cgs2(basis[first(m):m], w)

    seconds = _best_time(sweep, _synchronizer(xp), repeat)
    return SweepMeasurement(
        columns=columns, state=state, steps=steps, seconds=seconds,
        bytes=sweep_bytes(columns, state, steps, symmetric),
        flops=sum(cgs2_step_flops(columns, state, m - first(m)) for m in range(1, steps + 1)),
    )


def columns_that_fit(free_bytes: int, state: int, steps: int, wanted: int,
                     fraction: float = 0.5) -> int:
    """Largest column count <= wanted whose basis (steps x columns x state doubles) and work
    vectors use at most ``fraction`` of ``free_bytes``."""
    per_column = ITEMSIZE * state * (steps + 4)
    return max(1, min(wanted, int(fraction * free_bytes // per_column)))


# ---- the --gpu report -------------------------------------------------------------------------

GPU_GRID = 316  # n = 316^2 = 99856, about 1e5
GPU_COLUMNS = (1024, 512, 256)  # S, halved while it does not fit


def gpu_unavailable() -> str | None:
    """None when CuPy imports and sees a CUDA device, else the reason (for the skip line)."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'diagode-dist[gpu]')"
    except Exception as exc:  # a broken CUDA install raises other errors on import
        return f"CuPy does not import: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device: {type(exc).__name__}: {exc}"
    return None if count > 0 else "no CUDA device visible"


def _device_name(cp: Any) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _host_problem(m: int, S: int) -> SimpleNamespace:
    """The GPU case on the host: ``cases.grid_arrays`` (n = m^2) as a problem-like object."""
    from .cases import grid_arrays

    return SimpleNamespace(x0=None, **grid_arrays(m, S))


def _device_problem(cp: Any, host: SimpleNamespace):
    import cupyx.scipy.sparse as cusp

    import diagode_dist as dd

    prob = dd.Problem(cusp.csr_matrix(host.A0), cp.asarray(host.F), cp.asarray(host.labels),
                      T=host.T, beta=host.beta)
    return prob, cp.asarray(host.theta)


@dataclass
class GradientTiming:
    """Our gradient on the device: S used, median seconds, info dict, gradient (host), and
    whether its Krylov sweeps were Lanczos (symmetric A0, zero start)."""

    host: SimpleNamespace
    seconds: float
    info: dict
    grad: Any
    symmetric: bool = False


def _time_gradient(cp: Any, host: SimpleNamespace, k: int, repeat: int) -> GradientTiming:
    """Median seconds of ``dd.loss_and_grad`` on the device (after a warm-up call)."""
    import diagode_dist as dd

    sync = _synchronizer(cp)
    prob, theta = _device_problem(cp, host)
    _loss, grad, info = dd.loss_and_grad(prob, theta, k=k, return_info=True)
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dd.loss_and_grad(prob, theta, k=k)
        sync()
        times.append(time.perf_counter() - start)
    symmetric = bool(getattr(prob, "symmetric", False)) and prob.x0 is None
    return GradientTiming(host, sorted(times)[len(times) // 2], info, cp.asnumpy(grad),
                          symmetric)


def _fit_gradient(cp: Any, k: int, repeat: int, log: Callable[[str], None]) -> GradientTiming:
    """Time the gradient at the largest S of GPU_COLUMNS that fits on the device."""
    for S in GPU_COLUMNS:
        log(f"[gpu] loss_and_grad n={GPU_GRID**2} S={S} k={k} ...")
        try:
            return _time_gradient(cp, _host_problem(GPU_GRID, S), k, repeat)
        except cp.cuda.memory.OutOfMemoryError:
            log(f"[gpu] S={S} does not fit; halving")
        finally:
            cp.get_default_memory_pool().free_all_blocks()
    raise RuntimeError(f"not even S={GPU_COLUMNS[-1]} fits on the device")


def _ortho_bytes(S: int, n: int, info: dict, symmetric: bool = False) -> int:
    """CGS2 bytes of one gradient, from the dimensions it used: forward sweeps on N = n+1 and
    adjoint sweeps on N = n, one of each per sub-step. With a symmetric A0 (and x0 = 0) the
    first forward sweep (from the zero state) and every adjoint sweep are Lanczos, the later
    forward sweeps Arnoldi. An upper bound: columns that converge earlier stop earlier.
    (Forward bases rebuilt for the adjoint when they do not fit in memory would add another
    forward sweep.)"""
    steps, fdim, adim = int(info["substeps"]), int(info["forward_dim"]), int(info["adjoint_dim"])
    forward = (sweep_bytes(S, n + 1, fdim, symmetric)
               + (steps - 1) * cgs2_sweep_bytes(S, n + 1, fdim))
    return forward + steps * sweep_bytes(S, n, adim, symmetric)


def _torch_peer_cells(ours: GradientTiming, budget: float, log: Callable[[str], None]):
    """torchdiffeq odeint_adjoint on CUDA (sparse CSR A0) on the same problem: table cells."""
    from . import peers

    reason = peers.available()
    if reason is None:
        import torch

        reason = None if torch.cuda.is_available() else "torch sees no CUDA device"
    if reason:
        return [f"torchdiffeq odeint_adjoint (CUDA): skipped: {reason}"] + ["-"] * 9
    import torch

    log("[gpu] torchdiffeq odeint_adjoint on CUDA ...")
    peers.odeint_adjoint(_host_problem(8, 4), np.zeros(64), device="cuda", sparse=True)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        _loss, grad = peers.odeint_adjoint(ours.host, ours.host.theta, start + budget, "cuda",
                                           sparse=True)
        torch.cuda.synchronize()
    except Exception as exc:  # a timeout or a failure is a result to show
        return [f"torchdiffeq odeint_adjoint (CUDA): {type(exc).__name__}: {exc}"] + ["-"] * 9
    seconds = time.perf_counter() - start
    difference = float(np.linalg.norm(grad - ours.grad) / np.linalg.norm(ours.grad))
    return ["torchdiffeq odeint_adjoint dopri5 1e-9 (CUDA, sparse CSR)", str(ours.host.F.shape[0]),
            str(ours.host.F.shape[1]), f"rel. diff. of gradient vs ours {difference:.1e}",
            f"{seconds:.3g}", f"{seconds / ours.seconds:.3g} x ours", "-", "-", "-", "-"]


def gpu_report(repeat: int = 3, markdown: bool = False, k: int = 30, budget: float = 60.0,
               log: Callable[[str], None] | None = None) -> str:
    """The --gpu section: device, measured copy bandwidth and DGEMM rate, our gradient's time at
    n ~ 1e5, S = 1024, the CGS2 sweep's bytes, bandwidth and roofline fraction, and torchdiffeq's
    adjoint on the same device and problem."""
    from .table import render_table

    reason = gpu_unavailable()
    if reason:
        return f"GPU benchmark skipped: {reason}."
    import cupy as cp

    log = log or (lambda _msg: None)
    bullet = "- " if markdown else "  "
    log("[gpu] copy bandwidth and DGEMM rate ...")
    bandwidth, peak_flops = copy_bandwidth(cp), gemm_flops(cp)
    ours = _fit_gradient(cp, k, repeat, log)
    info, (n, S) = ours.info, ours.host.F.shape
    free, total = cp.cuda.runtime.memGetInfo()
    # the projections copy no basis (strided-batched GEMM): the basis and a few vectors
    columns = columns_that_fit(free, n + 1, int(info["forward_dim"]) + 1, S, fraction=0.5)
    kind = "Lanczos" if ours.symmetric else "Arnoldi"
    log(f"[gpu] CGS2 {kind} sweep c={columns} N={n + 1} m=1..{info['forward_dim']} ...")
    sweep = cgs2_sweep(cp, columns, n + 1, int(info["forward_dim"]), repeat=repeat,
                       symmetric=ours.symmetric)
    cp.get_default_memory_pool().free_all_blocks()
    ortho = _ortho_bytes(S, n, info, ours.symmetric)
    lines = [
        f"{bullet}device: {_device_name(cp)}, {total / 2**30:.0f} GiB",
        f"{bullet}measured copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s; "
        f"measured float64 GEMM: {peak_flops / 1e12:.1f} TFLOP/s",
        f"{bullet}byte count of CGS2 per step (c columns, state N, m basis vectors): "
        "8 c N (4 m + 10); per k-step sweep 8 c N (2 k (k+1) + 10 k) with Arnoldi, "
        "8 c N (18 k - 4) with Lanczos (m <= 2)",
        f"{bullet}this problem: {kind} (A0 {'' if ours.symmetric else 'not '}symmetric)",
        "",
    ]
    header = ("what", "n", "S / c", "Krylov dims", "time [s]", "bytes (CGS2)", "GB/s",
              "of copy BW", "GFLOP/s", "of DGEMM")
    body = [
        ["loss_and_grad (whole, median)", str(n), str(S),
         f"fwd {info['forward_dim']}/adj {info['adjoint_dim']}, {info['substeps']} sub-step(s)",
         f"{ours.seconds:.3g}", f"{ortho:.3g}",
         f"{ortho / ours.seconds / 1e9:.0f} (if CGS2 only)",
         f"CGS2 share at sweep BW: {ortho / sweep.bytes_per_s / ours.seconds:.0%}", "-", "-"],
        [f"CGS2 {kind} sweep alone (krylov._cgs2, best)", str(n + 1), str(columns),
         f"m = 1..{sweep.steps}", f"{sweep.seconds:.3g}", f"{sweep.bytes:.3g}",
         f"{sweep.bytes_per_s / 1e9:.0f}", f"{sweep.bytes_per_s / bandwidth:.0%}",
         f"{sweep.flops_per_s / 1e9:.0f}", f"{sweep.flops_per_s / peak_flops:.1%}"],
        _torch_peer_cells(ours, budget, log),
    ]
    return "\n".join(lines) + "\n" + render_table(header, body, markdown)
