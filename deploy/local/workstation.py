"""Train on one workstation: LocalCUDACluster with one Dask worker per GPU.

    python deploy/local/workstation.py CONFIG.toml [--gpus 0,1] [--rmm-pool-size 24GB]
                                       [--protocol ucx] [--out DIR]
    python deploy/local/workstation.py --demo          # the built-in demo problem instead

Each GPU gets its own worker process (pinned with CUDA_VISIBLE_DEVICES) holding its shards of
the right-hand-side columns on the device; an RMM pool avoids a cudaMalloc per Krylov basis; UCX
(if distributed-ucxx is installed) moves theta and gradients over NVLink. Without a GPU or
dask-cuda it falls back to a LocalCluster on the CPU cores and says so. The dashboard address is
printed: open it to watch the task stream and the /diagode training page.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

import diagode_dist as dd
from diagode_dist.config import load_config
from diagode_dist.options import DEMO_OPTIONS
from diagode_dist.report import write_and_announce
from diagode_dist.service.client import fit_distributed
from diagode_dist.service.session import open_client


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diagode_dist").setLevel(logging.INFO)  # which cluster started, and why

    if args.demo:
        problem, options, out_dir = dd.demo_problem(), DEMO_OPTIONS, args.out or Path("demo-out")
    else:
        config = load_config(args.config)  # a bad config fails here, before any cluster starts
        problem, options = config.problem.files().validate(), config.train
        out_dir = args.out or config.output_dir
    with open_client(n_workers=args.workers, gpu=False if args.cpu else "auto",
                     cuda_visible_devices=args.gpus, rmm_pool_size=args.rmm_pool_size,
                     protocol=args.protocol) as session:
        print(session.describe(), flush=True)
        theta, history = fit_distributed(session.client, problem, np.zeros(problem.n),
                                         options=options)
    write_and_announce(out_dir, theta, history, {"command": "deploy/local/workstation.py",
                                                    "options": options.describe()})
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("config", nargs="?", type=Path, help="diagode-dist train config (TOML)")
    source.add_argument("--demo", action="store_true", help="train the demo problem")
    parser.add_argument("--gpus", help="GPUs to use, e.g. 0,1 (default: all visible)")
    parser.add_argument("--workers", type=int, help="number of workers (default: one per GPU)")
    parser.add_argument("--rmm-pool-size", help="per-GPU RMM pool, e.g. 24GB or 0.8")
    parser.add_argument("--protocol", choices=["tcp", "ucx"], default=None)
    parser.add_argument("--cpu", action="store_true", help="CPU workers even if GPUs are there")
    parser.add_argument("--out", type=Path, help="output folder (default: the config's)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
