"""`flat_parameters`: a model's parameters as views of one buffer, gradients of another.

The optimizers find runs of parameters whose arrays (the data, the gradient and each
state buffer) follow each other in one buffer, and update such a run as one member of
one launch: a whole model in one kernel, whatever the number of its tensors. A group's
state buffers are made the same way, one buffer per state name with a view per
parameter, so the run stays whole. `flat_parameters` lays out parameters so; arrays
that a user lays out the same way get the same launch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from math import prod
from typing import Any, overload

import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array

from netcl._backends import describe
from netcl._backends.base import DTYPE_NAMES, SUPPORTED_DTYPES
from netcl._parameter import Parameter

__all__ = ["flat_parameters"]


@overload
def flat_parameters(
    queue: cl.CommandQueue, shapes: Sequence[tuple[int, ...]], dtype: npt.DTypeLike = np.float32
) -> list[Parameter[cl_array.Array]]: ...
@overload
def flat_parameters(
    queue: None, shapes: Sequence[tuple[int, ...]], dtype: npt.DTypeLike = np.float32
) -> list[Parameter[npt.NDArray[Any]]]: ...


def flat_parameters(
    queue: cl.CommandQueue | None, shapes: Sequence[tuple[int, ...]], dtype: npt.DTypeLike = np.float32
) -> list[Parameter[cl_array.Array]] | list[Parameter[npt.NDArray[Any]]]:
    """Parameters of the given shapes whose data are views of one buffer, in order, and
    whose gradients are views of another, all zero.

    The optimizers step such parameters (and any laid out the same way) with one launch
    per run of them, with no limit on their number. Fill the data in place
    (`param.data.set(...)`, or `param.data[...] = ...` for numpy) and write the
    gradients in place too: clear them with `optimizer.zero_grad(set_to_none=False)`,
    since a new gradient array ends the run at its parameter.

    Args:
        queue: The queue of the pyopencl arrays, or None for numpy arrays.
        shapes: Each parameter's shape.
        dtype: float32, float64, float16 or bfloat16 (`ml_dtypes.bfloat16`).

    Raises:
        TypeError: `queue` is not a pyopencl queue or None, `dtype` is not one of
            those, or a shape is not a tuple of ints.
        ValueError: A dimension is negative, or the values do not fit in one buffer
            (the device's largest, `max_mem_alloc_size`).

    Example:
        ```python
        from netcl import flat_parameters
        from netcl.optim import Adam

        params = flat_parameters(None, [(64, 10), (10,)])
        optimizer = Adam(params, lr=1e-3)
        params[0].grad[...] = 0.5  # your backward pass writes the gradients in place
        optimizer.step()
        ```
    """
    if queue is not None and not isinstance(queue, cl.CommandQueue):
        raise TypeError(f"queue must be a pyopencl CommandQueue, or None for numpy arrays; got {describe(queue)}")
    try:  # (None, numpy's float64 and torch's float32, says neither here)
        kind = None if dtype is None else np.dtype(dtype)
    except TypeError:
        kind = None
    if kind is None or kind not in SUPPORTED_DTYPES:  # (`None in` a list of dtypes finds float64)
        raise TypeError(f"dtype must be {DTYPE_NAMES}, got {dtype if kind is None else kind}")
    if isinstance(shapes, str | bytes) or not isinstance(shapes, Iterable):
        raise TypeError(f"shapes must be a sequence of tuples of ints, got {describe(shapes)}")
    checked: list[tuple[int, ...]] = []
    for k, shape in enumerate(shapes):
        # (a bool is an int to Python, not a dimension)
        if (
            not isinstance(shape, tuple)
            or not all(isinstance(n, int | np.integer) for n in shape)
            or any(isinstance(n, bool | np.bool_) for n in shape)
        ):
            raise TypeError(f"shapes[{k}] must be a tuple of ints, got {shape!r}")
        if any(n < 0 for n in shape):
            raise ValueError(f"shapes[{k}] has a negative dimension: {shape!r}")
        checked.append(tuple(int(n) for n in shape))
    sizes = [prod(shape) for shape in checked]
    total = sum(sizes)
    starts = np.cumsum([0, *sizes])
    largest = queue.device.max_mem_alloc_size if queue is not None else np.iinfo(np.intp).max
    if total * kind.itemsize > largest:
        where = f"the device's largest buffer ({largest:,} bytes)" if queue is not None else "numpy's largest array"
        raise ValueError(f"shapes need {total:,} values of {kind} in one buffer, more than {where}")
    if queue is None:
        data_np, grad_np = np.zeros(total, kind), np.zeros(total, kind)
        return [
            Parameter(data_np[a:b].reshape(shape), grad_np[a:b].reshape(shape))
            for a, b, shape in zip(starts[:-1], starts[1:], checked, strict=True)
        ]
    data_cl, grad_cl = cl_array.zeros(queue, total, kind), cl_array.zeros(queue, total, kind)
    return [
        Parameter(data_cl[int(a) : int(b)].reshape(shape), grad_cl[int(a) : int(b)].reshape(shape))
        for a, b, shape in zip(starts[:-1], starts[1:], checked, strict=True)
    ]
