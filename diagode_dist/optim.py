"""Adam, as a pure function of (theta, grad, state): the same code runs in ``fit`` and in the
scheduler-side parameter server.

    g_t = grad + weight_decay * theta          (coupled L2, as in the seed package)
    m_t = b1 m + (1 - b1) g_t;  v_t = b2 v + (1 - b2) g_t^2
    theta <- clip(theta - lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps), *clamp)
"""

from __future__ import annotations

import math
import numbers

from ._array import array_module
from ._checks import positive_real


class Adam:
    """Bias-corrected Adam with coupled weight decay and a clamp after every step.

    Parameters
    ----------
    lr : step size (units of theta)
    betas : (b1, b2) in [0, 1)
    eps : added after the square root
    weight_decay : L2 coefficient added to the gradient
    clamp : (lo, hi) bounds applied to theta after each step, or None
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 clamp: tuple[float, float] | None = (-50.0, 50.0)):
        self.lr = positive_real(lr, "lr")
        b1, b2 = betas
        for name, b in (("betas[0]", b1), ("betas[1]", b2)):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {b}")
        self.betas = (float(b1), float(b2))
        self.eps = positive_real(eps, "eps")
        if (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
                or not math.isfinite(weight_decay) or weight_decay < 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        if clamp is not None:
            lo, hi = (float(c) for c in clamp)
            if not lo < hi:
                raise ValueError(f"clamp must be (lo, hi) with lo < hi, got {clamp!r}")
            clamp = (lo, hi)
        self.clamp = clamp

    def init(self, theta) -> dict:
        """Fresh state: zero moments, step 0."""
        xp = array_module(theta)
        return {"m": xp.zeros_like(theta), "v": xp.zeros_like(theta), "t": 0}

    def step(self, theta, grad, state: dict):
        """One update. Returns (new_theta, new_state); never modifies its inputs."""
        xp = array_module(theta)
        b1, b2 = self.betas
        g = grad + self.weight_decay * theta if self.weight_decay else grad
        t = state["t"] + 1
        m = b1 * state["m"] + (1.0 - b1) * g
        v = b2 * state["v"] + (1.0 - b2) * (g * g)
        m_hat = m / (1.0 - b1**t)
        v_hat = v / (1.0 - b2**t)
        new = theta - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)
        if self.clamp is not None:
            new = xp.clip(new, *self.clamp)
        return new, {"m": m, "v": v, "t": t}

    def __repr__(self) -> str:
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, clamp={self.clamp})")
