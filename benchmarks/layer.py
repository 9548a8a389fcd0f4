"""The PyTorch layer against the core and against torch peers (``python -m benchmarks --layer``).

Two tables:

1. The bridge's cost: the seed demo shape (n = 256, S = 64, A0 = 0.01 randn, T = 2, beta = 10,
   classification loss) through ``diagode_dist.torch.odeint_linear`` + torch autograd against
   ``dd.loss_and_grad`` on the same problem (same theta; gradients compared).
2. Stiff 2-D diffusion: A = the 5-point Laplacian on an m x m grid (Dirichlet, h = 1/(m+1)),
   t with ||t A||_2 ~ 5000, B (n, S) random, L = <G, exp(t A) B> with G random: forward +
   backward of ``expm_multiply`` (gradients for A's stored values and B) against torchdiffeq
   (``odeint`` with backprop and ``odeint_adjoint``, dopri5, rtol = atol = 1e-8) and dense
   ``torch.linalg.matrix_exp`` + autograd. Each method runs in its own process (spawned), so
   its peak memory (max RSS) is its own and a method past the budget is stopped; how far in
   time it got is reported. Gradient errors are against the exact dense reference
   (``diagode_dist.reference``, Van Loan exponential of size 2n + S), so m is small enough for
   a dense n x n exponential (the full-size case, m = 128, has no dense reference).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from .table import render_table

STIFF_NORM = 5000.0  # ||t A||_2 of the stiff case
PEER_TOL = 1e-8


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

    (t_layer, (loss_l, grad_l)), (t_core, (loss_c, grad_c)) = (_median(layer, repeat),
                                                               _median(core, repeat))
    diff = float(np.abs(grad_l - grad_c).max() / np.abs(grad_c).max())
    return [["diagode_dist.torch odeint_linear + autograd", f"{t_layer * 1e3:.1f}",
             f"{t_layer / t_core:.2f}x", f"{abs(loss_l - loss_c):.1e}", f"{diff:.1e}"],
            ["dd.loss_and_grad", f"{t_core * 1e3:.1f}", "1.00x", "0", "0"]]


def _median(fn: Callable, repeat: int):
    fn()  # warm-up (imports, thread pools)
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


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
                G=rng.standard_normal((m * m, S)))


def exact_stiff_gradients(arrays: dict) -> dict:
    """dL/d(values of A) and dL/dB from the exact dense reference (small m only): the Van Loan
    integral K = int lambda x^T dt (n x n) of ``diagode_dist.reference``, read on A's pattern."""
    from diagode_dist.reference import _obs_loss_and_integrals

    A, B, G, t = arrays["A"], arrays["B"], arrays["G"], arrays["t"]

    def linear(states, columns):
        jumps = G[None][:, :, columns].transpose(0, 2, 1)
        return (jumps * states).sum(axis=(0, 2)), jumps

    n, S = B.shape
    _, K, grad_B, _ = _obs_loss_and_integrals(A.toarray(), np.zeros((n, S)), B,
                                              np.array([t]), linear, np.arange(S))
    coo = A.tocoo()  # canonical CSR: the COO entries are in A.data's order
    return {"values": K[coo.row, coo.col] * S, "B": grad_B * S}  # the reference: column means


def _method_ours(arrays, progress):
    import torch

    from diagode_dist.torch import expm_multiply

    A = arrays["A"]
    values = torch.tensor(A.data, requires_grad=True)
    B = torch.tensor(arrays["B"], requires_grad=True)
    csr = torch.sparse_csr_tensor(torch.tensor(A.indptr, dtype=torch.int64),
                                  torch.tensor(A.indices, dtype=torch.int64), values, A.shape)
    X = expm_multiply(csr, B, arrays["t"], rtol=1e-10)
    (X * torch.tensor(arrays["G"])).sum().backward()
    progress.value = 1.0
    return values.grad.numpy(), B.grad.numpy()


def _method_torchdiffeq(adjoint: bool):
    def run(arrays, progress):
        import torch
        import torchdiffeq

        A = arrays["A"]
        values = torch.tensor(A.data, requires_grad=True)
        B = torch.tensor(arrays["B"], requires_grad=True)
        crow = torch.tensor(A.indptr, dtype=torch.int64)
        col = torch.tensor(A.indices, dtype=torch.int64)
        T = arrays["t"]

        class Rhs(torch.nn.Module):
            def forward(self, time_now, x):
                progress.value = float(time_now.detach()) / T
                return torch.sparse_csr_tensor(crow, col, values, A.shape) @ x

        times = torch.tensor([0.0, T], dtype=torch.float64)
        kw = dict(rtol=PEER_TOL, atol=PEER_TOL, method="dopri5")
        if adjoint:
            X = torchdiffeq.odeint_adjoint(Rhs(), B, times, adjoint_params=(values,), **kw)[1]
        else:
            X = torchdiffeq.odeint(Rhs(), B, times, **kw)[1]
        (X * torch.tensor(arrays["G"])).sum().backward()
        progress.value = 1.0
        return values.grad.numpy(), B.grad.numpy()

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
    (X * torch.tensor(arrays["G"])).sum().backward()
    progress.value = 1.0
    return values.grad.numpy(), B.grad.numpy()


STIFF_METHODS = {
    "diagode_dist.torch expm_multiply": _method_ours,
    f"torchdiffeq odeint backprop dopri5 {PEER_TOL:g}": _method_torchdiffeq(adjoint=False),
    f"torchdiffeq odeint_adjoint dopri5 {PEER_TOL:g}": _method_torchdiffeq(adjoint=True),
    "torch.linalg.matrix_exp + autograd (dense)": _method_matrix_exp,
}


def _child(name, arrays, progress, queue):
    import warnings

    import torch  # noqa: F401  (imports before the clock starts)
    import torchdiffeq  # noqa: F401

    import diagode_dist.torch  # noqa: F401

    warnings.filterwarnings("ignore", category=UserWarning)
    _threads_one()
    start = time.perf_counter()
    try:
        grads = STIFF_METHODS[name](arrays, progress)
        queue.put(("ok", time.perf_counter() - start, grads, _max_rss_mib()))
    except Exception as error:  # reported in the table (e.g. out of memory)
        queue.put(("error", time.perf_counter() - start, repr(error)[:80], _max_rss_mib()))


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_isolated(name: str, arrays: dict, budget: float) -> dict:
    """Run one method in a spawned process; stop it after ``budget`` seconds."""
    ctx = mp.get_context("spawn")
    progress, queue = ctx.Value("d", 0.0), ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, arrays, progress, queue), daemon=True)
    proc.start()
    try:
        status, seconds, payload, rss = queue.get(timeout=budget + 60)  # + start-up
    except Exception:
        proc.kill()
        proc.join()
        return {"status": "stopped", "progress": progress.value}
    proc.join()
    return {"status": status, "seconds": seconds, "payload": payload, "rss": rss,
            "progress": progress.value}


def stiff_rows(m: int, S: int, budget: float, log: Callable[[str], None]) -> list[list[str]]:
    arrays = stiff_arrays(m, S)
    exact = exact_stiff_gradients(arrays)
    rows, ours_seconds = [], None
    for name in STIFF_METHODS:
        log(f"layer benchmark: {name} (m = {m}, S = {S})")
        result = run_isolated(name, arrays, budget)
        if result["status"] != "ok":
            reached = f"stopped at t = {result['progress']:.0%} of T"
            detail = result.get("payload", reached) if result["status"] == "error" else reached
            rows.append([name, f"> {budget:.0f}" if result["status"] == "stopped"
                         else f"{result['seconds']:.2f}", "-", detail,
                         f"{result.get('rss', float('nan')):.0f}"])
            continue
        values, B = result["payload"]
        error = max(_rel(values, exact["values"]), _rel(B, exact["B"]))
        ours_seconds = ours_seconds or result["seconds"]
        rows.append([name, f"{result['seconds']:.2f}",
                     f"{result['seconds'] / ours_seconds:.1f}x", f"{error:.1e}",
                     f"{result['rss']:.0f}"])
    return rows


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def layer_report(repeat: int, markdown: bool, quick: bool, budget: float,
                 log: Callable[[str], None]) -> str:
    """Both tables as text (or Markdown)."""
    n, S = (64, 16) if quick else (256, 64)
    demo = render_table(["method", "ms (median)", "time / core", "|loss diff|",
                         "grad rel diff"], demo_rows(repeat, n, S), markdown)
    m, S_stiff = (8, 4) if quick else (32, 16)
    stiff = render_table(["method", "s (fwd + bwd)", "time / ours", "grad rel err (exact)",
                          "max RSS MiB"], stiff_rows(m, S_stiff, budget, log), markdown)
    arrays = stiff_arrays(m, S_stiff)
    return (f"Seed demo shape (n = {n}, S = {S}): the layer against the core\n\n{demo}\n\n"
            f"Stiff 2-D diffusion {m}x{m} (n = {m * m}), S = {S_stiff}, "
            f"||t A||_2 = {STIFF_NORM:.0f} (t = {arrays['t']:.3g}), one process per method, "
            f"budget {budget:.0f} s\n\n{stiff}")
