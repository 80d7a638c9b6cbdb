"""Optimizer checkpoints in a file format that cannot run code.

Loading a pickle runs whatever code the file holds, so a pickled state dict is only as
safe as its source. `save` writes a state dict (netcl's or torch's layout) as an `.npz`
archive: the arrays as arrays, everything else as JSON; `load` reads it back with
`allow_pickle=False`. A save is atomic: it writes a temporary file beside the target,
flushes it to disk and renames it over the target, so a crash mid-save leaves the last
good checkpoint in place.

```python
import tempfile
from pathlib import Path

import numpy as np

from netcl import Parameter
from netcl.optim import RMSProp, checkpoint

param = Parameter(np.ones(3, np.float32), np.full(3, 0.5, np.float32))
optimizer = RMSProp([param], lr=1e-2)
optimizer.step()
path = Path(tempfile.mkdtemp()) / "optimizer.npz"
checkpoint.save(optimizer.state_dict(), path)
optimizer.load_state_dict(checkpoint.load(path))
```
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FORMAT", "load", "save"]

FORMAT = "netcl-optimizer-state/1"
"""The format name and version written into every checkpoint."""

_META = "meta.json"

# numpy types savez's keyword arrays so that a ** mapping might land in allow_pickle.
_savez: Callable[..., None] = np.savez


def save(state_dict: Mapping[str, object], path: str | os.PathLike[str]) -> None:
    """Write `state_dict` to `path` atomically, as an `.npz` archive without pickles.

    Raises:
        TypeError: A value is neither an array, a number, a bool, a string, None, nor a
            list or dict of those.
    """
    entries, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(entries, Mapping) or not isinstance(groups, list | tuple):
        raise TypeError("state_dict must have a 'state' dict and a 'param_groups' list")
    arrays: dict[str, npt.NDArray[Any]] = {}
    state: dict[str, dict[str, Any]] = {}
    for index, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise TypeError(f"state_dict['state'][{index!r}] must be a dict")
        saved: dict[str, Any] = {}
        for name, value in entry.items():
            if isinstance(value, int | float | bool):
                saved[name] = value
            else:
                key = f"state.{index}.{name}"
                arrays[key] = _host(value, key)
                saved[name] = {"array": key}
        state[str(index)] = saved
    meta = {"format": FORMAT, "state": state, "param_groups": _plain(groups)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            _savez(out, allow_pickle=False, **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def load(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a checkpoint written by `save`; it runs no code from the file.

    Pass the result to the optimizer's `load_state_dict`, which checks that it fits.

    Raises:
        ValueError: The file is missing parts, truncated, corrupted, holds pickled
            objects, or is not a netcl checkpoint.
    """
    try:
        raw = Path(path).read_bytes()
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            meta = json.loads(bytes(archive[_META]).decode())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(
                    f"format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}"
                )
            state: dict[int, dict[str, Any]] = {}
            for index, entry in meta["state"].items():
                state[int(index)] = {
                    name: np.array(archive[value["array"]]) if isinstance(value, dict) else value
                    for name, value in entry.items()
                }
            return {"state": state, "param_groups": meta["param_groups"]}
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        KeyError,
        TypeError,
        AttributeError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        ValueError,
    ) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{os.fspath(path)!r} is not a readable netcl checkpoint: {error}") from None


def _host(value: Any, where: str) -> npt.NDArray[Any]:
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    if hasattr(value, "__dlpack__") or hasattr(value, "__array__"):
        host = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if host.dtype != object:
            return host
    raise TypeError(f"{where} is a {type(value).__name__}, which a checkpoint cannot hold")


def _plain(value: Any) -> Any:
    """`value` as JSON-ready lists, dicts and scalars."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a param group value of type {type(value).__name__} cannot go into a checkpoint")
