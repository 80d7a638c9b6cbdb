"""Adversarial runs and a fuzz test over every optimizer and flag combination.

- A long adversarial run: gradients from 1e-30 up to the dtype's largest value, exact
  zeros, large learning rates and weight decay; no parameter or state value may become
  NaN or infinite (200 steps per combination; 20,000 with `pytest --long`).
- A fuzz test (hypothesis; 30 examples, 2,000 with `--long`): random valid
  hyperparameters, edits of `param_groups` between steps (valid and not), gradients with
  NaN, infinities and extremes. A rejected step changes nothing, nothing becomes
  non-finite, and the fused kernel and the array-API path agree bit for bit.
- A fuzz test of kept plans (200 examples, 2,000 with `--long`): after a step that kept
  its plan, random changes of gradients, parameter arrays, state dicts, step counts, the
  optimizer's `state`, hyperparameters and the param group's list of parameters, in
  every way; each step gives the bits of a step planned afresh. Likewise for host
  arrays (150 examples): numpy and torch, on either path, with torch's moves of a tensor
  to other memory in place.
"""

from __future__ import annotations

import unittest.mock
from typing import Any, cast

import hypothesis.extra.numpy as hnp
import ml_dtypes
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netcl import Parameter, flat_parameters
from netcl._writes import PARAMETER_WRITE, STATE_WRITE
from netcl.optim.optimizer import Optimizer
from tests.test_optimizers import CASES, FLAT, FLAT_IDS, Case

DTYPES = [np.float32, np.float64]
EXTREME_DTYPES = [*DTYPES, np.float16, ml_dtypes.bfloat16]
"""(half parameters too: their float32 update's result saturates at their largest value)"""


def _extreme(rng: np.random.Generator, n: int, dtype: Any) -> Any:
    """Heavy-tailed finite gradients up to the dtype's largest value, with exact zeros."""
    largest = float(ml_dtypes.finfo(dtype).max)  # type: ignore[no-untyped-call]
    exponent = rng.uniform(-30, np.log10(largest), n)
    g = rng.choice([-1.0, 1.0], n) * 10.0**exponent
    g[rng.random(n) < 0.2] = 0.0
    g[rng.random(n) < 0.05] = largest
    return np.clip(g, -largest, largest).astype(dtype)


def _host(x: Any) -> Any:
    return x.get() if isinstance(x, cl_array.Array) else np.asarray(x)


def _finite(opt: Optimizer[Any, Any, Any, Any], param: Parameter[Any]) -> bool:
    arrays = [_host(param.data)] + [_host(v) for k, v in opt.state[id(param)].items() if k != "step"]
    return all(bool(np.isfinite(a).all()) for a in arrays)


# every optimizer and flag combination in float32 and float64; for the half dtypes, whose
# kernels differ from float32's in their loads and stores only, each optimizer's plain
# variant and the one with every flag on (each kernel built costs the suite a second)
_HALF_CASES = [(case, flags) for case in CASES for flags in (case.flags[0], case.flags[-1])]
EXTREME_CASES = [(case, flags, dtype) for case, flags in FLAT for dtype in DTYPES] + [
    (case, flags, dtype) for case, flags in _HALF_CASES for dtype in EXTREME_DTYPES[2:]
]
EXTREME_IDS = [
    f"{FLAT_IDS[next(k for k, (c, f) in enumerate(FLAT) if c is case and f is flags)]}-{np.dtype(dtype).name}"
    for case, flags, dtype in EXTREME_CASES
]


@pytest.mark.parametrize(("case", "flags", "dtype"), EXTREME_CASES, ids=EXTREME_IDS)
def test_finite_gradients_never_make_a_value_non_finite(
    case: Case, flags: dict[str, Any], dtype: Any, long_run: bool, queue: cl.CommandQueue
) -> None:
    rng = np.random.default_rng(14)
    n = 64
    steps = 20_000 if long_run else 200
    big = dict(flags, weight_decay=1e3) if flags.get("weight_decay") else flags
    # (half parameters on the device: their kernel's conversions are what this tests;
    # numpy's maths are held to it bit for bit in tests/test_half.py)
    half = np.dtype(dtype).itemsize == 2

    def make(values: Any) -> Any:
        return cl_array.to_device(queue, values) if half else values

    param = Parameter(make(_extreme(rng, n, dtype)))
    opt = case.ours([param], lr=10.0, nonfinite="count", **big)
    for k in range(steps):
        param.grad = make(_extreme(rng, n, dtype))
        opt.step()
        if k % 50 == 0 or k == steps - 1:
            assert _finite(opt, param), f"a non-finite value at step {k + 1}"
    assert opt.skipped_nonfinite() == 0


def _hyper(case: Case, data: st.DataObject) -> dict[str, Any]:
    flags = dict(data.draw(st.sampled_from(case.flags)))
    flags["lr"] = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0]))
    if flags.get("weight_decay"):
        flags["weight_decay"] = data.draw(st.sampled_from([1e-2, 1.0, 1e3]))
    return flags


EDITS: dict[str, tuple[list[object], list[object]]] = {
    # key: (valid values, invalid values)
    "lr": ([1e-4, 0.5, 3.0], [-1.0, float("nan"), float("inf"), "0.1", None, 1e39]),
    "eps": ([1e-6, 1e-3], [0.0, -1.0, 1e-50]),
    "maximize": ([True, False], ["False", 1]),
}


@given(data=st.data())
def test_fuzz_steps_and_edits(data: st.DataObject, queue: cl.CommandQueue) -> None:
    case = data.draw(st.sampled_from(CASES), label="optimizer")
    dtype: Any = data.draw(st.sampled_from(DTYPES), label="dtype")
    hyper = _hyper(case, data)
    p0 = data.draw(hnp.arrays(dtype, 8, elements=st.floats(-1e6, 1e6, width=32)), label="param")
    fused = Parameter(cl_array.to_device(queue, p0))
    host = Parameter(p0.copy())
    optimizers = [case.ours([fused], nonfinite="count", **hyper), case.ours([host], nonfinite="count", **hyper)]
    elements = st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, float(np.finfo(dtype).max), -float(np.finfo(dtype).max), 1e-30]),
    )
    for _ in range(data.draw(st.integers(1, 5), label="steps")):
        grad = data.draw(hnp.arrays(dtype, 8, elements=elements), label="grad")
        fused.grad, host.grad = cl_array.to_device(queue, grad), grad.copy()
        edit = data.draw(st.sampled_from([None, *EDITS]), label="edit")
        valid = True
        if edit is not None and edit in optimizers[0].param_groups[0]:
            good, bad = EDITS[edit]
            valid = data.draw(st.booleans(), label="valid edit")
            value = data.draw(st.sampled_from(good if valid else bad), label="value")
            for opt in optimizers:
                opt.param_groups[0][edit] = value
        before = [fused.data.get().tobytes(), host.data.tobytes()]
        outcomes: list[type[Exception] | None] = []
        for opt in optimizers:
            try:
                opt.step()
                outcomes.append(None)
            except (TypeError, ValueError) as error:
                outcomes.append(type(error))
        assert outcomes[0] == outcomes[1]
        if outcomes[0] is not None:
            assert not valid
            assert [fused.data.get().tobytes(), host.data.tobytes()] == before, "a rejected step changed something"
            for opt in optimizers:
                opt.param_groups[0][edit] = EDITS[edit][0][0]  # type: ignore[index]
            continue
        assert fused.data.get().tobytes() == host.data.tobytes()
        assert np.isfinite(host.data).all()
        for name, value in optimizers[1].state.get(id(host), {}).items():
            if name != "step":
                assert np.isfinite(value).all(), name
                assert optimizers[0].state[id(fused)][name].get().tobytes() == value.tobytes(), name
    assert optimizers[0].skipped_nonfinite() == optimizers[1].skipped_nonfinite()


_CHANGES = [
    "nothing",
    "new gradient",
    "no gradient",
    "new parameter array",
    "state[name] = copy",
    "state.update(copy)",
    "state |= copy",
    "del state[name]",
    "state.clear()",
    "optimizer.state.pop",
    "optimizer.state[param] = dict",
    "load_state_dict",
    "new gradient, then a step that raises",
    "state['step'] = another count",
    "lr halved",
    "maximize toggled",
    "momentum or amsgrad toggled",
    "params.reverse()",
    "params.pop(k), then append",
    "params.pop(k)",
    "params[k] = params[k]",
    "params[k] = a copy of it",
    "params[k] = the spare",
    "add_param_group(the spare)",
    "group['params'] = plain list",
]


def _change(change: str, opt: Optimizer[Any, Any, Any, Any], params: list[Any], k: int, queue: Any) -> None:
    """Apply `change` to parameter `k` of `opt` (whose parameters are `params`, but the
    last, a spare)."""
    param = params[k]
    state = opt.state.get(id(param))
    buffers = sorted(name for name in (state or {}) if name != "step")
    if change.startswith("new gradient"):
        param.grad = cl_array.to_device(queue, np.linspace(-1, 1, param.data.size).astype(np.float32) * (k + 1))
        if change.endswith("raises") and state and "step" in state:  # (it takes the new gradient, then writes nothing)
            count = state["step"]
            state["step"] = -1
            with pytest.raises(ValueError, match=r"state\['step'\] of param_groups\[0\]\['params'\]"):
                opt.step()
            state["step"] = count
    elif change == "no gradient":
        param.grad = None
    elif change == "new parameter array":
        param.data = param.data.copy()
    elif change == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
    elif change == "params[k] = the spare":  # (another parameter the test made: `params[-1]`)
        group = opt.param_groups[0]["params"]
        if k < len(group) and all(p is not params[-1] for g in opt.param_groups for p in g["params"]):
            group[k] = params[-1]
    elif change == "add_param_group(the spare)":
        if all(p is not params[-1] for group in opt.param_groups for p in group["params"]):
            opt.add_param_group({"params": [params[-1]], "lr": 3e-3})
    elif change in _GROUP_CHANGES:
        _GROUP_CHANGES[change](opt.param_groups[0], k)
    elif change == "state['step'] = another count":
        if state and "step" in state:
            state["step"] += 3  # (the parameters' counts differ: a run breaks there)
    elif state is None or not buffers:
        return
    elif change == "state[name] = copy":
        state[buffers[0]] = state[buffers[0]].copy()
    elif change == "state.update(copy)":
        state.update({name: state[name].copy() for name in buffers})
    elif change == "state |= copy":
        state |= {buffers[-1]: state[buffers[-1]].copy()}
    elif change == "del state[name]":
        del state[buffers[0]]
    elif change == "state.clear()":
        state.clear()
    elif change == "optimizer.state.pop":
        opt.state.pop(param)
    elif change == "optimizer.state[param] = dict":
        opt.state[param] = {name: value.copy() if name != "step" else value for name, value in state.items()}


def _toggled(group: dict[str, Any], names: tuple[str, ...]) -> None:
    """Toggle the first of `names` that the group has (momentum: 0 <-> 0.9)."""
    for name in names:
        if name == "momentum" and name in group and not group.get("nesterov"):
            group[name] = 0.9 if group[name] == 0 else 0.0
            return
        if name in group and isinstance(group[name], bool):
            group[name] = not group[name]
            return


def _moved(params: list[Any], k: int) -> None:
    if k < len(params):
        params.append(params.pop(k))


def _set(params: list[Any], k: int, new: Any) -> None:
    if k < len(params):
        params[k] = new(params[k])


def _copied(param: Parameter[Any]) -> Parameter[Any]:
    """A new parameter with copies of `param`'s arrays."""
    return Parameter(param.data.copy(), None if param.grad is None else param.grad.copy())


_GROUP_CHANGES: dict[str, Any] = {
    "lr halved": lambda group, k: group.update(lr=group["lr"] / 2),
    "maximize toggled": lambda group, k: _toggled(group, ("maximize",)),
    "momentum or amsgrad toggled": lambda group, k: _toggled(group, ("momentum", "amsgrad")),
    "params.reverse()": lambda group, k: group["params"].reverse(),
    "params.pop(k), then append": lambda group, k: _moved(group["params"], k),
    "params.pop(k)": lambda group, k: group["params"].pop(k) if k < len(group["params"]) else None,
    "params[k] = params[k]": lambda group, k: _set(group["params"], k, lambda p: p),
    "params[k] = a copy of it": lambda group, k: _set(group["params"], k, _copied),
    "group['params'] = plain list": lambda group, k: group.update(params=list(group["params"])),
}
"""Changes of the param group (its hyperparameters and its list of parameters), made
alike in the kept optimizer and the reference."""


# (a change is one of 25, each after a kept plan: more examples than the profile's 30)
@settings(max_examples=max(200, settings().max_examples))
@given(data=st.data())
def test_fuzz_kept_plans_follow_every_change(data: st.DataObject, queue: cl.CommandQueue) -> None:
    """Whatever changes between steps (gradients, parameter arrays, state dicts, step
    counts, the optimizer's `state`, hyperparameters and the group's list of parameters,
    in every way), a step that keeps its plan and launches gives
    the bits of a step planned afresh (an optimizer whose caches are emptied before
    every step), with parameters in their own arrays or in one run (`flat_parameters`)."""
    case = data.draw(st.sampled_from(CASES), label="optimizer")
    flat = data.draw(st.booleans(), label="flat")
    sizes = (5, 300, 7, 20)  # (the last: a spare parameter, which a change may put in the group)
    worlds = []
    for _ in range(2):
        params = (
            flat_parameters(queue, [(n,) for n in sizes])
            if flat
            else [Parameter(cl_array.zeros(queue, n, np.float32), cl_array.zeros(queue, n, np.float32)) for n in sizes]
        )
        for p, n in zip(params, sizes, strict=True):
            p.data.set(np.linspace(1, 2, n).astype(np.float32))
            cast(cl_array.Array, p.grad).set(np.linspace(-0.5, 0.5, n).astype(np.float32))
        worlds.append((case.ours(params[:-1], lr=1e-2), params))
    (kept, kept_params), (fresh, fresh_params) = worlds
    for count in range(2 + data.draw(st.integers(1, 6), label="steps")):
        # (two steps without changes first: the second keeps the first's plan)
        change = data.draw(st.sampled_from(_CHANGES), label="change") if count >= 2 else "nothing"
        k = data.draw(st.integers(0, len(sizes) - 2), label="parameter")
        _change(change, kept, kept_params, k, queue)
        give_back = kept_params[k].grad is None and data.draw(st.booleans(), label="give it back")
        if give_back:
            kept_params[k].grad = cl_array.to_device(queue, np.full(sizes[k], 0.25, np.float32))
        # the reference's own writes (its changes, and its state dicts, all of them new
        # at each of its steps) would show the kept optimizer a change at every step: it
        # sees its own only
        seen = (STATE_WRITE[0], PARAMETER_WRITE[0])
        _change(change, fresh, fresh_params, k, queue)
        if give_back:
            fresh_params[k].grad = cl_array.to_device(queue, np.full(sizes[k], 0.25, np.float32))
        _step_alike((kept, kept_params), (fresh, fresh_params), seen)


def _step_alike(kept: tuple[Any, list[Any]], fresh: tuple[Any, list[Any]], seen: tuple[int, int]) -> None:
    """Step the kept optimizer and the reference (its caches emptied first), the kept
    one seeing the write tokens `seen`, and compare their parameters' and states' bits."""
    fresh[0]._kept.clear()
    fresh[0]._checked.clear()
    fresh[0].step()
    STATE_WRITE[0], PARAMETER_WRITE[0] = seen
    kept[0].step()
    for a, b in zip(kept[1], fresh[1], strict=True):
        assert _bytes(a.data) == _bytes(b.data)
        sa, sb = kept[0].state.get(id(a), {}), fresh[0].state.get(id(b), {})
        assert sorted(sa) == sorted(sb)
        for name in sa:
            assert sa[name] == sb[name] if name == "step" else _bytes(sa[name]) == _bytes(sb[name]), name


def _bytes(x: Any) -> bytes:
    return bytes(_host(x).tobytes())


_HOST_CHANGES = [
    "nothing",
    "new gradient",
    "gradient written in place",
    "gradient: a view into a bigger array",
    "no gradient",
    "new parameter array",
    "parameter moved in place",
    "state tensor moved in place",
    "gradient moved in place",
    "state[name] = copy",
    "del state[name]",
    "optimizer.state.pop",
    "load_state_dict",
    "state['step'] = another count",
    "lr halved",
]
"""Changes between steps of host arrays; "moved in place" (`set_`: the same object in
other memory) for torch tensors only, which can."""


def _host_change(change: str, opt: Optimizer[Any, Any, Any, Any], params: list[Any], k: int, torch_: bool) -> None:
    """Apply `change` to parameter `k` (of `params`, `opt`'s) of numpy or torch arrays."""
    import torch

    param = params[k]
    n = int(np.prod(param.data.shape))
    values = np.linspace(-1, 1, n).astype(np.float32) * (k + 1)
    new = torch.tensor if torch_ else np.array
    state = opt.state.get(id(param))
    buffers = sorted(name for name in (state or {}) if name != "step")

    def moved(x: Any) -> None:
        if torch_:
            copy = x.clone()
            x.set_(copy.untyped_storage(), 0, copy.shape, copy.stride())

    if change == "new gradient":
        param.grad = new(values)
    elif change == "gradient written in place" and param.grad is not None:
        param.grad[...] = new(values)
    elif change == "gradient: a view into a bigger array":
        bigger = new(np.concatenate([np.zeros(3, np.float32), values]))
        param.grad = bigger[3:]
    elif change == "no gradient":
        param.grad = None
    elif change == "new parameter array":
        param.data = param.data.clone() if torch_ else param.data.copy()
    elif change == "parameter moved in place":
        moved(param.data)
    elif change == "gradient moved in place" and param.grad is not None:
        moved(param.grad)
    elif change == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
    elif change == "lr halved":
        opt.param_groups[0]["lr"] /= 2
    elif state is None:
        return
    elif change == "state['step'] = another count":
        state["step"] += 3
    elif change == "optimizer.state.pop":
        opt.state.pop(param)
    elif not buffers:
        return
    elif change == "state tensor moved in place":
        moved(state[buffers[0]])
    elif change == "state[name] = copy":
        state[buffers[0]] = state[buffers[0]].clone() if torch_ else state[buffers[0]].copy()
    elif change == "del state[name]":
        del state[buffers[0]]


@settings(max_examples=max(150, settings().max_examples))
@given(data=st.data())
def test_fuzz_kept_host_plans_follow_every_change(data: st.DataObject) -> None:
    """As `test_fuzz_kept_plans_follow_every_change`, for host arrays on either path
    (numpy arrays, alone or in one run, and torch tensors, as `netcl.Parameter`s or
    torch's own parameters): whatever changes between steps, each step gives the bits of
    a step planned afresh."""
    import torch

    from netcl._backends import host

    case = data.draw(st.sampled_from(CASES), label="optimizer")
    kind = data.draw(st.sampled_from(["numpy", "numpy flat", "torch", "torch.nn.Parameter"]), label="kind")
    path = data.draw(st.sampled_from(["kernel", "array-api"]), label="path")
    torch_ = kind.startswith("torch")
    sizes = (5, 300, 7)
    worlds = []
    for _ in range(2):
        starts = [np.linspace(1, 2, n).astype(np.float32) for n in sizes]
        grads = [np.linspace(-0.5, 0.5, n).astype(np.float32) for n in sizes]
        params: list[Any]
        if kind == "numpy flat":
            params = flat_parameters(None, [(n,) for n in sizes])
            for p, start, grad in zip(params, starts, grads, strict=True):
                p.data[...], cast(Any, p.grad)[...] = start, grad
        elif kind == "numpy":
            params = [Parameter(start, grad) for start, grad in zip(starts, grads, strict=True)]
        elif kind == "torch":
            params = [Parameter(torch.tensor(s), torch.tensor(g)) for s, g in zip(starts, grads, strict=True)]
        else:
            params = [torch.nn.Parameter(torch.tensor(s)) for s in starts]
            for p, grad in zip(params, grads, strict=True):
                p.grad = torch.tensor(grad)
        worlds.append((case.ours(params, lr=1e-2), params))
    (kept, kept_params), (fresh, fresh_params) = worlds
    with unittest.mock.patch.object(host, "PATH", path), torch.no_grad():
        for count in range(2 + data.draw(st.integers(1, 6), label="steps")):
            change = data.draw(st.sampled_from(_HOST_CHANGES), label="change") if count >= 2 else "nothing"
            k = data.draw(st.integers(0, len(sizes) - 1), label="parameter")
            _host_change(change, kept, kept_params, k, torch_)
            seen = (STATE_WRITE[0], PARAMETER_WRITE[0])  # (as in the test above)
            _host_change(change, fresh, fresh_params, k, torch_)
            _step_alike((kept, kept_params), (fresh, fresh_params), seen)
