"""Large host arrays (numpy, CPU torch) go through the fused kernel: same bits, in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

import netcl._backends.host as host
from netcl import Parameter
from netcl.optim import RMSProp
from tests.reference import FLAG_COMBINATIONS, flag_id

SIZE = (1 << 19) + 13  # large: the measured choice is the kernel; not a multiple of any vector width


def test_a_cpu_device_is_available() -> None:
    """The test machines have PoCL (the pocl extra), so the host path is exercised."""
    queue = host.host_queue()
    assert queue is not None and queue.device.type & cl.device_type.CPU


def _copy(a: Any) -> Any:
    return np.array(a, copy=True)


def _run(make: Any, get: Any, p0: Any, grads: list[Any], flags: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    param = Parameter(make(p0))
    data = param.data
    opt = RMSProp([param], lr=1e-2, **flags)
    for g in grads:
        param.grad = make(g)
        opt.step()
    assert param.data is data, "updated in place"
    state = dict(opt.state[id(param)])
    return get(param.data), {k: get(v) for k, v in state.items() if k != "step"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS[::3], ids=[flag_id(f) for f in FLAG_COMBINATIONS[::3]])
def test_host_path_is_bitwise_the_reference_and_the_device_kernel(
    dtype: Any, flags: dict[str, Any], queue: cl.CommandQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(SIZE).astype(dtype)
    grads = [rng.standard_normal(SIZE).astype(dtype) for _ in range(3)]

    fused_host = _run(_copy, _copy, p0, grads, flags)
    fused_device = _run(lambda a: cl_array.to_device(queue, a), lambda a: a.get(), p0, grads, flags)
    tensors = _run(lambda a: torch.tensor(a), lambda t: t.numpy().copy(), p0, grads, flags)
    monkeypatch.setattr(host, "PATH", "array-api")  # now the array-API path
    reference = _run(_copy, _copy, p0, grads, flags)
    for other in (fused_device, tensors, reference):
        assert fused_host[0].tobytes() == other[0].tobytes()
        assert fused_host[1].keys() == other[1].keys()
        for name in fused_host[1]:
            assert fused_host[1][name].tobytes() == other[1][name].tobytes(), name


def test_fortran_ordered_host_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    shape = (SIZE // 64 + 1, 64)
    p0 = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
    grads = [np.asfortranarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(2)]
    fused = _run(lambda a: np.array(a, order="F"), np.array, p0, grads, {"momentum": 0.9})
    monkeypatch.setattr(host, "PATH", "array-api")
    reference = _run(lambda a: np.array(a, order="F"), np.array, p0, grads, {"momentum": 0.9})
    assert np.array_equal(fused[0], reference[0])


def test_mixed_layouts_and_views_take_the_array_api_path() -> None:
    """A C-ordered parameter with an F-ordered gradient, or a strided view, is still right."""
    rng = np.random.default_rng(7)
    shape = (SIZE // 64 + 1, 64)
    p0 = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    a = Parameter(p0.copy(), np.asfortranarray(g))
    b = Parameter(p0.copy(), g.copy())
    RMSProp([a], lr=0.1).step()
    RMSProp([b], lr=0.1).step()
    assert np.array_equal(a.data, b.data)
    big = rng.standard_normal(2 * SIZE).astype(np.float32)
    view = Parameter(big[::2], big[1::2].copy())
    dense = Parameter(big[::2].copy(), big[1::2].copy())
    RMSProp([view], lr=0.1).step()
    RMSProp([dense], lr=0.1).step()
    assert np.array_equal(view.data, dense.data) and np.array_equal(big[::2], dense.data)


def test_a_repeated_host_step_makes_no_kernel_object(count_makes: Callable[[], list[str]]) -> None:
    """After the first step only the buffers that wrap the host arrays are made anew
    (they must not outlive `step()`); kernel objects and programs are kept."""
    rng = np.random.default_rng(2)
    param = Parameter(rng.standard_normal(SIZE).astype(np.float32), rng.standard_normal(SIZE).astype(np.float32))
    opt = RMSProp([param], lr=1e-2)
    opt.step()
    made = count_makes()
    before = param.data.copy()
    for _ in range(3):
        opt.step()
    assert made == []
    assert not np.array_equal(param.data, before)


def test_host_buffers_of_parameters_and_state_are_kept_from_step_to_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # on a device that works in host memory (PoCL's CPU device), a step makes OpenCL
    # buffers only for the gradients once the first step made those of the parameters
    # and state; a parameter whose array is replaced gets a new one, and the results are
    # the array-API path's bits all along
    assert host.host_queue() is not None and host._zero_copy(host.host_queue())
    made: list[int] = []
    for kind in (host._Wrapped, host._GradBuffer):  # (the gradients' are _GradBuffer)

        def counting(self: Any, *args: Any, original: Any = kind.__init__) -> None:
            made[-1] += 1
            original(self, *args)

        monkeypatch.setattr(kind, "__init__", counting)
    rng = np.random.default_rng(3)
    starts = [rng.standard_normal(n).astype(np.float32) for n in (100, 2000, 7)]
    grads = [[rng.standard_normal(x.size).astype(np.float32) for x in starts] for _ in range(4)]
    results = []
    for path in ("kernel", "array-api"):
        monkeypatch.setattr(host, "PATH", path)
        params = [Parameter(x.copy()) for x in starts]
        opt = RMSProp(params, lr=1e-2, momentum=0.9)
        for k, step in enumerate(grads):
            if k == 2:
                params[1].data = params[1].data.copy()  # another array: another buffer
            for p, g in zip(params, step, strict=True):
                p.grad = g.copy()
            made.append(0)
            opt.step()
        results.append([p.data.tobytes() for p in params])
        if path == "kernel":
            # 3 parameters x (data, grad) and one buffer per state name (their state is
            # in one numpy array per name), then the 3 gradients; at the third step the
            # replaced parameter's data too
            assert made == [8, 3, 4, 3]
    assert results[0] == results[1]


def _count_made(monkeypatch: pytest.MonkeyPatch, kind: type) -> list[int]:
    """A list whose last entry counts the objects of `kind` made: a test appends a 0
    before each step to count step by step."""
    made = [0]
    original = cast("Callable[..., None]", vars(kind)["__init__"])

    def counting(self: Any, *args: Any) -> None:
        made[-1] += 1
        original(self, *args)

    monkeypatch.setattr(kind, "__init__", counting)
    return made


def _count_layouts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`_count_made` of the host launches laid out (`_HostLaunches` made)."""
    return _count_made(monkeypatch, host._HostLaunches)


@pytest.mark.parametrize("flat", [False, True], ids=["separate", "flat"])
def test_a_training_loop_keeps_its_host_launches(flat: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # the same numpy arrays step after step (gradients written in place) take the
    # launches laid out at the step before: a new layout only where the parameters,
    # their arrays or their step counts change (a parameter without a gradient lags one
    # step behind, so its own scalars differ); the bits are the array-API path's
    from netcl import flat_parameters
    from netcl.optim import Adam

    shapes = [(n,) for n in (100, 2000, 7, 64)]
    rng = np.random.default_rng(4)
    starts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    made = _count_layouts(monkeypatch)
    results = []
    for path in ("kernel", "array-api"):
        monkeypatch.setattr(host, "PATH", path)
        params = list(flat_parameters(None, shapes)) if flat else [Parameter(np.zeros(s, np.float32)) for s in shapes]
        kept = [p.grad for p in params]
        for p, x in zip(params, starts, strict=True):
            p.data[...] = x
        opt = Adam(params, lr=1e-2)
        made.clear()
        for k, step in enumerate(grads):
            for p, g, mine in zip(params, step, kept, strict=True):
                if mine is None:
                    mine = np.zeros_like(g)
                    kept[params.index(p)] = mine
                mine[...] = g
                p.grad = None if k == 3 and p is params[2] else mine
            made.append(0)
            opt.step()
        state = [np.asarray(opt.state[p]["exp_avg"]).tobytes() for p in params]
        results.append(([np.asarray(p.data).tobytes() for p in params], state))
        if path == "kernel":
            # laid out at the first step (new state), the second (the state exists now),
            # the fourth (no gradient for one), the fifth (its count lags); then kept
            assert made == [1, 1, 0, 1, 1, 0]
    assert results[0] == results[1]


def test_a_gradient_given_other_memory_in_place_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    # the buffer over a gradient is kept from step to step only for the same object at
    # the same address: a torch gradient that `set_` moves to other memory of the same
    # shape (its fingerprint unchanged) is read where it is now
    from netcl.optim import Adam

    rng = np.random.default_rng(6)
    p0 = rng.standard_normal(4000).astype(np.float32)
    values = [rng.standard_normal(4000).astype(np.float32) for _ in range(3)]
    results = []
    for path in ("kernel", "array-api"):
        monkeypatch.setattr(host, "PATH", path)
        param = Parameter(torch.tensor(p0))
        grad = torch.tensor(values[0])
        param.grad = grad
        opt = Adam([param], lr=1e-2)
        opt.step()
        opt.step()
        other = torch.tensor(values[1])
        grad.set_(other.untyped_storage(), 0, other.shape, other.stride())  # the same object, other memory
        opt.step()
        grad.copy_(torch.tensor(values[2]))
        opt.step()
        results.append(param.data.numpy().tobytes())
    assert results[0] == results[1]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_new_gradients_at_every_step_keep_the_launches(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's zero_grad() sets gradients to None, so a training loop's backward pass
    # brings new gradient tensors at every step: the plan and the launches are kept
    # (the new gradients pass the checks by their fingerprints), and the bits are the
    # array-API path's; a new gradient of another shape is refused as always
    from netcl.optim import Adam

    shapes = [(30, 20), (2000,), (7,)]
    rng = np.random.default_rng(8)
    starts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    made = _count_layouts(monkeypatch)

    def array(x: np.ndarray[Any, Any]) -> Any:
        return torch.tensor(x) if kind == "torch" else x.copy()

    results = []
    for path in ("kernel", "array-api"):
        monkeypatch.setattr(host, "PATH", path)
        params = [Parameter(array(x)) for x in starts]
        opt = Adam(params, lr=1e-2)
        made.clear()
        for step in grads:
            opt.zero_grad()
            for p, g in zip(params, step, strict=True):
                p.grad = array(g)
            made.append(0)
            opt.step()
        results.append([np.asarray(p.data).tobytes() for p in params])
        if path == "kernel":
            assert made == [1, 1, 0, 0]  # new state at the first step, then the state exists
        params[1].grad = array(np.zeros(1999, np.float32))
        before = np.asarray(params[0].data).tobytes()
        with pytest.raises(ValueError, match=r"params'\]\[1\]\.grad has shape \(1999,\)"):
            opt.step()
        assert np.asarray(params[0].data).tobytes() == before
    assert results[0] == results[1]


def _steps_over_memory_used_before(
    monkeypatch: pytest.MonkeyPatch,
    optimizer: Callable[[list[Any]], Any],
    sizes: tuple[int, ...],
    pools: int,
    steps: int,
    seed: int,
    after_step: Callable[[Any], None] | None = None,
) -> list[int]:
    """Step torch parameters of `sizes` whose gradients are new tensors over `pools`
    sets of memory taken in turn (as torch's allocator hands a training loop's
    gradients the memory the last ones had), on the kernel path and on the array-API
    path, and assert that the bits are the same; return how many buffers over
    gradients the kernel path made at each step (`after_step(optimizer)` runs after
    each of its steps)."""
    rng = np.random.default_rng(seed)
    starts = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    memory = [[torch.zeros(n) for n in sizes] for _ in range(pools)]  # the memory the gradients come in
    values = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(steps)]
    made = _count_made(monkeypatch, host._GradBuffer)
    results, on_kernel = [], []
    for path in ("kernel", "array-api"):
        monkeypatch.setattr(host, "PATH", path)
        params = [Parameter(torch.tensor(x)) for x in starts]
        opt = optimizer(params)
        made.clear()
        for k, step in enumerate(values):
            opt.zero_grad()
            for p, pool, g in zip(params, memory[k % pools], step, strict=True):
                pool.copy_(torch.from_numpy(g))
                p.grad = pool.view(pool.shape)  # a new tensor object over memory used before
            made.append(0)
            opt.step()
            if path == "kernel" and after_step is not None:
                after_step(opt)
        results.append([np.asarray(p.data).tobytes() for p in params])
        if path == "kernel":
            on_kernel = list(made)
    assert results[0] == results[1]
    return on_kernel


def test_new_torch_gradients_in_memory_used_before_take_the_buffers_made_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch's allocator hands a training loop's new gradients the memory the last ones
    # had, mostly: the buffers over that memory are taken again for the new tensors (no
    # buffer made once each place has been seen), and the bits are the array-API path's
    from netcl.optim import Adam

    made = _steps_over_memory_used_before(
        monkeypatch, lambda params: Adam(params, lr=1e-2), (3000, 40, 500), pools=2, steps=6, seed=11
    )
    assert made == [3, 3, 3, 0, 0, 0]  # (the first step lays out; then each pool's memory once)


@pytest.mark.parametrize("pools", [3, 4])
def test_buffers_kept_over_old_gradients_memory_are_bounded_per_run(
    pools: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the buffers over the memory of earlier gradients are kept for the next ones, at
    # most SPARE_GRAD_BUFFERS per run (here 2, over 3 parameters: 6, and the 3 in use):
    # gradients that come back to 9 places make no buffer once each was seen, and 12
    # places make one per gradient, the oldest buffers let go; the bits are the
    # array-API path's either way
    from netcl.optim import RMSProp

    monkeypatch.setattr(host, "SPARE_GRAD_BUFFERS", 2)

    def bounded(opt: Any) -> None:
        (launches,) = [c["host"] for c in opt._kept[0].launches.values()]
        assert len(launches.spare) <= 2 * 3

    made = _steps_over_memory_used_before(
        monkeypatch, lambda params: RMSProp(params, lr=1e-2), (300, 40, 500), pools, 3 * pools, 12, bounded
    )
    # (the first step's buffers go with its launches: the state it made lays the
    # launches out again at the second)
    assert made == ([3] * (pools + 1) + [0] * (2 * pools - 1) if pools == 3 else [3] * 3 * pools)


def test_torch_parameters_given_other_data_between_steps_are_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    # a kept plan tells a torch parameter's memory and layout from the parameter itself
    # (its `data` is a new tensor at each access) and takes new gradients by their
    # fingerprints: `parameter.data = x` with other memory, or the same memory laid out
    # otherwise (transposed), is followed on both paths, as torch's own Adam follows it
    # (16 float32 epsilons, as in tests/test_conformance.py, relative to the values,
    # which are of order 1, so also absolute: a value near zero comes out of a
    # difference of such values); a stale plan would pair values with other
    # gradients, or leave the new memory alone, and miss by far more
    from netcl.optim import Adam

    rng = np.random.default_rng(12)
    start = rng.standard_normal((40, 40)).astype(np.float32)
    other = rng.standard_normal((40, 40)).astype(np.float32)
    small = rng.standard_normal(7).astype(np.float32)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in ((40, 40), (7,))] for _ in range(7)]
    for path in ("kernel", "array-api"):
        monkeypatch.setattr(host, "PATH", path)
        params = [torch.nn.Parameter(torch.tensor(start)), torch.nn.Parameter(torch.tensor(small))]
        twins = [torch.nn.Parameter(torch.tensor(start)), torch.nn.Parameter(torch.tensor(small))]
        opt, torch_opt = Adam(params, lr=1e-2), torch.optim.Adam(twins, lr=1e-2)
        for k, step in enumerate(grads):
            for group in (params, twins):
                if k == 3:
                    group[0].data = torch.tensor(other)  # other memory, the same layout
                if k == 5:
                    group[0].data = group[0].data.t()  # the same memory, transposed
                for p, g in zip(group, step, strict=True):
                    p.grad = torch.tensor(g)  # a new gradient at every step, as autograd's
            opt.step()
            torch_opt.step()
            for p, twin in zip(params, twins, strict=True):
                eps = 16 * float(np.finfo(np.float32).eps)
                np.testing.assert_allclose(p.detach().numpy(), twin.detach().numpy(), rtol=eps, atol=eps)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_new_gradient_without_a_host_view_takes_the_array_api_path(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a new gradient with the last one's shape, strides and dtype but memory off its
    # dtype's alignment: the kernel cannot take it, the kept launches are laid out
    # again without it, and the step is right
    from netcl.optim import Adam

    def array(x: np.ndarray[Any, Any]) -> Any:
        return torch.tensor(x) if kind == "torch" else x.copy()

    monkeypatch.setattr(host, "PATH", "kernel")
    rng = np.random.default_rng(9)
    start, g0, g1 = (rng.standard_normal(500).astype(np.float32) for _ in range(3))
    param = Parameter(array(start), array(g0))
    alone = Parameter(array(start), array(g0))
    opt, reference = Adam([param], lr=1e-2), Adam([alone], lr=1e-2)
    for _ in range(2):  # (the second step's launches are kept for the third)
        monkeypatch.setattr(host, "PATH", "array-api")
        reference.step()
        monkeypatch.setattr(host, "PATH", "kernel")
        opt.step()
    unaligned = np.ndarray(500, np.float32, buffer=bytearray(g1.nbytes + 1), offset=1)
    unaligned[...] = g1
    assert not unaligned.flags.aligned
    param.grad = torch.frombuffer(unaligned.data, dtype=torch.float32) if kind == "torch" else unaligned
    assert np.asarray(param.grad).ctypes.data % 4 == 1
    alone.grad = array(g1)
    made = _count_layouts(monkeypatch)
    opt.step()
    assert made == [1]  # (x86 reads such memory all the same: the launches must not take it)
    monkeypatch.setattr(host, "PATH", "array-api")
    reference.step()
    assert np.asarray(param.data).tobytes() == np.asarray(alone.data).tobytes()


@pytest.mark.parametrize("spin", [0.0, 1e-6, 10.0], ids=["sleeps", "polls-then-sleeps", "polls"])
def test_a_host_step_returns_with_its_launches_done(spin: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # the step polls its last launch for up to SPIN_SECONDS, then waits for the queue:
    # however long it polls, the arrays hold the update when step() returns (a launch of
    # 4M values takes milliseconds here: one that returned early would show old values)
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal(1 << 22).astype(np.float32)
    grads = [rng.standard_normal(1 << 22).astype(np.float32) for _ in range(2)]

    monkeypatch.setattr(host, "SPIN_SECONDS", spin)
    monkeypatch.setattr(host, "PATH", "kernel")
    fused = _run(_copy, _copy, p0, grads, {"momentum": 0.9})
    monkeypatch.setattr(host, "PATH", "array-api")
    reference = _run(_copy, _copy, p0, grads, {"momentum": 0.9})
    assert fused[0].tobytes() == reference[0].tobytes()
    assert fused[1]["momentum_buffer"].tobytes() == reference[1]["momentum_buffer"].tobytes()


def _moved(tensor: torch.Tensor) -> None:
    """Move `tensor` to a copy of its values in other memory (the same object and layout)."""
    copy = tensor.clone()
    tensor.set_(copy.untyped_storage(), 0, copy.shape, copy.stride())


def test_a_numpy_array_cannot_be_given_other_memory_in_place() -> None:
    # kept launches take a numpy array by its fingerprint, which holds no address: they
    # rely on numpy (2.0 and later, the least netcl takes) refusing to point an array
    # at other memory, as torch's `set_` does (the test below)
    array = np.zeros(4, np.float32)
    with pytest.raises(AttributeError):
        array.data = np.ones(4, np.float32).data  # type: ignore[misc]
    assert not array.any()


@pytest.mark.parametrize("path", ["kernel", "array-api"])
def test_torch_arrays_given_other_memory_in_place_are_followed(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `tensor.set_(...)` and `tensor.data = x` move the very same tensor object to other
    # memory, with the same shape: a kept plan's launches must follow a state tensor
    # and a parameter tensor there (a stale launch would go on updating the old memory
    # and leave the new one as it was); the results are the bits of an optimizer
    # planned afresh at every step (each step's caches emptied)
    from netcl.optim import Adam

    monkeypatch.setattr(host, "PATH", path)
    rng = np.random.default_rng(21)
    start = rng.standard_normal(3000).astype(np.float32)
    grads = [rng.standard_normal(3000).astype(np.float32) for _ in range(6)]
    results = []
    for fresh in (False, True):
        param = Parameter(torch.tensor(start))  # (its data: the same tensor object at every access)
        opt = Adam([param], lr=1e-2)
        for k, g in enumerate(grads):
            param.grad = torch.tensor(g)
            state: Any = opt.state.get(id(param), {})
            if k == 2:
                _moved(state["exp_avg"])
            if k == 3:
                state["exp_avg_sq"].data = state["exp_avg_sq"].clone()
            if k == 4:
                _moved(param.data)
            if fresh:
                opt._kept.clear()
                opt._checked.clear()
            opt.step()
        state = opt.state[id(param)]
        results.append([np.asarray(x).tobytes() for x in (param.data, state["exp_avg"], state["exp_avg_sq"])])
    assert results[0] == results[1]
