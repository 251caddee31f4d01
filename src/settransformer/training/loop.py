"""The one training loop, shared by every task.

[`train`][settransformer.training.loop.train] takes a model, a task and a
[`TrainConfig`][settransformer.training.config.TrainConfig], and talks to the task only through
[`TrainingTask`][settransformer.training.loop.TrainingTask]: ``sample_batch``, ``loss`` and ``evaluate``
(every [`settransformer.tasks.base.Task`][settransformer.tasks.base.Task] provides them). With a ``run_dir``
it keeps the run on disk::

    run_dir/config.json      task, model, task options, training settings, seed, library version
    run_dir/metrics.jsonl    one JSON object per logged step: step, loss, lr, elapsed [, eval metrics]
    run_dir/checkpoint.pt    the last checkpoint (at step 0, every evaluation, the end, and on SIGINT/SIGTERM)
    run_dir/best.pt          the checkpoint with the best headline metric so far
    run_dir/results.json     the final metrics

Every random number comes from the seeded data generator or torch's seeded global RNG, and both
are checkpointed, so a resumed run reproduces an uninterrupted one exactly (on CPU).

[`train`][settransformer.training.loop.train] reads as its steps: set up (device, seeds, model, optimiser, the
checkpoint resumed from, the run's files), then until ``config.steps`` one training step at a time, a logged
line every ``log_every`` steps, an evaluation and a checkpoint every ``eval_every`` steps and at the end.

Examples:
    >>> from settransformer.tasks.max_regression import MaxRegression
    >>> task = MaxRegression(test_sets=256)
    >>> model = task.build_model("deepsets-max")
    >>> config = TrainConfig(steps=100, batch_size=32, lr=3e-3, device="cpu", progress=False)
    >>> result = train(model, task, config, "runs/max-regression", model_name="deepsets-max")
    >>> result["step"], sorted(result["metrics"])
    (100, ['mae', 'perm_sensitivity', 'rmse'])
    >>> sorted(path.name for path in Path("runs/max-regression").iterdir())
    ['best.pt', 'checkpoint.pt', 'config.json', 'metrics.jsonl', 'results.json']
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data.files import write_text_atomic
from . import distributed
from .checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_KEYS,
    check_checkpoint,
    library_version,
    load_checkpoint,
    model_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .interrupt import Interrupted, StopOnSignal
from .optim import WeightAverage, clamp_gradients, make_optimizer, make_schedule

__all__ = ["TrainConfig", "TrainingTask", "check_runnable", "evaluated_weights", "train"]


class TrainingBatch(Protocol):
    """A batch as the loop handles it: cut into the process's shard, moved to the device."""

    def shard(self, rank: int, world_size: int) -> TrainingBatch: ...

    def to(self, device: torch.device) -> TrainingBatch: ...


class TrainingTask(Protocol):
    """What [`train`][settransformer.training.loop.train] needs of a task;
    [`settransformer.tasks.base.Task`][settransformer.tasks.base.Task] provides it.

    ``sample_batch`` draws ``batch_size`` sets from ``generator`` (the only source of data randomness),
    ``loss`` is the scalar to minimise on a batch, ``evaluate`` returns the metrics (among them
    ``metric``, the headline, better when higher if ``higher_is_better``). ``name`` and ``options``
    are written into the run folder and the checkpoints.
    """

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> dict[str, Any]: ...

    @property
    def metric(self) -> str: ...

    @property
    def higher_is_better(self) -> bool: ...

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> TrainingBatch: ...

    def loss(self, model: nn.Module, batch: Any) -> Tensor: ...

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...


def check_runnable(config: TrainConfig) -> None:
    """Raise ``ValueError`` for settings this machine or launch cannot run (device, AMP, batch split)."""
    device = distributed.resolve_device(config.device)
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp: fp16 needs a CUDA device (use bf16 on CPU, or off)")
    world_size = distributed.launched_world_size()
    if config.batch_size % world_size:
        raise ValueError(f"batch_size: {config.batch_size} is not divisible by the {world_size} processes")


def evaluated_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint's metrics were measured with: the average when there is one."""
    average = checkpoint.get("average")
    return average["weights"] if average else checkpoint["model"]


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@contextlib.contextmanager
def _evaluating(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, no gradients, and randomness that does not touch the training stream."""
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _tensorboard(run_dir: Path | None, enabled: bool) -> Any:
    if not enabled or run_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "tensorboard: the tensorboard package is not installed; logging to metrics.jsonl only",
            stacklevel=5,  # train's caller
        )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _run_info(task: TrainingTask, model_name: str, config: TrainConfig) -> dict[str, Any]:
    return {
        "task": task.name,
        "model": model_name,
        "task_options": dict(task.options),
        "train": config.to_dict(),
        "seed": config.seed,
        "version": library_version(),
    }


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again), and a
    last line cut short by a kill; rewrite atomically, so a kill now loses no line either."""
    if path.exists():
        lines = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    lines.append(line)
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                continue  # torn by a kill mid-write (or damaged): past the checkpoint, logged again
        write_text_atomic(path, "".join(line + "\n" for line in lines))


def _is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (value > best if higher_is_better else value < best)


def train(
    model: nn.Module,
    task: TrainingTask,
    config: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    model_name: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on ``task``; return ``{"step", "metrics", "best", "elapsed"}``.

    Args:
        model: any ``nn.Module`` the task's ``loss`` accepts; moved to the chosen device, trained in place.
        task: where batches, the loss and the metrics come from.
        config: the training settings.
        run_dir: folder for config, metrics and checkpoints (``None``: keep nothing on disk).
        model_name: the table row, stored with checkpoints so the CLI can rebuild the model.
        resume: continue from ``run_dir/checkpoint.pt`` (same seed: the same losses as without a break).

    Raises:
        Interrupted: SIGINT or SIGTERM arrived
            ([`settransformer.training.interrupt`][settransformer.training.interrupt]); the step it was in was
            finished and saved to ``run_dir/checkpoint.pt``, from which ``resume`` continues exactly.

    ``metrics`` are the last evaluation's (``task.evaluate``), ``best`` the best value of the
    headline metric ``task.metric`` seen at any evaluation. Under ``torchrun`` the model is wrapped
    in ``DistributedDataParallel``; every process draws the same global batch of ``batch_size`` sets
    (one data generator seeded ``seed`` on all ranks) and trains on its own contiguous
    ``batch_size / world_size`` of it, so the averaged gradient is that of a one-process run with the
    same batch (dropout differs: torch's global RNG is seeded ``seed + rank``; so do BatchNorm layers,
    such as the image encoders of ``count-unique`` and ``set-anomaly``, which normalise over each
    process's share of the batch). Only rank 0
    evaluates (on the whole test set) and writes files. With ``config.ema_decay``
    the metrics are those of the moving average of the weights, which ``model`` holds at the end.

    Examples:
        >>> from settransformer.tasks.max_regression import MaxRegression
        >>> task = MaxRegression(test_sets=256)
        >>> config = TrainConfig(steps=40, batch_size=32, device="cpu", progress=False)
        >>> model = task.build_model("deepsets-max")
        >>> train(model, task, config, "run", model_name="deepsets-max")["step"]
        40
        >>> longer = config.replace(steps=60)  # continue the same run to step 60
        >>> train(model, task, longer, "run", model_name="deepsets-max", resume=True)["step"]
        60
    """
    run_dir = None if run_dir is None else Path(run_dir)
    model_name = model_name or type(model).__name__
    check_runnable(config)
    if resume and run_dir is None:
        raise ValueError("resume: needs a run_dir holding checkpoint.pt")
    run = _set_up(model, task, config, model_name, run_dir, resume)

    stop = StopOnSignal().install()  # SIGINT, SIGTERM: finish the step, save it, raise Interrupted
    finished = False
    try:
        if not resume:  # a checkpoint from the start, so a run killed before its first evaluation resumes
            run.save()
        while run.step < config.steps:
            signum = stop.agreed(run.ctx)  # under DDP, the same answer on every rank
            if signum is not None:
                # the losses since the last logged line, averaged over the ranks as that line will be
                run.loss_sum = run.ctx.mean(run.loss_sum)
                saved = run.save()
                run.ctx.barrier()
                finished = True  # every rank stops at this step: leave the process group together
                raise Interrupted(signum, run.step, saved)
            lr = run.train_step()
            run.estimate()
            step = run.step
            evaluate = step == config.steps or (config.eval_every > 0 and step % config.eval_every == 0)
            if evaluate or step % config.log_every == 0:
                run.log(lr, evaluate)
            if evaluate:
                run.save(evaluated=True)
                run.ctx.barrier()
        finished = True
    finally:
        stop.restore()
        run.close(wait=finished)
    return run.finish()


def _set_up(
    model: nn.Module,
    task: TrainingTask,
    config: TrainConfig,
    model_name: str,
    run_dir: Path | None,
    resume: bool,
) -> _Run:
    """The device and seeds, the model on the device with its optimiser, the checkpoint resumed from,
    the run's files, and the model wrapped for DDP under ``torchrun``."""
    ctx = distributed.setup(config.device)
    # Randomness: the data generator for batches, torch's global RNG for dropout and the like. The
    # data stream is the same on every rank (each keeps its shard of the global batch), so it does
    # not depend on the number of processes; dropout masks must differ between ranks.
    torch.manual_seed(config.seed + ctx.rank)
    generator = torch.Generator().manual_seed(config.seed)

    model.to(ctx.device).train()
    optimizer = make_optimizer(model, config)
    run = _Run(
        task,
        config,
        model_name,
        ctx,
        model,
        generator,
        optimizer,
        make_schedule(optimizer, config),
        torch.amp.GradScaler(ctx.device.type, enabled=config.amp == "fp16"),
        out=run_dir if ctx.is_main else None,  # rank 0 alone writes files
    )
    state = run.restore(run_dir / "checkpoint.pt") if resume and run_dir is not None else {}
    if config.ema_decay is not None:  # after restoring: a new average starts from the resumed weights
        run.average = WeightAverage(model, config.ema_decay)
        if state.get("average"):
            run.average.load_state_dict(state["average"])
    run.open_files(resume)
    if ctx.enabled:
        device = ctx.device
        run.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    show = config.progress and ctx.is_main
    if show and not sys.stderr.isatty():  # piped logs: a plain line now and then, no \r updates
        run.plain_every = config.log_every * max(1, config.steps // (20 * config.log_every))
    run.bar = tqdm(
        total=config.steps, initial=run.step, disable=not show or run.plain_every > 0, desc=task.name
    )
    run.start = time.perf_counter()
    return run


ESTIMATE_STEPS = 5
"""Steps timed for the estimate of a run's duration that [`train`][settransformer.training.loop.train] prints
with progress shown."""


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"3 min"`` or ``"2.5 h"``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(eq=False)
class _Run:
    """A training run in progress: what it trains and with what, where it writes, and how far it got.

    Its methods are the steps of [`train`][settransformer.training.loop.train]: `train_step`, `log` (with
    `evaluate`), `save`, `close` and `finish`.
    """

    task: TrainingTask
    config: TrainConfig
    model_name: str
    ctx: distributed.Distributed
    model: nn.Module
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    out: Path | None
    """The run folder on rank 0; ``None`` on other ranks and without a run folder."""
    net: nn.Module = field(init=False)
    """What the loss sees: ``model``, or its DDP wrapper."""
    average: WeightAverage | None = None
    step: int = 0
    elapsed_before: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    best: float | None = None
    loss_sum: Tensor = field(init=False)
    """The losses summed since the last logged line (checkpointed: a signal may stop between lines)."""
    loss_count: int = 0
    log_file: IO[str] | None = None
    writer: Any = None
    bar: Any = None
    plain_every: int = 0
    """Print a plain progress line every this many steps instead of the bar (0: the bar)."""
    start: float = 0.0
    timed_from: tuple[int, float] | None = None
    """``(step, time)`` where the timing of the steps for `estimate` began; ``None`` before."""
    estimated: bool = False

    def __post_init__(self) -> None:
        self.net = self.model
        self.loss_sum = torch.zeros((), device=self.ctx.device)

    def elapsed(self) -> float:
        """Training seconds so far, the runs this one resumed included."""
        return self.elapsed_before + time.perf_counter() - self.start

    def restore(self, path: Path) -> dict[str, Any]:
        """Continue from the checkpoint at ``path``: weights, optimiser, schedule, loss scaler, progress
        and random streams. Returns the checkpoint."""
        ctx = self.ctx
        state = check_checkpoint(load_checkpoint(path), path, RESUME_KEYS)
        if state.get("model_name") != self.model_name or state.get("task") != self.task.name:
            raise ValueError(
                f"{path}: holds {state.get('task')}/{state.get('model_name')}, "
                f"expected {self.task.name}/{self.model_name}"
            )
        self.model.load_state_dict(state["model"])
        self._restore_optimizer(state["optimizer"], state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed_before = state["step"], state["elapsed"]
        self.metrics, self.best = state["metrics"], state["best"]
        if state.get("running_loss"):  # nonzero only after a signal: the ranks' mean, for every rank
            self.loss_sum = state["running_loss"]["sum"].to(ctx.device)
            self.loss_count = state["running_loss"]["count"]
        ranks = state["rng"]
        if len(ranks) == ctx.world_size:
            set_rng_state(ranks[ctx.rank], self.generator)
        else:  # another number of processes: the shared data stream goes on, dropout streams restart
            warnings.warn(
                f"resume: checkpoint has {len(ranks)} RNG streams for {ctx.world_size} processes; "
                "the batches continue exactly, dropout draws a fresh deterministic stream per process",
                stacklevel=4,  # train's caller
            )
            self.generator.set_state(ranks[0]["data"])
            torch.manual_seed(self.config.seed + ctx.rank + 1_000_003 * self.step)
        return state

    def _restore_optimizer(self, optimizer: dict[str, Any], schedule: dict[str, Any]) -> None:
        """The optimiser's moments and the schedule's step from a checkpoint, under this run's settings.

        A resume with ``--allow-changes`` may change the learning rate, weight decay or optimiser: the
        loaded state must not bring back the checkpoint's (``load_state_dict`` restores its hyper-
        parameters and the schedule's base rates). An optimiser of another kind (SGD's momentum buffers
        against Adam's moments) starts afresh."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        saved = optimizer["param_groups"]
        if len(saved) == len(fresh) and all(set(g) - {"params"} == set(f) for g, f in zip(saved, fresh)):
            self.optimizer.load_state_dict(optimizer)
        else:
            warnings.warn(
                f"resume: the checkpoint's optimiser is of another kind than {self.config.optimizer!r}; "
                "its state (momenta) starts afresh",
                stacklevel=5,  # train's caller
            )
        base = list(self.schedule.base_lrs)
        step = schedule["last_epoch"]
        rates = [b * rule(step) for b, rule in zip(base, self.schedule.lr_lambdas)]
        self.schedule.load_state_dict({**schedule, "base_lrs": base, "_last_lr": rates})
        for group, settings, rate in zip(self.optimizer.param_groups, fresh, rates):
            group.update(settings, lr=rate)

    def open_files(self, resume: bool) -> None:
        """Rank 0: write ``config.json``, start ``metrics.jsonl`` (or cut it back to the step resumed
        from) and open it for appending; a TensorBoard writer when asked for."""
        out = self.out
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            info = json.dumps(_run_info(self.task, self.model_name, self.config), indent=2) + "\n"
            write_text_atomic(out / "config.json", info)  # atomic: a kill never leaves half of it
            if resume:
                _keep_metrics_until(out / "metrics.jsonl", self.step)
            else:
                write_text_atomic(out / "metrics.jsonl", "")
            self.log_file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (closed by close())
        self.writer = _tensorboard(out, self.config.tensorboard)

    def train_step(self) -> float:
        """One optimisation step on this rank's shard of the next global batch; returns the learning
        rate it used."""
        config, device, ctx = self.config, self.ctx.device, self.ctx
        # the global batch on every rank (the same stream), this rank's shard of it on the device
        batch = self.task.sample_batch(config.batch_size, self.generator).shard(ctx.rank, ctx.world_size)
        batch = batch.to(device)
        with _autocast(device, config.amp):
            loss = self.task.loss(self.net, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # under DDP, the ranks' gradients are averaged by now
        bounds = config.clip_min is not None or config.clip_max is not None
        if bounds or config.clip_norm is not None or config.clip_value is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            if bounds:
                clamp_gradients(self.model.parameters(), config.clip_min, config.clip_max)
            if config.clip_norm is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_norm)
            if config.clip_value is not None:
                nn.utils.clip_grad_value_(self.model.parameters(), config.clip_value)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.model)
        lr = float(self.schedule.get_last_lr()[0])  # the rate this step used
        self.schedule.step()
        self.step += 1
        self.bar.update(1)
        self.loss_sum += loss.detach().float()  # no .item() here: one device sync per logged line
        self.loss_count += 1
        return lr

    def estimate(self) -> None:
        """With progress shown, print once how long the whole run should take on this machine,
        timed over the `ESTIMATE_STEPS` steps after this process's first (which pays one-off
        costs: allocations, kernel choices)."""
        if self.estimated or not (self.config.progress and self.ctx.is_main):
            return
        if self.ctx.device.type == "cuda":  # steps run asynchronously: time finished work
            torch.cuda.synchronize(self.ctx.device)
        now = time.perf_counter()
        if self.timed_from is None:
            self.timed_from = (self.step, now)
            return
        first, began = self.timed_from
        timed, left = self.step - first, self.config.steps - self.step
        if timed < ESTIMATE_STEPS and left > 0:
            return
        self.estimated = True
        if left == 0:
            return
        total = self.elapsed() + (now - began) / timed * left
        self.bar.write(
            f"{self.task.name}: {self.config.steps} steps, about {_duration(total)} on this machine "
            f"(measured from {timed} steps; evaluations add to it)",
            file=sys.stderr,
        )

    def log(self, lr: float, evaluate: bool) -> None:
        """Log a line: the mean loss since the last one (over every rank), the learning rate, and on
        rank 0 with ``evaluate`` the task's metrics; to ``metrics.jsonl``, TensorBoard and the bar."""
        loss = self.ctx.mean(self.loss_sum).item() / self.loss_count
        record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": lr}
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: the loss is {loss} (try a lower lr or clipping)")
        self.loss_sum.zero_()
        self.loss_count = 0
        if evaluate and self.ctx.is_main:
            record.update(self.evaluate())
        record["elapsed"] = round(self.elapsed(), 3)
        shown = {"loss": f"{loss:.4g}"}
        if self.task.metric in self.metrics:
            shown[self.task.metric] = f"{self.metrics[self.task.metric]:.4g}"
        self.bar.set_postfix(shown)
        if self.plain_every and (evaluate or self.step % self.plain_every == 0):
            text = ", ".join(f"{k} {v}" for k, v in shown.items())
            print(
                f"{self.task.name} step {self.step}/{self.config.steps}: {text}", file=sys.stderr, flush=True
            )
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, self.step)

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of the evaluated weights (the average when there is one), kept as
        ``metrics``; with an average, also the raw weights' as ``raw_<metric>``."""
        device = self.ctx.device
        evaluated = self.model if self.average is None else self.average.model
        with _evaluating(evaluated, device):
            self.metrics = {k: float(v) for k, v in self.task.evaluate(evaluated, device).items()}
        raw: dict[str, float] = {}
        if self.average is not None:  # the raw weights too, to show what the average buys
            with _evaluating(self.model, device):
                raw = {f"raw_{k}": float(v) for k, v in self.task.evaluate(self.model, device).items()}
        return {**raw, **self.metrics}

    def snapshot(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything needed to continue exactly here (plain types and tensors only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": library_version(),
            "task": self.task.name,
            "model_name": self.model_name,
            "task_options": dict(self.task.options),
            "train": self.config.to_dict(),
            "step": self.step,
            "elapsed": self.elapsed(),
            "metrics": self.metrics,
            "best": self.best,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "average": None if self.average is None else self.average.state_dict(),
            "rng": rng_states,
            "model_config": model_config(self.model),
            "running_loss": {"sum": self.loss_sum.detach().cpu().clone(), "count": self.loss_count},
        }

    def save(self, evaluated: bool = False) -> Path | None:
        """Checkpoint this step to ``checkpoint.pt``; after an evaluation that improved the headline
        metric, to ``best.pt`` as well. A collective: every rank calls it, rank 0 writes (and
        returns the checkpoint's path)."""
        rng_states = self.ctx.gather(rng_state(self.generator))  # a collective: every rank takes part
        if self.out is None:
            return None
        metric = self.task.metric
        improved = evaluated and metric in self.metrics
        improved = improved and _is_better(self.metrics[metric], self.best, self.task.higher_is_better)
        if improved:
            self.best = self.metrics[metric]
        state = self.snapshot(rng_states)
        if improved:  # best.pt first: a kill between the two writes replays this step
            save_checkpoint(state, self.out / "best.pt")
        return save_checkpoint(state, self.out / "checkpoint.pt")

    def close(self, wait: bool) -> None:
        """Close the bar and files, and end this process's part in the job (``wait``: together)."""
        self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        if self.writer is not None:
            self.writer.close()
        if self.net is not self.model:
            # The DDP reducer holds the process group: free it while the group lives, not after
            # destroy_process_group (gloo can abort at exit when its threads outlive the group).
            self.net = self.model
            gc.collect()
        self.ctx.close(wait=wait)

    def finish(self) -> dict[str, Any]:
        """Hand ``model`` the weights that were evaluated, write ``results.json``, return the result."""
        if self.average is not None:
            self.model.load_state_dict(self.average.model.state_dict())
        result = {
            "step": self.step,
            "metrics": self.metrics,
            "best": self.best,
            "elapsed": round(self.elapsed(), 3),
        }
        if self.out is not None:
            results = {"task": self.task.name, "model": self.model_name, **result}
            write_text_atomic(self.out / "results.json", json.dumps(results, indent=2) + "\n")
        return result
