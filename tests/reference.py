"""Independent oracles: torch.optim.RMSprop, and RMSProp written out in extended precision."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

F = npt.NDArray[Any]

FLAG_COMBINATIONS = [
    {"momentum": momentum, "centered": centered, "weight_decay": weight_decay, "maximize": maximize}
    for momentum in (0.0, 0.9)
    for centered in (False, True)
    for weight_decay in (0.0, 0.1)
    for maximize in (False, True)
]


def flag_id(flags: dict[str, Any]) -> str:
    on = [f"{k}={v}" for k, v in flags.items() if v]
    return ",".join(on) or "plain"


def wide(dtype: np.dtype[Any]) -> type[np.floating[Any]]:
    """A type with more precision than `dtype`: float64 for float32, long double for float64."""
    return np.float64 if dtype == np.float32 else np.longdouble


class WideRMSProp:
    """The update from the concept page and torch's docs, in a wider type than the data."""

    def __init__(
        self,
        p: F,
        *,
        lr: float,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
    ) -> None:
        self.t = wide(p.dtype)
        self.p = p.astype(self.t)
        self.v = np.zeros_like(self.p)
        self.m = np.zeros_like(self.p)
        self.b = np.zeros_like(self.p)
        self.lr, self.alpha, self.eps = self.t(lr), self.t(alpha), self.t(eps)
        self.wd, self.momentum = self.t(weight_decay), self.t(momentum)
        self.centered, self.maximize = centered, maximize

    def step(self, grad: F) -> None:
        g = grad.astype(self.t)
        if self.maximize:
            g = -g
        g = g + self.wd * self.p
        one = self.t(1)
        self.v = self.alpha * self.v + (one - self.alpha) * g * g
        if self.centered:
            self.m = self.alpha * self.m + (one - self.alpha) * g
            denom = np.sqrt(self.v - self.m * self.m) + self.eps
        else:
            denom = np.sqrt(self.v) + self.eps
        if self.momentum > 0:
            self.b = self.momentum * self.b + g / denom
            self.p = self.p - self.lr * self.b
        else:
            self.p = self.p - self.lr * g / denom


def well_conditioned(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, *, maximize: bool, steps: int
) -> tuple[F, list[F]]:
    """A start point and gradients that keep every operation of the update well conditioned.

    |p| >= 1 and lr = 1e-3 keep p away from 0 over `steps` <= 50 steps (each moves it by at
    most lr / sqrt(1 - alpha) = 1e-2), and each element's gradient keeps the sign that makes
    `g + weight_decay * p` a sum of like signs, so no step subtracts nearly equal numbers.
    Magnitudes still span 1e-3 to 1e2 from step to step.
    """
    p = rng.choice([-1.0, 1.0], shape) * rng.uniform(1.0, 4.0, shape)
    sign = np.sign(p) * (-1.0 if maximize else 1.0)
    grads = [
        (sign * rng.uniform(0.5, 2.0, shape) * 10.0 ** float(rng.integers(-3, 3))).astype(dtype) for _ in range(steps)
    ]
    return p.astype(dtype), grads
