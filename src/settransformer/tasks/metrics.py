"""Metrics of set models: clustering agreement scores, and how much an output depends on order.

**Clustering agreement**: [`adjusted_rand_index`][settransformer.tasks.metrics.adjusted_rand_index] and
[`normalized_mutual_info`][settransformer.tasks.metrics.normalized_mutual_info] are computed from a
contingency table, for a whole batch of padded sets at once (no Python loop over sets), and agree with
scikit-learn's ``adjusted_rand_score`` and ``normalized_mutual_info_score`` (arithmetic-mean normalisation)
including their special cases. Labels may be any integers (only equality matters); padded points are left out
through ``mask``.

Inputs may be torch tensors or numpy arrays. One labelling ``(N,)`` gives a Python float; a batch
``(B, N)`` gives one score per set, ``(B,)`` float64, as a tensor (or an array for numpy input).

Examples:
    >>> adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0])
    1.0
    >>> t = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2]])
    >>> p = torch.tensor([[0, 0, 0, 1], [5, 5, 7, 9]])
    >>> adjusted_rand_index(t, p, mask=torch.tensor([[True] * 4, [True, True, True, False]])).shape
    torch.Size([2])

**Order dependence**: a set model's output is a function of the set, so reordering the elements
changes it only by floating-point rounding; an order-aware baseline
([`settransformer.nn.sequence`][settransformer.nn.sequence]) changes for real.
[`permutation_sensitivity`][settransformer.tasks.metrics.permutation_sensitivity] puts a number on it.

Examples:
    >>> from settransformer import DeepSets
    >>> x, mask = torch.randn(16, 10, 2), torch.rand(16, 10) > 0.3
    >>> permutation_sensitivity(DeepSets(2, 1, 1), x, mask) < 1e-5
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "adjusted_rand_index",
    "contingency_tables",
    "normalized_mutual_info",
    "permutation_sensitivity",
    "permute_sets",
    "r2_score",
]

ArrayLike = Tensor | np.ndarray | Any


def _as_labels(labels: ArrayLike, name: str) -> Tensor:
    t = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if t.is_floating_point() or t.is_complex():
        if not bool(torch.all(t == t.round())):
            raise TypeError(f"{name}: expected integer labels, got non-integral values of dtype {t.dtype}")
    elif t.dtype == torch.bool:
        t = t.long()
    if t.dim() not in (1, 2):
        raise ValueError(f"{name}: expected labels of shape (N,) or (B, N), got {tuple(t.shape)}")
    return t.long()


def contingency_tables(
    labels_true: ArrayLike, labels_pred: ArrayLike, mask: ArrayLike | None = None
) -> Tensor:
    """Contingency tables of two labellings of each set.

    Args:
        labels_true: integer labels ``(B, N)`` (or ``(N,)``: a batch of one).
        labels_pred: predicted labels of the same shape.
        mask: ``(B, N)`` bool, True = real point; ``None`` = all real.

    Returns:
        ``(B, C, K)`` float64 counts, ``C``/``K`` = distinct true/predicted labels in the whole batch.
    """
    t, p = _as_labels(labels_true, "labels_true"), _as_labels(labels_pred, "labels_pred")
    if t.shape != p.shape:
        raise ValueError(f"labels_true, labels_pred: shapes differ, {tuple(t.shape)} vs {tuple(p.shape)}")
    if t.dim() == 1:
        t, p = t[None], p[None]
    p = p.to(t.device)
    if mask is None:
        m = torch.ones_like(t, dtype=torch.bool)
    else:
        m = mask if isinstance(mask, Tensor) else torch.as_tensor(np.asarray(mask))
        if m.dim() == 1:
            m = m[None]
        if m.dtype != torch.bool or m.shape != t.shape:
            raise ValueError(
                f"mask: expected a bool array of shape {tuple(t.shape)}, got {m.dtype} {tuple(m.shape)}"
            )
        m = m.to(t.device)
    # Relabel to 0..C-1 over the whole batch so the table is as small as the data allows.
    _, t_idx = torch.unique(t, return_inverse=True)
    _, p_idx = torch.unique(p, return_inverse=True)
    b = t.shape[0]
    c, k = int(t_idx.max()) + 1 if t.numel() else 1, int(p_idx.max()) + 1 if p.numel() else 1
    flat = (torch.arange(b, device=t.device)[:, None] * c + t_idx) * k + p_idx
    counts = torch.bincount(flat[m], minlength=b * c * k)
    return counts.view(b, c, k).to(torch.float64)


def _finish(scores: Tensor, labels_true: ArrayLike) -> Any:
    single = (labels_true.dim() if isinstance(labels_true, Tensor) else np.ndim(labels_true)) == 1
    if single:
        return float(scores[0])
    return scores if isinstance(labels_true, Tensor) else scores.cpu().numpy()


def adjusted_rand_index(labels_true: ArrayLike, labels_pred: ArrayLike, mask: ArrayLike | None = None) -> Any:
    """Adjusted Rand index of each set (1 = identical partitions, about 0 = chance).

    Uses the pair-counting form of scikit-learn: with the pair confusion counts, ARI =
    ``2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn))``, and 1 when ``fn = fp = 0``.

    Shapes: labels ``(N,)`` -> float; ``(B, N)`` with ``mask: (B, N)`` -> ``(B,)`` float64.
    """
    table = contingency_tables(labels_true, labels_pred, mask)
    n = table.sum(dim=(1, 2))
    sum_sq = table.square().sum(dim=(1, 2))
    rows_sq = table.sum(dim=2).square().sum(dim=1)
    cols_sq = table.sum(dim=1).square().sum(dim=1)
    tp = sum_sq - n
    fp = cols_sq - sum_sq
    fn = rows_sq - sum_sq
    tn = n.square() - fp - fn - sum_sq
    num = 2.0 * (tp * tn - fn * fp)
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    perfect = (fn == 0) & (fp == 0)
    ari = torch.where(perfect, torch.ones_like(num), num / torch.where(perfect, torch.ones_like(den), den))
    return _finish(ari, labels_true)


def r2_score(predicted: Tensor, target: Tensor) -> Tensor:
    """The coefficient of determination of each output over ``S`` sets.

    ``predicted``, ``target``: ``(S, ...)`` -> ``(K,)``, one value per output (``K`` = the product of
    the trailing sizes): ``1 - sum (predicted - target)^2 / sum (target - mean)^2``. An output whose
    targets are all equal has no variance to explain: its score is 1 when it is predicted exactly and 0
    otherwise (scikit-learn's ``r2_score`` convention), not the huge number a zero denominator gives.

    Examples:
        >>> target = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
        >>> r2_score(target + torch.tensor([0.0, 0.1]), target)
        tensor([1., 0.])
    """
    t = target.reshape(len(target), -1)
    residual = (predicted.reshape(len(target), -1) - t).pow(2).sum(0)
    total = (t - t.mean(0)).pow(2).sum(0)
    constant = total == 0
    explained = 1 - residual / torch.where(constant, torch.ones_like(total), total)
    return torch.where(constant, (residual == 0).to(total.dtype), explained)


def _entropy(counts: Tensor) -> Tensor:
    """Entropy (nats) of each row of counts ``(B, C)``."""
    total = counts.sum(dim=1, keepdim=True).clamp_min(1)
    p = counts / total
    return -torch.xlogy(p, p).sum(dim=1)


def normalized_mutual_info(
    labels_true: ArrayLike, labels_pred: ArrayLike, mask: ArrayLike | None = None
) -> Any:
    """Normalised mutual information of each set: ``MI / ((H(true) + H(pred)) / 2)``, in [0, 1].

    As in scikit-learn, two labellings that are both a single cluster (or an empty set) score 1, and a
    mutual information below float64 eps scores 0.

    Shapes: labels ``(N,)`` -> float; ``(B, N)`` with ``mask: (B, N)`` -> ``(B,)`` float64.
    """
    table = contingency_tables(labels_true, labels_pred, mask)
    n = table.sum(dim=(1, 2))
    rows, cols = table.sum(dim=2), table.sum(dim=1)
    n_b = n.clamp_min(1)[:, None, None]
    outer = rows[:, :, None] * cols[:, None, :]
    # sum_ij n_ij / n * log(n n_ij / (n_i n_j)); cells with n_ij = 0 contribute 0 (xlogy).
    mi = (torch.xlogy(table, table * n_b) - torch.xlogy(table, outer.clamp_min(1))).sum(dim=(1, 2))
    mi = (mi / n.clamp_min(1)).clamp_min(0.0)
    h_true, h_pred = _entropy(rows), _entropy(cols)
    norm = (h_true + h_pred) / 2
    nmi = mi / norm.clamp_min(torch.finfo(torch.float64).tiny)
    nmi = torch.where(mi < torch.finfo(torch.float64).eps, torch.zeros_like(nmi), nmi)
    trivial = ((rows > 0).sum(1) == (cols > 0).sum(1)) & ((rows > 0).sum(1) <= 1)
    nmi = torch.where(trivial, torch.ones_like(nmi), nmi)
    return _finish(nmi, labels_true)


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
