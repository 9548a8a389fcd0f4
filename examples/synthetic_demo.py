"""The classic classification demo: train the diagonal of dx/dt = (A0 + diag(d)) x + f.

n = 256 states, S = 64 right-hand sides (columns), T = 2, beta = 10: each column's final state
x_j(T), scaled by beta, is read as logits of a class label; theta (d = -softplus(theta)) is
trained with Adam on minibatches of columns and exact adjoint gradients (``dd.fit``).

    python examples/synthetic_demo.py [--epochs 20] [--lr 0.1] [--out examples-out/synthetic]
    python examples/synthetic_demo.py --quick      # 3 epochs, for the tests

Prints the mean loss per epoch, writes loss.png, history.csv, theta.npy and summary.json to
--out.
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

import diagode_dist as dd  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="state dimension")
    p.add_argument("--S", type=int, default=64, help="number of columns (right-hand sides)")
    p.add_argument("--T", type=float, default=2.0, help="final time")
    p.add_argument("--beta", type=float, default=10.0, help="logit scale")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k", type=int, default=30, help="maximum Krylov dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("examples-out/synthetic"))
    p.add_argument("--quick", action="store_true", help="3 epochs (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prob = dd.demo_problem(n=args.n, S=args.S, T=args.T, beta=args.beta, seed=args.seed)
    theta0 = np.zeros(prob.n)
    initial_loss, _ = dd.loss_and_grad(prob, theta0, k=args.k)
    print(f"demo problem: {prob}")
    print(f"initial loss {initial_loss:.4f}")

    start = time.perf_counter()

    def report(epoch, loss, theta):
        print(f"epoch {epoch + 1:3d}  mean loss {loss:.4f}  ({time.perf_counter() - start:.2f} s)")

    theta, history = dd.fit(prob, theta0, epochs=args.epochs, lr=args.lr, k=args.k,
                            batch_size=args.batch_size, seed=args.seed, callback=report)
    seconds = time.perf_counter() - start
    final_loss, _ = dd.loss_and_grad(prob, theta, k=args.k)
    print(f"loss {initial_loss:.4f} -> {final_loss:.4f} in {args.epochs} epochs, {seconds:.2f} s")

    np.save(args.out / "theta.npy", theta)
    (args.out / "history.csv").write_text(
        "epoch,mean_loss\n" + "".join(f"{i + 1},{h!r}\n" for i, h in enumerate(history)))
    _plot(history, initial_loss, args.out / "loss.png")
    summary = {"initial_loss": initial_loss, "final_loss": final_loss, "history": history,
               "epochs": args.epochs, "seconds": seconds, "n": prob.n, "S": prob.S}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/loss.png, history.csv, theta.npy, summary.json")
    return summary


def _plot(history, initial_loss, path):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(0, len(history) + 1), [initial_loss, *history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean cross-entropy")
    ax.set_title("synthetic demo: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
