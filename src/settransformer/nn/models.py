"""Set models: the Set Transformer (encoder + decoder) and the DeepSets baseline.

Both take a padded batch of sets ``x: (B, N, dim_input)`` with an optional boolean
``mask: (B, N)`` (True = real element) and return ``(B, num_outputs, dim_output)``; the output does
not depend on the order of the elements, nor on padding.
"""

from __future__ import annotations

from typing import Any, Literal, Unpack

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ISAB, PMA, SAB
from .mab import BlockKeywords, BlockOptions
from .sets import PoolKind, masked_pool
from .streaming import Pipeline, encode_pool_chunked
from .validation import check_positive, check_probability, prepare_set, zero_padding

__all__ = ["DeepSets", "SetTransformer"]

EncoderKind = Literal["attention", "rff"]
PoolingKind = Literal["pma", "mean", "sum", "max"]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        check_positive(name, value)


class _MLP(nn.Sequential):
    """``num_layers`` x (Linear, ReLU, dropout), applied row-wise: ``(..., dim_in) -> (..., dim_hidden)``.

    The dropout is functional, so the state dict (Linear ``i`` at index ``2 i``) is the same for every
    rate: weights trained with dropout load into the model built without it. Weights saved from a
    layout that held a ``Dropout`` module after each ReLU (Linear ``i`` at ``3 i``) are renumbered
    as they load.

    Examples:
        >>> import torch
        >>> trained = _MLP(3, 8, num_layers=2, dropout=0.1)
        >>> list(trained.state_dict()) == list(_MLP(3, 8, num_layers=2).state_dict())
        True
        >>> _MLP(3, 8, num_layers=2)(torch.randn(5, 3)).shape
        torch.Size([5, 8])
    """

    def __init__(self, dim_in: int, dim_hidden: int, num_layers: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Linear(dim_in if i == 0 else dim_hidden, dim_hidden), nn.ReLU()]
        super().__init__(*layers)
        self.dropout = dropout
        self.register_load_state_dict_pre_hook(_renumber_dropout_layout)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = layer(x)
            if isinstance(layer, nn.ReLU) and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x


def _renumber_dropout_layout(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: object
) -> None:
    """Move the keys of an [`_MLP`][settransformer.nn.models._MLP] saved with a ``Dropout`` module after
    each ReLU (index ``3 i`` for Linear ``i``) to ``2 i``. Index 3 holds a Linear only in that layout
    (a ReLU in this one), so its presence decides."""
    if f"{prefix}3.weight" not in state_dict:
        return
    old = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0].isdigit()]
    moved = {}
    for key in old:
        index, rest = key[len(prefix) :].split(".", 1)
        moved[f"{prefix}{int(index) // 3 * 2}.{rest}" if int(index) % 3 == 0 else key] = state_dict.pop(key)
    state_dict.update(moved)


class _SetModel(nn.Module):
    """Input checks and the ``(B, N, D) -> (B, num_outputs, dim_output)`` contract shared by models.

    A model is an encoder (`encode`, element-wise embeddings), a pooling and a decoder of
    the pooled vectors (`decode_pooled`); `pipeline` describes the same to the chunked
    evaluation ([`settransformer.nn.streaming`][settransformer.nn.streaming]).
    """

    dim_input: int
    num_outputs: int
    dim_output: int
    config: dict[str, Any]

    def forward(self, x: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``x: (B, N, dim_input)``, ``mask: (B, N)`` bool -> ``(B, num_outputs, dim_output)``.

        ``chunk_size``: evaluate ``chunk_size`` elements at a time with bounded memory (ISAB or rFF
        encoders; ``x`` may then be any sliceable array-like): see
        [`settransformer.nn.streaming`][settransformer.nn.streaming]. A tensor with ``N = 0`` takes the
        ordinary path (nothing to chunk).

        Raises ``TypeError``/``ValueError`` naming ``x`` or ``mask`` for a bad input; see
        [`settransformer.nn.validation`][settransformer.nn.validation] (including the opt-out of the
        finiteness check).
        """
        if chunk_size is not None:
            check_positive("chunk_size", chunk_size)
            if not (isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 0):
                return encode_pool_chunked(self, x, mask, chunk_size=chunk_size)
        x, mask = prepare_set(x, mask, self.dim_input, next(self.parameters()))
        return self.decode(self.encode(x, mask), mask)

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Element-wise embeddings ``(B, N, dim_hidden)``, zero at padded rows (no input checks)."""
        raise NotImplementedError

    def decode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pool embeddings ``z: (B, N, dim_hidden)`` and decode: ``(B, num_outputs, dim_output)``."""
        raise NotImplementedError

    def decode_pooled(self, pooled: Tensor) -> Tensor:
        """From the pooled vectors to ``(B, num_outputs, dim_output)``."""
        raise NotImplementedError

    def pipeline(self) -> Pipeline:
        """The model as chunked evaluation sees it ([`Chunkable`][settransformer.nn.streaming.Chunkable])."""
        raise NotImplementedError


class SetTransformer(_SetModel):
    """The Set Transformer: an attention encoder, pooling by attention, and a decoder.

    ``encoder``: ``num_encoder_layers`` ISABs with ``num_inducing`` points (SABs when
    ``num_inducing=None``); ``decoder``: PMA with ``num_outputs`` seeds, ``num_decoder_layers`` SABs
    (which let the outputs interact, e.g. the components of a mixture) and a linear head.

    The paper's ablations are options: ``encoder="rff"`` replaces the attention encoder by a
    row-wise MLP ("rFF + PMA"); ``pooling="mean" | "sum" | "max"`` replaces PMA + SABs by masked
    pooling and an MLP ("SAB + Pooling").

    Args:
        dim_input: feature size of the set elements.
        num_outputs: number of PMA seeds, i.e. of output vectors.
        dim_output: size of each output vector.
        dim_hidden: width of every block.
        num_heads: attention heads per block.
        num_inducing: inducing points per ISAB, or ``None`` for SABs.
        num_encoder_layers: depth of the encoder.
        num_decoder_layers: SABs of the decoder after pooling.
        decoder_dropout: dropout before PMA (after a masked pooling) and before the head (the paper's
            point-cloud models: "Dropout, PMA, Dropout, FC" and "max-pool, Dropout, FC, Dropout, FC").
        options: [`BlockOptions`][settransformer.nn.mab.BlockOptions] of every block; keywords of the
            same names (``norm``, ``ff_dim``, ``dropout``, ``scale``, ``residual``, ``out_proj``,
            ``score``, ``top_k``) override its fields. ``dropout`` also applies inside an rFF
            encoder. A ``score`` module is shared by every block; pass a name for a separate
            score per block.

    Examples:
        >>> import torch
        >>> model = SetTransformer(2, num_outputs=4, dim_output=5, dim_hidden=32, num_inducing=8)
        >>> x, mask = torch.randn(3, 50, 2), torch.rand(3, 50) > 0.2
        >>> model(x, mask).shape
        torch.Size([3, 4, 5])
    """

    def __init__(
        self,
        dim_input: int,
        num_outputs: int,
        dim_output: int,
        *,
        dim_hidden: int = 128,
        num_heads: int = 4,
        num_inducing: int | None = 32,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        encoder: EncoderKind = "attention",
        pooling: PoolingKind = "pma",
        decoder_dropout: float = 0.0,
        options: BlockOptions | None = None,
        **block: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        _check_sizes(
            dim_input=dim_input, num_outputs=num_outputs, dim_output=dim_output, dim_hidden=dim_hidden
        )
        if isinstance(num_heads, int) and num_heads > 0 and dim_hidden % num_heads:
            raise ValueError(f"num_heads: must divide dim_hidden={dim_hidden}, got {num_heads}")
        check_positive("num_encoder_layers", num_encoder_layers, allow_zero=encoder == "rff")
        if encoder == "rff" and num_encoder_layers == 0 and dim_input != dim_hidden:
            raise ValueError(
                f"num_encoder_layers: 0 rFF layers pass the input straight to the decoder, which needs "
                f"dim_input == dim_hidden, got {dim_input} and {dim_hidden}"
            )
        check_positive("num_decoder_layers", num_decoder_layers, allow_zero=True)
        opts = BlockOptions.of(options, block)
        check_probability("decoder_dropout", decoder_dropout)
        if encoder not in ("attention", "rff"):
            raise ValueError(f"encoder: expected 'attention' or 'rff', got {encoder!r}")
        if pooling not in ("pma", "mean", "sum", "max"):
            raise ValueError(f"pooling: expected 'pma', 'mean', 'sum' or 'max', got {pooling!r}")
        self.config = {
            "dim_input": dim_input,
            "num_outputs": num_outputs,
            "dim_output": dim_output,
            "dim_hidden": dim_hidden,
            "num_heads": num_heads,
            "num_inducing": num_inducing,
            "num_encoder_layers": num_encoder_layers,
            "num_decoder_layers": num_decoder_layers,
            "encoder": encoder,
            "pooling": pooling,
            "decoder_dropout": decoder_dropout,
            **opts.as_dict(),
        }
        self.dim_input, self.num_outputs, self.dim_output = dim_input, num_outputs, dim_output
        self.dim_hidden, self.pooling = dim_hidden, pooling
        self.options = opts

        self.encoder = nn.ModuleList()
        if encoder == "rff":
            self.encoder.append(_MLP(dim_input, dim_hidden, num_encoder_layers, opts.dropout))
        for i in range(num_encoder_layers if encoder == "attention" else 0):
            d_in = dim_input if i == 0 else dim_hidden
            if num_inducing is None:
                self.encoder.append(SAB(d_in, dim_hidden, num_heads, options=opts))
            else:
                self.encoder.append(ISAB(d_in, dim_hidden, num_heads, num_inducing, options=opts))
        # Pre-norm stacks end with a LayerNorm, or the residual stream is never normalised.
        self.encoder_norm: nn.Module = nn.LayerNorm(dim_hidden) if opts.norm == "pre" else nn.Identity()

        self.decoder_drop: nn.Module = nn.Dropout(decoder_dropout) if decoder_dropout > 0 else nn.Identity()
        self.pma = PMA(dim_hidden, num_heads, num_outputs, options=opts) if pooling == "pma" else None
        self.pool_kind: PoolKind | None = None if pooling == "pma" else pooling
        if pooling == "pma":
            self.decoder = nn.ModuleList(
                SAB(dim_hidden, dim_hidden, num_heads, options=opts) for _ in range(num_decoder_layers)
            )
            self.decoder_norm: nn.Module = nn.LayerNorm(dim_hidden) if opts.norm == "pre" else nn.Identity()
            self.head = nn.Linear(dim_hidden, dim_output)
        else:
            self.decoder = nn.ModuleList([_MLP(dim_hidden, dim_hidden, num_decoder_layers, decoder_dropout)])
            self.decoder_norm = nn.Identity()
            self.head = nn.Linear(dim_hidden, num_outputs * dim_output)

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, dim_input)`` zero at padded rows -> ``(B, N, dim_hidden)`` (no input checks)."""
        for layer in self.encoder:
            if isinstance(layer, SAB | ISAB):
                x = layer.forward_unchecked(x, mask)
            else:
                x = zero_padding(layer(x), mask)
        return zero_padding(self.encoder_norm(x), mask)

    def decode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """``z: (B, N, dim_hidden)`` zero at padded rows -> ``(B, num_outputs, dim_output)``."""
        if self.pma is not None:
            return self.decode_pooled(self.pma.forward_unchecked(self.decoder_drop(z), mask))
        assert self.pool_kind is not None
        return self.decode_pooled(masked_pool(z, mask, self.pool_kind))

    def decode_pooled(self, pooled: Tensor) -> Tensor:
        """From the pooled ``(B, num_outputs, dim_hidden)`` (PMA) or ``(B, dim_hidden)`` (masked
        pooling) to ``(B, num_outputs, dim_output)``."""
        if self.pma is None:
            # dropout after the pooling, as the paper's "max-pool, Dropout, FC": before it, the max of
            # scaled-up kept values would be about 1 / (1 - p) times its evaluation value
            out = self.head(self.decoder[0](self.decoder_drop(pooled)))
            return out.view(pooled.shape[0], self.num_outputs, self.dim_output)
        for layer in self.decoder:
            assert isinstance(layer, SAB)
            pooled = layer.forward_unchecked(pooled, None)
        return self.head(self.decoder_drop(self.decoder_norm(pooled)))

    def pipeline(self) -> Pipeline:
        """The encoder layers and its final norm as stages, the pooling and
        [`decode_pooled`][settransformer.nn.models.SetTransformer.decode_pooled].

        Raises ``ValueError`` for SAB encoder layers, which attend over the whole set at once.
        """
        for i, layer in enumerate(self.encoder):
            if isinstance(layer, SAB):
                raise ValueError(
                    f"model.encoder[{i}]: a SAB attends over the whole set and cannot be chunked; "
                    "use ISAB encoder layers (num_inducing=...) or evaluate without chunk_size"
                )
        return Pipeline(
            self.dim_input,
            self.dim_hidden,
            next(self.parameters()),
            stages=[*self.encoder, self.encoder_norm],
            pooling=self.pma if self.pma is not None else self.pool_kind,
            pool_input=self.decoder_drop if self.pma is not None else None,
            decode_pooled=self.decode_pooled,
        )


class DeepSets(_SetModel):
    """DeepSets (Zaheer et al., 2017): a row-wise MLP, masked pooling, then an MLP.

    ``rho(pool_i phi(x_i))`` with ``phi`` = ``num_encoder_layers`` x (Linear, ReLU) and ``rho`` =
    ``num_decoder_layers`` x (Linear, ReLU) + Linear to ``num_outputs * dim_output``.

    Args:
        dim_input: as in [`SetTransformer`][settransformer.nn.models.SetTransformer].
        num_outputs: as in [`SetTransformer`][settransformer.nn.models.SetTransformer].
        dim_output: as in [`SetTransformer`][settransformer.nn.models.SetTransformer].
        dim_hidden: width of both MLPs.
        pool: ``"mean"``, ``"sum"`` or ``"max"``.
        num_encoder_layers: depth of ``phi``.
        num_decoder_layers: depth of ``rho``.
        dropout: dropout after the pooling and after each hidden layer of ``rho`` (the paper's
            pooling decoder: "max-pool, Dropout, FC, Dropout, FC").

    Examples:
        >>> import torch
        >>> DeepSets(1, 1, 1, dim_hidden=64, pool="max")(torch.rand(8, 10, 1)).shape
        torch.Size([8, 1, 1])
    """

    def __init__(
        self,
        dim_input: int,
        num_outputs: int,
        dim_output: int,
        *,
        dim_hidden: int = 128,
        pool: PoolKind = "mean",
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(
            dim_input=dim_input, num_outputs=num_outputs, dim_output=dim_output, dim_hidden=dim_hidden
        )
        check_positive("num_encoder_layers", num_encoder_layers)
        check_positive("num_decoder_layers", num_decoder_layers, allow_zero=True)
        check_probability("dropout", dropout)
        if pool not in ("mean", "sum", "max"):
            raise ValueError(f"pool: expected 'mean', 'sum' or 'max', got {pool!r}")
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.dim_input, self.num_outputs, self.dim_output = dim_input, num_outputs, dim_output
        self.pool: PoolKind = pool
        self.phi = _MLP(dim_input, dim_hidden, num_encoder_layers)
        self.rho = nn.Sequential(
            _MLP(dim_hidden, dim_hidden, num_decoder_layers, dropout),
            nn.Linear(dim_hidden, num_outputs * dim_output),
        )

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, dim_input)`` zero at padded rows -> ``(B, N, dim_hidden)`` (no input checks)."""
        return zero_padding(self.phi(x), mask)

    def decode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """``z: (B, N, dim_hidden)`` -> ``(B, num_outputs, dim_output)``."""
        return self.decode_pooled(masked_pool(z, mask, self.pool))

    def decode_pooled(self, pooled: Tensor) -> Tensor:
        """From the pooled ``(B, dim_hidden)`` to ``(B, num_outputs, dim_output)``."""
        pooled = F.dropout(pooled, self.config["dropout"], self.training)
        return self.rho(pooled).view(pooled.shape[0], self.num_outputs, self.dim_output)

    def pipeline(self) -> Pipeline:
        """``phi`` as the one stage, the masked pooling and
        [`decode_pooled`][settransformer.nn.models.DeepSets.decode_pooled]."""
        return Pipeline(
            self.dim_input,
            self.config["dim_hidden"],
            next(self.parameters()),
            stages=[self.phi],
            pooling=self.pool,
            decode_pooled=self.decode_pooled,
        )
