"""Gradient clipping: `clip_grad_norm_` and `clip_grad_value_`, torch's functions for netcl's parameters.

OpenCL gradients stay on the device: the norm is a `pyopencl.reduction.ReductionKernel`
per run of gradients that follow each other in one buffer (one for flat storage), its
partial sums are reduced on the device, and the scaling reads the result there, so no
call waits on the host unless `error_if_nonfinite` asks to look at the norm. Gradients
of array-API libraries (numpy, torch ...) are clipped with their library's own maths, as
torch computes it: the norm of each gradient, then the norm of those norms.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable
from typing import Any, overload

import array_api_compat
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
from pyopencl.elementwise import ElementwiseKernel
from pyopencl.reduction import ReductionKernel

from netcl._backends import backend_for, describe
from netcl._backends.array_api import ARRAY_API, no_autograd
from netcl._backends.opencl import OPENCL, buffer_runs, pending_events, record_event
from netcl._kernels import storage_ctype, storage_preamble
from netcl._parameter import Parameter
from netcl._precision import compute_dtype, is_half
from netcl._types import Array, ParameterLike

__all__ = ["clip_grad_norm_", "clip_grad_value_"]

_EPS = 1e-6
"""torch's: the scale is max_norm / (total_norm + 1e-6)."""


def _grads(parameters: ParameterLike | Iterable[ParameterLike], where: str) -> list[Any]:
    """The gradients (not None) of `parameters`, all of one kind of array."""
    if hasattr(parameters, "grad") and hasattr(parameters, "data"):
        items: list[Any] = [parameters]
    elif isinstance(parameters, Iterable) and not isinstance(parameters, str | bytes):
        items = list(parameters)
    else:
        raise TypeError(f"{where} must be a parameter or an iterable of parameters, got {describe(parameters)}")
    grads = []
    for k, param in enumerate(items):
        if not (hasattr(param, "grad") and hasattr(param, "data")):
            raise TypeError(f"{where}[{k}] is a {describe(param)}, not a parameter (`data` and `grad` attributes)")
        if param.grad is not None:
            # what an optimizer asks of an array it updates: a dtype netcl computes in
            # (an int or complex gradient was read as float64), a layout, writeable
            backend_for(param.grad, f"{where}[{k}].grad").check_param(param.grad, f"{where}[{k}].grad")
            grads.append(param.grad)
    kinds = {backend_for(g, "grad").name for g in grads}
    if len(kinds) > 1:
        raise TypeError(f"{where} mixes OpenCL gradients and array-API gradients; clip each kind on its own")
    if kinds == {OPENCL.name}:
        contexts = {g.base_data.context for g in grads if g.base_data is not None}
        dtypes = {np.dtype(g.dtype) for g in grads}
        if len(contexts) > 1 or len(dtypes) > 1:
            raise ValueError(f"{where}: OpenCL gradients of one context and one dtype are clipped together")
    return grads


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {describe(value)} {value!r}")
    return float(value)


@overload
def clip_grad_norm_(
    parameters: Parameter[cl_array.Array] | Iterable[Parameter[cl_array.Array]],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> cl_array.Array: ...
@overload
def clip_grad_norm_(
    parameters: ParameterLike | Iterable[ParameterLike],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Array: ...


def clip_grad_norm_(
    parameters: ParameterLike | Iterable[ParameterLike],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Array:
    """Scale the gradients, in place, so that their total norm is at most `max_norm`.

    torch's `torch.nn.utils.clip_grad_norm_`: the total norm of order `norm_type` of all
    gradients together (as if they were one vector), and every gradient multiplied by
    `min(max_norm / (total_norm + 1e-6), 1)`. A NaN or infinite norm makes that factor
    NaN or 0, as in torch, unless `error_if_nonfinite`.

    ```python
    import numpy as np

    from netcl import Parameter, clip_grad_norm_

    params = [Parameter(np.zeros(2, np.float32), np.array([3.0, 4.0], np.float32))]
    total = clip_grad_norm_(params, max_norm=1.0)  # 5.0; the gradient is now ~[0.6, 0.8]
    ```

    Args:
        parameters: A parameter, or an iterable of them; gradients that are None are
            left out. All gradients are OpenCL arrays (of one context and dtype), or all
            arrays of array-API libraries.
        max_norm: The largest total norm; `>= 0`.
        norm_type: The order of the norm: a real `>= 0`, or `inf` (the largest magnitude)
            or `-inf` (the smallest).
        error_if_nonfinite: Raise if the total norm is NaN or infinite, changing
            nothing (for OpenCL gradients this waits for the norm on the host).
        foreach: torch's choice of implementation; accepted and ignored.

    float16 and bfloat16 gradients are read exactly as float32, their norm is float32
    (torch's is in the gradients' dtype), and each scaled gradient is the float32 product
    rounded to nearest even.

    Returns:
        The total norm, before clipping, as a 0-d array where the gradients are: a
        `pyopencl.array.Array` for OpenCL gradients (read it with `.get()` or
        `float(...)`, which waits for it), else an array of the gradients' library.
        With no gradients, 0.0 as a 0-d numpy array.

    Raises:
        TypeError: `parameters` is not parameters, their gradients mix kinds of array,
            or a number has the wrong type.
        ValueError: `max_norm` is negative or not finite, `norm_type` is negative and
            finite or NaN, or OpenCL gradients span contexts or dtypes.
        RuntimeError: `error_if_nonfinite` and the total norm is NaN or infinite.
    """
    max_norm = _real("max_norm", max_norm)
    norm_type = _real("norm_type", norm_type)
    if not (math.isfinite(max_norm) and max_norm >= 0):
        raise ValueError(f"max_norm must be a finite real >= 0, got {max_norm!r}")
    if math.isnan(norm_type) or (math.isfinite(norm_type) and norm_type < 0):
        raise ValueError(f"norm_type must be a real >= 0, inf or -inf, got {norm_type!r}")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be a bool or None, got {describe(foreach)}")
    grads = _grads(parameters, "parameters")
    if not grads:
        zero: Array = np.asarray(0.0, np.float32)
        return zero
    if backend_for(grads[0], "grad").name == OPENCL.name:
        return _clip_opencl(grads, max_norm, norm_type, error_if_nonfinite)
    return _clip_array_api(grads, max_norm, norm_type, error_if_nonfinite)


def clip_grad_value_(
    parameters: ParameterLike | Iterable[ParameterLike], clip_value: float, foreach: bool | None = None
) -> None:
    """Clamp every gradient, in place, to `[-clip_value, clip_value]` (torch's
    `torch.nn.utils.clip_grad_value_`; a NaN stays NaN).

    Raises:
        TypeError: As `clip_grad_norm_`.
        ValueError: `clip_value` is negative or NaN.
    """
    value = _real("clip_value", clip_value)
    if not value >= 0:
        raise ValueError(f"clip_value must be >= 0, got {value!r}")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be a bool or None, got {describe(foreach)}")
    grads = _grads(parameters, "parameters")
    if grads and backend_for(grads[0], "grad").name == OPENCL.name:
        for run, size in _runs(grads):
            dtype = np.dtype(run[0].dtype)
            bound = compute_dtype(dtype).type(np.asarray(value, np.float64).astype(dtype))  # (the dtype's value)
            _launch(_clamp_kernel(run[0].base_data.context, dtype), run, size, [bound])
        return
    for grad in grads:
        xp: Any = array_api_compat.array_namespace(grad)
        with no_autograd(grad):
            clipped = xp.where(grad > value, xp.asarray(value, dtype=grad.dtype), grad)
            grad[...] = xp.where(clipped < -value, xp.asarray(-value, dtype=grad.dtype), clipped)


# --- the array-API path ------------------------------------------------------------------


def _clip_array_api(grads: list[Any], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Array:
    xp: Any = array_api_compat.array_namespace(*grads)  # with the linalg extension
    # (half gradients: in float32, their compute dtype, and rounded back)
    wide = [xp.astype(g, xp.float32) if is_half(ARRAY_API.dtype(g)) else g for g in grads]
    norms = [xp.linalg.vector_norm(xp.reshape(g, (-1,)), ord=norm_type) for g in wide]
    total = xp.linalg.vector_norm(xp.stack(norms), ord=norm_type)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(_NONFINITE.format(norm_type=norm_type))
    coef = max_norm / (total + _EPS)
    coef = xp.where(coef > 1.0, xp.asarray(1.0, dtype=coef.dtype), coef)  # a NaN stays NaN, as in torch
    for grad, w in zip(grads, wide, strict=True):
        with no_autograd(grad):
            grad[...] = xp.astype(w * xp.astype(coef, w.dtype), grad.dtype)
    result: Array = total
    return result


_NONFINITE = (
    "The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
    "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
    "`error_if_nonfinite=False`"
)


# --- the OpenCL path ---------------------------------------------------------------------


def _runs(grads: list[Any]) -> list[tuple[list[Any], int]]:
    """Runs of gradients that follow each other in one buffer, with their sizes."""
    return [
        (run, sum(int(np.prod(g.shape, dtype=np.int64)) for g in run))
        for run in buffer_runs(grads)
        if any(int(np.prod(g.shape, dtype=np.int64)) for g in run)
    ]


def _ctype(dtype: np.dtype[Any]) -> str:
    return "float" if dtype == np.float32 else "double"


def _accumulator(context: cl.Context, dtype: np.dtype[Any]) -> np.dtype[Any]:
    """float64 where every device of the context has it (a sum of squares of float32
    values then neither overflows nor loses digits), else the gradients' compute dtype."""
    if all(device.double_fp_config for device in context.devices):
        return np.dtype(np.float64)
    return compute_dtype(dtype)


# Half gradients are ushort in the kernels and converted with kernels/precision.cl (the
# norm sees their infinities and NaNs); the norm and the factor are in their compute
# dtype, float32, and the scaled or clamped gradient is rounded to nearest even.


@functools.cache
def _norm_kernel(context: cl.Context, dtype: np.dtype[Any], norm_type: float) -> ReductionKernel:
    """Over one run of gradients: the sum of |g|**p (p finite), or the largest or
    smallest |g| (p = inf, -inf), in the accumulator's type."""
    acc = _accumulator(context, dtype)
    a, t = _ctype(acc), storage_ctype(dtype)
    g = f"(({a})FROM_STORAGE(g[i]))"
    if norm_type == math.inf:
        neutral, reduce, mapped = "0", "fmax(a, b)", f"fabs({g})"
    elif norm_type == -math.inf:
        neutral, reduce, mapped = "INFINITY", "fmin(a, b)", f"fabs({g})"
    elif norm_type == 0:
        neutral, reduce, mapped = "0", "a + b", f"(({a})({g} != 0))"
    elif norm_type == 1:
        neutral, reduce, mapped = "0", "a + b", f"fabs({g})"
    elif norm_type == 2:
        neutral, reduce, mapped = "0", "a + b", f"({g} * {g})"
    else:
        neutral, reduce, mapped = "0", "a + b", f"pow(fabs({g}), ({a}){norm_type!r})"
    return ReductionKernel(
        context,
        acc,
        neutral=neutral,
        reduce_expr=reduce,
        map_expr=mapped,
        arguments=f"__global const {t} *g",
        preamble=storage_preamble(dtype),
    )


@functools.cache
def _total_kernel(context: cl.Context, dtype: np.dtype[Any], norm_type: float, parts: int) -> ElementwiseKernel:
    """One work-item: the runs' partial results joined into the total norm (in the
    gradients' dtype), and the clipping factor from it."""
    acc = _accumulator(context, dtype)
    a, t = _ctype(acc), _ctype(compute_dtype(dtype))
    first = "part[0]"
    if norm_type in (math.inf, -math.inf):
        join, finish = ("fmax" if norm_type > 0 else "fmin"), "s"
    elif norm_type == 0:  # torch's: the gradients whose own count of nonzeros is nonzero
        join, finish, first = "", "s", f"({a})(part[0] != 0)"
    elif norm_type == 1:
        join, finish = "", "s"
    elif norm_type == 2:
        join, finish = "", "sqrt(s)"
    else:
        join, finish = "", f"pow(s, ({a})1 / ({a}){norm_type!r})"
    if join:
        step = f"s = {join}(s, part[k]);"
    else:
        step = f"s = s + ({a})(part[k] != 0);" if norm_type == 0 else "s = s + part[k];"
    return ElementwiseKernel(
        context,
        f"__global const {a} *part, __global {t} *total, __global {t} *coef, {t} max_norm",
        f"""
        {a} s = {first};
        for (int k = 1; k < {parts}; ++k) {{ {step} }}
        {t} norm = ({t})({finish});
        {t} c = max_norm / (norm + ({t}){_EPS!r});
        total[0] = norm;
        coef[0] = (c > 1) ? ({t})1 : c;  /* a NaN stays NaN, as torch's clamp leaves it */
        """,
        "clip_total",
    )


@functools.cache
def _scale_kernel(context: cl.Context, dtype: np.dtype[Any]) -> ElementwiseKernel:
    t, c = storage_ctype(dtype), _ctype(compute_dtype(dtype))
    return ElementwiseKernel(
        context,
        f"__global {t} *g, __global const {c} *coef",
        "g[i] = TO_STORAGE(FROM_STORAGE(g[i]) * coef[0], 0)",
        "clip_scale",
        preamble=storage_preamble(dtype),
    )


@functools.cache
def _clamp_kernel(context: cl.Context, dtype: np.dtype[Any]) -> ElementwiseKernel:
    t, c = storage_ctype(dtype), _ctype(compute_dtype(dtype))
    return ElementwiseKernel(
        context,
        f"__global {t} *g, {c} v",
        # (comparisons with NaN are false: NaN stays; v is a value of the gradients' dtype)
        f"{c} x = FROM_STORAGE(g[i]); g[i] = TO_STORAGE(x > v ? v : (x < -v ? -v : x), 0)",
        "clip_value",
        preamble=storage_preamble(dtype),
    )


def _as_array(run: list[Any], size: int) -> cl_array.Array:
    """A run of gradients as one flat pyopencl array over their buffer (no copy; half
    ones as the ushort the kernels take)."""
    first = run[0]
    dtype = np.dtype(np.uint16) if is_half(np.dtype(first.dtype)) else first.dtype
    return cl_array.Array(first.queue, (size,), dtype, data=first.base_data, offset=int(first.offset))


def _launch(kernel: ElementwiseKernel, run: list[Any], size: int, extra: list[Any]) -> None:
    flat = _as_array(run, size)
    flat.events = [event for g in run for event in pending_events(g)]
    event = kernel(flat, *extra, wait_for=flat.events or None)
    for grad in run:
        record_event(grad, event)


def _clip_opencl(grads: list[Any], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> cl_array.Array:
    # the order-0 "norm" of torch counts gradients, not values: one reduction per gradient
    runs = _runs(grads) if norm_type != 0 else [(run, size) for grad in grads for run, size in _runs([grad])]
    dtype = np.dtype(grads[0].dtype)
    compute = compute_dtype(dtype)
    queue = grads[0].queue
    if not runs:  # every gradient is empty
        return cl_array.zeros(queue, (), compute)
    context = queue.context
    parts = cl_array.empty(queue, len(runs), _accumulator(context, dtype))
    norm = _norm_kernel(context, dtype, norm_type)
    for k, (run, size) in enumerate(runs):
        flat = _as_array(run, size)
        waits = [event for g in run for event in pending_events(g)]
        norm(flat, out=parts[k], wait_for=waits or None, return_event=False)
    total = cl_array.empty(queue, (), compute)
    coef = cl_array.empty(queue, (), compute)
    _total_kernel(context, dtype, norm_type, len(runs))(
        parts, total, coef, compute.type(max_norm), range=slice(1), queue=queue
    )
    if error_if_nonfinite and not np.isfinite(total.get()):
        raise RuntimeError(_NONFINITE.format(norm_type=norm_type))
    for run, size in runs:
        _launch(_scale_kernel(context, dtype), run, size, [coef])
    return total
