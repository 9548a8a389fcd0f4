"""Probes of the GPU acceptance check: the figures a first GPU run must produce, as JSON.

    python -m benchmarks.gpu_probes detect       # "GPU: ..." (exit 0) or "no GPU: ..." (exit 1)
    python -m benchmarks.gpu_probes run --json FILE [--device cpu] [--small] [--probes a,b]
    python -m benchmarks.gpu_probes report DIR   # DIR/report.json and DIR/report.md

``run`` executes the probes (all by default) and merges their results into FILE:

- ``env``: versions (CuPy, Dask, dask-cuda, RMM, torch, ...), the device and its memory,
  ``cupy.show_config()``;
- ``cgs2_step``: one CGS2 step (``krylov._cgs2``) at a basis of (m, c, N) = (16, 16, 1e6): its
  time, achieved bandwidth against the byte model of ``roofline.cgs2_step_bytes``, and its
  peak working memory beyond its inputs. Without copies of the basis that peak is a few
  state-sized vectors (c N each); a contiguous copy of the transposed basis adds m c N;
- ``chunk``: the default chunk size and memory budget before and after one ``loss_and_grad``
  at n = 1e6 (stable chunks keep repeated calls bit for bit), and whether two calls agree;
- ``mse_obs``: MSE with 40 observation times at n = 2.5e5: the peak memory held against the
  bases the marching counted (and the bytes those bases really own);
- ``large_solve``: the Padé solve at Krylov dimension 300 (a stack of 301-square matrices):
  one batched LU against CuPy's own ``linalg.solve`` (a host loop above 256);
- ``demo``: the demo problem trained on a one-worker ``local_cluster(gpu=True)``
  (LocalCUDACluster), compared with ``dd.fit`` on the CPU, with the device each shard
  reported.

Peak memory is measured with a CuPy memory hook on the device (bytes handed out by the pool)
and with ``tracemalloc`` on the CPU (NumPy reports its buffers to it). ``--device cpu --small``
runs every probe on NumPy at small sizes: a check of the probes themselves without a GPU.
Each probe reports ``{"status": "ok" | "failed" | "skipped", ...}``; one failing probe does not
stop the others.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .roofline import cgs2_step_bytes, gpu_unavailable

__all__ = ["PROBES", "PeakMemory", "detect", "run_probes", "write_report"]

VERSIONED = ("diagode-dist", "numpy", "scipy", "cupy", "cupy-cuda13x", "cupy-cuda12x", "dask",
             "distributed", "dask-cuda", "rmm", "rmm-cu12", "rmm-cu13", "torch", "torchdiffeq")

# Sizes: (full on a GPU, small for --small)
CGS2_SHAPE = {False: (16, 16, 1_000_000), True: (16, 4, 20_000)}  # (m, c, N)
CHUNK_GRID = {False: 1000, True: 64}  # grid side: n = side^2
CHUNK_COLUMNS = {False: 64, True: 8}
MSE_GRID = {False: 500, True: 40}
MSE_COLUMNS = {False: 8, True: 4}
MSE_TIMES = 40
LARGE_SOLVE = {False: (32, 301), True: (4, 301)}  # (c, s): Krylov dimension 300, augmented
K = 30


# ---- helpers ----------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _xp(device: str):
    if device == "cpu":
        return np
    import cupy

    return cupy


def _sync(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


class PeakMemory:
    """Peak bytes allocated inside a ``with`` block beyond those held when it began.

    On CuPy: a memory hook on the default pool (bytes the pool hands out, rounded to its
    blocks). On NumPy: ``tracemalloc``'s traced peak (NumPy reports its buffers to it).
    ``peak`` holds the result after the block.
    """

    def __init__(self, xp) -> None:
        self.xp = xp
        self.peak = 0
        self._hook = None

    def __enter__(self) -> PeakMemory:
        if self.xp is np:
            tracemalloc.start()
            tracemalloc.reset_peak()
            self._base = tracemalloc.get_traced_memory()[0]
            return self
        _sync(self.xp)
        self._hook = _cupy_peak_hook(self.xp)
        self._hook.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.xp is np:
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            self.peak = max(0, peak - self._base)
            return
        _sync(self.xp)
        self._hook.__exit__(*exc)
        self.peak = self._hook.peak


def _cupy_peak_hook(cp):
    """A CuPy MemoryHook counting bytes in use from its start (pool malloc minus free)."""

    class _PeakHook(cp.cuda.MemoryHook):
        name = "diagode_peak"

        def __init__(self) -> None:
            self.current = 0
            self.peak = 0

        def malloc_postprocess(self, device_id=None, size=None, mem_size=0, mem_ptr=None,
                               pmem_id=None, **_: Any) -> None:
            self.current += int(mem_size)
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, device_id=None, mem_size=0, mem_ptr=None, pmem_id=None,
                             **_: Any) -> None:
            self.current -= int(mem_size)

    return _PeakHook()


def _pool_bytes(xp) -> dict[str, int] | None:
    if xp is np:
        return None
    pool = xp.get_default_memory_pool()
    return {"used": int(pool.used_bytes()), "held": int(pool.total_bytes())}


def _free_pool(xp) -> None:
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()


def _grid_problem(xp, side: int, S: int, **problem_kw):
    """``cases.grid_arrays`` on the device as a Problem, and theta."""
    import diagode_dist as dd

    from .cases import grid_arrays

    a = grid_arrays(side, S)
    if xp is np:
        A0, F, theta = a["A0"], a["F"], a["theta"]
    else:
        import cupyx.scipy.sparse as cusp

        A0, F, theta = cusp.csr_matrix(a["A0"]), xp.asarray(a["F"]), xp.asarray(a["theta"])
    labels = None if problem_kw.get("loss") == "mse" else a["labels"]
    return dd.Problem(A0, F, labels, T=a["T"], beta=a["beta"], **problem_kw), theta


# ---- the probes -------------------------------------------------------------------------------


def probe_env(device: str, small: bool) -> dict[str, Any]:
    """Python, library versions, the device and ``cupy.show_config()``."""
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": {name: v for name in VERSIONED if (v := _version(name)) is not None},
        "device": device,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if device == "cpu":
        out["gpu"] = None
        out["no_gpu_reason"] = gpu_unavailable()
        return out
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    free, total = cupy.cuda.runtime.memGetInfo()
    out["gpu"] = {"name": name.decode() if isinstance(name, bytes) else str(name),
                  "count": int(cupy.cuda.runtime.getDeviceCount()),
                  "memory_total": int(total), "memory_free": int(free),
                  "compute_capability": f"{props['major']}.{props['minor']}",
                  "runtime": int(cupy.cuda.runtime.runtimeGetVersion()),
                  "driver": int(cupy.cuda.runtime.driverGetVersion())}
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        cupy.show_config()
    out["show_config"] = text.getvalue()
    return out


def probe_cgs2_step(device: str, small: bool) -> dict[str, Any]:
    """One CGS2 step against m basis vectors: time, bandwidth, peak memory beyond inputs."""
    from diagode_dist import krylov

    xp = _xp(device)
    m, c, N = CGS2_SHAPE[small]
    rng = np.random.default_rng(0)
    basis = xp.asarray(rng.standard_normal((m, c, N)))
    w = xp.asarray(rng.standard_normal((c, N)))
    krylov._cgs2(basis, w)  # warm-up (kernels compiled, pool blocks made)
    _sync(xp)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        krylov._cgs2(basis, w)
        _sync(xp)
        times.append(time.perf_counter() - start)
    _free_pool(xp)
    with PeakMemory(xp) as meter:
        krylov._cgs2(basis, w)
    best = min(times)
    model = cgs2_step_bytes(c, N, m)
    vector = 8 * c * N
    return {
        "basis_shape": [m, c, N], "basis_bytes": int(basis.nbytes), "seconds_best": best,
        "seconds_median": sorted(times)[len(times) // 2], "model_bytes": model,
        "achieved_GBps": model / best / 1e9, "peak_extra_bytes": int(meter.peak),
        "peak_extra_in_state_vectors": meter.peak / vector,
        "basis_copy_suspected": bool(meter.peak >= 0.9 * m * vector),
        "note": "peak_extra counts bytes allocated during the step beyond basis and w; "
                "a copy of the transposed basis would add m c N (m state vectors)",
    }


def probe_chunk(device: str, small: bool) -> dict[str, Any]:
    """Default chunk size and budget before and after one loss_and_grad; repeat bit for bit."""
    import diagode_dist as dd
    from diagode_dist import adjoint

    xp = _xp(device)
    side, S = CHUNK_GRID[small], CHUNK_COLUMNS[small]
    prob, theta = _grid_problem(xp, side, S)
    _free_pool(xp)

    def state() -> dict[str, Any]:
        available = (None if xp is np else int(adjoint._device_available_bytes(xp)))
        return {"chunk_columns": int(adjoint._default_chunk(prob, K)),
                "memory_budget": int(adjoint.memory_budget(xp)), "pool": _pool_bytes(xp),
                "available_free_plus_pool": available}

    before = state()
    start = time.perf_counter()
    loss1, grad1 = dd.loss_and_grad(prob, theta, k=K)
    _sync(xp)
    first = time.perf_counter() - start
    after = state()
    start = time.perf_counter()
    loss2, grad2 = dd.loss_and_grad(prob, theta, k=K)
    _sync(xp)
    second = time.perf_counter() - start
    same = loss1 == loss2 and bool((grad1 == grad2).all())
    return {"n": prob.n, "S": S, "k": K, "before": before, "after_one_call": after,
            "chunk_stable": before["chunk_columns"] == after["chunk_columns"],
            "two_calls_bit_for_bit": same, "seconds_first": first, "seconds_second": second}


def probe_mse_obs(device: str, small: bool) -> dict[str, Any]:
    """MSE at 40 observation times: peak memory against the bases the marching counted."""
    import diagode_dist as dd
    from diagode_dist import _march, adjoint

    xp = _xp(device)
    side, S = MSE_GRID[small], MSE_COLUMNS[small]
    n = side * side
    rng = np.random.default_rng(1)
    obs_times = np.linspace(2.0 / MSE_TIMES, 2.0, MSE_TIMES)
    targets = xp.asarray(rng.standard_normal((MSE_TIMES, n, S)))
    prob, theta = _grid_problem(xp, side, S, obs_times=obs_times, targets=targets, loss="mse")

    seen: dict[str, Any] = {}
    original = adjoint.march_forward

    def recording(*args: Any, **kwargs: Any):
        result = original(*args, **kwargs)
        with contextlib.suppress(Exception):  # the accounting below is best effort
            seen.update(_kept_bytes(result))
        return result

    _free_pool(xp)
    adjoint.march_forward = recording
    try:
        with PeakMemory(xp) as meter:
            start = time.perf_counter()
            loss, _grad = dd.loss_and_grad(prob, theta, k=K, max_chunk_columns=S)
            _sync(xp)
            seconds = time.perf_counter() - start
    finally:
        adjoint.march_forward = original
    out: dict[str, Any] = {
        "n": n, "S": S, "k": K, "obs_times": MSE_TIMES, "loss": float(loss),
        "seconds": seconds, "peak_bytes": int(meter.peak),
        "predicted_chunk_bytes": int(adjoint.predict_chunk_bytes(n, S, K,
                                                                 observations=MSE_TIMES)),
        "targets_bytes": int(targets.nbytes), **seen,
    }
    counted = out.get("kept_bytes_counted")
    if counted:
        out["peak_over_counted_plus_chunk"] = meter.peak / (counted
                                                            + out["predicted_chunk_bytes"])
    out["march_module"] = _march.__name__
    return out


def _kept_bytes(result: Any) -> dict[str, Any]:
    """From march_forward's (states, intervals, acc): the bases kept as the march counts them
    (``projection_bytes``) and the bytes they own (their underlying buffers, each once), plus
    the per-interval start arrays."""
    from diagode_dist._march import projection_bytes

    intervals = result[1]
    counted, owned, starts, kept = 0, {}, {}, 0
    for interval in intervals:
        proj = getattr(interval, "projection", None)
        start = getattr(interval, "start", None)
        if start is not None and hasattr(start, "nbytes"):
            starts[id(start)] = int(start.nbytes)
        if proj is None:
            continue
        kept += 1
        basis = proj.basis
        counted += int(projection_bytes(proj))
        buffer = basis.base if getattr(basis, "base", None) is not None else basis
        owned[id(buffer)] = int(buffer.nbytes)
    return {"intervals": len(intervals), "intervals_kept": kept,
            "kept_bytes_counted": counted, "kept_bytes_owned": sum(owned.values()),
            "start_bytes": sum(starts.values())}


def probe_demo(device: str, small: bool) -> dict[str, Any]:
    """The demo problem on a one-worker local cluster (LocalCUDACluster on a GPU) vs dd.fit."""
    from distributed import Client

    import diagode_dist as dd
    from diagode_dist.service import submit
    from diagode_dist.service.cluster import local_cluster

    prob = dd.demo_problem(n=64 if small else 256, S=16 if small else 64)
    options = dict(epochs=3, lr=0.05, batch_size=16, seed=0)
    start = time.perf_counter()
    with local_cluster(n_workers=1, gpu=device != "cpu") as cluster, Client(cluster) as client:
        kind = type(cluster).__name__
        started = time.perf_counter() - start
        run = submit(client, prob, np.zeros(prob.n), n_shards=1, **options)
        theta, history = run.wait(timeout=300)
        devices = [t.get("device") for t in run.status()["shard_timings"]]
    seconds = time.perf_counter() - start
    theta_ref, history_ref = dd.fit(prob, np.zeros(prob.n), **options)
    difference = float(np.linalg.norm(np.asarray(theta) - theta_ref)
                       / max(np.linalg.norm(theta_ref), 1e-300))
    return {"cluster": kind, "shard_devices": devices, "n": prob.n, "S": prob.S, **options,
            "seconds_total": seconds,
            "seconds_cluster_start": started, "final_loss": float(history[-1]),
            "final_loss_fit": float(history_ref[-1]), "theta_rel_diff_vs_fit": difference}


def probe_large_solve(device: str, small: bool) -> dict[str, Any]:
    """The Padé solve of a stack of Krylov dimension 300 (above CuPy's batched-LU limit of
    256): one batched LU (``_array.solve_stack``) against the module's own ``linalg.solve``
    (a host loop over the stack on CuPy there)."""
    from diagode_dist._array import solve_stack

    xp = _xp(device)
    c, s = LARGE_SOLVE[small]
    rng = np.random.default_rng(2)
    a = xp.asarray(rng.standard_normal((c, s, s)) + s ** 0.5 * 3 * np.eye(s))
    b = xp.asarray(rng.standard_normal((c, s, s)))
    out: dict[str, Any] = {"stack": [c, s, s]}
    for name, solve in (("solve_stack", solve_stack), ("module_solve", xp.linalg.solve)):
        solve(a, b)  # warm-up
        _sync(xp)
        start = time.perf_counter()
        x = solve(a, b)
        _sync(xp)
        out[f"seconds_{name}"] = time.perf_counter() - start
        out[f"residual_{name}"] = float(xp.abs(a @ x - b).max())
    return out


PROBES: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "env": probe_env, "cgs2_step": probe_cgs2_step, "chunk": probe_chunk,
    "mse_obs": probe_mse_obs, "large_solve": probe_large_solve, "demo": probe_demo,
}


def detect() -> tuple[bool, str]:
    """(True, "GPU: name, memory") or (False, "no GPU: reason")."""
    reason = gpu_unavailable()
    if reason:
        return False, f"no GPU: {reason}"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    total = cupy.cuda.runtime.memGetInfo()[1]
    return True, f"GPU: {name}, {total / 2**30:.0f} GiB"


def run_probes(names: list[str], device: str, small: bool,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the named probes; each result carries status, seconds and, on failure, the error."""
    results: dict[str, Any] = {}
    for name in names:
        log(f"[probe] {name} ...")
        start = time.perf_counter()
        try:
            result = {"status": "ok", **PROBES[name](device, small)}
        except Exception as exc:  # a failing probe is a result to report
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["probe_seconds"] = round(time.perf_counter() - start, 3)
        log(f"[probe] {name}: {result['status']} ({result['probe_seconds']:.1f} s)")
        if result["status"] == "failed":
            log(result["traceback"])
        results[name] = result
    return results


# ---- the report -------------------------------------------------------------------------------


def _read_steps(path: Path) -> list[dict[str, Any]]:
    """steps.tsv lines: name, status (exit code or 'skipped: ...'), seconds."""
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, seconds = (line.split("\t") + ["", ""])[:3]
            steps.append({"name": name, "status": status,
                          "seconds": float(seconds) if seconds else None})
    return steps


def _junit_summary(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    summary = {key: sum(int(s.get(key, 0)) for s in suites)
               for key in ("tests", "failures", "errors", "skipped")}
    summary["seconds"] = sum(float(s.get("time", 0)) for s in suites)
    reasons = sorted({(case.find("skipped").get("message") or "")[:160]
                      for case in root.iter("testcase") if case.find("skipped") is not None})
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    summary["skip_reasons"] = reasons
    summary["failed"] = failed
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def write_report(directory: Path) -> dict[str, Any]:
    """Gather the check's files in ``directory`` into report.json and report.md."""
    probes_file = directory / "probes.json"
    probes = json.loads(probes_file.read_text()) if probes_file.exists() else {}
    roofline_file = directory / "roofline.md"
    meta_file = directory / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    report = {
        **meta,
        "steps": _read_steps(directory / "steps.tsv"),
        "pytest_gpu": _junit_summary(directory / "pytest-gpu.xml"),
        "probes": probes,
        "roofline_markdown": roofline_file.read_text() if roofline_file.exists() else None,
    }
    passed = bool(report["steps"]) and all(step["status"] == "0" or
                                           step["status"].startswith("skipped")
                                           for step in report["steps"])
    mode = str(report.get("mode", ""))
    report["ok"] = passed and mode != "no GPU"
    report["verdict"] = ("NO GPU: nothing was checked" if mode == "no GPU"
                         else ("passed" if passed else "FAILED (see the steps)")
                         + (" -- a dry run on the CPU, not a GPU check"
                            if mode.startswith("dry run") else ""))
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (directory / "report.md").write_text(_markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# diagode-dist GPU acceptance check", "", f"**{report['verdict']}**", ""]
    lines.append(f"- started: {report.get('started', '?')}; mode: {report.get('mode', '?')}; "
                 f"total {report.get('total_seconds', '?')} s")
    lines.append(f"- GPU: {report.get('gpu', '?')}")
    env = report["probes"].get("env", {})
    if env.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    lines += ["", "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    for step in report["steps"]:
        status = {"0": "ok", "124": "timed out", "137": "timed out (killed)"}.get(
            step["status"], step["status"] if step["status"].startswith("skipped")
            else f"failed (exit {step['status']})")
        lines.append(f"| {step['name']} | {status} | {_fmt(step['seconds'])} |")
    summary = report.get("pytest_gpu")
    if summary:
        lines += ["", "## pytest -m gpu", "",
                  f"{summary['tests']} tests, {summary['failures']} failures, "
                  f"{summary['errors']} errors, {summary['skipped']} skipped "
                  f"({summary['seconds']:.1f} s)"]
        lines += [f"- failed: {name}" for name in summary["failed"]]
        lines += [f"- skipped: {reason}" for reason in summary["skip_reasons"]]
    lines += ["", "## Probes", ""]
    for name, result in report["probes"].items():
        if name == "env":
            continue
        lines.append(f"### {name}: {result.get('status')}")
        lines.append("")
        for key, value in result.items():
            if key in ("status", "traceback"):
                continue
            lines.append(f"- {key}: {_fmt(value)}")
        lines.append("")
    if report.get("roofline_markdown"):
        lines += ["## Roofline benchmark", "", report["roofline_markdown"].strip(), ""]
    if env.get("show_config"):
        lines += ["## cupy.show_config()", "", "```", env["show_config"].rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


# ---- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_probes",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("detect", help="print 'GPU: ...' (exit 0) or 'no GPU: ...' (exit 1)")
    run = commands.add_parser("run", help="run probes, merge their results into a JSON file")
    run.add_argument("--json", type=Path, required=True)
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                     help="auto: the GPU when one is usable, else the CPU")
    run.add_argument("--small", action="store_true", help="small sizes (a CPU check)")
    run.add_argument("--probes", default=",".join(PROBES),
                     help=f"comma-separated, from {','.join(PROBES)} (default: all)")
    report = commands.add_parser("report", help="write DIR/report.json and DIR/report.md")
    report.add_argument("directory", type=Path)
    args = parser.parse_args(argv)

    if args.command == "detect":
        found, text = detect()
        print(text)
        return 0 if found else 1
    if args.command == "report":
        result = write_report(args.directory)
        print((args.directory / "report.md").read_text())
        return 0 if result["ok"] else 1
    names = [name.strip() for name in args.probes.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROBES]
    if unknown:
        parser.error(f"unknown probe(s) {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    device = args.device
    if device == "auto":
        device = "cpu" if gpu_unavailable() else "cuda"
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results.update(run_probes(names, device, args.small,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True)))
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if all(results[name]["status"] == "ok" for name in names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
