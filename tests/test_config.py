"""Parsing and validation of the TOML run configuration (diagode_dist.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diagode_dist.config import (
    ProblemSpec,
    SlurmOptions,
    TrainOptions,
    check_slurm_options,
    load_config,
    parse_config,
)

LR = "lr = 0.05"
MINIMAL = """
[problem]
A0 = "A0.npy"
F = "data/F.npy"
labels = "labels.npy"
T = 2
beta = 10.0

[train]
epochs = 3
lr = 0.05
"""


@pytest.fixture
def problem_dir(tmp_path: Path) -> Path:
    """A folder with empty problem files: load_config only checks that they exist."""
    (tmp_path / "data").mkdir()
    for name in ("A0.npy", "data/F.npy", "labels.npy", "x0.npy"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def _write(folder: Path, text: str, name: str = "run.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_minimal_config_resolves_paths_against_config_folder_and_fills_defaults(problem_dir):
    config = load_config(_write(problem_dir, MINIMAL))
    assert config.problem == ProblemSpec(
        A0=problem_dir / "A0.npy",
        F=problem_dir / "data" / "F.npy",
        labels=problem_dir / "labels.npy",
        T=2.0,
        beta=10.0,
    )
    assert isinstance(config.problem.T, float)
    assert config.train == TrainOptions(epochs=3, lr=0.05)
    assert config.train.n_shards is None and config.train.clamp == (-50.0, 50.0)
    assert config.output_dir == Path("diagode-out")
    assert config.slurm is None
    assert config.source == problem_dir / "run.toml"


def test_config_loaded_from_another_working_directory(problem_dir, tmp_path_factory, monkeypatch):
    config_path = _write(problem_dir, MINIMAL + '\n[output]\ndir = "results"\n')
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(config_path)
    assert config.problem.A0 == problem_dir / "A0.npy"
    assert config.output_dir == problem_dir / "results"


def test_full_config(problem_dir):
    text = MINIMAL.replace("[train]", 'x0 = "x0.npy"\n\n[train]') + """
k = 12
batch_size = 8
weight_decay = 1e-4
clamp = [-5, 5.5]
seed = 3
n_shards = 4
rtol = 1e-10
checkpoint_every = 2
step_timeout = 30
param = "exp"

[output]
dir = "/tmp/abs-out"

[slurm]
jobs = 2
queue = "gpu"
walltime = "00:30:00"
cores = 4
memory = "8GB"
gpus_per_job = 1
interface = "ib0"
"""
    config = load_config(_write(problem_dir, text))
    assert config.problem.x0 == problem_dir / "x0.npy"
    assert config.train == TrainOptions(
        epochs=3, lr=0.05, k=12, batch_size=8, weight_decay=1e-4, clamp=(-5.0, 5.5), seed=3,
        n_shards=4, rtol=1e-10, checkpoint_every=2, step_timeout=30.0, param="exp",
    )
    assert config.output_dir == Path("/tmp/abs-out")
    assert config.slurm == SlurmOptions(
        jobs=2, queue="gpu", walltime="00:30:00", cores=4, memory="8GB", gpus_per_job=1,
        interface="ib0",
    )


@pytest.mark.parametrize(
    ("edit", "error", "words"),
    [
        (("[train]", "[train]\nlearn_rate = 1"), ValueError, "unknown key [train] learn_rate"),
        (("[train]", "[trian]\nx = 1\n[train]"), ValueError, "unknown section trian"),
        (("epochs = 3", "rtol = 5.0"), ValueError, "[train] rtol must be a number in (0, 1)"),
        (("epochs = 3", "log_every = -1"), ValueError, "[train] log_every must be >= 0"),
        (("epochs = 3", "n_shards = 0"), ValueError, "[train] n_shards must be >= 1"),
        (('labels = "labels.npy"\n', ""), ValueError, "missing required key [problem] labels"),
        (("T = 2\n", ""), ValueError, "[problem] T"),
        (("epochs = 3", 'epochs = "3"'), TypeError, "[train] epochs must be an integer"),
        (("epochs = 3", "epochs = 3.0"), TypeError, "[train] epochs must be an integer"),
        (("epochs = 3", "epochs = true"), TypeError, "[train] epochs must be an integer"),
        (("epochs = 3", "epochs = 0"), ValueError, "[train] epochs must be >= 1"),
        ((LR, "lr = -0.1"), ValueError, "[train] lr must be > 0"),
        ((LR, "lr = nan"), ValueError, "[train] lr must be finite"),
        ((LR, 'lr = "fast"'), TypeError, "[train] lr must be a number"),
        (("T = 2", "T = 0"), ValueError, "[problem] T must be > 0"),
        (("beta = 10.0", "beta = inf"), ValueError, "[problem] beta must be finite"),
        (("A0 = \"A0.npy\"", "A0 = 5"), TypeError, "[problem] A0 must be a string"),
        ((LR, LR + "\nclamp = [5, -5]"), ValueError, "[train] clamp must have low < high"),
        ((LR, LR + "\nclamp = 5"), TypeError, "[train] clamp must be a list"),
        ((LR, LR + "\nparam = \"relu\""), ValueError, "[train] param must be one of"),
        ((LR, LR + "\nweight_decay = -1"), ValueError, "[train] weight_decay"),
        ((LR, LR + "\n[slurm]\nqueue = \"x\""), ValueError, "missing required key [slurm] jobs"),
        ((LR, LR + "\n[slurm]\njobs = 1\ngpus = 1"), ValueError, "unknown key [slurm] gpus"),
        ((LR, LR + "\n[output]\ndir = 3"), TypeError, "[output] dir must be a string"),
        (("[train]", "[train]\nlr = = 3"), ValueError, "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(problem_dir, edit, error, words):
    old, new = edit
    assert old in MINIMAL
    path = _write(problem_dir, MINIMAL.replace(old, new, 1))
    with pytest.raises(error) as info:
        load_config(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)  # the message says which file


def test_section_of_wrong_type(problem_dir):
    text = "train = 5\n" + MINIMAL.replace("[train]\nepochs = 3\nlr = 0.05\n", "")
    path = _write(problem_dir, text)
    with pytest.raises(TypeError, match=r"\[train\] must be a table"):
        load_config(path)


def test_missing_problem_file_names_the_path(problem_dir):
    (problem_dir / "data" / "F.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"\[problem\] F: no such file: .*data/F\.npy"):
        load_config(_write(problem_dir, MINIMAL))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_parse_config_from_dict(problem_dir):
    data = {
        "problem": {"A0": "A0.npy", "F": "data/F.npy", "labels": "labels.npy", "T": 1.0, "beta": 2},
        "train": {"epochs": 1, "lr": 1},
    }
    config = parse_config(data, base_dir=problem_dir)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.problem.beta == 2.0


def test_slurm_options_from_flags():
    options = check_slurm_options({"jobs": 3, "queue": None, "memory": "4GB", "gpus_per_job": 2})
    assert options == SlurmOptions(jobs=3, memory="4GB", gpus_per_job=2)
    with pytest.raises(ValueError, match=r"missing required key \[slurm\] jobs"):
        check_slurm_options({"queue": "debug"})
    with pytest.raises(ValueError, match=r"\[slurm\] cores must be >= 1"):
        check_slurm_options({"jobs": 1, "cores": 0})


def test_train_keys_are_the_fields_of_train_options(problem_dir):
    """Every TrainOptions field is a [train] key with the dataclass's default and check."""
    from dataclasses import fields

    assert load_config(_write(problem_dir, MINIMAL.split("[train]")[0])).train == TrainOptions()
    defaults = TrainOptions()
    lines = []
    for spec in fields(TrainOptions):
        value = getattr(defaults, spec.name)
        if value is None:
            continue  # TOML has no null: absent means the default
        text = f'"{value}"' if isinstance(value, str) else str(list(value)) \
            if isinstance(value, tuple) else repr(value)
        lines.append(f"{spec.name} = {text}")
    text = MINIMAL.split("[train]")[0] + "[train]\n" + "\n".join(lines) + "\n"
    assert load_config(_write(problem_dir, text)).train == defaults


def test_zarr_column_files_are_folders(problem_dir):
    (problem_dir / "F.zarr").mkdir()
    config = load_config(_write(problem_dir, MINIMAL.replace('"data/F.npy"', '"F.zarr"')))
    assert config.problem.F == problem_dir / "F.zarr"
    with pytest.raises(FileNotFoundError, match=r"\[problem\] labels: no such file: .*l\.zarr"):
        load_config(_write(problem_dir, MINIMAL.replace('"labels.npy"', '"l.zarr"')))
    with pytest.raises(ValueError, match=r"\[problem\] F: .*must end in \.npy / \.zarr"):
        load_config(_write(problem_dir, MINIMAL.replace('"data/F.npy"', '"F.h5"')))
