"""Variable-size sets: converting between lists of sets and padded batches with masks, and pooling a
padded batch over its real elements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .validation import check_mask, check_positive, check_set, zero_padding

__all__ = [
    "PoolKind",
    "accumulation_dtype",
    "finish_pool",
    "masked_pool",
    "merge_pooled",
    "pad_sets",
    "pool_count",
    "pool_partial",
    "unpad_sets",
]

PoolKind = Literal["mean", "sum", "max"]


def pad_sets(sets: Sequence[Tensor], *, max_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack sets of different sizes into a zero-padded batch and its mask.

    Args:
        sets: ``B`` tensors of shape ``(N_i, D)`` (same ``D``, dtype and device); ``N_i`` may be 0.
        max_size: pad to this many elements instead of ``max(N_i)`` (must be at least that).

    Returns:
        ``x: (B, N, D)`` with zeros at padded rows and ``mask: (B, N)`` bool, True for real elements.

    Examples:
        >>> x, mask = pad_sets([torch.randn(3, 2), torch.randn(5, 2)])
        >>> x.shape, mask.sum(1).tolist()
        (torch.Size([2, 5, 2]), [3, 5])
    """
    if not isinstance(sets, Sequence | Tensor):  # a generator has no len(); a (B, N, D) tensor is B sets
        raise TypeError(f"sets: expected a list of tensors of shape (N_i, D), got {type(sets).__name__}")
    if len(sets) == 0:
        raise ValueError("sets: expected at least one set, got an empty sequence")
    if max_size is not None:
        check_positive("max_size", max_size, allow_zero=True)
    first = sets[0]
    for i, s in enumerate(sets):
        if not isinstance(s, Tensor):
            raise TypeError(f"sets[{i}]: expected a tensor of shape (N_i, D), got {type(s).__name__}")
        if s.dim() != 2:
            raise ValueError(f"sets[{i}]: expected a tensor of shape (N_i, D), got shape {tuple(s.shape)}")
        if s.shape[1] != first.shape[1] or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(
                f"sets[{i}]: expected D={first.shape[1]}, {first.dtype} on {first.device} like sets[0], "
                f"got D={s.shape[1]}, {s.dtype} on {s.device}"
            )
    sizes = torch.tensor([s.shape[0] for s in sets])
    n = int(sizes.max()) if max_size is None else max_size
    if n < int(sizes.max()):
        raise ValueError(f"max_size: {max_size} is smaller than the largest set ({int(sizes.max())})")
    x = first.new_zeros(len(sets), n, first.shape[1])
    for i, s in enumerate(sets):
        x[i, : s.shape[0]] = s
    mask = torch.arange(n)[None, :] < sizes[:, None]
    return x, mask.to(first.device)


def unpad_sets(x: Tensor, mask: Tensor) -> list[Tensor]:
    """Inverse of [`pad_sets`][settransformer.nn.sets.pad_sets]: ``x: (B, N, D)``, ``mask: (B, N)`` -> ``B``
    tensors ``(N_i, D)``.

    Real elements need not come first: each set keeps its elements where ``mask`` is True, in order.

    Examples:
        >>> x, mask = pad_sets([torch.randn(3, 2), torch.randn(5, 2)])
        >>> [s.shape[0] for s in unpad_sets(x, mask)]
        [3, 5]
    """
    if not isinstance(x, Tensor) or not isinstance(mask, Tensor):
        raise TypeError(
            f"x: expected tensors x (B, N, D) and mask (B, N), got {type(x).__name__}, {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor of shape (B, N), got dtype {mask.dtype}")
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(
            f"x, mask: expected (B, N, D) and a bool (B, N), got {tuple(x.shape)} and "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return [xi[mi] for xi, mi in zip(x, mask)]


def masked_pool(x: Tensor, mask: Tensor | None, how: PoolKind = "mean") -> Tensor:
    """Pool a padded set batch over its elements.

    Args:
        x: ``(B, N, D)``; padded rows may hold anything (they are ignored, and get zero gradient).
        mask: ``(B, N)`` boolean, True for real elements, or ``None``.
        how: ``"mean"``, ``"sum"`` or ``"max"``.

    Returns:
        ``(B, D)`` in ``x``'s dtype (sums of 16-bit floats accumulate in float32, as ``torch.mean``'s
        do). An empty set pools to zeros (all three kinds), with zero gradient.

    Examples:
        >>> x, mask = torch.tensor([[[1.0], [3.0], [99.0]]]), torch.tensor([[True, True, False]])
        >>> masked_pool(x, mask, "mean"), masked_pool(x, mask, "max")
        (tensor([[2.]]), tensor([[3.]]))
        >>> masked_pool(torch.full((1, 1000, 1), 100.0, dtype=torch.float16), None)  # sum 1e5 > fp16 max
        tensor([[100.]], dtype=torch.float16)
    """
    if how not in ("mean", "sum", "max"):
        raise ValueError(f"how: expected 'mean', 'sum' or 'max', got {how!r}")
    check_set(x, x.shape[-1] if isinstance(x, Tensor) and x.dim() > 0 else 1)
    mask = check_mask(mask, x)
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], x.shape[2])
    x = zero_padding(x, mask)
    return finish_pool(pool_partial(x, mask, how), pool_count(x, mask), how, dtype=x.dtype)


# Masked pooling in three steps, so that a set read in chunks pools exactly like a whole one:
# pool_partial per chunk, merge_pooled across chunks, finish_pool once at the end.


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype pooled sums of ``dtype`` values accumulate in: float32 for 16-bit floats (whose
    range a sum over a large set, or a count above 65,504, overflows), ``dtype`` otherwise.

    Examples:
        >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def pool_count(x: Tensor, mask: Tensor | None) -> Tensor:
    """The number of real elements of each set of ``x: (B, N, D)``: ``(B, 1)`` in the
    [`accumulation_dtype`][settransformer.nn.sets.accumulation_dtype] of ``x``'s.

    Examples:
        >>> pool_count(torch.zeros(2, 3, 4), torch.tensor([[True, True, False], [False, False, False]]))
        tensor([[2.],
                [0.]])
    """
    dtype = accumulation_dtype(x.dtype)
    if mask is None:
        return x.new_full((x.shape[0], 1), x.shape[1], dtype=dtype)
    return mask.sum(dim=1, keepdim=True).to(dtype)


def pool_partial(x: Tensor, mask: Tensor | None, how: PoolKind) -> Tensor:
    """The sum (``"mean"``, ``"sum"``, in the
    [`accumulation_dtype`][settransformer.nn.sets.accumulation_dtype]) or maximum (``"max"``) of the
    real rows of ``x: (B, N, D)`` (zero at padded rows): ``(B, D)``; an all-padding set's maximum is the
    dtype's lowest value.

    Examples:
        >>> x, mask = torch.tensor([[[1.0], [3.0], [0.0]]]), torch.tensor([[True, True, False]])
        >>> pool_partial(x, mask, "sum"), pool_partial(x, mask, "max")
        (tensor([[4.]]), tensor([[3.]]))
    """
    if how != "max":
        return x.sum(dim=1, dtype=accumulation_dtype(x.dtype))
    low = x if mask is None else x.masked_fill(~mask[..., None], torch.finfo(x.dtype).min)
    return low.amax(dim=1)


def merge_pooled(a: Tensor, b: Tensor, how: PoolKind) -> Tensor:
    """Two [`pool_partial`][settransformer.nn.sets.pool_partial] results ``(B, D)`` of disjoint parts of the
    same sets, combined.

    Examples:
        >>> a, b = torch.tensor([[1.0, 5.0]]), torch.tensor([[2.0, 3.0]])
        >>> merge_pooled(a, b, "sum"), merge_pooled(a, b, "max")
        (tensor([[3., 8.]]), tensor([[2., 5.]]))
    """
    return torch.maximum(a, b) if how == "max" else a + b


def finish_pool(partial: Tensor, count: Tensor, how: PoolKind, dtype: torch.dtype | None = None) -> Tensor:
    """The pooled ``(B, D)`` from [`pool_partial`][settransformer.nn.sets.pool_partial] over every element and
    the counts ``(B, 1)``, in ``dtype`` (default: ``partial``'s); an empty set pools to zero.

    Examples:
        >>> partial, count = torch.tensor([[4.0], [0.0]]), torch.tensor([[2.0], [0.0]])
        >>> finish_pool(partial, count, "mean")
        tensor([[2.],
                [0.]])
    """
    if how == "sum":
        out = partial
    elif how == "mean":
        out = partial / count.clamp_min(1)
    else:
        out = partial.masked_fill(count == 0, 0.0)
    return out if dtype is None else out.to(dtype)
