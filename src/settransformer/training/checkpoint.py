"""Checkpoints that survive interruptions, describe their model, and never run code when loaded.

A checkpoint is a plain dict (str/int/float/bool/None, lists, dicts and tensors only) inside
``torch.save``'s zip archive. [`load_checkpoint`][settransformer.training.checkpoint.load_checkpoint] reads it
with ``torch.load(weights_only=True)`` and refuses anything else before unpickling (a bare pickle, a truncated
archive, an archive whose pickle names other Python objects), so loading a file never runs code from it. Every
failure is a ``ValueError`` whose message names the file and says what is wrong with it.

[`save_checkpoint`][settransformer.training.checkpoint.save_checkpoint] writes through
[`settransformer.data.files.atomic_write`][settransformer.data.files.atomic_write]: a crash, ``kill -9`` or a
full disk during the write leaves the previous file intact.
[`load_checkpoint`][settransformer.training.checkpoint.load_checkpoint] verifies the CRC-32 of every record of
the archive before unpickling, so flipped bytes anywhere in the file (a weight included) are refused instead
of loaded as wrong weights.

A training checkpoint (see [`settransformer.training.loop`][settransformer.training.loop]) also says what it
holds: ``format``, ``version``, ``task``, ``task_options``, ``model_name`` and ``model_config``
([`model_config`][settransformer.training.checkpoint.model_config]), which
[`check_checkpoint`][settransformer.training.checkpoint.check_checkpoint] validates, so the model can be
rebuilt from the file alone.

Examples:
    >>> model = torch.nn.Linear(2, 3)
    >>> save_checkpoint({"step": 3, "model": model.state_dict()}, "runs/x/checkpoint.pt")
    PosixPath('runs/x/checkpoint.pt')
    >>> load_checkpoint("runs/x/checkpoint.pt")["step"]
    3
"""

from __future__ import annotations

import importlib.metadata
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.files import atomic_write, short

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_KEYS",
    "RESUME_KEYS",
    "check_checkpoint",
    "library_version",
    "load_checkpoint",
    "model_config",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = 1
"""Bumped when the layout of the dict written by
[`settransformer.training.loop`][settransformer.training.loop] changes incompatibly."""
MODEL_KEYS = ("format", "task", "task_options", "model_name", "step", "model")
"""What every training checkpoint holds: enough to rebuild the task and model and load the weights."""
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "schedule", "scaler", "rng", "elapsed", "metrics", "best")
"""What continuing a run needs besides (``--resume``)."""


def library_version() -> str:
    """The installed settransformer's version (``settransformer.__version__``), stamped into checkpoints.

    Read from the package metadata, so that modules below the package root need not import it.

    Examples:
        >>> import settransformer
        >>> library_version() == settransformer.__version__
        True
    """
    try:
        return importlib.metadata.version("settransformer")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically ([`atomic_write`][settransformer.data.files.atomic_write]):
    either the old file or the complete new one exists.

    ``state`` must hold only types that ``torch.load(weights_only=True)`` accepts. A full disk or
    a read-only folder is a [`WriteError`][settransformer.data.files.WriteError] naming ``path``.
    """
    return atomic_write(path, lambda f: torch.save(state, f))


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
    """Read a checkpoint written by [`save_checkpoint`][settransformer.training.checkpoint.save_checkpoint],
    safely: no code from the file runs.

    Only ``torch.save`` zip archives are opened, with ``torch.load(weights_only=True)``, which
    rebuilds tensors and plain values and refuses every other Python object.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint dict, fails a CRC-32 check (corrupted), holds other
            Python objects, or was written by a newer settransformer (a ``format`` above
            [`CHECKPOINT_FORMAT`][settransformer.training.checkpoint.CHECKPOINT_FORMAT]); the message starts
            with the path. Also for a CUDA ``map_location`` where CUDA is unavailable.
    """
    path = Path(path)
    _check_location(map_location)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(f"{path}: not a readable checkpoint: the file is empty")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise ValueError(f"{path}: not a readable checkpoint: no torch.save archive ({_what_it_is(head)})")
    _verify_archive(path)
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
        raise ValueError(
            f"{path}: written by a newer settransformer (version {state.get('version', '?')}, "
            f"checkpoint format {fmt}); this is version {library_version()}, which reads formats up to "
            f"{CHECKPOINT_FORMAT}: upgrade settransformer to load it"
        )
    return state


def _verify_archive(path: Path) -> None:
    """Check the CRC-32 of every record of the zip archive at ``path`` (``torch.load`` does not),
    so corruption anywhere, a weight record included, is refused before anything is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint: damaged archive ({short(str(e))})") from None
    if bad is not None:
        raise ValueError(
            f"{path}: damaged checkpoint: the record {short(bad, 80)} fails its CRC-32 check "
            "(the file was corrupted after it was written)"
        )


def _check_location(map_location: str | torch.device) -> None:
    """A CUDA ``map_location`` on a machine without CUDA is the machine's fault, not the file's."""
    try:
        kind = torch.device(map_location).type
    except (RuntimeError, TypeError):  # not a device name: torch.load reports it
        return
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"map_location: {short(str(map_location), 40)} asks for CUDA, which is unavailable on this "
            "machine (load with map_location='cpu')"
        )


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
    if isinstance(state.get("step"), int) and state["step"] < 0:
        raise ValueError(f"{path}: damaged training checkpoint: step should be >= 0, got {state['step']}")
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
    its settings in a ``config`` dict ([`SetTransformer`][settransformer.nn.models.SetTransformer],
    [`DeepSets`][settransformer.nn.models.DeepSets] and the sequence baselines do), or ``None``.
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
    """Restore what [`rng_state`][settransformer.training.checkpoint.rng_state] captured (CUDA states only
    where CUDA is in use)."""
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
