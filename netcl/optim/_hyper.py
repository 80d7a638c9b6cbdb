"""Checks of hyperparameter values: each names the hyperparameter, the value and what is allowed.

A check runs when a value enters an optimizer (the constructor, `add_param_group`,
`load_state_dict`) and again at the next `step()` whenever a value in `param_groups`
was changed; `in_dtype` repeats it in the dtype of the parameters the value is used
with, since a value that is fine in float64 may round to zero or overflow in float32.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["PRECISION_HYPERPARAMETERS", "Flag", "HyperCheck", "Pair", "Real"]


class HyperCheck(Protocol):
    """Returns the value, normalized, or raises TypeError/ValueError naming `where` + `name`."""

    def __call__(self, name: str, value: object, where: str = "") -> float | bool | tuple[float, float]: ...

    def in_dtype(self, name: str, value: object, dtype: np.dtype[Any], where: str = "") -> None:
        """Raise ValueError if the (already checked) value leaves its range in `dtype`."""
        ...


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

    def _inside(self, number: float) -> bool:
        return (
            math.isfinite(number)
            and (number > self.low if self.low_open else number >= self.low)
            and (number < self.high if self.high_open else number <= self.high)
        )

    def __call__(self, name: str, value: object, where: str = "") -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{where}{name} must be a real number ({self.allowed(name)}), got {type(value).__name__} {value!r}"
            )
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64
            number = math.inf
        if not self._inside(number):
            raise ValueError(f"Invalid {where}{name} value: {value!r} (allowed: {self.allowed(name)})")
        return number

    def in_dtype(self, name: str, value: object, dtype: np.dtype[Any], where: str = "") -> None:
        assert isinstance(value, float)
        with np.errstate(over="ignore", under="ignore"):
            rounded = float(dtype.type(value))
        if not self._inside(rounded):
            raise ValueError(
                f"Invalid {where}{name} value: {value!r} becomes {rounded!r} in {dtype}, the dtype of the "
                f"parameters it is used with (allowed: {self.allowed(name)} in that dtype)"
            )


@dataclass(frozen=True)
class Flag:
    """A bool (numpy's bool too)."""

    def __call__(self, name: str, value: object, where: str = "") -> bool:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        raise TypeError(f"{where}{name} must be a bool, got {type(value).__name__} {value!r}")

    def in_dtype(self, name: str, value: object, dtype: np.dtype[Any], where: str = "") -> None:
        pass


@dataclass(frozen=True)
class Pair:
    """Two reals, each checked by `each` (Adam's betas)."""

    each: Real

    def __call__(self, name: str, value: object, where: str = "") -> tuple[float, float]:
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise TypeError(f"{where}{name} must be a pair of real numbers, got {type(value).__name__} {value!r}")
        first = self.each(f"{name}[0]", value[0], where)
        second = self.each(f"{name}[1]", value[1], where)
        return (first, second)

    def in_dtype(self, name: str, value: object, dtype: np.dtype[Any], where: str = "") -> None:
        assert isinstance(value, tuple)
        for k, each in enumerate(value):
            self.each.in_dtype(f"{name}[{k}]", each, dtype, where)


PRECISION_HYPERPARAMETERS: dict[str, HyperCheck] = {
    "master_weights": Flag(),
    "stochastic_rounding": Flag(),
}
"""Every optimizer's options for half-precision parameters (see `netcl._precision`)."""
