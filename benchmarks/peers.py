"""Peers on the identical loss and gradient, in PyTorch (float64; CPU, or CUDA for --gpu).

Every peer computes, for the same problem and theta as ``dd.loss_and_grad``:

    d = -softplus(θ),  A = A0 + diag(d),  dX/dt = A X + F,  X(0) = X0 (default 0),
    loss = mean_j CE(β x_j(T), label_j),   grad = d loss / d θ,

with all S columns as one batched ODE state X of shape (n, S). Each peer returns
(loss: float, grad: (n,) float64 ndarray).

torch and torchdiffeq are optional (the ``bench`` extra): import this module only after
:func:`available` says they are there.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from diagode_dist.reference import dense_matrix

ODE_TOL = 1e-9  # rtol = atol of the dopri5 peers


def host_array(a: Any) -> np.ndarray | None:
    """A NumPy/CuPy array as a float64 host ndarray (None stays None)."""
    if a is None:
        return None
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)


class PeerTimeout(RuntimeError):
    """A peer ran past its time budget (raised from inside its ODE right-hand side)."""


def available() -> str | None:
    """None when torch and torchdiffeq import, else the reason they do not."""
    try:
        import torch  # noqa: F401
        import torchdiffeq  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or exc} not installed (pip install 'diagode-dist[bench]')"
    return None


def configure_torch(threads: int = 2) -> None:
    """A fixed thread count for every peer (every tensor here is created float64 explicitly)."""
    import torch

    torch.set_num_threads(threads)


def _tensors(prob: Any, theta: np.ndarray, device: str = "cpu",
             sparse: bool = False) -> dict[str, Any]:
    """The problem as float64 torch tensors on ``device``, A0 dense or sparse CSR."""
    import torch

    x0 = host_array(getattr(prob, "x0", None))
    F = torch.from_numpy(host_array(prob.F)).to(device)
    return dict(
        A0=_sparse_csr(prob.A0, device) if sparse else torch.from_numpy(dense_matrix(prob.A0)),
        F=F,
        X0=torch.zeros_like(F) if x0 is None else torch.from_numpy(x0).to(device),
        labels=torch.from_numpy(np.asarray(host_array(prob.labels), dtype=np.int64)).to(device),
        theta=torch.tensor(np.asarray(host_array(theta), dtype=np.float64), device=device,
                           requires_grad=True),
        T=float(prob.T),
        beta=float(prob.beta),
    )


def _sparse_csr(A0: Any, device: str) -> Any:
    import scipy.sparse
    import torch

    A = scipy.sparse.csr_matrix(A0.get() if hasattr(A0, "get") else A0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(A.indptr.astype(np.int64)),
            torch.from_numpy(A.indices.astype(np.int64)),
            torch.from_numpy(A.data.astype(np.float64)), size=A.shape, dtype=torch.float64,
            device=device, check_invariants=True)


def _ce_loss(XT: Any, labels: Any, beta: float) -> Any:
    """Mean softmax cross-entropy of the columns of beta * X(T) (n, S)."""
    import torch.nn.functional as fn

    return fn.cross_entropy(beta * XT.T, labels, reduction="mean")


def _rhs_module(t: dict[str, Any], deadline: float | None) -> Any:
    """The ODE right-hand side as a torch Module owning θ (odeint_adjoint needs parameters)."""
    import torch

    class LinearRHS(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = torch.nn.Parameter(t["theta"].detach().clone())
            self.A0, self.F = t["A0"], t["F"]  # constants, not parameters
            self.nfe = 0
            self.phase = "forward solve"

        def forward(self, _time: Any, X: Any) -> Any:
            # Checked per evaluation so a runaway stiff solve stops near its budget.
            self.nfe += 1
            if deadline is not None and time.perf_counter() > deadline:
                raise PeerTimeout(f"{self.nfe} RHS evaluations, stopped in the {self.phase}")
            d = -torch.nn.functional.softplus(self.theta)
            return self.A0 @ X + d[:, None] * X + self.F

    return LinearRHS()


def _odeint_peer(prob: Any, theta: np.ndarray, adjoint: bool, deadline: float | None,
                 device: str = "cpu", sparse: bool = False):
    import torch
    import torchdiffeq

    t = _tensors(prob, theta, device, sparse)
    rhs = _rhs_module(t, deadline)
    times = torch.tensor([0.0, t["T"]], dtype=torch.float64, device=device)
    if adjoint:
        X = torchdiffeq.odeint_adjoint(
            rhs, t["X0"], times, rtol=ODE_TOL, atol=ODE_TOL, method="dopri5",
            adjoint_params=(rhs.theta,),
        )
    else:
        X = torchdiffeq.odeint(rhs, t["X0"], times, rtol=ODE_TOL, atol=ODE_TOL, method="dopri5")
    loss = _ce_loss(X[-1], t["labels"], t["beta"])
    rhs.phase = f"backward pass (forward took {rhs.nfe} RHS evaluations)"
    loss.backward()
    return float(loss.detach()), rhs.theta.grad.detach().cpu().numpy().copy()


def odeint_adjoint(prob: Any, theta: np.ndarray, deadline: float | None = None,
                   device: str = "cpu", sparse: bool = False):
    """torchdiffeq ``odeint_adjoint``, dopri5, rtol = atol = 1e-9 (forward and adjoint).

    ``device="cuda", sparse=True`` runs it on the GPU with A0 as a torch sparse CSR tensor
    (the dense CPU peers are for small n)."""
    return _odeint_peer(prob, theta, adjoint=True, deadline=deadline, device=device,
                        sparse=sparse)


def odeint_backprop(prob: Any, theta: np.ndarray, deadline: float | None = None):
    """torchdiffeq ``odeint``, dopri5, rtol = atol = 1e-9, gradient by backprop through steps."""
    return _odeint_peer(prob, theta, adjoint=False, deadline=deadline)


def matrix_exp(prob: Any, theta: np.ndarray, deadline: float | None = None):
    """Dense ``torch.linalg.matrix_exp`` of the augmented (n+S) operator, gradient by autograd.

    X(T) = top n rows of exp(T [[A, F], [0, 0]]) [X0; I]. ``deadline`` is not checked: one
    exponential cannot be interrupted; the caller decides from the size whether to run it.
    """
    import torch

    t = _tensors(prob, theta)
    n, S = t["F"].shape
    A = t["A0"] + torch.diag(-torch.nn.functional.softplus(t["theta"]))
    bottom = torch.zeros(S, n + S, dtype=torch.float64)
    A_hat = torch.cat([torch.cat([A, t["F"]], dim=1), bottom], dim=0)
    U0 = torch.cat([t["X0"], torch.eye(S, dtype=torch.float64)], dim=0)
    XT = (torch.linalg.matrix_exp(t["T"] * A_hat) @ U0)[:n]
    loss = _ce_loss(XT, t["labels"], t["beta"])
    loss.backward()
    return float(loss.detach()), t["theta"].grad.detach().numpy().copy()


DENSE_PEER = "torch matrix_exp + autograd (dense)"

# name shown in the table -> function(prob, theta, deadline) -> (loss, grad)
TORCH_PEERS = {
    "torchdiffeq odeint_adjoint dopri5 1e-9": odeint_adjoint,
    "torchdiffeq odeint backprop dopri5 1e-9": odeint_backprop,
    DENSE_PEER: matrix_exp,
}
