"""netcl: optimizers for parameters that live in OpenCL memory.

`netcl.optim.RMSProp` updates `pyopencl.array.Array` parameters with one fused OpenCL
kernel, and accepts arrays of any array-API library too.
"""

from netcl._flat import flat_parameters
from netcl._parameter import Parameter
from netcl._types import Array, ArrayAPIArray, ClArrayLike, ParameterLike
from netcl.clip import clip_grad_norm_, clip_grad_value_

__all__ = [
    "Array",
    "ArrayAPIArray",
    "ClArrayLike",
    "Parameter",
    "ParameterLike",
    "__version__",
    "clip_grad_norm_",
    "clip_grad_value_",
    "flat_parameters",
]

__version__ = "0.1.0"
