"""The CLI around a user's own data: class labels from predict, config files that hold any flag, one
spelling per option, the time estimate of train, integer masks, and messages without internal names."""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli as _run

from settransformer import DeepSets, cli, save_model
from settransformer.data.shapes import SHAPE_CLASSES
from settransformer.deploy.inference import predict
from settransformer.tasks.demo import demo_tasks
from settransformer.tasks.runs import (
    RunError,
    build_task,
    check_task_options,
    data_changes,
    data_fingerprint,
    load_run,
    record_data,
)

NAMES = ("barolo", "grignolino", "barbera")


pytestmark = pytest.mark.usefixtures("in_tmp_dir")


def _bags(count: int = 60, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Sets of 3 features whose class shifts their mean: easy to learn in a few steps."""
    rng = np.random.default_rng(seed)
    sets, labels = [], []
    for i in range(count):
        c = i % 3
        sets.append((rng.normal(size=(int(rng.integers(3, 9)), 3)) + 2 * c).astype(np.float32))
        labels.append(NAMES[c])
    return sets, np.array(labels)


def _save(path: str, sets: list[np.ndarray], **arrays: np.ndarray) -> str:
    np.savez(path, values=np.concatenate(sets), offsets=np.cumsum([0] + [len(s) for s in sets]), **arrays)
    return path


SMALL = ["--set", "dim_hidden=8", "--set", "num_heads=2", "--set", "num_inducing=4", "--batch-size", "16"]


@pytest.fixture
def classification_run(capsys: pytest.CaptureFixture[str]) -> Path:
    sets, labels = _bags()
    _save("bags.npz", sets, y=labels)
    _save("new.npz", sets[:9])
    argv = ["train", "set-classification", "--set", "path=bags.npz", "--steps", "30", "--out", "cls"]
    code, _, err = _run(capsys, *argv, *SMALL, "--no-progress")
    assert code == 0, err
    return Path("cls")


def test_predict_labels_writes_the_original_class_labels(
    classification_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "predict", "cls", "--input", "new.npz", "--labels", "--no-progress")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 9 and all(r["label"] in NAMES for r in records)
    for r in records:  # the label is the class of the highest output, in the run's class order
        assert r["label"] == sorted(NAMES)[int(np.argmax(r["output"]))]
    assert len({r["label"] for r in records}) > 1  # the model tells the classes apart
    assert _run(capsys, "predict", "cls", "--input", "new.npz", "--labels", "--output", "p.csv")[0] == 0
    with open("p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["set", "label", "output_0"]
    assert [row[1] for row in rows[1:]] == [r["label"] for r in records]
    assert _run(capsys, "predict", "cls", "--input", "new.npz", "--labels", "--output", "p.jsonl")[0] == 0
    assert [json.loads(line)["label"] for line in Path("p.jsonl").read_text().splitlines()] == [
        r["label"] for r in records
    ]
    code, _, err = _run(capsys, "predict", "cls", "--input", "new.npz", "--labels", "--output", "p.npy")
    assert code == 2 and "--labels needs .csv or .jsonl" in err and not Path("p.npy").exists()
    # without --labels the outputs alone, as before
    code, out, _ = _run(capsys, "predict", "cls", "--input", "new.npz", "--no-progress")
    assert code == 0 and "label" not in json.loads(out.splitlines()[0])


def test_predict_labels_of_pointcloud_are_its_class_names(capsys: pytest.CaptureFixture[str]) -> None:
    options = [
        "--set",
        "num_points=32",
        "--set",
        "test_size=24",
        "--set",
        "dim_hidden=8",
        "--set",
        "num_classes=4",
    ]
    argv = ["train", "pointcloud", "--model", "rff-pool", "--steps", "2", "--batch-size", "8", "--out", "pc"]
    code, _, err = _run(capsys, *argv, *options, "--no-progress")
    assert code == 0, err
    clouds = np.random.default_rng(0).normal(size=(5, 32, 3)).astype(np.float32)
    np.savez("clouds.npz", x=clouds)
    code, out, err = _run(capsys, "predict", "pc", "--input", "clouds.npz", "--labels", "--no-progress")
    assert code == 0, err
    labels = [json.loads(line)["label"] for line in out.splitlines()]
    assert len(labels) == 5 and set(labels) <= set(SHAPE_CLASSES[:4])


def test_predict_labels_is_refused_where_there_are_no_classes(capsys: pytest.CaptureFixture[str]) -> None:
    sets = [np.random.default_rng(i).normal(size=(4, 3)).astype(np.float32) for i in range(30)]
    _save("reg.npz", sets, y=np.array([s.mean() for s in sets]))
    argv = ["train", "set-regression", "--set", "path=reg.npz", "--steps", "2", "--out", "reg", *SMALL]
    assert _run(capsys, *argv, "--no-progress")[0] == 0
    code, _, err = _run(capsys, "predict", "reg", "--input", "reg.npz", "--labels")
    assert code == 2 and "set-regression is not a classification task" in err
    save_model(DeepSets(3, 1, 2, dim_hidden=4), "saved")
    code, _, err = _run(capsys, "predict", "saved", "--input", "reg.npz", "--labels")
    assert code == 2 and "holds no class labels" in err and len(err.strip().splitlines()) == 1


def test_predict_and_export_help_name_saved_model_folders(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("predict", "export"):
        code, out, _ = _run(capsys, command, "--help")
        text = " ".join(out.split())
        assert code == 0 and "save_model" in text and "config.json + model.safetensors" in text


def test_train_prints_its_steps_and_an_estimated_time(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "max-regression", "--model", "deepsets-max", "--steps", "20", "--batch-size", "8"]
    code, _, err = _run(capsys, *argv, "--set", "test_sets=16", "--budget", "quick", "--out", "r")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == "training max-regression/deepsets-max in r: 20 steps of 8 sets (quick budget)"
    estimate = [line for line in lines if "on this machine" in line]
    assert len(estimate) == 1, err
    assert re.fullmatch(
        r"max-regression: 20 steps, about \d+ (s|min|h) on this machine \(measured from 5 steps; "
        r"evaluations add to it\)",
        estimate[0],
    )
    # printed after the timed steps and before the run ends
    assert lines.index(estimate[0]) < next(i for i, line in enumerate(lines) if "step 20/20" in line)
    code, _, err = _run(capsys, *argv, "--set", "test_sets=16", "--out", "q", "--no-progress")
    assert code == 0 and "on this machine" not in err  # no progress shown, no estimate


def _train_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _sample(action: argparse.Action) -> object:
    """A valid config-file value for the flag ``action``."""
    if action.nargs == 0:
        return True
    if action.dest == "set":
        return ["max_size=4"]
    if action.choices:
        return list(action.choices)[-1]
    if action.dest == "lr_milestones":
        return "3"
    if action.type in (int, cli.positive_int):
        return 2
    if action.type is float:
        return 0.5
    return {"model": "deepsets-sum", "out": "from-file"}.get(action.dest, "x")


def test_every_train_flag_is_a_config_key() -> None:
    parser = _train_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")]
    assert {"threads", "model", "out", "budget", "steps", "set", "resume"} <= {a.dest for a in flags}
    values = {a.dest: _sample(a) for a in flags}
    Path("all.json").write_text(json.dumps(values))
    args = parser.parse_args(["max-regression", "--config", "all.json"])
    rest = cli._read_config(args)
    for action in flags:
        if action.dest in cli._TRAIN_KEYS:
            assert action.dest in rest  # a training setting: checked by TrainConfig
        elif action.dest == "set":
            assert args.set == ["max_size=4"]
        else:
            expected = values[action.dest]
            if action.nargs == 0 and isinstance(action, argparse._StoreFalseAction):
                expected = not expected
            assert getattr(args, action.dest) == expected, action.dest
    assert torch.get_num_threads() == 2  # threads from the file is applied
    # the command line wins over the file
    args = parser.parse_args(
        ["max-regression", "--config", "all.json", "--threads", "1", "--model", "settransformer"]
    )
    cli._read_config(args)
    assert (args.threads, args.model) == (1, "settransformer")


def test_config_file_sets_threads_model_and_out(capsys: pytest.CaptureFixture[str]) -> None:
    Path("c.yaml").write_text(
        "threads: 1\nmodel: deepsets-sum\nout: from-file\nbudget: quick\nsteps: 2\nbatch_size: 8\n"
        "no_progress: true\ntask_options:\n  test_sets: 16\n"  # the flag --no-progress, as a key
    )
    code, _, err = _run(capsys, "train", "max-regression", "--config", "c.yaml")
    assert code == 0, err
    info = json.loads(Path("from-file/config.json").read_text())
    assert info["model"] == "deepsets-sum" and info["train"]["steps"] == 2
    assert info["train"]["progress"] is False
    for text, message in (
        ("threads: 0\n", "c.yaml: threads: expected a positive integer, got '0'"),
        ("budget: huge\n", "c.yaml: budget: expected one of quick, paper, got 'huge'"),
        ("resume: 3\n", "c.yaml: resume: expected true or false like the flag --resume"),
        ("config: other.yaml\n", "c.yaml: config: not a setting a config file can hold"),
    ):
        Path("c.yaml").write_text(text)
        code, _, err = _run(capsys, "train", "max-regression", "--config", "c.yaml")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_pooling_and_standardize_are_the_option_names_with_their_aliases(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sets, labels = _bags(30)
    _save("bags.npz", sets, y=labels)
    task = build_task("set-classification", {"path": "bags.npz", "pool": "max", "standardise": False})
    assert task.options["pooling"] == "max" and task.options["standardize"] is False
    assert "pool" not in task.options and "standardise" not in task.options
    assert build_task("digits-clustering", {"standardise": "feature"}).options["standardize"] == "feature"
    with pytest.raises(RunError, match="'pooling': set-classification got it twice, once spelled 'pool'"):
        build_task("set-classification", {"path": "bags.npz", "pooling": "mean", "pool": "max"})
    # a user's config file may hold the other spelling: the run records the option's own name
    Path("c.json").write_text(json.dumps({"task_options": {"path": "bags.npz", "pool": "mean"}}))
    argv = ["train", "set-classification", "--config", "c.json", "--steps", "2", "--out", "r", *SMALL]
    code, _, err = _run(capsys, *argv, "--no-progress")
    assert code == 0, err
    options = json.loads(Path("r/config.json").read_text())["task_options"]
    assert options["pooling"] == "mean" and "pool" not in options


def test_no_internal_class_name_in_the_chunk_size_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "max-regression", "--model", "deepsets-max", "--steps", "2", "--batch-size", "8"]
    assert _run(capsys, *argv, "--set", "test_sets=16", "--out", "r", "--no-progress")[0] == 0
    np.save("one.npy", np.random.default_rng(0).uniform(size=(7, 1)).astype(np.float32))
    code, _, err = _run(capsys, "predict", "r", "--input", "one.npy", "--chunk-size", "4")
    assert code == 2 and "leave --chunk-size out" in err and len(err.strip().splitlines()) == 1
    assert not re.search(r"\b_[A-Z]", err), err
    _, model, _ = load_run("r", device="cpu")
    with pytest.raises(ValueError, match="leave chunk_size out") as info:
        predict(model, [torch.rand(7, 1)], chunk_size=4, progress=False)
    assert not re.search(r"\b_[A-Z]", str(info.value)), info.value


def test_integer_masks_are_refused_by_predict_as_by_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    model = DeepSets(2, 1, 1, dim_hidden=4)
    x, mask = torch.randn(2, 5, 2), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(TypeError, match=r"got dtype torch\.int64"):
        model(x, mask)
    save_model(model, "saved")
    np.savez("masked.npz", x=x.numpy(), mask=mask.numpy())
    code, _, err = _run(capsys, "predict", "saved", "--input", "masked.npz")
    assert code == 2 and "mask: expected a bool array, True for real elements, got dtype int64" in err
    assert "mask.astype(bool)" in err and len(err.strip().splitlines()) == 1
    np.savez("masked.npz", x=x.numpy(), mask=mask.numpy().astype(bool))
    assert _run(capsys, "predict", "saved", "--input", "masked.npz", "--no-progress")[0] == 0


def test_demo_leaves_out_the_tasks_on_your_own_files(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = demo_tasks()
    assert "max-regression" in names and "set-classification" not in names and "set-regression" not in names
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "run_demo", lambda tasks, out, **kw: seen.append(tasks) or {})
    assert _run(capsys, "demo", "--out", "d")[0] == 0
    assert seen == [names]
    code, out, _ = _run(capsys, "demo", "--help")
    assert code == 0 and "set-classification, set-regression" in out and "left out" in " ".join(out.split())
    # asked for by name: refused with the command that trains it (the demo has no --set path=FILE)
    code, _, err = _run(capsys, "demo", "--tasks", "max-regression,set-classification", "--out", "d2")
    assert code == 2 and "settransformer train set-classification --set path=FILE" in err
    assert len(seen) == 1 and not Path("d2").exists()


def test_a_run_reads_its_data_from_any_folder_and_resumes_with_its_first_command(
    classification_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    info = json.loads((classification_run / "config.json").read_text())
    assert info["task_options"]["path"] == str(Path("bags.npz").resolve())  # not as typed
    here = Path.cwd()
    elsewhere = here / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = _run(capsys, "eval", str(here / classification_run))
    assert code == 0, err
    assert "accuracy" in out
    monkeypatch.chdir(here)
    # the first command again with --resume (the same --set path): the same options, so it continues
    argv = ["train", "set-classification", "--set", "path=bags.npz", "--steps", "40", "--out", "cls"]
    code, _, err = _run(capsys, *argv, *SMALL, "--no-progress", "--resume", "--allow-changes")
    assert code == 0, err
    code, _, err = _run(capsys, *argv[:3], "path=new.npz", *argv[4:], *SMALL, "--no-progress", "--resume")
    assert code == 2
    assert "task options cannot change when resuming" in err and "new.npz" in err


def test_a_resume_that_cannot_start_changes_nothing(
    classification_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_bytes() for p in classification_run.iterdir() if p.is_file()}
    Path("bags.npz").rename("moved.npz")  # the data is gone: the resume fails before any write
    argv = ["train", "set-classification", "--out", "cls", "--resume", "--no-progress", "--allow-changes"]
    code, _, err = _run(capsys, *argv, "--steps", "60")
    assert code == 2 and "no such file or folder" in err and "Traceback" not in err
    Path("moved.npz").rename("bags.npz")
    code, _, err = _run(capsys, *argv, "--steps", "10")  # fewer steps than the checkpoint reached
    assert code == 2 and "below the step the checkpoint reached (30)" in err
    after = {p.name: p.read_bytes() for p in classification_run.iterdir() if p.is_file()}
    assert after == before  # no changes.jsonl, config.json untouched


def test_a_run_that_cannot_start_leaves_no_folder(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "max-regression", "--steps", "1", "--out", "never", "--amp", "fp16", "--device", "cpu"]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "fp16 needs a CUDA device" in err
    assert not Path("never").exists()


def test_a_cache_folder_is_not_data_and_a_file_that_appears_is_named(tmp_path: Path) -> None:
    """A task's ``cache_dir`` fills while it runs: no change to warn about. A data file that was
    missing when the run trained and exists now is a change."""
    run, cache, data = tmp_path / "run", tmp_path / "cache", tmp_path / "x.npz"
    run.mkdir()
    options = {"cache_dir": str(cache), "path": str(data), "steps": 3}
    assert record_data(run, options) == []
    assert list(data_fingerprint(options)) == ["path"]
    cache.mkdir()
    (cache / "scores.pt").write_bytes(b"0" * 100)
    assert data_changes(run, options) == []
    data.write_bytes(b"1")
    assert data_changes(run, options) == [f"task option 'path' ({data}): was missing"]
    # a run folder inside its data folder: its own files are not the data
    inside = {"path": str(tmp_path)}
    record_data(run, inside)
    (run / "metrics.jsonl").write_text("{}\n")
    assert data_changes(run, inside) == []
    (tmp_path / "more.npy").write_bytes(b"2")
    assert data_changes(run, inside) == [f"task option 'path' ({tmp_path}): files 2 -> 3; bytes 101 -> 102"]


def test_a_pair_of_files_in_one_path_option_is_made_absolute_and_recorded(tmp_path: Path) -> None:
    """``features_path=FEATURES,LABELS``: each file is made absolute (``eval`` from another folder
    finds both) and fingerprinted."""
    np.save("f.npy", np.zeros((4, 2)))
    np.save("l.npy", np.zeros(4))
    options = check_task_options("digits-clustering", {"features_path": "f.npy,l.npy"})
    assert options["features_path"] == f"{Path('f.npy').resolve()},{Path('l.npy').resolve()}"
    record = data_fingerprint(options)["features_path"]
    assert record["files"] == 2 and not record.get("missing")


def test_eval_and_resume_say_when_the_data_changed_since_training(
    classification_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = json.loads((classification_run / "data.json").read_text())
    assert record["path"]["path"] == str(Path("bags.npz").resolve()) and record["path"]["files"] == 1
    code, _, err = _run(capsys, "eval", str(classification_run))
    assert code == 0 and "warning" not in err, err
    sets, labels = _bags(seed=1)
    _save("bags.npz", sets[:45], y=labels[:45])  # the file is rewritten with other sets
    code, out, err = _run(capsys, "eval", str(classification_run))
    assert code == 0 and "accuracy" in out
    assert f"task option 'path' ({Path('bags.npz').resolve()}): bytes" in err
    assert "the metrics are of the data as it is now" in err
    assert json.loads((classification_run / "results.json").read_text())["data_changes"]
    argv = ["train", "set-classification", "--set", "path=bags.npz", "--steps", "35", "--out", "cls"]
    with pytest.warns(UserWarning, match="the run goes on with other data"):
        code, _, err = _run(capsys, *argv, *SMALL, "--no-progress", "--resume", "--allow-changes")
    assert code == 0, err
    code, _, err = _run(capsys, "eval", str(classification_run))  # recorded again on resume
    assert code == 0 and "warning" not in err, err


def test_an_option_documented_to_take_null_takes_it() -> None:
    assert check_task_options("digits-clustering", {"pca": None})["pca"] is None  # "null: no PCA"
    with pytest.raises(RunError, match="task option 'num_clusters': expected int"):
        check_task_options("digits-clustering", {"num_clusters": None})
