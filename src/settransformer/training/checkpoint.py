"""Checkpoints that survive interruptions, describe their model, and never run code when loaded.

A checkpoint is a plain dict (str/int/float/bool/None, lists, dicts and tensors only) inside
``torch.save``'s zip archive. :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``
and refuses anything else before unpickling (a bare pickle, a truncated archive, an archive whose
pickle names other Python objects), so loading a file never runs code from it. Every failure is a
``ValueError`` whose message names the file and says what is wrong with it.

:func:`save_checkpoint` (and :func:`write_text_atomic` for small text files) writes to a temporary
file in the target's folder, flushes and fsyncs it, then renames it over the target (``os.replace``
is atomic on POSIX and Windows): a crash, ``kill -9`` or a full disk during the write leaves the
previous file intact. Temporaries left by writers that were killed are removed by the next write.

A training checkpoint (see :mod:`settransformer.training.loop`) also says what it holds: ``format``,
``version``, ``task``, ``task_options``, ``model_name`` and ``model_config`` (:func:`model_config`),
which :func:`check_checkpoint` validates, so the model can be rebuilt from the file alone.

Example:
    >>> save_checkpoint({"step": 3, "model": model.state_dict()}, "runs/x/checkpoint.pt")
    >>> load_checkpoint("runs/x/checkpoint.pt")["step"]
    3
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import secrets
import socket
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_KEYS",
    "RESUME_KEYS",
    "check_checkpoint",
    "load_checkpoint",
    "model_config",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_text_atomic",
]

#: Bumped when the layout of the dict written by :mod:`settransformer.training.loop` changes incompatibly.
CHECKPOINT_FORMAT = 1
#: What every training checkpoint holds: enough to rebuild the task and model and load the weights.
MODEL_KEYS = ("format", "task", "task_options", "model_name", "step", "model")
#: What continuing a run needs besides (``--resume``).
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "schedule", "scaler", "rng", "elapsed", "metrics", "best")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: either the old file or the complete new one exists.

    ``state`` must hold only types that ``torch.load(weights_only=True)`` accepts.
    """
    return _write_atomic(Path(path), lambda f: torch.save(state, f))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`save_checkpoint`."""
    return _write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so the final rename never crosses file systems.
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    _remove_stale_temporaries(path)
    return path


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<pid>-<random>-<host>.tmp`` beside ``path``.

    Created with mode 0o666 so the umask applies, as for ``open(path, "wb")`` (``mkstemp`` would
    make every checkpoint private to its owner). The pid and host let a later write tell the
    temporaries of killed writers from those of live ones.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}-{_HOST}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 1 in 4 billion: draw another name
            continue


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` whose writer (a process on this host) no longer exists."""
    if os.name != "posix":
        return
    prefix = f".{path.name}."
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid, _, rest = tmp.name[len(prefix) : -len(".tmp")].partition("-")
        if not pid.isdigit() or rest.partition("-")[2] != _HOST or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # it exists but is not ours to signal: leave its file alone
            pass


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _what_it_is(head: bytes) -> str:
    """A guess at a non-checkpoint file's kind from its first bytes, for error messages."""
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:1] in b"(]}":
        return "a bare pickle, refused because unpickling it could run code"
    if head.lstrip()[:1] in (b"{", b"["):
        return "it looks like JSON or text"
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy array"
    if head.startswith(b"\x89HDF"):
        return "it is an HDF5 file"
    return "it is truncated or another kind of file"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, safely: no code from the file runs.

    Only ``torch.save`` zip archives are opened, with ``torch.load(weights_only=True)``, which
    rebuilds tensors and plain values and refuses every other Python object.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint dict, holds other Python objects, or was
            written by a newer settransformer (a ``format`` above :data:`CHECKPOINT_FORMAT`); the
            message starts with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(f"{path}: not a readable checkpoint: the file is empty")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise ValueError(f"{path}: not a readable checkpoint: no torch.save archive ({_what_it_is(head)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error says it all
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the Python object {found.group(1)}" if found else "Python objects"
        raise ValueError(
            f"{path}: not a readable checkpoint: refused to unpickle {what} (a checkpoint holds only "
            "tensors and plain values; other objects could run code on load)"
        ) from None
    except Exception as e:  # torch raises several types for damaged or foreign archives
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    fmt = state.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > CHECKPOINT_FORMAT:
        from .. import __version__  # here: the package imports its modules before defining it

        raise ValueError(
            f"{path}: written by a newer settransformer (version {state.get('version', '?')}, "
            f"checkpoint format {fmt}); this is version {__version__}, which reads formats up to "
            f"{CHECKPOINT_FORMAT}: upgrade settransformer to load it"
        )
    return state


def _is_weights(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def check_checkpoint(
    state: dict[str, Any], path: str | Path, keys: tuple[str, ...] = MODEL_KEYS
) -> dict[str, Any]:
    """``state`` if it is a settransformer training checkpoint holding ``keys``, else a ``ValueError``
    naming ``path``, what is missing and what was expected (types of the identifying entries too)."""
    if "format" not in state:
        shown = ", ".join(sorted(map(str, state))[:8]) or "nothing"
        raise ValueError(
            f"{path}: not a settransformer training checkpoint (no 'format' entry; it holds {shown})"
        )
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path}: incomplete training checkpoint: no {', '.join(missing)}")
    expected: dict[str, tuple[type, ...]] = {
        "format": (int,),
        "task": (str,),
        "model_name": (str,),
        "task_options": (dict,),
        "step": (int,),
    }
    for key, types in expected.items():
        if key in state and (not isinstance(state[key], types) or isinstance(state[key], bool)):
            raise ValueError(
                f"{path}: damaged training checkpoint: {key} should be a {types[0].__name__}, "
                f"got {type(state[key]).__name__}"
            )
    if "model" in keys and not _is_weights(state["model"]):
        raise ValueError(f"{path}: damaged training checkpoint: model should map names to tensors")
    average = state.get("average")
    if average is not None and not (isinstance(average, dict) and _is_weights(average.get("weights"))):
        raise ValueError(f"{path}: damaged training checkpoint: average should hold weights")
    return state


def _plain(value: Any) -> Any:
    """``value`` with every entry a str/int/float/bool/None, list or dict (safe to checkpoint and
    comparable between builds: objects become their type's name, never an address)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if callable(value) and hasattr(value, "__qualname__"):  # functions and classes
        return f"<{getattr(value, '__module__', '?')}.{value.__qualname__}>"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def model_config(model: nn.Module) -> dict[str, Any] | None:
    """The constructor settings of ``model``, for a self-describing checkpoint.

    Returns ``{"class", "module", "config"}`` for the first module of ``model`` (``model`` itself
    first, then its submodules in order; ``module`` is its name, ``""`` for ``model``) that keeps
    its settings in a ``config`` dict (:class:`~settransformer.nn.models.SetTransformer`,
    :class:`~settransformer.nn.models.DeepSets` and the sequence baselines do), or ``None``.
    """
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if isinstance(config, dict):
            return {"class": type(module).__name__, "module": name, "config": _plain(config)}
    return None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step reads: the data ``generator`` and torch's global RNGs.

    Global RNGs matter for dropout and any other in-model randomness. All states are uint8 tensors.
    """
    state: dict[str, Any] = {"data": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is in use)."""
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
