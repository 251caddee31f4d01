"""Weights of the official Set Transformer code (juho-lee/set_transformer, ``models.SetTransformer``).

The official model computes, in every MAB (queries ``X``, set ``Y``, width ``d = dim_hidden``)::

    Q, K, V = fc_q(X), fc_k(Y), fc_v(Y)
    O = Q + concat_h softmax(Q_h K_h^T / sqrt(d)) V_h      # full width d, projected-query residual
    O = ln0(O) if ln;  O = O + relu(fc_o(O));  O = ln1(O) if ln   # no output projection W^O

and ``enc`` = ISAB x 2 (x 3 in early versions), ``dec`` = PMA, SAB, SAB, Linear. Our blocks express
this with options ([`official_options`][settransformer.compat.official_options]):
``scale=1/sqrt(dim_hidden)``, ``residual="projected"``, ``out_proj=False``, ``ff_dim=None`` (our ``ff.0`` is
their ``fc_o``) and ``norm="post"`` when ``ln`` else ``None``. Parameters map as: ``to_kv`` = rows of ``fc_k``
then ``fc_v``; ``norm1``, ``norm2`` = ``ln0``, ``ln1``; ``encoder.i.inducing`` = ``enc.i.I[0]``; ``pma.seeds``
= ``dec.0.S[0]``; ``decoder.j`` = ``dec.(j+1)``; ``head`` = the final ``Linear``.

The official model takes no mask; ours accepts one, so converted weights also work on padded
batches of sets of different sizes.

Examples:
    >>> import torch
    >>> from settransformer.compat import load_official
    >>> ckpt = torch.load("results/set_transformer/trial/model.tar", weights_only=True)  # doctest: +SKIP
    >>> model = load_official(ckpt, dim_input=2, num_outputs=4, dim_output=4)  # doctest: +SKIP
    >>> model(torch.randn(10, 300, 2)).shape  # doctest: +SKIP
    torch.Size([10, 4, 4])
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .nn.models import SetTransformer

__all__ = ["load_official", "official_options", "official_set_transformer", "to_official_state_dict"]


def official_options(dim_hidden: int = 128, ln: bool = False) -> dict[str, Any]:
    """The [`SetTransformer`][settransformer.nn.models.SetTransformer] block options that reproduce the
    official code's MAB."""
    return {
        "norm": "post" if ln else None,
        "ff_dim": None,
        "scale": 1.0 / math.sqrt(dim_hidden),
        "residual": "projected",
        "out_proj": False,
    }


def official_set_transformer(
    dim_input: int,
    num_outputs: int,
    dim_output: int,
    num_inds: int = 32,
    dim_hidden: int = 128,
    num_heads: int = 4,
    ln: bool = False,
    *,
    num_encoder_layers: int = 2,
    num_decoder_layers: int = 2,
) -> SetTransformer:
    """A (randomly initialised) [`SetTransformer`][settransformer.nn.models.SetTransformer] computing what the
    official
    ``models.SetTransformer(dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads, ln)``
    computes. Input ``(B, N, dim_input)`` -> ``(B, num_outputs, dim_output)``."""
    return SetTransformer(
        dim_input,
        num_outputs,
        dim_output,
        dim_hidden=dim_hidden,
        num_heads=num_heads,
        num_inducing=num_inds,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        **official_options(dim_hidden, ln),
    )


# (our name inside a MAB, official names): to_kv holds fc_k's rows, then fc_v's.
_MAB_LINEARS = [("to_q", ("fc_q",)), ("to_kv", ("fc_k", "fc_v")), ("ff.0", ("fc_o",))]
_MAB_NORMS = [("norm1", ("ln0",)), ("norm2", ("ln1",))]


def _layout(model: SetTransformer) -> list[tuple[str, tuple[str, ...], bool]]:
    """``(our key, official keys, official adds a leading 1-dim)`` for every parameter."""
    cfg = model.config
    ln = cfg["norm"] == "post"
    entries: list[tuple[str, tuple[str, ...], bool]] = []

    def mab(ours: str, theirs: str) -> None:
        for name, official in _MAB_LINEARS + (_MAB_NORMS if ln else []):
            for suffix in ("weight", "bias"):
                keys = tuple(f"{theirs}.{o}.{suffix}" for o in official)
                entries.append((f"{ours}.{name}.{suffix}", keys, False))

    for i in range(cfg["num_encoder_layers"]):
        entries.append((f"encoder.{i}.inducing", (f"enc.{i}.I",), True))
        mab(f"encoder.{i}.mab0", f"enc.{i}.mab0")
        mab(f"encoder.{i}.mab1", f"enc.{i}.mab1")
    entries.append(("pma.seeds", ("dec.0.S",), True))
    mab("pma.mab", "dec.0.mab")
    for j in range(cfg["num_decoder_layers"]):
        mab(f"decoder.{j}.mab", f"dec.{j + 1}.mab")
    last = cfg["num_decoder_layers"] + 1
    entries += [("head.weight", (f"dec.{last}.weight",), False), ("head.bias", (f"dec.{last}.bias",), False)]
    return entries


def _check_official_structure(model: SetTransformer) -> None:
    cfg = model.config
    wanted = {
        **official_options(cfg["dim_hidden"], cfg["norm"] == "post"),
        "encoder": "attention",
        "pooling": "pma",
    }
    wrong = [
        f"{k}={cfg[k]!r} (official: {v!r})"
        for k, v in wanted.items()
        if not (math.isclose(cfg[k], v) if k == "scale" and cfg[k] is not None else cfg[k] == v)
    ]
    if cfg["num_inducing"] is None:
        wrong.append("num_inducing=None (official: ISABs)")
    if wrong:
        raise ValueError(
            "model: does not compute what the official SetTransformer computes; build it with "
            "official_set_transformer(...). Differing options: " + ", ".join(wrong)
        )


def to_official_state_dict(model: SetTransformer) -> dict[str, Tensor]:
    """The official code's ``state_dict`` for ``model`` (the inverse of
    [`load_official`][settransformer.compat.load_official]).

    ``model`` must have been built with the official options
    ([`official_set_transformer`][settransformer.compat.official_set_transformer]); otherwise ``ValueError``,
    since the official code would compute something else with these weights.

    Examples:
        >>> model = official_set_transformer(2, 4, 4, num_inds=8, dim_hidden=16)
        >>> state = to_official_state_dict(model)
        >>> state["enc.0.I"].shape, state["enc.0.mab0.fc_k.weight"].shape
        (torch.Size([1, 8, 16]), torch.Size([16, 2]))
    """
    if not isinstance(model, SetTransformer):
        raise TypeError(f"model: expected a SetTransformer, got {type(model).__name__}")
    _check_official_structure(model)
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, official, unsqueeze in _layout(model):
        value = ours[key]
        parts = value.chunk(len(official)) if len(official) > 1 else (value,)
        for name, part in zip(official, parts):
            out[name] = part[None] if unsqueeze else part
    return out


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Accept the official ``{"state_dict": ...}`` checkpoint and DataParallel's ``module.`` prefix."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping of parameter names to tensors, got {type(state_dict).__name__}"
        )
    if set(state_dict) == {"state_dict"} or ("state_dict" in state_dict and "enc.0.I" not in state_dict):
        state_dict = state_dict["state_dict"]
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


# Every key of an official SetTransformer: enc.i = ISAB i; dec.0 = the PMA, dec.1 .. dec.L the SABs,
# dec.(L+1) the final Linear.
_OFFICIAL_KEY = re.compile(
    r"enc\.(\d+)\.(?:I|mab[01]\.(?:fc_[qkvo]|ln[01])\.(?:weight|bias))"
    r"|dec\.0\.S|dec\.(\d+)\.(?:mab\.(?:fc_[qkvo]|ln[01])\.)?(?:weight|bias)"
)


def _layer_counts(sd: Mapping[str, Any]) -> tuple[int, int]:
    """``(encoder ISABs, decoder SABs)`` read from the keys, before anything is built.

    Refuses keys of no official layer and layer indices with gaps, so the layer counts are at most
    the number of keys (a stray ``enc.400.I`` never builds 401 ISABs)."""
    enc: set[int] = set()
    dec: set[int] = set()
    foreign = []
    for key in sd:
        m = _OFFICIAL_KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            foreign.append(str(key))
            continue
        if m.group(1) is not None:
            enc.add(int(m.group(1)))
        if m.group(2) is not None:
            dec.add(int(m.group(2)))
    if foreign:
        shown = ", ".join(repr(k[:60]) for k in sorted(foreign)[:8])  # keys quoted short
        raise ValueError(
            f"state_dict: not an official SetTransformer: unexpected keys: [{shown}]"
            f"{' ...' if len(foreign) > 8 else ''}"
        )
    for prefix, indices in (("enc", enc), ("dec", dec)):
        if indices != set(range(len(indices))):
            gap = next(i for i in range(len(indices)) if i not in indices)
            raise ValueError(
                f"state_dict: the {prefix}.<i> layers must be numbered 0, 1, 2, ... without gaps; "
                f"{prefix}.{gap} is missing while the keys go up to {prefix}.{str(max(indices))[:20]}"
            )
    return len(enc) or 2, max(len(dec) - 2, 0) if dec else 2


def load_official(
    state_dict: Mapping[str, Any],
    dim_input: int,
    num_outputs: int,
    dim_output: int,
    num_inds: int = 32,
    dim_hidden: int = 128,
    num_heads: int = 4,
    ln: bool = False,
) -> SetTransformer:
    """Build our [`SetTransformer`][settransformer.nn.models.SetTransformer] from a ``state_dict`` of the
    official ``models.SetTransformer``.

    Args:
        state_dict: the official model's ``state_dict()``, or the ``{"state_dict": ...}`` checkpoint
            its ``run.py`` saves; a ``module.`` prefix (``nn.DataParallel``) is removed.
        dim_input: the official model's ``dim_input``.
        num_outputs: its ``num_outputs``.
        dim_output: its ``dim_output``.
        num_inds: its ``num_inds`` (inducing points per ISAB).
        dim_hidden: its ``dim_hidden``.
        num_heads: its ``num_heads``; it cannot be read from the weights, so it must match.
        ln: its ``ln`` (layer norms). The number of encoder ISABs and decoder SABs is read from
            the keys.

    Returns:
        A model mapping ``x: (B, N, dim_input)`` (optionally with ``mask: (B, N)``) to
            ``(B, num_outputs, dim_output)``, equal to the official model's output up to float rounding.

    Raises:
        ValueError: a missing or unexpected key, or a shape mismatch (naming the key and both shapes).
        TypeError: ``state_dict`` is not a mapping of tensors.

    Examples:
        >>> official = to_official_state_dict(official_set_transformer(2, 4, 4, dim_hidden=16, num_heads=2))
        >>> load_official(official, 2, 4, 4, dim_hidden=16, num_heads=2)(torch.randn(3, 50, 2)).shape
        torch.Size([3, 4, 4])
    """
    sd = _unwrap(state_dict)
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{key!r}]: expected a tensor, got {type(value).__name__}")
    num_encoder_layers, num_decoder_layers = _layer_counts(sd)
    model = official_set_transformer(
        dim_input,
        num_outputs,
        dim_output,
        num_inds,
        dim_hidden,
        num_heads,
        ln,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
    )
    expected = to_official_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        has_ln = any(".ln0." in k for k in sd)
        hint = (
            f" (the weights {'have' if has_ln else 'lack'} LayerNorms: pass ln={has_ln})"
            if has_ln != ln
            else ""
        )
        raise ValueError(
            f"state_dict: not an official SetTransformer with ln={ln}{hint}; "
            f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, value in expected.items():
        if sd[key].shape != value.shape:
            raise ValueError(
                f"state_dict[{key!r}]: expected shape {tuple(value.shape)} for dim_input={dim_input}, "
                f"num_outputs={num_outputs}, dim_output={dim_output}, num_inds={num_inds}, "
                f"dim_hidden={dim_hidden}; got {tuple(sd[key].shape)}"
            )
    ours = {}
    for key, official, unsqueeze in _layout(model):
        parts = [sd[name][0] if unsqueeze else sd[name] for name in official]
        ours[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
    model.load_state_dict(ours)
    return model
