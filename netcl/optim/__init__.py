"""netcl's optimizers.

```python
from netcl.optim import RMSProp
```
"""

from netcl.optim import checkpoint
from netcl.optim.optimizer import Optimizer
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

__all__ = [
    "Optimizer",
    "checkpoint",
    "RMSProp",
    "RMSPropHyperparameters",
    "RMSPropParamGroup",
    "RMSPropParamGroupInput",
    "RMSPropSavedGroup",
    "RMSPropSavedState",
    "RMSPropState",
    "RMSPropStateDict",
]
