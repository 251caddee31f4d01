"""The optimisation pieces of the training loop: optimizer, learning-rate schedule, gradient bounds
and a moving average of the weights.

Examples:
    >>> model = torch.nn.Linear(3, 1)
    >>> config = TrainConfig(steps=100, lr=1e-3, lr_milestones=(50,))
    >>> optimizer = make_optimizer(model, config)
    >>> schedule = make_schedule(optimizer, config)
    >>> for _ in range(50):
    ...     optimizer.step()
    ...     schedule.step()
    >>> schedule.get_last_lr()  # the rate times lr_gamma after the milestone
    [0.0001]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig

__all__ = ["WeightAverage", "clamp_gradients", "make_optimizer", "make_schedule"]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``model``'s parameters.

    Each takes PyTorch's fused kernel where the parameters' device and dtype have one (CPU and CUDA
    floating point in recent PyTorch; on a CPU from torch 2.4): one kernel per step instead of a
    Python loop of several operations per parameter, which makes a small model's training step on a
    CPU up to 1.2x faster (``benchmarks/optimizer.py``). Elsewhere it takes PyTorch's default
    implementation; the update is the same up to float rounding.

    Examples:
        >>> make_optimizer(torch.nn.Linear(3, 1), TrainConfig(optimizer="sgd", lr=0.1)).defaults["momentum"]
        0.9
    """
    params, lr, wd = list(model.parameters()), config.lr, config.weight_decay
    if config.optimizer == "adam":
        return _fused_if_supported(torch.optim.Adam, params, lr=lr, weight_decay=wd)
    if config.optimizer == "adamw":
        return _fused_if_supported(torch.optim.AdamW, params, lr=lr, weight_decay=wd)
    return _fused_if_supported(torch.optim.SGD, params, lr=lr, momentum=0.9, weight_decay=wd)


def _fused_if_supported(
    kind: Callable[..., torch.optim.Optimizer], params: list[nn.Parameter], **options: float
) -> torch.optim.Optimizer:
    """``kind(params, fused=True, **options)``, or without ``fused`` where the parameters' device or
    dtype has no fused kernel (PyTorch refuses those when the optimizer is built, not at a step)."""
    try:
        return kind(params, fused=True, **options)
    except (RuntimeError, ValueError):
        return kind(params, **options)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor as a pure function of the step (so the scheduler state is just a counter).

    ``"step"``: ``lr_gamma ** (number of milestones passed)``; ``"cosine"``: half a cosine from 1 to 0
    over ``steps``; ``"constant"``: 1.

    Examples:
        >>> optimizer = make_optimizer(torch.nn.Linear(3, 1), TrainConfig(lr=1.0))
        >>> schedule = make_schedule(optimizer, TrainConfig(steps=4, lr=1.0, schedule="cosine"))
        >>> rates = []
        >>> for _ in range(5):
        ...     rates.append(round(schedule.get_last_lr()[0], 3))
        ...     optimizer.step()
        ...     schedule.step()
        >>> rates
        [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    milestones, gamma, steps = config.lr_milestones, config.lr_gamma, config.steps

    def factor(step: int) -> float:
        if config.schedule == "step":
            return gamma ** sum(step >= m for m in milestones)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clamp_gradients(parameters: Iterable[Tensor], low: float | None, high: float | None) -> None:
    """Clamp every gradient entry to ``[low, high]`` in place (either may be ``None``).

    ``clip_grad_value_`` with separate bounds. The training loop calls it after the backward pass
    (and after DistributedDataParallel has averaged the ranks' gradients, so ``torchrun`` bounds the
    gradient one process would have) and after a GradScaler's ``unscale_`` (so the bounds apply to
    true gradients, and an overflow is still seen as one).

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> (model(torch.full((1, 2), 10.0)).sum() * 100).backward()
        >>> clamp_gradients(model.parameters(), -0.5, 0.5)
        >>> model.weight.grad
        tensor([[0.5000, 0.5000]])
    """
    if low is None and high is None:
        return
    for p in parameters:
        if p.grad is not None:
            p.grad.clamp_(low, high)


class WeightAverage:
    """An exponential moving average of a model's weights (and buffers), evaluated in its place.

    ``decay`` is warmed up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so the average
    forgets the initial weights quickly. ``model`` is the averaged copy (eval mode, no gradients).

    Examples:
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> average = WeightAverage(model, decay=0.9)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> average.update(model)  # keeps min(0.9, 2 / 11) of the average: 0 * 2/11 + 1 * 9/11
        >>> round(average.model.weight.item(), 4)
        0.8182
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, new in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                avg.lerp_(new, 1.0 - keep)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        self.model.load_state_dict(state["weights"])
