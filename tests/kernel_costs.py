"""What each part of RMSProp's update costs in the fused kernel, against the floor.

    python -m tests.kernel_costs [--size 1e7] [--rounds 31]
    python -m tests.kernel_costs --many 160 [--rounds 301]

Times, in shuffled turns on the default OpenCL device, float32 kernels that all move the
bytes of a plain RMSProp step (read p, g, v; write p, v) on the step's own arrays, one
work-item per value in netcl's work-groups, built with netcl's build options: the floor
(trivial arithmetic), the floor with two multiplies, the update's arithmetic without and
then with its square root and division, then with each of netcl's extreme-value policies
in turn, then all of them; and netcl's own `step()`. Prints medians, ratios to the floor
and the bandwidth each reaches (20 bytes per value).

With `--many N`: what a step over the benchmark's N parameters of 64 to 20,000 values
(each in its own buffer) costs beyond the floor for their total bytes: one parameter of
that many values in one launch, then the same values in as many launches as the N
parameters take, then those N parameters' own launches, all enqueued bare (no Python
between them but the enqueue), and the step itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Parameter
from netcl._backends.opencl import _Launch, _Prepared
from netcl._kernels import _BUILD_OPTIONS, geometry
from netcl.bench import Floor, _time, many_sizes
from netcl.optim import RMSProp

ARITHMETIC = "float v = v0 * alpha + oma * (g * g);"
UPDATE = "float u = g / (__builtin_sqrtf(v) + eps);"
SATURATE = "v = (v < FLT_MAX) ? v : FLT_MAX;"
CLAMP = "u = (u > clip) ? clip : u; u = (u < -clip) ? -clip : u;"
FINITE = "const int f = (as_int(g) & 0x7f800000) != 0x7f800000;"
STORE = "V[i] = v; P[i] = p0 + (-lr) * u;"
STORE_FINITE = "if (f) { V[i] = v; P[i] = p0 + (-lr) * u; }"

BODIES = {
    "floor (p += g, v += g)": "P[i] = p0 + g; V[i] = v0 + g;",
    "floor with two multiplies": "P[i] = p0 * lr + g; V[i] = v0 * alpha + g;",
    "arithmetic without sqrt and division": ARITHMETIC + "float u = g * (v + eps);" + STORE,
    "arithmetic": ARITHMETIC + UPDATE + STORE,
    "+ saturate v": ARITHMETIC + SATURATE + UPDATE + STORE,
    "+ clamp u": ARITHMETIC + UPDATE + CLAMP + STORE,
    "+ skip non-finite g": ARITHMETIC + UPDATE + FINITE + STORE_FINITE,
    "+ all three": ARITHMETIC + SATURATE + UPDATE + CLAMP + FINITE + STORE_FINITE,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=float, default=1e7)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--many", type=int, default=0, help="time launch costs over this many parameters")
    args = parser.parse_args(argv)
    size = int(args.size)
    queue = cl.CommandQueue(cl.create_some_context(interactive=False))
    if args.many:
        many(queue, args.many, args.rounds)
        return
    rng = np.random.default_rng(0)
    p, g = (cl_array.to_device(queue, rng.random(size, dtype=np.float32)) for _ in range(2))
    optimizer = RMSProp([Parameter(p, g)], lr=1e-3)
    optimizer.step()  # makes its state
    v = cast(cl_array.Array, next(iter(optimizer.state.values()))["square_avg"])
    # Every contender moves the very same arrays as the step: at sizes whose arrays fit
    # in the processor's last-level cache, a contender with arrays of its own would find
    # fewer of them there after the others ran, and look slower for it.
    buffers = [cast(cl.Buffer, x.base_data) for x in (p, g, v)]
    scalars = [np.float32(x) for x in (1e-3, 0.99, 0.01, 1e-8, 10.0)]
    local = geometry(queue.device).local_size
    global_size = -(-size // local) * local

    def kernel(body: str) -> Callable[[], None]:
        source = f"""#pragma OPENCL FP_CONTRACT OFF
        __kernel void k(__global float *P, __global const float *G, __global float *V, long n,
                        float lr, float alpha, float oma, float eps, float clip)
        {{
            const long i = get_global_id(0);
            const bool full = (long)(get_group_id(0) + 1) * get_local_size(0) <= n;
            if (full || i < n) {{ const float g = G[i]; const float p0 = P[i]; const float v0 = V[i]; {body} }}
        }}"""
        built = cl.Program(queue.context, source).build(options=list(_BUILD_OPTIONS)).k

        def run() -> None:
            built(queue, (global_size,), (local,), *buffers, np.int64(size), *scalars)
            queue.finish()

        return run

    contenders = {name: kernel(body) for name, body in BODIES.items()}

    def netcl_step() -> None:
        optimizer.step()
        queue.finish()

    contenders["netcl step()"] = netcl_step
    medians, _ = _time(contenders, 0.0, args.rounds, args.rounds)
    floor = medians["floor (p += g, v += g)"]
    print(f"{size:,} float32 values on {queue.device.name}, medians of {args.rounds} turns")
    print("| kernel | ms | / floor | GB/s |\n| --- | ---: | ---: | ---: |")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.3g} | {ms / floor:.2f} | {20 * size / ms / 1e6:.0f} |")


def _bound(optimizer: RMSProp) -> list[_Launch]:
    """The launches of the optimizer's last step, with their kernels' arguments bound."""
    caches = optimizer._launch_cache.values()
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


def many(queue: cl.CommandQueue, count: int, rounds: int) -> None:
    """Launch and per-parameter costs of a step over `count` parameters (see the top)."""
    rng = np.random.default_rng(0)

    def arrays(n: int) -> tuple[cl_array.Array, cl_array.Array]:
        return (
            cl_array.to_device(queue, rng.random(n, dtype=np.float32)),
            cl_array.to_device(queue, rng.random(n, dtype=np.float32)),
        )

    sizes = many_sizes(count)
    total = sum(sizes)
    optimizer = RMSProp([Parameter(*arrays(n)) for n in sizes], lr=1e-3)
    optimizer.step()
    launches = len(_bound(optimizer))
    whole = RMSProp([Parameter(*arrays(total))], lr=1e-3)
    whole.step()
    # the same values in `launches` parameters: slices of one buffer, one optimizer each
    p, g = arrays(total)
    bounds = np.linspace(0, total, launches + 1).astype(int)
    parts = [RMSProp([Parameter(p[a:b], g[a:b])], lr=1e-3) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for part in parts:
        part.step()

    def step() -> None:
        optimizer.step()
        queue.finish()

    contenders = {
        "floor (one buffer, same bytes)": Floor(queue, np.dtype(np.float32), 1).launcher(
            [cl_array.zeros(queue, total + 4096, np.float32) for _ in range(3)], total
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
