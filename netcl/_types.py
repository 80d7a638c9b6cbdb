"""The kinds of array netcl optimizes, as structural types.

A parameter's array is one of:

* a [`pyopencl.array.Array`][pyopencl.array.Array];
* any object that exposes an OpenCL buffer the way `pyopencl.array.Array` names it
  ([`ClArrayLike`][netcl.ClArrayLike]);
* an array-API array: numpy, torch, array_api_strict, cupy, jax ...
  ([`ArrayAPIArray`][netcl.ArrayAPIArray]).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

__all__ = ["Array", "ArrayAPIArray", "ClArrayLike", "ParameterLike"]


class ClArrayLike(Protocol):
    """An object that exposes an OpenCL buffer the way `pyopencl.array.Array` does.

    netcl updates it in place with its fused kernel. Its elements are the `prod(shape)`
    values of type `dtype` that start `offset` bytes into `base_data`, laid out
    contiguously: in C order, or as `strides` say when the object has that attribute
    (C or Fortran order). The kernel runs on `queue`. When the object has an `events`
    list, the kernel waits for those events first; when it has `add_event`, the kernel's
    event is recorded there.
    """

    @property
    def base_data(self) -> cl.Buffer:
        """The OpenCL buffer that holds the elements."""
        ...

    @property
    def offset(self) -> int:
        """Where the first element starts in `base_data`, in bytes."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        ...

    @property
    def dtype(self) -> np.dtype[Any]:  # numpy's dtype is generic over its scalar type
        """The element type: float32 or float64."""
        ...

    @property
    def queue(self) -> cl.CommandQueue | None:
        """The queue netcl's kernel is enqueued on (it must not be None)."""
        ...


@runtime_checkable
class ArrayAPIArray(Protocol):
    """An array of an array-API library (numpy, torch, array_api_strict, cupy, jax ...).

    Any array that takes part in DLPack has `__dlpack_device__`; netcl uses that
    method and `shape` only to tell such arrays from other objects, and reaches the library's
    functions through `array_api_compat.array_namespace`.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        ...

    def __dlpack_device__(self) -> tuple[int, int]:
        """The DLPack device type and id of the array."""
        ...


Array: TypeAlias = "cl_array.Array | ClArrayLike | ArrayAPIArray"
"""Any array netcl can optimize."""


class ParameterLike(Protocol):
    """Anything with a `data` array and a `grad` array (or None) is a parameter.

    [`netcl.Parameter`][netcl.Parameter] is one; so is a `torch.nn.Parameter`, and so is
    any class of the user's own with those two attributes. netcl reads both attributes
    at every step. It writes `data` only for arrays that cannot be changed in place
    (jax), and `grad` only in `zero_grad(set_to_none=True)`.
    """

    @property
    def data(self) -> Array:
        """The parameter's values."""
        ...

    @property
    def grad(self) -> Array | None:
        """The gradient of the loss with respect to `data`, or None to skip the parameter."""
        ...
