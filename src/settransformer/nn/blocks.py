"""The Set Transformer's blocks: MAB, SAB, ISAB and PMA (Lee et al., 2019, section 3), plus masked pooling.

Every block takes sets as ``(B, N, D)`` tensors with an optional boolean ``mask: (B, N)`` (True =
real element). Outputs at padded positions are exactly zero, and padded inputs (whatever their
values, NaN included) have no influence on any output and receive zero gradient.

Shared keyword options (all blocks):

- ``norm``: ``"post"`` (the paper: ``LN(H + rFF(H))``, ``H = LN(X + Multihead(X, Y, Y))``), ``"pre"``
  (``H = X + Multihead(LN(X), LN(Y))``, ``H + rFF(LN(H))``; steadier for deep stacks) or ``None``.
- ``ff_dim``: the row-wise feed-forward. ``None``: one ``Linear(dim, dim)`` + ReLU (the paper's and
  the official code's rFF); an integer: ``Linear(dim, ff_dim)``, ReLU, ``Linear(ff_dim, dim)``.
- ``dropout``: on the attention weights and on both residual branches.
- ``scale``: softmax temperature; default ``1/sqrt(dim / num_heads)`` (per-head width).
- ``residual``: what the attention output is added to: ``"input"`` (the query itself, as in the
  paper), ``"projected"`` (the projected query, as in the official code) or ``"auto"`` (the
  input when its width equals ``dim``, else the projected query).
- ``out_proj``: apply the output projection ``W^O`` after concatenating heads (the official code
  has none).
- ``score``: the attention score: ``"dot"`` (default, the fused scaled dot product), ``"additive"``,
  ``"gaussian"``, or your own ``nn.Module``/callable ``(q, k) -> logits``; see
  :mod:`settransformer.nn.scores`.
- ``top_k``: hard attention: each query keeps only its ``top_k`` highest-scoring keys (``None``: all).


Attention of a few queries over a set that arrives in chunks: the online (streaming) softmax.

A MAB whose queries are a handful of learned vectors (an ISAB's inducing points, PMA's seeds)
attends over the whole set, so its softmax normalises over every element. Written in the pooled
form of :func:`settransformer.nn.attention.pooled_attention` (queries moved into the input space, the
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

An ISAB's second block, ``mab1(X, H)``, applied to chunk after chunk of ``X`` (inference fast path).

Each element attends to the same ``m`` induced vectors ``H``, so everything that depends only on
``H`` -- its keys folded with the query projection, its values folded with the output projection
(the ``"induced"`` form of :func:`settransformer.nn.attention.induced_attention`) -- is computed once
per layer instead of once per chunk, and each chunk costs two large products (scores, output)
plus the rFF, written with in-place updates where the block's own code allocates. The output
bias is folded into the values: each head's softmax weights sum to one, so adding ``b_o / H``
to every folded value row adds ``b_o`` to the output.

With autograd, autocast, active dropout, another score function or ``top_k``, no output projection,
or more induced vectors than :meth:`MAB.few_keys` allows (where the block's standard form costs fewer
multiply-adds), it calls :meth:`MAB.attend` instead; both give the same result up to float rounding.

Pinning the form of every attention block while a model is traced (used by :mod:`.export`).

A :class:`~settransformer.nn.blocks.MAB` picks one of three exact forms of its attention by cost from
the numbers of queries and keys (``MAB._path``). A trace records the form chosen for the traced
sizes and keeps it for every size, so :func:`large_set_forms` makes each block use, whatever the
sizes it is traced at, the form it picks when the sizes that grow with the set are large -- what
``torch.export`` picks with a symbolic set size. Which counts grow with the set is found by running
the model at two sizes first."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (
    FormSizes,
    _attention,
    cheapest_form,
    induced_attention,
    induced_is_cheaper,
    merge_heads,
    pooled_attention,
    split_heads,
)
from .scores import ScoreSpec, make_score
from .sets import masked_pool  # re-exported: it lived here before
from .validation import (
    check_finite,
    check_like,
    check_positive,
    check_probability,
    check_set,
    prepare_set,
    zero_padding,
)

__all__ = [
    "ISAB",
    "MAB",
    "PMA",
    "SAB",
    "InducedRows",
    "Norm",
    "OnlineSoftmax",
    "PooledQueries",
    "check_dot_product",
    "large_set_forms",
    "mab_tail",
    "masked_pool",
]

Norm = Literal["post", "pre"] | None
Residual = Literal["auto", "input", "projected"]


def _feed_forward(dim: int, ff_dim: int | None) -> nn.Sequential:
    if ff_dim is None:
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
    return nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Linear(ff_dim, dim))


class MAB(nn.Module):
    """Multihead attention block ``MAB(X, Y)``: the queries ``X`` attend to the set ``Y``.

    Args:
        dim_q: feature size of the queries.
        dim_kv: feature size of the keys/values (the set attended to).
        dim: width of the block and of its output.
        num_heads: number of heads; must divide ``dim``.
        norm, ff_dim, dropout, scale, residual, out_proj, score, top_k: see the module docstring.

    Shapes: ``q: (B, Nq, dim_q)`` (or ``(1, Nq, dim_q)``, shared by the batch), ``kv: (B, Nk, dim_kv)``,
    ``mask: (B, Nk)`` over ``kv`` -> ``(B, Nq, dim)``.

    Example:
        >>> mab = MAB(3, 5, 16, num_heads=4)
        >>> mab(torch.randn(2, 7, 3), torch.randn(2, 9, 5)).shape
        torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        dim_q: int,
        dim_kv: int,
        dim: int,
        num_heads: int,
        *,
        norm: Norm = "post",
        ff_dim: int | None = None,
        dropout: float = 0.0,
        scale: float | None = None,
        residual: Residual = "auto",
        out_proj: bool = True,
        score: ScoreSpec = "dot",
        top_k: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in [("dim_q", dim_q), ("dim_kv", dim_kv), ("dim", dim), ("num_heads", num_heads)]:
            check_positive(name, value)
        if ff_dim is not None:
            check_positive("ff_dim", ff_dim)
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        if norm not in ("post", "pre", None):
            raise ValueError(f"norm: expected 'post', 'pre' or None, got {norm!r}")
        if residual not in ("auto", "input", "projected"):
            raise ValueError(f"residual: expected 'auto', 'input' or 'projected', got {residual!r}")
        if residual == "input" and dim_q != dim:
            raise ValueError(f"residual='input' needs dim_q == dim, got dim_q={dim_q}, dim={dim}")
        check_probability("dropout", dropout)
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < float("inf")
        ):
            raise ValueError(f"scale: expected a positive number or None, got {scale!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected a positive integer or None, got {top_k!r}")
        self.dim_q, self.dim_kv, self.dim, self.num_heads = dim_q, dim_kv, dim, num_heads
        self.norm, self.scale, self.dropout = norm, scale, dropout
        self.residual = "input" if residual == "auto" and dim_q == dim else residual
        if self.residual == "auto":
            self.residual = "projected"
        self.score, self.top_k = make_score(score, num_heads, dim // num_heads), top_k
        self.to_q = nn.Linear(dim_q, dim)
        self.to_kv = nn.Linear(dim_kv, 2 * dim)  # keys and values in one product
        self.to_out: nn.Module = nn.Linear(dim, dim) if out_proj else nn.Identity()
        self.ff = _feed_forward(dim, ff_dim)
        self.drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if norm == "post":
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        elif norm == "pre":
            self.norm_q, self.norm_kv, self.norm_ff = (
                nn.LayerNorm(dim_q),
                nn.LayerNorm(dim_kv),
                nn.LayerNorm(dim),
            )

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        """``q: (B, Nq, dim_q)``, ``kv: (B, Nk, dim_kv)``, ``mask: (B, Nk)`` -> ``(B, Nq, dim)``."""
        check_set(q, self.dim_q, "q")
        kv, mask = prepare_set(kv, mask, self.dim_kv, self.to_q.weight, name="kv")
        if q.shape[0] not in (1, kv.shape[0]):
            raise ValueError(f"q: batch size {q.shape[0]} does not match kv's {kv.shape[0]}")
        check_finite(check_like(q, self.to_q.weight, "q"), "q")
        return self.attend(q, kv, mask)

    def project(self, q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected queries, keys and values, each ``(B, N, dim)``."""
        if self.norm == "pre":
            q, kv = self.norm_q(q), self.norm_kv(kv)
        k, v = self.to_kv(kv).chunk(2, dim=-1)
        return self.to_q(q), k, v

    def _path(self, nq: int, nk: int) -> str:
        """The cheapest exact form for ``nq`` queries and ``nk`` keys (:func:`~.attention.cheapest_form`);
        other scores and ``top_k`` always use ``"standard"``."""
        if self.score is not None or self.top_k is not None:
            return "standard"
        return cheapest_form(nq, nk, self._sizes())

    def few_keys(self, nk: int) -> bool:
        """Whether ``nk`` keys are few enough for the ``"induced"`` form
        (:func:`~.attention.induced_is_cheaper`)."""
        return induced_is_cheaper(nk, self._sizes())

    def _sizes(self) -> FormSizes:
        out_proj = isinstance(self.to_out, nn.Linear)
        return FormSizes(
            self.dim, self.num_heads, self.dim_q, self.dim_kv, self.residual == "projected", out_proj
        )

    def attend(
        self,
        q: Tensor,
        kv: Tensor,
        mask: Tensor | None,
        projected: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The block without input checks; ``kv`` must already be zero at padded rows.

        ``projected`` lets a caller that already computed ``(q', k, v)`` (in one fused product,
        say) skip the projections; otherwise the cheapest exact form of the attention is used.
        """
        h, p = self.num_heads, self.dropout if self.training else 0.0
        path = "standard" if projected is not None else self._path(q.shape[1], kv.shape[1])
        qn, kvn = (self.norm_q(q), self.norm_kv(kv)) if self.norm == "pre" else (q, kv)
        qp: Tensor | None = None
        if path == "pooled":
            qp = self.to_q(qn)
            w_k, w_v = self.to_kv.weight.chunk(2)
            o = pooled_attention(
                qp, kvn, w_k, w_v, self.to_kv.bias[self.dim :], h, mask, scale=self.scale, dropout_p=p
            )
            o = self.to_out(o)
        elif path == "induced":
            if qn.shape[0] != kvn.shape[0]:  # queries shared by the batch
                qn = qn.expand(kvn.shape[0], -1, -1)
            k, v = self.to_kv(kvn).chunk(2, dim=-1)
            out = self.to_out
            assert isinstance(out, nn.Linear)
            o = induced_attention(
                qn,
                k,
                v,
                self.to_q.weight,
                self.to_q.bias,
                out.weight,
                out.bias,
                h,
                mask,
                scale=self.scale,
                dropout_p=p,
            )
            if self.residual == "projected":
                qp = self.to_q(qn)
        else:
            qp, k, v = projected if projected is not None else self.project(q, kv)
            o = _attention(
                split_heads(qp, h),
                split_heads(k, h),
                split_heads(v, h),
                mask,
                scale=self.scale,
                dropout_p=p,
                score=self.score,
                top_k=self.top_k,
            )
            o = self.to_out(merge_heads(o))
        x = (q if self.residual == "input" or qp is None else qp) + self.drop(o)
        if self.norm == "post":
            x = self.norm1(x)
            return self.norm2(x + self.drop(self.ff(x)))
        if self.norm == "pre":
            return x + self.drop(self.ff(self.norm_ff(x)))
        return x + self.drop(self.ff(x))

    def extra_repr(self) -> str:
        top_k = "" if self.top_k is None else f", top_k={self.top_k}"
        return f"heads={self.num_heads}, norm={self.norm}, residual={self.residual}{top_k}"


def _fused_linear(x: Tensor, q: nn.Linear, kv: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of a self-attention from one matrix product ``x [W_q; W_kv]^T``."""
    out = F.linear(x, torch.cat([q.weight, kv.weight]), torch.cat([q.bias, kv.bias]))
    d = q.out_features
    return out[..., :d], out[..., d : 2 * d], out[..., 2 * d :]


class SAB(nn.Module):
    """Set attention block ``SAB(X) = MAB(X, X)``: permutation equivariant, cost quadratic in N.

    Shapes: ``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``. Keyword options as in :class:`MAB`.

    Example:
        >>> SAB(3, 16, num_heads=4)(torch.randn(2, 10, 3)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(self, dim_in: int, dim: int, num_heads: int, **options: object) -> None:
        super().__init__()
        self.dim_in = dim_in
        self.mab = MAB(dim_in, dim_in, dim, num_heads, **options)  # type: ignore[arg-type]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``, zero at padded positions."""
        x, mask = prepare_set(x, mask, self.dim_in, self.mab.to_q.weight)
        return self.encode(x, mask)

    def encode(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`forward` without input checks; ``x`` must be zero at padded rows."""
        mab = self.mab
        projected = None
        if mab.norm != "pre":  # queries, keys and values from one product
            q, k, v = _fused_linear(x, mab.to_q, mab.to_kv)
            projected = (q, k, v)
        return zero_padding(mab.attend(x, x, mask, projected), mask)


#: Rows (over the whole batch) per block of an ISAB's ``mab1`` when autograd is off.
ROW_BLOCK = 2048


class ISAB(nn.Module):
    """Induced set attention block: ``ISAB_m(X) = MAB(X, H)``, ``H = MAB(I, X)``.

    ``m = num_inducing`` learned inducing points ``I`` summarise the set, so time and memory are
    linear in N (``O(N m)`` instead of ``O(N^2)``).

    Shapes: ``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``. Keyword options as in :class:`MAB`.

    Example:
        >>> ISAB(3, 16, num_heads=4, num_inducing=8)(torch.randn(2, 1000, 3)).shape
        torch.Size([2, 1000, 16])
    """

    def __init__(self, dim_in: int, dim: int, num_heads: int, num_inducing: int, **options: object) -> None:
        super().__init__()
        check_positive("num_inducing", num_inducing)
        self.dim_in = dim_in
        self.inducing = nn.Parameter(torch.empty(num_inducing, dim))
        self.mab0 = MAB(dim, dim_in, dim, num_heads, **options)  # type: ignore[arg-type]
        self.mab1 = MAB(dim_in, dim, dim, num_heads, **options)  # type: ignore[arg-type]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.inducing)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``, zero at padded positions.

        ``chunk_size``: read ``x`` (then any sliceable array-like) ``chunk_size`` elements at a time,
        so that no activation larger than one chunk exists
        (see :func:`settransformer.nn.streaming.isab_chunked`).
        """
        if chunk_size is not None and not (isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 0):
            check_positive("chunk_size", chunk_size)
            from .streaming import isab_chunked  # chunked builds on this module

            return isab_chunked(self, x, mask, chunk_size=chunk_size)
        x, mask = prepare_set(x, mask, self.dim_in, self.inducing)
        return self.encode(x, mask)

    def induce(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``H = MAB(I, X)``: ``(B, num_inducing, dim)``; ``x`` zero at padded rows."""
        return self.mab0.attend(self.inducing[None], x, mask)

    def encode(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`forward` without input checks; ``x`` must be zero at padded rows.

        Without autograd, ``mab1`` runs over blocks of about :data:`ROW_BLOCK` rows: each element
        attends only to ``H``, so the result is the same, and a block's intermediates stay in the
        CPU cache instead of streaming ``(B, N, dim)`` tensors through memory (about 2x faster at
        N = 100k). The blocks go through :class:`~settransformer.nn.blocks.InducedRows`, which
        folds ``H`` into the projections once and reuses its buffers from block to block. With
        autograd the whole set goes through at once (backward needs every row).
        """
        h = self.induce(x, mask)
        b, n = x.shape[:2]
        block = max(1, ROW_BLOCK // max(b, 1))
        # tracers and compilers see one graph: no Python loop over a size that varies between calls
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if tracing or torch.is_grad_enabled() or n <= block:
            return zero_padding(self.mab1.attend(x, h, None), mask)

        rows = InducedRows(self.mab1, h)
        first = rows(x[:, :block])
        out = first.new_empty(b, n, first.shape[-1])
        out[:, :block] = first
        for start in range(block, n, block):
            out[:, start : start + block] = rows(x[:, start : start + block])
        return zero_padding(out, mask)


class PMA(nn.Module):
    """Pooling by multihead attention: ``PMA_k(Z) = MAB(S, Z)`` with ``k = num_seeds`` learned seeds.

    Permutation invariant. The paper's optional rFF on ``Z`` before pooling is omitted, as in all
    of the paper's experiments.

    Shapes: ``z: (B, N, dim)``, ``mask: (B, N)`` -> ``(B, num_seeds, dim)``. An empty set pools to
    the seeds passed through the block with a zero attention output (finite).

    Example:
        >>> PMA(16, num_heads=4, num_seeds=2)(torch.randn(3, 10, 16)).shape
        torch.Size([3, 2, 16])
    """

    def __init__(self, dim: int, num_heads: int, num_seeds: int, **options: object) -> None:
        super().__init__()
        check_positive("num_seeds", num_seeds)
        self.dim = dim
        self.seeds = nn.Parameter(torch.empty(num_seeds, dim))
        self.mab = MAB(dim, dim, dim, num_heads, **options)  # type: ignore[arg-type]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.seeds)

    def forward(self, z: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``z: (B, N, dim)``, ``mask: (B, N)`` -> ``(B, num_seeds, dim)``.

        ``chunk_size``: accumulate the attention over ``chunk_size`` elements at a time with an online
        softmax (see :func:`settransformer.nn.streaming.pma_chunked`); ``z`` may be any sliceable array-like.
        """
        if chunk_size is not None and not (isinstance(z, Tensor) and z.dim() == 3 and z.shape[1] == 0):
            check_positive("chunk_size", chunk_size)
            from .streaming import pma_chunked  # chunked builds on this module

            return pma_chunked(self, z, mask, chunk_size=chunk_size)
        z, mask = prepare_set(z, mask, self.dim, self.seeds, name="z")
        return self.pool(z, mask)

    def pool(self, z: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`forward` without input checks; ``z`` must be zero at padded rows."""
        return self.mab.attend(self.seeds[None], z, mask)


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
            return _layer_norm(mab.norm2, _feed_forward_into(mab.ff, y, ws).add_(y), out, ws)
        if mab.norm == "pre":
            return torch.add(_feed_forward_into(mab.ff, mab.norm_ff(y), ws), y, out=out)
        return torch.add(_feed_forward_into(mab.ff, y, ws), y, out=out)


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


def _feed_forward_into(ff: nn.Module, x: Tensor, ws: _Workspace) -> Tensor:
    """``ff(x)`` for the blocks' ``Linear, ReLU[, Linear]`` into workspace buffers, ReLU in place."""
    if not isinstance(ff, nn.Sequential) or not all(isinstance(m, nn.Linear | nn.ReLU) for m in ff):
        return ff(x)
    for i, layer in enumerate(ff):
        if isinstance(layer, nn.Linear):
            x = _linear(layer, x, ws.get(f"ff{i}", *x.shape[:-1], layer.out_features))
        else:
            x = x.relu_()
    return x


Batch = tuple[Tensor, Tensor]


@contextlib.contextmanager
def large_set_forms(
    model: nn.Module, example: Batch, probe: Batch, call: Callable[[Batch], object]
) -> Iterator[None]:
    """Within the context, every :class:`MAB` of ``model`` uses its large-set form.

    Args:
        model: the model to be traced.
        example, probe: ``(x, mask)`` batches of two different set sizes.
        call: runs ``model`` on a batch (in evaluation mode, without gradients).

    The blocks are called in the same order on every forward pass, so the ``k``-th call of a block
    replays the form computed from its ``k``-th call at the two sizes: a count that differs between
    them grows with N and is passed to ``MAB._path`` as infinite.
    """
    mabs = [m for m in model.modules() if isinstance(m, MAB)]
    first = _attention_sizes(mabs, example, call)
    second = _attention_sizes(mabs, probe, call)
    try:
        for m in mabs:
            a, b = first[id(m)], second[id(m)]
            paths = ["standard"]  # the form whose graph holds for every size, when in doubt
            if len(a) == len(b) and a:
                paths = [
                    m._path(math.inf if q1 != q2 else q1, math.inf if k1 != k2 else k1)  # type: ignore[arg-type]
                    for (q1, k1), (q2, k2) in zip(a, b)
                ]
            m.__dict__["_path"] = _replay(paths)  # shadows the method
        yield
    finally:
        for m in mabs:
            m.__dict__.pop("_path", None)


def _replay(paths: list[str]) -> Callable[[object, object], str]:
    """A stand-in for ``MAB._path`` whose ``k``-th call returns ``paths[k % len(paths)]``."""
    count = itertools.count()

    def path(nq: object, nk: object) -> str:
        return paths[next(count) % len(paths)]

    return path


def _attention_sizes(
    mabs: list[MAB], batch: Batch, call: Callable[[Batch], object]
) -> dict[int, list[tuple[int, int]]]:
    """The ``(queries, keys)`` counts of every call of each block of ``mabs`` (by ``id``) on ``batch``."""
    calls: dict[int, list[tuple[int, int]]] = {id(m): [] for m in mabs}
    for m in mabs:

        def record(nq: int, nk: int, _m: MAB = m) -> str:
            calls[id(_m)].append((nq, nk))
            return MAB._path(_m, nq, nk)

        m.__dict__["_path"] = record
    try:
        call(batch)
    finally:
        for m in mabs:
            m.__dict__.pop("_path", None)
    return calls
