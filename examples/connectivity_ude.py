"""The linear part of a universal differential equation: train a connectivity matrix.

A modeller's question on the Julia forum: 100 states, a 100 x 100 connectivity matrix p
(10^4 parameters), du_i/dt = sum_j p_ij (u_j - u_i), observed at t = 1, 2, 3, 4 from the known
state at t = 1, loss sum((pred - data)^2). One gradient took 27.5 s and 122 GiB of allocations
with forward-mode AD; the answer given was "use exp(A t) and reverse mode" -- dense, O(n^3).

This model is ``dd.GeneratorParam(P)``: A = W(p) - diag(W(p) 1) on the pattern P of p's
entries. Two cases:

1. The forum's MWE at its size (n = 100, P full: 10^4 weights, x0 = the first observation,
   observations 1, 2, 3 time units later, mean squared error). The gradient is checked against
   the exact dense reference (``diagode_dist.reference``) and timed side by side with the
   forum's answer (``torch.linalg.matrix_exp`` + autograd on A(p)) and with torchdiffeq's
   ``odeint_adjoint`` (dopri5, rtol = atol = 1e-9), when torch is installed.
2. The same model on a random geometric graph with n = 10^4 nodes and ~5 x 10^4 directed edge
   weights (w = softplus(theta) >= 0), S = 16 trajectories, 3 observation times: dense expm is
   out of reach (an n x n dense matrix alone is 800 MB; its exponential O(n^3)). The gradient
   is timed, checked by directional derivatives (central differences of losses computed with
   ``scipy.sparse.linalg.expm_multiply``), its peak memory measured, and the planted weights
   recovered from noisy observations with ``dd.fit``.

    python examples/connectivity_ude.py               # both cases, full size (~3 min)
    python examples/connectivity_ude.py --quick       # small sizes, for the tests

Writes summary.json (all numbers), history.csv and recovery.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from scipy.sparse.linalg import expm_multiply  # noqa: E402

import diagode_dist as dd  # noqa: E402
from diagode_dist.reference import exact_loss_and_grad, relative_error  # noqa: E402

OBS_TIMES = (1.0, 2.0, 3.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-small", type=int, default=100, help="states of the forum's MWE")
    p.add_argument("--n-graph", type=int, default=10_000, help="nodes of the sparse graph")
    p.add_argument("--degree", type=float, default=5.0, help="mean out-degree of the graph")
    p.add_argument("--S", type=int, default=16, help="trajectories of the graph case")
    p.add_argument("--steps", type=int, default=60, help="Adam steps of the recovery")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    p.add_argument("--noise", type=float, default=0.01, help="observation noise (std)")
    p.add_argument("--rtol", type=float, default=1e-10, help="Krylov accuracy of the graph case")
    p.add_argument("--repeats", type=int, default=5, help="timed gradient calls (median)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the peers (ours runs BLAS on one thread)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("examples-out/connectivity_ude"))
    p.add_argument("--quick", action="store_true", help="small sizes, for the tests")
    args = p.parse_args(argv)
    if args.quick:
        args.n_small, args.n_graph, args.S, args.steps, args.repeats = 20, 400, 4, 15, 2
    return args


def median_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median time of ``repeats`` calls after a warm-up (``clock=time.process_time``: CPU
    seconds of this process, which other processes on a shared machine do not inflate)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return float(np.median(times))


# ---- case 1: the forum's MWE -------------------------------------------------------------------


def forum_case(n: int, noise: float, seed: int):
    """(problem, param, theta) of the MWE: p_true and the guess p0 uniform in [0, 2/n)."""
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(0.0, 2.0 / n, (n, n))
    u1 = rng.random((n, 1))  # the known state at t = 1 of the forum
    A_true = p_true - np.diag(p_true.sum(axis=1))
    data = np.stack([scipy.linalg.expm(t * A_true) @ u1 for t in OBS_TIMES])
    data += noise * rng.standard_normal(data.shape)
    prob = dd.Problem(np.zeros((n, n)), np.zeros((n, 1)), x0=u1, T=OBS_TIMES[-1],
                      obs_times=OBS_TIMES, targets=data, loss="mse")
    param = dd.GeneratorParam(np.ones((n, n)), "identity")  # p is free, as in the forum
    return prob, param, rng.uniform(0.0, 2.0 / n, n * n)


def torch_peers(prob, theta, threads: int):
    """{name: (seconds fn, (loss, grad))} of the dense matrix_exp and torchdiffeq peers, or {}
    without torch. Both compute the identical loss (mean squared error over states and times)."""
    try:
        import torch
        import torchdiffeq
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    n = prob.n
    u1 = torch.from_numpy(np.asarray(prob.x0))
    data = torch.from_numpy(np.asarray(prob.loss.targets))
    times = torch.tensor((0.0, *OBS_TIMES), dtype=torch.float64)

    def operator(p):
        P = p.reshape(n, n)
        return P - torch.diag(P.sum(dim=1))

    def mse(states):
        return ((states - data) ** 2).mean()

    def dense():  # the forum's answer: exp(A t) and reverse mode
        p = torch.tensor(theta, requires_grad=True)
        A = operator(p)
        loss = mse(torch.stack([torch.linalg.matrix_exp(t * A) @ u1 for t in OBS_TIMES]))
        loss.backward()
        return loss.item(), p.grad.numpy()

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.tensor(theta))

        def forward(self, t, u):
            return operator(self.p) @ u

    def adjoint():
        func = Linear()
        states = torchdiffeq.odeint_adjoint(func, u1, times, rtol=1e-9, atol=1e-9,
                                            method="dopri5")
        loss = mse(states[1:])
        loss.backward()
        return loss.item(), func.p.grad.numpy()

    return {"torch matrix_exp + autograd (dense)": dense,
            "torchdiffeq odeint_adjoint dopri5 1e-9": adjoint}


def run_forum(args) -> dict:
    prob, param, theta = forum_case(args.n_small, args.noise, args.seed)
    n = prob.n
    print(f"[1] forum MWE: n = {n}, {param.theta_size(n)} weights, x0 = first observation, "
          f"observations at +{list(OBS_TIMES)}")
    start = time.perf_counter()
    ref_loss, ref_grad = exact_loss_and_grad(prob, theta, param)
    print(f"    exact dense reference in {time.perf_counter() - start:.1f} s")

    def ours():
        return dd.loss_and_grad(prob, theta, param)

    methods = {"diagode-dist (Krylov adjoint)": ours, **torch_peers(prob, theta, args.threads)}
    rows = []
    for name, fn in methods.items():
        loss, grad = fn()
        seconds = median_seconds(fn, args.repeats)
        cpu = median_seconds(fn, args.repeats, time.process_time)
        error = relative_error(grad, ref_grad)
        rows.append({"method": name, "seconds": seconds, "cpu_seconds": cpu,
                     "grad_rel_error": error,
                     "loss_rel_error": abs(loss - ref_loss) / abs(ref_loss)})
        print(f"    {name:40s} {1e3 * seconds:9.1f} ms wall {1e3 * cpu:9.1f} ms CPU   "
              f"gradient rel. error {error:.2e}")
    return {"n": n, "weights": param.theta_size(n), "rows": rows}


# ---- case 2: a sparse graph at n = 10^4 -------------------------------------------------------


def geometric_graph(n: int, degree: float, seed: int) -> sp.csr_matrix:
    """Directed random geometric graph: n points in the unit square, both directions of every
    pair closer than r, with r chosen for the mean out-degree ``degree``."""
    from scipy.spatial import cKDTree

    points = np.random.default_rng(seed).random((n, 2))
    radius = np.sqrt(degree / (np.pi * n))
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))


def generator_matrix(param, theta) -> sp.csc_matrix:
    """A(theta) = W - diag(W 1) assembled with SciPy (for the independent checks)."""
    W = sp.csr_matrix((np.logaddexp(0.0, theta), (param.pattern.rows, param.pattern.cols)),
                      shape=(param.pattern.n,) * 2)
    return (W - sp.diags(np.asarray(W.sum(axis=1)).ravel())).tocsc()


def observe(A, x0, times=OBS_TIMES) -> np.ndarray:
    """States (m, n, S) by scipy.sparse.linalg.expm_multiply (not this package)."""
    return np.stack([expm_multiply(t * A, x0) for t in times])


def graph_case(n: int, degree: float, S: int, noise: float, seed: int):
    """(problem, param, theta_true, theta0): planted weights w* = softplus(theta*) around 0.3."""
    rng = np.random.default_rng(seed + 1)
    param = dd.GeneratorParam(geometric_graph(n, degree, seed), "softplus")
    theta_true = np.log(np.expm1(rng.uniform(0.1, 0.5, param.theta_size(n))))
    x0 = rng.random((n, S))
    data = observe(generator_matrix(param, theta_true), x0)
    data += noise * rng.standard_normal(data.shape)
    prob = dd.Problem(sp.csr_matrix((n, n)), np.zeros((n, S)), x0=x0, T=OBS_TIMES[-1],
                      obs_times=OBS_TIMES, targets=data, loss="mse")
    theta0 = np.full(theta_true.size, np.log(np.expm1(0.3)))  # uniform guess w = 0.3
    return prob, param, theta_true, theta0


def directional_checks(prob, param, theta, grad, rng, count: int = 2) -> list[float]:
    """Relative errors of grad . v against 4th-order central differences (h = 1e-3) of the loss
    computed with expm_multiply, for ``count`` random unit directions v."""
    data = np.asarray(prob.loss.targets)
    x0 = np.asarray(prob.x0)

    def loss(t):
        return float(np.mean((observe(generator_matrix(param, t), x0) - data) ** 2))

    errors, h = [], 1e-3
    for _ in range(count):
        v = rng.standard_normal(theta.size)
        v /= np.linalg.norm(v)
        fd = (-loss(theta + 2 * h * v) + 8 * loss(theta + h * v) - 8 * loss(theta - h * v)
              + loss(theta - 2 * h * v)) / (12 * h)
        errors.append(abs(float(grad @ v) - fd) / abs(fd))
    return errors


def measure_graph_gradient(prob, param, theta, rtol: float, repeats: int, seed: int) -> dict:
    """Time (wall and CPU), peak traced memory and directional checks of one gradient."""
    kw = {"rtol": rtol}
    tracemalloc.start()
    _, grad, info = dd.loss_and_grad(prob, theta, param, return_info=True, **kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    def one():
        return dd.loss_and_grad(prob, theta, param, **kw)

    return {"seconds": median_seconds(one, repeats),
            "cpu_seconds": median_seconds(one, repeats, time.process_time),
            "peak_bytes": peak, "forward_dim": info["forward_dim"],
            "adjoint_dim": info["adjoint_dim"], "substeps": info["substeps"],
            "directional_rel_errors": directional_checks(prob, param, theta, grad,
                                                         np.random.default_rng(seed))}


def run_graph(args) -> dict:
    prob, param, theta_true, theta0 = graph_case(args.n_graph, args.degree, args.S, args.noise,
                                                 args.seed)
    n, nnz = prob.n, param.theta_size(prob.n)
    print(f"[2] random geometric graph: n = {n}, {nnz} edge weights, S = {prob.S}, "
          f"observations at {list(OBS_TIMES)} (dense n x n: {8 * n * n / 2**30:.2f} GiB)")
    kw = {"rtol": args.rtol}
    measured = measure_graph_gradient(prob, param, theta0, args.rtol, args.repeats, args.seed)
    print(f"    gradient {measured['seconds']:.2f} s wall, {measured['cpu_seconds']:.2f} s CPU "
          f"(medians of {args.repeats}), peak traced memory "
          f"{measured['peak_bytes'] / 2**20:.0f} MiB, Krylov dims {measured['forward_dim']}/"
          f"{measured['adjoint_dim']}, {measured['substeps']} forward sub-steps")
    print(f"    directional derivatives vs expm_multiply: rel. errors "
          f"{', '.join(f'{e:.1e}' for e in measured['directional_rel_errors'])}")

    w_true = np.logaddexp(0.0, theta_true)
    history, weight_errors = [], []

    def weight_error(theta):
        return float(np.linalg.norm(np.logaddexp(0.0, theta) - w_true) / np.linalg.norm(w_true))

    def record(epoch, mean_loss, theta):
        history.append(mean_loss)
        weight_errors.append(weight_error(theta))

    start = time.perf_counter()
    theta_fit, _ = dd.fit(prob, theta0, param, epochs=args.steps, batch_size=prob.S, lr=args.lr,
                          rtol=1e-8, callback=record)
    train_s = time.perf_counter() - start
    loss_true = dd.loss_and_grad(prob, theta_true, param, **kw)[0]
    print(f"    recovery: {args.steps} Adam steps in {train_s:.0f} s, weight rel. error "
          f"{weight_error(theta0):.3f} -> {weight_errors[-1]:.3f}; loss {history[0]:.3e} -> "
          f"{history[-1]:.3e} (at the planted weights: {loss_true:.3e})")
    return {"n": n, "weights": nnz, "S": prob.S, **measured,
            "initial_weight_error": weight_error(theta0), "final_weight_error": weight_errors[-1],
            "history": history, "weight_errors": weight_errors, "loss_at_truth": loss_true,
            "train_seconds": train_s, "w_true": w_true, "w_fit": np.logaddexp(0.0, theta_fit)}


def write_outputs(out: Path, forum: dict, graph: dict) -> None:
    with open(out / "history.csv", "w") as fh:
        fh.write("step,mse,weight_error\n")
        for step, (loss, error) in enumerate(zip(graph["history"], graph["weight_errors"],
                                                 strict=True)):
            fh.write(f"{step},{loss:.6e},{error:.6e}\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.semilogy(graph["history"])
    ax1.set(xlabel="Adam step", ylabel="mean squared error", title="training loss")
    ax2.plot(graph["w_true"], graph["w_fit"], ".", ms=1, alpha=0.3)
    ax2.plot([0, 0.6], [0, 0.6], "k-", lw=0.8)
    ax2.set(xlabel="planted weight", ylabel="recovered weight",
            title=f"n = {graph['n']}, {graph['weights']} weights")
    fig.tight_layout()
    fig.savefig(out / "recovery.png", dpi=100)
    plt.close(fig)
    summary = {"forum": forum,
               "graph": {key: value for key, value in graph.items()
                         if key not in ("w_true", "w_fit")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    forum = run_forum(args)
    graph = run_graph(args)
    write_outputs(args.out, forum, graph)
    return {"forum": forum, "graph": graph}


if __name__ == "__main__":
    main()
