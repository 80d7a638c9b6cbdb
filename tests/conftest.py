from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

from netcl.device import create_queue


@pytest.fixture(scope="session")
def context() -> cl.Context:
    return create_queue().context


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="run the long adversarial and fuzz runs (20,000 steps per combination, 2,000 fuzz examples)",
    )


def pytest_configure(config: pytest.Config) -> None:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
    settings.register_profile("long", max_examples=2000, deadline=None)
    settings.load_profile("long" if config.getoption("--long") else "ci")


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """Whether `--long` was given."""
    return bool(request.config.getoption("--long"))
