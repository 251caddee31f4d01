"""``settransformer predict``: reading sets from files, batched inference, writing outputs, the CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from settransformer import SAB, DeepSets, SetTransformer, cli
from settransformer.data.set_files import read_inputs, read_queries, read_set, read_sets
from settransformer.deploy.inference import per_element_output, predict, write_outputs
from settransformer.tasks import get_task
from settransformer.tasks.runs import load_run

# -- reading sets -----------------------------------------------------------------------------


def test_npy_one_set_and_a_batch(tmp_path: Path) -> None:
    one = np.arange(12, dtype=np.float64).reshape(6, 2)
    np.save(tmp_path / "one.npy", one)
    sets, ids = read_sets(tmp_path / "one.npy", dim_input=2)
    assert ids == [str(tmp_path / "one.npy")] and sets[0].dtype == np.float32
    np.testing.assert_array_equal(sets[0], one)

    batch = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    sets, ids = read_sets(tmp_path / "batch.npy")
    assert ids == [0, 1, 2] and [s.shape for s in sets] == [(4, 2)] * 3
    np.testing.assert_array_equal(np.stack(sets), batch)


def test_npz_mask_ids_and_ragged(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(2, 5, 3))
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=bool)  # real elements not in front
    np.savez(tmp_path / "dense.npz", sets=x, mask=mask, ids=np.array(["a", "b"]))
    sets, ids = read_sets(tmp_path / "dense.npz", dim_input=3)
    assert ids == ["a", "b"]
    np.testing.assert_allclose(sets[0], x[0, [0, 2, 3]], rtol=1e-6)
    np.testing.assert_allclose(sets[1], x[1, [4]], rtol=1e-6)

    values = np.arange(14, dtype=np.float32).reshape(7, 2)
    np.savez(tmp_path / "ragged.npz", values=values, offsets=np.array([0, 3, 3, 7]))
    sets, ids = read_sets(tmp_path / "ragged.npz", dim_input=2)
    assert ids == [0, 1, 2] and [len(s) for s in sets] == [3, 0, 4]  # an empty set is kept
    np.testing.assert_array_equal(np.concatenate(sets), values)


def test_h5_dense_and_ragged(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"] = x
        f["ids"] = np.array([10, 20])
    sets, ids = read_sets(tmp_path / "d.h5", dim_input=3)
    assert ids == [10, 20]
    np.testing.assert_array_equal(np.stack(sets), x)
    with h5py.File(tmp_path / "r.hdf5", "w") as f:
        f["values"], f["offsets"] = x.reshape(8, 3), np.array([0, 1, 8])
        f["ids"] = np.array([b"p", b"q"])
    sets, ids = read_sets(tmp_path / "r.hdf5")
    assert ids == ["p", "q"] and [len(s) for s in sets] == [1, 7]


def test_csv_one_set_and_set_column(tmp_path: Path) -> None:
    (tmp_path / "one.csv").write_text("x,y\n1,2\n3,4.5\n")
    (tmp_path / "bare.csv").write_text("1,2\n3,4.5\n\n")  # no header, a blank line
    for name in ("one.csv", "bare.csv"):
        sets, ids = read_sets(tmp_path / name, dim_input=2)
        assert ids == [str(tmp_path / name)]
        np.testing.assert_array_equal(sets[0], [[1, 2], [3, 4.5]])
    (tmp_path / "many.csv").write_text("a,set_id,b\n1,s2,2\n3,s1,4\n5,s2,6\n")
    sets, ids = read_sets(tmp_path / "many.csv", set_column="set_id", dim_input=2)
    assert ids == ["s2", "s1"]  # in order of first appearance
    np.testing.assert_array_equal(sets[0], [[1, 2], [5, 6]])
    np.testing.assert_array_equal(sets[1], [[3, 4]])


def test_several_files_get_unique_ids(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros((3, 1)))
    np.save(tmp_path / "batch.npy", np.zeros((2, 3, 1)))
    (tmp_path / "c.csv").write_text("sid,v\na,1\nb,2\n")
    files = [tmp_path / "one.npy", tmp_path / "batch.npy", tmp_path / "c.csv"]
    sets, ids = read_inputs(files, dim_input=1, set_column="sid")
    assert len(sets) == 5
    assert ids == [str(files[0]), f"{files[1]}:0", f"{files[1]}:1", f"{files[2]}:a", f"{files[2]}:b"]


_X = np.zeros((2, 3, 2))
_NAN = _X.copy()
_NAN[1, 2, 0] = np.nan


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda p: np.savez(p, **arrays)


def _saved(save: Callable[..., None], *args: np.ndarray, **kwargs: np.ndarray) -> bytes:
    """The bytes ``np.save`` / ``np.savez`` write, to store under another file name's suffix."""
    buffer = io.BytesIO()
    save(buffer, *args, **kwargs)
    return buffer.getvalue()


def _text(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(text)  # type: ignore[func-returns-value]


BAD_FILES = [
    ("bad.npz", _npz(y=_X), "expected arrays 'x' (or 'sets')"),
    ("bad.npz", _npz(x=_X, values=_X[0], offsets=np.array([0, 3])), "holds x and values and offsets"),
    ("bad.npy", lambda p: np.save(p, np.zeros(5)), "reshape to (N, 1)"),
    ("bad.npz", _npz(x=np.zeros((1, 2, 3, 2))), "expected one set (N, D) or a batch (S, N, D)"),
    ("bad.npz", _npz(x=np.array([["a", "b"], ["c", "d"]])), "expected numbers"),
    ("bad.npz", _npz(x=np.zeros((2, 3, 5))), "5 features, but the model expects dim_input=2"),
    ("bad.npz", _npz(x=_NAN), "set 1: element 2, feature 0 is nan"),
    (
        "bad.npz",
        _npz(values=np.array([[0, 1], [np.inf, 0]]), offsets=np.array([0, 1, 2])),
        "set 1: element 0",
    ),
    ("bad.npz", _npz(values=np.zeros((4, 2)), offsets=np.array([0, 3, 2, 4])), "offsets: expected integers"),
    ("bad.npz", _npz(x=_X, mask=np.ones((2, 4), dtype=bool)), "mask: expected shape (2, 3)"),
    ("bad.npz", lambda p: p.write_bytes(b"not an archive"), "not a valid .npz file"),
    ("bad.npz", lambda p: p.write_bytes(b"PK\x03\x04 cut short"), "not a valid .npz file"),
    (
        "bad.npz",
        lambda p: p.write_bytes(_saved(np.save, _X)),
        "it holds one array, as np.save writes: name it .npy",
    ),
    ("bad.npy", lambda p: p.write_bytes(b"not an array"), "not a valid .npy file (no .npy header"),
    (
        "bad.npy",
        lambda p: p.write_bytes(_saved(np.savez, x=_X)),
        "it is a zip archive, as np.savez writes: name it .npz",
    ),
    ("bad.npy", lambda p: p.write_bytes(b""), "not a valid .npy file (the file is empty)"),
    ("bad.h5", _text("not hdf5"), "not a readable HDF5 file"),
    ("bad.csv", _text("a,b\n1,2\n3,oops\n"), "line 3, column b: 'oops' is not a number"),
    ("bad.csv", _text("a,b\n1,2\n3\n"), "line 3: expected 2 fields"),
    ("bad.csv", _text("a,b\n1,2\nnan,3\n"), "element 1, feature 0 is nan"),
    ("bad.txt", _text("1,2\n"), "unknown input format '.txt'"),
]


@pytest.mark.parametrize(("name", "write", "message"), BAD_FILES)
def test_bad_files_raise_value_error_naming_the_file(
    tmp_path: Path, name: str, write: Callable[[Path], None], message: str
) -> None:
    if name.endswith(".h5"):
        pytest.importorskip("h5py")
    write(path := tmp_path / name)
    with pytest.raises(ValueError) as info:
        read_sets(path, dim_input=2)
    assert str(path) in str(info.value) and message in str(info.value)


class _Payload:
    """Unpickling this creates a file: the proof that a loader ran code from the data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_pickled_inputs_never_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    np.save(tmp_path / "obj.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with open(tmp_path / "raw.npy", "wb") as f:
        pickle.dump(_Payload(marker), f)
    np.savez(tmp_path / "obj.npz", x=np.array([_Payload(marker)], dtype=object))
    for name in ("obj.npy", "raw.npy", "obj.npz"):
        with pytest.raises(ValueError, match="without pickle"):
            read_sets(tmp_path / name)
    assert not marker.exists()


def test_read_set_is_one_set_and_csv_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match=r"batch\.npy: a set is a 2-D array \(N, D\).*got shape \(3, 4, 2\)"):
        read_set(tmp_path / "batch.npy")
    assert read_sets(tmp_path / "batch.npy")[0][0].shape == (4, 2)  # predict's reader takes a batch
    (tmp_path / "bom.csv").write_text("set,a\ns1,1\ns2,2\n", encoding="utf-8-sig")
    assert read_sets(tmp_path / "bom.csv", set_column="set")[1] == ["s1", "s2"]


def test_csv_set_column_errors(tmp_path: Path) -> None:
    (tmp_path / "bare.csv").write_text("1,2\n")
    (tmp_path / "h.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="needs a header row"):
        read_sets(tmp_path / "bare.csv", set_column="sid")
    with pytest.raises(ValueError, match=r"'sid': not in the header \(a, b\)"):
        read_sets(tmp_path / "h.csv", set_column="sid")
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such input file"):
        read_sets(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"is a folder; pass its files \(e\.g\. .*/\*\.npy\)"):
        read_sets(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"afile is a file, not a folder"):
        write_outputs(tmp_path / "afile" / "out.csv", [0], [torch.zeros(1)])


# -- predict ----------------------------------------------------------------------------------


def _model(num_inducing: int | None = 4) -> SetTransformer:
    torch.manual_seed(0)
    return SetTransformer(
        3, num_outputs=2, dim_output=4, dim_hidden=16, num_heads=2, num_inducing=num_inducing
    ).eval()


SIZES = (5, 1, 17, 3, 9, 1, 30, 12)


def _sets(sizes: tuple[int, ...] = SIZES, dim: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(size=(n, dim)).astype(np.float32) for n in sizes]


@pytest.mark.parametrize("model", [_model(), DeepSets(3, 2, 4, dim_hidden=16, pool="max").eval()])
def test_predict_equals_each_set_alone_in_input_order(model: torch.nn.Module) -> None:
    sets = _sets()
    outs = predict(model, sets, batch_size=3, progress=False)
    assert len(outs) == len(sets)
    with torch.no_grad():
        for s, out in zip(sets, outs):
            alone = model(torch.from_numpy(s)[None])[0]
            assert out.shape == (2, 4)
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=0)


def test_predict_chunked_equals_unchunked(tmp_path: Path) -> None:
    model = _model()
    np.save(tmp_path / "big.npy", _sets((40,))[0])
    sets = [*_sets(), np.load(tmp_path / "big.npy", mmap_mode="r")]  # 30 and 40 > chunk_size: alone
    plain = predict(model, sets, batch_size=4, progress=False)
    chunked = predict(model, sets, batch_size=4, chunk_size=8, progress=False)
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_predict_empty_set_and_bad_arguments() -> None:
    model = _model()
    outs = predict(model, [np.zeros((0, 3), np.float32), *_sets((4,))], progress=False)
    assert outs[0].shape == (2, 4) and torch.isfinite(outs[0]).all()
    assert predict(model, [], progress=False) == []
    sets = _sets((4, 6))
    from_generator = predict(model, (s for s in sets), progress=False)
    torch.testing.assert_close(from_generator, predict(model, sets, progress=False))
    with pytest.raises(TypeError, match="sets: expected a sequence of sets"):
        predict(model, 3, progress=False)  # type: ignore[arg-type]
    nan = np.ones((2, 3), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"sets\[1\]: element 1, feature 2 is nan"):  # not the batch position
        predict(model, [np.ones((4, 3), np.float32), nan], progress=False)
    with pytest.raises(
        ValueError, match=r"sets\[1\]: expected a set of shape \(N_i, 3\), got shape \(4, 2\)"
    ):
        predict(model, [np.zeros((2, 3)), np.zeros((4, 2))], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, _sets(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="a SAB attends over the whole set"):
        predict(_model(num_inducing=None), _sets(), chunk_size=4, progress=False)
    # integer sets: refused as the models refuse them, whether the set is streamed in chunks or not
    for size in (3, 30):
        for ints in (np.ones((size, 3), np.int64), torch.ones(size, 3, dtype=torch.long)):
            with pytest.raises(TypeError, match=r"sets\[0\]: expected floating-point values, got dtype"):
                predict(model, [ints], chunk_size=5, progress=False)


def test_predict_keeps_the_training_mode() -> None:
    model = _model().train()
    predict(model, _sets(), progress=False)
    assert model.training


class _Scorer(torch.nn.Module):
    """Per-element outputs ``(B, N)``, as the set-anomaly models."""

    def __init__(self) -> None:
        super().__init__()
        self.sab, self.head = SAB(3, 8, 2), torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.sab(x, mask))[..., 0]


def test_per_element_outputs_are_cut_to_each_set() -> None:
    model = _Scorer().eval()
    assert per_element_output(model, 3) and not per_element_output(_model(), 3)
    sets = _sets()
    outs = predict(model, sets, batch_size=4, progress=False)
    with torch.no_grad():
        for s, out in zip(sets, outs):
            torch.testing.assert_close(out, model(torch.from_numpy(s)[None])[0], atol=1e-5, rtol=0)


def test_models_with_other_inputs_are_refused() -> None:
    task = get_task("kernel-regression")()
    for name in ("average", task.model_names[-1]):
        with pytest.raises(ValueError, match=r"predict supports models with forward\(x, mask\)"):
            predict(task.build_model(name), _sets(dim=2), progress=False)


def test_models_with_queries_get_each_sets_queries_padded_and_cut() -> None:
    """A refusal names where the queries go; with ``queries`` each set's ``Q_i`` values equal the
    model run on that set and its queries alone."""
    task = get_task("kernel-regression")(dim_hidden=8, num_heads=2)
    model = task.build_model("settransformer").eval()
    with pytest.raises(ValueError, match="'queries'"):
        predict(model, _sets(dim=2), progress=False)
    gen = torch.Generator().manual_seed(0)
    sets = [torch.randn(n, 2, generator=gen) for n in (7, 0, 30, 3, 12)]
    queries = [torch.rand(q, 1, generator=gen) for q in (4, 2, 9, 1, 5)]
    outs = predict(model, sets, queries=queries, batch_size=3, progress=False)
    with torch.no_grad():
        for s, q, out in zip(sets[::2], queries[::2], outs[::2], strict=True):  # non-empty sets
            torch.testing.assert_close(out, model(s[None], None, q[None])[0], atol=1e-5, rtol=1e-5)
    assert [o.shape for o in outs] == [(4,), (2,), (9,), (1,), (5,)]
    with pytest.raises(ValueError, match=r"queries: expected one query set per set \(5\), got 4"):
        predict(model, sets, queries=queries[:4], progress=False)


def test_read_queries_dense_ragged_and_errors(tmp_path: Path) -> None:
    q = np.arange(12, dtype=np.float64).reshape(2, 6, 1)
    np.savez(tmp_path / "dense.npz", x=np.zeros((2, 3, 2)), queries=q)
    np.savez(tmp_path / "ragged.npz", values=np.zeros((4, 2)), offsets=[0, 1, 4],
             query_values=q.reshape(12, 1), query_offsets=[0, 5, 12])  # fmt: skip
    dense = read_queries([tmp_path / "dense.npz"])
    assert [a.dtype for a in dense] == [np.float32] * 2 and np.array_equal(np.stack(dense), q)
    ragged = read_queries([tmp_path / "ragged.npz", tmp_path / "dense.npz"])
    assert [a.shape for a in ragged] == [(5, 1), (7, 1), (6, 1), (6, 1)]
    np.savez(tmp_path / "none.npz", x=np.zeros((2, 3, 2)))
    np.savez(tmp_path / "both.npz", queries=q, query_values=q[0], query_offsets=[0, 6])
    np.savez(tmp_path / "nan.npz", queries=np.full((1, 2, 1), np.nan))
    np.save(tmp_path / "set.npy", np.zeros((3, 2)))
    for name, message in [
        ("none.npz", "expected 'queries'.*found x"),
        ("both.npz", "expected 'queries'"),
        ("nan.npz", "queries of set 0: element 0, feature 0 is nan"),
        ("set.npy", "need an .npz or .h5 file"),
    ]:
        with pytest.raises(ValueError, match=message):
            read_queries([tmp_path / name])


# -- writing ----------------------------------------------------------------------------------


def test_write_each_format_and_refuse_overwrite(tmp_path: Path) -> None:
    outs = [torch.tensor([[0.1, 2.0], [3.0, -4.5]]), torch.tensor([[1e-8, 0.0], [7.0, 8.0]])]
    ids = ["a", 7]
    write_outputs(tmp_path / "o.npy", ids, outs)
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), torch.stack(outs).numpy())
    write_outputs(tmp_path / "o.jsonl", ids, outs)
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[0] == {"set": "a", "output": [[0.1, 2.0], [3.0, -4.5]]} and rows[1]["set"] == 7
    write_outputs(tmp_path / "o.csv", ids, outs)
    table = list(csv.reader((tmp_path / "o.csv").open()))
    assert table[0] == ["set", "output_0_0", "output_0_1", "output_1_0", "output_1_1"]
    assert table[1] == ["a", "0.1", "2.0", "3.0", "-4.5"] and np.float32(table[2][1]) == np.float32(1e-8)

    before = (tmp_path / "o.csv").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        write_outputs(tmp_path / "o.csv", ids, outs[::-1])
    assert (tmp_path / "o.csv").read_bytes() == before
    write_outputs(tmp_path / "o.csv", ids, outs[::-1], overwrite=True)
    assert (tmp_path / "o.csv").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.csv", "o.jsonl", "o.npy"]  # no temp files


def test_write_bfloat16_outputs_and_no_outputs(tmp_path: Path) -> None:
    """A bfloat16 model's outputs (NumPy has no bfloat16) are written as float32, whose values they are."""
    outs = [torch.tensor(v, dtype=torch.bfloat16) for v in ([[0.5, -3.0]], [[1.0, 2.0]])]
    for suffix in (".npy", ".csv", ".jsonl"):
        write_outputs(tmp_path / f"o{suffix}", ["a", "b"], outs)
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), [[[0.5, -3.0]], [[1.0, 2.0]]])
    assert list(csv.reader((tmp_path / "o.csv").open()))[1] == ["a", "0.5", "-3.0"]
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[1])["output"] == [[1.0, 2.0]]
    for suffix in (".npy", ".csv", ".jsonl"):
        write_outputs(tmp_path / f"empty{suffix}", [], [], labels=None if suffix == ".npy" else [])
    assert np.load(tmp_path / "empty.npy").shape == (0,)
    assert list(csv.reader((tmp_path / "empty.csv").open())) == [["set", "label"]]
    assert (tmp_path / "empty.jsonl").read_text() == ""


def test_write_per_element_outputs(tmp_path: Path) -> None:
    outs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])]
    write_outputs(tmp_path / "o.csv", ["a", "b"], outs, per_element=True)
    table = list(csv.reader((tmp_path / "o.csv").open()))
    assert table[0] == ["set", "element", "output"]
    assert table[1:] == [["a", "0", "1.0"], ["a", "1", "2.0"], ["a", "2", "3.0"], ["b", "0", "4.0"]]
    with pytest.raises(ValueError, match="do not stack into one array"):
        write_outputs(tmp_path / "o.npy", ["a", "b"], outs, per_element=True)
    assert not (tmp_path / "o.npy").exists()


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A max-regression DeepSets run trained for 3 steps (a second or two)."""
    folder = tmp_path_factory.mktemp("predict") / "run"
    argv = ["train", "max-regression", "--model", "deepsets-max", "--out", str(folder), "--steps", "3"]
    argv += ["--batch-size", "8", "--set", "test_sets=16", "--set", "dim_hidden=8", "--no-progress"]
    assert cli.main(argv) == 0
    return folder


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["predict", *argv])
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_predicts_to_each_format(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    sets = [rng.uniform(0, 100, size=(n, 1)) for n in (4, 1, 9)]
    np.savez(tmp_path / "in.npz", values=np.concatenate(sets), offsets=np.array([0, 4, 5, 14]))
    _, model, _ = load_run(run, which="last", device="cpu")
    expected = torch.stack(predict(model, [s.astype(np.float32) for s in sets], progress=False)).numpy()
    assert expected.shape == (3,)  # max-regression: one number per set

    inputs = ["--input", str(tmp_path / "in.npz"), "--no-progress", "--batch-size", "2"]
    for suffix in (".npy", ".csv", ".jsonl"):
        out = tmp_path / f"out{suffix}"
        code, _, err = _cli(capsys, str(run), *inputs, "--output", str(out), "--device", "cpu")
        assert code == 0, err
        assert f"3 sets written to {out}" in err
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6)
    table = list(csv.reader((tmp_path / "out.csv").open()))
    assert table[0] == ["set", "output"] and [r[0] for r in table[1:]] == ["0", "1", "2"]
    np.testing.assert_allclose([float(r[1]) for r in table[1:]], expected, rtol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == [0, 1, 2]
    np.testing.assert_allclose([r["output"] for r in rows], expected, rtol=1e-6)

    # several inputs, CSV with a set column, JSON lines on stdout
    (tmp_path / "in.csv").write_text("sid,v\nb,10\na,3\nb,70\n")
    code, out, _ = _cli(
        capsys, str(run), "--input", str(tmp_path / "in.csv"), "--set-column", "sid", "--which", "best"
    )
    assert code == 0
    assert [json.loads(line)["set"] for line in out.splitlines()] == ["b", "a"]


def test_cli_reads_a_checkpoint_file_alone(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "in.npy", np.full((2, 5, 1), 50.0))
    outputs = []
    for source in (run, run / "checkpoint.pt"):
        code, out, err = _cli(capsys, str(source), "--input", str(tmp_path / "in.npy"), "--no-progress")
        assert code == 0, err
        outputs.append([json.loads(line) for line in out.splitlines()])
    assert outputs[0] == outputs[1] and [r["set"] for r in outputs[0]] == [0, 1]


def test_cli_refuses_to_overwrite(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "in.npy", np.ones((3, 1)))
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    argv = [str(run), "--input", str(tmp_path / "in.npy"), "--output", str(out), "--no-progress"]
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and "already exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "precious\n"
    code, _, err = _cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert json.loads(out.read_text())["set"] == str(tmp_path / "in.npy")


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (np.ones((3, 2)), [], "2 features, but the model expects dim_input=1"),
        ("a,b\n1,x\n", [], "line 2, column b: 'x' is not a number"),
        ("v\nnan\n", [], "feature 0 is nan"),
        (np.ones((3, 1)), ["--output", "out.txt"], "unknown output format '.txt'"),
        (np.ones((3, 1)), ["--chunk-size", "4"], "has no chunked forward"),
        (np.ones((3, 1)), ["--set-column", "sid"], "applies to .csv inputs"),
        (None, [], "no such file"),
        (np.ones((3, 1)), ["--batch-size", "0"], "--batch-size: expected a positive integer"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    content: object,
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    name = "in.csv" if isinstance(content, str) else "in.npy"
    if isinstance(content, str):
        Path(name).write_text(content)
    elif content is not None:
        np.save(name, content)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _cli(capsys, str(run), "--input", name, "--output", "out.jsonl", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_cli_input_folder_is_refused_with_a_hint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _cli(capsys, str(run), "--input", str(tmp_path), "--output", str(tmp_path / "o.csv"))
    assert code == 2 and f"--input {tmp_path}: is a folder; pass its files" in err


def test_cli_help_explains_every_flag() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["predict"]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"--input", "--set-column", "--output", "--overwrite", "--device", "--batch-size"} <= flags
    assert {"--chunk-size", "--which", "--no-progress"} <= flags
    for action in sub._actions:
        assert action.help, f"predict {action.option_strings or action.dest} has no help"


def test_no_progress_bar_into_a_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    model = DeepSets(3, 1, 2, dim_hidden=8).eval()
    predict(model, _sets((4, 5, 6)), progress=True)  # pytest's captured stderr is no terminal
    assert "\r" not in capsys.readouterr().err
