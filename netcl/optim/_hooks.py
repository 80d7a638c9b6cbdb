"""Hooks an optimizer calls around its step, `state_dict()` and `load_state_dict()`
(torch's `register_step_pre_hook` and the like), and those every optimizer calls around
its step (`netcl.optim.register_optimizer_step_pre_hook` and `..._post_hook`, as
torch's): kept in order, each removed by the handle its registration returned."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Generic, Self, TypeVar, cast

from netcl._backends import describe

__all__ = ["EVERY_POST_STEP", "EVERY_PRE_STEP", "HookHandle", "Hooks", "StepHooks", "WithStepHooks"]

HookT = TypeVar("HookT", bound=Callable[..., object])
LossT = TypeVar("LossT")

_keys = itertools.count()
"""Every hook's key, in the order of registration."""


class HookHandle:
    """What registering a hook returns (torch's `RemovableHandle`): `remove()` takes the
    hook away; used in a `with` statement, the hook is taken away at its end."""

    def __init__(self, hooks: dict[int, object], key: int) -> None:
        self._hooks = hooks
        self.id = key
        """The hook's key: hooks run in the order of their keys."""

    def remove(self) -> None:
        """Take the hook away (a second call does nothing)."""
        self._hooks.pop(self.id, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()


class Hooks(Generic[HookT]):
    """The hooks of one kind (`what`, for messages), called in the order registered."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.hooks: dict[int, HookT] = {}

    def add(self, hook: HookT, prepend: bool = False) -> HookHandle:
        """Register `hook`, to run after the others (before them with `prepend`); raise
        TypeError unless it is callable."""
        if not callable(hook):
            raise TypeError(f"{self.what} must be callable, got {type(hook).__module__}.{type(hook).__qualname__}")
        key = next(_keys)
        if prepend:  # (in place: the handles hold this dict)
            others = list(self.hooks.items())
            self.hooks.clear()
            self.hooks[key] = hook
            self.hooks.update(others)
        else:
            self.hooks[key] = hook
        return HookHandle(self.hooks, key)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[HookT]:
        return iter(list(self.hooks.values()))  # (a hook may remove itself, or others)


EVERY_PRE_STEP: Hooks[Callable[..., object]] = Hooks("an optimizer step pre-hook")
"""The step pre-hooks of every optimizer, which run before each one's own."""
EVERY_POST_STEP: Hooks[Callable[..., object]] = Hooks("an optimizer step post-hook")
"""The step post-hooks of every optimizer, which run after each one's own."""


class StepHooks:
    """The step pre- and post-hooks of one optimizer (or distributed optimizer), with
    those of every optimizer where `every` says so, in torch's order: every
    optimizer's pre-hooks before its own, its own post-hooks before every
    optimizer's."""

    def __init__(self, every: bool) -> None:
        self.pre: Hooks[Callable[..., object]] = Hooks("a step pre-hook")
        self.post: Hooks[Callable[..., object]] = Hooks("a step post-hook")
        self.every = every

    def __bool__(self) -> bool:
        """Whether there is a hook to run."""
        return bool(
            self.pre.hooks or self.post.hooks or (self.every and (EVERY_PRE_STEP.hooks or EVERY_POST_STEP.hooks))
        )

    def before(
        self, owner: object, closure: Callable[[], LossT] | None, averaged: bool = False
    ) -> tuple[tuple[object, ...], dict[str, object], Callable[[], LossT] | None]:
        """Run the pre-hooks of `owner`'s step; return the step's arguments as they left
        them (torch's: `step`'s own, `owner` first), and the closure those give. Where
        the gradients were `averaged` over MPI ranks already (by a distributed optimizer
        that steps `owner`), a closure there would compute new ones that are not: then
        raise TypeError if the hooks give one."""
        args: tuple[object, ...] = (owner,) if closure is None else (owner, closure)
        kwargs: dict[str, object] = {}
        every: Iterable[Callable[..., object]] = EVERY_PRE_STEP if self.every else ()
        for hook in (*every, *self.pre):
            result = hook(owner, args, kwargs)
            if result is None:
                continue
            if not (
                isinstance(result, tuple)
                and len(result) == 2
                and isinstance(result[0], tuple)
                and isinstance(result[1], dict)
            ):
                raise TypeError(
                    f"a step pre-hook returned {describe(result)}; it returns None, or a tuple (args, kwargs) "
                    "of the step's new arguments"
                )
            args, kwargs = result
        if not args or args[0] is not owner or len(args) > 2 or set(kwargs) - {"closure"} or (args[1:] and kwargs):
            raise TypeError(
                f"the step pre-hooks gave step() the arguments {args!r}, {kwargs!r}; it takes the optimizer "
                "and one more, the closure"
            )
        given = args[1] if len(args) > 1 else kwargs.get("closure")
        if given is not None and averaged:
            raise TypeError(
                "a step pre-hook gave the step a closure, which would compute gradients after they were averaged "
                "over the ranks; give the closure to the distributed optimizer's step() instead"
            )
        return args, kwargs, cast("Callable[[], LossT] | None", given)

    def after(self, owner: object, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        """Run the post-hooks of `owner`'s step, with the step's arguments."""
        every: Iterable[Callable[..., object]] = EVERY_POST_STEP if self.every else ()
        for hook in (*self.post, *every):
            hook(owner, args, kwargs)


class WithStepHooks:
    """The registration of step hooks, for the optimizers and the distributed ones."""

    _step_hooks: StepHooks

    def register_step_pre_hook(
        self,
        hook: Callable[
            [Self, tuple[object, ...], dict[str, object]], tuple[tuple[object, ...], dict[str, object]] | None
        ],
    ) -> HookHandle:
        """Call `hook(optimizer, args, kwargs)` before each `step()`, as torch does:
        `args` and `kwargs` are the step's arguments, the optimizer first (`(optimizer,)`
        and `{}` for `step()`, `(optimizer, closure)` for `step(closure)`); a hook that
        returns `(args, kwargs)` gives the step (and the next hooks) those instead.
        Hooks run in the order registered, outside the step's checks: one that raises
        stops the step before it changes anything. Under a distributed optimizer
        (`netcl.distributed`), each runs on every rank where the ranks agree: a
        distributed optimizer's own before the gradients are averaged, those of the
        optimizer it steps after (they see the mean gradients, as in one process); one
        that raises on one rank makes every rank raise, with no parameter changed (the
        gradients averaged, where that came first), and a closure given there after the
        averaging is refused.

        Returns:
            A handle whose `remove()` takes the hook away.

        Raises:
            TypeError: `hook` is not callable (at once), or returned something other
                than None or `(args, kwargs)` of one closure (at the step).
        """
        return self._step_hooks.pre.add(hook)

    def register_step_post_hook(
        self, hook: Callable[[Self, tuple[object, ...], dict[str, object]], None]
    ) -> HookHandle:
        """Call `hook(optimizer, args, kwargs)` after each `step()` that succeeded, with
        the step's arguments (as the pre-hooks left them), as torch does; hooks run in
        the order registered (a distributed optimizer's after those of the optimizer it
        steps, once every rank has stepped).

        Returns:
            A handle whose `remove()` takes the hook away.

        Raises:
            TypeError: `hook` is not callable.
        """
        return self._step_hooks.post.add(hook)
