"""netcl's learning-rate schedulers give torch's sequences (to 1e-12 relative), on every optimizer."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from netcl import Parameter
from netcl.optim import SGD, Adam, AdamW, Optimizer, RMSProp
from netcl.optim import lr_scheduler as ours

theirs = torch.optim.lr_scheduler
STEPS = 120

# (name, how to make it from (module, optimizer), optimizers it applies to)
Factory = Callable[[Any, Any], Any]
CASES: list[tuple[str, Factory]] = [
    ("LambdaLR", lambda m, o: m.LambdaLR(o, lambda e: 0.95**e)),
    ("MultiplicativeLR", lambda m, o: m.MultiplicativeLR(o, lambda e: 0.97)),
    ("StepLR", lambda m, o: m.StepLR(o, step_size=7, gamma=0.5)),
    ("MultiStepLR", lambda m, o: m.MultiStepLR(o, milestones=[10, 30, 30, 80], gamma=0.3)),
    ("ConstantLR", lambda m, o: m.ConstantLR(o, factor=0.25, total_iters=13)),
    ("LinearLR", lambda m, o: m.LinearLR(o, start_factor=0.1, end_factor=0.9, total_iters=40)),
    ("ExponentialLR", lambda m, o: m.ExponentialLR(o, gamma=0.97)),
    ("PolynomialLR", lambda m, o: m.PolynomialLR(o, total_iters=90, power=2.0)),
    ("CosineAnnealingLR", lambda m, o: m.CosineAnnealingLR(o, T_max=30, eta_min=1e-4)),
    ("CosineAnnealingWarmRestarts", lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-5)),
    ("CyclicLR", lambda m, o: m.CyclicLR(o, base_lr=1e-3, max_lr=0.1, step_size_up=9, mode="triangular2")),
    (
        "CyclicLR-exp",
        lambda m, o: m.CyclicLR(o, 1e-3, 0.05, step_size_up=5, step_size_down=11, mode="exp_range", gamma=0.99),
    ),
    ("OneCycleLR", lambda m, o: m.OneCycleLR(o, max_lr=0.1, total_steps=STEPS + 1)),
    (
        "OneCycleLR-3",
        lambda m, o: m.OneCycleLR(
            o, max_lr=[0.1, 0.05], total_steps=STEPS + 1, three_phase=True, anneal_strategy="linear"
        ),
    ),
    (
        "SequentialLR",
        lambda m, o: m.SequentialLR(
            o, [m.LinearLR(o, 0.1, total_iters=10), m.ExponentialLR(o, 0.9), m.CosineAnnealingLR(o, 20)], [10, 40]
        ),
    ),
    (
        "ChainedScheduler",
        lambda m, o: m.ChainedScheduler([m.ConstantLR(o, 0.5, total_iters=6), m.ExponentialLR(o, 0.98)]),
    ),
]
OPTIMIZERS: list[tuple[type[Optimizer[Any, Any, Any, Any]], Any, dict[str, Any]]] = [
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (RMSProp, torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
    (Adam, torch.optim.Adam, {"lr": 0.01}),
    (AdamW, torch.optim.AdamW, {"lr": 0.01}),
]


def _pair(cls: type[Any], torch_cls: Any, hyper: dict[str, Any]) -> tuple[Any, Any]:
    mine = [Parameter(np.ones(3, np.float32), np.full(3, 0.1, np.float32)) for _ in range(2)]
    twins = [torch.ones(3, requires_grad=True) for _ in range(2)]
    for t in twins:
        t.grad = torch.full((3,), 0.1)
    ours_opt = cls([{"params": [mine[0]]}, {"params": [mine[1]], "lr": hyper["lr"] / 2}], **hyper)
    their_opt = torch_cls([{"params": [twins[0]]}, {"params": [twins[1]], "lr": hyper["lr"] / 2}], **hyper)
    return ours_opt, their_opt


def _close(a: list[float], b: list[Any]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0) or x == y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("name", "make"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(("cls", "torch_cls", "hyper"), OPTIMIZERS, ids=[o[0].__name__ for o in OPTIMIZERS])
def test_the_sequence_is_torchs(
    name: str, make: Factory, cls: type[Any], torch_cls: Any, hyper: dict[str, Any]
) -> None:
    mine, twin = _pair(cls, torch_cls, hyper)
    a, b = make(ours, mine), make(theirs, twin)
    keys = ("lr", "momentum", "betas")
    for step in range(STEPS):
        assert _close(a.get_last_lr(), b.get_last_lr()), (step, a.get_last_lr(), b.get_last_lr())
        for g, h in zip(mine.param_groups, twin.param_groups, strict=True):
            for key in keys:
                if key in h:
                    x, y = g[key], h[key]
                    assert _close(list(x) if key == "betas" else [x], list(y) if key == "betas" else [y]), (step, key)
        mine.step()  # the optimizer checks every value the scheduler wrote
        twin.step()
        a.step()
        b.step()


def test_reduce_on_plateau_is_torchs() -> None:
    mine, twin = _pair(SGD, torch.optim.SGD, {"lr": 0.1})
    a = ours.ReduceLROnPlateau(mine, mode="min", factor=0.5, patience=3, threshold=0.01, cooldown=2, min_lr=1e-3)
    b = theirs.ReduceLROnPlateau(twin, mode="min", factor=0.5, patience=3, threshold=0.01, cooldown=2, min_lr=1e-3)
    losses = np.concatenate([np.linspace(1, 0.5, 20), np.full(60, 0.5), np.linspace(0.5, 0.49, 40)])
    for loss in losses:
        a.step(float(loss))
        b.step(float(loss))
        assert _close(a.get_last_lr(), b.get_last_lr())
    assert a.get_last_lr() != [0.1, 0.05]  # it did reduce


def test_state_dict_resumes_the_sequence() -> None:
    mine, _ = _pair(SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    scheduler = ours.OneCycleLR(mine, max_lr=0.1, total_steps=50)
    for _ in range(20):
        scheduler.step()
    saved = scheduler.state_dict()
    expected = []
    for _ in range(10):
        scheduler.step()
        expected.append(scheduler.get_last_lr())
    other, _ = _pair(SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    resumed = ours.OneCycleLR(other, max_lr=0.1, total_steps=50)
    resumed.load_state_dict(saved)
    got = []
    for _ in range(10):
        resumed.step()
        got.append(resumed.get_last_lr())
    assert got == expected


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_a_scheduler_refuses_a_learning_rate_it_computes_out_of_range(bad: float) -> None:
    # (torch writes it, and its optimizer steps with it; netcl's scheduler refuses it at
    # its step, and changes nothing: its epoch, its last rates, the group's lr)
    param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    optimizer = SGD([param], lr=0.1)
    scheduler = ours.LambdaLR(optimizer, lambda epoch: bad if epoch == 2 else 1.0 / (epoch + 1))
    scheduler.step()
    before = dict(scheduler.__dict__)
    with pytest.raises(ValueError, match=r"LambdaLR gives param_groups\[0\] lr=.* at last_epoch=2; a learning rate"):
        scheduler.step()
    assert scheduler.__dict__ == before and optimizer.param_groups[0]["lr"] == 0.05
    optimizer.step()  # (the optimizer still steps)


def test_warm_restarts_refusing_a_learning_rate_change_nothing() -> None:
    # (its step moves its own counters before it computes the rates)
    optimizer = SGD([Parameter(np.ones(3, np.float32), np.ones(3, np.float32))], lr=0.1)
    scheduler = ours.CosineAnnealingWarmRestarts(optimizer, T_0=4, eta_min=-1.0)  # (below 0 from the 2nd epoch)
    before, lr = dict(scheduler.__dict__), optimizer.param_groups[0]["lr"]
    with pytest.raises(ValueError, match=r"CosineAnnealingWarmRestarts gives param_groups\[0\] lr=-0.06"):
        scheduler.step()
    assert scheduler.__dict__ == before and optimizer.param_groups[0]["lr"] == lr


def test_a_learning_rate_written_out_of_range_is_checked_at_the_next_step() -> None:
    param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    optimizer = SGD([param], lr=0.1)
    optimizer.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr"):
        optimizer.step()
    assert np.array_equal(param.data, np.ones(3, np.float32))


def test_a_torch_checkpoint_with_scheduler_keys_loads() -> None:
    twin = torch.ones(3, requires_grad=True)
    twin.grad = torch.ones(3)
    torch_optimizer = torch.optim.SGD([twin], lr=0.1, momentum=0.9)
    theirs.OneCycleLR(torch_optimizer, max_lr=0.1, total_steps=10)
    torch_optimizer.step()
    optimizer = SGD([Parameter(np.ones(3, np.float32))], lr=0.1, momentum=0.9)
    optimizer.load_state_dict(torch_optimizer.state_dict())  # initial_lr, max_lr, min_lr ... ignored
    assert optimizer.param_groups[0]["lr"] == torch_optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda o: ours.StepLR(o, step_size=0), ValueError, "step_size must be an int >= 1, got 0"),
        (lambda o: ours.ConstantLR(o, factor=2.0), ValueError, "factor must be between 0 and 1"),
        (lambda o: ours.LambdaLR(o, [lambda e: 1.0, lambda e: 1.0]), ValueError, "one value per param group"),
        (lambda o: ours.CyclicLR(o, 0.1, 0.2, mode="zigzag"), ValueError, "mode must be"),  # type: ignore[arg-type]
        (lambda o: ours.OneCycleLR(o, 0.1), ValueError, "total_steps"),
        (lambda o: ours.ExponentialLR(object(), 0.9), TypeError, "param_groups"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_refused(make: Callable[[Any], object], error: type, words: str) -> None:
    optimizer = SGD([Parameter(np.ones(3, np.float32))], lr=0.1, momentum=0.9)
    with pytest.raises(error, match=words):
        make(optimizer)


def test_schedulers_steer_the_distributed_wrappers() -> None:
    """A world of one rank: DistributedOptimizer and ZeroRedundancyOptimizer expose the
    param groups a scheduler writes, and the wrapped optimizer steps with them."""
    from netcl.distributed import DistributedOptimizer, ZeroRedundancyOptimizer

    for make in (
        lambda ps: DistributedOptimizer(Adam(ps, lr=0.1)),
        lambda ps: ZeroRedundancyOptimizer(ps, Adam, lr=0.1),
    ):
        params = [Parameter(np.ones(3, np.float32), np.ones(3, np.float32))]
        optimizer = make(params)
        scheduler = ours.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        assert scheduler.get_last_lr() == [0.0125]
        inner = optimizer.optimizer if isinstance(optimizer, DistributedOptimizer) else optimizer.optim
        optimizer.step()  # the inner optimizer takes the written rate
        assert inner.param_groups[0]["lr"] == 0.0125


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"last_epoch": "3"}, r"state_dict\['last_epoch'\] must be an int >= -1, got '3'"),
        ({"last_epoch": True}, r"state_dict\['last_epoch'\] must be an int >= -1, got True"),
        ({"_step_count": -5}, r"state_dict\['_step_count'\] must be an int >= -1, got -5"),
        ({"base_lrs": ["0.1"]}, r"state_dict\['base_lrs'\] must be a list of real numbers"),
        ({"base_lrs": 0.1}, r"state_dict\['base_lrs'\] must be a list of real numbers"),
    ],
)
def test_a_scheduler_state_dict_with_counts_of_the_wrong_kind_is_refused(change: dict[str, Any], words: str) -> None:
    optimizer = SGD([Parameter(np.ones(3, np.float32), np.ones(3, np.float32))], lr=0.1)
    scheduler = ours.StepLR(optimizer, step_size=2)
    scheduler.step()
    before = dict(scheduler.__dict__)
    with pytest.raises(ValueError, match=words):
        scheduler.load_state_dict({**scheduler.state_dict(), **change})
    assert scheduler.__dict__ == before


@pytest.mark.parametrize("composite", ["ChainedScheduler", "SequentialLR"])
def test_a_composite_whose_scheduler_refuses_a_rate_changes_nothing(composite: str) -> None:
    # (ChainedScheduler's first scheduler has written its rate when the second refuses
    # its own: that write is undone too)
    optimizer = SGD([Parameter(np.ones(3, np.float32), np.ones(3, np.float32))], lr=0.1)
    first = ours.ExponentialLR(optimizer, gamma=0.5)
    second = ours.LambdaLR(optimizer, lambda epoch: math.nan if epoch == 2 else 1.0)
    scheduler: ours.LRScheduler = (
        ours.ChainedScheduler([first, second])
        if composite == "ChainedScheduler"
        else ours.SequentialLR(optimizer, [first, second], milestones=[1])
    )
    steps = 0
    for _ in range(5):  # (until the second scheduler's epoch 2)
        before = [dict(s.__dict__) for s in (scheduler, first, second)]
        lr = optimizer.param_groups[0]["lr"]
        try:
            scheduler.step()
        except ValueError as error:
            assert re.search(r"LambdaLR gives param_groups\[0\] lr=nan", str(error)), error
            break
        steps += 1
    else:
        raise AssertionError("no step refused the rate")
    assert steps >= 1  # (a step went through before)
    assert [s.__dict__ for s in (scheduler, first, second)] == before
    assert optimizer.param_groups[0]["lr"] == lr
