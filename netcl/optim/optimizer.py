"""`Optimizer`: what every netcl optimizer shares.

Parameters and param groups, hyperparameter checks, lazily made state keyed on
`id(parameter)`, the validated step, `zero_grad`, and torch-layout checkpoints. A
concrete optimizer (see [`RMSProp`][netcl.optim.RMSProp]) adds its hyperparameters,
which state buffers it keeps, and its update (an
[`UpdateRule`][netcl._update.UpdateRule]).
"""

from __future__ import annotations

import bisect
import operator
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, MutableMapping
from functools import partial
from itertools import chain, pairwise, repeat
from typing import Any, ClassVar, Generic, Self, TypeAlias, TypeGuard, TypeVar, cast, overload

import numpy as np
import numpy.typing as npt

from netcl._backends import Backend, Work, backend_for, checked_backend, describe
from netcl._backends.array_api import is_array_api
from netcl._backends.base import NONE_TYPE, Tally, check_dtype, grad_of, weak
from netcl._backends.opencl import is_opencl
from netcl._kernels import NonFinite
from netcl._parameter import Parameter
from netcl._precision import compute_dtype, stochastic_key
from netcl._types import ParameterLike
from netcl._update import MASTER, Step, UpdateRule
from netcl._writes import PARAMETER_WRITE, STATE_WRITE, NotedList, note_state_write
from netcl.optim._hooks import EVERY_POST_STEP, EVERY_PRE_STEP, HookHandle, Hooks, StepHooks, WithStepHooks
from netcl.optim._hyper import HyperCheck

__all__ = [
    "FloatArray",
    "HyperValue",
    "NonFinite",
    "Optimizer",
    "ParameterState",
    "register_optimizer_step_post_hook",
    "register_optimizer_step_pre_hook",
]


HyperValue: TypeAlias = float | bool | tuple[float, float]
"""The value of a hyperparameter: a real, a flag, or a pair (Adam's betas)."""

FloatArray: TypeAlias = npt.NDArray[np.float32] | npt.NDArray[np.float64]
"""A state buffer in a state dict (float32 for float16 and bfloat16 parameters)."""
"""A host numpy array of a parameter's dtype, as state dicts hold state buffers."""

GroupT = TypeVar("GroupT", bound=Mapping[str, Any])
GroupInputT = TypeVar("GroupInputT", bound=Mapping[str, object])
StateT = TypeVar("StateT", bound=Mapping[str, Any])
StateDictT = TypeVar("StateDictT", bound=Mapping[str, Any])
LossT = TypeVar("LossT")
T = TypeVar("T")

# Keys that torch.optim writes into a param group and that change how torch runs, not
# what it computes, and the bookkeeping its learning-rate schedulers keep there (netcl's
# schedulers keep it there too): a torch checkpoint that carries them loads.
_TORCH_ONLY_KEYS = frozenset(
    {
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "initial_lr",
        "max_lr",
        "min_lr",
        "max_momentum",
        "base_momentum",
    }
)


_NOTHING = object()


class _Checked:
    """The objects a parameter's last full check passed with, and their fingerprints.

    A step with the same parameter array, gradient and state buffers, each with the same
    fingerprint (`Backend.fingerprint`: what the checks looked at, such as a numpy
    array's shape, strides, dtype and writeability; nothing for a pyopencl array, which
    cannot change those), skips the checks. The gradient is held weakly.
    """

    __slots__ = ("backend", "data", "grad", "prints", "state")

    def __init__(
        self, data: object, grad: object, state: Mapping[str, object], backend: Backend, prints: tuple[Hashable, ...]
    ) -> None:
        self.data, self.grad, self.backend, self.prints = data, weak(grad), backend, prints
        self.state = [(name, value) for name, value in state.items() if name != "step"]

    @staticmethod
    def made(data: object, grad: object, state: Mapping[str, object], backend: Backend) -> _Checked | None:
        """A record of a check that just passed, or None where an array has no fingerprint."""
        prints = _fingerprints(backend, data, grad, state)
        return None if prints is None else _Checked(data, grad, state, backend, prints)

    def holds(self, data: object, grad: object, state: Mapping[str, object]) -> bool:
        if grad is not self.grad() or len(state) != len(self.state) + 1:
            return False
        if data is not self.data and not self.backend.same_memory(data, self.data):
            return False
        for name, value in self.state:
            if state.get(name) is not value:
                return False
        return _fingerprints(self.backend, data, grad, state) == self.prints


def _passes(backend: Backend, data: object, grad: object, at: str) -> bool:
    """Whether `grad`, a new gradient of a parameter whose arrays cannot change what was
    checked of them, passes the checks and cannot change either."""
    try:
        backend.check_grad(data, grad, f"{at}.grad")
    except (TypeError, ValueError):
        return False  # (the step checks it again, and raises)
    return backend.stable(grad)


def _fingerprints(
    backend: Backend, data: object, grad: object, state: Mapping[str, object]
) -> tuple[Hashable, ...] | None:
    # (a gradient's memory is read at every step: its layout is what a new one must match)
    prints = backend.fingerprints([data, *(value for name, value in state.items() if name != "step")])
    prints.insert(1, backend.fingerprint(grad, memory=False))
    return None if any(p is None for p in prints) else tuple(prints)


_Entry: TypeAlias = tuple[
    Any, object, Callable[[], object] | None, MutableMapping[str, Any] | None, _Checked | None, Backend | None, str
]
"""A parameter as a plan found it: the parameter, its array, its gradient (weakly), its
state dict, the record of its fingerprints (None where no array can change what was
checked of it), its backend and where it is; the last five None or empty without a
gradient."""

_Check: TypeAlias = tuple[
    Any,
    object,
    Callable[[], object] | None,
    Mapping[str, Any] | None,
    int,
    tuple[str, ...],
    tuple[object, ...],
    _Checked | None,
    Backend | None,
    str,
]
"""What `_Plan.holds` compares of a parameter: an `_Entry` with its state's size, the
names of its buffers and the buffers after the array's state dict."""


class _Same:
    """A settled plan's objects laid out for `_Plan.holds`'s first comparison: whether
    every parameter, array, gradient, state dict and state buffer is the very object it
    was, each kind compared in one pass of C loops (`map`) rather than one Python loop
    over the parameters; the state dicts in one comparison while no write to them was
    noted (`STATE_WRITE`). Where every parameter's gradient is fingerprinted, new
    gradients are taken here too (`_Plan.holds` compares their fingerprints, not their
    identities), and torch parameters' `data`, a new tensor at each access, is told by
    `aliases`.
    Where anything else differs, `_Plan.holds` compares object by object. Gradients
    are held weakly, as in the plan's checks."""

    __slots__ = (
        "aliases",
        "buffers",
        "datas",
        "getter",
        "grads",
        "owners",
        "params",
        "printer",
        "sizes",
        "spread",
        "state_map",
        "states",
        "token",
        "without",
    )

    def __init__(self, checks: list[_Check], state_map: Mapping[int, Any], printer: Backend | None) -> None:
        self.params = [check[0] for check in checks]
        self.datas = [check[1] for check in checks]
        self.grads = [_none if check[2] is None else check[2] for check in checks]
        self.without = self.grads.count(_none)
        with_state = [check for check in checks if check[3] is not None]
        self.owners = [check[0] for check in with_state]
        self.states = [cast(Mapping[str, Any], check[3]) for check in with_state]
        self.sizes = [check[4] for check in with_state]
        names = {check[5] for check in with_state}
        self.getter: Callable[[Any], Any] | None = None
        """Reads a state dict's buffers, in the order `buffers` holds them (None where
        the state dicts name different buffers)."""
        self.spread = False
        """Whether `getter` gives a tuple of buffers, not one."""
        self.buffers = [value for check in with_state for value in check[6]]
        if len(names) == 1:
            only = next(iter(names))
            self.getter = operator.itemgetter(*only) if only else _no_buffers
            self.spread = len(only) != 1
        self.state_map = state_map
        self.token: int | None = None
        """The last write token (`STATE_WRITE`) at which the state dicts were compared
        and were the same; None where a change to them might not note one (a state dict
        or an `Optimizer.state` that is not netcl's own type)."""
        if type(state_map) is ParameterState and all(type(state) is _StateEntry for state in self.states):
            self.token = -1  # (compared at the next step)
        self.printer: Backend | None = None
        """Where every parameter has a gradient and a fingerprint, all by this backend:
        new gradients are then taken by their fingerprints (`_Plan.holds` compares
        them) instead of sending the step to the comparison object by object."""
        if printer is not None and not self.without and all(check[7] is not None for check in checks):
            self.printer = printer
        self.aliases: list[Hashable] | None = None
        """Where each parameter's `data` is a new object at each access over the
        parameter's own memory (torch's `parameter.data`), and `printer` can tell that
        memory and its layout from the parameters themselves: what it told at the
        plan's step (compared instead of the arrays' identities)."""
        if self.printer is not None and any(check[0].data is not check[1] for check in checks):
            self.aliases = self.printer.alias_prints(self.params)

    def holds(self, params: list[Any], states: dict[int, Any]) -> list[object] | None:
        """The parameters' gradients, in order, if every object is the one it was (with
        `printer`, but gradients, which may be new objects); else None."""
        same = operator.is_
        if self.getter is None or not all(map(same, params, self.params)):
            return None
        if self.aliases is not None:
            if cast(Backend, self.printer).alias_prints(params) != self.aliases:
                return None
        elif not all(map(same, map(_DATA, params), self.datas)):
            return None
        grads = list(map(grad_of, params))
        if self.printer is not None:  # (every parameter had a gradient)
            if NONE_TYPE in map(type, grads):
                return None
        else:  # (a dead reference gives None too: then more than the parameters without one)
            known = list(map(operator.call, self.grads))
            if list(map(type, known)).count(NONE_TYPE) != self.without or not all(map(same, grads, known)):
                return None
        token = STATE_WRITE[0]
        if token == self.token and states is self.state_map:
            return grads  # no state dict changed since they were last compared
        # (the plain dict's `get`: ParameterState's also takes parameters)
        if not all(map(same, map(partial(dict.get, states), map(id, self.owners)), self.states)):
            return None
        if list(map(len, self.states)) != self.sizes:
            return None
        found = map(self.getter, self.states)
        try:
            if not all(map(same, chain.from_iterable(found) if self.spread else found, self.buffers)):
                return None
        except KeyError:  # (a buffer renamed: the sizes are the same)
            return None
        if self.token is not None and states is self.state_map:
            self.token = token
        return grads


_DATA = operator.attrgetter("data")
_STEP = operator.itemgetter("step")


def loss_of(closure: Callable[[], LossT] | None) -> LossT | None:
    """Call a step's closure, if any: its loss (TypeError if it is not callable)."""
    if closure is None:
        return None
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {describe(closure)}")
    return closure()


def _values_getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[object, ...]]:
    """A call that gives a param group's values of `names`, in order."""
    getter = operator.itemgetter(*names)
    return getter if len(names) > 1 else lambda group: (getter(group),)


def _no_buffers(state: Mapping[str, Any]) -> tuple[()]:
    """The buffers of a state that has none (plain SGD's: its count alone)."""
    return ()


def _none() -> None:
    """What a parameter without a gradient had (`_Same.grads`)."""


class _Plan:
    """One param group's work at a step, and what it was made from.

    Once a step has run it, `settled` records each state dict's buffers; the next step
    takes the same plan (the same `Work` lists, so backends keep their prepared
    launches) if `holds`: the group's parameters, their arrays, state dicts and buffers
    are the very same objects, the variant needs the same buffers, and each gradient is
    the same object or a new one that passes the checks (torch's `zero_grad()` sets
    gradients to None, so a training loop brings new ones at every step). Gradients are
    held weakly, and each `Work` holds its gradient only during a step.
    """

    __slots__ = (
        "bare",
        "batches",
        "buffers",
        "checks",
        "count",
        "dtypes",
        "entries",
        "entries_only",
        "fresh",
        "items",
        "member",
        "params",
        "printer",
        "printed",
        "printed_arrays",
        "printed_prints",
        "prints",
        "quiet",
        "quiet_able",
        "quiet_tokens",
        "same",
        "stable",
        "states",
        "steady",
        "taken",
    )

    def __init__(self, params: list[Any]) -> None:
        self.params = params
        self.entries: list[_Entry] = []
        self.batches: dict[Backend, list[Work]] = {}
        self.buffers: tuple[str, ...] = ()
        self.dtypes: set[np.dtype[Any]] = set()
        self.checks: list[_Check] = []
        """Per parameter, what `holds` compares (a new gradient is checked with the
        backend and where the parameter is)."""
        self.same: _Same | None = None
        """The objects of `checks`, for `holds`'s first comparison (once settled)."""
        self.printed_arrays: list[object] = []
        """What `holds` fingerprints after `_Same` found the same objects: the
        fingerprinted parameters' arrays and state buffers, in `prints`' order, without
        the arrays where `_Same` compared the parameters' memory (`aliases`: the arrays
        are netcl's own objects over it, which nothing else can change)."""
        self.printed_prints: list[Hashable | None] = []
        """The fingerprints of `printed_arrays` at the plan's step."""
        self.printed: list[int] | None = None
        """Where the fingerprinted parameters are in `checks` (None: all of them)."""
        self.items: list[Work] = []
        """Every `Work` of the plan, in order (what `work()` yields)."""
        self.states: list[MutableMapping[str, Any]] = []
        """The state dict of each of `items` (once settled)."""
        self.entries_only = False
        """Whether each of `states` is a `_StateEntry`."""
        self.count: int | None = None
        """During a step of a settled plan: the step count of every parameter after it,
        where they all have the same (else each `Work` has its own)."""
        self.stable = True
        """Whether every array of the plan cannot change what was checked of it, or has
        a fingerprint that shows when it did: then the plan can be kept."""
        self.taken = False
        """Whether a new gradient was taken (`_remember`) since the last step that
        updated every `Work` of the plan."""
        self.fresh: list[tuple[Backend, object, str]] = []
        """The new gradients `holds` took in its loop over the parameters, with their
        backend and parameter's place, for `Optimizer._plans` to compare with the
        arrays written (which then empties it)."""
        self.steady = False
        """Whether this step's gradients are, every one, the very object the last step
        that updated the plan's `Work` had (`holds` found every object the same, without
        fingerprints, and no gradient was taken since that step)."""
        self.quiet = False
        """Whether this step's `holds` found no write noted since the plan's last step
        (see `quiet_tokens`): then nothing was compared but the list of parameters'
        identity, and every step count is the one that step committed."""
        self.bare = False
        """During a `quiet` step: whether its `Work` still lack their gradients and own
        scalars (`fill`), which a backend's `rerun` does not read (it takes `member`,
        and each gradient from its parameter)."""
        self.member: tuple[float, ...] = ()
        """During a `quiet` step: the own scalars of every parameter (one count for all)."""
        self.quiet_able = False
        """Whether a step may be `quiet` (once settled): the group's list of parameters
        netcl's own (`NotedList`, which notes its changes), every parameter a
        `netcl.Parameter` (which notes the assignment of its array and gradient), every
        state dict netcl's own, every array one that cannot change what was checked of
        it (no fingerprints)."""
        self.quiet_tokens: tuple[int, int] | None = None
        """The write tokens (`netcl._writes`) after the plan's last step, where it was
        `quiet_able` and committed one count for all; else None."""
        self.printer: Backend | None = None
        self.prints: tuple[list[Hashable | None], list[Hashable | None]] | None = ([], [])
        """The fingerprints `holds` compares, with `printer`'s `fingerprints`: of each
        fingerprinted parameter's array and state buffers, in order, and of their
        gradients; None where the plan cannot be kept (fingerprints from before the
        state existed, or from two backends)."""

    def settled(self, buffers: tuple[str, ...], state_map: Mapping[int, Any]) -> _Plan:
        self.buffers = buffers
        self.items = [item for work in self.batches.values() for item in work]
        self.states = [item.state for item in self.items]
        self.entries_only = all(type(state) is _StateEntry for state in self.states)
        self.checks = []
        arrays: list[Hashable | None] = []
        states: list[Hashable | None] = []
        grads: list[Hashable | None] = []
        kept_prints = True
        for param, data, grad, state, checked, backend, at in self.entries:
            names = tuple(n for n in state if n != "step") if state is not None else ()
            kept = tuple(cast(Mapping[str, Any], state)[n] for n in names)
            self.checks.append((param, data, grad, state, len(kept) + 1, names, kept, checked, backend, at))
            if checked is not None and kept_prints:
                if len(checked.prints) != 2 + len(kept) or self.printer not in (None, checked.backend):
                    kept_prints = False
                else:
                    self.printer = checked.backend
                    arrays.append(checked.prints[0])
                    arrays += checked.prints[2:]
                    states += checked.prints[2:]
                    grads.append(checked.prints[1])
        self.prints = (arrays, grads) if kept_prints else None
        self.printed = [k for k, check in enumerate(self.checks) if check[7] is not None]
        if len(self.printed) == len(self.checks):
            self.printed = None
        self.same = _Same(self.checks, state_map, self.printer if self.prints is not None else None)
        same = self.same
        printed = [check for check in self.checks if check[7] is not None]
        if same.aliases is None:
            self.printed_arrays = [x for check in printed for x in (check[1], *check[6])]
            self.printed_prints = arrays
        else:
            self.printed_arrays = [x for check in printed for x in check[6]]
            self.printed_prints = states
        self.quiet_able = (
            same.getter is not None
            and same.token is not None
            and self.printer is None
            and type(self.params) is NotedList  # (a change to it is noted too)
            and set(map(type, self.params)) == {Parameter}
        )
        return self

    def holds(self, params: list[Any], states: dict[int, Any], buffers: tuple[str, ...]) -> bool:
        """Whether a step may take this plan again: the very same objects (torch's
        `parameter.data`: the same memory), with the same fingerprints where an array
        can change what was checked of it, but gradients, which may be new objects that
        pass the checks: a fingerprinted one with the last one's fingerprint, another
        (a pyopencl array) checked afresh, and remembered for the next step where the
        objects are compared one by one. (It runs at every step, for every parameter:
        `_Same` first, then one tight loop.)"""
        checks, prints = self.checks, self.prints
        self.steady = False
        if self.fresh:  # (a step that raised after its `holds`)
            self.fresh = []
        tokens, self.quiet_tokens, self.quiet = self.quiet_tokens, None, False
        if params is not self.params or len(params) != len(checks) or buffers != self.buffers or prints is None:
            return False
        if tokens == (STATE_WRITE[0], PARAMETER_WRITE[0]) and states is cast(_Same, self.same).state_map:
            self.quiet = self.steady = True  # (nothing replaced: the last step's objects, in the same list)
            return True
        same = self.same.holds(params, states) if self.same is not None else None
        if same is not None:  # the very same objects: the fingerprinted ones' arrays as they were
            if self.printer is None:  # (then no new gradients: `_Same.holds`)
                self.steady = not self.taken
                return True
            printed = self.printed
            grads = same if printed is None else [same[k] for k in printed]
            # (new gradients pass by their fingerprints: nothing to remember of them, and
            # their memory is not compared with the arrays written: see `Optimizer._plans`)
            return self._printed(self.printed_arrays, grads, self.printed_prints)
        lookup = dict.get  # the plain dict's, not ParameterState's (which also takes parameters)
        fresh: list[tuple[int, object]] = []
        taken: list[tuple[Backend, object, str]] = []
        seen: list[object] = []  # the arrays whose fingerprints are compared at the end
        seen_grads: list[object] = []
        for k, param in enumerate(params):
            known, data, grad, state, size, names, kept, checked, backend, at = checks[k]
            if param is not known:
                return False
            now_data = param.data
            if now_data is not data and (checked is None or not checked.backend.same_memory(now_data, data)):
                return False
            now = param.grad
            if grad is None or now is None:
                if now is not grad:  # (None then, and None now)
                    return False
                continue
            if now is not grad():  # (a dead reference gives None)
                if checked is None and (backend is None or not _passes(backend, now_data, now, at)):
                    return False
                fresh.append((k, now))  # (a fingerprinted one: by its fingerprint, below)
                if backend is not None:
                    taken.append((backend, now, at))
            if state is not None:
                same_state = lookup(states, id(param)) is state
                if not same_state or len(state) != size:
                    return False
                for name, value in zip(names, kept, strict=True):
                    if state.get(name) is not value:
                        return False
                if checked is not None:
                    seen.append(now_data)
                    seen += kept
                    seen_grads.append(now)
        if (seen or seen_grads) and not self._printed(seen, seen_grads, prints[0]):
            return False
        for k, now in fresh:
            self._remember(k, now)
        self.fresh = taken
        return True

    def _remember(self, k: int, grad: object) -> None:
        """Record `grad`, a new gradient that passed, as the `k`-th parameter's (weakly)."""
        known, data, _, state, size, names, kept, checked, backend, at = self.checks[k]
        ref = weak(grad)
        self.taken = True
        self.checks[k] = (known, data, ref, state, size, names, kept, checked, backend, at)
        if self.same is not None:
            self.same.grads[k] = ref

    def _printed(self, arrays: list[object], grads: list[object], expected: list[Hashable | None]) -> bool:
        """Whether `arrays` have the fingerprints `expected`, and `grads` those the
        plan recorded of its gradients."""
        printer, prints = cast(Backend, self.printer), cast("tuple[list[Hashable], list[Hashable]]", self.prints)
        return printer.fingerprints(arrays) == expected and printer.fingerprints(grads, memory=False) == prints[1]

    def fill(self, work: list[Work]) -> None:
        """Give a `bare` step's `work` their gradients and own scalars, for `apply`."""
        self.bare = False
        for item in work:
            item.grad, item.member = item.param.grad, self.member

    def work(self) -> list[Work]:
        """Every `Work` of the plan, in order."""
        return self.items or [item for work in self.batches.values() for item in work]


_Span: TypeAlias = tuple[tuple[str, int], int, str]
"""An array's memory: (where, its first byte), one past its last byte, and what it is."""


def _written_spans(plans: list[tuple[Step, _Plan, bool]]) -> list[_Span]:
    """The memory of the arrays a step writes in place (each parameter's and its state
    buffers), in order; raise ValueError where two of them share memory: a launch
    updates many parameters at once, so such arrays would be read and written in an
    order nobody chose. (Arrays whose memory a backend cannot tell are left out.)"""
    written: list[_Span] = []
    places: dict[int, str] = {}
    for step, plan, _ in plans:
        for param, data, grad, state, _, backend, at in plan.entries:
            if backend is None or state is None or grad is None:  # (no gradient: not updated)
                continue
            place = places.setdefault(id(param), at)
            if place is not at:  # (a list changed in place: the constructor refuses it too)
                raise ValueError(f"{at} is {place} again; give each parameter once, in one group")
            arrays = [(data, f"{at}.data"), *((state[n], f"state[{n!r}] of {at}") for n in step.buffers if n in state)]
            for array, what in arrays:
                extent = backend.extent(array)
                if extent is not None:
                    written.append(((str(extent[0]), extent[1]), extent[2], what))
    written.sort()
    for (first, stop, what), (second, _, other) in pairwise(written):
        if second[0] == first[0] and second[1] < stop:  # (sorted: overlaps are neighbours)
            _shared(other, what)
    return written


def _refuse_shared_gradients(written: list[_Span], grads: Iterable[tuple[Backend, object, str]]) -> None:
    """Raise ValueError where a gradient (with its backend and its parameter's place)
    shares memory with an array of `written` (`_written_spans`) but its own parameter's
    array, exactly (the update reads both at each element)."""
    starts = [span[0] for span in written]
    for backend, grad, at in grads:
        extent = backend.extent(grad)
        if extent is None:
            continue
        where, start, stop = str(extent[0]), extent[1], extent[2]
        # from the last array written that starts before the gradient on (arrays written
        # do not overlap), to the last that starts before it ends
        k = max(bisect.bisect_right(starts, (where, start)) - 1, 0)
        while k < len(written) and written[k][0] < (where, stop):
            (place, low), high, other = written[k]
            if place == where and low < stop and start < high and (low, high, other) != (start, stop, f"{at}.data"):
                _shared(f"{at}.grad", other)
            k += 1


def _shared(what: str, other: str) -> None:
    raise ValueError(
        f"{what} shares memory with {other}; a step writes each parameter and each state buffer in place, "
        "several in one launch, so each needs memory of its own (a gradient may be its own parameter's "
        "array, exactly)"
    )


class _Kept:
    """What a param group keeps from one step to the next, so that a training loop's
    step is cheap: the `Step` of its hyperparameters (while each value is the very same
    object), its settled plan (while `_Plan.holds`), and each backend's prepared
    launches (which the backend takes again while they fit the plan's work)."""

    __slots__ = ("launches", "plan", "step", "values")

    def __init__(self, values: list[object], step: Step) -> None:
        self.values = values
        """The hyperparameters' values `step` was made from, in `hyperparameters`' order."""
        self.step = step
        self.plan: _Plan | None = None
        self.launches: dict[Backend, dict[Hashable, Any]] = {}
        """Per backend, the cache its `apply` keeps its launches in."""


def _is_parameter_like(x: object) -> TypeGuard[ParameterLike]:
    return hasattr(x, "data") and hasattr(x, "grad")


KeyT = TypeVar("KeyT")
ValueT = TypeVar("ValueT")


class _NotesWrites(dict[KeyT, ValueT]):
    """A dict that notes every change made to it through its methods (`note_state_write`)."""

    __slots__ = ()

    def __setitem__(self, key: KeyT, value: ValueT) -> None:
        """Set `key` to `value`."""
        super().__setitem__(key, value)
        note_state_write()

    def __delitem__(self, key: KeyT) -> None:
        """Remove `key`."""
        super().__delitem__(key)
        note_state_write()

    def __ior__(self, other: Any) -> Self:  # type: ignore[override,misc]
        """Update from `other` (`|=`)."""
        super().__ior__(other)
        note_state_write()
        return self

    def pop(self, *args: Any) -> Any:
        """Remove a key and return its value (or the default given)."""
        note_state_write()
        return super().pop(*args)

    def popitem(self) -> tuple[KeyT, ValueT]:
        """Remove and return the last (key, value) pair."""
        note_state_write()
        return super().popitem()

    def clear(self) -> None:
        """Remove everything."""
        super().clear()
        note_state_write()

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Update from a mapping or pairs, and keywords, as `dict.update`."""
        super().update(*args, **kwargs)
        note_state_write()

    def setdefault(self, key: KeyT, default: Any = None) -> Any:
        """The value of `key`, set to `default` first where it has none."""
        note_state_write()
        return super().setdefault(key, default)


class _StateEntry(_NotesWrites[str, Any]):
    """A parameter's state dict as netcl makes it: a plain dict to its users (torch's
    `optimizer.state[param]`), which notes every change."""

    __slots__ = ()


class ParameterState(_NotesWrites[int, StateT]):
    """`Optimizer.state`: each parameter's state, keyed on `id(parameter)`, as the
    concept page says; the parameter object itself is accepted as a key too (torch's
    habit, `optimizer.state[param]`), and stands for its `id()`."""

    @staticmethod
    def _key(key: object) -> int:
        return key if type(key) is int else id(key)  # noqa: E721 (a bool or a numpy int is an object)

    def __getitem__(self, key: object) -> StateT:
        """The state of a parameter, given as `id(parameter)` or as the parameter."""
        return super().__getitem__(self._key(key))

    def __setitem__(self, key: object, value: StateT) -> None:
        """Set the state of a parameter, given as `id(parameter)` or as the parameter."""
        super().__setitem__(self._key(key), value)

    def __delitem__(self, key: object) -> None:
        """Forget the state of a parameter, given as `id(parameter)` or as the parameter."""
        super().__delitem__(self._key(key))

    def __contains__(self, key: object) -> bool:
        """Whether a parameter (or `id(parameter)`) has state."""
        return super().__contains__(self._key(key))

    @overload
    def get(self, key: object, default: None = None, /) -> StateT | None: ...
    @overload
    def get(self, key: object, default: StateT, /) -> StateT: ...
    @overload
    def get(self, key: object, default: T, /) -> StateT | T: ...

    def get(self, key: object, default: object = None, /) -> object:
        """The state of a parameter (or `id(parameter)`), or `default`."""
        return super().get(self._key(key), default)

    def pop(self, key: object, *default: Any) -> Any:
        """Remove and return the state of a parameter (or `id(parameter)`)."""
        return super().pop(self._key(key), *default)


class Optimizer(WithStepHooks, Generic[GroupT, GroupInputT, StateT, StateDictT]):
    """The base of netcl's optimizers; use a concrete one such as `RMSProp`.

    Attributes:
        param_groups: The param groups: each holds `params` (a list of parameters) and
            every hyperparameter, by name. Change a hyperparameter here (a learning-rate
            schedule) and the next `step()` uses it; nothing is rebuilt.
        state: Per-parameter state, keyed on `id(parameter)` (the parameter itself is
            accepted as a key too, as in torch): empty until the first step, filled
            lazily, with no entry for a parameter that never had a gradient.
        defaults: The hyperparameters given to the constructor.
    """

    rule: ClassVar[UpdateRule]
    """The update, as the backends run it."""
    hyperparameters: ClassVar[Mapping[str, HyperCheck]]
    """Every hyperparameter and how its values are checked."""
    optional: ClassVar[Mapping[str, object]] = {"master_weights": False, "stochastic_rounding": False}
    """Hyperparameters a loaded state dict may lack (torch's has none of netcl's own
    options), and the value each then takes: the one that changes nothing."""
    torch_fixed: ClassVar[Mapping[str, object]] = {}
    """Keys of torch's param groups that name a variant this class always is
    (`decoupled_weight_decay` for Adam and AdamW): a checkpoint must agree."""

    param_groups: list[GroupT]
    state: ParameterState[StateT]
    defaults: dict[str, HyperValue]

    def __init__(
        self,
        params: Iterable[ParameterLike | GroupInputT],
        defaults: Mapping[str, object],
        *,
        nonfinite: NonFinite = "skip",
        torch_only: Mapping[str, object] | None = None,
    ) -> None:
        _check_torch_only(torch_only or {})
        if nonfinite not in ("skip", "count", "propagate"):
            raise ValueError(f"nonfinite must be 'skip', 'count' or 'propagate', got {nonfinite!r}")
        self.nonfinite: NonFinite = nonfinite
        """What a step does with an element whose gradient is NaN or infinite."""
        self._start()
        self.defaults = {name: check(name, defaults[name]) for name, check in self.hyperparameters.items()}
        self._check_combination(self.defaults, "")
        self.param_groups = []
        for group in _as_groups(params):
            self._add_group(group)

    def _start(self) -> None:
        """Make the state and the caches empty (a new optimizer's, or a copy's)."""
        self._tally = Tally()
        self._lock = threading.RLock()
        self._checked: dict[int, _Checked] = {}
        """Per parameter (by `id()`), the record of its last full check."""
        self._kept: dict[int, _Kept] = {}
        """Per param group (by index), what it keeps from its last step."""
        self._written: list[_Span] = []
        """The memory of the arrays the plans `_written_by` write (`_written_spans`)."""
        self._written_by: list[_Plan] = []
        self._owners: dict[int, ParameterLike] = {}
        """The parameter of each entry of `state`: held, so that no new object takes
        over its `id()` while the entry exists (see `_prune`)."""
        self._group_count = 0
        self._hyper_values = _values_getter(tuple(self.hyperparameters))
        """A group's values of `hyperparameters`, in order (KeyError where one is missing)."""
        self.state = ParameterState()
        self._step_hooks = StepHooks(every=True)
        self._save_hooks: tuple[Hooks[Callable[..., object]], Hooks[Callable[..., object]]] = (
            Hooks("a state_dict pre-hook"),
            Hooks("a state_dict post-hook"),
        )
        self._load_hooks: tuple[Hooks[Callable[..., object]], Hooks[Callable[..., object]]] = (
            Hooks("a load_state_dict pre-hook"),
            Hooks("a load_state_dict post-hook"),
        )

    def __getstate__(self) -> dict[str, object]:
        """What `pickle` and `copy.deepcopy` take of the optimizer: its settings, param
        groups and state, each state with its parameter (`state` is keyed on `id()`s,
        which a copy's parameters do not share); not its caches (kernels and queues,
        which pickle refuses), its hooks (as torch's) nor the count of
        `skipped_nonfinite()`."""
        owners = {**self._owners, **{id(param): param for group in self.param_groups for param in group["params"]}}
        if any(is_opencl(param.data) for param in owners.values()):
            raise TypeError(
                "an optimizer of OpenCL arrays cannot be pickled or copied (pyopencl arrays cannot); "
                "save its state_dict() (see netcl.optim.checkpoint) and load it into a new optimizer"
            )
        return {
            "defaults": self.defaults,
            "nonfinite": self.nonfinite,
            "param_groups": self.param_groups,
            "state": [(owners.get(key), value) for key, value in self.state.items()],
        }

    def __setstate__(self, saved: dict[str, Any]) -> None:
        """Restore what `__getstate__` gave, the state keyed on the copied parameters."""
        self._start()
        self.defaults, self.nonfinite, self.param_groups = saved["defaults"], saved["nonfinite"], saved["param_groups"]
        for param, value in saved["state"]:
            if param is not None:
                dict.__setitem__(self.state, id(param), value)
                self._owners[id(param)] = param
        self._group_count = len(self.param_groups)

    # --- parameters and groups -------------------------------------------------------

    def add_param_group(self, param_group: GroupInputT) -> None:
        """Add a param group: a dict with `params` and any hyperparameters to override.

        Raises:
            TypeError: A parameter is not parameter-like or holds an array netcl cannot
                optimize, or a value has the wrong type.
            ValueError: An unknown key, a hyperparameter out of range, or a parameter
                that is already in this or another group.
        """
        with self._lock:
            self._add_group(param_group)

    def _add_group(self, param_group: Mapping[str, object]) -> None:
        where = f"param_groups[{len(self.param_groups)}]"
        if not isinstance(param_group, Mapping):
            raise TypeError(f"{where} must be a dict with a 'params' entry, got {describe(param_group)}")
        if "params" not in param_group:
            raise ValueError(f"{where} has no 'params' entry")
        unknown = sorted(set(param_group) - {"params", *self.hyperparameters})
        if unknown:
            raise ValueError(
                f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: 'params', {', '.join(map(repr, self.hyperparameters))}"
            )
        params = NotedList(_as_param_list(param_group["params"], f"{where}['params']"))
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for index, param in enumerate(params):
            at = f"{where}['params'][{index}]"
            _check_parameter(param, at)
            if id(param) in seen:
                raise ValueError(
                    f"{at} appears more than once in the optimizer's parameters; give each parameter once, in one group"
                )
            seen.add(id(param))
        group: dict[str, Any] = {"params": params}
        for name, check in self.hyperparameters.items():
            value = param_group.get(name, self.defaults[name])
            group[name] = check(name, value, f"{where}: " if name in param_group else "")
        self._check_combination(group, f"{where}: ")
        self.param_groups.append(cast(GroupT, group))

    def _check_combination(self, hyper: Mapping[str, object], where: str) -> None:
        """Raise ValueError if the hyperparameters, each valid, do not go together."""

    def _hyper(self, group: GroupT) -> dict[str, HyperValue]:
        return {name: group[name] for name in self.hyperparameters}

    # --- the step ----------------------------------------------------------------------

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], LossT]) -> LossT: ...

    def step(self, closure: Callable[[], LossT] | None = None) -> LossT | None:
        """Update every parameter that has a gradient.

        Everything that can be checked is checked before anything is written, so a step
        that raises changes nothing: every hyperparameter changed in `param_groups`
        since the last step (with the constructor's checks, and again in the dtype of
        the parameters it is used with), every parameter, gradient and state buffer, and
        every state's `step` count. Step counts and new state buffers are committed only
        once every update has been written. OpenCL arrays are updated by the fused
        kernel on their own queue, without waiting on the host.

        The hooks of `register_step_pre_hook` run before it, those of
        `register_step_post_hook` after it.

        Args:
            closure: Called first, to recompute the loss (and the gradients); its result
                is returned.

        Raises:
            TypeError: A hyperparameter in `param_groups` has the wrong type, a gradient
                is not an array of the parameter's kind, or has another dtype.
            ValueError: A hyperparameter in `param_groups` is missing or out of range
                (in the parameters' dtype too), a gradient has another shape, device,
                context or layout than its parameter, or a state's `step` is not a
                whole number >= 0.
        """
        if self._step_hooks:
            return self._hooked_step(closure)
        return self._step(closure)

    def _step(self, closure: Callable[[], LossT] | None) -> LossT | None:
        loss = loss_of(closure)
        with self._lock:
            plans = self._plans()
            try:
                for step, plan, known in plans:
                    self._stage(step, plan, known)
                for index, (step, plan, _) in enumerate(plans):
                    steady = plan.steady and plan.count is not None  # (the same gradients, one count)
                    launches = self._kept[index].launches
                    for backend, work in plan.batches.items():
                        cache = launches.setdefault(backend, {})
                        if plan.bare:  # (quiet: the last launches again, if the backend kept them)
                            if backend.rerun(step, work, cache, self._tally, plan.member):
                                continue
                            plan.fill(work)
                        backend.apply(step, work, cache, self._tally, steady)
                for _, plan, _ in plans:
                    plan.taken = False  # (every gradient taken is the one just updated with)
            finally:
                for _, plan, _ in plans:
                    if not plan.bare:
                        for item in plan.work():
                            item.grad = None  # the plan outlives the step; the gradient need not
            self._commit(plans)
            tokens = (STATE_WRITE[0], PARAMETER_WRITE[0])
            for index, (_, plan, _) in enumerate(plans):
                if plan.quiet_able and plan.count is not None and self._kept[index].plan is plan:
                    plan.quiet_tokens = tokens
        return loss

    def _hooked_step(self, closure: Callable[[], LossT] | None) -> LossT | None:
        """`step()` with its pre-hooks before it and its post-hooks after it (torch's
        order and arguments: the step's positional and keyword arguments)."""
        args, kwargs, given = self._step_hooks.before(self, closure)
        loss = self._step(given)
        self._step_hooks.after(self, args, kwargs)
        return loss

    def _prepared_step(self, averaged: bool = False) -> tuple[Callable[[], object], Callable[[], None]]:
        """For a distributed optimizer, which steps this one once its ranks agree: run
        the step pre-hooks and check the step as `step()` would, raising as it would;
        return the step itself (without them again) and the post-hooks, which it calls
        once every rank's work is done. A closure the pre-hooks give runs here (not
        where the gradients were `averaged` already: see `StepHooks.before`)."""
        none: Callable[[], object] | None = None
        args, kwargs, given = self._step_hooks.before(self, none, averaged)
        loss_of(given)
        self._check_step()
        return (lambda: self._step(None)), (lambda: self._step_hooks.after(self, args, kwargs))

    def _check_step(self) -> None:
        """Raise as `step()` would on this input, and change nothing (the distributed
        optimizers agree on this verdict across ranks before they communicate)."""
        with self._lock:
            for _, plan, _ in self._plans():
                if plan.quiet:  # the counts the last step wrote; a check is no write, so
                    plan.quiet_tokens = (STATE_WRITE[0], PARAMETER_WRITE[0])  # the step may be quiet too
                    continue
                for item in plan.work():
                    item.grad = None
                    count = item.state["step"]
                    if type(count) is not int or count < 0:  # noqa: E721 (as in _stage)
                        _saved_step(count, f"state['step'] of {item.at}")

    def _stage(self, step: Step, plan: _Plan, known: bool) -> None:
        """Prepare each parameter's step count, state buffers and own scalars; raise
        before anything the user can see has changed. (A known plan has its buffers.)"""
        member_scalars = step.member_scalars
        if not known:  # new state buffers: one buffer per name and backend (`zeros_for`)
            for backend, work in plan.batches.items():
                for name in step.buffers:
                    needing = [item for item in work if name not in item.state]
                    for item, buffer in zip(needing, backend.zeros_for([i.data for i in needing]), strict=True):
                        if name == MASTER:  # the master copy starts as the parameter
                            backend.upcast_into(buffer, item.data)
                        item.buffers[name] = buffer
        stochastic = step.stochastic
        last, plan.count = plan.count, None
        if plan.quiet and last is not None:  # the counts the last step committed
            plan.count = last + 1
            plan.member = () if member_scalars is None else member_scalars(step.hyper, last + 1, frozenset())
            return
        if known and not stochastic:  # mostly, every parameter has the same count
            counts = list(map(_STEP, plan.states))
            first = counts[0] if counts else 0
            if counts.count(first) == len(counts) and list(map(type, counts)).count(int) == len(counts) and first >= 0:
                plan.count = first + 1
                if member_scalars is not None:
                    own = member_scalars(step.hyper, first + 1, frozenset())
                    for item in plan.items:
                        item.member = own
                return
        made: dict[tuple[int, frozenset[str]], tuple[float, ...]] = {}  # parameters mostly share a count
        fresh: frozenset[str] = frozenset()
        last, own = -1, cast("tuple[float, ...]", ())
        for item in plan.work():
            count = item.state["step"]
            if type(count) is not int or count < 0:  # noqa: E721 (bool and numpy ints are not counts here)
                count = _saved_step(count, f"state['step'] of {item.at}")
            count += 1
            item.count = count
            if member_scalars is not None:
                if not known:
                    fresh = frozenset(name for name in step.buffers if name not in item.state)
                if not known or count != last:  # a known plan has no fresh buffers: the count decides
                    found = made.get((count, fresh))
                    if found is None:
                        found = made[count, fresh] = member_scalars(step.hyper, count, fresh)
                    own = found
                    last = count
            if stochastic:  # each parameter's own random bits, other at each step
                item.member = (*own, stochastic_key(item.place, count))
            elif member_scalars is not None:
                item.member = own

    def _commit(self, plans: list[tuple[Step, _Plan, bool]]) -> None:
        """Record a step whose updates were all written: counts, new state, plans."""
        rebuilt = False
        for index, (step, plan, known) in enumerate(plans):
            if known:  # the same state dicts and buffers
                # (a count is no change to note: netcl's state dicts take it with dict's own
                # methods; with one count for all, in a C loop)
                count = plan.count
                if count is not None and plan.entries_only:
                    deque(
                        map(dict.update, cast("list[dict[str, Any]]", plan.states), repeat({"step": count})), maxlen=0
                    )
                else:
                    for item in plan.work():
                        state, value = item.state, item.count if count is None else count
                        if type(state) is _StateEntry:
                            dict.__setitem__(state, "step", value)
                        else:
                            state["step"] = value
                continue
            for item in plan.work():
                state = item.state
                state.update(item.buffers)
                state["step"] = item.count
                key = id(item.param)
                if self.state.get(key) is not state:
                    self.state[key] = cast(StateT, state)
                    self._owners[key] = item.param
            rebuilt = True
            self._kept[index].plan = plan.settled(step.buffers, self.state) if plan.stable else None
        if rebuilt or self._group_count != len(self.param_groups):
            self._prune()

    def _prune(self) -> None:
        """Forget the state of parameters that are no longer in any param group (their
        `id()` may be taken by a new object once they are freed)."""
        self._group_count = len(self.param_groups)
        live = {id(param) for group in self.param_groups for param in group["params"]}
        for key in [key for key in self.state if key not in live]:
            del self.state[key]
            self._owners.pop(key, None)
        for key in [key for key in self._checked if key not in live]:
            del self._checked[key]
        for index in [index for index in self._kept if index >= len(self.param_groups)]:
            del self._kept[index]

    def _step_of(self, index: int, group: GroupT) -> Step:
        """The group's `Step` for its hyperparameters: the last one while each value is
        the very same object (a `Step` depends on nothing else). A changed value is
        checked as the constructor checks it, and written back normalized."""
        kept = self._kept.get(index)
        if kept is not None and type(group) is dict:  # (a mapping of another kind may make what it lacks)
            try:  # (in C's loops: this runs for every group at every step)
                if all(map(operator.is_, self._hyper_values(group), kept.values)):
                    return kept.step
            except KeyError:  # (one is missing: said below)
                pass
        values = [group.get(name, _NOTHING) for name in self.hyperparameters]
        where = f"param_groups[{index}]: "
        hyper: dict[str, HyperValue] = {}
        for name, check in self.hyperparameters.items():
            if name not in group:
                raise ValueError(f"{where}{name} is missing; every param group needs every hyperparameter")
            hyper[name] = check(name, group[name], where)
        self._check_combination(hyper, where)
        cast(dict[str, Any], group).update(hyper)
        step = Step(self.rule, hyper, self.nonfinite)
        values = [group[name] for name in self.hyperparameters]
        if kept is None:
            self._kept[index] = _Kept(values, step)
        else:  # (the plan and launches stay: they depend on no hyperparameter's value)
            kept.values, kept.step = values, step
        return step

    def _check_dtypes(self, index: int, step: Step, dtypes: set[np.dtype[Any]]) -> None:
        """Raise ValueError if a hyperparameter, or a scalar the kernel computes from
        them, leaves its range in a dtype of the group's parameters."""
        if dtypes <= step.checked_dtypes:  # (every one its own compute dtype, checked)
            return
        for dtype in {compute_dtype(d) for d in dtypes}:  # (half parameters: float32)
            if dtype in step.checked_dtypes:
                continue
            where = f"param_groups[{index}]: "
            for name, check in self.hyperparameters.items():
                check.in_dtype(name, step.hyper[name], dtype, where)
            scalars = step.scalars
            if self.rule.member_scalars is not None:  # largest at the first step
                scalars += self.rule.member_scalars(step.hyper, 1, frozenset())
            largest = float(np.finfo(dtype).max)
            for value in scalars:
                if not abs(value) <= largest:
                    raise ValueError(
                        f"{where}the hyperparameters {dict(step.hyper)} give the update a factor of {value!r}, "
                        f"which overflows {dtype}, the dtype of the parameters they are used with"
                    )
            step.checked_dtypes.add(dtype)

    def _plans(self) -> list[tuple[Step, _Plan, bool]]:
        """Check every group for this step (`_plan`); change nothing the user sees.

        Where a plan is new, the arrays the step writes must not share memory, nor the
        gradients with them (`_written_spans`); a kept plan's arrays are those, and its
        new gradients are compared where it checked them (not those it takes by their
        fingerprints, numpy's and torch's in a training loop: a new torch gradient is
        memory of its own, but one the user points at another parameter's memory
        there is not seen)."""
        plans = [self._plan(index, group) for index, group in enumerate(self.param_groups)]
        now = [plan for _, plan, known in plans if known]
        if len(now) != len(plans) or now != self._written_by:  # (a plan compares by identity)
            now = [plan for _, plan, _ in plans]
            self._written, self._written_by = _written_spans(plans), now
            grads = [
                (backend, gradient, at)
                for plan in now
                for _, _, grad, _, _, backend, at in plan.entries
                if backend is not None and grad is not None and (gradient := grad()) is not None
            ]
        else:  # the arrays of the last step that checked them: only new gradients to compare
            grads = [item for plan in now if plan.fresh for item in plan.fresh]
        for plan in now:
            if plan.fresh:
                plan.fresh = []  # (held no longer than this)
        if grads:
            try:
                _refuse_shared_gradients(self._written, grads)
            except ValueError:
                for kept in self._kept.values():
                    kept.plan = None  # (a kept plan took the gradients as its own: checked afresh)
                raise
        return plans

    def _plan(self, index: int, group: GroupT) -> tuple[Step, _Plan, bool]:
        """Check one group for this step; change nothing the user sees.

        Returns the step, the plan of its work, and whether that plan is the last step's
        (the same parameters with the same arrays, gradients and state buffers, all of
        kinds that cannot change what was checked): then nothing needs checking.
        """
        step = self._step_of(index, group)
        known = self._kept[index].plan
        if known is not None and known.holds(group["params"], self.state, step.buffers):
            self._check_dtypes(index, step, known.dtypes)
            known.bare = known.quiet  # (quiet: the gradients are the last step's, see `fill`)
            if not known.bare:
                for item in known.items:
                    item.grad = item.param.grad
            return step, known, True
        plan = _Plan(group["params"])
        for k, param in enumerate(group["params"]):
            grad = param.grad
            data = param.data
            if grad is None:
                plan.entries.append((param, data, None, None, None, None, ""))
                continue
            state = cast("MutableMapping[str, Any] | None", dict.get(self.state, id(param)))
            at = f"param_groups[{index}]['params'][{k}]"
            if not state:  # (none yet, or emptied: torch starts an empty state afresh)
                state = _StateEntry(step=0)
            elif "step" not in state:
                raise ValueError(
                    f"state of {at} has no 'step' (it has {sorted(map(str, state))}); a state holds its "
                    "step count with its buffers, or is empty to start afresh"
                )
            checked = self._checked.get(id(param))
            if checked is not None and checked.holds(data, grad, state):
                backend = checked.backend
            else:
                backend = self._check(at, data, grad, state)
                checked = _Checked.made(data, grad, state, backend)
                if checked is not None:
                    self._checked[id(param)] = checked
            if backend.stable(data) and backend.stable(grad):
                checked = None  # (nothing to look at again)
            elif checked is None:
                plan.stable = False  # (checked at every step)
            plan.dtypes.add(backend.dtype(data))
            plan.entries.append((param, data, weak(grad), state, checked, backend, at))
            buffers = {name: state[name] for name in step.buffers if name in state}
            plan.batches.setdefault(backend, []).append(
                Work(param, data, grad, state, buffers=buffers, backend=backend, at=at, place=(index << 20) + k)
            )
        self._check_dtypes(index, step, plan.dtypes)
        return step, plan, False

    def _check(self, at: str, data: Any, grad: Any, state: Mapping[str, Any]) -> Backend:
        """Check a parameter's array, gradient and state buffers; return their backend."""
        backend = checked_backend(data, f"{at}.data")
        backend.check_grad(data, grad, f"{at}.grad")
        for name in self.rule.saved_buffers:
            if name in state:
                backend.check_state(data, state[name], f"state[{name!r}] of {at}")
        return backend

    def skipped_nonfinite(self) -> int:
        """How many elements the steps since the last call left unchanged because their
        gradient was NaN or infinite; resets the count. Needs `nonfinite="count"`.

        The fused kernel counts on the device, so steps never wait for the count; this
        call waits for the steps that were enqueued before it.

        Raises:
            ValueError: The optimizer does not count (`nonfinite` is not `"count"`).
        """
        if self.nonfinite != "count":
            raise ValueError(
                f"skipped_nonfinite() needs an optimizer made with nonfinite='count' (this one has "
                f"nonfinite={self.nonfinite!r}): counting costs the fused kernel time, so it is asked for"
            )
        with self._lock:
            return self._tally.take()

    # --- gradients -------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter.

        Args:
            set_to_none: Set each `grad` to None (the default, as in torch), or else fill
                each gradient array with zeros in place.
        """
        for index, group in enumerate(self.param_groups):
            for k, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if set_to_none:
                    try:
                        setattr(param, "grad", None)  # noqa: B010 (read-only to checkers)
                    except AttributeError:
                        raise TypeError(
                            f"param_groups[{index}]['params'][{k}].grad cannot be set; use zero_grad(set_to_none=False)"
                        ) from None
                else:
                    backend_for(grad, f"param_groups[{index}]['params'][{k}].grad").zero_(grad)

    # --- checkpoints -----------------------------------------------------------------

    def state_dict(self) -> StateDictT:
        """A snapshot of the optimizer, laid out like torch's `Optimizer.state_dict()`.

        `state` maps each parameter's index (counted across groups, in order) to its
        `step` (an int) and its state buffers as host numpy arrays; `param_groups` lists
        each group's hyperparameters with `params` as a list of indices. The snapshot is
        picklable and shares no memory with the optimizer. For OpenCL arrays it waits
        for the buffers' pending work. The hooks of `register_state_dict_pre_hook` run
        before it, those of `register_state_dict_post_hook` after it.
        """
        for hook in self._save_hooks[0]:
            hook(self)
        saved = self._state_dict()
        for hook in self._save_hooks[1]:
            result = hook(self, saved)
            if result is not None:
                saved = cast(StateDictT, result)
        return saved

    def _state_dict(self) -> StateDictT:
        with self._lock:
            for g, group in enumerate(self.param_groups):
                self._step_of(g, group)  # a value edited into a group is checked first
            state: dict[int, dict[str, Any]] = {}
            groups: list[dict[str, Any]] = []
            index = 0
            for group in self.param_groups:
                indices: list[int] = []
                # (torch's SGD saves no step; with stochastic rounding it is saved, as the
                # rounding's random bits depend on it)
                saves_step = self.rule.saves_step or bool(group.get("stochastic_rounding"))
                for param in group["params"]:
                    live = cast("Mapping[str, Any] | None", self.state.get(id(param)))
                    if live is not None:
                        saved: dict[str, Any] = {"step": int(live["step"])} if saves_step else {}
                        for name in self.rule.saved_buffers:
                            if name in live:
                                buffer = live[name]
                                saved[name] = backend_for(buffer, name).to_host(buffer)
                        if saved:  # torch's SGD without momentum keeps no state at all
                            state[index] = saved
                    indices.append(index)
                    index += 1
                groups.append({**self._hyper(group), "params": indices})
            return cast(StateDictT, {"state": state, "param_groups": groups})

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore a snapshot from `state_dict()` (netcl's or torch's for the same optimizer).

        Everything is checked before anything changes: the number of groups and of
        parameters in each, every hyperparameter, and every state entry's keys, step,
        shape, dtype and values (finite; `square_avg` non-negative). The hyperparameters
        are restored, and the state buffers are copied onto each parameter's device, so
        the optimizer shares no memory with `state_dict`. Keys that only steer how torch
        runs (`foreach`, `capturable`, `differentiable`, `fused`) are accepted and ignored.

        The hooks of `register_load_state_dict_pre_hook` run before it (one that returns
        a state dict gives it that one instead), those of
        `register_load_state_dict_post_hook` after it.

        Raises:
            TypeError: A value has the wrong type.
            ValueError: Anything in `state_dict` does not fit this optimizer.
        """
        for hook in self._load_hooks[0]:
            result = hook(self, state_dict)
            if result is not None:
                state_dict = cast("Mapping[str, object]", result)
        self._load_state_dict(state_dict)
        for hook in self._load_hooks[1]:
            hook(self)

    def register_state_dict_pre_hook(self, hook: Callable[[Self], None], prepend: bool = False) -> HookHandle:
        """Call `hook(optimizer)` before each `state_dict()`, as torch does (before the
        other hooks with `prepend`). Returns a handle whose `remove()` takes it away.

        Raises:
            TypeError: `hook` is not callable.
        """
        return self._save_hooks[0].add(hook, prepend)

    def register_state_dict_post_hook(
        self, hook: Callable[[Self, StateDictT], StateDictT | None], prepend: bool = False
    ) -> HookHandle:
        """Call `hook(optimizer, state_dict)` after each `state_dict()`, as torch does: a
        hook that returns a state dict gives the caller (and the next hooks) that one.
        Returns a handle whose `remove()` takes it away.

        Raises:
            TypeError: `hook` is not callable.
        """
        return self._save_hooks[1].add(hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[[Self, Mapping[str, object]], Mapping[str, object] | None], prepend: bool = False
    ) -> HookHandle:
        """Call `hook(optimizer, state_dict)` before each `load_state_dict()`, as torch
        does: a hook that returns a state dict has that one loaded (and checked) instead.
        Returns a handle whose `remove()` takes it away.

        Raises:
            TypeError: `hook` is not callable.
        """
        return self._load_hooks[0].add(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable[[Self], None], prepend: bool = False) -> HookHandle:
        """Call `hook(optimizer)` after each `load_state_dict()` that succeeded, as torch
        does. Returns a handle whose `remove()` takes it away.

        Raises:
            TypeError: `hook` is not callable.
        """
        return self._load_hooks[1].add(hook, prepend)

    def _load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        with self._lock:
            hypers, id_map, saved_state = self._check_state_dict(state_dict)
            new_state: dict[int, StateT] = {}
            # per backend and state name, the parameters' values in order: restored as
            # a step makes state (`from_host_for`: one buffer per name where it can)
            wanted: dict[tuple[Backend, str], list[tuple[Any, npt.NDArray[Any], dict[str, Any]]]] = {}
            for index, entry in saved_state.items():
                param = id_map[index]
                backend = backend_for(param.data, f"parameter {index}")
                restored = _StateEntry(step=entry.get("step", 0))
                for name in self.rule.saved_buffers:
                    if name in entry:
                        restored[name] = None  # (in this order, filled below)
                        wanted.setdefault((backend, name), []).append((param.data, entry[name], restored))
                new_state[id(param)] = cast(StateT, restored)
            for (backend, name), items in wanted.items():
                buffers = backend.from_host_for([host for _, host, _ in items], [data for data, _, _ in items])
                for (_, _, target), buffer in zip(items, buffers, strict=True):
                    target[name] = buffer
            for group, hyper in zip(self.param_groups, hypers, strict=True):
                cast(dict[str, Any], group).update(hyper)
            self.state.clear()
            self.state.update(new_state)
            self._owners = {id(param): param for param in id_map.values() if id(param) in new_state}

    def _check_state_dict(
        self, state_dict: Mapping[str, object]
    ) -> tuple[list[dict[str, HyperValue]], dict[int, ParameterLike], dict[int, dict[str, Any]]]:
        """Everything `load_state_dict` needs, checked; raises on the first problem."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {describe(state_dict)}")
        keys = set(state_dict)
        if keys != {"state", "param_groups"}:
            raise ValueError(
                f"state_dict must have exactly the keys 'state' and 'param_groups', got {sorted(map(str, keys))}"
            )
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, list | tuple):
            raise TypeError(f"state_dict['param_groups'] must be a list, got {describe(saved_groups)}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param group(s), this optimizer has {len(self.param_groups)}"
            )
        hypers: list[dict[str, HyperValue]] = []
        id_map: dict[int, ParameterLike] = {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            where = f"state_dict['param_groups'][{g}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where} must be a dict, got {describe(saved)}")
            known = {"params", *self.hyperparameters}
            unknown = sorted(set(saved) - known - _TORCH_ONLY_KEYS - set(self.torch_fixed))
            for key, value in self.torch_fixed.items():
                if key in saved and saved[key] != value:
                    raise ValueError(f"{where} has {key}={saved[key]!r}; {type(self).__name__} means {key}={value!r}")
            missing = sorted(known - set(saved) - set(self.optional))
            if unknown or missing:
                raise ValueError(
                    f"{where} does not fit {type(self).__name__}: unknown key(s) {unknown}, missing key(s) {missing}"
                )
            hyper = {
                name: check(name, saved[name] if name in saved else self.optional[name], f"{where}: ")
                for name, check in self.hyperparameters.items()
            }
            self._check_combination(hyper, f"{where}: ")
            hypers.append(hyper)
            indices = saved["params"]
            if not isinstance(indices, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices
            ):
                raise TypeError(f"{where}['params'] must be a list of int indices")
            if len(indices) != len(group["params"]):
                raise ValueError(
                    f"{where} has {len(indices)} parameter(s), but param_groups[{g}] of "
                    f"this optimizer has {len(group['params'])}"
                )
            for i, param in zip(indices, group["params"], strict=True):
                if i in id_map:
                    raise ValueError(f"{where}['params'] repeats index {i}")
                id_map[i] = param
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict, got {describe(saved_state)}")
        checked: dict[int, dict[str, Any]] = {}
        for index, entry in saved_state.items():
            where = f"state_dict['state'][{index!r}]"
            if index not in id_map:
                raise ValueError(f"{where} belongs to no parameter in state_dict['param_groups']")
            checked[index] = self._check_saved_entry(entry, id_map[index], where)
        return hypers, id_map, checked

    def _check_saved_entry(self, entry: object, param: ParameterLike, where: str) -> dict[str, Any]:
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a dict, got {describe(entry)}")
        steps = {"step"} if self.rule.saves_step else set()
        required = steps | set(self.rule.required)
        allowed = {"step"} | set(self.rule.saved_buffers)
        if not required <= set(entry) <= allowed:
            raise ValueError(
                f"{where} has keys {sorted(map(str, entry))}; it needs {sorted(required)} "
                f"and may have {sorted(allowed - required)}"
            )
        data = param.data
        backend = checked_backend(data, f"the parameter of {where}")
        checked: dict[str, Any] = {}
        if "step" in entry:
            checked["step"] = _saved_step(entry["step"], f"{where}['step']")
        shape = tuple(int(n) for n in data.shape)
        dtype = compute_dtype(backend.dtype(data))
        for name in self.rule.saved_buffers:
            if name not in entry:
                continue
            at = f"{where}[{name!r}]"
            host = _to_host(entry[name], at)
            if host.shape != shape:
                raise ValueError(f"{at} has shape {host.shape}, but its parameter has shape {shape}")
            check_dtype(host.dtype, dtype, backend.dtype(data), at, state=True)
            if not np.isfinite(host).all():
                raise ValueError(f"{at} holds NaN or infinite values")
            if name in self.rule.nonnegative and (host < 0).any():
                raise ValueError(f"{at} holds negative values; it is an average of squares")
            checked[name] = host
        return checked

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            lines += [f"    {name}: {group[name]}" for name in sorted(self.hyperparameters)]
        lines.append(")")
        return "\n".join(lines)


def _to_host(value: object, where: str) -> npt.NDArray[Any]:
    if isinstance(value, np.ndarray):
        return value
    if is_array_api(value):
        return backend_for(value, where).to_host(value)
    raise TypeError(f"{where} must be an array, got {describe(value)}")


def _saved_step(value: object, where: str) -> int:
    if is_array_api(value) and getattr(value, "shape", None) == ():
        value = _to_host(value, where).item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{where} must be a number of steps, got {describe(value)}")
    if not np.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{where} must be a whole number >= 0, got {value!r}")
    return int(value)


def _check_torch_only(given: Mapping[str, object]) -> None:
    """Accept torch's keywords that choose how torch runs, refuse the modes netcl has not."""
    for name in ("foreach", "fused"):
        value = given.get(name)
        if value is not None and not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be a bool or None, got {describe(value)} {value!r}")
    for name, why in (
        (
            "capturable",
            "it keeps step counts on a CUDA device for CUDA-graph capture; netcl's step counts are host "
            "integers and its kernel is enqueued, not captured",
        ),
        (
            "differentiable",
            "it records the update in torch's autograd graph; netcl's update runs in an OpenCL kernel "
            "(or under no_grad), outside any graph, so nothing could differentiate through it",
        ),
    ):
        value = given.get(name, False)
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be a bool, got {describe(value)} {value!r}")
        if value:
            raise ValueError(f"{name}=True is not supported: in torch {why}. Leave {name}=False")


def _as_groups(params: object) -> list[Mapping[str, Any]]:
    """The constructor's `params` as a list of param-group dicts (torch's rules)."""
    if isinstance(params, Mapping):
        raise TypeError(
            "params must be an iterable of parameters or of param-group dicts, got one dict; wrap it in a list"
        )
    consumed = isinstance(params, Iterator)  # an iterator (a generator) yields its items only once
    items = _as_param_list(params, "params")
    if not items:
        hint = (
            f" (params is a {describe(params)} that yielded nothing: was it used before, by another "
            "optimizer? Pass a list, e.g. list(model.parameters()), to use it more than once)"
            if consumed
            else ""
        )
        raise ValueError(f"optimizer got an empty parameter list{hint}")
    dicts = [isinstance(item, Mapping) for item in items]
    if all(dicts):
        return cast(list[Mapping[str, Any]], items)
    if any(dicts):
        raise TypeError("params mixes parameters and param-group dicts; use one or the other")
    return [{"params": items}]


def _as_param_list(params: object, where: str) -> list[Any]:
    """An ordered list from an iterable of parameters (or of group dicts)."""
    if _is_parameter_like(params) or _backend_or_none(params) is not None:
        raise TypeError(
            f"{where} must be an iterable of parameters, got a single {describe(params)}; wrap it in a list"
        )
    if isinstance(params, set | frozenset):
        raise TypeError(
            f"{where} must be an ordered iterable (a list or tuple), got a set: "
            "its order changes from run to run and checkpoints match parameters by order"
        )
    if isinstance(params, str | bytes) or not isinstance(params, Iterable):
        raise TypeError(f"{where} must be an iterable of parameters, got {describe(params)}")
    return list(params)


def _backend_or_none(x: object) -> Backend | None:
    """The backend of `x` if it is an array netcl can optimize, else None."""
    try:
        return backend_for(x, "")
    except TypeError:
        return None


def _check_parameter(param: object, where: str) -> None:
    if isinstance(param, Mapping):
        raise TypeError(f"{where} is a dict; param groups cannot be nested")
    if not _is_parameter_like(param):
        hint = (
            "; wrap the array in netcl.Parameter(array)"
            if _backend_or_none(param) is not None or hasattr(param, "data")
            else ""
        )
        raise TypeError(
            f"{where} is a {describe(param)}, not a parameter: a parameter has `data` "
            f"(an array) and `grad` attributes{hint}"
        )
    checked_backend(param.data, f"{where}.data")


def register_optimizer_step_pre_hook(
    hook: Callable[
        [Optimizer[Any, Any, Any, Any], tuple[object, ...], dict[str, object]],
        tuple[tuple[object, ...], dict[str, object]] | None,
    ],
) -> HookHandle:
    """Call `hook(optimizer, args, kwargs)` before the `step()` of every netcl optimizer,
    before the optimizer's own pre-hooks, as torch's
    `torch.optim.optimizer.register_optimizer_step_pre_hook` does for torch's (see
    `Optimizer.register_step_pre_hook` for the arguments and what it may return).

    Returns:
        A handle whose `remove()` takes the hook away.

    Raises:
        TypeError: `hook` is not callable.
    """
    return EVERY_PRE_STEP.add(hook)


def register_optimizer_step_post_hook(
    hook: Callable[[Optimizer[Any, Any, Any, Any], tuple[object, ...], dict[str, object]], None],
) -> HookHandle:
    """Call `hook(optimizer, args, kwargs)` after the `step()` of every netcl optimizer
    that succeeded, after the optimizer's own post-hooks, as torch's
    `torch.optim.optimizer.register_optimizer_step_post_hook` does for torch's.

    Returns:
        A handle whose `remove()` takes the hook away.

    Raises:
        TypeError: `hook` is not callable.
    """
    return EVERY_POST_STEP.add(hook)
