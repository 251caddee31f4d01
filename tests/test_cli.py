"""The ``settransformer`` command end to end on tiny budgets, and its error paths."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli as _run

from settransformer import cli
from settransformer import tasks as registry

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


pytestmark = pytest.mark.usefixtures("in_tmp_dir")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Path:
    code, out, _ = _run(capsys, "train", "max-regression", "--model", "deepsets-max", "--out", "run", *TINY)
    assert code == 0, out
    return Path("run")


def test_train_writes_a_complete_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = {p.name for p in run.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "best.pt",
        "results.json",
        "max_regression.png",
    } <= names
    info = json.loads((run / "config.json").read_text())
    assert info["model"] == "deepsets-max" and info["task_options"]["test_sets"] == 32
    assert info["train"]["steps"] == 3 and info["train"]["lr"] == 1e-3  # the rest from the paper budget
    assert json.loads((run / "results.json").read_text())["metrics"]["mae"] > 0


def test_default_run_folder_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "train", "max-regression", *TINY)
    assert code == 0
    (folder,) = Path("runs/max-regression").iterdir()
    assert folder.name.startswith("settransformer-") and (folder / "checkpoint.pt").exists()
    assert "mae:" in out


def test_eval_and_plot(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "max_regression.png").unlink()
    (run / "results.json").unlink()
    code, out, _ = _run(capsys, "eval", str(run), "--checkpoint", "best", "--device", "cpu")
    assert code == 0 and "mae:" in out
    results = json.loads((run / "results.json").read_text())
    assert (
        results["checkpoint"] == "best" and results["step"] == 3 and f"{results['metrics']['mae']:.6g}" in out
    )
    code, out, _ = _run(capsys, "plot", str(run))
    assert code == 0 and (run / "max_regression.png").stat().st_size > 1000


def test_resume_continues_the_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = _run(
        capsys, "train", "max-regression", "--out", str(run), "--resume", "--steps", "5", "--allow-changes"
    )
    assert code == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 5]  # log_every=10: a line at each evaluation (the end of each part)
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 5


def test_reproduce_writes_the_table_beside_the_paper(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["reproduce", "max-regression", "--models", "deepsets-mean,settransformer", "--seeds", "2"]
    code, out, _ = _run(capsys, *argv, "--out", "rep", *TINY)
    assert code == 0
    md = Path("rep/results.md").read_text()
    assert "| `deepsets-mean` |" in md and "| `settransformer` |" in md and "deepsets-max" not in md
    assert "2.133 ± 0.19" in md and "0.2085 ± 0.013" in md  # the paper's numbers beside ours
    results = json.loads(Path("rep/results.json").read_text())
    assert len(results["runs"]["settransformer"]) == 2 and results["settings"]["seeds"] == [0, 1]
    assert Path("rep/settransformer/seed0/max_regression.png").exists()
    assert "| `settransformer` |" in out
    # a second call reuses the finished runs: same numbers, nothing retrained
    before = Path("rep/settransformer/seed1/checkpoint.pt").stat().st_mtime_ns
    code, _, _ = _run(capsys, *argv, "--out", "rep", *TINY)
    assert code == 0 and Path("rep/settransformer/seed1/checkpoint.pt").stat().st_mtime_ns == before
    assert json.loads(Path("rep/results.json").read_text())["runs"] == results["runs"]
    # other settings in the same folder are refused
    code, _, err = _run(capsys, *argv, "--out", "rep", *TINY, "--lr", "0.01")
    assert code == 2 and "holds a run with other settings" in err


def test_demo_runs_present_tasks_and_skips_absent_ones(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.TASKS, "ghost", "settransformer.tasks.ghost:Ghost")
    argv = ("demo", "--tasks", "max-regression,ghost", "--steps", "2", "--no-progress", "--jobs", "1")
    code, _, err = _run(capsys, *argv)
    assert code == 0
    assert "ghost: skipped" in err and "not part of this installation" in err
    summary = Path("runs/demo/results.md").read_text()
    assert "max-regression" in summary and "| `deepsets-max` |" in summary
    assert Path("runs/demo/max-regression/settransformer/seed0/max_regression.png").exists()


def test_demo_in_worker_processes_gives_the_in_process_results(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("demo", "--tasks", "max-regression", "--steps", "3", "--no-progress")
    assert _run(capsys, *argv, "--jobs", "1", "--out", "1")[0] == 0
    code, out, err = _run(capsys, *argv, "--jobs", "2", "--out", "2")
    assert code == 0 and "| `settransformer` |" in out
    assert err.count("max-regression ") >= 8  # one line per model of the table
    one, two = (json.loads(Path(d, "max-regression/results.json").read_text())["runs"] for d in ("1", "2"))
    assert two == one and len(two) == 8  # the same seeds on one thread each: the same numbers
    assert Path("2/max-regression/settransformer/seed0/max_regression.png").exists()  # plots by the workers
    assert "2 process(es) of 1 thread(s)" in Path("2/results.md").read_text()


def test_demo_trains_the_task_demo_models_unless_all_models(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from settransformer.tasks.max_regression import MaxRegression

    monkeypatch.setattr(MaxRegression, "demo_models", ("deepsets-max", "settransformer"))
    argv = ("demo", "--tasks", "max-regression", "--steps", "2", "--no-progress", "--jobs", "1")
    assert _run(capsys, *argv, "--out", "sub")[0] == 0
    runs = json.loads(Path("sub/max-regression/results.json").read_text())["runs"]
    assert sorted(runs) == ["deepsets-max", "settransformer"]
    assert _run(capsys, *argv, "--out", "all", "--all-models")[0] == 0
    runs = json.loads(Path("all/max-regression/results.json").read_text())["runs"]
    assert sorted(runs) == sorted(MaxRegression.model_names)


def test_config_file_and_flags_override_it(capsys: pytest.CaptureFixture[str]) -> None:
    # lr: 1e-2 without a dot, which YAML 1.1 (PyYAML) reads as a string
    Path("c.yaml").write_text("model: deepsets-sum\nsteps: 2\nlr: 1e-2\ntask_options:\n  max_size: 4\n")
    code, _, _ = _run(capsys, "train", "max-regression", "--config", "c.yaml", "--out", "r", *TINY[2:])
    assert code == 0
    info = json.loads(Path("r/config.json").read_text())
    assert info["model"] == "deepsets-sum" and info["train"]["lr"] == 0.01
    assert info["train"]["steps"] == 2 and info["task_options"]["max_size"] == 4
    code, _, _ = _run(
        capsys, "train", "max-regression", "--config", "c.yaml", "--steps", "1", "--out", "r2", *TINY[2:]
    )
    assert code == 0 and json.loads(Path("r2/config.json").read_text())["train"]["steps"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "nope"], "unknown task 'nope'"),
        (
            ["train", "max-regression", "--model", "gpt"],
            "model 'gpt': max-regression has the models deepsets-mean",
        ),
        (["train", "max-regression", "--set", "colour=3"], "task option 'colour'"),
        (["train", "max-regression", "--set", "max_size=ten"], "task option 'max_size': expected int"),
        (["train", "max-regression", "--set", "max_size"], "expected KEY=VALUE"),
        (["train", "max-regression", "--set", "min_size=5", "--set", "max_size=2"], "min_size <= max_size"),
        (["train", "max-regression", "--config", "missing.json"], "missing.json: config file not found"),
        (["train", "max-regression", "--config", "bad.json"], "bad.json: cannot read it"),
        (
            ["train", "max-regression", "--config", "typo.json"],
            "typo.json: unknown setting(s) stepz; known: allow_changes, amp, batch_size, budget",
        ),
        (["train", "max-regression", "--config", "wrong.json"], "wrong.json: steps: expected int, got 'ten'"),
        (["train", "max-regression", "--steps", "0"], "steps: expected an integer from 1 to"),
        (
            ["train", "max-regression", "--lr-milestones", "10,x"],
            "lr_milestones: expected comma-separated integers",
        ),
        (["train", "max-regression", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
        (["train", "max-regression", "--resume"], "--resume: needs --out RUN_DIR"),
        (["train", "ghost"], "its module settransformer.tasks.ghost is not part of this installation"),
        (["eval", "nowhere"], "run folder nowhere: does not exist"),
        (["plot", "."], ".: not a run folder"),
        (["reproduce", "max-regression", "--models", "deepsets-max,foo"], "model 'foo'"),
        (["reproduce", "max-regression", "--seeds", "0"], "--seeds: expected a positive integer"),
        (
            ["train", "count-unique", "--batch-size", "1", "--set", "min_size=1", "--set", "max_size=1"],
            "batch_size: 1 set(s) per process of min_size=1 image(s) can make a step of one image",
        ),
        (
            ["reproduce", "max-regression", "--seeds", "2", "--seed", str(2**63 - 1)],
            f"--seed {2**63 - 1} with --seeds 2: seed: expected an integer from 0 to {2**63 - 1}",
        ),
        (["demo", "--tasks", "nope"], "--tasks: unknown task 'nope'"),
        (["demo", "--tasks", ""], "--tasks: unknown task ''"),  # an empty variable: not every task
        (["train", "max-regression", "--allow-changes"], "--allow-changes: only with --resume"),
        (
            ["export", "nowhere", "--format", "onnx", "--opset", "13"],
            "--opset: expected an ONNX opset version 14 to 20",
        ),
        (["reproduce", "max-regression", "--models", ""], "model '': max-regression has the models"),
        (
            ["reproduce", "max-regression", "--models", "deepsets-max,deepsets-max"],
            "--models: deepsets-max given more than once",
        ),
        pytest.param(
            ["reproduce", "max-regression", "--device", "cuda"],
            "device: 'cuda' was asked for",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
        (  # the second model is refused before the first trains
            ["reproduce", "max-regression", "--models", "indrnn,settransformer", "--set", "dim_hidden=12000"],
            "max-regression/settransformer: the model would have",
        ),
        (["demo", "--threads", "0"], "--threads: expected a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.TASKS, "ghost", "settransformer.tasks.ghost:Ghost")
    Path("bad.json").write_text("{steps: 3")
    Path("typo.json").write_text('{"stepz": 3}')
    Path("wrong.json").write_text('{"steps": "ten"}')
    before = _snapshot(Path("."))
    code, _, err = _run(capsys, *argv, "--no-progress") if argv[0] == "train" else _run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(Path(".")) == before  # nothing written


def test_a_diverged_loss_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "max-regression", "--budget", "quick", "--steps", "8", "--log-every", "1"]
    code, _, err = _run(capsys, *argv, "--lr", "10", "--optimizer", "sgd", "--set", "test_sets=20")
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("settransformer train: error: step ")
    assert "the loss is nan" in err and "Traceback" not in err


def test_a_run_stopped_before_its_config_starts_over_but_a_users_file_stays(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C between the record of the data and ``config.json`` leaves ``data.json`` alone in the
    folder: no step to lose, so the same command starts afresh there. A ``data.json`` of the user's
    is no such record and is kept."""
    Path("early").mkdir()
    Path("early/data.json").write_text('{"path": {"path": "/data/x.npz", "files": 1}}\n')
    code, _, err = _run(capsys, "train", "max-regression", "--out", "early", *TINY)
    assert code == 0, err
    assert Path("early/checkpoint.pt").is_file()
    Path("mine").mkdir()
    Path("mine/data.json").write_text('{"rows": [1, 2, 3]}\n')
    code, _, err = _run(capsys, "train", "max-regression", "--out", "mine", *TINY)
    assert code == 2 and "already exists and is not empty" in err
    assert Path("mine/data.json").read_text() == '{"rows": [1, 2, 3]}\n'


def test_out_that_is_a_file_and_warnings_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    Path("afile").write_text("")
    code, _, err = _run(capsys, "train", "max-regression", "--out", "afile", *TINY)
    assert code == 2 and "--out afile: is a file" in err
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed: no warning to show")
    # in a process of its own: pytest records warnings rather than printing them
    argv = ["train", "max-regression", "--tensorboard", "--out", "r", *TINY, "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "settransformer", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "settransformer train: warning: tensorboard: the tensorboard package is not installed" in done.stderr
    )
    assert "warnings.warn" not in done.stderr and "UserWarning" not in done.stderr


def test_existing_run_is_never_overwritten(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(run)
    code, _, err = _run(capsys, "train", "max-regression", "--out", str(run), *TINY)
    assert code == 2 and "already exists and is not empty; pass --resume" in err
    code, _, err = _run(
        capsys, "train", "max-regression", "--out", str(run), "--resume", "--model", "deepsets-sum"
    )
    assert code == 2 and "holds a checkpoint of model deepsets-max, not deepsets-sum" in err
    code, _, err = _run(
        capsys, "train", "max-regression", "--out", str(run), "--resume", "--set", "max_size=3"
    )
    assert code == 2 and "task options cannot change" in err
    assert _snapshot(run) == before


def test_checkpoint_of_another_model_is_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**info, "model": "settransformer"}))
    before = _snapshot(run)
    for command in ("eval", "plot"):
        code, _, err = _run(capsys, command, str(run))
        assert code == 2 and "holds a checkpoint of max-regression/deepsets-max" in err
    (run / "checkpoint.pt").write_bytes(b"garbage")
    code, _, err = _run(capsys, "eval", str(run))
    assert code == 2 and "checkpoint.pt: not a readable checkpoint" in err
    assert _snapshot(run) == {**before, "checkpoint.pt": b"garbage"}


def test_every_flag_has_help() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "eval", "plot", "reproduce", "demo", "predict"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        assert sub.format_help()


def test_python_dash_m_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "settransformer", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    for flag in (
        "--model",
        "--steps",
        "--batch-size",
        "--clip-min",
        "--resume",
        "--budget",
        "--set",
        "--amp",
    ):
        assert flag in done.stdout


def test_reproduce_checks_every_folder_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    Path("rep/settransformer/seed0").mkdir(parents=True)
    Path("rep/settransformer/seed0/notes.txt").write_text("mine")
    argv = ["reproduce", "max-regression", "--models", "deepsets-max,settransformer", "--out", "rep", *TINY]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "rep/settransformer/seed0: exists and is not a run folder" in err
    assert not Path("rep/deepsets-max").exists()
    code, _, err = _run(capsys, *argv, "--overwrite")  # --overwrite replaces runs, never other files
    assert code == 2 and Path("rep/settransformer/seed0/notes.txt").read_text() == "mine"


def test_demo_never_replaces_runs_it_did_not_make(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["reproduce", "max-regression", "--models", "deepsets-max", "--out", "mine/max-regression", *TINY]
    assert _run(capsys, *argv)[0] == 0
    before = _snapshot(Path("mine"))
    code, _, err = _run(capsys, "demo", "--tasks", "max-regression", "--out", "mine", "--steps", "1")
    assert code == 2 and "--out mine: holds files that are not a demo's" in err
    assert _snapshot(Path("mine")) == before


def test_predict_and_export_never_replace_a_runs_own_files(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    np.save("x.npy", np.ones((4, 1), np.float32))
    before = _snapshot(run)
    for argv in (
        ["export", str(run), "--format", "torchscript", "--output", str(run / "checkpoint.pt")],
        ["predict", str(run), "--input", "x.npy", "--output", str(run / "metrics.jsonl")],
    ):
        code, _, err = _run(capsys, *argv, "--overwrite")
        assert code == 2 and "a file of the run folder run" in err, err
    code, _, err = _run(capsys, "predict", str(run), "--input", "x.npy", "--output", "x.npy", "--overwrite")
    assert code == 2 and "is one of the --input files" in err
    assert _snapshot(run) == before


def test_damaged_run_files_are_one_line_errors_or_skipped(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\n{"step": 99, "loss": "a"}\n')
    code, _, err = _run(capsys, "plot", str(run))  # the damaged lines are left out of the curve
    assert code == 0, err
    info = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**info, "task_options": "x"}))
    code, _, err = _run(capsys, "eval", str(run))
    assert code == 2 and "task_options: expected a JSON object, got 'x'" in err


def test_ema_decay_off_turns_a_budgets_average_off(capsys: pytest.CaptureFixture[str]) -> None:
    """max-regression's paper budget evaluates a moving average (0.999); ``--ema-decay off`` is the
    only way from the command line to train that budget without it (0 is no decay)."""
    argv = ["train", "max-regression", "--budget", "paper", *TINY]
    assert _run(capsys, *argv, "--out", "with")[0] == 0
    assert _run(capsys, *argv, "--out", "without", "--ema-decay", "off")[0] == 0
    decay = [
        json.loads(Path(run, "config.json").read_text())["train"]["ema_decay"] for run in ("with", "without")
    ]
    assert decay == [0.999, None]
    code, _, err = _run(capsys, "train", "max-regression", "--ema-decay", "fast")
    assert code == 2 and "--ema-decay: expected a number or 'off', got 'fast'" in err


def test_heap_flag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["--heap", "system", "tasks"]) == 0 and calls == []
    assert cli.main(["tasks"]) == 0 and calls == [1]  # the default keeps freed memory
    capsys.readouterr()


def test_tasks_list_and_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    from settransformer.tasks import TASKS

    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASKS) and "Regress the maximum of a set of reals." in out
    assert cli.main(["train", "max-regression", "--list"]) == 0
    out = capsys.readouterr().out
    assert "settransformer (default): SAB + PMA" in out
    assert "max_size (int, default 10): set sizes" in out and "quick: 1000 steps" in out
    for argv, hint in (
        (["train", "max-regresion"], "did you mean 'max-regression'?"),
        (["train", "max-regression", "--model", "setransformer"], "did you mean 'settransformer'?"),
        (["train", "max-regression", "--set", "max_sise=3"], "did you mean 'max_size'?"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert hint in err and len(err.strip().splitlines()) == 1


def test_budget_milestones_scale_with_steps() -> None:
    parser = cli.build_parser()
    for extra, milestones in (
        ([], (700,)),
        (["--steps", "600"], (420,)),
        (["--steps", "600", "--lr-milestones", "50"], (50,)),
    ):
        args = parser.parse_args(["train", "max-regression", "--budget", "quick", *extra])
        assert cli._settings(args, {}, "paper")[0].lr_milestones == milestones


def test_milestones_past_the_last_step(capsys: pytest.CaptureFixture[str]) -> None:
    """The budget's milestones that a shorter run would never reach are left out quietly; the
    user's own are kept, with a warning."""
    parser = cli.build_parser()
    args = parser.parse_args(["train", "max-regression", "--budget", "quick", "--steps", "1"])
    assert cli._settings(args, {}, "paper")[0].lr_milestones == ()
    assert "warning" not in capsys.readouterr().err
    args = parser.parse_args(["train", "max-regression", "--steps", "100", "--lr-milestones", "50,100,400"])
    assert cli._settings(args, {}, "paper")[0].lr_milestones == (50, 100, 400)
    err = capsys.readouterr().err
    assert "lr_milestones 100, 400 at or past steps=100" in err


def test_piped_progress_is_plain_lines_and_every_run_plots_its_curve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "max-regression", "--steps", "40", "--batch-size", "8", "--eval-every", "20"]
    assert cli.main([*argv, "--out", str(run), "--set", "test_sets=16"]) == 0
    err = capsys.readouterr().err  # stderr is captured, not a terminal
    assert "\r" not in err and "max-regression step 20/40: loss" in err
    assert (run / "training_curve.png").is_file()
    (run / "training_curve.png").unlink()
    assert cli.main(["plot", str(run)]) == 0
    assert "training_curve.png" in capsys.readouterr().out and (run / "training_curve.png").is_file()


def test_output_into_a_closed_pipe_stops_quietly() -> None:
    """``settransformer tasks | head -0``: the reader is gone, and the command ends without a traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "settransformer", "tasks"],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert done.stderr == b""
