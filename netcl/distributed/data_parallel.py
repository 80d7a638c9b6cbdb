"""Data-parallel training: gradients averaged over the ranks, then one ordinary step.

`DistributedOptimizer` wraps any netcl optimizer (or a `ZeroRedundancyOptimizer`);
`broadcast_parameters` and `broadcast_optimizer_state` give every rank root's starting
point. Horovod's and torch's shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import numpy as np
import numpy.typing as npt

from netcl._backends import checked_backend, describe, note_written
from netcl._types import ParameterLike
from netcl.distributed._comm import (
    DEFAULT_BUCKET_BYTES,
    MPI,
    PACK_BELOW,
    agree,
    allreduce_mean,
    communicator,
    host_views,
    in_buckets,
)
from netcl.optim._hooks import StepHooks, WithStepHooks
from netcl.optim.optimizer import Optimizer, loss_of

if TYPE_CHECKING:
    from netcl.distributed.zero import ZeroRedundancyOptimizer

__all__ = ["DistributedOptimizer", "broadcast_optimizer_state", "broadcast_parameters"]

OptimizerT = TypeVar("OptimizerT", bound="Optimizer[Any, Any, Any, Any] | ZeroRedundancyOptimizer[Any]")
LossT = TypeVar("LossT")


def _check_bucket_bytes(bucket_bytes: object) -> int:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int | np.integer):
        raise TypeError(f"bucket_bytes must be an int, got {describe(bucket_bytes)}")
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    return int(bucket_bytes)


def _check_root(root: object, comm: MPI.Comm) -> int:
    if isinstance(root, bool) or not isinstance(root, int | np.integer):
        raise TypeError(f"root must be an int, got {describe(root)}")
    if not 0 <= root < comm.Get_size():
        raise ValueError(f"root must be a rank of comm, 0 to {comm.Get_size() - 1}, got {root}")
    return int(root)


def describe_groups(param_groups: Sequence[MutableMapping[str, Any]]) -> list[object]:
    """What every rank must agree on before gradients are averaged: each group's
    hyperparameters, and the shape and dtype of every gradient (None where a parameter
    has none)."""
    described: list[object] = []
    for group in param_groups:
        hyper = sorted((name, repr(value)) for name, value in group.items() if name != "params")
        grads: list[tuple[tuple[int, ...], str] | None] = []
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                grads.append(None)
            else:
                dtype = grad.dtype  # numpy's, or torch's (one kind of array on every rank)
                grads.append((tuple(grad.shape), dtype.char if isinstance(dtype, np.dtype) else str(dtype)))
        described.append((hyper, grads))
    return described


class DistributedOptimizer(WithStepHooks, Generic[OptimizerT]):
    """Data-parallel training: `step()` averages every gradient over the ranks of
    `comm`, then steps `optimizer` with the mean.

    Every rank runs the same model on its own share of the batch and computes its own
    gradients; after `step()` each rank holds the parameters one process would hold
    after a step on the mean gradient, the very same bits on every rank.

    ```python
    import numpy as np
    from mpi4py import MPI

    from netcl import flat_parameters
    from netcl.distributed import DistributedOptimizer, broadcast_parameters
    from netcl.optim import Adam

    params = flat_parameters(None, [(64, 10), (10,)])
    broadcast_parameters(params, root=0)  # every rank starts from rank 0's parameters
    optimizer = DistributedOptimizer(Adam(params, lr=1e-3), MPI.COMM_WORLD)
    for step in range(3):
        for param in params:  # your backward pass, on this rank's share of the batch
            param.grad[...] = 0.1 * (MPI.COMM_WORLD.Get_rank() + 1)
        optimizer.step()  # every rank steps with the mean gradient
    ```

    Gradients are averaged in buckets: each run of gradients that follow each other in
    one buffer (see [`flat_parameters`][netcl.flat_parameters]) goes as one message
    from where it is, and runs of less than 256 KiB are packed together into messages
    of at most `bucket_bytes`. Every rank gets the same bits: with two ranks MPI's
    all-reduce sums one pair of values (the same in either order); with more, each
    block of a message is summed and divided on one rank (reduce-scatter) and gathered
    by every rank. OpenCL gradients are mapped to host memory for MPI (no copy on a
    CPU device).

    Before anything is sent, the ranks agree: every rank checks its step as `step()`
    would (parameters, gradients, hyperparameters, and the closure, which runs first)
    and describes what it is about to send (each group's hyperparameters, each
    gradient's shape and dtype). If one rank's check fails, every rank raises in the
    same `step()` (the failing rank its own error, the others the same kind naming
    that rank), and nothing changes on any rank; so too if the descriptions differ.

    Args:
        optimizer: The netcl optimizer (or `ZeroRedundancyOptimizer`) to step.
        comm: The ranks to average over; `MPI.COMM_WORLD` by default.
        bucket_bytes: The most bytes packed into one message.

    Raises:
        TypeError: `optimizer` is not a netcl optimizer, or `comm` not an mpi4py
            intracommunicator.
        ValueError: `bucket_bytes` is < 1.
    """

    def __init__(
        self, optimizer: OptimizerT, comm: MPI.Comm | None = None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> None:
        from netcl.distributed.zero import ZeroRedundancyOptimizer

        if not isinstance(optimizer, Optimizer | ZeroRedundancyOptimizer):
            raise TypeError(
                f"optimizer must be a netcl optimizer (netcl.optim.RMSProp, SGD, Adam, AdamW) or a "
                f"ZeroRedundancyOptimizer, got {describe(optimizer)}"
            )
        self.optimizer: OptimizerT = optimizer
        """The wrapped optimizer."""
        self.comm: MPI.Comm = communicator(comm)
        """The ranks gradients are averaged over."""
        self.bucket_bytes: int = _check_bucket_bytes(bucket_bytes)
        self._buckets: dict[np.dtype[Any], npt.NDArray[Any]] = {}
        self._step_hooks = StepHooks(every=False)

    @property
    def param_groups(self) -> list[Any]:
        """The wrapped optimizer's param groups (a learning-rate schedule edits these)."""
        groups: list[Any] = self.optimizer.param_groups
        return groups

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], LossT]) -> LossT: ...

    def step(self, closure: Callable[[], LossT] | None = None) -> LossT | None:
        """Average every gradient over the ranks, in place, then step the optimizer.

        Args:
            closure: Called first on every rank, to recompute the loss and the
                gradients; its result is returned.

        Raises:
            TypeError, ValueError: The step is invalid on this rank (as the wrapped
                optimizer's `step()` says), or on another rank (named), or the ranks
                disagree on the hyperparameters or on which gradients they hold, of
                which shape and dtype. Nothing has changed on any rank (but where a
                step pre-hook of the wrapped optimizer raised, or gave a closure: they
                run on the mean gradients, so the gradients are the mean then).
            RuntimeError: The closure (or a step hook) raised something else on
                another rank.
        """
        loss: LossT | None = None
        args: tuple[object, ...] = ()
        kwargs: dict[str, object] = {}
        hooked = False
        with contextlib.ExitStack() as stack:
            runs: list[npt.NDArray[Any]] = []

            def check() -> object:
                nonlocal loss, runs, args, kwargs, hooked
                # (this one's step pre-hooks run here, on every rank, before the ranks
                # agree: one that raises on one rank stops every rank)
                args, kwargs, given = self._step_hooks.before(self, closure)
                loss = loss_of(given)
                self.optimizer._check_step()
                # (the wrapped optimizer's own hooks run on the mean gradients, below: the
                # ranks agree on whether there are any, so all or none agree again)
                hooked = isinstance(self.optimizer, Optimizer) and bool(self.optimizer._step_hooks)
                described = describe_groups(self.param_groups)
                if self.comm.Get_size() > 1:
                    grads = [param.grad for group in self.param_groups for param in group["params"]]
                    runs = stack.enter_context(host_views([g for g in grads if g is not None], write=True)).runs
                return described, hooked

            agree(self.comm, "step()", check)
            allreduce_mean(self.comm, runs, self.bucket_bytes, self._buckets)
        optimizer = self.optimizer
        if isinstance(optimizer, Optimizer):
            if hooked:
                self._hooked_step(optimizer)
            else:
                optimizer.step()  # (its checks passed)
        else:  # (a ZeroRedundancyOptimizer agrees again, around its hooks)
            optimizer._step(None, averaged=True)
        self._step_hooks.after(self, args, kwargs)
        return loss

    def _hooked_step(self, optimizer: Optimizer[Any, Any, Any, Any]) -> None:
        """Step `optimizer` on the mean gradients, its step pre-hooks first on every rank
        in an agreement of their own (one that raises on one rank makes every rank raise,
        the gradients then averaged and nothing else changed), its post-hooks after."""
        prepared: tuple[Callable[[], object], Callable[[], None]] | None = None

        def check() -> object:
            nonlocal prepared
            prepared = optimizer._prepared_step(averaged=True)
            return describe_groups(self.param_groups)  # (as the hooks left them)

        agree(self.comm, "step()", check, changed="nothing but averaging the gradients")
        assert prepared is not None  # (set by the check every rank passed)
        step, post = prepared
        step()
        post()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's `zero_grad`."""
        self.optimizer.zero_grad(set_to_none)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r}, ranks={self.comm.Get_size()})"


def broadcast_parameters(params: Iterable[ParameterLike], root: int = 0, comm: MPI.Comm | None = None) -> None:
    """Give every rank root's parameters: each parameter's `data` is overwritten, in
    place, with root's values.

    Call it on every rank of `comm` with the same parameters (the same shapes and
    dtypes, in order); the ranks agree on that first, and raise together if not.

    Args:
        params: The parameters (objects with a `data` array), e.g. `optimizer.param_groups[0]["params"]`.
        root: The rank whose parameters every rank takes.
        comm: The ranks; `MPI.COMM_WORLD` by default.

    Raises:
        TypeError: A parameter is not parameter-like or holds an array netcl cannot
            optimize, or `root` is not an int.
        ValueError: `root` is not a rank of `comm`, or the ranks' parameters differ in
            number, shape or dtype. Nothing has changed on any rank.
    """
    comm = communicator(comm)
    params = list(params)
    with contextlib.ExitStack() as stack:
        runs: list[npt.NDArray[Any]] = []

        def check() -> object:
            nonlocal runs
            source = _check_root(root, comm)
            datas = []
            for k, param in enumerate(params):
                if not hasattr(param, "data"):
                    raise TypeError(f"params[{k}] is a {describe(param)}, not a parameter (no `data` attribute)")
                checked_backend(param.data, f"params[{k}].data")
                datas.append(param.data)
            seen = stack.enter_context(host_views(datas, write=comm.Get_rank() != source))
            runs = seen.runs
            shapes = [tuple(int(n) for n in data.shape) for data in datas]
            return [(shape, str(view.dtype)) for shape, view in zip(shapes, seen.arrays, strict=True)], source

        agree(comm, "broadcast_parameters()", check)
        broadcast(comm, runs, int(root), DEFAULT_BUCKET_BYTES)
    if comm.Get_size() > 1 and comm.Get_rank() != int(root):
        note_written(params)


def broadcast(comm: MPI.Comm, runs: Sequence[npt.NDArray[Any]], root: int, bucket_bytes: int) -> None:
    """Overwrite every rank's `runs` (flat host arrays) with root's: those of
    `PACK_BELOW` bytes or more from where they are, the rest packed into messages of at
    most `bucket_bytes`."""
    if comm.Get_size() == 1:
        return
    runs = [run.view(np.uint8) for run in runs]
    large = min(PACK_BELOW, bucket_bytes)
    small = [run for run in runs if run.nbytes < large]
    bucket = np.empty(min(bucket_bytes, sum(run.size for run in small)), np.uint8)
    in_buckets(small, bucket, lambda part: comm.Bcast([part, MPI.BYTE], root), write_back=comm.Get_rank() != root)
    for run in runs:
        if run.nbytes >= large:
            comm.Bcast([run, MPI.BYTE], root)


def broadcast_optimizer_state(
    optimizer: Optimizer[Any, Any, Any, Any] | DistributedOptimizer[Any], root: int = 0, comm: MPI.Comm | None = None
) -> None:
    """Give every rank root's optimizer state and hyperparameters (its `state_dict()`).

    Call it on every rank of `comm`, with optimizers over the same parameters; each
    rank checks root's state dict as `load_state_dict` does before any rank loads it.

    Raises:
        TypeError: `optimizer` is not a netcl optimizer (a `ZeroRedundancyOptimizer`
            keeps a different shard on each rank: load a full state dict into it
            instead), or `root` is not an int.
        ValueError: `root` is not a rank of `comm`, or root's state does not fit the
            optimizer of some rank (named). Nothing has changed on any rank.
    """
    comm = communicator(comm)
    inner = optimizer.optimizer if isinstance(optimizer, DistributedOptimizer) else optimizer
    saved: object = None

    def save() -> object:
        nonlocal saved
        if not isinstance(inner, Optimizer):
            raise TypeError(
                f"optimizer must be a netcl optimizer or a DistributedOptimizer wrapping one, got {describe(inner)}"
            )
        source = _check_root(root, comm)
        if comm.Get_rank() == source:
            saved = inner.state_dict()
        return source

    agree(comm, "broadcast_optimizer_state()", save)
    saved = comm.bcast(saved, int(root))
    assert isinstance(inner, Optimizer) and isinstance(saved, dict)
    receiving = comm.Get_rank() != root

    def fits() -> None:
        if receiving:
            inner._check_state_dict(saved)

    agree(comm, "broadcast_optimizer_state()", fits)
    if receiving:
        inner.load_state_dict(saved)
