"""The reliability figures of the docs' Reliability page, measured afresh.

    python -m tests.figures

Prints Markdown tables: one step's error against a wider reference (netcl's three paths
and torch), the largest difference between netcl's paths, a heavy-tailed adversarial
run (NaN, infinities, step bound), and convergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_strict
import numpy as np
import pyopencl.array as cl_array
import torch

from netcl import Parameter
from netcl.device import create_queue
from netcl.optim import RMSProp
from tests.reference import wide
from tests.test_convergence import CASES as CONVERGENCE
from tests.test_extreme import _adversarial

F = Any
QUEUE = create_queue()
BACKENDS: dict[str, tuple[Callable[[F], F], Callable[[F], F]]] = {
    "pyopencl": (lambda a: cl_array.to_device(QUEUE, a), lambda x: x.get()),
    "numpy": (lambda a: np.array(a, copy=True), lambda x: np.array(x, copy=True)),
    "array_api_strict": (lambda a: array_api_strict.asarray(np.array(a, copy=True)), lambda x: np.asarray(x).copy()),
}
VARIANTS: dict[str, dict[str, Any]] = {"plain": {}, "momentum": {"momentum": 0.9}, "centered": {"centered": True}}
LR, ALPHA, EPS = 1e-2, 0.99, 1e-8


def _inputs(dtype: Any, n: int = 100_000) -> dict[str, F]:
    rng = np.random.default_rng(21)
    v0 = (rng.standard_normal(n) ** 2 * 10.0 ** rng.uniform(-4, 2, n)).astype(dtype)
    return {
        "p": rng.standard_normal(n).astype(dtype),
        "g": (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 2, n)).astype(dtype),
        "v": v0,
        "m": (np.sqrt(v0) * rng.uniform(-0.9, 0.9, n)).astype(dtype),
        "b": rng.standard_normal(n).astype(dtype),
    }


def _wide_step(x: dict[str, F], flags: dict[str, Any]) -> tuple[F, F]:
    t = wide(x["p"].dtype)
    p, g, v, m, b = (x[k].astype(t) for k in "pgvmb")
    v = t(ALPHA) * v + (1 - t(ALPHA)) * g * g
    if flags.get("centered"):
        m = t(ALPHA) * m + (1 - t(ALPHA)) * g
        u = g / (np.sqrt(v - m * m) + t(EPS))
    else:
        u = g / (np.sqrt(v) + t(EPS))
    if flags.get("momentum"):
        u = t(flags["momentum"]) * b + u
    return p - t(LR) * u, v


def _netcl_step(backend: str, x: dict[str, F], flags: dict[str, Any]) -> tuple[F, F]:
    make, get = BACKENDS[backend]
    param = Parameter(make(x["p"]), make(x["g"]))
    opt = RMSProp([param], lr=LR, alpha=ALPHA, eps=EPS, **flags)
    entry = {"step": 1, "square_avg": x["v"], "momentum_buffer": x["b"], "grad_avg": x["m"]}
    opt.load_state_dict({"state": {0: entry}, "param_groups": [{**opt.defaults, **flags, "lr": LR, "params": [0]}]})
    opt.step()
    return get(param.data), get(opt.state[id(param)]["square_avg"])


def _torch_step(x: dict[str, F], flags: dict[str, Any]) -> tuple[F, F]:
    param = torch.tensor(x["p"], requires_grad=True)
    param.grad = torch.tensor(x["g"])
    opt = torch.optim.RMSprop([param], lr=LR, alpha=ALPHA, eps=EPS, **flags)
    opt.state[param] = {
        "step": torch.tensor(1.0),
        "square_avg": torch.tensor(x["v"]),
        "momentum_buffer": torch.tensor(x["b"]),
        "grad_avg": torch.tensor(x["m"]),
    }
    opt.step()
    return param.detach().numpy(), opt.state[param]["square_avg"].numpy()


def _ulps(got: tuple[F, F], exact: tuple[F, F], p0: F) -> tuple[float, float]:
    dtype = got[0].dtype
    v_ulp = np.abs(got[1] - exact[1]) / np.spacing(exact[1].astype(dtype))
    scale = np.maximum(np.abs(p0), np.abs(exact[0])).astype(dtype)
    p_ulp = np.abs(got[0] - exact[0]) / np.spacing(scale)
    return float(np.nanmax(v_ulp)), float(np.nanmax(p_ulp))


def ulp_table() -> str:
    lines = [
        "| dtype | variant | netcl pyopencl v / param | netcl numpy v / param "
        "| netcl array_api_strict v / param | torch v / param | paths differ |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype in (np.float32, np.float64):
        x = _inputs(dtype)
        for name, flags in VARIANTS.items():
            exact = _wide_step(x, flags)
            cells, results = [], []
            for backend in BACKENDS:
                got = _netcl_step(backend, x, flags)
                results.append(got)
                cells.append("{:.2f} / {:.2f}".format(*_ulps(got, exact, x["p"])))
            cells.append("{:.2f} / {:.2f}".format(*_ulps(_torch_step(x, flags), exact, x["p"])))
            differ = sum(int((a[0] != results[0][0]).sum() + (a[1] != results[0][1]).sum()) for a in results[1:])
            lines.append(f"| {np.dtype(dtype).name} | {name} | " + " | ".join(cells) + f" | {differ} values |")
    return "\n".join(lines)


def adversarial_table(steps: int = 20_000) -> str:
    lines = [
        "| dtype | momentum | run | NaN or inf in param/state | largest step / bound |",
        "| --- | --- | --- | --- | --- |",
    ]
    for dtype in (np.float32, np.float64):
        for momentum in (0.0, 0.9):
            bound = LR * 0.1 / (math.sqrt(1 - ALPHA) * (1 - momentum))
            for who in ("netcl numpy", "torch"):
                rng = np.random.default_rng(5)
                p0 = rng.standard_normal(64).astype(dtype)
                if who == "torch":
                    tp = torch.tensor(p0, requires_grad=True)
                    topt = torch.optim.RMSprop([tp], lr=LR * 0.1, alpha=ALPHA, momentum=momentum)
                else:
                    param = Parameter(p0.copy())
                    opt = RMSProp([param], lr=LR * 0.1, alpha=ALPHA, momentum=momentum)
                previous, largest, bad = p0.copy(), 0.0, 0
                for _ in range(steps // 1000):
                    grads = _adversarial(rng, 1000 * 64, dtype).reshape(1000, 64)
                    for g in grads:
                        if who == "torch":
                            tp.grad = torch.tensor(g)
                            topt.step()
                            now = tp.detach().numpy().copy()
                        else:
                            param.grad = g
                            opt.step()
                            now = param.data.copy()
                        with np.errstate(invalid="ignore"):
                            step = np.abs(now - previous)
                        largest = max(largest, float(np.nanmax(step)) if np.isfinite(step).any() else math.inf)
                        previous = now
                    state = topt.state[tp] if who == "torch" else opt.state[id(param)]
                    values = [np.asarray(v) for k, v in state.items() if k != "step"] + [previous]
                    bad = max(bad, sum(int((~np.isfinite(v)).sum()) for v in values))
                lines.append(
                    f"| {np.dtype(dtype).name} | {momentum} | {who}, {steps:,} steps | {bad} | {largest / bound:.3g} |"
                )
    return "\n".join(lines)


def convergence_table() -> str:
    lines = [
        "| function | dtype | momentum | netcl: distance to the optimum after 10,000 steps | torch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, gradient, start, optimum in CONVERGENCE:
        for dtype in (np.float32, np.float64):
            for momentum in (0.0, 0.9):
                param = Parameter(np.array(start, dtype))
                opt = RMSProp([param], lr=5e-3, momentum=momentum)
                twin = torch.tensor(np.array(start, dtype), requires_grad=True)
                topt = torch.optim.RMSprop([twin], lr=5e-3, momentum=momentum)
                for _ in range(10_000):
                    param.grad = gradient(param.data)
                    opt.step()
                    twin.grad = torch.tensor(gradient(twin.detach().numpy()))
                    topt.step()
                mine = float(np.abs(param.data - np.array(optimum)).max())
                theirs = float(np.abs(twin.detach().numpy() - np.array(optimum)).max())
                lines.append(f"| {name} | {np.dtype(dtype).name} | {momentum} | {mine:.2g} | {theirs:.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("## One step against a wider reference (ulp: v / param)\n")
    print(ulp_table())
    print("\n## Adversarial run\n")
    print(adversarial_table())
    print("\n## Convergence\n")
    print(convergence_table())
