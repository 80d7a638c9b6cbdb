"""The kinds of array a parameter may hold, each made from and read back to numpy.

Every test that says "for every kind of parameter" runs over `KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_strict
import ml_dtypes
import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array
import torch

F = npt.NDArray[Any]


class BufferArray:
    """A user's own class that exposes an OpenCL buffer the way pyopencl arrays do."""

    def __init__(self, queue: cl.CommandQueue, host: F) -> None:
        host = host.copy(order="C")
        self.queue: cl.CommandQueue | None = queue
        self.shape: tuple[int, ...] = host.shape
        self.dtype: np.dtype[Any] = host.dtype
        self.offset = 0
        self.base_data = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, size=max(host.nbytes, 1))
        if host.nbytes:
            cl.enqueue_copy(queue, self.base_data, host)

    def get(self) -> F:
        out = np.empty(self.shape, self.dtype)
        if out.nbytes:
            assert self.queue is not None
            cl.enqueue_copy(self.queue, out, self.base_data, src_offset=self.offset)
        return out


def offset_view(queue: cl.CommandQueue, host: F) -> cl_array.Array:
    """A view that starts 3 elements into a larger pyopencl array."""
    flat = host.reshape(-1)
    pad = np.full(3, 7.0, host.dtype)
    big = cl_array.to_device(queue, np.concatenate([pad, flat, pad]))
    view: cl_array.Array = big[3 : 3 + flat.size].reshape(host.shape)
    return view


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[cl.CommandQueue, F], Any]
    get: Callable[[Any], F]
    fused: bool

    def __str__(self) -> str:
        return self.name


def _torch_make(q: cl.CommandQueue, h: F) -> Any:
    if h.dtype == ml_dtypes.bfloat16:  # (numpy knows bfloat16 only through ml_dtypes)
        return torch.from_numpy(np.ascontiguousarray(h).view(np.int16).copy()).view(torch.bfloat16)
    return torch.tensor(h)


def _torch_get(t: Any) -> F:
    if t.dtype == torch.bfloat16:
        return np.array(t.detach().view(torch.int16).numpy(), copy=True).view(ml_dtypes.bfloat16)
    return np.array(t.detach().numpy(), copy=True)


KINDS = [
    Kind("pyopencl", lambda q, h: cl_array.to_device(q, h.copy(order="C")), lambda a: a.get(), True),
    Kind("pyopencl-offset", offset_view, lambda a: a.get(), True),
    Kind("buffer-object", BufferArray, lambda a: a.get(), True),
    Kind("numpy", lambda q, h: np.array(h, copy=True), lambda a: np.array(a, copy=True), False),
    Kind("torch", _torch_make, _torch_get, False),
    Kind(
        "array_api_strict",
        lambda q, h: array_api_strict.asarray(np.array(h, copy=True)),
        lambda a: np.asarray(a),
        False,
    ),
]
KIND_IDS = [k.name for k in KINDS]

HALF_KINDS = [k for k in KINDS if k.name != "array_api_strict"]
"""The kinds that hold float16 and bfloat16 (array_api_strict has neither dtype)."""
HALF_KIND_IDS = [k.name for k in HALF_KINDS]
