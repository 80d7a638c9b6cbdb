"""What a step costs in Python alone: netcl's checks, staging and launch bookkeeping.

    python -m tests.step_costs [--rounds 15] [--steps 100]

Steps the benchmark's many-parameter cases (160 parameters of 64 to 20,000 values: with
`flat_parameters`, in their own pyopencl buffers, as numpy arrays) and its torch LSTM,
with netcl's kernel launches replaced by an event that is already complete, so that
nothing runs on the device and the time is the host's work per step. Prints the best
round's microseconds per step (the least disturbed by the machine's other work: these
figures are compared between versions of netcl, not with other contenders), and how many
buffers over gradients host launches made per step. The LSTM's
steps each come after the model's backward pass, as in training (new gradient tensors,
caches full of the backward pass's data), and only the step is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Parameter, _kernels, flat_parameters
from netcl._backends.host import _GradBuffer, host_queue
from netcl.bench import lstm_model, many_sizes
from netcl.device import create_queue
from netcl.optim import Adam, RMSProp


@contextmanager
def launches_stubbed(context: cl.Context) -> Iterator[None]:
    """Within it, every launch of netcl's kernel returns a completed event at once."""
    done = cl.UserEvent(context)
    done.set_status(cl.command_execution_status.COMPLETE)
    original = _kernels.Launcher.enqueue
    _kernels.Launcher.enqueue = lambda self, queue, wait_for: done  # type: ignore[method-assign]
    try:
        yield
    finally:
        _kernels.Launcher.enqueue = original  # type: ignore[method-assign]


@contextmanager
def counting_grad_buffers() -> Iterator[list[int]]:
    """Within it, the list it gives counts the buffers host launches make over gradients."""
    made = [0]
    original = _GradBuffer.__init__

    def counting(self: _GradBuffer, *args: Any) -> None:
        made[0] += 1
        original(self, *args)

    _GradBuffer.__init__ = counting  # type: ignore[method-assign,assignment]
    try:
        yield made
    finally:
        _GradBuffer.__init__ = original  # type: ignore[method-assign]


def best_microseconds(
    step: Callable[[], object], rounds: int, steps: int, before: Callable[[], object] | None
) -> float:
    best = float("inf")
    for _ in range(rounds):
        total = 0.0
        for _ in range(steps):
            if before is not None:
                before()
            start = time.perf_counter()
            step()
            total += time.perf_counter() - start
        best = min(best, total / steps)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    queue = create_queue()
    rng = np.random.default_rng(0)
    sizes = many_sizes(160)
    cases: list[tuple[str, Callable[[], object], cl.Context, Callable[[], object] | None]] = []
    for name, cls in (("adam", Adam), ("rmsprop", RMSProp)):
        flat = flat_parameters(queue, [(n,) for n in sizes])
        cases.append((f"flat {name}", cls(flat, lr=1e-3).step, queue.context, None))
    separate = [
        Parameter(
            cl_array.to_device(queue, rng.random(n, np.float32)), cl_array.to_device(queue, rng.random(n, np.float32))
        )
        for n in sizes
    ]
    cases.append(("many adam", Adam(separate, lr=1e-3).step, queue.context, None))
    host = host_queue()
    if host is not None:
        arrays = [Parameter(rng.random(n, np.float32), rng.random(n, np.float32)) for n in sizes]
        cases.append(("numpy-many adam", Adam(arrays, lr=1e-3).step, host.context, None))
        if importlib.util.find_spec("torch") is not None:
            params, backward = lstm_model()
            cases.append(("lstm rmsprop", RMSProp(params, lr=1e-3).step, host.context, backward))
    for name, step, context, before in cases:
        for _ in range(2):  # the first steps make the state and the launches
            if before is not None:
                before()
            step()
        queue.finish()
        with launches_stubbed(context), counting_grad_buffers() as made:
            micro = best_microseconds(step, args.rounds, args.steps, before)
        print(f"{name:16s} {micro:7.1f} us per step, {made[0] / (args.rounds * args.steps):.2f} gradient buffers made")


if __name__ == "__main__":
    main()
