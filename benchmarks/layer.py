"""The PyTorch layer against the core and against torch peers.

``python -m benchmarks --cases none --layer`` (a few minutes) prints two tables:

1. The bridge's cost: the seed demo shape (n = 256, S = 64, A0 = 0.01 randn, T = 2, beta = 10,
   classification loss) through ``diagode_dist.torch.odeint_linear`` + torch autograd against
   ``dd.loss_and_grad`` on the same problem (same theta; gradients compared): best of
   ``--repeat`` runs each, CPU time, the two alternating.
2. Stiff 2-D diffusion at development size (32 x 32 grid, S = 16).

``python -m benchmarks --cases none --layer-stiff --peer-budget 600`` runs the stiff case at the
benchmark size: A = the 5-point Laplacian on a 128 x 128 grid (n = 16384, Dirichlet,
h = 1/(m+1)), t with ||t A||_2 = 5000, B (n, 64) random, L = <G, exp(t A) B> with G random:
forward + backward of ``expm_multiply`` (rational Krylov; gradients for A's stored values and
B) against torchdiffeq (dopri5 ``odeint`` with backprop and ``odeint_adjoint`` at
rtol = atol = 1e-8, fixed-step RK4 at its stability limit with backprop) and dense
``torch.linalg.matrix_exp`` + autograd. Each method runs in its own process (spawned) with a
time budget and a memory cap (RLIMIT_DATA), so that none can take the machine down; one that
does not finish is reported with how far it got (pass, time reached, right-hand side
evaluations) and its time as a lower bound. Gradient errors are against the exact spectral
reference (``spectral_stiff_gradients``: the grid Laplacian is diagonalised by the 2-D sine
transform; checked against the dense ``diagode_dist.reference`` on small grids in the tests).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import resource
import time
from collections.abc import Callable

import numpy as np
import scipy.fft
import scipy.linalg
import scipy.sparse as sp

from .table import render_table

STIFF_NORM = 5000.0  # ||t A||_2 of the stiff case
PEER_TOL = 1e-8
OUR_RTOL = PEER_TOL  # the same tolerance as the peers
OUR_K = (30, 60)  # the rational method's Krylov dimension: the first that is certified
RK4_STABILITY = 2.5  # fixed RK4 step = this / ||A||_2 (its stability limit on -R is 2.78)


def _threads_one() -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


# ---- 1. the bridge's cost on the seed demo ----------------------------------------------------


def demo_rows(repeat: int, n: int = 256, S: int = 64) -> list[list[str]]:
    """Times (median of ``repeat``) of the layer and of dd.loss_and_grad on the demo problem."""
    import torch

    import diagode_dist as dd
    from diagode_dist.torch import odeint_linear

    _threads_one()
    prob = dd.demo_problem(n=n, S=S)
    theta = np.zeros(n)
    A = torch.from_numpy(prob.A0)
    F = torch.from_numpy(prob.F)
    labels = torch.from_numpy(np.asarray(prob.labels))

    def layer():
        t = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        X = odeint_linear(A, f=F, t=prob.T, d=-torch.nn.functional.softplus(t))[0]
        loss = torch.nn.functional.cross_entropy(prob.beta * X.T, labels)
        loss.backward()
        return float(loss.detach()), t.grad.numpy()

    def core():
        return dd.loss_and_grad(prob, theta)

    (t_layer, (loss_l, grad_l)), (t_core, (loss_c, grad_c)) = _best_cpu((layer, core), repeat)
    diff = float(np.abs(grad_l - grad_c).max() / np.abs(grad_c).max())
    return [["diagode_dist.torch odeint_linear + autograd", f"{t_layer * 1e3:.1f}",
             f"{t_layer / t_core:.2f}x", f"{abs(loss_l - loss_c):.1e}", f"{diff:.1e}"],
            ["dd.loss_and_grad", f"{t_core * 1e3:.1f}", "1.00x", "0", "0"]]


def _best_cpu(fns, repeat: int) -> list:
    """(best CPU seconds of ``repeat`` runs, last result) per function; the functions run in
    turn, so that a change of machine load touches them alike (the machine is shared)."""
    results = [fn() for fn in fns]  # warm-up (imports, thread pools)
    best = [math.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.process_time()
            results[i] = fn()
            best[i] = min(best[i], time.process_time() - start)
    return list(zip(best, results, strict=True))


# ---- 2. stiff 2-D diffusion -------------------------------------------------------------------


def stiff_arrays(m: int, S: int, seed: int = 0) -> dict:
    """A (CSR Laplacian, n = m^2), t with ||t A||_2 = STIFF_NORM, B and G (n, S)."""
    rng = np.random.default_rng(seed)
    h = 1.0 / (m + 1)
    path = sp.diags([np.ones(m - 1), -2 * np.ones(m), np.ones(m - 1)], [-1, 0, 1])
    eye = sp.identity(m)
    A = sp.csr_matrix((sp.kron(path, eye) + sp.kron(eye, path)) / h**2)
    A.sort_indices()
    norm = (8.0 / h**2) * np.sin(m * np.pi * h / 2) ** 2  # largest |eigenvalue|
    return dict(A=A, t=STIFF_NORM / norm, B=rng.standard_normal((m * m, S)),
                G=rng.standard_normal((m * m, S)), m=m, norm=norm)


def exact_stiff_gradients(arrays: dict, precise: bool = False) -> dict:
    """dL/d(values of A) and dL/dB from the exact dense reference (small m only): the Van Loan
    integral K = int lambda x^T dt (n x n) of ``diagode_dist.reference``, read on A's pattern.
    precise: exponentials in ball arithmetic (``reference.expm_arb``) instead of SciPy's expm,
    which loses about eps ||tA|| (1.6e-11 measured at ||tA|| = 5000 with SciPy 1.17)."""
    from diagode_dist.reference import _obs_loss_and_integrals, expm_arb

    A, B, G, t = arrays["A"], arrays["B"], arrays["G"], arrays["t"]

    def linear(states, columns):
        jumps = G[None][:, :, columns].transpose(0, 2, 1)
        return (jumps * states).sum(axis=(0, 2)), jumps

    n, S = B.shape
    expm = expm_arb if precise else scipy.linalg.expm
    _, K, grad_B, _ = _obs_loss_and_integrals(A.toarray(), np.zeros((n, S)), B,
                                              np.array([t]), linear, np.arange(S), expm)
    coo = A.tocoo()  # canonical CSR: the COO entries are in A.data's order
    return {"values": K[coo.row, coo.col] * S, "B": grad_B * S}  # the reference: column means


def spectral_stiff_gradients(arrays: dict, block: int = 256) -> dict:
    """dL/d(values of A) and dL/dB, exact to rounding, at any grid size (no dense exponential).

    The grid Laplacian is A = Q diag(lam) Q with Q the orthonormal 2-D sine transform (DST-I,
    symmetric), lam_(a1, a2) = mu_a1 + mu_a2, mu_p = -(4 / h^2) sin^2(p pi h / 2). With
    x(s) = exp(sA) B and lambda(s) = exp((t - s) A) G,

        dL/dA = int_0^t lambda x^T ds = Q ((G^ B^T) * Phi) Q,   G^ = Q G, B^ = Q B (n, S),
        Phi_ab = int_0^t e^{(t-s) lam_a} e^{s lam_b} ds = t e^{max} (1 - e^{-|d|}) / |d|,

    d = t (lam_a - lam_b), read on A's pattern; dL/dB = lambda(0) = Q e^{t lam} G^. Cost: n^2 S
    for G^ B^T and two sine transforms of an n x n array (m = 128: 2 GiB, about a minute).
    """
    A, t, m = arrays["A"], arrays["t"], arrays["m"]
    n = m * m
    h = 1.0 / (m + 1)
    mu = -(4.0 / h**2) * np.sin(np.arange(1, m + 1) * np.pi * h / 2) ** 2
    lam = (mu[:, None] + mu[None, :]).reshape(-1)
    G_hat, B_hat = _sine2(arrays["G"].T).T, _sine2(arrays["B"].T).T  # (n, S)
    P = np.empty((n, n))  # (G^ B^T * Phi) Q, row block by row block
    for lo in range(0, n, block):
        rows = slice(lo, lo + block)
        u, v = t * lam[rows, None], t * lam[None, :]
        gap = np.abs(u - v)
        ratio = np.ones_like(gap)  # (1 - e^{-|d|}) / |d|, 1 at d = 0
        np.divide(-np.expm1(-gap), gap, out=ratio, where=gap > 0)
        P[rows] = _sine2((G_hat[rows] @ B_hat.T) * (t * np.exp(np.maximum(u, v)) * ratio))
    coo = A.tocoo()
    values = np.empty(coo.nnz)
    for lo in range(0, n, block):  # K = Q P, column block by column block, on the pattern
        K_cols = _sine2(P[:, lo: lo + block].T).T
        pick = (coo.col >= lo) & (coo.col < lo + block)
        values[pick] = K_cols[coo.row[pick], coo.col[pick] - lo]
    grad_B = _sine2((np.exp(t * lam)[:, None] * G_hat).T).T
    return {"values": values, "B": grad_B}


def _sine2(rows):
    """Q applied to every row (r, m^2) of grid vectors: the orthonormal 2-D DST-I."""
    r, n = rows.shape
    m = math.isqrt(n)
    grid = scipy.fft.dstn(rows.reshape(r, m, m), type=1, axes=(1, 2), norm="ortho")
    return grid.reshape(r, n)


def _torch_operator(A, values):
    import torch

    return torch.sparse_csr_tensor(torch.tensor(A.indptr, dtype=torch.int64),
                                   torch.tensor(A.indices, dtype=torch.int64), values, A.shape)


def _method_ours(arrays, progress):
    import torch

    from diagode_dist import AccuracyError
    from diagode_dist.torch import expm_multiply

    refused = []
    for k in OUR_K:  # the first Krylov dimension the method certifies rtol with
        start = time.perf_counter()
        values = torch.tensor(arrays["A"].data, requires_grad=True)
        B = torch.tensor(arrays["B"], requires_grad=True)
        try:
            X = expm_multiply(_torch_operator(arrays["A"], values), B, arrays["t"],
                              rtol=OUR_RTOL, k=k, method="rational")
            progress[0] = 1.0
            (X * torch.tensor(arrays["G"])).sum().backward()
        except AccuracyError:
            refused.append(f"k={k} refused after {time.perf_counter() - start:.0f} s")
            continue
        note = "; ".join([f"rational, k={k}, rtol {OUR_RTOL:g}", *refused])
        return {"values": values.grad.numpy(), "B": B.grad.numpy(), "note": note,
                "seconds": time.perf_counter() - start}
    raise RuntimeError("; ".join(refused))


def _method_torchdiffeq(method: str, adjoint: bool, fixed_step: bool = False):
    def run(arrays, progress):
        import torch
        import torchdiffeq

        A, T = arrays["A"], arrays["t"]
        values = torch.tensor(A.data, requires_grad=True)
        B = torch.tensor(arrays["B"], requires_grad=True)

        class Rhs(torch.nn.Module):
            def forward(self, time_now, x):
                progress[1] = float(time_now.detach()) / T
                progress[2] += 1
                return _torch_operator(A, values) @ x

        times = torch.tensor([0.0, T], dtype=torch.float64)
        kw = dict(method=method)
        if fixed_step:
            kw["options"] = {"step_size": RK4_STABILITY / arrays["norm"]}
        else:
            kw.update(rtol=PEER_TOL, atol=PEER_TOL)
        if adjoint:
            X = torchdiffeq.odeint_adjoint(Rhs(), B, times, adjoint_params=(values,), **kw)[1]
        else:
            X = torchdiffeq.odeint(Rhs(), B, times, **kw)[1]
        progress[0] = 1.0
        (X * torch.tensor(arrays["G"])).sum().backward()
        return {"values": values.grad.numpy(), "B": B.grad.numpy()}

    return run


def _method_matrix_exp(arrays, progress):
    import torch

    A = arrays["A"]
    values = torch.tensor(A.data, requires_grad=True)
    B = torch.tensor(arrays["B"], requires_grad=True)
    coo = A.tocoo()
    dense = torch.zeros(A.shape, dtype=torch.float64).index_put(
        (torch.tensor(coo.row, dtype=torch.int64), torch.tensor(coo.col, dtype=torch.int64)),
        values)
    X = torch.linalg.matrix_exp(arrays["t"] * dense) @ B
    progress[0] = 1.0
    (X * torch.tensor(arrays["G"])).sum().backward()
    return {"values": values.grad.numpy(), "B": B.grad.numpy()}


OURS = "diagode_dist.torch expm_multiply"
STIFF_METHODS = {
    OURS: _method_ours,
    f"torchdiffeq odeint backprop, dopri5 {PEER_TOL:g}": _method_torchdiffeq("dopri5", False),
    f"torchdiffeq odeint_adjoint, dopri5 {PEER_TOL:g}": _method_torchdiffeq("dopri5", True),
    "torchdiffeq odeint backprop, rk4 fixed step 2.5 / norm(A)":
        _method_torchdiffeq("rk4", False, fixed_step=True),
    "torch.linalg.matrix_exp + autograd (dense)": _method_matrix_exp,
}


def _child(name, arrays, progress, queue, memory_bytes):
    import warnings

    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    import torch  # noqa: F401  (imports before the clock starts)
    import torchdiffeq  # noqa: F401

    import diagode_dist.torch  # noqa: F401

    warnings.filterwarnings("ignore", category=UserWarning)
    _threads_one()
    queue.put(("started",))
    start = time.perf_counter()
    try:
        result = STIFF_METHODS[name](arrays, progress)
        seconds = result.pop("seconds", time.perf_counter() - start)
        queue.put(("ok", seconds, result, _max_rss_mib()))
    except BaseException as error:  # reported in the table (out of memory, refused, ...)
        queue.put(("error", time.perf_counter() - start, _error_text(error), _max_rss_mib()))


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, MemoryError) or any(
            words in text for words in ("not enough memory", "can't allocate")):
        return "out of memory (the cap)"
    return text[:100]


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_isolated(name: str, arrays: dict, budget: float, memory_gib: float = 8.0) -> dict:
    """Run one method in a spawned process, its data memory capped at ``memory_gib``; stop it
    after ``budget`` seconds (from the end of its imports). ``progress``: [1 once the forward
    pass returned, the last time the right-hand side saw / T, right-hand side evaluations]."""
    ctx = mp.get_context("spawn")
    progress, results = ctx.Array("d", 3), ctx.Queue()
    proc = ctx.Process(target=_child, daemon=True,
                       args=(name, arrays, progress, results, int(memory_gib * 2**30)))
    proc.start()
    peak = [0.0]  # MiB, sampled each second (a stopped method reports no max RSS of its own)
    message = _receive(results, proc, 300, peak)  # ("started",) after the imports
    if message is not None:
        message = _receive(results, proc, budget, peak)
    if message is None:
        stopped = proc.is_alive()
        proc.kill()
        proc.join()
        return {"status": "stopped" if stopped else "crashed", "progress": list(progress),
                "exitcode": proc.exitcode, "rss": peak[0]}
    status, seconds, payload, rss = message
    proc.join()
    return {"status": status, "seconds": seconds, "payload": payload, "rss": rss,
            "progress": list(progress)}


def _receive(results, proc, timeout: float, peak: list):
    """The next message of the child, or None after ``timeout`` s or when it died; ``peak[0]``
    follows its resident memory (MiB)."""
    import queue as queues

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queues.Empty:
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], psutil.Process(proc.pid).memory_info().rss / 2**20)
            if not proc.is_alive():  # a last look: it may have put its result and exited
                try:
                    return results.get(timeout=1.0)
                except queues.Empty:
                    return None
    return None


def _how_far(result: dict, budget: float, memory_gib: float) -> str:
    backward, reached, evaluations = result["progress"]
    where = "backward pass" if backward else "forward pass"
    if evaluations:
        where += f", t at {reached:.1%} of T, {evaluations:.0f} f-evals"
    if result["status"] == "stopped":
        return f"did not finish in {budget:.0f} s ({where})"
    if result["status"] == "crashed":
        return f"crashed, exit code {result['exitcode']} ({where})"
    return f"{result['payload'].replace('the cap', f'{memory_gib:g} GiB cap')} ({where})"


def stiff_rows(arrays: dict, exact: dict, budget: float, memory_gib: float,
               log: Callable[[str], None], methods=None) -> list[list[str]]:
    """One row per method: seconds, ratio to ours (a lower bound when it did not finish),
    gradient error against ``exact``, max RSS, and a note (how far it got)."""
    rows, ours_seconds = [], None
    for name in methods or STIFF_METHODS:
        log(f"layer benchmark: {name} (n = {arrays['A'].shape[0]}, S = {arrays['B'].shape[1]})")
        result = run_isolated(name, arrays, budget, memory_gib)
        rss = f"{result['rss']:.0f}" if "rss" in result else "-"
        if result["status"] != "ok":
            seconds = result.get("seconds", budget)
            bound = "> " if result["status"] == "stopped" else ""
            ratio = f">= {seconds / ours_seconds:.0f}x" if ours_seconds and bound else "-"
            rows.append([name, f"{bound}{seconds:.1f}", ratio, "-", rss,
                         _how_far(result, budget, memory_gib)])
            continue
        grads = result["payload"]
        error = max(_rel(grads["values"], exact["values"]), _rel(grads["B"], exact["B"]))
        ours_seconds = ours_seconds or result["seconds"]
        rows.append([name, f"{result['seconds']:.1f}",
                     f"{result['seconds'] / ours_seconds:.1f}x", f"{error:.1e}", rss,
                     grads.get("note", "")])
    return rows


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def stiff_report(m: int, S: int, budget: float, memory_gib: float, markdown: bool,
                 log: Callable[[str], None]) -> str:
    """The stiff table with its caption."""
    arrays = stiff_arrays(m, S)
    log(f"layer benchmark: the spectral reference (n = {m * m})")
    start = time.perf_counter()
    exact = spectral_stiff_gradients(arrays)
    reference_s = time.perf_counter() - start
    rows = stiff_rows(arrays, exact, budget, memory_gib, log)
    table = render_table(["method", "s (fwd + bwd)", "time / ours", "grad rel err (exact)",
                          "max RSS MiB", "note"], rows, markdown)
    return (f"Stiff 2-D diffusion {m}x{m} (n = {m * m}), S = {S}, ||t A||_2 = {STIFF_NORM:.0f} "
            f"(t = {arrays['t']:.3g}); one process per method, one thread, budget "
            f"{budget:.0f} s, memory cap {memory_gib:g} GiB; errors against the spectral "
            f"reference ({reference_s:.0f} s)\n\n{table}")


def layer_report(repeat: int, markdown: bool, quick: bool, budget: float,
                 log: Callable[[str], None], memory_gib: float = 8.0) -> str:
    """The bridge table and the development-size stiff table (``--layer``)."""
    n, S = (64, 16) if quick else (256, 64)
    demo = render_table(["method", "CPU ms (best)", "time / core", "loss abs diff",
                         "grad rel diff"], demo_rows(repeat, n, S), markdown)
    m, S_stiff = (8, 4) if quick else (32, 16)
    return (f"Seed demo shape (n = {n}, S = {S}): the layer against the core, best of "
            f"{repeat} alternating runs\n\n{demo}\n\n"
            + stiff_report(m, S_stiff, budget, memory_gib, markdown, log))
