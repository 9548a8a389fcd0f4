"""The stiff benchmark's methods, each in its own process with a wall-time budget and a memory cap.

Every task rebuilds the same problem from its spec (``benchmarks.stiff.stiff_problem``: grid m,
||TA||, S, seed, dissipative or not) and returns the loss and the directional derivative of the
gradient along the same random direction, so the parent scores all of them against one
reference. A task runs in a spawned process whose address space is capped (RLIMIT_AS), so a peer
that runs out of memory fails there instead of taking the machine down, and which the parent
kills when the budget is spent; peak memory is the child's max RSS (it sees SuperLU's factors
and XLA's buffers, which tracemalloc does not).

Peers (same ODE, same softplus map, same loss; gradient by their own machinery):

- torchdiffeq ``odeint`` (dopri5, backprop through the steps) and ``odeint_adjoint`` (dopri5),
  A0 a torch sparse CSR tensor. torchdiffeq has no implicit method usable here: its
  ``implicit_adams`` corrects by fixed-point iteration (explicit stability), and
  ``scipy_solver`` (BDF, Radau, LSODA) would difference a dense Jacobian of the n S states.
- diffrax ``Kvaerno5`` (ESDIRK, implicit), A0 a ``jax.experimental.sparse.BCOO``: its Newton
  (chord) systems I - h gamma J are solved by lineax's GMRES on Jacobian-vector products (a
  sparse direct solve is not available to JAX on the CPU, and a dense Jacobian of the n S
  states is out of reach), gradient by diffrax's recursive checkpointing.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SETUP_SECONDS = 300.0  # imports, problem, XLA compilation: outside the budget
PEER_TOL = 1e-9  # rtol = atol of the adaptive peers (their gradient error is ~1e-7..1e-6 there)


@dataclass
class Outcome:
    """How one task ended: status 'ok' | 'timeout' | 'oom' | 'error' | 'refused' | 'skipped'.

    seconds: wall time of the timed call (the budget when stopped); rss_mib: peak resident
    memory of the child (MiB), base_mib: its resident memory after imports and set-up;
    result: the task's dict (loss, slope, ...) when 'ok'; message: why, otherwise.
    """

    status: str
    seconds: float = float("nan")
    rss_mib: float = float("nan")
    base_mib: float = float("nan")
    result: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    progress: float = float("nan")


# ---- the child side -----------------------------------------------------------------------------


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _problem(spec: dict):
    from .stiff import stiff_problem

    prob, theta = stiff_problem(spec["m"], spec["stiffness"], spec["S"], spec["seed"],
                                dissipative=spec["dissipative"])
    direction = np.random.default_rng(spec["seed"] + 1).standard_normal(prob.n)
    return prob, theta, direction


def _ours(spec: dict, progress, ready: Callable[[], None]) -> dict:
    import diagode_dist as dd

    prob, theta, direction = _problem(spec)
    ready()
    start = time.perf_counter()
    loss, grad, info = dd.loss_and_grad(prob, theta, k=spec["k"], rtol=spec["rtol"],
                                        method=spec["method"], return_info=True)
    seconds = time.perf_counter() - start
    out = dict(seconds=seconds, loss=float(loss), slope=float(grad @ direction),
               estimate=float(info["error_estimate"]),
               dims=f"{info['forward_dim']}/{info['adjoint_dim']}", substeps=info["substeps"])
    if spec.get("factor"):  # SuperLU's L + U entries of the rational method's factorization
        from diagode_dist.rational import ShiftInvert, shift_for

        d = -np.logaddexp(0.0, theta)
        t0 = time.perf_counter()
        lu = ShiftInvert(prob.A0, d, shift_for(prob.loss.obs_times))
        out["factor_seconds"] = time.perf_counter() - t0
        block = np.random.default_rng(0).standard_normal((prob.S, prob.n))
        t0 = time.perf_counter()
        lu.solve(block)
        out["solve_seconds"] = time.perf_counter() - t0
        out["fill"] = lu.fill
    return out


def _torch_arrays(spec: dict):
    import scipy.sparse as sp
    import torch

    torch.set_num_threads(spec["threads"])
    prob, theta, direction = _problem(spec)
    A = sp.csr_matrix(prob.A0)
    A0 = torch.sparse_csr_tensor(torch.from_numpy(A.indptr.astype(np.int64)),
                                 torch.from_numpy(A.indices.astype(np.int64)),
                                 torch.from_numpy(A.data.astype(np.float64)), size=A.shape,
                                 dtype=torch.float64)
    F = torch.from_numpy(np.asarray(prob.F, dtype=np.float64))
    labels = torch.from_numpy(np.asarray(prob.labels, dtype=np.int64))
    return prob, theta, direction, A0, F, labels


def _torchdiffeq(adjoint: bool):
    def run(spec: dict, progress, ready: Callable[[], None]) -> dict:
        import warnings

        import torch
        import torchdiffeq

        warnings.filterwarnings("ignore", category=UserWarning)  # sparse CSR is "beta"
        prob, theta, direction, A0, F, labels = _torch_arrays(spec)
        T = float(prob.T)

        class Field(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.theta = torch.nn.Parameter(torch.from_numpy(theta.copy()))
                self.evaluations = 0

            def forward(self, t, X):
                self.evaluations += 1
                progress.value = float(t.detach()) / T  # backward: runs from 1 to 0
                d = -torch.nn.functional.softplus(self.theta)
                return A0 @ X + d[:, None] * X + F

        rhs = Field()
        times = torch.tensor([0.0, T], dtype=torch.float64)
        tol = dict(rtol=spec["tol"], atol=spec["tol"], method="dopri5")
        ready()
        start = time.perf_counter()
        X0 = torch.zeros_like(F)
        if adjoint:
            X = torchdiffeq.odeint_adjoint(rhs, X0, times, adjoint_params=(rhs.theta,), **tol)
        else:
            X = torchdiffeq.odeint(rhs, X0, times, **tol)
        forward_evaluations = rhs.evaluations
        loss = torch.nn.functional.cross_entropy(prob.beta * X[-1].T, labels)
        loss.backward()
        seconds = time.perf_counter() - start
        grad = rhs.theta.grad.numpy()
        return dict(seconds=seconds, loss=float(loss.detach()), slope=float(grad @ direction),
                    note=f"{forward_evaluations} + {rhs.evaluations - forward_evaluations} "
                    "RHS evaluations (fwd + bwd)")

    return run


def _stop_array_gradients_in_verychord() -> None:
    """Let diffrax's chord iteration take an iterative linear solver under jax 0.10.

    ``VeryChord.step`` (diffrax 0.7.2) applies ``lax.stop_gradient`` to its whole linear state,
    which for lineax's GMRES holds the linearised operator, a Jaxpr that jax 0.10 rejects
    ("not a valid JAX type"). Stopping the gradients of the state's arrays alone means the same
    (nothing else in it has one); it is done in the peer's own process only.
    """
    import types

    import diffrax._root_finder._verychord as verychord
    import equinox as eqx
    import jax

    def stop_gradient(tree):
        dynamic, static = eqx.partition(tree, eqx.is_array)
        return eqx.combine(jax.lax.stop_gradient(dynamic), static)

    names = {name: getattr(jax.lax, name) for name in dir(jax.lax) if not name.startswith("__")}
    verychord.lax = types.SimpleNamespace(**dict(names, stop_gradient=stop_gradient))


def _implicit_adjoint_by(linear_solver) -> None:
    """Differentiate diffrax's stage equations with ``linear_solver`` instead of optimistix's
    default (a dense LU of the Jacobian, (n S)^2 entries: 237 GB at n = 1024, S = 64), which
    ``Kvaerno5`` gives no option for; in the peer's own process only."""
    import types

    import diffrax._solver.runge_kutta as runge_kutta
    import optimistix as optx

    def root_find(*args, **kwargs):
        kwargs.setdefault("adjoint", optx.ImplicitAdjoint(linear_solver=linear_solver))
        return optx.root_find(*args, **kwargs)

    names = {name: getattr(optx, name) for name in dir(optx) if not name.startswith("__")}
    runge_kutta.optx = types.SimpleNamespace(**dict(names, root_find=root_find))


def _diffrax_kvaerno5(spec: dict, progress, ready: Callable[[], None]) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp
    import lineax as lx
    from jax.experimental import sparse as jsparse

    _stop_array_gradients_in_verychord()
    prob, theta, direction = _problem(spec)
    A0 = jsparse.BCOO.from_scipy_sparse(prob.A0)
    F = jnp.asarray(prob.F, dtype=jnp.float64)
    labels = jnp.asarray(np.asarray(prob.labels))
    tol, T, beta = spec["tol"], float(prob.T), float(prob.beta)

    def field_of(t, X, theta):
        return A0 @ X - jax.nn.softplus(theta)[:, None] * X + F

    # Newton's linear systems to below the step tolerance, so the gradient is the solver's own
    # and not GMRES's residual. max_steps: diffrax's default; buffers scale with it (100_000
    # asked XLA for 237 GB at n = 1024, S = 64).
    linear = lx.GMRES(rtol=tol * 0.1, atol=tol * 0.1, restart=40, max_steps=4000)
    _implicit_adjoint_by(linear)
    solver = diffrax.Kvaerno5(root_finder=diffrax.VeryChord(rtol=tol, atol=tol,
                                                            linear_solver=linear))

    def loss_of(theta):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field_of), solver, 0.0, T, None, jnp.zeros_like(F), args=theta,
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), max_steps=4096,
            adjoint=diffrax.RecursiveCheckpointAdjoint())  # log2(max_steps) checkpoints
        z = beta * sol.ys[-1]
        lse = jax.scipy.special.logsumexp(z, axis=0)
        return jnp.mean(lse - z[labels, jnp.arange(z.shape[1])]), sol.stats["num_steps"]

    theta_j = jnp.asarray(theta)
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss_of, has_aux=True)).lower(theta_j).compile()
    compile_seconds = time.perf_counter() - start
    ready()
    start = time.perf_counter()
    (loss, steps), grad = jax.block_until_ready(compiled(theta_j))
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, loss=float(loss), slope=float(np.asarray(grad) @ direction),
                note=f"{int(steps)} steps; XLA compilation {compile_seconds:.0f} s (not counted)")


TASKS: dict[str, Callable[[dict, Any, Callable[[], None]], dict]] = {
    "ours": _ours,
    "torchdiffeq odeint backprop dopri5": _torchdiffeq(adjoint=False),
    "torchdiffeq odeint_adjoint dopri5": _torchdiffeq(adjoint=True),
    "diffrax Kvaerno5 + GMRES": _diffrax_kvaerno5,
}

PEERS = ("diffrax Kvaerno5 + GMRES", "torchdiffeq odeint backprop dopri5",
         "torchdiffeq odeint_adjoint dopri5")

_REQUIRES = {"torchdiffeq": ("torch", "torchdiffeq"),
             "diffrax": ("jax", "diffrax", "lineax")}


def missing(task: str) -> str | None:
    """None when the task's libraries import here, else the reason to skip it."""
    import importlib

    for prefix, modules in _REQUIRES.items():
        if task.startswith(prefix):
            for module in modules:
                try:
                    importlib.import_module(module)
                except ImportError:
                    return f"{module} not installed (pip install 'diagode-dist[bench]')"
    return None


def _looks_like_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, MemoryError) or any(
        word in text for word in ("out of memory", "resource_exhausted", "can't allocate",
                                  "cannot allocate", "bad_alloc", "failed to allocate"))


def _child(task: str, spec: dict, mem_bytes: int | None, progress, channel) -> None:
    if mem_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    from threadpoolctl import threadpool_limits

    threadpool_limits(spec["threads"])
    base = [float("nan")]

    def ready() -> None:
        base[0] = _max_rss_mib()
        channel.put(("ready", None))

    try:
        result = TASKS[task](spec, progress, ready)
        channel.put(("ok", dict(result, rss_mib=_max_rss_mib(), base_mib=base[0])))
    except BaseException as error:  # reported in the table, whatever it is
        status = "oom" if _looks_like_oom(error) else "error"
        if type(error).__name__ == "AccuracyError":
            status = "refused"
        channel.put((status, dict(message=f"{type(error).__name__}: {error}"[:160],
                                  rss_mib=_max_rss_mib(), base_mib=base[0])))


def _high_water_mib(pid: int) -> float:
    """VmHWM of a live process (Linux), MiB: its peak so far, read before it is killed."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def run_isolated(task: str, spec: dict, budget: float, mem_gib: float | None) -> Outcome:
    """Run ``TASKS[task](spec)`` in a spawned process capped at ``mem_gib`` GiB of address
    space; stop it ``budget`` seconds after its set-up (imports, problem, compilation)."""
    reason = missing(task)
    if reason:
        return Outcome("skipped", message=reason)
    ctx = mp.get_context("spawn")
    progress, channel = ctx.Value("d", float("nan")), ctx.Queue()
    mem_bytes = int(mem_gib * 2**30) if mem_gib else None
    proc = ctx.Process(target=_child, args=(task, spec, mem_bytes, progress, channel),
                       daemon=True)
    proc.start()
    try:
        return _collect(proc, channel, progress, budget, mem_gib)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def _collect(proc, channel, progress, budget: float, mem_gib: float | None) -> Outcome:
    deadline = time.monotonic() + SETUP_SECONDS
    started = None
    while True:
        try:
            status, payload = channel.get(timeout=1.0)
        except queue_module.Empty:
            now = time.monotonic()
            if not proc.is_alive():
                cap = f" under the {mem_gib:g} GiB cap" if mem_gib else ""
                return Outcome("error", message=f"died (exit code {proc.exitcode}){cap}")
            if now > deadline:
                peak = _high_water_mib(proc.pid)
                seconds = budget if started is not None else float("nan")
                return Outcome("timeout", seconds=seconds, rss_mib=peak,
                               progress=progress.value,
                               message="set-up" if started is None else "budget")
            continue
        if status == "ready":
            started = time.monotonic()
            deadline = started + budget
            continue
        rss, base = payload.pop("rss_mib"), payload.pop("base_mib")
        elapsed = time.monotonic() - started if started is not None else float("nan")
        if status == "ok":
            return Outcome("ok", seconds=payload["seconds"], rss_mib=rss, base_mib=base,
                           result=payload)
        if status == "oom" and mem_gib:
            payload["message"] = f"out of memory at {mem_gib:g} GiB: {payload['message']}"
        return Outcome(status, seconds=elapsed, rss_mib=rss, base_mib=base,
                       message=payload["message"], progress=progress.value)
