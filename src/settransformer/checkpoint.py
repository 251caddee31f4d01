"""Checkpoints that survive interruptions and load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict (str/int/float/bool/None, lists, dicts and tensors only), so loading
it never runs pickled code. :func:`save_checkpoint` writes to a temporary file in the target's
folder, flushes and fsyncs it, then renames it over the target (``os.replace`` is atomic on POSIX
and Windows): a crash or a full disk during the write leaves the previous checkpoint intact.

Example:
    >>> save_checkpoint({"step": 3, "model": model.state_dict()}, "runs/x/checkpoint.pt")
    >>> load_checkpoint("runs/x/checkpoint.pt")["step"]
    3
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

#: Bumped when the layout of the dict written by :mod:`settransformer.train` changes.
CHECKPOINT_FORMAT = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: either the old file or the complete new one exists.

    ``state`` must hold only types that ``torch.load(weights_only=True)`` accepts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so the final rename never crosses file systems.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (safely: ``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state


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
