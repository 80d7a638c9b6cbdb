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
import math
import os
import time
from collections.abc import Callable, Hashable, MutableMapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import array_api_compat
import numpy as np
import numpy.typing as npt
import pyopencl as cl

from netcl._backends.base import SUPPORTED_DTYPES, Tally, Work
from netcl._kernels import Launcher, Member, fused_kernel, max_slots, slots_for
from netcl._precision import BFLOAT16, compute_dtype
from netcl._update import Step

__all__ = ["PATH", "Costs", "host_queue", "update_on_host"]

PATH: Literal["measured", "kernel", "array-api"] = "measured"
"""Which path host arrays take: by measurement (the default), or always one (tests)."""


@dataclass(frozen=True)
class Costs:
    """Measured seconds of the two paths for one dtype and array type:
    a launch of the fused kernel costs `launch + per_value * n`, the array-API maths on
    one array `each + per_value_api * n`."""

    launch: float
    per_value: float
    each: float
    per_value_api: float

    def kernel_wins(self, chunks: Sequence[int], items: Sequence[int]) -> bool:
        """Whether launches of `chunks` values each clearly beat the maths on arrays of
        `items` (by a fifth: where the two are close, the measurement's noise decides
        nothing, and the maths, which need no device, stay)."""
        kernel = sum(self.launch + self.per_value * n for n in chunks)
        maths = sum(self.each + self.per_value_api * n for n in items)
        return kernel < 0.8 * maths


_COSTS: dict[Hashable, Costs] = {}
"""Per process: measured once per dtype and array type (with the first update variant
stepped: a launch's fixed cost and the maths' on one array are what decide, and the
variants share them)."""


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
    elif array_api_compat.is_torch_array(x) and str(x.dtype) == "torch.bfloat16":
        # (DLPack has bfloat16, numpy has not: the bits, seen as ml_dtypes' bfloat16)
        import torch

        try:
            view = np.from_dlpack(x.detach().view(torch.int16)).view(BFLOAT16)
        except (TypeError, ValueError, RuntimeError, BufferError, AttributeError):
            return None
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


@functools.cache
def _zero_copy(queue: cl.CommandQueue) -> bool:
    """Whether the device works in the host memory of a `USE_HOST_PTR` buffer itself
    (PoCL's CPU device does): mapping such a buffer then gives the host pointer back,
    and the kernel's writes are in the host arrays once it has finished, with no map
    to copy them out. Asked once per queue, of a small buffer and of one that starts
    off the alignment a driver may want."""
    for host in (np.zeros(64, np.float32), np.zeros(65, np.float32)[1:]):
        buffer = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=host)
        try:
            mapped, _ = cl.enqueue_map_buffer(
                queue, buffer, cl.map_flags.READ, 0, (host.nbytes,), np.dtype(np.uint8), is_blocking=True
            )
            same = _address(mapped) == _address(host)
            mapped.base.release(queue)
            queue.finish()
        finally:
            buffer.release()
        if not same:
            return False
    return True


def update_on_host(
    step: Step,
    work: Sequence[Work],
    cache: MutableMapping[Hashable, Any],
    tally: Tally,
    immutable: Callable[[Any], bool],
) -> list[Work]:
    """Update the items of `work` that the fused kernel can take on the host device;
    return the others, for the array-API path. `cache` keeps the launches' kernel
    objects from one step to the next (the caller's, as `Backend.apply` has it); arrays
    for which `immutable` is true (jax's) are never written in place, so never taken."""
    queue = None if _forked else host_queue()
    if queue is None:
        return list(work)
    rest, runs = _runs_of(step, work, immutable)
    if not runs:
        return rest
    if PATH == "array-api" or (PATH == "measured" and not _kernel_wins(queue, step, runs)):
        return [*rest, *(item for items, _ in runs for item in items)]
    _launch(queue, step, [(tuple(views), items[0].member) for items, views in runs], cache, tally)
    return rest


Runs = list[tuple[list[Work], list[npt.NDArray[Any]]]]


def _runs_of(step: Step, work: Sequence[Work], immutable: Callable[[Any], bool]) -> tuple[list[Work], Runs]:
    """The items the kernel cannot take, and the others as runs of host views (joined
    where they follow each other in one numpy array)."""
    rest: list[Work] = []
    runs: Runs = []
    for item in work:
        if immutable(item.data):
            rest.append(item)
            continue
        arrays = (item.data, item.grad, *(item.buffers[name] for name in step.buffers))
        present = [v for v in (host_view(x) for x in arrays) if v is not None]
        layouts = {"C" if v.flags.c_contiguous else "F" for v in present if v.ndim > 1 and v.size > 1}
        if len(present) != len(arrays) or len(layouts) > 1 or present[0].size == 0:
            rest.append(item)  # (an empty array needs no launch)
            continue
        if runs and runs[-1][0][-1].member == item.member:
            joined = _joined(runs[-1][1], present)
            if joined is not None:
                runs[-1][0].append(item)
                runs[-1] = (runs[-1][0], joined)
                continue
        runs.append(([item], present))
    return rest, runs


def _kernel_wins(queue: cl.CommandQueue, step: Step, runs: Runs) -> bool:
    """Whether the fused kernel updates `runs` faster than the array-API maths would, by
    the costs measured for this dtype and array type (the results are the same bits
    either way: only the time differs)."""
    first = runs[0][0][0]
    dtype = runs[0][1][0].dtype
    # one variant stands for the others: what decides is the fixed cost of a launch
    # against that of the maths on one array, which the variants share
    key = (queue, dtype, type(first.data))
    costs = _COSTS.get(key)
    if costs is None:
        costs = _COSTS[key] = _measure(queue, step, dtype, first)
    limit = max_slots(queue.device, step.kernel)
    sizes = [views[0].size for _, views in runs]
    chunks = [sum(sizes[k : k + limit]) for k in range(0, len(sizes), limit)]
    per_item = [math.prod(item.data.shape) for items_, _ in runs for item in items_]
    return costs.kernel_wins(chunks, per_item)


def _fastest_seconds(call: Callable[[], None], rounds: int = 7) -> float:
    """The fastest of `rounds` timed calls, after two untimed ones: a fixed cost is
    best seen in the fastest run (a CPU device's worker threads wake up slowly at first,
    and the machine is shared)."""
    call()
    call()
    fastest = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def _measure(queue: cl.CommandQueue, step: Step, dtype: np.dtype[Any], like: Work) -> Costs:
    """Time both paths, the way a step takes them, on scratch arrays of 1 and 2**16
    values (of the work's array type) with this step's variant: some milliseconds, once
    per process, dtype and array type."""
    from netcl._backends.array_api import update_by_reference

    small, large = 1, 1 << 16
    member = step.member_scalars(step.hyper, 1, frozenset()) if step.member_scalars else ()
    member += (0.0,) * step.stochastic  # (the key of stochastic rounding's random bits)
    scratch_tally = Tally()
    cache: dict[Hashable, Any] = {}

    def arrays(n: int) -> list[npt.NDArray[Any]]:
        state = compute_dtype(dtype)
        return [np.full(n, 0.5, dtype), np.full(n, 0.5, dtype)] + [np.full(n, 0.5, state) for _ in step.buffers]

    def scratch(n: int) -> Work:
        made = [_like(like.data, h) for h in arrays(n)]
        holder = SimpleNamespace(data=made[0], grad=made[1])  # not the user's parameter
        buffers = dict(zip(step.buffers, made[2:], strict=True))
        return Work(holder, made[0], made[1], {}, buffers, like.backend, "", member=member)

    def kernel(n: int) -> Callable[[], None]:
        work = [scratch(n)]

        def run() -> None:  # the way a step goes: host views, runs, the launch
            _, runs = _runs_of(step, work, lambda x: False)
            _launch(queue, step, [(tuple(views), items[0].member) for items, views in runs], cache, scratch_tally)

        return run

    def maths(n: int) -> Callable[[], None]:
        work = scratch(n)
        return lambda: update_by_reference(step, work, scratch_tally)

    k_small, k_large = _fastest_seconds(kernel(small)), _fastest_seconds(kernel(large))
    a_small, a_large = _fastest_seconds(maths(small)), _fastest_seconds(maths(large))
    return Costs(
        launch=k_small,
        per_value=max(k_large - k_small, 0.0) / (large - small),
        each=a_small,
        per_value_api=max(a_large - a_small, 0.0) / (large - small),
    )


def _like(data: Any, host: npt.NDArray[Any]) -> Any:
    """`host` as an array of `data`'s library (numpy itself, or a CPU torch tensor)."""
    from netcl._backends.array_api import ARRAY_API

    if isinstance(data, np.ndarray):
        return host
    return ARRAY_API.from_host(host, data)


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
    # a launch takes arrays of one dtype whose own scalars (step counts) are the same
    shared = step.kernel.member_scalar_count
    groups: dict[tuple[np.dtype[Any], tuple[float, ...]], list[tuple[tuple[npt.NDArray[Any], ...], tuple[float, ...]]]]
    groups = {}
    for views, own in arrays:
        groups.setdefault((views[0].dtype, own[:shared]), []).append((views, own))
    # Where the device works in host memory itself, the buffers over the parameters and
    # their state are kept for the next step (by address, size and dtype: the buffer
    # holds its array, so no other array takes that memory meanwhile); a step drops
    # those it did not use. Gradients get buffers of their own at each step, so that a
    # gradient the user drops is freed.
    zero_copy = _zero_copy(queue)
    kept: dict[Hashable, _Wrapped] = cache.pop("buffers", {}) if zero_copy else {}
    made: dict[Hashable, _Wrapped] = {}
    wrapped: list[_Wrapped] = []  # (this step's own)

    def wrap(view: npt.NDArray[Any], keep: bool) -> _Wrapped:
        if not (keep and zero_copy):
            made_now = _Wrapped(context, view)
            wrapped.append(made_now)
            return made_now
        # the very array of the last step (a numpy parameter is its own view), else one
        # over the same memory (a torch tensor's view is a new object at each step)
        known = kept.get(id(view))
        key: Hashable = id(view)
        if known is None or known.host is not view:
            key = (_address(view), view.nbytes, view.dtype.str)
            known = kept.get(key)
        if known is None:
            known = _Wrapped(context, view)
        made[key] = known
        return known

    try:
        limit = max_slots(device, step.kernel)
        for g, ((dtype, common), group) in enumerate(groups.items()):
            for start in range(0, len(group), limit):
                chunk = group[start : start + limit]
                members = []
                for views, _ in chunk:
                    buffers = tuple(wrap(v, keep=j != 1) for j, v in enumerate(views))
                    members.append(Member(buffers, views[0].size))
                slots = slots_for(len(members))
                key = ("host launch", context, dtype, g, step.kernel, slots, start)
                launcher = cache.get(key)
                if not isinstance(launcher, Launcher):
                    launcher = fused_kernel(context, device, dtype, step.kernel, slots).launcher()
                    cache[key] = launcher
                launcher.bind(members, tally.counter(queue))
                grads = [member.arrays[1] for member in members]
                keys = [own[shared:] for _, own in chunk] if step.kernel.stochastic else []
                kernel_event = launcher.run(queue, step.scalars + common, keys, grads, [])
                tally.launched(queue, kernel_event)
                for member in members if not zero_copy else ():
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
        for address, w in kept.items():
            if made.get(address) is not w:
                w.base_data.release()
        if zero_copy:
            cache["buffers"] = made
