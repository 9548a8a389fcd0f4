"""TrainOptions: one dataclass whose fields are the keyword arguments, [train] keys and flags."""

from __future__ import annotations

import inspect
import logging
import runpy
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

import diagode_dist as dd
from diagode_dist.cli import _build_parser
from diagode_dist.config import parse_config
from diagode_dist.options import DEMO_OPTIONS, TrainOptions, option_fields
from diagode_dist.service.client import fit_distributed, submit


def _flags(command: str) -> set[str]:
    parser = _build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    return {flag for action in sub._actions for flag in action.option_strings}


def test_every_field_is_a_flag_a_config_key_and_a_keyword(tmp_path):
    for name in ("A0.npy", "F.npy", "labels.npy"):
        (tmp_path / name).write_bytes(b"")
    problem = {"A0": "A0.npy", "F": "F.npy", "labels": "labels.npy", "T": 1.0, "beta": 1.0}
    service_only = {spec.name for spec in option_fields()} - \
        {spec.name for spec in option_fields(service=False)}
    assert service_only == {"n_shards", "checkpoint_every", "step_timeout"}
    for spec in fields(TrainOptions):
        flag = "--" + spec.name.replace("_", "-")
        assert flag in _flags("train") and flag in _flags("demo"), flag
        assert spec.name in inspect.signature(submit).parameters
        assert spec.name in inspect.signature(fit_distributed).parameters
        assert (spec.name in inspect.signature(dd.fit).parameters) == \
            (spec.name not in service_only)
        with pytest.raises((TypeError, ValueError), match=rf"\[train\] {spec.name} "):
            parse_config({"problem": problem, "train": {spec.name: "not valid"}},
                         base_dir=tmp_path)


def test_defaults_and_checks_live_in_the_dataclass():
    options = TrainOptions()
    assert (options.epochs, options.lr, options.rtol, options.clamp) == (20, 1e-3, 1e-12,
                                                                         (-50.0, 50.0))
    assert TrainOptions(lr=1, clamp=[-1, 2]).clamp == (-1.0, 2.0)
    assert isinstance(TrainOptions(lr=1).lr, float)
    for bad, error, words in [
        ({"rtol": 5.0}, ValueError, "rtol must be a number in (0, 1)"),
        ({"epochs": "1"}, TypeError, "epochs must be an integer"),
        ({"epochs": True}, TypeError, "epochs must be an integer"),
        ({"lr": float("nan")}, ValueError, "lr must be finite"),
        ({"clamp": (2, 1)}, ValueError, "clamp must have low < high"),
        ({"param": "relu"}, ValueError, "param must be one of softplus, exp"),
        ({"param": object()}, TypeError, "param must be one of softplus, exp or a diagonal"),
        ({"log_every": -1}, ValueError, "log_every must be >= 0"),
    ]:
        with pytest.raises(error) as info:
            TrainOptions(**bad)
        assert words in str(info.value)
    with pytest.raises(AttributeError):
        options.lr = 1.0  # frozen


def test_a_typo_names_the_function_called_and_suggests_the_option():
    prob = dd.demo_problem(n=8, S=4)
    with pytest.raises(TypeError, match=r"^fit_distributed\(\) got an unexpected keyword "
                                        r"argument 'epoch'; did you mean 'epochs'\?"):
        fit_distributed(None, prob, np.zeros(8), epoch=3)
    with pytest.raises(TypeError, match=r"^submit\(\) got an unexpected keyword argument 'lrate'"):
        submit(None, prob, np.zeros(8), lrate=3)
    with pytest.raises(TypeError, match=r"^fit\(\) .* 'n_shards' \(a Dask service option"):
        dd.fit(prob, np.zeros(8), n_shards=2)


def test_fit_takes_an_options_object_or_keywords_alike():
    prob = dd.demo_problem(n=12, S=6, seed=1)
    options = TrainOptions(epochs=2, lr=0.05, batch_size=4, seed=3, n_shards=4)
    by_object = dd.fit(prob, np.zeros(12), options=options)  # n_shards ignored by fit
    by_keywords = dd.fit(prob, np.zeros(12), epochs=2, lr=0.05, batch_size=4, seed=3)
    assert np.array_equal(by_object[0], by_keywords[0])
    exp_param = dd.fit(prob, np.zeros(12), options=options, param="exp")
    assert np.array_equal(exp_param[0], dd.fit(prob, np.zeros(12), dd.ExpParam(),
                                               options=options)[0])


def test_log_every_logs_the_loss(caplog):
    prob = dd.demo_problem(n=12, S=8, seed=1)
    with caplog.at_level(logging.INFO, logger="diagode_dist.train"):
        dd.fit(prob, np.zeros(12), epochs=3, batch_size=4, log_every=2)  # 6 steps
    steps = [r.getMessage() for r in caplog.records if r.name == "diagode_dist.train"]
    assert [line.split()[1] for line in steps] == ["2", "4", "6"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diagode_dist.train"):
        dd.fit(prob, np.zeros(12), epochs=3, batch_size=4)
    assert not [r for r in caplog.records if r.name == "diagode_dist.train"]


def test_one_demo_default_for_the_cli_and_the_deploy_script():
    demo = _build_parser().parse_args(["demo"])
    assert demo.option_lr == DEMO_OPTIONS.lr == 0.1
    script = Path(__file__).resolve().parents[1] / "deploy" / "local" / "workstation.py"
    namespace = runpy.run_path(str(script), run_name="workstation")
    assert namespace["DEMO_OPTIONS"] is DEMO_OPTIONS  # the script has no options of its own
