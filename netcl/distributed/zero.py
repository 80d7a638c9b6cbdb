"""`ZeroRedundancyOptimizer`: optimizer state sharded over the ranks (ZeRO stage 1).

Each rank owns a share of the parameters, keeps the state of those only, and steps
them; then every rank gathers every updated parameter from its owner. torch's
`torch.distributed.optim.ZeroRedundancyOptimizer`, on MPI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar, overload

import numpy as np

from netcl._backends import backend_for, note_written
from netcl._types import ParameterLike
from netcl.distributed._comm import MPI, agree, communicator, host_views
from netcl.distributed.data_parallel import _check_root
from netcl.optim._hooks import StepHooks, WithStepHooks
from netcl.optim.optimizer import Optimizer, loss_of

__all__ = ["ZeroRedundancyOptimizer"]

OptimizerT = TypeVar("OptimizerT", bound="Optimizer[Any, Any, Any, Any]")
LossT = TypeVar("LossT")


def _size(param: ParameterLike) -> int:
    return int(np.prod([int(n) for n in param.data.shape], dtype=np.int64))


class ZeroRedundancyOptimizer(WithStepHooks, Generic[OptimizerT]):
    """An optimizer whose state is split over the ranks of `comm`: each rank keeps and
    updates the state of its own share of the parameters, about 1/N of the whole.

    Every rank holds every parameter (ZeRO stage 1 shards the state, not the
    parameters). `step()` updates this rank's parameters with a local
    `optimizer_class`, then every rank gathers the others' updated parameters (one
    all-gather of their bytes). Parameters are shared out as torch does: largest first,
    each to the rank that holds the fewest values so far.

    It steps on the gradients as they are; to average them over the ranks first (data
    parallelism), wrap it: `DistributedOptimizer(ZeroRedundancyOptimizer(...))`.

    ```python
    import numpy as np

    from netcl import Parameter
    from netcl.distributed import DistributedOptimizer, ZeroRedundancyOptimizer
    from netcl.optim import Adam

    params = [Parameter(np.ones((100, 10), np.float32)), Parameter(np.zeros(10, np.float32))]
    sharded = ZeroRedundancyOptimizer(params, Adam, lr=1e-3)
    optimizer = DistributedOptimizer(sharded)  # averages the gradients, then steps the shards
    for param in params:
        param.grad = np.full(param.data.shape, 0.1, np.float32)
    optimizer.step()
    sharded.consolidate_state_dict(to=0)  # on every rank
    if sharded.comm.Get_rank() == 0:
        whole = sharded.state_dict()  # Adam(params).load_state_dict(whole) takes it
    ```

    Args:
        params: The parameters, or param-group dicts, as for `optimizer_class`.
        optimizer_class: A netcl optimizer class (`RMSProp`, `SGD`, `Adam`, `AdamW`).
        comm: The ranks; `MPI.COMM_WORLD` by default.
        **defaults: `optimizer_class`'s keyword arguments (`lr`, ...).

    Raises:
        TypeError, ValueError: As `optimizer_class(params, **defaults)` would, or
            `optimizer_class` is not a netcl optimizer class.
    """

    def __init__(
        self,
        params: Iterable[ParameterLike | Mapping[str, Any]],
        optimizer_class: type[OptimizerT],
        comm: MPI.Comm | None = None,
        **defaults: Any,
    ) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(
                f"optimizer_class must be a netcl optimizer class (RMSProp, SGD, Adam, AdamW), got {optimizer_class!r}"
            )
        self.comm: MPI.Comm = communicator(comm)
        """The ranks the state is shared out over."""
        # The whole optimizer, never stepped: the param groups the user sees and edits,
        # and the checks of full state dicts. It keeps no state.
        self._whole: OptimizerT = optimizer_class(params, **defaults)
        self.param_groups: list[Any] = self._whole.param_groups
        """Every parameter in its group, with the hyperparameters; edits (a learning-rate
        schedule) reach the local optimizer at the next step."""
        size, rank = self.comm.Get_size(), self.comm.Get_rank()
        held = [0] * size
        self.owners: list[int] = []
        """The rank that owns each parameter, counted across groups in order."""
        local_groups: list[dict[str, Any]] = []
        self._local: list[int] = []  # the global index of each local parameter, in order
        start = 0
        for group in self.param_groups:
            params_ = group["params"]
            owners = [0] * len(params_)
            for k in sorted(range(len(params_)), key=lambda k: (-_size(params_[k]), k)):
                owner = min(range(size), key=lambda r: (held[r], r))
                owners[k] = owner
                held[owner] += max(_size(params_[k]), 1)
            self.owners.extend(owners)
            mine = [k for k in range(len(params_)) if owners[k] == rank]
            self._local.extend(start + k for k in mine)
            local_groups.append({**self._hyper(group), "params": [params_[k] for k in mine]})
            start += len(params_)
        self.optim: OptimizerT = optimizer_class(local_groups, **defaults)
        """The local optimizer: this rank's parameters and their state."""
        self._consolidated: dict[str, Any] | None = None
        self._received = np.empty(0, np.uint8)
        self._step_hooks = StepHooks(every=False)

    def _hyper(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {name: group[name] for name in self._whole.hyperparameters}

    @property
    def state(self) -> dict[int, Any]:
        """The state of this rank's parameters (keyed on `id(parameter)`)."""
        state: dict[int, Any] = self.optim.state
        return state

    def _sync(self) -> None:
        """Give the local optimizer the hyperparameters of `param_groups` (its own
        checks then see any edit)."""
        for index, (group, local) in enumerate(zip(self.param_groups, self.optim.param_groups, strict=True)):
            for name in self._whole.hyperparameters:
                if name not in group:
                    raise ValueError(
                        f"param_groups[{index}]: {name} is missing; every param group needs every hyperparameter"
                    )
                local[name] = group[name]

    def _check_step(self) -> None:
        """Raise as `step()` would here, and change nothing but the local optimizer's
        copy of the hyperparameters (without running any hook)."""
        self._sync()
        self.optim._check_step()

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], LossT]) -> LossT: ...

    def step(self, closure: Callable[[], LossT] | None = None) -> LossT | None:
        """Step this rank's parameters, then gather every rank's updated parameters.

        The ranks agree first: if the step is invalid on one rank, every rank raises
        and nothing changes anywhere.

        Args:
            closure: Called first on every rank; its result is returned.

        Raises:
            TypeError, ValueError: The step is invalid on this rank or another (named),
                or the ranks' parameters or hyperparameters differ.
        """
        return self._step(closure)

    def _step(self, closure: Callable[[], LossT] | None, averaged: bool = False) -> LossT | None:
        """`step()`; `averaged`: under a `DistributedOptimizer`, which averaged the
        gradients already (see `StepHooks.before`)."""
        loss: LossT | None = None
        step_and_post: tuple[Callable[[], object], Callable[[], None]] | None = None
        args: tuple[object, ...] = ()
        kwargs: dict[str, object] = {}
        datas = [param.data for group in self.param_groups for param in group["params"]]

        def check() -> object:
            nonlocal loss, step_and_post, args, kwargs
            # (the step pre-hooks, this one's and the local optimizer's, run here, on
            # every rank, before the ranks agree: one that raises on one rank stops all)
            args, kwargs, given = self._step_hooks.before(self, closure, averaged)
            loss = loss_of(given)
            self._sync()
            step_and_post = self.optim._prepared_step(averaged)
            return [
                (
                    sorted((k, repr(v)) for k, v in self._hyper(group).items()),
                    [tuple(p.data.shape) for p in group["params"]],
                )
                for group in self.param_groups
            ], [str(backend_for(data, "data").dtype(data)) for data in datas]

        agree(self.comm, "step()", check, changed="nothing but averaging the gradients" if averaged else "nothing")
        self._consolidated = None
        assert step_and_post is not None  # (set by the check every rank passed)
        step, post = step_and_post
        step()
        self._gather(datas)
        post()  # (after the gather, which every rank must reach)
        self._step_hooks.after(self, args, kwargs)
        return loss

    def _gather(self, datas: list[Any]) -> None:
        """Every parameter from its owner: one all-gather of every rank's bytes."""
        size, rank = self.comm.Get_size(), self.comm.Get_rank()
        if size == 1:
            return
        with host_views(datas, write=True) as seen:
            raw = [view.view(np.uint8) for view in seen.arrays]
            counts = [0] * size
            for owner, view in zip(self.owners, raw, strict=True):
                counts[owner] += view.size
            displacements = [sum(counts[:r]) for r in range(size)]
            mine = [view for owner, view in zip(self.owners, raw, strict=True) if owner == rank]
            send = np.concatenate(mine) if mine else np.empty(0, np.uint8)
            if self._received.size < sum(counts):
                self._received = np.empty(sum(counts), np.uint8)
            received = self._received
            self.comm.Allgatherv([send, MPI.BYTE], [received, (counts, displacements), MPI.BYTE])
            at = list(displacements)
            for owner, view in zip(self.owners, raw, strict=True):
                if owner != rank:
                    view[...] = received[at[owner] : at[owner] + view.size]
                at[owner] += view.size
        note_written(param for group in self.param_groups for param in group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradient of every parameter (this rank's and the others')."""
        self._whole.zero_grad(set_to_none)

    # --- checkpoints -----------------------------------------------------------------

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the whole state on rank `to`, where `state_dict()` then returns it.
        Call it on every rank.

        Raises:
            TypeError, ValueError: `to` is not a rank of `comm`, or a rank's state
                cannot be saved (an invalid hyperparameter edit); on every rank.
        """
        local: dict[str, Any] = {}

        def save() -> int:
            nonlocal local
            target = _check_root(to, self.comm)
            self._sync()
            local = dict(self.optim.state_dict())
            return target

        agree(self.comm, "consolidate_state_dict()", save)
        gathered: list[tuple[list[int], dict[str, Any]]] | None = self.comm.gather((self._local, local), root=int(to))
        self._consolidated = None
        if gathered is None:
            return
        state: dict[int, Any] = {}
        for indices, saved in gathered:
            for index, entry in saved["state"].items():
                state[indices[index]] = entry
        whole = self._whole.state_dict()
        self._consolidated = {"state": dict(sorted(state.items())), "param_groups": whole["param_groups"]}

    def state_dict(self) -> dict[str, Any]:
        """The whole state, in the layout of `optimizer_class`'s `state_dict()` (a
        single-process optimizer over the same parameters loads it). Only on the rank
        given to `consolidate_state_dict`, and only until the next step.

        Raises:
            RuntimeError: `consolidate_state_dict` was not called on every rank since
                the last step, or was for another rank.
        """
        if self._consolidated is None:
            raise RuntimeError(
                "the optimizer state has not been consolidated on this rank since the last step; call "
                "consolidate_state_dict(to=rank) on every rank first"
            )
        return self._consolidated

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Load a whole state dict (from `state_dict()`, or from a single-process
        optimizer over the same parameters): each rank keeps its own share. Every rank
        checks all of it first, so a bad state dict fails on every rank alike and
        changes nothing.

        Raises:
            TypeError, ValueError: As `optimizer_class.load_state_dict` would.
        """
        hypers, _, saved = self._whole._check_state_dict(state_dict)
        local_groups: list[dict[str, Any]] = []
        local_state: dict[int, Any] = {}
        position = {index: k for k, index in enumerate(self._local)}
        start = 0
        for group, hyper in zip(self.param_groups, hypers, strict=True):
            indices = [position[i] for i in range(start, start + len(group["params"])) if i in position]
            for local in indices:
                if self._local[local] in saved:
                    local_state[local] = saved[self._local[local]]
            local_groups.append({**hyper, "params": indices})
            start += len(group["params"])
        self.optim.load_state_dict({"state": local_state, "param_groups": local_groups})
        for group, hyper in zip(self.param_groups, hypers, strict=True):
            group.update(hyper)
        self._consolidated = None

    def __repr__(self) -> str:
        where = f"rank {self.comm.Get_rank()} of {self.comm.Get_size()}"
        return f"ZeroRedundancyOptimizer({type(self.optim).__name__}, {where})"
