"""Set Transformer aggregation for graph libraries: pool the rows of ``x`` that share an ``index``.

[`SetAggregation`][settransformer.large.aggregation.SetAggregation] takes the arguments of PyTorch Geometric's
``torch_geometric.nn.aggr.SetTransformerAggregation`` and is called the same way,
``aggr(x, index, dim_size=...)`` with ``x: (total, channels)`` (node features) and ``index: (total,)``
(the graph, or target node, of every row; sorted or not). Each group of rows is one set; the
groups are evaluated by the ragged path
([`settransformer.large.ragged.ragged_forward`][settransformer.large.ragged.ragged_forward]: sets of similar
size are padded together, never to the largest), so the result equals the padded model on every group.

Argument names, PyG -> ours (the wrapped [`SetTransformer`][settransformer.SetTransformer]):
``channels`` -> ``dim_input = dim_hidden = dim_output``; ``num_seed_points`` -> ``num_outputs``;
``num_encoder_blocks`` -> ``num_encoder_layers`` (SABs, or ISABs with ``num_inducing``);
``num_decoder_blocks`` -> ``num_decoder_layers``; ``heads`` -> ``num_heads``; ``layer_norm`` ->
``norm="post"`` (else no normalisation); ``dropout`` -> ``dropout``; ``concat`` as PyG (seeds
concatenated, else averaged). ``ptr`` (CSR offsets) is our ``offsets``.

Examples:
    >>> aggr = SetAggregation(8, num_seed_points=2, heads=2).eval()
    >>> x, index = torch.randn(10, 8), torch.tensor([2, 0, 0, 2, 2, 0, 1, 1, 2, 0])
    >>> aggr(x, index).shape           # 3 groups, 2 seeds x 8 channels
    torch.Size([3, 16])
    >>> aggr(x, index, dim_size=5).shape  # groups 3 and 4 are empty
    torch.Size([5, 16])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.models import SetTransformer
from ..nn.validation import check_positive
from .ragged import batch_to_offsets, check_offsets, ragged_forward

__all__ = ["SetAggregation"]


class SetAggregation(nn.Module):
    """Pool the rows of ``x`` grouped by ``index`` with a Set Transformer (PyG's argument names).

    Args:
        channels: features per row, and per output seed.
        num_seed_points: PMA seeds (outputs per group).
        num_encoder_blocks: encoder blocks (SABs; ISABs when ``num_inducing`` is given).
        num_decoder_blocks: SABs over the seeds after pooling.
        heads: attention heads (must divide ``channels``).
        concat: concatenate the seeds' outputs ``(S, seeds * channels)``; else average them ``(S, channels)``.
        layer_norm: post-norm blocks (PyG's ``layer_norm=True``); else none.
        dropout: dropout inside the blocks.
        num_inducing: inducing points per encoder block (ISAB): linear in the group size.

    Attributes:
        model: the wrapped [`SetTransformer`][settransformer.SetTransformer] (``x: (B, N, channels)``,
            ``mask``).
    """

    def __init__(
        self,
        channels: int,
        num_seed_points: int = 1,
        num_encoder_blocks: int = 1,
        num_decoder_blocks: int = 1,
        heads: int = 1,
        concat: bool = True,
        layer_norm: bool = False,
        dropout: float = 0.0,
        num_inducing: int | None = None,
    ) -> None:
        super().__init__()
        # checked here under PyG's names; the model would name its own (dim_input, num_outputs, ...)
        for name, value in [("channels", channels), ("num_seed_points", num_seed_points), ("heads", heads)]:
            check_positive(name, value)
        check_positive("num_encoder_blocks", num_encoder_blocks, allow_zero=True)
        check_positive("num_decoder_blocks", num_decoder_blocks, allow_zero=True)
        if channels % heads != 0:
            raise ValueError(f"heads: must divide channels={channels}, got {heads}")
        self.channels, self.num_seed_points, self.concat = channels, num_seed_points, concat
        self.model = SetTransformer(
            channels,
            num_seed_points,
            channels,
            dim_hidden=channels,
            num_heads=heads,
            num_inducing=num_inducing,
            num_encoder_layers=num_encoder_blocks,
            num_decoder_layers=num_decoder_blocks,
            # no encoder blocks (as PyG allows): the rows go straight to the pooling
            encoder="attention" if num_encoder_blocks else "rff",
            norm="post" if layer_norm else None,
            dropout=dropout,
        )

    def forward(
        self,
        x: Tensor,
        index: Tensor | None = None,
        ptr: Tensor | None = None,
        dim_size: int | None = None,
        dim: int = -2,
    ) -> Tensor:
        """``x: (total, channels)``, ``index: (total,)`` group ids (any order) or ``ptr: (S + 1,)``
        offsets of rows already grouped; neither: every row in group 0. ``dim_size``: the number of
        groups ``S`` (default ``index.max() + 1``; larger adds empty groups). ``dim``: the rows'
        dimension, ``-2`` or ``0`` (``x`` is 2-D), as PyG's message passing passes it.

        Returns ``(S, num_seed_points * channels)`` (``concat``) or ``(S, channels)``.
        """
        if index is not None and ptr is not None:
            raise ValueError("index, ptr: pass at most one of them")
        if not isinstance(x, Tensor) or x.dim() != 2:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected node features of shape (total, {self.channels}), got {got}")
        if dim_size is not None:
            dim_size = check_positive("dim_size", dim_size, allow_zero=True)
        if dim not in (0, -2):
            raise ValueError(f"dim: expected the rows' dimension of x (total, channels), 0 or -2, got {dim}")
        if ptr is None:
            if index is None:  # PyG's convention: one group, then dim_size - 1 empty ones
                index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            expected = f"a 1-D integer tensor of group ids, one per row of x ({x.shape[0]},)"
            if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
                got = f"dtype {index.dtype}" if isinstance(index, Tensor) else type(index).__name__
                raise ValueError(f"index: expected {expected}, got {got}")
            if index.dim() != 1 or index.shape[0] != x.shape[0]:
                raise ValueError(f"index: expected {expected}, got shape {tuple(index.shape)}")
            if index.numel() and int(index.min()) < 0:
                raise ValueError(f"index: expected non-negative group ids, got {int(index.min())}")
            if dim_size is not None and index.numel() and int(index.max()) >= dim_size:
                raise ValueError(f"dim_size: {dim_size} groups, but index holds {int(index.max())}")
            order = index.argsort(stable=True)  # groups become contiguous, rows keep their order
            x, index = x[order], index[order]
            offsets = batch_to_offsets(index, dim_size)
        else:
            offsets = check_offsets(ptr, x.shape[0], name="ptr")
            if dim_size is not None and offsets.shape[0] - 1 != dim_size:
                raise ValueError(f"dim_size: {dim_size} groups, but ptr describes {offsets.shape[0] - 1}")
        if offsets.shape[0] == 1:  # no rows and no dim_size: no groups
            width = self.num_seed_points * self.channels if self.concat else self.channels
            return x.new_zeros(0, width)
        out = ragged_forward(self.model, x, offsets)  # (S, seeds, channels)
        return out.flatten(1) if self.concat else out.mean(1)
