"""The optimizer API: state, groups, zero_grad, closures, queues and events."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

import array_api_strict
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

import netcl._backends.array_api as array_api_backend
import netcl._kernels
from netcl import Parameter, flat_parameters
from netcl._update import Step
from netcl.optim import Adam, RMSProp, RMSPropParamGroupInput
from tests.kinds import KIND_IDS, KINDS, Kind


def _param(kind: Kind, queue: cl.CommandQueue, values: Any, grad: Any | None = None) -> Parameter[Any]:
    p = Parameter(kind.make(queue, np.asarray(values, np.float32)))
    if grad is not None:
        p.grad = kind.make(queue, np.asarray(grad, np.float32))
    return p


def test_defaults_are_the_concept_pages(queue: cl.CommandQueue) -> None:
    opt = RMSProp([Parameter(np.zeros(3, np.float32))])
    assert opt.defaults == {
        "lr": 1e-3,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        "maximize": False,
        # the other frameworks' options, each off: torch's RMSprop
        "eps_in_sqrt": False,
        "initial_scale": 0.0,
        "bias_correction": False,
        "nesterov": False,
        "decoupled_weight_decay": False,
        # half-precision parameters' options, off: the parameter itself is updated
        "master_weights": False,
        "stochastic_rounding": False,
    }
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and group["alpha"] == 0.99 and group["eps"] == 1e-8


def test_reexport() -> None:
    import netcl.optim
    import netcl.optim.rmsprop

    assert netcl.optim.RMSProp is netcl.optim.rmsprop.RMSProp


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_state_is_lazy_and_keyed_on_id(kind: Kind, queue: cl.CommandQueue) -> None:
    with_grad = _param(kind, queue, [1.0, 2.0], [0.5, -0.5])
    without_grad = _param(kind, queue, [3.0])
    opt = RMSProp([with_grad, without_grad], lr=0.1)
    assert opt.state == {}
    opt.step()
    assert set(opt.state) == {id(with_grad)}
    assert opt.state[id(with_grad)]["step"] == 1
    np.testing.assert_allclose(kind.get(opt.state[id(with_grad)]["square_avg"]), [0.0025, 0.0025], rtol=1e-6)
    np.testing.assert_array_equal(kind.get(without_grad.data), [3.0])
    opt.zero_grad()
    assert with_grad.grad is None
    opt.step()  # no gradients: nothing moves, the state survives
    assert opt.state[id(with_grad)]["step"] == 1


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_zero_grad_in_place(kind: Kind, queue: cl.CommandQueue) -> None:
    p = _param(kind, queue, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    grad = p.grad
    RMSProp([p]).zero_grad(set_to_none=False)
    assert p.grad is grad
    np.testing.assert_array_equal(kind.get(p.grad), [0.0, 0.0, 0.0])


def test_closure_is_called_once_and_its_loss_returned() -> None:
    p = Parameter(np.ones(2, np.float32))
    calls: list[int] = []

    def closure() -> float:
        calls.append(1)
        p.grad = np.full(2, 0.5, np.float32)
        return 1.25

    opt = RMSProp([p])
    assert opt.step(closure) == 1.25
    assert calls == [1]
    assert opt.state[id(p)]["step"] == 1
    assert opt.step() is None


def test_param_groups_override_defaults_and_equal_two_optimizers(
    queue: cl.CommandQueue, rng: np.random.Generator
) -> None:
    values = [rng.standard_normal(50).astype(np.float32) for _ in range(2)]
    grads = [[rng.standard_normal(50).astype(np.float32) for _ in range(2)] for _ in range(5)]
    a = [Parameter(cl_array.to_device(queue, v)) for v in values]
    b = [Parameter(cl_array.to_device(queue, v)) for v in values]
    groups: list[RMSPropParamGroupInput] = [{"params": [a[0]]}, {"params": [a[1]], "lr": 0.05, "momentum": 0.9}]
    grouped = RMSProp(groups, lr=0.01)
    first = RMSProp([b[0]], lr=0.01)
    second = RMSProp([b[1]], lr=0.05, momentum=0.9)
    assert grouped.param_groups[1]["lr"] == 0.05 and grouped.param_groups[0]["momentum"] == 0.0
    for step in grads:
        for params in (a, b):
            for p, g in zip(params, step, strict=True):
                p.grad = cl_array.to_device(queue, g)
        grouped.step()
        first.step()
        second.step()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.data.get(), y.data.get())


def test_add_param_group(queue: cl.CommandQueue) -> None:
    first, second = Parameter(np.ones(2, np.float32)), Parameter(np.ones(3, np.float32))
    opt = RMSProp([first], lr=0.1)
    opt.add_param_group({"params": [second], "alpha": 0.5})
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["alpha"] == 0.5
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [first]})
    assert len(opt.param_groups) == 2


def test_changing_hyperparameters_never_rebuilds(queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    p = Parameter(cl_array.to_device(queue, np.ones(100, np.float32)))
    opt = RMSProp([p], lr=0.1)
    p.grad = cl_array.to_device(queue, np.ones(100, np.float32))
    opt.step()
    builds: list[object] = []
    original = cl.Program.build

    def counting_build(self: cl.Program, *args: Any, **kwargs: Any) -> cl.Program:
        builds.append(self)
        built: cl.Program = original(self, *args, **kwargs)
        return built

    monkeypatch.setattr(cl.Program, "build", counting_build)
    for lr in (0.05, 0.02, 0.01):
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["alpha"] = 0.9
        opt.step()
    RMSProp([Parameter(p.data, p.grad)], lr=0.3).step()  # another instance shares the kernel
    queue.finish()
    assert builds == []


def test_kernels_are_shared_per_context_dtype_and_variant(queue: cl.CommandQueue) -> None:
    spec = Step(RMSProp.rule, {**RMSProp([Parameter(np.zeros(1, np.float32))]).defaults, "momentum": 0.9}).kernel
    assert spec.flags == frozenset({"MOMENTUM"}) and spec.buffers == ("square_avg", "momentum_buffer")

    def kernel() -> Any:
        return netcl._kernels.fused_kernel(queue.context, queue.device, np.dtype(np.float32), spec, 4)

    assert kernel() is kernel()


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_turning_momentum_and_centered_on_later_starts_zero_buffers(kind: Kind, queue: cl.CommandQueue) -> None:
    p = _param(kind, queue, [1.0, -1.0], [0.1, 0.2])
    opt = RMSProp([p], lr=0.01)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["centered"] = True
    p.grad = kind.make(queue, np.array([0.1, 0.2], np.float32))
    opt.step()
    state = opt.state[id(p)]
    assert {"momentum_buffer", "grad_avg"} <= set(state)
    # a zero start: after one step m = (1 - alpha) * g
    np.testing.assert_allclose(kind.get(state["grad_avg"]), [0.001, 0.002], rtol=1e-5)


def _step_without_waiting(opt: Any, gate: cl.UserEvent) -> None:
    """Step `opt` in a thread, and fail if the step waits on the host (for `gate`, which
    the gradient's pending fill waits for): then release the gate first."""
    stepper = threading.Thread(target=opt.step)
    stepper.start()
    stepper.join(timeout=20)
    if stepper.is_alive():  # step() waited on the host: release it, then fail
        gate.set_status(cl.command_execution_status.COMPLETE)
        stepper.join()
        pytest.fail("step() blocked on the host until the gradient was ready")


def test_opencl_step_waits_for_events_and_never_blocks(queue: cl.CommandQueue) -> None:
    """step() returns while the gradient is still being produced, and the update waits for it."""
    context = queue.context
    producer = cl.CommandQueue(context)  # the user's own queue for gradients
    p = Parameter(cl_array.to_device(queue, np.ones(1000, np.float32)))
    grad = cl_array.zeros(producer, 1000, np.float32)
    gate = cl.UserEvent(context)
    # the gradient is written only once `gate` completes
    grad.fill(0.5, wait_for=[gate])
    p.grad = grad
    opt = RMSProp([p], lr=0.01)
    _step_without_waiting(opt, gate)
    assert p.data.events, "the kernel's event is recorded on the parameter"
    gate.set_status(cl.command_execution_status.COMPLETE)
    queue.finish()
    producer.finish()
    # g = 0.5 everywhere: v = 0.0025, update = lr * 0.5 / (0.05 + 1e-8) = 0.1
    np.testing.assert_allclose(p.data.get(), 1.0 - 0.01 * 0.5 / (0.05 + 1e-8), rtol=1e-6)


def test_a_kept_gradient_refilled_on_another_queue_is_waited_for(queue: cl.CommandQueue) -> None:
    """Flat storage's gradients are the same arrays at every step (their launch then
    hands its event on in place): a fill of one on the user's own queue, gated on an
    event, is waited for by the next step on the device, not on the host."""
    context = queue.context
    producer = cl.CommandQueue(context)
    params, twin = flat_parameters(queue, [(300,), (5,)]), flat_parameters(queue, [(300,), (5,)])
    for p in [*params, *twin]:
        p.data.fill(1.0)
        cast(cl_array.Array, p.grad).fill(0.25)
    opt, twin_opt = Adam(params, lr=0.1), Adam(twin, lr=0.1)
    for _ in range(3):  # the same arrays: the last steps' launch
        opt.step()
        twin_opt.step()
    gate = cl.UserEvent(context)
    grad = cast(cl_array.Array, params[1].grad).with_queue(producer)
    grad.fill(-2.0, wait_for=[gate])  # (pyopencl adds its event to the list `params[1].grad` shares)
    cast(cl_array.Array, twin[1].grad).fill(-2.0)
    _step_without_waiting(opt, gate)
    twin_opt.step()
    gate.set_status(cl.command_execution_status.COMPLETE)
    queue.finish()
    producer.finish()
    for p, t in zip(params, twin, strict=True):
        np.testing.assert_array_equal(p.data.get(), t.data.get())
    assert not np.array_equal(params[1].data.get(), params[0].data.get()[:5])  # (the fill was seen)


def test_out_of_order_queue_matches_in_order(
    context: cl.Context, queue: cl.CommandQueue, rng: np.random.Generator
) -> None:
    props = cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
    try:
        ooo = cl.CommandQueue(context, properties=props)
    except cl.Error as error:  # pragma: no cover - depends on the driver
        pytest.skip(f"this OpenCL device has no out-of-order queues: {error}")
    values = rng.standard_normal(4099).astype(np.float32)
    grads = [rng.standard_normal(4099).astype(np.float32) for _ in range(4)]
    a, b = Parameter(cl_array.to_device(ooo, values)), Parameter(cl_array.to_device(queue, values))
    opt_a, opt_b = RMSProp([a], lr=0.01, momentum=0.9), RMSProp([b], lr=0.01, momentum=0.9)
    for g in grads:
        a.grad, b.grad = cl_array.to_device(ooo, g), cl_array.to_device(queue, g)
        opt_a.step()
        opt_b.step()
    np.testing.assert_array_equal(a.data.get(), b.data.get())


def test_immutable_arrays_are_rebound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays that cannot be written in place (jax) get `param.data` rebound.

    jax is not a test dependency; array_api_strict arrays stand in for immutable ones.
    """
    monkeypatch.setattr(array_api_backend, "_rebinds", lambda x: True)
    start = array_api_strict.asarray([1.0, 2.0], dtype=array_api_strict.float32)
    p = Parameter(start, array_api_strict.asarray([0.5, 0.5], dtype=array_api_strict.float32))
    opt = RMSProp([p], lr=0.1)
    opt.step()
    assert p.data is not start
    np.testing.assert_array_equal(np.asarray(start), [1.0, 2.0])
    first = opt.state[id(p)]["square_avg"]
    opt.step()
    assert opt.state[id(p)]["square_avg"] is not first
    assert opt.state[id(p)]["step"] == 2


def test_repr_lists_groups() -> None:
    text = repr(RMSProp([Parameter(np.zeros(1, np.float32))], lr=0.5))
    assert text.startswith("RMSProp (") and "lr: 0.5" in text and "Parameter Group 0" in text


def test_after_the_first_step_nothing_is_allocated_or_rebuilt(
    queue: cl.CommandQueue, count_makes: Callable[[], list[str]]
) -> None:
    """State buffers and launch kernels are made once; later steps only enqueue."""
    params = [
        Parameter(cl_array.to_device(queue, np.ones(n, np.float32)), cl_array.to_device(queue, np.ones(n, np.float32)))
        for n in (10, 1000, 100_000)
    ]
    opt = RMSProp(params, lr=0.01, momentum=0.9, centered=True)
    opt.step()
    made = count_makes()
    for lr in (0.01, 0.005, 0.002):
        opt.param_groups[0]["lr"] = lr
        opt.step()
    queue.finish()
    assert made == []


SLOW_FILL = """
__kernel void slow_fill(__global float *out, float value, int spins)
{
    int i = get_global_id(0);
    float x = value;
    for (int k = 0; k < spins; ++k) x = x * 1.0000001f + 1e-12f;  /* busy work */
    out[i] = value + 0.0f * x;
}
"""


def test_gradients_from_a_slow_kernel_on_another_queue_match_in_order(
    context: cl.Context, queue: cl.CommandQueue
) -> None:
    """A gradient written by a slow kernel on a second (out-of-order) queue: step() waits
    for it on the device, and the result equals the in-order one bit for bit."""
    props = cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
    producer = cl.CommandQueue(context, properties=props)
    kernel = cl.Kernel(cl.Program(context, SLOW_FILL).build(), "slow_fill")
    rng = np.random.default_rng(9)
    start = rng.standard_normal(4096).astype(np.float32)
    values = rng.standard_normal(5).astype(np.float32)

    fast = Parameter(cl_array.to_device(queue, start))
    slow = Parameter(cl_array.to_device(queue, start))
    fast_opt, slow_opt = RMSProp([fast], lr=1e-2, momentum=0.9), RMSProp([slow], lr=1e-2, momentum=0.9)
    for value in values:
        fast.grad = cl_array.to_device(queue, np.full(4096, value, np.float32))
        fast_opt.step()
        grad = cl_array.empty(producer, 4096, np.float32)
        buffer = grad.base_data
        assert isinstance(buffer, cl.Buffer)
        event = kernel(producer, (4096,), None, buffer, np.float32(value), np.int32(20_000))
        grad.add_event(event)
        slow.grad = grad
        slow_opt.step()
    queue.finish()
    producer.finish()
    assert fast.data.get().tobytes() == slow.data.get().tobytes()
