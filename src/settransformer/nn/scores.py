"""Attention scores beyond the dot product, and hard (top-k) attention.

A *score* maps per-head queries and keys to attention logits::

    score(q: (B, H, Nq, Dh), k: (B, H, Nk, Dh)) -> (B, H, Nq, Nk)

Any callable with that signature works; scores with parameters are ``nn.Module`` s, so a block
that owns one trains it and keeps it in its state dict. The logits then go through the same masked
softmax as the dot product ([`masked_softmax`][settransformer.nn.scores.masked_softmax]), so masks, the
empty-set rule (a query whose keys are all masked gets weight zero everywhere) and hard top-k selection apply
to every score. Scores must be finite (with finite gradients) at zero keys: the blocks zero-fill padded rows.

Built in (``make_score`` names):

- ``"dot"``: ``q . k / sqrt(Dh)`` via PyTorch's fused kernel (represented by ``None``).
- ``"gaussian"``: [`GaussianScore`][settransformer.nn.scores.GaussianScore], ``-||q - k||^2 / (2 h^2)`` with a
  bandwidth ``h`` per head.
- ``"additive"``: [`AdditiveScore`][settransformer.nn.scores.AdditiveScore], Bahdanau's
  ``w^T tanh(W_q q + W_k k + b)`` per head.

A score that is a dot product in disguise may also define ``as_dot(q, k) -> (q', k', bias)`` with
``score(q, k) = q' . k' + bias + c`` (``bias: (B, H, 1, Nk)``, ``c`` constant per query, which the
softmax ignores); attention then runs through the fused kernel
([`DotForm`][settransformer.nn.scores.DotForm]).

Examples:
    >>> q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
    >>> attention_weights(q, k, score=GaussianScore(4), top_k=2).shape
    torch.Size([2, 4, 3, 5])


The additive (Bahdanau) attention score and the two kernels that compute it without storing
the ``(B, H, Nq, Nk, hidden)`` pre-activations.

Both kernels compute ``out[b,h,i,j] = sum_a u[h,a] sigmoid(p[b,h,i,a] + r[b,h,a,j])``
([`AdditiveScore`][settransformer.nn.scores.AdditiveScore] folds ``tanh z = 2 sigmoid(2z) - 1`` into ``p``,
``r`` and ``u``):

- `_FactoredSigmoids`, the fast one: with ``P = exp(p - c)`` and ``R = exp(-r - c)``,
  ``sigmoid(p + r) = P / (P + R)``. The exponentials are taken once per query and once per key,
  so each of the ``B H Nq Nk hidden`` terms costs an addition and a division instead of an
  exponential. ``c`` (per batch, head and hidden unit) centres the exponents; it is used while the
  exponents stay within float range, which [`factored_range`][settransformer.nn.scores.factored_range] checks.
- `_Sigmoids`, the fallback for every other case (wide-ranging pre-activations, half
  precision): one ``sigmoid`` per term.

Both recompute their blocks in a hand-written backward pass, so neither is twice differentiable."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .validation import check_top_k, func_transformed, tracing

__all__ = [
    "AdditiveScore",
    "DotForm",
    "GaussianScore",
    "ScoreFn",
    "ScoreSpec",
    "attention_weights",
    "check_score",
    "factored_range",
    "make_score",
    "masked_softmax",
    "score_logits",
    "softmax",
    "softmax_in_passes",
    "softmax_scale",
    "top_k_mask",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
ScoreSpec = str | nn.Module | ScoreFn | None
"""What a block accepts as its ``score`` option."""

SCORE_NAMES = ("dot", "additive", "gaussian")
"""The names of the built-in scores a block's ``score`` option accepts
([`make_score`][settransformer.nn.scores.make_score])."""


def softmax_scale(head_dim: int, scale: float | None = None) -> float:
    """The dot product's softmax temperature: ``scale``, or ``1 / sqrt(head_dim)`` when ``None``.

    Examples:
        >>> softmax_scale(16), softmax_scale(16, 0.5)
        (0.25, 0.5)
    """
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


CPU_VECTOR_BYTES = 64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32
"""Bytes in one vector of PyTorch's CPU kernels on this machine: 64 with AVX-512, else 32 (AVX2)."""
SHORT_ROW = CPU_VECTOR_BYTES // 4
"""Rows of float32 shorter than this (one vector; half as long in float64) are normalised by
[`softmax`][settransformer.nn.scores.softmax] in three vectorised passes on a CPU. PyTorch's CPU softmax
vectorises along a row and runs a scalar loop over a row shorter than one vector, so which is faster
depends on the machine (``benchmarks/kernels.py``): 4.8-6.6x for the passes at 20,000 rows of 4-15 in
``results/kernels.md`` (PyTorch's kernel slow up to 15 floats and fast from 16: 16-float
vectors, AVX-512); with AVX2 (``results/kernels-avx2.md``) 2.3-2.9x at 20,000 rows of 2-7,
but 0.3-0.6x at rows of 8-15, which PyTorch's kernel covers with vectors."""
SHORT_ROW_MIN_ELEMENTS = 4096
"""Fewest values for the three passes: below it their four launches cost more than the scalar
loop saves (``results/kernels-avx2.md``: 0.86-1.27x at 512 rows of 2-7, 1.3-1.7x at 2,048)."""


def softmax(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``torch.softmax(x, dim=-1)`` for ``x: (..., L)``, computed the faster exact way.

    Without autograd, rows shorter than one CPU vector ([`SHORT_ROW`][settransformer.nn.scores.SHORT_ROW]
    floats) in a tensor of at least
    [`SHORT_ROW_MIN_ELEMENTS`][settransformer.nn.scores.SHORT_ROW_MIN_ELEMENTS] float32/float64 values on a
    CPU are computed as ``exp(x - max) / sum`` (in place on one new tensor, or on ``out``); otherwise, and
    while tracing or compiling (a graph holds one softmax), PyTorch's kernel.

    Examples:
        >>> x = torch.randn(4, 10)
        >>> with torch.no_grad():
        ...     torch.allclose(softmax(x), torch.softmax(x, dim=-1))
        True
    """
    if not softmax_in_passes(x):
        return torch.softmax(x, dim=-1) if out is None else torch.softmax(x, dim=-1, out=out)
    return _softmax_passes(x, out)


def softmax_in_passes(x: Tensor) -> bool:
    """Whether [`softmax`][settransformer.nn.scores.softmax] normalises ``x: (..., L)`` in three passes (rows
    shorter than one CPU vector, at least
    [`SHORT_ROW_MIN_ELEMENTS`][settransformer.nn.scores.SHORT_ROW_MIN_ELEMENTS] values, no autograd) or calls
    PyTorch's kernel.

    Examples:
        >>> with torch.no_grad():
        ...     softmax_in_passes(torch.zeros(4096, 4)), softmax_in_passes(torch.zeros(4096, 64))
        (True, False)
    """
    return not (
        tracing()  # first: no guard on the sizes below
        or func_transformed(x)  # vmap has no rule for the out= ops
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or (x.requires_grad and torch.is_grad_enabled())
        or x.shape[-1] * x.element_size() >= CPU_VECTOR_BYTES
        or x.numel() < SHORT_ROW_MIN_ELEMENTS
        or x.shape[-1] == 0
    )


def _softmax_passes(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``exp(x - max) / sum`` along the last dimension, in place on one new tensor or on ``out``."""
    e = torch.sub(x, x.amax(-1, keepdim=True), out=out).exp_()
    return e.div_(e.sum(-1, keepdim=True))


@runtime_checkable
class DotForm(Protocol):
    """A score equal (up to a per-query constant) to ``q' . k' + bias``: it can use the fused kernel.

    Examples:
        >>> isinstance(GaussianScore(2), DotForm), isinstance(AdditiveScore(2, 4), DotForm)
        (True, False)
    """

    def as_dot(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q: (B, H, Nq, Dh)``, ``k: (B, H, Nk, Dh)`` -> ``q'``, ``k'`` and ``bias: (B, H, 1, Nk)``."""
        ...


class GaussianScore(nn.Module):
    """Gaussian-kernel score ``-||q - k||^2 / (2 h^2)``, one bandwidth ``h`` per head.

    The softmax of these logits is Nadaraya-Watson weighting with a Gaussian kernel. Since
    ``||q||^2`` is the same for every key of a query, the softmax equals that of
    ``(q . k - ||k||^2 / 2) / h^2``: one matrix product plus a per-key bias, which
    [`as_dot`][settransformer.nn.scores.GaussianScore.as_dot] hands to the fused attention kernel.

    Args:
        num_heads: heads ``H``.
        bandwidth: initial (or fixed) ``h``, a positive number or one per head. The blocks use
            ``Dh ** 0.25``, which gives the ``q . k`` term the scaled dot product's temperature.
        learnable: train ``log h`` (a parameter) or keep ``h`` fixed (a buffer).

    Examples:
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

    @staticmethod
    def _centred(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``q`` and ``k`` less the mean of the queries (per set and head). The score depends only on
        ``q - k``; expanding ``||q - k||^2`` far from the origin would cancel away every digit. The
        queries, not the keys: padded keys may hold anything, and the score never sees the mask."""
        centre = q.detach().mean(-2, keepdim=True).nan_to_num(0.0)  # no queries: 0 / 0, no centre
        return q - centre, k - centre

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        """``q: (B, H, Nq, Dh)``, ``k: (B, H, Nk, Dh)`` -> logits ``(B, H, Nq, Nk)``, all ``<= 0``."""
        q, k = self._centred(q, k)
        sq = (
            q.square().sum(-1, keepdim=True)
            + k.square().sum(-1).unsqueeze(-2)
            - 2 * (q @ k.transpose(-1, -2))
        )
        return sq.clamp_min(0.0) * (-0.5 * self._inv_h2(q))

    def as_dot(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q / h^2, k, -||k||^2 / (2 h^2))``: the same softmax as
        [`forward`][settransformer.nn.scores.GaussianScore.forward]."""
        inv = self._inv_h2(q)
        q, k = self._centred(q, k)
        return q * inv, k, k.square().sum(-1).unsqueeze(-2) * (-0.5 * inv)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, learnable={self.learnable}"


def check_score(spec: object) -> ScoreSpec:
    """Check a block's ``score`` option: ``None``, a name of
    [`SCORE_NAMES`][settransformer.nn.scores.SCORE_NAMES], a module or a callable.

    Examples:
        >>> check_score("gaussian")
        'gaussian'
    """
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        if spec not in SCORE_NAMES:
            raise ValueError(
                f"score: expected one of {', '.join(SCORE_NAMES)}, a module or a callable, got {spec!r}"
            )
        return spec
    if callable(spec):
        return spec
    raise TypeError(
        f"score: expected a name, an nn.Module or a callable (q, k) -> logits, got {type(spec).__name__}"
    )


def make_score(spec: ScoreSpec, num_heads: int, head_dim: int) -> nn.Module | ScoreFn | None:
    """Resolve a block's ``score`` option (checked by [`check_score`][settransformer.nn.scores.check_score]).

    ``None`` or ``"dot"`` -> ``None`` (the fused dot product); ``"gaussian"`` -> a
    [`GaussianScore`][settransformer.nn.scores.GaussianScore] with learnable bandwidth starting at
    ``head_dim ** 0.25``; ``"additive"`` -> an [`AdditiveScore`][settransformer.nn.scores.AdditiveScore]; an
    ``nn.Module`` or callable is used as is (one module passed to several blocks is shared by them).

    Examples:
        >>> make_score("dot", 4, 8) is None, type(make_score("gaussian", 4, 8)).__name__
        (True, 'GaussianScore')
    """
    spec = check_score(spec)
    if spec is None or spec == "dot":
        return None
    if spec == "gaussian":
        return GaussianScore(num_heads, bandwidth=head_dim**0.25)
    if spec == "additive":
        return AdditiveScore(num_heads, head_dim)
    assert not isinstance(spec, str)
    # a score module built for other heads fails deep inside the forward pass: say so here
    for name, wanted in (("num_heads", num_heads), ("head_dim", head_dim)):
        got = getattr(spec, name, None)
        if isinstance(got, int) and got != wanted:
            raise ValueError(
                f"score: {type(spec).__name__} was built for {name}={got}, but the block has {name}={wanted}"
            )
    return spec


def score_logits(q: Tensor, k: Tensor, score: ScoreFn | None = None, scale: float | None = None) -> Tensor:
    """Attention logits ``(B, H, Nq, Nk)`` of ``q: (B, H, Nq, Dh)`` against ``k: (B, H, Nk, Dh)``.

    ``score=None`` is the dot product with ``scale`` defaulting to ``1/sqrt(Dh)``; for any other
    score, ``scale`` (default 1) multiplies the score's logits.

    Examples:
        >>> q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
        >>> score_logits(q, k).shape, score_logits(q, k, GaussianScore(4)).shape
        (torch.Size([2, 4, 3, 5]), torch.Size([2, 4, 3, 5]))
    """
    if score is None:
        return (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1], scale)
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

    Examples:
        >>> top_k_mask(torch.tensor([[0.1, 0.5, 0.5, 0.2], [1.0, 1.0, 1.0, 0.0]]), 2)
        tensor([[False,  True,  True, False],
                [ True,  True, False, False]])
        >>> top_k_mask(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2, keep=torch.tensor([True, False, True, True]))
        tensor([False, False,  True,  True])
    """
    check_top_k(k)
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
        top_k: keep only each query's ``top_k`` highest-scoring real keys (see
            [`top_k_mask`][settransformer.nn.scores.top_k_mask]); the others get weight exactly 0 and the kept
            weights are renormalised. Gradients flow through the kept weights; the selection itself is
            piecewise constant.
        inplace: write the weights over ``logits`` (no second ``(B, H, Nq, Nk)`` tensor). Honoured
            only where no gradient flows through ``logits``; otherwise a new tensor is returned.

    Returns:
        ``(B, H, Nq, Nk)``, rows summing to 1, or all zero (with zero gradient) for a query
            whose keys are all masked.

    Examples:
        >>> mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
        >>> masked_softmax(torch.zeros(2, 1, 1, 4), mask)[:, 0, 0]
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.0000]])
        >>> masked_softmax(torch.tensor([[[[3.0, 1.0, 2.0]]]]), top_k=1)
        tensor([[[[1., 0., 0.]]]])
    """
    inplace = inplace and not (logits.requires_grad and torch.is_grad_enabled())
    keep = None if mask is None else mask[:, None, None, :]
    if top_k is not None and top_k < logits.shape[-1]:
        keep = top_k_mask(logits.detach(), top_k, keep)
    if keep is None:
        return _softmax_(logits) if inplace else softmax(logits)
    empty = ~keep.any(dim=-1, keepdim=True)
    # Empty rows get uniform dummy logits (finite softmax), then zero weights; masked_fill passes
    # no gradient back through either fill.
    if inplace:
        return _softmax_(logits.masked_fill_(~keep, float("-inf")).masked_fill_(empty, 0.0)).masked_fill_(
            empty, 0.0
        )
    logits = logits.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    return softmax(logits).masked_fill(empty, 0.0)


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
    """The attention weights ``(B, H, Nq, Nk)`` that
    [`settransformer.nn.attention.attention`][settransformer.nn.attention.attention] applies.

    ``q: (B, H, Nq, Dh)`` (batch 1 broadcasts), ``k: (B, H, Nk, Dh)``, ``mask: (B, Nk)``; ``scale``
    and ``score`` as in [`score_logits`][settransformer.nn.scores.score_logits], ``top_k`` as in
    [`masked_softmax`][settransformer.nn.scores.masked_softmax].

    Examples:
        >>> w = attention_weights(torch.randn(1, 4, 3, 8), torch.randn(2, 4, 5, 8), top_k=2)
        >>> w.shape, bool(((w > 0).sum(-1) == 2).all()), torch.allclose(w.sum(-1), torch.ones(2, 4, 3))
        (torch.Size([2, 4, 3, 5]), True, True)
    """
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], -1, -1, -1)
    logits = score_logits(q, k, score, scale)
    # Logits that are surely a new tensor (ours, or scaled here) become the weights in place when
    # no gradient is needed: inference holds one (B, H, Nq, Nk) tensor instead of two.
    fresh = score is None or scale is not None or isinstance(score, (AdditiveScore, GaussianScore))
    return masked_softmax(logits, mask, top_k, inplace=fresh)


_SPAN_LIMIT = {torch.float32: 80.0, torch.float64: 1000.0}
"""Largest spread of the exponents ``p`` and ``-r`` (per batch, head and hidden unit) for which
the factored kernel runs: after centring, ``exp`` of at most half of it stays a normal number
(float32: ``exp(40)`` is 2e17, ``exp(-40)`` 4e-18)."""


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

    The fallback of `_FactoredSigmoids`, for any range and dtype. The pre-activations are
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

    Examples:
        >>> p, r = torch.tensor([0.0, 4.0]).view(1, 1, 2, 1), torch.tensor([-2.0, 2.0]).view(1, 1, 1, 2)
        >>> factored_range(p, r)
        (tensor([[[1.]]]), tensor([[[6.]]]))
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

    Examples:
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
