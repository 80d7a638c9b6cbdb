"""Adam: hyperparameters, state, and the update written once for arrays in any library.

The fused OpenCL form of the same update is `kernels/adam.cl`; `AdamW`
(`netcl/optim/adamw.py`) is the same update with decoupled weight decay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, NotRequired, Required, TypedDict, TypeVar

from netcl._types import Array, ParameterLike
from netcl._update import Hyper, UpdateRule, pair, real, saturate, sqrt
from netcl._xp import ArrayNamespace, XArray
from netcl.optim._hyper import PRECISION_HYPERPARAMETERS, Flag, HyperCheck, Pair, Real
from netcl.optim.optimizer import FloatArray, NonFinite, Optimizer

__all__ = [
    "Adam",
    "AdamHyperparameters",
    "AdamParamGroup",
    "AdamParamGroupInput",
    "AdamSavedGroup",
    "AdamSavedState",
    "AdamState",
    "AdamStateDict",
    "adam_rule",
]

A = TypeVar("A", bound=XArray)


class AdamHyperparameters(TypedDict):
    """Adam's (and AdamW's) hyperparameters, as a param group holds them."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    master_weights: bool
    stochastic_rounding: bool


class AdamParamGroup(AdamHyperparameters):
    """One entry of `Adam.param_groups`."""

    params: list[ParameterLike]


class AdamParamGroupInput(TypedDict, total=False):
    """A param group as given to `Adam(...)`, `AdamW(...)` or `add_param_group`."""

    params: Required[Iterable[ParameterLike]]
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    master_weights: bool
    stochastic_rounding: bool


class AdamState(TypedDict):
    """One entry of `Adam.state`."""

    step: int
    exp_avg: Array
    """m: the moving average of the gradient."""
    exp_avg_sq: Array
    """v: the moving average of the squared gradient."""
    max_exp_avg_sq: NotRequired[Array]
    """The running maximum of v; present once a step ran with amsgrad=True."""
    master_param: NotRequired[Array]
    """The float32 copy of the parameter that the update changes (`master_weights`)."""


class AdamSavedState(TypedDict):
    """The state of one parameter in a state dict: host numpy copies."""

    step: int
    exp_avg: FloatArray
    exp_avg_sq: FloatArray
    max_exp_avg_sq: NotRequired[FloatArray]
    master_param: NotRequired[FloatArray]


class AdamSavedGroup(AdamHyperparameters):
    """A param group in a state dict."""

    params: list[int]


class AdamStateDict(TypedDict):
    """What `Adam.state_dict()` and `AdamW.state_dict()` return."""

    state: dict[int, AdamSavedState]
    param_groups: list[AdamSavedGroup]


def _kernel_scalars(hyper: Hyper) -> tuple[float, ...]:
    beta1, beta2 = pair(hyper, "betas")
    lr, weight_decay = real(hyper, "lr"), real(hyper, "weight_decay")
    return (1.0 - beta1, beta1, beta2, 1.0 - beta2, real(hyper, "eps"), weight_decay, 1.0 - lr * weight_decay)


def _member_scalars(hyper: Hyper, step: int, fresh: frozenset[str]) -> tuple[float, ...]:
    """step_size and bias_correction2_sqrt, computed as torch computes them."""
    beta1, beta2 = pair(hyper, "betas")
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return (real(hyper, "lr") / bias_correction1, bias_correction2**0.5)


def _reference(
    xp: ArrayNamespace,
    param: A,
    grad: A,
    state: Mapping[str, A],
    hyper: Hyper,
    member: tuple[float, ...],
    *,
    decoupled: bool,
) -> tuple[A, dict[str, A]]:
    """Adam in array-API calls: the expressions of `kernels/adam.cl`, in its order."""
    weight, beta1, beta2, one_minus_beta2, eps, weight_decay, decay = _kernel_scalars(hyper)
    step_size, bias_correction2_sqrt = member
    largest = xp.finfo(param.dtype).max
    g = -grad if hyper["maximize"] else grad
    p = param
    if weight_decay != 0:
        if decoupled:
            p = saturate(xp, p * decay)
        else:
            g = saturate(xp, g + weight_decay * p)
    m0 = state["exp_avg"]
    d = g - m0
    m = m0 + weight * d if weight < 0.5 else g - d * beta1
    m = saturate(xp, xp.where(xp.isfinite(d), m, beta1 * m0 + weight * g))
    v = xp.minimum(state["exp_avg_sq"] * beta2 + one_minus_beta2 * g * g, largest)
    new: dict[str, A] = {"exp_avg": m, "exp_avg_sq": v}
    if hyper["amsgrad"]:
        vmax = xp.maximum(state["max_exp_avg_sq"], v)
        new["max_exp_avg_sq"] = vmax
        denom = sqrt(xp, vmax) / bias_correction2_sqrt + eps
    else:
        denom = sqrt(xp, v) / bias_correction2_sqrt + eps
    p = saturate(xp, p + (-step_size) * (m / denom))
    return p, new


def adam_rule(*, decoupled: bool) -> UpdateRule:
    """Adam's update (`decoupled=False`) or AdamW's (`decoupled=True`)."""

    def variant(hyper: Hyper) -> tuple[frozenset[str], tuple[str, ...]]:
        amsgrad = bool(hyper["amsgrad"])
        flags = {
            "MAXIMIZE": bool(hyper["maximize"]),
            "WEIGHT_DECAY": real(hyper, "weight_decay") != 0,
            "DECOUPLED": decoupled,
            "AMSGRAD": amsgrad,
        }
        buffers = ("exp_avg", "exp_avg_sq") + ("max_exp_avg_sq",) * amsgrad
        return frozenset(name for name, on in flags.items() if on), buffers

    def reference(
        xp: ArrayNamespace,
        param: A,
        grad: A,
        state: Mapping[str, A],
        hyper: Hyper,
        member: tuple[float, ...],
    ) -> tuple[A, dict[str, A]]:
        return _reference(xp, param, grad, state, hyper, member, decoupled=decoupled)

    return UpdateRule(
        kernel="adam",
        buffers=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        flags=("MAXIMIZE", "WEIGHT_DECAY", "DECOUPLED", "AMSGRAD"),
        variant=variant,
        kernel_scalars=_kernel_scalars,
        reference=reference,
        required=("exp_avg", "exp_avg_sq"),
        nonnegative=("exp_avg_sq", "max_exp_avg_sq"),
        member_scalars=_member_scalars,
        member_scalar_count=2,
    )


ADAM_HYPERPARAMETERS: dict[str, HyperCheck] = {
    "lr": Real(0.0),
    "betas": Pair(Real(0.0, 1.0)),
    "eps": Real(0.0, low_open=True),
    "weight_decay": Real(0.0),
    "amsgrad": Flag(),
    "maximize": Flag(),
    **PRECISION_HYPERPARAMETERS,
}


class Adam(Optimizer[AdamParamGroup, AdamParamGroupInput, AdamState, AdamStateDict]):
    r"""Adam, with one fused OpenCL kernel per launch.

    For each parameter with a gradient, at its step t, element by element (torch's
    semantics):

    ```
    g = -grad if maximize else grad
    g = g + weight_decay * param                       (coupled weight decay)
    m = beta1 * m + (1 - beta1) * g                    (exp_avg)
    v = beta2 * v + (1 - beta2) * g * g                (exp_avg_sq)
    vmax = max(vmax, v) if amsgrad                     (max_exp_avg_sq)
    denom = sqrt(vmax if amsgrad else v) / sqrt(1 - beta2^t) + eps
    param = param - lr / (1 - beta1^t) * m / denom
    ```

    `m` is updated with torch's `lerp`, and the bias corrections are computed on the
    host per parameter, as torch computes them. An element whose gradient is NaN or
    infinite is left unchanged, and `v` saturates at the largest finite value. For
    decoupled weight decay use [`AdamW`][netcl.optim.AdamW].

    Args:
        params: Parameters, or param-group dicts whose entries override the defaults.
        lr: Learning rate; `lr >= 0`, finite.
        betas: Smoothing constants of m and v; each `0 <= beta < 1`.
        eps: Added to the denominator; `eps > 0`, finite.
        weight_decay: Coupled (L2) weight decay; `>= 0`, finite.
        amsgrad: Use the running maximum of v (AMSGrad).
        maximize: Maximize the objective instead of minimizing it.
        foreach: Accepted for torch's sake (a bool or None) and ignored: netcl always
            runs one fused kernel per run of parameters.
        fused: The same: netcl is always fused.
        capturable: torch's CUDA-graph mode; only False (netcl's step counts are host
            integers and its kernel is enqueued, not captured).
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
        TypeError: As for `RMSProp`; `betas` not a pair of numbers.
        ValueError: As for `RMSProp`.

    Example:
        ```python
        import numpy as np

        from netcl import Parameter
        from netcl.optim import Adam

        param = Parameter(np.zeros(3, np.float32))
        optimizer = Adam([param], lr=1e-3, betas=(0.9, 0.999))
        param.grad = np.ones(3, np.float32)
        optimizer.step()
        ```
    """

    rule: ClassVar[UpdateRule] = adam_rule(decoupled=False)
    hyperparameters: ClassVar[Mapping[str, HyperCheck]] = ADAM_HYPERPARAMETERS
    torch_fixed: ClassVar[Mapping[str, object]] = {"decoupled_weight_decay": False}

    def __init__(
        self,
        params: Iterable[ParameterLike | AdamParamGroupInput],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        nonfinite: NonFinite = "skip",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
        }
        torch_only = {"foreach": foreach, "capturable": capturable, "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults, nonfinite=nonfinite, torch_only=torch_only)
