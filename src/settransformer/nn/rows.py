"""A MAB's attention between a few fixed vectors and many rows, prepared once and reused.

Two forms of a [`MAB`][settransformer.nn.mab.MAB] serve a large set read in chunks
([`settransformer.nn.streaming`][settransformer.nn.streaming]) and an ISAB's rows without autograd
([`forward_unchecked`][settransformer.nn.blocks.ISAB.forward_unchecked]):

- [`PooledQueries`][settransformer.nn.rows.PooledQueries]: a few queries (PMA seeds, inducing points)
  attending over raw chunks of the set, accumulated by an online softmax.
- [`InducedRows`][settransformer.nn.rows.InducedRows]: chunk after chunk of rows attending to the same few
  keys (an ISAB's induced set), with everything that depends only on them computed once and every intermediate
  written into buffers reused from call to call
  ([`settransformer.nn.workspace`][settransformer.nn.workspace]).

Both agree with [`MAB.forward_unchecked`][settransformer.nn.mab.MAB.forward_unchecked] up to
float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import induced_is_cheaper, merge_heads, split_heads
from .mab import MAB, Form, _feed_forward_in_place, _InPlaceOps, _linear
from .scores import softmax, softmax_scale
from .sets import accumulation_dtype
from .validation import func_transformed
from .workspace import Workspace, kept_workspace

__all__ = ["InducedRows", "PooledQueries", "check_dot_product"]

# Fused CPU attention that also returns the log-sum-exp (a private op: absent -> plain products).
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def check_dot_product(mab: MAB, name: str) -> None:
    """Raise ``ValueError`` unless ``mab`` uses the default soft dot-product attention.

    The online softmax accumulates ``exp(q . x)`` over raw rows; other score functions (a MAB's
    ``score`` other than ``None``, i.e. ``"dot"``) and hard ``top_k`` attention do not decompose
    that way.

    Examples:
        >>> check_dot_product(MAB(4, 4, 8, 2, top_k=2), "pma.mab")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: pma.mab: chunked evaluation supports only dot-product softmax attention, ...
    """
    score, top_k = getattr(mab, "score", None), getattr(mab, "top_k", None)
    if score is None and top_k is None:
        return
    raise ValueError(
        f"{name}: chunked evaluation supports only dot-product softmax attention, got "
        f"score={score!r}, top_k={top_k!r}; evaluate this model without chunk_size"
    )


class PooledQueries:
    """A MAB's few queries prepared to attend over raw chunks of a large set (pooled form).

    ``q~_h = (q W_q + b_q)_h W_k,h * scale`` is computed once; each chunk then costs one
    ``(c, D_kv) x (D_kv, H * Nq)`` product for the scores and one for the weighted sum. Implements
    [`SummaryQueries`][settransformer.nn.streaming.SummaryQueries].

    Args:
        mab: the block, with dot-product scores.
        q: its raw queries ``(Bq, Nq, dim_q)``, ``Bq`` = 1 (learned, shared) or ``B``.

    Examples:
        >>> import torch
        >>> from settransformer.nn.streaming import OnlineSoftmax
        >>> mab = MAB(8, 3, 8, num_heads=2).eval()
        >>> q, x = torch.randn(1, 4, 8), torch.randn(2, 100, 3)
        >>> pq, acc = PooledQueries(mab, q), OnlineSoftmax()
        >>> for s in range(0, 100, 30):
        ...     acc.add(*pq.stats(x[:, s : s + 30], None))
        >>> torch.allclose(pq.finish(*acc.result()), mab.forward_unchecked(q, x, None), atol=1e-5)
        True
    """

    def __init__(self, mab: MAB, q: Tensor) -> None:
        self.mab, self.q = mab, q
        h, d, dkv = mab.num_heads, mab.dim, mab.dim_kv
        dh = d // h
        qn = mab.norm_q(q) if mab.norm == "pre" else q
        self.qp = mab.to_q(qn)  # (Bq, Nq, dim)
        w_k, self.w_v = mab.to_kv.weight.chunk(2)
        self.b_v = mab.to_kv.bias[d:]
        q_in = torch.einsum("bhqe,hek->bhqk", split_heads(self.qp, h), w_k.view(h, dh, dkv))
        scale = softmax_scale(dh, mab.scale)
        self.q_in = (q_in * scale).reshape(q.shape[0], h * q.shape[1], dkv)  # (Bq, H * Nq, D_kv)

    def stats(self, kv: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk's statistics: ``kv: (B, c, dim_kv)`` zero at padded rows, ``mask: (B, c)``.

        Returns ``ref (B, H*Nq, 1)`` (detached), ``denom (B, H*Nq, 1)``, ``acc (B, H*Nq, dim_kv)``.
        """
        mab = self.mab
        kvn = mab.norm_kv(kv) if mab.norm == "pre" else kv
        dropout = mab.training and mab.dropout > 0
        needs_grad = torch.is_grad_enabled() and (kvn.requires_grad or self.q_in.requires_grad)
        if _FUSED is not None and kvn.device.type == "cpu" and not (dropout or needs_grad):
            return self._fused_stats(kvn, mask)
        # Scores, weights and their sums in float32 for 16-bit chunks (and under autocast), as the
        # fused kernels keep them: in float16 the sum of a chunk's weights overflows past 65,504 rows.
        wide = accumulation_dtype(torch.promote_types(self.q_in.dtype, kvn.dtype))
        with torch.autocast(kvn.device.type, enabled=False):
            q_in, kvw = self.q_in.to(wide), kvn.to(wide)
            scores = torch.matmul(q_in, kvw.transpose(1, 2))  # (B, H*Nq, c)
            if mask is not None:
                scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
            # An all-masked chunk has max -inf; clamping keeps the reference finite (its weights are 0).
            ref = scores.detach().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
            weights = torch.exp(scores - ref)
            denom = weights.sum(dim=-1, keepdim=True)
            if dropout:
                # dropout on the normalised weights = dropout on the numerator only
                weights = F.dropout(weights, mab.dropout)
            return ref, denom, torch.matmul(weights, kvw)

    def _fused_stats(self, kvn: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """[`stats`][settransformer.nn.rows.PooledQueries.stats] by PyTorch's fused CPU flash-attention kernel
        (no autograd, no dropout).

        Its normalised output and log-sum-exp are the statistics relative to ``ref = lse``
        (``denom = 1``); about twice as fast as separate products and exponentials for narrow sets.
        """
        assert _FUSED is not None
        b = kvn.shape[0]
        # The private kernel reads the features as if their stride were 1 (the public op copies
        # first): a transposed or Fortran-order chunk would give wrong statistics without a word.
        kvn = kvn if kvn.stride(-1) == 1 else kvn.contiguous()
        q, kv = self.q_in.expand(b, -1, -1).unsqueeze(1), kvn.unsqueeze(1)
        if q.dtype != kv.dtype:  # a private op, not autocast-aware: cast as autocast would
            dtype = torch.promote_types(q.dtype, kv.dtype)
            if torch.is_autocast_enabled("cpu"):
                dtype = torch.get_autocast_dtype("cpu")
            q, kv = q.to(dtype), kv.to(dtype)
        bias = None
        if mask is not None:
            bias = torch.zeros(b, 1, 1, kvn.shape[1], dtype=kv.dtype, device=kvn.device)
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        out, lse = _FUSED(q, kv, kv, 0.0, False, attn_mask=bias, scale=1.0)
        ref, denom = lse[:, 0, :, None], torch.ones_like(lse[:, 0, :, None])
        if mask is not None:
            # The kernel gives an all-masked row out = 0, lse = 0. As in the unfused path, its
            # reference goes to the lowest float: a reference of 0 would scale another chunk's
            # statistics by exp(ref - 0), which underflows to 0 for scores below about -88.
            seen = mask.any(dim=1)[:, None, None]
            ref = ref.masked_fill(~seen, torch.finfo(ref.dtype).min)
            denom = denom * seen.to(denom.dtype)
        return ref, denom, out[:, 0]

    def finish(self, pooled: Tensor, empty: Tensor) -> Tensor:
        """The block's output from the softmax-weighted raw rows ``pooled: (B, H*Nq, dim_kv)``.

        ``empty: (B,)`` marks empty sets (attention output exactly zero). Returns ``(B, Nq, dim)``.
        """
        mab = self.mab
        h, d, dkv = mab.num_heads, mab.dim, mab.dim_kv
        b, nq, dh = pooled.shape[0], self.q.shape[1], d // h
        pooled = pooled.to(self.w_v.dtype)  # the fused kernel keeps half-precision statistics in float32
        o = torch.einsum("bhqk,hek->bhqe", pooled.view(b, h, nq, dkv), self.w_v.view(h, dh, dkv))
        o = (o + self.b_v.view(h, 1, dh)).masked_fill(empty[:, None, None, None], 0.0)
        return mab._after_attention(self.q, self.qp, mab.to_out(merge_heads(o)))


class InducedRows:
    """``mab.forward_unchecked(x, h, None)`` for many chunks ``x: (B, c, dim_q)`` of one set batch.

    Each element attends to the same ``m`` induced vectors ``h``, so everything that depends only
    on ``h`` is computed once instead of once per chunk, and each chunk's products write into
    buffers reused from call to call. Where
    [`induced_is_cheaper`][settransformer.nn.attention.induced_is_cheaper] says so, ``h``'s keys are folded
    with the query projection and its values with the output projection (the ``"induced"`` form of
    [`settransformer.nn.attention.induced_attention`][settransformer.nn.attention.induced_attention]): a chunk
    then costs two large products (scores, output) plus the rFF. The output bias is folded into the values:
    each head's softmax weights sum to one, so adding ``b_o / H`` to every folded value row adds ``b_o`` to
    the output. Otherwise (no output projection, as in the official layout, or many induced vectors) a chunk
    runs the standard per-head products on ``h``'s precomputed keys and values.

    With autograd, autocast, active dropout, another score function or ``top_k``, or off the CPU,
    it calls [`MAB.forward_unchecked`][settransformer.nn.mab.MAB.forward_unchecked] instead (in ``form`` where
    one is given); both agree up to float rounding.

    Args:
        mab: an ISAB's ``mab1``.
        h: the induced set ``(B, m, dim)``.
        form: ``"induced"``: fold as above; ``"standard"``: the per-head products; ``"pooled"``:
            call [`MAB.forward_unchecked`][settransformer.nn.mab.MAB.forward_unchecked] in that form;
                ``None``: fold where it is cheaper
            (and off the fast path, let each call choose).
        keep_buffers: take the buffers kept on this thread from an earlier
            ``InducedRows(..., keep_buffers=True)`` of any block and keep them for the next one
            (see [`settransformer.nn.workspace`][settransformer.nn.workspace]), instead of new ones for this
            object only.

    Results of the fast path are overwritten by the next call (see `__call__`), and with
    ``keep_buffers`` by the next call of any ``InducedRows`` with ``keep_buffers`` on this thread.

    Examples:
        >>> import torch
        >>> from settransformer.nn.blocks import ISAB
        >>> isab = ISAB(3, 16, num_heads=4, num_inducing=8).eval()
        >>> x = torch.randn(2, 50, 3)
        >>> with torch.no_grad():
        ...     h = isab.induce(x, None)
        ...     rows = InducedRows(isab.mab1, h)(x)
        ...     torch.allclose(rows, isab.mab1.forward_unchecked(x, h, None), atol=1e-5)
        True
    """

    def __init__(self, mab: MAB, h: Tensor, *, form: Form | None = None, keep_buffers: bool = False) -> None:
        self.mab, self.h, self.form = mab, h, form
        dropout = mab.training and mab.dropout > 0
        plain = mab.score is None and mab.top_k is None and form != "pooled"
        # out= variants do not autocast: under autocast the block's own code (which does) runs
        autocast = torch.is_autocast_enabled(h.device.type)
        # The fast path keeps a CPU's caches warm and avoids page faults; a GPU gains nothing from
        # it, and its half-precision layer norm keeps float32 statistics that the buffers are not.
        self.fast = (
            plain
            and h.device.type == "cpu"
            and not dropout
            and not torch.is_grad_enabled()
            and not autocast
            and not func_transformed(h)  # vmap has no rule for the out= products
        )
        if not self.fast:
            return
        heads, d = mab.num_heads, mab.dim
        dh = d // heads
        scale = softmax_scale(dh, mab.scale)
        k, v = mab.to_kv(mab.norm_kv(h) if mab.norm == "pre" else h).chunk(2, dim=-1)
        b, m = k.shape[:2]
        kh = split_heads(k, heads)  # (B, H, m, dh)
        self.m = m
        self.ws = kept_workspace(mab, k) if keep_buffers else Workspace(k.dtype, k.device)
        self.folded = induced_is_cheaper(m, mab.form_sizes()) if form is None else form == "induced"
        if not self.folded:
            self.k_t = (kh * scale).transpose(-1, -2)  # (B, H, dh, m)
            self.v_h = split_heads(v, heads).contiguous()  # (B, H, m, dh)
            return
        w_q = mab.to_q.weight.view(heads, dh, -1)
        # explicit sizes, no -1: a batch of zero sets (b = 0) must reshape too
        self.k_in = torch.einsum("bhme,heq->bhmq", kh, w_q).reshape(b, heads * m, w_q.shape[-1]) * scale
        self.k_bias = (
            torch.einsum("bhme,he->bhm", kh, mab.to_q.bias.view(heads, dh)).reshape(b, 1, heads * m) * scale
        )
        out = mab.to_out
        assert isinstance(out, nn.Linear)
        v_out = torch.einsum("bhme,fhe->bhmf", split_heads(v, heads), out.weight.view(d, heads, dh))
        self.v_out = v_out.reshape(b, heads * m, d) + out.bias / heads

    def __call__(self, x: Tensor, sets: slice = slice(None), *, out: Tensor | None = None) -> Tensor:
        """``x: (B', c, dim_q)`` -> ``(B', c, dim)``: chunks of the sets ``sets`` of ``h``'s batch
        (all ``B`` by default), so a batch of many small sets can go through a few sets at a time.

        On the fast path every intermediate and the result live in buffers reused by the next
        call: use the result (or copy it) before calling again. ``out: (B', c, dim)``: where to
        write the result instead (returned); where it is contiguous the fast path also uses it for
        a step whose output fits, before the last step writes the result there, so it takes the
        place of one reused buffer.
        """
        mab = self.mab
        if not self.fast:
            y = mab.forward_unchecked(x, self.h[sets], None, form=self.form)
            return y if out is None else out.copy_(y)
        ws = self.ws
        if out is not None and out.is_contiguous() and out.dtype == ws.dtype:
            # every tail writes its last step into "s" (_tail_slots); a step too large for ``out``
            # takes the kept buffer of that name
            ws = ws.with_buffer("s", out)
        y = self._rows(x, sets, ws)
        if out is None:
            return y
        return out if y.data_ptr() == out.data_ptr() else out.copy_(y)  # same: the last step wrote there

    def _rows(self, x: Tensor, sets: slice, ws: Workspace) -> Tensor:
        """The fast path of `__call__`, in the buffers of ``ws``."""
        mab = self.mab
        b, c = x.shape[:2]
        heads, d = mab.num_heads, mab.dim
        qn = mab.norm_q(x) if mab.norm == "pre" else x
        if not self.folded:
            y, slot, spare = self._heads(x, qn, sets, ws)
            return mab._norm_ff(y, _BufferOps(ws, _tail_slots(mab, slot, spare)))
        weights = ws.get("s", b, c, heads * self.m)
        torch.baddbmm(self.k_bias[sets], qn, self.k_in[sets].transpose(1, 2), out=weights)
        by_head = weights.view(b, c, heads, self.m)
        softmax(by_head, out=by_head)  # in place: the scores are not needed again
        y = ws.get("q", b, c, d)  # residual + attention output, the residual added by the product
        if mab.residual == "projected":
            _linear(mab.to_q, qn, y).baddbmm_(weights, self.v_out[sets])
        else:
            torch.baddbmm(x, weights, self.v_out[sets], out=y)
        return mab._norm_ff(y, _BufferOps(ws, _tail_slots(mab, "q", ("s",))))

    def _heads(
        self, x: Tensor, qn: Tensor, sets: slice, ws: Workspace
    ) -> tuple[Tensor, str, tuple[str, ...]]:
        """Residual + attention output ``(B', c, dim)`` of the chunk ``x`` of ``sets`` (``qn``: its
        normalised queries) from per-head products over the precomputed keys and values; the
        workspace slot that holds it and the slots free again."""
        mab, heads = self.mab, self.mab.num_heads
        b, c = x.shape[:2]
        d = mab.dim
        qp = _linear(mab.to_q, qn, ws.get("q", b, c, d))
        # the product needs the heads contiguous (it would copy them into a fresh tensor): copied
        # into the output's slot, which is free until the scores are made
        by_head = ws.get("o", b, heads, c, d // heads).copy_(split_heads(qp, heads))
        weights = ws.get("s", b, heads, c, self.m)
        torch.matmul(by_head, self.k_t[sets], out=weights)
        softmax(weights, out=weights)  # in place: the scores are not needed again
        o = torch.matmul(weights, self.v_h[sets], out=ws.get("o", b, heads, c, d // heads))
        residual = qp if mab.residual == "projected" else x
        rows = (b, c, heads, d // heads)  # explicit sizes, no -1: zero sets or rows reshape too
        if not isinstance(mab.to_out, nn.Linear):
            # into the queries' slot: read only by the scores (or the residual itself, added in place)
            y = qp if residual is qp else ws.get("q", b, c, d)
            torch.add(residual.view(rows), o.transpose(1, 2), out=y.view(rows))
            return y, "q", ("s", "o")
        merged = ws.get("s", b, c, d)  # the weights' slot: they are not needed again
        merged.view(rows).copy_(o.transpose(1, 2))
        return _linear(mab.to_out, merged, ws.get("o", b, c, d)).add_(residual), "o", ("s", "q")


class _BufferOps(_InPlaceOps):
    """`_InPlaceOps` writing into workspace buffers (no dropout): the tail's steps named by
    `MAB._norm_ff` (``"n1"``, ``"out"``, ``"nff"``) and `_feed_forward_in_place`
    (``"ff0"``, ``"ff2"``) go to the slots of ``slots`` (see `_tail_slots`)."""

    def __init__(self, ws: Workspace, slots: Mapping[str, str]) -> None:
        self.ws = ws.named(slots)

    def norm(self, layer: nn.Module, x: Tensor, name: str) -> Tensor:
        return _layer_norm(layer, x, self.ws.get(name, *x.shape), self.ws)

    def ff(self, mab: MAB, x: Tensor) -> Tensor:
        return _feed_forward_in_place(mab.ff, x, self.ws)


def _tail_slots(mab: MAB, stream: str, spare: tuple[str, ...]) -> dict[str, str]:
    """Where each step of ``mab``'s tail writes (`_BufferOps`), given the slot ``stream``
    holding its input and the slots ``spare`` free to overwrite: each step takes a slot whose
    content is not read again, so a block holds a few buffers, not one per step. The last step
    writes the tail's result into ``spare[0]``, which the callers name ``"s"``: the slot
    `InducedRows.__call__` lends to its ``out``."""
    a, b = spare[0], spare[1] if len(spare) > 1 else "t"
    if mab.norm == "post":  # n1 = norm1(y); ff(n1) (+ n1, in place); out = norm2(that)
        return {"n1": a, "ff0": stream, "ff2": b, "out": a}
    # ff(...) (+ y, in place): the rFF's last product holds the result
    two = len(mab.ff) > 2 if isinstance(mab.ff, nn.Sequential) else False
    if mab.norm == "pre":  # nff = norm(y), read by the first product only
        return {"nff": a, "ff0": b, "ff2": a} if two else {"nff": b, "ff0": a}
    return {"ff0": b, "ff2": a} if two else {"ff0": a}


def _layer_norm(norm: nn.Module, x: Tensor, out: Tensor, ws: Workspace) -> Tensor:
    """``norm(x)`` written into ``out`` for a plain ``nn.LayerNorm`` (any other module: called)."""
    if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or norm.bias is None:
        return norm(x)
    stats = ws.get("ln_stats", 2, *x.shape[:-1], 1)
    torch.ops.aten.native_layer_norm.out(
        x,
        list(norm.normalized_shape),
        norm.weight,
        norm.bias,
        norm.eps,
        out0=out,
        out1=stats[0],
        out2=stats[1],
    )
    return out
