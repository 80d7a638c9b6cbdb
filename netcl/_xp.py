"""The part of the array API that netcl uses, as types.

`array_api_compat.array_namespace` returns a module, so to a type checker every call made
through it would be untyped. netcl's stub of array-api-compat (`stubs/array_api_compat`)
says that it returns an `ArrayNamespace`, and netcl's reference maths is written against
`XArray`, so that path is type-checked like the rest. `is_torch` is the test for torch
tensors that the adapters run on arrays at every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import EllipsisType
from typing import Protocol, Self, TypeVar

import array_api_compat

__all__ = ["ArrayNamespace", "XArray", "is_torch", "torch_kinds"]


_TORCH_TYPES: dict[type, bool] = {}


def is_torch(x: object) -> bool:
    """Whether `x` is a torch tensor: array_api_compat's test, remembered per type (it
    runs for arrays at every step, and a type cannot become a tensor's later: torch's
    classes exist only once it is imported)."""
    kind = type(x)
    found = _TORCH_TYPES.get(kind)
    if found is None:
        found = _TORCH_TYPES[kind] = array_api_compat.is_torch_array(x)
    return found


def torch_kinds(kinds: Iterable[type]) -> bool:
    """Whether every one of `kinds` is known (`is_torch`) as a torch tensor's type."""
    return all(map(_TORCH_TYPES.get, kinds))


class XArray(Protocol):
    """The operations netcl's reference maths applies to an array-API array."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        ...

    @property
    def dtype(self) -> object:
        """The array's dtype, an object of its namespace."""
        ...

    def __neg__(self) -> Self: ...
    def __add__(self, other: Self | float, /) -> Self: ...
    def __radd__(self, other: float, /) -> Self: ...
    def __sub__(self, other: Self | float, /) -> Self: ...
    def __mul__(self, other: Self | float, /) -> Self: ...
    def __rmul__(self, other: float, /) -> Self: ...
    def __truediv__(self, other: Self | float, /) -> Self: ...
    def __setitem__(self, key: EllipsisType, value: Self | float, /) -> None: ...


A = TypeVar("A", bound=XArray)


class FInfo(Protocol):
    """What `finfo` says of a floating dtype (the part netcl reads)."""

    @property
    def max(self) -> float:
        """The largest finite value."""
        ...


class ArrayNamespace(Protocol):
    """The functions and dtypes of an array-API namespace that netcl uses."""

    @property
    def float32(self) -> object:
        """The float32 dtype."""
        ...

    @property
    def float64(self) -> object:
        """The float64 dtype."""
        ...

    @property
    def int64(self) -> object:
        """The int64 dtype."""
        ...

    def logical_not(self, x: XArray, /) -> XArray:
        """Element-wise not of a bool array."""
        ...

    def logical_and(self, x: XArray, y: XArray, /) -> XArray:
        """Element-wise and of two bool arrays."""
        ...

    def astype(self, x: XArray, dtype: object, /) -> XArray:
        """`x` converted to `dtype`."""
        ...

    def sum(self, x: XArray, /) -> XArray:
        """The sum of every element, as a 0-d array."""
        ...

    def full_like(self, x: A, /, fill_value: float) -> A:
        """An array of `x`'s shape, dtype and device filled with `fill_value`."""
        ...

    def sqrt(self, x: A, /) -> A:
        """Element-wise square root, correctly rounded."""
        ...

    def minimum(self, x: A, y: A | float, /) -> A:
        """Element-wise minimum."""
        ...

    def maximum(self, x: A, y: A | float, /) -> A:
        """Element-wise maximum."""
        ...

    def clip(self, x: A, /, min: float | None = None, max: float | None = None) -> A:
        """`x` clamped to [min, max]."""
        ...

    def isfinite(self, x: XArray, /) -> XArray:
        """Element-wise: neither NaN nor infinite (a bool array)."""
        ...

    def where(self, condition: XArray, x: A, y: A, /) -> A:
        """`x` where `condition` holds, else `y`."""
        ...

    def finfo(self, dtype: object, /) -> FInfo:
        """Limits of a floating dtype."""
        ...

    def zeros_like(self, x: A, /, *, dtype: object | None = None) -> A:
        """Zeros of `x`'s shape and device, in its dtype or `dtype`."""
        ...

    def asarray(
        self, obj: object, /, *, dtype: object = None, device: object = None, copy: bool | None = None
    ) -> XArray:
        """An array of this namespace from `obj`."""
        ...
