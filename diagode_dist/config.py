"""The TOML run configuration of ``diagode-dist train``: parsing and validation.

A configuration names a problem stored in files, the training options and where the results go::

    [problem]            # paths are relative to this file
    A0 = "A0.npz"        # .npy (dense), .npz (scipy.sparse.save_npz) or .mtx (Matrix Market)
    F = "F.npy"          # (n, S) right-hand sides
    labels = "labels.npy"  # (S,) integer class of each column, in [0, n)
    T = 2.0              # final time
    beta = 10.0          # softmax inverse temperature
    # x0 = "x0.npy"      # optional (n, S) initial states (default zero)

    [train]
    epochs = 20
    lr = 0.05
    # optional: k = 30, batch_size = 32, weight_decay = 0.0, clamp = [-50.0, 50.0], seed = 0,
    # n_shards = <number of workers>, rtol = 1e-12, checkpoint_every = 10, step_timeout = 300.0,
    # param = "softplus" (d = -softplus(theta)) or "exp" (d = -exp(theta))

    [output]
    dir = "out"          # optional; default ./diagode-out in the current directory

    [slurm]              # optional: run on SLURM through dask_jobqueue.SLURMCluster
    jobs = 2             # number of SLURM jobs (one Dask worker process each)
    # optional: queue, walltime = "01:00:00", cores = 1, memory = "2GB", gpus_per_job = 0,
    # interface, local_directory, processes (worker processes per CPU job; default 1)

Everything is checked by :func:`load_config` before any cluster is contacted: unknown or missing
keys and wrong types raise ``ValueError``/``TypeError`` naming the key (``[train] lr``), and a
problem file that does not exist raises ``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ProblemSpec",
    "SlurmOptions",
    "TrainConfig",
    "TrainOptions",
    "check_slurm_options",
    "load_config",
    "parse_config",
]

PARAMS = ("softplus", "exp")


@dataclass(frozen=True)
class ProblemSpec:
    """A problem in files: paths of A0 (n, n), F (n, S), labels (S,) and optional x0 (n, S)."""

    A0: Path
    F: Path
    labels: Path
    T: float
    beta: float
    x0: Path | None = None

    def files(self):
        """The problem as ``diagode_dist.service.files.ProblemFiles`` (not loaded)."""
        from diagode_dist.service.files import ProblemFiles

        return ProblemFiles(self.A0, self.F, self.labels, T=self.T, beta=self.beta, x0=self.x0)


@dataclass(frozen=True)
class TrainOptions:
    """Training options, passed on to ``diagode_dist.service.client.submit``."""

    epochs: int
    lr: float
    k: int = 30
    batch_size: int = 32
    weight_decay: float = 0.0
    clamp: tuple[float, float] = (-50.0, 50.0)
    seed: int = 0
    n_shards: int | None = None  # None: one shard per worker
    rtol: float = 1e-12
    checkpoint_every: int = 10  # steps between checkpoints
    step_timeout: float = 300.0  # seconds a step may take before the run fails
    param: str = "softplus"

    def submit_options(self) -> dict[str, Any]:
        """Keyword arguments of ``submit``/``fit_distributed``; ``param`` stays its name (see
        ``param_map``) so that the options can be written to JSON."""
        options = asdict(self)
        options["clamp"] = tuple(options["clamp"])
        return options


def param_map(name: str):
    """The diagonal map object for a config's ``param`` name."""
    from diagode_dist.param import ExpParam, SoftplusParam

    return {"softplus": SoftplusParam, "exp": ExpParam}[name]()


@dataclass(frozen=True)
class SlurmOptions:
    """Options of ``diagode_dist.service.cluster.slurm_cluster`` (dask_jobqueue.SLURMCluster)."""

    jobs: int
    queue: str | None = None
    walltime: str = "01:00:00"
    cores: int = 1
    memory: str = "2GB"
    gpus_per_job: int = 0
    interface: str | None = None
    local_directory: str | None = None
    processes: int | None = None  # worker processes per CPU job (None: 1; GPU jobs: one per GPU)

    @property
    def n_workers(self) -> int:
        """Dask workers the jobs start: one per GPU on GPU jobs, else ``processes`` per job."""
        per_job = self.gpus_per_job if self.gpus_per_job > 0 else (self.processes or 1)
        return self.jobs * per_job


@dataclass(frozen=True)
class TrainConfig:
    """A validated run configuration; ``source`` is the file it came from (None if from a dict)."""

    problem: ProblemSpec
    train: TrainOptions
    output_dir: Path = Path("diagode-out")
    slurm: SlurmOptions | None = None
    source: Path | None = field(default=None, compare=False)

    def with_slurm(self, slurm: SlurmOptions | None) -> TrainConfig:
        """Copy with other SLURM options (the command line overrides the file)."""
        return replace(self, slurm=slurm)


# Per section: key -> (kind, required). Kinds are checked by _check_value.
_PROBLEM_KEYS = {
    "A0": ("path", True),
    "F": ("path", True),
    "labels": ("path", True),
    "T": ("positive_float", True),
    "beta": ("finite_float", True),
    "x0": ("path", False),
}
_TRAIN_KEYS = {
    "epochs": ("positive_int", True),
    "lr": ("positive_float", True),
    "k": ("positive_int", False),
    "batch_size": ("positive_int", False),
    "weight_decay": ("nonnegative_float", False),
    "clamp": ("interval", False),
    "seed": ("nonnegative_int", False),
    "n_shards": ("positive_int", False),
    "rtol": ("positive_float", False),
    "checkpoint_every": ("positive_int", False),
    "step_timeout": ("positive_float", False),
    "param": ("param", False),
}
_OUTPUT_KEYS = {"dir": ("str", False)}
_SLURM_KEYS = {
    "jobs": ("positive_int", True),
    "queue": ("str", False),
    "walltime": ("str", False),
    "cores": ("positive_int", False),
    "memory": ("str", False),
    "gpus_per_job": ("nonnegative_int", False),
    "interface": ("str", False),
    "local_directory": ("str", False),
    "processes": ("positive_int", False),
}
_SECTIONS = {"problem": True, "train": True, "output": False, "slurm": False}


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML configuration file; relative paths in it are relative to its folder.

    Raises FileNotFoundError (the config or a problem file is missing), ValueError (bad TOML, an
    unknown, missing or out-of-range key) or TypeError (a value of the wrong type), each naming
    the file or key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path}: invalid TOML: {err}") from None
    return parse_config(data, base_dir=path.resolve().parent, source=path)


def parse_config(
    data: dict[str, Any], base_dir: str | Path = ".", source: Path | None = None
) -> TrainConfig:
    """Validate an already parsed configuration (TOML tables as dicts); see :func:`load_config`."""
    where = f"config file {source}: " if source is not None else "config: "
    if not isinstance(data, dict):
        raise TypeError(f"{where}expected a table of sections, got {type(data).__name__}")
    _check_keys(data, _SECTIONS, where, "", section_level=True)
    sections = {name: data.get(name, {}) for name in _SECTIONS}
    for name, table in sections.items():
        if not isinstance(table, dict):
            raise TypeError(f"{where}[{name}] must be a table, got {type(table).__name__}")
    base_dir = Path(base_dir)
    problem = _section(sections["problem"], _PROBLEM_KEYS, "problem", where)
    train = _section(sections["train"], _TRAIN_KEYS, "train", where)
    output = _section(sections["output"], _OUTPUT_KEYS, "output", where)
    for key, (kind, _required) in _PROBLEM_KEYS.items():
        if kind == "path" and key in problem:
            problem[key] = _resolve(problem[key], base_dir)
    problem_spec = ProblemSpec(**problem)
    _check_files_exist(problem_spec)
    slurm = None
    if "slurm" in data:
        slurm = SlurmOptions(**_section(sections["slurm"], _SLURM_KEYS, "slurm", where))
    output_dir = _resolve(output["dir"], base_dir) if "dir" in output else Path("diagode-out")
    return TrainConfig(
        problem=problem_spec,
        train=TrainOptions(**train),
        output_dir=output_dir,
        slurm=slurm,
        source=source,
    )


def check_slurm_options(options: dict[str, Any], where: str = "") -> SlurmOptions:
    """Validate SLURM options given as a dict (for example from command-line flags)."""
    clean = {key: value for key, value in options.items() if value is not None}
    return SlurmOptions(**_section(clean, _SLURM_KEYS, "slurm", where))


def _section(
    table: dict[str, Any], spec: dict[str, tuple[str, bool]], name: str, where: str
) -> dict[str, Any]:
    """Check one section's keys and values; return {key: cleaned value} for the keys present."""
    _check_keys(table, spec, where, name)
    return {
        key: _check_value(value, spec[key][0], f"{where}[{name}] {key}")
        for key, value in table.items()
    }


def _check_keys(
    table: dict[str, Any],
    spec: dict[str, Any],
    where: str,
    name: str,
    section_level: bool = False,
) -> None:
    label = "section" if section_level else "key"
    prefix = "" if section_level else f"[{name}] "
    unknown = sorted(set(table) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec))
        raise ValueError(f"{where}unknown {label} {prefix}{unknown[0]!s} (allowed: {allowed})")
    for key, entry in spec.items():
        required = entry if section_level else entry[1]
        if required and key not in table:
            missing = f"[{key}]" if section_level else f"{prefix}{key}"
            raise ValueError(f"{where}missing required {label} {missing}")


def _check_value(value: Any, kind: str, name: str) -> Any:
    """Return the value cleaned for its kind, or raise TypeError/ValueError naming it."""
    if kind in ("path", "str", "param"):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        if kind == "param" and value not in PARAMS:
            raise ValueError(f"{name} must be one of {', '.join(PARAMS)}, got {value!r}")
        if not value:
            raise ValueError(f"{name} must not be empty")
        return value
    if kind.endswith("_int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        low = 1 if kind == "positive_int" else 0
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
        return value
    if kind.endswith("_float"):
        number = _as_float(value, name)
        if kind == "positive_float" and not number > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        if kind == "nonnegative_float" and not number >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return number
    if kind == "interval":
        if not isinstance(value, list) or len(value) != 2:
            raise TypeError(f"{name} must be a list [low, high], got {value!r}")
        low, high = (_as_float(item, name) for item in value)
        if not low < high:
            raise ValueError(f"{name} must have low < high, got {value!r}")
        return (low, high)
    raise AssertionError(f"unknown kind {kind}")  # a bug in the tables above


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    return number


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _check_files_exist(problem: ProblemSpec) -> None:
    for key in ("A0", "F", "labels", "x0"):
        path = getattr(problem, key)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"[problem] {key}: file not found: {path}")
