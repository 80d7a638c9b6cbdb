"""The interface every array-library adapter implements."""

from __future__ import annotations

import contextlib
import operator
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyopencl as cl

from netcl._precision import HALF_DTYPES
from netcl._types import ParameterLike
from netcl._update import Step

__all__ = [
    "Backend",
    "HostViews",
    "NONE_TYPE",
    "JoinedGrads",
    "SUPPORTED_DTYPES",
    "Tally",
    "Work",
    "check_dtype",
    "check_same_shape",
    "describe",
    "grad_of",
    "weak",
]

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), *HALF_DTYPES)
"""The parameter dtypes netcl updates (half ones in float32, see `netcl._precision`)."""

DTYPE_NAMES = "float32, float64, float16 or bfloat16"


def check_same_shape(data: Any, other: Any, where: str) -> None:
    """Raise ValueError unless `other` (a gradient or state buffer) has `data`'s shape."""
    if tuple(other.shape) != tuple(data.shape):
        raise ValueError(f"{where} has shape {tuple(other.shape)}, but its parameter has shape {tuple(data.shape)}")


def check_dtype(got: object, wanted: object, parameter: object, where: str, state: bool) -> None:
    """Raise TypeError unless `got`, the dtype of a gradient or (with `state`) of a state
    buffer, is `wanted`: the parameter's dtype `parameter`, or its state's."""
    if got != wanted:
        whose = f"the state of a {parameter} parameter is" if state else "its parameter has dtype"
        raise TypeError(f"{where} has dtype {got}, but {whose} {wanted}")


def weak(x: object) -> Callable[[], object]:
    """A weak reference to `x`, or one that never matches when `x` takes none: caches
    compare arrays by identity without keeping them (a gradient the user dropped is
    freed), and an object they cannot refer to weakly is simply checked again."""
    try:
        return weakref.ref(x)
    except TypeError:
        return _nothing


def _nothing() -> object:
    return _nothing  # (no array is this function)


class JoinedGrads:
    """The gradients of items whose arrays a launch joins into one member (a run of
    parameters that follow each other in memory), held weakly: the launch binds such a
    run's gradients as one array, so it fits a later step only while each item has the
    gradient it was laid out with (other items' gradients may be new at any step)."""

    __slots__ = ("grads", "items")

    def __init__(self, items: Iterable[Work] = ()) -> None:
        self.items = list(items)
        self.grads = [weak(item.grad) for item in self.items]

    def hold(self) -> bool:
        """Whether every item still has the gradient recorded for it (a freed one's
        reference gives None, which no item in a launch has)."""
        now = list(map(grad_of, self.items))
        return NONE_TYPE not in map(type, now) and all(map(operator.is_, now, map(operator.call, self.grads)))


grad_of = operator.attrgetter("grad")
"""An item's or a parameter's gradient, for `map`."""

NONE_TYPE = type(None)


def describe(x: object) -> str:
    """A short name for the kind of `x`, for error messages."""
    kind = type(x)
    return f"{kind.__module__}.{kind.__qualname__}"


class Tally:
    """How many values the steps skipped (their gradient was NaN or infinite), counted
    where they were updated and read only when asked: no host synchronization per step.

    The fused kernel adds to one counter in device memory per OpenCL context; the
    array-API path adds array scalars of its library, summed lazily.
    """

    def __init__(self) -> None:
        self._counters: dict[cl.Context, tuple[cl.CommandQueue, cl.Buffer]] = {}
        self._events: dict[cl.Context, dict[cl.CommandQueue, cl.Event]] = {}
        self._pending: list[Any] = []

    def counter(self, queue: cl.CommandQueue) -> cl.Buffer:
        """The counter of the queue's context, which the fused kernel adds to."""
        context = queue.context
        known = self._counters.get(context)
        if known is None:
            flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
            known = (queue, cl.Buffer(context, flags, hostbuf=np.zeros(1, np.int64)))
            self._counters[context] = known
        return known[1]

    def launched(self, queue: cl.CommandQueue, event: cl.Event) -> None:
        """Record a launch that adds to its context's counter."""
        self._events.setdefault(queue.context, {})[queue] = event

    def add(self, count: Any) -> None:
        """Add an array scalar (or an int) of skipped values."""
        if self._pending:
            try:
                self._pending[-1] = self._pending[-1] + count
                return
            except (TypeError, ValueError, RuntimeError):
                pass
        self._pending.append(count)

    def take(self) -> int:
        """The count since the last `take`; resets it to zero. Waits for the launches
        that add to it."""
        total = sum(int(count) for count in self._pending)
        self._pending.clear()
        for context, (queue, counter) in self._counters.items():
            events = list(self._events.pop(context, {}).values())
            if events:
                cl.wait_for_events(events)
            host = np.zeros(1, np.int64)
            cl.enqueue_copy(queue, host, counter, is_blocking=True)
            total += int(host[0])
            cl.enqueue_copy(queue, counter, np.zeros(1, np.int64), is_blocking=True)
        return total


@dataclass(frozen=True)
class HostViews:
    """Arrays seen in host memory (see `Backend.host_views`)."""

    arrays: list[npt.NDArray[Any]]
    """One flat view per array, in order."""
    runs: list[npt.NDArray[Any]]
    """The same memory as flat arrays, in order, each the views of arrays that follow
    each other in one buffer (flat storage) joined: what to hand MPI."""


@dataclass(eq=False)
class Work:
    """One parameter to update at this step, already validated."""

    param: ParameterLike
    data: Any
    grad: Any
    """The gradient during a step; None between steps (a plan kept for the next step
    does not keep the gradient alive)."""
    state: MutableMapping[str, Any]
    """The parameter's state: the optimizer commits `buffers` and `count` into it once
    every update of the step has been written."""
    buffers: dict[str, Any]
    """The state buffers the update reads and writes, by name (new ones start at zero);
    a backend whose arrays cannot be written in place rebinds entries."""
    backend: Backend
    at: str
    """Where the parameter is, for error messages: `param_groups[i]['params'][k]`."""
    count: int = 0
    """The parameter's step count once this step is done."""
    member: tuple[float, ...] = ()
    """The parameter's own scalars at this step (`UpdateRule.member_scalars`, then the
    key of its random bits where it is rounded stochastically)."""
    place: int = 0
    """Where the parameter is in the optimizer: (group index << 20) + its index there
    (what its random bits for stochastic rounding are drawn from)."""


class Backend(ABC):
    """How netcl reaches one kind of array: checks, state, the update, host copies.

    Every `check_*` method raises `TypeError` or `ValueError` naming `where`; none
    of them changes anything.
    """

    name: str

    def stable(self, array: Any) -> bool:
        """Whether `array` cannot change what `check_*` checked (so the same object
        passes again without a check)."""
        return False

    def alias_prints(self, params: Sequence[Any]) -> list[Hashable] | None:
        """For parameters whose `data` is a new object at each access (torch's
        `parameter.data`), what their memory and its layout are, read from the
        parameters themselves: the same list at a later step means each `data` is the
        same memory, laid out alike, as the one checked. None where this backend cannot
        tell (then each `data` is compared with `same_memory`)."""
        return None

    def same_memory(self, array: Any, other: Any) -> bool:
        """Whether `array` is another object for the memory of `other` (which passed the
        checks): torch's `parameter.data` makes a new tensor at each access. With equal
        fingerprints, the checks then pass for `array` too."""
        return array is other

    def extent(self, array: Any) -> tuple[Hashable, int, int] | None:
        """The memory `array`'s elements lie in: where (a buffer, or the host), and the
        first and one past the last byte there; None where this backend cannot tell (a
        step then cannot refuse parameters that share memory: see `Optimizer.step`)."""
        return None

    def fingerprint(self, array: Any, *, memory: bool = True) -> Hashable | None:
        """A cheap summary of what `check_*` looked at and, with `memory`, of where the
        array's memory is, where the same object can move to other memory (a torch
        tensor's `set_`): the same object with the same fingerprint passes the checks
        again, and is still where the launches a backend kept write to. (A gradient's is
        taken without `memory`: a step reads a gradient's memory afresh.) None: check it
        every time."""
        return () if self.stable(array) else None

    def fingerprints(self, arrays: Sequence[Any], *, memory: bool = True) -> list[Hashable | None]:
        """`fingerprint` of each of `arrays` (a step compares those of all its arrays
        at once: a backend may do it faster than one by one)."""
        return [self.fingerprint(array, memory=memory) for array in arrays]

    @abstractmethod
    def check_param(self, data: Any, where: str) -> None:
        """Raise unless netcl can update `data` in this backend."""

    @abstractmethod
    def check_grad(self, data: Any, grad: Any, where: str) -> None:
        """Raise unless `grad` can be the gradient of `data`."""

    @abstractmethod
    def check_state(self, data: Any, buffer: Any, where: str) -> None:
        """Raise unless `buffer`, made earlier for this parameter, still fits `data`."""

    @abstractmethod
    def dtype(self, data: Any) -> np.dtype[Any]:
        """The numpy dtype of `data` (which passed `check_param`)."""

    @abstractmethod
    def zeros_like(self, data: Any) -> Any:
        """A new state buffer for `data`, filled with zeros, on its device, in its
        compute dtype (float32 for a half parameter)."""

    def upcast_into(self, buffer: Any, data: Any) -> None:
        """Write `data`'s values into `buffer` (made by `zeros_for` for it), in the
        buffer's dtype (exact: the buffer's dtype holds every value of `data`'s)."""
        host = self.to_host(data)
        with self.host_views([buffer], write=True) as views:
            views.arrays[0][...] = host.astype(views.arrays[0].dtype).ravel(order="K")

    def zeros_for(self, datas: Sequence[Any]) -> list[Any]:
        """New state buffers for each of `datas` (one state name of a param group's
        parameters, in order). A backend that can makes them views of one buffer, so
        that parameters that follow each other in memory get state that does too."""
        return [self.zeros_like(data) for data in datas]

    def from_host_for(self, hosts: Sequence[npt.NDArray[Any]], datas: Sequence[Any]) -> list[Any]:
        """Copies of `hosts`, the values of one state name for each of `datas` (a param
        group's parameters, in order), laid out as `zeros_for` lays out new state (a
        checkpoint's state then takes the same launches as state made at a step)."""
        return [self.from_host(host, data) for host, data in zip(hosts, datas, strict=True)]

    @abstractmethod
    def to_host(self, array: Any) -> npt.NDArray[Any]:
        """A numpy copy of `array` that shares no memory with it."""

    @abstractmethod
    def from_host(self, host: npt.NDArray[Any], like: Any) -> Any:
        """A copy of `host` in this backend, on the device of `like`."""

    @abstractmethod
    def host_views(self, arrays: Sequence[Any], write: bool) -> contextlib.AbstractContextManager[HostViews]:
        """Each of `arrays` (which passed `check_param`) as a flat numpy array, for the
        time of a `with` block: a view of its memory where the library allows it (host
        memory, or an OpenCL buffer mapped to the host), else a copy. With `write`, what
        the block writes into the views is in the arrays afterwards. Arrays that follow
        each other in one buffer give views that follow each other in one host array."""

    @abstractmethod
    def zero_(self, grad: Any) -> None:
        """Set every element of `grad` to zero, in place."""

    @abstractmethod
    def apply(
        self,
        step: Step,
        work: Sequence[Work],
        cache: MutableMapping[Hashable, Any],
        tally: Tally,
        steady: bool = False,
    ) -> None:
        """Update every parameter in `work` by `step` (in place where the array allows),
        counting skipped values in `tally`.

        `cache` belongs to the calling optimizer and this backend, and lasts from one step
        to the next: what the backend keeps there to make the next step cheaper. A step
        that passes the very `work` list of an earlier step passes the same arrays and
        state buffers; its gradients may be new objects that passed the optimizer's
        checks, and each item's `member` scalars may differ. With `steady`, the gradients
        are the very objects this list had at its last `apply`, and every item has the
        same `member` scalars.
        """

    def rerun(
        self,
        step: Step,
        work: Sequence[Work],
        cache: MutableMapping[Hashable, Any],
        tally: Tally,
        member: tuple[float, ...],
    ) -> bool:
        """Update `work` as its last `apply` did, if what that kept in `cache` allows;
        return whether it did (if not, the caller gives the items their gradients and
        calls `apply`).

        A quiet step calls it: no write to a parameter or its state was noted since the
        last `apply` of this very `work` list (`netcl._writes`), so no array was
        replaced, each gradient is the one its parameter held then (`item.param.grad`;
        the items' `grad` is not set), every item's own scalars are `member`, and
        pyopencl arrays hold the event lists that `apply` gave them (only an assignment
        to an array's `events` rebinds one; pyopencl's own calls add to the list or
        empty it).
        """
        return False
