"""Fit the linear part of a big UDE to observed trajectories.

In a universal differential equation dx/dt = A x + f + NN(x), the linear part is often a known
coupling A0 plus unknown per-state rates. Here: n = 100 states, dx/dt = (A0 + diag(d)) x + f,
A0 a fixed sparse coupling, d = -softplus(theta) unknown. S trajectories start from different
x0 (one column each, with its own constant input f_j) and are observed on all states at
t = 1, 2, 3, 4; the loss is their mean squared error. The data come from the true theta* by
``scipy.linalg.expm`` of the augmented operator (not from this package).

The example reports the time per gradient (median of several calls of ``dd.loss_and_grad``
over all S columns, and over one minibatch), then trains with ``dd.fit`` (minibatch Adam)
and reports the fit: loss before and after, and the relative error of the recovered rates d.

    python examples/fit_trajectories.py [--S 64] [--epochs 40]
    python examples/fit_trajectories.py --quick     # fewer epochs and repeats, for the tests

Writes history.csv, fit.png (loss per epoch; true vs fitted rates) and summary.json to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import diagode_dist as dd  # noqa: E402

OBS_TIMES = (1.0, 2.0, 3.0, 4.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="state dimension")
    p.add_argument("--S", type=int, default=64, help="number of trajectories (columns)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--k", type=int, default=30, help="maximum Krylov dimension")
    p.add_argument("--rtol", type=float, default=1e-8, help="Krylov accuracy target")
    p.add_argument("--repeats", type=int, default=7, help="timed gradient calls (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("examples-out/fit_trajectories"))
    p.add_argument("--quick", action="store_true", help="4 epochs, 3 repeats (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 4, 3
    return args


def make_system(n: int, S: int, seed: int):
    """Known sparse coupling A0 (5% density, zero diagonal), true theta*, x0 and f."""
    rng = np.random.default_rng(seed)
    A0 = sp.random(n, n, density=0.05, random_state=rng, data_rvs=rng.standard_normal)
    A0 = sp.csr_matrix(0.3 * A0)
    A0.setdiag(0.0)
    A0.eliminate_zeros()
    theta_true = 0.5 + 0.5 * rng.standard_normal(n)
    x0 = rng.standard_normal((n, S))
    F = 0.5 * rng.standard_normal((n, S))
    return A0, theta_true, x0, F


def observe(A, F, x0, times) -> np.ndarray:
    """States (m, n, S) at the times, from exp of the dense augmented operator [[A, F], [0, 0]]."""
    n, S = F.shape
    aug = np.zeros((n + S, n + S))
    aug[:n, :n] = A
    aug[:n, n:] = F
    U = np.vstack([x0, np.eye(S)])
    states, prev = [], 0.0
    for t in times:
        U = scipy.linalg.expm((t - prev) * aug) @ U
        states.append(U[:n])
        prev = t
    return np.stack(states)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    A0, theta_true, x0, F = make_system(args.n, args.S, args.seed)
    d_true = -np.logaddexp(0.0, theta_true)
    targets = observe(A0.toarray() + np.diag(d_true), F, x0, OBS_TIMES)
    prob = dd.Problem(A0, F, x0=x0, T=OBS_TIMES[-1], obs_times=OBS_TIMES, targets=targets,
                      loss="mse")
    theta0 = np.zeros(args.n)
    print(f"n={args.n}, S={args.S} trajectories observed at t={list(OBS_TIMES)}, "
          f"A0 sparse with {A0.nnz} entries")

    kw = dict(k=args.k, rtol=args.rtol)
    loss0, _, info = dd.loss_and_grad(prob, theta0, return_info=True, **kw)
    batch = np.arange(min(args.batch_size, args.S))
    t_all = median_seconds(lambda: dd.loss_and_grad(prob, theta0, **kw), args.repeats)
    t_batch = median_seconds(lambda: dd.loss_and_grad(prob, theta0, columns=batch, **kw),
                             args.repeats)
    print(f"time per gradient (median of {args.repeats}): all {args.S} columns "
          f"{1e3 * t_all:.1f} ms, batch of {batch.size} {1e3 * t_batch:.1f} ms "
          f"(rtol {info['rtol']:.0e}: Krylov dims {info['forward_dim']}/{info['adjoint_dim']}, "
          f"{info['substeps']} forward intervals)")

    start = time.perf_counter()

    def report(epoch, loss, theta):
        if epoch % max(1, args.epochs // 8) == 0 or epoch == args.epochs - 1:
            elapsed = time.perf_counter() - start
            print(f"epoch {epoch + 1:3d}  mean mse {loss:.4e}  ({elapsed:.1f} s)")

    theta, history = dd.fit(prob, theta0, epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, seed=args.seed, callback=report, **kw)
    seconds = time.perf_counter() - start
    loss1, _ = dd.loss_and_grad(prob, theta, **kw)
    d_fit = -np.logaddexp(0.0, theta)
    d_error = float(np.linalg.norm(d_fit - d_true) / np.linalg.norm(d_true))
    d_error0 = float(np.linalg.norm(-np.log(2.0) - d_true) / np.linalg.norm(d_true))
    print(f"fit: mse {loss0:.4e} -> {loss1:.4e}; rates d relative error {d_error0:.4f} -> "
          f"{d_error:.4f} ({args.epochs} epochs, {seconds:.1f} s)")

    (args.out / "history.csv").write_text(
        "epoch,mean_mse\n" + "".join(f"{i + 1},{h!r}\n" for i, h in enumerate(history)))
    _plot(loss0, history, d_true, d_fit, args.out / "fit.png")
    summary = {"seconds_per_gradient_all_columns": t_all, "seconds_per_gradient_batch": t_batch,
               "batch_size": int(batch.size), "initial_mse": loss0, "final_mse": loss1,
               "initial_rate_error": d_error0, "final_rate_error": d_error,
               "history": history, "epochs": args.epochs, "n": args.n, "S": args.S}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/fit.png, history.csv, summary.json")
    return summary


def _plot(loss0, history, d_true, d_fit, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.semilogy(range(len(history) + 1), [loss0, *history], marker=".")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean squared error")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    ax2.scatter(d_true, d_fit, s=10)
    lims = [min(d_true.min(), d_fit.min()), max(d_true.max(), d_fit.max())]
    ax2.plot(lims, lims, "k--", lw=1)
    ax2.set_xlabel("true rate d*")
    ax2.set_ylabel("fitted rate d")
    ax2.set_title("diagonal: true vs fitted")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
