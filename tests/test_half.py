"""float16 and bfloat16 parameters: float32 state, the float32 update, the result rounded.

The oracle is netcl's own float32 step, which the conformance suites hold to torch and
to a wider-precision reference: a half step must equal, bit for bit, the float32 step of
the upcast parameter with the same state, rounded to nearest even (after saturating at
the half dtype's largest finite value). Rounding itself is checked against numpy's
float16 and ml_dtypes' bfloat16 conversions, which round to nearest even.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import ml_dtypes
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

import netcl._backends.host as host_backend
from netcl import Parameter, flat_parameters
from netcl._precision import random_bits, round_half, stochastic_key
from netcl.optim import SGD, Adam, AdamW, RMSProp, checkpoint
from netcl.optim.optimizer import Optimizer
from tests.kinds import HALF_KIND_IDS, HALF_KINDS, Kind

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = [F16, BF16]
HALF_IDS = ["float16", "bfloat16"]

VARIANTS: list[tuple[type[Optimizer[Any, Any, Any, Any]], dict[str, Any]]] = [
    (SGD, {"lr": 0.05}),
    (SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (Adam, {"lr": 0.01}),
    (Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01, "maximize": True}),
    (AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (RMSProp, {"lr": 0.01}),
    (RMSProp, {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
]
VARIANT_IDS = [f"{cls.__name__}-{'-'.join(k for k in flags if k != 'lr') or 'plain'}" for cls, flags in VARIANTS]


def _bits(x: np.ndarray[Any, Any]) -> bytes:
    return np.ascontiguousarray(x).tobytes()


def _state_bits(opt: Optimizer[Any, Any, Any, Any], param: Any, get: Callable[[Any], Any]) -> dict[str, bytes]:
    return {k: _bits(get(v)) for k, v in opt.state[param].items() if k != "step"}


def _host(x: Any) -> np.ndarray[Any, Any]:
    if isinstance(x, cl_array.Array):
        return x.get()
    if isinstance(x, torch.Tensor):
        return x.detach().numpy().copy()
    return np.array(x, copy=True)


@pytest.mark.parametrize("kind", HALF_KINDS, ids=HALF_KIND_IDS)
@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize(("cls", "flags"), VARIANTS, ids=VARIANT_IDS)
def test_a_half_step_is_the_rounded_float32_step(
    cls: type[Optimizer[Any, Any, Any, Any]],
    flags: dict[str, Any],
    dtype: np.dtype[Any],
    kind: Kind,
    queue: cl.CommandQueue,
) -> None:
    rng = np.random.default_rng(11)
    shape = (37, 29)
    start = rng.standard_normal(shape).astype(dtype)
    param = Parameter(kind.make(queue, start))
    opt = cls([param], **flags)
    # the float32 twin: the same optimizer on the upcast parameter, rounded after each step
    twin = Parameter(start.astype(F32))
    twin_opt = cls([twin], **flags)
    for _ in range(8):
        grad = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1)).astype(dtype)
        param.grad = kind.make(queue, grad)
        twin.grad = grad.astype(F32)
        opt.step()
        twin_opt.step()
        expected = round_half(twin.data, dtype)
        assert _bits(kind.get(param.data)) == _bits(expected)
        twin.data[...] = expected.astype(F32)  # the next step starts from the rounded parameter
        state = opt.state[param]
        for name, value in twin_opt.state[twin].items():
            if name == "step":
                assert state["step"] == value
                continue
            got = kind.get(state[name])
            assert got.dtype == F32, name
            assert _bits(got) == _bits(value), name


def test_rounding_is_to_nearest_even_and_saturates() -> None:
    # every float16 and bfloat16 halfway case and its neighbours, and values beyond range
    for dtype in HALVES:
        grid = np.arange(0, 1 << 16, dtype=np.uint16).view(dtype).astype(F32)
        grid = grid[np.isfinite(grid)]
        grid.sort()
        middles = (grid[:-1].astype(np.float64) + grid[1:]) / 2
        values = np.concatenate([grid, middles.astype(F32), np.nextafter(middles.astype(F32), F32(np.inf))])
        np.testing.assert_array_equal(_bits(round_half(values, dtype)), _bits(values.astype(dtype)))
        largest = float(np.array(0x7BFF if dtype == F16 else 0x7F7F, np.uint16).view(dtype).astype(F32))
        above = min(largest * 1.01, float(np.finfo(F32).max))
        beyond = np.array([above, -above, np.finfo(F32).max, np.inf, -np.inf], F32)
        assert (np.abs(round_half(beyond, dtype).astype(F32)) == largest).all()


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
def test_the_kernel_rounds_as_numpy_at_every_halfway_case(dtype: np.dtype[Any], queue: cl.CommandQueue) -> None:
    # SGD with lr=1 and a zero parameter writes -grad... of a float32 value: use a float32
    # master copy holding the values and a zero gradient, so the kernel stores them rounded
    grid = np.arange(0, 1 << 16, dtype=np.uint16).view(dtype).astype(F32)
    grid = np.sort(grid[np.isfinite(grid)])
    middles = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(F32)
    values = np.concatenate([middles, np.nextafter(middles, F32(np.inf)), np.nextafter(middles, F32(-np.inf))])
    values = np.concatenate([values, np.array([1e38, -1e38, 70000.0, -70000.0, 65519.0, 65520.0], F32)])
    param = Parameter(cl_array.zeros(queue, values.shape, dtype), cl_array.zeros(queue, values.shape, dtype))
    opt = SGD([param], lr=1.0, master_weights=True)
    opt.step()
    master: Any = opt.state[param]["master_param"]
    master.set(values)
    opt.step()  # a zero gradient: the master copy stays, the parameter is its rounding
    np.testing.assert_array_equal(master.get(), values)
    assert _bits(param.data.get()) == _bits(round_half(values, dtype))


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("kind", HALF_KINDS, ids=HALF_KIND_IDS)
def test_master_weights_follow_the_float32_run(kind: Kind, dtype: np.dtype[Any], queue: cl.CommandQueue) -> None:
    rng = np.random.default_rng(5)
    start = rng.standard_normal(500).astype(dtype)
    param = Parameter(kind.make(queue, start))
    opt = Adam([param], lr=1e-3, master_weights=True)
    twin = Parameter(start.astype(F32))
    twin_opt = Adam([twin], lr=1e-3)
    for _ in range(10):
        grad = rng.standard_normal(500).astype(dtype)
        param.grad = kind.make(queue, grad)
        twin.grad = grad.astype(F32)
        opt.step()
        twin_opt.step()
        assert _bits(kind.get(opt.state[param]["master_param"])) == _bits(twin.data)
        assert _bits(kind.get(param.data)) == _bits(twin.data.astype(dtype))


def _sgd_on_ones(dtype: np.dtype[Any], kind: Kind, queue: cl.CommandQueue, **options: Any) -> np.ndarray[Any, Any]:
    n = 4096
    param = Parameter(kind.make(queue, np.ones(n, dtype)), kind.make(queue, np.ones(n, dtype)))
    opt = SGD([param], lr=1e-4, **options)
    for _ in range(1000):
        opt.step()
    return kind.get(param.data).astype(F32)


@pytest.mark.parametrize("kind", [HALF_KINDS[0], HALF_KINDS[3]], ids=["pyopencl", "numpy"])
def test_1000_small_sgd_steps_on_bfloat16_ones(kind: Kind, queue: cl.CommandQueue) -> None:
    # 1 - 1000 * 1e-4 = 0.9; bfloat16's spacing below 1 is 2**-8, 39 times the step
    plain = _sgd_on_ones(BF16, kind, queue)
    assert (plain == 1.0).all()  # every update is lost to rounding (documented)
    master = _sgd_on_ones(BF16, kind, queue, master_weights=True)
    # the float32 copy reaches 0.9 (to float32's rounding of 1000 steps); the parameter is
    # its bfloat16 rounding, 0.8984375 or 0.90234375
    assert (np.abs(master - 0.9) <= 2**-8).all()
    stochastic = _sgd_on_ones(BF16, kind, queue, stochastic_rounding=True)
    # each element is a random walk on bfloat16's grid whose mean step is the update:
    # the mean of 4096 elements is 0.9 within a few standard errors (one element's
    # standard deviation is below 2**-8 * sqrt(1000 * 0.03) ~ 0.02)
    assert abs(float(stochastic.mean()) - 0.9) < 5 * 0.02 / np.sqrt(4096)
    assert len(np.unique(stochastic)) > 1


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
def test_stochastic_rounding_is_unbiased_at_every_scale(dtype: np.dtype[Any], queue: cl.CommandQueue) -> None:
    # values between neighbours of the half grid, float16's subnormals and below them
    # included; each is rounded 20,000 times (as 20,000 elements of one parameter)
    n = 20_000
    for value in [1.0 + 2**-12, 3.3, -1234.567, 1e-5, 7e-8, -2.5e-8, 1e-30]:
        if dtype == F16 and abs(value) > 60000:
            continue
        key = 12345.0
        rounded = round_half(np.full(n, value, F32), dtype, key).astype(np.float64)
        candidates = sorted(set(np.unique(rounded)))
        assert 1 <= len(candidates) <= 2
        # the two neighbours on the half grid (one of them only, where the other's
        # chance is below 1 in 20,000)
        spacing = candidates[-1] - candidates[0] if len(candidates) == 2 else 2.0**-24
        # the mean is the value, within 5 standard errors of a two-point distribution
        assert abs(rounded.mean() - np.float64(F32(value))) <= 5 * spacing / 2 / np.sqrt(n)
        # the kernel draws the same bits
        param = Parameter(cl_array.zeros(queue, n, dtype), cl_array.zeros(queue, n, dtype))
        opt = SGD([param], lr=1.0, master_weights=True, stochastic_rounding=True)
        opt.step()
        master: Any = opt.state[param]["master_param"]
        master.fill(F32(value))
        opt.step()
        expected = round_half(np.full(n, value, F32), dtype, stochastic_key(0, 2))
        assert _bits(param.data.get()) == _bits(expected)


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
def test_stochastic_rounding_of_mixed_scales_draws_the_same_bits_in_the_kernel(
    dtype: np.dtype[Any], queue: cl.CommandQueue
) -> None:
    # neighbouring values of every scale (a CPU's kernel rounds 8 neighbours at once,
    # with a shorter way where all 8 are float16 normals): the bits numpy's rounding gives
    scales = np.array([1.0 + 2**-12, 7e-8, -3e-6, 2.5e-8, 1234.567, -1e-30, 6.1e-5, -0.3], F32)
    n = 8 * 1000 + 5
    values = np.resize(scales, n) * np.linspace(1.0, 1.5, n, dtype=F32)
    normal = (np.arange(n) // 8) % 3 == 0  # (runs of 8 all normal, and runs that are not)
    values[normal] = np.linspace(-2.0, 2.0, n, dtype=F32)[normal] + F32(2**-12)
    param = Parameter(cl_array.zeros(queue, n, dtype), cl_array.zeros(queue, n, dtype))
    opt = SGD([param], lr=1.0, master_weights=True, stochastic_rounding=True)
    opt.step()
    master: Any = opt.state[param]["master_param"]
    master.set(values)
    opt.step()
    expected = round_half(values, dtype, stochastic_key(0, 2))
    assert _bits(param.data.get()) == _bits(expected)


def test_random_bits_are_uniform_and_differ_by_key() -> None:
    a, b = random_bits(1.0, 1 << 16), random_bits(2.0, 1 << 16)
    assert (a != b).mean() > 0.99
    # each of the 16 low bits (the ones bfloat16's rounding uses) is 1 half the time
    for bit in range(16):
        share = ((a >> np.uint32(bit)) & np.uint32(1)).mean()
        assert abs(share - 0.5) < 5 * 0.5 / np.sqrt(a.size)


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("kind", HALF_KINDS, ids=HALF_KIND_IDS)
def test_stochastic_runs_are_the_same_on_every_path_and_resume_bit_for_bit(
    kind: Kind, dtype: np.dtype[Any], queue: cl.CommandQueue, tmp_path: Any
) -> None:
    rng = np.random.default_rng(3)
    start = rng.standard_normal((3, 300)).astype(dtype)
    grads = [(rng.standard_normal((3, 300)) * 1e-2).astype(dtype) for _ in range(12)]

    def run(make: Callable[[Any], Any], get: Callable[[Any], Any], resume_at: int | None) -> list[bytes]:
        params = [Parameter(make(row.copy())) for row in start]
        opt = Adam(params, lr=1e-3, stochastic_rounding=True)
        out = []
        for k, grad in enumerate(grads):
            if k == resume_at:
                path = tmp_path / f"resume-{kind.name}.npz"
                checkpoint.save(opt.state_dict(), path)
                kept = [get(p.data) for p in params]
                params = [Parameter(make(row)) for row in kept]
                opt = Adam(params, lr=1e-3, stochastic_rounding=True)
                opt.load_state_dict(checkpoint.load(path))
            for p, row in zip(params, grad, strict=True):
                p.grad = make(row.copy())
            opt.step()
            out += [_bits(get(p.data)) for p in params]
        return out

    reference = run(np.array, np.array, None)
    assert run(lambda h: kind.make(queue, h), kind.get, None) == reference
    assert run(lambda h: kind.make(queue, h), kind.get, 5) == reference


@pytest.mark.parametrize("path", ["kernel", "array-api"])
@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
def test_host_paths_agree_with_the_device(
    path: str, dtype: np.dtype[Any], queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(9)
    start = rng.standard_normal(5000).astype(dtype)
    grads = [rng.standard_normal(5000).astype(dtype) for _ in range(5)]
    results = []
    for where in ("device", "host"):
        monkeypatch.setattr(host_backend, "PATH", path)
        param: Parameter[Any] = Parameter(cl_array.to_device(queue, start) if where == "device" else start.copy())
        opt = RMSProp([param], lr=1e-2, momentum=0.9, stochastic_rounding=True, master_weights=True)
        for grad in grads:
            param.grad = cl_array.to_device(queue, grad) if where == "device" else grad.copy()
            opt.step()
        results.append((_bits(_host(param.data)), _state_bits(opt, param, _host)))
    assert results[0] == results[1]


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
def test_flat_half_parameters_step_as_one_run_with_the_same_bits(dtype: np.dtype[Any], queue: cl.CommandQueue) -> None:
    shapes = [(64, 10), (10,), (300,), (7, 7)]
    rng = np.random.default_rng(2)
    flat = flat_parameters(queue, shapes, dtype)
    apart = [Parameter(cl_array.zeros(queue, s, dtype), cl_array.zeros(queue, s, dtype)) for s in shapes]
    for a, b in zip(flat, apart, strict=True):
        start = rng.standard_normal(a.data.shape).astype(dtype)
        a.data.set(start)
        b.data.set(start)
    opts = [AdamW(flat, lr=1e-2, master_weights=True), AdamW(apart, lr=1e-2, master_weights=True)]
    for _ in range(4):
        for a, b in zip(flat, apart, strict=True):
            grad = rng.standard_normal(a.data.shape).astype(dtype)
            cast(cl_array.Array, a.grad).set(grad)
            cast(cl_array.Array, b.grad).set(grad)
        for opt in opts:
            opt.step()
    for a, b in zip(flat, apart, strict=True):
        assert _bits(a.data.get()) == _bits(b.data.get())
        assert _state_bits(opts[0], a, _host) == _state_bits(opts[1], b, _host)
    # one launch for the flat run: every state buffer is a view of one buffer per name
    buffers = [cast(cl_array.Array, opts[0].state[p]["exp_avg"]) for p in flat]
    assert all(b.base_data is buffers[0].base_data for b in buffers)


@pytest.mark.parametrize("kind", HALF_KINDS, ids=HALF_KIND_IDS)
def test_float16_overflow_saturates_and_nonfinite_gradients_are_skipped(kind: Kind, queue: cl.CommandQueue) -> None:
    largest = float(np.finfo(np.float16).max)
    # (5 times over: 20 values, which a CPU's kernel takes 8 or 16 at a time, then one by one)
    start = np.tile(np.array([60000.0, -60000.0, 1.0, 2.0], np.float16), 5)
    param = Parameter(kind.make(queue, start))
    opt = SGD([param], lr=10.0)
    param.grad = kind.make(queue, np.tile(np.array([-largest, largest, np.inf, np.nan], np.float16), 5))
    opt.step()
    got = kind.get(param.data).astype(F32)
    # 60000 + 10 * 65504 is far beyond float16: the largest finite value, never inf;
    # the elements with an inf or NaN gradient are left as they were
    np.testing.assert_array_equal(got, np.tile([largest, -largest, 1.0, 2.0], 5))


@pytest.mark.parametrize("eps", [1e-8, 1e-12, 1e-30])
def test_eps_below_float16s_smallest_normal_gives_finite_steps(eps: float, queue: cl.CommandQueue) -> None:
    # eps is used in float32, the update's dtype: a value that is zero or subnormal in
    # float16 (smallest normal 6.1e-5) is neither rounded away nor a division by zero
    for cls in (Adam, RMSProp):
        param = Parameter(cl_array.to_device(queue, np.ones(4, np.float16)))
        opt = cls([param], lr=1e-3, eps=eps)
        param.grad = cl_array.to_device(queue, np.array([0.0, 1e-7, -6e-8, 1.0], np.float16))
        opt.step()
        twin = Parameter(np.ones(4, F32), param.grad.get().astype(F32))
        cls([twin], lr=1e-3, eps=eps).step()
        got = param.data.get()
        assert np.isfinite(got).all()
        assert _bits(got) == _bits(twin.data.astype(np.float16))


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("kind", HALF_KINDS, ids=HALF_KIND_IDS)
def test_checkpoints_carry_float32_state_and_round_trip(
    kind: Kind, dtype: np.dtype[Any], queue: cl.CommandQueue, tmp_path: Any
) -> None:
    rng = np.random.default_rng(1)
    param = Parameter(kind.make(queue, rng.standard_normal(100).astype(dtype)))
    opt = RMSProp([param], lr=1e-2, momentum=0.9, master_weights=True)
    for _ in range(3):
        param.grad = kind.make(queue, rng.standard_normal(100).astype(dtype))
        opt.step()
    saved = opt.state_dict()
    entry: dict[str, Any] = dict(saved["state"][0])
    assert {k: v.dtype for k, v in entry.items() if k != "step"} == {
        "square_avg": np.dtype(F32),
        "momentum_buffer": np.dtype(F32),
        "master_param": np.dtype(F32),
    }
    assert saved["param_groups"][0]["master_weights"] is True
    path = tmp_path / "half.npz"
    checkpoint.save(saved, path)
    loaded = checkpoint.load(path)
    other = Parameter(kind.make(queue, kind.get(param.data)))
    again = RMSProp([other], lr=1e-2, momentum=0.9, master_weights=True)
    again.load_state_dict(loaded)
    grad = rng.standard_normal(100).astype(dtype)
    param.grad, other.grad = kind.make(queue, grad), kind.make(queue, grad)
    opt.step()
    again.step()
    assert _bits(kind.get(other.data)) == _bits(kind.get(param.data))
    assert _state_bits(again, other, kind.get) == _state_bits(opt, param, kind.get)
    # state in the parameter's half dtype is refused, and nothing changes
    first: dict[str, Any] = dict(cast(Any, loaded)["state"][0])
    bad = {**loaded, "state": {0: {**first, "square_avg": first["square_avg"].astype(dtype)}}}
    before = _state_bits(again, other, kind.get)
    with pytest.raises(TypeError, match=f"state of a {dtype} parameter is float32"):
        again.load_state_dict(bad)
    assert _state_bits(again, other, kind.get) == before


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("kind", HALF_KINDS, ids=HALF_KIND_IDS)
def test_a_gradient_of_another_dtype_is_refused_and_changes_nothing(
    kind: Kind, dtype: np.dtype[Any], queue: cl.CommandQueue
) -> None:
    start = np.linspace(-1, 1, 12).astype(dtype)
    params = [Parameter(kind.make(queue, start)), Parameter(kind.make(queue, start))]
    opt = Adam(params, lr=0.1)
    params[0].grad = kind.make(queue, np.ones(12, dtype))
    params[1].grad = kind.make(queue, np.ones(12, F32))
    with pytest.raises(TypeError, match=r"\['params'\]\[1\]\.grad has dtype .*float32.*but its parameter has dtype"):
        opt.step()
    assert not opt.state
    assert _bits(kind.get(params[0].data)) == _bits(start)


def test_a_checkpoint_with_master_weights_cannot_pass_for_torchs() -> None:
    param = Parameter(np.ones(3, np.float16), np.ones(3, np.float16))
    opt = Adam([param], master_weights=True)
    opt.step()
    with pytest.raises(ValueError, match="master_weights=True, which torch's optimizer does not have"):
        checkpoint.to_torch(opt.state_dict())
    plain = Adam([Parameter(np.ones(3, F32), np.ones(3, F32))])
    plain.step()
    assert "master_weights" not in checkpoint.to_torch(plain.state_dict())["param_groups"][0]


def test_sgd_with_stochastic_rounding_saves_its_step_counts_and_resumes_bit_for_bit() -> None:
    # torch's SGD keeps no step; the random bits of the rounding depend on it
    rng = np.random.default_rng(6)
    start = rng.standard_normal(1000).astype(BF16)
    grads = [rng.standard_normal(1000).astype(BF16) for _ in range(6)]

    def run(resume: bool) -> bytes:
        param = Parameter(start.copy())
        opt = SGD([param], lr=1e-3, stochastic_rounding=True)
        for k, grad in enumerate(grads):
            if resume and k == 3:
                saved = opt.state_dict()
                assert dict(saved["state"][0]) == {"step": 3}
                param = Parameter(param.data.copy())
                opt = SGD([param], lr=1e-3, stochastic_rounding=True)
                opt.load_state_dict(saved)
            param.grad = grad.copy()
            opt.step()
        return _bits(param.data)

    assert run(resume=True) == run(resume=False)


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("nonfinite", ["skip", "count", "propagate"])
def test_an_infinite_or_nan_half_parameter_is_left_as_it_is(
    dtype: np.dtype[Any], nonfinite: str, queue: cl.CommandQueue
) -> None:
    # (float16 cannot hold what float32's saturation would make of it; without a master
    # copy such an element is skipped, like one whose gradient is not finite)
    start = np.array([np.inf, -np.inf, np.nan, 1.0, 2.0, -3.0], dtype)
    grad = np.array([1.0, 1.0, 1.0, np.inf, np.nan, 0.5], dtype)
    results = []
    for make, get in ((lambda h: cl_array.to_device(queue, h), lambda a: a.get()), (np.array, np.array)):
        param = Parameter(make(start.copy()), make(grad.copy()))
        opt = Adam([param], lr=0.1, nonfinite=nonfinite)  # type: ignore[arg-type]
        opt.step()
        counted = opt.skipped_nonfinite() if nonfinite == "count" else None
        results.append((_bits(get(param.data)), _state_bits(opt, param, _host), counted))
    assert results[0] == results[1]
    got = np.frombuffer(results[0][0], dtype)
    assert _bits(got[:3]) == _bits(start[:3])  # the same bits, NaN's included
    if nonfinite == "propagate":
        assert np.isnan(got[3:5].astype(F32)).all()
    else:
        assert _bits(got[3:5]) == _bits(start[3:5])
    assert got[5] != start[5]
    if nonfinite == "count":
        assert results[0][2] == 5


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("kind", HALF_KINDS, ids=HALF_KIND_IDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, np.inf, 0.5])
def test_clipping_half_gradients(kind: Kind, dtype: np.dtype[Any], norm_type: float, queue: cl.CommandQueue) -> None:
    # the norm of half gradients is float32 (their update's dtype), computed from their
    # exact float32 values; each clipped gradient is the float32 product rounded
    from netcl import clip_grad_norm_, clip_grad_value_

    rng = np.random.default_rng(8)
    grads = [(rng.standard_normal(n) * 30).astype(dtype) for n in (50, 7, 300)]
    params = [Parameter(kind.make(queue, np.zeros_like(g)), kind.make(queue, g)) for g in grads]
    total = clip_grad_norm_(params, max_norm=2.0, norm_type=norm_type)
    wide = np.concatenate([g.astype(np.float64) for g in grads])
    expected = np.max(np.abs(wide)) if norm_type == np.inf else np.sum(np.abs(wide) ** norm_type) ** (1 / norm_type)
    got = float(_host(total))
    assert np.asarray(_host(total)).dtype == F32
    assert abs(got - expected) <= 1e-6 * expected  # float32's rounding of the norm, and of its sum
    factor = 2.0 / (expected + 1e-6)
    for param, g in zip(params, grads, strict=True):
        clipped = kind.get(param.grad).astype(np.float64)
        exact = g.astype(np.float64) * factor
        # half's rounding (half an ulp; float16's ulp is 2**-24 below 2**-14), and the
        # float32 factor's: within one ulp
        ulp = np.maximum(np.abs(exact) * 2.0**-10, 2.0**-24) if dtype == F16 else np.abs(exact) * 2.0**-7
        assert (np.abs(clipped - exact) <= ulp).all()
    clip_grad_value_(params, 0.1)
    for param in params:
        values = kind.get(param.grad)
        assert values.dtype == dtype
        assert (np.abs(values.astype(F32)) <= np.array(0.1, dtype).astype(F32)).all()


@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
def test_a_nan_keeps_its_sign_on_every_path(dtype: np.dtype[Any], queue: cl.CommandQueue) -> None:
    # a half value rounded from a NaN is the quiet NaN of its sign (numpy's conversion):
    # the kernel's rounding and numpy's agree, here through clip_grad_value_, which
    # writes every value (a float16 -NaN came out of the kernel as +NaN)
    from netcl import clip_grad_value_

    g = np.array([1.0, -np.nan, np.nan, 3.0, -3.0], dtype)
    out = []
    for kind in HALF_KINDS:
        param = Parameter(kind.make(queue, np.zeros_like(g)), kind.make(queue, g.copy()))
        clip_grad_value_([param], 2.0)
        out.append(_bits(kind.get(param.grad)))
    expected = np.array([1.0, -np.nan, np.nan, 2.0, -2.0], dtype)
    assert all(bits == _bits(expected) for bits in out), [np.frombuffer(b, np.uint16) for b in out]
