"""The PyTorch layer: gradients against torch.linalg.matrix_exp + autograd, the exact dense
reference and gradcheck; zero-copy bridging; the nn.Module; argument checks."""

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import diagode_dist as dd  # noqa: E402
from diagode_dist import torch as ddt  # noqa: E402
from diagode_dist.reference import exact_loss_and_grad  # noqa: E402

pytestmark = [pytest.mark.slow,  # imports torch (about 5 s)
              pytest.mark.filterwarnings("ignore:Sparse:UserWarning")]  # torch's beta notices
F64 = torch.float64



def _edge_weights(layer, n):
    """The module's edge weights softplus(theta_edges) as a dense (n, n) tensor."""
    return torch.zeros(n, n, dtype=F64).index_put(
        (layer.edge_rows, layer.edge_cols), torch.nn.functional.softplus(layer.theta_edges),
        accumulate=True)


def _assert_same_parameter_gradients(layer, states, peer):
    """Gradients of a random projection of the states, through the module and the peer."""
    upstream = torch.randn_like(states)
    params = (layer.theta_diag, layer.theta_edges)
    g_ours = torch.autograd.grad((states * upstream).sum(), params)
    g_peer = torch.autograd.grad((peer * upstream).sum(), params)
    for mine, theirs in zip(g_ours, g_peer, strict=True):
        assert _rel(mine, theirs) < 1e-10

def _random_operator(n, density=0.4, scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense = scale * torch.randn(n, n, dtype=F64, generator=gen)
    return dense * (torch.rand(n, n, generator=gen) < density)


def _csr(dense, values):
    """A sparse CSR tensor with dense's pattern and the given (differentiable) values."""
    pattern = dense.to_sparse_csr()
    return torch.sparse_csr_tensor(pattern.crow_indices(), pattern.col_indices(), values,
                                   dense.shape)


def _augmented_states(A, f, x0, times):
    """States (m, n, S) of x' = A x + f from matrix_exp of [[A, F], [0, 0]] (autograd peer)."""
    n, S = f.shape
    top = torch.cat([A, f], dim=1)
    augmented = torch.cat([top, torch.zeros(S, n + S, dtype=A.dtype)], dim=0)
    start = torch.cat([x0, torch.eye(S, dtype=A.dtype)], dim=0)
    return torch.stack([(torch.linalg.matrix_exp(t * augmented) @ start)[:n] for t in times])


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("layout", ["csr", "coo", "dense"])
@pytest.mark.parametrize("t", [0.8, -0.6])
def test_expm_multiply_matches_matrix_exp_autograd(layout, t):
    n, S = 12, 4
    dense = _random_operator(n)
    values = dense.to_sparse_csr().values().clone().requires_grad_()
    B = torch.randn(n, S, dtype=F64, requires_grad=True)
    time = torch.tensor(t, dtype=F64, requires_grad=True)
    upstream = torch.randn(n, S, dtype=F64)

    def operator(v):
        A = _csr(dense, v)
        return {"csr": A, "coo": A.to_dense().to_sparse_coo(), "dense": A.to_dense()}[layout]

    ours = ddt.expm_multiply(operator(values), B, time)
    peer = torch.linalg.matrix_exp(time * _csr(dense, values).to_dense()) @ B
    assert _rel(ours, peer) < 1e-12
    g_ours = torch.autograd.grad((ours * upstream).sum(), (values, B, time))
    g_peer = torch.autograd.grad((peer * upstream).sum(), (values, B, time))
    for mine, theirs in zip(g_ours, g_peer, strict=True):
        assert _rel(mine, theirs) < 1e-10


def test_dense_operator_gradient_is_the_full_matrix():
    n, S = 9, 3
    A = (0.4 * torch.randn(n, n, dtype=F64)).requires_grad_()
    B = torch.randn(n, S, dtype=F64)
    upstream = torch.randn(n, S, dtype=F64)
    (grad,) = torch.autograd.grad((ddt.expm_multiply(A, B) * upstream).sum(), A)
    (peer,) = torch.autograd.grad((torch.linalg.matrix_exp(A) @ B * upstream).sum(), A)
    assert grad.shape == (n, n) and _rel(grad, peer) < 1e-10


def test_odeint_linear_matches_matrix_exp_autograd_for_every_input():
    n, S = 10, 3
    dense = _random_operator(n, seed=1)
    values = dense.to_sparse_csr().values().clone().requires_grad_()
    f = torch.randn(n, S, dtype=F64, requires_grad=True)
    x0 = torch.randn(n, S, dtype=F64, requires_grad=True)
    d = (-torch.rand(n, dtype=F64)).requires_grad_()
    times = torch.tensor([0.0, 0.4, 1.5], dtype=F64, requires_grad=True)
    inputs = (values, f, x0, d, times)
    upstream = torch.randn(3, n, S, dtype=F64)
    ours = ddt.odeint_linear(_csr(dense, values), f=f, x0=x0, t=times, d=d)
    peer = _augmented_states(_csr(dense, values).to_dense() + torch.diag(d), f, x0, times)
    assert ours.shape == (3, n, S) and _rel(ours, peer) < 1e-12
    g_ours = torch.autograd.grad((ours * upstream).sum(), inputs)
    g_peer = torch.autograd.grad((peer * upstream).sum(), inputs)
    for mine, theirs in zip(g_ours, g_peer, strict=True):
        assert _rel(mine, theirs) < 1e-10


def test_gradcheck_every_input():
    n, S = 7, 2
    dense = _random_operator(n, seed=2)
    values = dense.to_sparse_csr().values().clone().requires_grad_()

    def vec(*shape):
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    times = torch.tensor([0.3, 0.9], dtype=F64, requires_grad=True)

    def layer(v, f, x0, d, t):
        return ddt.odeint_linear(_csr(dense, v), f=f, x0=x0, t=t, d=d)

    assert torch.autograd.gradcheck(layer, (values, vec(n, S), vec(n, S), vec(n), times))
    time = torch.tensor(0.7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, B, t: ddt.expm_multiply(_csr(dense, v), B, t), (values, vec(n, S), time))
    zero = torch.zeros(n, S, dtype=F64, requires_grad=True)  # a zero-initialised network output
    assert torch.autograd.gradcheck(
        lambda f, x0: ddt.odeint_linear(dense, f=f, x0=x0, t=[0.0, 1.0]),
        (zero, zero.detach().clone().requires_grad_()))


def test_gradients_match_the_exact_reference():
    """Diagonal, x0 and f gradients against diagode_dist.reference (dense Van Loan)."""
    n, S = 11, 4
    rng = np.random.default_rng(3)
    A = 0.3 * rng.standard_normal((n, n))
    F, X0 = rng.standard_normal((n, S)), rng.standard_normal((n, S))
    d = -rng.random(n)
    times = [0.5, 1.0, 2.0]
    upstream = rng.standard_normal((3, n, S))

    def linear(states, columns):  # sum_i <G_i, x(t_i)> per column
        jumps = upstream[:, :, columns].transpose(0, 2, 1)
        return (jumps * states).sum(axis=(0, 2)), jumps

    prob = dd.Problem(A, F, x0=X0, T=2.0, obs_times=times, loss=linear)
    _, ref = exact_loss_and_grad(prob, d, _IdentityDiagonal(), wrt=("theta", "x0", "F"))
    tensors = [torch.tensor(a, requires_grad=True) for a in (F, X0, d)]
    states = ddt.odeint_linear(torch.tensor(A), f=tensors[0], x0=tensors[1], t=times,
                               d=tensors[2])
    grads = torch.autograd.grad((states * torch.tensor(upstream)).sum(), tensors)
    for mine, name in zip(grads, ("F", "x0", "theta"), strict=True):
        assert _rel(mine, torch.tensor(ref[name] * S)) < 1e-10  # reference: mean over columns


class _IdentityDiagonal:
    def diag_from_theta(self, theta):
        return theta

    def dtheta_from_ddiag(self, theta, g):
        return g


def test_broadcast_vectors_and_time_zero():
    """f (n,) shared by all columns: its gradient is the sum over columns; t_1 = 0 gives x0."""
    n, S = 8, 3
    A = _random_operator(n, seed=4)
    f = torch.randn(n, dtype=F64, requires_grad=True)
    x0 = torch.randn(n, S, dtype=F64, requires_grad=True)
    states = ddt.odeint_linear(A, f=f, x0=x0, t=[0.0, 1.0])
    assert torch.equal(states[0], x0)
    peer = _augmented_states(A, f[:, None].expand(n, S), x0, [0.0, 1.0])
    upstream = torch.randn_like(states)
    g_ours = torch.autograd.grad((states * upstream).sum(), (f, x0))
    g_peer = torch.autograd.grad((peer * upstream).sum(), (f, x0))
    for mine, theirs in zip(g_ours, g_peer, strict=True):
        assert _rel(mine, theirs) < 1e-10
    single = ddt.odeint_linear(A, x0=x0[:, 0], t=[0.5, 1.0])
    assert single.shape == (2, n)


def test_float32_runs_in_float32_to_its_accuracy():
    n, S = 16, 4
    A = _random_operator(n, seed=5)
    B = torch.randn(n, S, dtype=F64)
    exact = torch.linalg.matrix_exp(A) @ B
    out = ddt.expm_multiply(A.float().to_sparse_csr(), B.float())
    assert out.dtype == torch.float32
    assert _rel(out.double(), exact) < 1e-5


def test_cpu_tensors_cross_without_copies():
    x = torch.randn(5, 3, dtype=F64)
    view = ddt._to_xp(x)
    assert isinstance(view, np.ndarray) and np.shares_memory(view, x.numpy())
    back = ddt._from_xp(view, x.device)
    assert back.data_ptr() == x.data_ptr()
    expanded = torch.randn(5, dtype=F64)[:, None].expand(5, 3)  # broadcast f: no copy either
    assert np.shares_memory(ddt._to_xp(expanded), expanded.numpy())


def test_linear_ode_module_trains_diagonal_and_generator_edges():
    """The module's gradients equal a dense autograd model's, and Adam lowers the loss."""
    n, S = 10, 3
    A0 = sp.random(n, n, density=0.2, random_state=6, format="csr") * 0.3
    pattern = sp.random(n, n, density=0.3, random_state=7, format="csr")
    layer = ddt.LinearODE(A0, pattern, diagonal="softplus", edges="softplus", generator=True,
                          times=[0.5, 1.0])
    with torch.no_grad():
        layer.theta_diag.normal_()
        layer.theta_edges.normal_()
    x0 = torch.randn(n, S, dtype=F64)
    states = layer(x0=x0)
    W = _edge_weights(layer, n)
    A = (torch.tensor(A0.toarray()) + W - torch.diag(W.sum(1))
         - torch.diag(torch.nn.functional.softplus(layer.theta_diag)))
    peer = _augmented_states(A, torch.zeros(n, S, dtype=F64), x0, [0.5, 1.0])
    assert _rel(states, peer) < 1e-12
    _assert_same_parameter_gradients(layer, states, peer)
    target = peer.detach() * 0.5
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = ((layer(x0=x0) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _grid_laplacian(m):
    """The 5-point Laplacian of an m x m grid (unit spacing), SciPy CSR: stiff for t ~ 10."""
    path = sp.diags([np.ones(m - 1), -2 * np.ones(m), np.ones(m - 1)], [-1, 0, 1])
    return sp.csr_matrix(sp.kron(path, sp.identity(m)) + sp.kron(sp.identity(m), path))


def _torch_csr(matrix, values):
    return torch.sparse_csr_tensor(torch.tensor(matrix.indptr, dtype=torch.int64),
                                   torch.tensor(matrix.indices, dtype=torch.int64), values,
                                   matrix.shape)


def test_rational_method_gradcheck_on_a_stiff_sparse_problem():
    """method="rational" (shift-and-invert spaces, forward and backward): gradcheck for every
    input, and the gradients of matrix_exp + autograd to 1e-10, at ||t A|| ~ 100."""
    L = _grid_laplacian(3)  # n = 9, ||A||_2 ~ 6.8
    n, S = 9, 2
    values = torch.tensor(L.data, requires_grad=True)
    gen = torch.Generator().manual_seed(8)

    def vec(*shape):
        return torch.randn(*shape, dtype=F64, generator=gen).requires_grad_()

    times = torch.tensor([4.0, 15.0], dtype=F64, requires_grad=True)

    def layer(v, f, x0, d, t):
        return ddt.odeint_linear(_torch_csr(L, v), f=f, x0=x0, t=t, d=d, method="rational")

    inputs = (values, vec(n, S), vec(n, S), 0.1 * vec(n).detach().requires_grad_(), times)
    assert torch.autograd.gradcheck(layer, inputs)
    v, f, x0, d, t = inputs
    upstream = torch.randn(2, n, S, dtype=F64, generator=gen)
    ours = torch.autograd.grad((layer(*inputs) * upstream).sum(), inputs)
    A = _torch_csr(L, v).to_dense() + torch.diag(d)
    peer = torch.autograd.grad((_augmented_states(A, f, x0, t) * upstream).sum(), inputs)
    for mine, theirs in zip(ours, peer, strict=True):
        assert _rel(mine, theirs) < 1e-10


def test_backward_reuses_the_forward_march(monkeypatch):
    """One forward march per layer call, forward and backward together (the backward walks
    the kept intervals); a second backward (retain_graph) marches again and agrees."""
    import diagode_dist.adjoint as core

    calls = []
    march = core.march_forward
    monkeypatch.setattr(core, "march_forward", lambda *a, **kw: calls.append(1) or march(*a, **kw))
    n, S = 12, 3
    A = _random_operator(n, seed=9)
    values = A.to_sparse_csr().values().clone().requires_grad_()
    x0 = torch.randn(n, S, dtype=F64, requires_grad=True)
    states = ddt.odeint_linear(_csr(A, values), x0=x0, t=[0.5, 1.0])
    upstream = torch.randn_like(states)
    first = torch.autograd.grad((states * upstream).sum(), (values, x0), retain_graph=True)
    assert len(calls) == 1
    second = torch.autograd.grad((states * upstream).sum(), (values, x0))
    assert len(calls) == 2
    peer = _augmented_states(_csr(A, values).to_dense(), torch.zeros(n, S, dtype=F64), x0,
                             [0.5, 1.0])
    expected = torch.autograd.grad((peer * upstream).sum(), (values, x0))
    for a, b, c in zip(first, second, expected, strict=True):
        assert _rel(a, c) < 1e-10 and _rel(b, c) < 1e-10
    calls.clear()
    with torch.no_grad():  # inference: nothing kept, one march
        ddt.odeint_linear(_csr(A, values), x0=x0, t=[0.5, 1.0])
    assert len(calls) == 1


def test_linear_ode_module_with_the_rational_method():
    """LinearODE(method="rational") on a stiff grid: states and gradients of a dense model."""
    m = 3
    n, S = m * m, 2
    layer = ddt.LinearODE(10.0 * _grid_laplacian(m), _grid_laplacian(m), diagonal="softplus",
                          edges="softplus", times=[1.0, 2.0], method="rational")
    x0 = torch.randn(n, S, dtype=F64)
    states = layer(x0=x0)
    W = _edge_weights(layer, n)
    A = (torch.tensor(10.0 * _grid_laplacian(m).toarray()) + W
         - torch.diag(torch.nn.functional.softplus(layer.theta_diag)))
    peer = _augmented_states(A, torch.zeros(n, S, dtype=F64), x0, [1.0, 2.0])
    assert _rel(states, peer) < 1e-10
    _assert_same_parameter_gradients(layer, states, peer)


def test_bad_arguments_raise_clear_errors():
    A = _random_operator(6)
    B = torch.randn(6, 2, dtype=F64)
    cases = [
        (lambda: ddt.expm_multiply(A.numpy(), B), TypeError, "A must be a torch.Tensor"),
        (lambda: ddt.expm_multiply(A[:, :5], B), ValueError, "square"),
        (lambda: ddt.expm_multiply(A.int(), B), TypeError, "float32 or float64"),
        (lambda: ddt.expm_multiply(A, B.float()), TypeError, "x0 must have A's dtype"),
        (lambda: ddt.expm_multiply(A, B[:5]), ValueError, "x0 must have shape"),
        (lambda: ddt.odeint_linear(A, t=1.0), ValueError, "needs f or x0"),
        (lambda: ddt.odeint_linear(A, f=B, t=[1.0, 0.5]), ValueError, "t must increase"),
        (lambda: ddt.odeint_linear(A, f=B, t=[-1.0]), ValueError, "t must increase"),
        (lambda: ddt.odeint_linear(A, f=B, x0=B[:, :1].expand(6, 1).clone(), t=1.0),
         ValueError, "same number of columns"),
        (lambda: ddt.odeint_linear(A, f=B, d=B), ValueError, "d must have shape"),
        (lambda: ddt.odeint_linear(A, f=B, rtol=0.0), ValueError, "rtol"),
        (lambda: ddt.odeint_linear(A, f=B, k=4), ValueError, "k must be >= 8"),
        (lambda: ddt.LinearODE(A, diagonal="relu"), ValueError, "diagonal must be one of"),
        (lambda: ddt.LinearODE(A, np.ones((5, 5))), ValueError, "pattern must be"),
        (lambda: ddt.odeint_linear(A, f=B, method="lu"), ValueError, "method must be one of"),
        (lambda: ddt.expm_multiply(A, B, method="rational"), ValueError,
         "method='rational' needs a sparse A"),
        (lambda: ddt.LinearODE(A, method="rational"), ValueError,
         "method='rational' needs a sparse A0"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_accuracy_error_propagates():
    """A tolerance the core cannot certify is refused, not returned."""
    A = -1e4 * torch.eye(20, dtype=F64) + _random_operator(20)
    with pytest.raises(dd.AccuracyError):
        ddt.expm_multiply(A, torch.randn(20, 2, dtype=F64), k=8, rtol=1e-14)


@pytest.mark.gpu
def test_cuda_tensors_match_cpu_and_stay_on_device():
    from diagode_dist._array import gpu_available

    if not (torch.cuda.is_available() and gpu_available()):
        pytest.skip("needs a CUDA GPU visible to both torch and CuPy")
    n, S = 64, 8
    dense = _random_operator(n, density=0.1)
    values = dense.to_sparse_csr().values().clone()
    B = torch.randn(n, S, dtype=F64)
    upstream = torch.randn(n, S, dtype=F64)
    results = []
    for device in ("cpu", "cuda"):
        v = values.to(device).requires_grad_()
        Bd = B.to(device).requires_grad_()
        out = ddt.expm_multiply(_csr(dense.to(device), v), Bd, 0.9)
        assert out.device.type == device
        grads = torch.autograd.grad((out * upstream.to(device)).sum(), (v, Bd))
        results.append([out.cpu(), *(g.cpu() for g in grads)])
    for cpu, gpu in zip(*results, strict=True):
        assert _rel(gpu, cpu) < 1e-10


def test_hybrid_example_quick(tmp_path):
    """examples/hybrid_torch.py --quick trains end to end; torchdiffeq agrees on the gradient."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torchdiffeq")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(root / "examples" / "hybrid_torch.py"),
                           "--quick", "--out", str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    ours = summary["methods"]["ours"]
    assert ours["final_loss"] < 0.5 * ours["initial_loss"]
    for peer in ("adjoint", "backprop"):  # the same model through torchdiffeq at 1e-9
        assert summary["methods"][peer]["grad_rel_diff"] < 1e-6
        assert summary["methods"][peer]["initial_loss"] == pytest.approx(ours["initial_loss"],
                                                                         rel=1e-6)
    assert (tmp_path / "loss.png").stat().st_size > 2000
    assert "torchdiffeq adjoint" in proc.stdout


def test_spectral_stiff_reference_matches_the_dense_reference():
    """The benchmark's reference at n = 16384 (sine transform) against reference.py's dense
    Van Loan exponential (in ball arithmetic: SciPy's expm loses eps ||tA||) on small grids,
    stiff (||t A|| = 5000) and mild."""
    from benchmarks.layer import exact_stiff_gradients, spectral_stiff_gradients, stiff_arrays

    for m, t in ((5, None), (6, 0.5)):
        arrays = stiff_arrays(m, 3, seed=m)
        if t is not None:
            arrays["t"] = t
        dense = exact_stiff_gradients(arrays, precise=True)
        spectral = spectral_stiff_gradients(arrays, 7)
        for name in ("values", "B"):
            assert _rel(torch.tensor(spectral[name]), torch.tensor(dense[name])) < 1e-11


def test_layer_benchmark_isolates_each_method():
    """The stiff table's harness: our layer in its own process, scored against the spectral
    reference; a peer past its budget is stopped and reported with how far it got."""
    from benchmarks.layer import OURS, spectral_stiff_gradients, stiff_arrays, stiff_rows

    arrays = stiff_arrays(6, 2)
    exact = spectral_stiff_gradients(arrays)
    peer = "torchdiffeq odeint_adjoint, dopri5 1e-08"
    ours = stiff_rows(arrays, exact, 120.0, 4.0, lambda message: None, methods=[OURS])[0]
    assert float(ours[3]) < 1e-7 and "rational" in ours[5]
    stopped = stiff_rows(arrays, exact, 0.5, 4.0, lambda message: None, methods=[peer])[0]
    assert stopped[1] == "> 0.5" and stopped[5].startswith("did not finish in 0 s")


def test_layer_benchmark_reference_matches_the_layer():
    """The stiff benchmark's exact gradients (dense Van Loan) agree with the layer's."""
    from benchmarks.layer import exact_stiff_gradients, stiff_arrays

    arrays = stiff_arrays(5, 3)
    arrays["t"] = 200.0 / 400.0  # ||t A|| ~ 200: stiff, without decaying below rounding
    exact = exact_stiff_gradients(arrays)
    A = arrays["A"]
    values = torch.tensor(A.data, requires_grad=True)
    B = torch.tensor(arrays["B"], requires_grad=True)
    csr = torch.sparse_csr_tensor(torch.tensor(A.indptr, dtype=torch.int64),
                                  torch.tensor(A.indices, dtype=torch.int64), values, A.shape)
    (ddt.expm_multiply(csr, B, arrays["t"]) * torch.tensor(arrays["G"])).sum().backward()
    assert _rel(values.grad, torch.tensor(exact["values"])) < 1e-9
    assert _rel(B.grad, torch.tensor(exact["B"])) < 1e-9
