"""RMSProp's options from the other frameworks: each against its formula in float64, and
the fused kernel and the array-API path bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

from netcl import Parameter
from netcl.optim import RMSProp

F = np.ndarray[Any, Any]
SHAPE = (7, 5)
STEPS = 30

# Each option on its own, with momentum and centering where they matter, and together.
OPTIONS: list[dict[str, Any]] = [
    {"eps_in_sqrt": True},
    {"eps_in_sqrt": True, "centered": True},
    {"initial_scale": 1.0},
    {"initial_scale": 0.1, "momentum": 0.9},
    {"bias_correction": True},
    {"bias_correction": True, "centered": True, "eps_in_sqrt": True},
    {"nesterov": True, "momentum": 0.9},
    {"decoupled_weight_decay": True, "weight_decay": 0.1},
    {
        "eps_in_sqrt": True,
        "initial_scale": 1.0,
        "bias_correction": True,
        "nesterov": True,
        "momentum": 0.8,
        "decoupled_weight_decay": True,
        "weight_decay": 0.05,
        "centered": True,
    },
]
IDS = [",".join(f"{k}={v}" for k, v in o.items()) for o in OPTIONS]
# eps is large enough that centering with bias correction stays well conditioned: at the
# first step the corrected variance is g^2 - g^2, zero up to an ulp of g^2, and it is
# eps that keeps that ulp from moving the update by more than ulp(g^2) / (2 * eps).
BASE: dict[str, Any] = {"lr": 0.01, "alpha": 0.9, "eps": 1e-3}


def formula(p: F, grads: list[F], options: dict[str, Any]) -> F:
    """The update as optax, TF and Keras write it (scale_by_rms / scale_by_stddev, trace,
    add_decayed_weights), in float64, step by step."""
    h = {"weight_decay": 0.0, "momentum": 0.0, "centered": False, **BASE, **options}
    lr, alpha, eps, wd, mu = h["lr"], h["alpha"], h["eps"], h["weight_decay"], h["momentum"]
    p = p.astype(np.float64)
    v = np.full_like(p, h.get("initial_scale", 0.0))
    m = np.zeros_like(p)
    b = np.zeros_like(p)
    for t, grad in enumerate(grads, start=1):
        g = grad.astype(np.float64)
        if h.get("decoupled_weight_decay"):
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        v = alpha * v + (1 - alpha) * g * g
        m = alpha * m + (1 - alpha) * g
        correction = 1 - alpha**t if h.get("bias_correction") else 1.0
        second = v / correction
        if h["centered"]:
            second = second - (m / correction) ** 2
        u = g / np.sqrt(second + eps) if h.get("eps_in_sqrt") else g / (np.sqrt(second) + eps)
        if mu > 0:
            b = mu * b + u
            u = u + mu * b if h.get("nesterov") else b
        p = p - lr * u
    return p


def _grads(dtype: type) -> list[F]:
    rng = np.random.default_rng(3)
    return [rng.standard_normal(SHAPE).astype(dtype) for _ in range(STEPS)]


def _run(make: Any, get: Any, start: F, grads: list[F], options: dict[str, Any]) -> F:
    param = Parameter(make(start))
    optimizer = RMSProp([param], **BASE, **options)
    for g in grads:
        param.grad = make(g)
        optimizer.step()
    result: F = get(param.data)
    return result


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_each_option_is_its_frameworks_formula_in_float64(queue: cl.CommandQueue, options: dict[str, Any]) -> None:
    """float64 against float64: the same formula in another order of operations, 30 steps:
    a few ulp apart (1e-12 relative is some thousands of ulp of slack, none of a
    wrong formula: a wrong one is off by more than 1e-4 here)."""
    start = np.random.default_rng(0).standard_normal(SHAPE)
    grads = _grads(np.float64)
    expected = formula(start, grads, options)
    for make, get in (
        (lambda x: np.array(x, copy=True), np.asarray),  # the array-API path
        (lambda x: cl_array.to_device(queue, x), lambda a: a.get()),  # the fused kernel
    ):
        np.testing.assert_allclose(_run(make, get, start, grads, options), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_the_kernel_and_the_array_api_paths_agree_bit_for_bit(queue: cl.CommandQueue, options: dict[str, Any]) -> None:
    start = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    grads = _grads(np.float32)
    kernel = _run(lambda x: cl_array.to_device(queue, x), lambda a: a.get(), start, grads, options)
    host = _run(lambda x: np.array(x, copy=True), np.asarray, start, grads, options)
    tensor = _run(torch.tensor, lambda t: t.numpy(), start, grads, options)
    assert kernel.tobytes() == host.tobytes() == tensor.tobytes()


def test_bias_correction_follows_each_parameters_own_count(queue: cl.CommandQueue) -> None:
    """Two parameters in one launch, one of which skips steps: each is corrected by its
    own step count, on both paths alike."""
    rng = np.random.default_rng(5)
    results = []
    for make, get in ((lambda x: cl_array.to_device(queue, x), lambda a: a.get()), (np.array, np.asarray)):
        params = [Parameter(make(np.ones(SHAPE, np.float32))) for _ in range(2)]
        optimizer = RMSProp(params, lr=0.01, bias_correction=True)
        grads = np.random.default_rng(5).standard_normal((10, 2, *SHAPE)).astype(np.float32)
        for k in range(10):
            params[0].grad = make(grads[k, 0])
            params[1].grad = make(grads[k, 1]) if k % 3 else None
            optimizer.step()
        results.append([get(p.data) for p in params])
        assert [optimizer.state[p]["step"] for p in params] == [10, 6]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(*results, strict=True))
    del rng


def test_options_round_trip_and_a_torch_state_dict_leaves_them_off() -> None:
    param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    optimizer = RMSProp([param], eps_in_sqrt=True, initial_scale=1.0, momentum=0.9, nesterov=True)
    optimizer.step()
    saved = optimizer.state_dict()
    fresh = RMSProp([Parameter(np.ones(3, np.float32))])
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["nesterov"] is True and fresh.param_groups[0]["initial_scale"] == 1.0
    twin = torch.ones(3, requires_grad=True)
    twin.grad = torch.ones(3)
    torch_optimizer = torch.optim.RMSprop([twin])
    torch_optimizer.step()
    fresh.load_state_dict(torch_optimizer.state_dict())  # no netcl option in it: each off
    group = fresh.param_groups[0]
    assert (group["eps_in_sqrt"], group["initial_scale"], group["nesterov"]) == (False, 0.0, False)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"nesterov": True}, ValueError, "nesterov=True needs momentum > 0"),
        ({"initial_scale": -1.0}, ValueError, "initial_scale"),
        ({"initial_scale": float("inf")}, ValueError, "initial_scale"),
        ({"eps_in_sqrt": 1}, TypeError, "eps_in_sqrt"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        RMSProp([Parameter(np.ones(3, np.float32))], **options)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_finite_gradients_never_make_a_value_non_finite(
    queue: cl.CommandQueue, options: dict[str, Any], dtype: Any, long_run: bool
) -> None:
    """The extreme-value policy holds with every option (as tests/test_fuzz.py checks
    torch's variants): gradients up to the dtype's largest value, lr 10, weight decay 1e3,
    on the fused kernel (pyopencl) and the array-API path (numpy) alike."""
    from tests.test_fuzz import _extreme

    big = dict(options, weight_decay=1e3) if options.get("weight_decay") else options
    steps = 20_000 if long_run else 200
    paths: list[tuple[Any, Any]] = [
        (lambda x: x, np.asarray),
        (lambda x: cl_array.to_device(queue, x), lambda a: a.get()),
    ]
    for make, get in paths:
        rng = np.random.default_rng(14)
        param: Parameter[Any] = Parameter(make(_extreme(rng, 64, dtype)))
        opt = RMSProp([param], lr=10.0, nonfinite="count", **big)
        for k in range(steps):
            param.grad = make(_extreme(rng, 64, dtype))
            opt.step()
            if k % 50 == 0 or k == steps - 1:
                values = [get(param.data)] + [get(v) for n, v in opt.state[param].items() if n != "step"]
                assert all(np.isfinite(v).all() for v in values), f"a non-finite value at step {k + 1}"
        assert opt.skipped_nonfinite() == 0


def test_to_torch_refuses_what_torchs_rmsprop_lacks() -> None:
    from netcl.optim import checkpoint

    param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    plain = RMSProp([param])
    plain.step()
    assert "eps_in_sqrt" not in checkpoint.to_torch(plain.state_dict())["param_groups"][0]
    optax_like = RMSProp([Parameter(np.ones(3, np.float32), np.ones(3, np.float32))], eps_in_sqrt=True)
    optax_like.step()
    with pytest.raises(ValueError, match="eps_in_sqrt=True, which torch's RMSprop does not have"):
        checkpoint.to_torch(optax_like.state_dict())
