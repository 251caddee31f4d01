"""Run folders: create, validate, rebuild and reproduce. The layer under
[`settransformer.cli`][settransformer.cli].

A run lives in ``runs/<task>/<name>/`` (see [`settransformer.training.loop`][settransformer.training.loop] for
its files). This module turns names and settings into tasks, models and run folders, checks every piece of
user input (raising [`RunError`][settransformer.tasks.runs.RunError] with one clear line), and runs the
``reproduce`` protocol: every model of a task's table, for a number of seeds, and the table beside the
paper's.

It sits above the tasks (it uses the registry), like the CLI; library modules never import it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import re
import shutil
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.files import os_error_message, short, write_text_atomic
from ..deploy.saved import is_saved_model, load_model
from ..training.checkpoint import (
    MODEL_KEYS,
    RESUME_KEYS,
    check_checkpoint,
    library_version,
    load_checkpoint,
    model_config,
)
from ..training.config import TrainConfig
from ..training.distributed import is_main_process, launched_world_size, resolve_device
from ..training.loop import check_runnable, evaluated_weights, train
from . import did_you_mean, get_task
from .base import Task
from .report import plot_training_curve, write_results

__all__ = [
    "RunError",
    "build_model",
    "build_task",
    "check_buildable",
    "check_not_run_file",
    "check_resume",
    "data_changes",
    "data_fingerprint",
    "load_for_inference",
    "load_run",
    "lock_if_run",
    "new_run_dir",
    "parse_option",
    "read_checkpoint",
    "read_run_config",
    "record_data",
    "reproduce",
    "run_lock",
    "task_class",
    "train_run",
]

_COSMETIC = ("progress", "tensorboard", "device", "log_every")
"""Settings that change how a run is shown or where it runs, not what it computes."""


class RunError(ValueError):
    """Bad user input (a name, a file, a value): the CLI prints it as one line and exits with 2."""


def task_class(name: str) -> type[Task]:
    """The registered task ``name``; unknown or unavailable tasks are a
    [`RunError`][settransformer.tasks.runs.RunError]."""
    try:
        return get_task(name)
    except ValueError as e:  # TaskUnavailable included
        raise RunError(str(e)) from None


OPTION_ALIASES = {"pool": "pooling", "standardise": "standardize"}
"""Other spellings of task options, accepted where a user's file (a config, an older run) may hold them."""


def build_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """The registered task ``name`` with ``options`` over its defaults (see
    [`check_task_options`][settransformer.tasks.runs.check_task_options])."""
    cls = task_class(name)
    options = check_task_options(name, options)
    try:
        return cls(**options)
    except (ValueError, TypeError) as e:
        raise RunError(f"{name}: {short(str(e), 600, quote=False)}") from None


def check_task_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` of the task ``name`` as its runs store them: known names (an option spelled as in
    [`OPTION_ALIASES`][settransformer.tasks.runs.OPTION_ALIASES] is read as its name), the types of the
    defaults, and file and folder paths made absolute."""
    cls = task_class(name)
    defaults = cls.default_options()
    options = _canonical_options(name, dict(options or {}), defaults)
    for key, value in options.items():
        if key not in defaults:
            raise RunError(
                f"task option {key!r}: {name} has no such option{did_you_mean(key, defaults)}; "
                f"known: {', '.join(sorted(defaults))}"
            )
        if value is None and key in cls.nullable_options:
            continue
        options[key] = _check_option(key, value, defaults[key])
        if is_path_option(key) and options[key] is not None:
            options[key] = _absolute_path(key, options[key])
    _check_heads({**defaults, **options})
    return options


def is_path_option(key: str) -> bool:
    """Whether the task option ``key`` names a file or folder (``path``, ``*_path``, ``*_dir``)."""
    return key == "path" or key.endswith(("_path", "_dir"))


def _absolute_path(key: str, value: Any) -> str:
    """A path option as an absolute path, so a run's ``config.json`` finds its data from any folder
    (``eval``, ``plot`` and ``--resume`` run wherever the user is); a number is a folder's name."""
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise RunError(f"task option {key!r}: expected a file or folder path, got {short(value)}")
    return ",".join(str(p.resolve()) for p in _option_paths(str(value)))


def _option_paths(value: str) -> list[Path]:
    """The files or folders a path option names: itself, or, where it is no path and holds commas,
    each comma-separated part (``digits-clustering``'s ``features_path=FEATURES,LABELS``)."""
    path = Path(value).expanduser()
    if "," not in value or path.exists():
        return [path]
    return [Path(part.strip()).expanduser() for part in value.split(",") if part.strip()]


DATA_FILE = "data.json"
"""A run folder's record of the files its task options name, as they were when it trained
([`record_data`][settransformer.tasks.runs.record_data])."""


def data_fingerprint(options: dict[str, Any], run_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The files and folders a task's path options name (a cache's aside), by size and modification time.

    Per option: ``path``, ``files`` (1 for a file, the count under a folder), ``bytes`` and
    ``mtime_ns`` (the latest), or ``missing``. Cheap (no file is read), so an edit that keeps both
    size and time goes unseen, and a copy that does not keep the times counts as a change. A run
    folder ``run_dir`` inside a data folder is left out: its own files change as it trains.

    Examples:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = (Path(folder) / "a.csv").write_text("1,2\\n")
        >>> record = data_fingerprint({"path": folder, "steps": 3})
        >>> list(record), record["path"]["files"], record["path"]["bytes"]
        (['path'], 1, 4)
    """
    out = {}
    for key, value in sorted(options.items()):
        # a cache is the task's own output (filled while it runs), not data it was given
        if is_path_option(key) and not key.startswith("cache") and isinstance(value, str):
            out[key] = _fingerprint(value, None if run_dir is None else Path(run_dir).resolve())
    return out


def _fingerprint(value: str, skip: Path | None) -> dict[str, Any]:
    """The files under the paths of one option (its value, as the record names it)."""
    stats = []
    for path in _option_paths(value):
        if path.is_file():
            stats.append(path.stat())
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if (Path(root) / d).resolve() != skip]
                stats += [os.stat(Path(root) / name) for name in names]
        else:
            return {"path": value, "missing": True}
    files = size = latest = 0
    for st in stats:
        files, size, latest = files + 1, size + st.st_size, max(latest, st.st_mtime_ns)
    return {"path": value, "files": files, "bytes": size, "mtime_ns": latest}


def record_data(run_dir: str | Path, options: dict[str, Any]) -> list[str]:
    """Write ``run_dir/data.json``, the [`data_fingerprint`][settransformer.tasks.runs.data_fingerprint]
    of ``options``, and return what changed since the one there (none: ``[]``)."""
    now = data_fingerprint(options, run_dir)  # once: a folder's files are walked for it
    changes = _changes(run_dir, now)
    if now:
        write_text_atomic(Path(run_dir) / DATA_FILE, json.dumps(now, indent=2) + "\n")
    return changes


def data_changes(run_dir: str | Path, options: dict[str, Any]) -> list[str]:
    """How the files of ``options`` differ from ``run_dir``'s record of them, one line per option
    (none, or no record: ``[]``)."""
    return _changes(run_dir, data_fingerprint(options, run_dir))


def _changes(run_dir: str | Path, now: dict[str, dict[str, Any]]) -> list[str]:
    """[`data_changes`][settransformer.tasks.runs.data_changes] against the fingerprint ``now``."""
    try:
        saved = json.loads((Path(run_dir) / DATA_FILE).read_text())
    except (OSError, ValueError):
        return []
    lines = []
    for key, before in saved.items() if isinstance(saved, dict) else ():
        after = now.get(key)
        if not isinstance(before, dict) or after is None or after == before:
            continue
        if after.get("missing"):
            what = "is gone"
        elif before.get("missing"):
            what = "was missing"
        elif after["path"] != before.get("path"):
            what = f"was {before.get('path')}"
        else:
            parts = [
                f"{name} {before.get(name)} -> {after[name]}"
                for name in ("files", "bytes")
                if before.get(name) != after[name]
            ]
            what = "; ".join(parts) or "modified"
        lines.append(f"task option {key!r} ({after['path']}): {what}")
    return lines


def _canonical_options(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``options`` under their names in ``defaults``, aliases renamed; both spellings is an error."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        canonical = key if key in defaults else OPTION_ALIASES.get(key, key)
        if canonical in out:
            raise RunError(f"task option {canonical!r}: {name} got it twice, once spelled {key!r}")
        out[canonical] = value
    return out


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


MAX_OPTION_INT = 10**7
"""Bounds on task options (sizes, counts, magnitudes) beyond which data would not fit in memory: this
one on the magnitude of an integer option (seeds: any 63-bit value)."""
MAX_OPTION_FLOAT = 1e9
"""Bound on the magnitude of a float task option (see
[`MAX_OPTION_INT`][settransformer.tasks.runs.MAX_OPTION_INT])."""
MAX_PARAMETERS = 2**30
"""The most parameters a model may have (4 GiB of float32), checked before its weights exist."""
_POSITIVE = ("dim_hidden", "num_heads", "num_inducing", "num_layers", "num_seeds", "max_size", "pca")
"""Size options that must be at least 1 where a task has them."""


def _check_option(key: str, value: Any, default: Any) -> Any:
    """``value`` with the type of the option's default (ints are accepted for floats), finite and
    within `MAX_OPTION_INT` / `MAX_OPTION_FLOAT` (seeds: any 63-bit value)."""
    expected = type(default)
    if default is None or (
        isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    ):
        checked = value
    elif expected is float and isinstance(value, int) and not isinstance(value, bool):
        checked = float(value)
    else:
        raise RunError(
            f"task option {key!r}: expected {expected.__name__} like the default {default!r}, "
            f"got {short(value)}"
        )
    if isinstance(checked, bool) or not isinstance(checked, int | float):
        return checked
    low: float
    high: float
    if key.endswith("seed"):
        low, high = 0, 2**63 - 1
    elif isinstance(checked, int):
        low, high = (1 if key in _POSITIVE else -MAX_OPTION_INT), MAX_OPTION_INT
    else:
        low, high = -MAX_OPTION_FLOAT, MAX_OPTION_FLOAT
    if not (math.isfinite(checked) and low <= checked <= high):
        raise RunError(
            f"task option {key!r}: expected a finite number from {low} to {high}, got {short(checked)}"
        )
    return checked


def _check_heads(options: dict[str, Any]) -> None:
    heads, dim = options.get("num_heads"), options.get("dim_hidden")
    if isinstance(heads, int) and isinstance(dim, int) and heads >= 1 and dim % heads:
        raise RunError(f"task option 'num_heads': {heads} does not divide dim_hidden {dim}")


def build_model(task: Task, model_name: str) -> nn.Module:
    """``task.build_model(model_name)`` after [`check_buildable`][settransformer.tasks.runs.check_buildable];
    a model the task cannot build is a [`RunError`][settransformer.tasks.runs.RunError]."""
    check_buildable(task, model_name)
    try:
        return task.build_model(model_name)
    except (ValueError, TypeError) as e:
        message = short(str(e), quote=False)
        raise RunError(f"{task.name}/{model_name}: cannot build the model: {message}") from None


def check_buildable(task: Task, model_name: str) -> None:
    """Build ``model_name`` without memory (the meta device): refuse settings the model rejects and a model of
    more than [`MAX_PARAMETERS`][settransformer.tasks.runs.MAX_PARAMETERS] parameters before any weight is
    allocated."""
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in task.build_model(model_name).parameters())
    except (ValueError, TypeError) as e:
        message = short(str(e), quote=False)
        raise RunError(f"{task.name}/{model_name}: cannot build the model: {message}") from None
    except Exception:  # a model that cannot be built on the meta device: built for real below
        size = 0
    if size > MAX_PARAMETERS:
        raise RunError(
            f"{task.name}/{model_name}: the model would have {size:,} parameters, more than the "
            f"{MAX_PARAMETERS:,} that fit in memory; choose smaller sizes (e.g. dim_hidden)"
        )


def check_model(task: type[Task] | Task, model: str) -> str:
    """``model`` if it is a row of the task's table, else a [`RunError`][settransformer.tasks.runs.RunError]
    listing the rows."""
    if model not in task.model_names:
        hint = did_you_mean(model, task.model_names)
        raise RunError(f"model {model!r}{hint}: {task.name} has the models {', '.join(task.model_names)}")
    return model


def default_model(task: type[Task]) -> str:
    return task.default_model or task.model_names[0]


def new_run_dir(task: str, model: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """``out``, or ``root/<task>/<model>-<timestamp>``; refuses a folder that already holds files."""
    if out is not None:
        path = Path(out)
        # Under torchrun, rank 0 may already have created the folder: only it checks.
        if is_main_process() and path.exists() and not path.is_dir():
            raise RunError(f"--out {path}: is a file; a run folder goes there: choose another --out")
        if is_main_process() and path.exists() and _holds_files(path):
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


LOCK_FILE = ".lock"
"""The lock file of a run folder, held (``flock``) by the one process writing into it."""


_BEFORE_FIRST_CHECKPOINT = {LOCK_FILE, "config.json", "metrics.jsonl", DATA_FILE}
"""What a run writes before its first checkpoint (besides the lock)."""


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds anything besides a lock file (which a killed writer may leave) and
    the files of a run that never saved a checkpoint (its first write failed, or it was killed
    before): such a run has no step to lose, so a fresh run may start over in its folder."""
    names = {p.name for p in folder.iterdir()}
    if not names <= _BEFORE_FIRST_CHECKPOINT:
        return True
    if "config.json" not in names:  # stopped before it: at most the record of the data, and a lock
        return bool(names - {LOCK_FILE, DATA_FILE}) or (DATA_FILE in names and not _is_data_record(folder))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(config, dict) and {"task", "model", "train"} <= config.keys())


def _is_data_record(folder: Path) -> bool:
    """Whether ``folder``'s ``data.json`` is a run's record of its data
    ([`record_data`][settransformer.tasks.runs.record_data]), not a file of the user's."""
    try:
        record = json.loads((folder / DATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and all(isinstance(v, dict) and "path" in v for v in record.values())


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the run folder ``run_dir`` (created if missing) for the block.

    Every command that writes into a run folder takes it, so two writers never interleave their
    files: the second gets a [`RunError`][settransformer.tasks.runs.RunError] naming the holder's pid and
    host. The lock is an ``fcntl.flock`` on ``run_dir/.lock``, which the kernel releases when its holder
    exits, however it exits (``kill -9`` included): no stale lock ever needs breaking. The file is removed on
    release. Under torchrun only rank 0 writes, so only it locks. Where ``fcntl`` is missing
    (Windows) the block runs unlocked.

    Examples:
        >>> with run_lock(folder):  # doctest: +SKIP
        ...     train(...)
    """
    run_dir = Path(run_dir)
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        fcntl = None  # type: ignore[assignment]
    if fcntl is None or not is_main_process():
        yield run_dir
        return
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").split()
                os.close(fd)
                who = f"pid {holder[1]} on host {holder[3]}" if len(holder) >= 4 else "another process"
                raise RunError(f"run folder {run_dir} is in use by {who}; wait for it to finish") from None
            # The previous holder removes the file on release: lock only the file still in place.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode())
    except OSError as e:
        raise RunError(os_error_message(e, run_dir)) from None
    try:
        yield run_dir
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def lock_if_run(folder: str | Path | None) -> Iterator[None]:
    """[`run_lock`][settransformer.tasks.runs.run_lock] on ``folder`` when it is a run folder (holds a
    ``config.json``), else nothing."""
    if folder is not None and (Path(folder) / "config.json").is_file():
        with run_lock(folder):
            yield
    else:
        yield


CHECKPOINT_FILES = {"last": "checkpoint.pt", "best": "best.pt"}
"""``which`` -> the file of a run folder that [`load_run`][settransformer.tasks.runs.load_run] reads."""


def check_not_run_file(output: str | Path, name: str = "--output") -> None:
    """Refuse ``output`` where it is a file a run folder keeps (a checkpoint, its settings, its log
    or results): ``predict``/``export`` ``--overwrite`` would replace the run's own state.

    Examples:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "config.json").write_text("{}")
        >>> check_not_run_file(run / "scores.csv")
        >>> check_not_run_file(run / "best.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        settransformer.tasks.runs.RunError: --output .../best.pt: a file of the run folder ...
    """
    output = Path(output)
    own = {*_BEFORE_FIRST_CHECKPOINT, *CHECKPOINT_FILES.values(), "results.json", "changes.jsonl"}
    if output.name in own and (output.parent / "config.json").is_file():
        raise RunError(f"{name} {output}: a file of the run folder {output.parent}; choose another name")


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
    for key, kind in (("task", str), ("model", str), ("task_options", dict), ("train", dict)):
        if not isinstance(info[key], kind):
            what = "a JSON object" if kind is dict else "a string"
            raise RunError(f"{path}: {key}: expected {what}, got {short(info[key], 60)} (a damaged file?)")
    return info


def read_checkpoint(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """The training checkpoint at ``path``, safely loaded (no code from the file runs) and checked
    for the entries rebuilding its model needs (``resume``: and continuing its run); every problem
    is a [`RunError`][settransformer.tasks.runs.RunError] naming the file."""
    try:
        return check_checkpoint(load_checkpoint(path), path, RESUME_KEYS if resume else MODEL_KEYS)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None


def _version_note(state: dict[str, Any]) -> str:
    written, current = state.get("version"), library_version()
    if written in (None, current):
        return ""
    return f" (written by settransformer {written}, this is {current})"


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)\.?"
)


def _misfit(model: nn.Module, weights: dict[str, Any]) -> str:
    """Why ``weights`` do not load into ``model``: missing, unexpected and reshaped entries.

    Loaded into a copy through ``load_state_dict``, so the model's own load hooks (e.g. the
    layout of older runs, [`Preprocessed`][settransformer.tasks.base.Preprocessed]) are taken into account.
    """
    weights, reshaped = dict(weights), []
    for _ in range(2):  # a second try without the entries of another shape, to name the rest
        try:
            result = copy.deepcopy(model).load_state_dict(weights, strict=False)
            break
        except RuntimeError as e:  # shapes that do not fit: torch names them, one per line
            lines = [line.strip() for line in str(e).splitlines()]
            found = [_SIZE_MISMATCH.sub(r"\1 (\2) in the file, (\3) in the model", line) for line in lines]
            found = [line for line in found if line.endswith("in the model")]
            if not found:
                return lines[-1] if lines else "cannot be copied"
            reshaped += found
            weights = {k: v for k, v in weights.items() if not any(r.startswith(f"{k} (") for r in found)}
    else:
        return "; ".join(reshaped)
    dropped = {r.split(" (", 1)[0] for r in reshaped}
    missing = [k for k in result.missing_keys if k not in dropped]
    unexpected = list(result.unexpected_keys)
    parts = []
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
        model = build_model(task, check_model(task, state["model_name"]))
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


def load_for_inference(
    source: str | Path, which: str = "last", device: str = "auto"
) -> tuple[Task | None, nn.Module, str]:
    """What ``predict`` and ``export`` run: a run folder or checkpoint (as
    [`load_run`][settransformer.tasks.runs.load_run]), or a folder written by
    [`save_model`][settransformer.deploy.saved.save_model].

    Returns ``(task or None for a saved model, model on device in eval mode, a one-line description)``.
    """
    if is_saved_model(source):
        try:
            # float32 whatever it was saved in: predict and export feed it float32 inputs
            model = load_model(source, device=resolve_device(device), dtype=torch.float32)
        except ValueError as e:
            raise RunError(str(e)) from None
        return None, model, f"{type(model).__name__} (saved model {source})"
    task, model, state = load_run(source, which=which, device=device)
    return task, model, f"{task.name}/{state.get('model_name')} (step {state.get('step')})"


def check_resume(
    run_dir: str | Path, info: dict[str, Any], config: TrainConfig, *, allow_changes: bool = False
) -> None:
    """Check that continuing the run in ``run_dir`` with ``config`` continues exactly the saved run.

    The checkpoint must be of the run's task and model (``info``: its ``config.json``), with the
    same task options, and its weights must fit the model. Training settings that differ from the
    checkpoint's (cosmetic ones aside: progress, logging, device) are a
    [`RunError`][settransformer.tasks.runs.RunError] naming each, unless ``allow_changes``: then each change
    and the step it takes effect at are appended to ``run_dir/changes.jsonl``.
    """
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint.pt"
    state = read_checkpoint(path, resume=True)
    if (state["task"], state["model_name"]) != (info["task"], info["model"]):
        raise RunError(
            f"{path}: holds a checkpoint of {state['task']}/{state['model_name']}, but the run "
            f"({run_dir / 'config.json'}) is {info['task']}/{info['model']}"
        )
    if state["task_options"] != info["task_options"]:
        keys = sorted(set(state["task_options"]) | set(info["task_options"]))
        diff = ", ".join(
            f"{k} {short(state['task_options'].get(k), 40)} -> {short(info['task_options'].get(k), 40)}"
            for k in keys
            if state["task_options"].get(k) != info["task_options"].get(k)
        )
        raise RunError(f"{run_dir / 'config.json'}: task options differ from the checkpoint's ({diff})")
    task = build_task(state["task"], state["task_options"])
    misfit = _misfit(build_model(task, state["model_name"]), state["model"])
    if misfit:
        raise RunError(f"{path}: its weights do not fit the model {info['model']} ({misfit})")
    if config.steps < state["step"]:
        raise RunError(
            f"--resume {run_dir}: --steps {config.steps} is below the step the checkpoint reached "
            f"({state['step']}); a run continues, it cannot go back"
        )
    saved = state.get("train") or info["train"]
    changes = {
        k: [saved.get(k), v] for k, v in config.to_dict().items() if k not in _COSMETIC and saved.get(k) != v
    }
    if not changes:
        return
    if not allow_changes:
        shown = ", ".join(f"{k} {short(a, 40)} -> {short(b, 40)}" for k, (a, b) in changes.items())
        raise RunError(
            f"--resume {run_dir}: settings differ from the checkpoint's ({shown}); a resumed run continues "
            "the saved one exactly: drop them, or pass --allow-changes to record and use them"
        )
    if not is_main_process():  # under torchrun, rank 0 alone writes into the run folder
        return
    log = run_dir / "changes.jsonl"
    before = log.read_text() if log.is_file() else ""
    write_text_atomic(log, before + json.dumps({"step": state["step"], "changes": changes}) + "\n")


def _check_runnable(config: TrainConfig) -> None:
    """[`check_runnable`][settransformer.training.loop.check_runnable] as a one-line ``RunError``."""
    try:
        check_runnable(config)
    except ValueError as e:
        raise RunError(str(e)) from None


def check_startable(task: Task, config: TrainConfig) -> None:
    """Refuse, before a run folder is made or changed, a run this machine cannot start: settings it
    cannot run (device, AMP, batch split) and task data that cannot be read (one batch is drawn)."""
    _check_runnable(config)
    try:
        task.check_batch_size(config.batch_size // launched_world_size())
        task.sample_batch(1, torch.Generator().manual_seed(0))
    except (ValueError, TypeError) as e:
        raise RunError(f"{task.name}: {short(str(e), 600, quote=False)}") from None


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
    _check_runnable(config)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        changes = record_data(run_dir, task.options)
        if resume:
            for line in changes:
                warnings.warn(f"{run_dir}: the run goes on with other data: {line}", stacklevel=2)
    torch.manual_seed(config.seed)  # the model's initial weights depend on the seed, nothing else
    model = build_model(task, model_name)
    result = train(model, task, config, run_dir, model_name=model_name, resume=resume)
    if plots and is_main_process():
        with torch.random.fork_rng(devices=[]):
            result["plots"] = [
                str(p) for p in task.plot(model.eval(), run_dir, next(model.parameters()).device)
            ]
        curve = plot_training_curve(run_dir, task.metric)
        if curve is not None:
            result["plots"].append(str(curve))
    return result


def _check_run_folder(
    run_dir: Path, task: Task, model: str, config: TrainConfig, *, overwrite: bool = False
) -> None:
    """Refuse a folder that holds files that are no run's, or (unless ``overwrite``) another run
    than ``task``/``model`` with ``config``; a missing or empty folder is fine."""
    if (run_dir / "config.json").exists():
        if not overwrite and not _same_run(read_run_config(run_dir), task, model, config):
            raise RunError(
                f"{run_dir}: holds a run with other settings; pass --overwrite to replace it, or choose "
                "another --out"
            )
    elif run_dir.exists() and _holds_files(run_dir):
        raise RunError(f"{run_dir}: exists and is not a run folder; choose another --out")


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
    if not models:
        raise RunError("--models: expected at least one model")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise RunError(f"--models: {', '.join(repeated)} given more than once (each is one row of the table)")
    for m in models:
        check_model(task, m)
    if seeds < 1:
        raise RunError(f"--seeds: expected a positive integer, got {seeds}")
    try:  # the last seed must be a valid seed too
        config.replace(seed=config.seed + seeds - 1)
    except ValueError as e:
        raise RunError(f"--seed {config.seed} with --seeds {seeds}: {e}") from None
    # Check every model, setting and run folder before training anything, so bad input changes
    # nothing on disk and no run trains before a later one is refused.
    check_startable(task, config)
    for m in models:
        check_buildable(task, m)
    plan = []
    for model in models:
        for k in range(seeds):
            cfg, run_dir = config.replace(seed=config.seed + k), out / model / f"seed{k}"
            _check_run_folder(run_dir, task, model, cfg, overwrite=overwrite)
            plan.append((model, k, cfg, run_dir))

    runs: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for model, k, cfg, run_dir in plan:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        resume = (run_dir / "checkpoint.pt").exists()  # continue, or reuse when already finished
        with run_lock(run_dir):
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
    paper, notes = task.paper_comparison()
    md, _ = write_results(out, type(task), runs, settings, paper=paper, notes=notes)
    return runs, md
