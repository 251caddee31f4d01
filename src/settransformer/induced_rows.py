"""An ISAB's second block, ``mab1(X, H)``, applied to chunk after chunk of ``X`` (inference fast path).

Each element attends to the same ``m`` induced vectors ``H``, so everything that depends only on
``H`` -- its keys folded with the query projection, its values folded with the output projection
(the ``"induced"`` form of :func:`settransformer.attention.induced_attention`) -- is computed once
per layer instead of once per chunk, and each chunk costs two large products (scores, output)
plus the rFF, written with in-place updates where the block's own code allocates. The output
bias is folded into the values: each head's softmax weights sum to one, so adding ``b_o / H``
to every folded value row adds ``b_o`` to the output.

With autograd, autocast, active dropout, another score function or ``top_k``, no output projection,
or more induced vectors than :meth:`MAB.few_keys` allows (where the block's standard form costs fewer
multiply-adds), it calls :meth:`MAB.attend` instead; both give the same result up to float rounding.
"""

from __future__ import annotations

import math

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

    Results of the fast path are overwritten by the next call (see :meth:`__call__`).

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
        # out= variants do not autocast: under autocast the block's own code (which does) runs
        autocast = torch.is_autocast_enabled(h.device.type)
        self.fast = (
            plain
            and mab.few_keys(h.shape[1])  # else the block's standard form is cheaper
            and not dropout
            and not torch.is_grad_enabled()
            and not autocast
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
        # explicit sizes, no -1: a batch of zero sets (b = 0) must reshape too
        self.k_in = torch.einsum("bhme,heq->bhmq", kh, w_q).reshape(b, heads * m, w_q.shape[-1]) * scale
        self.k_bias = (
            torch.einsum("bhme,he->bhm", kh, mab.to_q.bias.view(heads, dh)).reshape(b, 1, heads * m) * scale
        )
        out = mab.to_out
        assert isinstance(out, nn.Linear)
        v_out = torch.einsum("bhme,fhe->bhmf", split_heads(v, heads), out.weight.view(d, heads, dh))
        self.v_out = v_out.reshape(b, heads * m, d) + out.bias / heads
        self.m, self.ws = m, _Workspace(self.v_out)

    def __call__(self, x: Tensor) -> Tensor:
        """``x: (B, c, dim_q)`` -> ``(B, c, dim)``.

        On the fast path every intermediate and the result live in buffers reused by the next
        call: use the result (or copy it) before calling again.
        """
        mab = self.mab
        if not self.fast:
            return mab.attend(x, self.h, None)
        b, c = x.shape[:2]
        heads, d, ws = mab.num_heads, mab.dim, self.ws
        qn = mab.norm_q(x) if mab.norm == "pre" else x
        scores = ws.get("s", b, c, heads * self.m)
        torch.baddbmm(self.k_bias, qn, self.k_in.transpose(1, 2), out=scores)
        weights = ws.get("w", b, c, heads, self.m)
        torch.softmax(scores.view(b, c, heads, self.m), dim=-1, out=weights)
        weights = weights.view(b, c, heads * self.m)
        y = ws.get("y", b, c, d)
        if mab.residual == "projected":
            _linear(mab.to_q, qn, y).baddbmm_(weights, self.v_out)
        else:
            torch.baddbmm(x, weights, self.v_out, out=y)
        out = ws.get("out", b, c, d)
        if mab.norm == "post":
            y = _layer_norm(mab.norm1, y, ws.get("n1", b, c, d), ws)
            return _layer_norm(mab.norm2, _feed_forward(mab.ff, y, ws).add_(y), out, ws)
        if mab.norm == "pre":
            return torch.add(_feed_forward(mab.ff, mab.norm_ff(y), ws), y, out=out)
        return torch.add(_feed_forward(mab.ff, y, ws), y, out=out)


class _Workspace:
    """Buffers reused from chunk to chunk: a fresh multi-megabyte tensor per operation can cost
    more in page faults than the operation itself, when the allocator hands memory back to the OS."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, *shape: int) -> Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = self.like.new_empty(n)
        return buf[:n].view(shape)


def _linear(layer: nn.Linear, x: Tensor, out: Tensor) -> Tensor:
    """``layer(x)`` written into ``out`` (same leading shape as ``x``)."""
    flat = out.view(-1, layer.out_features)
    torch.addmm(layer.bias, x.reshape(-1, layer.in_features), layer.weight.t(), out=flat)
    return out


def _layer_norm(norm: nn.Module, x: Tensor, out: Tensor, ws: _Workspace) -> Tensor:
    """``norm(x)`` written into ``out`` for a plain ``nn.LayerNorm`` (any other module: called)."""
    if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or norm.bias is None:
        return norm(x)
    stats = ws.get("ln_stats", 2, *x.shape[:-1], 1)
    torch.ops.aten.native_layer_norm.out(
        x,
        list(norm.normalized_shape),
        norm.weight,
        norm.bias,
        norm.eps,
        out0=out,
        out1=stats[0],
        out2=stats[1],
    )
    return out


def _feed_forward(ff: nn.Module, x: Tensor, ws: _Workspace) -> Tensor:
    """``ff(x)`` for the blocks' ``Linear, ReLU[, Linear]`` into workspace buffers, ReLU in place."""
    if not isinstance(ff, nn.Sequential) or not all(isinstance(m, nn.Linear | nn.ReLU) for m in ff):
        return ff(x)
    for i, layer in enumerate(ff):
        if isinstance(layer, nn.Linear):
            x = _linear(layer, x, ws.get(f"ff{i}", *x.shape[:-1], layer.out_features))
        else:
            x = x.relu_()
    return x
