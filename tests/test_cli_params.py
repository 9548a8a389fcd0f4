"""``diagode-dist train`` on an MSE config with a [param] section, then ``predict``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from test_cli import _check_outputs, _cli, _one_line_error

import diagode_dist as dd
import diagode_dist.cli

N, S, TIMES = 30, 10, (0.5, 1.0)
TRAIN = {"epochs": 2, "lr": 0.05, "k": 16, "batch_size": 4, "seed": 2, "n_shards": 2,
         "rtol": 1e-10}


def _write(folder):
    """An MSE problem with a generator pattern, in files; returns (config path, Problem, P)."""
    rng = np.random.default_rng(9)
    A0 = sp.csr_matrix(0.2 * sp.random(N, N, density=0.2, random_state=1).toarray())
    F, x0 = rng.standard_normal((N, S)), rng.standard_normal((N, S))
    targets = rng.standard_normal((len(TIMES), N, S))
    P = sp.random(N, N, density=0.1, random_state=3, format="csr")
    folder.mkdir(parents=True, exist_ok=True)
    sp.save_npz(folder / "A0.npz", A0)
    sp.save_npz(folder / "P.npz", P)
    for name, value in (("F", F), ("x0", x0), ("targets", targets)):
        np.save(folder / f"{name}.npy", value)
    lines = ["[problem]", 'A0 = "A0.npz"', 'F = "F.npy"', 'x0 = "x0.npy"', 'loss = "mse"',
             f"obs_times = {list(TIMES)}", 'targets = "targets.npy"', f"T = {TIMES[-1]}", "",
             "[param]", 'kind = "generator"', 'pattern = "P.npz"', 'transform = "softplus"',
             'diagonal = "softplus"', "", "[train]"]
    lines += [f"{key} = {value}" for key, value in TRAIN.items()]
    (folder / "run.toml").write_text("\n".join(lines) + "\n")
    prob = dd.Problem(A0, F, x0=x0, T=TIMES[-1], obs_times=TIMES, loss="mse", targets=targets)
    return folder / "run.toml", prob, P


@pytest.mark.slow
def test_train_and_predict_an_mse_config_with_a_generator(tmp_path):
    config, prob, P = _write(tmp_path / "data")
    param = dd.Stack(dd.SoftplusParam(), dd.GeneratorParam(P, "softplus"))
    theta0 = np.zeros(param.theta_size(N))
    options = {key: value for key, value in TRAIN.items() if key != "n_shards"}
    theta_ref, history_ref = dd.fit(prob, theta0, param, **options)

    out = tmp_path / "out"
    _cli("train", str(config), "--workers", "2", "--cpu", "--quiet", "--out", str(out))
    summary = _check_outputs(out, np.asarray(theta_ref), list(history_ref))
    assert summary["options"]["n_shards"] == 2
    assert summary["options"]["theta_size"] == theta0.size
    assert summary["options"]["param"]["kind"] == "generator"
    assert summary["options"]["param"]["diagonal"] == "softplus"
    assert summary["problem"]["loss"] == "mse" and summary["problem"]["obs_times"] == list(TIMES)

    result = _cli("predict", str(config), "--theta", str(out / "theta.npy"), "--out", str(out))
    states = np.load(out / "states.npy")
    expected = dd.solve(prob, np.load(out / "theta.npy"), param, k=TRAIN["k"], rtol=TRAIN["rtol"])
    np.testing.assert_allclose(states, expected, rtol=1e-12, atol=1e-14)
    assert "mean squared error" in result.stdout
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_predict_classification_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(1)
    A0 = 0.2 * rng.standard_normal((N, N))
    F, labels = rng.standard_normal((N, S)), rng.integers(0, N, S)
    np.save(tmp_path / "A0.npy", A0)
    np.save(tmp_path / "F.npy", F)
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "run.toml").write_text('[problem]\nA0 = "A0.npy"\nF = "F.npy"\n'
                                       'labels = "labels.npy"\nT = 1.0\nbeta = 3.0\n')
    theta = rng.standard_normal(N)
    np.save(tmp_path / "theta.npy", theta)
    config = str(tmp_path / "run.toml")
    assert dd.cli.main(["predict", config, "--theta", str(tmp_path / "theta.npy"), "--out",
                        str(tmp_path / "p"), "--times", "0.5", "1.0"]) == 0
    assert "accuracy" in capsys.readouterr().out
    prob = dd.Problem(A0, F, labels, T=1.0, beta=3.0)
    np.testing.assert_array_equal(np.load(tmp_path / "p" / "predicted_labels.npy"),
                                  dd.predict(prob, theta))
    assert np.load(tmp_path / "p" / "states.npy").shape == (2, N, S)
    line = _one_line_error(capsys, ["predict", config, "--theta", str(tmp_path / "no.npy")])
    assert "--theta" in line
    np.save(tmp_path / "short.npy", theta[:5])
    line = _one_line_error(capsys, ["predict", config, "--theta", str(tmp_path / "short.npy")])
    assert "theta must have shape" in line
    (tmp_path / "bad.toml").write_text('[problem]\nA0 = "A0.npy"\nF = "F.npy"\n'
                                       'labels = "labels.npy"\nT = 1.0\n'
                                       '[param]\nkind = "generator"\n')
    line = _one_line_error(capsys, ["predict", str(tmp_path / "bad.toml"), "--theta",
                                    str(tmp_path / "theta.npy")])
    assert "[param] pattern" in line
