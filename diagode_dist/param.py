"""Operator parametrisations: maps from the trained parameters theta to A(theta).

Every parametrisation writes the operator as

    A(theta) = A0 + diag(d(theta)) + W(theta),   W on a fixed sparsity pattern (or absent),

and follows one protocol (``OperatorParam``):

- ``theta_size(n) -> int``: the length of theta for an n-state problem (ValueError if the
  parametrisation does not fit n);
- ``pattern``: a ``diagode_dist.pattern.Pattern`` of W's entries, or None (diagonal only);
- ``operator_terms(theta) -> OperatorTerms(diag, weights)``: d (n,) or None, and W's values
  (nnz,) in the pattern's order, or None;
- ``theta_grad(theta, grad: OperatorTerms) -> dL/dtheta``: the chain rule, given
  ``grad.diag = dL/dA_ii`` (n,) and ``grad.weights = dL/dA at the pattern's entries`` (nnz,).

All arrays are of theta's module (NumPy or CuPy). The diagonal maps (``SoftplusParam``,
``ExpParam``) also keep the short diagonal protocol ``DiagonalParam`` -- any object with
``diag_from_theta(theta)`` and ``dtheta_from_ddiag(theta, g)`` is accepted wherever a
parametrisation is, and trains the diagonal alone (the fast path: no pattern is sampled).

Pattern parametrisations (one theta per entry of a pattern, in CSR order):

- ``EdgeParam(P, transform)``: A = A0 + W(theta), W_e = transform(theta_e);
- ``GeneratorParam(P, transform)``: A = A0 + W - diag(W 1): rows of W - diag(W 1) sum to zero
  (graph Laplacians, continuous-time Markov chains, compartment exchange);
- ``Stack(p1, p2, ...)``: the sum of the parts' terms, theta concatenated in that order.

Transforms: "identity" (free weights), "softplus" (w = log(1 + e^theta) >= 0) and "exp"
(w = e^theta > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._array import array_module
from .pattern import Pattern

TRANSFORMS = ("identity", "softplus", "exp")


@dataclass
class OperatorTerms:
    """The parts of A - A0 (or of dL/dA): ``diag`` (n,) or None, ``weights`` (nnz,) or None."""

    diag: Any = None
    weights: Any = None


@runtime_checkable
class DiagonalParam(Protocol):
    """The diagonal protocol: ``d = diag_from_theta(theta)``, ``dtheta_from_ddiag(theta, g)``."""

    def diag_from_theta(self, theta): ...

    def dtheta_from_ddiag(self, theta, g): ...


@runtime_checkable
class OperatorParam(Protocol):
    """The operator protocol (see the module docstring)."""

    pattern: Pattern | None

    def theta_size(self, n: int) -> int: ...

    def operator_terms(self, theta) -> OperatorTerms: ...

    def theta_grad(self, theta, grad: OperatorTerms): ...


class _DiagonalMap:
    """The operator protocol of a diagonal map (``diag_from_theta`` / ``dtheta_from_ddiag``)."""

    pattern = None

    def theta_size(self, n: int) -> int:
        return int(n)

    def operator_terms(self, theta) -> OperatorTerms:
        return OperatorTerms(diag=self.diag_from_theta(theta))

    def theta_grad(self, theta, grad: OperatorTerms):
        return self.dtheta_from_ddiag(theta, grad.diag)


class SoftplusParam(_DiagonalMap):
    """``d = -softplus(theta) = -log(1 + exp(theta))``; ``d' = -sigmoid(theta)``.

    Computed with ``logaddexp`` so that no intermediate overflows (|theta| up to 1e3 and beyond).
    """

    def diag_from_theta(self, theta):
        return -_softplus(theta)

    def dtheta_from_ddiag(self, theta, g):
        return -g * _sigmoid(theta)

    def __repr__(self) -> str:
        return "SoftplusParam()"


class ExpParam(_DiagonalMap):
    """``d = -exp(theta)``; ``d' = d``. Overflows for theta > ~709 (rejected with ValueError)."""

    def diag_from_theta(self, theta):
        xp = array_module(theta)
        return -xp.exp(theta)

    def dtheta_from_ddiag(self, theta, g):
        return g * self.diag_from_theta(theta)

    def __repr__(self) -> str:
        return "ExpParam()"


class _Diagonal(_DiagonalMap):
    """A user's diagonal map (two methods only) under the operator protocol."""

    def __init__(self, diagonal_map):
        self.map = diagonal_map

    def diag_from_theta(self, theta):
        return self.map.diag_from_theta(theta)

    def dtheta_from_ddiag(self, theta, g):
        return self.map.dtheta_from_ddiag(theta, g)

    def __repr__(self) -> str:
        return repr(self.map)


def _softplus(theta):
    return array_module(theta).logaddexp(0.0, theta)


def _sigmoid(theta):
    xp = array_module(theta)
    return xp.exp(-xp.logaddexp(0.0, -theta))  # exact in both tails


def _transform(name: str, theta):
    """(w, dw/dtheta) of a transform, elementwise."""
    xp = array_module(theta)
    if name == "softplus":
        return _softplus(theta), _sigmoid(theta)
    if name == "exp":
        w = xp.exp(theta)
        return w, w
    return theta, xp.ones_like(theta)


class _PatternParam:
    """One theta per entry of a pattern; subclasses say how W enters A."""

    def __init__(self, pattern, transform: str = "identity"):
        if not isinstance(transform, str) or transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, got "
                             f"{transform!r}")
        self.pattern = Pattern(pattern)
        self.transform = transform

    def theta_size(self, n: int) -> int:
        if self.pattern.n != n:
            raise ValueError(f"the pattern of {type(self).__name__} is {self.pattern.n} x "
                             f"{self.pattern.n}, but the problem has n = {n} states")
        return self.pattern.nnz

    def weights(self, theta):
        """W's values (nnz,) in the pattern's order."""
        return _transform(self.transform, theta)[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.pattern!r}, transform={self.transform!r})")


class EdgeParam(_PatternParam):
    """``A = A0 + W(theta)``, ``W[rows[e], cols[e]] = transform(theta[e])``.

    pattern : SciPy sparse matrix (its stored entries, CSR order) or dense 0/1 mask (row-major
        nonzeros), n x n; transform : "identity", "softplus" or "exp".
    """

    def operator_terms(self, theta) -> OperatorTerms:
        return OperatorTerms(weights=self.weights(theta))

    def theta_grad(self, theta, grad: OperatorTerms):
        return grad.weights * _transform(self.transform, theta)[1]


class GeneratorParam(_PatternParam):
    """``A = A0 + W(theta) - diag(W(theta) 1)``: the added part's rows sum to zero.

    With ``transform="softplus"`` or ``"exp"`` the weights are positive rates: a graph
    Laplacian, the generator of a continuous-time Markov chain (as A^T), or compartment exchange
    du_i/dt = sum_k w_ik (u_k - u_i). dL/dw_e = dL/dA_{i_e k_e} - dL/dA_{i_e i_e}.
    """

    def operator_terms(self, theta) -> OperatorTerms:
        w = self.weights(theta)
        return OperatorTerms(diag=-self.pattern.row_sums(w), weights=w)

    def theta_grad(self, theta, grad: OperatorTerms):
        edge = grad.weights - self.pattern.take_rows(grad.diag)
        return edge * _transform(self.transform, theta)[1]


class Stack:
    """The sum of parametrisations, theta concatenated in the order of ``parts``.

    ``Stack(SoftplusParam(), GeneratorParam(P, "softplus"))``: theta = [diagonal (n), edges
    (nnz)], A = A0 + diag(-softplus(theta[:n])) + W - diag(W 1).
    """

    def __init__(self, *parts):
        if not parts:
            raise ValueError("Stack needs at least one parametrisation")
        self.parts = tuple(as_operator_param(part, f"Stack part {i}")
                           for i, part in enumerate(parts))
        patterns = [part.pattern for part in self.parts if part.pattern is not None]
        self.pattern = None
        for pattern in patterns:
            self.pattern = pattern if self.pattern is None else self.pattern.concat(pattern)

    def theta_size(self, n: int) -> int:
        return sum(part.theta_size(n) for part in self.parts)

    def _n(self, theta) -> int:
        """n of a theta: the patterns' size, else (diagonal parts only, theta_size linear in
        n) the length of theta over the length per state."""
        if self.pattern is not None:
            return self.pattern.n
        return theta.shape[0] // self.theta_size(1)

    def _slices(self, theta):
        """theta's slice and the weights' slice of each part."""
        n = self._n(theta)
        sizes = [part.theta_size(n) for part in self.parts]
        at, w_at, out = 0, 0, []
        for part, size in zip(self.parts, sizes, strict=True):
            nnz = part.pattern.nnz if part.pattern is not None else 0
            out.append((slice(at, at + size), slice(w_at, w_at + nnz)))
            at, w_at = at + size, w_at + nnz
        return out

    def operator_terms(self, theta) -> OperatorTerms:
        diag, weights = None, []
        for part, (at, _) in zip(self.parts, self._slices(theta), strict=True):
            terms = part.operator_terms(theta[at])
            if terms.diag is not None:
                diag = terms.diag if diag is None else diag + terms.diag
            if terms.weights is not None:
                weights.append(terms.weights)
        xp = array_module(theta)
        return OperatorTerms(diag, xp.concatenate(weights) if weights else None)

    def theta_grad(self, theta, grad: OperatorTerms):
        xp = array_module(theta)
        pieces = []
        for part, (at, w_at) in zip(self.parts, self._slices(theta), strict=True):
            weights = grad.weights[w_at] if part.pattern is not None else None
            pieces.append(part.theta_grad(theta[at], OperatorTerms(grad.diag, weights)))
        return xp.concatenate(pieces)

    def __repr__(self) -> str:
        return f"Stack({', '.join(repr(part) for part in self.parts)})"


def as_operator_param(param, name: str = "param"):
    """``param`` under the operator protocol (a diagonal map with two methods is wrapped);
    TypeError naming ``name`` if it follows neither protocol."""
    if isinstance(param, OperatorParam):
        return param
    if isinstance(param, DiagonalParam):
        return _Diagonal(param)
    raise TypeError(
        f"{name} must be a parametrisation (e.g. SoftplusParam(), EdgeParam(P), "
        "GeneratorParam(P), Stack(...)) or have diag_from_theta(theta) and "
        f"dtheta_from_ddiag(theta, g) methods, got {type(param).__name__}")


def check_param(param) -> None:
    """Raise TypeError unless ``param`` follows the operator or the diagonal protocol."""
    as_operator_param(param)
