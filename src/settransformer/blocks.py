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
  ``"gaussian"``, or your own ``nn.Module``/callable ``(q, k) -> logits``; see :mod:`settransformer.scores`.
- ``top_k``: hard attention: each query keeps only its ``top_k`` highest-scoring keys (``None``: all).
"""

from __future__ import annotations

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

__all__ = ["ISAB", "MAB", "PMA", "SAB", "Norm", "masked_pool"]

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
        so that no activation larger than one chunk exists (see :func:`settransformer.chunked.isab_chunked`).
        """
        if chunk_size is not None and not (isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 0):
            check_positive("chunk_size", chunk_size)
            from .chunked import isab_chunked  # chunked builds on this module

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
        N = 100k). The blocks go through :class:`~settransformer.induced_rows.InducedRows`, which
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
        from .induced_rows import InducedRows  # induced_rows builds on this module

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
        softmax (see :func:`settransformer.chunked.pma_chunked`); ``z`` may be any sliceable array-like.
        """
        if chunk_size is not None and not (isinstance(z, Tensor) and z.dim() == 3 and z.shape[1] == 0):
            check_positive("chunk_size", chunk_size)
            from .chunked import pma_chunked  # chunked builds on this module

            return pma_chunked(self, z, mask, chunk_size=chunk_size)
        z, mask = prepare_set(z, mask, self.dim, self.seeds, name="z")
        return self.pool(z, mask)

    def pool(self, z: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`forward` without input checks; ``z`` must be zero at padded rows."""
        return self.mab.attend(self.seeds[None], z, mask)
