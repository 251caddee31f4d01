"""A plain float64 reference of the Set Transformer's equations, for tests only.

Written from the paper (Lee et al., 2019, section 3) and the options documented in
``settransformer.nn.blocks``, independently of the library's code: one set at a time, no padding, no
masks, no fused products, heads handled by an explicit loop. Parameters are read from a module's
``named_parameters()`` (``params_of``), so the reference runs with exactly the module's weights:

- ``Att(Q, K, V) = softmax(Q K^T * scale) V`` per head, ``scale = 1/sqrt(d_head)`` by default;
  an empty key set gives a zero output (the library's documented empty-set rule).
- ``Multihead(X, Y) = concat_j Att(X W_j^Q, Y W_j^K, Y W_j^V) W^O`` (``W^O`` only with ``out_proj``).
- post-norm: ``H = LN(R + Multihead(X, Y))``, ``MAB = LN(H + rFF(H))``;
  pre-norm: ``H = R + Multihead(LN(X), LN(Y))``, ``MAB = H + rFF(LN(H))``;
  no norm: ``H = R + Multihead(X, Y)``, ``MAB = H + rFF(H)``;
  with ``R = X`` (residual "input") or ``R = X W^Q`` (residual "projected", the official code;
  under pre-norm the projection of ``LN(X)``).
- ``SAB(X) = MAB(X, X)``, ``ISAB(X) = MAB(X, MAB(I, X))``, ``PMA(Z) = MAB(S, Z)``.

Sets are ``(N, D)`` float64 tensors (``N`` may be 0); the learned queries ``I`` and ``S`` are ``(m, d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

LN_EPS = 1e-5  # nn.LayerNorm's default

Params = dict[str, Tensor]


def params_of(module: nn.Module, prefix: str = "") -> Params:
    """The module's parameters by name (as ``{prefix}.{name}`` when a prefix is given), in float64."""
    dot = f"{prefix}." if prefix else ""
    return {dot + name: p.detach().to(torch.float64) for name, p in module.named_parameters()}


@dataclass(frozen=True)
class BlockOptions:
    """The block options of ``settransformer.nn.blocks`` (``residual`` still unresolved: may be "auto")."""

    num_heads: int
    norm: str | None = "post"
    ff_dim: int | None = None
    scale: float | None = None
    residual: str = "auto"
    out_proj: bool = True

    @classmethod
    def from_kwargs(cls, num_heads: int, kwargs: dict[str, Any]) -> BlockOptions:
        keys = ("norm", "ff_dim", "scale", "residual", "out_proj")
        return cls(num_heads, **{k: kwargs[k] for k in keys if k in kwargs})


def linear(p: Params, prefix: str, x: Tensor) -> Tensor:
    """``x W^T + b`` with the weights ``{prefix}.weight``, ``{prefix}.bias``."""
    return x @ p[f"{prefix}.weight"].T + p[f"{prefix}.bias"]


def layer_norm(p: Params, prefix: str, x: Tensor) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * p[f"{prefix}.weight"] + p[f"{prefix}.bias"]


def relu(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def softmax_rows(s: Tensor) -> Tensor:
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def att(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(q k^T * scale) v`` for one head: ``q: (Nq, d)``, ``k: (Nk, d)``, ``v: (Nk, dv)``."""
    if k.shape[0] == 0:
        return q.new_zeros(q.shape[0], v.shape[1])
    return softmax_rows(q @ k.T * scale) @ v


def mlp(p: Params, prefix: str, x: Tensor) -> Tensor:
    """Every ``{prefix}.{i}`` Linear in index order, each followed by ReLU."""
    indices = sorted(
        int(name[len(prefix) + 1 :].split(".")[0])
        for name in p
        if name.startswith(prefix + ".") and name.endswith(".weight")
    )
    for i in indices:
        x = relu(linear(p, f"{prefix}.{i}", x))
    return x


def mab(p: Params, prefix: str, x: Tensor, y: Tensor, o: BlockOptions) -> Tensor:
    """``MAB(X, Y)``: ``x: (Nq, dim_q)``, ``y: (Nk, dim_kv)`` -> ``(Nq, dim)``."""
    w_kv, b_kv = p[f"{prefix}.to_kv.weight"], p[f"{prefix}.to_kv.bias"]
    dim = w_kv.shape[0] // 2
    residual = o.residual
    if residual == "auto":
        residual = "input" if x.shape[-1] == dim else "projected"
    xn, yn = x, y
    if o.norm == "pre":
        xn, yn = layer_norm(p, f"{prefix}.norm_q", x), layer_norm(p, f"{prefix}.norm_kv", y)
    q = linear(p, f"{prefix}.to_q", xn)
    k = yn @ w_kv[:dim].T + b_kv[:dim]
    v = yn @ w_kv[dim:].T + b_kv[dim:]
    dh = dim // o.num_heads
    scale = 1.0 / math.sqrt(dh) if o.scale is None else o.scale
    heads = [
        att(q[:, j * dh : (j + 1) * dh], k[:, j * dh : (j + 1) * dh], v[:, j * dh : (j + 1) * dh], scale)
        for j in range(o.num_heads)
    ]
    multihead = torch.cat(heads, dim=-1)
    if o.out_proj:
        multihead = linear(p, f"{prefix}.to_out", multihead)
    h = (x if residual == "input" else q) + multihead

    def rff(z: Tensor) -> Tensor:
        z = relu(linear(p, f"{prefix}.ff.0", z))
        return z if o.ff_dim is None else linear(p, f"{prefix}.ff.2", z)

    if o.norm == "post":
        h = layer_norm(p, f"{prefix}.norm1", h)
        return layer_norm(p, f"{prefix}.norm2", h + rff(h))
    if o.norm == "pre":
        return h + rff(layer_norm(p, f"{prefix}.norm_ff", h))
    return h + rff(h)


def sab(p: Params, prefix: str, x: Tensor, o: BlockOptions) -> Tensor:
    """``SAB(X) = MAB(X, X)``; ``prefix`` names the SAB (its MAB is ``{prefix}.mab``)."""
    return mab(p, f"{prefix}.mab", x, x, o)


def isab(p: Params, prefix: str, x: Tensor, o: BlockOptions) -> Tensor:
    """``ISAB(X) = MAB1(X, MAB0(I, X))``."""
    h = mab(p, f"{prefix}.mab0", p[f"{prefix}.inducing"], x, o)
    return mab(p, f"{prefix}.mab1", x, h, o)


def pma(p: Params, prefix: str, z: Tensor, o: BlockOptions) -> Tensor:
    """``PMA(Z) = MAB(S, Z)`` -> ``(num_seeds, dim)``."""
    return mab(p, f"{prefix}.mab", p[f"{prefix}.seeds"], z, o)


def pool(z: Tensor, how: str) -> Tensor:
    """Pool ``z: (N, D)`` over its rows; an empty set pools to zeros."""
    if z.shape[0] == 0:
        return z.new_zeros(z.shape[1])
    if how == "mean":
        return z.sum(dim=0) / z.shape[0]
    if how == "sum":
        return z.sum(dim=0)
    return z.max(dim=0).values


def _with_defaults(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every constructor setting of ``model`` (its ``config``), updated with ``kwargs``."""
    return {**model.config, **kwargs}


def set_transformer(model: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    """Reference output of ``SetTransformer(dim_input, num_outputs, dim_output, **kwargs)`` for one set.

    ``x: (N, dim_input)`` float64 -> ``(num_outputs, dim_output)``; ``model`` supplies the weights.
    """
    cfg = _with_defaults(model, kwargs)
    p = params_of(model)
    o = BlockOptions.from_kwargs(cfg["num_heads"], cfg)
    pre = cfg["norm"] == "pre"
    if cfg["encoder"] == "rff":
        x = mlp(p, "encoder.0", x)
    else:
        for i in range(cfg["num_encoder_layers"]):
            block = sab if cfg["num_inducing"] is None else isab
            x = block(p, f"encoder.{i}", x, o)
    if pre:
        x = layer_norm(p, "encoder_norm", x)
    if cfg["pooling"] != "pma":
        out = linear(p, "head", mlp(p, "decoder.0", pool(x, cfg["pooling"])))
        return out.view(model.num_outputs, model.dim_output)
    y = pma(p, "pma", x, o)
    for i in range(cfg["num_decoder_layers"]):
        y = sab(p, f"decoder.{i}", y, o)
    if pre:
        y = layer_norm(p, "decoder_norm", y)
    return linear(p, "head", y)


def deep_sets(model: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    """Reference ``DeepSets(..., **kwargs)``: ``rho(pool(phi(x)))`` -> ``(num_outputs, dim_output)``."""
    cfg = _with_defaults(model, kwargs)
    p = params_of(model)
    z = pool(mlp(p, "phi", x), cfg["pool"])
    out = linear(p, "rho.1", mlp(p, "rho.0", z))
    return out.view(model.num_outputs, model.dim_output)
