"""Checkpoint files that cannot run code: round trip, atomic saves, bad files refused."""

from __future__ import annotations

import zipfile
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
