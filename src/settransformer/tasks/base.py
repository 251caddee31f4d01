"""What every experiment provides: data, models, loss, metrics and plots.

A task is one module in [`settransformer.tasks`][settransformer.tasks] with one
[`Task`][settransformer.tasks.base.Task] subclass. The training loop
([`settransformer.training.loop`][settransformer.training.loop]) and the CLI only talk to tasks through this
interface, so a new experiment is a new module and a line in the registry
([`settransformer.tasks.TASKS`][settransformer.tasks.TASKS]).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Batch", "Preprocessed", "Task"]


@dataclass
class Batch:
    """One batch of sets.

    Attributes:
        x: padded sets ``(B, N, D)``.
        mask: ``(B, N)`` bool (True = real element), or ``None`` when every set is full.
        target: what the model should predict (task-specific shape).
        extra: anything else the loss or metrics need (true labels, parameters...).
    """

    x: Tensor
    mask: Tensor | None
    target: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(
            self.x.to(device),
            None if self.mask is None else self.mask.to(device),
            self.target.to(device),
            {k: v.to(device) for k, v in self.extra.items()},
        )

    def shard(self, rank: int, world_size: int) -> Batch:
        """Sets ``rank * B/W`` to ``(rank + 1) * B/W - 1`` of this ``B``-set batch: one process's share.

        Every tensor is cut along its first (set) axis, so ``target`` and ``extra`` must be per set.
        The ``W`` shards of a batch are disjoint and, concatenated in rank order, give it back; with
        equal sizes their mean losses average to the whole batch's mean loss.

        Raises:
            ValueError: ``world_size`` does not divide ``B``, or ``rank`` is not in ``[0, world_size)``.
        """
        if world_size == 1:
            return self
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if len(self) % world_size:
            raise ValueError(f"batch_size: {len(self)} sets do not split evenly over {world_size} processes")
        size = len(self) // world_size
        part = slice(rank * size, (rank + 1) * size)
        return Batch(
            self.x[part],
            None if self.mask is None else self.mask[part],
            self.target[part],
            {k: v[part] for k, v in self.extra.items()},
        )

    def __len__(self) -> int:
        return self.x.shape[0]


class Preprocessed(nn.Module):
    """Base of a task's deployed model: its input preprocessing (buffers), then the network ``model``.

    Subclasses register their statistics as buffers and apply them in ``forward`` before calling
    ``self.model``. State dicts of the bare network (the layout of runs trained before the
    preprocessing was part of the model: no ``model.`` prefix, no statistics) still load: their
    keys are moved under ``model.``, and the statistics keep the values fitted when the task was
    built from its data, which are the ones such a run was trained with.

    Examples:
        >>> class Shift(Preprocessed):
        ...     def __init__(self, model: nn.Module) -> None:
        ...         super().__init__()
        ...         self.model = model
        ...         self.register_buffer("offset", torch.ones(2))
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         return self.model(x - self.offset)
        >>> wrapped = Shift(nn.Linear(2, 3))
        >>> bare = nn.Linear(2, 3).state_dict()       # the bare network's layout
        >>> wrapped.load_state_dict(bare)
        <All keys matched successfully>
        >>> torch.equal(wrapped.model.weight, bare["weight"])
        True
    """

    model: nn.Module

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        inner = prefix + "model."
        own = {prefix + name for name, _ in self.named_buffers(recurse=False)}
        mine = [k for k in state_dict if k.startswith(prefix) and k not in own]
        if mine and not any(k.startswith(inner) for k in mine):
            for key in mine:
                state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
            for name, buf in self.named_buffers(recurse=False):
                state_dict.setdefault(prefix + name, buf)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class Task(ABC):
    """An experiment: its data, the models of its results table, its loss, metrics and plots.

    Attributes:
        name: the CLI name, e.g. ``"max-regression"``.
        model_names: the rows of the results table; the first is the default model unless
            ``default_model`` names another.
        metric: the headline metric of the table (a key of
            [`evaluate`][settransformer.tasks.base.Task.evaluate]'s result).
        higher_is_better: direction of ``metric``.
        paper: the paper's numbers, ``{model_name: {metric: value}}`` (missing rows allowed); an
            optional ``f"{metric}_std"`` entry holds the paper's standard deviation.
        model_descriptions: optional ``{model_name: "what the model is"}`` for results tables.
        default_model: optional, the model ``settransformer train`` builds without ``--model``.
        demo_models: optional, the rows ``settransformer demo`` trains (default: every row); a
            subset that keeps the table's headline comparison where the whole table is slow.
        user_data: the task trains on the user's own file (no data of its own), so
            ``settransformer demo`` leaves it out unless asked for.

    Instances hold the task options (data sizes, ranges...): ``Task(**options)`` overlays the
    given options on [`default_options`][settransformer.tasks.base.Task.default_options] and rejects unknown
    names.
    """

    name: ClassVar[str]
    model_names: ClassVar[tuple[str, ...]]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    paper: ClassVar[dict[str, dict[str, float]]] = {}
    model_descriptions: ClassVar[dict[str, str]] = {}
    default_model: ClassVar[str | None] = None
    demo_models: ClassVar[tuple[str, ...] | None] = None
    user_data: ClassVar[bool] = False
    nullable_options: ClassVar[tuple[str, ...]] = ()
    """Options whose default is not ``None`` but which take ``null`` (an option whose default is
    ``None`` takes it anyway)."""
    paper_options: ClassVar[dict[str, Any]] = {}
    """The options of the paper's setup behind ``paper``: a results table says where a run's differ."""
    paper_data: ClassVar[str | None] = None
    """The data of the paper's numbers where it is not this task's (e.g. ``"Omniglot"``)."""

    def paper_comparison(self) -> tuple[dict[str, dict[str, float]], list[str]]:
        """The paper's numbers for this task's options, ``{model: {metric: value}}``, and the ways
        its setup differs from the paper's, one line each (none: the same setup).

        Examples:
            >>> from settransformer.tasks.max_regression import MaxRegression
            >>> MaxRegression(max_size=20).paper_comparison()[1]
            ["this run's setup differs from the paper's: max_size 20 (paper 10)"]
        """
        notes = []
        if self.paper_data:
            notes.append(f"the paper's numbers are on {self.paper_data}, not on this task's data")
        differ = [
            f"{k} {json.dumps(self.options.get(k))} (paper {json.dumps(v)})"
            for k, v in self.paper_options.items()
            if self.options.get(k) != v
        ]
        if differ:
            notes.append("this run's setup differs from the paper's: " + ", ".join(differ))
        return type(self).paper, notes

    def __init__(self, **options: Any) -> None:
        defaults = self.default_options()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {unknown}; known: {sorted(defaults)}")
        self.options: dict[str, Any] = {**defaults, **options}

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """Task options (data generation, sizes) with their defaults; JSON-serialisable values."""
        return {}

    @classmethod
    @abstractmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """Training settings for a budget (``"quick"`` or ``"paper"``): at least ``steps``,
        ``batch_size``, ``lr``; optionally ``lr_milestones``, ``lr_gamma``, ``eval_every``."""

    @abstractmethod
    def build_model(self, model_name: str) -> nn.Module:
        """A fresh model of the table row ``model_name`` (raise ``ValueError`` if unknown)."""

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ``ValueError`` when the model cannot train on batches of ``batch_size`` sets (one
        process's share of the batch); by default any size can."""
        return None

    @abstractmethod
    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A training batch (on CPU), drawn with ``generator`` only, so runs are repeatable."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Scalar training loss of ``model`` on ``batch`` (already on the model's device)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Metrics on the task's fixed test data (model in eval mode, no gradients)."""

    def test_inputs(self) -> tuple[list[Tensor], Tensor]:
        """The fixed test sets as a user's file would hold them, before any preprocessing the model
        carries ([`build_model`][settransformer.tasks.base.Task.build_model] returns a module that takes raw
        sets): ``S`` sets ``(N_i, D)`` and their targets ``(S, ...)``, the ones
        [`evaluate`][settransformer.tasks.base.Task.evaluate] scores against."""
        raise NotImplementedError(f"{self.name}: this task has no raw test inputs")

    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """Write the task's figures (PNG) into ``out_dir``; return their paths."""
        return []
