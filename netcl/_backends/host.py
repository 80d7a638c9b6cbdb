"""The fused kernel on host arrays: numpy arrays and CPU torch tensors, in place.

A CPU OpenCL device (PoCL after `pip install "netcl[pocl]"`) addresses host memory
directly: a buffer made with `USE_HOST_PTR` over a numpy array is that array. For large
contiguous host arrays one fused launch then beats the many passes of the array-API path,
and gives bit-identical results (the same expressions in the same order).

The sequence follows the OpenCL memory model for host pointers, so it is right on drivers
that copy as well as on those that don't: on a driver that copies, the buffers are made
at the step (the host data is copied in then), the kernel runs, the written arrays are
mapped for reading (the results are copied out then) and the buffers are released before
`step()` returns. Where the device works in the host memory itself (PoCL's CPU device,
asked once per queue), the buffers over parameters, state and gradients, and the
launches laid out over them, are kept for the next step of the same arrays
(`_HostLaunches`); a gradient's buffer does not hold the gradient (`_GradBuffer`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import time
import weakref
from collections.abc import Callable, Hashable, MutableMapping, Sequence
from dataclasses import dataclass, field
from operator import is_
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyopencl as cl

from netcl._backends.base import SUPPORTED_DTYPES, JoinedGrads, Tally, Work
from netcl._kernels import Launcher, Member, fused_kernel, max_slots, shares_state, slots_for
from netcl._precision import BFLOAT16, compute_dtype
from netcl._update import Step
from netcl._xp import is_torch, torch_kinds
from netcl.device import compile_failure, create_queue

__all__ = ["PATH", "Costs", "host_queue", "negated", "update_on_host"]

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


if hasattr(os, "register_at_fork"):  # (POSIX's; where there is no fork, nothing to note)
    os.register_at_fork(after_in_child=_in_child)


@functools.cache
def host_queue() -> cl.CommandQueue | None:
    """A queue on a CPU OpenCL device whose compiler builds kernels, or None.

    The device is the one `PYOPENCL_CTX` names when that is a CPU whose compiler builds
    a kernel, else the first CPU device found whose compiler does (which is what
    `netcl.device.create_queue()` picks too, where that is a CPU). Without one, host
    arrays take the array-API maths.
    """
    if os.environ.get("PYOPENCL_CTX"):
        try:
            named = create_queue()
            if named.device.type & cl.device_type.CPU and compile_failure(named.device) is None:
                return named
        except (cl.Error, RuntimeError, ValueError):
            pass
    try:
        for platform in cl.get_platforms():
            for device in platform.get_devices(device_type=cl.device_type.CPU):
                if compile_failure(device) is None:
                    return cl.CommandQueue(cl.Context([device]))
    except (cl.Error, RuntimeError, ValueError):
        return None
    return None


def dlpack_view(x: Any) -> npt.NDArray[Any] | None:
    """A numpy array over the memory of `x` (an array of another library, in host
    memory), through DLPack; None where it has none, or a dtype numpy lacks, or is on
    another device. (The memory as it is: `host_view` refuses a `negated` tensor.)"""
    try:
        return np.from_dlpack(x.detach() if is_torch(x) else x)
    except (TypeError, ValueError, RuntimeError, BufferError, AttributeError):
        return None


def negated(x: Any) -> bool:
    """Whether `x`, a torch tensor, holds its values negated in its memory (torch's
    negative bit, which a real tensor gets from a lazy negation, such as `z.conj().imag`
    of a complex `z`): DLPack exports the memory as it is, so its values read through
    memory would come out negated."""
    is_neg: Callable[[], bool] | None = getattr(x, "is_neg", None)
    return is_neg is not None and is_neg()


def host_view(x: Any) -> npt.NDArray[Any] | None:
    """`x` as a writeable, contiguous numpy array sharing its memory, or None (also for
    a torch tensor whose memory does not hold its values: `negated`)."""
    if isinstance(x, np.ndarray):
        view = x
    elif is_torch(x) and negated(x):
        return None
    elif is_torch(x) and str(x.dtype) == "torch.bfloat16":
        # (DLPack has bfloat16, numpy has not: the bits, seen as ml_dtypes' bfloat16)
        import torch

        bits = dlpack_view(x.detach().view(torch.int16))
        if bits is None:
            return None
        view = bits.view(BFLOAT16)
    else:
        found = dlpack_view(x)
        if found is None:
            return None
        view = found
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


@dataclass(frozen=True)
class _InBuffer:
    """A host array in the memory of a bigger one that has a buffer: that buffer, and
    where in it the array starts (bytes)."""

    base_data: cl.Buffer
    offset: int


class _GradBuffer:
    """A buffer over a gradient's memory that does not hold the gradient, kept from one
    step to the next on a device that works in host memory: it is over the memory itself
    (a ctypes view of its address), so that a gradient the user drops is freed as before.
    A step takes it again for a torch tensor in the same memory (address and size, read
    from the tensor at each step), and for another array for the very gradient it was
    made for (`owner`) at the same address and size, or (`reuse`) for a new gradient in
    that memory."""

    __slots__ = ("__weakref__", "base_data", "live", "memory", "offset", "owner")
    fixed_binding = True
    """Its buffer never changes (see `Launcher.set`)."""

    def __init__(self, context: cl.Context, address: int, nbytes: int, owner: object) -> None:
        self.memory, self.offset = (address, nbytes), 0
        """The address and size of the memory it is over."""
        self.owner = weakref.ref(owner)  # (first: an array that takes no weak reference makes nothing)
        memory = (ctypes.c_char * nbytes).from_address(address)
        self.base_data = cl.Buffer(context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=memory)
        self.live = [self.base_data]  # (released once)

    def reuse(self, owner: object) -> _GradBuffer:
        """This buffer, now for `owner`: a gradient in the very memory it is over."""
        self.owner = weakref.ref(owner)
        return self

    def holds(self, view: npt.NDArray[Any], owner: object) -> bool:
        return self.owner() is owner and (_address(view), view.nbytes) == self.memory

    def release(self) -> None:
        _release_once(self.live)


SPARE_GRAD_BUFFERS = 16
"""How many buffers over the memory of earlier gradients a step's launches keep for the
next gradients, per run of arrays they launch (each holds no memory of its own, and
making one cost about 15 us of a step). A training loop's allocator hands each new
gradient one of a few dozen places: on the benchmark's LSTM (7 tensors), 16 per run made
0.6 buffers per step, and 32 in all made 1.6 (`python -m tests.step_costs`)."""


SPIN_SECONDS = 1e-3
"""How long a step on host arrays polls for its last launch's end before it sleeps
until then (`_finish`)."""

_yield_core: Callable[[], None] = getattr(os, "sched_yield", functools.partial(time.sleep, 0))
"""Let another thread have this core (`os.sched_yield` is POSIX's; `time.sleep(0)`
elsewhere)."""


def _finish(queue: cl.CommandQueue, last: cl.Event | None) -> None:
    """Wait for `queue`'s commands, of which `last` (where given) is the last.

    A blocking wait puts this thread to sleep until a worker thread of the CPU device
    wakes it. Polling `last`'s status first, for up to `SPIN_SECONDS` and yielding the
    core to the device's workers between polls, made Adam's step on the 2-core test
    machine 23-31% faster on 1,000 numpy values, 4-7% on 160 numpy arrays and 4% on
    2**20 values, and left a torch LSTM's as it was (`python -m tests.step_costs
    --waits`); `queue.finish()` after it costs little and raises the error a launch ended
    with."""
    if last is not None:
        queue.flush()
        end = time.perf_counter() + SPIN_SECONDS
        done = cl.command_execution_status.COMPLETE  # (an error is below it)
        while last.command_execution_status > done and time.perf_counter() < end:
            _yield_core()
    queue.finish()


def _release_once(live: list[cl.Buffer]) -> None:
    if live:
        live.pop().release()


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
    return the others, for the array-API path. `cache` keeps the step's launches (the
    caller's, as `Backend.apply` has it): a step that passes the same `work` list with
    its own scalars shared alike takes them again, and only its gradients are bound
    afresh. Arrays for which `immutable` is true (jax's) are never written in place,
    so never taken."""
    queue = None if _forked else host_queue()
    if queue is None:
        return list(work)

    def chosen(runs: Runs) -> bool:
        return PATH == "kernel" or (PATH == "measured" and _kernel_wins(queue, step, runs))

    launches = _launches_for(queue, step, work, cache, immutable, chosen)
    if not launches.run(queue, step, tally):  # (a new gradient they cannot take: laid out again)
        launches = _launches_for(queue, step, work, cache, immutable, chosen, again=True)
        if not launches.run(queue, step, tally):
            raise RuntimeError("a gradient laid out for the fused kernel has no host view")
    return launches.rest


def _launches_for(
    queue: cl.CommandQueue,
    step: Step,
    work: Sequence[Work],
    cache: MutableMapping[Hashable, Any],
    immutable: Callable[[Any], bool],
    chosen: Callable[[Runs], bool],
    again: bool = False,
) -> _HostLaunches:
    """The launches of `work` in `cache`, or new ones (which take over the old ones'
    kernels and buffers) where those do not fit or `again` says so; `chosen`: whether
    the kernel takes the runs of host arrays, or the array-API path."""
    layout = _layout_of(work, step.kernel.member_scalar_count)
    launches = cache.get("host")
    if not isinstance(launches, _HostLaunches) or again or not launches.fits(work, step, layout):
        rest, runs = _runs_of(step, work, immutable)
        if runs and not chosen(runs):
            rest += [item for items, _ in runs for item in items]
            runs = []
        old = launches if isinstance(launches, _HostLaunches) else None
        launches = cache["host"] = _HostLaunches(queue, step, work, layout, rest, runs, old)
    return launches


def _layout_of(work: Sequence[Work], shared: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What the launches' layout depends on of the items' own scalars: which items share
    the scalars a launch passes once (their labels, in order of appearance), and where
    neighbours' own scalars differ (a run of joined arrays breaks there)."""
    members = [item.member for item in work]
    if members.count(members[0]) == len(members):  # (mostly: every count the same)
        return (0,) * len(members), ()
    labels: dict[tuple[float, ...], int] = {}
    common = tuple(labels.setdefault(member[:shared], len(labels)) for member in members)
    breaks = tuple(k for k in range(1, len(members)) if members[k] != members[k - 1])
    return common, breaks


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

    def arrays(n: int) -> list[npt.NDArray[Any]]:
        state = compute_dtype(dtype)
        return [np.full(n, 0.5, dtype), np.full(n, 0.5, dtype)] + [np.full(n, 0.5, state) for _ in step.buffers]

    def scratch(n: int) -> Work:
        made = [_like(like.data, h) for h in arrays(n)]
        holder = SimpleNamespace(data=made[0], grad=made[1])  # not the user's parameter
        buffers = dict(zip(step.buffers, made[2:], strict=True))
        return Work(holder, made[0], made[1], {}, buffers, like.backend, "", member=member)

    caches: list[dict[Hashable, Any]] = []

    def kernel(n: int) -> Callable[[], None]:
        work = [scratch(n)]
        cache: dict[Hashable, Any] = {}
        caches.append(cache)

        def run() -> None:  # the way a training loop's step goes: the launch kept, new gradients' buffers
            _launches_for(queue, step, work, cache, lambda x: False, lambda runs: True).run(queue, step, scratch_tally)

        return run

    def maths(n: int) -> Callable[[], None]:
        work = scratch(n)
        return lambda: update_by_reference(step, work, scratch_tally)

    try:
        k_small, k_large = _fastest_seconds(kernel(small)), _fastest_seconds(kernel(large))
    finally:
        for cache in caches:
            cache["host"].release()
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


def _owner(g: _GradBuffer) -> object:
    """The gradient `g` is over, or None once it was freed."""
    return g.owner()


def _address(x: npt.NDArray[Any]) -> int:
    address: int = x.__array_interface__["data"][0]
    return address


@dataclass(frozen=True)
class _HostRun:
    """Items whose arrays follow each other in memory, updated as one member of a
    launch; where the gradients of several items are joined, `joined` gives the start
    and size of their run in the array that holds the first one's memory."""

    items: list[Work]
    joined: tuple[int, int] | None


@dataclass
class _HostLaunch:
    launcher: Launcher
    runs: list[_HostRun]
    members: list[Member]
    grads: list[_GradBuffer] = field(default_factory=list)
    """The buffers over the last step's gradients, one per run, where each was a numpy
    array kept alone (a run's own; see `_HostLaunches.run`)."""
    alone: bool = False
    """Whether each run is one item's (no gradients joined)."""
    itemsize: int = 0
    """The size of an element of the parameters (and gradients) it launches."""


class _HostLaunches:
    """A step's launches on the host device for one list of work, and the buffers over
    its arrays.

    Where the device works in host memory itself (`_zero_copy`), the buffers over the
    parameters and their state are kept with the launches for the next step that passes
    the same `work` list (then the same arrays: see `Backend.apply`), and a new layout
    takes over those of the old one that cover the same memory (by identity, else by
    address, size and dtype: a buffer holds its array, so no other array takes that
    memory meanwhile). Gradients' buffers are kept too, but do not hold the gradients
    (`_GradBuffer`), so that a gradient the user drops is freed. Elsewhere every buffer is
    made for one step: a copying driver copies the host data in when it is made, and out
    when it is mapped.
    """

    def __init__(
        self,
        queue: cl.CommandQueue,
        step: Step,
        work: Sequence[Work],
        layout: tuple[tuple[int, ...], tuple[int, ...]],
        rest: list[Work],
        runs: Runs,
        old: _HostLaunches | None,
    ) -> None:
        self.work, self.spec, self.layout, self.path = work, step.kernel, layout, PATH
        self.rest = rest
        """The items the launches leave to the array-API path."""
        self.kept = _zero_copy(queue)
        self.buffers: dict[Hashable, _Wrapped] = {}
        self.launches: list[_HostLaunch] = []
        self.step_buffers: list[_Wrapped] = []
        """Buffers made for the step that runs now (all, where none are kept)."""
        self.grads: dict[int, _GradBuffer] = {}
        """Where buffers are kept: the gradients' of each run (by its place), until a
        gradient in other memory takes the place (then in `spare`)."""
        self.spare: dict[tuple[int, int], _GradBuffer] = {}
        """Buffers over gradients' memory that the last steps used, by address and size,
        for the next gradients there (the most recent `SPARE_GRAD_BUFFERS` per run)."""
        self.places = len(runs)
        """How many runs the launches take (each gradient's buffer, or a joined run's, has
        a place)."""
        self.counter: cl.Buffer | None = None
        """The counter the launches are bound to count skipped values in."""
        self.joined = JoinedGrads()
        """The gradients of the items in runs of several: a new gradient there needs a
        new layout (`fits`)."""
        known = old.buffers if old is not None else {}
        launchers: dict[int, list[Launcher]] = {}
        for launch in old.launches if old is not None else ():
            launchers.setdefault(id(launch.launcher.fused), []).append(launch.launcher)
        try:
            self._lay_out(queue, step, runs, known, launchers)
        finally:
            for key, buffer in known.items():
                if self.buffers.get(key) is not buffer:
                    buffer.base_data.release()
            if old is not None:
                old.buffers = {}
                old._release_grads()  # (the new launches' runs are others)

    def _lay_out(
        self,
        queue: cl.CommandQueue,
        step: Step,
        runs: Runs,
        known: dict[Hashable, _Wrapped],
        launchers: dict[int, list[Launcher]],
    ) -> None:
        # a launch takes runs of one dtype whose own scalars (step counts) are the same
        shared = step.kernel.member_scalar_count
        groups: dict[tuple[np.dtype[Any], tuple[float, ...]], Runs] = {}
        for items, views in runs:
            groups.setdefault((views[0].dtype, items[0].member[:shared]), []).append((items, views))
        context = queue.context
        joined_items: list[Work] = []
        for (dtype, _), group in groups.items():
            members, host_runs = [], []
            for items, views in group:
                buffers = tuple(None if j == 1 else self._wrap(context, v, known, j > 1) for j, v in enumerate(views))
                members.append(Member(buffers, views[0].size))
                joined = None
                if len(items) > 1:
                    joined_items += items
                    grad = views[1]
                    owner = grad.base if grad.base is not None else grad
                    joined = ((_address(grad) - _address(owner)) // grad.itemsize, grad.size)
                host_runs.append(_HostRun(items, joined))
            # (the state netcl makes is in one numpy array per name: then each is passed once)
            one_state = shares_state(members, compute_dtype(dtype).itemsize)
            limit = max_slots(queue.device, step.kernel, one_state)
            for start in range(0, len(members), limit):
                chunk = members[start : start + limit]
                slots = slots_for(len(chunk), limit)
                fused = fused_kernel(context, queue.device, dtype, step.kernel, slots, one_state)
                spare = launchers.get(id(fused))
                launcher = spare.pop() if spare else fused.launcher()
                runs_here = host_runs[start : start + limit]
                alone = all(run.joined is None for run in runs_here)
                self.launches.append(_HostLaunch(launcher, runs_here, chunk, alone=alone, itemsize=dtype.itemsize))
        self.joined = JoinedGrads(joined_items)

    def _wrap(
        self, context: cl.Context, view: npt.NDArray[Any], known: dict[Hashable, _Wrapped], state: bool = False
    ) -> _Wrapped | _InBuffer:
        """A buffer over `view` (a parameter's or a state buffer's memory); for a state
        buffer that is a view of a bigger numpy array (the state netcl makes, see
        `zeros_for`), where buffers are kept, the buffer over that array, at the view's
        offset: the state buffers of a launch are then in one buffer per name."""
        owner = view.base
        if state and self.kept and isinstance(owner, np.ndarray) and owner.flags.c_contiguous:
            whole = self._wrap(context, owner, known)
            return _InBuffer(whole.base_data, _address(view) - _address(owner))
        if not self.kept:
            made = _Wrapped(context, view)
            self.step_buffers.append(made)
            return made
        # the very array of the last step (a numpy parameter is its own view), else one
        # over the same memory (a torch tensor's view is a new object at each step)
        key: Hashable = id(view)
        found = known.get(key) or self.buffers.get(key)
        if found is None or found.host is not view:
            key = (_address(view), view.nbytes, view.dtype.str)
            found = known.get(key) or self.buffers.get(key)
        if found is None:
            found = _Wrapped(context, view)
        self.buffers[key] = found
        return found

    def fits(self, work: Sequence[Work], step: Step, layout: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
        """Whether a step of `work` can take these launches again (the same items; a
        new gradient is taken but in a run of several)."""
        return (
            self.kept
            and work is self.work
            and step.kernel is self.spec
            and layout == self.layout
            and PATH == self.path
            and self.joined.hold()
        )

    def _grad(self, context: cl.Context, run: _HostRun, place: int) -> _Wrapped | _GradBuffer | None:
        """A buffer over the gradients of `run` (the `place`-th run of the launches): the
        last step's where it is still over the very same gradient, else a new one; None
        for a new gradient that has no host view (the launches must be laid out again)."""
        grad = run.items[0].grad
        known = self.grads.get(place)
        view = host_view(grad)
        if view is None:
            return None
        if run.joined is not None:  # (the same gradients as when laid out: see `fits`)
            start, size = run.joined
            owner = view.base if view.base is not None else view
            view = owner.reshape(-1)[start : start + size]
        if self.kept:
            if known is not None and known.holds(view, grad):
                return known
            try:
                return self._kept_grad(context, place, (_address(view), view.nbytes), grad)
            except TypeError:  # (an array that takes no weak reference)
                self.grads.pop(place, None)
        made = _Wrapped(context, view)
        self.step_buffers.append(made)
        return made

    def _torch_grads(
        self, context: cl.Context, now: list[Any], kinds: set[type], first: int, launch: _HostLaunch
    ) -> list[_GradBuffer] | None:
        """The buffers over `now`, the gradients of `launch`'s runs (from the `first`-th
        place on; `kinds`: their types), where they are torch tensors each in a run of
        its own and the last step had buffers for them: taken by their memory, without a
        host view (which costs a DLPack export): the same tensor's or, in a training loop,
        the next gradient's (`_kept_grad`). Else None (`_grad` takes them one by one). A buffer
        over a tensor's memory fits the launch because the plan checked the tensor's
        fingerprint (shape, strides, dtype, device, negative bit: see `negated`): the one
        of the gradient the launch was laid out with, so its memory holds its values laid
        out alike."""
        if not launch.alone or not torch_kinds(kinds):
            return None
        grads, kept, itemsize = [], self.grads, launch.itemsize
        for place, grad in enumerate(now, first):
            address = grad.data_ptr()
            known = kept.get(place)
            if known is None or address % itemsize:  # (the first step; memory off its elements)
                return None
            memory = (address, known.memory[1])  # (its size: the same layout's)
            grads.append(
                known if known.memory == memory and known.live else self._kept_grad(context, place, memory, grad)
            )
        return grads

    def _kept_grad(self, context: cl.Context, place: int, memory: tuple[int, int], grad: object) -> _GradBuffer:
        """The kept buffer for a new gradient of the `place`-th run, in `memory` (address,
        size): a training loop's allocator mostly hands its gradients the few places it
        handed the last ones, so the buffers over those are kept (`spare`), and taken
        again for a gradient in the same memory."""
        known = self.grads.get(place)
        if known is not None and known.memory == memory and known.live:
            return known.reuse(grad)
        found = self.spare.pop(memory, None)
        buffer = found.reuse(grad) if found is not None and found.live else _GradBuffer(context, *memory, grad)
        if known is not None and known.live:
            self.spare[known.memory] = known
            while len(self.spare) > SPARE_GRAD_BUFFERS * self.places:
                self.spare.pop(next(iter(self.spare))).release()
        self.grads[place] = buffer
        return buffer

    def run(self, queue: cl.CommandQueue, step: Step, tally: Tally) -> bool:
        """Enqueue every launch with this step's gradients and scalars, and wait for them;
        False, with nothing enqueued, where a new gradient has no host view."""
        shared = step.kernel.member_scalar_count
        counter = tally.counter(queue)
        bind, self.counter = counter is not self.counter, counter
        place, context = 0, queue.context  # (pyopencl makes a new object at each access)
        try:
            for launch in self.launches:  # every launch's arguments first, then the launches
                now = [run.items[0].grad for run in launch.runs]
                kept = launch.grads
                kinds = set(map(type, now))
                numpy = kinds == {np.ndarray}
                if kept and numpy and all(map(is_, now, map(_owner, kept))):
                    # the very numpy arrays of the last step: the same buffers (a numpy
                    # array's memory moves only with a fingerprint the plan checked)
                    grads: list[Any] = kept
                    place += len(kept)
                elif (torch := self._torch_grads(context, now, kinds, place, launch)) is not None:
                    grads, launch.grads = torch, []
                    place += len(torch)
                else:
                    grads = []
                    for run in launch.runs:
                        grad = self._grad(context, run, place)
                        if grad is None:
                            return False
                        grads.append(grad)
                        place += 1
                    launch.grads = (
                        grads if numpy and launch.alone and all(type(g) is _GradBuffer for g in grads) else []
                    )
                if bind:  # (the members stay bound from one step to the next)
                    launch.launcher.bind(launch.members, counter)
                keys = [run.items[0].member[shared:] for run in launch.runs] if step.kernel.stochastic else []
                common = launch.runs[0].items[0].member[:shared]
                launch.launcher.set(step.scalars + common, keys, grads)
            kernel_event = None
            for launch in self.launches:
                kernel_event = launch.launcher.enqueue(queue, [])
                tally.launched(queue, kernel_event)
                for member in launch.members if not self.kept else ():
                    for w in (member.arrays[0], *member.arrays[2:]):
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
            _finish(queue, kernel_event if self.kept else None)
            return True
        finally:
            for launch in self.launches:
                launch.launcher.drop_grads()
            for w in self.step_buffers:
                w.base_data.release()
            self.step_buffers = []

    def release(self) -> None:
        """Release the buffers kept for the next step."""
        for w in self.buffers.values():
            w.base_data.release()
        self.buffers = {}
        self._release_grads()

    def _release_grads(self) -> None:
        """Release the buffers kept over gradients' memory."""
        for g in [*self.grads.values(), *self.spare.values()]:
            g.release()
        self.grads, self.spare = {}, {}
