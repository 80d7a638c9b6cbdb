"""netcl's own paths agree bit for bit, step after step: the fused kernel on the device,
the fused kernel on host arrays, the array-API path; one launch over many parameters, a
launch per parameter, one optimizer per parameter."""

from __future__ import annotations

import struct
from typing import Any, cast

import array_api_strict
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

import netcl._backends.host as host_backend
import netcl._backends.opencl as opencl_backend
import netcl._kernels as kernels
from netcl import Parameter
from netcl.optim import Adam, RMSProp
from tests.reference import FLAG_COMBINATIONS, flag_id

MAKERS: dict[str, Any] = {
    "pyopencl": (lambda q, a: cl_array.to_device(q, a), lambda x: x.get()),
    "numpy": (lambda q, a: np.array(a, copy=True), lambda x: np.array(x, copy=True)),
    "array_api_strict": (lambda q, a: array_api_strict.asarray(np.array(a, copy=True)), lambda x: np.asarray(x).copy()),
}


def _trajectory(kind: str, queue: cl.CommandQueue, dtype: Any, flags: dict[str, Any], steps: int = 6) -> list[bytes]:
    make, get = MAKERS[kind]
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal((13, 7)).astype(dtype)
    param = Parameter(make(queue, p0))
    opt = RMSProp([param], lr=1e-2, **flags)
    out = []
    for _ in range(steps):
        param.grad = make(queue, (rng.standard_normal((13, 7)) * 10.0 ** rng.uniform(-3, 2)).astype(dtype))
        opt.step()
        out.append(get(param.data).tobytes())
        out += [get(v).tobytes() for k, v in sorted(opt.state[id(param)].items()) if k != "step"]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=[flag_id(f) for f in FLAG_COMBINATIONS])
def test_fused_kernel_and_array_api_path_agree_bitwise(
    dtype: Any, flags: dict[str, Any], queue: cl.CommandQueue
) -> None:
    fused = _trajectory("pyopencl", queue, dtype, flags)
    assert fused == _trajectory("numpy", queue, dtype, flags)
    assert fused == _trajectory("array_api_strict", queue, dtype, flags)


def test_one_launch_a_launch_each_and_an_optimizer_each_agree(
    queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    # 20 parameters: a launch of 16 and one of 4, each picking its arrays per work-group
    sizes = [1, 7, 64, 1000, 4099, 3, 20_000, *(int(n) for n in rng.integers(1, 3000, 13))]
    starts = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(4)]

    def run(mode: str) -> list[bytes]:
        params = [Parameter(cl_array.to_device(queue, s)) for s in starts]
        optimizers = (
            [RMSProp([p], lr=1e-2, momentum=0.9) for p in params]
            if mode == "each optimizer"
            else [RMSProp(params, lr=1e-2, momentum=0.9)]
        )
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = cl_array.to_device(queue, g)
            for opt in optimizers:
                opt.step()
        return [p.data.get().tobytes() for p in params]

    together = run("one launch")
    monkeypatch.setattr(opencl_backend, "max_slots", lambda device, spec, shared=False: 1)
    assert run("a launch each") == together
    assert run("each optimizer") == together


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list whose last number counts the kernels enqueued from now on (append a 0 to
    start a new count)."""
    launches: list[int] = []
    enqueue = cl.enqueue_nd_range_kernel

    def counted(*args: Any, **kwargs: Any) -> Any:
        launches[-1] += 1
        return enqueue(*args, **kwargs)

    monkeypatch.setattr(cl, "enqueue_nd_range_kernel", counted)
    return launches


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("SGD", {}),
        ("SGD", {"momentum": 0.9}),
        ("RMSProp", {}),
        ("RMSProp", {"momentum": 0.9, "centered": True}),
        ("Adam", {}),
        ("Adam", {"amsgrad": True}),
    ],
    ids=["sgd", "sgd-momentum", "rmsprop", "rmsprop-centered", "adam", "amsgrad"],
)
@pytest.mark.parametrize("state", ["made", "own"])
def test_a_launch_of_the_most_parameters_the_device_allows_agrees(
    name: str, flags: dict[str, Any], state: str, queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launch of `max_slots` parameters (as many as the device's bytes of kernel
    arguments allow: the kernel at that limit builds and runs) and one of the rest give
    the bits of a launch per parameter and of the array-API path, on pyopencl arrays and
    on numpy arrays: with the state netcl makes (one buffer per state name, which a
    launch takes once: more parameters) and with state buffers of their own (which a
    launch takes per parameter)."""
    from netcl import optim
    from netcl._update import Step

    cls = getattr(optim, name)
    hyper = {n: cls.hyperparameters[n](n, v) for n, v in {**cls([Parameter(np.zeros(1))]).defaults, **flags}.items()}
    spec = Step(cls.rule, hyper).kernel
    one_state = state == "made" and bool(spec.buffers)
    limit = kernels.max_slots(queue.device, spec, one_state)
    assert limit > 8  # (PoCL's 1,024 bytes: 11 to 32 parameters by the variant)
    rng = np.random.default_rng(21)
    sizes = [int(n) for n in rng.integers(1, 700, limit + 3)]
    starts = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(4)]
    launches = _count_launches(monkeypatch)

    def run(kind: str) -> list[bytes]:
        make, get = MAKERS[kind]
        params = [Parameter(make(queue, s)) for s in starts]
        opt = cls(params, lr=1e-2, **flags)
        for k, step in enumerate(grads):
            for p, g in zip(params, step, strict=True):
                p.grad = make(queue, g)
            if k == 1 and state == "own":  # (a copy of each state buffer, in its place)
                for p in params:
                    entry = opt.state[p]
                    for buffer in spec.buffers:
                        entry[buffer] = make(queue, get(entry[buffer]))
            launches.append(0)
            opt.step()
        return [get(p.data).tobytes() for p in params]

    together = run("pyopencl")
    assert launches[2:] == [2, 2]
    monkeypatch.setattr(host_backend, "PATH", "kernel")  # (numpy arrays: the fused kernel, launched alike)
    assert run("numpy") == together
    assert launches[-2:] == [2, 2]
    monkeypatch.setattr(opencl_backend, "max_slots", lambda device, spec, shared=False: 1)
    assert run("pyopencl") == together
    monkeypatch.setattr(host_backend, "PATH", "array-api")  # (no kernel at all)
    assert run("numpy") == together


def test_a_replaced_parameter_array_is_followed_or_refused(queue: cl.CommandQueue) -> None:
    param = Parameter(
        cl_array.to_device(queue, np.ones(5, np.float32)), cl_array.to_device(queue, np.ones(5, np.float32))
    )
    opt = RMSProp([param], lr=0.1)
    opt.step()
    # the same shape: the new array is updated, with the parameter's state
    param.data = cl_array.to_device(queue, np.full(5, 2.0, np.float32))
    opt.step()
    assert (param.data.get() < 2.0).all() and opt.state[id(param)]["step"] == 2
    # another shape: refused, nothing changes
    param.data = cl_array.to_device(queue, np.ones(6, np.float32))
    param.grad = cl_array.to_device(queue, np.ones(6, np.float32))
    with pytest.raises(
        ValueError, match=r"state\['square_avg'\] of param_groups\[0\]\['params'\]\[0\] has shape \(5,\)"
    ):
        opt.step()
    assert (param.data.get() == 1.0).all()


def test_state_is_never_picked_up_by_a_new_object(queue: cl.CommandQueue) -> None:
    """The optimizer holds its parameters, so no other object can take over their id()."""
    opt = RMSProp([Parameter(np.ones(3, np.float32), np.ones(3, np.float32))])
    opt.step()
    (key,) = opt.state
    newcomers = [Parameter(np.ones(3, np.float32)) for _ in range(1000)]
    assert all(id(p) != key for p in newcomers)
    assert id(opt.param_groups[0]["params"][0]) == key


def _changing_run(kind: str, queue: cl.CommandQueue) -> list[bytes]:
    """Steps between which every object a step is planned from changes, one at a time."""
    make, get = MAKERS[kind]
    rng = np.random.default_rng(12)

    def array(n: int, scale: float = 1.0) -> Any:
        return make(queue, (rng.standard_normal(n) * scale).astype(np.float32))

    params = [Parameter(array(n), array(n)) for n in (5, 300, 7)]
    opt = RMSProp(params, lr=1e-2)
    out: list[bytes] = []

    def step() -> None:
        opt.step()
        for p in opt.param_groups[0]["params"]:
            out.append(get(p.data).tobytes())
            out.extend(get(v).tobytes() for k, v in sorted(opt.state.get(id(p), {}).items()) if k != "step")

    step()
    step()  # the same objects: the last step's plan
    params[1].grad = array(300)  # a new gradient array
    step()
    params[0].grad = None  # a parameter without a gradient is skipped
    step()
    params[0].grad = array(5)
    step()
    opt.state[id(params[2])]["square_avg"] = make(queue, np.full(7, 5.0, np.float32))  # a new state buffer
    step()
    saved = opt.state_dict()
    newcomer = Parameter(array(11), array(11))
    opt.param_groups[0]["params"].append(newcomer)  # the same list, one more parameter
    step()
    opt.param_groups[0]["momentum"] = 0.9  # another variant: a buffer more
    step()
    step()
    opt.param_groups[0]["params"].pop()
    opt.load_state_dict(saved)  # new state dicts and buffers
    step()
    params[2].data = array(7)  # a new parameter array
    step()
    return out


def test_a_step_reuses_the_last_plan_only_while_nothing_changed(queue: cl.CommandQueue) -> None:
    """The fused kernel (whose steps reuse their plan while the arrays stay the same)
    and the array-API path (which plans every step) agree bit for bit through changes
    of every object a plan is made from."""
    fused = _changing_run("pyopencl", queue)
    assert fused == _changing_run("numpy", queue)
    assert fused == _changing_run("array_api_strict", queue)


def _adam_run(kind: str, queue: cl.CommandQueue) -> list[bytes]:
    """Adam steps whose kernel arguments change in every way between steps: the
    learning rate, the bias corrections (the parameters' own scalars), step counts
    that part (a parameter skipped once), new gradient arrays."""
    make, get = MAKERS[kind]
    rng = np.random.default_rng(5)

    def array(n: int) -> Any:
        return make(queue, rng.standard_normal(n).astype(np.float32))

    params = [Parameter(array(n), array(n)) for n in (5, 300, 7, 40)]
    opt = Adam(params, lr=1e-2)
    out: list[bytes] = []
    for k in range(7):
        opt.param_groups[0]["lr"] = 1e-2 / (k + 1)
        if k == 2:
            params[1].grad = array(300)
        params[2].grad = None if k == 3 else array(7)
        opt.step()
        out += [get(p.data).tobytes() for p in params]
    return out


def _replace_entry(opt: Any, param: Any, x: Any) -> None:
    opt.state[param] = {"step": opt.state[param]["step"], "square_avg": x}


# every way a state dict (or the optimizer's `state`) can change between steps: each
# leaves the third parameter with the buffer `x` (None: with no state, so a step makes
# new zeros)
_STATE_CHANGES: dict[str, Any] = {
    "entry[name] = x": lambda opt, p, x: opt.state[p].__setitem__("square_avg", x),
    "entry.update": lambda opt, p, x: opt.state[p].update(square_avg=x),
    "entry |= ": lambda opt, p, x: opt.state[p].__ior__({"square_avg": x}),
    "entry.pop, setdefault": lambda opt, p, x: (
        opt.state[p].pop("square_avg"),
        opt.state[p].setdefault("square_avg", x),
    ),
    "del entry[name]": lambda opt, p, x: opt.state[p].__delitem__("square_avg"),
    "entry.popitem": lambda opt, p, x: opt.state[p].popitem(),
    "entry.clear": lambda opt, p, x: opt.state[p].clear(),
    "state[param] = dict": _replace_entry,
    "state.update": lambda opt, p, x: opt.state.update({id(p): {"step": 2, "square_avg": x}}),
    "state |= ": lambda opt, p, x: opt.state.__ior__({id(p): {"step": 2, "square_avg": x}}),
    "state.pop": lambda opt, p, x: opt.state.pop(p),
    "del state[param]": lambda opt, p, x: opt.state.__delitem__(p),
    "state.popitem": lambda opt, p, x: opt.state.popitem(),
    "state.clear": lambda opt, p, x: opt.state.clear(),
}
_STATE_KEEPS_X = {
    "entry[name] = x",
    "entry.update",
    "entry |= ",
    "entry.pop, setdefault",
    "state[param] = dict",
    "state.update",
    "state |= ",
}


@pytest.mark.parametrize("change", list(_STATE_CHANGES))
def test_a_step_sees_every_change_to_the_state_dicts(change: str, queue: cl.CommandQueue) -> None:
    """A plan whose state dicts are unchanged skips comparing them buffer by buffer;
    each way of changing them between two steps is seen: the step updates the buffer
    the state holds now (or, with none, new zeros), never the one it held before."""
    rng = np.random.default_rng(21)
    params = [Parameter(cl_array.to_device(queue, rng.standard_normal(n).astype(np.float32))) for n in (5, 300, 7)]
    for p in params:
        p.grad = cl_array.to_device(queue, rng.standard_normal(p.data.shape).astype(np.float32))
    opt = RMSProp(params, lr=1e-2)
    opt.step()
    opt.step()  # the same objects: the last step's plan, its state dicts compared and the same
    third = params[2]
    old = cast(cl_array.Array, opt.state[third]["square_avg"])
    before = old.get()
    x = cl_array.to_device(queue, np.full(7, 5.0, np.float32))
    _STATE_CHANGES[change](opt, third, x)
    opt.step()
    g = cast(cl_array.Array, third.grad).get().astype(np.float64)
    if change in _STATE_KEEPS_X:
        assert opt.state[third]["square_avg"] is x
        expected = 0.99 * 5.0 + 0.01 * g * g
    else:  # no state left for it: the step starts it from zeros, in a buffer of its own
        assert opt.state[third]["square_avg"] is not old
        expected = 0.01 * g * g
    # (the float32 update against float64 arithmetic: a few float32 ulps; the outcomes
    # this tells apart are far apart: 5.0 left in `x`, 4.95 + 0.01 g^2, or 0.01 g^2)
    np.testing.assert_allclose(cast(cl_array.Array, opt.state[third]["square_avg"]).get(), expected, rtol=5e-7)
    if change not in ("state.popitem", "state.clear"):  # (which also drop others' state)
        assert np.array_equal(old.get(), before) or opt.state[third]["square_avg"] is old


def test_a_state_that_lost_its_step_count_is_refused_and_nothing_changes(queue: cl.CommandQueue) -> None:
    """A state dict with buffers but no `step` cannot be continued (the count steers the
    update): the step raises ValueError naming it, and writes nothing."""
    params = [Parameter(cl_array.to_device(queue, np.ones(n, np.float32))) for n in (5, 7)]
    for p in params:
        p.grad = cl_array.to_device(queue, np.full(p.data.shape, 0.5, np.float32))
    opt = RMSProp(params, lr=1e-2)
    opt.step()
    del cast(dict[str, Any], opt.state[params[1]])["step"]
    before = [p.data.get() for p in params]
    with pytest.raises(ValueError, match=r"state of param_groups\[0\]\['params'\]\[1\] has no 'step'"):
        opt.step()
    assert all(np.array_equal(p.data.get(), b) for p, b in zip(params, before, strict=True))
    assert opt.state[params[0]]["step"] == 1


@pytest.mark.parametrize("mode", ["all", "int64 alone"])
def test_arguments_set_as_they_change_give_the_bits_of_arguments_all_set(
    mode: str, queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launcher sets only the kernel arguments that changed since the last launch
    (`Launcher._send`): the same bits as setting them all at every change (pyopencl's
    `set_args`, what a pyopencl without the calls that set some takes), and as
    setting each int64 by itself (where C's `long` has 4 bytes), and the array-API
    path's."""
    some = _adam_run("pyopencl", queue)
    assert some == _adam_run("array_api_strict", queue)
    if mode == "all":
        monkeypatch.setattr(kernels, "_SETS_SOME", False)
    else:
        monkeypatch.setattr(struct, "calcsize", lambda code: 4)
    assert _adam_run("pyopencl", queue) == some


def test_a_group_size_the_kernel_cannot_run_falls_back(queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for work-groups larger than the driver runs the kernel in, the builder
    rebuilds it with the largest power of two it can; results are the same bits."""
    import netcl._kernels as kernels

    rng = np.random.default_rng(3)
    sizes = [1, 70_000, 999]
    starts = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]

    def run(q: cl.CommandQueue) -> tuple[list[bytes], list[int]]:
        params = [
            Parameter(cl_array.to_device(q, s), cl_array.to_device(q, g)) for s, g in zip(starts, grads, strict=True)
        ]
        opt = RMSProp(params, lr=1e-2, centered=True)
        opt.step()
        opt.step()
        (cache,) = opt._kept[0].launches.values()
        groups = [launch.launcher.fused.geometry.local_size for launch in cache["prepared"].launches]
        return [p.data.get().tobytes() for p in params], groups

    expected, _ = run(queue)
    too_large = 2 * queue.device.max_work_group_size
    monkeypatch.setattr(kernels, "geometry", lambda device: kernels.Geometry(local_size=too_large))
    fresh = cl.CommandQueue(cl.Context([queue.device]))  # kernels are built once per context
    got, groups = run(fresh)
    assert got == expected
    assert groups and all(n <= fresh.device.max_work_group_size for n in groups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_a_nan_or_infinite_parameter_is_treated_alike_on_every_path(dtype: Any, queue: cl.CommandQueue) -> None:
    # a NaN parameter stays NaN (as in torch), an infinite one saturates, on the device
    # and on the array-API path alike (the kernel's saturation once made NaN the largest
    # finite value)
    from netcl.optim import SGD, Adam, AdamW

    start = np.array([np.nan, np.inf, -np.inf, 1.0, -2.0], dtype)
    grad = np.array([1.0, 1.0, -1.0, 0.5, 0.25], dtype)
    for cls, flags in ((SGD, {"momentum": 0.9}), (Adam, {}), (AdamW, {}), (RMSProp, {"centered": True})):
        results = []
        for make, get in (MAKERS["pyopencl"], MAKERS["numpy"]):
            param = Parameter(make(queue, start), make(queue, grad))
            opt = cls([param], lr=0.1, **flags)
            opt.step()
            opt.step()
            results.append((get(param.data), {k: get(v) for k, v in opt.state[param].items() if k != "step"}))
        (device, device_state), (host, host_state) = results
        assert np.isnan(device[0]) and np.isnan(host[0]), cls.__name__
        # (saturated, then AdamW's decay may shrink it)
        assert np.isfinite(device[1:3]).all() and (np.abs(device[1:3]) > np.finfo(dtype).max / 2).all()
        np.testing.assert_array_equal(device, host)
        for name in device_state:
            np.testing.assert_array_equal(device_state[name], host_state[name])


def test_parameters_with_other_step_counts_take_launches_of_their_own(
    queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Adam's own scalars (its bias corrections) depend on each parameter's step count; a
    # launch passes them once for all its parameters, so it takes parameters whose counts
    # agree; each parameter gets the same bits as with its own optimizer
    from netcl._kernels import max_slots
    from netcl._update import Step
    from netcl.optim import Adam

    rng = np.random.default_rng(12)
    sizes = [int(n) for n in rng.integers(1, 3000, 20)]
    starts = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(4)]
    launches = _count_launches(monkeypatch)

    def run(together: bool) -> list[bytes]:
        params = [Parameter(cl_array.to_device(queue, s)) for s in starts]
        optimizers = [Adam(params, lr=1e-2)] if together else [Adam([p], lr=1e-2) for p in params]
        for k, step in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, step, strict=True)):
                p.grad = None if k == 1 and i in (3, 11) else cl_array.to_device(queue, g)
            launches.append(0)
            for opt in optimizers:
                opt.step()
        return [p.data.get().tobytes() for p in params]

    together = run(together=True)
    hyper = {
        name: Adam.hyperparameters[name](name, value) for name, value in Adam([Parameter(starts[0])]).defaults.items()
    }
    limit = max_slots(queue.device, Step(Adam.rule, hyper).kernel, shared=True)  # (state made in one buffer per name)

    def needed(groups: list[int]) -> int:  # launches for groups of parameters of one count
        return sum(-(-n // limit) for n in groups)

    # all 20; the 18 with a gradient; then the parameters 3 and 11, one step behind,
    # split the others into runs of 3, 7 and 8
    assert launches == [needed([20]), needed([18]), needed([3, 1, 7, 1, 8]), needed([3, 1, 7, 1, 8])]
    assert run(together=False) == together


GEOMETRY_CASES: list[tuple[str, dict[str, Any], str, str]] = [  # (optimizer, flags, nonfinite, dtype)
    ("rmsprop", {"momentum": 0.9, "centered": True}, "count", "float32"),
    ("rmsprop", {}, "propagate", "float64"),
    ("sgd", {"momentum": 0.9, "nesterov": True}, "skip", "float32"),
    ("adam", {"amsgrad": True}, "count", "float32"),
    ("adamw", {}, "skip", "float64"),
    ("adam", {"stochastic_rounding": True}, "skip", "float16"),
    # (half precision, where a CPU's loop takes 8 or 16 values at a time, float16 with x86's
    # conversions, see kernels/vector.cl)
    ("rmsprop", {"momentum": 0.9, "centered": True}, "count", "float16"),
    ("adam", {"master_weights": True, "amsgrad": True}, "skip", "float16"),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.1}, "count", "float16"),
    ("adam", {"master_weights": True}, "count", "bfloat16"),
    ("rmsprop", {"momentum": 0.9, "stochastic_rounding": True}, "count", "bfloat16"),
]


@pytest.mark.parametrize(
    ("name", "flags", "nonfinite", "dtype"),
    GEOMETRY_CASES,
    ids=[f"{case[0]}-{','.join(case[1]) or 'plain'}-{case[2]}-{case[3]}" for case in GEOMETRY_CASES],
)
def test_a_gpus_and_a_cpus_launch_geometry_give_the_same_bits(
    name: str,
    flags: dict[str, Any],
    nonfinite: str,
    dtype: str,
    queue: cl.CommandQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A GPU's kernel has one work-item per value, a CPU's a loop over values in each
    # work-item (`netcl._kernels.geometry`); CI's device is a CPU, so the GPU's shape is
    # built here on it, over parameters of sizes that leave partial work-groups and
    # loops, several in one launch, with non-finite gradients counted or skipped
    import ml_dtypes

    import netcl._kernels as kernels
    from netcl.optim import SGD, Adam, AdamW

    factory = {"rmsprop": RMSProp, "sgd": SGD, "adam": Adam, "adamw": AdamW}[name]
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(9)
    sizes = [3, 300, 5000, 1, 2100, 64]
    starts = [rng.standard_normal(n).astype(dt) for n in sizes]
    grads = [[rng.standard_normal(n).astype(dt) for n in sizes] for _ in range(3)]
    grads[1][2][[7, 4099]] = np.nan
    grads[2][4][2050] = np.inf
    results = []
    shapes = [kernels.Geometry(local_size=64), kernels.Geometry(local_size=1, per_item=256)]
    # the CPU's loop 8 values at a time where the compiler would take 16 (AVX-512)
    shapes.append(kernels.Geometry(local_size=1, per_item=256, vector_width=8))
    if dtype == "float16":  # and the CPU's float16 loads without F16C, as elsewhere
        shapes.append(kernels.Geometry(local_size=1, per_item=256, hardware_half=False))
    for geo in shapes:
        monkeypatch.setattr(kernels, "geometry", lambda device, geo=geo: geo)
        fresh = cl.CommandQueue(cl.Context([queue.device]))  # kernels are built once per context
        params = [Parameter(cl_array.to_device(fresh, x)) for x in starts]
        opt = factory(params, lr=1e-2, nonfinite=nonfinite, **flags)
        skipped = []
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = cl_array.to_device(fresh, g)
            opt.step()
            skipped.append(opt.skipped_nonfinite() if nonfinite == "count" else 0)
        (cache,) = opt._kept[0].launches.values()
        assert [launch.launcher.fused.geometry for launch in cache["prepared"].launches] == [geo]
        state = [v.get().tobytes() for p in params for k, v in sorted(opt.state[p].items()) if k != "step"]
        results.append(([p.data.get().tobytes() for p in params], state, skipped))
    assert all(result == results[0] for result in results[1:])
    if nonfinite == "count":
        assert results[0][2] == [0, 2, 1]
