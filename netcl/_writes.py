"""Write tokens: numbers that change at every noted write, so that a step can tell in
one comparison that nothing it checked at its last step was replaced since.

Each token is a new number from one counter at each write, so a token recorded before
a write never equals one read after it.
"""

from __future__ import annotations

from itertools import count

__all__ = ["PARAMETER_WRITE", "STATE_WRITE", "note_parameter_write", "note_state_write"]

_TOKENS = count(1)

STATE_WRITE = [0]
"""The token of the last change to any optimizer's `ParameterState` or to a state dict
that netcl made (`_StateEntry`): a state dict, or a state buffer in one, replaced, added
or removed (netcl's own writes of `step` are not changes: see `_Plan.quiet`)."""

PARAMETER_WRITE = [0]
"""The token of the last assignment to a `netcl.Parameter`'s `data` or `grad`."""


def note_state_write() -> None:
    STATE_WRITE[0] = next(_TOKENS)


def note_parameter_write() -> None:
    PARAMETER_WRITE[0] = next(_TOKENS)
