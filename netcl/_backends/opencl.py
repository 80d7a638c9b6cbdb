"""OpenCL buffers: pyopencl arrays and objects that expose a buffer the same way.

They are updated in place by the fused kernel, on the parameter's own queue. Nothing here
waits on the host: the kernel waits for the events pending on every array it touches and
its own event is recorded on each of them.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Hashable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from math import prod
from typing import Any, Literal, TypeGuard, cast

import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array

from netcl._backends.base import (
    DTYPE_NAMES,
    SUPPORTED_DTYPES,
    Backend,
    HostViews,
    JoinedGrads,
    Tally,
    Work,
    check_dtype,
    check_same_shape,
    describe,
    grad_of,
)
from netcl._kernels import Launcher, Member, fused_kernel, max_slots, shares_state, slots_for
from netcl._precision import compute_dtype
from netcl._update import Step

__all__ = ["OPENCL", "OpenCLBackend", "buffer_runs", "is_opencl", "pending_events", "record_event"]

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


def pending_events(x: object) -> list[cl.Event]:
    return list(getattr(x, "events", None) or ())


def record_event(x: object, event: cl.Event) -> None:
    """Record `event`, which waited for every event pending on `x`, on `x`.

    A pyopencl array's events are those its contents wait for; since `event` waited for
    all of them, it alone now stands for them, and the list stays one event long. The
    list is replaced in place, as pyopencl's own calls change it: arrays that share it
    (the views of one array, the arrays of one launch) waited for no more than `event`
    stands for, and a quiet step's launch, which waits for the list its last run gave
    them (see `Backend.rerun`), waits for `event` too.
    """
    if isinstance(x, cl_array.Array):
        x.events[:] = [event]
        return
    add_event = getattr(x, "add_event", None)
    if add_event is not None:
        add_event(event)


@dataclass(frozen=True)
class _QueueFacts:
    context: cl.Context
    device: cl.Device
    in_order: bool


@functools.cache
def _queue_facts(queue: cl.CommandQueue) -> _QueueFacts:
    """What a step needs to know of a queue, asked of the driver once."""
    out_of_order = cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
    return _QueueFacts(queue.context, queue.device, not queue.properties & out_of_order)


class OpenCLBackend(Backend):
    """Arrays in OpenCL buffers, updated by the fused kernel."""

    name = "opencl"

    def stable(self, array: Any) -> bool:
        # pyopencl arrays keep their buffer, offset, shape and queue; an object of the
        # user's own that exposes a buffer may rebind any of them, so it is checked at
        # every step
        return isinstance(array, cl_array.Array)

    def extent(self, array: Any) -> tuple[Hashable, int, int] | None:
        # (checked arrays are contiguous: their bytes from their offset on)
        size = prod(int(n) for n in array.shape) * np.dtype(array.dtype).itemsize
        if size == 0 or array.base_data is None:
            return None
        start = int(array.offset)
        return array.base_data.int_ptr, start, start + size

    def _check_array(self, x: Any, where: str) -> None:
        dtype = np.dtype(x.dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where} has dtype {dtype}; netcl optimizes {DTYPE_NAMES} arrays")
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
                f"{where} is float64, but device {queue.device.name!r} has no double precision (cl_khr_fp64)"
            )

    def check_grad(self, data: Any, grad: Any, where: str) -> None:
        if (
            type(grad) is cl_array.Array
            and type(data) is cl_array.Array
            and grad.shape == data.shape
            and grad.strides == data.strides
            and grad.dtype == data.dtype
            and grad.context == data.context
            and grad.offset % grad.dtype.itemsize == 0
        ):
            return  # laid out as its parameter, which passed the checks (a training loop's new gradient)
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
        _check_match(data, buffer, where, state=True)
        if buffer.context != _context(data) or _layout(buffer) != _layout(data):
            raise ValueError(
                f"{where} was made for an array in another context or layout than the parameter's array now"
            )

    def dtype(self, data: Any) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(data.dtype)
        return dtype

    def zeros_like(self, data: Any) -> cl_array.Array:
        return cl_array.zeros(
            data.queue, tuple(data.shape), compute_dtype(np.dtype(data.dtype)), order=_layout(data) or "C"
        )

    def to_host(self, array: Any) -> npt.NDArray[Any]:
        host: npt.NDArray[Any] = array.get()
        return host

    def from_host(self, host: npt.NDArray[Any], like: Any) -> cl_array.Array:
        return cl_array.to_device(like.queue, np.asarray(host, order=_layout(like)))

    @contextlib.contextmanager
    def host_views(self, arrays: Sequence[Any], write: bool) -> Iterator[HostViews]:
        # each run of arrays that follow each other in one buffer is mapped once (a
        # CPU device hands out its own memory, a GPU's driver copies the run); the
        # mappings are enqueued together and waited for once
        flags = cast(cl.map_flags, cl.map_flags.READ | cl.map_flags.WRITE if write else cl.map_flags.READ)
        views: list[npt.NDArray[Any]] = []
        mapped: list[tuple[Any, cl.CommandQueue, list[Any]]] = []
        pending: list[cl.Event] = []
        try:
            for run in buffer_runs(arrays):
                first = run[0]
                dtype = np.dtype(first.dtype)
                sizes = [prod(int(n) for n in x.shape) for x in run]
                if sum(sizes) == 0:
                    views.extend(np.empty(0, dtype) for _ in run)
                    continue
                queue = first.queue or cl.CommandQueue(_context(first))
                events = [event for x in run for event in pending_events(x)]
                host, event = cl.enqueue_map_buffer(
                    queue,
                    first.base_data,
                    flags,
                    int(first.offset),
                    (sum(sizes),),
                    dtype,
                    wait_for=events or None,
                    is_blocking=False,
                )
                mapped.append((host, queue, run))
                pending.append(event)
                start = 0
                for size in sizes:
                    views.append(host[start : start + size])
                    start += size
            if pending:
                cl.wait_for_events(pending)
            yield HostViews(views, [host for host, _, _ in mapped])
        finally:
            for host, queue, run in mapped:
                event = host.base.release(queue)
                for x in run:
                    record_event(x, event)

    def zero_(self, grad: Any) -> None:
        if isinstance(grad, cl_array.Array):
            grad.fill(0)
            return
        dtype = np.dtype(grad.dtype)
        size = prod(int(n) for n in grad.shape)
        if size:
            queue = grad.queue
            event = cl.enqueue_fill_buffer(
                queue,
                grad.base_data,
                np.zeros(1, dtype),
                int(grad.offset),
                size * dtype.itemsize,
                wait_for=pending_events(grad) or None,
            )
            record_event(grad, event)

    def zeros_for(self, datas: Sequence[Any]) -> list[cl_array.Array]:
        """State buffers for `datas` as views of one buffer per queue, dtype and layout,
        in the order given, so that parameters that follow each other in a buffer get
        state that does too (see `_runs`)."""
        groups: dict[tuple[cl.CommandQueue, np.dtype[Any], Layout | None], list[int]] = {}
        for k, data in enumerate(datas):
            groups.setdefault((data.queue, compute_dtype(np.dtype(data.dtype)), _layout(data)), []).append(k)
        out: list[Any] = [None] * len(datas)
        for (queue, dtype, layout), members in groups.items():
            sizes = [prod(int(n) for n in datas[k].shape) for k in members]
            arena = cl_array.zeros(queue, max(sum(sizes), 1), dtype)
            start = 0
            for k, size in zip(members, sizes, strict=True):
                out[k] = arena[start : start + size].reshape(tuple(datas[k].shape), order=layout or "C")
                start += size
        return out

    def from_host_for(self, hosts: Sequence[npt.NDArray[Any]], datas: Sequence[Any]) -> list[cl_array.Array]:
        out = self.zeros_for(datas)
        for buffer, host, data in zip(out, hosts, datas, strict=True):
            buffer.set(np.asarray(host, order=_layout(data) or "C"))
        return out

    def apply(
        self,
        step: Step,
        work: Sequence[Work],
        cache: MutableMapping[Hashable, Any],
        tally: Tally,
        steady: bool = False,
    ) -> None:
        """Update `work` with as few launches as the kernel's slots allow.

        Parameters are launched together when they share a queue and a dtype, in the
        order given; a run of them whose arrays follow each other in their buffers is
        one member of a launch (`_runs`). The launches are prepared once and kept in
        `cache` until a step brings other arrays, so a training loop's step only
        enqueues them; a `steady` step of the list they last ran (the same gradients,
        one step count) does not check their layout again.
        """
        prepared = cache.get("prepared")
        if steady and _kept(prepared, step, work):
            prepared.run(step.scalars, tally)
            return
        # where neighbours' own scalars differ (step counts, stochastic rounding's keys),
        # a run must break
        breaks: tuple[int, ...] = ()
        if step.kernel.member_scalar_count or step.kernel.stochastic:
            members = list(map(_MEMBER, work))
            if members and members.count(members[0]) != len(members):  # (mostly: every count the same)
                breaks = tuple(k for k in range(1, len(members)) if members[k] != members[k - 1])
        if (
            not isinstance(prepared, _Prepared)
            or prepared.work is not work
            or prepared.spec is not step.kernel
            or prepared.breaks != breaks
            or not prepared.joined.hold()
        ):
            key = tuple(_identity(x) for item in work for x in (item.data, item.grad, *item.buffers.values())) + (
                breaks,
            )
            if not isinstance(prepared, _Prepared) or prepared.key != key or prepared.spec != step.kernel:
                old = prepared.launchers if isinstance(prepared, _Prepared) else {}
                prepared = _Prepared(key, step, work, old, tally, breaks)
                cache["prepared"] = prepared
            prepared.work, prepared.spec = work, step.kernel
            prepared.joined = JoinedGrads(work[k] for launch in prepared.launches for k in launch.joined)
        prepared.run(step.scalars, tally)

    def rerun(
        self,
        step: Step,
        work: Sequence[Work],
        cache: MutableMapping[Hashable, Any],
        tally: Tally,
        member: tuple[float, ...],
    ) -> bool:
        prepared = cache.get("prepared")
        if step.stochastic or not _kept(prepared, step, work):
            return False
        prepared.run(step.scalars, tally, member)
        return True


def _kept(prepared: object, step: Step, work: Sequence[Work]) -> TypeGuard[_Prepared]:
    """Whether `prepared` holds the launches of `step`'s kernel that the very `work`
    list last ran, laid out for one step count (as a steady step's items have)."""
    return (
        isinstance(prepared, _Prepared)
        and prepared.work is work
        and prepared.spec is step.kernel
        and not prepared.breaks
    )


def buffer_runs(arrays: Sequence[Any]) -> list[list[Any]]:
    """`arrays` split into runs that follow each other in one buffer, in order."""
    runs: list[list[Any]] = []
    end = -1
    for x in arrays:
        size = prod(int(n) for n in x.shape) * np.dtype(x.dtype).itemsize
        if runs and size and end >= 0:
            last = runs[-1][-1]
            if (
                x.base_data is last.base_data
                and int(x.offset) == end
                and x.queue is last.queue
                and np.dtype(x.dtype) == np.dtype(last.dtype)
            ):
                runs[-1].append(x)
                end += size
                continue
        runs.append([x])
        end = int(x.offset) + size if size else -1
    return runs


def _identity(x: Any) -> Hashable:
    """What a prepared launch depends on of an array: its buffer, offset, shape and
    queue (a launch prepared earlier holds the buffers of its parameters and state, so
    their ids cannot be reused meanwhile; a gradient's buffer may be a new one with an
    old id, which the launch is given afresh at each run anyway)."""
    return (id(x.base_data), int(x.offset), tuple(x.shape), id(x.queue))


def _follows(run: Member, member: Member, itemsizes: tuple[int, ...]) -> bool:
    """Whether each of `member`'s arrays starts in the buffer of `run`'s where that one
    ends (`itemsizes`: each array's element size)."""
    return all(
        b.base_data == a.base_data and int(b.offset) == int(a.offset) + run.size * itemsize
        for a, b, itemsize in zip(run.arrays, member.arrays, itemsizes, strict=True)
    )


_Run = tuple[Member, list[int]]
"""A run of parameters updated as one member, and where each is in the step's work."""


def _runs(members: list[tuple[Member, int]], breaks: tuple[int, ...], itemsizes: tuple[int, ...]) -> list[_Run]:
    """`members` (each with its place in the work) joined into runs: a member joins the
    run before it when every one of its arrays (parameter, gradient, state buffers)
    continues that run's in the same buffer and no break (different own scalars) falls
    between them. A run is updated as one member, as its values are one after another
    in every array: the same bits as its parameters one by one."""
    runs: list[tuple[Member, list[int]]] = []
    for member, place in members:
        if runs:
            run, places = runs[-1]
            if place == places[-1] + 1 and place not in breaks and _follows(run, member, itemsizes):
                runs[-1] = (Member(run.arrays, run.size + member.size), [*places, place])
                continue
        runs.append((member, [place]))
    return runs


def _launches(runs: list[_Run], shared: list[tuple[float, ...]], limit: int) -> list[list[_Run]]:
    """`runs` in launches of at most `limit`, in order, each of runs whose `shared` own
    scalars (step counts) are the same: the launch passes them once for all."""
    launches: list[list[_Run]] = []
    for k, run in enumerate(runs):
        if not launches or len(launches[-1]) == limit or shared[k] != shared[k - 1]:
            launches.append([])
        launches[-1].append(run)
    return launches


class _Prepared:
    """A step's launches for one list of arrays, with their kernels' arguments bound.

    Each launch waits for the events pending on every array it touches and records its
    event on them, so that anything that reads them later (`state_dict()`, pyopencl's
    `get()`) waits for it: the parameters, the gradients, and the state buffers that
    the launch's queue does not order (on an out-of-order queue, or made on another
    queue). Gradients are taken from the work at each run.
    """

    def __init__(
        self,
        key: tuple[Hashable, ...],
        step: Step,
        work: Sequence[Work],
        old: dict[Hashable, Launcher],
        tally: Tally,
        breaks: tuple[int, ...],
    ) -> None:
        self.key = key
        self.breaks = breaks
        self.work = work
        """The list of work this plan last ran: the optimizer passes the same list object
        again only with the same arrays (see `Optimizer._plan`)."""
        self.spec = step.kernel
        batches: dict[tuple[cl.CommandQueue, np.dtype[Any]], list[tuple[Member, int]]] = {}
        for place, item in enumerate(work):
            data = item.data
            size = prod(data.shape)
            if size:
                arrays = (data, item.grad, *(item.buffers[name] for name in step.buffers))
                batches.setdefault((data.queue, np.dtype(data.dtype)), []).append((Member(arrays, size), place))
        self.launchers: dict[Hashable, Launcher] = {}
        self.launches: list[_Launch] = []
        self.joined = JoinedGrads()
        """The gradients of the parameters in runs of several (set by `apply`): the
        same work with a new gradient there needs its layout checked again."""
        for (queue, dtype), members in batches.items():
            facts = _queue_facts(queue)
            state_size = compute_dtype(dtype).itemsize
            runs = _runs(members, breaks, (dtype.itemsize, dtype.itemsize) + (state_size,) * len(step.buffers))
            # (the state netcl makes is in one buffer per name: then each is passed once)
            one_state = shares_state([run for run, _ in runs], state_size)
            limit = max_slots(facts.device, step.kernel, one_state)
            common = step.kernel.member_scalar_count
            for n, chunk in enumerate(_launches(runs, [work[places[0]].member[:common] for _, places in runs], limit)):
                slots = slots_for(len(chunk), limit)
                key = (queue, dtype, step.kernel, slots, one_state, n)
                launcher = old.get(key)
                if launcher is None:
                    fused = fused_kernel(facts.context, facts.device, dtype, step.kernel, slots, one_state)
                    launcher = fused.launcher()
                launcher.bind([run for run, _ in chunk], tally.counter(queue))
                self.launchers[key] = launcher
                # the state buffers too where the queue does not order them: on an
                # out-of-order queue, or made on another queue than the parameter's now
                places = [place for _, run_places in chunk for place in run_places]
                touched = [work[place].data for place in places] + [
                    x
                    for place in places
                    for x in (work[place].buffers[name] for name in step.buffers)
                    if not facts.in_order or getattr(x, "queue", None) is not queue
                ]
                self.launches.append(
                    _Launch(
                        queue,
                        launcher,
                        [x for x in touched if isinstance(x, cl_array.Array)],
                        [x for x in touched if not isinstance(x, cl_array.Array)],
                        [run_places[0] for _, run_places in chunk],
                        places,
                        [place for _, run_places in chunk if len(run_places) > 1 for place in run_places],
                    )
                )

    def run(self, scalars: tuple[float, ...], tally: Tally, member: tuple[float, ...] | None = None) -> None:
        """Enqueue every launch, with the work's gradients and own scalars; with
        `member`, of a quiet step (see `Backend.rerun`): every parameter's own scalars,
        each gradient its parameter's, the arrays as the last run left them."""
        work = self.work
        shared = self.spec.member_scalar_count
        quiet = member is not None
        for launch in self.launches:
            if member is None:
                grads = [work[k].grad for k in launch.places]
                first = work[launch.places[0]].member
                keys = [work[k].member[shared:] for k in launch.places] if launch.launcher.fused.keyed else ()
            else:  # (not keyed: a quiet step is not rounded stochastically)
                grads = [work[k].param.grad for k in launch.places]
                first, keys = member, ()
            run = functools.partial(launch.launcher.run, launch.queue, scalars + first[:shared], keys, grads)
            # one list for every array: it holds the only event they wait for after a
            # launch (which waited for all the others). pyopencl may add to it or clear
            # it through any of them (as it does for the views of one array, which
            # share their list); the others then wait for more, or for events that are
            # done, never for less than they need.
            recorded = launch.recorded
            arrays: list[cl_array.Array] = []
            others: list[Any] = []
            if not (quiet and launch.alone):  # (quiet: the arrays of the last run, as it left them)
                arrays, others = self._touched(launch, grads)
            if not others and all(map(operator.is_, map(_EVENTS, arrays), repeat(recorded))):
                # every array still holds the list the last run gave them: its events
                # are what they wait for, and the new event replaces them in place
                event = run(list(recorded))
                recorded[:] = [event]
            else:
                # each event once: the arrays mostly wait for the same ones, in one list
                waits: dict[cl.Event, None] = {}
                seen: list[cl.Event] | None = None
                for x in arrays:
                    events = x.events
                    if events is not seen:
                        seen = events
                        for pending in events:
                            waits[pending] = None
                for x in others:
                    for pending in pending_events(x):
                        waits[pending] = None
                event = run(list(waits))
                recorded = launch.recorded = [event]
                for x in arrays:
                    x.events = recorded
                for x in others:
                    record_event(x, event)
            launch.alone = not others
            tally.launched(launch.queue, event)

    def _touched(self, launch: _Launch, grads: list[Any]) -> tuple[list[cl_array.Array], list[Any]]:
        """The pyopencl arrays a launch touches, and the other objects (exposing buffers)."""
        every = (
            list(map(grad_of, map(self.work.__getitem__, launch.members)))
            if len(launch.members) > len(launch.places)
            else grads
        )
        if list(map(type, every)).count(cl_array.Array) == len(every):  # (mostly)
            return [*launch.arrays, *every], launch.others
        return (
            [*launch.arrays, *(g for g in every if type(g) is cl_array.Array)],
            [*launch.others, *(g for g in every if type(g) is not cl_array.Array)],
        )


_MEMBER = operator.attrgetter("member")
_EVENTS = operator.attrgetter("events")


@dataclass
class _Launch:
    """One enqueue of a step: its kernel and the arrays (but the gradients) whose events
    it waits for and records its own on (pyopencl arrays, and other objects exposing
    buffers)."""

    queue: cl.CommandQueue
    launcher: Launcher
    arrays: list[cl_array.Array]
    others: list[Any]
    places: list[int]
    """Where the first parameter of each of the launch's runs is in the step's work."""
    members: list[int]
    """Where every parameter of the launch is in the step's work."""
    joined: list[int]
    """Where the parameters of its runs of several are in the step's work."""
    recorded: list[cl.Event] = field(default_factory=list)
    """The event list its last run gave every array it touched (see `_Prepared.run`)."""
    alone: bool = False
    """Whether its last run gave every object it touched `recorded` (none of them other
    than a pyopencl array)."""


def _check_match(data: Any, other: Any, where: str, state: bool = False) -> None:
    """Raise unless `other` (a gradient, or with `state` a state buffer) has the shape
    and dtype it needs for `data`: the parameter's dtype, or the state's (float32 for a
    half parameter)."""
    check_same_shape(data, other, where)
    dtype = np.dtype(data.dtype)
    check_dtype(np.dtype(other.dtype), compute_dtype(dtype) if state else dtype, dtype, where, state)


OPENCL = OpenCLBackend()
