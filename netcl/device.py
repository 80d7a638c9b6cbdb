"""Choosing an OpenCL device.

netcl never picks a device for arrays you own: the fused kernel runs on each array's own
queue. These helpers are for programs that need a queue to start with (the demo, the
benchmark, your own scripts).
"""

from __future__ import annotations

import pyopencl as cl

__all__ = ["create_queue", "describe_device"]


def create_queue(device: str | None = None) -> cl.CommandQueue:
    """A command queue on the chosen device.

    Args:
        device: `"P"` or `"P:D"`: platform index P and device index D (default 0), as
            `PYOPENCL_CTX` writes them; or None for the device that
            `pyopencl.create_some_context(interactive=False)` picks, which honours the
            `PYOPENCL_CTX` environment variable.

    Raises:
        ValueError: `device` is not of that form or names no existing device.
    """
    if device is None:
        return cl.CommandQueue(cl.create_some_context(interactive=False))
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
