"""Write tokens: numbers that change at every noted write, so that a step can tell in
one comparison that nothing it checked at its last step was replaced since.

Each token is a new number from one counter at each write, so a token recorded before
a write never equals one read after it.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count
from typing import Any, TypeVar, cast

__all__ = ["PARAMETER_WRITE", "STATE_WRITE", "NotedList", "note_parameter_write", "note_state_write"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_TOKENS = count(1)

STATE_WRITE = [0]
"""The token of the last change to any optimizer's `ParameterState` or to a state dict
that netcl made (`_StateEntry`): a state dict, or a state buffer in one, replaced, added
or removed (netcl's own writes of `step` are not changes: see `_Plan.quiet`)."""

PARAMETER_WRITE = [0]
"""The token of the last assignment to a `netcl.Parameter`'s `data` or `grad`, or of the
last change to a param group's list of parameters (`NotedList`)."""


def note_state_write() -> None:
    STATE_WRITE[0] = next(_TOKENS)


def note_parameter_write() -> None:
    PARAMETER_WRITE[0] = next(_TOKENS)


def _noting(method: F) -> F:
    def noted(self: list[Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:  # (a failed call may have changed the list: pop from an empty one, no)
            note_parameter_write()

    noted.__name__ = noted.__qualname__ = method.__name__
    noted.__doc__ = method.__doc__
    return cast(F, noted)


class NotedList(list[T]):
    """A list that notes each change to it as a parameter write (`PARAMETER_WRITE`):
    a param group's `params`, so that a step can tell in one comparison that the group
    holds the parameters it held at the last step."""

    __slots__ = ()

    # every method of list that changes it in place
    __setitem__ = _noting(list.__setitem__)
    __delitem__ = _noting(list.__delitem__)
    __iadd__ = _noting(list.__iadd__)
    __imul__ = _noting(list.__imul__)
    append = _noting(list.append)
    extend = _noting(list.extend)
    insert = _noting(list.insert)
    pop = _noting(list.pop)
    remove = _noting(list.remove)
    clear = _noting(list.clear)
    sort = _noting(list.sort)
    reverse = _noting(list.reverse)
