"""Checks of hyperparameter values: each names the hyperparameter, the value and what is allowed."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["Flag", "HyperCheck", "Pair", "Real"]


class HyperCheck(Protocol):
    """Returns the value, normalized, or raises TypeError/ValueError."""

    def __call__(self, name: str, value: object) -> float | bool | tuple[float, float]: ...


@dataclass(frozen=True)
class Real:
    """A finite real number in an interval."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def allowed(self, name: str) -> str:
        left = f"{self.low} {'<' if self.low_open else '<='} "
        if math.isinf(self.high):
            return f"{left}{name}, finite"
        return f"{left}{name} {'<' if self.high_open else '<='} {self.high}"

    def __call__(self, name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{name} must be a real number ({self.allowed(name)}), got {type(value).__name__} {value!r}"
            )
        number = float(value)
        inside = (
            math.isfinite(number)
            and (number > self.low if self.low_open else number >= self.low)
            and (number < self.high if self.high_open else number <= self.high)
        )
        if not inside:
            raise ValueError(f"Invalid {name} value: {value!r} (allowed: {self.allowed(name)})")
        return number


@dataclass(frozen=True)
class Flag:
    """A bool (numpy's bool too)."""

    def __call__(self, name: str, value: object) -> bool:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class Pair:
    """Two reals, each checked by `each` (Adam's betas)."""

    each: Real

    def __call__(self, name: str, value: object) -> tuple[float, float]:
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise TypeError(f"{name} must be a pair of real numbers, got {type(value).__name__} {value!r}")
        first = self.each(f"{name}[0]", value[0])
        second = self.each(f"{name}[1]", value[1])
        return (first, second)
