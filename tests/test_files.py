"""ProblemFiles: problems kept in .npy / .npz / .mtx files, read one shard at a time."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

import diagode_dist as dd
from diagode_dist.files import ProblemFiles

N, S = 12, 9


@pytest.fixture
def arrays():
    rng = np.random.default_rng(4)
    A0 = 0.1 * rng.standard_normal((N, N)) * (rng.random((N, N)) < 0.5)
    return A0, rng.standard_normal((N, S)), rng.integers(0, N, S), rng.standard_normal((N, S))


@pytest.fixture
def paths(tmp_path, arrays):
    A0, F, labels, x0 = arrays
    np.save(tmp_path / "A0.npy", A0)
    sp.save_npz(tmp_path / "A0.npz", sp.csr_matrix(A0))
    scipy.io.mmwrite(tmp_path / "A0.mtx", sp.coo_matrix(A0))
    np.save(tmp_path / "F.npy", F)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "x0.npy", x0)
    return tmp_path


@pytest.mark.parametrize("a0_name", ["A0.npy", "A0.npz", "A0.mtx"])
def test_every_operator_format_loads_the_same_matrix(paths, arrays, a0_name):
    files = ProblemFiles(paths / a0_name, paths / "F.npy", paths / "labels.npy", T=1.5,
                         beta=3.0).validate()
    assert (files.n, files.S) == (N, S)
    A0 = files.load_operator()
    dense = A0.toarray() if sp.issparse(A0) else A0
    assert np.array_equal(dense, arrays[0])


def test_a_shard_is_the_same_problem_as_select(paths, arrays):
    A0, F, labels, x0 = arrays
    files = ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy", T=1.5,
                         beta=3.0, x0=paths / "x0.npy").validate()
    whole = dd.Problem(A0, F, labels, T=1.5, beta=3.0, x0=x0)
    columns = np.arange(3, 7)
    shard = files.load_shard(slice(3, 7))
    assert shard.S == 4 and shard.T == 1.5 and shard.beta == 3.0
    assert np.array_equal(shard.F, F[:, 3:7]) and np.array_equal(shard.x0, x0[:, 3:7])
    assert np.array_equal(np.asarray(shard.labels), labels[3:7])
    theta = 0.2 * np.random.default_rng(1).standard_normal(N)
    expected = dd.loss_grad_sums(whole.select(columns), theta)
    got = dd.loss_grad_sums(shard, theta)
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1])
    picked = files.load_shard([0, 5, 8], A0=A0)  # explicit ids and a preloaded A0
    assert picked.A0 is A0 and np.array_equal(picked.F, F[:, [0, 5, 8]])


def test_validate_memory_maps_F(paths, monkeypatch):
    modes = {}
    real_load = np.load

    def recording_load(path, *args, **kwargs):
        modes.setdefault(str(path).rsplit("/", 1)[-1], []).append(kwargs.get("mmap_mode"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", recording_load)
    ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy",
                 x0=paths / "x0.npy").validate()
    assert set(modes["F.npy"]) == {"r"} and set(modes["x0.npy"]) == {"r"}
    assert set(modes["A0.npy"]) == {"r"}


@pytest.mark.parametrize("missing", ["A0.npy", "F.npy", "labels.npy", "x0.npy"])
def test_missing_files(paths, missing):
    (paths / missing).unlink()
    files = ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy",
                         x0=paths / "x0.npy")
    with pytest.raises(FileNotFoundError, match=missing.split(".")[0]):
        files.validate()


def test_shape_mismatches(paths):
    def files(**names):
        chosen = {"A0": "A0.npy", "F": "F.npy", "labels": "labels.npy", "x0": None, **names}
        return ProblemFiles(*(paths / chosen[k] for k in ("A0", "F", "labels")),
                            x0=None if chosen["x0"] is None else paths / chosen["x0"])

    np.save(paths / "A0_small.npy", np.zeros((N - 1, N - 1)))
    with pytest.raises(ValueError, match=r"A0 has shape \(11, 11\) but F has shape \(12, 9\)"):
        files(A0="A0_small.npy").validate()
    sp.save_npz(paths / "A0_rect.npz", sp.csr_matrix(np.zeros((N, N + 1))))
    with pytest.raises(ValueError, match="A0 has shape"):
        files(A0="A0_rect.npz").validate()
    np.save(paths / "labels_long.npy", np.zeros(S + 1, dtype=int))
    with pytest.raises(ValueError, match=r"labels must have shape \(S,\) = \(9,\)"):
        files(labels="labels_long.npy").validate()
    np.save(paths / "labels_big.npy", np.full(S, N))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, n\)"):
        files(labels="labels_big.npy").validate()
    np.save(paths / "labels_float.npy", np.zeros(S))
    with pytest.raises(TypeError, match="labels must be integers"):
        files(labels="labels_float.npy").validate()
    np.save(paths / "x0_wrong.npy", np.zeros((N, S - 1)))
    with pytest.raises(ValueError, match="x0 must have shape"):
        files(x0="x0_wrong.npy").validate()
    np.save(paths / "F_1d.npy", np.zeros(N))
    with pytest.raises(ValueError, match="F must be a non-empty 2-D"):
        files(F="F_1d.npy").validate()


def test_bad_arguments(paths):
    with pytest.raises(ValueError, match="A0: .* must end in .npy / .npz / .mtx"):
        ProblemFiles(paths / "A0.txt", paths / "F.npy", paths / "labels.npy")
    with pytest.raises(ValueError, match="F: .* must end in .npy"):
        ProblemFiles(paths / "A0.npy", paths / "F.npz", paths / "labels.npy")
    with pytest.raises(TypeError, match="labels must be a path"):
        ProblemFiles(paths / "A0.npy", paths / "F.npy", 3)
    with pytest.raises(ValueError, match="T must be > 0"):
        ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy", T=0.0)
    with pytest.raises(ValueError, match="beta must be finite"):
        ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy", beta=np.inf)
    np.savez(paths / "dense.npz", a=np.zeros((N, N)))
    with pytest.raises(ValueError, match="not a scipy.sparse.save_npz file"):
        ProblemFiles(paths / "dense.npz", paths / "F.npy", paths / "labels.npy").validate()
    (paths / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="F: .* is not a readable .npy"):
        ProblemFiles(paths / "A0.npy", paths / "junk.npy", paths / "labels.npy").validate()


def test_paths_are_absolute_and_repr_names_them(paths, monkeypatch):
    monkeypatch.chdir(paths)
    files = ProblemFiles("A0.npy", "F.npy", "labels.npy")
    assert files.F.is_absolute() and files.F == paths / "F.npy"
    assert "F.npy" in repr(files)
    assert files.operator_token()[1] == str(paths / "A0.npy")


def _zarr(path, array, chunks):
    zarr = pytest.importorskip("zarr")
    stored = zarr.open_array(str(path), mode="w", shape=array.shape, chunks=chunks,
                             dtype=array.dtype)
    stored[...] = array
    return path


def test_zarr_columns_load_like_npy(paths, arrays):
    A0, F, labels, x0 = arrays
    files = ProblemFiles(paths / "A0.npy", _zarr(paths / "F.zarr", F, (N, 3)),
                         _zarr(paths / "labels.zarr", labels, (3,)), T=1.5, beta=3.0,
                         x0=_zarr(paths / "x0.zarr", x0, (N, 3))).validate()
    assert (files.n, files.S) == (N, S)
    for columns in (slice(2, 7), [0, 5, 8]):
        got, want = files.load_shard(columns), dd.Problem(A0, F, labels, T=1.5, beta=3.0, x0=x0)
        picked = np.arange(S)[columns]
        assert np.array_equal(got.F, F[:, picked]) and np.array_equal(got.x0, x0[:, picked])
        assert np.array_equal(np.asarray(got.labels), labels[picked])
        theta = np.linspace(-0.5, 0.5, N)
        assert dd.loss_grad_sums(got, theta)[0] == \
            dd.loss_grad_sums(want.select(picked), theta)[0]


def test_bad_zarr_inputs_name_the_argument(paths, arrays):
    F = arrays[1]
    (paths / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match=r"F: .*empty\.zarr is not a readable zarr array"):
        ProblemFiles(paths / "A0.npy", paths / "empty.zarr", paths / "labels.npy").validate()
    with pytest.raises(FileNotFoundError, match=r"x0: no such file: .*missing\.zarr"):
        ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy",
                     x0=paths / "missing.zarr").validate()
    short = _zarr(paths / "short.zarr", F[:, :4], (N, 2))
    with pytest.raises(ValueError, match=r"x0 must have shape \(n, S\) = \(12, 9\)"):
        ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy",
                     x0=short).validate()


# ---- pre-flight: every value read once, in chunks, before any cluster ----------------------

def test_preflight_names_the_file_and_the_first_bad_index(paths, arrays, monkeypatch):
    import diagode_dist.files as files_module

    monkeypatch.setattr(files_module, "_SCAN_BYTES", 8 * N * 2)  # 2 columns per chunk
    A0, F, labels, x0 = arrays
    files = ProblemFiles(paths / "A0.npy", paths / "F.npy", paths / "labels.npy",
                         x0=paths / "x0.npy")
    clean = files.preflight()
    assert clean["F"]["shape"] == [N, S] and len(clean["F"]["blake2b"]) == 32
    for name, array, index in (("F", F, (5, 7)), ("x0", x0, (0, 8)), ("A0", A0, (3, 1))):
        broken = np.array(array)
        broken[index] = np.inf if name == "x0" else np.nan
        np.save(paths / f"{name}.npy", broken)
        with pytest.raises(ValueError, match=rf"{name}: {paths / name}\.npy has a NaN or inf "
                                             rf"at index \({index[0]}, {index[1]}\)"):
            files.preflight()
        np.save(paths / f"{name}.npy", array)
    assert files.preflight() == clean  # the same contents, the same fingerprint
    np.save(paths / "A0.npy", A0.astype(complex))
    with pytest.raises(TypeError, match=r"A0: .*A0\.npy must hold real numbers, got dtype "
                                        r"complex128"):
        files.preflight()


def test_preflight_fingerprint_follows_the_contents(paths, arrays):
    files = ProblemFiles(paths / "A0.npz", paths / "F.npy", paths / "labels.npy")
    before = files.preflight()
    F = np.array(arrays[1])
    F[0, 0] += 1e-12
    np.save(paths / "F.npy", F)
    after = files.preflight()
    assert after["F"]["blake2b"] != before["F"]["blake2b"]
    assert after["A0"] == before["A0"] and after["labels"] == before["labels"]
    sparse = sp.load_npz(paths / "A0.npz")
    sparse.data[0] = np.nan
    sp.save_npz(paths / "A0.npz", sparse)
    with pytest.raises(ValueError, match=r"A0: .*A0\.npz has a NaN or inf"):
        files.preflight()


def test_train_preflights_files_before_any_cluster_starts(paths, arrays, capsys):
    from diagode_dist.cli import main

    F = np.array(arrays[1])
    F[2, 4] = np.nan
    np.save(paths / "F.npy", F)
    config = paths / "run.toml"
    config.write_text('[problem]\nA0 = "A0.npy"\nF = "F.npy"\nlabels = "labels.npy"\n'
                      "T = 1.0\nbeta = 2.0\n[train]\nepochs = 1\n")
    started = time.monotonic()
    assert main(["train", str(config), "--out", str(paths / "out"), "--cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cluster" not in err.lower()
    assert f"F: {paths / 'F.npy'} has a NaN or inf at index (2, 4)" in err
    assert time.monotonic() - started < 5  # no cluster was started
