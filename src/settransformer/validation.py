"""Input checks shared by every block and model.

Each check raises ``TypeError`` for the wrong kind of object or dtype and ``ValueError`` for the
wrong shape, with a message that names the argument and the expected shape, so a user sees
``x: expected a float tensor of shape (B, N, 3), got shape (10, 3)`` rather than an error from
deep inside a matrix product.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_mask", "check_positive", "check_probability", "check_set", "zero_padding"]


def check_set(x: object, dim: int, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating-point set batch ``(B, N, dim)`` and return it."""
    expected = f"a floating-point tensor of shape (B, N, {dim})"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected {expected}, got dtype {x.dtype}")
    if x.dim() != 3:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 2 else ""
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(x.shape)}{hint}")
    if x.shape[-1] != dim:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(x.shape)}")
    return x


def check_mask(mask: object, x: Tensor, name: str = "mask") -> Tensor | None:
    """Check that ``mask`` is ``None`` or a boolean ``(B, N)`` tensor matching ``x: (B, N, D)``."""
    if mask is None:
        return None
    b, n = x.shape[0], x.shape[1]
    expected = f"a bool tensor of shape (B, N) = ({b}, {n}), True for real elements"
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected {expected}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected {expected}, got dtype {mask.dtype}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{name}: is on {mask.device} but the set is on {x.device}")
    return mask


def zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Set padded rows of ``x: (B, N, D)`` to zero (``mask: (B, N)``, True = real).

    ``masked_fill`` rather than a multiplication, so padded values that are NaN or infinite
    cannot leak (``0 * nan`` is NaN) and padded positions receive exactly zero gradient.
    """
    if mask is None:
        return x
    return x.masked_fill(~mask[..., None], 0.0)


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Check a size argument (an ``int``, positive or, with ``allow_zero``, non-negative)."""
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name}: expected {kind} integer, got {value!r}")
    return value


def check_probability(name: str, value: object) -> float:
    """Check a dropout probability in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)
