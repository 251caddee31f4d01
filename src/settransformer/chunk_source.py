"""A set batch read chunk by chunk from any array-like sliceable along the element axis.

Accepts a tensor, a NumPy array or ``np.memmap``, an h5py dataset, or anything with ``shape``,
``dtype`` and slicing; only the requested chunk is ever turned into a tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .validation import zero_padding

__all__ = ["ChunkSource"]


def _is_float(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.is_floating_point()
    try:
        return bool(np.issubdtype(np.dtype(x.dtype), np.floating))
    except TypeError:
        return False


def _to_tensor(a: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(a, Tensor):
        # a copy: memmaps may be read-only, and h5py / other array-likes return NumPy arrays anyway
        a = torch.from_numpy(np.array(a))
    return a.to(device=device, dtype=dtype)


class ChunkSource:
    """``x: (B, N, dim)`` or one set ``(N, dim)``, with an optional mask, read in chunks.

    Args:
        x: the set(s), any floating-point array-like.
        mask: ``None`` or a bool ``(B, N)`` (``(N,)`` for one set) tensor or NumPy array.
        dim: the expected feature size.
        dtype, device: what each chunk is converted to (the model's).

    Example:
        >>> src = ChunkSource(np.ones((10, 3), np.float64), None, 3, dtype=torch.float32, device="cpu")
        >>> x, mask = src.chunk(8, 12)
        >>> x.shape, x.dtype, mask
        (torch.Size([1, 2, 3]), torch.float32, None)
    """

    def __init__(
        self, x: Any, mask: Any, dim: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = getattr(x, "shape", None)
        expected = f"a floating-point array of shape (B, N, {dim}) or (N, {dim})"
        if shape is None or not hasattr(x, "__getitem__") or not hasattr(x, "dtype"):
            raise TypeError(
                f"x: expected {expected} (tensor, NumPy array, memmap, h5py dataset), got {type(x).__name__}"
            )
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3) or shape[-1] != dim:
            raise ValueError(f"x: expected {expected}, got shape {shape}")
        if not _is_float(x):
            raise TypeError(f"x: expected {expected}, got dtype {x.dtype}")
        if shape[-2] == 0:
            raise ValueError(f"x: expected at least one element per set, got shape {shape}")
        self.x, self.single = x, len(shape) == 2
        self.b, self.n = (1 if self.single else shape[0]), shape[-2]
        self.dtype, self.device = dtype, torch.device(device)
        self.mask = self._check_mask(mask, shape[:-1])

    def _check_mask(self, mask: Any, shape: tuple[int, ...]) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            if not isinstance(mask, np.ndarray):
                raise TypeError(
                    f"mask: expected a bool tensor or NumPy array of shape {shape}, got {type(mask).__name__}"
                )
            mask = torch.from_numpy(np.asarray(mask))
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool array of shape {shape}, got dtype {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"mask: expected shape {shape} (True for real elements), got {tuple(mask.shape)}"
            )
        mask = mask.to(self.device)
        return mask[None] if self.single else mask

    def chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
        """Elements ``start:stop`` of every set: ``x (B, c, dim)`` zero at padded rows, ``mask (B, c)``."""
        part = self.x[start:stop] if self.single else self.x[:, start:stop]
        x = _to_tensor(part, self.dtype, self.device)
        if self.single:
            x = x.unsqueeze(0)
        mask = None if self.mask is None else self.mask[:, start:stop]
        return zero_padding(x, mask), mask
