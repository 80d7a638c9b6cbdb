"""RMSProp reaches the optimum of a parabola and of the Rosenbrock function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

from netcl import Parameter
from netcl.optim import RMSProp

F = npt.NDArray[Any]


def parabola(x: F) -> F:
    """The gradient of sum((x - 3)^2)."""
    return 2 * (x - 3)


def rosenbrock(x: F) -> F:
    """The gradient of (1 - a)^2 + 100 (b - a^2)^2 at x = (a, b)."""
    a, b = x
    return np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], dtype=x.dtype)


CASES: list[tuple[str, Callable[[F], F], list[float], list[float]]] = [
    ("parabola", parabola, [-2.0, 0.5, 8.0], [3.0, 3.0, 3.0]),
    ("rosenbrock", rosenbrock, [-1.5, 2.0], [1.0, 1.0]),
]


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no-momentum", "momentum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "gradient", "start", "optimum"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("kind", ["numpy", "pyopencl"])
def test_converges(
    kind: str,
    name: str,
    gradient: Callable[[F], F],
    start: list[float],
    optimum: list[float],
    dtype: Any,
    momentum: float,
    queue: cl.CommandQueue,
) -> None:
    x0 = np.array(start, dtype)
    param: Parameter[Any] = Parameter(x0.copy() if kind == "numpy" else cl_array.to_device(queue, x0))
    optimizer = RMSProp([param], lr=5e-3, momentum=momentum)
    for _ in range(10_000):
        x = param.data if kind == "numpy" else param.data.get()
        g = gradient(x)
        param.grad = g if kind == "numpy" else cl_array.to_device(queue, g)
        optimizer.step()
    final = param.data if kind == "numpy" else param.data.get()
    assert final.dtype == dtype
    np.testing.assert_allclose(final, optimum, atol=3e-2, rtol=0)
