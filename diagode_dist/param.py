"""Maps from the trained parameters theta to the diagonal d(theta) of A = A0 + diag(d).

A map is any object with two methods (the ``DiagonalParam`` protocol):

- ``diag_from_theta(theta) -> d``: elementwise, same shape and module as ``theta``;
- ``dtheta_from_ddiag(theta, g) -> dL/dtheta``: the chain rule, given ``g = dL/dd``.

Both built-in maps are monotone and keep the diagonal negative (stabilising).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._array import array_module


@runtime_checkable
class DiagonalParam(Protocol):
    """Protocol of a diagonal parametrisation (see the module docstring)."""

    def diag_from_theta(self, theta): ...

    def dtheta_from_ddiag(self, theta, g): ...


class SoftplusParam:
    """``d = -softplus(theta) = -log(1 + exp(theta))``; ``d' = -sigmoid(theta)``.

    Computed with ``logaddexp`` so that no intermediate overflows (|theta| up to 1e3 and beyond).
    """

    def diag_from_theta(self, theta):
        xp = array_module(theta)
        return -xp.logaddexp(0.0, theta)

    def dtheta_from_ddiag(self, theta, g):
        xp = array_module(theta)
        sigmoid = xp.exp(-xp.logaddexp(0.0, -theta))  # exact in both tails
        return -g * sigmoid

    def __repr__(self) -> str:
        return "SoftplusParam()"


class ExpParam:
    """``d = -exp(theta)``; ``d' = d``. Overflows for theta > ~709 (rejected with ValueError)."""

    def diag_from_theta(self, theta):
        xp = array_module(theta)
        return -xp.exp(theta)

    def dtheta_from_ddiag(self, theta, g):
        return g * self.diag_from_theta(theta)

    def __repr__(self) -> str:
        return "ExpParam()"


def check_param(param) -> None:
    """Raise TypeError unless ``param`` follows the DiagonalParam protocol."""
    if not isinstance(param, DiagonalParam):
        raise TypeError(
            "param must have diag_from_theta(theta) and dtheta_from_ddiag(theta, g) methods "
            f"(e.g. SoftplusParam()), got {type(param).__name__}"
        )
