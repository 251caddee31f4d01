"""Order-aware baselines: recurrent networks and a Transformer with positional encoding.

Set models must not care about the order of a set's elements; these models read a set as a
sequence, so their output changes with the order (measure it with
[`settransformer.tasks.metrics.permutation_sensitivity`][settransformer.tasks.metrics.permutation_sensitivity]).
They are the rows that show what permutation invariance buys.

- [`JANET`][settransformer.nn.sequence.JANET] and [`IndRNN`][settransformer.nn.sequence.IndRNN] (in
  [`settransformer.nn.sequence`][settransformer.nn.sequence], importable from here too): drop-ins for
  ``torch.nn.LSTM``. The LSTM row uses ``torch.nn.LSTM`` itself.
- [`PositionalTransformer`][settransformer.nn.sequence.PositionalTransformer]: ``nn.TransformerEncoder`` over
  sinusoidal positional encodings
  ([`SinusoidalPositionalEncoding`][settransformer.nn.sequence.SinusoidalPositionalEncoding]).
- [`SequenceSetModel`][settransformer.nn.sequence.SequenceSetModel]: any of them shaped as a set model,
  ``(B, N, D), mask -> (B, num_outputs, dim_output)``, reading each set's real elements in their given order.


Recurrent drop-ins for ``torch.nn.LSTM``: JANET and IndRNN (order-aware baselines).

- [`JANET`][settransformer.nn.sequence.JANET] (Van der Westhuizen & Lasenby, 2018, "The unreasonable
  effectiveness of the forget gate"): an LSTM with only a forget gate.
- [`IndRNN`][settransformer.nn.sequence.IndRNN] (Li et al., 2018): independently recurrent units, one
  recurrent weight each.

Both take ``torch.nn.LSTM``'s constructor and ``forward(input, hx=None) -> (output, (h_n, c_n))``,
packed sequences included, so
[`settransformer.nn.sequence.SequenceSetModel`][settransformer.nn.sequence.SequenceSetModel] can use either in
place of the LSTM."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .validation import prepare_set

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

    Examples:
        >>> SinusoidalPositionalEncoding(4)(torch.zeros(2, 3, 4)).shape
        torch.Size([2, 3, 4])
        >>> SinusoidalPositionalEncoding.table(2, 4)
        tensor([[0.0000, 1.0000, 0.0000, 1.0000],
                [0.8415, 0.5403, 0.0100, 0.9999]])
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
        d_model: as in ``torch.nn.TransformerEncoderLayer``.
        nhead: as in ``torch.nn.TransformerEncoderLayer``.
        num_layers: encoder layers.
        dim_feedforward: as in ``torch.nn.TransformerEncoderLayer``.
        dropout: as in ``torch.nn.TransformerEncoderLayer``.

    Shapes: ``x: (B, T, d_model)``, ``mask: (B, T)`` bool (True = real step; each row needs one)
    -> ``(B, T, d_model)``.

    Examples:
        >>> model = PositionalTransformer(8, nhead=2, num_layers=1, dim_feedforward=16).eval()
        >>> model(torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True, True, False, False, False]])).shape
        torch.Size([2, 5, 8])
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

    Examples:
        >>> x, mask = torch.tensor([[[1.0], [2.0], [3.0]]]), torch.tensor([[False, True, True]])
        >>> xc, lengths = compact(x, mask)
        >>> xc[0, :, 0], lengths
        (tensor([2., 3., 1.]), tensor([2]))
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
    [`PositionalTransformer`][settransformer.nn.sequence.PositionalTransformer]'s outputs over the real
    elements (``"transformer"``), then an MLP head. An empty set reads as the zero vector.

    Args:
        dim_input: as in [`settransformer.SetTransformer`][settransformer.SetTransformer].
        num_outputs: as in [`settransformer.SetTransformer`][settransformer.SetTransformer].
        dim_output: as in [`settransformer.SetTransformer`][settransformer.SetTransformer].
        kind: ``"lstm"``, ``"janet"``, ``"indrnn"`` or ``"transformer"``.
        dim_hidden: recurrent state size / transformer width, and the head's hidden width.
        num_layers: recurrent or transformer layers.
        num_heads: transformer heads.
        dropout: between recurrent layers / inside the transformer.
        bidirectional: recurrent kinds only.

    Shapes: ``x: (B, N, dim_input)``, ``mask: (B, N)`` -> ``(B, num_outputs, dim_output)``.

    Examples:
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
        self.width = width
        self.head = nn.Sequential(
            nn.Linear(width, dim_hidden), nn.ReLU(), nn.Linear(dim_hidden, num_outputs * dim_output)
        )

    def readout(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The sequence summary ``(B, width)`` of ``x: (B, N, dim_input)`` (no input checks; ``x`` zero
        at padded rows)."""
        if x.shape[0] == 0 or x.shape[1] == 0:  # no sets, or only empty ones: nothing to read
            return x.new_zeros(x.shape[0], self.width)
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
        x, mask = prepare_set(x, mask, self.dim_input, next(self.head.parameters()))
        return self.head(self.readout(x, mask)).view(x.shape[0], self.num_outputs, self.dim_output)


def _reverse(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sequence of ``x: (B, T, F)`` within its length (padding stays at the end)."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return torch.gather(x, 1, idx[..., None].expand_as(x))


class _Recurrent(nn.Module):
    """``torch.nn.LSTM``'s interface around a cell stepped in Python (inputs projected all at once).

    Subclasses set ``gates`` (input projections per unit) and define ``_hh_shape`` and ``_step``.
    """

    gates: int = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        if min(input_size, hidden_size, num_layers) < 1:
            raise ValueError(
                f"input_size, hidden_size, num_layers: expected positive integers, got "
                f"{input_size}, {hidden_size}, {num_layers}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            for direction in range(self.num_directions):
                sfx = self._suffix(layer, direction)
                size_in = input_size if layer == 0 else hidden_size * self.num_directions
                self.register_parameter(
                    f"weight_ih{sfx}", nn.Parameter(torch.empty(self.gates * hidden_size, size_in))
                )
                self.register_parameter(f"weight_hh{sfx}", nn.Parameter(torch.empty(self._hh_shape())))
                bias_p = nn.Parameter(torch.empty(self.gates * hidden_size)) if bias else None
                self.register_parameter(f"bias_ih{sfx}", bias_p)
        self.reset_parameters()

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction else "")

    def _hh_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(hidden), 1/sqrt(hidden))`` for every weight, as ``torch.nn.LSTM``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _step(self, pre: Tensor, h: Tensor, w_hh: Tensor) -> Tensor:
        """One time step: projected input ``pre: (B, gates * H)``, state ``h: (B, H)`` -> new state."""
        raise NotImplementedError

    def _run(
        self, x: Tensor, lengths: Tensor, h: Tensor, layer: int, direction: int
    ) -> tuple[Tensor, Tensor]:
        """One layer and direction over ``x: (B, T, F)``: outputs ``(B, T, H)`` (zero past each
        length) and the state after each sequence's last valid step ``(B, H)``."""
        sfx = self._suffix(layer, direction)
        pre = F.linear(x, getattr(self, f"weight_ih{sfx}"), getattr(self, f"bias_ih{sfx}"))
        w_hh = getattr(self, f"weight_hh{sfx}")
        outs = []
        for t in range(x.shape[1]):
            new = self._step(pre[:, t], h, w_hh)
            valid = (lengths > t)[:, None]
            h = torch.where(valid, new, h)
            outs.append(torch.where(valid, new, torch.zeros_like(new)))
        return torch.stack(outs, 1) if outs else x.new_zeros(x.shape[0], 0, self.hidden_size), h

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        """As ``torch.nn.LSTM``: ``input: (T, B, input_size)`` (``(B, T, ...)`` if ``batch_first``,
        ``(T, input_size)`` unbatched, or a ``PackedSequence``); ``hx``: ``h_0`` or ``(h_0, c_0)``
        of shape ``(num_layers * num_directions, B, hidden_size)`` (the state is ``h``: ``c_0`` is
        ignored). Returns ``output`` (last layer, both directions concatenated) and ``(h_n, c_n)``
        with ``c_n = h_n``."""
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if isinstance(input, PackedSequence):
            x, lengths = pad_packed_sequence(input, batch_first=True)
            lengths = lengths.to(x.device)
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
            if x.dim() != 3 or x.shape[-1] != self.input_size:
                raise ValueError(
                    f"input: expected (T, B, {self.input_size}) or (B, T, {self.input_size}) with "
                    f"batch_first, got {tuple(input.shape)}"
                )
            x = x if self.batch_first else x.transpose(0, 1)
            lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
        b = x.shape[0]
        h0 = hx[0] if isinstance(hx, tuple) else hx
        if h0 is not None and unbatched:
            h0 = h0.unsqueeze(1)
        shape = (self.num_layers * self.num_directions, b, self.hidden_size)
        if h0 is None:
            h0 = x.new_zeros(shape)
        elif tuple(h0.shape) != shape:
            raise ValueError(f"hx: expected h_0 of shape {shape}, got {tuple(h0.shape)}")
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                seq = x if d == 0 else _reverse(x, lengths)
                out, h = self._run(seq, lengths, h0[layer * self.num_directions + d], layer, d)
                outs.append(out if d == 0 else _reverse(out, lengths))
                finals.append(h)
            x = torch.cat(outs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n = torch.stack(finals)
        if packed:
            out_seq: Tensor | PackedSequence = _pack_like(x, input)  # type: ignore[arg-type]
        else:
            out_seq = x if self.batch_first else x.transpose(0, 1)
            if unbatched:
                out_seq, h_n = out_seq.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return out_seq, (h_n, h_n)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"batch_first={self.batch_first}, bidirectional={self.bidirectional}"
        )


def _pack_like(x: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack ``x: (B, T, F)`` (batch in the original order) with the layout of ``like``."""
    if like.sorted_indices is not None:
        x = x.index_select(0, like.sorted_indices)
    sizes = like.batch_sizes.tolist()
    data = torch.cat([x[:n, t] for t, n in enumerate(sizes)])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class JANET(_Recurrent):
    """JANET: an LSTM with only a forget gate (Van der Westhuizen & Lasenby, 2018).

    ``s_t = W_f x_t + U_f h_{t-1} + b_f``, ``c~_t = tanh(W_c x_t + U_c h_{t-1} + b_c)``,
    ``h_t = c_t = sigmoid(s_t) * c_{t-1} + (1 - sigmoid(s_t - beta)) * c~_t``.

    Args: as ``torch.nn.LSTM`` (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False``), plus keyword-only ``beta`` (the
    paper's 1) and ``chrono_t_max``: when given, the forget bias starts at
    ``log(U(1, chrono_t_max - 1))`` (chrono initialisation, as in the paper); otherwise at 1.
    ``forward`` returns ``(output, (h_n, c_n))`` with ``c_n = h_n`` (the cell is the state).

    Examples:
        >>> out, (h, c) = JANET(3, 16, num_layers=2, batch_first=True)(torch.randn(4, 10, 3))
        >>> out.shape, h.shape
        (torch.Size([4, 10, 16]), torch.Size([2, 4, 16]))
    """

    gates = 2

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        beta: float = 1.0,
        chrono_t_max: int | None = None,
    ) -> None:
        self.beta, self.chrono_t_max = beta, chrono_t_max
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)

    def _hh_shape(self) -> tuple[int, ...]:
        return (2 * self.hidden_size, self.hidden_size)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        h = self.hidden_size
        for name, p in self.named_parameters():
            if name.startswith("bias_ih"):
                with torch.no_grad():
                    p[h:].zero_()
                    if self.chrono_t_max is not None:
                        p[:h].uniform_(1, max(self.chrono_t_max - 1, 1 + 1e-3)).log_()
                    else:
                        p[:h].fill_(1.0)

    def _step(self, pre: Tensor, h: Tensor, w_hh: Tensor) -> Tensor:
        s, c = (pre + h @ w_hh.t()).chunk(2, dim=-1)
        return torch.sigmoid(s) * h + (1 - torch.sigmoid(s - self.beta)) * torch.tanh(c)


class IndRNN(_Recurrent):
    """Independently recurrent network (Li et al., 2018): ``h_t = relu(W x_t + u * h_{t-1} + b)``.

    Each unit has one recurrent weight ``u`` (``weight_hh``: ``(hidden_size,)``), so units are
    independent in time and can be stacked deep. ``u`` starts in ``U(0, 1)``; keyword-only
    ``recurrent_max`` clips ``|u|`` in the forward pass (the paper uses ``2 ** (1 / T)`` for
    ``T`` steps) and ``nonlinearity`` is ``"relu"`` or ``"tanh"``. Otherwise as ``torch.nn.LSTM``;
    ``forward`` returns ``(output, (h_n, c_n))`` with ``c_n = h_n``.

    Examples:
        >>> out, (h, _) = IndRNN(3, 16)(torch.randn(10, 4, 3))
        >>> out.shape, h.shape
        (torch.Size([10, 4, 16]), torch.Size([1, 4, 16]))
    """

    gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        nonlinearity: str = "relu",
        recurrent_max: float | None = None,
    ) -> None:
        if nonlinearity not in ("relu", "tanh"):
            raise ValueError(f"nonlinearity: expected 'relu' or 'tanh', got {nonlinearity!r}")
        self.nonlinearity, self.recurrent_max = nonlinearity, recurrent_max
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)

    def _hh_shape(self) -> tuple[int, ...]:
        return (self.hidden_size,)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.startswith("weight_hh"):
                    p.uniform_(0, 1)
                elif name.startswith("bias_ih"):
                    p.zero_()

    def _step(self, pre: Tensor, h: Tensor, w_hh: Tensor) -> Tensor:
        if self.recurrent_max is not None:
            w_hh = w_hh.clamp(-self.recurrent_max, self.recurrent_max)
        z = pre + w_hh * h
        return torch.relu(z) if self.nonlinearity == "relu" else torch.tanh(z)
