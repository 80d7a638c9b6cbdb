"""Choosing an OpenCL device.

netcl never picks a device for arrays you own: the fused kernel runs on each array's own
queue. These helpers are for programs that need a queue to start with (the demo, the
benchmark, your own scripts).
"""

from __future__ import annotations

import functools
import os

import pyopencl as cl

__all__ = ["compile_failure", "create_queue", "describe_device"]

_PROBE = "__kernel void probe(__global float *x) { x[get_global_id(0)] += 1.0f; }"


@functools.cache
def compile_failure(device: cl.Device) -> str | None:
    """Why `device`'s OpenCL C compiler cannot build a one-line kernel, or None when it
    can.

    A device can be listed and still unable to compile: the PoCL that pyopencl's wheel
    bundles (PoCL 3.0, LLVM 14) answers every build on a CPU newer than its LLVM (an AMD
    Zen 5, say) with "unknown target CPU 'generic'". The answer is kept per device.
    """
    try:
        cl.Program(cl.Context([device]), _PROBE).build()
    except cl.Error as error:
        lines = [line.strip() for line in str(error).splitlines() if "error" in line.lower()]
        return lines[-1] if lines else str(error).strip() or type(error).__name__
    return None


def _hint(failures: list[str]) -> str:
    if not any("unknown target CPU" in failure for failure in failures):
        return ""
    return (
        ". The compiler's LLVM does not know this CPU: a newer PoCL does (Debian's "
        "`apt-get install pocl-opencl-icd` adds one beside the wheel's)"
    )


def create_queue(device: str | None = None) -> cl.CommandQueue:
    """A command queue on the chosen device.

    Args:
        device: `"P"` or `"P:D"`: platform index P and device index D (default 0), as
            `PYOPENCL_CTX` writes them; or None for the default: the device that the
            `PYOPENCL_CTX` environment variable names where it is set, else the first
            device, in platform order, whose compiler builds a kernel
            ([`compile_failure`][netcl.device.compile_failure]), which is the first
            device where every device works.

    Raises:
        ValueError: `device` is not of that form or names no existing device.
        RuntimeError: `device` is None, `PYOPENCL_CTX` is not set, and no device's
            compiler builds a kernel; the message gives each device's reason.
    """
    if device is None:
        if os.environ.get("PYOPENCL_CTX"):
            return cl.CommandQueue(cl.create_some_context(interactive=False))
        failures = []
        for listed in (listed for platform in cl.get_platforms() for listed in platform.get_devices()):
            failure = compile_failure(listed)
            if failure is None:
                return cl.CommandQueue(cl.Context([listed]))
            failures.append(f"{listed.name.strip()} ({listed.platform.version.strip()}): {failure}")
        raise RuntimeError(
            f"no OpenCL device here compiles a kernel: {'; '.join(failures) or 'none found'}{_hint(failures)}"
        )
    parts = device.split(":")
    if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"device must be 'P' or 'P:D' with indices, got {device!r}")
    platform_index, device_index = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    platforms = cl.get_platforms()
    if platform_index >= len(platforms):
        raise ValueError(f"device {device!r}: there are {len(platforms)} OpenCL platform(s)")
    devices = platforms[platform_index].get_devices()
    if device_index >= len(devices):
        raise ValueError(f"device {device!r}: platform {platform_index} has {len(devices)} device(s)")
    return cl.CommandQueue(cl.Context([devices[device_index]]))


def describe_device(queue: cl.CommandQueue) -> str:
    """A one-line description of the queue's device: name, platform, compute units."""
    dev = queue.device
    return f"{dev.name.strip()} ({dev.platform.name.strip()}, {dev.max_compute_units} compute units)"
