"""Attention scores beyond the dot product, and hard (top-k) attention.

A *score* maps per-head queries and keys to attention logits::

    score(q: (B, H, Nq, Dh), k: (B, H, Nk, Dh)) -> (B, H, Nq, Nk)

Any callable with that signature works; scores with parameters are ``nn.Module`` s, so a block
that owns one trains it and keeps it in its state dict. The logits then go through the same masked
softmax as the dot product (:func:`masked_softmax`), so masks, the empty-set rule (a query whose
keys are all masked gets weight zero everywhere) and hard top-k selection apply to every score.
Scores must be finite (with finite gradients) at zero keys: the blocks zero-fill padded rows.

Built in (``make_score`` names):

- ``"dot"``: ``q . k / sqrt(Dh)`` via PyTorch's fused kernel (represented by ``None``).
- ``"gaussian"``: :class:`GaussianScore`, ``-||q - k||^2 / (2 h^2)`` with a bandwidth ``h`` per head.
- ``"additive"``: :class:`AdditiveScore`, Bahdanau's ``w^T tanh(W_q q + W_k k + b)`` per head.

A score that is a dot product in disguise may also define ``as_dot(q, k) -> (q', k', bias)`` with
``score(q, k) = q' . k' + bias + c`` (``bias: (B, H, 1, Nk)``, ``c`` constant per query, which the
softmax ignores); attention then runs through the fused kernel (:class:`DotForm`).

Example:
    >>> q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
    >>> attention_weights(q, k, score=GaussianScore(4), top_k=2).shape
    torch.Size([2, 4, 3, 5])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .additive import AdditiveScore

__all__ = [
    "AdditiveScore",
    "DotForm",
    "GaussianScore",
    "ScoreFn",
    "ScoreSpec",
    "attention_weights",
    "make_score",
    "masked_softmax",
    "score_logits",
    "top_k_mask",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
#: What a block accepts as its ``score`` option.
ScoreSpec = str | nn.Module | ScoreFn | None

SCORE_NAMES = ("dot", "additive", "gaussian")


@runtime_checkable
class DotForm(Protocol):
    """A score equal (up to a per-query constant) to ``q' . k' + bias``: it can use the fused kernel."""

    def as_dot(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q: (B, H, Nq, Dh)``, ``k: (B, H, Nk, Dh)`` -> ``q'``, ``k'`` and ``bias: (B, H, 1, Nk)``."""
        ...


class GaussianScore(nn.Module):
    """Gaussian-kernel score ``-||q - k||^2 / (2 h^2)``, one bandwidth ``h`` per head.

    The softmax of these logits is Nadaraya-Watson weighting with a Gaussian kernel. Since
    ``||q||^2`` is the same for every key of a query, the softmax equals that of
    ``(q . k - ||k||^2 / 2) / h^2``: one matrix product plus a per-key bias, which
    :meth:`as_dot` hands to the fused attention kernel.

    Args:
        num_heads: heads ``H``.
        bandwidth: initial (or fixed) ``h``, a positive number or one per head. The blocks use
            ``Dh ** 0.25``, which gives the ``q . k`` term the scaled dot product's temperature.
        learnable: train ``log h`` (a parameter) or keep ``h`` fixed (a buffer).

    Example:
        >>> GaussianScore(2, bandwidth=0.5)(torch.zeros(1, 2, 1, 3), torch.ones(1, 2, 4, 3))[0, 0, 0]
        tensor([-6., -6., -6., -6.], grad_fn=<SelectBackward0>)
    """

    def __init__(self, num_heads: int, bandwidth: float | Tensor = 1.0, learnable: bool = True) -> None:
        super().__init__()
        h = torch.as_tensor(bandwidth, dtype=torch.float32).flatten()
        if h.numel() == 1:
            h = h.expand(num_heads)
        if h.numel() != num_heads or not bool((h > 0).all()):
            raise ValueError(f"bandwidth: expected a positive number or {num_heads} of them, got {bandwidth}")
        log_h = h.log().clone()
        if learnable:
            self.log_bandwidth = nn.Parameter(log_h)
        else:
            self.register_buffer("log_bandwidth", log_h)
        self.num_heads, self.learnable = num_heads, learnable

    @property
    def bandwidth(self) -> Tensor:
        """``h``: ``(H,)``."""
        return self.log_bandwidth.exp()

    def _inv_h2(self, like: Tensor) -> Tensor:
        return (-2 * self.log_bandwidth).exp().to(like.dtype).view(1, -1, 1, 1)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        """``q: (B, H, Nq, Dh)``, ``k: (B, H, Nk, Dh)`` -> logits ``(B, H, Nq, Nk)``, all ``<= 0``."""
        sq = (
            q.square().sum(-1, keepdim=True)
            + k.square().sum(-1).unsqueeze(-2)
            - 2 * (q @ k.transpose(-1, -2))
        )
        return sq.clamp_min(0.0) * (-0.5 * self._inv_h2(q))

    def as_dot(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q / h^2, k, -||k||^2 / (2 h^2))``: the same softmax as :meth:`forward`."""
        inv = self._inv_h2(q)
        return q * inv, k, k.square().sum(-1).unsqueeze(-2) * (-0.5 * inv)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, learnable={self.learnable}"


def make_score(spec: ScoreSpec, num_heads: int, head_dim: int) -> nn.Module | ScoreFn | None:
    """Resolve a block's ``score`` option.

    ``None`` or ``"dot"`` -> ``None`` (the fused dot product); ``"gaussian"`` -> a
    :class:`GaussianScore` with learnable bandwidth starting at ``head_dim ** 0.25``;
    ``"additive"`` -> an :class:`AdditiveScore`; an ``nn.Module`` or callable is used as is (one
    module passed to several blocks is shared by them).
    """
    if spec is None or spec == "dot":
        return None
    if isinstance(spec, str):
        if spec == "gaussian":
            return GaussianScore(num_heads, bandwidth=head_dim**0.25)
        if spec == "additive":
            return AdditiveScore(num_heads, head_dim)
        raise ValueError(
            f"score: expected one of {', '.join(SCORE_NAMES)}, a module or a callable, got {spec!r}"
        )
    if isinstance(spec, nn.Module) or callable(spec):
        return spec
    raise TypeError(
        f"score: expected a name, an nn.Module or a callable (q, k) -> logits, got {type(spec).__name__}"
    )


def score_logits(q: Tensor, k: Tensor, score: ScoreFn | None = None, scale: float | None = None) -> Tensor:
    """Attention logits ``(B, H, Nq, Nk)`` of ``q: (B, H, Nq, Dh)`` against ``k: (B, H, Nk, Dh)``.

    ``score=None`` is the dot product with ``scale`` defaulting to ``1/sqrt(Dh)``; for any other
    score, ``scale`` (default 1) multiplies the score's logits.
    """
    if score is None:
        s = q.shape[-1] ** -0.5 if scale is None else scale
        return (q @ k.transpose(-1, -2)) * s
    logits = score(q, k)
    expected = (*k.shape[:2], q.shape[2], k.shape[2])
    if not isinstance(logits, Tensor) or tuple(logits.shape) != expected:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"score: must return logits of shape (B, H, Nq, Nk) = {expected}, got {got}")
    return logits if scale is None else logits * scale


@torch.no_grad()
def top_k_mask(logits: Tensor, k: int, keep: Tensor | None = None) -> Tensor:
    """For each row of ``logits: (..., Nk)``, True at its ``k`` highest entries among ``keep``.

    Ties at the ``k``-th value go to the lower key index, so the selection is deterministic (and
    only in exact ties depends on the order of the keys). ``keep`` (broadcastable bool) excludes
    keys from selection; a row with fewer than ``k`` kept keys selects all of them.
    """
    if k < 1:
        raise ValueError(f"top_k: expected a positive integer, got {k}")
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    above = logits > kth
    tied = logits == kth
    if keep is not None:
        tied &= keep
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def masked_softmax(
    logits: Tensor, mask: Tensor | None = None, top_k: int | None = None, *, inplace: bool = False
) -> Tensor:
    """Attention weights from ``logits: (B, H, Nq, Nk)`` over the real (and, with ``top_k``, selected) keys.

    Args:
        logits: attention logits.
        mask: ``(B, Nk)`` bool, True for real keys, or ``None``.
        top_k: keep only each query's ``top_k`` highest-scoring real keys (see :func:`top_k_mask`);
            the others get weight exactly 0 and the kept weights are renormalised. Gradients flow
            through the kept weights; the selection itself is piecewise constant.
        inplace: write the weights over ``logits`` (no second ``(B, H, Nq, Nk)`` tensor). Honoured
            only where no gradient flows through ``logits``; otherwise a new tensor is returned.

    Returns:
        ``(B, H, Nq, Nk)``, rows summing to 1, or all zero (with zero gradient) for a query
        whose keys are all masked.
    """
    inplace = inplace and not (logits.requires_grad and torch.is_grad_enabled())
    keep = None if mask is None else mask[:, None, None, :]
    if top_k is not None and top_k < logits.shape[-1]:
        keep = top_k_mask(logits.detach(), top_k, keep)
    if keep is None:
        return _softmax_(logits) if inplace else torch.softmax(logits, dim=-1)
    empty = ~keep.any(dim=-1, keepdim=True)
    # Empty rows get uniform dummy logits (finite softmax), then zero weights; masked_fill passes
    # no gradient back through either fill.
    if inplace:
        return _softmax_(logits.masked_fill_(~keep, float("-inf")).masked_fill_(empty, 0.0)).masked_fill_(
            empty, 0.0
        )
    logits = logits.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)


def _softmax_(x: Tensor) -> Tensor:
    """``softmax(x, -1)`` written over ``x``; every row needs a finite entry."""
    if x.shape[-1] == 0:  # no keys: nothing to normalise (amax has no identity)
        return x
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    score: ScoreFn | None = None,
    top_k: int | None = None,
) -> Tensor:
    """The attention weights ``(B, H, Nq, Nk)`` that :func:`settransformer.attention.attention` applies.

    ``q: (B, H, Nq, Dh)`` (batch 1 broadcasts), ``k: (B, H, Nk, Dh)``, ``mask: (B, Nk)``; ``scale``
    and ``score`` as in :func:`score_logits`, ``top_k`` as in :func:`masked_softmax`.
    """
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], -1, -1, -1)
    logits = score_logits(q, k, score, scale)
    # Logits that are surely a new tensor (ours, or scaled here) become the weights in place when
    # no gradient is needed: inference holds one (B, H, Nq, Nk) tensor instead of two.
    fresh = score is None or scale is not None or isinstance(score, (AdditiveScore, GaussianScore))
    return masked_softmax(logits, mask, top_k, inplace=fresh)
