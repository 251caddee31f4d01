"""A naive implementation of the same equations, for benchmarks.

Written the way the official research code computes attention: heads are folded into the batch
with ``split``/``cat`` copies and scores go through ``bmm`` + ``softmax``, materialising the full
attention matrix. Parameter names match `settransformer.nn.mab`, so a naive module loads the
state dict of ours and computes the same function (checked by `check_same_function`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from settransformer import SetTransformer


class NaiveMAB(nn.Module):
    """Post-norm MAB with W^O and per-head scaling, computed with bmm/softmax (no mask support)."""

    def __init__(self, dim_q: int, dim_kv: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.dim, self.dim_q = num_heads, dim, dim_q
        self.to_q = nn.Linear(dim_q, dim)
        self.to_kv = nn.Linear(dim_kv, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        b, split = kv.shape[0], self.dim // self.num_heads
        qp = self.to_q(q).expand(b, -1, -1)
        k, v = self.to_kv(kv).chunk(2, dim=-1)
        q_, k_, v_ = (torch.cat(t.split(split, 2), 0) for t in (qp, k, v))
        a = torch.softmax(q_.bmm(k_.transpose(1, 2)) / math.sqrt(split), 2)
        o = torch.cat(a.bmm(v_).split(b, 0), 2)
        res = q if self.dim_q == self.dim else qp
        x = self.norm1(res + self.to_out(o))
        return self.norm2(x + self.ff(x))


class NaiveSAB(nn.Module):
    def __init__(self, dim_in: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.mab = NaiveMAB(dim_in, dim_in, dim, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.mab(x, x)


class NaiveISAB(nn.Module):
    def __init__(self, dim_in: int, dim: int, num_heads: int, num_inducing: int) -> None:
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(num_inducing, dim) * dim**-0.5)
        self.mab0 = NaiveMAB(dim, dim_in, dim, num_heads)
        self.mab1 = NaiveMAB(dim_in, dim, dim, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mab0(self.inducing.repeat(x.shape[0], 1, 1), x)
        return self.mab1(x, h)


class NaivePMA(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_seeds: int) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(num_seeds, dim) * dim**-0.5)
        self.mab = NaiveMAB(dim, dim, dim, num_heads)

    def forward(self, z: Tensor) -> Tensor:
        return self.mab(self.seeds.repeat(z.shape[0], 1, 1), z)


class NaiveSetTransformer(nn.Module):
    """ISAB x2 -> PMA -> SAB x2 -> Linear, the layout of `settransformer.SetTransformer`."""

    def __init__(
        self,
        dim_input: int,
        num_outputs: int,
        dim_output: int,
        dim_hidden: int,
        num_heads: int,
        num_inducing: int,
    ) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            [
                NaiveISAB(dim_input, dim_hidden, num_heads, num_inducing),
                NaiveISAB(dim_hidden, dim_hidden, num_heads, num_inducing),
            ]
        )
        self.pma = NaivePMA(dim_hidden, num_heads, num_outputs)
        self.decoder = nn.ModuleList([NaiveSAB(dim_hidden, dim_hidden, num_heads) for _ in range(2)])
        self.head = nn.Linear(dim_hidden, dim_output)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.encoder:
            x = layer(x)
        y = self.pma(x)
        for layer in self.decoder:
            y = layer(y)
        return self.head(y)


def check_same_function(ours: nn.Module, naive: nn.Module, x: Tensor, atol: float = 1e-4) -> None:
    """Load our weights into the naive module and assert both compute the same output."""
    naive.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, b = ours(x), naive(x)
    if not torch.allclose(a, b, atol=atol):
        raise AssertionError(f"naive and ours differ by {(a - b).abs().max().item():.2e}")


def naive_like(model: SetTransformer) -> NaiveSetTransformer:
    """A naive twin of a default-option ``SetTransformer`` (ISAB x2, PMA, SAB x2), same weights."""
    c = model.config
    naive = NaiveSetTransformer(
        c["dim_input"], c["num_outputs"], c["dim_output"], c["dim_hidden"], c["num_heads"], c["num_inducing"]
    )
    naive.load_state_dict(model.state_dict())
    return naive
