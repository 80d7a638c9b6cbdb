"""netcl's optimizers: RMSProp, SGD, Adam and AdamW, on one fused engine.

```python
from netcl.optim import RMSProp
```
"""

from netcl.optim import checkpoint, lr_scheduler
from netcl.optim._hooks import HookHandle
from netcl.optim.adam import (
    Adam,
    AdamHyperparameters,
    AdamParamGroup,
    AdamParamGroupInput,
    AdamSavedGroup,
    AdamSavedState,
    AdamState,
    AdamStateDict,
)
from netcl.optim.adamw import AdamW
from netcl.optim.optimizer import (
    NonFinite,
    Optimizer,
    ParameterState,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from netcl.optim.rmsprop import (
    RMSProp,
    RMSPropHyperparameters,
    RMSPropParamGroup,
    RMSPropParamGroupInput,
    RMSPropSavedGroup,
    RMSPropSavedState,
    RMSPropState,
    RMSPropStateDict,
)
from netcl.optim.sgd import (
    SGD,
    SGDHyperparameters,
    SGDParamGroup,
    SGDParamGroupInput,
    SGDSavedGroup,
    SGDSavedState,
    SGDState,
    SGDStateDict,
)

__all__ = [
    "Adam",
    "AdamHyperparameters",
    "AdamParamGroup",
    "AdamParamGroupInput",
    "AdamSavedGroup",
    "AdamSavedState",
    "AdamState",
    "AdamStateDict",
    "AdamW",
    "HookHandle",
    "NonFinite",
    "Optimizer",
    "ParameterState",
    "checkpoint",
    "lr_scheduler",
    "register_optimizer_step_post_hook",
    "register_optimizer_step_pre_hook",
    "RMSProp",
    "RMSPropHyperparameters",
    "RMSPropParamGroup",
    "RMSPropParamGroupInput",
    "RMSPropSavedGroup",
    "RMSPropSavedState",
    "RMSPropState",
    "RMSPropStateDict",
    "SGD",
    "SGDHyperparameters",
    "SGDParamGroup",
    "SGDParamGroupInput",
    "SGDSavedGroup",
    "SGDSavedState",
    "SGDState",
    "SGDStateDict",
]
