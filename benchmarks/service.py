"""Benchmark of the training service: parameter-server overhead and speed-up over workers.

    python -m benchmarks --service --cases none     # in the benchmark report
    python -m benchmarks.service [--quick]          # this table alone
    from benchmarks.service import bench_service, format_table

Two measurements, side by side in one run, each on fresh ``LocalCluster``s of worker
processes (one thread each):

- **Overhead per step** with tiny compute at n = 1e4 and 1e6 (2 and 4 shards on 2 workers):
  A0 = 0 (sparse, no entries), one column per shard, a full batch per step. The Krylov spaces
  are then exact at dimension 1-3, so a step is almost all service: theta pulled by every
  worker, (loss, gradient) pushed by every shard, the sum, Adam on the scheduler, the release.
  Overhead = mean step period - mean compute time of the slowest shard (both measured by the
  parameter server over all steps but the first, which includes start-up).
- **Speed-up** of 2 workers (2 shards) over 1 worker (1 shard) on a compute-bound problem
  (the demo problem, a full batch per step): ratio of the mean step periods.

A third, ``soak`` (``python -m benchmarks.service --soak 10000``), runs one long training
run (4 shards on 2 workers, tiny compute) and samples the resident memory (RSS) of the
scheduler process and of each worker every tenth of the run: it must stay flat (Dask's
per-task metrics ledger, the server's per-step traces and ended-run records are all bounded).

On a shared or loaded machine these numbers are noisy; quote them from a quiet one.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

OVERHEAD_TARGET_MS = 5.0  # at n = 1e4
SPEEDUP_TARGET = 1.7


def bench_service(overhead_sizes: tuple[int, ...] = (10_000, 1_000_000),
                  overhead_shards: tuple[int, ...] = (2, 4), overhead_steps: int = 40,
                  speedup_n: int = 256, speedup_S: int = 128, speedup_steps: int = 12,
                  workers: int = 2) -> list[dict[str, Any]]:
    """Run the service benchmark; returns one row (dict) per case, for ``format_table``.

    Row keys: case, n, S, shards, workers, steps, ms_per_step, compute_ms, overhead_ms,
    speedup (speed-up rows only), target, met.
    """
    rows = []
    for n in overhead_sizes:
        steps = overhead_steps if n <= 100_000 else max(5, overhead_steps // 4)
        for shards in overhead_shards:
            rows.append(_overhead_row(n, shards, workers, steps))
    rows.extend(_speedup_rows(speedup_n, speedup_S, speedup_steps, workers))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``bench_service`` rows."""
    head = ("| case | n | S | shards | workers | ms/step | compute ms | overhead ms | "
            "speed-up | target | met |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in (
            "case", "n", "S", "shards", "workers", "ms_per_step", "compute_ms", "overhead_ms",
            "speedup", "target", "met")) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _overhead_row(n: int, shards: int, workers: int, steps: int) -> dict[str, Any]:
    import scipy.sparse as sp

    from diagode_dist.problem import Problem

    rng = np.random.default_rng(0)
    prob = Problem(sp.csr_matrix((n, n)), rng.standard_normal((n, shards)),
                   rng.integers(0, n, shards), T=1.0, beta=1.0)
    status = _timed_run(prob, shards, workers, steps, batch_size=shards)
    step_ms = 1e3 * status["mean_step_s"]
    compute_ms = 1e3 * status["mean_compute_s"]
    target = OVERHEAD_TARGET_MS if n <= 10_000 else None
    overhead = step_ms - compute_ms
    return {"case": "overhead (tiny compute)", "n": n, "S": shards, "shards": shards,
            "workers": workers, "steps": status["step"], "ms_per_step": step_ms,
            "compute_ms": compute_ms, "overhead_ms": overhead,
            "target": None if target is None else f"<= {target:g} ms",
            "met": None if target is None else overhead <= target}


def _speedup_rows(n: int, S: int, steps: int, workers: int) -> list[dict[str, Any]]:
    from diagode_dist.problem import demo_problem

    prob = demo_problem(n=n, S=S, seed=0)
    one = _timed_run(prob, 1, 1, steps, batch_size=S)
    many = _timed_run(prob, workers, workers, steps, batch_size=S)
    speedup = one["mean_step_s"] / many["mean_step_s"]
    rows = []
    for count, status in ((1, one), (workers, many)):
        rows.append({"case": "compute-bound (demo problem)", "n": n, "S": S, "shards": count,
                     "workers": count, "steps": status["step"],
                     "ms_per_step": 1e3 * status["mean_step_s"],
                     "compute_ms": 1e3 * status["mean_compute_s"],
                     "overhead_ms": 1e3 * (status["mean_step_s"] - status["mean_compute_s"])})
    rows[-1].update(speedup=speedup, target=f">= {SPEEDUP_TARGET:g}x",
                    met=speedup >= SPEEDUP_TARGET)
    return rows


def _timed_run(prob, shards: int, workers: int, steps: int, batch_size: int) -> dict:
    """One run of ``steps`` steps on a fresh cluster; the server's final status."""
    from distributed import Client, LocalCluster

    from diagode_dist.service.client import submit

    steps_per_epoch = -(-prob.S // batch_size)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=120)
        run = submit(client, prob, np.zeros(prob.n), n_shards=shards, batch_size=batch_size,
                     epochs=max(2, -(-steps // steps_per_epoch)), lr=1e-3, step_timeout=600)
        run.wait()
        return run.status()


def soak(steps: int = 10_000, shards: int = 4, workers: int = 2, n: int = 1000,
         samples: int = 10) -> list[dict[str, Any]]:
    """One run of ``steps`` steps; a row per sample: step, steps/s since the previous sample,
    RSS (MB) of the scheduler process (this one: LocalCluster's scheduler runs in-process)
    and of each worker process."""
    import psutil
    import scipy.sparse as sp
    from distributed import Client, LocalCluster

    from diagode_dist.problem import Problem
    from diagode_dist.service.client import submit

    rng = np.random.default_rng(0)
    prob = Problem(sp.csr_matrix((n, n)), rng.standard_normal((n, shards)),
                   rng.integers(0, n, shards), T=1.0, beta=1.0)
    rows = []
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=120)
        run = submit(client, prob, np.zeros(n), n_shards=shards, batch_size=shards, k=8,
                     epochs=steps, lr=1e-4, step_timeout=600)
        previous = (0, time.perf_counter())
        for target in np.linspace(steps / samples, steps, samples).astype(int):
            while (status := run.status())["step"] < target and status["status"] == "running":
                time.sleep(0.05)
            if status["status"] != "running" and status["step"] < target:
                raise RuntimeError(f"soak run ended early: {status['error']}")
            now = time.perf_counter()
            rss = client.run(lambda: psutil.Process().memory_info().rss)
            rows.append({"step": status["step"],
                         "steps_per_s": (status["step"] - previous[0]) / (now - previous[1]),
                         "scheduler_mb": psutil.Process().memory_info().rss / 2**20,
                         "worker_mb": [rss[w] / 2**20 for w in sorted(rss)]})
            previous = (status["step"], now)
        run.wait()
    return rows


def format_soak(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``soak`` rows, and the growth per 1000 steps after the first
    sample (warm-up)."""
    lines = ["| step | steps/s | scheduler RSS MB | worker RSS MB |", "|---|---|---|---|"]
    for row in rows:
        workers = " / ".join(f"{mb:.1f}" for mb in row["worker_mb"])
        lines.append(f"| {row['step']} | {row['steps_per_s']:.0f} | {row['scheduler_mb']:.1f} | "
                     f"{workers} |")
    first, last = rows[0], rows[-1]
    per_k = 1000 / max(1, last["step"] - first["step"])
    worker_growth = max(b - a for a, b in zip(first["worker_mb"], last["worker_mb"],
                                              strict=True))
    lines.append(f"\nGrowth from step {first['step']} to {last['step']}: scheduler "
                 f"{(last['scheduler_mb'] - first['scheduler_mb']) * per_k:+.2f} MB per 1000 "
                 f"steps, worker (largest) {worker_growth * per_k:+.2f} MB per 1000 steps")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 1e4 only, fewer steps")
    parser.add_argument("--soak", type=int, metavar="STEPS", default=None,
                        help="run the memory soak of STEPS steps instead")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.soak is not None:
        print(format_soak(soak(steps=args.soak)))
        print(f"\n({time.perf_counter() - started:.0f} s; 4 shards on 2 worker processes)")
        return 0
    if args.quick:
        rows = bench_service(overhead_sizes=(10_000,), overhead_steps=20, speedup_steps=6)
    else:
        rows = bench_service()
    print(format_table(rows))
    print(f"\n({time.perf_counter() - started:.0f} s; LocalCluster of worker processes, one "
          f"thread each; numbers from a loaded machine are noisy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
