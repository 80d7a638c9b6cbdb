"""Training on several processes, on MPI (`pip install 'netcl[mpi]'`).

- [`DistributedOptimizer`][netcl.distributed.DistributedOptimizer]: data parallelism;
  gradients averaged over the ranks, then one ordinary step.
- [`broadcast_parameters`][netcl.distributed.broadcast_parameters] and
  [`broadcast_optimizer_state`][netcl.distributed.broadcast_optimizer_state]: every rank
  starts from one rank's parameters and state.
- [`ZeroRedundancyOptimizer`][netcl.distributed.ZeroRedundancyOptimizer]: optimizer
  state sharded over the ranks (ZeRO stage 1).

Run a script on 2 processes with `mpiexec -n 2 python script.py`.
"""

from netcl.distributed.data_parallel import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters
from netcl.distributed.zero import ZeroRedundancyOptimizer

__all__ = ["DistributedOptimizer", "ZeroRedundancyOptimizer", "broadcast_optimizer_state", "broadcast_parameters"]
