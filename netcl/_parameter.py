"""`Parameter`: a small typed holder of an array and its gradient."""

from __future__ import annotations

from typing import Any, Generic

from typing_extensions import TypeVar

from netcl._backends import backend_for
from netcl._types import Array
from netcl._writes import note_parameter_write

__all__ = ["Parameter"]

A = TypeVar("A", bound=Array, default=Any)
"""The kind of array a `Parameter` holds. A bare `Parameter` (no type argument, as in
`def f(p: Parameter) -> None`) is `Parameter[Any]`, which every parameter is: a
`Parameter[pyopencl.array.Array]` is not a `Parameter[Array]`, since `data` and `grad`
can be assigned."""


class Parameter(Generic[A]):
    """A parameter: an array to optimize and, once computed, its gradient.

    ```python
    import numpy as np
    import pyopencl as cl
    import pyopencl.array as cl_array

    from netcl import Parameter

    queue = cl.CommandQueue(cl.create_some_context(interactive=False))
    weight = Parameter(cl_array.zeros(queue, (64, 10), np.float32))
    weight.grad = cl_array.zeros_like(weight.data)  # filled by your backward pass
    ```

    Assigning `data` or `grad` is noted: a step after a step that no such assignment
    (and no write to the optimizer's state) followed checks only that its param group
    holds the same parameters (see the pyopencl guide, "The cheapest step").

    Args:
        data: The array to optimize: a `pyopencl.array.Array`, an object exposing an
            OpenCL buffer ([`ClArrayLike`][netcl.ClArrayLike]) or an array-API array.
        grad: Its gradient, or None (the optimizer then skips the parameter).

    Raises:
        TypeError: `data` or `grad` is not an array netcl can optimize.
    """

    __slots__ = ("data", "grad")

    data: A
    grad: A | None

    def __init__(self, data: A, grad: A | None = None) -> None:
        backend_for(data, "data")
        if grad is not None:
            backend_for(grad, "grad")
        self.data = data
        self.grad = grad

    def __setattr__(self, name: str, value: object) -> None:
        # (noted, so that a step can tell in one comparison that no parameter's array or
        # gradient was replaced since its last: see `netcl._writes`)
        object.__setattr__(self, name, value)
        note_parameter_write()

    def __repr__(self) -> str:
        shape = getattr(self.data, "shape", "?")
        dtype = getattr(self.data, "dtype", "?")
        kind = type(self.data).__qualname__
        has_grad = "set" if self.grad is not None else "None"
        return f"Parameter({kind}, shape={shape}, dtype={dtype}, grad={has_grad})"
