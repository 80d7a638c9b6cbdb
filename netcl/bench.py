"""Measure netcl's RMSProp step against the memory-traffic floor, torch and numpy.

    python -m netcl.bench [--device P:D] [--sizes 1e3,1e4,...] [--json PATH] [--plot PATH]

Every case times its contenders side by side, in turns, in one run, and reports medians:

* netcl: `RMSProp.step()` on pyopencl arrays, then `queue.finish()`;
* floor: an OpenCL kernel that moves the same bytes as the step (reads the parameter, the
  gradient and the state, writes the parameter and the state; netcl's own arrays, but for
  the many-parameter case) with trivial arithmetic, built with the best vector width and
  work-group size of several tried on the device (on a CPU also a loop over values in each
  work-item, the shape of netcl's kernel there);
* torch: the same torch optimizer on CPU tensors (when torch is installed), `fused=True`
  where torch has it (Adam, AdamW, SGD), else `foreach=True` (RMSprop);
* numpy: the fewest in-place passes of numpy ufuncs that compute the step (plain variant).

Cases: one parameter of each size, in float32 and float64, plain and with momentum or
centered (in float16 and bfloat16 with `--dtypes`: a half step against netcl's float32
step of the same size, the half step with master weights or stochastic rounding, and
torch's half step); for each variant, 160 parameters of 64 to 20,000 values each, each in its own
buffer (`many`) or from `netcl.flat_parameters` (`flat`; the floor moves the same total
bytes in one buffer); numpy float32 parameters stepped by netcl. The many-parameter
cases run when float32 is chosen, the numpy case with the plain variant too.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

import netcl
from netcl import Parameter, flat_parameters
from netcl._kernels import CPU_VALUES_PER_ITEM
from netcl._precision import BFLOAT16, compute_dtype, is_half
from netcl.device import create_queue, describe_device
from netcl.optim import SGD, Adam, AdamW, RMSProp
from netcl.optim.optimizer import Optimizer

__all__ = ["Row", "lstm_model", "main", "many_sizes", "run"]


@dataclass(frozen=True)
class Variant:
    """An optimizer with some flags, and the state buffers its step reads and writes."""

    optimizer: Callable[..., Optimizer[Any, Any, Any, Any]]
    torch_name: str
    flags: dict[str, Any]
    buffers: int


VARIANTS: dict[str, Variant] = {
    "plain": Variant(RMSProp, "RMSprop", {"alpha": 0.99, "eps": 1e-8}, 1),
    "momentum": Variant(RMSProp, "RMSprop", {"momentum": 0.9}, 2),
    "centered": Variant(RMSProp, "RMSprop", {"centered": True}, 2),
    "sgd": Variant(SGD, "SGD", {}, 0),
    "sgd-momentum": Variant(SGD, "SGD", {"momentum": 0.9}, 1),
    "adam": Variant(Adam, "Adam", {}, 2),
    "adamw": Variant(AdamW, "AdamW", {}, 2),
}
"""plain, momentum and centered are RMSProp's."""
LR, ALPHA, EPS = 1e-3, 0.99, 1e-8
WIDE_SPREAD = 0.25
"""A contender whose rounds' interquartile range exceeds this share of its median is
reported: its row's ratios are uncertain."""


@dataclass
class Row:
    """One case's medians (milliseconds per step) and ratios."""

    case: str
    dtype: str
    variant: str
    size: int
    params: int
    bytes_per_step: int
    median_ms: dict[str, float] = field(default_factory=dict)
    repeats: int = 0
    spread: dict[str, float] = field(default_factory=dict)
    """Each contender's interquartile range over its median: how much its rounds moved."""

    def ratio(self, a: str, b: str) -> float | None:
        """Median of contender `a` over that of `b`, or None if either is missing."""
        if a in self.median_ms and b in self.median_ms:
            return self.median_ms[a] / self.median_ms[b]
        return None


def _bytes(variant: str, size: int, dtype: np.dtype[Any]) -> int:
    """Bytes a step moves: reads the parameter, the gradient and the state, writes the
    parameter and the state (float32 state for a half parameter)."""
    buffers = VARIANTS[variant].buffers
    stored, state = dtype.itemsize, compute_dtype(dtype).itemsize
    return size * (3 * stored + 2 * buffers * state)


# --- the floor ---------------------------------------------------------------------------


SETTLE_S: float = 0.05
"""How long a turn runs its contender untimed before timing it (see `_time`): torch's
OpenMP threads stop spinning 20 to 40 ms after its step on the 2-core machine where
this was measured."""

TIMED_PER_TURN: int = 3
"""Calls timed in a turn once it has settled."""


class Floor:
    """A kernel that moves a step's bytes: reads p, g and the state, writes p and the state."""

    def __init__(
        self,
        queue: cl.CommandQueue,
        dtype: np.dtype[Any],
        buffers: int,
        settle_s: float = SETTLE_S,
        timed: int = TIMED_PER_TURN,
    ) -> None:
        self.queue: cl.CommandQueue = queue
        self.dtype: np.dtype[Any] = dtype
        self.buffers: int = buffers
        self.settle_s: float = settle_s
        """How long `_choose` settles its candidates' turns (see `_time`)."""
        self.timed: int = timed
        """Calls `_choose` times in each of its candidates' turns."""
        self.choice: tuple[int, int] | None = None
        self._kernels: dict[int, cl.Kernel] = {}

    def kernel(self, width: int) -> cl.Kernel:
        """The floor kernel with `width`-wide vectors, one vector per work-item; width 0:
        a loop over `CPU_VALUES_PER_ITEM` values in each work-item (netcl's kernel's
        shape on a CPU)."""
        if width not in self._kernels:
            ctype = "float" if self.dtype == np.float32 else "double"
            written = ["param"] + [f"state{k}" for k in range(self.buffers)]
            args = ", ".join(f"__global {ctype} *{name}" for name in ["grad", *written])
            if width == 0:
                body = [f"{n}[i] = {n}[i] + grad[i];" for n in written]
                main = f"""const long first = (long)get_global_id(0) * {CPU_VALUES_PER_ITEM};
                const long last = min(first + {CPU_VALUES_PER_ITEM}, n);
                for (long i = first; i < last; ++i) {{ {" ".join(body)} }}"""
            elif width > 1:
                load = f"{ctype}{width} g = vload{width}(i, grad);"
                body = [f"vstore{width}(vload{width}(i, {n}) + g, i, {n});" for n in written]
            else:
                load = f"{ctype} g = grad[i];"
                body = [f"{n}[i] = {n}[i] + g;" for n in written]
            if width:
                main = f"""long i = get_global_id(0);
                /* as in netcl's kernel: a flag, the same for the whole work-group, that
                   lets the compiler run full groups without the bound check */
                const bool full = (long)(get_group_id(0) + 1) * get_local_size(0) * {width} <= n;
                if (full || (i + 1) * {width} <= n) {{ {load} {" ".join(body)} }}"""
            pragma = "#pragma OPENCL EXTENSION cl_khr_fp64: enable" if ctype == "double" else ""
            source = f"""{pragma}
            __kernel void floor_kernel({args}, long n) {{
                {main}
            }}"""
            kernel = cl.Kernel(cl.Program(self.queue.context, source).build(), "floor_kernel")
            kernel.set_scalar_arg_dtypes([None] * (2 + self.buffers) + [np.int64])
            self._kernels[width] = kernel
        return self._kernels[width]

    def launcher(self, arrays: Sequence[cl_array.Array], size: int, times: int = 1) -> Callable[[], None]:
        """A timed step: the floor kernel over `size` values of `arrays` (`times` times,
        one launch after another), then finish."""
        if self.choice is None:
            self.choice = self._choose()
        width, local = self.choice
        kernel = self.kernel(width)
        groups = -(-size // (_per_item(width) * local))
        buffers = [cast(cl.Buffer, a.base_data) for a in arrays]

        def step() -> None:
            for _ in range(times):
                kernel(self.queue, (groups * local,), (local,), *buffers, size)
            self.queue.finish()

        return step

    def _choose(self) -> tuple[int, int]:
        """The fastest (vector width, work-group size) of several, on 4M values, timed in
        turns like the contenders (5 rounds)."""
        size = 4 << 20
        arrays = [cl_array.zeros(self.queue, size, self.dtype) for _ in range(2 + self.buffers)]
        args = [cast(cl.Buffer, a.base_data) for a in arrays]
        candidates = [(width, local) for width in (1, 4, 8) for local in (64, 256, 1024)]
        if self.queue.device.type & cl.device_type.CPU:
            candidates.append((0, 1))

        def launch(width: int, local: int) -> Callable[[], None]:
            kernel = self.kernel(width)
            groups = -(-size // (_per_item(width) * local))

            def step() -> None:
                kernel(self.queue, (groups * local,), (local,), *args, size)
                self.queue.finish()

            return step

        turns = {f"{w},{n}": launch(w, n) for w, n in candidates}
        medians, _ = _time(turns, 0.0, 5, 5, settle_s=self.settle_s, timed=self.timed)
        best = min(medians, key=medians.__getitem__)
        width, local = best.split(",")
        return int(width), int(local)


def _per_item(width: int) -> int:
    """Values a work-item of the floor kernel of `width` moves."""
    return width or CPU_VALUES_PER_ITEM


# --- contenders --------------------------------------------------------------------------


def _torch_step(size: int | Sequence[int], dtype: np.dtype[Any], variant: Variant) -> Callable[[], None] | None:
    try:
        import torch
    except ImportError:
        return None
    sizes = [size] if isinstance(size, int) else list(size)
    tdtype = getattr(torch, dtype.name)
    params = [torch.rand(n, dtype=tdtype, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.rand_like(p)
    cls: Callable[..., torch.optim.Optimizer] = getattr(torch.optim, variant.torch_name)
    # torch's fastest CPU implementation: fused where it has one, else foreach
    how = {"fused": True} if variant.torch_name in _TORCH_FUSED else {"foreach": True}
    optimizer = cls(params, lr=LR, **how, **variant.flags)
    return optimizer.step


_TORCH_FUSED = frozenset({"Adam", "AdamW", "SGD", "Adagrad"})
"""torch's optimizers with `fused=True` on the CPU."""


def _torch_add_step(size: int, dtype: np.dtype[Any]) -> Callable[[], None] | None:
    """torch's in-place `p.add_(g)`: reads 2 values, writes 1, as fast as torch moves memory."""
    try:
        import torch
    except ImportError:
        return None
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    p, g = torch.rand(size, dtype=tdtype), torch.rand(size, dtype=tdtype)

    def step() -> None:
        p.add_(g)

    return step


def lstm_model() -> tuple[list[Any], Callable[[], None]]:
    """The `lstm` case's model (an embedding, an LSTM and a linear head; needs torch), made
    the same at each call: its parameters, and its backward pass, which sets their
    gradients to None (torch's `zero_grad()`) and makes new ones, as training does."""
    import torch

    torch.manual_seed(0)
    embed, lstm, head = torch.nn.Embedding(100, 64), torch.nn.LSTM(64, 128), torch.nn.Linear(128, 90)
    tokens = torch.randint(0, 100, (20, 8))
    params = [*embed.parameters(), *lstm.parameters(), *head.parameters()]

    def backward() -> None:
        for p in params:
            p.grad = None
        out, _ = lstm(embed(tokens))
        loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, 90), tokens.reshape(-1) % 90)
        torch.autograd.backward([loss])

    backward()
    return params, backward


def _lstm_steps() -> tuple[dict[str, Callable[[], None]], Callable[[str], None], int] | None:
    """A real model's optimizer step: an embedding, an LSTM and a linear head (7 tensors,
    117k values); netcl's RMSProp on its tensors, torch's RMSprop as a user gets it
    (defaults), and torch's fused Adam, each on a model of its own; and what comes before
    each step in training: `zero_grad()` (gradients set to None, torch's default), the
    forward pass and torch autograd's backward pass (new gradient tensors each time)."""
    try:
        import torch
    except ImportError:
        return None

    makers: dict[str, Callable[[list[Any]], Any]] = {
        "netcl": lambda params: RMSProp(params, lr=LR),
        "torch": lambda params: torch.optim.RMSprop(params, lr=LR),
        "torch fused Adam": lambda params: torch.optim.Adam(params, lr=LR, fused=True),
    }
    steps: dict[str, Callable[[], None]] = {}
    backwards: dict[str, Callable[[], None]] = {}
    values = 0
    for name, make in makers.items():
        params, backwards[name] = lstm_model()
        steps[name] = make(params).step
        values = sum(p.numel() for p in params)
    return steps, lambda name: backwards[name](), values


def _numpy_step(size: int, dtype: np.dtype[Any]) -> Callable[[], None]:
    """RMSProp (plain) in the fewest in-place numpy passes, no temporaries per step."""
    rng = np.random.default_rng(0)
    p, g = rng.random(size).astype(dtype), rng.random(size).astype(dtype)
    v, t = np.zeros(size, dtype), np.empty(size, dtype)

    def step() -> None:
        np.multiply(g, g, out=t)
        np.multiply(t, 1 - ALPHA, out=t)
        np.multiply(v, ALPHA, out=v)
        np.add(v, t, out=v)
        np.sqrt(v, out=t)
        np.add(t, EPS, out=t)
        np.divide(g, t, out=t)
        np.multiply(t, -LR, out=t)
        np.add(p, t, out=p)

    return step


Spread = Literal["log", "uniform"]
"""How the many-parameter case's sizes are drawn (see `many_sizes`)."""


def many_sizes(count: int, spread: Spread = "log") -> list[int]:
    """The sizes of the many-parameter case's `count` parameters: 64 to 20,000 values,
    the same in every run, drawn evenly on a log scale (`log`: many small parameters and
    a few large ones, as in most models; 537,397 values for 160) or on a linear one
    (`uniform`: 1,629,266 values for 160)."""
    rng = np.random.default_rng(1)
    if spread == "uniform":
        return [int(n) for n in rng.uniform(64, 20_000, count)]
    return [int(n) for n in np.exp(rng.uniform(np.log(64), np.log(20_000), count))]


def _netcl_step(
    queue: cl.CommandQueue, sizes: Sequence[int], dtype: np.dtype[Any], variant: Variant, *, flat: bool = False
) -> tuple[Callable[[], None], list[cl_array.Array]]:
    """A timed netcl step over parameters of `sizes` (each in its own buffer, or with
    `flat`, from `netcl.flat_parameters`), and the first one's arrays in the floor
    kernel's order: its gradient, itself, then its state buffers (made by a first
    step)."""
    rng = np.random.default_rng(0)
    if flat:
        params: list[Parameter[Any]] = list(flat_parameters(queue, [(n,) for n in sizes], dtype))
        for param in params:
            param.data.set(rng.random(param.data.shape).astype(dtype))
            cast(cl_array.Array, param.grad).set(rng.random(param.data.shape).astype(dtype))
        arrays = [(param.data, cast(cl_array.Array, param.grad)) for param in params]
    else:
        arrays = [
            (
                cl_array.to_device(queue, rng.random(n).astype(dtype)),
                cl_array.to_device(queue, rng.random(n).astype(dtype)),
            )
            for n in sizes
        ]
        params = [Parameter(data, grad) for data, grad in arrays]
    optimizer = variant.optimizer(params, lr=LR, **variant.flags)
    optimizer.step()
    first = params[0]
    state = [x for x in optimizer.state[id(first)].values() if isinstance(x, cl_array.Array)]
    if len(state) != variant.buffers:
        raise RuntimeError(f"{variant.torch_name} made {len(state)} state buffers, expected {variant.buffers}")

    def step() -> None:
        optimizer.step()
        queue.finish()

    return step, [arrays[0][1], arrays[0][0], *state]


def _netcl_numpy_step(sizes: Sequence[int], dtype: np.dtype[Any], variant: Variant) -> Callable[[], None]:
    rng = np.random.default_rng(0)
    params = [Parameter(rng.random(n).astype(dtype), rng.random(n).astype(dtype)) for n in sizes]
    return variant.optimizer(params, lr=LR, **variant.flags).step


def _time(
    contenders: dict[str, Callable[[], None]],
    budget_s: float,
    min_repeats: int,
    max_repeats: int,
    spread: dict[str, float] | None = None,
    before: Callable[[str], None] | None = None,
    settle_s: float = SETTLE_S,
    timed: int = TIMED_PER_TURN,
) -> tuple[dict[str, float], int]:
    """Median milliseconds of each contender, timed in turns so noise hits all alike;
    `spread`, if given, gets each one's interquartile range over its median.

    A turn first runs the contender untimed for `settle_s` (once at least; not at all
    where it is 0, as in a smoke run), then times `timed` calls: each is timed in the
    steady state of its own loop, as a training loop runs it after its own work, not in
    the wake of another contender
    (torch's OpenMP threads spin for tens of milliseconds after torch's step, and a CPU
    OpenCL device's threads then get less of the processor; measured in the Benchmarks
    page). `before`, where given, runs instead, once, with the contender's name: the
    work that comes before the step in training (a torch model's backward pass, which
    brings new gradients and leaves the caches full of its own data). The order of the
    turns is shuffled every round.
    """
    for fn in contenders.values():
        fn()  # warm up: builds, first-touch allocation
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders.items())
    shuffle = np.random.default_rng(0).shuffle
    started = time.perf_counter()
    repeats = 0
    while repeats < max_repeats and (repeats < min_repeats or time.perf_counter() - started < budget_s):
        shuffle(order)
        for name, fn in order:
            if before is not None:
                before(name)
            elif settle_s > 0:
                settled = time.perf_counter() + settle_s
                fn()
                while time.perf_counter() < settled:
                    fn()
            for _ in range(timed if before is None else 1):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
        repeats += 1
    if spread is not None:
        for name, times in samples.items():
            low, median, high = np.percentile(times, [25, 50, 75])
            spread[name] = float((high - low) / median)
    return {name: float(np.median(times)) * 1e3 for name, times in samples.items()}, repeats


# --- the run -----------------------------------------------------------------------------


def run(
    queue: cl.CommandQueue,
    sizes: Sequence[int],
    *,
    dtypes: Sequence[str] = ("float32", "float64"),
    variants: Sequence[str] = ("plain", "momentum", "centered"),
    many: int = 160,
    spread: Spread = "log",
    budget_s: float = 1.0,
    min_repeats: int = 5,
    max_repeats: int = 300,
    progress: bool = True,
    settle_s: float = SETTLE_S,
    timed: int = TIMED_PER_TURN,
) -> list[Row]:
    """Run every case and return its row."""
    from tqdm import tqdm

    plan: list[tuple[str, str, str, int]] = [
        ("single", dtype, variant, size) for dtype in dtypes for variant in variants for size in sizes
    ]
    if "float32" in dtypes and many:  # many parameters: separate arrays, flat storage, numpy
        cases = ("many", "flat", "numpy-many")
        plan += [(case, "float32", variant, many) for variant in variants for case in cases]
    if "float32" in dtypes and "plain" in variants:
        plan += [("numpy-params", "float32", "plain", size) for size in sizes]
        plan.append(("lstm", "float32", "plain", 7))
    # the machine's bandwidth, at the largest size: the best of a streaming kernel and torch
    plan += [("bandwidth", dtype, "-", max(sizes)) for dtype in dtypes if dtype in ("float32", "float64")]
    floors: dict[tuple[str, int], Floor] = {}
    rows: list[Row] = []
    for case, dtype_name, variant, size in tqdm(plan, disable=not progress, unit="case", file=sys.stderr):
        dtype = np.dtype(BFLOAT16 if dtype_name == "bfloat16" else dtype_name)
        chosen = VARIANTS.get(variant, VARIANTS["sgd"])
        buffers = chosen.buffers
        # (built when used)
        floor = floors.setdefault((dtype_name, buffers), Floor(queue, dtype, buffers, settle_s, timed))
        contenders: dict[str, Callable[[], None]] = {}
        before: Callable[[str], None] | None = None
        torch_step: Callable[[], None] | None
        if is_half(dtype):
            # a half step against the float32 step (the same variant and size), the half
            # step with a float32 master copy of the parameter, and with stochastic rounding
            contenders["netcl"], _ = _netcl_step(queue, [size], dtype, chosen)
            contenders["float32"], _ = _netcl_step(queue, [size], np.dtype(np.float32), chosen)
            master = Variant(chosen.optimizer, chosen.torch_name, {**chosen.flags, "master_weights": True}, buffers + 1)
            contenders["master_weights"], _ = _netcl_step(queue, [size], dtype, master)
            stochastic = Variant(
                chosen.optimizer, chosen.torch_name, {**chosen.flags, "stochastic_rounding": True}, buffers
            )
            contenders["stochastic_rounding"], _ = _netcl_step(queue, [size], dtype, stochastic)
            torch_step = _torch_step(size, dtype, chosen)
            row = Row(case, dtype_name, variant, size, 1, _bytes(variant, size, dtype))
        elif case == "bandwidth":  # p += g: 12 bytes per float32 value
            arrays = [cl_array.zeros(queue, size, dtype) for _ in range(2)]
            contenders["floor"] = floor.launcher(arrays, size)
            torch_step = _torch_add_step(size, dtype)
            row = Row(case, dtype_name, variant, size, 1, 3 * size * dtype.itemsize)
        elif case == "lstm":
            lstm = _lstm_steps()
            if lstm is None:
                continue
            contenders.update(lstm[0])
            before = lstm[1]
            torch_step = None
            row = Row(case, dtype_name, variant, lstm[2], size, _bytes(variant, lstm[2], dtype))
        elif case == "numpy-many":
            counts = many_sizes(size, spread)
            contenders["netcl"] = _netcl_numpy_step(counts, dtype, chosen)
            torch_step = _torch_step(counts, dtype, chosen)
            row = Row(case, dtype_name, variant, sum(counts), size, _bytes(variant, sum(counts), dtype))
        elif case in ("many", "flat"):
            counts = many_sizes(size, spread)
            total = sum(counts)
            contenders["netcl"], _ = _netcl_step(queue, counts, dtype, chosen, flat=case == "flat")
            floor_arrays = [cl_array.zeros(queue, total + 4096, dtype) for _ in range(2 + buffers)]
            contenders["floor"] = floor.launcher(floor_arrays, total)
            torch_step = _torch_step(counts, dtype, chosen)
            row = Row(case, dtype_name, variant, total, size, _bytes(variant, total, dtype))
        elif case == "numpy-params":
            contenders["netcl"] = _netcl_numpy_step([size], dtype, chosen)
            contenders["numpy"] = _numpy_step(size, dtype)
            torch_step = None
            row = Row(case, dtype_name, variant, size, 1, _bytes(variant, size, dtype))
        else:
            # The floor moves netcl's own arrays: at sizes whose arrays fit in the
            # processor's cache, arrays of its own would be there more or less often
            # than netcl's after the other contenders ran. (It adds the gradient to the
            # parameter and its state: the values stay finite, and netcl's step takes
            # as long on them.)
            contenders["netcl"], arrays = _netcl_step(queue, [size], dtype, chosen)
            contenders["floor"] = floor.launcher(arrays, size)
            torch_step = _torch_step(size, dtype, chosen)
            if variant == "plain":
                contenders["numpy"] = _numpy_step(size, dtype)
            row = Row(case, dtype_name, variant, size, 1, _bytes(variant, size, dtype))
        if torch_step is not None:
            contenders["torch"] = torch_step
        row.median_ms, row.repeats = _time(
            contenders, budget_s, min_repeats, max_repeats, row.spread, before, settle_s, timed
        )
        rows.append(row)
        del contenders
        gc.collect()
    return rows


def machine_bandwidth(rows: Sequence[Row], dtype: str) -> tuple[float, int] | None:
    """The machine's bandwidth in GB/s from the `bandwidth` row of `dtype` (the faster of
    the streaming kernel and torch's `add_`), and the values that row moved."""
    wanted = "float32" if dtype in ("float16", "bfloat16") else dtype  # (a half step's bytes: as float32's)
    for row in rows:
        if row.case == "bandwidth" and row.dtype == wanted and row.median_ms:
            return row.bytes_per_step / min(row.median_ms.values()) / 1e6, row.size
    return None


COLUMNS = ("floor", "torch", "numpy")
"""Contenders with columns of their own; any other is listed in the last column."""


def table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    """The rows as a table of medians and ratios: aligned text, or Markdown. Every ratio
    is another contender's time over netcl's: netcl's speed-up, > 1 where netcl is faster.
    GB/s is what netcl's step moved per second (for the `bandwidth` row, the machine's);
    `of machine` is that over the machine's bandwidth, for rows of no more values than
    the bandwidth row was measured on (the largest `--sizes`): a streaming kernel over
    fewer values measures its launch more than the memory, so a step over more values
    would seem to outrun the machine."""
    header = (
        "case",
        "dtype",
        "variant",
        "values",
        "netcl ms",
        "GB/s",
        "of machine",
        "floor ms",
        "floor/netcl",
        "torch ms",
        "torch/netcl",
        "numpy ms",
        "numpy/netcl",
        "others: ms (x/netcl)",
    )
    lines = [header]

    def ms(row: Row, name: str) -> str:
        return f"{row.median_ms[name]:.4g}" if name in row.median_ms else "-"

    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for row in rows:
        values = f"{row.size:,}" + (f" in {row.params}" if row.params > 1 else "")
        bandwidth, measured_on = machine_bandwidth(rows, row.dtype) or (None, 0)
        netcl = row.median_ms.get("netcl")
        if row.case == "bandwidth":
            speed, share = bandwidth, None
        else:
            speed = row.bytes_per_step / netcl / 1e6 if netcl else None
            share = speed / bandwidth if speed is not None and bandwidth and row.size <= measured_on else None
        others = [
            f"{name}: {row.median_ms[name]:.4g} ({ratio(row.ratio(name, 'netcl'))})"
            for name in row.median_ms
            if name not in ("netcl", *COLUMNS)
        ]
        lines.append(
            (
                row.case,
                row.dtype,
                row.variant,
                values,
                ms(row, "netcl"),
                f"{speed:.3g}" if speed is not None else "-",
                ratio(share),
                ms(row, "floor"),
                ratio(row.ratio("floor", "netcl")),
                ms(row, "torch"),
                ratio(row.ratio("torch", "netcl")),
                ms(row, "numpy"),
                ratio(row.ratio("numpy", "netcl")),
                "; ".join(others) or "-",
            )
        )
    if markdown:
        rule = tuple("---" if k < 4 or k == len(header) - 1 else "---:" for k in range(len(header)))
        return "\n".join(f"| {' | '.join(line)} |" for line in [header, rule, *lines[1:]])
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def plot(rows: Sequence[Row], path: str, device: str) -> None:
    """A PNG of time per step against size, one panel per dtype, with the floor drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    singles = [r for r in rows if r.case == "single" and r.variant == "plain"]
    dtypes = sorted({r.dtype for r in singles})
    fig, axes = plt.subplots(
        1, max(1, len(dtypes)), figsize=(6 * max(1, len(dtypes)), 4.5), constrained_layout=True, squeeze=False
    )
    for ax, dtype in zip(axes[0], dtypes, strict=False):
        mine = [r for r in singles if r.dtype == dtype]
        sizes = [r.size for r in mine]
        for name, style in (("floor", "k--"), ("netcl", "C0-o"), ("torch", "C1-s"), ("numpy", "C2-^")):
            points = [(s, r.median_ms[name]) for s, r in zip(sizes, mine, strict=True) if name in r.median_ms]
            if points:
                label = "floor (same bytes)" if name == "floor" else name
                ax.plot(*zip(*points, strict=True), style, label=label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="values per parameter",
            ylabel="ms per step (median)",
            title=f"RMSProp step, {dtype}",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    # the device's name can be long: wrapped, the title stays inside the figure
    fig.suptitle(textwrap.fill(f"netcl {netcl.__version__} on {device}", width=int(13 * fig.get_figwidth())))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be numbers separated by commas, got {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run the benchmark, print the table, write JSON and the plot."""
    parser = argparse.ArgumentParser(prog="python -m netcl.bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", help="OpenCL device as P or P:D (default: PYOPENCL_CTX or the first)")
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=_sizes("1e3,1e4,1e5,1e6,1e7,1e8"),
        help="values per parameter, comma-separated (1e3,...,1e8)",
    )
    parser.add_argument(
        "--dtypes", default="float32,float64", help="some of float32,float64,float16,bfloat16 (float32,float64)"
    )
    parser.add_argument(
        "--variants",
        default="plain,momentum,centered",
        help="RMSProp's plain,momentum,centered (default); also sgd,sgd-momentum,adam,adamw",
    )
    parser.add_argument("--many", type=int, default=160, help="parameters in the many-parameter case (160; 0: skip)")
    parser.add_argument(
        "--many-spread",
        choices=get_args(Spread),
        default="log",
        help="their sizes, 64 to 20,000 values: evenly on a log scale (default) or a linear one",
    )
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case (1.0)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time per step against size")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run that only checks it works")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    for name, allowed, given in (
        ("dtypes", ("float32", "float64", "float16", "bfloat16"), dtypes),
        ("variants", tuple(VARIANTS), variants),
    ):
        if not given or not set(given) <= set(allowed):
            parser.error(f"--{name} must be some of {','.join(allowed)}, got {','.join(given)!r}")
    try:
        queue = create_queue(args.device)
    except ValueError as error:
        parser.error(str(error))
    sizes, many, budget, min_repeats = args.sizes, args.many, args.budget, 5
    settle, timed = SETTLE_S, TIMED_PER_TURN
    if args.smoke:  # (one call per turn)
        sizes, many, budget, min_repeats, settle, timed = [1000, 10_000], min(many, 8), 0.0, 2, 0.0, 1
    rows = run(
        queue,
        sizes,
        dtypes=dtypes,
        variants=variants,
        many=many,
        spread=args.many_spread,
        budget_s=budget,
        min_repeats=min_repeats,
        progress=not args.quiet,
        settle_s=settle,
        timed=timed,
    )
    device = describe_device(queue)
    print(f"device: {device}")
    print(table(rows, markdown=args.markdown))
    for row in rows:
        wide = {name: value for name, value in row.spread.items() if value > WIDE_SPREAD}
        if wide:
            moved = ", ".join(f"{name} {value:.0%}" for name, value in wide.items())
            print(
                f"warning: {row.case} {row.dtype} {row.variant} {row.size:,}: the rounds' interquartile range "
                f"is {moved} of the median; its ratios are uncertain (a busy machine?)",
                file=sys.stderr,
            )
    if args.json:
        meta = {
            "device": device,
            "netcl": netcl.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "python -m netcl.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, out, indent=2)
    if args.plot:
        plot(rows, args.plot, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
