"""Every optimizer against torch, for every flag combination; bitwise agreement of
netcl's paths; checkpoints; bad input. RMSProp's own suites go further (test_conformance,
test_checkpoints, test_bad_input); these shared tests hold SGD, Adam and AdamW to the
same standard.

Tolerance: as in test_conformance (well-conditioned data, a few roundings per step, no
cancellation): 16 float eps relative, measured at most 4 eps.
"""

from __future__ import annotations

import copy
import itertools
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyopencl as cl
import pytest
import torch

from netcl import Parameter
from netcl.optim import SGD, Adam, AdamW, RMSProp
from netcl.optim.optimizer import Optimizer
from tests.kinds import KIND_IDS, KINDS, Kind
from tests.reference import well_conditioned


@dataclass(frozen=True)
class Case:
    name: str
    ours: Callable[..., Optimizer[Any, Any, Any, Any]]
    theirs: Callable[..., torch.optim.Optimizer]
    flags: list[dict[str, Any]]
    lr: float = 1e-3
    """Small enough that the parameters of `well_conditioned` stay away from zero: SGD's
    steps are not normalized, so its gradients of up to 200 (times 10 with momentum)
    need a smaller lr."""

    def __str__(self) -> str:
        return self.name


def _grid(**axes: list[Any]) -> list[dict[str, Any]]:
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


SGD_FLAGS = [
    f
    for f in _grid(
        momentum=[0.0, 0.9],
        dampening=[0.0, 0.3],
        nesterov=[False, True],
        weight_decay=[0.0, 0.1],
        maximize=[False, True],
    )
    if not (f["nesterov"] and (f["momentum"] == 0 or f["dampening"] != 0))
]
ADAM_FLAGS = _grid(amsgrad=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True])
CASES = [
    Case("SGD", SGD, torch.optim.SGD, SGD_FLAGS, lr=1e-5),
    Case("Adam", Adam, torch.optim.Adam, ADAM_FLAGS),
    Case("AdamW", AdamW, torch.optim.AdamW, ADAM_FLAGS),
    Case(
        "RMSProp",
        RMSProp,
        torch.optim.RMSprop,
        _grid(momentum=[0.0, 0.9], centered=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True]),
    ),
]
FLAT = [(case, flags) for case in CASES for flags in case.flags]
FLAT_IDS = [f"{case}-" + (",".join(f"{k}={v}" for k, v in flags.items() if v) or "plain") for case, flags in FLAT]
DTYPES = [np.float32, np.float64]
STEPS = 12


def _rtol(dtype: Any) -> float:
    return 16 * float(np.finfo(dtype).eps)


def _against_torch(
    case: Case,
    flags: dict[str, Any],
    dtype: Any,
    kind: Kind,
    queue: cl.CommandQueue,
    rng: np.random.Generator,
    give: Callable[[Parameter[Any], Any], None],
) -> None:
    """STEPS steps of ours and of torch from the same start; `give` hands our parameter
    each step's gradient (a numpy array)."""
    p0, grads = well_conditioned(rng, (17, 9), dtype, maximize=flags.get("maximize", False), steps=STEPS)
    param = Parameter(kind.make(queue, p0))
    ours = case.ours([param], lr=case.lr, **flags)
    twin = torch.tensor(p0, requires_grad=True)
    theirs = case.theirs([twin], lr=case.lr, **flags)
    for grad in grads:
        give(param, grad)
        ours.step()
        twin.grad = torch.tensor(grad)
        theirs.step()
    np.testing.assert_allclose(kind.get(param.data), twin.detach().numpy(), rtol=_rtol(dtype), atol=0)
    mine: dict[str, Any] = dict(ours.state_dict()["state"].get(0, {}))
    torch_state = theirs.state_dict()["state"].get(0, {})
    assert set(mine) == set(torch_state)
    for name, value in torch_state.items():
        np.testing.assert_allclose(np.asarray(mine[name]), value.numpy(), rtol=_rtol(dtype), atol=0, err_msg=name)


@pytest.mark.parametrize(
    "kind",
    [k for k in KINDS if k.name in ("pyopencl", "numpy", "array_api_strict")],
    ids=["pyopencl", "numpy", "array_api_strict"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("case", "flags"), FLAT, ids=FLAT_IDS)
def test_matches_torch(
    case: Case, flags: dict[str, Any], dtype: Any, kind: Kind, queue: cl.CommandQueue, rng: np.random.Generator
) -> None:
    def give(param: Parameter[Any], grad: Any) -> None:
        param.grad = kind.make(queue, grad)  # a new gradient array every step

    _against_torch(case, flags, dtype, kind, queue, rng, give)


@pytest.mark.parametrize("kind", [k for k in KINDS if k.name in ("pyopencl", "numpy")], ids=["pyopencl", "numpy"])
@pytest.mark.parametrize(("case", "flags"), FLAT, ids=FLAT_IDS)
def test_matches_torch_with_one_gradient_array_written_in_place(
    case: Case, flags: dict[str, Any], kind: Kind, queue: cl.CommandQueue, rng: np.random.Generator
) -> None:
    # A training loop's usual case: the same gradient array every step, so every step
    # after the first reuses the last one's bound launches, and only the scalars that
    # change with the step count (Adam's bias corrections, SGD's first momentum step)
    # are set again.
    def give(param: Parameter[Any], grad: Any) -> None:
        if param.grad is None:
            param.grad = kind.make(queue, grad)
        elif kind.name == "pyopencl":
            param.grad.set(grad)
        else:
            param.grad[...] = grad

    _against_torch(case, flags, np.float32, kind, queue, rng, give)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("case", "flags"), FLAT, ids=FLAT_IDS)
def test_paths_agree_bitwise(case: Case, flags: dict[str, Any], dtype: Any, queue: cl.CommandQueue) -> None:
    def run(kind: Kind) -> list[bytes]:
        rng = np.random.default_rng(3)
        param = Parameter(kind.make(queue, rng.standard_normal((11, 5)).astype(dtype)))
        opt = case.ours([param], lr=1e-2, **flags)
        out = []
        for _ in range(5):
            param.grad = kind.make(queue, (rng.standard_normal((11, 5)) * 10.0 ** rng.uniform(-3, 2)).astype(dtype))
            opt.step()
            out.append(kind.get(param.data).tobytes())
            out += [np.asarray(v).tobytes() for _, v in sorted(dict(opt.state_dict()["state"].get(0, {})).items())]
        return out

    by_kind = {k.name: run(k) for k in KINDS if k.name in ("pyopencl", "buffer-object", "numpy", "array_api_strict")}
    assert by_kind["pyopencl"] == by_kind["buffer-object"] == by_kind["numpy"] == by_kind["array_api_strict"]


@pytest.mark.parametrize("kind", [k for k in KINDS if k.name in ("pyopencl", "numpy")], ids=["pyopencl", "numpy"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_resuming_from_a_checkpoint_is_bit_identical(case: Case, kind: Kind, queue: cl.CommandQueue) -> None:
    flags = case.flags[-1]
    rng = np.random.default_rng(6)
    starts = [rng.standard_normal(s).astype(np.float32) for s in [(5, 4), (3,)]]
    grads = [[rng.standard_normal(s.shape).astype(np.float32) for s in starts] for _ in range(30)]

    def run(stop: int | None) -> list[bytes]:
        params = [Parameter(kind.make(queue, s)) for s in starts]
        opt = case.ours(params, lr=1e-2, **flags)
        for t, step in enumerate(grads):
            if t == stop:
                saved = pickle.dumps(opt.state_dict())
                opt = case.ours(params, lr=0.5)
                opt.load_state_dict(pickle.loads(saved))
                assert pickle.dumps(opt.state_dict()) == saved
            for p, g in zip(params, step, strict=True):
                p.grad = kind.make(queue, g)
            opt.step()
        return [kind.get(p.data).tobytes() for p in params]

    assert run(None) == run(10)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_loads_a_torch_checkpoint_and_continues_like_torch(case: Case, queue: cl.CommandQueue) -> None:
    flags = case.flags[-1]
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(20).astype(np.float32)
    grads = [rng.standard_normal(20).astype(np.float32) for _ in range(8)]
    twin = torch.tensor(p0, requires_grad=True)
    theirs = case.theirs([twin], lr=1e-2, **flags)
    for g in grads[:4]:
        twin.grad = torch.tensor(g)
        theirs.step()
    param = Parameter(twin.detach().numpy().copy())
    ours = case.ours([param])
    ours.load_state_dict(theirs.state_dict())
    for g in grads[4:]:
        twin.grad = torch.tensor(g)
        theirs.step()
        param.grad = g.copy()
        ours.step()
    np.testing.assert_allclose(param.data, twin.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adam_and_adamw_checkpoints_do_not_mix() -> None:
    param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    adam = Adam([param])
    adam.step()
    twin = torch.ones(3, requires_grad=True)
    torch_adamw = torch.optim.AdamW([twin])
    with pytest.raises(ValueError, match="decoupled_weight_decay=True; Adam means decoupled_weight_decay=False"):
        adam.load_state_dict(torch_adamw.state_dict())


def test_sgd_state_dict_has_torchs_layout() -> None:
    param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    plain, heavy = SGD([param], lr=0.1), SGD([param], lr=0.1, momentum=0.9)
    plain.step()
    heavy.step()
    assert plain.state_dict()["state"] == {}
    assert set(heavy.state_dict()["state"][0]) == {"momentum_buffer"}


BAD: list[tuple[Callable[..., Optimizer[Any, Any, Any, Any]], dict[str, Any], type[Exception], str]] = [
    (SGD, {"momentum": -0.1}, ValueError, "momentum"),
    (SGD, {"momentum": 1.0}, ValueError, "momentum"),
    (SGD, {"dampening": 1.5}, ValueError, "dampening"),
    (SGD, {"lr": float("nan")}, ValueError, "lr"),
    (SGD, {"nesterov": True}, ValueError, "nesterov=True needs momentum > 0"),
    (SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "dampening == 0"),
    (SGD, {"nesterov": "yes"}, TypeError, "nesterov must be a bool"),
    (Adam, {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"),
    (Adam, {"betas": (-0.1, 0.9)}, ValueError, r"betas\[0\]"),
    (Adam, {"betas": 0.9}, TypeError, "betas must be a pair"),
    (Adam, {"betas": (0.9, 0.99, 0.999)}, TypeError, "betas must be a pair"),
    (Adam, {"betas": ("a", 0.9)}, TypeError, r"betas\[0\] must be a real number"),
    (Adam, {"eps": 0.0}, ValueError, "eps"),
    (Adam, {"weight_decay": -1.0}, ValueError, "weight_decay"),
    (Adam, {"amsgrad": 1}, TypeError, "amsgrad must be a bool"),
    (AdamW, {"weight_decay": float("inf")}, ValueError, "weight_decay"),
    (AdamW, {"lr": -1.0}, ValueError, "lr"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"), BAD, ids=[f"{getattr(c, '__name__', c)}-{k}" for c, k, _, _ in BAD]
)
def test_bad_hyperparameters(
    cls: Callable[..., Optimizer[Any, Any, Any, Any]], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    param = Parameter(np.ones(3, np.float32))
    with pytest.raises(error, match=match):
        cls([param], **kwargs)
    with pytest.raises(error, match=match):
        cls([{"params": [param], **kwargs}])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_failed_step_changes_nothing(case: Case, queue: cl.CommandQueue) -> None:
    kind = next(k for k in KINDS if k.name == "pyopencl")
    params = [
        Parameter(kind.make(queue, np.ones(4, np.float32)), kind.make(queue, np.ones(4, np.float32))) for _ in range(3)
    ]
    opt = case.ours(params, lr=1e-2, **case.flags[-1])
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [p.data.get().tobytes() for p in params]
    params[2].grad = kind.make(queue, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="has shape"):
        opt.step()
    assert [p.data.get().tobytes() for p in params] == values
    after = opt.state_dict()
    assert pickle.dumps(after) == pickle.dumps(before)


def test_kinds_list_is_complete() -> None:
    assert {"pyopencl", "buffer-object", "numpy", "array_api_strict"} <= set(KIND_IDS)
