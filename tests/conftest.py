from __future__ import annotations

import numpy as np
import pyopencl as cl
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
