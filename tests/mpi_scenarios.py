"""Scenarios that run on several MPI ranks: `mpiexec -n 2 python -m tests.mpi_scenarios NAME`.

Each rank asserts what it sees and prints `ok RANK` last; `tests/test_distributed.py`
launches every scenario and checks every rank's output. A failed assertion ends the run
with MPI's abort, so no rank waits on one that failed.

Equality with one process: with 2 ranks the mean of two float32 gradients is their sum
(the same bits in either order) halved (exact), so the parameters, the state and the
mean gradient must equal, bit for bit, one process's step on `(g0 + g1) / 2`.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import Any, cast

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pyopencl.array as cl_array
import torch
from mpi4py import MPI

from netcl import Parameter, flat_parameters
from netcl.device import create_queue
from netcl.distributed import (
    DistributedOptimizer,
    ZeroRedundancyOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from netcl.optim import SGD, Adam, AdamW, Optimizer, RMSProp, checkpoint
from tests.kinds import KINDS, Kind

F = npt.NDArray[Any]
COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
QUEUE = create_queue()
SHAPES = [(6, 5), (5,), (130,), (1,), (3, 4, 2)]
STEPS = 21

OPTIMIZERS: list[tuple[type[Optimizer[Any, Any, Any, Any]], dict[str, Any]]] = [
    (RMSProp, {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    (SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    (Adam, {"lr": 1e-2, "amsgrad": True}),
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
]


def gradients(step: int, rank: int) -> list[F]:
    rng = np.random.default_rng(1000 * step + rank)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def starts() -> list[F]:
    """Different on each rank: `broadcast_parameters` makes them rank 0's."""
    rng = np.random.default_rng(RANK + 17)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def get(x: Any) -> F:
    if isinstance(x, cl_array.Array):
        return x.get()
    if isinstance(x, torch.Tensor):
        return np.array(x.detach().numpy(), copy=True)
    if hasattr(x, "get"):
        host: F = x.get()
        return host
    return np.array(x, copy=True)


class Model:
    """Parameters of one kind, their gradients written in place or replaced."""

    def __init__(self, kind: str, values: Sequence[F]) -> None:
        self.kind = kind
        if kind in ("flat-pyopencl", "flat-numpy"):
            self.params: list[Any] = list(flat_parameters(QUEUE if kind == "flat-pyopencl" else None, SHAPES))
            for param, value in zip(self.params, values, strict=True):
                if kind == "flat-numpy":
                    param.data[...] = value
                else:
                    param.data.set(value)
        else:
            made = {k.name: k for k in KINDS}[kind]
            self.params = [Parameter(made.make(QUEUE, value)) for value in values]
        self.made: Kind | None = None if kind.startswith("flat") else {k.name: k for k in KINDS}[kind]
        self.grad_views = [param.grad for param in self.params]

    def set_grads(self, grads: Sequence[F | None]) -> None:
        for param, grad in zip(self.params, grads, strict=True):
            if grad is None:
                param.grad = None
            elif self.made is None:  # flat storage: written in place
                param.grad = self.grad_views[self.params.index(param)]
                if isinstance(param.grad, np.ndarray):
                    param.grad[...] = grad
                else:
                    param.grad.set(grad)
            else:
                param.grad = self.made.make(QUEUE, grad)

    def values(self) -> list[F]:
        return [get(param.data) for param in self.params]


def written_versions(model: Model) -> list[int]:
    """The autograd version counter of each torch parameter's tensor (none for others)."""
    return [param.data._version for param in model.params if isinstance(param.data, torch.Tensor)]


def written_since(model: Model, versions: list[int], what: str) -> None:
    """Assert that torch's autograd learnt of a write to every torch parameter since
    `versions` (this rank's step and the parameters other ranks sent alike)."""
    now = written_versions(model)
    assert all(n > v for n, v in zip(now, versions, strict=True)), f"{what}: versions {versions} -> {now}"


def same_on_every_rank(arrays: Sequence[F], what: str) -> None:
    gathered: list[list[bytes]] = COMM.allgather([a.tobytes() for a in arrays])
    assert all(g == gathered[0] for g in gathered), f"{what} differ between ranks"


def equal(a: Sequence[F], b: Sequence[F], what: str) -> None:
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{what}[{k}] differs: max |d| {np.max(np.abs(x - y))}"


def state_arrays(state_dict: Any) -> list[F]:
    return [
        np.asarray(value)
        for index in sorted(state_dict["state"])
        for name, value in sorted(state_dict["state"][index].items())
        if name != "step"
    ]


def mean(step: int) -> list[F]:
    g0, g1 = gradients(step, 0), gradients(step, 1)
    return [(a + b) / np.float32(2) for a, b in zip(g0, g1, strict=True)]


def without(grads: list[F], step: int) -> list[F | None]:
    """Parameter 3 has no gradient at every third step, on every rank."""
    out: list[F | None] = list(grads)
    if step % 3 == 2:
        out[3] = None
    return out


# --- scenarios -------------------------------------------------------------------------


def data_parallel() -> None:
    """DistributedOptimizer on every optimizer and kind, two bucket sizes: the very
    bits of one process stepping on the mean gradient, on every rank."""
    kinds = ["pyopencl", "pyopencl-offset", "buffer-object", "numpy", "torch", "array_api_strict"]
    kinds += ["flat-pyopencl", "flat-numpy"]
    for cls, hyper in OPTIMIZERS:
        for kind in kinds:
            for bucket_bytes in (2**20, 64):
                model = Model(kind, starts())
                broadcast_parameters(model.params, root=0)
                first = model.values()
                same_on_every_rank(first, f"{kind}: parameters after broadcast_parameters")
                reference = Model("numpy", first)
                optimizer = DistributedOptimizer(cls(model.params, **hyper), bucket_bytes=bucket_bytes)
                single = cls(reference.params, **hyper)
                for step in range(STEPS):
                    model.set_grads(without(gradients(step, RANK), step))
                    optimizer.step()
                    reference.set_grads(without(mean(step), step))
                    single.step()
                    if kind.startswith("flat"):
                        # flat storage: write zeros into the gradient buffer rather than drop it
                        optimizer.zero_grad(set_to_none=False)
                where = f"{cls.__name__} {kind} bucket_bytes={bucket_bytes}"
                equal(model.values(), reference.values(), f"{where}: parameters")
                same_on_every_rank(model.values(), f"{where}: parameters")
                equal(
                    state_arrays(optimizer.optimizer.state_dict()), state_arrays(single.state_dict()), f"{where}: state"
                )


def data_parallel_in_place() -> None:
    """DistributedOptimizer over flat storage whose gradients are only written in place
    (no assignment between steps): once settled its steps are quiet (the agreement's
    check writes nothing), with the bits of one process on the mean."""
    for cls, hyper in OPTIMIZERS:
        model = Model("flat-pyopencl", starts())
        reference = Model("flat-numpy", model.values())  # (an assignment to any parameter is a write)
        optimizer = DistributedOptimizer(cls(model.params, **hyper))
        single = cls(reference.params, **hyper)
        quiet = []
        for step in range(6):
            for view, grad in zip(model.grad_views, gradients(step, RANK), strict=True):
                view.set(grad)
            optimizer.step()
            plan = optimizer.optimizer._kept[0].plan
            quiet.append(plan is not None and plan.quiet)
            for view, grad in zip(reference.grad_views, mean(step), strict=True):
                view[...] = grad
            single.step()
        where = f"{cls.__name__} in place"
        # (the first steps make and settle the state, of both optimizers: writes too)
        assert quiet[3:] == [True, True, True], f"{where}: quiet steps {quiet}"
        equal(model.values(), reference.values(), f"{where}: parameters")
        equal(state_arrays(optimizer.optimizer.state_dict()), state_arrays(single.state_dict()), f"{where}: state")


def zero() -> None:
    """ZeroRedundancyOptimizer (under DistributedOptimizer): equal to one process, state
    sharded (each rank keeps only its share), consolidated on rank 0 into a state dict a
    single-process optimizer loads, and a whole state dict loaded back into the shards."""
    for cls, hyper in OPTIMIZERS:
        for kind in ("pyopencl", "numpy", "torch", "flat-pyopencl"):
            model = Model(kind, starts())
            versions = written_versions(model)
            broadcast_parameters(model.params)
            if RANK != 0:
                written_since(model, versions, f"broadcast_parameters {kind}")
            reference = Model("numpy", model.values())
            sharded = ZeroRedundancyOptimizer(model.params, cls, **hyper)
            optimizer = DistributedOptimizer(sharded)
            single = cls(reference.params, **hyper)
            for step in range(STEPS):
                model.set_grads(gradients(step, RANK))
                versions = written_versions(model)
                optimizer.step()
                written_since(model, versions, f"ZeRO {cls.__name__} {kind} step {step}")
                reference.set_grads(mean(step))
                single.step()
            where = f"ZeRO {cls.__name__} {kind}"
            equal(model.values(), reference.values(), f"{where}: parameters")
            same_on_every_rank(model.values(), f"{where}: parameters")
            # sharded: this rank keeps state for its own parameters only
            mine = {id(p) for p, owner in zip(model.params, sharded.owners, strict=True) if owner == RANK}
            assert set(sharded.state) == mine, f"{where}: state kept for parameters of other ranks"
            kept = sum(
                get(buffer).nbytes for entry in sharded.state.values() for k, buffer in entry.items() if k != "step"
            )
            whole = sum(a.nbytes for a in state_arrays(single.state_dict()))
            kept_all: list[int] = COMM.allgather(kept)
            assert sum(kept_all) == whole and max(kept_all) < whole, f"{where}: state bytes {kept_all} of {whole}"
            try:
                sharded.state_dict()
            except RuntimeError:
                pass
            else:
                raise AssertionError(f"{where}: state_dict() before consolidate_state_dict() did not raise")
            sharded.consolidate_state_dict(to=0)
            if RANK == 0:
                full = sharded.state_dict()
                expected = single.state_dict()
                assert full["param_groups"] == expected["param_groups"], where
                assert sorted(full["state"]) == sorted(expected["state"]), where
                equal(state_arrays(full), state_arrays(expected), f"{where}: consolidated state")
                loaded = cls(Model("numpy", reference.values()).params, **hyper)
                loaded.load_state_dict(full)
            else:
                try:
                    sharded.state_dict()
                except RuntimeError:
                    pass
                else:
                    raise AssertionError(f"{where}: state_dict() on a rank that was not consolidated to")
            # a single process's whole state dict, loaded into fresh shards, resumes equal
            restart = Model(kind, reference.values())
            fresh = DistributedOptimizer(ZeroRedundancyOptimizer(restart.params, cls, **hyper))
            fresh.optimizer.load_state_dict(single.state_dict())
            for step in range(STEPS, STEPS + 5):
                restart.set_grads(gradients(step, RANK))
                fresh.step()
                reference.set_grads(mean(step))
                single.step()
            equal(restart.values(), reference.values(), f"{where}: resumed parameters")


def raises(call: Callable[[], object], kind: type[Exception], words: str) -> str:
    try:
        call()
    except kind as error:
        message = str(error)
        assert words in message, f"expected {words!r} in {message!r}"
        return message
    except Exception as error:
        raise AssertionError(f"expected {kind.__name__}, got {type(error).__name__}: {error}") from error
    raise AssertionError(f"expected {kind.__name__} ({words!r}), nothing raised")


def bad_input() -> None:
    """Bad input on one rank (arrays that share memory too): every rank raises in the same call and nothing changes
    anywhere; a good step afterwards works on every rank (nobody was left waiting)."""
    for kind in ("pyopencl", "numpy", "torch"):
        bad_input_of(kind)


def bad_input_of(kind: str) -> None:
    model = Model(kind, starts())
    broadcast_parameters(model.params)
    optimizer = DistributedOptimizer(Adam(model.params, lr=1e-2))
    model.set_grads(gradients(0, RANK))
    optimizer.step()
    state = [get(b) for p in model.params for b in (optimizer.optimizer.state[id(p)][n] for n in ("exp_avg",))]
    before = model.values()
    make = {k.name: k for k in KINDS}[kind].make

    def bad_shape() -> None:
        model.set_grads(gradients(1, RANK))
        if RANK == 1:
            model.params[2].grad = make(QUEUE, np.zeros(131, np.float32))

    def bad_dtype() -> None:
        model.set_grads(gradients(1, RANK))
        if RANK == 0:
            model.params[0].grad = make(QUEUE, np.zeros(SHAPES[0], np.float64))

    def no_grad_on_one_rank() -> None:
        model.set_grads(gradients(1, RANK))
        if RANK == 1:
            model.params[1].grad = None

    def other_lr() -> None:
        model.set_grads(gradients(1, RANK))
        optimizer.param_groups[0]["lr"] = 1e-2 if RANK == 0 else 2e-2

    def bad_lr() -> None:
        model.set_grads(gradients(1, RANK))
        optimizer.param_groups[0]["lr"] = -1.0 if RANK == 1 else 1e-2

    cases: list[tuple[Callable[[], None], type[Exception], str, str]] = [
        (bad_shape, ValueError, "shape", "rank 1"),
        (bad_dtype, TypeError, "dtype", "rank 0"),
        (no_grad_on_one_rank, ValueError, "do not agree", "rank 1 has"),
        (other_lr, ValueError, "do not agree", "rank 1 has"),
        (bad_lr, ValueError, "lr", "rank 1"),
    ]
    for setup, error, words, names in cases:
        setup()
        message = raises(optimizer.step, error, words)
        if not (names.startswith(f"rank {RANK}") and "agree" not in words):
            assert names in message, f"{setup.__name__}: {names!r} not in {message!r}"
        equal(model.values(), before, f"{kind} {setup.__name__}: parameters changed")
        state_now = [get(optimizer.optimizer.state[id(p)]["exp_avg"]) for p in model.params]
        equal(state_now, state, f"{kind} {setup.__name__}: state changed")
        optimizer.param_groups[0]["lr"] = 1e-2

    # arrays that share memory on one rank (a state buffer in another parameter's memory)
    model.set_grads(gradients(1, RANK))
    entry = optimizer.optimizer.state[id(model.params[1])]
    own = entry["exp_avg"]
    if RANK == 1:
        entry["exp_avg"] = model.params[2].data[0:5]
    message = raises(optimizer.step, ValueError, "shares memory" if RANK == 1 else "rank 1")
    entry["exp_avg"] = own
    equal(model.values(), before, f"{kind}: shared memory on one rank changed parameters")
    if RANK == 1:
        assert "param_groups[0]['params'][2].data" in message, message

    def closure_fails() -> float:
        if RANK == 0:
            raise KeyError("the loss")
        return 1.0

    model.set_grads(gradients(1, RANK))
    raises(lambda: optimizer.step(closure_fails), KeyError if RANK == 0 else RuntimeError, "loss")
    equal(model.values(), before, f"{kind}: a failed closure changed parameters")
    # every rank still answers: a good step goes through, the same everywhere
    model.set_grads(gradients(1, RANK))
    optimizer.step()
    same_on_every_rank(model.values(), f"{kind}: parameters after a good step")

    # broadcast_parameters with different shapes on the ranks
    shapes = [*SHAPES[:-1], (3, 4, 2) if RANK == 0 else (4, 3, 2)]
    other = [Parameter(np.zeros(shape, np.float32)) for shape in shapes]
    mine = [get(p.data) for p in other]
    raises(lambda: broadcast_parameters(other), ValueError, "do not agree")
    equal([get(p.data) for p in other], mine, "broadcast_parameters changed parameters")
    raises(lambda: broadcast_parameters(model.params, root=2), ValueError, "root")

    # ZeRO: a bad gradient of a parameter one rank owns
    sharded = ZeroRedundancyOptimizer(model.params, SGD, lr=0.1)
    model.set_grads(gradients(2, RANK))
    owned_by_1 = sharded.owners.index(1)
    if RANK == 1:
        model.params[owned_by_1].grad = make(QUEUE, np.zeros(7, np.float32))
    before = model.values()
    raises(sharded.step, ValueError, "rank 1" if RANK == 0 else "shape")
    equal(model.values(), before, f"{kind} ZeRO: parameters changed")


def step_hooks() -> None:
    """Step hooks run on every rank, and see what one process would: the wrapped
    optimizer's (and those of ZeRO and of ZeRO's optimizer of this rank's share, where
    DistributedOptimizer steps it) on the mean gradients, a distributed optimizer's own
    before the averaging. A pre-hook that raises on one rank makes every rank raise
    (nobody left waiting) with the parameters unchanged everywhere (the gradients are
    the mean then, where the averaging came first); a closure a pre-hook gives after the
    averaging is refused on every rank; the post-hooks run once the step is done."""
    for kind in ("numpy", "torch"):
        step_hooks_of(kind)


def step_hooks_of(kind: str) -> None:
    model = Model(kind, starts())
    broadcast_parameters(model.params)
    adam = Adam(model.params, lr=1e-2)
    optimizer = DistributedOptimizer(adam)
    seen: list[str] = []
    grads_seen: list[list[F]] = []
    fail = [False]

    def pre(opt: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        seen.append("pre")
        grads_seen.append([get(p.grad) for p in model.params])
        if fail[0] and RANK == 1:
            raise ValueError("a pre-hook of rank 1 refuses")

    def post(opt: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        seen.append("post")

    def mean(at: int) -> list[F]:
        """The mean of both ranks' gradients of step `at` (exact, with 2 ranks)."""
        return [(a + b) / np.float32(2) for a, b in zip(gradients(at, 0), gradients(at, 1), strict=True)]

    adam.register_step_pre_hook(pre)
    adam.register_step_post_hook(post)
    model.set_grads(gradients(0, RANK))
    optimizer.step()
    assert seen == ["pre", "post"], seen
    equal(grads_seen[-1], mean(0), f"{kind}: the gradients a pre-hook saw")  # (as one process's would be)
    same_on_every_rank(model.values(), f"{kind}: parameters after a hooked step")

    def refused(step: Callable[[], object], at: int, what: str, averaged: bool) -> None:
        """`step` with a pre-hook refusing on rank 1: every rank raises, the parameters
        do not change anywhere, and the gradients are the mean where `averaged`, else
        as they were."""
        before, grads = model.values(), gradients(at, RANK)
        model.set_grads(grads)
        fail[0] = True
        message = raises(step, ValueError, "refuses" if RANK == 1 else "rank 1")
        fail[0] = False
        if RANK == 0:
            assert ("but averaging the gradients" in message) == averaged, message
        equal(model.values(), before, f"{kind} {what}: a refusing pre-hook changed parameters")
        now = [get(p.grad) for p in model.params]
        equal(now, mean(at) if averaged else grads, f"{kind} {what}: the gradients after a refusing pre-hook")

    refused(optimizer.step, 1, "DistributedOptimizer", averaged=True)

    def give_closure(opt: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> Any:
        def closure() -> float:
            model.set_grads(gradients(2, RANK))
            return 0.0

        return (*args, closure), kwargs

    handle = adam.register_step_pre_hook(give_closure)
    before = model.values()
    model.set_grads(gradients(2, RANK))
    raises(optimizer.step, TypeError, "closure")
    handle.remove()
    equal(model.values(), before, f"{kind}: a pre-hook's closure after the averaging changed parameters")

    def other_lr(opt: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        opt.param_groups[0]["lr"] = 1e-2 * (RANK + 1)

    handle = adam.register_step_pre_hook(other_lr)  # (a learning rate of its own on each rank)
    model.set_grads(gradients(2, RANK))
    raises(optimizer.step, ValueError, "do not agree")
    handle.remove()
    adam.param_groups[0]["lr"] = 1e-2
    equal(model.values(), before, f"{kind}: a pre-hook's learning rates that differ changed parameters")

    sharded = ZeroRedundancyOptimizer(model.params, SGD, lr=0.1)
    sharded.optim.register_step_pre_hook(pre)
    refused(sharded.step, 3, "ZeRO", averaged=False)
    sharded.step()
    same_on_every_rank(model.values(), f"{kind} ZeRO: parameters after a hooked step")

    # ZeRO under DistributedOptimizer: its optimizer's pre-hooks see the mean gradients
    both = DistributedOptimizer(sharded)
    refused(both.step, 4, "ZeRO under DistributedOptimizer", averaged=True)
    seen.clear()
    model.set_grads(gradients(5, RANK))
    both.step()
    assert seen == ["pre"], seen
    equal(grads_seen[-1], mean(5), f"{kind} ZeRO under DistributedOptimizer: the gradients a pre-hook saw")
    same_on_every_rank(model.values(), f"{kind} ZeRO under DistributedOptimizer: parameters")

    # the distributed optimizers' own hooks: before and after those of what they step
    def named(name: str, refuses: bool = False) -> Callable[[Any, tuple[object, ...], dict[str, object]], None]:
        def hook(opt: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            assert args[0] is opt
            seen.append(name)
            if refuses and fail[0] and RANK == 1:
                raise ValueError(f"{name} of rank 1 refuses")

        return hook

    handles = [
        both.register_step_pre_hook(named("both pre", refuses=True)),
        both.register_step_post_hook(named("both post")),
        sharded.register_step_pre_hook(named("zero pre", refuses=True)),
        sharded.register_step_post_hook(named("zero post")),
    ]
    refused(both.step, 6, "DistributedOptimizer's own hook", averaged=False)
    seen.clear()
    both.step()
    assert seen == ["both pre", "zero pre", "pre", "zero post", "both post"], seen
    seen.clear()
    sharded.step()
    assert seen == ["zero pre", "pre", "zero post"], seen
    handles[0].remove()
    refused(both.step, 7, "ZeroRedundancyOptimizer's own hook", averaged=True)
    for handle in handles:
        handle.remove()
    same_on_every_rank(model.values(), f"{kind} distributed optimizers' hooks: parameters")


def checkpoints() -> None:
    """broadcast_optimizer_state gives rank 1 rank 0's state; a consolidated ZeRO state
    saved with netcl.optim.checkpoint on rank 0 loads on every rank and resumes."""
    model = Model("pyopencl", starts())
    optimizer = RMSProp(model.params, lr=1e-2, momentum=0.9, centered=True)
    steps = 3 if RANK == 0 else 1
    for step in range(steps):
        model.set_grads(gradients(step, RANK))
        optimizer.step()
    broadcast_parameters(model.params)
    broadcast_optimizer_state(optimizer)
    saved = optimizer.state_dict()
    same_on_every_rank(state_arrays(saved), "state after broadcast_optimizer_state")
    steps_seen: list[list[int]] = COMM.allgather([saved["state"][i]["step"] for i in sorted(saved["state"])])
    assert steps_seen[0] == steps_seen[1] == [3] * len(SHAPES), steps_seen

    sharded = ZeroRedundancyOptimizer(model.params, Adam, lr=1e-2)
    for step in range(4):
        model.set_grads(mean(step))
        sharded.step()
    sharded.consolidate_state_dict(to=0)
    with tempfile.TemporaryDirectory() as directory:
        path = COMM.bcast(f"{directory}/zero.ckpt" if RANK == 0 else None)
        if RANK == 0:
            checkpoint.save(sharded.state_dict(), path)
        COMM.Barrier()
        loaded = checkpoint.load(path)
        COMM.Barrier()
    restart = Model("numpy", model.values())
    resumed = ZeroRedundancyOptimizer(restart.params, Adam, lr=1e-2)
    resumed.load_state_dict(loaded)
    reference = Model("numpy", model.values())
    single = Adam(reference.params, lr=1e-2)
    single.load_state_dict(loaded)
    for step in range(4, 8):
        model.set_grads(mean(step))
        sharded.step()
        restart.set_grads(mean(step))
        resumed.step()
        reference.set_grads(mean(step))
        single.step()
    equal(restart.values(), model.values(), "resumed ZeRO parameters")
    equal(reference.values(), model.values(), "single-process parameters from the ZeRO checkpoint")


def mean_on_any_ranks() -> None:
    """On any number of ranks (the tests use 3, where MPI may sum in another order on
    each rank): after `DistributedOptimizer.step()` every gradient holds the mean, the
    same bits on every rank, within the rounding of a float32 sum of its terms: at most
    (ranks - 1) roundings of partial sums, each by at most eps/2 of the sum of
    magnitudes, then one of the division (half an ulp; a whole one allowed, for a result
    next to a power of two): |mean - exact| <= (ranks - 1) * eps/2 * mean(|g|) + ulp(mean)."""
    size = COMM.Get_size()
    for kind in ("pyopencl", "numpy", "torch", "flat-pyopencl", "flat-numpy"):
        for bucket_bytes in (2**20, 64):
            model = Model(kind, starts())
            optimizer = DistributedOptimizer(SGD(model.params, lr=0.0), bucket_bytes=bucket_bytes)
            model.set_grads(gradients(0, RANK))
            optimizer.step()
            means = [get(param.grad) for param in model.params]
            same_on_every_rank(means, f"{kind}: mean gradients")
            every = [gradients(0, rank) for rank in range(size)]
            for k, got in enumerate(means):
                terms = np.stack([g[k].astype(np.float64) for g in every])
                exact = terms.mean(axis=0)
                bound = (size - 1) * np.finfo(np.float32).eps / 2 * np.abs(terms).mean(axis=0) + np.spacing(
                    np.abs(exact).astype(np.float32)
                )
                assert np.all(np.abs(got - exact) <= bound), f"{kind}: mean gradient {k} off by more than {bound.max()}"


def half_precision() -> None:
    """float16 and bfloat16 gradients are averaged in float32 (MPI cannot sum them) and
    rounded: the bits of one process stepping on that mean, on every rank, with and
    without master weights, for separate and flat parameters."""
    for dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        for kind in ("pyopencl", "numpy", "torch", "flat-pyopencl"):
            for master_weights in (False, True):
                begin = [value.astype(dtype) for value in starts()]
                if kind == "flat-pyopencl":
                    params = list(flat_parameters(QUEUE, SHAPES, dtype))
                    for param, value in zip(params, begin, strict=True):
                        param.data.set(value)
                    made = None
                else:
                    made = {k.name: k for k in KINDS}[kind]
                    params = [Parameter(made.make(QUEUE, value)) for value in begin]
                broadcast_parameters(params, root=0)
                first = [made.get(p.data) if made else p.data.get() for p in params]
                reference = [Parameter(value.copy()) for value in first]
                optimizer = DistributedOptimizer(Adam(params, lr=1e-2, master_weights=master_weights), bucket_bytes=64)
                single = Adam(reference, lr=1e-2, master_weights=master_weights)
                for step in range(6):
                    mine = [g.astype(dtype) for g in gradients(step, RANK)]
                    for param, grad in zip(params, mine, strict=True):
                        if made is None:
                            cast(cl_array.Array, param.grad).set(grad)
                        else:
                            param.grad = made.make(QUEUE, grad)
                    optimizer.step()
                    both = [[g.astype(dtype).astype(np.float32) for g in gradients(step, r)] for r in (0, 1)]
                    for param, g0, g1 in zip(reference, *both, strict=True):
                        param.grad = ((g0 + g1) / np.float32(2)).astype(dtype)
                    single.step()
                got = [made.get(p.data) if made else p.data.get() for p in params]
                where = f"{dtype} {kind} master_weights={master_weights}"
                equal(got, [p.data for p in reference], f"{where}: parameters")
                same_on_every_rank(got, f"{where}: parameters")
                state = state_arrays(optimizer.optimizer.state_dict())
                equal(state, state_arrays(single.state_dict()), f"{where}: state")
        # sharded state: each rank steps its share in float32 (master weights) and the
        # updated half parameters are gathered, the bits of one process
        shared: list[Parameter[Any]] = [Parameter(value.astype(dtype)) for value in starts()]
        broadcast_parameters(shared, root=0)
        twins: list[Parameter[Any]] = [Parameter(np.array(p.data, copy=True)) for p in shared]
        zero = DistributedOptimizer(ZeroRedundancyOptimizer(shared, Adam, lr=1e-2, master_weights=True))
        single = Adam(twins, lr=1e-2, master_weights=True)
        for step in range(4):
            for held, grad in zip(shared, gradients(step, RANK), strict=True):
                held.grad = grad.astype(dtype)
            zero.step()
            both = [[g.astype(dtype).astype(np.float32) for g in gradients(step, r)] for r in (0, 1)]
            for twin, g0, g1 in zip(twins, *both, strict=True):
                twin.grad = ((g0 + g1) / np.float32(2)).astype(dtype)
            single.step()
        equal([np.asarray(p.data) for p in shared], [np.asarray(p.data) for p in twins], f"{dtype} ZeRO: parameters")


SCENARIOS: dict[str, Callable[[], None]] = {
    f.__name__: f
    for f in (
        data_parallel,
        data_parallel_in_place,
        zero,
        bad_input,
        step_hooks,
        checkpoints,
        mean_on_any_ranks,
        half_precision,
    )
}


def main(argv: list[str]) -> None:
    try:
        SCENARIOS[argv[0]]()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        COMM.Abort(1)
    COMM.Barrier()
    print(f"ok {RANK}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
