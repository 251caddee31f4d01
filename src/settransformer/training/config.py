"""Training settings: one dataclass, checked on construction, read from dicts, JSON and YAML.

Examples:
    >>> cfg = TrainConfig.from_dict({"steps": 200, "lr": 1e-3, "lr_milestones": [100]})
    >>> cfg.replace(seed=1).seed
    1
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.files import short as _short

__all__ = ["MAX_BATCH_SIZE", "MAX_LR", "MAX_STEPS", "TrainConfig", "read_config_file"]

MAX_STEPS = 10**9
"""Upper bound of ``steps``, ``log_every``, ``eval_every`` and the ``lr_milestones``.

Upper bounds of the settings (this, [`MAX_BATCH_SIZE`][settransformer.training.config.MAX_BATCH_SIZE] and
[`MAX_LR`][settransformer.training.config.MAX_LR]): beyond them a run cannot fit in memory or time, or
cannot learn.
"""
MAX_BATCH_SIZE = 2**20
"""Upper bound of ``batch_size`` (see [`MAX_STEPS`][settransformer.training.config.MAX_STEPS])."""
MAX_LR = 10.0
"""Upper bound of ``lr`` (see [`MAX_STEPS`][settransformer.training.config.MAX_STEPS])."""
_INT_RANGES = (
    ("steps", 1, MAX_STEPS),
    ("batch_size", 1, MAX_BATCH_SIZE),
    ("log_every", 1, MAX_STEPS),
    ("eval_every", 0, MAX_STEPS),
    ("seed", 0, 2**63 - 1),
)

_CHOICES = {
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("step", "cosine", "constant"),
    "amp": ("off", "bf16", "fp16"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training loop needs besides the model and the task.

    Attributes:
        steps: optimisation steps in all (a resumed run continues up to this number).
        batch_size: sets per step, over all processes (each of ``W`` DDP processes gets ``batch_size / W``).
        lr: peak learning rate.
        optimizer: ``"adam"`` (the paper), ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: L2 penalty (decoupled for AdamW).
        schedule: ``"step"`` (multiply by ``lr_gamma`` at each of ``lr_milestones``, the paper's),
            ``"cosine"`` (to zero at ``steps``) or ``"constant"``.
        lr_milestones, lr_gamma: the step schedule.
        seed: seeds the data generator (the same on every DDP rank) and torch's global RNG (dropout;
            ``seed + rank``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: mixed precision: ``"off"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a
            GradScaler; CUDA only).
        clip_norm: clip the global gradient norm to this (``clip_grad_norm_``).
        clip_value: clip every gradient entry to ``[-clip_value, clip_value]`` (``clip_grad_value_``).
        clip_min, clip_max: bounds of every gradient entry, set separately (``clip_grad_value_``
            with two bounds), applied to the gradient averaged over the ``torchrun`` processes.
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.999,
            warmed up as ``min(decay, (1 + t) / (10 + t))``) and evaluate it instead of the raw
            weights, which a constant learning rate leaves noisy; ``None``: off.
        eval_every: evaluate (and checkpoint) every this many steps; 0 = only at the end.
        log_every: append a line to ``metrics.jsonl`` every this many steps (mean loss since the last).
        tensorboard: also log to TensorBoard (when the ``tensorboard`` package is installed).
        progress: show a ``tqdm`` progress bar.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "step"
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: str = "off"
    clip_norm: float | None = None
    clip_value: float | None = None
    clip_min: float | None = None
    clip_max: float | None = None
    ema_decay: float | None = None
    eval_every: int = 0
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for name, low, high in _INT_RANGES:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name}: expected an integer from {low} to {high}, got {_short(value)}")
        if any(m < 0 or m > MAX_STEPS for m in self.lr_milestones):
            raise ValueError(
                f"lr_milestones: expected steps from 0 to {MAX_STEPS}, got {_short(self.lr_milestones)}"
            )
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise ValueError(f"lr: expected a finite number above 0 and at most {MAX_LR}, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma: expected a number in (0, 1], got {self.lr_gamma}")
        for name in ("clip_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite positive number, got {value}")
        for name in ("clip_min", "clip_max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected a number between 0 and 1, got {self.ema_decay}")
        if self.clip_min is not None and self.clip_max is not None and self.clip_min > self.clip_max:
            raise ValueError(
                f"clip_min, clip_max: expected clip_min <= clip_max, got {self.clip_min} > {self.clip_max}"
            )
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name}: expected one of {', '.join(choices)}, got {_short(getattr(self, name))}"
                )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {_short(self.device)}")

    @classmethod
    def known_settings(cls) -> tuple[str, ...]:
        """The settings' names (the keys `from_dict` takes).

        Examples:
            >>> "steps" in TrainConfig.known_settings()
            True
        """
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict, rejecting unknown keys (``source`` names where the dict came from)."""
        known = set(cls.known_settings())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown training setting(s) {_short(unknown)}; known: {sorted(known)}"
            )
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (``from_dict(to_dict())`` round-trips)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["lr_milestones"] = list(self.lr_milestones)
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints become floats where floats are expected."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint == tuple[int, ...]:
        if isinstance(value, str):  # "1000,2000" from a command line
            value = [v for v in value.replace(" ", "").split(",") if v]
            try:
                value = [int(v) for v in value]
            except ValueError:
                raise ValueError(f"{name}: expected comma-separated integers, got {_short(value)}") from None
        if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
            raise ValueError(f"{name}: expected a list of integers, got {_short(value)}")
        return tuple(sorted(value))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = _is_int(value)
    elif hint is float:
        if isinstance(value, str):  # YAML (1.1) reads 1e-3, without a dot, as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = _is_int(value) or isinstance(value, float)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ValueError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {_short(value)}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) file holding one mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ValueError(f"{path}: expected a .json, .yaml or .yml config file")
    except (json.JSONDecodeError, ImportError) as e:
        raise ValueError(f"{path}: cannot read it ({_short(str(e))})") from None
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        if type(e).__module__.startswith("yaml"):
            raise ValueError(f"{path}: not valid YAML ({_short(str(e))})") from None
        raise
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data
