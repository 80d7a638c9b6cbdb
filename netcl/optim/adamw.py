"""AdamW: Adam with decoupled weight decay (the same kernel, `kernels/adam.cl`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from netcl._types import ParameterLike
from netcl._update import UpdateRule
from netcl.optim.adam import Adam, AdamParamGroupInput, adam_rule
from netcl.optim.optimizer import NonFinite

__all__ = ["AdamW"]


class AdamW(Adam):
    r"""AdamW: Adam whose weight decay shrinks the parameter instead of adding to the gradient.

    A subclass of [`Adam`][netcl.optim.Adam], as in torch, that differs in one thing:
    the weight decay is decoupled (torch's semantics): before the update,
    `param = param * (1 - lr * weight_decay)`, and the gradient is left as it is. Its
    state and state dict are Adam's.

    Args:
        params: Parameters, or param-group dicts whose entries override the defaults.
        lr: Learning rate; `lr >= 0`, finite.
        betas: Smoothing constants of m and v; each `0 <= beta < 1`.
        eps: Added to the denominator; `eps > 0`, finite.
        weight_decay: Decoupled weight decay; `>= 0`, finite (default 1e-2).
        amsgrad: Use the running maximum of v (AMSGrad).
        maximize: Maximize the objective instead of minimizing it.
        foreach, capturable, differentiable, fused: As for `Adam`.
        nonfinite, master_weights, stochastic_rounding: As for `Adam`.

    Raises:
        TypeError: As for `Adam`.
        ValueError: As for `Adam`.

    Example:
        ```python
        import numpy as np

        from netcl import Parameter
        from netcl.optim import AdamW

        param = Parameter(np.ones(3, np.float32))
        optimizer = AdamW([param], lr=1e-3, weight_decay=1e-2)
        param.grad = np.ones(3, np.float32)
        optimizer.step()
        ```
    """

    rule: ClassVar[UpdateRule] = adam_rule(decoupled=True)
    torch_fixed: ClassVar[Mapping[str, object]] = {"decoupled_weight_decay": True}

    def __init__(
        self,
        params: Iterable[ParameterLike | AdamParamGroupInput],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        nonfinite: NonFinite = "skip",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            nonfinite=nonfinite,
        )
