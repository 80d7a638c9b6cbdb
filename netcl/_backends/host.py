"""The fused kernel on host arrays: numpy arrays and CPU torch tensors, in place.

A CPU OpenCL device (PoCL after `pip install "netcl[pocl]"`) addresses host memory
directly: a buffer made with `USE_HOST_PTR` over a numpy array is that array. For large
contiguous host arrays one fused launch then beats the many passes of the array-API path,
and gives bit-identical results (the same expressions in the same order).

The sequence follows the OpenCL memory model for host pointers, so it is right on drivers
that copy as well as on those that don't: the buffers are made at the step (a copying
driver copies the host data in then), the kernel runs, the written arrays are mapped for
reading (a copying driver copies the results out then) and the buffers are released
before `step()` returns.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, MutableMapping, Sequence
from typing import Any

import array_api_compat
import numpy as np
import numpy.typing as npt
import pyopencl as cl

from netcl._backends.base import SUPPORTED_DTYPES, Tally, Work
from netcl._kernels import Launcher, Member, fused_kernel, max_slots, slots_for
from netcl._update import Step

__all__ = ["HOST_MIN_SIZE", "host_queue", "update_on_host"]

HOST_MIN_SIZE = 1 << 19
"""Smaller arrays are updated by the array-API path: below this size a launch and its
wait cost more than the passes they save."""


_forked = False
"""Whether this process was forked: PoCL's worker threads do not survive a fork, and a
child that uses a CPU device made by its parent (or, with PoCL, any) blocks forever."""


def _in_child() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_in_child)


@functools.cache
def host_queue() -> cl.CommandQueue | None:
    """A queue on a CPU OpenCL device, or None when there is none.

    The device is the one `pyopencl.create_some_context(interactive=False)` picks
    (`PYOPENCL_CTX` chooses) when that is a CPU, else the first CPU device found.
    """
    try:
        default = cl.create_some_context(interactive=False)
        if default.devices[0].type & cl.device_type.CPU:
            return cl.CommandQueue(default)
        for platform in cl.get_platforms():
            for device in platform.get_devices(device_type=cl.device_type.CPU):
                return cl.CommandQueue(cl.Context([device]))
    except (cl.Error, RuntimeError, ValueError):
        return None
    return None


def host_view(x: Any) -> npt.NDArray[Any] | None:
    """`x` as a writeable, contiguous numpy array sharing its memory, or None."""
    if isinstance(x, np.ndarray):
        view = x
    else:
        try:
            view = np.from_dlpack(x.detach() if array_api_compat.is_torch_array(x) else x)
        except (TypeError, ValueError, RuntimeError, BufferError, AttributeError):
            return None
    if not (view.flags.writeable and view.flags.aligned and view.dtype in SUPPORTED_DTYPES):
        return None
    if not (view.flags.c_contiguous or view.flags.f_contiguous):
        return None
    return view


class _Wrapped:
    """A host array seen through an OpenCL buffer, as the fused kernel takes it."""

    __slots__ = ("base_data", "host", "offset")

    def __init__(self, context: cl.Context, host: npt.NDArray[Any]) -> None:
        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR
        self.host = host
        self.base_data = cl.Buffer(context, flags, hostbuf=host)
        self.offset = 0


def update_on_host(step: Step, work: Sequence[Work], cache: MutableMapping[Hashable, Any], tally: Tally) -> list[Work]:
    """Update the items of `work` that the fused kernel can take on the host device;
    return the others, for the array-API path. `cache` keeps the launches' kernel
    objects from one step to the next (the caller's, as `Backend.apply` has it)."""
    queue = None if _forked else host_queue()
    if queue is None:
        return list(work)
    rest: list[Work] = []
    runs: list[tuple[list[Work], list[npt.NDArray[Any]]]] = []
    for item in work:
        arrays = (item.data, item.grad, *(item.buffers[name] for name in step.buffers))
        present = [v for v in (host_view(x) for x in arrays) if v is not None]
        layouts = {"C" if v.flags.c_contiguous else "F" for v in present if v.ndim > 1 and v.size > 1}
        if len(present) != len(arrays) or len(layouts) > 1:
            rest.append(item)
            continue
        if runs and runs[-1][0][-1].member == item.member:
            joined = _joined(runs[-1][1], present)
            if joined is not None:
                runs[-1][0].append(item)
                runs[-1] = (runs[-1][0], joined)
                continue
        runs.append(([item], present))
    taken: list[tuple[tuple[npt.NDArray[Any], ...], tuple[float, ...]]] = []
    for items, views in runs:
        if views[0].size >= HOST_MIN_SIZE:
            taken.append((tuple(views), items[0].member))
        else:
            rest.extend(items)
    if taken:
        _launch(queue, step, taken, cache, tally)
    return rest


def _joined(run: list[npt.NDArray[Any]], views: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]] | None:
    """`run`'s arrays extended by `views`, where each of `views` continues its role's
    array in the memory of the same numpy array (as `flat_parameters` and a param
    group's state buffers lay them out); else None."""
    joined = []
    for a, b in zip(run, views, strict=True):
        owner = a.base if a.base is not None else a
        if (
            not isinstance(owner, np.ndarray)
            or b.base is not owner
            or not owner.flags.c_contiguous
            or b.dtype != a.dtype
            or _address(b) != _address(a) + a.nbytes
        ):
            return None
        start = (_address(a) - _address(owner)) // a.itemsize
        joined.append(owner.reshape(-1)[start : start + a.size + b.size])
    return joined


def joined_runs(views: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
    """Flat, contiguous `views` joined where each continues the one before it in the
    memory of one numpy array (see `_joined`)."""
    runs: list[npt.NDArray[Any]] = []
    for view in views:
        if view.size == 0:
            continue
        joined = _joined(runs[-1:], [view]) if runs else None
        if joined is not None:
            runs[-1] = joined[0]
        else:
            runs.append(view)
    return runs


def _address(x: npt.NDArray[Any]) -> int:
    address: int = x.__array_interface__["data"][0]
    return address


def _launch(
    queue: cl.CommandQueue,
    step: Step,
    arrays: list[tuple[tuple[npt.NDArray[Any], ...], tuple[float, ...]]],
    cache: MutableMapping[Hashable, Any],
    tally: Tally,
) -> None:
    context, device = queue.context, queue.device
    by_dtype: dict[np.dtype[Any], list[tuple[tuple[npt.NDArray[Any], ...], tuple[float, ...]]]] = {}
    for views, own in arrays:
        by_dtype.setdefault(views[0].dtype, []).append((views, own))
    wrapped: list[_Wrapped] = []
    try:
        for dtype, group in by_dtype.items():
            limit = max_slots(device, step.kernel)
            for start in range(0, len(group), limit):
                chunk = group[start : start + limit]
                members = []
                for views, _ in chunk:
                    buffers = tuple(_Wrapped(context, v) for v in views)
                    wrapped += buffers
                    members.append(Member(buffers, views[0].size))
                slots = slots_for(len(members))
                key = ("host launch", context, dtype, step.kernel, slots, start)
                launcher = cache.get(key)
                if not isinstance(launcher, Launcher):
                    launcher = fused_kernel(context, device, dtype, step.kernel, slots).launcher()
                    cache[key] = launcher
                launcher.bind(members, tally.counter(queue))
                grads = [member.arrays[1] for member in members]
                kernel_event = launcher.run(queue, step.scalars, [own for _, own in chunk], grads, [])
                tally.launched(queue, kernel_event)
                for member in members:
                    written = (member.arrays[0], *member.arrays[2:])
                    for w in written:
                        mapped, event = cl.enqueue_map_buffer(
                            queue,
                            w.base_data,
                            cl.map_flags.READ,
                            0,
                            (w.host.nbytes,),
                            np.dtype(np.uint8),
                            wait_for=[kernel_event],
                            is_blocking=False,
                        )
                        mapped.base.release(queue, wait_for=[event])
        queue.finish()
    finally:
        for w in wrapped:
            w.base_data.release()
