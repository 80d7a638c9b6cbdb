"""The reliability policies of the Reliability page: hyperparameters edited between
steps, hyperparameters in the parameters' dtype, atomic steps, forked children, queues,
identity and memory, non-finite gradients counted or let through.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import subprocess
import sys
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

import netcl.device
from netcl import Parameter
from netcl._backends import host
from netcl.optim import SGD, Adam, AdamW, RMSProp
from netcl.optim.optimizer import Optimizer
from tests.kinds import BufferArray

F32 = np.float32
Factory = Callable[..., Optimizer[Any, Any, Any, Any]]

LARGE = 1 << 19
"""Values enough that a host array takes the fused kernel (the measured choice there)."""


def _snapshot(opt: Optimizer[Any, Any, Any, Any], params: list[Parameter[Any]]) -> list[bytes]:
    out = [np.asarray(p.data if not isinstance(p.data, cl_array.Array) else p.data.get()).tobytes() for p in params]
    for key, state in opt.state.items():
        out.append(repr((key, state["step"])).encode())
        for name, value in sorted(state.items()):
            if name != "step":
                out.append(np.asarray(value.get() if isinstance(value, cl_array.Array) else value).tobytes())
    return out


# --- 1. hyperparameters edited in param_groups ------------------------------------------

EDITS: list[tuple[Factory, str, object, type[Exception]]] = [
    (RMSProp, "lr", math.nan, ValueError),
    (RMSProp, "lr", -1.0, ValueError),
    (RMSProp, "lr", math.inf, ValueError),
    (RMSProp, "lr", "0.1", TypeError),
    (RMSProp, "lr", None, TypeError),
    (RMSProp, "eps", 0.0, ValueError),
    (RMSProp, "momentum", 1.5, ValueError),
    (RMSProp, "alpha", 1.0, ValueError),
    (RMSProp, "alpha", 1.5, ValueError),
    (RMSProp, "maximize", "False", TypeError),
    (RMSProp, "centered", 1, TypeError),
    (Adam, "betas", (0.9, 1.0), ValueError),
    (Adam, "betas", 0.9, TypeError),
    (AdamW, "weight_decay", -1e-2, ValueError),
    (SGD, "dampening", 2.0, ValueError),
    (SGD, "nesterov", True, ValueError),  # without momentum: the combination check
]


@pytest.mark.parametrize(
    ("factory", "key", "value", "error"),
    EDITS,
    ids=[f"{f.__name__}-{k}={v!r}" for f, k, v, _ in EDITS],
)
def test_an_edited_hyperparameter_is_checked_before_anything_is_written(
    factory: Factory, key: str, value: object, error: type[Exception]
) -> None:
    params = [Parameter(np.ones(3, F32), np.array([0, 1, -1], F32)) for _ in range(2)]
    opt = factory([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    opt.step()
    before = _snapshot(opt, params)
    opt.param_groups[1][key] = value
    with pytest.raises(error, match=rf"param_groups\[1\]: {key}") as caught:
        opt.step()
    shown = value[-1] if isinstance(value, tuple) else value  # a pair names the bad member
    assert repr(shown) in str(caught.value)
    assert _snapshot(opt, params) == before, "a rejected step changed something"
    with pytest.raises(error, match=rf"param_groups\[1\]: {key}"):
        opt.state_dict()  # no checkpoint carries the bad value
    opt.param_groups[1][key] = opt.param_groups[0][key]
    opt.step()
    assert _snapshot(opt, params) != before


@pytest.mark.parametrize("stepped", [False, True], ids=["new", "after-a-step"])
def test_a_deleted_hyperparameter_is_named(stepped: bool) -> None:
    opt = RMSProp([Parameter(np.ones(3, F32), np.ones(3, F32))])
    if stepped:  # (then the step compares the group's values with the kept ones first)
        opt.step()
    del opt.param_groups[0]["lr"]  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr is missing"):
        opt.step()


def test_a_param_group_that_makes_what_it_lacks_still_lacks_it() -> None:
    # a group of another kind of mapping given after a step: a defaultdict makes a
    # missing key when it is read, so the step must not read its values as a dict's
    opt = RMSProp([Parameter(np.ones(3, F32), np.ones(3, F32))], lr=0.1)
    opt.step()
    group = defaultdict(lambda: 0.5, {k: v for k, v in opt.param_groups[0].items() if k != "alpha"})
    opt.param_groups[0] = group  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: alpha is missing"):
        opt.step()
    assert "alpha" not in group


def test_an_edited_value_is_normalized_as_the_constructor_does() -> None:
    param = Parameter(np.ones(3, F32), np.ones(3, F32))
    opt = Adam([param])
    opt.param_groups[0]["betas"] = [0.8, 0.99]  # type: ignore[typeddict-item]
    opt.param_groups[0]["lr"] = np.float32(0.5)  # type: ignore[typeddict-item]
    opt.step()
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert type(opt.param_groups[0]["lr"]) is float


def test_messages_name_the_place_once() -> None:
    with pytest.raises(ValueError) as caught:
        RMSProp([{"params": [Parameter(np.ones(3, F32))], "lr": -1.0}])
    assert str(caught.value) == "Invalid param_groups[0]: lr value: -1.0 (allowed: 0.0 <= lr, finite)"


# --- 2. hyperparameters in the parameters' dtype ------------------------------------------

DTYPE_CASES = [
    (RMSProp, {"eps": 1e-50}, "eps"),
    (RMSProp, {"lr": 1e39}, "lr"),
    (RMSProp, {"weight_decay": 1e39}, "weight_decay"),
    (RMSProp, {"alpha": 1 - 1e-9}, "alpha"),
    (Adam, {"betas": (0.9, 1 - 1e-9)}, r"betas\[1\]"),
    (AdamW, {"lr": 1e20, "weight_decay": 1e20}, "factor"),  # 1 - lr * weight_decay overflows
    (Adam, {"lr": 1e38, "betas": (0.99, 0.999)}, "factor"),  # lr / (1 - beta1) overflows
]


@pytest.mark.parametrize("kind", ["numpy", "pyopencl"])
@pytest.mark.parametrize(("factory", "hyper", "name"), DTYPE_CASES, ids=[c[2] for c in DTYPE_CASES])
def test_a_value_valid_in_float64_but_not_float32_is_refused_at_the_step(
    factory: Factory, hyper: dict[str, Any], name: str, kind: str, queue: cl.CommandQueue
) -> None:
    def make(x: Any) -> Any:
        return cl_array.to_device(queue, x) if kind == "pyopencl" else x

    wide = Parameter(make(np.ones(3)), make(np.zeros(3)))
    factory([wide], **hyper).step()  # fine in float64
    narrow = Parameter(make(np.ones(3, F32)), make(np.zeros(3, F32)))
    opt = factory([narrow], **hyper)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: .*{name}.*float32"):
        opt.step()
    assert opt.state == {}
    np.testing.assert_array_equal(narrow.data.get() if kind == "pyopencl" else narrow.data, 1.0)


# --- 3 and 4. finite gradients never make non-finite values --------------------------------


def test_centered_rmsprop_keeps_a_huge_gradient_finite() -> None:
    param = Parameter(np.zeros(2, F32), np.full(2, 1e31, F32))
    RMSProp([param], centered=True).step()
    assert np.isfinite(param.data).all()
    # m^2 overflows: the denominator is sqrt(v), so the step is bounded as without centering
    assert np.all(np.abs(param.data) <= 1e-3 * 10 * (1 + 1e-6))


@pytest.mark.parametrize("kind", ["numpy", "pyopencl"])
def test_rmsprop_v_does_not_overflow_where_torch_does_not(kind: str, queue: cl.CommandQueue) -> None:
    """g = 2e19: g^2 overflows float32 but 0.01 g^2 does not; torch moves by the exact
    bound lr / sqrt(1 - alpha)."""
    grad = np.full(4, 2e19, F32)
    make: Callable[[Any], Any] = (lambda x: cl_array.to_device(queue, x)) if kind == "pyopencl" else np.array
    param = Parameter(make(np.zeros(4, F32)), make(grad))
    RMSProp([param], lr=1e-3, alpha=0.99).step()
    twin = torch.zeros(4, requires_grad=True)
    twin.grad = torch.tensor(grad)
    torch.optim.RMSprop([twin], lr=1e-3, alpha=0.99).step()
    ours = param.data.get() if kind == "pyopencl" else param.data
    np.testing.assert_array_equal(ours, twin.detach().numpy())
    np.testing.assert_allclose(ours, -0.01, rtol=1e-6)


# --- 5. atomic steps ----------------------------------------------------------------------


def test_a_torch_parameter_that_requires_grad_is_updated_as_torch_does() -> None:
    data = torch.ones(5, requires_grad=True)
    param = Parameter(data, torch.full((5,), 0.5))
    twin = torch.ones(5, requires_grad=True)
    twin.grad = torch.full((5,), 0.5)
    for _ in range(3):
        Adam([param], lr=0.1).step()
        torch.optim.Adam([twin], lr=0.1).step()
    assert data.requires_grad and data.grad_fn is None
    assert torch.equal(data.detach(), twin.detach())


def _negated(values: torch.Tensor, public: bool) -> torch.Tensor:
    """`values` as a tensor whose memory holds them negated (torch's negative bit): the
    imaginary part of a conjugated complex tensor (public, one value), or a lazy
    negation of the negated values."""
    if public:
        assert values.numel() == 1
        negated = torch.complex(torch.zeros(1), -values.reshape(1)).conj().imag.reshape(values.shape)
    else:
        negated = torch._neg_view(-values)
    assert negated.is_neg() and torch.equal(negated, values)
    return negated


@pytest.mark.parametrize("path", ["kernel", "measured"])
@pytest.mark.parametrize("negated", ["gradients", "parameter"])
def test_memory_that_holds_values_negated_steps_by_its_values(
    negated: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch keeps a lazy negation as a bit beside the memory, which DLPack and an address
    # do not carry: gradients whose memory holds their values negated (new ones, after
    # plain ones laid out the launch), and a parameter's array that becomes its own
    # memory negated (the memory, shape and strides a kept plan was made for), step by
    # their values, as the same values in plain tensors do
    monkeypatch.setattr(host, "PATH", path)
    rng = np.random.default_rng(21)
    sizes = (LARGE, 1)
    starts = [rng.standard_normal(n).astype(F32) for n in sizes]
    ours = [torch.nn.Parameter(torch.tensor(x)) for x in starts]
    twins = [torch.nn.Parameter(torch.tensor(x)) for x in starts]
    # (a group each: the first keeps its plan, its new gradients taken by fingerprint)
    a = RMSProp([{"params": [p]} for p in ours], lr=1e-2, momentum=0.5)
    b = RMSProp([{"params": [t]} for t in twins], lr=1e-2, momentum=0.5)
    for k in range(4):
        if negated == "parameter" and k == 2:
            ours[0].data, twins[0].data = torch._neg_view(ours[0].data), -twins[0].data
        for p, t, n, public in zip(ours, twins, sizes, (False, True), strict=True):
            g = torch.tensor(rng.standard_normal(n).astype(F32))
            p.grad = _negated(g, public) if negated == "gradients" and k >= 2 else g.clone()
            t.grad = g.clone()
        a.step()
        b.step()
        for p, t in zip(ours, twins, strict=True):
            assert torch.equal(p.detach(), t.detach()), f"step {k}"


def test_host_views_and_checkpoints_see_a_negated_tensors_values(tmp_path: Any) -> None:
    # what MPI reads and writes (a backend's host views) and what a checkpoint saves
    from netcl._backends.array_api import ARRAY_API
    from netcl.optim import checkpoint

    values = torch.tensor([1.0, -2.0, 3.0])
    negated = _negated(values, public=False)
    with ARRAY_API.host_views([negated], write=True) as seen:
        np.testing.assert_array_equal(seen.arrays[0], [1.0, -2.0, 3.0])
        seen.arrays[0][:] *= 2
    assert torch.equal(negated, torch.tensor([2.0, -4.0, 6.0]))
    checkpoint.save({"state": {0: {"step": 1, "square_avg": negated}}, "param_groups": []}, tmp_path / "n.npz")
    loaded: Any = checkpoint.load(tmp_path / "n.npz")
    np.testing.assert_array_equal(np.asarray(loaded["state"][0]["square_avg"]), [2.0, -4.0, 6.0])


@pytest.mark.parametrize("path", ["kernel", "array-api"])
@pytest.mark.parametrize("holder", ["torch.nn.Parameter", "netcl.Parameter"])
def test_a_step_after_autograd_saved_a_parameter_makes_backward_raise_as_torch_does(
    holder: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's optimizers update a parameter with in-place ops, which autograd counts, so
    # a backward pass that needs the parameter's values from before the step raises;
    # netcl writes the memory (or `parameter.data`, whose count is its own), and tells
    # autograd, or the backward pass would use the new values without a word
    monkeypatch.setattr(host, "PATH", path)
    data = torch.ones(LARGE, requires_grad=holder == "torch.nn.Parameter")
    param: Any = torch.nn.Parameter(data) if holder == "torch.nn.Parameter" else Parameter(data)
    held = param if holder == "torch.nn.Parameter" else param.data
    x = torch.ones(LARGE, requires_grad=True)
    loss = (held * x).sum()  # (saves the parameter for x's gradient)
    param.grad = torch.ones(LARGE)
    before = held._version
    RMSProp([param], lr=1e-2).step()
    assert held._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _later_group_fails(bad: Parameter[Any], *, in_constructor: bool = True) -> None:
    """The constructor refuses `bad` (which checks arrays, not gradients); so does a step
    when the arrays are swapped in later, before anything is written."""
    if in_constructor:
        with pytest.raises((TypeError, ValueError)):
            RMSProp([bad])
    good = Parameter(np.ones(4, F32), np.ones(4, F32))
    swapped = Parameter(torch.ones(tuple(bad.data.shape)), torch.ones(tuple(bad.data.shape)))
    opt = RMSProp([{"params": [good]}, {"params": [swapped]}])
    swapped.data, swapped.grad = bad.data, bad.grad
    with pytest.raises((TypeError, ValueError)) as caught:
        opt.step()
    assert "param_groups[1]['params'][0]" in str(caught.value)
    np.testing.assert_array_equal(good.data, 1.0)
    assert opt.state == {}


def test_an_expanded_tensor_is_refused_before_anything_is_written() -> None:
    _later_group_fails(Parameter(torch.ones(1).expand(4), torch.ones(4)))


def test_a_torch_inference_tensor_is_refused_before_anything_is_written() -> None:
    # torch updates one in place only within inference mode: the array-API maths raised
    # torch's error after writing the parameters before it, the fused kernel wrote it
    with torch.inference_mode():
        bad = Parameter(torch.ones(4), torch.ones(4))
    _later_group_fails(bad)


def test_a_torch_tensor_whose_memory_was_freed_is_refused_before_anything_is_written() -> None:
    # `untyped_storage().resize_(0)` (as sharded training frees a parameter between
    # uses) leaves the tensor's shape with no memory behind it: torch's own optimizers
    # crash the process on it, the fused kernel wrote through a null pointer
    freed = torch.ones(4)
    freed.untyped_storage().resize_(0)
    _later_group_fails(Parameter(freed, torch.ones(4)))
    # a parameter freed after steps, then given its memory back
    params = [torch.nn.Parameter(torch.ones(n)) for n in (LARGE, 8)]
    opt = RMSProp([{"params": [p]} for p in params], lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    kept = [p.detach().clone() for p in params]
    counts = [opt.state[id(p)]["step"] for p in params]
    params[1].untyped_storage().resize_(0)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]\.data is a torch tensor whose storage"):
        opt.step()
    assert torch.equal(params[0].detach(), kept[0])
    assert [opt.state[id(p)]["step"] for p in params] == counts
    params[1].untyped_storage().resize_(8 * 4)
    with torch.no_grad():
        params[1].copy_(kept[1])
    opt.step()
    assert [opt.state[id(p)]["step"] for p in params] == [c + 1 for c in counts]


def test_an_overlapping_numpy_view_is_refused() -> None:
    base = np.ones(4, F32)
    view = np.lib.stride_tricks.as_strided(base, shape=(3, 2), strides=(4, 4))  # writeable, overlapping
    _later_group_fails(Parameter(view, np.ones((3, 2), F32)))


def test_a_sparse_gradient_is_refused() -> None:
    _later_group_fails(Parameter(torch.ones(4), torch.ones(4).to_sparse()), in_constructor=False)


def test_a_corrupted_step_count_changes_nothing() -> None:
    params = [Parameter(np.ones(3, F32), np.ones(3, F32)) for _ in range(3)]
    opt = Adam(params)
    opt.step()
    before = _snapshot(opt, params)
    opt.state[id(params[2])]["step"] = "five"  # type: ignore[typeddict-item]
    with pytest.raises(TypeError, match=r"state\['step'\] of param_groups\[0\]\['params'\]\[2\]"):
        opt.step()
    opt.state[id(params[2])]["step"] = 1
    assert _snapshot(opt, params) == before
    opt.state[id(params[1])]["step"] = -2
    with pytest.raises(ValueError, match="whole number >= 0"):
        opt.step()


def test_a_write_that_fails_commits_no_count_and_no_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts and new state buffers are committed only once every group was written."""
    first = Parameter(np.ones(3, F32), np.ones(3, F32))
    second = Parameter(torch.ones(3), torch.ones(3))
    opt = RMSProp([{"params": [first]}, {"params": [second]}], momentum=0.5)
    opt.step()
    counts = {key: state["step"] for key, state in opt.state.items()}
    opt.param_groups[0]["centered"] = True  # a new state buffer for the first group
    from netcl._backends.array_api import ArrayAPIBackend

    original = ArrayAPIBackend.apply
    calls: list[int] = []

    def failing(self: Any, step: Any, work: Any, cache: Any, tally: Any, steady: bool = False) -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("the device failed")
        original(self, step, work, cache, tally, steady)

    monkeypatch.setattr(ArrayAPIBackend, "apply", failing)
    with pytest.raises(RuntimeError, match="the device failed"):
        opt.step()
    assert {key: state["step"] for key, state in opt.state.items()} == counts
    assert "grad_avg" not in opt.state[id(first)]


# --- 6. forked children --------------------------------------------------------------------


def _child(results: Any) -> None:
    param = Parameter(np.ones(LARGE, F32), np.ones(LARGE, F32))
    RMSProp([param], lr=0.01).step()
    results.put(float(param.data[0]))


def test_a_forked_child_steps_after_the_parent_used_the_host_device() -> None:
    param = Parameter(np.ones(LARGE, F32), np.ones(LARGE, F32))
    opt = RMSProp([param], lr=0.01)
    opt.step()
    assert host.host_queue() is not None
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_child, args=(results,))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in step()")
    assert child.exitcode == 0
    assert results.get(timeout=5) == float(param.data[0])  # the same first step


def test_host_steps_where_the_os_has_no_fork_and_no_sched_yield() -> None:
    # (as on Windows: netcl imports without os.register_at_fork, and a host step waits
    # with time.sleep(0) between polls; the bits are those of the array-API path)
    script = """
import os
import numpy as np
import pyopencl, pyopencl.array, array_api_compat  # (what netcl imports: not under test)
del os.register_at_fork, os.sched_yield
import netcl._backends.host as host
from netcl import Parameter
from netcl.optim import Adam
results = []
for path in ("kernel", "array-api"):
    host.PATH = path
    param = Parameter(np.linspace(-1, 1, 1 << 20, dtype=np.float32), np.full(1 << 20, 0.5, np.float32))
    Adam([param], lr=0.1).step()
    results.append(param.data.tobytes())
assert results[0] == results[1]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- 8. queues ----------------------------------------------------------------------------


def test_state_read_on_the_old_queue_waits_for_a_step_on_the_new_one(context: cl.Context) -> None:
    first, second = cl.CommandQueue(context), cl.CommandQueue(context)
    rng = np.random.default_rng(5)
    p0, g0, g1 = (rng.standard_normal(64).astype(F32) for _ in range(3))
    param = Parameter(cl_array.to_device(first, p0), cl_array.to_device(first, g0))
    opt = RMSProp([param], lr=0.1, momentum=0.5)
    opt.step()
    param.data = param.data.with_queue(second)
    gate = cl.UserEvent(context)
    grad = cl_array.to_device(second, g1)
    grad.add_event(gate)  # the gradient is not ready until the gate opens
    param.grad = grad
    opt.step()
    buffers = [value for value in opt.state[id(param)].values() if isinstance(value, cl_array.Array)]
    pending = [event for buffer in buffers for event in buffer.events]
    assert pending and all(e.command_execution_status != cl.command_execution_status.COMPLETE for e in pending), (
        "the state buffers do not wait for the step"
    )
    gate.set_status(cl.command_execution_status.COMPLETE)
    saved = opt.state_dict()
    twin = Parameter(p0.copy(), g0)
    reference = RMSProp([twin], lr=0.1, momentum=0.5)
    reference.step()
    twin.grad = g1
    reference.step()
    for name in ("square_avg", "momentum_buffer"):
        np.testing.assert_array_equal(saved["state"][0][name], reference.state_dict()["state"][0][name])


# --- 9. identity and memory ---------------------------------------------------------------


def test_a_new_parameter_never_inherits_a_removed_ones_state() -> None:
    for _ in range(50):
        keep = Parameter(np.ones(3, F32), np.ones(3, F32))
        gone = Parameter(np.ones(3, F32), np.ones(3, F32))
        opt = RMSProp([keep, gone])
        for _ in range(5):
            opt.step()
        opt.param_groups[0]["params"].remove(gone)
        old = id(gone)
        del gone
        opt.step()
        gc.collect()
        newcomer = Parameter(np.ones(3, F32), np.ones(3, F32))
        opt.param_groups[0]["params"].append(newcomer)
        opt.step()
        assert opt.state[id(newcomer)]["step"] == 1, f"reused id: {id(newcomer) == old}"
        assert old not in opt.state or id(newcomer) == old


@pytest.mark.parametrize("kind", ["pyopencl", "numpy-host"])
def test_a_removed_param_group_lets_go_of_its_arrays(kind: str, queue: cl.CommandQueue) -> None:
    # (its plan and its prepared launches, which hold its arrays' buffers, go with it)
    make, size = _maker(kind, queue)
    opt = Adam([{"params": [Parameter(make(np.ones(size, F32)), make(np.ones(size, F32)))]} for _ in range(2)])
    opt.step()
    opt.step()
    gone = opt.param_groups.pop()["params"][0]
    arrays: list[weakref.ref[Any]] = [weakref.ref(gone.data), weakref.ref(gone.grad)]
    del gone
    opt.step()
    gc.collect()
    assert [ref() is None for ref in arrays] == [True, True]
    assert len(opt.state) == 1


HOLDERS = ["pyopencl", "numpy", "numpy-host", "torch"]
"""Where a test's arrays live: numpy-host is a numpy array large enough for the fused
kernel on the host device."""


def _maker(kind: str, queue: cl.CommandQueue) -> tuple[Callable[[Any], Any], int]:
    """How to make an array of `kind` from numpy, and how many values to give it."""
    makers: dict[str, Callable[[Any], Any]] = {
        "pyopencl": lambda x: cl_array.to_device(queue, x),
        "numpy": np.array,
        "numpy-host": np.array,
        "torch": torch.tensor,
    }
    return makers[kind], LARGE if kind == "numpy-host" else 64


@pytest.mark.parametrize("kind", HOLDERS)
@pytest.mark.parametrize("factory", [RMSProp, Adam], ids=["RMSProp", "Adam"])
def test_a_dropped_gradient_is_freed(kind: str, factory: Factory, queue: cl.CommandQueue) -> None:
    make, n = _maker(kind, queue)
    param = Parameter(make(np.ones(n, F32)))
    opt = factory([param])
    refs = []
    for _ in range(3):
        param.grad = make(np.full(n, 0.5, F32))
        refs.append(weakref.ref(param.grad))
        opt.step()
        opt.zero_grad()
    gc.collect()
    assert [ref() for ref in refs] == [None] * 3
    # the same gradient array written in place: still one enqueue per step
    param.grad = make(np.full(n, 0.5, F32))
    opt.step()
    opt.step()
    kept = weakref.ref(param.grad)
    opt.zero_grad()
    gc.collect()
    assert kept() is None


def test_a_buffer_object_that_rebinds_its_buffer_is_followed(queue: cl.CommandQueue) -> None:
    data = BufferArray(queue, np.ones(8, F32))
    grad = BufferArray(queue, np.ones(8, F32))
    opt = SGD([Parameter(data, grad)], lr=0.5)
    opt.step()
    old = data.base_data
    fresh = BufferArray(queue, np.full(8, 10.0, F32))
    data.base_data = fresh.base_data
    opt.step()
    np.testing.assert_array_equal(data.get(), 9.5)
    out = np.empty(8, F32)
    cl.enqueue_copy(queue, out, old)
    np.testing.assert_array_equal(out, 0.5)  # the old buffer is left alone
    data.offset = 4 * 4
    data.shape = (4,)
    grad.shape = (4,)
    opt.step()
    np.testing.assert_array_equal(data.get(), 9.0)


# --- 10. the claims -------------------------------------------------------------------------


SQRT_CASES: list[tuple[Factory, dict[str, Any]]] = [
    (RMSProp, {}),
    (RMSProp, {"centered": True}),
    (Adam, {}),
    (Adam, {"amsgrad": True}),
]


@pytest.mark.parametrize(
    ("factory", "flags"), SQRT_CASES, ids=[f"{f.__name__}-{','.join(flags) or 'plain'}" for f, flags in SQRT_CASES]
)
def test_torch_tensors_below_the_host_size_give_numpys_bits(factory: Factory, flags: dict[str, Any]) -> None:
    rng = np.random.default_rng(8)
    n = LARGE - 1
    p0 = rng.standard_normal(n).astype(F32)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(F32) for _ in range(3)]
    ours, theirs = Parameter(p0.copy()), Parameter(torch.tensor(p0))
    a, b = factory([ours], lr=1e-2, **flags), factory([theirs], lr=1e-2, **flags)
    for g in grads:
        ours.grad, theirs.grad = g, torch.tensor(g)
        a.step()
        b.step()
    assert ours.data.tobytes() == theirs.data.numpy().tobytes()


def test_weight_decay_cancelling_the_gradient_costs_at_most_half_an_ulp_of_each_term() -> None:
    """Not fusing g + weight_decay * p rounds the product first: against the exact
    result, at most half an ulp of weight_decay * p plus half an ulp of the sum."""
    p, g, wd = F32(-3499.219), F32(3.4992172e7), 1e4
    param = Parameter(np.array([p]), np.array([g]))
    SGD([param], lr=1.0, weight_decay=wd).step()
    exact = float(p) - (float(g) + wd * float(p))
    product = F32(F32(wd) * p)
    bound = 0.5 * float(np.spacing(abs(product))) + 0.5 * float(np.spacing(abs(F32(g + product))))
    assert abs(float(param.data[0]) - exact) <= bound + 0.5 * float(np.spacing(abs(F32(exact))))


# --- 11. non-finite gradients -------------------------------------------------------------


@pytest.mark.parametrize("kind", HOLDERS)
@pytest.mark.parametrize("factory", [SGD, Adam, AdamW, RMSProp], ids=["SGD", "Adam", "AdamW", "RMSProp"])
def test_skipped_values_are_counted_until_asked(kind: str, factory: Factory, queue: cl.CommandQueue) -> None:
    make, n = _maker(kind, queue)
    grad = np.ones(n, F32)
    grad[[1, 7, 9]] = [np.nan, np.inf, -np.inf]
    params = [Parameter(make(np.ones(n, F32)), make(grad)) for _ in range(2)]
    opt = factory(params, lr=1e-2, nonfinite="count")
    assert opt.skipped_nonfinite() == 0
    opt.step()
    opt.step()
    assert opt.skipped_nonfinite() == 12
    assert opt.skipped_nonfinite() == 0
    params[0].grad = make(np.ones(n, F32))
    opt.step()
    assert opt.skipped_nonfinite() == 3


@pytest.mark.parametrize("kind", ["pyopencl", "numpy", "torch"])
@pytest.mark.parametrize("factory", [SGD, Adam, RMSProp], ids=["SGD", "Adam", "RMSProp"])
def test_propagate_lets_nan_reach_the_parameter_as_torch_does(
    kind: str, factory: Factory, queue: cl.CommandQueue
) -> None:
    make, _ = _maker(kind, queue)
    grad = np.ones(6, F32)
    grad[[1, 4]] = [np.nan, np.inf]
    param = Parameter(make(np.ones(6, F32)), make(grad))
    opt = factory([param], lr=1e-2, nonfinite="propagate")
    opt.step()
    got = param.data.get() if kind == "pyopencl" else param.data.numpy() if kind == "torch" else param.data
    twin = torch.ones(6, requires_grad=True)
    twin.grad = torch.tensor(grad)
    theirs_class: dict[Factory, Callable[..., torch.optim.Optimizer]] = {
        SGD: torch.optim.SGD,
        Adam: torch.optim.Adam,
        RMSProp: torch.optim.RMSprop,
    }
    theirs_class[factory]([twin], lr=1e-2).step()
    theirs = twin.detach().numpy()
    assert list(np.isnan(got)) == [False, True, False, False, True, False]
    assert list(~np.isfinite(theirs)) == list(np.isnan(got))
    np.testing.assert_array_equal(got[np.isfinite(theirs)], theirs[np.isfinite(theirs)])


def test_nonfinite_takes_three_words_and_only_count_counts() -> None:
    with pytest.raises(ValueError, match="nonfinite must be 'skip', 'count' or 'propagate', got 'raise'"):
        RMSProp([Parameter(np.ones(3, F32))], nonfinite="raise")  # type: ignore[arg-type]
    for mode in ("skip", "propagate"):
        opt = RMSProp([Parameter(np.ones(3, F32))], nonfinite=mode)
        with pytest.raises(ValueError, match=f"needs an optimizer made with nonfinite='count'.*'{mode}'"):
            opt.skipped_nonfinite()


@pytest.mark.parametrize("kind", ["pyopencl", "numpy"])
def test_skip_and_count_give_the_same_bits(kind: str, queue: cl.CommandQueue) -> None:
    make, n = _maker(kind, queue)
    grad = np.linspace(-1, 1, n).astype(F32)
    grad[::5] = np.nan
    results = []
    for mode in ("skip", "count"):
        param = Parameter(make(np.ones(n, F32)), make(grad))
        opt = Adam([param], nonfinite=mode)
        opt.step()
        results.append(param.data.get() if kind == "pyopencl" else param.data)
    assert results[0].tobytes() == results[1].tobytes()


@pytest.mark.parametrize("local_size", [4, 12, 64])
def test_counting_works_with_any_work_group_size(
    local_size: int, queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work-group's first work-item reads the marks 8 at a time where the group's
    size allows it; groups of other sizes count value by value."""
    import netcl._kernels as kernels

    monkeypatch.setattr(kernels, "geometry", lambda device: kernels.Geometry(local_size=local_size))
    fresh = cl.CommandQueue(cl.Context([queue.device]))  # kernels are built once per context
    grads = [np.ones(n, F32) for n in (5, 37)]
    grads[0][[0, 4]] = np.nan
    grads[1][[3, 11, 36]] = np.inf
    params = [Parameter(cl_array.zeros(fresh, g.size, F32), cl_array.to_device(fresh, g)) for g in grads]
    opt = SGD(params, lr=0.5, nonfinite="count")
    opt.step()
    assert opt.skipped_nonfinite() == 5
    np.testing.assert_array_equal(params[1].data.get()[[0, 1, 2]], -0.5)


def test_torch_module_parameters_are_checked_once_while_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's `parameter.data` is a new tensor at each access: the same memory is known
    # as such (the checks are skipped), and a parameter given new memory is checked again
    import torch

    import netcl._backends.array_api as array_api

    layer = torch.nn.Linear(4, 3)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    opt = RMSProp(list(layer.parameters()), lr=0.1)
    checks: list[int] = []
    original = array_api.ArrayAPIBackend.check_param

    def counting(self: Any, data: Any, where: str) -> None:
        checks[-1] += 1
        original(self, data, where)

    monkeypatch.setattr(array_api.ArrayAPIBackend, "check_param", counting)
    for k in range(4):
        if k == 3:
            layer.weight.data = torch.zeros(3, 4)  # new memory
        checks.append(0)
        opt.step()
    assert checks == [2, 2, 0, 1]  # (the second step checks the new state buffers)
    assert torch.all(layer.weight.detach() != 0)


# --- 12. devices whose compiler cannot build ------------------------------------------------
# (PoCL 3.0 with LLVM 14, as pyopencl's wheel bundles it, lists an AMD Zen 5 as a device
# and answers every build with "unknown target CPU 'generic'")


def test_the_probe_builds_on_the_tests_device(queue: cl.CommandQueue) -> None:
    assert netcl.device.compile_failure(queue.device) is None


class _Listing:
    """A platform listing the same real device twice."""

    def __init__(self, device: cl.Device) -> None:
        self.device = device

    def get_devices(self, device_type: int = cl.device_type.ALL) -> list[cl.Device]:
        return [self.device, self.device]


def test_the_default_device_is_the_first_whose_compiler_builds(
    queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)
    monkeypatch.setattr(cl, "get_platforms", lambda: [_Listing(queue.device)])
    answers = ["error: unknown target CPU 'generic'", None]
    asked: list[cl.Device] = []

    def probe(device: cl.Device) -> str | None:
        asked.append(device)
        return answers[len(asked) - 1]

    monkeypatch.setattr(netcl.device, "compile_failure", probe)
    chosen = netcl.device.create_queue()
    assert len(asked) == 2 and chosen.device == queue.device
    # without a device that builds: an error that names each device and the cure
    answers[1] = "error: unknown target CPU 'generic'"
    asked.clear()
    with pytest.raises(RuntimeError, match=r"no OpenCL device here compiles a kernel: .*generic.*; .*newer PoCL"):
        netcl.device.create_queue()


def test_pyopencl_ctx_is_the_users_choice_and_is_not_probed(
    queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    platforms = cl.get_platforms()
    where = next(
        f"{i}:{j}" for i, p in enumerate(platforms) for j, d in enumerate(p.get_devices()) if d == queue.device
    )
    monkeypatch.setenv("PYOPENCL_CTX", where)
    monkeypatch.setattr(netcl.device, "compile_failure", lambda device: pytest.fail("probed"))
    assert netcl.device.create_queue().device == queue.device


def test_host_arrays_take_the_array_api_maths_where_no_cpu_device_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [Parameter(np.full(LARGE, 2.0, F32), np.full(LARGE, 0.5, F32))]
    RMSProp(expected, lr=0.01, momentum=0.9).step()  # (the fused kernel on the host device)
    assert host.host_queue() is not None
    failing = "error: unknown target CPU 'generic'"
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)
    monkeypatch.setattr(netcl.device, "compile_failure", lambda device: failing)
    monkeypatch.setattr(host, "compile_failure", lambda device: failing)
    host.host_queue.cache_clear()
    try:
        assert host.host_queue() is None
        params = [Parameter(np.full(LARGE, 2.0, F32), np.full(LARGE, 0.5, F32))]
        RMSProp(params, lr=0.01, momentum=0.9).step()
        np.testing.assert_array_equal(params[0].data, expected[0].data)  # (the paths agree bit for bit)
    finally:
        host.host_queue.cache_clear()
