"""Gradient clipping against torch.nn.utils.clip_grad_norm_ / clip_grad_value_."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_strict
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

from netcl import Parameter, clip_grad_norm_, clip_grad_value_, flat_parameters

SHAPES = [(5, 3), (7,), (130,), (2, 2)]
NORMS = [2.0, 1.0, math.inf, -math.inf, 0.0, 0.5, 3.0]
# torch sums each gradient's |g|**p in float32, then the norms; the OpenCL path sums each
# run of gradients in float64. Both are within n * eps (n <= 130 terms, eps = 2**-23) of
# the exact sum, so they agree to 2 * 130 * eps relative, and so do the scaled gradients.
RTOL = 2 * 130 * float(np.finfo(np.float32).eps)

F = np.ndarray[Any, Any]


def _values(seed: int = 0) -> list[F]:
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    values[3][...] = 0  # a gradient of zeros: counts for nothing in the order-0 norm
    return values


def _make(kind: str, queue: cl.CommandQueue, grads: list[F]) -> list[Any]:
    if kind == "pyopencl":
        return [Parameter(cl_array.zeros(queue, g.shape, np.float32), cl_array.to_device(queue, g)) for g in grads]
    if kind == "flat-pyopencl":  # one run: one reduction
        params = flat_parameters(queue, SHAPES)
        for p, g in zip(params, grads, strict=True):
            assert p.grad is not None
            p.grad.set(g)
        return list(params)
    lib: dict[str, Callable[[F], Any]] = {
        "numpy": lambda g: g.copy(),
        "torch": lambda g: torch.tensor(g),
        "array_api_strict": lambda g: array_api_strict.asarray(g.copy()),
    }
    return [Parameter(lib[kind](np.zeros_like(g)), lib[kind](g)) for g in grads]


def _get(x: Any) -> F:
    if isinstance(x, cl_array.Array):
        return x.get()
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return np.asarray(x)


def _torch(grads: list[F], call: Callable[[list[torch.Tensor]], Any]) -> tuple[Any, list[F]]:
    tensors = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads, strict=True):
        t.grad = torch.tensor(g)
    result = call(tensors)
    return result, [t.grad.numpy() for t in tensors if t.grad is not None]


KINDS = ["pyopencl", "flat-pyopencl", "numpy", "torch", "array_api_strict"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_grad_norm_matches_torch(queue: cl.CommandQueue, kind: str, norm_type: float, max_norm: float) -> None:
    grads = _values()
    expected_total, expected = _torch(grads, lambda ts: torch.nn.utils.clip_grad_norm_(ts, max_norm, norm_type))
    params = _make(kind, queue, grads)
    total = clip_grad_norm_(params, max_norm, norm_type)
    np.testing.assert_allclose(_get(total), expected_total.numpy(), rtol=RTOL)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(_get(p.grad), e, rtol=RTOL, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_nonfinite_norm_is_torchs_or_an_error_that_changes_nothing(queue: cl.CommandQueue, kind: str) -> None:
    grads = _values()
    grads[2][5] = np.nan
    _, expected = _torch(grads, lambda ts: torch.nn.utils.clip_grad_norm_(ts, 1.0))
    params = _make(kind, queue, grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, g in zip(params, grads, strict=True):
        np.testing.assert_array_equal(_get(p.grad), g)  # unchanged
    total = clip_grad_norm_(params, 1.0)
    assert np.isnan(_get(total))
    for p, e in zip(params, expected, strict=True):  # NaN everywhere, as torch leaves them
        np.testing.assert_array_equal(_get(p.grad), e)


def test_the_opencl_norm_and_scaling_do_not_wait_on_the_host(queue: cl.CommandQueue) -> None:
    """The gradients wait for an event that only the host can complete; if
    clip_grad_norm_ waited on the host for anything, this call would never return."""
    grads = _values()
    params: list[Parameter[cl_array.Array]] = _make("flat-pyopencl", queue, grads)
    gate = cl.UserEvent(queue.context)
    for p in params:
        assert p.grad is not None
        p.grad.events = [gate]
    total = clip_grad_norm_(params, 0.5)
    expected_total, expected = _torch(grads, lambda ts: torch.nn.utils.clip_grad_norm_(ts, 0.5))
    gate.set_status(cl.command_execution_status.COMPLETE)
    np.testing.assert_allclose(total.get(), expected_total.numpy(), rtol=RTOL)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(_get(p.grad), e, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_clip_grad_value_matches_torch(queue: cl.CommandQueue, kind: str) -> None:
    grads = _values()
    grads[1][2] = np.nan
    _, expected = _torch(grads, lambda ts: torch.nn.utils.clip_grad_value_(ts, 0.7))
    params = _make(kind, queue, grads)
    clip_grad_value_(params, 0.7)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_array_equal(_get(p.grad), e)


def test_no_gradients_give_a_norm_of_zero() -> None:
    params = [Parameter(np.ones(3, np.float32))]
    assert float(np.asarray(clip_grad_norm_(params, 1.0))) == 0.0
    clip_grad_value_(params, 1.0)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda p: clip_grad_norm_(p, -1.0), ValueError, "max_norm must be a finite real >= 0, got -1.0"),
        (lambda p: clip_grad_norm_(p, math.nan), ValueError, "max_norm"),
        (lambda p: clip_grad_norm_(p, 1.0, -2.0), ValueError, "norm_type must be a real >= 0, inf or -inf"),
        (lambda p: clip_grad_norm_(p, "1"), TypeError, "max_norm must be a real number"),  # type: ignore[call-overload]
        (lambda p: clip_grad_norm_(p, 1.0, foreach="no"), TypeError, "foreach"),  # type: ignore[call-overload]
        (lambda p: clip_grad_value_(p, -0.5), ValueError, "clip_value must be >= 0"),
        (lambda p: clip_grad_norm_([*p, np.ones(2)], 1.0), TypeError, r"parameters\[2\] is a numpy.ndarray"),  # type: ignore[list-item]
        (lambda p: clip_grad_norm_(3, 1.0), TypeError, "an iterable of parameters"),  # type: ignore[call-overload]
    ],
)
def test_bad_arguments_are_refused_and_change_nothing(call: Callable[[Any], object], error: type, words: str) -> None:
    params = [Parameter(np.ones(3, np.float32), np.full(3, 5.0, np.float32)) for _ in range(2)]
    with pytest.raises(error, match=words):
        call(params)
    assert all(np.array_equal(_get(p.grad), np.full(3, 5.0, np.float32)) for p in params)


def test_mixed_kinds_are_refused(queue: cl.CommandQueue) -> None:
    params: list[Parameter[Any]] = [
        Parameter(np.ones(3, np.float32), np.ones(3, np.float32)),
        Parameter(cl_array.zeros(queue, 3, np.float32), cl_array.zeros(queue, 3, np.float32)),
    ]
    with pytest.raises(TypeError, match="mixes OpenCL gradients and array-API gradients"):
        clip_grad_norm_(params, 1.0)


def test_gradients_of_a_dtype_netcl_does_not_compute_in_are_refused(queue: cl.CommandQueue) -> None:
    # (an int32 OpenCL gradient was read as float64: a silently wrong norm)
    for grad in (cl_array.to_device(queue, np.arange(4, dtype=np.int32)), np.arange(4, dtype=np.int64)):
        param = Parameter(np.zeros(4, np.float32), grad)
        before = grad.get() if isinstance(grad, cl_array.Array) else grad.copy()
        with pytest.raises(TypeError, match=r"parameters\[0\]\.grad has dtype int"):
            clip_grad_norm_([param], 1.0)
        with pytest.raises(TypeError, match=r"parameters\[0\]\.grad has dtype int"):
            clip_grad_value_([param], 1.0)
        after = grad.get() if isinstance(grad, cl_array.Array) else grad
        np.testing.assert_array_equal(after, before)
