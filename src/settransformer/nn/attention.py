"""Multi-head attention over sets: the one attention function every block calls.

Tensors keep the heads as their own dimension, ``(B, H, N, head_dim)``, so splitting and merging
heads are views (no ``split``/``cat`` copies). The scores go through PyTorch's fused
`torch.nn.functional.scaled_dot_product_attention` kernel or through two batched products
and a softmax, whichever [`choose_kernel`][settransformer.nn.attention.choose_kernel] finds faster for the
shape.

Masks follow PyTorch Geometric's ``to_dense_batch``: a boolean ``mask`` of shape ``(B, N)`` in
which ``True`` marks a real element and ``False`` padding.

The empty-set rule: a query whose keys are *all* masked (the set is empty) gets an attention
output of exactly zero, with finite gradients, on every supported torch version. Softmax over an
all ``-inf`` row is NaN, so such rows are instead given every key (padding is zero-filled by the
blocks, so those keys are finite) and the result is then replaced by zero with ``masked_fill``,
which passes no gradient back through the replaced rows.
"""

from __future__ import annotations

from functools import cache
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .scores import CPU_VECTOR_BYTES, DotForm, ScoreFn, attention_weights, softmax, softmax_scale
from .sets import accumulation_dtype
from .validation import check_probability, check_scale, check_top_k, func_transformed, tracing

__all__ = [
    "EXPLICIT_MAX_SCORES",
    "EXPLICIT_MIN_SMALL_QUERIES",
    "EXPLICIT_MIN_SMALL_SCORES",
    "EXPLICIT_MIN_WORK",
    "FUSED_MAX_QUERIES",
    "FUSED_MIN_KEYS",
    "GPU_EXPLICIT_MIN_SERIAL",
    "GPU_ROWS_PER_PROGRAM",
    "KERNELS",
    "REWRITE_MIN_SET",
    "FormSizes",
    "Kernel",
    "attention",
    "cheapest_form",
    "choose_kernel",
    "induced_attention",
    "induced_is_cheaper",
    "merge_heads",
    "pooled_attention",
    "split_heads",
]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """View ``x: (B, N, H * Dh)`` as ``(B, H, N, Dh)`` without copying.

    Examples:
        >>> split_heads(torch.zeros(2, 5, 8), num_heads=4).shape
        torch.Size([2, 4, 5, 2])
    """
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """Inverse of [`split_heads`][settransformer.nn.attention.split_heads]:
    ``(B, H, N, Dh) -> (B, N, H * Dh)``.

    Free when ``x`` is laid out as ``(B, N, H, Dh)`` in memory, which is what the fused CPU and
    CUDA kernels return.

    Examples:
        >>> x = torch.randn(2, 5, 8)
        >>> torch.equal(merge_heads(split_heads(x, 4)), x)
        True
    """
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    score: ScoreFn | None = None,
    top_k: int | None = None,
    kernel: Kernel = "auto",
) -> Tensor:
    """Scaled dot-product (or any other score's) attention of queries over a (possibly padded) set of keys.

    Args:
        q: queries ``(B, H, Nq, Dh)``; a batch size of 1 is broadcast over the keys' batch
            (used for learned inducing points and seeds, which are shared by every set).
        k: keys ``(B, H, Nk, Dh)``.
        v: values ``(B, H, Nk, Dv)``.
        mask: ``(B, Nk)`` boolean, True for real keys. ``None`` means every key is real.
        scale: softmax temperature; ``1 / sqrt(Dh)`` (per-head width) when ``None``. With a
            ``score``, it multiplies the score's logits (default 1).
        dropout_p: dropout on the attention weights (pass 0 in evaluation).
        score: ``score(q, k) -> (B, H, Nq, Nk)`` logits instead of the dot product (see
            [`settransformer.nn.scores`][settransformer.nn.scores]); ``None`` is the dot product on the fused
            kernel.
        top_k: hard attention: each query keeps only its ``top_k`` highest-scoring real keys
            (ties to the lower key index), renormalised; the others get weight exactly 0.
        kernel: how a dot product is computed: ``"fused"`` (PyTorch's fused kernel),
            ``"explicit"`` (batched products and a softmax) or ``"auto"`` (the faster one for the
            shape, [`choose_kernel`][settransformer.nn.attention.choose_kernel]). Both compute the same
            function.

    Returns:
        ``(B, H, Nq, Dv)``. Rows of an empty set (all keys masked) are exactly zero.

    Raises:
        TypeError: a non-tensor or non-float ``q``/``k``/``v``, mixed dtypes, a non-bool ``mask``.
        ValueError: shapes that do not fit together, ``dropout_p`` outside ``[0, 1)``, a bad ``top_k``.

    Padded keys and values (``mask`` False) are zero-filled first, so they may hold anything,
    NaN included. (The blocks call the unchecked `_attention` on already zero-filled sets.)

    Examples:
        >>> q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
        >>> mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
        >>> attention(q, k, k, mask).shape
        torch.Size([2, 4, 3, 8])
    """
    mask = _check_attention(q, k, v, mask, dropout_p, score, top_k)
    check_scale(scale)
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if mask is not None:  # padded keys must be finite (see the empty-set rule above)
        k, v = (t.masked_fill(~mask[:, None, :, None], 0.0) for t in (k, v))
    return _attention(
        q, k, v, mask, scale=scale, dropout_p=dropout_p, score=score, top_k=top_k, kernel=kernel
    )


def _check_attention(
    q: object, k: object, v: object, mask: object, dropout_p: object, score: object, top_k: object
) -> Tensor | None:
    """The argument checks of [`attention`][settransformer.nn.attention.attention]; returns the mask."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        expected = "a floating-point tensor of shape (B, H, N, D)"
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected {expected}, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected {expected}, got dtype {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected {expected}, got shape {tuple(t.shape)}")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if score is not None and not callable(score):
        named = isinstance(score, str)
        hint = f" (build it with scores.make_score({score!r}, num_heads, head_dim))" if named else ""
        raise TypeError(f"score: expected None or a callable (q, k) -> logits, got {score!r}{hint}")
    b, h, nk = k.shape[:3]
    if q.shape[0] not in (1, b) or q.shape[1] != h:
        raise ValueError(
            f"q: expected shape ({b} or 1, {h}, Nq, D) to match k's batch and heads, got {tuple(q.shape)}"
        )
    if (score is None or isinstance(score, DotForm)) and q.shape[3] != k.shape[3]:
        raise ValueError(f"q: expected {k.shape[3]} features per head like k, got shape {tuple(q.shape)}")
    if tuple(v.shape[:3]) != (b, h, nk):
        raise ValueError(f"v: expected shape ({b}, {h}, {nk}, Dv) to match k, got {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    check_probability("dropout_p", dropout_p)
    check_top_k(top_k)
    if mask is None:
        return None
    expected = f"a bool tensor of shape (B, Nk) = ({b}, {nk}), True for real keys"
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected {expected}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected {expected}, got dtype {mask.dtype} (for 0/1: mask.bool())")
    if tuple(mask.shape) != (b, nk):
        raise ValueError(f"mask: expected {expected}, got shape {tuple(mask.shape)}")
    if mask.device != k.device:
        raise ValueError(f"mask: is on {mask.device} but k is on {k.device}")
    return mask


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    score: ScoreFn | None = None,
    top_k: int | None = None,
    kernel: Kernel = "auto",
) -> Tensor:
    """[`attention`][settransformer.nn.attention.attention] without argument checks; keys and values must be
    finite at padded rows."""
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], -1, -1, -1)
    bias = None
    if top_k is not None or (score is not None and not isinstance(score, DotForm)):
        wide = accumulation_dtype(q.dtype)  # 16-bit scores in float32, as in _explicit_sdpa
        if score is None and wide != q.dtype:
            weights = attention_weights(q.to(wide), k.to(wide), mask, scale=scale, top_k=top_k).to(v.dtype)
        else:
            weights = attention_weights(q, k, mask, scale=scale, score=score, top_k=top_k)
        return F.dropout(weights, dropout_p) @ v if dropout_p > 0 else weights @ v
    if score is not None:  # a dot product plus a per-key bias: still the fused kernel
        q, k, bias = score.as_dot(q, k)
        scale, bias = (1.0, bias) if scale is None else (scale, bias * scale)
    scale = softmax_scale(q.shape[-1], scale)
    if kernel == "auto":
        kernel = choose_kernel(q, k, v)
    sdpa = _explicit_sdpa if kernel == "explicit" else F.scaled_dot_product_attention
    if mask is None:
        return sdpa(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    empty = ~mask.any(dim=-1)  # (B,)
    attn_mask = (mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, Nk)
    if bias is not None:
        attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
    out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty[:, None, None, None], 0.0)


Kernel = Literal["auto", "fused", "explicit"]
KERNELS: tuple[Kernel, ...] = get_args(Kernel)
"""The ways [`attention`][settransformer.nn.attention.attention] computes a dot product (see its ``kernel``
argument)."""

# Calibration of choose_kernel: benchmarks/kernels.py times both kernels at the shapes the blocks
# run (2 threads of an x86 CPU; the table is benchmarks/results/kernels.md). The fused CPU kernel
# wins where each (batch, head) has little work (a handful of queries and keys: its one call beats
# three) and for large score matrices (it never stores them); the explicit form wins in between,
# most where the keys are few (a set over its inducing points: 1.3-2.5x, forward and backward),
# and under autograd for the pooled form's stacked queries (1.05-1.2x), at every set size: there the
# scores are no larger than the keys autograd keeps anyway, so the size limit below does not apply.
# But a pooling's few seeds over a larger set (PMA: at most 16 stacked queries over 100 keys or
# more) keep the fused kernel: under autograd 1.12-1.72x in results/kernels-avx2.md, 1.24x at MoG's
# PMA(4) in results/kernels.md; without autograd 1.07-1.64x at all four such rows of
# results/kernels-avx512.md and 1.10-1.46x at three of four in results/kernels-avx2.md (the point cloud's
# PMA(1) at 100 elements there: explicit 1.21x). Without autograd, a single (batch, head) keeps the
# fused kernel, which splits its queries over the threads.
EXPLICIT_MIN_WORK = 2048
"""Fewest multiply-adds per (batch, head), ``Nq * Nk * Dh``, for the explicit kernel."""
FUSED_MAX_QUERIES = 16
"""At most this many queries per (batch, head) over
[`FUSED_MIN_KEYS`][settransformer.nn.attention.FUSED_MIN_KEYS] keys or more take the fused kernel
(a pooling's few seeds over a set), with or without autograd."""
FUSED_MIN_KEYS = 100
"""See [`FUSED_MAX_QUERIES`][settransformer.nn.attention.FUSED_MAX_QUERIES]."""
EXPLICIT_MAX_SCORES = 3 * 2**20
"""Most scores in all, ``B * H * Nq * Nk``, for the explicit kernel (it stores them: 12 MB in float32)."""
# Below EXPLICIT_MIN_WORK the fused CPU kernel still pays a fixed cost per (batch, head) and query
# tile, about a microsecond, where the explicit kernel pays a few launches once. Without autograd
# and with rows short enough for the softmax's vectorised passes (scores.SHORT_ROW), many small
# (batch, head)s together make the explicit kernel faster: on AVX-512 CPUs, max regression's SAB
# at (128, 4, 10, 10, 16) 1.73x and 1.83x in results/kernels-avx512.md and results/kernels.md;
# below about 20k scores in all, or with fewer than 4 queries (a PMA's seeds), the fused kernel
# stays ahead. With AVX2 the passes cover only rows of under 8 and this region is unmeasured, so
# there the fused kernel keeps it.
EXPLICIT_MIN_SMALL_SCORES = 20_480
"""Fewest scores in all, ``B * H * Nq * Nk``, for the explicit kernel where each (batch, head) has
less than [`EXPLICIT_MIN_WORK`][settransformer.nn.attention.EXPLICIT_MIN_WORK] (no autograd, at
least [`EXPLICIT_MIN_SMALL_QUERIES`][settransformer.nn.attention.EXPLICIT_MIN_SMALL_QUERIES] queries,
AVX-512)."""
EXPLICIT_MIN_SMALL_QUERIES = 4
"""See [`EXPLICIT_MIN_SMALL_SCORES`][settransformer.nn.attention.EXPLICIT_MIN_SMALL_SCORES]."""


# On a GPU: PyTorch's fused CUDA kernels (flash, memory-efficient) give each thread block a tile of
# queries of one (batch, head) and walk every key in turn; their backward gives each a tile of keys
# and walks every query. A few queries over a long set (an ISAB's inducing points, a PMA's seeds),
# or in the backward pass a long set over a few keys, leave most of the GPU idle while a handful of
# blocks walk the set. Two batched products and a softmax spread that work over the whole device.
# Seen in results/peers-cuda.md (H200, float32): the ISAB forward at N >= 10k at 0.45x the official
# code's bmm + softmax, forward+backward at N = 100k at 0.33x.
GPU_ROWS_PER_PROGRAM = 64
"""Queries (keys, in the backward pass) per thread block of the fused CUDA kernels, as the rule counts
them."""
GPU_EXPLICIT_MIN_SERIAL = 4096
"""Fewest keys (queries, in the backward pass) each thread block walks for the explicit kernel on a
GPU; below it the walk is short and the fused kernel's single launch wins."""


def _gpu_kernel(b: int, h: int, nq: int, nk: int, dh: int, grad: bool, processors: int) -> Kernel:
    """[`choose_kernel`][settransformer.nn.attention.choose_kernel]'s rule on a GPU with ``processors``
    streaming multiprocessors: explicit where the fused kernel would run fewer thread blocks than the
    device has processors, each over at least
    [`GPU_EXPLICIT_MIN_SERIAL`][settransformer.nn.attention.GPU_EXPLICIT_MIN_SERIAL] rows, and the
    scores are no larger than the queries or keys (``min(Nq, Nk) <= Dh``)."""
    if min(nq, nk) > dh:
        return "fused"

    def programs(rows: int) -> int:
        return b * h * -(-rows // GPU_ROWS_PER_PROGRAM)

    if programs(nq) < processors and nk >= GPU_EXPLICIT_MIN_SERIAL:
        return "explicit"
    if grad and programs(nk) < processors and nq >= GPU_EXPLICIT_MIN_SERIAL:
        return "explicit"
    return "fused"


@cache
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``."""
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def choose_kernel(q: Tensor, k: Tensor, v: Tensor) -> Kernel:
    """The faster dot-product kernel for ``q: (B, H, Nq, D)`` over ``k: (B, H, Nk, D)``,
    ``v: (B, H, Nk, Dv)``: ``"explicit"`` (batched products and a softmax) or ``"fused"``.

    A calibrated rule for the CPU (see [`EXPLICIT_MIN_WORK`][settransformer.nn.attention.EXPLICIT_MIN_WORK],
    [`EXPLICIT_MAX_SCORES`][settransformer.nn.attention.EXPLICIT_MAX_SCORES],
    [`EXPLICIT_MIN_SMALL_SCORES`][settransformer.nn.attention.EXPLICIT_MIN_SMALL_SCORES] and
    [`FUSED_MAX_QUERIES`][settransformer.nn.attention.FUSED_MAX_QUERIES]; ``benchmarks/kernels.py``
    checks it against measurements). On a CUDA device the fused kernel, but for a few queries over
    thousands of keys (or, under autograd, the reverse) where it would leave most of the device idle
    (see [`GPU_EXPLICIT_MIN_SERIAL`][settransformer.nn.attention.GPU_EXPLICIT_MIN_SERIAL]); the fused
    kernel on other devices and while tracing, compiling or exporting, so a graph holds the same
    kernel for every size.
    A rule, not a timer, so a seeded run computes the same bits every time.

    Examples:
        >>> q = torch.randn(10, 4, 450, 32)
        >>> inducing = torch.randn(10, 4, 32, 32)
        >>> choose_kernel(q, inducing, inducing), choose_kernel(q, q, q)
        ('explicit', 'fused')
    """
    if tracing():
        return "fused"
    b, h, nq, dh = k.shape[0], k.shape[1], q.shape[-2], q.shape[-1]
    nk = k.shape[-2]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cuda":
        return _gpu_kernel(b, h, nq, nk, dh, grad, _processors(q.device))
    if q.device.type != "cpu":
        return "fused"
    if nq * nk * dh < EXPLICIT_MIN_WORK:
        return "explicit" if not grad and _many_small(b * h, nq, nk, q) else "fused"
    if nq <= FUSED_MAX_QUERIES and nk >= FUSED_MIN_KEYS:
        return "fused"
    if b * h * nq * nk > EXPLICIT_MAX_SCORES and not (grad and nq <= dh):
        return "fused"
    return "explicit" if grad or b * h > 1 else "fused"


def _many_small(heads: int, nq: int, nk: int, q: Tensor) -> bool:
    """Whether ``heads`` (batch, head)s of ``nq`` queries over ``nk`` keys, each below
    [`EXPLICIT_MIN_WORK`][settransformer.nn.attention.EXPLICIT_MIN_WORK], are many enough for the
    explicit kernel without autograd (see
    [`EXPLICIT_MIN_SMALL_SCORES`][settransformer.nn.attention.EXPLICIT_MIN_SMALL_SCORES])."""
    return (
        CPU_VECTOR_BYTES == 64
        and q.dtype in (torch.float32, torch.float64)
        and nk * q.element_size() < CPU_VECTOR_BYTES
        and nq >= EXPLICIT_MIN_SMALL_QUERIES
        and EXPLICIT_MIN_SMALL_SCORES <= heads * nq * nk <= EXPLICIT_MAX_SCORES
    )


def _explicit_sdpa(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, scale: float
) -> Tensor:
    """`torch.nn.functional.scaled_dot_product_attention` as two batched products and a
    softmax (boolean ``attn_mask``: True = attend; a float one is added to the scores).

    16-bit inputs are computed in float32, as the fused kernel keeps its scores: a float16 score
    overflows at 65,504, and bfloat16's 8 bits of mantissa scramble the softmax of large scores."""
    wide = accumulation_dtype(q.dtype)
    if wide != q.dtype:
        bias = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(wide)
        return _explicit_sdpa(q.to(wide), k.to(wide), v.to(wide), bias, dropout_p, scale).to(q.dtype)
    # the temperature goes on the smallest of q, k and the scores: one pass over it forward, one back
    nq, nk, dh = q.shape[-2], k.shape[-2], q.shape[-1]
    if nq * nk <= min(nq, nk) * dh:
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    elif nq <= nk:
        s = torch.matmul(q * scale, k.transpose(-1, -2))
    else:
        s = torch.matmul(q, (k * scale).transpose(-1, -2))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    # without autograd the weights overwrite the scores: one score-sized tensor at a time
    w = softmax(s, out=None if s.requires_grad or func_transformed(s) else s)
    return torch.matmul(F.dropout(w, dropout_p) if dropout_p > 0 else w, v)


# Two exact rewrites of multi-head attention for the shapes of inducing points and seeds, where
# one side of the attention is a handful of vectors. Both fold a projection into the small side,
# so the large side is never projected (fewer FLOPs, fewer stored activations) and every product
# is one large dense GEMM instead of many tiny per-head ones. The blocks pick the cheaper form
# by counting multiply-adds (cheapest_form); results equal the standard form up to float rounding.
# Neither checks its arguments: they are kernels behind MAB, whose forward validates its input.


class FormSizes(NamedTuple):
    """The widths of a multi-head attention block that decide which exact form costs least.

    ``dim``: the block's width ``d``; ``dim_q``, ``dim_kv``: raw query and key/value widths;
    ``projected_residual``: the residual adds the projected query (one more ``dq d`` per query
    in the induced form); ``out_proj``: the block has ``W^O`` (the induced form folds it in).

    Examples:
        >>> FormSizes(dim=64, num_heads=4, dim_q=64, dim_kv=64, projected_residual=False, out_proj=True).dim
        64
    """

    dim: int
    num_heads: int
    dim_q: int
    dim_kv: int
    projected_residual: bool
    out_proj: bool


def _surely(cond: object) -> bool:
    """Whether a test on sizes holds for certain: a symbolic size (``torch.compile``,
    ``torch.export``) or a traced one (a tensor under ``torch.jit.trace``) decides nothing, and
    adds no guard, so the graph holds for every size."""
    if torch.compiler.is_compiling() or not isinstance(cond, Tensor):
        return statically_known_true(cond)  # type: ignore[arg-type]
    return False


def induced_is_cheaper(nk: float, s: FormSizes) -> bool:
    """Whether ``nk`` keys are few enough that
    [`induced_attention`][settransformer.nn.attention.induced_attention] costs less per query.

    Per query, induced - standard = ``h nk (dq + d) + extra - dq d - d d - 2 nk d`` multiply-adds
    (``extra``: the projected residual's ``dq d``), whatever the number of queries. A symbolic count
    (``torch.compile(dynamic=True)``, ``torch.export``) or an infinite one counts as large: the test
    adds no guard on it, so a compiled model is not recompiled for a new set size.

    Examples:
        >>> s = FormSizes(64, 4, 64, 64, projected_residual=False, out_proj=True)
        >>> induced_is_cheaper(8, s), induced_is_cheaper(1000, s)
        (True, False)
    """
    if not s.out_proj:
        return False
    d, h, dq = s.dim, s.num_heads, s.dim_q
    extra = dq * d if s.projected_residual else 0
    return _surely(h * nk * (dq + d) + extra < dq * d + d * d + 2 * nk * d)


REWRITE_MIN_SET = 32
"""Fewest elements on the large side (keys for the pooled form, queries for the induced one) for
a rewrite: each adds a few small products per call, which over a handful of elements cost more
than the projections they save (standard 1.1-1.15x faster at B = 32 sets of 8-10, width 64,
training and inference; the pooled form is faster from sets of about 100 up)."""


def cheapest_form(nq: float, nk: float, s: FormSizes) -> str:
    """``"standard"``, ``"pooled"`` or ``"induced"``: the form with the fewest multiply-adds.

    Counting projections, scores, weighted sum and output projection, the pooled form
    ([`pooled_attention`][settransformer.nn.attention.pooled_attention]) beats the standard one for every
    large set once the queries are few (PMA seeds, inducing points) and the induced form once the keys are few
    (a set attending to inducing points). With both counts concrete the totals decide, so small sets on both
    sides (a few queries over a handful of keys) keep the standard form, as does a large side of fewer
    than [`REWRITE_MIN_SET`][settransformer.nn.attention.REWRITE_MIN_SET] elements. A symbolic count
    (``torch.export`` with a dynamic set size) counts as large and decides nothing, so tracing
    adds no guard on the set size. Both rewrites hold only for plain dot-product softmax; the
    caller checks that.

    Examples:
        >>> s = FormSizes(64, 4, 64, 64, projected_residual=False, out_proj=True)
        >>> cheapest_form(1, 1000, s), cheapest_form(1000, 8, s), cheapest_form(1000, 1000, s)
        ('pooled', 'induced', 'standard')
        >>> cheapest_form(8, 4, s._replace(out_proj=False))
        'standard'
    """
    d, h, dq, dkv = s.dim, s.num_heads, s.dim_q, s.dim_kv
    if _surely(nq == 0) or _surely(nk == 0):
        return "standard"
    # pooled - standard = nq * (...) + 2 nk (nq (h dkv - d) - dkv d): negative for large nk iff
    queries_few = _surely(nq * (h * dkv - d) < dkv * d) and not _surely(nk < REWRITE_MIN_SET)
    keys_few = induced_is_cheaper(nk, s) and not _surely(nq < REWRITE_MIN_SET)
    if not (queries_few or keys_few):
        return "standard"
    extra = dq * d if s.projected_residual else 0
    q_proj, out_proj = nq * dq * d, nq * d * d if s.out_proj else 0
    standard = (q_proj + 2 * nk * dkv * d + 2 * nq * nk * d + out_proj, "standard")
    pooled = (q_proj + h * nq * d * dkv + 2 * h * nq * nk * dkv + nq * dkv * d + out_proj, "pooled")
    induced = (2 * nk * dkv * d + nk * d * (dq + d) + h * nq * nk * (dq + d) + extra, "induced")
    best = pooled if queries_few else induced
    # a loop, not min(key=...): torch.compile traces it without a graph break
    for cost in (standard, pooled, induced) if queries_few and keys_few else (standard,):
        if _surely(cost[0] < best[0]):
            best = cost
    return best[1]


def pooled_attention(
    q: Tensor,
    kv: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    b_v: Tensor,
    num_heads: int,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Few queries over a large set, keys and values never projected.

    Computes ``concat_h softmax(q_h k_h^T * scale) v_h`` with ``k = kv w_k^T + b_k`` and
    ``v = kv w_v^T + b_v``, as ``q~_h = q_h w_k,h`` (queries moved into the input space) attending
    over the raw ``kv`` with all heads stacked as queries of one head, then ``w_v,h`` applied to
    the few results. ``b_k`` drops out: it adds the same ``q_h . b_k,h`` to every score of a query.

    Args:
        q: projected queries ``(Bq, Nq, D)``, ``Bq`` = 1 (shared seeds) or ``B``.
        kv: the set ``(B, N, Dkv)``, zero at padded rows.
        w_k: key projection weight ``(D, Dkv)``.
        w_v: value projection weight ``(D, Dkv)``.
        b_v: value bias ``(D,)``.
        num_heads: heads ``H`` (``D = H * Dh``).
        mask: ``(B, N)`` bool, True for real elements.
        scale: softmax temperature, ``1 / sqrt(Dh)`` by default.
        dropout_p: dropout on the attention weights.

    Returns:
        ``(B, Nq, D)``, exactly zero for empty sets.

    Examples:
        >>> q, kv = torch.randn(1, 2, 8), torch.randn(3, 10, 6)
        >>> w_k, w_v, b_v = torch.randn(8, 6), torch.randn(8, 6), torch.zeros(8)
        >>> pooled_attention(q, kv, w_k, w_v, b_v, num_heads=4).shape
        torch.Size([3, 2, 8])
    """
    bq, nq, d = q.shape
    b, _, dkv = kv.shape
    dh = d // num_heads
    q_in = torch.einsum("bhqe,hek->bhqk", split_heads(q, num_heads), w_k.view(num_heads, dh, dkv))
    q_in = q_in.reshape(bq, 1, num_heads * nq, dkv)
    kv1 = kv.unsqueeze(1)
    scale = softmax_scale(dh, scale)
    o = _attention(q_in, kv1, kv1, mask, scale=scale, dropout_p=dropout_p)
    o = o.view(b, num_heads, nq, dkv)
    out = torch.einsum("bhqk,hek->bhqe", o, w_v.view(num_heads, dh, dkv)) + b_v.view(num_heads, 1, dh)
    if mask is not None:
        out = out.masked_fill(~mask.any(dim=-1)[:, None, None, None], 0.0)
    elif _surely(kv.shape[1] == 0):  # no keys: empty sets, as with a mask of none real
        out = torch.zeros_like(out)
    return merge_heads(out)


def induced_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_q: Tensor,
    b_q: Tensor,
    w_o: Tensor,
    b_o: Tensor,
    num_heads: int,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """A large set of queries over few keys, queries never projected.

    Computes ``concat_h softmax((q w_q,h^T + b_q,h) k_h^T * scale) v_h`` followed by the output
    projection ``w_o``, ``b_o``, with ``w_q`` folded into the keys (``k~_h = k_h w_q,h``, plus a
    per-key bias ``b_q,h . k_h``) and ``w_o`` folded into the values (``v~_h = v_h w_o,h^T``), so
    all heads' scores come from one ``(N, Dq) x (Dq, H * M)`` product and the output from one
    ``(N, H * M) x (H * M, D)`` product.

    Args:
        q: raw queries ``(B, N, Dq)``.
        k: projected keys ``(B, M, D)``.
        v: projected values ``(B, M, D)``.
        w_q: query projection weight ``(D, Dq)``.
        b_q: query projection bias ``(D,)``.
        w_o: output projection weight ``(D, D)``.
        b_o: output projection bias ``(D,)``.
        num_heads: as in [`pooled_attention`][settransformer.nn.attention.pooled_attention].
        mask: ``(B, M)`` over the keys, as in
            [`pooled_attention`][settransformer.nn.attention.pooled_attention].
        scale: as in [`pooled_attention`][settransformer.nn.attention.pooled_attention].
        dropout_p: as in [`pooled_attention`][settransformer.nn.attention.pooled_attention].

    Returns:
        ``(B, N, D)``; for an empty key set the attention output is zero (the result is ``b_o``).

    Examples:
        >>> q, k = torch.randn(3, 10, 6), torch.randn(3, 2, 8)
        >>> w_q, w_o, b = torch.randn(8, 6), torch.randn(8, 8), torch.zeros(8)
        >>> induced_attention(q, k, k, w_q, b, w_o, b, num_heads=4).shape
        torch.Size([3, 10, 8])
    """
    b, m, d = k.shape
    dq = q.shape[-1]
    dh = d // num_heads
    kh = split_heads(k, num_heads)  # (B, H, M, Dh)
    k_in = torch.einsum("bhme,heq->bhmq", kh, w_q.view(num_heads, dh, dq)).reshape(b, num_heads * m, dq)
    k_bias = torch.einsum("bhme,he->bhm", kh, b_q.view(num_heads, dh)).reshape(b, 1, num_heads * m)
    s = softmax_scale(dh, scale)
    scores = torch.baddbmm(k_bias, q, k_in.transpose(1, 2), beta=s, alpha=s)
    scores = scores.unflatten(-1, (num_heads, m))  # (B, N, H, M); view(b, -1, ...) fails for b = 0
    empty = None
    if mask is not None:
        empty = ~mask.any(dim=-1)
        scores = scores.masked_fill(~(mask | empty[:, None])[:, None, None, :], float("-inf"))
    weights = softmax(scores)
    if empty is not None:
        weights = weights.masked_fill(empty[:, None, None, None], 0.0)
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    v_out = torch.einsum("bhme,fhe->bhmf", split_heads(v, num_heads), w_o.view(d, num_heads, dh))
    return torch.baddbmm(b_o, weights.flatten(2), v_out.reshape(b, num_heads * m, d))
