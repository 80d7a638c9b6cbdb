"""The interface every array-library adapter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from netcl._types import ParameterLike
from netcl._update import Step

__all__ = ["Backend", "Work", "SUPPORTED_DTYPES", "check_same_shape", "describe"]

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_same_shape(data: Any, other: Any, where: str) -> None:
    """Raise ValueError unless `other` (a gradient or state buffer) has `data`'s shape."""
    if tuple(other.shape) != tuple(data.shape):
        raise ValueError(f"{where} has shape {tuple(other.shape)}, but its parameter has shape {tuple(data.shape)}")


def describe(x: object) -> str:
    """A short name for the kind of `x`, for error messages."""
    kind = type(x)
    return f"{kind.__module__}.{kind.__qualname__}"


@dataclass
class Work:
    """One parameter to update at this step, already validated."""

    param: ParameterLike
    data: Any
    grad: Any
    state: MutableMapping[str, Any]
    """The parameter's live state (buffers by name); the backend may rebind entries."""
    member: tuple[float, ...] = ()
    """The parameter's own scalars at this step (`UpdateRule.member_scalars`)."""


class Backend(ABC):
    """How netcl reaches one kind of array: checks, state, the update, host copies.

    Every `check_*` method raises `TypeError` or `ValueError` naming `where`; none
    of them changes anything.
    """

    name: str
    stable: bool
    """Whether an array cannot change what `check_*` checked (so the same objects
    pass again without a check)."""

    @abstractmethod
    def check_param(self, data: Any, where: str) -> None:
        """Raise unless netcl can update `data` in this backend."""

    @abstractmethod
    def check_grad(self, data: Any, grad: Any, where: str) -> None:
        """Raise unless `grad` can be the gradient of `data`."""

    @abstractmethod
    def check_state(self, data: Any, buffer: Any, where: str) -> None:
        """Raise unless `buffer`, made earlier for this parameter, still fits `data`."""

    @abstractmethod
    def dtype(self, data: Any) -> np.dtype[Any]:
        """The numpy dtype of `data` (which passed `check_param`)."""

    @abstractmethod
    def zeros_like(self, data: Any) -> Any:
        """A new state buffer for `data`, filled with zeros, on its device."""

    @abstractmethod
    def to_host(self, array: Any) -> npt.NDArray[Any]:
        """A numpy copy of `array` that shares no memory with it."""

    @abstractmethod
    def from_host(self, host: npt.NDArray[Any], like: Any) -> Any:
        """A copy of `host` in this backend, on the device of `like`."""

    @abstractmethod
    def zero_(self, grad: Any) -> None:
        """Set every element of `grad` to zero, in place."""

    @abstractmethod
    def apply(self, step: Step, work: Sequence[Work], cache: MutableMapping[Hashable, Any]) -> None:
        """Update every parameter in `work` by `step` (in place where the array allows).

        `cache` belongs to the calling optimizer and this backend, and lasts from one step
        to the next: what the backend keeps there to make the next step cheaper. A step
        that passes the very `work` list of an earlier step passes the same arrays,
        gradients and state buffers (only each item's `member` scalars may differ).
        """
