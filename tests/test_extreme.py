"""Extreme gradients: the documented policy (see kernels/rmsprop.cl and the Reliability page).

- An element whose gradient is NaN or infinite keeps its parameter and state unchanged.
- v saturates at the dtype's largest finite value instead of becoming infinite, so a
  huge gradient no longer freezes its parameter forever: v decays again.
- Without centering, each step moves a parameter by at most lr / (sqrt(1 - alpha) * (1 - momentum)).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_strict
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

from netcl import Parameter
from netcl.optim import RMSProp

KINDS = ["pyopencl", "numpy", "array_api_strict"]
DTYPES = [np.float32, np.float64]


def make(kind: str, queue: cl.CommandQueue, host: Any) -> Any:
    if kind == "pyopencl":
        return cl_array.to_device(queue, host)
    if kind == "array_api_strict":
        return array_api_strict.asarray(np.array(host, copy=True))
    return np.array(host, copy=True)


def get(kind: str, x: Any) -> Any:
    return x.get() if kind == "pyopencl" else np.array(x, copy=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(
    "flags", [{}, {"momentum": 0.9, "weight_decay": 0.1}, {"centered": True}], ids=["plain", "momentum+wd", "centered"]
)
def test_non_finite_gradient_elements_change_nothing(
    kind: str, dtype: Any, flags: dict[str, Any], queue: cl.CommandQueue
) -> None:
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(40).astype(dtype)
    first = rng.standard_normal(40).astype(dtype)
    bad = rng.standard_normal(40).astype(dtype)
    bad[[3, 17, 29]] = [np.nan, np.inf, -np.inf]
    param = Parameter(make(kind, queue, p0))
    opt = RMSProp([param], lr=1e-2, **flags)
    param.grad = make(kind, queue, first)
    opt.step()
    before_p = get(kind, param.data)
    before_state = {k: get(kind, v) for k, v in opt.state[id(param)].items() if k != "step"}
    param.grad = make(kind, queue, bad)
    opt.step()
    after_p = get(kind, param.data)
    after_state = {k: get(kind, v) for k, v in opt.state[id(param)].items() if k != "step"}
    skipped = [3, 17, 29]
    assert after_p[skipped].tobytes() == before_p[skipped].tobytes()
    for name in before_state:
        assert after_state[name][skipped].tobytes() == before_state[name][skipped].tobytes(), name
    others = np.setdiff1d(np.arange(40), skipped)
    assert np.all(after_p[others] != before_p[others])
    assert np.isfinite(after_p).all() and all(np.isfinite(s).all() for s in after_state.values())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no-momentum", "momentum"])
def test_a_huge_gradient_saturates_v_and_the_parameter_recovers(
    kind: str, momentum: float, queue: cl.CommandQueue
) -> None:
    """torch: g = 1e30 makes v infinite and the parameter never moves again."""
    largest = float(np.finfo(np.float32).max)
    param = Parameter(make(kind, queue, np.zeros(4, np.float32)))
    opt = RMSProp([param], lr=1e-2, momentum=momentum)
    param.grad = make(kind, queue, np.full(4, 1e30, np.float32))
    opt.step()
    v = get(kind, opt.state[id(param)]["square_avg"])
    assert (v == largest).all()
    np.testing.assert_allclose(get(kind, param.data), -1e-2 * 10.0, rtol=1e-6)  # lr * clip
    # v decays by alpha per step: after ~9,000 steps of unit gradients it is O(1) again
    param.grad = make(kind, queue, np.ones(4, np.float32))
    for _ in range(9000 if kind != "array_api_strict" else 0):
        opt.step()
    if kind != "array_api_strict":
        assert get(kind, opt.state[id(param)]["square_avg"]).max() < 10
        start = get(kind, param.data)
        opt.step()
        assert (np.abs(get(kind, param.data) - start) > 1e-4).all(), "the parameter moves again"


def _adversarial(rng: np.random.Generator, n: int, dtype: Any) -> Any:
    """Heavy-tailed gradients: magnitudes from 1e-30 to 1e30, both signs, exact zeros."""
    exponent = rng.uniform(-30, 30, n)
    g = rng.choice([-1.0, 1.0], n) * 10.0**exponent * rng.standard_cauchy(n)
    g[rng.random(n) < 0.2] = 0.0
    with np.errstate(over="ignore"):
        out: Any = np.clip(g, -1e30, 1e30).astype(dtype)
    return out


@pytest.mark.parametrize(("kind", "steps"), [("numpy", 100_000), ("pyopencl", 10_000)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no-momentum", "momentum"])
def test_adversarial_run_has_no_nan_and_bounded_steps(
    kind: str, steps: int, dtype: Any, momentum: float, queue: cl.CommandQueue, long_run: bool
) -> None:
    # numpy's 100,000 steps take 35-50 s each (a quarter of the suite): 10,000 in CI, as
    # for pyopencl, and all of them with `pytest --long`
    steps = steps if long_run else min(steps, 10_000)
    lr, alpha = 1e-3, 0.99
    bound = lr / (math.sqrt(1 - alpha) * (1 - momentum))
    rng = np.random.default_rng(99)
    n = 64
    param = Parameter(make(kind, queue, rng.standard_normal(n).astype(dtype)))
    opt = RMSProp([param], lr=lr, alpha=alpha, momentum=momentum, weight_decay=1e-4)
    previous = get(kind, param.data)
    largest_step = 0.0
    batch = 1000
    for _ in range(steps // batch):
        grads = _adversarial(rng, batch * n, dtype).reshape(batch, n)
        device = make(kind, queue, grads)
        for k in range(batch):
            param.grad = device[k]
            opt.step()
            now = get(kind, param.data)
            largest_step = max(largest_step, float(np.abs(now - previous).max()))
            previous = now
        assert np.isfinite(get(kind, param.data)).all()
        for name, value in opt.state[id(param)].items():
            if name != "step":
                assert np.isfinite(get(kind, value)).all(), name
    # the bound, plus the rounding of one addition to the parameter
    assert largest_step <= bound * (1 + 1e-6) + float(np.spacing(np.abs(previous).max()))
