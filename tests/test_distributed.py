"""Data-parallel training: 2 CPU processes (gloo) give the parameters of 1 process with the same batch.

The processes are spawned from the test and join a gloo group through the environment variables
``torchrun`` would set; one test goes through ``torchrun`` itself.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from settransformer.cli import main
from settransformer.tasks.base import Batch
from settransformer.tasks.pointcloud import PointCloudClassification
from settransformer.training import distributed
from settransformer.training.checkpoint import load_checkpoint
from settransformer.training.config import TrainConfig
from settransformer.training.loop import train

# Small clouds and a narrow model without dropout, so that 1 and 2 processes compute the same thing.
OPTIONS: dict[str, Any] = {
    "num_points": 16,
    "dim_hidden": 8,
    "num_heads": 2,
    "num_inducing": 4,
    "dropout": 0.0,
    "num_classes": 4,
    "test_size": 20,  # not a multiple of the batch: every test cloud must still be scored
}


def _task(**changes: Any) -> PointCloudClassification:
    return PointCloudClassification(**{**OPTIONS, **changes})


def _config(**changes: Any) -> TrainConfig:
    # SGD: Adam would turn the rounding differences of near-zero gradients into lr-sized steps
    base = TrainConfig(
        steps=4, batch_size=8, lr=1e-2, optimizer="sgd", device="cpu", log_every=1, progress=False
    )
    return base.replace(**changes)


def _model(**changes: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return _task(**changes).build_model("isab-pma")


def _flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world: int,
    port: int,
    out: str,
    config: dict[str, Any],
    resume: bool,
    options: dict[str, Any],
    runs: int = 1,
) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    task = _task(**options)
    for i in range(runs):
        if i and rank == 0:
            time.sleep(2)  # rank 0 reaches the next run late, as after writing its plots
        model = _model(**options)
        # the same path on every rank, as under torchrun; only rank 0 may write into it
        run = Path(out) / ("run" if i == 0 else f"run{i}")
        result = train(model, task, TrainConfig(**config), run, model_name="m", resume=resume)
    # a DDP wrapper still alive after training would hold the group past its end (gloo can abort at exit)
    gc.collect()
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    saved = {"result": result, "params": _flat(model), "ddp_alive": alive, "group": dist.is_initialized()}
    torch.save(saved, Path(out) / f"rank{rank}.pt")


def _two_processes(
    out: Path, config: TrainConfig, resume: bool = False, runs: int = 1, **options: Any
) -> list[dict[str, Any]]:
    """Train ``runs`` times in 2 spawned processes; return what each rank saved (``result``,
    ``params`` of the last run)."""
    import torch.multiprocessing as mp

    args = (2, _free_port(), str(out), config.to_dict(), resume, options, runs)
    # spawn, not fork: a fork of this multi-threaded process (torch's pools, xdist's threads) can copy
    # a lock that some other thread holds, and the child then waits on it forever
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_shard_splits_a_batch_into_equal_disjoint_parts() -> None:
    x, mask = torch.randn(6, 3, 2), torch.rand(6, 3) > 0.3
    batch = Batch(x, mask, torch.arange(6), {"labels": torch.arange(18).reshape(6, 3)})
    parts = [batch.shard(r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]
    assert torch.equal(torch.cat([p.x for p in parts]), x)
    assert torch.equal(torch.cat([p.mask for p in parts if p.mask is not None]), mask)
    assert torch.equal(parts[1].target, torch.tensor([2, 3]))
    assert torch.equal(parts[2].extra["labels"], batch.extra["labels"][4:])
    assert batch.shard(0, 1) is batch
    with pytest.raises(ValueError, match="6 sets do not split evenly over 4 processes"):
        batch.shard(0, 4)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size=2, got 2"):
        batch.shard(2, 2)


def test_batch_size_must_divide_over_the_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    with pytest.raises(ValueError, match="batch_size: 8 is not divisible by the 3 processes"):
        train(_model(), _task(), _config())


def test_setup_without_torchrun_variables_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT not: launch with torchrun"):
        distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.setup("cpu").enabled  # one process: no group, nothing to join


@pytest.mark.parametrize("command", [["reproduce", "max-regression"], ["eval", "run"], ["demo"]])
def test_commands_other_than_train_refuse_torchrun(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``reproduce`` and ``demo`` train run after run, the others do one process's work: under
    torchrun every rank would write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(command) == 2
    assert "runs in one process: launch it without torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_parameters_of_one_with_the_same_global_batch(tmp_path: Path) -> None:
    config = _config(eval_every=2)
    single = _model()
    expected = train(single, _task(), config, tmp_path / "single")
    ranks = _two_processes(tmp_path, config)

    # DDP averaged the gradients of two halves of the global batch: one process's step, to rounding
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], _flat(single), rtol=0, atol=1e-6)
    # every rank freed its DDP wrapper (and the reducer's hold on the group) at the end of training
    assert [r["ddp_alive"] for r in ranks] == [0, 0]
    run, alone = _lines(tmp_path / "run"), _lines(tmp_path / "single")
    assert [r["step"] for r in run] == [1, 2, 3, 4]  # one writer: no duplicated lines
    assert [r["loss"] for r in run] == pytest.approx([r["loss"] for r in alone], abs=1e-6)
    # rank 0 alone evaluates, on the whole test set (20 clouds: accuracy in steps of 1/20)
    assert ranks[0]["result"]["metrics"] and not ranks[1]["result"]["metrics"]
    assert ranks[0]["result"]["metrics"]["accuracy"] == pytest.approx(expected["metrics"]["accuracy"])
    assert ranks[0]["result"]["metrics"]["test_loss"] == pytest.approx(
        expected["metrics"]["test_loss"], abs=1e-5
    )
    files = ["best.pt", "checkpoint.pt", "config.json", "metrics.jsonl", "results.json"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == files
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(state["rng"]) == 2  # every rank's RNG (dropout streams differ), for an exact resume
    assert torch.equal(state["rng"][0]["data"], state["rng"][1]["data"])  # one shared data stream


@pytest.mark.slow
def test_two_runs_in_one_job_and_gradient_bounds_of_the_averaged_gradient(tmp_path: Path) -> None:
    """A script may train twice under one torchrun: the process group stays for the second run, so a
    rank that reaches it late still finds the others (each run made its own group, and the job hung).
    Gradient bounds apply to the gradient averaged over the ranks: one process's parameters."""
    config = _config(clip_min=-2e-3, clip_max=2e-3)
    single = _model()
    train(single, _task(), config, tmp_path / "single")
    unbounded = _model()
    train(unbounded, _task(), _config(), tmp_path / "unbounded")
    assert not torch.allclose(_flat(single), _flat(unbounded), atol=1e-4)  # the bounds bind
    ranks = _two_processes(tmp_path, config, runs=2)
    assert [r["group"] for r in ranks] == [True, True]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], _flat(single), rtol=0, atol=1e-6)
    assert [r["step"] for r in _lines(tmp_path / "run1")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_on_another_number_of_processes_continues_the_same_batches(tmp_path: Path) -> None:
    straight = _model()
    train(straight, _task(), _config(steps=4), tmp_path / "straight", model_name="m")
    _two_processes(tmp_path, _config(steps=2))  # checkpoint at step 2, written by rank 0
    resumed = _model()
    with pytest.warns(UserWarning, match="2 RNG streams for 1 processes; the batches continue exactly"):
        train(resumed, _task(), _config(steps=4), tmp_path / "run", model_name="m", resume=True)
    torch.testing.assert_close(_flat(resumed), _flat(straight), rtol=0, atol=1e-6)
    losses = [r["loss"] for r in _lines(tmp_path / "run")]
    assert losses == pytest.approx([r["loss"] for r in _lines(tmp_path / "straight")], abs=1e-6)


@pytest.mark.slow
def test_resume_on_two_processes_with_dropout_is_exact(tmp_path: Path) -> None:
    # dropout draws from each rank's own stream; the averaged gradient keeps the replicas equal
    straight = _two_processes(tmp_path / "straight", _config(steps=4), dropout=0.5)
    _two_processes(tmp_path / "resumed", _config(steps=2), dropout=0.5)
    resumed = _two_processes(tmp_path / "resumed", _config(steps=4), resume=True, dropout=0.5)
    assert torch.equal(straight[0]["params"], straight[1]["params"])
    assert torch.equal(resumed[0]["params"], straight[0]["params"])
    assert [r["loss"] for r in _lines(tmp_path / "resumed" / "run")] == [
        r["loss"] for r in _lines(tmp_path / "straight" / "run")
    ]


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path: Path) -> None:
    flags = [f"--set={k}={json.dumps(v)}" for k, v in OPTIONS.items()]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("-m", "settransformer", "train", "pointcloud", "--out", "run", "--device", "cpu"),
        *("--steps", "2", "--batch-size", "4", "--log-every", "1", "--no-progress", *flags),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    # the failing rank's own traceback comes first, the launcher's summary last
    assert done.returncode == 0, done.stderr[:3000] + "\n[...]\n" + done.stderr[-1500:]
    assert done.stderr.count("training pointcloud/isab-pma in run") == 1  # rank 0 reports, once
    assert done.stdout.count("pointcloud/isab-pma after 2 steps") == 1
    assert [r["step"] for r in _lines(tmp_path / "run")] == [1, 2]
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["train"]["batch_size"] == 4 and info["task_options"]["dim_hidden"] == 8
    assert len(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["rng"]) == 2
