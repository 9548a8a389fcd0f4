"""The ``diagode-dist`` command: demo, train, status and result.

    diagode-dist demo [--out DIR] [--epochs N] [--n N] [--S S] [--workers W] ...
    diagode-dist train CONFIG.toml [--scheduler ADDRESS | --scheduler-file FILE | --slurm ...]
    diagode-dist status RUN_ID (--scheduler ADDRESS | --scheduler-file FILE)
    diagode-dist result RUN_ID (--scheduler ADDRESS | --scheduler-file FILE) [--out DIR] [--wait]
    diagode-dist predict CONFIG.toml --theta theta.npy [--out DIR] [--times T1 T2 ...]

User errors (a bad config, a missing file, an unreachable scheduler, a failed run) end with one
line on stderr and exit status 1; ``--traceback`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diagode_dist._io import plain
from diagode_dist.config import SlurmOptions, TrainConfig, check_slurm_options, load_config
from diagode_dist.options import DEMO_OPTIONS, add_option_flags, options_from_flags
from diagode_dist.param import as_operator_param
from diagode_dist.problem import demo_problem
from diagode_dist.report import write_outputs

if TYPE_CHECKING:  # the service is imported by the commands that use it (see below)
    from diagode_dist.service.protocol import RunStatus
    from diagode_dist.service.session import Session

__all__ = ["main"]

PROG = "diagode-dist"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# The demo problem of the README: n = 256, S = 64, T = 2, beta = 10 (training: DEMO_OPTIONS).
DEMO_PROBLEM = {"n": 256, "S": 64}

# What a user can get wrong: reported as one line, not a traceback.
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)

_log = logging.getLogger("diagode_dist.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as interrupt:  # one line, whatever was running
        print(f"{PROG}: interrupted" + (f": {interrupt}" if str(interrupt) else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as err:
        if args.traceback:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


# ---- argument parsing -------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train the diagonal of large linear ODE systems with exact Krylov adjoint "
        "gradients, on a Dask cluster.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
    common.add_argument("-v", "--verbose", action="store_true", help="log Dask's messages too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", parents=[common], help="train the demo problem on an embedded local cluster",
        description="Build the demo problem (A0 = 0.01 randn, zero diagonal; F = randn; random "
        "labels), start an embedded cluster (one worker per GPU, else per CPU core), train it "
        "and write theta.npy, history.csv, loss.png and summary.json.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder "
                      "(default: %(default)s)")
    demo.add_argument("--n", type=_positive_int, default=DEMO_PROBLEM["n"],
                      help="state size (default: %(default)s)")
    demo.add_argument("--S", type=_positive_int, default=DEMO_PROBLEM["S"],
                      help="number of right-hand sides (columns) (default: %(default)s)")
    demo.add_argument("--workers", type=_positive_int, default=None,
                      help="number of workers (default: one per GPU, else one per CPU core)")
    demo.add_argument("--cpu", action="store_true", help="use CPU workers even if GPUs are visible")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    add_option_flags(demo, DEMO_OPTIONS)  # --seed also seeds the demo problem
    demo.set_defaults(handler=_cmd_demo)

    train = commands.add_parser(
        "train", parents=[common], help="train a problem stored in files (TOML config)",
        description="Train the problem described by CONFIG (TOML; see diagode_dist.config) on an "
        "embedded local cluster, a running Dask scheduler, or SLURM jobs.",
    )
    train.add_argument("config", type=Path, metavar="CONFIG.toml")
    where = train.add_mutually_exclusive_group()
    _add_scheduler_options(where)
    where.add_argument("--slurm", action="store_true",
                       help="start workers as SLURM jobs (dask_jobqueue.SLURMCluster)")
    where.add_argument("--local", action="store_true",
                       help="embedded local cluster even if the config has a [slurm] section")
    slurm = train.add_argument_group("SLURM options (override the config's [slurm] section)")
    slurm.add_argument("--jobs", type=_positive_int, help="number of SLURM jobs")
    slurm.add_argument("--queue", help="partition")
    slurm.add_argument("--walltime", help="per job, HH:MM:SS")
    slurm.add_argument("--cores", type=_positive_int, help="cores per job")
    slurm.add_argument("--memory", help="memory per job, e.g. 8GB")
    slurm.add_argument("--gpus-per-job", type=_nonnegative_int)
    slurm.add_argument("--interface", help="network interface of the workers, e.g. ib0")
    slurm.add_argument("--local-directory", help="node-local scratch folder of the workers")
    train.add_argument("--out", type=Path, default=None,
                       help="output folder (default: [output] dir of the config, else diagode-out)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in OUT/checkpoints")
    train.add_argument("--detach", action="store_true",
                       help="with --scheduler/--scheduler-file: submit, print the run id, exit")
    train.add_argument("--workers", type=_positive_int, default=None,
                       help="embedded cluster: number of workers (default: per GPU / CPU core)")
    train.add_argument("--cpu", action="store_true", help="embedded cluster: CPU workers only")
    _add_timeouts(train)
    _add_tls_options(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_option_flags(train)  # each overrides the config's [train] value
    train.set_defaults(handler=_cmd_train)

    status = commands.add_parser("status", parents=[common], help="print a run's status (JSON)")
    status.add_argument("run_id", metavar="RUN_ID")
    _add_scheduler_options(status.add_mutually_exclusive_group(required=True))
    _add_timeouts(status, workers=False)
    _add_tls_options(status)
    status.set_defaults(handler=_cmd_status)

    result = commands.add_parser("result", parents=[common], help="write a run's result files")
    result.add_argument("run_id", metavar="RUN_ID")
    _add_scheduler_options(result.add_mutually_exclusive_group(required=True))
    result.add_argument("--out", type=Path, default=Path("diagode-out"),
                        help="output folder (default: %(default)s)")
    result.add_argument("--wait", action="store_true", help="wait for a running run to finish")
    _add_timeouts(result, workers=False)
    _add_tls_options(result)
    result.add_argument("--quiet", action="store_true", help="no progress bar")
    result.set_defaults(handler=_cmd_result)

    predict = commands.add_parser(
        "predict", parents=[common], help="use a trained theta: states (and labels) of CONFIG",
        description="Solve the problem of CONFIG with a trained theta (this process, no "
        "cluster) and write states.npy ((m, n, S) at the observation times, or at --times) to "
        "OUT; for the classification loss also predicted_labels.npy and probabilities.npy "
        "(n, S). Prints the loss (MSE) or the accuracy against the config's labels.")
    predict.add_argument("config", type=Path, metavar="CONFIG.toml")
    predict.add_argument("--theta", type=Path, required=True, help="trained theta (.npy)")
    predict.add_argument("--out", type=Path, default=None,
                         help="output folder (default: [output] dir of the config)")
    predict.add_argument("--times", type=_positive_float, nargs="+", default=None,
                         help="times of the states (default: the observation times, or T)")
    predict.set_defaults(handler=_cmd_predict)
    return parser


def _add_scheduler_options(group) -> None:
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="address of a running Dask scheduler, e.g. tcp://host:8786")
    group.add_argument("--scheduler-file", type=Path, metavar="FILE",
                       help="scheduler file written by `dask scheduler --scheduler-file`")


def _add_tls_options(parser) -> None:
    """``dask scheduler``'s TLS flags, for a running scheduler that speaks tls://."""
    group = parser.add_argument_group("TLS (a running scheduler at tls://...; default: Dask's "
                                      "config, e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE)")
    group.add_argument("--tls-ca-file", type=Path, metavar="PEM",
                       help="CA certificate(s) that signed the scheduler's certificate")
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help="this client's certificate")
    group.add_argument("--tls-key", type=Path, metavar="PEM",
                       help="this client's private key (if not inside --tls-cert)")


def _security(args: argparse.Namespace):
    """A distributed.Security from the TLS flags, or None when none is given."""
    given = {name: getattr(args, name, None) for name in ("tls_ca_file", "tls_cert", "tls_key")}
    if not any(given.values()):
        return None
    for name, path in given.items():
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')}: no such file: {path}")
    if given["tls_ca_file"] is None or given["tls_cert"] is None:
        raise ValueError("TLS needs --tls-ca-file and --tls-cert (and --tls-key unless the key "
                         "is in the certificate file)")
    from distributed import Security

    return Security(tls_ca_file=str(given["tls_ca_file"]),
                    tls_client_cert=str(given["tls_cert"]),
                    tls_client_key=None if given["tls_key"] is None else str(given["tls_key"]),
                    require_encryption=True)


def _add_timeouts(parser, workers: bool = True) -> None:
    parser.add_argument("--connect-timeout", type=_positive_float, default=10.0,
                        help="seconds to wait for the scheduler (default: %(default)s)")
    if workers:
        parser.add_argument("--worker-timeout", type=_positive_float, default=300.0,
                            help="seconds to wait for workers to join (default: %(default)s)")


def _positive_int(text: str) -> int:
    return _checked_number(text, int, lambda value: value >= 1, "an integer >= 1")


def _nonnegative_int(text: str) -> int:
    return _checked_number(text, int, lambda value: value >= 0, "an integer >= 0")


def _positive_float(text: str) -> float:
    return _checked_number(text, float, lambda value: 0 < value < float("inf"), "a number > 0")


def _checked_number(text: str, kind, ok, wanted: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    return value


def _setup_logging(verbose: bool) -> None:
    package = logging.getLogger("diagode_dist")
    if not any(getattr(h, "_diagode_cli", False) for h in package.handlers):  # once per process
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler._diagode_cli = True
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    if not verbose:  # Dask's INFO chatter (worker start/stop) hides the progress bar
        logging.getLogger("distributed").setLevel(logging.WARNING)


# ---- commands ---------------------------------------------------------------------------------


# The Dask service (``diagode_dist.service``) is imported inside the commands that use it, so
# that --help, usage errors and config errors come back before distributed is loaded.


def _cmd_demo(args: argparse.Namespace) -> int:
    from diagode_dist.service.session import open_client

    options = options_from_flags(args, DEMO_OPTIONS)
    if options.n_shards is not None and options.n_shards > args.S:
        raise ValueError(f"--n-shards {options.n_shards} is more than the S = {args.S} columns")
    problem = demo_problem(n=args.n, S=args.S, seed=options.seed)
    with open_client(n_workers=args.workers, gpu=False if args.cpu else "auto") as session:
        print(session.describe(), flush=True)
        run = _submit(session.client, problem, np.zeros(problem.n), options)
        theta, history, status, seconds = _follow(run, args.quiet, session)
        summary = _summary("demo", run.run_id, status, seconds, session, options.describe(),
                           {"kind": "demo", "n": problem.n, "S": problem.S, "T": problem.T,
                            "beta": problem.beta})
    _write_and_report(args.out, theta, history, summary)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config)  # config errors first, before anything is imported
    options = options_from_flags(args, config.train)
    if config.param is not None:
        if getattr(args, "option_param", None) is not None:
            raise ValueError("--param and a [param] section in the config: give one of them")
        options = replace(options, param=config.param.build())
    slurm = _slurm_options(args, config)
    if args.detach and not (args.scheduler or args.scheduler_file):
        raise ValueError("--detach needs --scheduler or --scheduler-file (a cluster started "
                         "by this command ends with it)")
    out_dir = (args.out if args.out is not None else config.output_dir).resolve()
    spec = config.problem
    files = spec.files()
    files.preflight()  # every value read once: bad files fail before any cluster is contacted
    if options.n_shards is not None and options.n_shards > files.S:
        raise ValueError(f"[train] n_shards = {options.n_shards} is more than the "
                         f"S = {files.S} columns of F")
    theta_size = as_operator_param(options.diagonal_map()).theta_size(files.n)
    with _open(args, slurm, out_dir / "slurm-logs", min_workers=1) as session:
        print(session.describe(), flush=True)
        run = _submit(session.client, files, np.zeros(theta_size), options,
                      checkpoint_dir=out_dir / "checkpoints", resume=args.resume)
        if args.detach:
            _print_detached(run.run_id, args)
            return 0
        theta, history, status, seconds = _follow(run, args.quiet, session, args)
        problem_info = {"kind": "files", "n": files.n, "S": files.S, "T": spec.T,
                        "beta": spec.beta, "A0": spec.A0, "F": spec.F, "labels": spec.labels,
                        "x0": spec.x0, "loss": spec.loss or "classification",
                        "obs_times": spec.obs_times, "targets": spec.targets,
                        "config": args.config.resolve()}
        # everything that determines theta: options (n_shards as run), param, theta0
        described = {**options.describe(), "n_shards": status.get("n_shards"),
                     "theta0": f"zeros({theta_size})", "theta_size": theta_size}
        if config.param is not None:
            described["param"] = {**config.param.describe(), "repr": repr(options.param)}
        summary = _summary("train", run.run_id, status, seconds, session, described,
                           problem_info)
    _write_and_report(out_dir, theta, history, summary)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from diagode_dist.service.client import attach

    with _open(args, None) as session:
        status = attach(session.client, args.run_id).status()
    print(json.dumps(plain(status), indent=2, sort_keys=True))
    return 0


def _cmd_result(args: argparse.Namespace) -> int:
    from diagode_dist.service.client import attach

    with _open(args, None) as session:
        run = attach(session.client, args.run_id)
        status = run.status()
        if status["status"] == "running" and not args.wait:
            raise RuntimeError(f"run {args.run_id} is still running (step {status['step']}/"
                               f"{status['n_steps']}); use --wait to wait for it")
        if status["status"] == "failed":
            raise RuntimeError(f"run {args.run_id} failed: {status.get('error')}")
        theta, history, status, seconds = _follow(run, args.quiet, session, args)
        summary = _summary("result", run.run_id, status, None, session, {}, {})
    _write_and_report(args.out, theta, history, summary)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from diagode_dist.losses import Classification
    from diagode_dist.solve import predict_proba, solve

    config = load_config(args.config)
    param = config.param.build() if config.param is not None else config.train.diagonal_map()
    if not args.theta.is_file():
        raise FileNotFoundError(f"--theta: no such file: {args.theta}")
    theta = np.load(args.theta, allow_pickle=False)
    files = config.problem.files().validate()
    prob = files.load_shard(slice(0, files.S))
    times = None if args.times is None else sorted(args.times)
    states = solve(prob, theta, param, times, k=config.train.k, rtol=config.train.rtol)
    out_dir = (args.out if args.out is not None else config.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "states.npy", states)
    written = ["states.npy"]
    if isinstance(prob.loss, Classification):
        proba = predict_proba(prob, theta, param, k=config.train.k, rtol=config.train.rtol)
        labels = proba.argmax(axis=0)
        np.save(out_dir / "predicted_labels.npy", labels)
        np.save(out_dir / "probabilities.npy", proba)
        written += ["predicted_labels.npy", "probabilities.npy"]
        print(f"accuracy against the config's labels: "
              f"{float(np.mean(labels == np.asarray(prob.labels))):.4f} ({prob.S} columns)")
    elif times is None:
        mse = float(np.mean((states - np.asarray(prob.loss.targets)) ** 2))
        print(f"mean squared error against the targets: {mse:.6g}")
    print(f"states {states.shape} (times, n, S); wrote {', '.join(written)} to {out_dir}")
    return 0


# ---- clusters and clients ---------------------------------------------------------------------


def _open(args: argparse.Namespace, slurm: SlurmOptions | None, slurm_logs: Path | None = None,
          min_workers: int = 0):
    """``open_client`` for the scheduler, SLURM or embedded-cluster flags of a command."""
    from diagode_dist.service.session import open_client

    if args.scheduler or args.scheduler_file:
        return open_client(args.scheduler, args.scheduler_file,
                           connect_timeout=args.connect_timeout,
                           worker_timeout=getattr(args, "worker_timeout", 300.0),
                           min_workers=min_workers, security=_security(args))
    if slurm is not None:
        return open_client(slurm=slurm, worker_timeout=args.worker_timeout,
                           slurm_logs=slurm_logs)
    return open_client(n_workers=args.workers, gpu=False if args.cpu else "auto")


def _slurm_options(args: argparse.Namespace, config: TrainConfig) -> SlurmOptions | None:
    """SLURM options from the config's [slurm] section overridden by flags; None: not SLURM."""
    flags = {"jobs": args.jobs, "queue": args.queue, "walltime": args.walltime,
             "cores": args.cores, "memory": args.memory, "gpus_per_job": args.gpus_per_job,
             "interface": args.interface, "local_directory": args.local_directory}
    given = {key: value for key, value in flags.items() if value is not None}
    wants_slurm = args.slurm or (config.slurm is not None and not (
        args.local or args.scheduler or args.scheduler_file))
    if not wants_slurm:
        if given:
            names = ", ".join("--" + key.replace("_", "-") for key in given)
            raise ValueError(f"{names} need(s) --slurm or a [slurm] section in the config")
        return None
    merged = {**(asdict(config.slurm) if config.slurm is not None else {}), **given}
    if merged.get("jobs") is None:
        raise ValueError("--slurm needs --jobs N (or jobs = N in the config's [slurm] section)")
    return check_slurm_options(merged, where="--slurm: ")


def _scheduler_flag(args: argparse.Namespace) -> str:
    if args.scheduler:
        return f"--scheduler {args.scheduler}"
    return f"--scheduler-file {args.scheduler_file}"


def _print_detached(run_id: str, args: argparse.Namespace) -> None:
    flag = _scheduler_flag(args)
    print(f"run id: {run_id}")
    print(f"follow it:  {PROG} status {run_id} {flag}")
    print(f"results:    {PROG} result {run_id} {flag} --wait --out DIR", flush=True)


# ---- running ----------------------------------------------------------------------------------


def _submit(client, problem, theta0: np.ndarray, options, **extra):
    from diagode_dist.service.client import submit

    return submit(client, problem, theta0, options=options, **extra)


def _training_page(client) -> str | None:
    """URL of the service's training page on the dashboard, if the scheduler serves one."""
    link = client.dashboard_link or ""
    if not link.endswith("/status"):
        return None
    url = link[: -len("/status")] + "/diagode"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
    try:
        with direct.open(url, timeout=2) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError):  # no such route (404), no dashboard, unreachable host
        return None


@dataclass
class _ProgressBar:
    """progress(status) callback for RunHandle.wait: a tqdm bar of steps with loss and steps/s."""

    enabled: bool
    bar: Any = None
    shown: tuple | None = None

    def __call__(self, status: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            # initial=: steps done before the bar existed must not count toward its rate
            self.bar = tqdm(total=status.get("n_steps") or None, unit="step", desc="training",
                            initial=int(status.get("step") or 0), dynamic_ncols=True,
                            file=sys.stderr)
        shown = (status.get("step"), status.get("loss"), status.get("steps_per_s"))
        if shown == self.shown:
            return  # nothing new: a refresh would print the same line again
        self.shown = shown
        self.bar.n = int(status.get("step") or 0)
        postfix = {"epoch": f"{status.get('epoch', 0)}/{status.get('epochs', '?')}"}
        if status.get("loss") is not None:
            postfix["loss"] = f"{status['loss']:.4g}"
        if status.get("steps_per_s"):
            postfix["steps/s"] = f"{status['steps_per_s']:.3g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _follow(run, quiet: bool, session, args: argparse.Namespace | None = None):
    """Print the run's id and _wait for it. On Ctrl-C: stop a run on a cluster started here, or
    say how to follow a run that goes on on a running scheduler; then KeyboardInterrupt."""
    with _deferred_interrupt() as interrupted:
        try:
            print(f"run id: {run.run_id}", flush=True)
            page = _training_page(session.client)
            if page is not None:
                print(f"training page: {page}", flush=True)
            return _wait(run, quiet, interrupted)
        except KeyboardInterrupt:
            if session.external:
                raise KeyboardInterrupt(
                    f"run {run.run_id} goes on on the scheduler; follow it with `{PROG} status "
                    f"{run.run_id} {_scheduler_flag(args)}`") from None
            # The cluster closes with this command: end the run first, quietly (its cancel and
            # Dask's shutdown messages are expected, not news).
            for name, level in (("diagode_dist.service", logging.WARNING),
                                ("distributed", logging.CRITICAL)):
                logging.getLogger(name).setLevel(level)
            step = "?"
            with contextlib.suppress(Exception):
                step = run.cancel("interrupted (Ctrl-C) by the user")["step"]
            from diagode_dist.service.session import let_tasks_finish

            let_tasks_finish(session.client, timeout=5.0)
            raise KeyboardInterrupt(f"run {run.run_id} cancelled at step {step}") from None


def _wait(run, quiet: bool, interrupted: threading.Event):
    """Wait for the run with a progress bar; return (theta, history, final status, seconds).

    Raises KeyboardInterrupt at the next status poll once ``interrupted`` is set."""
    bar = _ProgressBar(enabled=not quiet)
    start = time.perf_counter()

    def progress(status: dict[str, Any]) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt  # here, between two calls to the scheduler
        bar(status)

    try:
        if interrupted.is_set():
            raise KeyboardInterrupt
        theta, history = run.wait(progress=progress)
        status = run.status()
    finally:
        bar.close()
    return np.asarray(theta), list(history), status, time.perf_counter() - start


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C sets an event, checked between calls to the scheduler, instead of raising inside
    one: a KeyboardInterrupt in the middle of ``Client.sync`` leaves the client unable to close
    (measured: a NameError in distributed's cancel callback, then a 20 s time-out). A second
    Ctrl-C interrupts at once."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signal handlers can only be set from the main thread
        return

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _summary(command: str, run_id: str, status: RunStatus, seconds: float | None,
             session: Session, options: dict[str, Any], problem: dict[str, Any]) -> dict:
    history = list(status.get("history") or [])
    summary = {
        "command": command,
        "run_id": run_id,
        "status": status.get("status"),
        "steps": status.get("step"),
        "epochs": status.get("epochs"),
        "initial_loss": history[0] if history else None,
        "final_loss": history[-1] if history else None,
        "steps_per_s": status.get("steps_per_s"),
        "wall_time_s": seconds,
        "cluster": session.kind,
        "n_workers": session.n_workers,
        "dashboard": session.client.dashboard_link,
        "options": {key: value for key, value in options.items() if value is not None},
        "problem": problem,
    }
    return plain(summary)


def _write_and_report(out_dir: Path, theta: np.ndarray, history: list[float],
                      summary: dict[str, Any]) -> None:
    paths = write_outputs(out_dir, theta, history, summary)
    if history:
        print(f"mean loss: epoch 1 {history[0]:.6g} -> epoch {len(history)} {history[-1]:.6g}")
    print(f"wrote {', '.join(path.name for path in paths.values())} to {Path(out_dir).resolve()}")


if __name__ == "__main__":
    sys.exit(main())
