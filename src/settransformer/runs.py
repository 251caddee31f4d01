"""Run folders: create, validate, rebuild and reproduce. The layer under :mod:`settransformer.cli`.

A run lives in ``runs/<task>/<name>/`` (see :mod:`settransformer.train` for its files). This module
turns names and settings into tasks, models and run folders, checks every piece of user input
(raising :class:`RunError` with one clear line), and runs the ``reproduce`` protocol: every model
of a task's table, for a number of seeds, and the table beside the paper's.

It sits above the tasks (it uses the registry), like the CLI; library modules never import it.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .distributed import is_main_process, resolve_device
from .tasks import get_task
from .tasks.base import Task
from .tasks.report import write_results
from .train import check_runnable, evaluated_weights, train

__all__ = [
    "RunError",
    "build_task",
    "load_run",
    "new_run_dir",
    "parse_option",
    "read_run_config",
    "reproduce",
    "task_class",
    "train_run",
]

#: Settings that change how a run is shown or where it runs, not what it computes.
_COSMETIC = ("progress", "tensorboard", "device", "log_every")


class RunError(ValueError):
    """Bad user input (a name, a file, a value): the CLI prints it as one line and exits with 2."""


def task_class(name: str) -> type[Task]:
    """The registered task ``name``; unknown or unavailable tasks are a :class:`RunError`."""
    try:
        return get_task(name)
    except ValueError as e:  # TaskUnavailable included
        raise RunError(str(e)) from None


def build_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """The registered task ``name`` with ``options`` over its defaults (types checked)."""
    cls = task_class(name)
    options = dict(options or {})
    defaults = cls.default_options()
    for key, value in options.items():
        if key not in defaults:
            raise RunError(
                f"task option {key!r}: {name} has no such option; known: {', '.join(sorted(defaults))}"
            )
        options[key] = _check_option(key, value, defaults[key])
    try:
        return cls(**options)
    except (ValueError, TypeError) as e:
        raise RunError(f"{name}: {e}") from None


def parse_option(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(KEY, value)``; the value is read as JSON when it is valid JSON
    (``10``, ``0.5``, ``true``, ``[1, 2]``), else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RunError(f"--set {text!r}: expected KEY=VALUE, e.g. --set max_size=20")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _check_option(key: str, value: Any, default: Any) -> Any:
    """``value`` with the type of the option's default (ints are accepted for floats)."""
    expected = type(default)
    if default is None or (
        isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    ):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise RunError(
        f"task option {key!r}: expected {expected.__name__} like the default {default!r}, got {value!r}"
    )


def check_model(task: type[Task] | Task, model: str) -> str:
    """``model`` if it is a row of the task's table, else a :class:`RunError` listing the rows."""
    if model not in task.model_names:
        raise RunError(f"model {model!r}: {task.name} has the models {', '.join(task.model_names)}")
    return model


def default_model(task: type[Task]) -> str:
    return task.default_model or task.model_names[0]


def new_run_dir(task: str, model: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """``out``, or ``root/<task>/<model>-<timestamp>``; refuses a folder that already holds files."""
    if out is not None:
        path = Path(out)
        # Under torchrun, rank 0 may already have created the folder: only it checks.
        if is_main_process() and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunError(
                f"--out {path}: already exists and is not empty; "
                "pass --resume to continue that run, or choose another folder"
            )
        return path
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / task / f"{model}-{stamp}"
    i = 1
    while path.exists():
        path, i = Path(root) / task / f"{model}-{stamp}-{i}", i + 1
    return path


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder, checked for the keys every run has."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir}: does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(
            f"{run_dir}: not a run folder (expected a config.json written by `settransformer train`)"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("task", "model", "task_options", "train") if k not in info]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)}")
    return info


def load_run(
    run_dir: str | Path, which: str = "last", device: str = "auto"
) -> tuple[Task, nn.Module, dict[str, Any]]:
    """Rebuild a run's task and model and load ``checkpoint.pt`` (``which="last"``) or ``best.pt``
    (the averaged weights when the run kept an average: those its metrics were measured with).

    Returns ``(task, model on device in eval mode, checkpoint)``.
    """
    run_dir = Path(run_dir)
    info = read_run_config(run_dir)
    path = run_dir / {"last": "checkpoint.pt", "best": "best.pt"}[which]
    try:
        state = load_checkpoint(path, map_location="cpu")
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None
    if (state.get("task"), state.get("model_name")) != (info["task"], info["model"]):
        raise RunError(
            f"{path}: holds a checkpoint of {state.get('task')}/{state.get('model_name')}, but the run "
            f"({run_dir / 'config.json'}) is {info['task']}/{info['model']}"
        )
    task = build_task(info["task"], info["task_options"])
    model = task.build_model(check_model(task, info["model"]))
    try:
        model.load_state_dict(evaluated_weights(state))
    except RuntimeError as e:
        raise RunError(f"{path}: does not fit the model {info['model']} ({str(e).splitlines()[0]})") from None
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise RunError(str(e)) from None
    return task, model.to(dev).eval(), state


def train_run(
    task: Task,
    model_name: str,
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Seed, build ``model_name``, train it into ``run_dir`` and write its plots; return the result."""
    try:
        check_runnable(config)
    except ValueError as e:
        raise RunError(str(e)) from None
    torch.manual_seed(config.seed)  # the model's initial weights depend on the seed, nothing else
    model = task.build_model(model_name)
    result = train(model, task, config, run_dir, model_name=model_name, resume=resume)
    if plots and is_main_process():
        with torch.random.fork_rng(devices=[]):
            result["plots"] = [
                str(p) for p in task.plot(model.eval(), run_dir, next(model.parameters()).device)
            ]
    return result


def _same_run(info: dict[str, Any], task: Task, model: str, config: TrainConfig) -> bool:
    wanted = {k: v for k, v in config.to_dict().items() if k not in _COSMETIC}
    saved = {k: v for k, v in info["train"].items() if k not in _COSMETIC}
    return (info["task"], info["model"], info["task_options"], saved) == (
        task.name,
        model,
        task.options,
        wanted,
    )


def reproduce(
    task: Task,
    models: list[str],
    config: TrainConfig,
    out: Path,
    *,
    seeds: int = 1,
    overwrite: bool = False,
    log: Any = print,
) -> tuple[dict[str, list[dict[str, float]]], Path]:
    """Train every model in ``models`` for ``seeds`` seeds (``config.seed``, ``+1``, ...) under
    ``out/<model>/seed<k>/`` and write ``out/results.md`` and ``out/results.json``.

    A run folder that already holds the same run is continued (or reused when complete); one
    holding a different run is an error unless ``overwrite``. Returns ``(runs, results.md path)``.
    """
    for m in models:
        check_model(task, m)
    if seeds < 1:
        raise RunError(f"--seeds: expected a positive integer, got {seeds}")
    # Check every run folder before training anything, so bad input changes nothing on disk.
    plan = []
    for model in models:
        for k in range(seeds):
            cfg, run_dir = config.replace(seed=config.seed + k), out / model / f"seed{k}"
            if (run_dir / "config.json").exists() and not overwrite:
                if not _same_run(read_run_config(run_dir), task, model, cfg):
                    raise RunError(
                        f"{run_dir}: holds a run with other settings; "
                        "pass --overwrite to replace it, or choose another --out"
                    )
            elif run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "config.json").exists():
                raise RunError(f"{run_dir}: exists and is not a run folder; choose another --out")
            plan.append((model, k, cfg, run_dir))

    runs: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for model, k, cfg, run_dir in plan:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        resume = (run_dir / "checkpoint.pt").exists()  # continue, or reuse when already finished
        result = train_run(task, model, cfg, run_dir, resume=resume, plots=k == 0)
        runs.setdefault(model, []).append(result["metrics"])
        seconds.setdefault(model, []).append(result["elapsed"])
        shown = ", ".join(f"{key} {v:.4g}" for key, v in result["metrics"].items())
        log(f"{task.name} {model} seed {cfg.seed}: {shown} (trained {result['elapsed']:.1f}s)")
    settings = {
        "task_options": task.options,
        "train": {k: v for k, v in config.to_dict().items() if k not in ("progress", "tensorboard")},
        "seeds": [config.seed + k for k in range(seeds)],
        "training_seconds": seconds,
    }
    md, _ = write_results(out, type(task), runs, settings)
    return runs, md
