"""Shard workers: one long-running Dask task per shard, looping pull -> loss/gradient -> push.

A shard owns the contiguous global columns ``[lo, hi)`` (``np.array_split`` of the columns into
``n_shards`` parts, or one column chunk of a ``DaskProblem``'s F). Its task (key
``("diagode-shard", uid, shard)``, ``uid`` being fresh per submission):

1. ``secede()``s first, so waiting for theta never holds a worker thread: more shards than
   threads cannot deadlock.
2. Loads its columns once: from files (``ProblemFiles``: memory-mapped column slices), from
   the task graph (in-memory ``Problem``: the columns travel inside the task, A0 as a shared
   dependency, so Dask can recompute both if a worker dies, which scattered data would not
   survive), or from its chunks of a ``DaskProblem`` (dependencies persisted on the workers:
   the task runs where they are). A0 is loaded once per worker process (cached here), and
   everything is moved once to the spec's device (``ShardSpec.device``, chosen at submission:
   "cpu" stays in NumPy even where a GPU is visible; "gpu"/"gpu:<i>" is CuPy on that device),
   whose memory budget the shard shares with the ``device_shares`` computing there at once.
3. Loops: pull theta at the server's step (one pull per worker process, shared by its shards),
   compute ``loss_grad_sums`` on its columns of that step's minibatch (the same
   ``epoch_batches`` as ``dd.fit``), push (loss_sum, grad_sum, count). A rerun task starts
   by pulling and so resumes at the server's current step. Pushes carry the run's token
   (``ShardSpec.token``), without which the server refuses them.

What the dashboard shows: the task stream has one long bar per shard task, prefix
``diagode-shard`` (a seceded task is "long-running"). The time inside it is broken down in the
dashboard's *Fine Performance Metrics* page (prefix ``diagode-shard``) under the activities
``pull-theta``, ``forward-adjoint`` (the Krylov forward and adjoint passes), ``push-gradient``
and ``load-shard``; Dask reports these when the task ends. They are summed here and handed to
Dask once, at the end: Dask's ledger of a running task keeps every reported value, so
reporting each step would grow the worker's memory without bound over a long run. Live
per-shard timings go to the parameter server with every push (``status()["shard_timings"]``).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

import numpy as np
import scipy.sparse as sp
from distributed import get_worker, secede
from distributed.metrics import context_meter
from distributed.protocol.serialize import ToPickle
from distributed.utils import sync

from diagode_dist._array import is_sparse, sparse_to_module, to_module, to_numpy, visible_gpus
from diagode_dist.adjoint import loss_grad_sums, memory_share
from diagode_dist.files import ProblemFiles
from diagode_dist.service._gpu_options import resolve_device
from diagode_dist.service.inputs import DaskShard
from diagode_dist.service.protocol import ShardSpec
from diagode_dist.train import epoch_batches

_OPERATOR_CACHE_SIZE = 3  # A0s kept per worker process (as read, validated, on the device)
_PULL_TIMEOUT_S = 10.0  # a pull waits at most this long on the scheduler, then asks again


def shard_columns(S: int, n_shards: int) -> list[tuple[int, int]]:
    """[lo, hi) global column ranges of the shards: np.array_split of range(S)."""
    bounds = np.array_split(np.arange(S), n_shards)
    return [(int(part[0]), int(part[-1]) + 1) for part in bounds]


def shard_loop(spec: ShardSpec, data, operator=None, blocks: dict | None = None) -> dict:
    """Body of a shard task; returns a summary when the run ends (finished or failed).

    ``data``: a ``ProblemFiles``, the shard's columns of an in-memory Problem with its operator
    detached (``detach_operator``), or a ``DaskShard``; ``operator``: A0 (a Dask dependency)
    for the last two, None for files; ``blocks``: a DaskShard's chunks (Dask dependencies).
    """
    secede()  # before anything that waits: the thread slot goes back to the worker
    worker = get_worker()
    activities = _Activities()
    ordinal = resolve_device(spec.device, len(visible_gpus()))
    with _on_device(ordinal), memory_share(spec.device_shares):
        with activities.timed("load-shard"):
            prob = _load_problem(spec, data, operator, blocks)
        link = _ServerLink(worker, spec.uid, spec.token)
        try:
            # Dask keeps every value metered inside a running task (including the RPCs'
            # serialisation) until the task ends: meter nothing per step, report sums at the end.
            with context_meter.clear_callbacks():
                status, steps = _steps(spec, prob, link, activities, worker.address)
        finally:
            link.close()
            activities.report()
    return {"run_id": spec.run_id, "shard": spec.shard, "status": status, "steps": steps,
            "worker": worker.address, "backend": prob.xp.__name__,
            "device": device_name(ordinal)}


def device_name(ordinal: int | None) -> str:
    """What a shard reports: "cpu", or "gpu:<i>" (CuPy's device i of its worker process)."""
    return "cpu" if ordinal is None else f"gpu:{ordinal}"


def _on_device(ordinal: int | None):
    """CuPy's device ``ordinal`` current in this thread (nothing for the CPU)."""
    if ordinal is None:
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(ordinal)


def _steps(spec: ShardSpec, prob, link, activities, address: str) -> tuple[str, int]:
    """Pull, compute and push until the run ends; (final status, steps computed)."""
    load_s = activities.seconds["load-shard"]
    device = "cpu" if prob.xp is np else device_name(int(prob.xp.cuda.Device().id))
    batches = _Minibatches(spec)
    steps, status, want = 0, "running", 0
    while status == "running":
        with activities.timed("pull-theta") as pull:
            reply = link.pull(want)
        status = reply["status"]
        if status != "running" or reply["step"] < want:
            continue  # ended, or no new step within the pull timeout: ask again
        step = reply["step"]
        with activities.timed("forward-adjoint") as compute:
            loss_sum, grad_sum, count, accuracy = _loss_grad(
                prob, reply["theta"], spec, batches.local_columns(step))
        timings = {"compute_s": compute.seconds, "pull_s": pull.seconds, "load_s": load_s,
                   "columns": count, "backend": prob.xp.__name__, "device": device,
                   "worker": address, **accuracy}
        with activities.timed("push-gradient"):
            status = link.push(step, spec.shard, loss_sum, grad_sum, count, timings)
        steps += 1
        want = step + 1
    return status, steps


def _loss_grad(prob, theta: np.ndarray, spec: ShardSpec, columns: np.ndarray):
    """(loss_sum, grad_sum as NumPy, count, accuracy) of this shard's columns.

    Zeros when the shard has no column in this step; accuracy: the Krylov error estimate.
    """
    if columns.size == 0:
        return 0.0, np.zeros_like(theta), 0, {}
    theta_dev = prob.xp.asarray(np.require(theta, requirements="A"))  # see _aligned
    options = spec.options
    with _device_turn(prob.xp):
        loss_sum, grad_sum, count, info = loss_grad_sums(
            prob, theta_dev, options.diagonal_map(), columns=columns, k=options.k,
            rtol=options.rtol, max_chunk_columns=options.max_chunk_columns,
            method=options.method)  # "rational": one factorization per step and shard
    accuracy = {key: info[key] for key in ("error_estimate", "rtol_met") if key in info}
    return float(loss_sum), to_numpy(grad_sum), int(count), accuracy


class _Activities:
    """Seconds per activity of one shard task, reported to Dask once (``report``)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def timed(self, activity: str):
        clock = _Clock()
        started = time.perf_counter()
        try:
            yield clock
        finally:
            clock.seconds = time.perf_counter() - started
            self.seconds[activity] += clock.seconds

    def report(self) -> None:
        """Hand the totals to Dask's Fine Performance Metrics (a few entries per task)."""
        for activity, seconds in self.seconds.items():
            context_meter.digest_metric(activity, seconds, "seconds")


class _Clock:
    seconds: float = 0.0


class _Minibatches:
    """This shard's local columns of each step's minibatch (global order, sorted)."""

    def __init__(self, spec: ShardSpec):
        self.spec = spec
        self._epoch = None
        self._batches: list[np.ndarray] = []

    def local_columns(self, step: int) -> np.ndarray:
        spec = self.spec
        epoch, index = divmod(step, spec.steps_per_epoch)
        if epoch != self._epoch:
            self._batches = epoch_batches(spec.S, spec.options.batch_size, spec.options.seed,
                                          epoch)
            self._epoch = epoch
        batch = self._batches[index]
        mine = np.sort(batch[(batch >= spec.lo) & (batch < spec.hi)])
        return (mine - spec.lo).astype(np.int64)


# ---- data loading, cached per worker process -------------------------------------------------

_operators: collections.OrderedDict = collections.OrderedDict()
_operators_lock = threading.Lock()


def _load_problem(spec: ShardSpec, data, operator, blocks):
    """The shard's Problem on its device: NumPy for "cpu", else CuPy on the current device
    (``shard_loop`` makes the spec's device current)."""
    if isinstance(data, ProblemFiles):
        token = data.operator_token()
        piece = data.load_shard(slice(spec.lo, spec.hi), A0=_cached(token, data.load_operator))
        # A0 as read from its file may be integer or of another precision than F: keep the
        # validated, cast operator (a raw one would fail in cupyx or be cast on every product)
        token += (str(piece.dtype),)
        host_A0 = _cached(token, lambda: piece.A0)
    elif isinstance(data, DaskShard):
        token = ("graph", spec.uid)
        host_A0 = _cached(token, lambda: _aligned(operator))
        # Chunks on the host first (CuPy-backed ones too); the piece moves to the GPU below.
        piece = data.build(host_A0, {name: None if block is None else _aligned(to_numpy(block))
                                     for name, block in blocks.items()})
    else:
        token, piece = ("graph", spec.uid), data
        host_A0 = _cached(token, lambda: _aligned(operator))
    if spec.device != "cpu":
        import cupy

        ordinal = int(cupy.cuda.Device().id)
        device_A0 = _cached(token + ("cupy", ordinal), lambda: _operator_to(host_A0, cupy))
        return _columns_to_device(piece, device_A0, cupy)
    return piece if piece.A0 is host_A0 else attach_operator(piece, host_A0)


def _columns_to_device(piece, device_A0, xp):
    """The shard's columns moved to ``xp`` with the (cached) device operator attached: A0 is
    not copied again, and A0^T and |A0|'s column sums are derived once, on the device."""
    return attach_operator(detach_operator(piece).to_device(xp), device_A0)


def _device_turn(xp):
    """Shards of one worker process compute one at a time on a GPU (each sizes its chunks
    from the whole memory budget; kernels of one device run in turn anyway); on the CPU they
    run concurrently."""
    if xp is np:
        return contextlib.nullcontext()
    return _DEVICE_LOCKS[int(xp.cuda.Device().id)]


_DEVICE_LOCKS: collections.defaultdict = collections.defaultdict(threading.Lock)


def detach_operator(piece):
    """A copy of a (host) Problem without A0, to ship a shard's columns without the operator.

    The operator travels once per worker instead (a shared Dask dependency or a file).
    """
    return piece.with_operator(None)


def attach_operator(piece, A0):
    """A copy of ``piece`` using operator ``A0`` (validated when the run was submitted)."""
    return piece.with_operator(A0, check=False)


def _aligned(A0):
    """A0 with its buffers aligned to their item size (copied only when they are not).

    Arrays unpickled from a Dask message can start at any byte; NumPy then takes other
    (unaligned) loops whose last bits differ, which would make results depend on transport.
    """
    if sp.issparse(A0):
        buffers = (A0.data, A0.indices, A0.indptr)
        if all(b.flags.aligned for b in buffers):
            return A0
        return sp.csr_matrix(tuple(np.require(b, requirements="A") for b in buffers),
                             shape=A0.shape)
    return np.require(A0, requirements="A")


def _operator_to(A0, xp):
    return sparse_to_module(A0, xp) if is_sparse(A0) else to_module(A0, xp)


def _cached(token, load):
    """Per-process cache of operators: shards of one worker share one A0 (and one load)."""
    with _operators_lock:
        if token in _operators:
            _operators.move_to_end(token)
            return _operators[token]
        value = load()  # under the lock: a second shard waits instead of loading it again
        _operators[token] = value
        while len(_operators) > _OPERATOR_CACHE_SIZE:
            _operators.popitem(last=False)
        return value


# ---- talking to the parameter server ---------------------------------------------------------

class _SharedPull:
    """The latest pull reply of one run in this worker process, shared by its shards."""

    def __init__(self):
        self.changed = threading.Condition()
        self.reply: dict | None = None
        self.in_flight = False
        self.users = 0


_pulls: dict[str, _SharedPull] = {}
_pulls_lock = threading.Lock()


class _ServerLink:
    """RPCs from a shard thread to the scheduler's parameter server, for one submission."""

    def __init__(self, worker, uid: str, token: str):
        self.worker, self.uid, self._token = worker, uid, token
        with _pulls_lock:
            self.shared = _pulls.setdefault(uid, _SharedPull())
            self.shared.users += 1

    def pull(self, want: int) -> dict:
        """{"status", "step", "theta", "error"}; theta at a step >= want unless it timed out.

        One RPC per worker process and step: shards of the same worker reuse the reply, and
        wait for a pull already in flight instead of sending their own. (A shard that needs
        an older step than the one in flight always finds it in the shared reply: whoever
        asks for step s + 1 has already seen step s.)
        """
        shared = self.shared
        with shared.changed:
            while True:
                reply = shared.reply
                if reply is not None and (reply["step"] >= want or reply["status"] != "running"):
                    return reply
                if not shared.in_flight:
                    break
                shared.changed.wait()
            shared.in_flight = True
        reply = None
        try:
            reply = sync(self.worker.loop, self.worker.scheduler.diagode_pull,
                         uid=self.uid, want=want, timeout=_PULL_TIMEOUT_S)
        finally:
            with shared.changed:
                shared.in_flight = False
                if reply is not None and (shared.reply is None or
                                          reply["step"] >= shared.reply["step"]):
                    shared.reply = reply
                shared.changed.notify_all()
        return reply

    def push(self, step: int, shard: int, loss_sum: float, grad_sum: np.ndarray, count: int,
             timings: dict) -> str:
        """Send one step's sums; returns the run's status."""
        reply = sync(self.worker.loop, self.worker.scheduler.diagode_push, uid=self.uid,
                     token=self._token, step=step, shard=shard, loss_sum=loss_sum,
                     grad_sum=ToPickle(grad_sum), count=count, timings=timings)
        return reply["status"]

    def close(self) -> None:
        with _pulls_lock:
            self.shared.users -= 1
            if self.shared.users == 0 and _pulls.get(self.uid) is self.shared:
                del _pulls[self.uid]
