"""torch's habits: the parameter as a state key, torch's positional order and keywords,
and state dicts that torch's optimizers and `torch.load(weights_only=True)` take."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

from netcl import Parameter
from netcl.optim import SGD, Adam, AdamW, Optimizer, RMSProp, checkpoint

OPTIMIZERS: list[tuple[type[Optimizer[Any, Any, Any, Any]], Any, dict[str, Any]]] = [
    (RMSProp, torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.9, "centered": True}),
    (SGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    (Adam, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    (AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
]
IDS = [cls.__name__ for cls, _, _ in OPTIMIZERS]


def test_state_is_keyed_by_the_parameter_too(queue: cl.CommandQueue) -> None:
    tensor = Parameter(torch.ones(4), torch.full((4,), 0.5))
    array = Parameter(cl_array.to_device(queue, np.ones(4, np.float32)), cl_array.zeros(queue, 4, np.float32))
    optimizer = RMSProp([tensor, array])
    # mypy's strict equality sees int keys: `in` with a parameter works, but needs the ignore
    assert tensor not in optimizer.state and optimizer.state.get(tensor) is None  # type: ignore[comparison-overlap]
    optimizer.step()
    for param in (tensor, array):
        assert param in optimizer.state and id(param) in optimizer.state  # type: ignore[comparison-overlap]
        assert optimizer.state[param] is optimizer.state[id(param)] is optimizer.state.get(param)
    assert list(optimizer.state) == [id(tensor), id(array)]  # the keys stay ids
    entry = optimizer.state.pop(tensor)
    optimizer.state[tensor] = entry
    assert optimizer.state[id(tensor)] is entry


def test_rmsprop_takes_torchs_positional_order() -> None:
    param = Parameter(np.ones(3, np.float32))
    optimizer = RMSProp([param], 0.01, 0.9, 1e-6, 0.1, 0.5, True, False, None, True, False)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["alpha"], group["eps"], group["weight_decay"], group["momentum"]) == (
        0.01,
        0.9,
        1e-6,
        0.1,
        0.5,
    )
    assert group["centered"] is True and group["maximize"] is True


@pytest.mark.parametrize("cls", [RMSProp, SGD, Adam, AdamW])
def test_torchs_implementation_keywords_are_accepted_and_its_modes_refused(cls: type[Any]) -> None:
    param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    reference = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    cls([param], foreach=True, fused=True).step()  # netcl always fuses: the same step
    cls([reference], foreach=False, fused=None).step()
    assert np.array_equal(param.data, reference.data)
    with pytest.raises(TypeError, match="fused must be a bool or None, got builtins.str 'yes'"):
        cls([param], fused="yes")
    with pytest.raises(ValueError, match="differentiable=True is not supported: .*autograd"):
        cls([param], differentiable=True)
    if cls is not SGD:  # torch's SGD has no capturable
        with pytest.raises(ValueError, match="capturable=True is not supported: .*CUDA-graph"):
            cls([param], capturable=True)


def _twins(cls: type[Any], torch_cls: Any, hyper: dict[str, Any]) -> tuple[Any, list[Any], Any, list[Any]]:
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(shape).astype(np.float32) for shape in ((5, 3), (7,))]
    params = [Parameter(v.copy()) for v in values]
    tensors = [torch.tensor(v) for v in values]
    return cls(params, **hyper), params, torch_cls(tensors, **hyper), tensors


def _grads(step: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(step + 1)
    return [rng.standard_normal(shape).astype(np.float32) for shape in ((5, 3), (7,))]


@pytest.mark.parametrize(("cls", "torch_cls", "hyper"), OPTIMIZERS, ids=IDS)
def test_a_netcl_state_dict_loads_into_torch_and_back(cls: type[Any], torch_cls: Any, hyper: dict[str, Any]) -> None:
    """netcl steps 3 times, torch takes its state and both step 3 more alike; then torch's
    state dict loads into a fresh netcl optimizer, which steps like torch again. (netcl
    and torch agree on these updates to a few ulp: the tolerance of test_conformance.)"""
    optimizer, params, twin, tensors = _twins(cls, torch_cls, hyper)
    for step in range(3):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g
        optimizer.step()
    for t, p in zip(tensors, params, strict=True):
        t.data = torch.tensor(p.data)
    twin.load_state_dict(checkpoint.to_torch(optimizer.state_dict()))
    for step in range(3, 6):
        for p, t, g in zip(params, tensors, _grads(step), strict=True):
            p.grad, t.grad = g, torch.tensor(g)
        optimizer.step()
        twin.step()
    for p, t in zip(params, tensors, strict=True):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=2e-6, atol=1e-7)
    fresh = cls([Parameter(t.detach().numpy().copy()) for t in tensors], **hyper)
    fresh.load_state_dict(twin.state_dict())
    mine = fresh.state_dict()
    theirs = twin.state_dict()
    for index, entry in theirs["state"].items():
        for name, value in entry.items():
            expected = int(value) if name == "step" else value.numpy()
            np.testing.assert_array_equal(mine["state"][index][name], expected)


@pytest.mark.parametrize(("cls", "torch_cls", "hyper"), OPTIMIZERS, ids=IDS)
def test_torch_load_weights_only_reads_a_saved_state_dict(
    cls: type[Any], torch_cls: Any, hyper: dict[str, Any], tmp_path: Path
) -> None:
    optimizer, params, twin, _ = _twins(cls, torch_cls, hyper)
    for p, g in zip(params, _grads(0), strict=True):
        p.grad = g
    optimizer.step()
    saved = optimizer.state_dict()
    raw, converted = tmp_path / "raw.pt", tmp_path / "converted.pt"
    torch.save(saved, raw)
    torch.save(checkpoint.to_torch(saved), converted)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(raw, weights_only=True)  # numpy arrays: torch asks for them to be allowed
    with torch.serialization.safe_globals(checkpoint.torch_safe_globals()):
        back = torch.load(raw, weights_only=True)
    optimizer.load_state_dict(back)
    for index, entry in saved["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(back["state"][index][name], value)
    twin.load_state_dict(torch.load(converted, weights_only=True))  # torch's tensors: nothing to allow
    assert set(twin.state_dict()["state"]) == set(saved["state"])


@pytest.mark.parametrize("kind", ["numpy", "torch", "torch.nn.Parameter"])
@pytest.mark.parametrize("copied", ["copy.deepcopy", "pickle"])
@pytest.mark.parametrize(("cls", "torch_cls", "hyper"), OPTIMIZERS, ids=IDS)
def test_an_optimizer_is_copied_and_pickled_with_its_state(
    cls: type[Any], torch_cls: Any, hyper: dict[str, Any], copied: str, kind: str
) -> None:
    # torch's optimizers can be deep-copied and pickled: a copy over copies of the
    # parameters, whose state (keyed on `id()`, which the copies do not share) follows
    # them; it steps as the original does, each on its own arrays
    import copy
    import pickle

    rng = np.random.default_rng(3)
    starts = [rng.standard_normal(n).astype(np.float32) for n in (5, 40)]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in (5, 40)] for _ in range(6)]

    def make(values: np.ndarray[Any, Any]) -> Any:
        if kind == "numpy":
            return Parameter(values.copy(), np.zeros_like(values))
        if kind == "torch":
            return Parameter(torch.tensor(values), torch.zeros(values.shape))
        return torch.nn.Parameter(torch.tensor(values))

    params = [make(x) for x in starts]
    original = cls(params, **hyper)

    def step(optimizer: Any, k: int) -> None:
        for p, g in zip(optimizer.param_groups[0]["params"], grads[k], strict=True):
            p.grad = torch.tensor(g) if kind != "numpy" else g.copy()
        optimizer.step()

    for k in range(3):
        step(original, k)
    twin = copy.deepcopy(original) if copied == "copy.deepcopy" else pickle.loads(pickle.dumps(original))
    copies = twin.param_groups[0]["params"]
    assert all(c is not p for c, p in zip(copies, params, strict=True))
    assert sorted(twin.state) == sorted(map(id, copies))
    for k in range(3, 6):
        step(original, k)
        step(twin, k)
    for p, c in zip(params, copies, strict=True):
        assert np.asarray(p.data).tobytes() == np.asarray(c.data).tobytes()
        for name, value in original.state[p].items():
            other = twin.state[c][name]
            assert other == value if name == "step" else np.asarray(value).tobytes() == np.asarray(other).tobytes()
            assert name == "step" or other is not value


def test_an_optimizer_of_opencl_arrays_says_it_cannot_be_copied(queue: cl.CommandQueue) -> None:
    import copy

    param = Parameter(cl_array.zeros(queue, 4, np.float32), cl_array.zeros(queue, 4, np.float32))
    optimizer = Adam([param])
    optimizer.step()
    with pytest.raises(TypeError, match="cannot be pickled or copied .* state_dict"):
        copy.deepcopy(optimizer)
    optimizer.step()  # (it still steps)
    assert optimizer.state[param]["step"] == 2


def test_step_hooks_run_as_torchs() -> None:
    # torch's register_step_pre_hook / register_step_post_hook: the same calls, in the
    # same order, with the step's arguments (the optimizer first, as the method's
    # `self`), on netcl's optimizer and on torch's
    calls: dict[str, list[tuple[str, tuple[object, ...], dict[str, object]]]] = {"ours": [], "theirs": []}

    def recorder(log: list[tuple[str, tuple[object, ...], dict[str, object]]], name: str) -> Any:
        def hook(optimizer: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            assert args[0] is optimizer
            log.append((name, args[1:], kwargs))

        return hook

    def closure() -> float:
        return 1.0

    param = Parameter(np.ones(3, np.float32), np.full(3, 0.5, np.float32))
    twin = torch.nn.Parameter(torch.ones(3))
    twin.grad = torch.full((3,), 0.5)
    for key, optimizer in (("ours", SGD([param], lr=0.1)), ("theirs", torch.optim.SGD([twin], lr=0.1))):
        log = calls[key]
        handles = [
            optimizer.register_step_pre_hook(recorder(log, "pre 1")),
            optimizer.register_step_post_hook(recorder(log, "post")),
            optimizer.register_step_pre_hook(recorder(log, "pre 2")),
        ]
        optimizer.step()
        optimizer.step(closure)
        handles[0].remove()
        handles[0].remove()  # (again: nothing)
        optimizer.step()
        for handle in handles[1:]:
            handle.remove()
        optimizer.step()
    assert calls["ours"] == calls["theirs"]
    assert calls["ours"][:4] == [("pre 1", (), {}), ("pre 2", (), {}), ("post", (), {}), ("pre 1", (closure,), {})]
    assert np.allclose(param.data, twin.detach().numpy())  # (four steps each)


def test_every_optimizers_step_hooks_run_as_torchs() -> None:
    # torch.optim.optimizer.register_optimizer_step_pre_hook / _post_hook: hooks every
    # optimizer calls around its step, the pre-hooks before its own, the post-hooks
    # after; netcl's for netcl's optimizers, with the same calls in the same order
    import torch.optim.optimizer as torch_optimizer

    from netcl.optim import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    calls: dict[str, list[tuple[str, int]]] = {"ours": [], "theirs": []}

    def recorder(log: list[tuple[str, int]], name: str, ids: list[object]) -> Any:
        def hook(optimizer: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            assert args[0] is optimizer and kwargs == {}
            log.append((name, ids.index(optimizer)))

        return hook

    makers: dict[str, tuple[Any, Callable[[], object], Any, Any]] = {
        "ours": (
            SGD,
            lambda: Parameter(np.ones(3, np.float32), np.full(3, 0.5, np.float32)),
            register_optimizer_step_pre_hook,
            register_optimizer_step_post_hook,
        ),
        "theirs": (
            torch.optim.SGD,
            _torch_param,
            torch_optimizer.register_optimizer_step_pre_hook,
            torch_optimizer.register_optimizer_step_post_hook,
        ),
    }
    for key, (kind, make, every_pre, every_post) in makers.items():
        log = calls[key]
        optimizers: list[Any] = [kind([make()], lr=0.1), kind([make()], lr=0.1)]
        own = [
            optimizers[0].register_step_pre_hook(recorder(log, "own pre", optimizers)),
            optimizers[0].register_step_post_hook(recorder(log, "own post", optimizers)),
        ]
        every: list[Any] = [
            every_pre(recorder(log, "every pre", optimizers)),
            every_post(recorder(log, "every post", optimizers)),
        ]
        try:
            for optimizer in optimizers:
                optimizer.step()
            every[0].remove()
            optimizers[0].step()
        finally:
            for handle in every + own:
                handle.remove()
        optimizers[1].step()
    assert calls["ours"] == calls["theirs"]
    assert calls["ours"] == [
        ("every pre", 0), ("own pre", 0), ("own post", 0), ("every post", 0),
        ("every pre", 1), ("every post", 1),
        ("own pre", 0), ("own post", 0), ("every post", 0),
    ]  # fmt: skip


def _torch_param() -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 0.5)
    return param


Args = tuple[object, ...]
Kwargs = dict[str, object]


def test_a_step_pre_hook_gives_the_step_its_arguments_and_can_stop_it() -> None:
    import copy

    param = Parameter(np.ones(3, np.float32), np.full(3, 0.5, np.float32))
    optimizer = Adam([param], lr=0.1)
    seen: list[float] = []

    def closure() -> float:
        seen.append(float(param.data[0]))
        return 2.0

    def give(opt: Any, args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs]:
        return (opt,), {"closure": closure}

    with optimizer.register_step_pre_hook(give):
        assert optimizer.step() == 2.0  # (the closure the hook gave it)
    assert seen == [1.0]
    assert optimizer.step() is None  # (the handle removed the hook at the end of `with`)

    def refuse(opt: Any, args: Args, kwargs: Kwargs) -> None:
        raise KeyError("not now")

    before = (param.data.copy(), optimizer.state[param]["step"])
    with optimizer.register_step_pre_hook(refuse), pytest.raises(KeyError, match="not now"):
        optimizer.step()
    assert np.array_equal(param.data, before[0]) and optimizer.state[param]["step"] == before[1]
    wrong_returns: list[tuple[object, str]] = [
        (3, "returned builtins.int"),
        (((optimizer, closure, closure), {}), "and one more, the closure"),
        (((closure,), {}), "it takes the optimizer"),
    ]
    for bad, words in wrong_returns:

        def wrong(opt: Any, args: Args, kwargs: Kwargs, bad: object = bad) -> Any:
            return bad

        with optimizer.register_step_pre_hook(wrong), pytest.raises(TypeError, match=words):
            optimizer.step()
        assert np.array_equal(param.data, before[0]) and optimizer.state[param]["step"] == before[1]
    with pytest.raises(TypeError, match="a step post-hook must be callable, got builtins.int"):
        optimizer.register_step_post_hook(3)  # type: ignore[arg-type]

    def note(opt: Any, args: Args, kwargs: Kwargs) -> None:
        seen.append(-1.0)

    with optimizer.register_step_post_hook(note):
        copy.deepcopy(optimizer).step()  # (a copy has no hooks, as torch's)
        optimizer.step()
    assert seen == [1.0, -1.0]


def test_state_dict_hooks_run_as_torchs() -> None:
    # torch's four state-dict hooks: the same calls in the same order (`prepend` first),
    # a post-hook's state dict returned, a load pre-hook's loaded instead
    calls: dict[str, list[str]] = {"ours": [], "theirs": []}
    param = Parameter(np.ones(3, np.float32), np.full(3, 0.5, np.float32))
    twin = torch.nn.Parameter(torch.ones(3))
    twin.grad = torch.full((3,), 0.5)
    results = {}
    pairs: list[tuple[str, Any]] = [("ours", Adam([param], lr=0.1)), ("theirs", torch.optim.Adam([twin], lr=0.1))]
    for key, optimizer in pairs:
        log = calls[key]
        optimizer.step()

        def noted(name: str, log: list[str] = log) -> Any:
            return lambda *args: log.append(name)

        def marked(opt: Any, state_dict: Any, log: list[str] = log) -> Any:
            log.append("save post: marked")
            return {**state_dict, "param_groups": [{**g, "lr": 0.5} for g in state_dict["param_groups"]]}

        def halved(opt: Any, state_dict: Any, log: list[str] = log) -> Any:
            log.append("load pre: halved")
            return {**state_dict, "param_groups": [{**g, "lr": g["lr"] / 2} for g in state_dict["param_groups"]]}

        handles = [
            optimizer.register_state_dict_pre_hook(noted("save pre")),
            optimizer.register_state_dict_pre_hook(noted("save pre, prepended"), prepend=True),
            optimizer.register_state_dict_post_hook(marked),
            optimizer.register_state_dict_post_hook(noted("save post")),
            optimizer.register_load_state_dict_pre_hook(halved),
            optimizer.register_load_state_dict_post_hook(noted("load post")),
        ]
        saved = optimizer.state_dict()
        optimizer.load_state_dict(saved)
        results[key] = (saved["param_groups"][0]["lr"], optimizer.param_groups[0]["lr"])
        for handle in handles:
            handle.remove()
        optimizer.load_state_dict(optimizer.state_dict())
    assert calls["ours"] == calls["theirs"]
    assert calls["ours"] == [
        "save pre, prepended",
        "save pre",
        "save post: marked",
        "save post",
        "load pre: halved",
        "load post",
    ]
    assert results["ours"] == results["theirs"] == (0.5, 0.25)
