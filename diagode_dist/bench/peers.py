"""Peers on the identical loss and gradient, in PyTorch (float64, CPU).

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
from typing import Any

import numpy as np

from .cases import _dense, _host

ODE_TOL = 1e-9  # rtol = atol of the dopri5 peers


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


def _tensors(prob: Any, theta: np.ndarray) -> dict[str, Any]:
    """The problem as float64 torch tensors (A0 dense: the peers are for small n)."""
    import torch

    x0 = _host(getattr(prob, "x0", None))
    F = _host(prob.F)
    return dict(
        A0=torch.from_numpy(_dense(prob.A0)),
        F=torch.from_numpy(F),
        X0=torch.zeros_like(torch.from_numpy(F)) if x0 is None else torch.from_numpy(x0),
        labels=torch.from_numpy(np.asarray(_host(prob.labels), dtype=np.int64)),
        theta=torch.tensor(np.asarray(_host(theta), dtype=np.float64), requires_grad=True),
        T=float(prob.T),
        beta=float(prob.beta),
    )


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
            self.register_buffer("A0", t["A0"])
            self.register_buffer("F", t["F"])
            self.nfe = 0

        def forward(self, _time: Any, X: Any) -> Any:
            # Checked per evaluation so a runaway stiff solve stops near its budget.
            self.nfe += 1
            if deadline is not None and time.perf_counter() > deadline:
                raise PeerTimeout(f"past its time budget after {self.nfe} evaluations")
            d = -torch.nn.functional.softplus(self.theta)
            return self.A0 @ X + d[:, None] * X + self.F

    return LinearRHS()


def _odeint_peer(prob: Any, theta: np.ndarray, adjoint: bool, deadline: float | None):
    import torch
    import torchdiffeq

    t = _tensors(prob, theta)
    rhs = _rhs_module(t, deadline)
    times = torch.tensor([0.0, t["T"]], dtype=torch.float64)
    if adjoint:
        X = torchdiffeq.odeint_adjoint(
            rhs, t["X0"], times, rtol=ODE_TOL, atol=ODE_TOL, method="dopri5",
            adjoint_params=(rhs.theta,),
        )
    else:
        X = torchdiffeq.odeint(rhs, t["X0"], times, rtol=ODE_TOL, atol=ODE_TOL, method="dopri5")
    loss = _ce_loss(X[-1], t["labels"], t["beta"])
    loss.backward()
    return float(loss.detach()), rhs.theta.grad.detach().numpy().copy()


def odeint_adjoint(prob: Any, theta: np.ndarray, deadline: float | None = None):
    """torchdiffeq ``odeint_adjoint``, dopri5, rtol = atol = 1e-9 (forward and adjoint)."""
    return _odeint_peer(prob, theta, adjoint=True, deadline=deadline)


def odeint_backprop(prob: Any, theta: np.ndarray, deadline: float | None = None):
    """torchdiffeq ``odeint``, dopri5, rtol = atol = 1e-9, gradient by backprop through the steps."""
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
    A_hat = torch.cat([torch.cat([A, t["F"]], dim=1), torch.zeros(S, n + S, dtype=torch.float64)], dim=0)
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
