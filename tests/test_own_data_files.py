"""Mistakes in a user's own labelled sets (set-classification, set-regression): each is one line
naming the file (and the set or CSV line), from the reader and from ``train``, never a numpy or torch
traceback; and CSV files that Excel saved with a byte-order mark are read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli as _run

from settransformer.data.set_files import read_sets
from settransformer.tasks import get_task
from settransformer.tasks.labelled_sets import read_labelled_sets

pytestmark = pytest.mark.usefixtures("in_tmp_dir")

SMALL = ["--set", "dim_hidden=8", "--set", "num_heads=2", "--set", "num_inducing=4", "--batch-size", "16"]


def _folder(sets: dict[str, np.ndarray], labels: str, name: str = "bags") -> str:
    """A folder of ``.npy`` sets with ``labels.csv`` holding ``labels``."""
    Path(name).mkdir()
    for stem, s in sets.items():
        np.save(f"{name}/{stem}.npy", s)
    Path(name, "labels.csv").write_text(labels)
    return name


def _sets(count: int, dim: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"s{i}": rng.normal(size=(3, dim)).astype(np.float32) for i in range(count)}


def _labels(count: int) -> str:
    return "set,y\n" + "".join(f"s{i},{i % 2}\n" for i in range(count))


def _csv(labels: list[str], name: str = "bags.csv") -> str:
    """A CSV of ``len(labels)`` sets of 2 rows, set ``i`` labelled ``labels[i]`` on each of its rows."""
    rows = "".join(f"s{i},{i + r},{r},{y}\n" for i, y in enumerate(labels) for r in range(2))
    Path(name).write_text("set,a,b,y\n" + rows)
    return name


def _mixed_dims() -> str:
    sets = _sets(6)
    sets["s3"] = np.zeros((4, 3), dtype=np.float32)
    return _folder(sets, _labels(6))


def _three_d_set() -> str:
    sets = _sets(6)
    sets["s0"] = np.zeros((3, 2, 2), dtype=np.float32)
    return _folder(sets, _labels(6))


def _npz(y: np.ndarray, x: np.ndarray | None = None) -> str:
    x = np.random.default_rng(0).normal(size=(len(y), 3, 2)) if x is None else x
    np.savez("bags.npz", x=x, y=y)
    return "bags.npz"


def _garbage(name: str) -> str:
    Path(name).write_bytes(b"these bytes are no array" * 4)
    return name


def _garbage_set() -> str:
    folder = _folder(_sets(6), _labels(6))
    _garbage(f"{folder}/s1.npy")
    return folder


CLS, REG = "set-classification", "set-regression"
BAD_OWN_DATA = [
    # 1: sets of another feature count in a folder (the batch would fail in torch.cat)
    ("mixed-d", CLS, _mixed_dims, ["s3.npy: a set of D=3 features", "5 of the 6 sets have D=2"]),
    # 2: a set without a label
    ("csv-empty", CLS, lambda: _csv(["0", "1", "", *"1010101"]), ["bags.csv: line 6: set 's2' has no y"]),
    (
        "csv-empty-reg",
        REG,
        lambda: _csv(["0.5", "1", "", *"2345678"]),
        ["bags.csv: line 6: set 's2' has no y"],
    ),
    ("csv-nan", CLS, lambda: _csv(["0", "1", "nan", *"1010101"]), ["bags.csv: line 6: set 's2': no y (NaN)"]),
    (
        "csv-text-reg",
        REG,
        lambda: _csv(["0.5", "1", "big", *"2345678"]),
        ["line 6: set 's2': y 'big' is not a number"],
    ),
    ("npz-nan", CLS, lambda: _npz(np.array([0, 1, 0, 1, np.nan, 0])), ["bags.npz: set 4: no y (NaN)"]),
    (
        "npz-empty",
        CLS,
        lambda: _npz(np.array(["a", "b", "", *"ababababa"])),
        ["bags.npz: set 2: no y (an empty label)"],
    ),
    (
        "labels-empty",
        CLS,
        lambda: _folder(_sets(10), _labels(10).replace("s1,1", "s1,")),
        ["labels.csv: line 3: set 's1' has no y"],
    ),
    (
        "labels-no-set",
        CLS,
        lambda: _folder(_sets(10), _labels(10) + ",1\n"),
        ["labels.csv: line 12: no set named in column 'set'"],
    ),
    # 3: a batch where a folder holds one set per file
    ("3-d-set", CLS, _three_d_set, ["s0.npy: a set is a 2-D array (N, D)", "got shape (3, 2, 2)"]),
    # 4: object arrays and files that are not what their suffix says
    (
        "object-y",
        CLS,
        lambda: _npz(np.arange(10, dtype=object) % 2),
        ["bags.npz: y: holds Python objects (dtype object)"],
    ),
    ("garbage-npz", CLS, lambda: _garbage("bags.npz"), ["bags.npz: not a valid .npz file"]),
    ("garbage-npy", CLS, _garbage_set, ["s1.npy: not a valid .npy file"]),
    # 5: x (S, N) without a feature axis: one set (N, D) for S targets
    (
        "2-d-x",
        CLS,
        lambda: _npz(np.arange(20) % 2, x=np.zeros((20, 6))),
        ["bags.npz: holds one set but 20 targets in y", "x (S, N, D)"],
    ),
    # 7: a label whose file is missing
    ("missing-npy", CLS, lambda: _folder(_sets(9), _labels(10)), ["labels.csv: line 11: no file s9.npy"]),
]


@pytest.mark.parametrize(
    ("task", "write", "messages"), [case[1:] for case in BAD_OWN_DATA], ids=[case[0] for case in BAD_OWN_DATA]
)
def test_mistakes_in_own_data_are_one_line_errors_naming_the_file(
    capsys: pytest.CaptureFixture[str], task: str, write: Callable[[], str], messages: list[str]
) -> None:
    path = write()
    with pytest.raises(ValueError) as info:
        get_task(task)(path=path)
    text = str(info.value)
    assert all(m in text for m in messages) and "\n" not in text, text
    code, _, err = _run(capsys, "train", task, "--set", f"path={path}", "--steps", "1", "--out", "r", *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert messages[0].split(":")[0] in err and not Path("r").exists(), err


def test_csv_files_with_a_byte_order_mark_are_read(capsys: pytest.CaptureFixture[str]) -> None:
    """Excel's "CSV UTF-8" starts the file with a byte-order mark, which must not stick to the first name."""
    text = Path(_csv(["0", "1"] * 6, name="plain.csv")).read_text()
    Path("bags.csv").write_text(text, encoding="utf-8-sig")
    assert Path("bags.csv").read_bytes().startswith(b"\xef\xbb\xbfset,")
    data = read_labelled_sets("bags.csv")
    assert data.ids[:2] == ["s0", "s1"] and data.targets.tolist()[:2] == [0, 1]
    assert read_sets("bags.csv", set_column="set")[1] == data.ids  # predict's reader too
    folder = _folder(_sets(4), "")
    Path(folder, "labels.csv").write_text(_labels(4), encoding="utf-8-sig")
    assert read_labelled_sets(folder).targets.tolist() == [0, 1, 0, 1]
    code, _, err = _run(capsys, "train", "set-classification", "--set", "path=bags.csv", "--steps", "2",
                        "--out", "r", *SMALL, "--no-progress")  # fmt: skip
    assert code == 0, err
    Path("latin.csv").write_bytes("set,a,y\nb\xe9,1,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: not a UTF-8 CSV file .*save it as UTF-8"):
        read_labelled_sets("latin.csv")
