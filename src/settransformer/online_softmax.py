"""Attention of a few queries over a set that arrives in chunks: the online (streaming) softmax.

A MAB whose queries are a handful of learned vectors (an ISAB's inducing points, PMA's seeds)
attends over the whole set, so its softmax normalises over every element. Written in the pooled
form of :func:`settransformer.attention.pooled_attention` (queries moved into the input space, the
set itself never projected), one query row ``j`` needs only three running statistics over the
raw rows ``x_i`` it has seen:

- ``r_j``: a reference score (the running maximum, for numerical stability),
- ``S_j = sum_i exp(s_ij - r_j)``: the softmax denominator,
- ``A_j = sum_i exp(s_ij - r_j) x_i``: the un-normalised weighted sum of raw rows,

and two partial results combine exactly by rescaling both to the larger reference. The softmax
output is ``A_j / S_j`` whatever the chunking, up to float rounding.

Autograd: the references are detached. They cancel out of ``A / S`` exactly, so treating them
as constants gives the true gradient, and it makes every rescaling factor a constant, so that
combining a chunk's statistics saves only its ``(B, queries, 1)`` factors for backward, never
the chunk's ``(B, queries, D)`` sums. Each chunk's statistics can thus come from a checkpointed
function (:func:`torch.utils.checkpoint.checkpoint`) and the backward pass recomputes one chunk at
a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import merge_heads, split_heads
from .blocks import MAB

__all__ = ["OnlineSoftmax", "PooledQueries", "check_dot_product", "mab_tail"]

# Fused CPU attention that also returns the log-sum-exp (a private op: absent -> plain products).
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def check_dot_product(mab: MAB, name: str) -> None:
    """Raise ``ValueError`` unless ``mab`` uses the default soft dot-product attention.

    The online softmax accumulates ``exp(q . x)`` over raw rows; other score functions (a MAB's
    ``score`` other than ``None``, i.e. ``"dot"``) and hard ``top_k`` attention do not decompose
    that way.
    """
    score, top_k = getattr(mab, "score", None), getattr(mab, "top_k", None)
    if score is None and top_k is None:
        return
    raise ValueError(
        f"{name}: chunked evaluation supports only dot-product softmax attention, got "
        f"score={score!r}, top_k={top_k!r}; evaluate this model without chunk_size"
    )


def mab_tail(mab: MAB, q: Tensor, qp: Tensor | None, o: Tensor) -> Tensor:
    """The part of :meth:`MAB.attend` after the attention: output projection, residual, rFF, norms.

    ``q``: the raw queries ``(Bq, Nq, dim_q)``; ``qp``: the projected queries ``(Bq, Nq, dim)`` (used
    as the residual when ``mab.residual == "projected"``); ``o``: the heads' concatenated attention
    output ``(B, Nq, dim)``. Returns ``(B, Nq, dim)``.
    """
    residual = q if mab.residual == "input" or qp is None else qp
    x = residual + mab.drop(mab.to_out(o))
    if mab.norm == "post":
        x = mab.norm1(x)
        return mab.norm2(x + mab.drop(mab.ff(x)))
    if mab.norm == "pre":
        return x + mab.drop(mab.ff(mab.norm_ff(x)))
    return x + mab.drop(mab.ff(x))


class OnlineSoftmax:
    """Running softmax statistics of ``Q`` query rows over a set seen chunk by chunk.

    Feed it each chunk's ``(ref, denom, acc)`` from :meth:`PooledQueries.stats` with :meth:`add`;
    :meth:`result` returns the softmax-weighted sums ``(B, Q, D)`` and which sets were empty.
    """

    def __init__(self) -> None:
        self.ref: Tensor | None = None  # (B, Q, 1), detached, finite
        self.denom: Tensor | None = None  # (B, Q, 1)
        self.acc: Tensor | None = None  # (B, Q, D)

    def add(self, ref: Tensor, denom: Tensor, acc: Tensor) -> None:
        """Merge one chunk's statistics (``ref`` detached, ``denom`` and ``acc`` relative to it)."""
        if self.ref is None or self.denom is None or self.acc is None:
            self.ref, self.denom, self.acc = ref, denom, acc
            return
        new_ref = torch.maximum(self.ref, ref)
        old_scale, scale = torch.exp(self.ref - new_ref), torch.exp(ref - new_ref)
        self.denom = self.denom * old_scale + denom * scale
        self.acc = self.acc * old_scale + acc * scale
        self.ref = new_ref

    def result(self) -> tuple[Tensor, Tensor]:
        """``(weighted sums (B, Q, D), empty (B,) bool)``; an empty set's sums are zero."""
        if self.denom is None or self.acc is None:
            raise ValueError("x: the set has no elements (chunked evaluation saw no chunk)")
        seen = self.denom > 0  # the running maximum contributes exp(0) = 1 unless all are masked
        out = self.acc / torch.where(seen, self.denom, torch.ones_like(self.denom))
        return out, ~seen[:, 0, 0]


class PooledQueries:
    """A MAB's few queries prepared to attend over raw chunks of a large set (pooled form).

    ``q~_h = (q W_q + b_q)_h W_k,h * scale`` is computed once; each chunk then costs one
    ``(c, D_kv) x (D_kv, H * Nq)`` product for the scores and one for the weighted sum.

    Args:
        mab: the block, with dot-product scores.
        q: its raw queries ``(Bq, Nq, dim_q)``, ``Bq`` = 1 (learned, shared) or ``B``.

    Example:
        >>> mab = MAB(8, 3, 8, num_heads=2).eval()
        >>> q, x = torch.randn(1, 4, 8), torch.randn(2, 100, 3)
        >>> pq, acc = PooledQueries(mab, q), OnlineSoftmax()
        >>> for s in range(0, 100, 30):
        ...     acc.add(*pq.stats(x[:, s : s + 30], None))
        >>> torch.allclose(pq.finish(*acc.result()), mab.attend(q, x, None), atol=1e-5)
        True
    """

    def __init__(self, mab: MAB, q: Tensor) -> None:
        self.mab, self.q = mab, q
        h, d, dkv = mab.num_heads, mab.dim, mab.dim_kv
        dh = d // h
        qn = mab.norm_q(q) if mab.norm == "pre" else q
        self.qp = mab.to_q(qn)  # (Bq, Nq, dim)
        w_k, self.w_v = mab.to_kv.weight.chunk(2)
        self.b_v = mab.to_kv.bias[d:]
        scale = dh**-0.5 if mab.scale is None else mab.scale
        q_in = torch.einsum("bhqe,hek->bhqk", split_heads(self.qp, h), w_k.view(h, dh, dkv))
        self.q_in = (q_in * scale).reshape(q.shape[0], h * q.shape[1], dkv)  # (Bq, H * Nq, D_kv)

    def stats(self, kv: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk's statistics: ``kv: (B, c, dim_kv)`` zero at padded rows, ``mask: (B, c)``.

        Returns ``ref (B, H*Nq, 1)`` (detached), ``denom (B, H*Nq, 1)``, ``acc (B, H*Nq, dim_kv)``.
        """
        mab = self.mab
        kvn = mab.norm_kv(kv) if mab.norm == "pre" else kv
        dropout = mab.training and mab.dropout > 0
        needs_grad = torch.is_grad_enabled() and (kvn.requires_grad or self.q_in.requires_grad)
        if _FUSED is not None and kvn.device.type == "cpu" and not (dropout or needs_grad):
            return self._fused_stats(kvn, mask)
        scores = torch.matmul(self.q_in, kvn.transpose(1, 2))  # (B, H*Nq, c)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        # An all-masked chunk has max -inf; clamping keeps the reference finite (its weights are 0).
        ref = scores.detach().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
        weights = torch.exp(scores - ref)
        denom = weights.sum(dim=-1, keepdim=True)
        if dropout:
            # dropout on the normalised weights = dropout on the numerator only
            weights = F.dropout(weights, mab.dropout)
        return ref, denom, torch.matmul(weights, kvn)

    def _fused_stats(self, kvn: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`stats` by PyTorch's fused CPU flash-attention kernel (no autograd, no dropout).

        Its normalised output and log-sum-exp are the statistics relative to ``ref = lse``
        (``denom = 1``); about twice as fast as separate products and exponentials for narrow sets.
        """
        assert _FUSED is not None
        b = kvn.shape[0]
        q, kv = self.q_in.expand(b, -1, -1).unsqueeze(1), kvn.unsqueeze(1)
        if q.dtype != kv.dtype:  # a private op, not autocast-aware: cast as autocast would
            dtype = torch.promote_types(q.dtype, kv.dtype)
            if torch.is_autocast_enabled("cpu"):
                dtype = torch.get_autocast_dtype("cpu")
            q, kv = q.to(dtype), kv.to(dtype)
        bias = None
        if mask is not None:
            bias = torch.zeros(b, 1, 1, kvn.shape[1], dtype=kv.dtype, device=kvn.device)
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        out, lse = _FUSED(q, kv, kv, 0.0, False, attn_mask=bias, scale=1.0)
        denom = torch.ones_like(lse[:, 0, :, None])
        if mask is not None:  # the kernel gives an all-masked row out = 0, lse = 0
            denom = denom * mask.any(dim=1).to(denom.dtype)[:, None, None]
        return lse[:, 0, :, None], denom, out[:, 0]

    def finish(self, pooled: Tensor, empty: Tensor) -> Tensor:
        """The block's output from the softmax-weighted raw rows ``pooled: (B, H*Nq, dim_kv)``.

        ``empty: (B,)`` marks empty sets (attention output exactly zero). Returns ``(B, Nq, dim)``.
        """
        mab = self.mab
        h, d, dkv = mab.num_heads, mab.dim, mab.dim_kv
        b, nq, dh = pooled.shape[0], self.q.shape[1], d // h
        pooled = pooled.to(self.w_v.dtype)  # the fused kernel keeps half-precision statistics in float32
        o = torch.einsum("bhqk,hek->bhqe", pooled.view(b, h, nq, dkv), self.w_v.view(h, dh, dkv))
        o = (o + self.b_v.view(h, 1, dh)).masked_fill(empty[:, None, None, None], 0.0)
        return mab_tail(mab, self.q, self.qp, merge_heads(o))
