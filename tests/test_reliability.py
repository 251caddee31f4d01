"""The reliability catalogue: every bad input a user can give each command ends with one line on
stderr, exit code 2, no traceback, and an existing run folder byte-for-byte unchanged; plus the
checks behind it (finite chunked input, one writer per run folder, verified checkpoints, atomic
writes that name full disks and read-only folders)."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli as _run

from settransformer import cli
from settransformer.data import files
from settransformer.nn.models import DeepSets, SetTransformer
from settransformer.nn.validation import finite_checks
from settransformer.tasks import runs
from settransformer.training.checkpoint import load_checkpoint
from settransformer.training.config import TrainConfig

TINY = [
    "--steps",
    "3",
    "--batch-size",
    "8",
    "--set",
    "test_sets=32",
    "--set",
    "dim_hidden=8",
    "--no-progress",
]
TRAIN = ["train", "max-regression", "--model", "deepsets-max"]


pytestmark = pytest.mark.usefixtures("in_tmp_dir")


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny finished run, copied for each test that needs one."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    assert cli.main([*TRAIN, "--out", str(folder), *TINY]) == 0
    return folder


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    for p in trained.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return Path("run")


# -- 1. chunked evaluation refuses NaN/inf like the unchunked forward pass -------------------------


def _sources(x: torch.Tensor, tmp_path: Path) -> Iterator[tuple[str, object]]:
    yield "tensor", x
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=tuple(x.shape))
    mm[:] = x.numpy()
    mm.flush()
    yield "memmap", np.load(tmp_path / "x.npy", mmap_mode="r")
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = x.numpy()
    with h5py.File(tmp_path / "x.h5", "r") as f:
        yield "hdf5", f["x"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["settransformer", "deepsets"])
def test_chunked_refuses_nonfinite_like_unchunked(bad: float, kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if kind == "settransformer":
        model = SetTransformer(3, 1, 2, dim_hidden=8, num_heads=2, num_inducing=4).eval()
    else:
        model = DeepSets(3, 1, 2, dim_hidden=8).eval()
    x = torch.randn(2, 50, 3)
    x[1, 37, 0] = bad
    with pytest.raises(ValueError, match="finite"):
        model(x)
    for name, source in _sources(x, tmp_path):
        with pytest.raises(ValueError, match="finite") as info:
            model(source, chunk_size=16)
        assert "32:48" in str(info.value), name  # names the chunk holding element 37
    with finite_checks(False), torch.no_grad():
        model(x, chunk_size=16)  # switched off: no check


def test_chunked_ignores_nonfinite_padding() -> None:
    model = DeepSets(3, 1, 2, dim_hidden=8).eval()
    x, mask = torch.randn(1, 20, 3), torch.ones(1, 20, dtype=torch.bool)
    x[0, 15:] = float("nan")
    mask[0, 15:] = False
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask, chunk_size=4), model(x, mask))


# -- 2. one atomic writer; operating-system errors are one line ------------------------------------


def test_atomic_write_names_full_disk_and_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = files.write_text_atomic(tmp_path / "a.pt", "old")

    def full(f: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.WriteError, match=r"^disk full while writing .*a\.pt$"):
        files.atomic_write(target, full)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary left


def test_torch_save_full_disk_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a failing write as a RuntimeError ('unexpected pos'): the cause is found."""
    from settransformer.training.checkpoint import save_checkpoint

    real_open = open

    class Full:
        def __init__(self, f: object) -> None:
            self.f = f

        def write(self, b: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self.f, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *a: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

    monkeypatch.setattr(files, "open", lambda p, m="r": Full(real_open(p, m)), raising=False)
    with pytest.raises(files.WriteError, match="disk full while writing"):
        save_checkpoint({"w": torch.zeros(100)}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "message"),
    [(errno.EROFS, "is read-only"), (errno.EACCES, "is read-only"), (errno.ENOSPC, "disk full")],
)
def test_os_error_messages(code: int, message: str) -> None:
    assert message in files.os_error_message(OSError(code, os.strerror(code)), "runs/x/config.json")


def test_eval_writes_results_atomically(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (run / "results.json").write_text('{"old": true}\n')

    def fail(f: object) -> None:
        raise OSError(errno.EFBIG, "File too large")

    real = files.atomic_write
    monkeypatch.setattr(files, "atomic_write", lambda p, w: real(p, fail))
    code, _, err = _run(capsys, "eval", str(run))
    assert code == 2 and "results.json" in err and err.count("\n") == 1
    assert json.loads((run / "results.json").read_text()) == {"old": True}


def test_csv_ids_are_escaped_against_formulas(tmp_path: Path) -> None:
    from settransformer.deploy.inference import write_outputs

    out = write_outputs(tmp_path / "o.csv", ["=cmd|' /C calc'!A0", "+1", "ok"], [torch.zeros(1)] * 3)
    rows = out.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["'=cmd|' /C calc'!A0", "'+1", "ok"]


# -- 3. one writer per run folder ------------------------------------------------------------------


def _hold_lock(
    folder: str, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event
) -> None:
    with runs.run_lock(folder):
        ready.set()
        done.wait(60)


def test_second_writer_is_refused_while_the_first_holds_the_run(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run.resolve()), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        before = _hashes(run)
        for argv in (
            ["train", "max-regression", "--out", str(run), "--resume", "--no-progress"],
            ["eval", str(run)],
            ["plot", str(run)],
        ):
            code, _, err = _run(capsys, *argv)
            assert code == 2, (argv, err)
            assert f"is in use by pid {holder.pid} on host" in err and err.count("\n") == 1
            assert "Traceback" not in err
            assert _hashes(run) == before
    finally:
        done.set()
        holder.join(30)
    assert not (run / runs.LOCK_FILE).exists()  # released with its holder
    assert _run(capsys, "eval", str(run))[0] == 0  # free again


def test_fresh_train_into_a_locked_folder_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "new"), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        code, _, err = _run(capsys, *TRAIN, "--out", "new", *TINY)
        assert code == 2 and "in use by pid" in err
        assert [p.name for p in Path("new").iterdir()] == [runs.LOCK_FILE]
    finally:
        done.set()
        holder.join(30)


# -- 4. corrupted checkpoints are refused -----------------------------------------------------------


def _flip_inside_weights(path: Path, count: int = 64) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start, start + min(count, info.compress_size)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_is_refused_by_eval_and_predict(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _flip_inside_weights(run / "checkpoint.pt")
    with pytest.raises(ValueError, match="CRC"):
        load_checkpoint(run / "checkpoint.pt")
    np.save("x.npy", np.ones((5, 1), np.float32))
    before = _hashes(run)
    for argv in (
        ["eval", str(run)],
        ["predict", str(run), "--input", "x.npy"],
        ["eval", str(run / "checkpoint.pt")],
    ):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and "checkpoint.pt" in err and "CRC" in err and err.count("\n") == 1, (argv, err)
        assert out == ""
    assert _hashes(run) == before


def test_cuda_map_location_without_cuda_blames_the_machine(run: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA, which is unavailable"):
        load_checkpoint(run / "checkpoint.pt", map_location="cuda")


# -- 5. --resume continues exactly the saved run ---------------------------------------------------


def test_resume_refuses_changed_settings_unless_allowed(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _hashes(run)
    resume = ["train", "max-regression", "--out", str(run), "--resume", "--no-progress"]
    for extra in (["--lr", "0.01"], ["--seed", "3"], ["--batch-size", "4"], ["--steps", "5", "--lr", "0.5"]):
        code, _, err = _run(capsys, *resume, *extra)
        assert code == 2 and "differ from the checkpoint" in err and "--allow-changes" in err, err
        assert _hashes(run) == before
    config = json.loads((run / "config.json").read_text())
    config["train"]["lr"] = 0.123
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, *resume)
    assert code == 2 and "lr" in err and "0.123" in err
    config["train"] = json.loads(Path(run / "config.json").read_text())["train"] | {"lr": 1e-3}
    config["task_options"]["high"] = 5.0
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, *resume)
    assert code == 2 and "task options differ" in err and "high" in err


def test_resume_with_allow_changes_records_them(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys,
        "train",
        "max-regression",
        "--out",
        str(run),
        "--resume",
        "--no-progress",
        "--steps",
        "5",
        "--allow-changes",
    )
    assert code == 0, err
    (record,) = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert record == {"step": 3, "changes": {"steps": [3, 5]}}


def test_resume_checks_the_weights_against_the_model(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["model"] = {k + "_renamed": v for k, v in state["model"].items()}
    torch.save(state, run / "checkpoint.pt")
    before = _hashes(run)
    code, _, err = _run(capsys, "train", "max-regression", "--out", str(run), "--resume", "--no-progress")
    assert code == 2 and "do not fit" in err and "Traceback" not in err
    assert _hashes(run) == before


# -- 6. settings validated where they are parsed ---------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"lr": 1e30},
        {"lr": 0.0},
        {"weight_decay": float("nan")},
        {"weight_decay": -1.0},
        {"lr_gamma": -0.5},
        {"lr_gamma": 2.0},
        {"seed": 10**23},
        {"seed": -1},
        {"clip_min": float("nan")},
        {"clip_norm": float("nan")},
        {"batch_size": 10**11},
        {"steps": 0},
        {"lr_milestones": [-3]},
    ],
)
def test_config_refuses_nonsense(setting: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(setting))):
        TrainConfig.from_dict(setting)


def test_long_values_are_quoted_short() -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict({"optimizer": "x" * 100_000})
    assert len(str(info.value)) < 400


# -- 7. the catalogue: each command against each bad input ------------------------------------------

RESUME = ["train", "max-regression", "--out", "run", "--resume", "--no-progress"]
FRESH = [*TRAIN, "--out", "fresh", *TINY]

CATALOGUE: list[tuple[str, list[str]]] = [
    ("lr nan", [*FRESH, "--lr", "nan"]),
    ("lr inf", [*FRESH, "--lr", "inf"]),
    ("lr huge", [*FRESH, "--lr", "1e30"]),
    ("weight decay nan", [*FRESH, "--weight-decay", "nan"]),
    ("seed too large", [*FRESH, "--seed", str(10**23)]),
    ("clip-min nan", [*FRESH, "--clip-min", "nan"]),
    ("lr gamma negative", [*FRESH, "--lr-gamma", "-0.5"]),
    ("batch size huge", [*FRESH, "--batch-size", str(10**11)]),
    ("num_heads 0", [*FRESH, "--set", "num_heads=0"]),
    ("num_heads 3 of 8", [*TRAIN[:2], "--out", "fresh", *TINY, "--set", "num_heads=3"]),
    ("dim_hidden 0", [*FRESH, "--set", "dim_hidden=0"]),
    ("dim_hidden huge", [*FRESH, "--set", "dim_hidden=100000"]),
    ("high 1e308", [*FRESH, "--set", "high=1e308"]),
    ("test_sets huge", [*FRESH, "--set", f"test_sets={10**12}"]),
    ("resume other lr", [*RESUME, "--lr", "0.01"]),
    ("resume other seed", [*RESUME, "--seed", "5"]),
    ("resume other task", ["train", "count-unique", "--out", "run", "--resume"]),
    ("fresh into existing run", [*TRAIN, "--out", "run", *TINY]),
    ("eval missing run", ["eval", "nothere"]),
    ("predict bad input", ["predict", "run", "--input", "bad.npy"]),
    ("predict nan input", ["predict", "run", "--input", "nan.npy"]),
    ("predict nan input chunked", ["predict", "run", "--input", "nan.npy", "--chunk-size", "2"]),
    ("predict unsigned offsets", ["predict", "run", "--input", "offsets.npz"]),
    ("export existing output", ["export", "run", "--format", "torchscript", "--output", "run/config.json"]),
]


def _bad_inputs() -> None:
    Path("bad.npy").write_bytes(b"not numpy")
    x = np.ones((6, 1), np.float32)
    x[4, 0] = np.nan
    np.save("nan.npy", x)
    np.savez("offsets.npz", values=np.ones((10, 1), np.float32), offsets=np.array([0, 8, 2, 10], np.uint64))


@pytest.mark.parametrize(("case", "argv"), CATALOGUE, ids=[c for c, _ in CATALOGUE])
def test_catalogue(case: str, argv: list[str], run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _bad_inputs()
    before = _hashes(run)
    code, out, err = _run(capsys, *argv)
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1 and "error" in err, err
    assert "Traceback" not in err and len(err) < 1000
    assert _hashes(run) == before
    assert not Path("fresh").exists() or not any(Path("fresh").iterdir())


@pytest.mark.parametrize("command", ["train", "resume", "eval", "plot", "export", "predict"])
def test_catalogue_read_only_folder(
    command: str, run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only file system (EROFS; the tests run as root, which chmod cannot stop)."""
    np.save("x.npy", np.ones((5, 1), np.float32))
    real_open, real_mkdir = os.open, Path.mkdir

    def ro_open(path: object, flags: int, *a: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    def ro_mkdir(self: Path, *a: object, **k: object) -> None:
        if not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_mkdir(self, *a, **k)  # type: ignore[arg-type]

    argv = {
        "train": FRESH,
        "resume": [*RESUME],
        "eval": ["eval", "run"],
        "plot": ["plot", "run"],
        "export": ["export", "run", "--format", "torchscript"],
        "predict": ["predict", "run", "--input", "x.npy", "--output", "run/out.csv", "--no-progress"],
    }[command]
    before = _hashes(run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", ro_open)
        mp.setattr(Path, "mkdir", ro_mkdir)
        code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert "read-only" in err and err.count("\n") == 1 and "Traceback" not in err
    assert _hashes(run) == before


# -- 8. more of the catalogue: config files, checkpoints holding huge options, first write failing ---


def _laughs(key: str) -> str:
    """A YAML of under 300 bytes whose nested aliases make a value of 9**8 strings."""
    levels = ["&a [" + ",".join(["lol"] * 9) + "]"]
    levels += [f"&{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefg", "bcdefgh")]
    return f"{key}: [{', '.join(levels)}]\n"


def _config_files(run: Path) -> None:
    Path("clip.yaml").write_text("clip_norm: .nan\n")
    Path("batch.yaml").write_text(f"batch_size: {10**11}\n")
    Path("laughs.yaml").write_text(_laughs("lr"))
    Path("laughs_task.yaml").write_text(_laughs("task_options: {high").replace("]\n", "]}\n"))
    huge = Path("huge")
    huge.mkdir()
    for p in run.iterdir():
        (huge / p.name).write_bytes(p.read_bytes())
    state = torch.load(huge / "checkpoint.pt", weights_only=True)
    state["task_options"]["test_sets"] = 10**12
    torch.save(state, huge / "checkpoint.pt")
    config = json.loads((huge / "config.json").read_text())
    config["task_options"]["test_sets"] = 10**12
    (huge / "config.json").write_text(json.dumps(config))


MORE: list[tuple[str, list[str]]] = [
    ("config clip_norm NaN", [*FRESH, "--config", "clip.yaml"]),
    (
        "config batch_size huge",
        [*TRAIN, "--out", "fresh", "--steps", "3", "--no-progress", "--config", "batch.yaml"],
    ),
    ("config nested aliases", [*FRESH, "--config", "laughs.yaml"]),
    ("config nested aliases in a task option", [*FRESH, "--config", "laughs_task.yaml"]),
    ("eval checkpoint with a huge option", ["eval", "huge"]),
    ("eval checkpoint file with a huge option", ["eval", "huge/checkpoint.pt"]),
    ("resume checkpoint with a huge option", ["train", "max-regression", "--out", "huge", "--resume"]),
]


@pytest.mark.parametrize(("case", "argv"), MORE, ids=[c for c, _ in MORE])
def test_catalogue_settings_files(
    case: str, argv: list[str], run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _config_files(run)
    before, huge = _hashes(run), _hashes(Path("huge"))
    start = time.perf_counter()
    code, out, err = _run(capsys, *argv)
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err and len(err) < 1000, err
    assert time.perf_counter() - start < 5  # the aliased value is never expanded whole
    assert _hashes(run) == before and _hashes(Path("huge")) == huge
    assert not Path("fresh").exists()


def test_a_run_whose_first_write_failed_can_start_over(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import settransformer.training.checkpoint as checkpoint

    def full(path: object, write: object) -> None:
        raise files.WriteError(f"disk full while writing {path}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "atomic_write", full)
        code, _, err = _run(capsys, *TRAIN, "--out", "w", *TINY)
    assert (
        code == 2
        and err.splitlines()[-1] == "settransformer train: error: disk full while writing w/checkpoint.pt"
    )
    assert not Path("w/checkpoint.pt").exists()
    code, _, err = _run(capsys, *TRAIN, "--out", "w", *TINY)  # no step to lose: a fresh run starts over
    assert code == 0, err
    assert (Path("w") / "checkpoint.pt").exists()
    lines = (Path("w") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][-1] == 3
    Path("other").mkdir()
    (Path("other") / "config.json").write_text('{"mine": 1}')  # not a run's: never overwritten
    code, _, err = _run(capsys, *TRAIN, "--out", "other", *TINY)
    assert code == 2 and "not empty" in err


# -- 9. user data files: pointcloud (source=array and HDF5) and digits-clustering (features_path) ---


def _user_files() -> None:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    pts, lab = rng.normal(size=(20, 16, 3)).astype(np.float32), np.arange(20) % 2
    bad_pts = pts.copy()
    bad_pts[3, 2, 1] = np.nan
    np.savez("pc_no_labels.npz", points=pts)
    np.savez("pc_wrong_keys.npz", clouds=pts, y=lab)
    np.savez("pc_nan.npz", points=bad_pts, labels=lab)
    np.savez("pc_2d.npz", points=pts[:, :, 0], labels=lab)
    np.savez("pc_d1.npz", points=pts[:, :, :1], labels=lab)
    np.savez("pc_str_labels.npz", points=pts, labels=np.array(["a", "b"] * 10))
    np.savez("pc_huge_label.npz", points=pts, labels=np.where(lab == 1, 10**9, 0))
    np.savez("pc_nan_label.npz", points=pts, labels=np.where(lab == 1, np.nan, 0.0))
    np.savez("pc_object.npz", points=np.array([pts[0], pts[1][:3]], dtype=object), labels=lab[:2])
    Path("pc_corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    with h5py.File("pc_dangling.h5", "w") as f:
        f["tr_cloud"] = h5py.ExternalLink("missing.h5", "/data")
        f["tr_labels"] = lab
    with h5py.File("pc_loop.h5", "w") as f:
        f["tr_cloud"] = h5py.SoftLink("/a")
        f["a"] = h5py.SoftLink("/tr_cloud")
        f["tr_labels"] = lab
    with h5py.File("pc_str_labels.h5", "w") as f:
        f["tr_cloud"], f["tr_labels"] = pts, np.array([b"a", b"b"] * 10)
        f["test_cloud"], f["test_labels"] = pts, lab
    with h5py.File("pc_no_labels.h5", "w") as f:
        f["tr_cloud"] = pts
    feat, fl = rng.normal(size=(60, 8)), np.arange(60) % 3
    bad_feat = feat.copy()
    bad_feat[5, 2] = np.nan
    np.savez("f_no_labels.npz", features=feat)
    np.savez("f_wrong_keys.npz", x=feat, y=fl)
    np.savez("f_nan.npz", features=bad_feat, labels=fl)
    np.savez("f_1d.npz", features=feat[:, 0], labels=fl)
    np.savez("f_str_labels.npz", features=feat, labels=np.array(["a", "b", "c"] * 20))
    np.savez("f_few_classes.npz", features=feat, labels=np.arange(60) % 2)
    np.savez("f_few_features.npz", features=feat[:, :3], labels=fl)
    Path("f_corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    with h5py.File("f_dangling.h5", "w") as f:
        f["features"] = h5py.ExternalLink("missing.h5", "/data")
        f["labels"] = fl
    with h5py.File("f_loop.h5", "w") as f:
        f["features"] = h5py.SoftLink("/a")
        f["a"] = h5py.SoftLink("/features")
        f["labels"] = fl
    with h5py.File("x_dangling.h5", "w") as f:
        f["x"] = h5py.ExternalLink("missing.h5", "/data")
    with h5py.File("x_loop.h5", "w") as f:
        f["x"] = h5py.SoftLink("/x2")
        f["x2"] = h5py.SoftLink("/x")


_POINTS = ["train", "pointcloud", "--out", "fresh", *TINY[:4], "--no-progress", "--set", "dim_hidden=8"]
_CLUSTER = [
    "train",
    "digits-clustering",
    "--out",
    "fresh",
    *TINY[:4],
    "--no-progress",
    "--set",
    "num_clusters=3",
    "--set",
    "pca=4",
    "--set",
    "dim_hidden=8",
]
USER_DATA: list[tuple[str, list[str], str]] = [
    *(
        (f"pointcloud array {name}", [*_POINTS, "--set", "source=array", "--set", f"path={name}"], name)
        for name in (
            "pc_no_labels.npz",
            "pc_wrong_keys.npz",
            "pc_nan.npz",
            "pc_2d.npz",
            "pc_d1.npz",
            "pc_str_labels.npz",
            "pc_huge_label.npz",
            "pc_nan_label.npz",
            "pc_object.npz",
            "pc_corrupt.npz",
        )
    ),
    *(
        (f"pointcloud hdf5 {name}", [*_POINTS, "--set", "source=deepsets-h5", "--set", f"path={name}"], name)
        for name in ("pc_dangling.h5", "pc_loop.h5", "pc_str_labels.h5", "pc_no_labels.h5")
    ),
    *(
        (f"digits-clustering {name}", [*_CLUSTER, "--set", f"features_path={name}"], name)
        for name in (
            "f_no_labels.npz",
            "f_wrong_keys.npz",
            "f_nan.npz",
            "f_1d.npz",
            "f_str_labels.npz",
            "f_few_classes.npz",
            "f_few_features.npz",
            "f_corrupt.npz",
            "f_dangling.h5",
            "f_loop.h5",
            "f_missing.npz",
        )
    ),
    ("predict hdf5 dangling link", ["predict", "run", "--input", "x_dangling.h5"], "x_dangling.h5"),
    ("predict hdf5 link loop", ["predict", "run", "--input", "x_loop.h5"], "x_loop.h5"),
]


@pytest.mark.parametrize(("case", "argv", "name"), USER_DATA, ids=[c for c, _, _ in USER_DATA])
def test_catalogue_user_data(
    case: str, argv: list[str], name: str, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _user_files()
    before = _hashes(run)
    code, out, err = _run(capsys, *argv)
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err and len(err) < 1000, err
    assert name in err  # names the file
    assert _hashes(run) == before
    assert not Path("fresh").exists()


def _link_file(path: str, key: str, kind: str) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        if kind == "dangling external":
            f[key] = h5py.ExternalLink("missing.h5", "/data")
        elif kind == "dangling soft":
            f[key] = h5py.SoftLink("/nowhere")
        else:
            f[key] = h5py.SoftLink("/loop")
            f["loop"] = h5py.SoftLink(f"/{key}")
        for other in ("labels", "tr_labels", "label"):
            if other != key:
                f[other] = np.zeros(4, np.int64)


@pytest.mark.parametrize("kind", ["dangling external", "dangling soft", "loop"])
@pytest.mark.parametrize("reader", ["set_files", "features", "deepsets", "pointnet", "images", "targets"])
def test_every_hdf5_reader_names_a_broken_link(kind: str, reader: str) -> None:
    from settransformer.data import features, images, pointclouds, set_files
    from settransformer.tasks import labelled_sets

    key, call = {
        "set_files": ("x", lambda p: set_files.read_sets(p)),
        "features": ("features", features.load_features),
        "deepsets": ("tr_cloud", pointclouds.load_deepsets_h5),
        "pointnet": ("data", lambda p: pointclouds.load_pointnet_h5(Path(p).parent)),
        "images": ("images", images.load_image_array),
        "targets": ("y", lambda p: labelled_sets._stored_array(Path(p), "y")),
    }[reader]
    Path("release").mkdir()
    path = "release/ply_data_train0.h5"
    _link_file(path, key, kind)
    with pytest.raises(ValueError) as info:
        call(path)
    message = str(info.value)
    assert path in message and repr(key) in message and "link" in message and "\n" not in message


def test_npz_readers_decompress_only_the_arrays_they_use() -> None:
    """An unused array that cannot be read (an object array, or a huge one) costs nothing."""
    from settransformer.data.pointclouds import load_array
    from settransformer.data.set_files import read_sets

    junk = np.array([object()] * 3, dtype=object)
    np.savez("sets.npz", x=np.ones((2, 3, 1), np.float32), junk=junk)
    assert len(read_sets("sets.npz")[0]) == 2
    np.savez("clouds.npz", points=np.ones((10, 4, 3), np.float32), labels=np.arange(10) % 2, junk=junk)
    assert load_array("clouds.npz").num_classes == 2


# -- 10. official weights and the MoG cache ----------------------------------------------------------


def test_load_official_refuses_an_absurd_layer_index_before_building() -> None:
    from settransformer import compat

    state = compat.to_official_state_dict(
        compat.official_set_transformer(2, 1, 1, num_inds=4, dim_hidden=8, num_heads=2)
    )
    built: list[int] = []
    real = compat.official_set_transformer

    def counting(*a: object, **k: object) -> SetTransformer:
        built.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    for key in ("enc.400.I", "dec.99999999999999999999.weight"):
        bad = {**state, key: state["enc.0.I"]}
        start = time.perf_counter()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compat, "official_set_transformer", counting)
            with pytest.raises(ValueError, match=r"numbered 0, 1, 2, \.\.\. without gaps") as info:
                compat.load_official(bad, 2, 1, 1, num_inds=4, dim_hidden=8, num_heads=2)
        assert built == [] and time.perf_counter() - start < 1
        assert len(str(info.value)) < 300
    with pytest.raises(ValueError, match="unexpected keys"):
        compat.load_official({**state, "x" * 10_000: state["enc.0.I"]}, 2, 1, 1, num_inds=4, dim_hidden=8)


@pytest.mark.parametrize("edit", ["oracle_ll", "x"])
def test_a_tampered_mog_cache_is_regenerated_not_reported(edit: str, tmp_path: Path) -> None:
    from settransformer.data.mixtures import load_benchmark

    kwargs = {"num_sets": 4, "min_size": 5, "max_size": 9}
    data = load_benchmark(tmp_path, **kwargs)
    (path,) = tmp_path.glob("mog-benchmark-*.pt")
    stored = torch.load(path, weights_only=True)
    stored["data"][edit] = stored["data"][edit] + 1.0
    torch.save(stored, path)
    with pytest.warns(UserWarning, match="checksum mismatch"):
        again = load_benchmark(tmp_path, **kwargs)
    assert all(torch.equal(again[k], data[k]) for k in data)
    stored = torch.load(path, weights_only=True)  # the cache was rewritten
    assert torch.equal(stored["data"]["oracle_ll"], data["oracle_ll"])
