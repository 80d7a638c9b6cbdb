"""What an optimizer tells the backends about its update.

An optimizer writes its per-element update twice: once as an OpenCL C function in
`kernels/<name>.cl` (run by the fused kernel) and once in array-API calls (run for arrays
that the kernel cannot reach, and the oracle the tests hold the kernel to). `UpdateRule`
names both, with the state buffers and scalars they take; `Step` is one param group's
update at one step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar, cast

import numpy as np

from netcl._kernels import KernelSpec, NonFinite
from netcl._xp import ArrayNamespace, XArray, is_torch

A = TypeVar("A", bound=XArray)

MASTER = "master_param"
"""The state buffer of a parameter's float32 master copy (`master_weights=True`)."""

__all__ = [
    "MASTER",
    "Hyper",
    "MemberScalars",
    "ReferenceUpdate",
    "Step",
    "UpdateRule",
    "pair",
    "real",
    "saturate",
    "sqrt",
]

Hyper: TypeAlias = Mapping[str, float | bool | tuple[float, float]]
"""A param group's hyperparameters, by name."""

MemberScalars: TypeAlias = Callable[[Hyper, int, frozenset[str]], tuple[float, ...]]
"""A parameter's own scalars at a step, from the group's hyperparameters, the parameter's
step count (this step included) and the state buffers made zero at this step."""


def real(hyper: Hyper, name: str) -> float:
    """A real-valued hyperparameter (checked when its group was made)."""
    value = hyper[name]
    assert not isinstance(value, tuple), name
    return float(value)


def pair(hyper: Hyper, name: str) -> tuple[float, float]:
    """A pair-valued hyperparameter such as Adam's betas."""
    value = hyper[name]
    assert isinstance(value, tuple), name
    return value


def sqrt(xp: ArrayNamespace, x: A) -> A:
    """The correctly rounded square root, as the fused kernel and numpy compute it.

    torch's float32 `sqrt` on the CPU is not correctly rounded (it differed from numpy
    by 1 ulp in 15% of 524,287 random values); the float64 square root of a float32
    value, rounded to float32, is (53 >= 2 * 24 + 2 bits, so the double rounding is
    innocuous).
    """
    if is_torch(x) and x.dtype == xp.float32:
        return cast(A, xp.astype(xp.sqrt(xp.astype(x, xp.float64)), xp.float32))
    return xp.sqrt(x)


def saturate(xp: ArrayNamespace, x: A) -> A:
    """`x`, or the largest finite value of its sign where it overflowed; NaN stays NaN
    (the kernels' `SAT`)."""
    largest = xp.finfo(x.dtype).max
    return xp.clip(x, -largest, largest)


class ReferenceUpdate(Protocol):
    """The update written in array-API calls on namespace `xp`.

    Returns the new parameter and the new state buffers and changes none of its inputs.
    Every element is updated: the backend then keeps the old values where the gradient
    is not finite (or makes the parameter NaN there), as the fused kernel does.
    """

    def __call__(
        self,
        xp: ArrayNamespace,
        param: A,
        grad: A,
        state: Mapping[str, A],
        hyper: Hyper,
        member: tuple[float, ...],
    ) -> tuple[A, dict[str, A]]: ...


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer's update, as the backends see it."""

    kernel: str
    """Stem of the OpenCL source in `kernels/` that defines the function `UPDATE`."""
    buffers: tuple[str, ...]
    """Every state buffer `UPDATE` takes, in its argument order."""
    flags: tuple[str, ...]
    """Every build-time switch of the source (`#if NAME`)."""
    variant: Callable[[Hyper], tuple[frozenset[str], tuple[str, ...]]]
    """The switches that are on, and the buffers that are used, for given hyperparameters."""
    kernel_scalars: Callable[[Hyper], tuple[float, ...]]
    """The scalar arguments of `UPDATE` that a group shares, in its argument order."""
    reference: ReferenceUpdate
    """The same update in array-API calls."""
    required: tuple[str, ...]
    """State buffers that every saved state entry has (torch's layout)."""
    nonnegative: tuple[str, ...] = ()
    """State buffers that hold averages of squares: a loaded one may not be negative."""
    saves_step: bool = True
    """Whether a saved state entry has `step` (torch's SGD keeps none)."""
    member_scalars: MemberScalars | None = None
    """Each parameter's own scalar arguments of `UPDATE`, after the group's."""
    member_scalar_count: int = 0
    """How many scalars `member_scalars` gives."""
    member_flags: frozenset[str] | None = None
    """The switches that use the member scalars, where only some do: a variant with none
    of them on takes none (a launch takes only parameters whose own scalars agree, so
    parameters with other step counts would need launches of their own). None: every
    variant."""

    @property
    def saved_buffers(self) -> tuple[str, ...]:
        """Every state buffer a parameter's state may hold: the update's and the master
        copy of the parameter (`master_weights`)."""
        return (*self.buffers, MASTER)


_SPECS: dict[KernelSpec, KernelSpec] = {}
"""Every kernel spec made, each once (a few per process: one per variant)."""


@dataclass(frozen=True)
class Step:
    """One param group's update at one step."""

    rule: UpdateRule
    hyper: Hyper
    nonfinite: NonFinite = "skip"
    """What the step does with an element whose gradient is NaN or infinite."""
    checked_dtypes: set[np.dtype[Any]] = field(default_factory=set, compare=False)
    """The dtypes whose range every hyperparameter and kernel scalar was checked in."""
    buffers: tuple[str, ...] = field(init=False)
    """The state buffers the variant uses."""
    scalars: tuple[float, ...] = field(init=False)
    """The kernel's scalar arguments."""
    kernel: KernelSpec = field(init=False)
    """The fused kernel that runs this step."""

    @property
    def member_scalars(self) -> MemberScalars | None:
        """The rule's `member_scalars` where this variant takes them, else None."""
        return self.rule.member_scalars if self.kernel.member_scalar_count else None

    @property
    def master(self) -> bool:
        """Whether the update changes a master copy of each parameter (`master_weights`)."""
        return self.kernel.master

    @property
    def stochastic(self) -> bool:
        """Whether half parameters are rounded stochastically (`stochastic_rounding`)."""
        return self.kernel.stochastic

    def __post_init__(self) -> None:
        flags, buffers = self.rule.variant(self.hyper)
        master = bool(self.hyper.get("master_weights", False))
        stochastic = bool(self.hyper.get("stochastic_rounding", False))
        if master:
            buffers = (*buffers, MASTER)
        object.__setattr__(self, "buffers", buffers)
        scalars = self.rule.kernel_scalars(self.hyper)
        object.__setattr__(self, "scalars", scalars)
        wanted = self.rule.member_flags
        members = self.rule.member_scalar_count if wanted is None or flags & wanted else 0
        spec = KernelSpec(
            source=self.rule.kernel,
            flags=flags,
            all_flags=self.rule.flags,
            buffers=buffers,
            all_buffers=self.rule.buffers,
            scalar_count=len(scalars),
            member_scalar_count=members,
            nonfinite=self.nonfinite,
            master=master,
            stochastic=stochastic,
        )
        # (one object per spec: a new learning rate, a new Step, still finds the launches
        # prepared for the last one's kernel by identity)
        object.__setattr__(self, "kernel", _SPECS.setdefault(spec, spec))
