"""What each part of RMSProp's update costs in the fused kernel, against the floor.

    python -m tests.kernel_costs [--size 1e7] [--rounds 31]

Times, in shuffled turns on the default OpenCL device, float32 kernels that all move the
bytes of a plain RMSProp step (read p, g, v; write p, v), one work-item per value, built
with netcl's build options: the floor (trivial arithmetic), then the update's arithmetic
(square root and division included), then with each of netcl's extreme-value policies in
turn, then all of them; and netcl's own `step()`. Prints medians and ratios to the floor.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Parameter
from netcl._kernels import _BUILD_OPTIONS
from netcl.bench import _time
from netcl.optim import RMSProp

ARITHMETIC = "float v = v0 * alpha + oma * (g * g);"
UPDATE = "float u = g / (__builtin_sqrtf(v) + eps);"
SATURATE = "v = (v < FLT_MAX) ? v : FLT_MAX;"
CLAMP = "u = (u > clip) ? clip : u; u = (u < -clip) ? -clip : u;"
FINITE = "const int f = (as_int(g) & 0x7f800000) != 0x7f800000;"
STORE = "V[i] = v; P[i] = p0 + (-lr) * u;"
STORE_FINITE = "V[i] = f ? v : v0; P[i] = f ? p0 + (-lr) * u : p0;"

BODIES = {
    "floor (p += g, v += g)": "P[i] = p0 + g; V[i] = v0 + g;",
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
    args = parser.parse_args(argv)
    size = int(args.size)
    queue = cl.CommandQueue(cl.create_some_context(interactive=False))
    rng = np.random.default_rng(0)
    p, g, v = (cl_array.to_device(queue, rng.random(size, dtype=np.float32)) for _ in range(3))
    buffers = [cast(cl.Buffer, x.base_data) for x in (p, g, v)]
    scalars = [np.float32(x) for x in (1e-3, 0.99, 0.01, 1e-8, 10.0)]
    local = 256
    global_size = -(-size // local) * local

    def kernel(body: str) -> Callable[[], None]:
        source = f"""#pragma OPENCL FP_CONTRACT OFF
        __kernel void k(__global float *P, __global const float *G, __global float *V, long n,
                        float lr, float alpha, float oma, float eps, float clip)
        {{
            const long i = get_global_id(0);
            if (i < n) {{ const float g = G[i]; const float p0 = P[i]; const float v0 = V[i]; {body} }}
        }}"""
        built = cl.Program(queue.context, source).build(options=list(_BUILD_OPTIONS)).k

        def run() -> None:
            built(queue, (global_size,), (local,), *buffers, np.int64(size), *scalars)
            queue.finish()

        return run

    contenders = {name: kernel(body) for name, body in BODIES.items()}
    optimizer = RMSProp([Parameter(p, g)], lr=1e-3)

    def netcl_step() -> None:
        optimizer.step()
        queue.finish()

    contenders["netcl step()"] = netcl_step
    medians, _ = _time(contenders, 0.0, args.rounds, args.rounds)
    floor = medians["floor (p += g, v += g)"]
    print(f"{size:,} float32 values on {queue.device.name}, medians of {args.rounds} turns")
    print("| kernel | ms | / floor |\n| --- | ---: | ---: |")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.3g} | {ms / floor:.2f} |")


if __name__ == "__main__":
    main()
