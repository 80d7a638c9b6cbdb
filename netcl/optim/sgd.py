"""SGD: hyperparameters, state, and the update written once for arrays in any library.

The fused OpenCL form of the same update is `kernels/sgd.cl`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, NotRequired, Required, TypedDict, TypeVar

from netcl._types import Array, ParameterLike
from netcl._update import Hyper, UpdateRule, real, saturate
from netcl._xp import ArrayNamespace, XArray
from netcl.optim._hyper import PRECISION_HYPERPARAMETERS, Flag, HyperCheck, Real
from netcl.optim.optimizer import FloatArray, NonFinite, Optimizer

__all__ = [
    "SGD",
    "SGDHyperparameters",
    "SGDParamGroup",
    "SGDParamGroupInput",
    "SGDSavedGroup",
    "SGDSavedState",
    "SGDState",
    "SGDStateDict",
]

A = TypeVar("A", bound=XArray)


class SGDHyperparameters(TypedDict):
    """SGD's hyperparameters, as a param group holds them."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    master_weights: bool
    stochastic_rounding: bool


class SGDParamGroup(SGDHyperparameters):
    """One entry of `SGD.param_groups`."""

    params: list[ParameterLike]


class SGDParamGroupInput(TypedDict, total=False):
    """A param group as given to `SGD(...)` or `add_param_group`."""

    params: Required[Iterable[ParameterLike]]
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    master_weights: bool
    stochastic_rounding: bool


class SGDState(TypedDict):
    """One entry of `SGD.state`."""

    step: int
    """Steps taken with a gradient (netcl's count; torch's SGD keeps none)."""
    momentum_buffer: NotRequired[Array]
    """b: present once a step ran with momentum > 0."""
    master_param: NotRequired[Array]
    """The float32 copy of the parameter that the update changes (`master_weights`)."""


class SGDSavedState(TypedDict):
    """The state of one parameter in a state dict (torch's layout: no step)."""

    momentum_buffer: NotRequired[FloatArray]
    master_param: NotRequired[FloatArray]


class SGDSavedGroup(SGDHyperparameters):
    """A param group in a state dict."""

    params: list[int]


class SGDStateDict(TypedDict):
    """What `SGD.state_dict()` returns."""

    state: dict[int, SGDSavedState]
    param_groups: list[SGDSavedGroup]


def _variant(hyper: Hyper) -> tuple[frozenset[str], tuple[str, ...]]:
    momentum = real(hyper, "momentum") != 0
    flags = {
        "MAXIMIZE": bool(hyper["maximize"]),
        "WEIGHT_DECAY": real(hyper, "weight_decay") != 0,
        "MOMENTUM": momentum,
        "NESTEROV": bool(hyper["nesterov"]),
    }
    return frozenset(name for name, on in flags.items() if on), ("momentum_buffer",) * momentum


def _kernel_scalars(hyper: Hyper) -> tuple[float, ...]:
    return (
        real(hyper, "lr"),
        real(hyper, "momentum"),
        1.0 - real(hyper, "dampening"),
        real(hyper, "weight_decay"),
    )


def _member_scalars(hyper: Hyper, step: int, fresh: frozenset[str]) -> tuple[float, ...]:
    return (1.0 if "momentum_buffer" in fresh else 0.0,)


def _reference(
    xp: ArrayNamespace,
    param: A,
    grad: A,
    state: Mapping[str, A],
    hyper: Hyper,
    member: tuple[float, ...],
) -> tuple[A, dict[str, A]]:
    """SGD in array-API calls: the expressions of `kernels/sgd.cl`, in its order."""
    lr, momentum, weight_decay = real(hyper, "lr"), real(hyper, "momentum"), real(hyper, "weight_decay")
    g = -grad if hyper["maximize"] else grad
    if weight_decay != 0:
        g = saturate(xp, g + weight_decay * param)
    d = g
    new: dict[str, A] = {}
    if momentum != 0:
        first = member[0] != 0
        one_minus_dampening = 1.0 - real(hyper, "dampening")
        b = g if first else saturate(xp, state["momentum_buffer"] * momentum + one_minus_dampening * g)
        new["momentum_buffer"] = b
        d = saturate(xp, g + momentum * b) if hyper["nesterov"] else b
    p = saturate(xp, param + (-lr) * d)
    return p, new


_RULE = UpdateRule(
    kernel="sgd",
    buffers=("momentum_buffer",),
    flags=("MAXIMIZE", "WEIGHT_DECAY", "MOMENTUM", "NESTEROV"),
    variant=_variant,
    kernel_scalars=_kernel_scalars,
    reference=_reference,
    required=(),
    saves_step=False,
    member_scalars=_member_scalars,
    member_scalar_count=1,
)

_HYPERPARAMETERS: dict[str, HyperCheck] = {
    "lr": Real(0.0),
    "momentum": Real(0.0, 1.0),
    "dampening": Real(0.0, 1.0, high_open=False),
    "weight_decay": Real(0.0),
    "nesterov": Flag(),
    "maximize": Flag(),
    **PRECISION_HYPERPARAMETERS,
}


class SGD(Optimizer[SGDParamGroup, SGDParamGroupInput, SGDState, SGDStateDict]):
    r"""Stochastic gradient descent with momentum, one fused OpenCL kernel per launch.

    For each parameter with a gradient, element by element (torch's semantics):

    ```
    g = -grad if maximize else grad
    g = g + weight_decay * param                       (coupled weight decay)
    if momentum > 0:
        b = g on the first step, else momentum * b + (1 - dampening) * g
        d = g + momentum * b if nesterov else b
    else:
        d = g
    param = param - lr * d
    ```

    The momentum buffer starts as a copy of the first gradient, as in torch. An element
    whose gradient is NaN or infinite is left unchanged. Parameters may hold the same
    arrays as for [`RMSProp`][netcl.optim.RMSProp].

    Args:
        params: Parameters, or param-group dicts whose entries override the defaults.
        lr: Learning rate; `lr >= 0`, finite.
        momentum: Momentum factor; `0 <= momentum < 1`.
        dampening: Dampening of the momentum; `0 <= dampening <= 1`.
        weight_decay: Coupled (L2) weight decay; `>= 0`, finite.
        nesterov: Nesterov momentum (needs `momentum > 0` and `dampening == 0`).
        maximize: Maximize the objective instead of minimizing it.
        foreach: Accepted for torch's sake (a bool or None) and ignored: netcl always
            runs one fused kernel per run of parameters.
        fused: The same: netcl is always fused.
        differentiable: torch's mode that records the update in autograd; only False
            (netcl's update runs outside any autograd graph).
        nonfinite: What a step does with an element whose gradient is NaN or
            infinite: `"skip"` leaves it and its state as they were; `"count"` does
            the same and counts it (see `skipped_nonfinite()`; it costs the fused
            kernel time); `"propagate"` makes its parameter NaN, as torch does.
        master_weights: Keep a float32 copy of each parameter in its state
            (`master_param`) and update that; the parameter is its copy rounded. For
            float16 and bfloat16 parameters, whose small updates rounding would lose
            (for float32 and float64 ones the copy equals the parameter and only costs
            memory). See the guide "Half precision".
        stochastic_rounding: Round a float16 or bfloat16 parameter's new value
            stochastically (unbiased, reproducible: the random bits come from the
            parameter's place and step count) instead of to nearest even.

    Raises:
        TypeError: As for `RMSProp`.
        ValueError: As for `RMSProp`, and `nesterov` without momentum or with dampening,
            or `differentiable` is True.

    Example:
        ```python
        import numpy as np

        from netcl import Parameter
        from netcl.optim import SGD

        param = Parameter(np.zeros(3, np.float32))
        optimizer = SGD([param], lr=1e-2, momentum=0.9, nesterov=True)
        param.grad = np.ones(3, np.float32)
        optimizer.step()
        ```
    """

    rule: ClassVar[UpdateRule] = _RULE
    hyperparameters: ClassVar[Mapping[str, HyperCheck]] = _HYPERPARAMETERS

    def __init__(
        self,
        params: Iterable[ParameterLike | SGDParamGroupInput],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        nonfinite: NonFinite = "skip",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
        }
        torch_only = {"foreach": foreach, "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults, nonfinite=nonfinite, torch_only=torch_only)

    def _check_combination(self, hyper: Mapping[str, object], where: str) -> None:
        if hyper["nesterov"] and (hyper["momentum"] == 0 or hyper["dampening"] != 0):
            raise ValueError(
                f"{where}nesterov=True needs momentum > 0 and dampening == 0, got "
                f"momentum={hyper['momentum']!r}, dampening={hyper['dampening']!r}"
            )
