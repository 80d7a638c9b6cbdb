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

import json
import os
import secrets
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_MAX_BYTES", "FORMAT", "load", "save", "to_torch", "torch_safe_globals"]

FORMAT = "netcl-optimizer-state/1"
"""The format name and version written into every checkpoint."""

_META = "meta.json"

# numpy types savez's keyword arrays so that a ** mapping might land in allow_pickle.
_savez: Callable[..., None] = np.savez


DEFAULT_MAX_BYTES = 1 << 34
"""`load` refuses a file whose arrays declare more bytes than this (16 GiB) in all."""


def save(state_dict: Mapping[str, object], path: str | os.PathLike[str]) -> None:
    """Write `state_dict` to `path` atomically, as an `.npz` archive without pickles.

    An existing file keeps its permission bits; a new one gets the process's default
    (0o666 less the umask). A symbolic link at `path` is followed: the file it points
    to is replaced (atomically, beside it) and the link stays. The JSON part is strict:
    NaN and infinite numbers are refused.

    Raises:
        TypeError: A value is neither an array, a number, a bool, a string, None, nor a
            list or dict of those.
        ValueError: A number in the param groups is NaN or infinite.
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
    try:
        text = json.dumps(meta, allow_nan=False)
    except ValueError:
        raise ValueError("state_dict holds a NaN or infinite number outside its arrays; a checkpoint cannot") from None
    arrays[_META] = np.frombuffer(text.encode(), dtype=np.uint8)
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    try:
        mode: int | None = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = None
    temporary = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode is not None:
            os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as out:
            _savez(out, allow_pickle=False, **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


# What a damaged or hostile file can make the zip, npy and JSON readers raise.
_DAMAGE = (
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    ValueError,
    NotImplementedError,  # an unsupported compression method
    RuntimeError,  # an "encrypted" flag
    RecursionError,  # deeply nested JSON
    OverflowError,
    UnicodeDecodeError,
)


def load(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, object]:
    """Read a checkpoint written by `save`; it runs no code from the file.

    Pass the result to the optimizer's `load_state_dict`, which checks that it fits.
    Memory stays bounded: every member must be stored uncompressed (as `save` writes
    them), so nothing inflates, and the arrays' declared sizes are added up and checked
    against `max_bytes` before any is read.

    Args:
        path: The checkpoint file.
        max_bytes: The most bytes of arrays the file may hold.

    Raises:
        FileNotFoundError: There is no file at `path`.
        ValueError: The file is missing parts, truncated, corrupted, compressed, larger
            than `max_bytes`, holds pickled objects or non-standard JSON, or is not a
            netcl checkpoint.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            arrays = _read_arrays(archive, max_bytes)
            meta = json.loads(
                bytes(arrays.pop(_META)).decode(),
                parse_constant=_no_constant,
                parse_int=_bounded_int,
            )
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(
                    f"format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}"
                )
            state: dict[int, dict[str, Any]] = {}
            for index, entry in meta["state"].items():
                state[int(index)] = {
                    name: arrays[value["array"]] if isinstance(value, dict) else value for name, value in entry.items()
                }
            return {"state": state, "param_groups": meta["param_groups"]}
    except FileNotFoundError:
        raise
    except _DAMAGE as error:
        raise ValueError(f"{os.fspath(path)!r} is not a readable netcl checkpoint: {error!r}") from None


def _read_arrays(archive: zipfile.ZipFile, max_bytes: int) -> dict[str, npt.NDArray[Any]]:
    """Every `.npy` member, by name without the suffix, after checking the sizes that
    their headers declare against `max_bytes` (and against the members' stored sizes)."""
    headers = []
    total = 0
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"member {info.filename!r} is compressed; netcl checkpoints store members as they are")
        if not info.filename.endswith(".npy"):
            raise ValueError(f"member {info.filename!r} is not an .npy array")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            header = member.tell()
        if dtype.hasobject:
            raise ValueError(f"member {info.filename!r} holds Python objects")
        size = dtype.itemsize
        for n in shape:
            size *= n
        if header + size != info.file_size:
            raise ValueError(f"member {info.filename!r} declares {size} bytes but stores {info.file_size - header}")
        total += size
        if total > max_bytes:
            raise ValueError(f"the arrays hold more than max_bytes={max_bytes} bytes")
        headers.append((info, shape, fortran, dtype, header, size))
    arrays: dict[str, npt.NDArray[Any]] = {}
    for info, shape, fortran, dtype, header, size in headers:
        with archive.open(info) as member:
            member.read(header)
            raw = member.read(size)
        if len(raw) != size:
            raise ValueError(f"member {info.filename!r} is truncated")
        flat = np.frombuffer(raw, dtype=dtype).copy()
        arrays[info.filename.removesuffix(".npy")] = flat.reshape(shape, order="F" if fortran else "C")
    return arrays


def _no_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def to_torch(state_dict: Mapping[str, object]) -> dict[str, Any]:
    """A netcl state dict as torch's optimizer of the same kind saves one, for
    `torch.optim.RMSprop` (`SGD`, `Adam`, `AdamW`)`.load_state_dict` and for
    `torch.save`/`torch.load(weights_only=True)`: each state buffer a torch tensor (a
    copy), each `step` a float32 tensor (as torch keeps it), the param groups as they are.
    Needs torch.

    ```python
    import numpy as np
    import torch

    from netcl import Parameter
    from netcl.optim import RMSProp, checkpoint

    weight = np.ones(3, np.float32)
    optimizer = RMSProp([Parameter(weight, np.full(3, 0.5, np.float32))], lr=1e-2)
    optimizer.step()
    twin = torch.optim.RMSprop([torch.tensor(weight)], lr=1e-2)
    twin.load_state_dict(checkpoint.to_torch(optimizer.state_dict()))
    ```

    Raises:
        TypeError: `state_dict` is not a dict with `state` and `param_groups`, or a state
            entry holds something that is not an array or a step count.
        ValueError: An RMSProp group uses an option torch's RMSprop lacks
            (`eps_in_sqrt`, `initial_scale`, `bias_correction`, `nesterov`,
            `decoupled_weight_decay`).
        ImportError: torch is not installed.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("checkpoint.to_torch needs torch (pip install torch)") from None

    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise TypeError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
    state = state_dict["state"]
    groups = state_dict["param_groups"]
    if not isinstance(state, Mapping) or not isinstance(groups, list | tuple):
        raise TypeError("state_dict['state'] must be a dict and state_dict['param_groups'] a list")
    converted: dict[Any, dict[str, Any]] = {}
    for index, entry in state.items():
        if not isinstance(entry, Mapping):
            raise TypeError(f"state_dict['state'][{index!r}] must be a dict, got {type(entry).__name__}")
        out: dict[str, Any] = {}
        for name, value in entry.items():
            where = f"state_dict['state'][{index!r}][{name!r}]"
            if name == "step":
                out[name] = torch.tensor(float(value), dtype=torch.float32)
            else:
                out[name] = torch.from_numpy(np.array(_host(value, where), copy=True))
        converted[index] = out
    return {"state": converted, "param_groups": [_torch_group(k, group) for k, group in enumerate(groups)]}


def _torch_group(index: int, group: object) -> dict[str, Any]:
    if not isinstance(group, Mapping):
        raise TypeError(f"state_dict['param_groups'][{index}] must be a dict, got {type(group).__name__}")
    out = dict(group)
    from netcl.optim.optimizer import Optimizer  # (checkpoint is imported before the optimizers)
    from netcl.optim.rmsprop import RMSProp

    # the options torch's optimizers lack, at the values that change nothing: torch would
    # silently run without them
    rmsprop = "alpha" in out
    lacking = RMSProp.optional if rmsprop else Optimizer.optional
    for key, torchs in lacking.items():
        if key in out:
            if out[key] != torchs:
                raise ValueError(
                    f"state_dict['param_groups'][{index}] has {key}={out[key]!r}, which torch's "
                    f"{'RMSprop' if rmsprop else 'optimizer'} does not have: torch would step another way"
                )
            del out[key]
    return out


def torch_safe_globals() -> list[Any]:
    """The numpy functions and types that a pickled netcl state dict refers to, for
    `torch.serialization.safe_globals`: with them allowed, `torch.load(path,
    weights_only=True)` reads what `torch.save(optimizer.state_dict(), path)` wrote.

    ```python
    import tempfile

    import numpy as np
    import torch

    from netcl import Parameter
    from netcl.optim import Adam, checkpoint

    optimizer = Adam([Parameter(np.ones(3, np.float32), np.full(3, 0.5, np.float32))])
    optimizer.step()
    path = tempfile.mkdtemp() + "/adam.pt"
    torch.save(optimizer.state_dict(), path)
    with torch.serialization.safe_globals(checkpoint.torch_safe_globals()):
        optimizer.load_state_dict(torch.load(path, weights_only=True))
    ```

    (Or save `to_torch(optimizer.state_dict())`, which torch reads without them.)
    """
    import importlib

    multiarray = importlib.import_module("numpy._core.multiarray")
    _reconstruct = multiarray._reconstruct
    dtypes = [type(np.dtype(kind)) for kind in (np.float32, np.float64)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:
        raise ValueError(f"JSON integer of {len(text)} digits")
    return int(text)


def _host(value: Any, where: str) -> npt.NDArray[Any]:
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    if hasattr(value, "__dlpack__") or hasattr(value, "__array__"):
        if hasattr(value, "detach"):  # (a torch tensor: on the host, a lazy negation resolved)
            value = value.detach().cpu().resolve_neg()
        host = np.asarray(value)
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
