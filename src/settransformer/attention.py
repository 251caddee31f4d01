"""Multi-head attention over sets: the one attention function every block calls.

Tensors keep the heads as their own dimension, ``(B, H, N, head_dim)``, so splitting and merging
heads are views (no ``split``/``cat`` copies), and the scores go through PyTorch's fused
:func:`torch.nn.functional.scaled_dot_product_attention` kernel.

Masks follow PyTorch Geometric's ``to_dense_batch``: a boolean ``mask`` of shape ``(B, N)`` in
which ``True`` marks a real element and ``False`` padding.

The empty-set rule: a query whose keys are *all* masked (the set is empty) gets an attention
output of exactly zero, with finite gradients, on every supported torch version. Softmax over an
all ``-inf`` row is NaN, so such rows are instead given every key (padding is zero-filled by the
blocks, so those keys are finite) and the result is then replaced by zero with ``masked_fill``,
which passes no gradient back through the replaced rows.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "merge_heads", "split_heads"]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """View ``x: (B, N, H * Dh)`` as ``(B, H, N, Dh)`` without copying."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """Inverse of :func:`split_heads`: ``(B, H, N, Dh) -> (B, N, H * Dh)``.

    Free when ``x`` is laid out as ``(B, N, H, Dh)`` in memory, which is what the fused CPU and
    CUDA kernels return.
    """
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Scaled dot-product attention of queries over a (possibly padded) set of keys.

    Args:
        q: queries ``(B, H, Nq, Dh)``; a batch size of 1 is broadcast over the keys' batch
            (used for learned inducing points and seeds, which are shared by every set).
        k: keys ``(B, H, Nk, Dh)``.
        v: values ``(B, H, Nk, Dv)``.
        mask: ``(B, Nk)`` boolean, True for real keys. ``None`` means every key is real.
        scale: softmax temperature; ``1 / sqrt(Dh)`` (per-head width) when ``None``.
        dropout_p: dropout on the attention weights (pass 0 in evaluation).

    Returns:
        ``(B, H, Nq, Dv)``. Rows of an empty set (all keys masked) are exactly zero.

    Example:
        >>> q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
        >>> mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
        >>> attention(q, k, k, mask).shape
        torch.Size([2, 4, 3, 8])
    """
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], -1, -1, -1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    empty = ~mask.any(dim=-1)  # (B,)
    attn_mask = (mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, Nk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty[:, None, None, None], 0.0)
