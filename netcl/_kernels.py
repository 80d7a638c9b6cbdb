"""The fused kernels: where their sources are, how they are built, how they are launched.

Sources live in the top-level `kernels/` folder of the project. A wheel carries that
folder inside the package as `netcl/kernels/`; an editable install reads it from the
checkout. `kernel_source` looks in both places, in that order.

`fused_kernel` builds one `pyopencl.elementwise.ElementwiseKernel` per (context, dtype,
source, variant, number of parameters per launch) and memoizes it per context, so every
optimizer instance shares it and a step never rebuilds anything. Hyperparameters are
kernel arguments. One launch updates up to `MOST_SLOTS` parameters (as many as the
device's bytes of kernel arguments hold: `max_slots`), each in its own buffer: the
kernel takes each one's arrays as separate arguments (but state buffers that are views
of one buffer per name, which it takes once: `shares_state`), and each work-group finds
its parameter by comparing its number with the running ends of their work-groups. The
parameters of one launch share their own scalars (`KernelSpec.member_scalar_count`:
those that depend on a parameter's step count, mostly the same for all). On a GPU
every work-item updates one value, on a CPU a run of values (see `geometry` for why), 16
at a time where the compiler targets x86's AVX-512, 8 where it targets AVX
(kernels/vector.cl).
"""

from __future__ import annotations

import functools
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
from pyopencl._cl import _Program  # what Kernel.program is: a built program
from pyopencl.elementwise import ElementwiseKernel
from pyopencl.tools import context_dependent_memoize, dtype_to_ctype

from netcl._precision import BFLOAT16, FLOAT16, compute_dtype, is_half

__all__ = [
    "FusedKernel",
    "Geometry",
    "KernelSpec",
    "Launcher",
    "Member",
    "fused_kernel",
    "geometry",
    "group_count",
    "kernel_source",
    "max_slots",
    "slots_for",
    "storage_ctype",
    "storage_preamble",
]

_CHECKOUT_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def kernel_source(name: str) -> str:
    """The OpenCL C source `kernels/<name>.cl`, from the installed package or the checkout."""
    packaged = resources.files("netcl").joinpath("kernels", f"{name}.cl")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (_CHECKOUT_KERNELS / f"{name}.cl").read_text(encoding="utf-8")


NonFinite: TypeAlias = Literal["skip", "count", "propagate"]
"""What a step does with an element whose gradient is NaN or infinite: leave it and its
state as they were (`"skip"`), the same and count it on the device (`"count"`, read with
`skipped_nonfinite()`), or update it and make its parameter NaN, as torch does
(`"propagate"`)."""


@dataclass(frozen=True)
class KernelSpec:
    """Which fused kernel: the source and the variant of it."""

    source: str
    """Stem of the OpenCL source in `kernels/` that defines `update`."""
    flags: frozenset[str]
    """The build-time switches that are on."""
    all_flags: tuple[str, ...]
    """Every switch of the source (the others are defined as 0)."""
    buffers: tuple[str, ...]
    """The state buffers the variant reads and writes."""
    all_buffers: tuple[str, ...]
    """Every state buffer `update` takes, in its argument order."""
    scalar_count: int
    """How many scalar arguments shared by a group `update` takes after the buffers."""
    member_scalar_count: int = 0
    """How many scalar arguments of the parameters' own (`UpdateRule.member_scalars`)
    `update` takes after those: a launch takes parameters whose own scalars are the same
    (their step counts mostly are), once for all of them."""
    nonfinite: NonFinite = "skip"
    """What the kernel does with an element whose gradient is NaN or infinite."""
    master: bool = False
    """Whether the update reads and writes the parameter's float32 master copy (the
    state buffer `master_param`, last of `buffers`) and stores the parameter rounded."""
    stochastic: bool = False
    """Whether a half parameter is rounded stochastically; each member of a launch then
    takes its key (`netcl._precision.stochastic_key`) as an argument of its own."""


@dataclass(frozen=True)
class Geometry:
    """How the fused kernel is launched on one device: work-groups of `local_size`
    work-items, each updating `per_item` values (one after another; more than one only
    with a single work-item per group)."""

    local_size: int
    """Work-items per work-group."""
    per_item: int = 1
    """Values each work-item updates."""
    hardware_half: bool = True
    """Whether float16 values may load with the processor's conversion instruction where
    the device's compiler targets one (x86's F16C): the same values as the formula that
    is used elsewhere (tests build both)."""
    vector_width: int = 16
    """The most values a CPU's loop takes at a time (kernels/vector.cl: 16 where the
    compiler targets AVX-512, 8 where it targets AVX; tests build 8 on either)."""

    @property
    def span(self) -> int:
        """Values each work-group updates."""
        return self.local_size * self.per_item


def geometry(device: cl.Device) -> Geometry:
    """The launch geometry of the fused kernel on `device` (the same for every dtype).

    On a GPU, one work-item per value in work-groups of 256, the usual choice:
    neighbouring work-items touch neighbouring values, so the loads coalesce.

    On a CPU, one work-item per work-group, updating `CPU_VALUES_PER_ITEM` values in a
    loop: the work-item picks its parameter's arrays once, and its compiler turns the
    loop over the values into SIMD code (AVX2 on the test machine) through pointers that
    stay the same for the whole loop. PoCL runs a work-group of many work-items as a loop
    over them, and with one work-item per value it repeated the pick of the parameter for
    every value: a launch over several parameters then took 2 to 3.5 ns per Adam value
    against 0.5 to 0.9 for a launch over one (8 parameters of 204,800 values, a harness
    over the kernel's source; the same with only one parameter in use). With the loop the
    launch over several parameters runs at the one-parameter speed (0.5-0.6 ns). OpenCL
    vector types (float8, one vector per work-item) moved the same bytes at half the speed
    on PoCL, and PoCL's reported vector width (16 for float) aborts its compiler on `sqrt`;
    the loop itself takes 16 values at a time where the compiler targets AVX-512, 8
    where it targets AVX (see kernels/vector.cl).
    """
    if device.type & cl.device_type.CPU:
        return Geometry(local_size=1, per_item=CPU_VALUES_PER_ITEM)
    return Geometry(local_size=256)


CPU_VALUES_PER_ITEM = 2048
"""Values a CPU work-item updates: enough that picking the parameter costs nothing,
few enough that a launch over small parameters still has work for every core (1,024 to
16,384 measured alike within the machine's noise)."""


def group_count(size: int, geo: Geometry) -> int:
    """Work-groups for a parameter of `size` values."""
    return -(-size // geo.span)


_STORAGE = {FLOAT16: 1, BFLOAT16: 2}
"""`STORAGE` of kernels/precision.cl for a half parameter dtype."""


def storage_ctype(dtype: np.dtype[Any]) -> str:
    """The C type of an array of `dtype` in a kernel: ushort for float16 and bfloat16
    (converted with kernels/precision.cl), else float or double."""
    return "ushort" if is_half(dtype) else dtype_to_ctype(dtype)


def storage_preamble(
    dtype: np.dtype[Any], *, stochastic: bool = False, exact: bool = True, hardware: bool = True
) -> str:
    """kernels/precision.cl for arrays of `dtype` (`FROM_STORAGE`, `TO_STORAGE`,
    `LOADED_FINITE`), after `FINITE(x)`, which it defines for the compute dtype (the
    exponent bits of x are not all ones: neither infinite nor NaN): `exact` makes
    float16 infinities and NaNs load as such, `stochastic` rounds stochastically,
    `hardware` lets float16 load with F16C where the compiler targets it."""
    compute = compute_dtype(dtype)
    bits, exponent = ("int", "0x7f800000") if compute == np.float32 else ("long", "0x7ff0000000000000L")
    return "\n".join(
        [
            f"#define FINITE(x) ((as_{bits}(x) & {exponent}) != {exponent})",
            f"#define STORAGE {_STORAGE.get(dtype, 0)}",
            f"#define STOCHASTIC {int(stochastic)}",
            f"#define EXACT_SPECIALS {int(exact)}",
            f"#define HARDWARE_HALF {int(hardware)}",
            kernel_source("precision"),
        ]
    )


_BUILD_OPTIONS = (
    # Correctly rounded division and square root, as IEEE 754 and numpy have them: the
    # OpenCL default allows 2.5 and 3 ulp for float32 and is the one relaxation that
    # applies even without -cl-fast-relaxed-math.
    "-cl-fp32-correctly-rounded-divide-sqrt",
)

MOST_SLOTS = 32
"""The most parameters a kernel takes, whatever the device allows: on a GPU, every
work-item picks its parameter among them (see `_build`)."""


def slots_for(count: int, limit: int) -> int:
    """The kernel that takes `count` parameters (at most `limit`, the `max_slots` of its
    launches): `limit`, or the smallest power of two that holds them, so that a model's
    launches build few kernels."""
    return min(1 << (count - 1).bit_length(), limit)


@functools.cache
def max_slots(device: cl.Device, spec: KernelSpec, shared: bool = False) -> int:
    """The most parameters one launch of `spec` can take on `device`: as many as its
    arguments fit in the bytes the device allows (1024 on some drivers), at most
    `MOST_SLOTS`; with `shared`, in a kernel that takes each state buffer once for all
    its parameters (see `shares_state`).

    Each parameter costs the kernel a (buffer, offset) pair per array it takes for it
    and its key where it is rounded stochastically; the parameters' sizes (and with
    `shared`, their state buffers' offsets) are in the launch's layout buffer (see
    `Launcher.bind`).
    """
    state = len(spec.buffers)
    per_slot = (2 + state * (not shared)) * 16 + 8 * spec.stochastic
    # the group's and members' scalars (8 bytes: a double's), the shared state buffers,
    # the counter and the layout buffer (buffer, offset each) and ElementwiseKernel's n
    fixed = 8 * (spec.scalar_count + spec.member_scalar_count) + 16 * state * shared + 16 + 16 + 8
    return max(1, min(MOST_SLOTS, (int(device.max_parameter_size) - fixed) // per_slot))


def shares_state(members: Sequence[Member], itemsize: int) -> bool:
    """Whether each state buffer of every one of `members` is in one buffer, at an
    offset that is a whole number of its elements of `itemsize` bytes (as the state a
    param group's parameters get: views of one buffer per name, see
    `Backend.zeros_for`): then a launch of them can take each state buffer once, and
    more parameters (`max_slots`)."""
    if not members or len(members[0].arrays) <= 2:
        return False
    for j in range(2, len(members[0].arrays)):
        base = members[0].arrays[j].base_data
        for member in members:
            x = member.arrays[j]
            if x.base_data is not base or int(x.offset) % itemsize:
                return False
    return True


@dataclass(frozen=True)
class Member:
    """One parameter in a launch: its arrays (parameter, gradient, state buffers; each
    exposing `base_data` and `offset`) and its number of elements (> 0)."""

    arrays: tuple[Any, ...]
    size: int


@dataclass(frozen=True)
class FusedKernel:
    """A built fused kernel over up to `slots` parameters."""

    program: _Program
    name: str
    geometry: Geometry
    slots: int
    arrays: int
    """Arrays per parameter: the parameter, its gradient and the variant's state buffers."""
    scalar_count: int
    """The launch's scalar arguments: the group's, then the members' own."""
    keyed: bool
    """Whether each member takes a key (stochastic rounding)."""
    dtype: np.dtype[Any]
    """The compute dtype: the state's and the scalar arguments' (`compute_dtype`)."""
    shared: bool
    """Whether the kernel takes each state buffer once for all its members (at their
    offsets in the layout buffer), not per member (see `shares_state`)."""

    @property
    def own_arrays(self) -> int:
        """The arrays the kernel takes per parameter: all, or without `shared` state."""
        return 2 if self.shared else self.arrays

    @property
    def per_slot(self) -> int:
        """Kernel arguments per parameter: (buffer, offset) per own array, key."""
        return 2 * self.own_arrays + self.keyed

    @property
    def stride(self) -> int:
        """The layout buffer's values per parameter: its size, and with `shared` its
        state buffers' offsets (in elements)."""
        return 1 + (self.arrays - 2) * self.shared

    def launcher(self) -> Launcher:
        return Launcher(self)


class Launcher:
    """A kernel object of its own for one recurring launch, whose arguments stay bound.

    A training loop launches the same parameters, gradients and state buffers step after
    step, mostly with the same scalars. The launcher keeps the value of every argument:
    `bind` and `run` note those that differ, and only those are set again (`_send`). A
    repeated step whose scalars did not change costs one enqueue per launch; Adam's,
    whose parameters' own scalars change at every step, sets the scalars alone (about 4
    microseconds for a launch of 12 parameters, against 15 to 19 for pyopencl's
    `set_args` of all its arguments). The kernel object comes from the already built
    program: no build.

    Gradients are not kept: `run` (or `set`) takes them at each launch, and between
    launches the launcher holds only a weak reference to each (a pyopencl array, or an
    object whose class sets `fixed_binding`: the same object again needs no new
    arguments), so a gradient the user drops is freed.
    """

    def __init__(self, fused: FusedKernel) -> None:
        self.fused = fused
        self.kernel = cl.Kernel(fused.program, fused.name)
        dtypes = self.kernel_dtypes(fused)
        self.kernel.set_scalar_arg_dtypes(dtypes)
        shared = 2 * (fused.arrays - 2) * fused.shared  # (each shared state buffer's buffer and offset)
        self.args: list[Any] = [None] * (fused.slots * fused.per_slot + fused.scalar_count + shared + 5)
        self.args[-4] = self.args[-2] = 0  # (the counter's and the layout buffer's offsets)
        self.packs: list[bytes | None] = [_pack_code(dtype) for dtype in dtypes]
        """Per argument, how `_send` sets it: None for a buffer, else a `struct` code."""
        self.dirty: set[int] | None = None
        """The arguments changed since they were last set; None: all of them."""
        self.bound: list[object] = [None] * (fused.slots * fused.arrays)
        self.grads: list[Callable[[], object] | None] = [None] * fused.slots
        self.members: list[tuple[float, ...] | None] = [None] * fused.slots
        self.scalars: tuple[float, ...] | None = None
        self.global_size = 0
        self.layout = np.zeros(0, np.int64)
        """What the layout buffer (`args[-3]`) holds: per slot, its parameter's size and
        where the kernel is `shared`, its state buffers' offsets."""

    @staticmethod
    def kernel_dtypes(fused: FusedKernel) -> list[Any]:
        """The kernel's arguments' dtypes (None: a buffer): each slot's, the group's
        scalars, the shared state buffers, the counter of skipped values and the layout
        buffer (buffer, offset each), and the number of work-items."""
        slot: list[Any] = [None, np.int64] * fused.own_arrays + [fused.dtype] * fused.keyed
        shared: list[Any] = [None, np.int64] * (fused.arrays - 2) * fused.shared
        tail = [None, np.int64, None, np.int64, np.int64]
        return slot * fused.slots + [fused.dtype] * fused.scalar_count + shared + tail

    def _mark(self, first: int, count: int = 1) -> None:
        """Note that the `count` arguments from `first` on changed."""
        if self.dirty is not None:
            self.dirty.update(range(first, first + count))

    def bind(self, members: Sequence[Member], counter: cl.Buffer) -> None:
        """Make the next runs update `members` (at most `slots`, each of size > 0;
        their gradients come with each run) and count skipped values in `counter`."""
        fused, args = self.fused, self.args
        per_slot, stride = fused.per_slot, fused.stride
        layout = np.zeros(fused.slots * stride, np.int64)
        groups = 0
        for k in range(fused.slots):
            member = members[k] if k < len(members) else None
            arrays = (member or members[0]).arrays
            size = member.size if member else 0  # an unused slot repeats member 0, empty
            for j, x in enumerate(arrays):
                if j == 1:
                    continue  # the gradient: see run
                if j >= fused.own_arrays:  # a shared state buffer's: its offset in it
                    layout[k * stride + j - 1] = int(x.offset) // fused.dtype.itemsize
                    continue
                # a pyopencl array keeps its buffer and offset; another object may not
                known = x if isinstance(x, cl_array.Array) else (x.base_data, int(x.offset))
                if not _same_binding(self.bound[k * fused.arrays + j], known):
                    args[k * per_slot + 2 * j] = x.base_data
                    args[k * per_slot + 2 * j + 1] = int(x.offset)
                    self.bound[k * fused.arrays + j] = known
                    self._mark(k * per_slot + 2 * j, 2)  # (the buffer and its offset)
            layout[k * stride] = size
            if member is None:
                self._set_member(k, (0.0,) * fused.keyed)
            groups += group_count(size, fused.geometry)
        self.global_size = groups * fused.geometry.local_size
        if not np.array_equal(layout, self.layout):
            # (a new buffer: launches still queued read the old one)
            flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
            args[-3] = cl.Buffer(self.kernel.context, flags, hostbuf=layout)
            self.layout = layout
            self._mark(len(args) - 3)
        for i, x in enumerate(members[0].arrays[fused.own_arrays :]):  # (shared: each once)
            index = fused.slots * per_slot + fused.scalar_count + 2 * i
            if args[index] is not x.base_data:
                args[index], args[index + 1] = x.base_data, 0
                self._mark(index, 2)
        if args[-5] is not counter:
            args[-5] = counter
            self._mark(len(args) - 5)
        if args[-1] != self.global_size:
            args[-1] = self.global_size
            self._mark(len(args) - 1)

    def _set_member(self, k: int, values: tuple[float, ...]) -> None:
        if values != self.members[k]:
            first = k * self.fused.per_slot + 2 * self.fused.own_arrays
            self.args[first : first + len(values)] = values  # (pyopencl rounds them to the dtype)
            self.members[k] = values
            self._mark(first, len(values))

    def run(
        self,
        queue: cl.CommandQueue,
        scalars: tuple[float, ...],
        keys: Sequence[tuple[float, ...]],
        grads: Sequence[Any],
        wait_for: list[cl.Event],
    ) -> cl.Event:
        """Enqueue the update of the bound members with these gradients (in the order
        they were bound) and scalars: the group's, then the members' own, which they
        share; `keys`: each member's key where the kernel is `keyed`, else empty."""
        try:
            self.set(scalars, keys, grads)
            return self.enqueue(queue, wait_for)
        finally:
            self.drop_grads()

    def set(self, scalars: tuple[float, ...], keys: Sequence[tuple[float, ...]], grads: Sequence[Any]) -> None:
        """Set the kernel's arguments as `run` does, without enqueueing it: a step sets
        every launch's first and then enqueues them one after another, so that a CPU
        device's threads go from one to the next without waiting for the host."""
        fused, args = self.fused, self.args
        if scalars != self.scalars:
            first = fused.slots * fused.per_slot
            args[first : first + len(scalars)] = scalars
            self.scalars = scalars
            self._mark(first, len(scalars))
        if fused.keyed:
            for k, values in enumerate(keys):
                self._set_member(k, values)
        per_slot, refs, dirty = fused.per_slot, self.grads, self.dirty
        for k in range(fused.slots):
            grad = grads[k] if k < len(grads) else grads[0]
            known = refs[k]
            if known is None or known() is not grad:
                # (the same pyopencl array, or buffer that says it never changes, needs
                # no new argument; another object may have rebound its buffer)
                fixed = isinstance(grad, cl_array.Array) or getattr(grad, "fixed_binding", False)
                refs[k] = weakref.ref(grad) if fixed else None
                index = k * per_slot + 2
                args[index] = grad.base_data
                offset = grad.offset
                if dirty is not None:
                    dirty.add(index)
                    if args[index + 1] != offset:  # (mostly 0, as the last one's)
                        dirty.add(index + 1)
                args[index + 1] = offset
        self._send(grads)

    def _send(self, grads: Sequence[Any]) -> None:
        """Set the kernel's arguments that changed since the last time: all of them the
        first time, or with a pyopencl without the calls that set several at once (then
        with every gradient of `grads`)."""
        dirty, args = self.dirty, self.args
        if dirty is not None and not dirty:
            return
        if dirty is None or not _SETS_SOME:
            per_slot = self.fused.per_slot
            for k in range(self.fused.slots):
                grad = grads[k] if k < len(grads) else grads[0]
                args[k * per_slot + 2] = grad.base_data
                args[k * per_slot + 3] = grad.offset
            self.kernel.set_args(*args)
            self.dirty = set()
            return
        buffers: list[Any] = []
        packed: list[Any] = []
        packs, kernel = self.packs, cast(_SetsSome, self.kernel)
        for index in dirty:
            code = packs[index]
            if code is None:
                buffers += (index, args[index])
            elif code == b"q":
                kernel._set_arg_buf(index, np.int64(args[index]))
            else:
                packed += (index, code, args[index])
        # pyopencl's own calls, as its generated `set_args` makes them
        if buffers:
            kernel._set_arg_multi(tuple(buffers))
        if packed:
            kernel._set_arg_buf_pack_multi(tuple(packed))
        dirty.clear()

    def enqueue(self, queue: cl.CommandQueue, wait_for: list[cl.Event]) -> cl.Event:
        """Enqueue the kernel with the arguments `set` gave it."""
        event: cl.Event = cl.enqueue_nd_range_kernel(
            queue, self.kernel, (self.global_size,), (self.fused.geometry.local_size,), wait_for=wait_for or None
        )
        return event

    def drop_grads(self) -> None:
        """Let go of the gradients `set` was given (the kernel keeps its arguments)."""
        per_slot, args = self.fused.per_slot, self.args
        for k in range(self.fused.slots):
            args[k * per_slot + 2] = None


class _SetsSome(Protocol):
    """The calls of a pyopencl kernel that set some of its arguments (see `_SETS_SOME`)."""

    def _set_arg_multi(self, indices_and_args: tuple[Any, ...], /) -> None: ...
    def _set_arg_buf_pack_multi(self, indices_codes_and_values: tuple[Any, ...], /) -> None: ...
    def _set_arg_buf(self, index: int, value: Any, /) -> None: ...


_SETS_SOME = hasattr(cl.Kernel, "_set_arg_multi") and hasattr(cl.Kernel, "_set_arg_buf_pack_multi")
"""Whether pyopencl can set some of a kernel's arguments in one call: buffers with
`_set_arg_multi`, scalars with `_set_arg_buf_pack_multi` (the calls its generated
`set_args` makes; a pyopencl without them sets them all)."""


def _pack_code(dtype: Any) -> bytes | None:
    """How `Launcher._send` passes an argument of `dtype` (None: a buffer): its `struct`
    code for pyopencl's `_set_arg_buf_pack_multi` (which takes C's types: an int64 is a
    `long` where that has 8 bytes), or b"q", an int64 set by itself."""
    if dtype is None:
        return None
    if np.dtype(dtype) == np.int64:
        return b"l" if struct.calcsize("l") == 8 else b"q"
    code: str = np.dtype(dtype).char  # ("f", "d")
    return code.encode()


def _same_binding(bound: object, known: object) -> bool:
    """Whether an argument bound as `bound` (a pyopencl array, or a buffer and offset)
    is bound as `known` needs."""
    if bound is known:
        return True
    return isinstance(bound, tuple) and isinstance(known, tuple) and bound[0] == known[0] and bound[1] == known[1]


_build_lock = threading.Lock()


def fused_kernel(
    context: cl.Context, device: cl.Device, dtype: np.dtype[Any], spec: KernelSpec, slots: int, shared: bool = False
) -> FusedKernel:
    """The fused kernel of `spec` for `dtype` over `slots` parameters (with `shared`,
    whose state buffers are each in one buffer: see `shares_state`), built once per
    context."""
    with _build_lock:
        return _fused_kernel(context, device, dtype, spec, slots, shared)


@context_dependent_memoize
def _fused_kernel(
    context: cl.Context, device: cl.Device, dtype: np.dtype[Any], spec: KernelSpec, slots: int, shared: bool
) -> FusedKernel:
    fused = _build(context, device, np.dtype(dtype), spec, slots, geometry(device), shared)
    kernel = cl.Kernel(fused.program, fused.name)
    most = int(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, device))
    if most < fused.geometry.local_size:
        # a driver that cannot run this kernel in groups that large: the largest power
        # of two it can (the group size is part of the kernel's source)
        geo = Geometry(local_size=1 << (most.bit_length() - 1))
        fused = _build(context, device, dtype, spec, slots, geo, shared)
    return fused


@dataclass(frozen=True)
class _Spelling:
    """How the kernel's update of one value, or of a vector of WIDTH values (see
    kernels/vector.cl), is spelt: its types, and its loads and stores at index c."""

    real: str
    stored: str
    mask: str
    """The type of a condition per value."""
    uint: str
    suffix: str
    """The suffix of precision.cl's and vector.cl's names (FROM_STORAGE, ...)."""
    random: str
    zero_bits: str

    @classmethod
    def single(cls, real: str, stored: str) -> _Spelling:
        return cls(real, stored, "bool", "uint", "", "mix(mix((uint)key) + (uint)c)", "0")

    @classmethod
    def vector(cls) -> _Spelling:
        return cls("V(float)", "STOREDV", "V(int)", "V(uint)", "V", "RANDOMV(key, c)", "(V(uint))(0)")

    @property
    def update(self) -> str:
        return "update" + self.suffix.lower()

    def load(self, array: str) -> str:
        return f"LOADV({array}, c)" if self.suffix else f"{array}[c]"

    def load_stored(self, array: str) -> str:
        return f"LOAD_STOREDV({array}, c)" if self.suffix else f"{array}[c]"

    def store(self, array: str, value: str) -> str:
        return f"STOREV({array}, c, {value});" if self.suffix else f"{array}[c] = {value};"

    def store_stored(self, array: str, value: str) -> str:
        return f"STORE_STOREDV({array}, c, {value});" if self.suffix else f"{array}[c] = {value};"

    def from_storage(self, value: str) -> str:
        return f"FROM_STORAGE{self.suffix}({value})"

    def loaded_finite(self, value: str) -> str:
        return f"LOADED_FINITE{self.suffix}({value})"

    def to_storage(self, value: str, bits: str) -> str:
        return f"TO_STORAGE{self.suffix}({value}, {bits})"

    def select_stored(self, keep: str, a: str, b: str) -> str:
        return f"SELECT_STORED({keep}, {a}, {b})" if self.suffix else f"{keep} ? {a} : {b}"


def _build(
    context: cl.Context,
    device: cl.Device,
    dtype: np.dtype[Any],
    spec: KernelSpec,
    slots: int,
    geo: Geometry,
    shared: bool = False,
) -> FusedKernel:
    compute = compute_dtype(dtype)
    real = dtype_to_ctype(compute)
    # half parameters and gradients are ushort to pyopencl (see kernels/precision.cl)
    stored = storage_ctype(dtype)
    scalars = [f"s{k}" for k in range(spec.scalar_count)]
    arrays = ("param", "grad", *spec.buffers)
    ctypes = {name: stored if name in ("param", "grad") else real for name in arrays}
    own = [f"t{j}" for j in range(spec.member_scalar_count)]  # the members' own, shared
    own_arrays = 2 if shared else len(arrays)  # (the arrays taken per parameter)
    stride = 1 + (len(arrays) - 2) * shared  # (the layout buffer's values per parameter)

    def array_of(name: str, k: int) -> str:  # the array `name` of the k-th parameter
        j = arrays.index(name)
        return f"{name}{k}" if j < own_arrays else f"({name}_all + layout[{k * stride + j - 1}])"

    keys = ["key"] if spec.stochastic else []  # each member's
    arguments = ", ".join(
        [
            decl
            for k in range(slots)
            for decl in [f"{ctypes[name]} *{name}{k}" for name in arrays[:own_arrays]]
            + [f"{real} {name}_{k}" for name in keys]
        ]
        + [f"{real} {name}" for name in (*scalars, *own)]
        + [f"{real} *{name}_all" for name in arrays[own_arrays:]]  # (shared: see `shares_state`)
        + ["long *skipped", "long *layout"]  # (layout: see `Launcher.bind`)
    )
    text = kernel_source(spec.source)
    float32 = compute == np.float32
    builtin_sqrt = "__builtin_sqrtf" if float32 else "__builtin_sqrt"
    int64_atomics = "cl_khr_int64_base_atomics" in device.extensions
    preamble = [
        "#pragma OPENCL FP_CONTRACT OFF",
        *(["#pragma OPENCL EXTENSION cl_khr_int64_base_atomics : enable"] if int64_atomics else []),
        f"#define real {real}",
        f"#define REAL_MAX {'FLT_MAX' if float32 else 'DBL_MAX'}",
        # SAT(x): x, or the largest finite value of its sign where x overflowed; NaN stays
        # NaN (selects, not fmin/fmax, whose NaN rules cost a third of a step on PoCL).
        # DEFINE_SAT defines it over `real` as it is where it is used (kernels/vector.cl
        # defines SATV over vectors with it).
        "#define DEFINE_SAT(name) inline real name(real x) { \\",
        # (each test is false for NaN, which is then kept)
        "    x = (x > (real)(REAL_MAX)) ? (real)(REAL_MAX) : x; \\",
        "    x = (x < (real)(-REAL_MAX)) ? (real)(-REAL_MAX) : x; \\",
        "    return x; \\",
        "}",
        "DEFINE_SAT(SAT)",
        # SQRT(x): the correctly rounded square root (the build options ask for it).
        # Where the compiler has clang's builtin, that one: PoCL's CPU compiler turns
        # it into SIMD instructions across work-items, but not its library's `sqrt`,
        # which makes the step four times slower.
        "#if defined(__has_builtin)",
        f"#if __has_builtin({builtin_sqrt})",
        f"#define SQRT(x) {builtin_sqrt}(x)",
        "#endif",
        "#endif",
        "#ifndef SQRT",
        "#define SQRT(x) sqrt(x)",
        "#endif",
        *(f"#define {flag} {int(flag in spec.flags)}" for flag in spec.all_flags),
        # FINITE, and how the parameter and gradient are read and written
        storage_preamble(
            dtype, stochastic=spec.stochastic, exact=spec.nonfinite == "propagate", hardware=geo.hardware_half
        ),
        text,
    ]

    # Each parameter gets whole work-groups. Before the loop over indices, a work-group
    # picks its parameter's arrays: those of the last parameter whose first group is at
    # or before its own, with selects, not branches. With one work-item per value (a
    # GPU's geometry), the pick ends with a barrier: PoCL's CPU compiler then sees the
    # arrays as the same for every work-item of the group and turns the update into SIMD
    # loads and stores of neighbouring values; without it, it reads and writes element
    # by element (gathers and scatters), 2 to 8 times slower. With a loop over values
    # in each work-item (a CPU's geometry, see `geometry`), the pick is made once for
    # the loop.
    local, span = geo.local_size, geo.span
    chunked = geo.per_item > 1
    if chunked and local != 1:
        raise ValueError(f"a geometry of {geo.per_item} values per work-item needs one work-item per group")
    # A CPU's loop over values takes 16 at a time where the compiler targets AVX-512, 8
    # where it targets AVX (and F16C for float16; kernels/vector.cl), for a float32
    # update; not with nonfinite="propagate" (a mode for torch's habits, left to the
    # loop over single values, whose float16 loads keep a signalling NaN signalling
    # where F16C would quiet it), nor where float16 values must not load with F16C
    # (`Geometry.hardware_half`).
    vector = chunked and float32 and spec.nonfinite != "propagate" and (geo.hardware_half or dtype != FLOAT16)
    if vector:
        undo = ["#undef update", "#undef SAT", "#undef SQRT", "#undef real", f"#define real {real}"]
        preamble += [
            f"#define MAX_WIDTH {geo.vector_width}",
            kernel_source("vector"),
            "#if VECTOR",
            text,
            *undo,
            "#endif",
        ]

    def groups(size: str) -> str:
        return f"(({size} + {span - 1}) / {span})"

    pick = [
        "const long group = get_group_id(0);",
        *(f"__global {ctypes[name]} *{name} = {array_of(name, 0)};" for name in arrays),
        *(f"{real} {name} = {name}_0;" for name in keys),
        "long size = layout[0], begin = 0, end = " + groups("size") + ";",
    ]
    for k in range(1, slots):
        pick += [
            f"const bool later{k} = group >= end;",
            f"const long size{k} = layout[{k * stride}];",
            f"begin = later{k} ? end : begin;",
            f"end = later{k} ? end + {groups(f'size{k}')} : end;",
            f"size = later{k} ? size{k} : size;",
            *(f"{name} = later{k} ? {array_of(name, k)} : {name};" for name in arrays),
            *(f"{name} = later{k} ? {name}_{k} : {name};" for name in keys),
        ]
    if slots > 1 and not chunked:
        pick.append("barrier(CLK_LOCAL_MEM_FENCE);")
    if slots == 1 or spec.nonfinite == "count" or chunked:
        # The launch has one work-item per index (the kernel finds its own from the
        # global id), so ElementwiseKernel's loop over indices runs exactly once in each
        # (the body ends with a break). With its bound set to the largest long, which
        # its int-based index never reaches, the compiler drops the loop and its
        # per-value bound check, a tenth of a plain SGD step on PoCL. Not with the
        # barrier of a launch over several parameters: PoCL then loses track of the
        # arrays being the same for the whole group (see above) and gathers. Counting
        # needs it all the same: with a barrier in the loop's body too, PoCL's kernel
        # never ends unless the loop is dropped. (A work-item with a loop of its own
        # runs that loop once too.)
        pick.append("n = LONG_MAX;")
    # Every work-group but a parameter's last is full. Saying so with a flag that is the
    # same for the whole group lets PoCL's compiler split its loop over the group's
    # work-items in two: full groups run one without the bound check, whose index
    # vector and mask cost a fifth of a plain float32 step from cache.
    if not chunked:
        pick.append(f"const bool full = (group - begin + 1) * {local} <= size;")
    update_args = ["&param_v", "grad_v", *(f"&{name}_v" for name in spec.all_buffers), *scalars, *own]
    # The parameter is loaded from its storage (`param_raw`; a half parameter converted
    # to float32) or from its master copy, and stored rounded (`TO_STORAGE`); the state
    # buffers are the compute type. An element is updated where its gradient is finite
    # and, for a half parameter without a master copy, its parameter too (an infinite
    # or NaN half parameter is left as it is: see kernels/precision.cl).
    half_param = is_half(dtype) and not spec.master
    kept = [name for name in spec.buffers if name != "master_param"]

    def body(w: _Spelling) -> list[str]:
        """The update of the value at index c of the parameter, or of the values from c
        on, as `w` spells it."""
        loaded = [
            f"const {w.stored} param_raw = {w.load_stored('param')};",
            f"{w.real} param_v = {w.load('master_param') if spec.master else w.from_storage('param_raw')};",
            f"const {w.real} grad_v = {w.from_storage(w.load_stored('grad'))};",
            *(f"{w.real} {name}_v = {w.load(name) if name in spec.buffers else '0'};" for name in spec.all_buffers),
            f"const {w.real} param_old = param_v;",
            *([f"const {w.real} {name}_old = {name}_v;" for name in kept] if spec.nonfinite != "propagate" else []),
            f"const {w.uint} random = {w.random if spec.stochastic else w.zero_bits};",
            f"{w.update}({', '.join(update_args)});",
        ]
        state_stores = [w.store(name, f"{name}_v") for name in kept]
        if spec.nonfinite == "propagate":
            # every value is written; where the gradient is NaN or infinite the
            # parameter becomes NaN, as it does in torch (single values only)
            param_ok = "LOADED_FINITE(param_old)" if half_param else "true"
            return [
                *loaded,
                f"param_v = LOADED_FINITE(grad_v) ? param_v : ({real})(NAN);",
                f"param[c] = {param_ok} ? TO_STORAGE(param_v, random) : param_raw;",
                *(["master_param[c] = param_v;"] if spec.master else []),
                *state_stores,
            ]
        # where the element is not updated, the old values are written back: a blend
        # and a plain store, which PoCL vectorizes on every x86 CPU (a store under a mask
        # is a tenth faster with AVX-512 but a third slower with AVX2's masked moves,
        # and code in an else branch, such as the counting below, costs as much again;
        # `&`, not `&&`: a branch would stop PoCL from vectorizing)
        finite = w.loaded_finite("grad_v") + (f" & {w.loaded_finite('param_old')}" if half_param else "")
        return [
            *loaded,
            f"const {w.mask} keep = {finite};",
            *(f"{name}_v = keep ? {name}_v : {name}_old;" for name in kept),
            w.store_stored("param", w.select_stored("keep", w.to_storage("param_v", "random"), "param_raw")),
            *([w.store("master_param", "keep ? param_v : param_old")] if spec.master else []),
            *state_stores,
        ]

    counting: list[str] = []
    counts = spec.nonfinite == "count"
    add = "atom_add(skipped, (long)s);" if int64_atomics else "atomic_add((volatile __global uint *)skipped, s);"
    if counts and not chunked:
        # Each work-item marks its value in local memory; after a barrier, the group's
        # first work-item looks at the marks 8 at a time and adds their count to the
        # counter only where one is set. An atomic add per skipped value, in a branch,
        # stops PoCL from vectorizing the update (5 times slower); this costs the
        # barrier and a pass over 1/8 of the group's bytes. (A work-item with a loop of
        # its own sums its skipped values and adds them once.)
        pick.append(f"__local uchar skipped_here[{local}] __attribute__((aligned(8)));")
        # (the marks 8 at a time where the group size allows it, else every value looks)
        any_set = (
            ["ulong any = 0;", f"for (int k = 0; k < {local // 8}; ++k) any |= ((__local ulong *)skipped_here)[k];"]
            if local % 8 == 0
            else ["const bool any = true;"]
        )
        counting = [
            "skipped_here[get_local_id(0)] = mine;",
            "barrier(CLK_LOCAL_MEM_FENCE);",
            "if (get_local_id(0) == 0) {",
            *any_set,
            "if (any) {",
            "uint s = 0;",
            f"for (int k = 0; k < {local}; ++k) s += skipped_here[k];",
            add,
            "}",
            "}",
        ]
    element = body(_Spelling.single(real, stored))
    vector_loop: list[str] = []
    if vector:  # the same update, WIDTH values at a time (see kernels/vector.cl)
        vector_loop = [
            "#if VECTOR",
            "for (; c + WIDTH <= last; c += WIDTH) {",
            # (512 values ahead in each array: 9 to 13% of a float32 Adam step from
            # memory; a hint, which does not fault where that is past an array's end)
            *(f"__builtin_prefetch({name} + c + 512);" for name in ("param", "grad", *spec.buffers)),
            *body(_Spelling.vector()),
            *(["s += lane_sum(keep + 1);"] if counts else []),  # (lanes not updated: 0 + 1)
            "}",
            "#endif",
        ]
    if chunked:
        operation = [
            f"const long first = (group - begin) * {span};",
            f"const long last = min(first + {span}, size);",
            *(["uint s = 0;"] if counts else []),
            "long c = first;",
            *vector_loop,
            "for (; c < last; ++c) {",  # (where there is no vector loop: every value)
            *element,
            *(["s += !keep;"] if counts else []),
            "}",
            *([f"if (s) {{ {add} }}"] if counts else []),
            "break;",
        ]
    else:
        operation = [
            # (from the global id, which is a size_t, rather than ElementwiseKernel's
            # `i`, whose int arithmetic would overflow beyond 2**31 values)
            f"const long c = (long)get_global_id(0) - begin * {local};",
            *(["uchar mine = 0;"] if counting else []),
            "if (full || c < size) {",
            *element,
            *(["mine = !keep;"] if counting else []),
            "}",
            *counting,
            "break;",
        ]
    elementwise = ElementwiseKernel(
        context,
        arguments,
        "\n".join(operation),
        name=f"netcl_{spec.source}_{slots}{'_shared' if shared else ''}",
        preamble="\n".join(preamble),
        loop_prep="\n".join(pick),
        options=list(_BUILD_OPTIONS),
    )
    kernel, _ = elementwise.get_kernel(use_range=False)
    return FusedKernel(
        program=kernel.program,
        name=kernel.function_name,
        geometry=geo,
        slots=slots,
        arrays=len(arrays),
        scalar_count=spec.scalar_count + spec.member_scalar_count,
        keyed=spec.stochastic,
        dtype=compute,
        shared=shared,
    )
