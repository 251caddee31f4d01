"""Atomic checkpoint files and random states."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from settransformer.data import files
from settransformer.training import checkpoint as ckpt
from settransformer.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _state(value: float) -> dict:
    return {
        "step": 7,
        "name": "settransformer",
        "lr": 1e-3,
        "flags": [True, None],
        "nested": {"w": torch.full((3, 2), value), "ints": [1, 2]},
        "gen": torch.Generator().manual_seed(3).get_state(),
    }


def test_round_trip_is_plain_weights_only(tmp_path: Path) -> None:
    path = save_checkpoint(_state(1.5), tmp_path / "sub" / "checkpoint.pt")
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["name"] == "settransformer" and loaded["flags"] == [True, None]
    assert torch.equal(loaded["nested"]["w"], torch.full((3, 2), 1.5))
    assert loaded["gen"].dtype == torch.uint8
    # readable by plain torch.load in safe mode, not only through our helper
    assert torch.load(path, weights_only=True)["nested"]["ints"] == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary files left


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(_state(1.0), tmp_path / "checkpoint.pt")

    def broken_save(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["nested"]["w"], torch.full((3, 2), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_interrupt_before_rename_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(_state(1.0), tmp_path / "checkpoint.pt")

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["nested"]["w"], torch.full((3, 2), 1.0))
    assert len(list(tmp_path.iterdir())) == 1


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: expected a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_foreign_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"obj": Path("x")}, tmp_path / "unsafe.pt")  # loading it needs arbitrary unpickling
    with pytest.raises(ValueError, match=r"unsafe\.pt"):
        load_checkpoint(tmp_path / "unsafe.pt")


def test_rng_state_restores_data_and_global_streams(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    state = rng_state(gen)
    save_checkpoint({"rng": state}, tmp_path / "c.pt")
    first = torch.rand(4, generator=gen), torch.rand(4)
    torch.rand(10)  # move both streams on
    torch.rand(10, generator=gen)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], gen)
    again = torch.rand(4, generator=gen), torch.rand(4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
