"""How much a model's output depends on the order of each set's elements.

A set model's output is a function of the set, so reordering the elements changes it only by
floating-point rounding; an order-aware baseline (:mod:`settransformer.sequence_models`) changes
for real. :func:`permutation_sensitivity` puts a number on it.

Example:
    >>> from settransformer import DeepSets
    >>> x, mask = torch.randn(16, 10, 2), torch.rand(16, 10) > 0.3
    >>> permutation_sensitivity(DeepSets(2, 1, 1), x, mask) < 1e-5
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["permutation_sensitivity", "permute_sets"]


def permute_sets(
    x: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Shuffle the elements of every set independently (padding moves with its slot's mask).

    ``x: (B, N, D)``, ``mask: (B, N)`` -> ``(x', mask', perm)`` with ``x'[b, i] = x[b, perm[b, i]]``.
    ``generator`` lives on the CPU; the permutations are moved to ``x``'s device.
    """
    b, n = x.shape[:2]
    perm = torch.argsort(torch.rand(b, n, generator=generator), dim=1).to(x.device)
    xp = torch.gather(x, 1, perm[..., None].expand_as(x))
    mp = None if mask is None else torch.gather(mask, 1, perm)
    return xp, mp, perm


@torch.no_grad()
def permutation_sensitivity(
    model: Callable[[Tensor, Tensor | None], Tensor],
    x: Tensor,
    mask: Tensor | None = None,
    *,
    num_orders: int = 8,
    generator: torch.Generator | None = None,
) -> float:
    """The standard deviation of ``model``'s output over random orderings of the same sets.

    Each of ``num_orders`` orderings shuffles every set independently; the per-entry standard
    deviation over orderings (with Bessel's correction) is averaged over sets and output entries.

    Args:
        model: ``model(x, mask) -> Tensor`` whose output is per set (``(B, ...)``), not per element;
            an ``nn.Module`` is evaluated in eval mode (restored afterwards). Wrap models with
            extra inputs, e.g. ``lambda x, m: net(x, m, queries)``.
        x: ``(B, N, D)`` sets; mask: ``(B, N)`` bool, True for real elements, or ``None``.
        num_orders: orderings to compare (at least 2).
        generator: CPU generator for the orderings (seed it for a repeatable number).

    Returns:
        The mean standard deviation: about float rounding (``1e-7`` relative in float32) for a
        permutation-invariant model, larger for an order-aware one.
    """
    if num_orders < 2:
        raise ValueError(f"num_orders: expected at least 2, got {num_orders}")
    module = model if isinstance(model, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        outs = torch.stack([model(*permute_sets(x, mask, generator)[:2]).double() for _ in range(num_orders)])
    finally:
        if module is not None:
            module.train(was_training)
    return float(outs.std(dim=0).mean())
