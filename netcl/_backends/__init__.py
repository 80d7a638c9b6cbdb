"""Array-library adapters: OpenCL buffers (the fused kernel) and array-API arrays.

`backend_for` tells which one handles an array; the optimizers talk to the
[`Backend`][netcl._backends.base.Backend] interface only.
"""

from __future__ import annotations

from netcl._backends.array_api import ARRAY_API, is_array_api, note_written
from netcl._backends.base import Backend, Work, describe
from netcl._backends.opencl import OPENCL, is_opencl

__all__ = ["Backend", "Work", "backend_for", "checked_backend", "describe", "note_written"]


def backend_for(array: object, where: str) -> Backend:
    """The backend that handles `array`, or a TypeError naming `where`."""
    if is_opencl(array):
        return OPENCL
    if is_array_api(array):
        return ARRAY_API
    raise TypeError(
        f"{where} is a {describe(array)}, which is not an array netcl can optimize: "
        "expected a pyopencl.array.Array, an object exposing an OpenCL buffer "
        "(base_data, offset, shape, dtype, queue) or an array-API array "
        "(numpy, torch, array_api_strict, cupy, jax ...)"
    )


def checked_backend(data: object, where: str) -> Backend:
    """The backend of a parameter's array, after checking that it can update `data`."""
    backend = backend_for(data, where)
    backend.check_param(data, where)
    return backend
