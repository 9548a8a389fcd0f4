"""The TOML run configuration of ``diagode-dist train``: parsing and validation.

A configuration names a problem stored in files, the training options and where the results go::

    [problem]            # paths are relative to this file
    A0 = "A0.npz"        # .npy (dense), .npz (scipy.sparse.save_npz) or .mtx (Matrix Market)
    F = "F.npy"          # (n, S) right-hand sides: .npy, or .zarr (chunked by columns)
    labels = "labels.npy"  # (S,) integer class of each column, in [0, n) (.npy or .zarr)
    T = 2.0              # final time
    beta = 10.0          # softmax inverse temperature (classification; default 10)
    # x0 = "x0.npy"      # optional (n, S) initial states (default zero; .npy or .zarr)
    # loss = "mse"       # instead of labels: observed states at observation times
    # obs_times = [1.0, 2.0]   # increasing, in (0, T]
    # targets = "targets.npy"  # (m, n, S) observed states, m = len(obs_times)

    [param]              # optional: the operator parametrisation (default: [train] param)
    kind = "generator"   # "softplus" | "exp" (diagonal), "edge" | "generator" (on a pattern)
    pattern = "P.npz"    # edge/generator: n x n pattern (.npz sparse: its stored entries;
                         # .npy dense 0/1 mask); one theta per entry, in CSR order
    transform = "softplus"  # edge/generator weights: "identity" | "softplus" | "exp"
    # diagonal = "softplus" # also train the diagonal: Stack(diagonal, pattern), theta = [d, w]

    [train]              # any field of diagode_dist.options.TrainOptions; the rest default
    epochs = 20
    lr = 0.05
    # k = 30, batch_size = 32, weight_decay = 0.0, clamp = [-50.0, 50.0], seed = 0,
    # rtol = 1e-12, max_chunk_columns, log_every = 0, n_shards = <number of workers>,
    # checkpoint_every = 10, step_timeout = 300.0,
    # param = "softplus" (d = -softplus(theta)) or "exp" (d = -exp(theta)),
    # method = "polynomial" | "rational" (shift-and-invert: stiff, sparse A0) | "auto"

    [output]
    dir = "out"          # optional; default ./diagode-out in the current directory

    [slurm]              # optional: run on SLURM through dask_jobqueue.SLURMCluster
    jobs = 2             # number of SLURM jobs (one Dask worker process each)
    # optional: queue, walltime = "01:00:00", cores = 1, memory = "2GB", gpus_per_job = 0,
    # interface, local_directory, processes (worker processes per CPU job; default 1)

Everything is checked by :func:`load_config` before any cluster is contacted: unknown or missing
keys, wrong types and values out of range raise ``ValueError``/``TypeError`` naming the key
(``[train] lr``); the ``[train]`` keys and their checks are ``TrainOptions``'s own. A problem
file that does not exist raises ``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from diagode_dist.files import ProblemFiles
from diagode_dist.options import PARAMS, TrainOptions, option_fields
from diagode_dist.param import TRANSFORMS

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ParamSpec",
    "ProblemSpec",
    "SlurmOptions",
    "TrainConfig",
    "TrainOptions",
    "check_slurm_options",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True)
class ProblemSpec:
    """A problem in files: paths of A0 (n, n), F (n, S), labels (S,) and optional x0 (n, S);
    or, with ``loss="mse"``, obs_times and the path of targets (m, n, S) instead of labels."""

    A0: Path
    F: Path
    T: float
    labels: Path | None = None
    beta: float = 10.0
    x0: Path | None = None
    loss: str | None = None
    obs_times: tuple[float, ...] | None = None
    targets: Path | None = None

    def files(self) -> ProblemFiles:
        """The problem as ``ProblemFiles`` (nothing read yet)."""
        return ProblemFiles(self.A0, self.F, self.labels, T=self.T, beta=self.beta, x0=self.x0,
                            loss=self.loss, obs_times=self.obs_times, targets=self.targets)


@dataclass(frozen=True)
class ParamSpec:
    """The [param] section: an operator parametrisation (see ``diagode_dist.param``)."""

    kind: str
    pattern: Path | None = None
    transform: str = "identity"
    diagonal: str | None = None

    def build(self):
        """The parametrisation object (reads the pattern file)."""
        from diagode_dist.param import EdgeParam, GeneratorParam, Stack

        if self.kind in PARAMS:
            return PARAMS[self.kind]()
        made = {"edge": EdgeParam, "generator": GeneratorParam}[self.kind](
            _read_pattern(self.pattern), self.transform)
        return made if self.diagonal is None else Stack(PARAMS[self.diagonal](), made)

    def describe(self) -> dict[str, Any]:
        """Plain values, for summaries."""
        return {"kind": self.kind, "pattern": None if self.pattern is None else str(self.pattern),
                "transform": self.transform if self.pattern is not None else None,
                "diagonal": self.diagonal}


def _read_pattern(path: Path):
    import numpy as np
    import scipy.sparse as sp

    if path.suffix.lower() == ".npz":
        try:
            return sp.load_npz(path)
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"[param] pattern: {path} is not a scipy.sparse.save_npz file "
                             f"({err})") from None
    return np.load(path, allow_pickle=False)


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
    param: ParamSpec | None = None

    def with_slurm(self, slurm: SlurmOptions | None) -> TrainConfig:
        """Copy with other SLURM options (the command line overrides the file)."""
        return replace(self, slurm=slurm)


# Per section: key -> (kind, required). Kinds are checked by _check_value.
_PROBLEM_KEYS = {
    "A0": ("path", True),
    "F": ("path", True),
    "labels": ("path", False),  # required by the classification loss
    "T": ("positive_float", True),
    "beta": ("finite_float", False),
    "x0": ("path", False),
    "loss": ("loss", False),
    "obs_times": ("times", False),
    "targets": ("path", False),
}
_PARAM_KEYS = {
    "kind": ("param_kind", True),
    "pattern": ("path", False),
    "transform": ("transform", False),
    "diagonal": ("diagonal", False),
}
_TRAIN_KEYS = {spec.name: ("option", False) for spec in option_fields()}  # TrainOptions
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
_SECTIONS = {"problem": True, "train": False, "output": False, "slurm": False, "param": False}


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
    output = _section(sections["output"], _OUTPUT_KEYS, "output", where)
    for key, (kind, _required) in _PROBLEM_KEYS.items():
        if kind == "path" and key in problem:
            problem[key] = _resolve(problem[key], base_dir)
    if problem.get("loss") == "classification":
        problem["loss"] = None  # ProblemFiles' name of the default loss
    _check_loss_keys(problem, where)
    try:
        problem_spec = ProblemSpec(**problem)
        problem_spec.files().check_exist()
    except (OSError, ValueError, TypeError) as err:
        raise type(err)(f"{where}[problem] {err}") from None
    param = _param_spec(sections["param"], base_dir, where) if "param" in data else None
    train = _train_options(sections["train"], where)
    if param is not None and "param" in sections["train"]:
        raise ValueError(f"{where}[train] param and a [param] section: give one of them")
    slurm = None
    if "slurm" in data:
        slurm = SlurmOptions(**_section(sections["slurm"], _SLURM_KEYS, "slurm", where))
    output_dir = _resolve(output["dir"], base_dir) if "dir" in output else Path("diagode-out")
    return TrainConfig(
        problem=problem_spec,
        train=train,
        output_dir=output_dir,
        slurm=slurm,
        source=source,
        param=param,
    )


def _check_loss_keys(problem: dict[str, Any], where: str) -> None:
    """labels for the classification loss; obs_times and targets (no labels) for "mse"."""
    mse = problem.get("loss") == "mse"
    loss = 'loss = "mse"' if mse else "the classification loss"
    for key in ("obs_times", "targets") if mse else ("labels",):
        if key not in problem:
            raise ValueError(f"{where}missing required key [problem] {key} (for {loss})")
    for key in ("labels",) if mse else ("obs_times", "targets"):
        if key in problem:
            raise ValueError(f"{where}[problem] {key} does not go with {loss}")


def _param_spec(table: dict[str, Any], base_dir: Path, where: str) -> ParamSpec:
    """The [param] section, checked (the pattern file must exist; it is read by ``build``)."""
    values = _section(table, _PARAM_KEYS, "param", where)
    kind = values["kind"]
    if kind in PARAMS:
        extra = sorted(set(values) - {"kind"})
        if extra:
            raise ValueError(f"{where}[param] {extra[0]} is for kind = \"edge\" or "
                             f"\"generator\", not {kind!r}")
        return ParamSpec(kind)
    if "pattern" not in values:
        raise ValueError(f"{where}missing required key [param] pattern (kind = {kind!r})")
    pattern = _resolve(values["pattern"], base_dir)
    if pattern.suffix.lower() not in (".npz", ".npy"):
        raise ValueError(f"{where}[param] pattern: {pattern} must end in .npz / .npy")
    if not pattern.is_file():
        raise FileNotFoundError(f"{where}[param] pattern: no such file: {pattern}")
    return ParamSpec(kind, pattern, values.get("transform", "identity"), values.get("diagonal"))


def check_slurm_options(options: dict[str, Any], where: str = "") -> SlurmOptions:
    """Validate SLURM options given as a dict (for example from command-line flags)."""
    clean = {key: value for key, value in options.items() if value is not None}
    return SlurmOptions(**_section(clean, _SLURM_KEYS, "slurm", where))


def _train_options(table: dict[str, Any], where: str) -> TrainOptions:
    """The [train] table as TrainOptions: its keys are the fields, its checks the dataclass's."""
    _check_keys(table, _TRAIN_KEYS, where, "train")
    try:
        return TrainOptions(**table)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}[train] {err}") from None


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
    if kind in ("path", "str"):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
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
    if kind in _CHOICES:
        if value not in _CHOICES[kind]:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, _CHOICES[kind]))}, "
                             f"got {value!r}")
        return value
    if kind == "times":
        if not isinstance(value, list) or not value:
            raise TypeError(f"{name} must be a non-empty list of numbers, got {value!r}")
        return tuple(_as_float(item, name) for item in value)
    raise AssertionError(f"unknown kind {kind}")  # a bug in the tables above


_CHOICES = {"loss": ("classification", "mse"), "param_kind": (*PARAMS, "edge", "generator"),
            "transform": TRANSFORMS, "diagonal": tuple(PARAMS)}


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
