"""Dask-native inputs (DaskProblem) and zarr files, on a real LocalCluster of worker processes.

"The client never holds F" is checked without mocks: every worker logs each data transfer it
serves (``Worker.transfer_outgoing_log``, with ``who`` = the receiving worker's address, or
None when the data goes to the client through the scheduler). A gather to the client shows up
there (checked first, so the check can fail); a training run must leave no such entry for F.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import futures_of

import diagode_dist as dd
from diagode_dist.files import ProblemFiles
from diagode_dist.service import DaskProblem, fit_distributed, list_runs

TRAIN = {"epochs": 3, "lr": 2e-2, "batch_size": 8, "seed": 7}
N, S, CHUNK = 40, 32, 8  # F has S / CHUNK = 4 column chunks: 4 shards


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(12)
    prob = dd.demo_problem(n=N, S=S, seed=12)
    x0 = 0.1 * rng.standard_normal((N, S))
    return {"A0": np.asarray(prob.A0), "F": np.asarray(prob.F),
            "labels": np.asarray(prob.labels), "x0": x0}


@pytest.fixture(scope="module")
def reference(arrays):
    prob = dd.Problem(arrays["A0"], arrays["F"], arrays["labels"], T=2.0, beta=10.0,
                      x0=arrays["x0"])
    return dd.fit(prob, np.zeros(N), **TRAIN)


@pytest.fixture(scope="module")
def zarr_dir(arrays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("zarr")
    for name, chunks in (("F", (N, CHUNK)), ("x0", (N, CHUNK)), ("labels", (CHUNK,))):
        array = zarr.open_array(str(folder / f"{name}.zarr"), mode="w",
                                shape=arrays[name].shape, chunks=chunks,
                                dtype=arrays[name].dtype)
        array[...] = arrays[name]
    np.save(folder / "A0.npy", arrays["A0"])
    return folder


def _relative(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def _sent_to_clients(client, keys: set) -> list:
    """(worker, key) of every transfer of one of ``keys`` that did not go to a worker."""
    workers = set(client.scheduler_info()["workers"])
    logs = client.run(lambda dask_worker: [(entry["who"], list(entry["keys"]))
                                           for entry in dask_worker.transfer_outgoing_log])
    return [(worker, key) for worker, entries in logs.items() for who, sent in entries
            for key in sent if key in keys and who not in workers]


def _keys(array: da.Array) -> set:
    return {key for key in array.__dask_graph__() if isinstance(key, tuple)
            and key[0] == array.name}


def test_the_transfer_check_sees_a_gather_to_the_client(client, zarr_dir):
    probe = client.persist(da.from_zarr(str(zarr_dir / "F.zarr"), name="probe-of-F"))
    assert client.gather(futures_of(probe)[0]).shape == (N, CHUNK)
    assert len(_sent_to_clients(client, _keys(probe))) == 1


def test_zarr_dask_arrays_train_like_fit_and_f_never_reaches_the_client(
        client, zarr_dir, arrays, reference):
    F = da.from_zarr(str(zarr_dir / "F.zarr"))
    problem = DaskProblem(arrays["A0"], F, da.from_zarr(str(zarr_dir / "labels.zarr")),
                          T=2.0, beta=10.0, x0=da.from_zarr(str(zarr_dir / "x0.zarr")))
    assert problem.shard_ranges() == [(0, 8), (8, 16), (16, 24), (24, 32)]
    theta, history = fit_distributed(client, problem, np.zeros(N), **TRAIN)
    assert _relative(theta, reference[0]) <= 1e-12
    np.testing.assert_allclose(history, reference[1], rtol=1e-12)
    assert list_runs(client)[-1]["n_shards"] == 4  # one shard per column chunk
    assert _sent_to_clients(client, _keys(problem.F)) == []


def test_in_memory_arrays_are_wrapped_and_rechunked_by_rows(client, arrays, reference):
    F = da.from_array(arrays["F"], chunks=(N // 2, CHUNK))  # two row chunks: joined per shard
    problem = DaskProblem(arrays["A0"], F, arrays["labels"], T=2.0, beta=10.0,
                          x0=arrays["x0"])
    theta, _ = fit_distributed(client, problem, np.zeros(N), **TRAIN)
    assert _relative(theta, reference[0]) <= 1e-12


def test_zarr_files_train_like_fit(client, zarr_dir, reference):
    files = ProblemFiles(zarr_dir / "A0.npy", zarr_dir / "F.zarr", zarr_dir / "labels.zarr",
                         T=2.0, beta=10.0, x0=zarr_dir / "x0.zarr")
    theta, _ = fit_distributed(client, files, np.zeros(N), n_shards=3, **TRAIN)
    assert _relative(theta, reference[0]) <= 1e-12


def test_bad_dask_inputs_fail_before_any_work(client, arrays):
    F = da.from_array(arrays["F"], chunks=(N, CHUNK))
    before = len(list_runs(client))
    with pytest.raises(ValueError, match="n_shards=3, but F has 4 column chunks"):
        fit_distributed(client, DaskProblem(arrays["A0"], F, arrays["labels"]), np.zeros(N),
                        n_shards=3)
    with pytest.raises(ValueError, match=r"labels must have shape \(32,\)"):
        DaskProblem(arrays["A0"], F, arrays["labels"][:5])
    with pytest.raises(ValueError, match=r"x0 must have shape \(40, 32\)"):
        DaskProblem(arrays["A0"], F, arrays["labels"], x0=arrays["x0"][:, :3])
    with pytest.raises(ValueError, match="A0 must be a square"):
        DaskProblem(arrays["A0"][:3], F, arrays["labels"])
    with pytest.raises(TypeError, match="use a Problem for a callable loss"):
        DaskProblem(arrays["A0"], F, obs_times=[1.0], loss=lambda states, cols: None)
    with pytest.raises(TypeError, match="F must be a dask or NumPy array"):
        DaskProblem(arrays["A0"], [[1.0]], arrays["labels"])
    assert len(list_runs(client)) == before


def test_observation_targets_as_dask_arrays(client, arrays):
    rng = np.random.default_rng(5)
    times = [0.5, 1.0]
    targets = 0.1 * rng.standard_normal((len(times), N, S))
    prob = dd.Problem(arrays["A0"], arrays["F"], T=1.0, x0=arrays["x0"], obs_times=times,
                      targets=targets, loss="mse")
    theta_ref, history_ref = dd.fit(prob, np.zeros(N), **TRAIN)
    problem = DaskProblem(arrays["A0"], da.from_array(arrays["F"], chunks=(N, CHUNK)), T=1.0,
                          x0=arrays["x0"], obs_times=times, loss="mse",
                          targets=da.from_array(targets, chunks=(1, N // 2, 5)))
    theta, history = fit_distributed(client, problem, np.zeros(N), **TRAIN)
    assert _relative(theta, theta_ref) <= 1e-12
    np.testing.assert_allclose(history, history_ref, rtol=1e-12)
