"""diagode-dist: train parameters of large linear ODE systems with exact adjoint gradients.

    import diagode_dist as dd
    prob = dd.Problem(A0, F, labels, T=2.0, beta=10.0)
    loss, grad = dd.loss_and_grad(prob, theta)
    theta, history = dd.fit(prob, theta0, epochs=20, lr=1e-3)
    labels = dd.predict(prob, theta)

Besides the diagonal: ``dd.EdgeParam(P)``, ``dd.GeneratorParam(P)`` and ``dd.Stack(...)`` train
weights on a sparsity pattern P (``diagode_dist.param``).
"""

from .adjoint import loss_and_grad, loss_grad_sums
from .errors import AccuracyError
from .files import ProblemFiles
from .optim import Adam
from .options import TrainOptions
from .param import (
    DiagonalParam,
    EdgeParam,
    ExpParam,
    GeneratorParam,
    OperatorParam,
    SoftplusParam,
    Stack,
)
from .problem import Problem, demo_problem
from .solve import predict, predict_proba, solve
from .train import epoch_batches, fit

# The Dask service is imported on first use, so ``import diagode_dist`` does not load distributed.
_SERVICE = {"submit", "attach", "fit_distributed", "RunHandle", "connect", "open_client",
            "DaskProblem"}

__all__ = [
    "Problem", "demo_problem", "SoftplusParam", "ExpParam", "DiagonalParam", "ProblemFiles",
    "EdgeParam", "GeneratorParam", "Stack", "OperatorParam", "solve", "predict", "predict_proba",
    "TrainOptions",
    "loss_and_grad", "loss_grad_sums", "AccuracyError", "fit", "epoch_batches", "Adam",
    *sorted(_SERVICE),
]


def __getattr__(name):
    if name in _SERVICE:
        from . import service

        return getattr(service, name)
    raise AttributeError(f"module 'diagode_dist' has no attribute {name!r}")
__version__ = "0.1.0"
