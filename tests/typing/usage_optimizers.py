"""SGD, Adam and AdamW as type checkers see them (checked by mypy and basedpyright, never
run; each `# type: ignore[...]` line must be an error)."""

from __future__ import annotations

from typing import Any, assert_type

import numpy as np

from netcl import Parameter
from netcl.optim import (
    SGD,
    Adam,
    AdamParamGroup,
    AdamStateDict,
    AdamW,
    HookHandle,
    Optimizer,
    SGDParamGroup,
    SGDStateDict,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

param = Parameter(np.zeros(3, np.float32))

sgd = SGD([param], lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False)
assert_type(sgd.param_groups, list[SGDParamGroup])
assert_type(sgd.param_groups[0]["nesterov"], bool)
assert_type(sgd.state_dict(), SGDStateDict)
sgd.add_param_group({"params": [Parameter(np.zeros(2, np.float32))], "momentum": 0.5})

adam = Adam([param], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=True, maximize=False)
assert_type(adam.param_groups, list[AdamParamGroup])
assert_type(adam.param_groups[0]["betas"], tuple[float, float])
assert_type(adam.state_dict(), AdamStateDict)
assert_type(adam.step(lambda: 1.0), float)

adamw = AdamW([{"params": [param], "weight_decay": 1e-2}], lr=1e-3)
assert_type(adamw.state_dict(), AdamStateDict)

# --- mistakes the checkers must catch ---------------------------------------------------
Adam([param], betas=0.9)  # type: ignore[arg-type]
Adam([param], betas=(0.9, "0.999"))  # type: ignore[arg-type]
SGD([param], nesterov="yes")  # type: ignore[arg-type]
AdamW([param], beta=(0.9, 0.999))  # type: ignore[call-arg]
SGD([param], 1e-2, 0.9, 0.0, 0.0, False, True)  # type: ignore[call-arg]
adam.param_groups[0]["betas"] = 0.9  # type: ignore[typeddict-item]
sgd.param_groups[0]["betas"]  # type: ignore[typeddict-item]
adamw.add_param_group({"params": [param], "momentum": 0.9})  # type: ignore[typeddict-unknown-key]


# step hooks: the optimizer's own type, the step's arguments; a handle
def log_lr(optimizer: Adam, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    assert_type(optimizer.param_groups[0]["lr"], float)


handle = adam.register_step_post_hook(log_lr)
assert_type(handle, HookHandle)
handle.remove()
adam.register_step_pre_hook(lambda optimizer, args, kwargs: None)
adam.register_step_pre_hook(lambda optimizer, args, kwargs: 3)  # type: ignore[arg-type,return-value]


def trimmed(optimizer: Adam, state_dict: AdamStateDict) -> AdamStateDict:
    return state_dict


adam.register_state_dict_post_hook(trimmed, prepend=True)
adam.register_load_state_dict_post_hook(lambda optimizer: None)


def log_every(optimizer: Optimizer[Any, Any, Any, Any], args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    print(type(optimizer).__name__, optimizer.param_groups[0]["lr"])


with register_optimizer_step_post_hook(log_every):
    adam.step()
register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: (args, kwargs)).remove()
register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: 3)  # type: ignore[arg-type,return-value]
