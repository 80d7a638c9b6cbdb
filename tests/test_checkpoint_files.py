"""Checkpoint files that cannot run code: round trip, atomic saves, bad files refused."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from netcl import Parameter
from netcl.optim import RMSProp, checkpoint


def _trained(seed: int = 0) -> tuple[RMSProp, list[Parameter[Any]]]:
    rng = np.random.default_rng(seed)
    params = [Parameter(rng.standard_normal(s).astype(np.float32)) for s in [(4, 3), (5,), ()]]
    opt = RMSProp(params, lr=1e-2, momentum=0.9, centered=True)
    for _ in range(3):
        for p in params:
            p.grad = rng.standard_normal(p.data.shape).astype(np.float32)
        opt.step()
    return opt, params


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(
        np.asarray(a["state"][i][k]).tobytes() == np.asarray(b["state"][i][k]).tobytes()
        and a["state"][i].keys() == b["state"][i].keys()
        for i in a["state"]
        for k in a["state"][i]
    )


def test_round_trip_restores_exactly(tmp_path: Path) -> None:
    opt, params = _trained()
    path = tmp_path / "opt.npz"
    checkpoint.save(opt.state_dict(), path)
    fresh = RMSProp(params)
    fresh.load_state_dict(checkpoint.load(path))
    assert _same(dict(fresh.state_dict()), dict(opt.state_dict()))
    checkpoint.save(fresh.state_dict(), tmp_path / "again.npz")
    assert _same(checkpoint.load(tmp_path / "again.npz"), checkpoint.load(path))


def test_a_torch_state_dict_saves_and_loads(tmp_path: Path) -> None:
    twin = torch.ones(3, requires_grad=True)
    torch_opt = torch.optim.RMSprop([twin], lr=1e-2, momentum=0.5)
    twin.grad = torch.tensor([0.1, 0.2, 0.3])
    torch_opt.step()
    checkpoint.save(torch_opt.state_dict(), tmp_path / "torch.npz")
    opt = RMSProp([Parameter(np.ones(3, np.float32))])
    opt.load_state_dict(checkpoint.load(tmp_path / "torch.npz"))
    assert opt.param_groups[0]["momentum"] == 0.5


def test_a_crash_mid_save_keeps_the_last_good_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opt, _ = _trained()
    path = tmp_path / "opt.npz"
    checkpoint.save(opt.state_dict(), path)
    good = path.read_bytes()

    def crash(file: Any, **arrays: Any) -> None:
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_savez", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(opt.state_dict(), path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.npz"]  # no temporary left


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "not a zip", "no meta", "other format", "pickled"])
def test_bad_files_are_refused_and_change_nothing(tmp_path: Path, damage: str) -> None:
    opt, _ = _trained()
    path = tmp_path / "opt.npz"
    checkpoint.save(opt.state_dict(), path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupted":
        path.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:])
    elif damage == "not a zip":
        path.write_bytes(b"hello")
    elif damage == "no meta":
        np.savez(path, x=np.zeros(3))
    elif damage == "other format":
        with zipfile.ZipFile(path, "w") as archive:
            with archive.open("meta.json.npy", "w") as out:
                np.save(out, np.frombuffer(b'{"format": "other/9"}', np.uint8))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            with archive.open("meta.json.npy", "w") as out:
                np.save(out, np.array([object()], dtype=object), allow_pickle=True)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="not a readable netcl checkpoint"):
        opt.load_state_dict(checkpoint.load(path))
    assert _same(dict(opt.state_dict()), dict(before))


def test_a_checkpoint_of_another_model_is_refused_at_load(tmp_path: Path) -> None:
    opt, _ = _trained()
    checkpoint.save(opt.state_dict(), tmp_path / "opt.npz")
    other = RMSProp([Parameter(np.ones(2, np.float32))])
    with pytest.raises(ValueError, match="has 3 parameter"):
        other.load_state_dict(checkpoint.load(tmp_path / "opt.npz"))


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nothing.npz")


def _archive(path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)


def _npy(array: Any) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _meta(text: str) -> bytes:
    return _npy(np.frombuffer(text.encode(), np.uint8))


HOSTILE: dict[str, Callable[[Path], None]] = {
    "deeply nested JSON": lambda p: _archive(p, {"meta.json.npy": _meta("[" * 100_000 + "]" * 100_000)}),
    "a JSON integer above 1e308": lambda p: _archive(
        p, {"meta.json.npy": _meta('{"format": "netcl-optimizer-state/1", "state": {"' + "9" * 400 + '": {}}}')}
    ),
    "NaN in the JSON": lambda p: _archive(
        p, {"meta.json.npy": _meta('{"format": "netcl-optimizer-state/1", "state": {}, "param_groups": [NaN]}')}
    ),
    "a header declaring 4 TiB": lambda p: _archive(
        p,
        {
            "meta.json.npy": _meta('{"format": "netcl-optimizer-state/1", "state": {}, "param_groups": []}'),
            "x.npy": _npy(np.zeros(4, np.float32)).replace(b"(4,)", b"(1099511627776,)"),
        },
    ),
    "a compressed 256 MiB of zeros": lambda p: _zip_bomb(p),
    "an unsupported compression method": lambda p: _archive(
        p, {"meta.json.npy": _meta("{}")}, compress=zipfile.ZIP_BZIP2
    ),
}


def _zip_bomb(path: Path) -> None:
    """A member of a few hundred kilobytes that inflates to a declared 256 MiB array."""
    header = _npy(np.zeros(0, np.float32)).replace(b"(0,)", b"(67108864,)")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as out:
            out.write(header)
            chunk = bytes(1 << 26)
            for _ in range(4):
                out.write(chunk)


@pytest.mark.parametrize("make", HOSTILE.values(), ids=list(HOSTILE))
def test_a_hostile_file_is_refused_quickly_with_a_value_error(tmp_path: Path, make: Callable[[Path], None]) -> None:
    import time
    import tracemalloc

    path = tmp_path / "hostile.npz"
    make(path)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not a readable netcl checkpoint"):
        checkpoint.load(path)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20, f"{peak} bytes to refuse it"
    assert seconds < 5


def test_every_single_bit_flip_is_a_value_error_or_a_load(tmp_path: Path) -> None:
    opt, _ = _trained()
    path = tmp_path / "opt.npz"
    checkpoint.save(opt.state_dict(), path)
    good = path.read_bytes()
    damaged = tmp_path / "damaged.npz"
    loaded = 0
    for offset in range(0, len(good), 7):
        for bit in (0, 5):
            raw = bytearray(good)
            raw[offset] ^= 1 << bit
            damaged.write_bytes(bytes(raw))
            try:
                checkpoint.load(damaged)
                loaded += 1
            except ValueError:
                pass
    assert loaded < len(good) // 7  # most flips are caught (the CRCs); none raises another error


def test_max_bytes_bounds_what_is_read(tmp_path: Path) -> None:
    opt, _ = _trained()
    path = tmp_path / "opt.npz"
    checkpoint.save(opt.state_dict(), path)
    checkpoint.load(path, max_bytes=10_000)
    with pytest.raises(ValueError, match="more than max_bytes=100"):
        checkpoint.load(path, max_bytes=100)
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
        checkpoint.load(path, max_bytes=-1)


def test_save_keeps_the_file_mode_and_follows_a_symlink(tmp_path: Path) -> None:
    import os
    import stat

    opt, _ = _trained()
    real = tmp_path / "real.npz"
    checkpoint.save(opt.state_dict(), real)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(real.stat().st_mode) == 0o666 & ~umask
    real.chmod(0o640)
    link = tmp_path / "link.npz"
    link.symlink_to(real)
    checkpoint.save(opt.state_dict(), link)
    assert link.is_symlink() and link.resolve() == real
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert _same(checkpoint.load(link), dict(opt.state_dict()))


def test_save_writes_strict_json(tmp_path: Path) -> None:
    opt, _ = _trained()
    state_dict = opt.state_dict()
    saved = {"state": state_dict["state"], "param_groups": [dict(state_dict["param_groups"][0], lr=float("nan"))]}
    with pytest.raises(ValueError, match="NaN or infinite"):
        checkpoint.save(saved, tmp_path / "opt.npz")
    assert list(tmp_path.iterdir()) == []
