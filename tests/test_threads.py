"""Optimizers and threads: independent optimizers run side by side; one optimizer is
stepped by one thread at a time."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Parameter
from netcl.optim import RMSProp


def _params(queue: cl.CommandQueue, seed: int) -> tuple[list[Parameter[Any]], list[list[Any]]]:
    rng = np.random.default_rng(seed)
    sizes = [17, 1000, 4099]
    params = [Parameter(cl_array.to_device(queue, rng.standard_normal(n).astype(np.float32))) for n in sizes]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(20)]
    return params, grads


def _train(queue: cl.CommandQueue, params: list[Parameter[Any]], grads: list[list[Any]]) -> None:
    opt = RMSProp(params, lr=1e-2, momentum=0.9)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = cl_array.to_device(queue, g)
        opt.step()
    queue.finish()


def test_two_optimizers_in_two_threads_equal_a_sequential_run(context: cl.Context) -> None:
    queues = [cl.CommandQueue(context) for _ in range(2)]
    sequential = [_params(q, seed) for seed, q in enumerate(queues)]
    for (params, grads), q in zip(sequential, queues, strict=True):
        _train(q, params, grads)
    parallel = [_params(q, seed) for seed, q in enumerate(queues)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            _train(queues[index], *parallel[index])
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for (a, _), (b, _) in zip(sequential, parallel, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.data.get().tobytes() == y.data.get().tobytes()


def test_one_optimizer_from_two_threads_is_serialized(queue: cl.CommandQueue) -> None:
    """Steps from two threads run one after the other: 2 x 50 steps count as 100."""
    rng = np.random.default_rng(3)
    host = rng.standard_normal(5000).astype(np.float32)
    grad = rng.standard_normal(5000).astype(np.float32)
    shared = Parameter(cl_array.to_device(queue, host), cl_array.to_device(queue, grad))
    opt = RMSProp([shared], lr=1e-3)
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        for _ in range(50):
            opt.step()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.finish()
    alone = Parameter(cl_array.to_device(queue, host), cl_array.to_device(queue, grad))
    reference = RMSProp([alone], lr=1e-3)
    for _ in range(100):
        reference.step()
    assert opt.state[id(shared)]["step"] == 100
    assert shared.data.get().tobytes() == alone.data.get().tobytes()
