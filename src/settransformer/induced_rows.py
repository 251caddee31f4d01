"""An ISAB's second block, ``mab1(X, H)``, applied to chunk after chunk of ``X`` (inference fast path).

Each element attends to the same ``m`` induced vectors ``H``, so everything that depends only on
``H`` -- its keys folded with the query projection, its values folded with the output projection
(the ``"induced"`` form of :func:`settransformer.attention.induced_attention`) -- is computed once
per layer instead of once per chunk, and each chunk costs two large products (scores, output)
plus the rFF, written with in-place updates where the block's own code allocates. The output
bias is folded into the values: each head's softmax weights sum to one, so adding ``b_o / H``
to every folded value row adds ``b_o`` to the output.

With autograd, active dropout, another score function or ``top_k``, or no output projection, it
calls :meth:`MAB.attend` instead; both give the same result up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import split_heads
from .blocks import MAB

__all__ = ["InducedRows"]


class InducedRows:
    """``mab.attend(x, h, None)`` for many chunks ``x: (B, c, dim_q)`` of one set batch.

    Args:
        mab: an ISAB's ``mab1``.
        h: the induced set ``(B, m, dim)``.

    Example:
        >>> from settransformer import ISAB
        >>> isab = ISAB(3, 16, num_heads=4, num_inducing=8).eval()
        >>> x = torch.randn(2, 50, 3)
        >>> with torch.no_grad():
        ...     h = isab.induce(x, None)
        ...     torch.allclose(InducedRows(isab.mab1, h)(x), isab.mab1.attend(x, h, None), atol=1e-5)
        True
    """

    def __init__(self, mab: MAB, h: Tensor) -> None:
        self.mab, self.h = mab, h
        dropout = mab.training and mab.dropout > 0
        plain = getattr(mab, "score", None) is None and getattr(mab, "top_k", None) is None
        self.fast = (
            plain and isinstance(mab.to_out, nn.Linear) and not dropout and not torch.is_grad_enabled()
        )
        if not self.fast:
            return
        heads, d = mab.num_heads, mab.dim
        dh = d // heads
        scale = dh**-0.5 if mab.scale is None else mab.scale
        k, v = mab.to_kv(mab.norm_kv(h) if mab.norm == "pre" else h).chunk(2, dim=-1)
        b, m = k.shape[:2]
        kh = split_heads(k, heads)  # (B, H, m, dh)
        w_q = mab.to_q.weight.view(heads, dh, -1)
        self.k_in = torch.einsum("bhme,heq->bhmq", kh, w_q).reshape(b, heads * m, -1) * scale
        self.k_bias = (
            torch.einsum("bhme,he->bhm", kh, mab.to_q.bias.view(heads, dh)).reshape(b, 1, -1) * scale
        )
        out = mab.to_out
        assert isinstance(out, nn.Linear)
        v_out = torch.einsum("bhme,fhe->bhmf", split_heads(v, heads), out.weight.view(d, heads, dh))
        self.v_out = v_out.reshape(b, heads * m, d) + out.bias / heads
        self.m = m

    def __call__(self, x: Tensor) -> Tensor:
        """``x: (B, c, dim_q)`` -> ``(B, c, dim)``."""
        mab = self.mab
        if not self.fast:
            return mab.attend(x, self.h, None)
        b, c = x.shape[:2]
        qn = mab.norm_q(x) if mab.norm == "pre" else x
        scores = torch.baddbmm(self.k_bias, qn, self.k_in.transpose(1, 2))  # (B, c, H * m)
        weights = torch.softmax(scores.view(b, c, mab.num_heads, self.m), dim=-1).view(b, c, -1)
        if mab.residual == "projected":  # a fresh tensor: accumulate into it
            y = mab.to_q(qn).baddbmm_(weights, self.v_out)
        else:
            y = torch.baddbmm(x, weights, self.v_out)
        if mab.norm == "post":
            y = mab.norm1(y)
            return mab.norm2(_feed_forward(mab.ff, y).add_(y))
        if mab.norm == "pre":
            return _feed_forward(mab.ff, mab.norm_ff(y)).add_(y)
        return _feed_forward(mab.ff, y).add_(y)


def _feed_forward(ff: nn.Module, x: Tensor) -> Tensor:
    """``ff(x)`` for the blocks' ``Linear, ReLU[, Linear]``, with the ReLU in place (saves a pass)."""
    if not isinstance(ff, nn.Sequential) or not isinstance(ff[0], nn.Linear):
        return ff(x)
    for layer in ff:
        x = x.relu_() if isinstance(layer, nn.ReLU) else layer(x)
    return x
