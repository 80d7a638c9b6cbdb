"""How users write netcl code, as type checkers see it. Checked by mypy and basedpyright,
never run. Each line marked `# type: ignore[...]` must be an error: with
`warn_unused_ignores` (mypy) and `reportUnnecessaryTypeIgnoreComment` (basedpyright) a
mistake that the checkers stop catching fails CI."""

from __future__ import annotations

import pickle
from typing import Any, assert_type

import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Array, Parameter, ParameterLike
from netcl.optim import (
    ParameterState,
    RMSProp,
    RMSPropParamGroup,
    RMSPropParamGroupInput,
    RMSPropState,
    RMSPropStateDict,
)

queue = cl.CommandQueue(cl.create_some_context(interactive=False))

# --- wrapping pyopencl arrays and numpy arrays -------------------------------------------
weight = Parameter(cl_array.zeros(queue, (64, 10), np.float32))
assert_type(weight, Parameter[cl_array.Array])
assert_type(weight.data, cl_array.Array)
weight.grad = cl_array.zeros_like(weight.data)

host = Parameter(np.zeros(3, np.float32), np.ones(3, np.float32))


class MyParameter:
    """A user's own parameter class: `data` and `grad` are all it takes."""

    def __init__(self, data: cl_array.Array) -> None:
        self.data = data
        self.grad: cl_array.Array | None = None


mine: ParameterLike = MyParameter(cl_array.zeros(queue, 4, np.float32))

# --- the optimizer -----------------------------------------------------------------------
optimizer = RMSProp([weight, host, mine], lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0)
optimizer = RMSProp([weight], centered=True, maximize=False)
assert_type(optimizer.param_groups, list[RMSPropParamGroup])
assert_type(optimizer.param_groups[0]["lr"], float)
assert_type(optimizer.param_groups[0]["centered"], bool)
assert_type(optimizer.param_groups[0]["params"], list[ParameterLike])
assert_type(optimizer.state, ParameterState[RMSPropState])
assert_type(optimizer.state[id(weight)]["step"], int)
assert_type(optimizer.state[weight]["step"], int)  # the parameter itself, as in torch
assert_type(optimizer.state.get(weight), RMSPropState | None)
assert_type(optimizer.state[id(weight)]["square_avg"], Array)
assert_type(optimizer.defaults, dict[str, float | bool | tuple[float, float]])
optimizer.param_groups[0]["lr"] = 5e-4  # a schedule
assert_type(optimizer.step(), None)
assert_type(optimizer.step(lambda: 0.25), float)
optimizer.zero_grad()
optimizer.zero_grad(set_to_none=False)

# --- param groups ------------------------------------------------------------------------
groups: list[RMSPropParamGroupInput] = [
    {"params": [weight]},
    {"params": [host], "lr": 1e-2, "momentum": 0.9},
]
grouped = RMSProp(groups, lr=1e-3)
grouped.add_param_group({"params": [mine], "alpha": 0.9})

# --- the state_dict round trip ---------------------------------------------------------
saved = optimizer.state_dict()
assert_type(saved, RMSPropStateDict)
assert_type(saved["state"][0]["square_avg"], npt.NDArray[np.float32] | npt.NDArray[np.float64])
assert_type(saved["param_groups"][0]["params"], list[int])
assert_type(saved["param_groups"][0]["eps"], float)
optimizer.load_state_dict(pickle.loads(pickle.dumps(saved)))
optimizer.load_state_dict(saved)


# --- mistakes the checkers must catch ---------------------------------------------------
def needs_an_argument(x: float) -> float:
    return x


RMSProp([weight], lr="0.1")  # type: ignore[arg-type]
RMSProp([weight], learning_rate=0.1)  # type: ignore[call-arg]
RMSProp([weight], 1e-3, 0.99, 1e-8, 0.0, 0.0, True)  # centered, 7th as in torch
RMSProp([weight], foreach=True, fused=True)  # accepted, netcl always fuses
RMSProp([weight], fused="yes")  # type: ignore[arg-type]
optimizer.step(3)  # type: ignore[call-overload]
optimizer.step(needs_an_argument)  # type: ignore[arg-type]
Parameter([1.0, 2.0])  # type: ignore[type-var]
Parameter("weights")  # type: ignore[type-var]
RMSProp([{"params": [weight], "betas": (0.9, 0.99)}])  # type: ignore[list-item]
RMSProp([np.zeros(3, np.float32)])  # type: ignore[list-item]
optimizer.param_groups[0]["lr"] = "fast"  # type: ignore[typeddict-item]
optimizer.param_groups[0]["learning_rate"]  # type: ignore[typeddict-item]
grouped.add_param_group({"params": [mine], "betas": (0.9, 0.99)})  # type: ignore[typeddict-unknown-key]
grouped.add_param_group({"lr": 0.1})  # type: ignore[typeddict-item]


def takes_any_parameter(param: Parameter) -> None:  # no type argument: any parameter, in mypy --strict
    assert_type(param, Parameter[Any])


takes_any_parameter(weight)
takes_any_parameter(host)
