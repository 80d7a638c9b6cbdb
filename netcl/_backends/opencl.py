"""OpenCL buffers: pyopencl arrays and objects that expose a buffer the same way.

They are updated in place by the fused kernel, on the parameter's own queue. Nothing here
waits on the host: the kernel waits for the events pending on every array it touches and
its own event is recorded on each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array

from netcl._backends.base import SUPPORTED_DTYPES, Backend, Work, describe
from netcl._kernels import fused_kernel
from netcl._update import Step

__all__ = ["OPENCL", "OpenCLBackend", "is_opencl"]

_BUFFER_ATTRIBUTES = ("base_data", "offset", "shape", "dtype", "queue")


def is_opencl(x: object) -> bool:
    """Whether `x` is a pyopencl array or exposes an OpenCL buffer like one."""
    if isinstance(x, cl_array.Array):
        return True
    return all(hasattr(x, name) for name in _BUFFER_ATTRIBUTES) and isinstance(
        getattr(x, "base_data", None), cl.MemoryObjectHolder
    )


Layout = Literal["C", "F"]


def _layout(x: Any) -> Layout | None:
    """'C' or 'F' for a contiguous array (a C-ordered one says 'C'), None otherwise."""
    shape = tuple(int(n) for n in x.shape)
    strides = getattr(x, "strides", None)
    if strides is None or prod(shape) <= 1:
        return "C"
    itemsize = np.dtype(x.dtype).itemsize
    kept = [(n, int(s)) for n, s in zip(shape, strides, strict=True) if n != 1]

    def contiguous(dims: list[tuple[int, int]]) -> bool:
        expected = itemsize
        for n, s in reversed(dims):
            if s != expected:
                return False
            expected *= n
        return True

    if contiguous(kept):
        return "C"
    if contiguous(kept[::-1]):
        return "F"
    return None


def _context(x: Any) -> cl.Context:
    """The context of an OpenCL array (an empty pyopencl array has no buffer, but a context)."""
    context: cl.Context | None = x.context if isinstance(x, cl_array.Array) else x.base_data.context
    if context is None:
        raise ValueError(f"{describe(x)} has no OpenCL context")
    return context


def _events(x: object) -> list[cl.Event]:
    return list(getattr(x, "events", None) or ())


def _record(x: object, event: cl.Event) -> None:
    add_event = getattr(x, "add_event", None)
    if add_event is not None:
        add_event(event)


class OpenCLBackend(Backend):
    """Arrays in OpenCL buffers, updated by the fused kernel."""

    name = "opencl"

    def _check_array(self, x: Any, where: str) -> None:
        dtype = np.dtype(x.dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{where} has dtype {dtype}; netcl optimizes float32 and float64 arrays"
            )
        if _layout(x) is None:
            raise ValueError(
                f"{where} is not contiguous (shape {tuple(x.shape)}, strides "
                f"{tuple(x.strides)}); the fused kernel needs a C- or Fortran-ordered array"
            )
        if int(x.offset) % dtype.itemsize:
            raise ValueError(
                f"{where} starts at byte offset {x.offset}, which is not a multiple of "
                f"its element size {dtype.itemsize}"
            )

    def check_param(self, data: Any, where: str) -> None:
        self._check_array(data, where)
        queue = data.queue
        if queue is None:
            raise ValueError(
                f"{where} has no queue; give it one (pyopencl: array.with_queue(queue)) "
                "so netcl knows where to run its kernel"
            )
        if np.dtype(data.dtype) == np.float64 and not queue.device.double_fp_config:
            raise TypeError(
                f"{where} is float64, but device {queue.device.name!r} has no "
                "double precision (cl_khr_fp64)"
            )

    def check_grad(self, data: Any, grad: Any, where: str) -> None:
        if not is_opencl(grad):
            raise TypeError(
                f"{where} is a {describe(grad)}, but its parameter is an OpenCL array "
                f"({describe(data)}); the gradient must be an OpenCL array too"
            )
        self._check_array(grad, where)
        _check_match(data, grad, where)
        if _context(grad) != _context(data):
            raise ValueError(f"{where} lives in another OpenCL context than its parameter")
        if _layout(grad) != _layout(data):
            raise ValueError(
                f"{where} is in {_layout(grad)} order but its parameter is in "
                f"{_layout(data)} order; use the same memory layout for both"
            )

    def check_state(self, data: Any, buffer: Any, where: str) -> None:
        if not isinstance(buffer, cl_array.Array):
            raise TypeError(
                f"{where} is a {describe(buffer)}, but the parameter is now an OpenCL array; "
                "its state was made for another kind of array"
            )
        _check_match(data, buffer, where)
        if buffer.context != _context(data) or _layout(buffer) != _layout(data):
            raise ValueError(
                f"{where} was made for an array in another context or layout than "
                "the parameter's array now"
            )

    def dtype(self, data: Any) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(data.dtype)
        return dtype

    def zeros_like(self, data: Any) -> cl_array.Array:
        return cl_array.zeros(data.queue, tuple(data.shape), data.dtype, order=_layout(data) or "C")

    def to_host(self, array: Any) -> npt.NDArray[Any]:
        host: npt.NDArray[Any] = array.get()
        return host

    def from_host(self, host: npt.NDArray[Any], like: Any) -> cl_array.Array:
        return cl_array.to_device(like.queue, np.asarray(host, order=_layout(like)))

    def zero_(self, grad: Any) -> None:
        if isinstance(grad, cl_array.Array):
            grad.fill(0)
            return
        dtype = np.dtype(grad.dtype)
        size = prod(int(n) for n in grad.shape)
        if size:
            queue = grad.queue
            event = cl.enqueue_fill_buffer(
                queue, grad.base_data, np.zeros(1, dtype), int(grad.offset),
                size * dtype.itemsize, wait_for=_events(grad) or None,
            )
            _record(grad, event)

    def apply(self, step: Step, work: Sequence[Work]) -> None:
        rule = step.rule
        for item in work:
            data, grad = item.data, item.grad
            size = prod(int(n) for n in data.shape)
            if size == 0:
                continue
            queue: cl.CommandQueue = data.queue
            kernel = fused_kernel(
                _context(data), queue.device, np.dtype(data.dtype), rule.kernel,
                step.flags, rule.flags, step.buffers, rule.buffers, len(step.scalars),
            )
            buffers = tuple(item.state[name] for name in step.buffers)
            touched = (data, grad, *buffers)
            wait_for = [event for x in touched for event in _events(x)]
            event = kernel(queue, data, grad, buffers, step.scalars, size, wait_for)
            for x in touched:
                _record(x, event)


def _check_match(data: Any, other: Any, where: str) -> None:
    if tuple(other.shape) != tuple(data.shape):
        raise ValueError(
            f"{where} has shape {tuple(other.shape)}, but its parameter has shape "
            f"{tuple(data.shape)}"
        )
    if np.dtype(other.dtype) != np.dtype(data.dtype):
        raise TypeError(
            f"{where} has dtype {np.dtype(other.dtype)}, but its parameter has dtype "
            f"{np.dtype(data.dtype)}"
        )


OPENCL = OpenCLBackend()
