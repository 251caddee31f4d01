"""Run folders: create, validate, rebuild and reproduce. The layer under :mod:`settransformer.cli`.

A run lives in ``runs/<task>/<name>/`` (see :mod:`settransformer.training.loop` for its files). This module
turns names and settings into tasks, models and run folders, checks every piece of user input
(raising :class:`RunError` with one clear line), and runs the ``reproduce`` protocol: every model
of a task's table, for a number of seeds, and the table beside the paper's.

It sits above the tasks (it uses the registry), like the CLI; library modules never import it.
"""

from __future__ import annotations

import datetime
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..training.checkpoint import MODEL_KEYS, RESUME_KEYS, check_checkpoint, load_checkpoint, model_config
from ..training.config import TrainConfig
from ..training.distributed import is_main_process, resolve_device
from ..training.loop import check_runnable, evaluated_weights, train
from . import get_task
from .base import Task
from .report import write_results

__all__ = [
    "RunError",
    "build_task",
    "load_run",
    "new_run_dir",
    "parse_option",
    "read_checkpoint",
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


#: ``which`` -> the file of a run folder that :func:`load_run` reads.
CHECKPOINT_FILES = {"last": "checkpoint.pt", "best": "best.pt"}


def _missing(path: Path) -> RunError:
    kind = "checkpoint file" if path.suffix == ".pt" else "run folder"
    return RunError(f"{kind} {path}: does not exist")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """What a run is: the ``config.json`` of a run folder, checked for the keys every run has; or,
    for a checkpoint file, the same keys (``task``, ``model``, ``task_options``, ``train``,
    ``version``) read from the checkpoint itself."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        state = read_checkpoint(run_dir)
        return {
            "task": state["task"],
            "model": state["model_name"],
            "task_options": state["task_options"],
            "train": state.get("train") or {},
            "version": state.get("version"),
        }
    if not run_dir.is_dir():
        raise _missing(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(
            f"{run_dir}: not a run folder (expected a config.json written by `settransformer train`)"
        )
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(info).__name__}")
    missing = [k for k in ("task", "model", "task_options", "train") if k not in info]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)}")
    return info


def read_checkpoint(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """The training checkpoint at ``path``, safely loaded (no code from the file runs) and checked
    for the entries rebuilding its model needs (``resume``: and continuing its run); every problem
    is a :class:`RunError` naming the file."""
    try:
        return check_checkpoint(load_checkpoint(path), path, RESUME_KEYS if resume else MODEL_KEYS)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None


def _version_note(state: dict[str, Any]) -> str:
    written = state.get("version")
    if written in (None, __version__):
        return ""
    return f" (written by settransformer {written}, this is {__version__})"


def _misfit(model: nn.Module, weights: dict[str, Any]) -> str:
    """Why ``weights`` do not load into ``model``: missing, unexpected and reshaped entries."""
    own = model.state_dict()
    parts = []
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [
        f"{k} {tuple(weights[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in weights and weights[k].shape != own[k].shape
    ]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def _config_changes(saved: Any, built: dict[str, Any] | None) -> str:
    """The model settings stored in the checkpoint that differ from those of the rebuilt model."""
    if not isinstance(saved, dict) or built is None or saved.get("config") == built["config"]:
        return ""
    old, new = saved.get("config") or {}, built["config"]
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def load_run(
    run_dir: str | Path, which: str = "last", device: str = "auto"
) -> tuple[Task, nn.Module, dict[str, Any]]:
    """Rebuild a run's task and model from a checkpoint and load its weights, safely.

    ``run_dir`` is a run folder (its ``checkpoint.pt`` for ``which="last"``, ``best.pt`` for
    ``"best"``; its ``config.json`` must name the same task and model) or a checkpoint file alone
    (``which`` is then ignored): a checkpoint names its task, task options and model, so nothing
    else is needed. The weights are the evaluated ones: the moving average when the run kept one.

    Returns ``(task, model on device in eval mode, checkpoint)``.

    Raises:
        RunError: with a message naming the file, for a missing file or folder, a file that is not a
            checkpoint (truncated, another format, pickled objects that could run code), a checkpoint
            of a newer format, of an unknown task or model, or whose weights do not fit the model.
    """
    source = Path(run_dir)
    if which not in CHECKPOINT_FILES:
        raise RunError(f"which: expected 'last' or 'best', got {which!r}")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise RunError(str(e)) from None
    if source.is_dir():
        info: dict[str, Any] | None = read_run_config(source)
        path = source / CHECKPOINT_FILES[which]
    elif source.is_file():
        info, path = None, source
    else:
        raise _missing(source)
    state = read_checkpoint(path)
    name = f"{state['task']}/{state['model_name']}"
    if info is not None and (state["task"], state["model_name"]) != (info["task"], info["model"]):
        raise RunError(
            f"{path}: holds a checkpoint of {name}, but the run "
            f"({source / 'config.json'}) is {info['task']}/{info['model']}"
        )
    try:
        task = build_task(state["task"], state["task_options"])
        model = task.build_model(check_model(task, state["model_name"]))
    except (ValueError, TypeError) as e:  # RunError included
        raise RunError(f"{path}: cannot rebuild its model {name}: {e}{_version_note(state)}") from None
    weights = evaluated_weights(state)
    changes = _config_changes(state.get("model_config"), model_config(model))
    misfit = _misfit(model, weights)
    if misfit:
        changed = f"; the model's settings changed: {changes}" if changes else ""
        raise RunError(
            f"{path}: its weights do not fit the model {name} ({misfit}){changed}{_version_note(state)}"
        )
    if changes:
        warnings.warn(
            f"{path}: {name} is now built with other settings than when it was saved ({changes})"
            f"{_version_note(state)}; its weights fit and are loaded",
            stacklevel=2,
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # e.g. a parameter whose dtype cannot be copied
        first = (str(e).strip().splitlines() or [""])[-1].strip()
        raise RunError(f"{path}: its weights do not fit the model {name} ({first})") from None
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
    plots: bool = True,
) -> tuple[dict[str, list[dict[str, float]]], Path]:
    """Train every model in ``models`` for ``seeds`` seeds (``config.seed``, ``+1``, ...) under
    ``out/<model>/seed<k>/`` and write ``out/results.md`` and ``out/results.json``.

    A run folder that already holds the same run is continued (or reused when complete); one
    holding a different run is an error unless ``overwrite``. ``plots``: write each model's
    figures into its first seed's folder. Returns ``(runs, results.md path)``.
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
        result = train_run(task, model, cfg, run_dir, resume=resume, plots=plots and k == 0)
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
