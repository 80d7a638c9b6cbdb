"""What each part of an optimizer's update costs in the fused kernel, against the floor.

    python -m tests.kernel_costs [--optimizer rmsprop|adam] [--size 1e7] [--rounds 31]
    python -m tests.kernel_costs --many 160 [--optimizer rmsprop|adam] [--rounds 301]

Times, in shuffled turns on the default OpenCL device, float32 kernels that all move the
bytes of the optimizer's plain step (RMSProp: read p, g, v, write p, v; Adam: read p, g,
m, v, write p, m, v) on the step's own arrays, in the shape of netcl's kernel on the
device (`netcl._kernels.geometry`), built with netcl's build options: the floor
(trivial arithmetic), the floor with a multiply per written array, the update's
arithmetic without and then with its
square root and division, then with each of netcl's extreme-value policies (and, for
Adam, torch's form of the first moment's lerp) in turn, then all of them; and netcl's own
`step()`, with `nonfinite="skip"` (the default), `"count"` and `"propagate"`. Prints
medians, ratios to the floor and the bandwidth each reaches.

With `--many N`: what a step of `--optimizer` over the benchmark's N parameters of 64 to
20,000 values (each in its own buffer) costs beyond the floor for their total bytes:
one parameter of that many values in one launch, then the same values in as many launches as the N
parameters take, then those N parameters' own launches, all enqueued bare (no Python
between them but the enqueue), and the step itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Parameter
from netcl._backends.opencl import _Launch, _Prepared
from netcl._kernels import _BUILD_OPTIONS, geometry
from netcl.bench import LR, VARIANTS, Floor, Variant, _bytes, _netcl_step, _time, many_sizes
from netcl.device import create_queue
from netcl.optim.optimizer import Optimizer


@dataclass(frozen=True)
class Costs:
    """One optimizer's kernels: what each reads and writes, and their bodies."""

    variant: str
    """The benchmark's variant (`netcl.bench.VARIANTS`) whose step the kernels match."""
    state: tuple[str, ...]
    """The variant's state buffers, in the optimizer's order, as its kernels name them
    (upper case)."""
    scalars: dict[str, float]
    bodies: dict[str, str]
    """Each kernel's body, after `g = G[i]`, `p0 = P[i]` and `<name>0 = <NAME>[i]` for
    each state buffer."""


# RMSProp: lr, alpha, oma = 1 - alpha, eps, clip
_RMS_ARITHMETIC = "float v = v0 * alpha + oma * (g * g);"
_RMS_UPDATE = "float u = g / (__builtin_sqrtf(v) + eps);"
_SATURATE = "v = (v < FLT_MAX) ? v : FLT_MAX;"
_RMS_CLAMP = "u = (u > clip) ? clip : u; u = (u < -clip) ? -clip : u;"
_FINITE = "const int f = (as_int(g) & 0x7f800000) != 0x7f800000;"
_RMS_STORE = "V[i] = v; P[i] = p0 + (-lr) * u;"
_RMS_STORE_FINITE = f"if (f) {{ {_RMS_STORE} }}"
_RMS_BLEND = "V[i] = f ? v : v0; P[i] = f ? p0 + (-lr) * u : p0;"

# Adam: w = 1 - beta1, b1, b2, omb2 = 1 - beta2, eps, ss = step size, bc2 = the square
# root of beta2's bias correction
_ADAM_M = "float m = m0 + w * (g - m0);"
_ADAM_LERP = "float m = (w < 0.5f) ? m0 + w * (g - m0) : g - (g - m0) * b1;"
_ADAM_V = "float v = v0 * b2 + omb2 * g * g;"
_ADAM_UPDATE = "float u = m / (__builtin_sqrtf(v) / bc2 + eps);"
_ADAM_STORE = "M[i] = m; V[i] = v; P[i] = p0 + (-ss) * u;"
_ADAM_STORE_FINITE = f"if (f) {{ {_ADAM_STORE} }}"
_ADAM_BLEND = "M[i] = f ? m : m0; V[i] = f ? v : v0; P[i] = f ? p0 + (-ss) * u : p0;"

OPTIMIZERS = {
    "rmsprop": Costs(
        variant="plain",
        state=("V",),
        scalars={"lr": 1e-3, "alpha": 0.99, "oma": 0.01, "eps": 1e-8, "clip": 10.0},
        bodies={
            "floor (p += g, v += g)": "P[i] = p0 + g; V[i] = v0 + g;",
            "floor with two multiplies": "P[i] = p0 * lr + g; V[i] = v0 * alpha + g;",
            "arithmetic without sqrt and division": _RMS_ARITHMETIC + "float u = g * (v + eps);" + _RMS_STORE,
            "arithmetic": _RMS_ARITHMETIC + _RMS_UPDATE + _RMS_STORE,
            "+ saturate v": _RMS_ARITHMETIC + _SATURATE + _RMS_UPDATE + _RMS_STORE,
            "+ clamp u": _RMS_ARITHMETIC + _RMS_UPDATE + _RMS_CLAMP + _RMS_STORE,
            "+ skip non-finite g, masked store": _RMS_ARITHMETIC + _RMS_UPDATE + _FINITE + _RMS_STORE_FINITE,
            "+ skip non-finite g, blend": _RMS_ARITHMETIC + _RMS_UPDATE + _FINITE + _RMS_BLEND,
            "+ all three (blend)": _RMS_ARITHMETIC + _SATURATE + _RMS_UPDATE + _RMS_CLAMP + _FINITE + _RMS_BLEND,
        },
    ),
    "adam": Costs(
        variant="adam",
        state=("M", "V"),
        scalars={"w": 0.1, "b1": 0.9, "b2": 0.999, "omb2": 1e-3, "eps": 1e-8, "ss": 1e-2, "bc2": 0.3},
        bodies={
            "floor (p += g, m += g, v += g)": "P[i] = p0 + g; M[i] = m0 + g; V[i] = v0 + g;",
            "floor with three multiplies": "P[i] = p0 * ss + g; M[i] = m0 * b1 + g; V[i] = v0 * b2 + g;",
            "arithmetic without sqrt and division": _ADAM_M + _ADAM_V + "float u = m * (v * bc2 + eps);" + _ADAM_STORE,
            "arithmetic": _ADAM_M + _ADAM_V + _ADAM_UPDATE + _ADAM_STORE,
            "+ torch's lerp": _ADAM_LERP + _ADAM_V + _ADAM_UPDATE + _ADAM_STORE,
            "+ saturate v": _ADAM_M + _ADAM_V + _SATURATE + _ADAM_UPDATE + _ADAM_STORE,
            "+ skip non-finite g, masked store": _ADAM_M + _ADAM_V + _ADAM_UPDATE + _FINITE + _ADAM_STORE_FINITE,
            "+ skip non-finite g, blend": _ADAM_M + _ADAM_V + _ADAM_UPDATE + _FINITE + _ADAM_BLEND,
            "+ all three (blend)": _ADAM_LERP + _ADAM_V + _SATURATE + _ADAM_UPDATE + _FINITE + _ADAM_BLEND,
        },
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rmsprop")
    parser.add_argument("--size", type=float, default=1e7)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--many", type=int, default=0, help="time launch costs over this many parameters")
    args = parser.parse_args(argv)
    size = int(args.size)
    queue = create_queue()
    if args.many:
        many(queue, args.many, args.rounds, VARIANTS[OPTIMIZERS[args.optimizer].variant])
        return
    costs = OPTIMIZERS[args.optimizer]
    variant = VARIANTS[costs.variant]
    assert variant.buffers == len(costs.state), args.optimizer
    netcl_step, (g, p, *state) = _netcl_step(queue, [size], np.dtype(np.float32), variant)
    # Every contender moves the very same arrays as the step: at sizes whose arrays fit
    # in the processor's last-level cache, a contender with arrays of its own would find
    # fewer of them there after the others ran, and look slower for it.
    buffers = [cast(cl.Buffer, x.base_data) for x in (p, g, *state)]
    scalars = [np.float32(x) for x in costs.scalars.values()]
    geo = geometry(queue.device)  # (netcl's kernel's shape: a loop over values per work-item on a CPU)
    local, per = geo.local_size, geo.per_item
    global_size = -(-size // geo.span) * local
    arrays = ", ".join(f"__global float *{name}" for name in ("P", "G", *costs.state))
    declared = ", ".join(f"float {name}" for name in costs.scalars)
    loads = " ".join(f"const float {name.lower()}0 = {name}[i];" for name in costs.state)

    def kernel(body: str) -> Callable[[], None]:
        source = f"""#pragma OPENCL FP_CONTRACT OFF
        __kernel void k({arrays}, long n, {declared})
        {{
            const long first = (long)get_global_id(0) * {per};
            const long last = min(first + {per}, n);
            for (long i = first; i < last; ++i) {{ const float g = G[i]; const float p0 = P[i]; {loads} {body} }}
        }}"""
        built = cl.Program(queue.context, source).build(options=list(_BUILD_OPTIONS)).k

        def run() -> None:
            built(queue, (global_size,), (local,), *buffers, np.int64(size), *scalars)
            queue.finish()

        return run

    contenders = {name: kernel(body) for name, body in costs.bodies.items()}
    contenders["netcl step()"] = netcl_step
    for mode in ("count", "propagate"):
        # the same parameter and gradient, state buffers of its own
        other = variant.optimizer([Parameter(p, g)], lr=LR, nonfinite=mode, **variant.flags)
        other.step()

        def step(other: Optimizer[Any, Any, Any, Any] = other) -> None:
            other.step()
            queue.finish()

        contenders[f"netcl step(), nonfinite={mode!r}"] = step
    medians, _ = _time(contenders, 0.0, args.rounds, args.rounds)
    floor = next(iter(medians.values()))
    moved = _bytes(costs.variant, 1, np.dtype(np.float32))  # per value
    print(f"{size:,} float32 values on {queue.device.name}, medians of {args.rounds} turns")
    print("| kernel | ms | / floor | GB/s |\n| --- | ---: | ---: | ---: |")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.3g} | {ms / floor:.2f} | {moved * size / ms / 1e6:.0f} |")


def _bound(optimizer: Optimizer[Any, Any, Any, Any]) -> list[_Launch]:
    """The launches of the optimizer's last step, with their kernels' arguments bound."""
    caches = [cache for kept in optimizer._kept.values() for cache in kept.launches.values()]
    return [launch for cache in caches if isinstance(p := cache.get("prepared"), _Prepared) for launch in p.launches]


def _bare(launches: list[_Launch]) -> Callable[[], None]:
    """Enqueue `launches` as they are bound, then finish."""

    def run() -> None:
        for launch in launches:
            launcher = launch.launcher
            cl.enqueue_nd_range_kernel(
                launch.queue, launcher.kernel, (launcher.global_size,), (launcher.fused.geometry.local_size,)
            )
        launches[0].queue.finish()

    return run


def many(queue: cl.CommandQueue, count: int, rounds: int, variant: Variant) -> None:
    """Launch and per-parameter costs of a step over `count` parameters (see the top)."""
    rng = np.random.default_rng(0)

    def arrays(n: int) -> tuple[cl_array.Array, cl_array.Array]:
        return (
            cl_array.to_device(queue, rng.random(n, dtype=np.float32)),
            cl_array.to_device(queue, rng.random(n, dtype=np.float32)),
        )

    sizes = many_sizes(count)
    total = sum(sizes)
    factory = variant.optimizer
    optimizer = factory([Parameter(*arrays(n)) for n in sizes], lr=1e-3)
    optimizer.step()
    launches = len(_bound(optimizer))
    whole = factory([Parameter(*arrays(total))], lr=1e-3)
    whole.step()
    # the same values in `launches` parameters: slices of one buffer, one optimizer each
    p, g = arrays(total)
    bounds = np.linspace(0, total, launches + 1).astype(int)
    parts = [factory([Parameter(p[a:b], g[a:b])], lr=1e-3) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for part in parts:
        part.step()

    def step() -> None:
        optimizer.step()
        queue.finish()

    contenders = {
        "floor (one buffer, same bytes)": Floor(queue, np.dtype(np.float32), variant.buffers).launcher(
            [cl_array.zeros(queue, total + 4096, np.float32) for _ in range(2 + variant.buffers)], total
        ),
        "one parameter, 1 launch": _bare(_bound(whole)),
        f"one parameter, {launches} launches": _bare([launch for part in parts for launch in _bound(part)]),
        f"{count} parameters, their {launches} launches": _bare(_bound(optimizer)),
        f"{count} parameters, step()": step,
    }
    medians, _ = _time(contenders, 0.0, rounds, rounds)
    floor = medians["floor (one buffer, same bytes)"]
    print(f"{total:,} float32 values in {count} parameters on {queue.device.name}, medians of {rounds} turns")
    print("| launches | ms | / floor |\n| --- | ---: | ---: |")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.3g} | {ms / floor:.2f} |")


if __name__ == "__main__":
    main()
