"""The fused kernels: where their sources are, how they are built, how they are launched.

Sources live in the top-level `kernels/` folder of the project. A wheel carries that
folder inside the package as `netcl/kernels/`; an editable install reads it from the
checkout. `kernel_source` looks in both places, in that order.

`fused_kernel` builds one `pyopencl.elementwise.ElementwiseKernel` per (context, dtype,
source, variant, vector width) and memoizes it per context, so every optimizer instance
shares it and a step never rebuilds anything. Hyperparameters are kernel arguments.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl
from pyopencl.elementwise import ElementwiseKernel
from pyopencl.tools import (
    context_dependent_memoize,
    dtype_to_ctype,
    get_arg_list_scalar_arg_dtypes,
)

__all__ = ["Geometry", "FusedKernel", "fused_kernel", "geometry", "kernel_source"]

_CHECKOUT_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def kernel_source(name: str) -> str:
    """The OpenCL C source `kernels/<name>.cl`, from the installed package or the checkout."""
    packaged = resources.files("netcl").joinpath("kernels", f"{name}.cl")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (_CHECKOUT_KERNELS / f"{name}.cl").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Geometry:
    """How the fused kernel is launched on one device for one dtype."""

    width: int
    """Elements per work-item: an OpenCL vector width (1, 2, 4 or 8)."""
    local_size: int
    """Work-items per work-group."""


def geometry(device: cl.Device, dtype: np.dtype[Any]) -> Geometry:
    """The launch geometry of the fused kernel on `device` for `dtype`.

    On a CPU, each work-item takes one vector of 8 float32 (4 float64) values: OpenCL CPU
    drivers run a work-group's items one after another, and vector types are what makes
    them use the SIMD units. 16-wide vectors are never used, whatever the device prefers:
    `sqrt` on them aborts PoCL 3.0's compiler. On other devices (GPUs), each work-item
    takes one value and neighbouring work-items read neighbouring values.
    """
    if device.type & cl.device_type.CPU:
        width = 8 if dtype.itemsize == 4 else 4
        return Geometry(width=width, local_size=64)
    return Geometry(width=1, local_size=256)


_BUILD_OPTIONS = (
    # Correctly rounded division and square root, as IEEE 754 and numpy have them: the
    # OpenCL default allows 2.5 and 3 ulp for float32 and is the one relaxation that
    # applies even without -cl-fast-relaxed-math.
    "-cl-fp32-correctly-rounded-divide-sqrt",
)


@dataclass(frozen=True)
class FusedKernel:
    """A built fused kernel and how to launch it."""

    kernel: cl.Kernel
    geometry: Geometry

    def __call__(
        self,
        queue: cl.CommandQueue,
        param: object,
        grad: object,
        buffers: tuple[object, ...],
        scalars: tuple[float, ...],
        size: int,
        wait_for: list[cl.Event],
    ) -> cl.Event:
        """Enqueue the update of `size` elements; `param`, `grad` and `buffers` expose
        `base_data` and `offset` (pyopencl arrays do)."""
        width, local_size = self.geometry.width, self.geometry.local_size
        chunks = -(-size // width)
        global_size = -(-chunks // local_size) * local_size
        arrays = [arg for x in (param, grad, *buffers) for arg in _buffer_args(x)]
        event: cl.Event = self.kernel(
            queue, (global_size,), (local_size,), *arrays, *scalars, size, chunks,
            wait_for=wait_for,
        )
        return event


def _buffer_args(x: Any) -> tuple[cl.Buffer, int]:
    """An array argument as the kernel takes it: its buffer and its byte offset."""
    return x.base_data, int(x.offset)


_build_lock = threading.Lock()


def fused_kernel(
    context: cl.Context,
    device: cl.Device,
    dtype: np.dtype[Any],
    source: str,
    flags: frozenset[str],
    all_flags: tuple[str, ...],
    buffers: tuple[str, ...],
    all_buffers: tuple[str, ...],
    scalar_count: int,
) -> FusedKernel:
    """The fused kernel of `kernels/<source>.cl` for one variant, built once per context.

    `buffers` are the state buffers the variant uses; the others among `all_buffers` are
    passed to `UPDATE` as private dummies that it never reads.
    """
    with _build_lock:
        return _fused_kernel(
            context, device, dtype, source, flags, all_flags, buffers, all_buffers, scalar_count
        )


@context_dependent_memoize
def _fused_kernel(
    context: cl.Context,
    device: cl.Device,
    dtype: np.dtype[Any],
    source: str,
    flags: frozenset[str],
    all_flags: tuple[str, ...],
    buffers: tuple[str, ...],
    all_buffers: tuple[str, ...],
    scalar_count: int,
) -> FusedKernel:
    geo = geometry(device, dtype)
    real = dtype_to_ctype(dtype)
    scalars = [f"s{k}" for k in range(scalar_count)]
    arguments = ", ".join(
        [f"{real} *param", f"{real} *grad"]
        + [f"{real} *{name}" for name in buffers]
        + [f"{real} {name}" for name in scalars]
        + ["long size"]
    )
    text = kernel_source(source)
    switches = "\n".join(f"#define {flag} {int(flag in flags)}" for flag in all_flags)
    preamble = [
        "#pragma OPENCL FP_CONTRACT OFF",
        f"#define real {real}",
        switches,
    ]
    if geo.width > 1:
        preamble += [
            f"#define real_t {real}{geo.width}",
            "#define UPDATE update_vector",
            text,
            "#undef real_t",
            "#undef UPDATE",
        ]
    preamble += [
        "#define real_t real",
        "#define UPDATE update_scalar",
        text,
        "#undef real_t",
        "#undef UPDATE",
    ]

    def call(function: str, w: int, at: str) -> str:
        """Load `w` elements at `at`, update them with `function`, store them."""
        vtype = f"{real}{w}" if w > 1 else real

        def load(name: str) -> str:
            return f"vload{w}(0, {name} + {at})" if w > 1 else f"{name}[{at}]"

        def store(name: str) -> str:
            if w > 1:
                return f"vstore{w}({name}_v, 0, {name} + {at});"
            return f"{name}[{at}] = {name}_v;"

        lines = [f"{vtype} param_v = {load('param')};"]
        for name in all_buffers:
            value = load(name) if name in buffers else "0"
            lines.append(f"{vtype} {name}_v = {value};")
        args = ", ".join(
            ["&param_v", load("grad")] + [f"&{name}_v" for name in all_buffers] + scalars
        )
        lines.append(f"{function}({args});")
        lines += [store(name) for name in ("param", *buffers)]
        return "\n".join(lines)

    if geo.width > 1:
        operation = f"""
        const long first = i * {geo.width};
        if (first + {geo.width} <= size) {{
            {call("update_vector", geo.width, "first")}
        }} else {{
            for (long j = first; j < size; ++j) {{
                {call("update_scalar", 1, "j")}
            }}
        }}
        """
    else:
        operation = call("update_scalar", 1, "i")

    elementwise = ElementwiseKernel(
        context,
        arguments,
        operation,
        name=f"netcl_{source}",
        preamble="\n".join(preamble),
        options=list(_BUILD_OPTIONS),
    )
    kernel, arg_descriptions = elementwise.get_kernel(use_range=False)
    # Arrays are passed as (buffer, byte offset) pairs, so any object exposing a buffer
    # works and netcl, not the invoker, decides which events to wait for.
    kernel.set_scalar_arg_dtypes(get_arg_list_scalar_arg_dtypes(arg_descriptions))
    return FusedKernel(kernel=kernel, geometry=geo)
