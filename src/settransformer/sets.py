"""Converting between lists of variable-size sets and padded batches with masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .validation import check_positive

__all__ = ["pad_sets", "unpad_sets"]


def pad_sets(sets: Sequence[Tensor], *, max_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack sets of different sizes into a zero-padded batch and its mask.

    Args:
        sets: ``B`` tensors of shape ``(N_i, D)`` (same ``D``, dtype and device); ``N_i`` may be 0.
        max_size: pad to this many elements instead of ``max(N_i)`` (must be at least that).

    Returns:
        ``x: (B, N, D)`` with zeros at padded rows and ``mask: (B, N)`` bool, True for real elements.

    Example:
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
    """Inverse of :func:`pad_sets`: ``x: (B, N, D)``, ``mask: (B, N)`` -> ``B`` tensors ``(N_i, D)``.

    Real elements need not come first: each set keeps its elements where ``mask`` is True, in order.
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
