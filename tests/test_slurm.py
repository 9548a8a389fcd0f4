"""A real SLURM: the deploy sbatch script and the SLURMCluster path, against local training.

The session fixture installs Debian's slurm-wlm and munge when missing and starts munged,
slurmctld and slurmd on this host (tests/infra/slurm_up.sh); it stops them by pid at the end
(tests/infra/slurm_down.sh), also when the run is interrupted or killed (tested below).
Skipped with the reason when not root or when apt cannot install.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import diagode_dist as dd

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "tests" / "infra"
SBATCH_SCRIPT = REPO / "deploy" / "slurm" / "diagode.sbatch"
SKIP_STATUS = 77  # slurm_up.sh: a prerequisite is missing

# A small problem; the same settings go into the TOML config and into the local dd.fit.
N, S = 24, 12
PROBLEM = {"T": 2.0, "beta": 10.0}
TRAIN = {"epochs": 2, "lr": 0.05, "k": 10, "batch_size": 5, "weight_decay": 1e-3,
         "clamp": (-50.0, 50.0), "seed": 3, "n_shards": 2, "rtol": 1e-12}


@dataclass(frozen=True)
class Slurm:
    conf: Path
    state_dir: Path
    partition: str = "debug"


@pytest.fixture(scope="session")
def slurm(request):
    """A running single-node SLURM; SLURM_CONF points at it for the whole session.

    Its daemons never outlive the test run: SIGTERM and SIGHUP become KeyboardInterrupt (as
    Ctrl-C is), so pytest tears this fixture down; an interrupted start stops what it started;
    and a guard process in a session of its own runs slurm_down.sh if this process dies without
    tearing down (SIGKILL).
    """
    _require_slurm_prerequisites()
    # Not under pytest's tmp dir: daemons and job steps must reach it, whatever its mode.
    state_dir = Path(tempfile.mkdtemp(prefix="diagode-slurm-"))
    state_dir.chmod(0o755)
    guard = subprocess.Popen(["bash", str(INFRA / "slurm_guard.sh"), str(os.getpid()),
                              str(state_dir)], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    handlers = _signals_interrupt(signal.SIGTERM, signal.SIGHUP)
    previous = os.environ.get("SLURM_CONF")
    try:
        conf = _slurm_up(state_dir)
        os.environ["SLURM_CONF"] = str(conf)  # dask_jobqueue's sbatch calls inherit it
        yield Slurm(conf=conf, state_dir=state_dir)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        with _signals_ignored(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            subprocess.run(["bash", str(INFRA / "slurm_down.sh"), str(state_dir)],
                           capture_output=True, text=True, timeout=120)
            guard.kill()
            guard.wait()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if request.session.testsfailed == 0:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:  # the daemons' logs explain most failures
            print(f"\nSLURM state and logs kept in {state_dir}")


def _require_slurm_prerequisites() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("SLURM tests need root (to install SLURM and start slurmctld/slurmd)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")


def _slurm_up(state_dir: Path) -> Path:
    """Run slurm_up.sh; its slurm.conf. Interrupted, it is asked to stop (it then stops what it
    started) before the interrupt goes on."""
    up = subprocess.Popen(["bash", str(INFRA / "slurm_up.sh"), str(state_dir)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = up.communicate(timeout=900)
    except BaseException:
        with _signals_ignored(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            up.terminate()
            try:
                up.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.communicate()
        raise
    if up.returncode == SKIP_STATUS:
        pytest.skip(f"SLURM unavailable: {_last_line(stderr)}")
    if up.returncode != 0:
        pytest.fail(f"slurm_up.sh failed ({up.returncode}):\n{stderr[-3000:]}")
    return Path(stdout.strip().splitlines()[-1])


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _signals_interrupt(*signums) -> dict:
    """Make these signals raise KeyboardInterrupt; returns the previous handlers."""
    return {signum: signal.signal(signum, _raise_interrupt) for signum in signums}


@contextlib.contextmanager
def _signals_ignored(*signums):
    """Ignore these signals inside the block (a second Ctrl-C must not cut a cleanup short)."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _problem_arrays(seed: int = 7):
    rng = np.random.default_rng(seed)
    A0 = 0.1 * rng.standard_normal((N, N))
    np.fill_diagonal(A0, 0.0)
    F = rng.standard_normal((N, S))
    labels = rng.integers(0, N, S)
    return A0, F, labels


def _local_fit():
    A0, F, labels = _problem_arrays()
    prob = dd.Problem(A0, F, labels, **PROBLEM)
    options = {k: v for k, v in TRAIN.items() if k != "n_shards"}
    return dd.fit(prob, np.zeros(N), **options)


def _write_problem_config(folder: Path) -> Path:
    """Problem files and a `diagode-dist train` config with the settings above, in folder."""
    A0, F, labels = _problem_arrays()
    data = folder / "data"
    data.mkdir()
    np.save(data / "A0.npy", A0)
    np.save(data / "F.npy", F)
    np.save(data / "labels.npy", labels)
    train = "\n".join(f"{key} = {_toml(value)}" for key, value in TRAIN.items())
    config = folder / "config.toml"
    config.write_text(
        "[problem]\n"
        'A0 = "data/A0.npy"\nF = "data/F.npy"\nlabels = "data/labels.npy"\n'
        f"T = {PROBLEM['T']}\nbeta = {PROBLEM['beta']}\n\n"
        f"[train]\n{train}\n\n"
        '[output]\ndir = "out"\n')
    return config


def _toml(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(float(v)) for v in value) + "]"
    return repr(value)


def _rel_diff(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def _job_env(**extra: str) -> str:
    """sbatch --export value: this environment, the repo importable, plus extra."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    items = [f"PYTHONPATH={pythonpath}", *(f"{k}={v}" for k, v in extra.items())]
    return ",".join(["ALL", *items])


def test_sbatch_usage_error_without_config(tmp_path):
    """The script refuses to start anything without a config file, with exit status 2."""
    out = subprocess.run(["bash", str(SBATCH_SCRIPT), str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2
    assert "usage" in out.stderr and "missing.toml" in out.stderr


@pytest.mark.slow
def test_sbatch_script_cpu_mode_trains_like_local_fit(slurm, tmp_path):
    config = _write_problem_config(tmp_path)
    out_dir = tmp_path / "out"
    command = [
        "sbatch", "--wait", "--parsable",
        # override the script's GPU defaults: one node, two CPU tasks, no GPUs
        f"--partition={slurm.partition}", "--nodes=1", "--ntasks-per-node=2",
        "--cpus-per-task=1", "--mem=4G", "--time=5", "--gres=none",
        f"--output={tmp_path}/job-%j.out",
        "--export=" + _job_env(DIAGODE_WORKER="cpu", DIAGODE_INTERFACE="lo",
                               DIAGODE_PYTHON=sys.executable, DIAGODE_WORKER_TIMEOUT="90",
                               DIAGODE_TRAIN_ARGS="--quiet"),
        str(SBATCH_SCRIPT), str(config), str(out_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    job_logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert done.returncode == 0, f"sbatch: {done.stderr}\njob output:\n{job_logs}"

    theta = np.load(out_dir / "theta.npy")
    assert not list(out_dir.glob("scheduler-*.json")), "scheduler file left behind"
    assert "2 workers up" in job_logs  # both srun workers joined the scheduler
    assert "workers still running" not in job_logs  # client.shutdown() stopped them

    theta_local, history_local = _local_fit()
    assert theta.shape == (N,)
    assert _rel_diff(theta, theta_local) <= 1e-12
    history = np.loadtxt(out_dir / "history.csv", delimiter=",", skiprows=1, ndmin=2)
    assert history[:, 0].tolist() == [1.0, 2.0]
    assert np.allclose(history[:, 1], history_local, rtol=1e-12, atol=0)
    # and training moved theta: the comparison is not between two zero vectors
    assert np.linalg.norm(theta_local) > 1e-3


def test_sbatch_bad_config_fails_before_starting_anything(tmp_path):
    """A config naming a missing file: exit status 2 and the file named, no scheduler started."""
    config = _write_problem_config(tmp_path)
    (tmp_path / "data" / "labels.npy").unlink()
    env = dict(os.environ, DIAGODE_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p))
    out = subprocess.run(["bash", str(SBATCH_SCRIPT), str(config), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stderr
    assert "bad config" in out.stderr and "labels.npy" in out.stderr
    assert not list((tmp_path / "out").glob("scheduler-*"))


def test_sbatch_gpu_mode_without_gpus_says_how_to_ask_for_them(tmp_path):
    config = _write_problem_config(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k != "DIAGODE_GPUS_PER_NODE"}
    env.update(DIAGODE_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p))
    out = subprocess.run(["bash", str(SBATCH_SCRIPT), str(config), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stderr
    assert "--gres=gpu:N" in out.stderr and "DIAGODE_WORKER=cpu" in out.stderr
    assert not list((tmp_path / "out").glob("scheduler-*"))


@pytest.mark.slow
def test_sbatch_job_exit_status_is_the_trainings(slurm, tmp_path):
    """Training that fails after the cluster is up (a bad CLI option: argparse exits 2): the job
    exits with that status, and the cluster is still shut down."""
    config = _write_problem_config(tmp_path)
    command = [
        "sbatch", "--wait", f"--partition={slurm.partition}", "--nodes=1",
        "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=2G", "--time=5", "--gres=none",
        f"--output={tmp_path}/job-%j.out",
        "--export=" + _job_env(DIAGODE_WORKER="cpu", DIAGODE_INTERFACE="lo",
                               DIAGODE_PYTHON=sys.executable, DIAGODE_WORKER_TIMEOUT="90",
                               DIAGODE_TRAIN_ARGS="--no-such-option"),
        str(SBATCH_SCRIPT), str(config), str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    job_logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert done.returncode == 2, job_logs
    assert "1 workers up" in job_logs
    assert "training finished with exit status 2" in job_logs
    assert "--no-such-option" in job_logs
    assert not list((tmp_path / "out").glob("scheduler-*.json"))
    assert "workers still running" not in job_logs  # client.shutdown() stopped them


@pytest.fixture(scope="class")
def slurm_client(slurm, tmp_path_factory):
    """A SLURMCluster of two one-core jobs, shared by TestSLURMCluster and closed after it."""
    from distributed import Client

    from diagode_dist.service.cluster import slurm_cluster

    folder = tmp_path_factory.mktemp("slurmcluster")
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    with slurm_cluster(jobs=2, cores=1, memory="1GB", queue=slurm.partition,
                       interface="lo", walltime="00:10:00",
                       local_directory=str(folder / "scratch"),
                       log_directory=str(folder / "logs"), python=sys.executable,
                       job_script_prologue=[f"export PYTHONPATH={pythonpath}"]) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        yield client


@pytest.mark.slow
class TestSLURMCluster:
    """slurm_cluster(jobs=2, cores=1, memory="1GB", interface="lo"): two SLURM jobs as workers.

    The cluster is shared by this class's tests and closed after them: its jobs hold both
    cores of the test node, so no other test's job could start while it is up.
    """

    def test_workers_run_in_slurm_jobs(self, slurm_client):
        job_ids = slurm_client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert len(job_ids) == 2
        assert None not in job_ids.values() and len(set(job_ids.values())) == 2
        queued = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True,
                                text=True, timeout=30).stdout
        for job_id in job_ids.values():
            assert re.search(rf"^{job_id} dask-worker RUNNING$", queued, re.M), queued
        assert slurm_client.submit(lambda x: x * x, 12).result(timeout=60) == 144

    def test_fit_distributed_matches_local_fit(self, slurm_client):
        from diagode_dist.service.client import fit_distributed

        A0, F, labels = _problem_arrays()
        prob = dd.Problem(A0, F, labels, **PROBLEM)
        theta, history = fit_distributed(slurm_client, prob, np.zeros(N), **TRAIN)

        theta_local, history_local = _local_fit()
        assert _rel_diff(theta, theta_local) <= 1e-12
        assert np.allclose(history, history_local, rtol=1e-12, atol=0)
        assert np.linalg.norm(theta_local) > 1e-3


@pytest.mark.slow
def test_cli_train_slurm_path_matches_local_fit(slurm, tmp_path):
    """`diagode-dist train CONFIG --slurm --jobs 2 ...`: SLURMCluster jobs started by the CLI."""
    config = _write_problem_config(tmp_path)
    env = dict(os.environ, SLURM_CONF=str(slurm.conf),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p))
    command = [sys.executable, "-m", "diagode_dist.cli", "train", str(config), "--slurm",
               "--jobs", "2", "--queue", slurm.partition, "--cores", "1", "--memory", "1GB",
               "--walltime", "00:10:00", "--interface", "lo",
               "--local-directory", str(tmp_path / "scratch"), "--worker-timeout", "90",
               "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cluster: slurm, 2 worker(s)" in done.stdout

    theta = np.load(tmp_path / "out" / "theta.npy")
    theta_local, _ = _local_fit()
    assert _rel_diff(theta, theta_local) <= 1e-12
    # the CLI closed its cluster: its jobs are gone from the queue
    queued = subprocess.run(["squeue", "-h", "-n", "dask-worker", "-o", "%i"],
                            capture_output=True, text=True, timeout=30, env=env).stdout
    assert queued.strip() == ""


# ---- an interrupted or killed test run leaves no daemon behind ---------------------------------

DAEMONS = ("munged", "slurmctld", "slurmd")


def _alive(pid: int, name: str) -> bool:
    """Process pid runs and is called name (not a zombie, not a reused pid of another name)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return comm == name and state != "Z"


def _daemon_pids(state_dir: Path) -> dict[str, int]:
    """The instance's daemons by their pid files (munged's from its own folder until copied)."""
    pids = {}
    munge_dir = state_dir / "munge_dir"
    files = {"slurmctld": state_dir / "slurmctld.pid", "slurmd": state_dir / "slurmd.pid",
             "munged": state_dir / "munged.pid"}
    if not files["munged"].exists() and munge_dir.exists():
        files["munged"] = Path(munge_dir.read_text().strip()) / "munged.pid"
    for name, path in files.items():
        with contextlib.suppress(OSError, ValueError):
            pids[name] = int(path.read_text().strip())
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "SIGKILL"])
def test_interrupted_test_run_leaves_no_slurm_daemon(how, tmp_path):
    """A pytest run of a SLURM test, stopped once its daemons are up: by SIGTERM to the process,
    by SIGINT to its process group (Ctrl-C in a terminal), or by SIGKILL. Afterwards none of
    munged, slurmctld or slurmd of its instance runs, nor anything else of it (an unfinished
    slurm_up.sh, an `sbatch --wait` client, a job step)."""
    _require_slurm_prerequisites()
    inner_test = "tests/test_slurm.py::test_sbatch_script_cpu_mode_trains_like_local_fit"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the inner run's state dir lands here
    env.pop("SLURM_CONF", None)
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              inner_test], cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pids, state_dir = _wait_for_daemons(inner, tmp_path, timeout=600)
        if how == "Ctrl-C":
            os.killpg(inner.pid, signal.SIGINT)
        else:
            inner.send_signal(getattr(signal, how))
        output = inner.communicate(timeout=180)[0]
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.communicate()
    deadline = time.monotonic() + 30  # after SIGKILL the guard stops them (about 3 s)
    while time.monotonic() < deadline and (any(_alive(pid, name) for name, pid in pids.items())
                                           or _leftovers(tmp_path, state_dir)):
        time.sleep(0.2)
    survivors = {name: pid for name, pid in pids.items() if _alive(pid, name)}
    assert not survivors, f"{how}: still running {survivors}\n{output[-3000:]}"
    assert not _leftovers(tmp_path, state_dir), f"{how}: left running\n{output[-3000:]}"
    if how != "SIGKILL":  # pytest's own exit status for an interrupted run
        assert inner.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]


def _leftovers(tmp_path: Path, state_dir: Path) -> dict[int, str]:
    """Live processes of the inner run: command line under tmp_path, or SLURM_CONF naming the
    instance's slurm.conf (job steps and their tasks). pid -> command line."""
    conf = f"SLURM_CONF={state_dir}/slurm.conf".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(tmp_path).encode() in cmdline or conf in environ:
            found[int(entry.name)] = cmdline.decode(errors="replace")[:200]
    return found


def _wait_for_daemons(inner: subprocess.Popen, tmp_path: Path,
                      timeout: float) -> tuple[dict[str, int], Path]:
    """The pids of the inner run's three daemons once all three run, and its state folder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if inner.poll() is not None:
            output = inner.communicate()[0]
            if "skipped" in output and "SLURM unavailable" in output:
                pytest.skip(_last_line(output))
            pytest.fail(f"the inner test run ended before its daemons were up:\n{output[-3000:]}")
        for state_dir in tmp_path.glob("diagode-slurm-*"):
            pids = _daemon_pids(state_dir)
            if set(pids) == set(DAEMONS) and all(_alive(pid, name) for name, pid in pids.items()):
                return pids, state_dir
        time.sleep(0.2)
    pytest.fail(f"the daemons were not up after {timeout:.0f} s")
