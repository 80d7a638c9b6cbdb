"""Hooks an optimizer calls around its step, `state_dict()` and `load_state_dict()`
(torch's `register_step_pre_hook` and the like), and those every optimizer calls around
its step (`netcl.optim.register_optimizer_step_pre_hook` and `..._post_hook`, as
torch's): kept in order, each removed by the handle its registration returned."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, Self, TypeVar

__all__ = ["EVERY_POST_STEP", "EVERY_PRE_STEP", "HookHandle", "Hooks"]

HookT = TypeVar("HookT", bound=Callable[..., object])

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
