"""Checkpoints never run code, describe their model, and fail with one clear line naming the file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from settransformer import cli
from settransformer.data.files import _HOST, write_text_atomic
from settransformer.nn.models import DeepSets, SetTransformer
from settransformer.nn.scores import GaussianScore
from settransformer.tasks.runs import RunError, build_task, load_run, read_run_config, train_run
from settransformer.training.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from settransformer.training.config import TrainConfig

OPTIONS = {"dim_hidden": 8, "test_sets": 32}


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for ``os.system`` that leaves a trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished max-regression run (deepsets-max, 3 steps) with config.json and both checkpoints."""
    folder = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(steps=3, batch_size=8, device="cpu", progress=False, eval_every=2, log_every=1)
    torch.manual_seed(0)
    train_run(build_task("max-regression", OPTIONS), "deepsets-max", config, folder, plots=False)
    return folder


def _state(run: Path) -> dict[str, Any]:
    return load_checkpoint(run / "checkpoint.pt")


def _saved(tmp_path: Path, state: dict[str, Any], name: str = "edited.pt") -> Path:
    return save_checkpoint(state, tmp_path / name)


def _error(path: Path, match: str) -> str:
    """``load_run(path)`` fails with a RunError naming ``path`` and matching ``match``; its message."""
    with pytest.raises(RunError, match=match) as info:
        load_run(path, device="cpu")
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    return message


# --- a crafted checkpoint does not run code --------------------------------------------------------


def test_a_checkpoint_crafted_to_run_code_is_refused_by_every_loader(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    crafted = {**_state(run), "model": {"w": RunsCode(marker)}}  # looks like ours, hides a payload
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    torch.save(crafted, victim / "checkpoint.pt")
    torch.save({"payload": RunsCode(marker)}, tmp_path / "zip.pt")
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps({"payload": RunsCode(marker)}))

    for path in (victim / "checkpoint.pt", tmp_path / "zip.pt"):
        with pytest.raises(ValueError, match=r"refused to unpickle the Python object (builtins|io)\.open"):
            load_checkpoint(path)
    with pytest.raises(ValueError, match=r"bare\.pkl: not a readable checkpoint: .*a bare pickle"):
        load_checkpoint(tmp_path / "bare.pkl")
    _error(victim / "checkpoint.pt", "refused to unpickle")
    _error(victim, "refused to unpickle")  # through the run folder, as `eval` and `predict` read it
    assert cli.main(["eval", str(victim), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: not a readable checkpoint: refused to unpickle" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()

    # the control: the same file does run code when unpickled without weights_only
    torch.load(tmp_path / "zip.pt", weights_only=False)
    assert marker.exists()


# --- files that are not checkpoints ----------------------------------------------------------------


def test_files_that_are_not_checkpoints(run: Path, tmp_path: Path) -> None:
    data = (run / "checkpoint.pt").read_bytes()
    cases: dict[str, tuple[bytes | None, str]] = {
        "empty.pt": (b"", "the file is empty"),
        "random.pt": (os.urandom(4096), "no torch.save archive"),
        "config.pt": (json.dumps({"task": "max-regression"}).encode(), "looks like JSON"),
        "half.pt": (data[: len(data) // 2], "truncated or another kind of file"),
        "short.pt": (data[:-10], "truncated or another kind of file"),
        "tensor.pt": (None, "expected a checkpoint dict, got Tensor"),
        "array.npy": (None, "it is a NumPy .npy array"),
        "weights.pt": (None, "not a settransformer training checkpoint .*no 'format' entry; it holds w"),
    }
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    np.save(tmp_path / "array.npy", np.ones(3))
    torch.save({"w": torch.ones(3)}, tmp_path / "weights.pt")  # a bare state dict
    for name, (content, match) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        _error(tmp_path / name, match)
    with pytest.raises(RunError, match=r"checkpoint file .*nowhere\.pt: does not exist"):
        load_run(tmp_path / "nowhere.pt")
    with pytest.raises(RunError, match=r"which: expected 'last' or 'best', got 'first'"):
        load_run(run, which="first")


def test_damaged_and_foreign_checkpoints(run: Path, tmp_path: Path) -> None:
    state = _state(run)
    without_task = {k: v for k, v in state.items() if k != "task"}
    _error(_saved(tmp_path, without_task), "incomplete training checkpoint: no task")
    _error(_saved(tmp_path, {**state, "task": "juggling"}), "cannot rebuild .*unknown task 'juggling'")
    _error(_saved(tmp_path, {**state, "task": 7}), "task should be a str, got int")
    _error(_saved(tmp_path, {**state, "model": [1, 2]}), "model should map names to tensors")
    _error(_saved(tmp_path, {**state, "model_name": "lasso"}), "model 'lasso': max-regression has")
    options = {**state["task_options"], "colour": "red"}
    _error(_saved(tmp_path, {**state, "task_options": options}), "task option 'colour'")
    newer = {**state, "format": CHECKPOINT_FORMAT + 1, "version": "9.0"}
    message = _error(_saved(tmp_path, newer), "written by a newer settransformer")
    assert f"format {CHECKPOINT_FORMAT + 1}" in message and "version 9.0" in message


def test_resume_from_a_damaged_checkpoint_is_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = (copy / "checkpoint.pt").read_bytes()
    (copy / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert cli.main(["train", "max-regression", "--out", str(copy), "--resume", "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"settransformer train: error: {copy / 'checkpoint.pt'}: not a readable checkpoint: "
        "no torch.save archive (it is truncated or another kind of file)"
    )
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_a_checkpoint_of_another_model_names_what_does_not_fit(run: Path, tmp_path: Path) -> None:
    state = _state(run)  # deepsets-max, dim_hidden 8
    message = _error(
        _saved(tmp_path, {**state, "model_name": "settransformer"}),
        r"its weights do not fit the model max-regression/settransformer \(missing: ",
    )
    assert "unexpected: model.phi" in message
    wider = {**state, "task_options": {**state["task_options"], "dim_hidden": 16}}
    message = _error(_saved(tmp_path, wider), r"of another shape: model\.phi\.0\.weight \(8, 1\) in the file")
    assert "the model's settings changed: dim_hidden 8 -> 16" in message


def test_changed_model_settings_with_fitting_weights_warn(run: Path, tmp_path: Path) -> None:
    state = _state(run)
    described = state["model_config"]
    edited = {**described, "config": {**described["config"], "dropout": 0.5}}
    path = _saved(tmp_path, {**state, "model_config": edited, "version": "0.0.1"})
    with pytest.warns(
        UserWarning, match=r"other settings .*dropout 0\.5 -> 0\.0.*written by settransformer 0\.0\.1"
    ):
        load_run(path, device="cpu")


# --- rebuilding from the file alone ----------------------------------------------------------------


def test_a_checkpoint_file_alone_rebuilds_the_run(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(run / "best.pt", alone)  # no config.json beside it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored settings are those of the rebuilt model
        task, model, state = load_run(alone, device="cpu")
        _, from_folder, _ = load_run(run, "best", device="cpu")
    assert task.name == "max-regression" and task.options["dim_hidden"] == 8 and not model.training
    assert state["model_config"]["class"] == "DeepSets" and state["model_config"]["module"] == "model"
    assert state["model_config"]["config"]["pool"] == "max" and isinstance(state["version"], str)
    x, mask = torch.rand(4, 6, 1) * 100, torch.rand(4, 6) > 0.3
    mask[:, 0] = True
    assert torch.equal(model(x, mask), from_folder(x, mask))
    info = read_run_config(alone)
    assert (info["task"], info["model"], info["task_options"]) == (
        "max-regression",
        "deepsets-max",
        task.options,
    )
    assert info["train"]["steps"] == 3
    assert cli.main(["eval", str(alone), "--device", "cpu"]) == 0
    title = f"max-regression/deepsets-max (model.pt checkpoint, step {state['step']})"
    assert title in capsys.readouterr().out
    assert sorted(p.name for p in alone.parent.iterdir()) == ["model.pt"]  # printed, nothing written


def test_model_config_is_plain_and_found_inside_wrappers() -> None:
    model = SetTransformer(2, 1, 3, dim_hidden=8, num_heads=2, num_inducing=4, score=GaussianScore(2))
    described = model_config(torch.nn.Sequential(model))
    assert described is not None
    assert described["class"] == "SetTransformer" and described["module"] == "0"
    assert described["config"]["num_inducing"] == 4
    assert described["config"]["score"] == "<settransformer.nn.scores.GaussianScore>"
    assert model_config(DeepSets(1, 1, 1))["config"]["pool"] == "mean"  # type: ignore[index]
    assert model_config(torch.nn.Linear(2, 2)) is None


# --- atomic writes ---------------------------------------------------------------------------------


def test_atomic_writes_respect_the_umask_and_clean_up_after_killed_writers(tmp_path: Path) -> None:
    dead = tmp_path / f".checkpoint.pt.999999999-abcd1234-{_HOST}.tmp"  # no such pid
    alive = tmp_path / f".checkpoint.pt.{os.getppid()}-abcd1234-{_HOST}.tmp"
    other_host = tmp_path / ".checkpoint.pt.999999999-abcd1234-elsewhere.tmp"
    for p in (dead, alive, other_host):
        p.write_bytes(b"half")
    path = save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    assert not dead.exists() and alive.exists() and other_host.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    write_text_atomic(tmp_path / "config.json", '{"a": 1}\n')
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
