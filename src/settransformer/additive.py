"""The additive (Bahdanau) attention score and the two kernels that compute it without storing
the ``(B, H, Nq, Nk, hidden)`` pre-activations.

Both kernels compute ``out[b,h,i,j] = sum_a u[h,a] sigmoid(p[b,h,i,a] + r[b,h,a,j])``
(:class:`AdditiveScore` folds ``tanh z = 2 sigmoid(2z) - 1`` into ``p``, ``r`` and ``u``):

- :class:`_FactoredSigmoids`, the fast one: with ``P = exp(p - c)`` and ``R = exp(-r - c)``,
  ``sigmoid(p + r) = P / (P + R)``. The exponentials are taken once per query and once per key,
  so each of the ``B H Nq Nk hidden`` terms costs an addition and a division instead of an
  exponential. ``c`` (per batch, head and hidden unit) centres the exponents; it is used while the
  exponents stay within float range, which :func:`factored_range` checks.
- :class:`_Sigmoids`, the fallback for every other case (wide-ranging pre-activations, half
  precision): one ``sigmoid`` per term.

Both recompute their blocks in a hand-written backward pass, so neither is twice differentiable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AdditiveScore", "factored_range"]

#: Largest spread of the exponents ``p`` and ``-r`` (per batch, head and hidden unit) for which
#: the factored kernel runs: after centring, ``exp`` of at most half of it stays a normal number
#: (float32: ``exp(40)`` is 2e17, ``exp(-40)`` 4e-18).
_SPAN_LIMIT = {torch.float32: 80.0, torch.float64: 1000.0}


def _blocks(b: int, h: int, a: int, nq: int, nk: int, elements: int) -> tuple[int, int]:
    """Rows and columns of the ``(B, H, hidden, rows, cols)`` blocks of at most ``elements`` terms."""
    cols = min(nk, max(1, elements // max(1, b * h * a)))
    return min(nq, max(1, elements // max(1, b * h * a * cols))), cols


class _FactoredSigmoids(torch.autograd.Function):
    """``sum_a u[h,a] P[b,h,a,i] / (P[b,h,a,i] + R[b,h,a,j]) - shift[h]`` in blocks; see the module docstring.

    The blocks of ``P + R`` are recomputed in the backward pass, so the extra memory is one block
    (``elements`` floats) beyond the inputs and the output. Backward: with ``s = sigmoid``,
    ``ds/dp = ds/dr = s (1 - s)``.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor, r: Tensor, c: Tensor, u: Tensor, shift: Tensor, elements: int) -> Tensor:
        big_p = torch.exp(p - c[:, :, None, :]).transpose(2, 3).contiguous()  # (B, H, A, Nq)
        big_r = torch.exp(-r - c[..., None])  # (B, H, A, Nk)
        ctx.save_for_backward(big_p, big_r, u)
        ctx.elements = elements
        b, h, a, nq = big_p.shape
        nk = big_r.shape[-1]
        rows, cols = _blocks(b, h, a, nq, nk, elements)
        weighted = big_p * u[None, :, :, None]
        out = p.new_empty(b, h, nq, nk)
        buf = p.new_empty(b, h, a, rows, cols)
        for i in range(0, nq, rows):
            for j in range(0, nk, cols):
                o = out[:, :, i : i + rows, j : j + cols]
                d = buf[:, :, :, : o.shape[2], : o.shape[3]]
                torch.add(big_p[:, :, :, i : i + rows, None], big_r[:, :, :, None, j : j + cols], out=d)
                torch.div(weighted[:, :, :, i : i + rows, None], d, out=d)
                if o.is_contiguous():
                    torch.sum(d, 2, out=o)
                else:  # a block of columns
                    o.copy_(d.sum(2))
                o.sub_(shift.view(1, -1, 1, 1))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, Tensor, Tensor, None]:
        big_p, big_r, u = ctx.saved_tensors
        b, h, a, nq = big_p.shape
        nk = big_r.shape[-1]
        rows, cols = _blocks(b, h, a, nq, nk, ctx.elements)
        grad_p, grad_r = torch.zeros_like(big_p), torch.zeros_like(big_r)
        grad_u, grad_shift = big_p.new_zeros(b, h, a), big_p.new_zeros(h)
        buf = big_p.new_empty(b, h, a, rows, cols)
        for i in range(0, nq, rows):
            for j in range(0, nk, cols):
                g = grad[:, :, i : i + rows, j : j + cols]
                s = buf[:, :, :, : g.shape[2], : g.shape[3]]
                p_i = big_p[:, :, :, i : i + rows, None]
                torch.add(p_i, big_r[:, :, :, None, j : j + cols], out=s)
                torch.div(p_i, s, out=s)  # sigmoid
                grad_u += torch.einsum("bhij,bhaij->bha", g, s)
                grad_shift -= g.sum((0, 2, 3))
                s.addcmul_(s, s, value=-1.0)  # sigmoid (1 - sigmoid)
                s.mul_(g[:, :, None])
                grad_p[:, :, :, i : i + rows] += s.sum(-1)
                grad_r[:, :, :, j : j + cols] += s.sum(-2)
        uu = u[None, :, :, None]
        return (grad_p * uu).transpose(2, 3), grad_r * uu, None, grad_u.sum(0), grad_shift, None


class _Sigmoids(torch.autograd.Function):
    """``out[b,h,i,j] = sum_a u[h,a] sigmoid(p[b,h,i,a] + r[b,h,a,j])`` in chunks of queries.

    The fallback of :class:`_FactoredSigmoids`, for any range and dtype. The pre-activations are
    recomputed chunk by chunk in the backward pass instead of stored. Keys last (``r`` is
    ``(B, H, hidden, Nk)``) so the elementwise work runs along long contiguous rows and the sum over
    ``a`` is a matrix product. ``sigmoid`` rather than ``tanh``: several times faster on CPU.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor, r: Tensor, u: Tensor, elements: int) -> Tensor:
        ctx.save_for_backward(p, r, u)
        b, h, nq, a = p.shape
        ctx.rows = rows = max(1, elements // max(1, b * h * r.shape[-1] * a))
        out = p.new_empty(b, h, nq, r.shape[-1])
        uu = u[None, :, None, None, :]  # (1, H, 1, 1, A)
        for i in range(0, nq, rows):
            s = torch.sigmoid_(p[:, :, i : i + rows, :, None] + r[:, :, None])  # (B, H, c, A, Nk)
            out[:, :, i : i + rows] = (uu @ s).squeeze(-2)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        p, r, u = ctx.saved_tensors
        rows = ctx.rows
        grad_p, grad_r = torch.empty_like(p), torch.zeros_like(r)
        grad_u = torch.zeros_like(u)
        for i in range(0, p.shape[2], rows):
            s = torch.sigmoid_(p[:, :, i : i + rows, :, None] + r[:, :, None])
            t = s * grad[:, :, i : i + rows, None, :]  # g s
            gs_p, gs_r = t.sum(-1), t.sum(2)
            grad_u += gs_p.sum((0, 2))
            t.mul_(s)  # g s^2, as d sigmoid = s - s^2
            grad_p[:, :, i : i + rows] = gs_p - t.sum(-1)
            grad_r += gs_r - t.sum(2)
        return grad_p * u[None, :, None, :], grad_r * u[None, :, :, None], grad_u, None


def factored_range(p: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Centre ``c: (B, H, A)`` and spread ``(B, H, A)`` of the exponents ``p[..., a]`` and ``-r[..., a, :]``.

    ``p: (B, H, Nq, A)``, ``r: (B, H, A, Nk)``. With ``c`` halfway between the smallest and the
    largest exponent, every ``|p - c|`` and ``|-r - c|`` is at most half the spread.
    """
    hi = torch.maximum(p.amax(2), (-r).amax(3))
    lo = torch.minimum(p.amin(2), (-r).amin(3))
    return (hi + lo) / 2, hi - lo


class AdditiveScore(nn.Module):
    """Additive (Bahdanau) score ``w_h^T tanh(W_q,h q + W_k,h k + b_h)``, separate weights per head.

    Cost: ``B * H * Nq * Nk * hidden`` additions and divisions forward, about twice that backward
    (while the pre-activations of a batch, head and hidden unit span less than 40 in float32, or
    500 in float64; beyond that, and in half precision, a sigmoid each, several times slower).
    At 1000 elements, 4 heads and the default 8 hidden units, attention costs about 2-3x the fused
    dot product's time (``benchmarks/scores.py``). Extra memory: one block of at most
    ``chunk_elements`` floats plus the ``(B, H, Nq, Nk)`` logits; a direct implementation would
    hold ``B * H * Nq * Nk * hidden`` floats (0.5 GB for one 1000-element set, 4 heads, hidden 32).

    Args:
        num_heads: heads ``H``.
        head_dim: per-head width ``Dh`` of queries and keys.
        hidden: units of the score's hidden layer per head; the cost is linear in it. Bahdanau's
            original is wider than the default 8.
        chunk_elements: terms computed at once: a block of queries and keys (the sigmoid kernel
            takes at least one whole query row).

    Example:
        >>> AdditiveScore(4, 8)(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)).shape
        torch.Size([2, 4, 3, 5])
    """

    def __init__(self, num_heads: int, head_dim: int, hidden: int = 8, chunk_elements: int = 2**21) -> None:
        super().__init__()
        if hidden < 1 or chunk_elements < 1:
            raise ValueError(
                f"hidden, chunk_elements: expected positive integers, got {hidden}, {chunk_elements}"
            )
        self.num_heads, self.head_dim, self.hidden, self.chunk_elements = (
            num_heads,
            head_dim,
            hidden,
            chunk_elements,
        )
        self.w_q = nn.Parameter(torch.empty(num_heads, head_dim, hidden))
        self.w_k = nn.Parameter(torch.empty(num_heads, head_dim, hidden))
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden))
        self.w = nn.Parameter(torch.empty(num_heads, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.head_dim)
        nn.init.uniform_(self.w_q, -bound, bound)
        nn.init.uniform_(self.w_k, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.uniform_(self.w, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        """``q: (B, H, Nq, Dh)``, ``k: (B, H, Nk, Dh)`` -> logits ``(B, H, Nq, Nk)``."""
        # tanh z = 2 sigmoid(2z) - 1, so w.tanh(z) = 2w.sigmoid(2z) - sum(w).
        p = 2 * (torch.einsum("bhnd,hda->bhna", q, self.w_q) + self.bias[:, None])
        r = (2 * torch.einsum("bhnd,hda->bhan", k, self.w_k)).contiguous()
        limit = _SPAN_LIMIT.get(p.dtype) if r.dtype == p.dtype and p.numel() and r.numel() else None
        if limit is not None:
            centre, span = factored_range(p.detach(), r.detach())
        if limit is not None and bool(span.max() <= limit):
            return _FactoredSigmoids.apply(p, r, centre, 2 * self.w, self.w.sum(-1), self.chunk_elements)
        return _Sigmoids.apply(p, r, 2 * self.w, self.chunk_elements) - self.w.sum(-1).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, hidden={self.hidden}"
