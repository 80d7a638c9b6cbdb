"""RMSProp: hyperparameters, state, and the update written once for arrays in any library.

The fused OpenCL form of the same update is `kernels/rmsprop.cl`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import ClassVar, NotRequired, Required, TypedDict, TypeVar

from netcl._types import Array, ParameterLike
from netcl._update import Hyper, UpdateRule, real, saturate, sqrt
from netcl._xp import ArrayNamespace, XArray
from netcl.optim._hyper import PRECISION_HYPERPARAMETERS, Flag, HyperCheck, Real
from netcl.optim.optimizer import FloatArray, NonFinite, Optimizer

A = TypeVar("A", bound=XArray)

__all__ = [
    "FloatArray",
    "RMSProp",
    "RMSPropHyperparameters",
    "RMSPropParamGroup",
    "RMSPropParamGroupInput",
    "RMSPropSavedGroup",
    "RMSPropSavedState",
    "RMSPropState",
    "RMSPropStateDict",
]


class RMSPropHyperparameters(TypedDict):
    """RMSProp's hyperparameters, as a param group holds them."""

    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool
    master_weights: bool
    stochastic_rounding: bool
    eps_in_sqrt: bool
    initial_scale: float
    bias_correction: bool
    nesterov: bool
    decoupled_weight_decay: bool


class RMSPropParamGroup(RMSPropHyperparameters):
    """One entry of `RMSProp.param_groups`."""

    params: list[ParameterLike]


class RMSPropParamGroupInput(TypedDict, total=False):
    """A param group as given to `RMSProp(...)` or `add_param_group`: `params` and any
    hyperparameters that differ from the optimizer's defaults."""

    params: Required[Iterable[ParameterLike]]
    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool
    master_weights: bool
    stochastic_rounding: bool
    eps_in_sqrt: bool
    initial_scale: float
    bias_correction: bool
    nesterov: bool
    decoupled_weight_decay: bool


class RMSPropState(TypedDict):
    """One entry of `RMSProp.state`: the state of one parameter, on its device."""

    step: int
    """Steps taken with a gradient."""
    square_avg: Array
    """v: the moving average of the squared gradient."""
    momentum_buffer: NotRequired[Array]
    """b: present once a step ran with momentum > 0."""
    grad_avg: NotRequired[Array]
    """m: the moving average of the gradient; present once a step ran with centered=True."""
    master_param: NotRequired[Array]
    """The float32 copy of the parameter that the update changes (`master_weights`)."""


class RMSPropSavedState(TypedDict):
    """The state of one parameter in a state dict: host numpy copies."""

    step: int
    square_avg: FloatArray
    momentum_buffer: NotRequired[FloatArray]
    grad_avg: NotRequired[FloatArray]
    master_param: NotRequired[FloatArray]


class RMSPropSavedGroup(RMSPropHyperparameters):
    """A param group in a state dict: the parameters as indices."""

    params: list[int]


class RMSPropStateDict(TypedDict):
    """What `RMSProp.state_dict()` returns: torch's layout, with numpy arrays."""

    state: dict[int, RMSPropSavedState]
    param_groups: list[RMSPropSavedGroup]


def _variant(hyper: Hyper) -> tuple[frozenset[str], tuple[str, ...]]:
    momentum, centered = real(hyper, "momentum") > 0, bool(hyper["centered"])
    decay, decoupled = real(hyper, "weight_decay") != 0, bool(hyper["decoupled_weight_decay"])
    flags = {
        "MAXIMIZE": bool(hyper["maximize"]),
        "WEIGHT_DECAY": decay and not decoupled,
        "DECOUPLED_WEIGHT_DECAY": decay and decoupled,
        "CENTERED": centered,
        "MOMENTUM": momentum,
        "NESTEROV": momentum and bool(hyper["nesterov"]),
        "EPS_IN_SQRT": bool(hyper["eps_in_sqrt"]),
        "INITIAL_SCALE": real(hyper, "initial_scale") != 0,
        "BIAS_CORRECTION": bool(hyper["bias_correction"]),
    }
    buffers = ("square_avg",) + ("momentum_buffer",) * momentum + ("grad_avg",) * centered
    return frozenset(name for name, on in flags.items() if on), buffers


def _clip(alpha: float) -> float:
    """The bound of |g| / sqrt(v): v >= (1 - alpha) * g^2 in exact arithmetic."""
    return 1.0 / math.sqrt(1.0 - alpha)


def _kernel_scalars(hyper: Hyper) -> tuple[float, ...]:
    alpha, lr, weight_decay = real(hyper, "alpha"), real(hyper, "lr"), real(hyper, "weight_decay")
    return (
        lr,
        alpha,
        1.0 - alpha,
        real(hyper, "eps"),
        weight_decay,
        real(hyper, "momentum"),
        _clip(alpha),
        1.0 - lr * weight_decay,
    )


def _member_scalars(hyper: Hyper, step: int, fresh: frozenset[str]) -> tuple[float, ...]:
    """A parameter's own scalars: v's starting value on the step that makes its buffer
    (else 0), and 1 - alpha^t for the bias correction (1 where not asked for, so that
    parameters of different counts stay in one launch)."""
    initial = real(hyper, "initial_scale") if "square_avg" in fresh else 0.0
    correction = 1.0 - real(hyper, "alpha") ** step if hyper["bias_correction"] else 1.0
    return (initial, correction)


def _reference(
    xp: ArrayNamespace,
    param: A,
    grad: A,
    state: Mapping[str, A],
    hyper: Hyper,
    member: tuple[float, ...],
) -> tuple[A, dict[str, A]]:
    """RMSProp in array-API calls: the expressions of `kernels/rmsprop.cl`, in its order,
    with the same handling of extreme values."""
    lr, alpha, eps = real(hyper, "lr"), real(hyper, "alpha"), real(hyper, "eps")
    weight_decay, momentum = real(hyper, "weight_decay"), real(hyper, "momentum")
    decoupled, inside = bool(hyper["decoupled_weight_decay"]), bool(hyper["eps_in_sqrt"])
    initial, correction = member if member else (0.0, 1.0)  # (a variant without them takes none)
    largest = xp.finfo(param.dtype).max
    one_minus_alpha, clip = 1.0 - alpha, _clip(alpha)
    g = -grad if hyper["maximize"] else grad
    kept = param
    if weight_decay != 0:
        if decoupled:
            kept = param * (1.0 - lr * weight_decay)
        else:
            g = saturate(xp, g + weight_decay * param)
    square = g * g
    scaled = xp.where(xp.isfinite(square), one_minus_alpha * square, (one_minus_alpha * g) * g)
    start = state["square_avg"] + initial if real(hyper, "initial_scale") != 0 else state["square_avg"]
    v = xp.minimum(start * alpha + scaled, largest)
    vh = v / correction if hyper["bias_correction"] else v
    new: dict[str, A] = {"square_avg": v}

    def divide(g: A, x: A) -> A:
        return g / sqrt(xp, x + eps) if inside else g / (sqrt(xp, x) + eps)

    if hyper["centered"]:
        m = saturate(xp, state["grad_avg"] * alpha + one_minus_alpha * g)
        new["grad_avg"] = m
        mh = m / correction if hyper["bias_correction"] else m
        mm = mh * mh
        estimable = xp.isfinite(mm)
        variance = xp.where(estimable, xp.maximum(vh - mm, 0.0), vh)
        u = saturate(xp, divide(g, variance))
        u = xp.where(estimable, u, xp.clip(u, -clip, clip))
    else:
        u = xp.clip(divide(g, vh), -clip, clip)
    if momentum > 0:
        b = saturate(xp, state["momentum_buffer"] * momentum + u)
        new["momentum_buffer"] = b
        step = saturate(xp, u + momentum * b) if hyper["nesterov"] else b
        p = saturate(xp, kept + (-lr) * step)
    else:
        p = saturate(xp, kept + (-lr) * u)
    return p, new


_RULE = UpdateRule(
    kernel="rmsprop",
    buffers=("square_avg", "momentum_buffer", "grad_avg"),
    flags=(
        "MAXIMIZE",
        "WEIGHT_DECAY",
        "DECOUPLED_WEIGHT_DECAY",
        "CENTERED",
        "MOMENTUM",
        "NESTEROV",
        "EPS_IN_SQRT",
        "INITIAL_SCALE",
        "BIAS_CORRECTION",
    ),
    variant=_variant,
    kernel_scalars=_kernel_scalars,
    reference=_reference,
    required=("square_avg",),
    nonnegative=("square_avg",),
    member_scalars=_member_scalars,
    member_scalar_count=2,
    member_flags=frozenset({"INITIAL_SCALE", "BIAS_CORRECTION"}),
)

_PROBABILITY = Real(0.0, 1.0)  # 0 <= x < 1

_HYPERPARAMETERS: dict[str, HyperCheck] = {
    "lr": Real(0.0),
    "alpha": _PROBABILITY,
    "eps": Real(0.0, low_open=True),
    "weight_decay": Real(0.0),
    "momentum": _PROBABILITY,
    "centered": Flag(),
    "maximize": Flag(),
    **PRECISION_HYPERPARAMETERS,
    "eps_in_sqrt": Flag(),
    "initial_scale": Real(0.0),
    "bias_correction": Flag(),
    "nesterov": Flag(),
    "decoupled_weight_decay": Flag(),
}


class RMSProp(Optimizer[RMSPropParamGroup, RMSPropParamGroupInput, RMSPropState, RMSPropStateDict]):
    r"""RMSProp, with one fused OpenCL kernel per parameter and step.

    For each parameter with a gradient, element by element (torch's semantics):

    ```
    g = -grad if maximize else grad
    g = g + weight_decay * param                       (coupled weight decay)
    v = alpha * v + (1 - alpha) * g * g                (square_avg)
    if centered:
        m = alpha * m + (1 - alpha) * g                (grad_avg)
        denom = sqrt(v - m * m) + eps
    else:
        denom = sqrt(v) + eps
    if momentum > 0:
        b = momentum * b + g / denom                   (momentum_buffer)
        param = param - lr * b
    else:
        param = param - lr * g / denom
    ```

    `eps` is added after the square root, as in torch (optax's `rmsprop` adds it
    inside by default). State is made lazily on a parameter's first step with a gradient
    and kept in `state[id(parameter)]`; `zero_grad()` resets the gradients, never the
    state. A buffer that a later change of hyperparameters needs (turning momentum or
    centered on) starts at zero.

    Parameters may hold `pyopencl.array.Array`s (updated in place by the fused kernel on
    their own queue), objects exposing an OpenCL buffer ([`ClArrayLike`][netcl.ClArrayLike]),
    or array-API arrays (numpy, torch, array_api_strict ...; updated with the same maths
    in their own library), in float32 or float64, or in float16 or bfloat16 with float32
    state (see `master_weights` and `stochastic_rounding`).

    Args:
        params: Parameters (objects with `data` and `grad`), or param-group dicts
            (`{"params": [...], "lr": 0.01}`) whose entries override the defaults.
        lr: Learning rate; `lr >= 0`, finite.
        alpha: Smoothing constant of the averages; `0 <= alpha < 1`.
        eps: Added to the denominator for numerical stability; `eps > 0`, finite.
        weight_decay: Coupled (L2) weight decay, added to the gradient; `>= 0`, finite.
        momentum: Polyak momentum factor; `0 <= momentum < 1` (0 keeps no buffer).
        centered: Normalize by an estimate of the gradient's variance instead of its
            second moment.
        capturable: torch's CUDA-graph mode; only False (netcl's step counts are host
            integers and its kernel is enqueued, not captured).
        differentiable: torch's mode that records the update in autograd; only False
            (netcl's update runs outside any autograd graph).
        foreach: Accepted for torch's sake (a bool or None) and ignored: netcl always
            runs one fused kernel per run of parameters.
        fused: The same: netcl is always fused.
        maximize: Maximize the objective instead of minimizing it.
        eps_in_sqrt: Divide by `sqrt(v + eps)` instead of `sqrt(v) + eps` (optax's
            default, TF, Keras, Lasagne); with `centered`, `sqrt(v - m^2 + eps)`.
        initial_scale: The value `v` starts at (TF1: 1.0); `>= 0`, finite.
        bias_correction: Divide `v` (and `m` when centered) by `1 - alpha^t` in the
            denominator, `t` the parameter's step count (optax's `bias_correction`).
        nesterov: With momentum, step by `u + momentum * b` instead of `b` (optax's
            `nesterov`, as torch's SGD); needs `momentum > 0`.
        decoupled_weight_decay: `param *= 1 - lr * weight_decay` before the update,
            instead of adding `weight_decay * param` to the gradient (AdamW's way).
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
        TypeError: `params` is not an iterable of parameters or group dicts, a parameter
            holds an array netcl cannot optimize, or a hyperparameter is not a number
            (not a bool for `centered` and `maximize`).
        ValueError: `params` is empty or repeats a parameter, a group has an unknown key,
            a hyperparameter is out of range, or `capturable` or `differentiable` is True.

    Example:
        ```python
        import numpy as np

        from netcl import Parameter
        from netcl.optim import RMSProp

        param = Parameter(np.zeros(3, np.float32))
        optimizer = RMSProp([param], lr=1e-3, alpha=0.99, eps=1e-8)
        for _ in range(3):
            optimizer.zero_grad()
            param.grad = np.ones(3, np.float32)  # from your backward pass
            optimizer.step()
        ```
    """

    rule: ClassVar[UpdateRule] = _RULE
    hyperparameters: ClassVar[Mapping[str, HyperCheck]] = _HYPERPARAMETERS
    optional: ClassVar[Mapping[str, object]] = {
        **Optimizer.optional,
        "eps_in_sqrt": False,
        "initial_scale": 0.0,
        "bias_correction": False,
        "nesterov": False,
        "decoupled_weight_decay": False,
    }

    def __init__(
        self,
        params: Iterable[ParameterLike | RMSPropParamGroupInput],
        lr: float = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        eps_in_sqrt: bool = False,
        initial_scale: float = 0.0,
        bias_correction: bool = False,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        fused: bool | None = None,
        nonfinite: NonFinite = "skip",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "centered": centered,
            "maximize": maximize,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
            "eps_in_sqrt": eps_in_sqrt,
            "initial_scale": initial_scale,
            "bias_correction": bias_correction,
            "nesterov": nesterov,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        torch_only = {"capturable": capturable, "foreach": foreach, "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults, nonfinite=nonfinite, torch_only=torch_only)

    def _check_combination(self, hyper: Mapping[str, object], where: str) -> None:
        momentum = hyper["momentum"]
        if hyper["nesterov"] and not (isinstance(momentum, float) and momentum > 0):
            raise ValueError(f"{where}nesterov=True needs momentum > 0 (the step adds momentum * b to u)")
