"""Exceptions of the numerical core."""

from __future__ import annotations


class AccuracyError(ArithmeticError):
    """The requested accuracy cannot be certified: the answer is refused, not returned.

    Raised when the Krylov error control cannot meet ``rtol`` within its work limit (``k`` too
    small for the operator's stiffness, or ``max_substeps`` reached), or when the accumulated
    error estimate of a result exceeds ``rtol``. The message names the bound that was hit and
    what to change (a larger ``k``, a looser ``rtol``, a larger ``max_substeps``).
    """
