"""Learning-rate schedules: torch's schedulers, for every netcl optimizer.

Each class has torch's constructor signature, `step()`, `get_last_lr()`,
`state_dict()` and `load_state_dict()`, and computes torch's very sequence of learning
rates (the same formulas in the same order: `tests/test_lr_scheduler.py` compares 100+
steps of each with `torch.optim.lr_scheduler`). torch's own schedulers refuse optimizers
that are not torch's; these take anything with torch's `param_groups`: a netcl
optimizer, a `DistributedOptimizer`, a `ZeroRedundancyOptimizer`.

A scheduler writes `lr` (and, for `CyclicLR` and `OneCycleLR` with `cycle_momentum`,
`momentum` or `betas`) into the param groups; the optimizer checks each written value
at its next `step()` as it checks any edit. Like torch's, the schedulers keep their
bookkeeping in the groups too (`initial_lr`, and `max_lr`, `min_lr`, `max_momentum`,
`base_momentum` for the cyclic ones); netcl's `load_state_dict` accepts these keys in a
torch checkpoint and ignores them.

```python
import numpy as np

from netcl import Parameter
from netcl.optim import SGD
from netcl.optim.lr_scheduler import StepLR

param = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
optimizer = SGD([param], lr=0.1)
scheduler = StepLR(optimizer, step_size=2, gamma=0.5)
for epoch in range(4):
    optimizer.step()
    scheduler.step()
print(scheduler.get_last_lr())  # [0.025]
```
"""

from __future__ import annotations

import contextlib
import math
import numbers
import types
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

__all__ = [
    "ChainedScheduler",
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "ExponentialLR",
    "LRScheduler",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "MultiplicativeLR",
    "OneCycleLR",
    "PolynomialLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "StepLR",
]


class HasParamGroups(Protocol):
    """What a scheduler steers: an object with torch's `param_groups` (a list of dicts
    with `lr`, and `momentum` or `betas` for the cyclic schedules)."""

    @property
    def param_groups(self) -> Sequence[Any]: ...


def _check_optimizer(optimizer: object) -> HasParamGroups:
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "lr" in g for g in groups):
        raise TypeError(
            f"optimizer must have param_groups (a list of dicts with 'lr'), as netcl's optimizers do; "
            f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
        )
    return optimizer  # type: ignore[return-value]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _whole(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _per_group(name: str, optimizer: HasParamGroups, value: object) -> list[Any]:
    """torch's `_format_param`: one value per param group."""
    groups = len(optimizer.param_groups)
    if isinstance(value, list | tuple):
        if len(value) != groups:
            raise ValueError(f"{name} must have one value per param group ({groups}), got {len(value)}")
        return list(value)
    return [value] * groups


class LRScheduler:
    """The base of the schedulers: `step()` moves `last_epoch` on and writes each
    group's new `lr`; `get_last_lr()` gives them.

    Attributes:
        optimizer: The optimizer whose param groups the scheduler writes.
        last_epoch: The number of `step()` calls (-1 before the first, made by the
            constructor).
        base_lrs: Each group's `initial_lr`.
    """

    optimizer: HasParamGroups
    last_epoch: int
    base_lrs: list[float]

    def __init__(self, optimizer: HasParamGroups, last_epoch: int = -1) -> None:
        self.optimizer = _check_optimizer(optimizer)
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an int >= -1, got {last_epoch!r}")
        if last_epoch == -1:
            for group in self.optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for index, group in enumerate(self.optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param_groups[{index}] has no 'initial_lr', which resuming a scheduler "
                        f"(last_epoch={last_epoch}) needs: load the optimizer's state, or start at -1"
                    )
        self.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        raise NotImplementedError

    def _closed_form(self) -> list[float] | None:
        """The learning rates at `last_epoch` from `base_lrs` alone, where a schedule has
        such a form (torch's `_get_closed_form_lr`); used where `SequentialLR` starts
        a scheduler afresh."""
        return None

    def step(self) -> None:
        """Move to the next epoch (or step) and write each group's learning rate.

        Raises:
            ValueError: The schedule gives a learning rate that is not a finite real
                >= 0 (an `lr_lambda`'s NaN, say); then nothing changes.
        """
        with self._undone_on_error():
            self._step_count += 1
            self.last_epoch += 1
            self._write(self.get_lr())

    @contextlib.contextmanager
    def _undone_on_error(self) -> Iterator[None]:
        """Put the scheduler's attributes (and those of the schedulers it is made of),
        and the param groups' learning rates, back as they were where the body raises."""
        schedulers = [self, *getattr(self, "_schedulers", ())]
        saved = [dict(s.__dict__) for s in schedulers]
        lrs = self._lrs()
        try:
            yield
        except BaseException:
            for scheduler, attributes in zip(schedulers, saved, strict=True):
                scheduler.__dict__.clear()
                scheduler.__dict__.update(attributes)
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            raise

    def _restart(self) -> None:
        """Set `last_epoch` to 0 and write the learning rates there (SequentialLR's
        milestones), from the closed form where there is one."""
        self.last_epoch = 0
        closed = self._closed_form()
        self._write(closed if closed is not None else self.get_lr())

    def _write(self, values: Iterable[float]) -> None:
        lrs = list(values)
        for k, lr in enumerate(lrs):  # (all checked before any is written)
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 <= lr < math.inf:
                raise ValueError(
                    f"{type(self).__name__} gives param_groups[{k}] lr={lr!r} at last_epoch={self.last_epoch}; "
                    "a learning rate is a finite real >= 0, so nothing was written"
                )
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The learning rates the last `step()` wrote, one per param group."""
        return list(self._last_lr)

    def _lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (every attribute but the optimizer), as torch's."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from `state_dict()`.

        Raises:
            TypeError: `state_dict` is not a dict.
            ValueError: It has keys this scheduler does not have, or a count
                (`last_epoch`, `_step_count`) or `base_lrs` of the wrong kind.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        unknown = sorted(set(state_dict) - set(self.__dict__))
        if unknown:
            raise ValueError(f"state_dict has keys {unknown} that {type(self).__name__} does not have")
        for key in ("last_epoch", "_step_count"):  # (the counts every schedule reads)
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise ValueError(f"state_dict['{key}'] must be an int >= -1, got {value!r}")
        lrs = state_dict.get("base_lrs", self.__dict__.get("base_lrs", []))
        if not isinstance(lrs, list) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in lrs):
            raise ValueError(f"state_dict['base_lrs'] must be a list of real numbers, got {lrs!r}")
        self.__dict__.update(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self._last_lr})"


def _lambdas(optimizer: HasParamGroups, lr_lambda: object) -> list[Callable[[int], float]]:
    lambdas = _per_group("lr_lambda", _check_optimizer(optimizer), lr_lambda)
    for k, fn in enumerate(lambdas):
        if not callable(fn):
            raise TypeError(f"lr_lambda[{k}] must be a function of the epoch, got {type(fn).__name__}")
    return lambdas


class LambdaLR(LRScheduler):
    """`lr = initial_lr * lr_lambda(epoch)` (one function, or one per group)."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        self.lr_lambdas: list[Callable[[int], float]] = _lambdas(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        return [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """As torch's: the functions are left out (None), but callable objects' attributes."""
        state = super().state_dict()
        state["lr_lambdas"] = [
            None if isinstance(fn, types.FunctionType | types.LambdaType) else dict(vars(fn)) for fn in self.lr_lambdas
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state; the functions stay this scheduler's (callable objects take
        the saved attributes)."""
        state = dict(state_dict)
        saved = state.pop("lr_lambdas", None) or []
        super().load_state_dict(state)
        for fn, attributes in zip(self.lr_lambdas, saved, strict=False):
            if attributes is not None:
                fn.__dict__.update(attributes)


class MultiplicativeLR(LambdaLR):
    """`lr *= lr_lambda(epoch)` at each step after the first."""

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self._is_initial:
            return self._lrs()
        return [
            group["lr"] * fn(self.last_epoch)
            for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups, strict=True)
        ]


class StepLR(LRScheduler):
    """`lr *= gamma` every `step_size` epochs."""

    def __init__(self, optimizer: HasParamGroups, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self.step_size: int = _whole("step_size", step_size, 1)
        self.gamma: float = _real("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._lrs()
        return [lr * self.gamma for lr in self._lrs()]

    def _closed_form(self) -> list[float]:
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    """`lr *= gamma` at each milestone (twice at a milestone given twice)."""

    def __init__(
        self, optimizer: HasParamGroups, milestones: Iterable[int], gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        self.milestones: Counter[int] = Counter(_whole("milestones[...]", m, 0) for m in milestones)
        self.gamma: float = _real("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self.last_epoch not in self.milestones:
            return self._lrs()
        return [lr * self.gamma ** self.milestones[self.last_epoch] for lr in self._lrs()]

    def _closed_form(self) -> list[float]:
        milestones = sorted(self.milestones.elements())
        return [base * self.gamma ** bisect_right(milestones, self.last_epoch) for base in self.base_lrs]


class ConstantLR(LRScheduler):
    """`lr = initial_lr * factor` for `total_iters` epochs, then `initial_lr`."""

    def __init__(
        self, optimizer: HasParamGroups, factor: float = 1.0 / 3, total_iters: int = 5, last_epoch: int = -1
    ) -> None:
        self.factor: float = _real("factor", factor)
        if not 0 <= self.factor <= 1:
            raise ValueError(f"factor must be between 0 and 1, got {factor!r}")
        self.total_iters: int = _whole("total_iters", total_iters, 0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self.last_epoch == 0:
            return [lr * self.factor for lr in self._lrs()]
        if self.last_epoch != self.total_iters:
            return self._lrs()
        return [lr * (1.0 / self.factor) for lr in self._lrs()]

    def _closed_form(self) -> list[float]:
        return [
            base * (self.factor + (self.last_epoch >= self.total_iters) * (1 - self.factor)) for base in self.base_lrs
        ]


class LinearLR(LRScheduler):
    """`lr` goes linearly from `initial_lr * start_factor` to `initial_lr * end_factor`
    over `total_iters` epochs."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        self.start_factor: float = _real("start_factor", start_factor)
        self.end_factor: float = _real("end_factor", end_factor)
        if not 0 < self.start_factor <= 1:
            raise ValueError(f"start_factor must be > 0 and <= 1, got {start_factor!r}")
        if not 0 <= self.end_factor <= 1:
            raise ValueError(f"end_factor must be between 0 and 1, got {end_factor!r}")
        self.total_iters: int = _whole("total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self.last_epoch == 0:
            return [lr * self.start_factor for lr in self._lrs()]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._lrs()
        change = self.end_factor - self.start_factor
        ratio = 1.0 + change / (self.total_iters * self.start_factor + (self.last_epoch - 1) * change)
        return [lr * ratio for lr in self._lrs()]

    def _closed_form(self) -> list[float]:
        change = self.end_factor - self.start_factor
        share = min(self.total_iters, self.last_epoch) / self.total_iters
        return [base * (self.start_factor + change * share) for base in self.base_lrs]


class ExponentialLR(LRScheduler):
    """`lr *= gamma` every epoch."""

    def __init__(self, optimizer: HasParamGroups, gamma: float, last_epoch: int = -1) -> None:
        self.gamma: float = _real("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self._is_initial:
            return self._lrs()
        return [lr * self.gamma for lr in self._lrs()]

    def _closed_form(self) -> list[float]:
        return [base * self.gamma**self.last_epoch for base in self.base_lrs]


class PolynomialLR(LRScheduler):
    """`lr = initial_lr * (1 - epoch / total_iters) ** power`, then 0."""

    def __init__(
        self, optimizer: HasParamGroups, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1
    ) -> None:
        self.total_iters: int = _whole("total_iters", total_iters, 1)
        self.power: float = _real("power", power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._lrs()
        decay = ((1.0 - self.last_epoch / self.total_iters) / (1.0 - (self.last_epoch - 1) / self.total_iters)) ** (
            self.power
        )
        return [lr * decay for lr in self._lrs()]

    def _closed_form(self) -> list[float]:
        left = 1.0 - min(self.total_iters, self.last_epoch) / self.total_iters
        return [base * left**self.power for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """`lr` follows half a cosine from `initial_lr` down to `eta_min` over `T_max`
    epochs (and back up, as torch's does past `T_max`)."""

    def __init__(self, optimizer: HasParamGroups, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:  # noqa: N803 (torch's name)
        self.T_max: int = _whole("T_max", T_max, 1)
        self.eta_min: float = _real("eta_min", eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        if self._is_initial:
            return self._lrs()
        t, n, low = self.last_epoch, self.T_max, self.eta_min
        if self._step_count == 1 and t > 0:
            return [low + (base - low) * (1 + math.cos(t * math.pi / n)) / 2 for base in self.base_lrs]
        if (t - 1 - n) % (2 * n) == 0:
            return [
                lr + (base - low) * (1 - math.cos(math.pi / n)) / 2
                for base, lr in zip(self.base_lrs, self._lrs(), strict=True)
            ]
        ratio = (1 + math.cos(math.pi * t / n)) / (1 + math.cos(math.pi * (t - 1) / n))
        return [ratio * (lr - low) + low for lr in self._lrs()]

    def _closed_form(self) -> list[float]:
        low = self.eta_min
        return [
            low + (base - low) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2 for base in self.base_lrs
        ]


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing from `initial_lr` to `eta_min` over `T_0` epochs, restarted
    each time, each period `T_mult` times longer than the one before (SGDR)."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        T_0: int,  # noqa: N803 (torch's names)
        T_mult: int = 1,  # noqa: N803
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.T_0: int = _whole("T_0", T_0, 1)
        self.T_i: int = self.T_0
        self.T_mult: int = _whole("T_mult", T_mult, 1)
        self.eta_min: float = _real("eta_min", eta_min)
        self.T_cur: int = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        low = self.eta_min
        return [low + (base - low) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2 for base in self.base_lrs]

    def step(self) -> None:
        """Move to the next epoch, restarting the cosine at the end of each period."""
        with self._undone_on_error():
            self._restarting_step()

    def _restarting_step(self) -> None:
        self._step_count += 1
        if self.last_epoch < 0:
            epoch = 0
        else:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        if self.last_epoch < 0:
            self.T_i = self.T_0
            self.T_cur = epoch
        self.last_epoch = epoch
        self._write(self.get_lr())


class CyclicLR(LRScheduler):
    """`lr` cycles between `base_lr` and `max_lr` (and, with `cycle_momentum`, momentum
    or Adam's beta1 the other way), stepped once per batch (Smith's cyclical rates)."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        base_lr: float | list[float],
        max_lr: float | list[float],
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: Literal["cycle", "iterations"] = "cycle",
        cycle_momentum: bool = True,
        base_momentum: float = 0.8,
        max_momentum: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        optimizer = _check_optimizer(optimizer)
        base_lrs = [_real("base_lr", v) for v in _per_group("base_lr", optimizer, base_lr)]
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups, strict=True):
                group["lr"] = lr
        self.max_lrs: list[float] = [_real("max_lr", v) for v in _per_group("max_lr", optimizer, max_lr)]
        up = float(_whole("step_size_up", step_size_up, 1))
        down = float(_whole("step_size_down", step_size_down, 1)) if step_size_down is not None else up
        self.total_size: float = up + down
        self.step_ratio: float = up / self.total_size
        if mode not in ("triangular", "triangular2", "exp_range") and scale_fn is None:
            raise ValueError(f"mode must be 'triangular', 'triangular2' or 'exp_range', got {mode!r}")
        if scale_mode not in ("cycle", "iterations"):
            raise ValueError(f"scale_mode must be 'cycle' or 'iterations', got {scale_mode!r}")
        self.mode: str = mode
        self.gamma: float = _real("gamma", gamma)
        self._scale_fn_custom = scale_fn
        self.scale_mode: str = scale_mode
        if scale_fn is None:
            self.scale_mode = "iterations" if mode == "exp_range" else "cycle"
        self.cycle_momentum: bool = bool(cycle_momentum)
        if self.cycle_momentum:
            self.use_beta1: bool = _momentum_kind(optimizer)
            self.base_momentums: list[float] = [
                _real("base_momentum", v) for v in _per_group("base_momentum", optimizer, base_momentum)
            ]
            self.max_momentums: list[float] = [
                _real("max_momentum", v) for v in _per_group("max_momentum", optimizer, max_momentum)
            ]
            if last_epoch == -1:
                for top, bottom, group in zip(
                    self.max_momentums, self.base_momentums, optimizer.param_groups, strict=True
                ):
                    _set_momentum(group, top, self.use_beta1)
                    group["max_momentum"] = top
                    group["base_momentum"] = bottom
        super().__init__(optimizer, last_epoch)
        self.base_lrs: list[float] = base_lrs

    def scale_fn(self, x: float) -> float:
        """The height of the cycle: the custom function, else the mode's."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular2":
            return float(1 / (2.0 ** (x - 1)))
        if self.mode == "exp_range":
            return float(self.gamma**x)
        return 1.0

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        scale = x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)
        at = cycle if self.scale_mode == "cycle" else self.last_epoch
        lrs = [
            base + (top - base) * scale * self.scale_fn(at)
            for base, top in zip(self.base_lrs, self.max_lrs, strict=True)
        ]
        if self.cycle_momentum:
            for bottom, top, group in zip(
                self.base_momentums, self.max_momentums, self.optimizer.param_groups, strict=True
            ):
                _set_momentum(group, top - (top - bottom) * scale * self.scale_fn(at), self.use_beta1)
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """As torch's: a custom `scale_fn` is left out."""
        state = super().state_dict()
        state.pop("_scale_fn_custom", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state; a custom `scale_fn` stays this scheduler's."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "_scale_fn_custom"})


def _momentum_kind(optimizer: HasParamGroups) -> bool:
    """True where the groups have Adam's `betas`, False where they have `momentum`."""
    first = optimizer.param_groups[0]
    if "betas" in first:
        return True
    if "momentum" in first:
        return False
    raise ValueError("cycle_momentum needs an optimizer with momentum or betas (SGD, RMSProp, Adam, AdamW)")


def _set_momentum(group: Any, value: float, beta1: bool) -> None:
    if beta1:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


class OneCycleLR(LRScheduler):
    """The 1cycle policy: `lr` rises from `max_lr / div_factor` to `max_lr`, then falls
    to `max_lr / div_factor / final_div_factor` over `total_steps` (and momentum the
    other way), stepped once per batch."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        optimizer = _check_optimizer(optimizer)
        if total_steps is not None:
            self.total_steps: int = _whole("total_steps", total_steps, 1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = _whole("epochs", epochs, 1) * _whole("steps_per_epoch", steps_per_epoch, 1)
        else:
            raise ValueError("give total_steps, or epochs and steps_per_epoch")
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise ValueError(f"pct_start must be a float between 0 and 1, got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy: str = anneal_strategy
        ends = [float(pct_start * self.total_steps) - 1]
        if three_phase:
            ends.append(float(2 * pct_start * self.total_steps) - 2)
            lrs = [("initial_lr", "max_lr"), ("max_lr", "initial_lr"), ("initial_lr", "min_lr")]
            moms = [
                ("max_momentum", "base_momentum"),
                ("base_momentum", "max_momentum"),
                ("max_momentum", "max_momentum"),
            ]
        else:
            lrs = [("initial_lr", "max_lr"), ("max_lr", "min_lr")]
            moms = [("max_momentum", "base_momentum"), ("base_momentum", "max_momentum")]
        ends.append(self.total_steps - 1)
        self.phases: list[tuple[float, tuple[str, str], tuple[str, str]]] = [
            (end, lr, mom) for end, lr, mom in zip(ends, lrs, moms, strict=True)
        ]
        max_lrs = [_real("max_lr", v) for v in _per_group("max_lr", optimizer, max_lr)]
        if last_epoch == -1:
            for top, group in zip(max_lrs, optimizer.param_groups, strict=True):
                group["initial_lr"] = top / div_factor
                group["max_lr"] = top
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum: bool = bool(cycle_momentum)
        if self.cycle_momentum:
            self.use_beta1: bool = _momentum_kind(optimizer)
            tops = [_real("max_momentum", v) for v in _per_group("max_momentum", optimizer, max_momentum)]
            bottoms = [_real("base_momentum", v) for v in _per_group("base_momentum", optimizer, base_momentum)]
            if last_epoch == -1:
                for top, bottom, group in zip(tops, bottoms, optimizer.param_groups, strict=True):
                    _set_momentum(group, top, self.use_beta1)
                    group["max_momentum"] = top
                    group["base_momentum"] = bottom
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rates of the step being taken (what `step()` writes)."""
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"stepped {step} times, past total_steps={self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for k, (end, (lr_from, lr_to), (mom_from, mom_to)) in enumerate(self.phases):
                if step <= end or k == len(self.phases) - 1:
                    pct = (step - start) / (end - start)
                    lrs.append(_anneal(self.anneal_strategy, group[lr_from], group[lr_to], pct))
                    if self.cycle_momentum:
                        momentum = _anneal(self.anneal_strategy, group[mom_from], group[mom_to], pct)
                        _set_momentum(group, momentum, self.use_beta1)
                    break
                start = end
        return lrs


class _Composite(LRScheduler):
    """A scheduler made of schedulers (`_schedulers`), whose state holds theirs."""

    _schedulers: list[LRScheduler]

    def state_dict(self) -> dict[str, Any]:
        """As torch's: each scheduler's state in `_schedulers`."""
        state = super().state_dict()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state, each scheduler's too."""
        state = dict(state_dict)
        saved = state.pop("_schedulers")
        super().load_state_dict(state)
        for scheduler, inner in zip(self._schedulers, saved, strict=True):
            scheduler.load_state_dict(inner)


class SequentialLR(_Composite):
    """One scheduler after another: `schedulers[k]` from `milestones[k-1]` on."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        schedulers: Sequence[LRScheduler],
        milestones: Sequence[int],
        last_epoch: int = -1,
    ) -> None:
        optimizer = _check_optimizer(optimizer)
        _check_chain(optimizer, schedulers)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"SequentialLR needs one milestone fewer than schedulers: {len(schedulers)} schedulers, "
                f"{len(milestones)} milestones"
            )
        self._schedulers = list(schedulers)
        self._milestones = [_whole("milestones[...]", m, 0) for m in milestones]
        self.last_epoch: int = last_epoch + 1
        self.optimizer: HasParamGroups = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for scheduler in self._schedulers:  # undo the step each constructor took
            scheduler.last_epoch -= 1
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def step(self) -> None:
        """Step the scheduler whose turn it is (restarted at its milestone); one that
        refuses a rate changes nothing (see `LRScheduler.step`)."""
        with self._undone_on_error():
            self._sequence_step()

    def _sequence_step(self) -> None:
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._restart()
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()


class ChainedScheduler(_Composite):
    """Several schedulers stepped together, each on the rates the one before wrote."""

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: HasParamGroups | None = None) -> None:
        if len(schedulers) < 1:
            raise ValueError("ChainedScheduler needs at least one scheduler")
        chosen = _check_optimizer(optimizer if optimizer is not None else schedulers[0].optimizer)
        _check_chain(chosen, schedulers)
        self._schedulers = list(schedulers)
        self.optimizer: HasParamGroups = chosen
        self._last_lr = self._lrs()

    def step(self) -> None:
        """Step every scheduler, in order; one that refuses a rate changes nothing, the
        others' steps included (see `LRScheduler.step`)."""
        with self._undone_on_error():
            for scheduler in self._schedulers:
                scheduler.step()
            self._last_lr = self._lrs()


def _check_chain(optimizer: HasParamGroups, schedulers: Sequence[LRScheduler]) -> None:
    if len(schedulers) < 1:
        raise ValueError("at least one scheduler is needed")
    for k, scheduler in enumerate(schedulers):
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(f"schedulers[{k}] is a ReduceLROnPlateau, whose step() needs the metric")
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"schedulers[{k}] is a {type(scheduler).__name__}, not a netcl scheduler")
        if scheduler.optimizer is not optimizer:
            raise ValueError(f"schedulers[{k}] steers another optimizer")


class ReduceLROnPlateau(LRScheduler):
    """`lr *= factor` when a metric stops improving for `patience` epochs; `step(metric)`."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: list[float] | float = 0,
        eps: float = 1e-8,
    ) -> None:
        self.optimizer: HasParamGroups = _check_optimizer(optimizer)
        self.factor: float = _real("factor", factor)
        if not self.factor < 1.0:
            raise ValueError(f"factor must be < 1.0, got {factor!r}")
        if isinstance(min_lr, list | tuple):
            self.default_min_lr: float | None = None
            self.min_lrs: list[float] = [_real("min_lr", v) for v in _per_group("min_lr", self.optimizer, list(min_lr))]
        else:
            self.default_min_lr = _real("min_lr", min_lr)
            self.min_lrs = [self.default_min_lr] * len(self.optimizer.param_groups)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.patience: int = _whole("patience", patience, 0)
        self.cooldown: int = _whole("cooldown", cooldown, 0)
        self.eps: float = _real("eps", eps)
        self.mode: str = mode
        self.threshold: float = _real("threshold", threshold)
        self.threshold_mode: str = threshold_mode
        self.last_epoch: int = 0
        self._last_lr = self._lrs()
        self.best: float = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs: int = 0
        self.cooldown_counter: int = 0

    def _is_better(self, current: float) -> bool:
        best, threshold = self.best, self.threshold
        if self.mode == "min":
            return current < (best * (1.0 - threshold) if self.threshold_mode == "rel" else best - threshold)
        return current > (best * (threshold + 1.0) if self.threshold_mode == "rel" else best + threshold)

    def step(self, metrics: float) -> None:  # type: ignore[override]
        """Take the epoch's metric (a loss, an accuracy ...) and reduce the learning rates
        if it has not improved for more than `patience` epochs."""
        current = float(metrics)
        self.last_epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            if len(self.min_lrs) != len(self.optimizer.param_groups):
                if self.default_min_lr is None:
                    raise RuntimeError("the optimizer has another number of param groups than min_lr has values")
                self.min_lrs = [self.default_min_lr] * len(self.optimizer.param_groups)
            for k, group in enumerate(self.optimizer.param_groups):
                old = float(group["lr"])
                new = max(old * self.factor, self.min_lrs[k])
                if old - new > self.eps:
                    group["lr"] = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._lrs()
