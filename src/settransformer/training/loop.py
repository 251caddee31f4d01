"""The one training loop, shared by every task.

:func:`train` takes a model, a :class:`~settransformer.tasks.base.Task` and a
:class:`~settransformer.training.config.TrainConfig`, and talks to the task only through ``sample_batch``,
``loss`` and ``evaluate``. With a ``run_dir`` it keeps the run on disk::

    run_dir/config.json      task, model, task options, training settings, seed, library version
    run_dir/metrics.jsonl    one JSON object per logged step: step, loss, lr, elapsed [, eval metrics]
    run_dir/checkpoint.pt    the last checkpoint (at step 0, every evaluation, the end, and on SIGINT/SIGTERM)
    run_dir/best.pt          the checkpoint with the best headline metric so far
    run_dir/results.json     the final metrics

Every random number comes from the seeded data generator or torch's seeded global RNG, and both
are checkpointed, so a resumed run reproduces an uninterrupted one exactly (on CPU).

Example:
    >>> task = MaxRegression()
    >>> model = task.build_model("settransformer")
    >>> config = TrainConfig(steps=200, batch_size=128)
    >>> result = train(model, task, config, "runs/max-regression/st", model_name="settransformer")
    >>> result["metrics"]["mae"]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import __version__
from ..tasks.base import Task
from . import distributed
from .checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_KEYS,
    check_checkpoint,
    load_checkpoint,
    model_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_text_atomic,
)
from .config import TrainConfig
from .interrupt import Interrupted, StopOnSignal
from .optim import WeightAverage, bound_gradients, make_optimizer, make_schedule

__all__ = ["TrainConfig", "check_runnable", "evaluated_weights", "train"]


def check_runnable(config: TrainConfig) -> None:
    """Raise ``ValueError`` for settings this machine or launch cannot run (device, AMP, batch split)."""
    device = distributed.resolve_device(config.device)
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp: fp16 needs a CUDA device (use bf16 on CPU, or off)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
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
            stacklevel=3,
        )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _run_info(task: Task, model_name: str, config: TrainConfig) -> dict[str, Any]:
    return {
        "task": task.name,
        "model": model_name,
        "task_options": dict(task.options),
        "train": config.to_dict(),
        "seed": config.seed,
        "version": __version__,
    }


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again), and a
    last line cut short by a kill; rewrite atomically, so a kill now loses no line either."""
    if path.exists():
        lines = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    lines.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # torn by a kill mid-write: always past the checkpoint, logged again
        write_text_atomic(path, "".join(line + "\n" for line in lines))


def _is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (value > best if higher_is_better else value < best)


def train(
    model: nn.Module,
    task: Task,
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
        Interrupted: SIGINT or SIGTERM arrived (:mod:`settransformer.training.interrupt`); the step it was in
            was finished and saved to ``run_dir/checkpoint.pt``, from which ``resume`` continues exactly.

    ``metrics`` are the last evaluation's (``task.evaluate``), ``best`` the best value of the
    headline metric ``task.metric`` seen at any evaluation. Under ``torchrun`` the model is wrapped
    in ``DistributedDataParallel``; every process draws the same global batch of ``batch_size`` sets
    (one data generator seeded ``seed`` on all ranks) and trains on its own contiguous
    ``batch_size / world_size`` of it, so the averaged gradient is that of a one-process run with the
    same batch (dropout differs: torch's global RNG is seeded ``seed + rank``). Only rank 0
    evaluates (on the whole test set) and writes files. With ``config.ema_decay``
    the metrics are those of the moving average of the weights, which ``model`` holds at the end.
    """
    run_dir = None if run_dir is None else Path(run_dir)
    model_name = model_name or type(model).__name__
    check_runnable(config)
    if resume and run_dir is None:
        raise ValueError("resume: needs a run_dir holding checkpoint.pt")
    ctx = distributed.setup(config.device)
    device = ctx.device

    # Randomness: the data generator for batches, torch's global RNG for dropout and the like. The
    # data stream is the same on every rank (each keeps its shard of the global batch), so it does
    # not depend on the number of processes; dropout masks must differ between ranks.
    torch.manual_seed(config.seed + ctx.rank)
    generator = torch.Generator().manual_seed(config.seed)

    model.to(device).train()
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    current_scale = [1.0]  # read by the gradient hooks; updated once per step under fp16

    step, elapsed_before, metrics, best = 0, 0.0, {}, None
    # The losses summed since the last logged line (checkpointed: a signal may stop between lines).
    loss_sum, loss_count = torch.zeros((), device=device), 0
    state: dict[str, Any] = {}
    if resume and run_dir is not None:
        path = run_dir / "checkpoint.pt"
        state = check_checkpoint(load_checkpoint(path), path, RESUME_KEYS)
        if state.get("model_name") != model_name or state.get("task") != task.name:
            raise ValueError(
                f"{run_dir}/checkpoint.pt: holds {state.get('task')}/{state.get('model_name')}, "
                f"expected {task.name}/{model_name}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        step, elapsed_before, metrics, best = state["step"], state["elapsed"], state["metrics"], state["best"]
        ranks = state["rng"]
        if len(ranks) == ctx.world_size:
            set_rng_state(ranks[ctx.rank], generator)
            if state.get("running_loss"):  # nonzero only after a signal, and then on one process
                loss_sum, loss_count = state["running_loss"]["sum"].to(device), state["running_loss"]["count"]
        else:  # another number of processes: the shared data stream goes on, dropout streams restart
            warnings.warn(
                f"resume: checkpoint has {len(ranks)} RNG streams for {ctx.world_size} processes; "
                "the batches continue exactly, dropout draws a fresh deterministic stream per process",
                stacklevel=2,
            )
            generator.set_state(ranks[0]["data"])
            torch.manual_seed(config.seed + ctx.rank + 1_000_003 * step)
    average = None if config.ema_decay is None else WeightAverage(model, config.ema_decay)
    if average is not None and state.get("average"):
        average.load_state_dict(state["average"])
    evaluated = model if average is None else average.model  # what evaluation and `metrics` see
    hooks = bound_gradients(model, config.clip_min, config.clip_max, lambda: current_scale[0])

    out = run_dir if ctx.is_main else None  # rank 0 alone writes files
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        info = json.dumps(_run_info(task, model_name, config), indent=2) + "\n"
        write_text_atomic(out / "config.json", info)  # atomic: a kill never leaves half of it
        if resume:
            _keep_metrics_until(out / "metrics.jsonl", step)
        else:
            (out / "metrics.jsonl").write_text("")
    log_file = None if out is None else open(out / "metrics.jsonl", "a")  # noqa: SIM115 (closed below)
    writer = _tensorboard(out, config.tensorboard)

    net: nn.Module = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bar = tqdm(
        total=config.steps, initial=step, disable=not (config.progress and ctx.is_main), desc=task.name
    )
    start = time.perf_counter()

    def snapshot(rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything needed to continue exactly here (plain types and tensors only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "task": task.name,
            "model_name": model_name,
            "task_options": dict(task.options),
            "train": config.to_dict(),
            "step": step,
            "elapsed": elapsed_before + time.perf_counter() - start,
            "metrics": metrics,
            "best": best,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "average": None if average is None else average.state_dict(),
            "rng": rng_states,
            "model_config": model_config(model),
            "running_loss": {"sum": loss_sum.detach().cpu().clone(), "count": loss_count},
        }

    stop = StopOnSignal().install()  # SIGINT, SIGTERM: finish the step, save it, raise Interrupted
    finished = False
    try:
        if not resume:  # a checkpoint from the start, so a run killed before its first evaluation resumes
            rng_states = ctx.gather(rng_state(generator))
            if out is not None:
                save_checkpoint(snapshot(rng_states), out / "checkpoint.pt")
        while step < config.steps:
            # Under DDP the ranks decide together, on logged steps (no running loss to carry).
            signum = stop.agreed(ctx, can_stop=step % config.log_every == 0)
            if signum is not None:
                rng_states = ctx.gather(rng_state(generator))
                saved = None if out is None else save_checkpoint(snapshot(rng_states), out / "checkpoint.pt")
                ctx.barrier()
                finished = True  # every rank stops at this step: leave the process group together
                raise Interrupted(signum, step, saved)
            # the global batch on every rank (the same stream), this rank's shard of it on the device
            batch = task.sample_batch(config.batch_size, generator).shard(ctx.rank, ctx.world_size).to(device)
            with _autocast(device, config.amp):
                loss = task.loss(net, batch)
            optimizer.zero_grad(set_to_none=True)
            if hooks and scaler.is_enabled():  # get_scale() syncs with the GPU: only when needed
                current_scale[0] = scaler.get_scale()
            scaler.scale(loss).backward()
            if config.clip_norm is not None or config.clip_value is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                if config.clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
                if config.clip_value is not None:
                    nn.utils.clip_grad_value_(model.parameters(), config.clip_value)
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update(model)
            lr = schedule.get_last_lr()[0]  # the rate this step used
            schedule.step()
            step += 1
            bar.update(1)
            loss_sum += loss.detach().float()  # no .item() here: one device sync per logged line
            loss_count += 1

            evaluate_now = step == config.steps or (config.eval_every > 0 and step % config.eval_every == 0)
            if not (evaluate_now or step % config.log_every == 0):
                continue
            record: dict[str, Any] = {"step": step, "loss": ctx.mean(loss_sum).item() / loss_count, "lr": lr}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"step {step}: the loss is {record['loss']} (try a lower lr or clipping)"
                )
            loss_sum.zero_()
            loss_count = 0
            if evaluate_now and ctx.is_main:
                with _evaluating(evaluated, device):
                    metrics = {k: float(v) for k, v in task.evaluate(evaluated, device).items()}
                if average is not None:  # the raw weights too, to show what the average buys
                    with _evaluating(model, device):
                        record.update({f"raw_{k}": float(v) for k, v in task.evaluate(model, device).items()})
                record.update(metrics)
            record["elapsed"] = round(elapsed_before + time.perf_counter() - start, 3)
            shown = {"loss": f"{record['loss']:.4g}"}
            if task.metric in metrics:
                shown[task.metric] = f"{metrics[task.metric]:.4g}"
            bar.set_postfix(shown)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if writer is not None:
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, step)
            if evaluate_now:
                rng_states = ctx.gather(rng_state(generator))  # a collective: every rank takes part
                if out is not None:
                    improved = task.metric in metrics and _is_better(
                        metrics[task.metric], best, task.higher_is_better
                    )
                    if improved:
                        best = metrics[task.metric]
                    state = snapshot(rng_states)
                    if improved:  # best.pt first: a kill between the two writes replays this step
                        save_checkpoint(state, out / "best.pt")
                    save_checkpoint(state, out / "checkpoint.pt")
                ctx.barrier()
        finished = True
    finally:
        stop.restore()
        bar.close()
        for h in hooks:
            h.remove()
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
        ctx.close(wait=finished)

    if average is not None:  # hand back the weights that were evaluated
        model.load_state_dict(average.model.state_dict())
    elapsed = elapsed_before + time.perf_counter() - start
    result = {"step": step, "metrics": metrics, "best": best, "elapsed": round(elapsed, 3)}
    if out is not None:
        results = {"task": task.name, "model": model_name, **result}
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return result
