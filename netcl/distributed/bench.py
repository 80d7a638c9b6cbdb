"""Measure netcl.distributed: the mean of gradients over the ranks, and a data-parallel step.

    mpiexec -n 2 python -m netcl.distributed.bench [--rounds 21] [--json PATH]
    mpiexec -n 1 python -m netcl.distributed.bench   # the same step with one process

Rank 0 prints medians over `--rounds` (the ranks start each round together, at a barrier):

* all-reduce: the mean of one float32 buffer of each size over the ranks, as
  `DistributedOptimizer` computes it (reduce-scatter, divide, all-gather: the same bits on
  every rank), beside MPI's own `Allreduce` of the same buffer (a sum, no division);
* step: `DistributedOptimizer(Adam).step()` on 160 pyopencl parameters of 64 to 20,000
  values (1.6 M), from `netcl.flat_parameters` (one message) and as separate arrays
  (packed into buckets), with the OpenCL queue finished; and `Adam.step()` alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyopencl.array as cl_array

from netcl import Parameter, flat_parameters
from netcl.bench import many_sizes
from netcl.device import create_queue, describe_device
from netcl.distributed import DistributedOptimizer
from netcl.distributed._comm import MPI, allreduce_mean
from netcl.optim import Adam

__all__ = ["allreduce_rows", "main", "step_rows"]


def _median_ms(comm: MPI.Comm, call: Callable[[], None], rounds: int) -> float:
    """The median over `rounds` of the slowest rank's time of `call`, in ms."""
    call()  # warm: kernels built, buffers made
    times: list[float] = []
    for _ in range(rounds):
        comm.Barrier()
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        times.append(comm.allreduce(elapsed, op=MPI.MAX))
    return 1e3 * statistics.median(times)


def allreduce_rows(comm: MPI.Comm, sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    """The mean over the ranks, and MPI's own all-reduce, of one buffer of each size."""
    rows: list[dict[str, Any]] = []
    buckets: dict[np.dtype[Any], Any] = {}
    for size in sizes:
        buffer = np.random.default_rng(comm.Get_rank()).standard_normal(size).astype(np.float32)

        def ours_(b: Any = buffer) -> None:  # one run, from where it is
            allreduce_mean(comm, [b], 2**62, buckets)

        def theirs_(b: Any = buffer) -> None:
            comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)

        ours, theirs = _median_ms(comm, ours_, rounds), _median_ms(comm, theirs_, rounds)
        rows.append({"values": size, "bytes": 4 * size, "mean_ms": ours, "mpi_allreduce_ms": theirs})
    return rows


def step_rows(comm: MPI.Comm, rounds: int, device: str | None) -> list[dict[str, Any]]:
    """Adam's step alone and under DistributedOptimizer, on 160 parameters, flat and not."""
    queue = create_queue(device)
    sizes = many_sizes(160)
    shapes = [(n,) for n in sizes]
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for layout in ("flat", "separate"):
        if layout == "flat":
            params = flat_parameters(queue, shapes)
        else:
            params = [
                Parameter(cl_array.zeros(queue, shape, np.float32), cl_array.zeros(queue, shape, np.float32))
                for shape in shapes
            ]
        for param in params:
            assert param.grad is not None
            param.grad.set(rng.standard_normal(param.grad.shape).astype(np.float32))
        adam = Adam(params, lr=1e-3)
        distributed = DistributedOptimizer(adam, comm)

        def local(adam: Adam = adam) -> None:
            adam.step()
            queue.finish()

        def together(distributed: DistributedOptimizer[Adam] = distributed) -> None:
            distributed.step()
            queue.finish()

        rows.append(
            {
                "case": f"Adam, 160 tensors ({sum(sizes):,} values), {layout}",
                "ranks": comm.Get_size(),
                "step_ms": _median_ms(comm, local, rounds),
                "distributed_step_ms": _median_ms(comm, together, rounds),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: measure, and print the tables on rank 0."""
    parser = argparse.ArgumentParser(prog="python -m netcl.distributed.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per case (21)")
    parser.add_argument("--device", help="OpenCL device as P or P:D (default: PYOPENCL_CTX or the first)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON (rank 0)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    sizes = [2**k for k in range(10, 25, 2)]
    reduce = allreduce_rows(comm, sizes, args.rounds)
    steps = step_rows(comm, args.rounds, args.device)
    if comm.Get_rank() != 0:
        return 0
    library = MPI.Get_library_version().splitlines()[0]
    print(f"ranks: {comm.Get_size()}; device: {describe_device(create_queue(args.device))}; MPI: {library}")
    print("\n| float32 values | bytes | mean over ranks (ms) | MPI Allreduce, sum (ms) |")
    print("| ---: | ---: | ---: | ---: |")
    for row in reduce:
        print(f"| {row['values']:,} | {row['bytes']:,} | {row['mean_ms']:.3f} | {row['mpi_allreduce_ms']:.3f} |")
    print("\n| case | ranks | Adam.step() (ms) | DistributedOptimizer(Adam).step() (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for row in steps:
        print(f"| {row['case']} | {row['ranks']} | {row['step_ms']:.2f} | {row['distributed_step_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"ranks": comm.Get_size(), "allreduce": reduce, "steps": steps}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
