"""Array-API arrays (numpy, torch, array_api_strict, cupy, jax ...).

The update runs in the array's own namespace, through `array_api_compat`, with the
optimizer's reference maths. Mutable arrays are written in place, so the user's own array
object holds the result; arrays that cannot be written (jax) are replaced: the parameter's
`data` and the state entries are rebound to the new arrays.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Hashable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any, cast

import array_api_compat
import numpy as np
import numpy.typing as npt

from netcl._backends.base import (
    DTYPE_NAMES,
    SUPPORTED_DTYPES,
    Backend,
    HostViews,
    Tally,
    Work,
    check_dtype,
    check_same_shape,
    describe,
)
from netcl._backends.host import dlpack_view, host_view, joined_runs, update_on_host
from netcl._precision import BFLOAT16, FLOAT16, compute_dtype, is_half, round_half
from netcl._update import MASTER, Step
from netcl._xp import ArrayNamespace, is_torch, torch_kinds

__all__ = ["ARRAY_API", "ArrayAPIBackend", "is_array_api"]


def is_array_api(x: object) -> bool:
    """Whether `x` is an array of a library that array-api-compat supports."""
    return bool(array_api_compat.is_array_api_obj(x)) and hasattr(x, "shape")


def _namespace(*arrays: object) -> ArrayNamespace:
    return array_api_compat.array_namespace(*arrays)


def _rebinds(x: Any) -> bool:
    """Whether `x` belongs to a library whose arrays are never written in place."""
    return bool(array_api_compat.is_jax_array(x))


def _strides(x: Any) -> tuple[tuple[int, ...], int] | None:
    """The strides of `x` and the size of one element in the same unit, where known."""
    if isinstance(x, np.ndarray):
        return tuple(x.strides), x.itemsize
    if is_torch(x):
        return tuple(x.stride()), 1
    return None


def _overlaps(x: Any) -> bool:
    """Whether two elements of `x` may share memory (a broadcast or expanded view): the
    dimensions, by stride, must each step past all the smaller ones."""
    known = _strides(x)
    if known is None:
        return False
    strides, itemsize = known
    span = 0
    for stride, n in sorted((abs(st), int(n)) for st, n in zip(strides, x.shape, strict=True) if n > 1):
        if stride < span + itemsize:
            return True
        span += stride * (n - 1)
    return False


def _check_dense(x: Any, where: str) -> None:
    """Raise TypeError for a torch tensor that is not strided (a sparse one), ValueError
    for one whose storage does not hold every element (its memory freed, as
    `untyped_storage().resize_(0)` does: torch's own ops then crash the process)."""
    if not is_torch(x):
        return
    layout = getattr(x, "layout", None)
    if layout is not None and str(layout) != "torch.strided":
        raise TypeError(f"{where} is a torch tensor with layout {layout}; netcl needs dense (strided) tensors")
    if not x.numel():
        return
    try:
        held = int(x.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):  # (a tensor without one)
        return
    needed = int(x.storage_offset()) * int(x.element_size()) + _torch_reach(x)
    if held < needed:
        raise ValueError(
            f"{where} is a torch tensor whose storage holds {held} bytes, fewer than the {needed} its elements "
            "reach (its memory freed, as untyped_storage().resize_(0) does?); netcl reads and writes every element"
        )


def _torch_reach(x: Any) -> int:
    """The bytes from a non-empty torch tensor's first element to one past its last (its
    strides are never negative)."""
    span = sum((int(n) - 1) * int(st) for n, st in zip(x.shape, x.stride(), strict=True))
    return (span + 1) * int(x.element_size())


def _check_written_in_place(x: Any, where: str) -> None:
    """Raise ValueError unless netcl can write `x` in place (or rebinds it, jax): it is
    writeable, not a torch inference tensor, and no two of its elements share memory."""
    if _rebinds(x):
        return
    if not array_api_compat.is_writeable_array(x):
        raise ValueError(f"{where} is read-only; netcl updates parameters in place, so it needs a writeable array")
    is_inference: Callable[[], bool] | None = getattr(x, "is_inference", None) if is_torch(x) else None
    if is_inference is not None and is_inference():
        # (torch lets one be updated in place only within inference mode; a step's checks
        # are not repeated while nothing changes, so netcl takes none)
        raise ValueError(
            f"{where} is a torch inference tensor (made under torch.inference_mode()), which torch updates "
            "in place only within inference mode; netcl updates parameters in place, so it needs a normal "
            "tensor (a clone made outside inference mode)"
        )
    if _overlaps(x):
        raise ValueError(
            f"{where} has elements that share memory (shape {tuple(x.shape)}, a broadcast or expanded "
            "view); netcl updates parameters in place, so each element needs memory of its own"
        )


_byte_bounds: Callable[[np.ndarray[Any, Any]], tuple[int, int]] = getattr(np.lib, "array_utils", np).byte_bounds
"""numpy's first and one-past-last byte of an array (`np.lib.array_utils` from numpy 2)."""


def no_autograd(x: Any) -> contextlib.AbstractContextManager[object]:
    """torch's `no_grad()` for a torch tensor (as torch's own optimizers update
    parameters that require grad), else nothing."""
    if is_torch(x):
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


_numpy_print = operator.attrgetter("shape", "strides", "dtype", "flags.writeable")
"""A numpy array's fingerprint: what the checks read of it."""


class ArrayAPIBackend(Backend):
    """Arrays of array-API libraries, updated with the reference maths."""

    name = "array-api"

    def fingerprint(self, array: Any, *, memory: bool = True) -> Hashable | None:
        # what the checks read: the library (type), shape, layout (overlapping
        # elements), dtype, device and writeability; for numpy and torch only. A numpy
        # array's memory cannot change (its `data` is read-only from numpy 2.0, the least
        # netcl takes); a torch
        # tensor's can (`set_`, `tensor.data = x`), so with `memory` its address too
        if type(array) is np.ndarray:
            return _numpy_print(array)  # (four values: no torch tensor's)
        if is_torch(array):  # (torch.Size is a tuple; the negative bit: see `negated`)
            layout = (type(array), array.shape, array.stride(), array.dtype, array.device, array.layout, array.is_neg())
            return (*layout, array.data_ptr()) if memory else layout
        return None

    def extent(self, array: Any) -> tuple[Hashable, int, int] | None:
        # a torch tensor's from its address and strides (never negative in torch), in
        # host memory or its device's; numpy's bounds of any other array's bytes, seen
        # through DLPack; none for arrays never written in place (jax's)
        if is_torch(array):
            if array.numel() == 0:
                return None
            start = int(array.data_ptr())
            where = "host" if array.device.type == "cpu" else str(array.device)
            return where, start, start + _torch_reach(array)
        if _rebinds(array):
            return None
        view = array if isinstance(array, np.ndarray) else dlpack_view(array)
        if view is None or view.size == 0:
            return None
        low, high = _byte_bounds(view)
        return "host", int(low), int(high)

    def fingerprints(self, arrays: Sequence[Any], *, memory: bool = True) -> list[Hashable | None]:
        kinds = set(map(type, arrays))
        if kinds == {np.ndarray}:  # (a model of numpy arrays: at C's speed)
            return list(map(_numpy_print, arrays))
        if torch_kinds(kinds):  # (of torch tensors: `fingerprint`'s, in one loop)
            if memory:
                return [
                    (type(a), a.shape, a.stride(), a.dtype, a.device, a.layout, a.is_neg(), a.data_ptr())
                    for a in arrays
                ]
            return [(type(a), a.shape, a.stride(), a.dtype, a.device, a.layout, a.is_neg()) for a in arrays]
        return [self.fingerprint(array, memory=memory) for array in arrays]

    def alias_prints(self, params: Sequence[Any]) -> list[Hashable] | None:
        if not (torch_kinds(set(map(type, params))) or all(map(is_torch, params))):
            return None
        # (a torch parameter's address, shape, strides, dtype, device, layout and negative
        # bit are its `data`'s: `parameter.data = x` gives the parameter x's)
        return [(p.data_ptr(), p.shape, p.stride(), p.dtype, p.device, p.layout, p.is_neg()) for p in params]

    def same_memory(self, array: Any, other: Any) -> bool:
        if array is other:
            return True
        # torch's `parameter.data`: a new tensor over the same memory at each access
        return (
            is_torch(array)
            and is_torch(other)
            and array.data_ptr() == other.data_ptr()
            and array.device == other.device
        )

    def check_param(self, data: Any, where: str) -> None:
        if _numpy_dtype(data) is None:
            raise TypeError(f"{where} has dtype {data.dtype}; netcl optimizes {DTYPE_NAMES} arrays")
        _check_dense(data, where)
        _check_written_in_place(data, where)

    def check_grad(self, data: Any, grad: Any, where: str) -> None:
        _check_same_library(data, grad, where, "the gradient must be an array of the same library")
        _check_dense(grad, where)
        _check_match(data, grad, where)

    def check_state(self, data: Any, buffer: Any, where: str) -> None:
        _check_same_library(data, buffer, where, "its state was made for another kind of array")
        _check_dense(buffer, where)
        _check_match(data, buffer, where, state=True)
        _check_written_in_place(buffer, where)

    def dtype(self, data: Any) -> np.dtype[Any]:
        dtype = _numpy_dtype(data)
        assert dtype is not None  # (data passed check_param)
        return dtype

    def zeros_like(self, data: Any) -> Any:
        xp = _namespace(data)
        return xp.zeros_like(data, dtype=_compute(xp, data))

    def zeros_for(self, datas: Sequence[Any]) -> list[Any]:
        """C-contiguous numpy arrays get views of one numpy array per dtype (see
        `Backend.zeros_for`); other arrays their own."""
        out: list[Any] = [None] * len(datas)
        groups: dict[np.dtype[Any], list[int]] = {}
        for k, data in enumerate(datas):
            if isinstance(data, np.ndarray) and data.flags.c_contiguous:
                groups.setdefault(compute_dtype(data.dtype), []).append(k)
            else:
                out[k] = self.zeros_like(data)
        for dtype, members in groups.items():
            arena = np.zeros(sum(datas[k].size for k in members), dtype)
            start = 0
            for k in members:
                out[k] = arena[start : start + datas[k].size].reshape(datas[k].shape)
                start += datas[k].size
        return out

    def from_host_for(self, hosts: Sequence[npt.NDArray[Any]], datas: Sequence[Any]) -> list[Any]:
        """numpy arrays' as `zeros_for` lays them out; the others' each a copy."""
        out = [
            None if isinstance(data, np.ndarray) else self.from_host(host, data)
            for host, data in zip(hosts, datas, strict=True)
        ]
        numpy = [k for k, data in enumerate(datas) if isinstance(data, np.ndarray)]
        for k, buffer in zip(numpy, self.zeros_for([datas[k] for k in numpy]), strict=True):
            np.copyto(buffer, hosts[k])
            out[k] = buffer
        return out

    def to_host(self, array: Any) -> npt.NDArray[Any]:
        if is_torch(array):  # (DLPack exports the memory as it is: see `negated`)
            array = array.detach().resolve_neg()
        if is_torch(array) and str(array.dtype) == "torch.bfloat16":
            import torch  # (DLPack has bfloat16, numpy has not: the bits, as ml_dtypes' bfloat16)

            bits = array.to("cpu").view(torch.int16)
            return np.array(np.from_dlpack(bits), copy=True).view(BFLOAT16)
        try:
            return np.from_dlpack(array, device="cpu", copy=True)
        except (TypeError, ValueError, RuntimeError, BufferError, AttributeError):
            return np.array(array, copy=True)

    def from_host(self, host: npt.NDArray[Any], like: Any) -> Any:
        xp = _namespace(like)
        device = array_api_compat.device(like)
        if host.dtype == BFLOAT16 and is_torch(like):
            import torch  # (numpy knows bfloat16 only through ml_dtypes, torch not at all)

            bits = torch.from_numpy(np.ascontiguousarray(host).view(np.int16).copy())
            return bits.view(torch.bfloat16).to(cast(torch.device, device))
        return xp.asarray(host, device=device, copy=True)

    @contextlib.contextmanager
    def host_views(self, arrays: Sequence[Any], write: bool) -> Iterator[HostViews]:
        # numpy arrays and CPU tensors lend their memory; the others are copied in and out
        views: list[npt.NDArray[Any]] = []
        copies: list[tuple[Any, npt.NDArray[Any]]] = []
        for k, x in enumerate(arrays):
            view = host_view(x)
            if view is None:
                if write and (_rebinds(x) or not array_api_compat.is_writeable_array(x)):
                    raise TypeError(f"arrays[{k}] ({describe(x)}) cannot be written in place")
                view = self.to_host(x)
                copies.append((x, view))
            views.append(view.ravel(order="K"))
        yield HostViews(views, joined_runs(views))
        if write:
            for x, view in copies:
                with no_autograd(x):
                    x[...] = _namespace(x).asarray(view, device=array_api_compat.device(x))

    def zero_(self, grad: Any) -> None:
        grad[...] = 0

    def apply(
        self,
        step: Step,
        work: Sequence[Work],
        cache: MutableMapping[Hashable, Any],
        tally: Tally,
        steady: bool = False,
    ) -> None:
        """Contiguous host arrays go to the fused kernel on a CPU OpenCL device where
        that is faster (bit-identical results); the rest are updated with the reference
        maths. torch's autograd then learns that the torch parameters were written
        (`note_written`)."""
        for item in update_on_host(step, work, cache, tally, lambda x: _rebinds(x)):
            update_by_reference(step, item, tally)
        written = cache.get("written")
        if written is None or written[0] is not work:  # (the same list while the plan is kept)
            written = cache["written"] = (work, written_tensors(item.param for item in work))
        if written[1]:
            _increment_version(written[1])


def written_tensors(params: Iterable[Any]) -> list[Any]:
    """The torch tensors a user holds of `params` whose arrays netcl writes: a torch
    parameter itself (its `data` is another tensor object, with a version counter of
    its own), or the `data` of another kind of parameter where that is a torch tensor."""
    return [p if is_torch(p) else p.data for p in params if is_torch(p) or is_torch(getattr(p, "data", None))]


def note_written(params: Iterable[Any]) -> None:
    """Tell torch's autograd that the arrays of the torch ones among `params` were
    written in place, as torch's own in-place ops tell it (their version counter): netcl
    writes a parameter's memory (the fused kernel, MPI) or its `data`, so a tensor that
    autograd saved for a backward pass before the write would otherwise be read after
    it without the error torch raises."""
    tensors = written_tensors(params)
    if tensors:
        _increment_version(tensors)


def _increment_version(tensors: list[Any]) -> None:
    from torch.autograd import graph

    increment: Callable[[Any], None] | None = getattr(graph, "increment_version", None)
    if increment is None:  # (torch before 2.1 has no public call for it)
        return
    try:
        increment(tensors)
    except TypeError:  # (torch before 2.4 takes one tensor)
        for tensor in tensors:
            increment(tensor)


def update_by_reference(step: Step, item: Work, tally: Tally) -> None:
    """Update one parameter with the reference maths, in its own library.

    A half parameter is updated in float32 (its master copy, or the parameter upcast,
    with its gradient upcast) and the result rounded back (`netcl._precision`)."""
    data = item.data
    xp = _namespace(data, item.grad)
    dtype = ARRAY_API.dtype(data)
    half = is_half(dtype)
    master = step.master
    # Overflow and non-finite values are handled by the update's policy (saturation,
    # skipping); numpy's warnings about them would only be noise.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), no_autograd(data):
        compute = xp.float32 if half else data.dtype
        param = item.buffers[MASTER] if master else xp.astype(data, compute) if half else data
        grad = xp.astype(item.grad, compute) if half else item.grad
        own = item.member[: len(item.member) - step.stochastic]  # (the rule's; the key of the rounding last)
        new_param, new_buffers = step.rule.reference(xp, param, grad, item.buffers, step.hyper, own)
        # an element is updated where its gradient is finite and, for a half parameter
        # without a master copy, its parameter too (as in the fused kernel)
        grad_finite = xp.isfinite(grad)
        param_finite = xp.isfinite(param) if half and not master else None
        finite = grad_finite if param_finite is None else xp.logical_and(grad_finite, param_finite)
        if step.nonfinite != "propagate":
            new_param = xp.where(finite, new_param, param)
            new_buffers = {name: xp.where(finite, new, item.buffers[name]) for name, new in new_buffers.items()}
            if step.nonfinite == "count":
                tally.add(xp.sum(xp.astype(xp.logical_not(finite), xp.int64)))
        else:
            new_param = xp.where(grad_finite, new_param, xp.full_like(new_param, math.nan))
        if master:
            new_buffers[MASTER] = new_param
        if half or master:
            new_param = _rounded(xp, new_param, data, dtype, item.member[-1] if step.stochastic else None)
            if param_finite is not None:  # an infinite or NaN half parameter keeps its bits
                new_param = xp.where(param_finite, new_param, data)
        if _rebinds(data):
            setattr(item.param, "data", new_param)  # noqa: B010 (ParameterLike is read-only to checkers)
            item.buffers.update(new_buffers)
        else:
            data[...] = new_param
            for name in step.buffers:
                item.buffers[name][...] = new_buffers[name]


def _rounded(xp: ArrayNamespace, x: Any, like: Any, dtype: np.dtype[Any], key: float | None) -> Any:
    """`x` (the update's result in the compute dtype) rounded to `like`'s dtype (`dtype`
    in numpy), with numpy's bits where it is half (`netcl._precision.round_half`): the
    same bits as the fused kernel stores. Other libraries' arrays go through the host."""
    if not is_half(dtype):
        return xp.astype(x, like.dtype)
    if isinstance(x, np.ndarray):
        return round_half(x, dtype, key)
    return ARRAY_API.from_host(round_half(ARRAY_API.to_host(x), dtype, key), like)


_TORCH_DTYPES: dict[str, np.dtype[Any]] = {
    "torch.float32": np.dtype(np.float32),
    "torch.float64": np.dtype(np.float64),
    "torch.float16": FLOAT16,
    "torch.bfloat16": BFLOAT16,
}


def _numpy_dtype(x: Any) -> np.dtype[Any] | None:
    """The numpy dtype of an array-API array netcl can update (float32, float64,
    float16, bfloat16: `ml_dtypes.bfloat16` for numpy), else None."""
    if is_torch(x):
        return _TORCH_DTYPES.get(str(x.dtype))
    if isinstance(x, np.ndarray):
        return x.dtype if x.dtype in SUPPORTED_DTYPES else None
    xp = _namespace(x)
    for name in ("float32", "float64", "float16"):
        if x.dtype == getattr(xp, name, None):
            return np.dtype(name)
    return None


def _compute(xp: ArrayNamespace, x: Any) -> Any:
    """The namespace's dtype that `x` is updated in (float32 for a half array)."""
    dtype = _numpy_dtype(x)
    return xp.float32 if dtype is not None and is_half(dtype) else x.dtype


def _check_same_library(data: Any, other: Any, where: str, why: str) -> None:
    """Raise unless `other` is an array of the same array-API library as `data`."""
    try:
        same = is_array_api(other) and bool(_namespace(data, other))
    except TypeError:
        same = False
    if not same:
        raise TypeError(f"{where} is a {describe(other)}, but the parameter is a {describe(data)}; {why}")


def _check_match(data: Any, other: Any, where: str, state: bool = False) -> None:
    """Raise unless `other` (a gradient, or with `state` a state buffer) fits `data`:
    its shape, device, and dtype (the state's is float32 for a half parameter)."""
    check_same_shape(data, other, where)
    check_dtype(other.dtype, _compute(_namespace(data), data) if state else data.dtype, data.dtype, where, state)
    if array_api_compat.device(other) != array_api_compat.device(data):
        raise ValueError(
            f"{where} is on device {array_api_compat.device(other)}, but its parameter is "
            f"on {array_api_compat.device(data)}"
        )


ARRAY_API = ArrayAPIBackend()
