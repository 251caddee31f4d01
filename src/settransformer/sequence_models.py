"""Order-aware baselines: recurrent networks and a Transformer with positional encoding.

Set models must not care about the order of a set's elements; these models read a set as a
sequence, so their output changes with the order (measure it with
:func:`settransformer.invariance.permutation_sensitivity`). They are the rows that show what
permutation invariance buys.

- :class:`JANET` and :class:`IndRNN` (in :mod:`settransformer.recurrent`, importable from here too):
  drop-ins for ``torch.nn.LSTM``. The LSTM row uses ``torch.nn.LSTM`` itself.
- :class:`PositionalTransformer`: ``nn.TransformerEncoder`` over sinusoidal positional encodings
  (:class:`SinusoidalPositionalEncoding`).
- :class:`SequenceSetModel`: any of them shaped as a set model, ``(B, N, D), mask -> (B, num_outputs,
  dim_output)``, reading each set's real elements in their given order.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .recurrent import JANET, IndRNN
from .validation import check_mask, check_set

__all__ = [
    "JANET",
    "IndRNN",
    "PositionalTransformer",
    "SequenceKind",
    "SequenceSetModel",
    "SinusoidalPositionalEncoding",
    "compact",
]

SequenceKind = Literal["lstm", "janet", "indrnn", "transformer"]
SEQUENCE_KINDS = ("lstm", "janet", "indrnn", "transformer")


class SinusoidalPositionalEncoding(nn.Module):
    """Add ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(pos / 10000^(2i/d))``.

    Shapes: ``x: (B, T, d)`` -> ``(B, T, d)``; computed on the fly (any length, ``x``'s device and dtype).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @staticmethod
    def table(
        length: int, dim: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """The encodings ``(length, dim)``."""
        pos = torch.arange(length, device=device, dtype=torch.float64)[:, None]
        freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
        pe = torch.zeros(length, dim, device=device, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
        return pe.to(dtype or torch.get_default_dtype())

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, T, dim)`` -> ``x + PE[:T]``."""
        return x + self.table(x.shape[1], self.dim, x.device, x.dtype)


class PositionalTransformer(nn.Module):
    """``nn.TransformerEncoder`` (batch first) over inputs plus sinusoidal positional encodings.

    Args:
        d_model, nhead, num_layers, dim_feedforward, dropout: as ``torch.nn.TransformerEncoderLayer``.

    Shapes: ``x: (B, T, d_model)``, ``mask: (B, T)`` bool (True = real step; each row needs one)
    -> ``(B, T, d_model)``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pos = SinusoidalPositionalEncoding(d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, T, d_model)``, ``mask: (B, T)`` -> ``(B, T, d_model)``."""
        return self.encoder(self.pos(x), src_key_padding_mask=None if mask is None else ~mask)


def compact(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Move each set's real elements to the front, keeping their order.

    ``x: (B, N, D)``, ``mask: (B, N)`` -> ``(x', lengths)``: ``x'[b, :lengths[b]]`` are the real
    elements of set ``b`` in the order they appear in ``x``.
    """
    b, n = x.shape[:2]
    if mask is None:
        return x, torch.full((b,), n, device=x.device, dtype=torch.long)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return torch.gather(x, 1, order[..., None].expand_as(x)), mask.sum(1)


class SequenceSetModel(nn.Module):
    """An order-aware baseline shaped as a set model: reads each set as a sequence.

    The real elements of each set are read in their given order (padding anywhere is skipped):
    a recurrent network's state after the last real element (``"lstm"`` = ``torch.nn.LSTM``,
    ``"janet"``, ``"indrnn"``; both directions' when bidirectional), or the mean of a
    :class:`PositionalTransformer`'s outputs over the real elements (``"transformer"``), then an
    MLP head. An empty set reads as the zero vector.

    Args:
        dim_input, num_outputs, dim_output: as :class:`settransformer.SetTransformer`.
        kind: ``"lstm"``, ``"janet"``, ``"indrnn"`` or ``"transformer"``.
        dim_hidden: recurrent state size / transformer width, and the head's hidden width.
        num_layers: recurrent or transformer layers.
        num_heads: transformer heads.
        dropout: between recurrent layers / inside the transformer.
        bidirectional: recurrent kinds only.

    Shapes: ``x: (B, N, dim_input)``, ``mask: (B, N)`` -> ``(B, num_outputs, dim_output)``.

    Example:
        >>> model = SequenceSetModel(1, 1, 1, kind="janet", dim_hidden=32)
        >>> model(torch.rand(8, 10, 1), torch.rand(8, 10) > 0.3).shape
        torch.Size([8, 1, 1])
    """

    def __init__(
        self,
        dim_input: int,
        num_outputs: int,
        dim_output: int,
        *,
        kind: SequenceKind = "lstm",
        dim_hidden: int = 64,
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        if kind not in SEQUENCE_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(SEQUENCE_KINDS)}, got {kind!r}")
        if kind == "transformer" and bidirectional:
            raise ValueError("bidirectional: only for the recurrent kinds")
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.dim_input, self.num_outputs, self.dim_output, self.kind = (
            dim_input,
            num_outputs,
            dim_output,
            kind,
        )
        self.embed: nn.Module = nn.Identity()
        self.seq: nn.Module
        self.directions = 2 if bidirectional else 1
        if kind == "transformer":
            self.embed = nn.Linear(dim_input, dim_hidden)
            self.seq = PositionalTransformer(dim_hidden, num_heads, num_layers, 2 * dim_hidden, dropout)
            width = dim_hidden
        else:
            cls = {"lstm": nn.LSTM, "janet": JANET, "indrnn": IndRNN}[kind]
            self.seq = cls(
                dim_input,
                dim_hidden,
                num_layers,
                batch_first=True,
                dropout=dropout,
                bidirectional=bidirectional,
            )
            width = dim_hidden * self.directions
        self.head = nn.Sequential(
            nn.Linear(width, dim_hidden), nn.ReLU(), nn.Linear(dim_hidden, num_outputs * dim_output)
        )

    def readout(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The sequence summary ``(B, width)`` of ``x: (B, N, dim_input)`` (no input checks)."""
        xs, lengths = compact(x, mask)
        empty = lengths == 0
        if self.kind == "transformer":
            valid = torch.arange(xs.shape[1], device=x.device)[None, :] < lengths[:, None]
            valid[:, 0] |= empty  # an empty set attends to (zero) padding, then reads as zero
            z = self.seq(self.embed(xs), valid).masked_fill(~valid[..., None], 0.0)
            r = z.sum(1) / valid.sum(1, keepdim=True)
        else:
            packed = pack_padded_sequence(
                xs, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False
            )
            _, (h, _) = self.seq(packed)  # h: (num_layers * directions, B, H)
            last = h.view(-1, self.directions, *h.shape[1:])[-1]  # the last layer's
            r = last.transpose(0, 1).reshape(x.shape[0], -1)
        return r.masked_fill(empty[:, None], 0.0)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, dim_input)``, ``mask: (B, N)`` -> ``(B, num_outputs, dim_output)``."""
        check_set(x, self.dim_input)
        mask = check_mask(mask, x)
        return self.head(self.readout(x, mask)).view(x.shape[0], self.num_outputs, self.dim_output)
