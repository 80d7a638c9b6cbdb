"""state_dict / load_state_dict: torch's layout, snapshots, exact resumption, validation."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pyopencl as cl
import pytest
import torch

from netcl import Parameter
from netcl.optim import RMSProp
from tests.kinds import KIND_IDS, KINDS, Kind

FLAGS: dict[str, Any] = {"momentum": 0.9, "centered": True, "weight_decay": 0.01}


def _setup(kind: Kind, queue: cl.CommandQueue, seed: int = 0) -> tuple[list[Parameter[Any]], list[list[Any]]]:
    rng = np.random.default_rng(seed)
    shapes = [(5, 3), (7,), ()]
    params = [Parameter(kind.make(queue, rng.standard_normal(s).astype(np.float32))) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(12)]
    return params, grads


def _run(
    opt: RMSProp, params: list[Parameter[Any]], grads: list[list[Any]], kind: Kind, queue: cl.CommandQueue
) -> None:
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = kind.make(queue, g)
        opt.step()


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_resuming_is_bit_identical(kind: Kind, queue: cl.CommandQueue) -> None:
    params, grads = _setup(kind, queue)
    straight = RMSProp(params, lr=0.01, **FLAGS)
    _run(straight, params, grads, kind, queue)

    resumed_params, _ = _setup(kind, queue)
    first = RMSProp(resumed_params, lr=0.01, **FLAGS)
    _run(first, resumed_params, grads[:5], kind, queue)
    blob = pickle.dumps(first.state_dict())
    second = RMSProp(resumed_params, lr=0.5)  # the load restores the hyperparameters too
    second.load_state_dict(pickle.loads(blob))
    assert second.param_groups[0]["lr"] == 0.01 and second.param_groups[0]["momentum"] == 0.9
    _run(second, resumed_params, grads[5:], kind, queue)

    for a, b in zip(params, resumed_params, strict=True):
        assert kind.get(a.data).tobytes() == kind.get(b.data).tobytes()
    saved_straight, saved_second = straight.state_dict(), second.state_dict()
    for index in range(3):
        for name in ("square_avg", "momentum_buffer", "grad_avg"):
            mine: dict[str, Any] = dict(saved_straight["state"][index])
            theirs: dict[str, Any] = dict(saved_second["state"][index])
            assert mine[name].tobytes() == theirs[name].tobytes()
        assert saved_second["state"][index]["step"] == 12


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_state_dict_is_a_torch_shaped_snapshot(kind: Kind, queue: cl.CommandQueue) -> None:
    params, grads = _setup(kind, queue)
    params[2].grad = None
    opt = RMSProp(params, lr=0.01, **FLAGS)
    for p, g in zip(params[:2], grads[0][:2], strict=True):
        p.grad = kind.make(queue, g)
    opt.step()
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups"}
    assert set(saved["state"]) == {0, 1}  # the parameter without a gradient has no state
    entry = saved["state"][0]
    assert set(entry) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
    assert entry["step"] == 1 and isinstance(entry["step"], int)
    assert isinstance(entry["square_avg"], np.ndarray) and entry["square_avg"].shape == (5, 3)
    assert saved["param_groups"] == [
        {
            "lr": 0.01,
            "alpha": 0.99,
            "eps": 1e-8,
            "weight_decay": 0.01,
            "momentum": 0.9,
            "centered": True,
            "maximize": False,
            "eps_in_sqrt": False,
            "initial_scale": 0.0,
            "bias_correction": False,
            "nesterov": False,
            "decoupled_weight_decay": False,
            "master_weights": False,
            "stochastic_rounding": False,
            "params": [0, 1, 2],
        }
    ]
    # a snapshot: writing to it changes nothing in the optimizer, and stepping changes not it
    kept = copy.deepcopy(saved)
    entry["square_avg"][...] = 123.0
    for p, g in zip(params[:2], grads[1][:2], strict=True):
        p.grad = kind.make(queue, g)
    opt.step()
    assert not np.any(kind.get(opt.state[id(params[0])]["square_avg"]) == 123.0)
    assert saved["state"][1]["square_avg"].tobytes() == kept["state"][1]["square_avg"].tobytes()


def test_loaded_state_shares_nothing(queue: cl.CommandQueue) -> None:
    kind = next(k for k in KINDS if k.name == "numpy")
    params, grads = _setup(kind, queue)
    a = RMSProp(params, lr=0.01)
    _run(a, params, grads[:2], kind, queue)
    saved = a.state_dict()
    other_params = [Parameter(np.array(p.data, copy=True)) for p in params]
    b = RMSProp(other_params, lr=0.01)
    b.load_state_dict(saved)
    before = [np.array(a.state[id(p)]["square_avg"], copy=True) for p in params]
    _run(b, other_params, grads[2:4], kind, queue)
    for p, kept in zip(params, before, strict=True):
        np.testing.assert_array_equal(a.state[id(p)]["square_avg"], kept)
    assert not np.shares_memory(b.state[id(other_params[0])]["square_avg"], saved["state"][0]["square_avg"])


def test_loads_a_torch_checkpoint_and_continues_like_torch(queue: cl.CommandQueue) -> None:
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((4, 6)).astype(np.float32)
    grads = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(6)]
    twin = torch.tensor(p0, requires_grad=True)
    torch_opt = torch.optim.RMSprop([twin], lr=0.01, momentum=0.5, centered=True)
    for g in grads[:3]:
        twin.grad = torch.tensor(g)
        torch_opt.step()
    kind = next(k for k in KINDS if k.name == "pyopencl")
    param = Parameter(kind.make(queue, twin.detach().numpy()))
    opt = RMSProp([param])
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.state[id(param)]["step"] == 3
    for g in grads[3:]:
        twin.grad = torch.tensor(g)
        torch_opt.step()
        param.grad = kind.make(queue, g)
        opt.step()
    np.testing.assert_allclose(param.data.get(), twin.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_restoring_across_backends(queue: cl.CommandQueue) -> None:
    by_name = {k.name: k for k in KINDS}
    results = []
    for first, second in (("numpy", "pyopencl"), ("pyopencl", "numpy"), ("numpy", "numpy")):
        a_kind, b_kind = by_name[first], by_name[second]
        params, grads = _setup(a_kind, queue)
        opt = RMSProp(params, lr=0.01, **FLAGS)
        _run(opt, params, grads[:4], a_kind, queue)
        moved = [Parameter(b_kind.make(queue, a_kind.get(p.data))) for p in params]
        opt2 = RMSProp(moved, lr=0.01, **FLAGS)
        opt2.load_state_dict(opt.state_dict())
        _run(opt2, moved, grads[4:], b_kind, queue)
        results.append([b_kind.get(p.data).tobytes() for p in moved])
    assert results[0] == results[1] == results[2]


def _saved(queue: cl.CommandQueue) -> tuple[RMSProp, dict[str, Any]]:
    kind = next(k for k in KINDS if k.name == "pyopencl")
    params, grads = _setup(kind, queue)
    opt = RMSProp(params, lr=0.01, momentum=0.9)
    _run(opt, params, grads[:2], kind, queue)
    return opt, dict(copy.deepcopy(opt.state_dict()))


def _mutations() -> list[tuple[str, Any, type[Exception], str]]:
    def group(**changes: Any) -> Any:
        def apply(sd: dict[str, Any]) -> None:
            sd["param_groups"][0].update(changes)

        return apply

    def entry(name: str, value: Any) -> Any:
        def apply(sd: dict[str, Any]) -> None:
            sd["state"][0][name] = value(sd["state"][0].get(name)) if callable(value) else value

        return apply

    def drop(key: str) -> Any:
        def apply(sd: dict[str, Any]) -> None:
            del sd["state"][0][key]

        return apply

    return [
        ("extra top-level key", lambda sd: sd.update(version=2), ValueError, "exactly the keys"),
        ("missing param_groups", lambda sd: sd.pop("param_groups"), ValueError, "exactly the keys"),
        ("two groups", lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), ValueError, "2 param group"),
        ("fewer params", lambda sd: sd["param_groups"][0]["params"].pop(), ValueError, "has 2 parameter"),
        ("repeated index", group(params=[0, 0, 1]), ValueError, "repeats index 0"),
        ("unknown group key", group(betas=(0.9, 0.99)), ValueError, "unknown key.*betas"),
        ("missing group key", lambda sd: sd["param_groups"][0].pop("alpha"), ValueError, "missing key.*alpha"),
        ("bad lr", group(lr=-1.0), ValueError, "lr"),
        ("bad alpha type", group(alpha="0.9"), TypeError, "alpha"),
        (
            "state for no parameter",
            lambda sd: sd["state"].update({7: sd["state"][0]}),
            ValueError,
            "belongs to no parameter",
        ),
        ("wrong shape", entry("square_avg", np.zeros((3, 5), np.float32)), ValueError, "shape"),
        ("wrong dtype", entry("square_avg", lambda v: v.astype(np.float64)), TypeError, "dtype float64"),
        ("NaN in v", entry("square_avg", lambda v: np.full_like(v, np.nan)), ValueError, "NaN or infinite"),
        ("inf in buffer", entry("momentum_buffer", lambda v: np.full_like(v, np.inf)), ValueError, "NaN or infinite"),
        ("negative v", entry("square_avg", lambda v: -np.ones_like(v)), ValueError, "negative"),
        ("negative step", entry("step", -1), ValueError, "whole number"),
        ("fractional step", entry("step", 2.5), ValueError, "whole number"),
        ("step a string", entry("step", "2"), TypeError, "number of steps"),
        ("missing v", drop("square_avg"), ValueError, "needs"),
        ("missing step", drop("step"), ValueError, "needs"),
        ("unknown state key", entry("exp_avg", np.zeros((5, 3), np.float32)), ValueError, "may have"),
        ("buffer not an array", entry("square_avg", [[0.0] * 3] * 5), TypeError, "must be an array"),
        ("not a dict", lambda sd: sd.update(state=[1, 2]), TypeError, "must be a dict"),
    ]


@pytest.mark.parametrize(("mutate", "error", "match"), [m[1:] for m in _mutations()], ids=[m[0] for m in _mutations()])
def test_load_validation_changes_nothing(
    mutate: Any, error: type[Exception], match: str, queue: cl.CommandQueue
) -> None:
    opt, saved = _saved(queue)
    before = copy.deepcopy(opt.state_dict())
    mutate(saved)
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for index, entry in before["state"].items():
        restored: dict[str, Any] = dict(after["state"][index])
        for name, value in entry.items():
            assert np.asarray(restored[name]).tobytes() == np.asarray(value).tobytes()


def test_saving_before_any_step(queue: cl.CommandQueue) -> None:
    opt, _ = _saved(queue)
    fresh = RMSProp([Parameter(np.zeros(2, np.float32))], lr=0.2)
    saved = fresh.state_dict()
    assert saved["state"] == {}
    fresh.load_state_dict(saved)
    assert fresh.state == {} and fresh.param_groups[0]["lr"] == 0.2
    assert opt.state  # unrelated optimizers untouched


@pytest.mark.parametrize(
    "kind",
    [k for k in KINDS if k.name in ("pyopencl", "numpy", "array_api_strict")],
    ids=["pyopencl", "numpy", "array_api_strict"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "flags", [{}, {"momentum": 0.9, "centered": True, "weight_decay": 0.01, "maximize": True}], ids=["plain", "all"]
)
def test_20_steps_save_load_200_steps_equal_an_uninterrupted_run(
    kind: Kind, dtype: Any, flags: dict[str, Any], queue: cl.CommandQueue
) -> None:
    rng = np.random.default_rng(12)
    shapes = [(6, 5), (9,), (4,)]
    starts = [rng.standard_normal(s).astype(dtype) for s in shapes]
    # the third parameter never has a gradient; the second has none for the first 10 steps
    grads = [
        [
            rng.standard_normal(s).astype(dtype) if (k != 2 and (k != 1 or t >= 10)) else None
            for k, s in enumerate(shapes)
        ]
        for t in range(220)
    ]

    def setup() -> tuple[list[Parameter[Any]], RMSProp]:
        params = [Parameter(kind.make(queue, s)) for s in starts]
        return params, RMSProp(params, lr=1e-2, **flags)

    def snapshot(params: list[Parameter[Any]], opt: RMSProp) -> list[bytes]:
        out = [kind.get(p.data).tobytes() for p in params]
        for p in params:
            entry: dict[str, Any] = dict(opt.state.get(id(p), {}))
            out += [f"{k}={v}".encode() if k == "step" else kind.get(v).tobytes() for k, v in sorted(entry.items())]
        return out

    def advance(params: list[Parameter[Any]], opt: RMSProp, step: list[Any]) -> None:
        for p, g in zip(params, step, strict=True):
            p.grad = None if g is None else kind.make(queue, g)
        opt.step()

    straight_params, straight = setup()
    expected = []
    for step in grads:
        advance(straight_params, straight, step)
        expected.append(snapshot(straight_params, straight))

    params, first = setup()
    empty = pickle.loads(pickle.dumps(first.state_dict()))  # before any step
    assert empty["state"] == {}
    for step in grads[:20]:
        advance(params, first, step)
    saved = pickle.dumps(first.state_dict())
    second = RMSProp(params)
    second.load_state_dict(pickle.loads(saved))
    assert pickle.dumps(second.state_dict()) == saved  # saving again gives the same bytes
    assert 2 not in second.state_dict()["state"]
    for t, step in enumerate(grads[20:], start=20):
        advance(params, second, step)
        assert snapshot(params, second) == expected[t], f"step {t + 1}"
