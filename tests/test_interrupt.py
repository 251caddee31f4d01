"""Runs survive interruption: SIGINT/SIGTERM save the step reached, kill -9 leaves a loadable
checkpoint, and --resume continues to exactly the run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from settransformer.nn.models import DeepSets
from settransformer.tasks.base import Batch, Task
from settransformer.tasks.runs import build_task, load_run, train_run
from settransformer.training.checkpoint import load_checkpoint
from settransformer.training.config import TrainConfig
from settransformer.training.interrupt import Interrupted, StopOnSignal
from settransformer.training.loop import train


def _wait_for(
    condition: Any, timeout: float = 60.0, what: str = "condition", proc: subprocess.Popen[str] | None = None
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s, or as soon as ``proc`` ends."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            err = proc.communicate()[1]
            pytest.fail(f"the process ended ({proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005 if proc is None else 0.05)


@pytest.fixture(autouse=True)
def _sigint_handled() -> Any:
    """A shell that starts a job in the background (``cmd &``, nohup) makes it ignore SIGINT, and
    StopOnSignal deliberately leaves an ignored signal alone; these tests need it handled."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _default_sigint() -> None:
    """In a child before exec: SIGINT back to its default, whatever this process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_self(sig: int) -> None:
    """Send ``sig`` to this process's main thread and wait until the training loop's handler has seen it."""
    handler = signal.getsignal(sig)
    stop = getattr(handler, "__self__", None)
    if not isinstance(stop, StopOnSignal):  # never send SIGTERM to pytest without our handler
        raise RuntimeError(f"{signal.Signals(sig).name} is not handled by StopOnSignal: {handler}")
    # to the main thread, where Python runs the handler: a signal sent to the process may land on a
    # thread of a library instead (gloo's, under DDP), interrupting its system call
    main = threading.main_thread().ident
    assert main is not None
    signal.pthread_kill(main, sig)
    _wait_for(lambda: stop.signum is not None, 10, "the signal handler")


class Signalling(Task):
    """Regress the sum of 5 numbers (a model with dropout, so the global RNG matters); the loss sends
    ``sig`` to this process on its ``signal_at``-th call, i.e. during that step (``sig=None``: raises
    ``KeyboardInterrupt`` there instead, as an error in the middle of a step would)."""

    name: ClassVar[str] = "signalling"
    model_names: ClassVar[tuple[str, ...]] = ("deepsets",)
    metric: ClassVar[str] = "mae"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, signal_at: int | None = None, sig: int | None = signal.SIGINT) -> None:
        super().__init__()
        self.calls, self.signal_at, self.sig = 0, signal_at, sig

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        return {"steps": 3, "batch_size": 8, "lr": 1e-2}

    def build_model(self, model_name: str) -> nn.Module:
        return DeepSets(1, 1, 1, dim_hidden=8, dropout=0.5)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        x = torch.rand(batch_size, 5, 1, generator=generator)
        return Batch(x, None, x.sum(dim=(1, 2)))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        self.calls += 1
        if self.calls == self.signal_at:
            if self.sig is None:
                raise KeyboardInterrupt
            _signal_self(self.sig)
        return F.l1_loss(model(batch.x, batch.mask).reshape(-1), batch.target)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        batch = self.sample_batch(64, torch.Generator().manual_seed(99)).to(device)
        return {"mae": float(F.l1_loss(model(batch.x, batch.mask).reshape(-1), batch.target))}


def _config(**changes: Any) -> TrainConfig:
    base = TrainConfig(
        steps=10, batch_size=8, lr=1e-2, device="cpu", log_every=3, eval_every=4, progress=False
    )
    return base.replace(**changes)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Signalling().build_model("deepsets")


def _lines(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock times."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in records]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- the signal handlers ---------------------------------------------------------------------------


def test_stop_on_signal_sets_a_flag_then_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(lambda: stop.signum is not None)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # asked twice: stop at once
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for(lambda: False, 10, "the second signal")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_stop_on_signal_installs_nothing_outside_the_main_thread_or_over_sig_ign() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[Any] = []

    def worker() -> None:
        with StopOnSignal():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnSignal():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupted_says_where_and_exits_like_the_shell() -> None:
    e = Interrupted(signal.SIGTERM, 12, Path("runs/x/checkpoint.pt"))
    assert isinstance(e, KeyboardInterrupt) and e.exit_code == 143
    assert str(e) == "interrupted by SIGTERM at step 12; checkpoint saved: runs/x/checkpoint.pt"
    assert Interrupted(signal.SIGINT, 3, None).exit_code == 130


# --- in the training loop --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_reached_and_resume_is_exact(tmp_path: Path, sig: int) -> None:
    before = signal.getsignal(sig)
    run = tmp_path / "run"
    # step 5: not a logged step (3, 4 by evaluation, 6, ...), so the running loss must be saved too
    with pytest.raises(Interrupted) as info:
        train(_model(), Signalling(signal_at=5, sig=sig), _config(), run, model_name="deepsets")
    assert (info.value.signum, info.value.step, info.value.checkpoint) == (sig, 5, run / "checkpoint.pt")
    assert signal.getsignal(sig) == before
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 5 and state["running_loss"]["count"] == 1
    assert [r["step"] for r in _lines(run)] == [3, 4]
    assert not (run / "results.json").exists()

    result = train(_model(seed=7), Signalling(), _config(), run, model_name="deepsets", resume=True)
    train(_model(), Signalling(), _config(), tmp_path / "straight", model_name="deepsets")
    assert result["step"] == 10
    assert _lines(run) == _lines(tmp_path / "straight")  # losses, lr and metrics, bit for bit
    assert _same_weights(run / "checkpoint.pt", tmp_path / "straight" / "checkpoint.pt")
    assert _same_weights(run / "best.pt", tmp_path / "straight" / "best.pt")


def test_a_fresh_run_has_a_checkpoint_from_step_zero(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):  # not a signal: an exception in the first step
        train(_model(), Signalling(signal_at=1, sig=None), _config(), tmp_path / "run", model_name="deepsets")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 0
    train(_model(seed=3), Signalling(), _config(), tmp_path / "run", model_name="deepsets", resume=True)
    train(_model(), Signalling(), _config(), tmp_path / "straight", model_name="deepsets")
    assert _lines(tmp_path / "run") == _lines(tmp_path / "straight")


def test_resume_skips_a_metrics_line_torn_by_a_kill(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_model(), Signalling(), _config(steps=4), run, model_name="deepsets")  # checkpoint at 4
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # the kill came in the middle of this line
    train(_model(), Signalling(), _config(steps=10), run, model_name="deepsets", resume=True)
    train(_model(), Signalling(), _config(), tmp_path / "straight", model_name="deepsets")
    assert _lines(run) == _lines(tmp_path / "straight")


# --- under DDP (two forked CPU processes) ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, port: int, out: str, steps: int, resume: bool, signals: bool = True) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # rank 0 gets SIGTERM during step 3; rank 1 none: both must stop together after it, although
    # step 3 is no logged step (log_every 2) and each rank has a running loss of its own shard
    task = Signalling(signal_at=3 if rank == 0 and signals and not resume else None, sig=signal.SIGTERM)
    report: dict[str, Any] = {}
    try:
        config = _config(steps=steps, log_every=2)
        report["step"] = train(_model(), task, config, Path(out) / "run", resume=resume)["step"]
    except Interrupted as e:
        report = {"interrupted": e.step, "signum": e.signum, "saved": e.checkpoint is not None}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def _two_processes(out: Path, steps: int, resume: bool = False, signals: bool = True) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    args = (_free_port(), str(out), steps, resume, signals)
    context = mp.start_processes(_ddp_worker, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a rank waiting in a collective the other never joins
            for p in context.processes:
                p.kill()
            pytest.fail("DDP processes deadlocked after the signal")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_under_ddp_every_rank_stops_at_the_same_step_and_rank_0_saves(tmp_path: Path) -> None:
    ranks = _two_processes(tmp_path, steps=8)
    assert ranks == [
        {"interrupted": 3, "signum": signal.SIGTERM, "saved": True},
        {"interrupted": 3, "signum": signal.SIGTERM, "saved": False},
    ]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 3 and len(state["rng"]) == 2 and state["running_loss"]["count"] == 1
    assert [r["step"] for r in _two_processes(tmp_path, steps=8, resume=True)] == [8, 8]
    assert [r["step"] for r in _lines(tmp_path / "run")] == [2, 4, 6, 8]
    # the line after the stop averages the loss of step 3 (every rank's) with step 4's, as unbroken
    _two_processes(tmp_path / "straight", steps=8, signals=False)
    straight = [r["loss"] for r in _lines(tmp_path / "straight" / "run")]
    assert [r["loss"] for r in _lines(tmp_path / "run")] == pytest.approx(straight, abs=1e-6)


# --- the command line, in subprocesses -------------------------------------------------------------

FLAGS = [
    *("max-regression", "--batch-size", "8", "--eval-every", "5", "--log-every", "2"),
    *("--schedule", "constant", "--lr", "1e-3", "--seed", "0", "--threads", "1", "--no-progress"),
]
OPTIONS = ["--set", "dim_hidden=8", "--set", "test_sets=32"]  # a resumed run keeps its own
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(run: Path, steps: int = 100_000, resume: bool = False) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "settransformer", "train", *FLAGS, "--out", str(run)]
    return subprocess.Popen(
        [*command, "--steps", str(steps), *(["--resume"] if resume else OPTIONS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=_default_sigint,
    )


def _step(run: Path) -> int:
    """The step of the run's checkpoint (-1 while there is none)."""
    path = run / "checkpoint.pt"
    return load_checkpoint(path)["step"] if path.exists() else -1


def _train_here(run: Path, steps: int, resume: bool = False) -> Path:
    """Train (or resume) ``run`` in this process as the CLI does: its default (paper) budget, FLAGS."""
    task = build_task("max-regression", {"dim_hidden": 8, "test_sets": 32})
    settings = {**type(task).budget("paper"), "batch_size": 8, "eval_every": 5, "log_every": 2}
    settings.update(steps=steps, schedule="constant", lr=1e-3, seed=0, device="cpu", progress=False)
    train_run(task, "settransformer", TrainConfig.from_dict(settings), run, resume=resume, plots=False)
    return run


def _finish(run: Path, tmp_path: Path) -> None:
    """Resume ``run`` to 10 steps past its checkpoint (here: a CLI process costs seconds); it then
    equals the run that was never interrupted, bit for bit."""
    steps = _step(run) + 10
    _train_here(run, steps, resume=True)
    straight = _train_here(tmp_path / "straight", steps)
    assert _lines(run) == _lines(straight)
    assert _same_weights(run / "checkpoint.pt", straight / "checkpoint.pt")
    assert _same_weights(run / "best.pt", straight / "best.pt")


@pytest.mark.slow  # CLI processes: a few seconds each to start
def test_cli_sigint_then_sigterm_then_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for sig, resume in ((signal.SIGINT, False), (signal.SIGTERM, True)):
        start = max(_step(run), 0)
        proc = _start(run, resume=resume)
        _wait_for(lambda start=start: _step(run) > start, what="a new checkpoint", proc=proc)  # type: ignore[misc]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        last = err.strip().splitlines()[-1]
        step = _step(run)
        name, hint = signal.Signals(sig).name, f"settransformer train max-regression --out {run} --resume"
        assert last == (
            f"settransformer train: interrupted by {name} at step {step}; "
            f"checkpoint saved: {run / 'checkpoint.pt'} (continue: {hint})"
        )
        assert max(r["step"] for r in _lines(run)) <= step  # nothing logged past the saved step
    _finish(run, tmp_path)


@pytest.mark.slow  # CLI processes: a few seconds each to start
def test_cli_kill_9_always_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    run, rng = tmp_path / "run", random.Random(0)
    for kill in range(2):
        before = _step(run)
        proc = _start(run, resume=kill > 0)
        _wait_for(lambda before=before: _step(run) > before, what="a new checkpoint", proc=proc)  # type: ignore[misc]
        time.sleep(rng.uniform(0, 0.2))  # anywhere in the steps, evaluations and writes that follow
        proc.kill()
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        _, model, state = load_run(run, device="cpu")
        assert state["step"] >= before and isinstance(model, nn.Module)
    _finish(run, tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_while_the_cli_starts_is_one_line_and_exit_code_130(tmp_path: Path) -> None:
    """The CLI's imports (PyTorch) take seconds; Ctrl-C in them prints no traceback. The package
    itself imports nothing heavy, so ``import settransformer`` is quick and the CLI module loads inside
    the launcher's guard."""
    quick = subprocess.run(
        [sys.executable, "-c", "import sys, settransformer; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert quick.stdout.strip() == "False", quick.stderr
    argv = [sys.executable, "-m", "settransformer", "train", "max-regression", "--out", str(tmp_path / "r")]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # past the interpreter's start, within the imports
    child.send_signal(signal.SIGINT)
    try:
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()  # a child that did not end must not outlive the test
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1], err
