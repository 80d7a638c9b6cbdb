"""Flat storage: `flat_parameters`, and runs of parameters stepped as one member of one
launch, bit for bit as each parameter alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

from netcl import Parameter, _kernels, flat_parameters
from netcl._backends import host
from netcl.optim import SGD, Adam, RMSProp
from netcl.optim.optimizer import Optimizer
from tests.test_optimizers import FLAT, FLAT_IDS, Case

SHAPES = [(4, 3), (5,), (), (2, 2, 2), (1,), (7,)]
F32 = np.float32

LARGE = 1 << 19
"""Values enough that a host array takes the fused kernel (the measured choice there)."""


def _launches(opt: Optimizer[Any, Any, Any, Any]) -> int:
    caches = [cache for kept in opt._kept.values() for cache in kept.launches.values()]
    return sum(len(cache["prepared"].launches) for cache in caches if "prepared" in cache)


def _get(x: Any) -> Any:
    return x.get() if isinstance(x, cl_array.Array) else np.array(x, copy=True)


@pytest.mark.parametrize("where", ["pyopencl", "numpy"])
def test_flat_parameters_are_views_of_one_buffer_in_order(where: str, queue: cl.CommandQueue) -> None:
    params: list[Parameter[Any]] = list(flat_parameters(queue if where == "pyopencl" else None, SHAPES))
    assert [tuple(p.data.shape) for p in params] == SHAPES
    offset = 0
    for p in params:
        assert p.grad is not None
        assert not _get(p.data).any() and not _get(p.grad).any()
        if where == "pyopencl":
            first: Any = params[0].grad
            assert p.data.base_data is params[0].data.base_data and p.grad.base_data is first.base_data
            assert p.data.offset == offset and p.grad.offset == offset
        else:
            assert p.data.base is params[0].data.base
        offset += int(np.prod(p.data.shape)) * 4


def test_flat_parameters_refuse_bad_arguments(queue: cl.CommandQueue) -> None:
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16, got int32"):
        flat_parameters(None, [(3,)], np.int32)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16, got no such dtype"):
        flat_parameters(None, [(3,)], "no such dtype")
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16, got None"):
        flat_parameters(None, [(3,)], None)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"shapes\[1\] must be a tuple of ints, got \[3\]"):
        flat_parameters(None, [(3,), [3]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"shapes\[0\] must be a tuple of ints, got \(True,\)"):
        flat_parameters(None, [(True,)])
    with pytest.raises(TypeError, match="shapes must be a sequence of tuples of ints, got builtins.int"):
        flat_parameters(None, 3)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"shapes\[0\] has a negative dimension: \(-1,\)"):
        flat_parameters(None, [(-1,)])
    with pytest.raises(
        TypeError, match="queue must be a pyopencl CommandQueue, or None for numpy arrays; got builtins.str"
    ):
        flat_parameters("queue", [(3,)])  # type: ignore[call-overload]
    largest = queue.device.max_mem_alloc_size
    with pytest.raises(ValueError, match=rf"more than the device's largest buffer \({largest:,} bytes\)"):
        flat_parameters(queue, [(largest // 4 + 1,)])
    with pytest.raises(ValueError, match="more than numpy's largest array"):
        flat_parameters(None, [(1 << 40, 1 << 40)])


def _runs(
    case: Case, flags: dict[str, Any], make: Callable[[list[Any]], list[Parameter[Any]]], steps: int
) -> list[bytes]:
    rng = np.random.default_rng(4)
    start = [rng.standard_normal(s).astype(F32) for s in SHAPES]
    params = make(start)
    opt = case.ours(params, lr=1e-2, **flags)
    out: list[bytes] = []
    for k in range(steps):
        for j, p in enumerate(params):
            g = (rng.standard_normal(SHAPES[j]) * 10.0 ** rng.uniform(-2, 2)).astype(F32)
            if k == 1 and j == 2:  # skipped values in the middle of the run
                g = np.full(SHAPES[j], np.nan, F32)
            _write(p.grad, g)
        if k == 2:  # and different step counts break it from then on
            params[3].grad, kept = None, params[3].grad
            opt.step()
            params[3].grad = kept
            continue
        opt.step()
        out += [_get(p.data).tobytes() for p in params]
    return out


def _address(x: Any) -> int:
    address: int = x.__array_interface__["data"][0]
    return address


def _write(x: Any, value: Any) -> None:
    if isinstance(x, cl_array.Array):
        x.set(np.ascontiguousarray(value).reshape(x.shape))
    else:
        x[...] = value


@pytest.mark.parametrize(("case", "flags"), FLAT, ids=FLAT_IDS)
def test_a_flat_run_gives_the_bits_of_each_parameter_alone(
    case: Case, flags: dict[str, Any], queue: cl.CommandQueue
) -> None:
    def flat(start: list[Any]) -> list[Parameter[Any]]:
        params = flat_parameters(queue, SHAPES)
        for p, x in zip(params, start, strict=True):
            _write(p.data, x)
        return params

    def alone(start: list[Any]) -> list[Parameter[Any]]:
        return [Parameter(cl_array.to_device(queue, x), cl_array.zeros(queue, x.shape, F32)) for x in start]

    def numpy_flat(start: list[Any]) -> list[Parameter[Any]]:
        params = flat_parameters(None, SHAPES)
        for p, x in zip(params, start, strict=True):
            _write(p.data, x)
        return params

    expected = _runs(case, flags, alone, 5)
    assert _runs(case, flags, flat, 5) == expected
    assert _runs(case, flags, numpy_flat, 5) == expected


@pytest.mark.parametrize("factory", [SGD, Adam, RMSProp], ids=["SGD", "Adam", "RMSProp"])
def test_160_flat_parameters_take_one_launch_and_make_nothing_per_step(
    factory: Callable[..., Optimizer[Any, Any, Any, Any]],
    queue: cl.CommandQueue,
    count_makes: Callable[[], list[str]],
) -> None:
    params = flat_parameters(queue, [(n,) for n in range(1, 161)])
    opt = factory(params, lr=1e-2)
    opt.step()
    assert _launches(opt) == 1
    for name in opt.state[id(params[0])]:
        if name != "step":  # one buffer per state name, a view per parameter, in order
            views = [opt.state[id(p)][name] for p in params]
            assert all(v.base_data is views[0].base_data for v in views)
            assert [v.offset for v in views] == [p.data.offset for p in params]
    made = count_makes()
    for _ in range(3):
        opt.step()
    assert made == []
    assert _launches(opt) == 1


def test_arrays_laid_out_by_hand_take_the_same_launch(queue: cl.CommandQueue) -> None:
    data = cl_array.zeros(queue, 30, F32)
    grad = cl_array.to_device(queue, np.ones(30, F32))
    params = [Parameter(data[a:b], grad[a:b]) for a, b in [(0, 10), (10, 25), (25, 30)]]
    opt = Adam(params)
    opt.step()
    assert _launches(opt) == 1
    separate = [
        Parameter(cl_array.zeros(queue, n, F32), cl_array.to_device(queue, np.ones(n, F32))) for n in (10, 15, 5)
    ]
    other = Adam(separate)
    other.step()
    assert data.get().tobytes() == np.concatenate([p.data.get() for p in separate]).tobytes()


@pytest.mark.parametrize("where", ["pyopencl", "numpy"])
def test_a_new_gradient_array_ends_the_run_and_is_followed(
    where: str, queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the step keeps its plan and launches for new gradients (a training loop's), but
    # the launch took the run's gradients as one array: a new one in the run breaks it
    monkeypatch.setattr(host, "PATH", "kernel")
    params = flat_parameters(queue if where == "pyopencl" else None, [(4,), (4,), (4,)])
    for p in params:
        p.data[...] = 1.0
        assert p.grad is not None
        p.grad[...] = 1.0
    opt = SGD(params, lr=0.5)
    opt.step()
    new = np.full(4, 3.0, F32)
    params[1].grad = cl_array.to_device(queue, new) if where == "pyopencl" else new
    opt.step()
    np.testing.assert_array_equal(_get(params[0].data), 0.0)
    np.testing.assert_array_equal(_get(params[1].data), -1.0)
    np.testing.assert_array_equal(_get(params[2].data), 0.0)
    first = params[0].grad
    assert first is not None
    params[0].grad = first[...]  # a new view of the same memory: the same run
    opt.step()
    np.testing.assert_array_equal(_get(params[0].data), -0.5)
    np.testing.assert_array_equal(_get(params[1].data), -2.5)


@pytest.mark.parametrize("factory", [Adam, RMSProp, SGD], ids=["Adam", "RMSProp", "SGD"])
def test_a_new_gradient_taken_by_a_step_that_raised_is_followed(
    factory: Callable[..., Optimizer[Any, Any, Any, Any]], queue: cl.CommandQueue
) -> None:
    # a step whose gradients are all the last step's skips the check of the launches'
    # layout; a new gradient that a step took before it raised is not one of those
    params = flat_parameters(queue, [(4,), (4,), (4,)])
    alone = [Parameter(cl_array.zeros(queue, 4, F32), cl_array.zeros(queue, 4, F32)) for _ in params]
    for p in [*params, *alone]:
        p.data.fill(1.0)
        assert p.grad is not None
        p.grad.fill(1.0)
    opt, reference = factory(params, lr=0.5), factory(alone, lr=0.5)
    for _ in range(2):  # (the second with the same gradients: a steady step)
        opt.step()
        reference.step()
    params[1].grad = cl_array.to_device(queue, np.full(4, 3.0, F32))
    alone[1].grad = cl_array.to_device(queue, np.full(4, 3.0, F32))
    opt.state[params[0]]["step"] = -1
    before = [p.data.get().tobytes() for p in params]
    with pytest.raises(ValueError, match=r"state\['step'\] of param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    assert [p.data.get().tobytes() for p in params] == before  # (nothing written)
    opt.state[params[0]]["step"] = 2
    for _ in range(2):
        opt.step()
        reference.step()
        assert [p.data.get().tobytes() for p in params] == [p.data.get().tobytes() for p in alone]


def test_new_gradient_arrays_at_every_step_keep_the_prepared_launches(queue: cl.CommandQueue) -> None:
    # a training loop that sets gradients to None and computes new ones: the launches
    # prepared at the second step are kept; a new gradient is still checked
    rng = np.random.default_rng(3)
    shapes = [(5,), (3, 4), (9,)]
    params = [Parameter(cl_array.to_device(queue, rng.standard_normal(s).astype(F32))) for s in shapes]
    alone = [Parameter(p.data.copy()) for p in params]
    opt, reference = Adam(params, lr=0.1), Adam(alone, lr=0.1)
    prepared = []
    for _ in range(4):
        for p, q in zip(params, alone, strict=True):
            g = rng.standard_normal(p.data.shape).astype(F32)
            p.grad, q.grad = cl_array.to_device(queue, g), cl_array.to_device(queue, g)
        opt.step()
        reference.step()
        reference._kept[0].plan = None  # (the reference plans every step afresh)
        prepared.append(next(iter(opt._kept[0].launches.values()))["prepared"])
    assert prepared[1] is prepared[2] is prepared[3]
    for p, q in zip(params, alone, strict=True):
        assert p.data.get().tobytes() == q.data.get().tobytes()
    other = cl.CommandQueue(cl.Context([queue.device]))
    good = params[1].grad
    bad: list[tuple[Any, type[Exception], str]] = [
        (cl_array.zeros(queue, (3, 5), F32), ValueError, r"has shape \(3, 5\)"),
        (cl_array.zeros(queue, (2, 4), F32), ValueError, r"has shape \(2, 4\)"),  # (the same strides)
        (cl_array.zeros(queue, (3, 4), np.float64), TypeError, "has dtype float64"),
        (cl_array.zeros(other, (3, 4), F32), ValueError, "lives in another OpenCL context"),
        (cl_array.zeros(queue, (3, 4), F32, order="F"), ValueError, "is in F order"),
        (cl_array.zeros(queue, (3, 8), F32)[:, :4], ValueError, "is not contiguous"),
    ]
    for grad, error, message in bad:
        params[1].grad = grad
        before = [p.data.get().tobytes() for p in params]
        with pytest.raises(error, match=r"\['params'\]\[1\]\.grad " + message):
            opt.step()
        assert [p.data.get().tobytes() for p in params] == before
    params[1].grad = good
    opt.step()


def test_state_dicts_keep_the_per_parameter_layout(queue: cl.CommandQueue) -> None:
    params = flat_parameters(queue, SHAPES)
    for p in params:
        assert p.grad is not None
        p.grad.fill(0.5)
    opt = Adam(params)
    opt.step()
    saved = opt.state_dict()
    assert sorted(saved["state"]) == list(range(len(SHAPES)))
    assert [saved["state"][k]["exp_avg"].shape for k in range(len(SHAPES))] == SHAPES
    fresh = Adam(flat_parameters(queue, SHAPES))
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    for k in saved["state"]:
        assert again["state"][k]["exp_avg"].tobytes() == saved["state"][k]["exp_avg"].tobytes()


@pytest.mark.parametrize("where", ["pyopencl", "numpy"])
def test_a_loaded_checkpoint_keeps_one_buffer_per_state_name(where: str, queue: cl.CommandQueue) -> None:
    """`load_state_dict` lays the state out as a step makes it: one buffer per state name,
    each parameter's a view of it in order, so a flat model keeps its one launch after
    resuming, with the bits of the optimizer it was saved from."""
    rng = np.random.default_rng(17)
    grads = [[rng.standard_normal(shape).astype(F32) for shape in SHAPES] for _ in range(3)]

    def model() -> list[Parameter[Any]]:
        params: list[Parameter[Any]] = (
            list(flat_parameters(queue, SHAPES)) if where == "pyopencl" else list(flat_parameters(None, SHAPES))
        )
        for p, g in zip(params, grads[0], strict=True):
            _write(p.data, g * 3)
        return params

    def step(opt: Adam, params: list[Parameter[Any]], k: int) -> None:
        for p, g in zip(params, grads[k], strict=True):
            assert p.grad is not None
            _write(p.grad, g)
        opt.step()

    saved_params = model()
    saved = Adam(saved_params, lr=1e-2)
    step(saved, saved_params, 0)
    params = model()
    for p, q in zip(params, saved_params, strict=True):  # (the saved model as it is now)
        _write(p.data, _get(q.data))
    resumed = Adam(params, lr=1e-2)
    resumed.load_state_dict(saved.state_dict())
    datas: list[Any] = [p.data for p in params]
    for name in ("exp_avg", "exp_avg_sq"):
        views: list[Any] = [resumed.state[id(p)][name] for p in params]
        if where == "pyopencl":
            assert all(v.base_data is views[0].base_data for v in views)
            assert [v.offset for v in views] == [d.offset for d in datas]
        else:
            assert all(v.base is views[0].base and v.base is not None for v in views)
            assert [_address(v) - _address(views[0]) for v in views] == [
                _address(d) - _address(datas[0]) for d in datas
            ]
    for k in (1, 2):
        step(saved, saved_params, k)
        step(resumed, params, k)
    if where == "pyopencl":
        assert _launches(resumed) == 1
    assert [_get(p.data).tobytes() for p in params] == [_get(p.data).tobytes() for p in saved_params]


def test_a_flat_numpy_model_takes_the_host_kernel_once(monkeypatch: pytest.MonkeyPatch) -> None:
    if host.host_queue() is None:
        pytest.fail("no CPU OpenCL device: install netcl[pocl]")
    sizes = [LARGE // 4] * 4 + [10]
    params = flat_parameters(None, [(n,) for n in sizes])
    opt = Adam(params)
    opt.step()
    launched: list[list[int]] = []
    original = host._HostLaunches.run

    def spy(self: Any, queue: cl.CommandQueue, step: Any, tally: Any) -> bool:
        launched.extend([member.size for member in launch.members] for launch in self.launches)
        return original(self, queue, step, tally)

    monkeypatch.setattr(host._HostLaunches, "run", spy)
    for p in params:
        assert p.grad is not None
        p.grad[...] = 0.25
    opt.step()
    opt.step()  # (the launch kept from the step before)
    assert launched == [[sum(sizes)], [sum(sizes)]]


def _quiet(opt: Optimizer[Any, Any, Any, Any]) -> bool:
    plan = opt._kept[0].plan
    return plan is not None and plan.quiet


def _quiet_sgd(queue: cl.CommandQueue, shapes: list[tuple[int, ...]], grad: float) -> tuple[list[Parameter[Any]], SGD]:
    """Flat parameters with every gradient `grad`, and an SGD (lr 0.5) whose steps on
    them are quiet (three taken)."""
    params = flat_parameters(queue, shapes)
    for p in params:
        cast(cl_array.Array, p.grad).fill(grad)
    opt = SGD(params, lr=0.5)
    for _ in range(3):
        opt.step()
    assert _quiet(opt)
    return params, opt


@pytest.mark.parametrize("factory", [SGD, Adam, RMSProp], ids=["SGD", "Adam", "RMSProp"])
def test_a_step_after_no_noted_write_is_quiet_and_gives_the_same_bits(
    factory: Callable[..., Optimizer[Any, Any, Any, Any]], queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nothing assigned to a parameter and nothing written to a state dict since the
    # last step: the step compares only the parameters' identities, takes the counts it
    # committed, and trusts the event lists it gave the arrays
    from netcl._backends import opencl

    runs: list[bool] = []
    original = opencl._Prepared.run

    def run(self: Any, scalars: tuple[float, ...], tally: Any, member: tuple[float, ...] | None = None) -> None:
        runs.append(member is not None)
        original(self, scalars, tally, member)

    monkeypatch.setattr(opencl._Prepared, "run", run)
    params = flat_parameters(queue, [(4,), (300,), (7,)])
    alone = [
        Parameter(cl_array.zeros(queue, p.data.shape, F32), cl_array.zeros(queue, p.data.shape, F32)) for p in params
    ]
    rng = np.random.default_rng(5)
    for p, q in zip(params, alone, strict=True):
        start = rng.standard_normal(p.data.shape).astype(F32)
        p.data.set(start)
        q.data.set(start)
    opt, reference = factory(params, lr=1e-2), factory(alone, lr=1e-2)
    quiet = []
    for k in range(5):
        for p, q in zip(params, alone, strict=True):  # (in place: no assignment)
            g = rng.standard_normal(p.data.shape).astype(F32)
            cast(cl_array.Array, p.grad).set(g)
            cast(cl_array.Array, q.grad).set(g)
        if k == 3:  # a schedule's new learning rate: a write to no parameter or state
            opt.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 5e-3
        opt.step()
        # every array holds the event of the step's launch (which readers wait for)
        assert len({id(x.events) for p in params for x in (p.data, cast(cl_array.Array, p.grad))}) == 1
        assert [e.command_type for e in params[0].data.events] == [cl.command_type.NDRANGE_KERNEL]
        reference.step()
        quiet.append(_quiet(opt))
        if k == 3:  # (the same kernel's launches, though the Step is new)
            assert opt._kept[0].step.kernel is reference._kept[0].step.kernel
        assert [p.data.get().tobytes() for p in params] == [q.data.get().tobytes() for q in alone]
        assert [opt.state[p]["step"] for p in params] == [k + 1] * 3
    assert quiet == [False, False, True, True, True]
    assert runs[0::2] == [False, False, True, True, True]  # (opt's; the reference's between)


def test_a_quiet_step_that_fails_commits_no_count(monkeypatch: pytest.MonkeyPatch, queue: cl.CommandQueue) -> None:
    params = flat_parameters(queue, [(4,), (4,)])
    alone = [Parameter(cl_array.zeros(queue, 4, F32), cl_array.zeros(queue, 4, F32)) for _ in params]
    for p in [*params, *alone]:
        p.data.fill(1.0)
        cast(cl_array.Array, p.grad).fill(1.0)
    opt, reference = Adam(params, lr=0.5), Adam(alone, lr=0.5)
    for _ in range(3):
        opt.step()
        reference.step()
    original = _kernels.Launcher.enqueue

    def failing(*args: Any) -> None:
        raise RuntimeError("the device failed")

    monkeypatch.setattr(_kernels.Launcher, "enqueue", failing)
    with pytest.raises(RuntimeError, match="the device failed"):
        opt.step()  # (a quiet one: nothing written since the last)
    assert _quiet(opt)
    monkeypatch.setattr(_kernels.Launcher, "enqueue", original)
    assert [opt.state[p]["step"] for p in params] == [3, 3]
    for _ in range(2):
        opt.step()
        reference.step()
        assert [p.data.get().tobytes() for p in params] == [p.data.get().tobytes() for p in alone]
    assert [opt.state[p]["step"] for p in params] == [5, 5]


def test_a_quiet_step_with_another_kernel_takes_the_full_path(queue: cl.CommandQueue) -> None:
    # a hyperparameter that changes the kernel (not its scalars) is no write to a
    # parameter: the step is quiet, its backend has no launches of that kernel to
    # repeat, and the items get their gradients and own scalars for a full update
    params = flat_parameters(queue, [(5,), (9,)])
    alone = [
        Parameter(cl_array.zeros(queue, p.data.shape, F32), cl_array.zeros(queue, p.data.shape, F32)) for p in params
    ]
    rng = np.random.default_rng(8)
    for p, q in zip(params, alone, strict=True):
        g = rng.standard_normal(p.data.shape).astype(F32)
        cast(cl_array.Array, p.grad).set(g)
        cast(cl_array.Array, q.grad).set(g)
    opt, reference = Adam(params, lr=1e-2), Adam(alone, lr=1e-2)
    for k in range(5):
        if k == 3:
            opt.param_groups[0]["maximize"] = reference.param_groups[0]["maximize"] = True
        opt.step()
        reference.step()
        assert _quiet(opt) == (k >= 2)
        assert [p.data.get().tobytes() for p in params] == [q.data.get().tobytes() for q in alone]
    plan = opt._kept[0].plan
    assert plan is not None and all(item.grad is None for item in plan.work())  # (none kept after the step)
    assert [opt.state[p]["step"] for p in params] == [5, 5]


def _change(ps: list[Any], other: Any, how: str) -> None:
    """Put `other` in `ps` in place of its second parameter (the same length: `holds`
    compares no more than the list's identity and length), or (with "+") add it."""
    if how == "setitem":
        ps[1] = other
    elif how == "slice":
        ps[1:2] = [other]
    elif how == "pop, insert":
        ps.pop(1)
        ps.insert(1, other)
    elif how == "del, insert":
        del ps[1]
        ps.insert(1, other)
    elif how == "remove, insert":
        ps.remove(ps[1])
        ps.insert(1, other)
    elif how == "clear, extend":
        kept = [ps[0], other, *ps[2:]]
        ps.clear()
        ps.extend(kept)
    elif how == "+ append":
        ps.append(other)
    elif how == "+ extend":
        ps.extend([other])
    elif how == "+ +=":
        ps += [other]
    else:
        raise AssertionError(how)


_CHANGES = [
    "setitem",
    "slice",
    "pop, insert",
    "del, insert",
    "remove, insert",
    "clear, extend",
    "+ append",
    "+ extend",
    "+ +=",
]


@pytest.mark.parametrize("change", _CHANGES)
def test_each_change_to_the_list_of_parameters_is_followed(change: str, queue: cl.CommandQueue) -> None:
    # a group's list notes each change to it (it is netcl's own list): the next step
    # updates what the list holds now
    params, opt = _quiet_sgd(queue, [(4,), (4,), (4,)], 1.0)
    other = Parameter(cl_array.zeros(queue, 4, F32), cl_array.zeros(queue, 4, F32) + 1)
    held = opt.param_groups[0]["params"]
    before = {id(p): p.data.get() for p in [*params, other]}
    _change(held, other, change)
    opt.step()
    assert not _quiet(opt)
    for p in [*params, other]:
        moved = not np.array_equal(p.data.get(), before[id(p)])
        assert moved == any(p is q for q in held), (change, params.index(p) if p in params else "other")
    assert opt.state[other]["step"] == 1


def test_a_noted_list_notes_each_change_and_nothing_else() -> None:
    from netcl._writes import PARAMETER_WRITE, NotedList

    changes: list[Callable[[list[int]], object]] = [
        lambda x: x.__setitem__(0, 9),
        lambda x: x.__setitem__(slice(0, 1), [9]),
        lambda x: x.__delitem__(0),
        lambda x: x.__iadd__([9]),
        lambda x: x.__imul__(2),
        lambda x: x.append(9),
        lambda x: x.extend([9]),
        lambda x: x.insert(0, 9),
        lambda x: x.pop(),
        lambda x: x.remove(2),
        lambda x: x.clear(),
        lambda x: x.sort(key=lambda v: -v),
        lambda x: x.reverse(),
    ]
    readings: list[Callable[[list[int]], object]] = [
        lambda x: x[0],
        lambda x: x[1:],
        len,
        list,
        lambda x: x.copy(),
        lambda x: x.index(2),
        lambda x: x.count(2),
        lambda x: x == [1, 2, 3],
        lambda x: x + [4],
    ]
    for change in changes:
        noted = NotedList([1, 2, 3])
        token = PARAMETER_WRITE[0]
        change(noted)
        assert PARAMETER_WRITE[0] != token
    for read in readings:
        noted = NotedList([1, 2, 3])
        token = PARAMETER_WRITE[0]
        read(noted)
        assert PARAMETER_WRITE[0] == token and noted == [1, 2, 3]


def test_netcl_records_its_events_in_the_lists_a_quiet_step_waits_for(queue: cl.CommandQueue) -> None:
    # a quiet step's launch waits for the event list its last run gave the arrays:
    # netcl's own commands between steps (gradient clipping here, the distributed
    # layer's mapping of gradients) record their events in that very list
    from netcl import clip_grad_norm_

    params, opt = _quiet_sgd(queue, [(4,), (5,)], 3.0)
    shared = cast(cl_array.Array, params[0].grad).events
    launched = list(shared)
    clip_grad_norm_(params, 1.0)
    assert cast(cl_array.Array, params[1].grad).events is shared and params[0].data.events is shared
    assert len(shared) == 1 and shared != launched
    clipping = shared[0]
    opt.step()
    assert _quiet(opt) and shared[0] is not clipping  # (the new launch's, which waited for it)
