from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest


@pytest.fixture(scope="session")
def context() -> cl.Context:
    return cl.create_some_context(interactive=False)


@pytest.fixture(scope="session")
def queue(context: cl.Context) -> cl.CommandQueue:
    return cl.CommandQueue(context)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


@pytest.fixture
def count_makes(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """A function that starts counting: from its call on, each pyopencl state buffer
    (`pyopencl.array.zeros`), kernel object and program build made is listed in the
    list it returns."""

    def start() -> list[str]:
        made: list[str] = []

        def counting(what: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def made_one(*args: Any, **kwargs: Any) -> Any:
                made.append(what)
                return original(*args, **kwargs)

            return made_one

        monkeypatch.setattr(cl_array, "zeros", counting("state buffer", cl_array.zeros))
        monkeypatch.setattr(cl, "Kernel", counting("kernel object", cl.Kernel))
        monkeypatch.setattr(cl.Program, "build", counting("build", cl.Program.build))
        return made

    return start
