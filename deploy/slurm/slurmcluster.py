"""Train through dask_jobqueue.SLURMCluster: this process is the scheduler, SLURM jobs are workers.

Run it on a login node (or in a small CPU job) that the compute nodes can reach:

    python deploy/slurm/slurmcluster.py CONFIG.toml --jobs 2 --queue gpu --gpus-per-job 4 \
        --cores 16 --memory 64GB --walltime 02:00:00 --interface ib0 --local-directory '$TMPDIR'

Each job asks SLURM for `cores`, `memory` and `gpus_per_job` GPUs (--gres=gpu:N) and starts
`dask cuda worker` (one worker per GPU; `dask worker` when --gpus-per-job 0). Workers retire a
little before the walltime. The same path from the CLI:

    diagode-dist train CONFIG.toml --slurm --jobs 2 --queue gpu --gpus-per-job 4 ...

--dry-run prints the job script that would be submitted and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from diagode_dist.config import check_slurm_options, load_config
from diagode_dist.report import write_and_announce
from diagode_dist.service.client import fit_distributed
from diagode_dist.service.cluster import slurm_cluster
from diagode_dist.service.session import open_client


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diagode_dist").setLevel(logging.INFO)

    config = load_config(args.config)  # a bad config fails here, before any job is queued
    slurm = check_slurm_options({
        "jobs": args.jobs, "cores": args.cores, "memory": args.memory, "queue": args.queue,
        "walltime": args.walltime, "interface": args.interface,
        "local_directory": args.local_directory, "gpus_per_job": args.gpus_per_job},
        where="slurmcluster.py: ")
    extra = {"account": args.account} if args.account else {}
    if args.dry_run:
        with slurm_cluster(**dataclasses.asdict(slurm), **extra, submit=False) as cluster:
            print(cluster.job_script())
        return 0

    problem = config.problem.files().validate()
    with open_client(slurm=slurm, worker_timeout=args.worker_timeout, **extra) as session:
        print(session.describe(), flush=True)
        theta, history = fit_distributed(session.client, problem, np.zeros(problem.n),
                                         options=config.train)
    write_and_announce(args.out or config.output_dir, theta, history,
                       {"command": "deploy/slurm/slurmcluster.py",
                        "cluster": dataclasses.asdict(slurm), "options": config.train.describe()})
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="diagode-dist train config (TOML)")
    parser.add_argument("--jobs", type=int, default=2, help="SLURM jobs (default 2)")
    parser.add_argument("--queue", help="partition (default: the site's default)")
    parser.add_argument("--account", help="account to charge (sbatch -A)")
    parser.add_argument("--cores", type=int, default=8, help="cores per job (default 8)")
    parser.add_argument("--memory", default="32GB", help="memory per job (default 32GB)")
    parser.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job (default 1)")
    parser.add_argument("--walltime", default="01:00:00", help="per job (default 01:00:00)")
    parser.add_argument("--interface", help="network interface, e.g. ib0 (default: the host's)")
    parser.add_argument("--local-directory", help="node-local scratch, e.g. '$TMPDIR'")
    parser.add_argument("--worker-timeout", type=float, default=1800.0,
                        help="seconds to wait for the jobs to start (default 1800)")
    parser.add_argument("--out", type=Path, help="output folder (default: the config's)")
    parser.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    return parser


if __name__ == "__main__":
    sys.exit(main())
