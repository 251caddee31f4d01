"""The Set Transformer's set blocks: SAB, ISAB and PMA (Lee et al., 2019, section 3), built on the
multihead attention block [`MAB`][settransformer.nn.mab.MAB].

Every block takes sets as ``(B, N, D)`` tensors with an optional boolean ``mask: (B, N)`` (True =
real element). Outputs at padded positions are exactly zero, and padded inputs (whatever their
values, NaN included) have no influence on any output and receive zero gradient. Their options
([`BlockOptions`][settransformer.nn.mab.BlockOptions], or the same names as keywords) are the MAB's.

Each block's ``forward`` checks its input ([`settransformer.nn.validation`][settransformer.nn.validation]);
its ``forward_unchecked`` is the same computation on input already checked and zero at padded rows,
which is what blocks call on each other. ISAB and PMA also take ``chunk_size``: the set is then read
a chunk at a time ([`settransformer.nn.streaming`][settransformer.nn.streaming]).
"""

from __future__ import annotations

from typing import Unpack, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mab import MAB, BlockKeywords, BlockOptions
from .rows import InducedRows, PooledQueries, check_dot_product
from .streaming import Pipeline, isab_chunked, pma_chunked
from .validation import block_output, check_positive, func_transformed, prepare_set, tracing, zero_padding
from .workspace import kept_buffers_free

__all__ = ["ISAB", "PMA", "SAB"]


def _fused_linear(x: Tensor, q: nn.Linear, kv: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of a self-attention from one matrix product ``x [W_q; W_kv]^T``."""
    out = F.linear(x, torch.cat([q.weight, kv.weight]), torch.cat([q.bias, kv.bias]))
    d = q.out_features
    # split, not three slices: its backward is one cat, where each slice's zero-fills a full-size grad
    q_, k_, v_ = out.split([d, d, kv.out_features - d], dim=-1)
    return q_, k_, v_


def _chunked_input(x: object, chunk_size: int | None) -> bool:
    """Whether a block's ``forward`` takes the chunked path: ``chunk_size`` given and something to
    chunk (a tensor with ``N = 0`` takes the ordinary path)."""
    if chunk_size is None:
        return False
    check_positive("chunk_size", chunk_size)
    return not (isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 0)


class SAB(nn.Module):
    """Set attention block ``SAB(X) = MAB(X, X)``: permutation equivariant, cost quadratic in N.

    Shapes: ``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``. Options as in
    [`MAB`][settransformer.nn.mab.MAB].

    Examples:
        >>> import torch
        >>> SAB(3, 16, num_heads=4)(torch.randn(2, 10, 3)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        num_heads: int,
        *,
        options: BlockOptions | None = None,
        **keywords: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        self.dim_in = check_positive("dim_in", dim_in)  # named as the caller knows it, not as MAB's dim_q
        self.mab = MAB(dim_in, dim_in, dim, num_heads, options=BlockOptions.of(options, keywords))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``, zero at padded positions."""
        x, mask = prepare_set(x, mask, self.dim_in, self.mab.to_q.weight)
        return block_output(self.forward_unchecked(x, mask))

    def forward_unchecked(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """[`forward`][settransformer.nn.blocks.SAB.forward] without input checks; ``x`` must be zero at
        padded rows."""
        mab = self.mab
        projected = None
        if mab.norm != "pre":  # queries, keys and values from one product
            projected = _fused_linear(x, mab.to_q, mab.to_kv)
        return zero_padding(mab.forward_unchecked(x, x, mask, projected), mask)


ROW_BLOCK = 2048
"""Rows (over the whole batch) per block of an ISAB's ``mab1`` when autograd is off."""
MIN_BLOCK_ROWS = 512
"""Fewest rows per set in such a block: with more sets than ``ROW_BLOCK / MIN_BLOCK_ROWS`` the
blocks hold whole sets instead."""
MIN_SET_BLOCK_ELEMENTS = 2**20
"""Fewest elements ``B * N * dim`` of a batch for blocks: below it (4 MiB in float32) the batch's
tensors stay in cache anyway, and it goes through ``mab1`` in one call."""
KEPT_BUFFER_ELEMENTS = 2**20
"""Most elements ``rows * max(dim, ff_dim)`` of one call of an ISAB's ``mab1`` without autograd for
which the block keeps its buffers from call to call ([`InducedRows`][settransformer.nn.rows.InducedRows]
``keep_buffers``): a few buffers of at most 4 MiB each in float32 per thread, shared by the ISABs on it.
Fresh buffers each call cost page faults (``benchmarks/kept_buffers.py``); a larger call gets them fresh
and frees them."""


class ISAB(nn.Module):
    """Induced set attention block: ``ISAB_m(X) = MAB(X, H)``, ``H = MAB(I, X)``.

    ``m = num_inducing`` learned inducing points ``I`` summarise the set, so time and memory are
    linear in N (``O(N m)`` instead of ``O(N^2)``). ``mab0`` computes ``H``, ``mab1`` the output.

    Shapes: ``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``. Options as in
    [`MAB`][settransformer.nn.mab.MAB].

    Examples:
        >>> import torch
        >>> ISAB(3, 16, num_heads=4, num_inducing=8)(torch.randn(2, 1000, 3)).shape
        torch.Size([2, 1000, 16])
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        num_heads: int,
        num_inducing: int,
        *,
        options: BlockOptions | None = None,
        **keywords: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        check_positive("num_inducing", num_inducing)
        o = BlockOptions.of(options, keywords)
        self.dim_in = check_positive("dim_in", dim_in)  # named as the caller knows it, not as MAB's dim_kv
        self.inducing = nn.Parameter(torch.empty(num_inducing, dim))
        self.mab0 = MAB(dim, dim_in, dim, num_heads, options=o)
        self.mab1 = MAB(dim_in, dim, dim, num_heads, options=o)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.inducing)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``, zero at padded positions.

        ``chunk_size``: read ``x`` (then any sliceable array-like) ``chunk_size`` elements at a time,
        so that no activation larger than one chunk exists
        (see [`settransformer.nn.streaming.isab_chunked`][settransformer.nn.streaming.isab_chunked]).
        """
        if _chunked_input(x, chunk_size):
            return cast(Tensor, isab_chunked(self, x, mask, chunk_size=cast(int, chunk_size)))
        x, mask = prepare_set(x, mask, self.dim_in, self.inducing)
        return block_output(self.forward_unchecked(x, mask))

    def induce(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``H = MAB(I, X)``: ``(B, num_inducing, dim)``; ``x`` zero at padded rows."""
        return self.mab0.forward_unchecked(self.inducing[None], x, mask)

    def forward_unchecked(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """[`forward`][settransformer.nn.blocks.ISAB.forward] without input checks; ``x`` must be zero at
        padded rows.

        Without autograd, ``mab1`` runs through [`InducedRows`][settransformer.nn.rows.InducedRows], which
        prepares ``H`` once: over blocks of about [`ROW_BLOCK`][settransformer.nn.blocks.ROW_BLOCK] rows (each
        element attends only to ``H``, so the result is the same, and a block's intermediates stay in the CPU
        cache instead of streaming ``(B, N, dim)`` tensors through memory: about 2x faster at N = 100k, and a
        fraction of the memory). A batch whose sets would get fewer than
        [`MIN_BLOCK_ROWS`][settransformer.nn.blocks.MIN_BLOCK_ROWS] rows each goes through whole sets at a
        time instead (a row block of many sets would be a strided slice, copied in and out), and a batch
        smaller than [`MIN_SET_BLOCK_ELEMENTS`][settransformer.nn.blocks.MIN_SET_BLOCK_ELEMENTS] in one call.
        Calls of at most [`KEPT_BUFFER_ELEMENTS`][settransformer.nn.blocks.KEPT_BUFFER_ELEMENTS] keep their
        buffers for the next forward (shared by the ISABs of this thread; a handful, each step writing over
        one whose content is not read again). A block's last step writes into the block's output, which also
        holds the attention scores before it where they fit, in place of one more buffer.
        With autograd (and off the CPU) the whole batch goes through the standard path at once:
        backward needs every row.
        """
        h = self.induce(x, mask)
        b, n = x.shape[:2]
        # tracers and compilers see one graph: no Python loop over a size that varies between calls
        if tracing() or torch.is_grad_enabled() or x.device.type != "cpu" or func_transformed(x):
            return zero_padding(self.mab1.forward_unchecked(x, h, None), mask)
        block = max(1, ROW_BLOCK // max(b, 1))  # rows per set in a row block
        per = max(1, ROW_BLOCK // max(n, 1))  # sets per block when blocks hold whole sets
        by_set = block < MIN_BLOCK_ROWS
        if b * n * self.mab1.dim < MIN_SET_BLOCK_ELEMENTS:
            by_set, per = True, max(b, 1)  # one call over the whole batch
        rows = per * n if by_set else b * block
        keep = rows * max(self.mab1.dim, self.mab1.options.ff_dim or 0) <= KEPT_BUFFER_ELEMENTS
        form = self.mab1.choose_form(n, h.shape[1], x.device.type)
        with kept_buffers_free(keep) as keep:
            induced = InducedRows(self.mab1, h, form=form, keep_buffers=keep)
            if not induced.fast:
                return zero_padding(self.mab1.forward_unchecked(x, h, None, form=form), mask)
            out = x.new_empty(b, n, self.mab1.dim)
            step = per if by_set else block
            for i in range(0, b if by_set else n, step):
                if by_set:
                    induced(x[i : i + step], slice(i, i + step), out=out[i : i + step])
                else:
                    induced(x[:, i : i + step], out=out[:, i : i + step])
        return zero_padding(out, mask)

    def pipeline(self) -> Pipeline:
        """The block as chunked evaluation sees it ([`Chunkable`][settransformer.nn.streaming.Chunkable])."""
        return Pipeline(self.dim_in, self.mab1.dim, self.inducing, stages=[self])

    def summary_queries(self, name: str) -> PooledQueries:
        """The inducing points prepared to attend over chunks of the set (``H``, chunk by chunk)."""
        check_dot_product(self.mab0, f"{name}.mab0")
        return PooledQueries(self.mab0, self.inducing[None])

    def rows_given(self, summary: Tensor) -> InducedRows:
        """The block's output row by row, given its induced set ``H = summary: (B, m, dim)``."""
        return InducedRows(self.mab1, summary)


class PMA(nn.Module):
    """Pooling by multihead attention: ``PMA_k(Z) = MAB(S, Z)`` with ``k = num_seeds`` learned seeds.

    Permutation invariant. The paper's optional rFF on ``Z`` before pooling is omitted, as in all
    of the paper's experiments.

    Shapes: ``z: (B, N, dim)``, ``mask: (B, N)`` -> ``(B, num_seeds, dim)``. An empty set pools to
    the seeds passed through the block with a zero attention output (finite).

    Examples:
        >>> import torch
        >>> PMA(16, num_heads=4, num_seeds=2)(torch.randn(3, 10, 16)).shape
        torch.Size([3, 2, 16])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_seeds: int,
        *,
        options: BlockOptions | None = None,
        **keywords: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        check_positive("num_seeds", num_seeds)
        self.dim = dim
        self.seeds = nn.Parameter(torch.empty(num_seeds, dim))
        self.mab = MAB(dim, dim, dim, num_heads, options=BlockOptions.of(options, keywords))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.seeds)

    def forward(self, z: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``z: (B, N, dim)``, ``mask: (B, N)`` -> ``(B, num_seeds, dim)``.

        ``chunk_size``: accumulate the attention over ``chunk_size`` elements at a time with an online
        softmax (see [`settransformer.nn.streaming.pma_chunked`][settransformer.nn.streaming.pma_chunked]);
        ``z`` may be any sliceable array-like.
        """
        if _chunked_input(z, chunk_size):
            return pma_chunked(self, z, mask, chunk_size=cast(int, chunk_size))
        z, mask = prepare_set(z, mask, self.dim, self.seeds, name="z")
        return block_output(self.forward_unchecked(z, mask))

    def forward_unchecked(self, z: Tensor, mask: Tensor | None) -> Tensor:
        """[`forward`][settransformer.nn.blocks.PMA.forward] without input checks; ``z`` must be zero at
        padded rows."""
        return self.mab.forward_unchecked(self.seeds[None], z, mask)

    def pipeline(self) -> Pipeline:
        """The block as chunked evaluation sees it ([`Chunkable`][settransformer.nn.streaming.Chunkable])."""
        return Pipeline(self.dim, self.dim, self.seeds, pooling=self)

    def summary_queries(self, name: str) -> PooledQueries:
        """The seeds prepared to attend over chunks of the set."""
        check_dot_product(self.mab, f"{name}.mab")
        return PooledQueries(self.mab, self.seeds[None])
