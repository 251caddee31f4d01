"""set-classification and set-regression: your own labelled sets, from file to eval, predict and export."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from settransformer import cli
from settransformer.tasks import get_task
from settransformer.tasks.labelled_sets import (
    SetClassification,
    SetRegression,
    Standardized,
    read_labelled_sets,
    split_indices,
)
from settransformer.tasks.runs import load_run

NAMES = ("barolo", "grignolino", "barbera")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wine_bags(count: int = 150, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """scikit-learn's wine samples (13 raw features) in bags of 5-15 samples of one class:
    ``(sets, class names, mean alcohol of each bag)``."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    rng = np.random.default_rng(seed)
    sets, labels = [], []
    for i in range(count):
        c = i % 3
        idx = rng.choice(np.flatnonzero(y == c), size=int(rng.integers(5, 16)), replace=False)
        sets.append(x[idx].astype(np.float32))
        labels.append(NAMES[c])
    return sets, np.array(labels), np.array([s[:, 0].mean() for s in sets])


def save_ragged(path: Path, sets: list[np.ndarray], **arrays: np.ndarray) -> Path:
    offsets = np.cumsum([0] + [len(s) for s in sets])
    np.savez(path, values=np.concatenate(sets), offsets=offsets, **arrays)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_registered_and_listed() -> None:
    assert get_task("set-classification") is SetClassification
    assert get_task("set-regression") is SetRegression


def test_wine_classification_trains_evaluates_and_predict_reproduces_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets, labels, _ = wine_bags()
    data = save_ragged(tmp_path / "wine.npz", sets, y=labels)
    run = tmp_path / "run"
    run_cli(capsys, "train", "set-classification", "--set", f"path={data}", "--steps", "30",
            "--batch-size", "32", "--out", str(run), "--no-progress")  # fmt: skip
    assert (run / "confusion.png").is_file()
    run_cli(capsys, "eval", str(run))
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert metrics["accuracy"] > 0.6  # chance is 1/3
    assert 0 <= metrics["macro_f1"] <= 1 and "val_accuracy" in metrics

    # predict on the raw (unstandardised) test sets reproduces eval's accuracy
    task, model, _ = load_run(run)
    assert isinstance(task, SetClassification) and isinstance(model, Standardized)
    assert task.options["classes"] == sorted(NAMES)  # string labels kept with the run
    test = task.test_idx.tolist()
    raw = save_ragged(tmp_path / "test.npz", [sets[i] for i in test])
    out = tmp_path / "pred.npy"
    run_cli(capsys, "predict", str(run), "--input", str(raw), "--output", str(out), "--no-progress")
    logits = np.load(out)
    predicted = [task.options["classes"][i] for i in logits.argmax(-1)]
    accuracy = np.mean([p == labels[i] for p, i in zip(predicted, test)])
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert task.labels(torch.from_numpy(logits)) == predicted
    # chunk by chunk, each chunk standardised as it is read: the same logits
    chunked = tmp_path / "chunked.npy"
    run_cli(capsys, "predict", str(run), "--input", str(raw), "--output", str(chunked), "--chunk-size", "4",
            "--no-progress")  # fmt: skip
    np.testing.assert_allclose(np.load(chunked), logits, atol=1e-4)
    with torch.no_grad():
        one = np.concatenate([sets[test[0]]] * 50)  # one set of 550+ elements, from NumPy, in chunks of 64
        alone = model(torch.from_numpy(one)[None])[0]
        torch.testing.assert_close(model(one, chunk_size=64), alone, atol=1e-4, rtol=1e-4)

    # the exported module carries the standardisation too
    ts = tmp_path / "model.pt"
    run_cli(capsys, "export", str(run), "--format", "torchscript", "--output", str(ts))
    x, mask = task._batch(task.test_idx[:8]).x, task._batch(task.test_idx[:8]).mask
    torch.testing.assert_close(torch.jit.load(str(ts))(x, mask), model(x, mask), atol=1e-4, rtol=1e-4)


def test_wine_regression_from_csv_with_a_set_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets, _, alcohol = wine_bags(120, seed=1)
    path = tmp_path / "bags.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bag", *(f"f{j}" for j in range(13)), "alcohol"])
        for i, s in enumerate(sets):
            for row in s:
                w.writerow([f"bag{i}", *row.tolist(), alcohol[i]])
    run = tmp_path / "run"
    run_cli(capsys, "train", "set-regression", "--set", f"path={path}", "--set", "set_column=bag",
            "--set", "target=alcohol", "--set", "encoder=sab", "--set", "pooling=mean",
            "--steps", "40", "--batch-size", "32", "--out", str(run), "--no-progress")  # fmt: skip
    assert (run / "predicted_vs_true.png").is_file()
    run_cli(capsys, "eval", str(run))
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert metrics["r2"] > 0.5 and metrics["mae"] < alcohol.std()

    task, _, _ = load_run(run)
    test = task.test_idx.tolist()
    raw = save_ragged(tmp_path / "test.npz", [sets[i] for i in test])
    out = tmp_path / "pred.npy"
    run_cli(capsys, "predict", str(run), "--input", str(raw), "--output", str(out), "--no-progress")
    mae = np.abs(np.load(out) - alcohol[test]).mean()
    assert mae == pytest.approx(metrics["mae"], rel=1e-4)


def test_folder_of_npy_sets_with_integer_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [["set", "y"]]
    for i in range(12):
        np.save(tmp_path / f"s{i:02d}.npy", rng.normal(size=(3 + i % 4, 2)).astype(np.float32))
        rows.append([f"s{i:02d}.npy", str(7 if i % 2 else 3)])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    data = read_labelled_sets(tmp_path)
    assert data.ids[:2] == ["s00", "s01"] and data.targets.tolist()[:2] == [3, 7]
    task = SetClassification(path=str(tmp_path), test_fraction=0.25, val_fraction=0.0, dim_hidden=8,
                             num_heads=2)  # fmt: skip
    assert task.options["classes"] == [3, 7] and task.dim_input == 2
    assert task.build_model("deepsets")(torch.randn(2, 4, 2)).shape == (2, 2)


def test_class_labels_keep_their_text_and_numbers_sort_as_numbers(tmp_path: Path) -> None:
    """ "007" and "7" are two classes (a CSV's texts become ints only when written as ints), and
    float labels are numbers, sorted, not half ints and half texts."""
    rows = [["set", "a", "label"]] + [[f"s{i}", str(i), ("007", "7", "010")[i % 3]] for i in range(9)]
    with open(tmp_path / "zip.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert read_labelled_sets(tmp_path / "zip.csv", target="label").targets.tolist()[:3] == [
        "007",
        "7",
        "010",
    ]
    assert read_labelled_sets(tmp_path / "zip.csv", target="a", numbers=True).targets.dtype.kind == "i"
    sets = [np.ones((2, 1), np.float32) * i for i in range(8)]
    path = save_ragged(tmp_path / "f.npz", sets, y=np.array([1.0, 1.5, 2.0, 0.5] * 2))
    task = SetClassification(path=str(path), test_fraction=0.5, val_fraction=0.0)
    assert task.options["classes"] == [0.5, 1, 1.5, 2]
    with pytest.raises(ValueError, match="classes: each label once, got 1 more than once"):
        SetClassification(path=str(path), test_fraction=0.5, val_fraction=0.0, classes=[1, 1, 0.5, 1.5, 2])


def test_a_split_that_rounds_to_no_training_sets_is_named(tmp_path: Path) -> None:
    path = save_ragged(tmp_path / "four.npz", [np.ones((2, 1), np.float32)] * 4, y=np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"0.3 and 0.45 of the 4 sets of .*four.npz leave no training sets"):
        SetClassification(path=str(path), val_fraction=0.3, test_fraction=0.45)


def test_a_stratified_split_of_small_classes_says_why_it_has_no_test_sets(tmp_path: Path) -> None:
    sets = [np.ones((2, 1), np.float32)] * 40
    path = save_ragged(tmp_path / "pairs.npz", sets, y=np.repeat(np.arange(20), 2))  # 20 classes of 2
    with pytest.raises(ValueError, match=r"0.2 of the largest class's 2 rounds to 0"):
        SetClassification(path=str(path), test_fraction=0.2)


def test_a_folder_set_listed_twice_with_two_labels_is_refused(tmp_path: Path) -> None:
    for name in ("b1", "b2"):
        np.save(tmp_path / f"{name}.npy", np.ones((2, 2), np.float32))
    (tmp_path / "labels.csv").write_text("set,y\nb1,cat\nb2,dog\nb1.npy,dog\n")
    with pytest.raises(ValueError, match=r"line 4: set b1.npy has y 'dog', but 'cat' on line 2"):
        read_labelled_sets(tmp_path)
    (tmp_path / "labels.csv").write_text("set,y\nb1,cat\nb2,dog\nb1.npy,cat\n")  # agreeing: fine
    assert read_labelled_sets(tmp_path).targets.tolist() == ["cat", "dog"]


def test_stratified_split_and_training_only_standardisation(tmp_path: Path) -> None:
    sets, labels, _ = wine_bags(90)
    path = save_ragged(tmp_path / "wine.npz", sets, y=labels)
    task = SetClassification(path=str(path), val_fraction=0.2, test_fraction=0.2, split_seed=3)
    for idx in (task.train_idx, task.val_idx, task.test_idx):
        assert torch.bincount(task.targets[idx], minlength=3).tolist() == [len(idx) // 3] * 3
    assert sorted(torch.cat([task.train_idx, task.val_idx, task.test_idx]).tolist()) == list(range(90))
    train = np.concatenate([sets[i] for i in task.train_idx.tolist()])
    np.testing.assert_allclose(task.mean.numpy(), train.mean(0), rtol=1e-4)
    other = split_indices(90, 0.2, 0.2, seed=4, strata=task.targets.numpy())[2]
    assert other.tolist() != task.test_idx.tolist()  # the seed matters


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["target=label"], "no array 'label'"),
        (["encoder=lstm"], "encoder: expected one of"),
        (["test_fraction=0.9", "val_fraction=0.2"], "leave no training sets"),
    ],
)
def test_bad_files_and_options_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    sets, labels, _ = wine_bags(30)
    path = save_ragged(tmp_path / "wine.npz", sets, y=labels)
    argv = [
        "train",
        "set-classification",
        "--set",
        f"path={path}",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "r"),
    ]
    for o in options:
        argv += ["--set", o]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
