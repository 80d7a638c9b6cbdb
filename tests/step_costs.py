"""What a step costs in Python alone: netcl's checks, staging and launch bookkeeping.

    python -m tests.step_costs [--rounds 15] [--steps 100] [--phases | --waits | --split]
        [--many-spread log|uniform]

Steps the benchmark's many-parameter cases (160 parameters of 64 to 20,000 values, their
sizes spread as `--many-spread` says, the benchmark's option of that name: with
`flat_parameters`, in their own pyopencl buffers, as numpy arrays) and its torch LSTM,
with netcl's kernel launches replaced by an event that is already complete, so that
nothing runs on the device and the time is the host's work per step. Prints the best
round's microseconds per step (the least disturbed by the machine's other work: these
figures are compared between versions of netcl, not with other contenders), and how many
buffers over gradients host launches made per step. The LSTM's
steps each come after the model's backward pass, as in training (new gradient tensors,
caches full of the backward pass's data), and only the step is timed.

With `--phases` the launches run: for each case, the median microseconds between the
step's phases (its start, the plan's checks, the step counts, setting the kernel's
arguments, the enqueue, the wait, the write-back of the counts, its end; for OpenCL
arrays the caller's `queue.finish()` after it), and the last launch again on its own
(enqueue and wait, back to back), beside a kernel that moves the same bytes with
trivial arithmetic where the case's arrays are one flat buffer per role.

With `--waits`, steps on host arrays run with their launches (the fused kernel taken for
every array, whatever the measured choice would be), and the way a step waits for them
alternates at every step: sleeping in `queue.finish()` at once, or polling the
last launch first (`netcl._backends.host.SPIN_SECONDS`); it prints the medians of each.

With `--split`, for Adam and RMSProp on OpenCL arrays, seven things that each end in
`queue.finish()` take turns in shuffled rounds (`--rounds`, ten timed calls each after
three untimed): a floor kernel moving the bytes of a step on the many-parameter case's
values, one tensor of that many values (its launch alone, and its step), and the 160
parameters made by `flat_parameters` (their launch alone, and their step). It prints
the medians: the launch against the floor is the update's arithmetic, the one tensor's
step against its launch the host's work of any step, and the flat step against the one
tensor's the host's work per parameter. Two more turns enqueue ten floor kernels, and
ten steps of the flat parameters, before they wait, as a training loop that does not
wait for each step does: per step, against the floor's per launch, the host's work of a
step where it overlaps the device's work of the last ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, get_args
from unittest import mock

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Parameter, _kernels, flat_parameters
from netcl._backends import host
from netcl._backends.host import _GradBuffer, host_queue
from netcl.bench import Floor, Spread, lstm_model, many_sizes
from netcl.device import create_queue
from netcl.optim import Adam, RMSProp
from netcl.optim.optimizer import Optimizer


@contextmanager
def launches_stubbed(context: cl.Context) -> Iterator[None]:
    """Within it, every launch of netcl's kernel returns a completed event at once."""
    done = cl.UserEvent(context)
    done.set_status(cl.command_execution_status.COMPLETE)
    with mock.patch.object(_kernels.Launcher, "enqueue", lambda self, queue, wait_for: done):
        yield


@contextmanager
def counting_grad_buffers() -> Iterator[list[int]]:
    """Within it, the list it gives counts the buffers host launches make over gradients."""
    made = [0]
    original = _GradBuffer.__init__

    def counting(self: _GradBuffer, *args: Any) -> None:
        made[0] += 1
        original(self, *args)

    with mock.patch.object(_GradBuffer, "__init__", counting):
        yield made


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


PHASES: list[tuple[Any, str, str]] = [
    (Optimizer, "_plan", "checks"),
    (Optimizer, "_stage", "counts"),
    (_kernels.Launcher, "set", "arguments"),
    (_kernels.Launcher, "enqueue", "enqueue"),
    (host, "_finish", "wait"),
    (Optimizer, "_commit", "write-back"),
]
"""The calls whose start and end mark a step's phases: (owner, attribute, name)."""


@contextmanager
def phases_marked() -> Iterator[list[tuple[str, float]]]:
    """Within it, the list it gives gets (name, time) at the start ("name>") and the end
    ("name<") of each call of `PHASES`."""
    marks: list[tuple[str, float]] = []

    def marked(call: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            marks.append((f"{name}>", time.perf_counter()))
            try:
                return call(*args, **kwargs)
            finally:
                marks.append((f"{name}<", time.perf_counter()))

        return timed

    with ExitStack() as patches:
        for owner, attribute, name in PHASES:
            patches.enter_context(mock.patch.object(owner, attribute, marked(getattr(owner, attribute), name)))
        yield marks


def phase_microseconds(
    step: Callable[[], object], queue: cl.CommandQueue, steps: int, before: Callable[[], object] | None
) -> dict[str, float]:
    """The median microseconds from each mark of a step to the next (see `phases_marked`),
    over `steps` steps after a fifth as many untimed, each followed by `queue.finish()`."""
    spans: dict[str, list[float]] = {}
    with phases_marked() as marks:
        for k in range(steps + steps // 5):
            if before is not None:
                before()
            marks.clear()
            marks.append(("start", time.perf_counter()))
            step()
            marks.append(("end", time.perf_counter()))
            queue.finish()
            marks.append(("finish()", time.perf_counter()))
            if k >= steps // 5:
                for (a, at), (b, bt) in zip(marks, marks[1:], strict=False):
                    spans.setdefault(f"{a} -> {b}", []).append(bt - at)
    return {span: float(np.median(times)) * 1e6 for span, times in spans.items()}


def alone_microseconds(call: Callable[[], object], steps: int) -> float:
    """The median microseconds of `call`, called back to back."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times[steps // 5 :])) * 1e6


def last_launch(step: Callable[[], object], queue: cl.CommandQueue) -> Callable[[], object]:
    """The last launch of `step` again, with the arguments it had, and the wait for it."""
    launched: list[tuple[_kernels.Launcher, cl.CommandQueue]] = []
    original = _kernels.Launcher.enqueue

    def recording(self: _kernels.Launcher, on: cl.CommandQueue, wait_for: list[cl.Event]) -> cl.Event:
        launched.append((self, on))
        return original(self, on, wait_for)

    with mock.patch.object(_kernels.Launcher, "enqueue", recording):
        step()
    queue.finish()
    launcher, on = launched[-1]

    def again() -> None:
        launcher.enqueue(on, [])
        on.finish()

    return again


def wait_microseconds(step: Callable[[], object], steps: int, before: Callable[[], object] | None) -> list[float]:
    """The median microseconds of steps that sleep in `queue.finish()` at once, and of
    steps that poll their last launch first, alternated step by step (after a fifth as
    many untimed)."""
    polls = host.SPIN_SECONDS
    times: list[list[float]] = [[], []]
    with mock.patch.object(host, "SPIN_SECONDS", polls):  # (set at each step, restored after)
        for k in range(2 * (steps + steps // 5)):
            host.SPIN_SECONDS = polls if k % 2 else 0.0
            if before is not None:
                before()
            start = time.perf_counter()
            step()
            if k >= 2 * (steps // 5):
                times[k % 2].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e6 for t in times]


def floor_launch(queue: cl.CommandQueue, values: int, state: int, times: int = 1) -> Callable[[], None]:
    """The floor kernel over `values` float32 values with `state` state buffers (`times`
    times in a row), and the wait for it."""
    moved = [cl_array.zeros(queue, values, np.float32) for _ in range(2 + state)]
    return Floor(queue, np.dtype(np.float32), state).launcher(moved, values, times)


IN_A_ROW = 10
"""Steps (or floor launches) that `--split`'s last two turns enqueue before they wait."""


def split_microseconds(queue: cl.CommandQueue, rounds: int, spread: Spread = "log") -> None:
    """Print `--split`'s medians (see the module's docstring)."""
    rng = np.random.default_rng(0)
    sizes = many_sizes(160, spread)
    values = sum(sizes)
    for name, cls, state in (("adam", Adam, 2), ("rmsprop", RMSProp, 1)):
        one = Parameter(
            cl_array.to_device(queue, rng.random(values, np.float32)),
            cl_array.to_device(queue, rng.random(values, np.float32)),
        )
        single: Optimizer[Any, Any, Any, Any] = cls([one], lr=1e-3)
        flat: Optimizer[Any, Any, Any, Any] = cls(flat_parameters(queue, [(n,) for n in sizes]), lr=1e-3)
        for optimizer in (single, flat):
            optimizer.step()  # (the state and the launches)

        def stepped(optimizer: Optimizer[Any, Any, Any, Any], times: int = 1) -> Callable[[], object]:
            def step() -> None:
                for _ in range(times):
                    optimizer.step()
                queue.finish()

            return step

        turns = {
            "floor kernel": floor_launch(queue, values, state),
            "1 tensor, launch": last_launch(single.step, queue),
            "1 tensor, step": stepped(single),
            "160 flat, launch": last_launch(flat.step, queue),
            "160 flat, step": stepped(flat),
            f"floor kernel, {IN_A_ROW} in a row": floor_launch(queue, values, state, IN_A_ROW),
            f"160 flat, {IN_A_ROW} in a row": stepped(flat, IN_A_ROW),
        }
        per = {turn: IN_A_ROW if turn.endswith("in a row") else 1 for turn in turns}
        times: dict[str, list[float]] = {turn: [] for turn in turns}
        order = list(turns)
        for _ in range(rounds):
            rng.shuffle(order)
            for turn in order:
                call = turns[turn]
                for k in range(13):
                    start = time.perf_counter()
                    call()
                    if k >= 3:
                        times[turn].append((time.perf_counter() - start) / per[turn])
        medians = {turn: float(np.median(t)) * 1e6 for turn, t in times.items()}
        print(f"{name} on {values:,} float32 values: median microseconds per step (floor / it)")
        for turn, micro in medians.items():
            floor = medians[f"floor kernel, {IN_A_ROW} in a row" if per[turn] > 1 else "floor kernel"]
            print(f"    {turn:28s} {micro:7.1f}  ({floor / micro:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--phases", action="store_true", help="time a step's phases, with its launches")
    parser.add_argument("--waits", action="store_true", help="steps on host arrays: sleeping or polling waits")
    parser.add_argument("--split", action="store_true", help="floor, one tensor and flat storage, in turns")
    parser.add_argument("--many-spread", choices=get_args(Spread), default="log", help="as netcl.bench's")
    args = parser.parse_args()
    queue = create_queue()
    if args.split:
        split_microseconds(queue, args.rounds, args.many_spread)
        return
    rng = np.random.default_rng(0)
    sizes = many_sizes(160, args.many_spread)
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
    on_host = host_queue()
    if on_host is not None:
        arrays = [Parameter(rng.random(n, np.float32), rng.random(n, np.float32)) for n in sizes]
        cases.append(("numpy-many adam", Adam(arrays, lr=1e-3).step, on_host.context, None))
        if importlib.util.find_spec("torch") is not None:
            params, backward = lstm_model()
            cases.append(("lstm rmsprop", RMSProp(params, lr=1e-3).step, on_host.context, backward))
    if args.waits:
        assert on_host is not None, "no CPU OpenCL device"
        for n in (1000, 1 << 20):
            one = [Parameter(rng.random(n, np.float32), rng.random(n, np.float32))]
            cases.insert(-1, (f"numpy adam {n:,}", Adam(one, lr=1e-3).step, on_host.context, None))
        cases = [case for case in cases if case[2] is on_host.context]
        host.PATH = "kernel"
    for name, step, context, before in cases:
        for _ in range(2):  # the first steps make the state and the launches
            if before is not None:
                before()
            step()
        queue.finish()
        if args.waits:
            sleeping, polling = wait_microseconds(step, args.steps, before)
            print(f"{name:20s} sleeping {sleeping:8.1f} us, polling first {polling:8.1f} us per step")
            continue
        if args.phases:
            on = queue if context is queue.context else on_host
            assert on is not None
            print(f"{name}: median microseconds from each mark of a step to the next")
            for span, micro in phase_microseconds(step, on, args.steps, before).items():
                print(f"    {span:28s} {micro:7.1f}")
            print(f"    {'the last launch alone':28s} {alone_microseconds(last_launch(step, on), args.steps):7.1f}")
            if name.startswith("flat"):
                state = 2 if name == "flat adam" else 1  # (buffers: exp_avg, exp_avg_sq; square_avg)
                micro = alone_microseconds(floor_launch(queue, sum(sizes), state), args.steps)
                print(f"    {'a floor kernel, alike':28s} {micro:7.1f}")
            continue
        with launches_stubbed(context), counting_grad_buffers() as made:
            micro = best_microseconds(step, args.rounds, args.steps, before)
        print(f"{name:16s} {micro:7.1f} us per step, {made[0] / (args.rounds * args.steps):.2f} gradient buffers made")


if __name__ == "__main__":
    main()
