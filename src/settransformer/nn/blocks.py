"""The Set Transformer's blocks: MAB, SAB, ISAB and PMA (Lee et al., 2019, section 3), with every form
of the MAB's attention.

Every block takes sets as ``(B, N, D)`` tensors with an optional boolean ``mask: (B, N)`` (True =
real element). Outputs at padded positions are exactly zero, and padded inputs (whatever their
values, NaN included) have no influence on any output and receive zero gradient.

Each block's ``forward`` checks its input (:mod:`settransformer.nn.validation`); its
``forward_unchecked`` is the same computation on input already checked and zero at padded rows,
which is what blocks call on each other.

Options (:class:`BlockOptions`, or the same names as keywords of every block):

- ``norm``: ``"post"`` (the paper: ``LN(H + rFF(H))``, ``H = LN(X + Multihead(X, Y, Y))``), ``"pre"``
  (``H = X + Multihead(LN(X), LN(Y))``, ``H + rFF(LN(H))``; steadier for deep stacks) or ``None``.
- ``ff_dim``: the row-wise feed-forward. ``None``: one ``Linear(dim, dim)`` + ReLU (the paper's and
  the official code's rFF); an integer: ``Linear(dim, ff_dim)``, ReLU, ``Linear(ff_dim, dim)``.
- ``dropout``: on the attention weights and on both residual branches.
- ``scale``: softmax temperature; default ``1/sqrt(dim / num_heads)`` (per-head width).
- ``residual``: what the attention output is added to: ``"input"`` (the query itself, as in the
  paper), ``"projected"`` (the projected query, as in the official code) or ``"auto"`` (the
  input when its width equals ``dim``, else the projected query).
- ``out_proj``: apply the output projection ``W^O`` after concatenating heads (the official code
  has none).
- ``score``: the attention score: ``"dot"`` (default, the fused scaled dot product), ``"additive"``,
  ``"gaussian"``, or your own ``nn.Module``/callable ``(q, k) -> logits``; see
  :mod:`settransformer.nn.scores`.
- ``top_k``: hard attention: each query keeps only its ``top_k`` highest-scoring keys (``None``: all).

Forms of the attention. A MAB computes its dot-product attention in one of three exact forms
(:mod:`settransformer.nn.attention`), chosen by cost from the numbers of queries and keys
(:meth:`MAB.choose_form`): ``"standard"``; ``"pooled"`` for a few queries over a large set (PMA
seeds, inducing points); ``"induced"`` for a large set attending to a few keys (an ISAB's second
block). Two more forms serve sets read in chunks (:mod:`settransformer.nn.streaming`):
:class:`PooledQueries` (a few queries over raw chunks, accumulated by an online softmax) and
:class:`InducedRows` (chunk after chunk attending to the same few keys, with everything that depends
only on them computed once and buffers reused). All agree up to float rounding.

A form can be pinned (:attr:`MAB.form`, :func:`attention_forms`): a trace (TorchScript, ONNX) keeps
the form chosen at the traced size for every size, so :func:`large_set_forms` pins each block, while
a model is traced, to the form it uses for large sets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, TypedDict, Unpack, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (
    FormSizes,
    _attention,
    cheapest_form,
    induced_attention,
    induced_is_cheaper,
    merge_heads,
    pooled_attention,
    split_heads,
)
from .scores import ScoreSpec, check_score, make_score, softmax, softmax_scale
from .streaming import Pipeline, isab_chunked, pma_chunked
from .validation import (
    block_output,
    check_finite,
    check_like,
    check_positive,
    check_probability,
    check_scale,
    check_set,
    check_top_k,
    prepare_set,
    tracing,
    zero_padding,
)
from .workspace import Workspace, kept_buffers_free, kept_workspace

__all__ = [
    "FORMS",
    "ISAB",
    "MAB",
    "PMA",
    "SAB",
    "BlockKeywords",
    "BlockOptions",
    "Form",
    "InducedRows",
    "Norm",
    "PooledQueries",
    "attention_forms",
    "check_dot_product",
    "large_set_forms",
]

Norm = Literal["post", "pre"] | None
Residual = Literal["auto", "input", "projected"]
Form = Literal["standard", "pooled", "induced"]
#: The exact forms of a MAB's attention (see the module docstring).
FORMS: tuple[Form, ...] = get_args(Form)


class BlockKeywords(TypedDict, total=False):
    """The fields of :class:`BlockOptions`, as keyword arguments of the blocks and models.

    Example:
        >>> keywords: BlockKeywords = {"norm": "pre", "ff_dim": 64}
        >>> SAB(3, 16, num_heads=4, **keywords).mab.norm
        'pre'
    """

    norm: Norm
    ff_dim: int | None
    dropout: float
    scale: float | None
    residual: Residual
    out_proj: bool
    score: ScoreSpec
    top_k: int | None


@dataclass(frozen=True)
class BlockOptions:
    """The options shared by every attention block (see the module docstring), checked once.

    Example:
        >>> options = BlockOptions(norm="pre", ff_dim=64)
        >>> SAB(3, 16, num_heads=4, options=options).mab.norm
        'pre'
        >>> BlockOptions(dropout=1.5)
        Traceback (most recent call last):
        ...
        ValueError: dropout: expected a probability in [0, 1), got 1.5
    """

    norm: Norm = "post"
    ff_dim: int | None = None
    dropout: float = 0.0
    scale: float | None = None
    residual: Residual = "auto"
    out_proj: bool = True
    score: ScoreSpec = "dot"
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.norm not in ("post", "pre", None):
            raise ValueError(f"norm: expected 'post', 'pre' or None, got {self.norm!r}")
        if self.ff_dim is not None:
            check_positive("ff_dim", self.ff_dim)
        check_probability("dropout", self.dropout)
        check_scale(self.scale)
        if self.residual not in ("auto", "input", "projected"):
            raise ValueError(f"residual: expected 'auto', 'input' or 'projected', got {self.residual!r}")
        check_score(self.score)
        check_top_k(self.top_k)

    @classmethod
    def of(cls, options: BlockOptions | None, keywords: BlockKeywords) -> BlockOptions:
        """``options`` (default: the defaults) with the fields named in ``keywords`` replaced."""
        base = cls() if options is None else options
        if not isinstance(base, BlockOptions):
            raise TypeError(f"options: expected a BlockOptions, got {type(base).__name__}")
        return replace(base, **keywords) if keywords else base

    def as_dict(self) -> dict[str, object]:
        """The options as keywords (values as given, a score module not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _feed_forward(dim: int, ff_dim: int | None) -> nn.Sequential:
    if ff_dim is None:
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
    return nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Linear(ff_dim, dim))


class _Ops:
    """The operations of a block's tail (:meth:`MAB._norm_ff`): new tensors, autograd, dropout."""

    def norm(self, layer: nn.Module, x: Tensor, name: str) -> Tensor:
        return cast(Tensor, layer(x))

    def ff(self, mab: MAB, x: Tensor) -> Tensor:
        return cast(Tensor, mab.drop(mab.ff(x)))

    def add(self, stream: Tensor, branch: Tensor) -> Tensor:
        return stream + branch


class _InPlaceOps(_Ops):
    """:class:`_Ops` without autograd: ReLU and sums in place on the tensors the block just made,
    so the tail holds one set-sized tensor fewer at a time (inference's peak memory)."""

    def ff(self, mab: MAB, x: Tensor) -> Tensor:
        return cast(Tensor, mab.drop(_feed_forward_in_place(mab.ff, x)))

    def add(self, stream: Tensor, branch: Tensor) -> Tensor:
        # in place only where the sum has the branch's shape and dtype (autocast mixes dtypes)
        same = branch.shape == stream.shape and branch.dtype == stream.dtype
        return branch.add_(stream) if same else stream + branch


_NEW_TENSORS, _IN_PLACE = _Ops(), _InPlaceOps()


def _tail_ops() -> _Ops:
    """The ops of a block's tail: in place without autograd (a trace records new tensors)."""
    return _NEW_TENSORS if torch.is_grad_enabled() or tracing() else _IN_PLACE


class MAB(nn.Module):
    """Multihead attention block ``MAB(X, Y)``: the queries ``X`` attend to the set ``Y``.

    Args:
        dim_q: feature size of the queries.
        dim_kv: feature size of the keys/values (the set attended to).
        dim: width of the block and of its output.
        num_heads: number of heads; must divide ``dim``.
        options: :class:`BlockOptions`; keywords of the same names override its fields.

    Shapes: ``q: (B, Nq, dim_q)`` (or ``(1, Nq, dim_q)``, shared by the batch), ``kv: (B, Nk, dim_kv)``,
    ``mask: (B, Nk)`` over ``kv`` -> ``(B, Nq, dim)``.

    Example:
        >>> import torch
        >>> mab = MAB(3, 5, 16, num_heads=4)
        >>> mab(torch.randn(2, 7, 3), torch.randn(2, 9, 5)).shape
        torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        dim_q: int,
        dim_kv: int,
        dim: int,
        num_heads: int,
        *,
        options: BlockOptions | None = None,
        **keywords: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        o = BlockOptions.of(options, keywords)
        for name, value in [("dim_q", dim_q), ("dim_kv", dim_kv), ("dim", dim), ("num_heads", num_heads)]:
            check_positive(name, value)
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        if o.residual == "input" and dim_q != dim:
            raise ValueError(f"residual='input' needs dim_q == dim, got dim_q={dim_q}, dim={dim}")
        self.options = o
        self.dim_q, self.dim_kv, self.dim, self.num_heads = dim_q, dim_kv, dim, num_heads
        self.norm, self.scale, self.dropout = o.norm, o.scale, o.dropout
        self.residual: Residual = "input" if o.residual == "auto" and dim_q == dim else o.residual
        if self.residual == "auto":
            self.residual = "projected"
        self.score, self.top_k = make_score(o.score, num_heads, dim // num_heads), o.top_k
        self.to_q = nn.Linear(dim_q, dim)
        self.to_kv = nn.Linear(dim_kv, 2 * dim)  # keys and values in one product
        self.to_out: nn.Module = nn.Linear(dim, dim) if o.out_proj else nn.Identity()
        self.ff = _feed_forward(dim, o.ff_dim)
        self.drop: nn.Module = nn.Dropout(o.dropout) if o.dropout > 0 else nn.Identity()
        if o.norm == "post":
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        elif o.norm == "pre":
            self.norm_q, self.norm_kv, self.norm_ff = (
                nn.LayerNorm(dim_q),
                nn.LayerNorm(dim_kv),
                nn.LayerNorm(dim),
            )
        self._form: Form | tuple[Form, ...] | None = None
        self._form_calls = 0
        self._size_log: list[tuple[int, int]] | None = None  # see large_set_forms

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        """``q: (B, Nq, dim_q)``, ``kv: (B, Nk, dim_kv)``, ``mask: (B, Nk)`` -> ``(B, Nq, dim)``."""
        check_set(q, self.dim_q, "q")
        kv, mask = prepare_set(kv, mask, self.dim_kv, self.to_q.weight, name="kv")
        if q.shape[0] not in (1, kv.shape[0]):
            raise ValueError(f"q: batch size {q.shape[0]} does not match kv's {kv.shape[0]}")
        check_finite(check_like(q, self.to_q.weight, "q"), "q")
        return block_output(self.forward_unchecked(q, kv, mask))

    def project(self, q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected queries, keys and values, each ``(B, N, dim)``."""
        if self.norm == "pre":
            q, kv = self.norm_q(q), self.norm_kv(kv)
        k, v = self.to_kv(kv).chunk(2, dim=-1)
        return self.to_q(q), k, v

    @property
    def form(self) -> Form | tuple[Form, ...] | None:
        """The pinned form of the attention: ``None`` (default: the cheapest for each call's sizes),
        one of :data:`FORMS` for every call, or a tuple of them replayed call after call.

        Blocks with another score or ``top_k`` always use ``"standard"``.

        Example:
            >>> mab = MAB(8, 8, 8, num_heads=2)
            >>> mab.choose_form(4, 10_000)
            'pooled'
            >>> mab.form = "standard"
            >>> mab.choose_form(4, 10_000)
            'standard'
        """
        return self._form

    @form.setter
    def form(self, value: Form | Sequence[Form] | None) -> None:
        pinned: tuple[object, ...] = (
            () if value is None else (value,) if isinstance(value, str) else tuple(value)
        )
        for f in pinned:
            if f not in FORMS:
                raise ValueError(f"form: expected None or one of {', '.join(FORMS)}, got {f!r}")
            if f == "induced" and not isinstance(self.to_out, nn.Linear):
                raise ValueError("form: 'induced' folds the output projection in; this block has none")
        if value is not None and not pinned:
            raise ValueError("form: expected at least one form, got an empty sequence")
        self._form = value if value is None or isinstance(value, str) else cast(tuple[Form, ...], pinned)
        self._form_calls = 0

    def choose_form(self, nq: int, nk: int, device_type: str = "cpu") -> Form:
        """The form of the attention for ``nq`` queries and ``nk`` keys: the pinned :attr:`form`, or
        the cheapest exact one (:func:`~settransformer.nn.attention.cheapest_form`) on a CPU.

        The exact rewrites save multiply-adds, which is what a CPU's time follows. On a GPU the
        time at these sizes follows kernel launches and memory traffic, where the standard form
        (projections, then the fused flash / memory-efficient kernel) is the fastest
        (``benchmarks/peers.py --device cuda``), so an unpinned block on any other device uses it.
        """
        if self._size_log is not None:
            self._size_log.append((nq, nk))
        if self.score is not None or self.top_k is not None:
            return "standard"
        if self._form is None:
            return self._cheapest(nq, nk) if device_type == "cpu" else "standard"
        if isinstance(self._form, str):
            return self._form
        self._form_calls += 1
        return self._form[(self._form_calls - 1) % len(self._form)]

    def _cheapest(self, nq: float, nk: float) -> Form:
        if self.score is not None or self.top_k is not None:
            return "standard"
        return cast(Form, cheapest_form(nq, nk, self.form_sizes()))

    def form_sizes(self) -> FormSizes:
        """The widths that decide the cost of each form."""
        out_proj = isinstance(self.to_out, nn.Linear)
        return FormSizes(
            self.dim, self.num_heads, self.dim_q, self.dim_kv, self.residual == "projected", out_proj
        )

    def forward_unchecked(
        self,
        q: Tensor,
        kv: Tensor,
        mask: Tensor | None,
        projected: tuple[Tensor, Tensor, Tensor] | None = None,
        form: Form | None = None,
    ) -> Tensor:
        """:meth:`forward` without input checks; ``kv`` must already be zero at padded rows.

        ``projected`` lets a caller that already computed ``(q', k, v)`` (in one fused product,
        say) skip the projections. ``form`` is the form a caller already took from
        :meth:`choose_form` for this call (a second call would advance a pinned sequence again);
        by default this method asks :meth:`choose_form` itself.
        """
        h, p = self.num_heads, self.dropout if self.training else 0.0
        if projected is not None:
            form = "standard"
        elif form is None:
            form = self.choose_form(q.shape[1], kv.shape[1], kv.device.type)
        qn, kvn = (self.norm_q(q), self.norm_kv(kv)) if self.norm == "pre" else (q, kv)
        qp: Tensor | None = None
        if form == "pooled":
            qp = self.to_q(qn)
            w_k, w_v = self.to_kv.weight.chunk(2)
            o = pooled_attention(
                qp, kvn, w_k, w_v, self.to_kv.bias[self.dim :], h, mask, scale=self.scale, dropout_p=p
            )
            o = self.to_out(o)
        elif form == "induced":
            if qn.shape[0] != kvn.shape[0]:  # queries shared by the batch
                qn = qn.expand(kvn.shape[0], -1, -1)
            k, v = self.to_kv(kvn).chunk(2, dim=-1)
            out = self.to_out
            assert isinstance(out, nn.Linear)
            o = induced_attention(
                qn,
                k,
                v,
                self.to_q.weight,
                self.to_q.bias,
                out.weight,
                out.bias,
                h,
                mask,
                scale=self.scale,
                dropout_p=p,
            )
            if self.residual == "projected":
                qp = self.to_q(qn)
        else:
            qp, k, v = projected if projected is not None else self.project(q, kv)
            o = _attention(
                split_heads(qp, h),
                split_heads(k, h),
                split_heads(v, h),
                mask,
                scale=self.scale,
                dropout_p=p,
                score=self.score,
                top_k=self.top_k,
            )
            o = self.to_out(merge_heads(o))
        return self._after_attention(q, qp, o)

    def _after_attention(self, q: Tensor, qp: Tensor | None, o: Tensor) -> Tensor:
        """The block after its attention: residual, then :meth:`_norm_ff`.

        ``q``: the raw queries ``(Bq, Nq, dim_q)``; ``qp``: the projected ones (the residual when
        :attr:`residual` is ``"projected"``); ``o``: the attention output after ``W^O``, ``(B, Nq, dim)``.
        """
        residual = q if self.residual == "input" or qp is None else qp
        ops = _tail_ops()
        return self._norm_ff(ops.add(residual, self.drop(o)), ops)

    def _norm_ff(self, h: Tensor, ops: _Ops = _NEW_TENSORS) -> Tensor:
        """The rFF and the norms around it, on ``h`` = residual + attention output ``(B, Nq, dim)``.

        ``ops`` computes each step: new tensors by default, workspace buffers in :class:`InducedRows`.
        """
        if self.norm == "post":
            h = ops.norm(self.norm1, h, "n1")
            return ops.norm(self.norm2, ops.add(h, ops.ff(self, h)), "out")
        if self.norm == "pre":
            return ops.add(h, ops.ff(self, ops.norm(self.norm_ff, h, "nff")))
        return ops.add(h, ops.ff(self, h))

    def extra_repr(self) -> str:
        top_k = "" if self.top_k is None else f", top_k={self.top_k}"
        return f"heads={self.num_heads}, norm={self.norm}, residual={self.residual}{top_k}"


def _fused_linear(x: Tensor, q: nn.Linear, kv: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of a self-attention from one matrix product ``x [W_q; W_kv]^T``."""
    out = F.linear(x, torch.cat([q.weight, kv.weight]), torch.cat([q.bias, kv.bias]))
    d = q.out_features
    # split, not three slices: its backward is one cat, where each slice's zero-fills a full-size grad
    q_, k_, v_ = out.split([d, d, kv.out_features - d], dim=-1)
    return q_, k_, v_


def _chunked_input(x: object, chunk_size: int | None) -> bool:
    """Whether a block's ``forward`` takes the chunked path: ``chunk_size`` given and something to
    chunk (a tensor with ``N = 0`` takes the ordinary path)."""
    if chunk_size is None:
        return False
    check_positive("chunk_size", chunk_size)
    return not (isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 0)


class SAB(nn.Module):
    """Set attention block ``SAB(X) = MAB(X, X)``: permutation equivariant, cost quadratic in N.

    Shapes: ``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``. Options as in :class:`MAB`.

    Example:
        >>> import torch
        >>> SAB(3, 16, num_heads=4)(torch.randn(2, 10, 3)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        num_heads: int,
        *,
        options: BlockOptions | None = None,
        **keywords: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        self.dim_in = dim_in
        self.mab = MAB(dim_in, dim_in, dim, num_heads, options=BlockOptions.of(options, keywords))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``, zero at padded positions."""
        x, mask = prepare_set(x, mask, self.dim_in, self.mab.to_q.weight)
        return block_output(self.forward_unchecked(x, mask))

    def forward_unchecked(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`forward` without input checks; ``x`` must be zero at padded rows."""
        mab = self.mab
        projected = None
        if mab.norm != "pre":  # queries, keys and values from one product
            projected = _fused_linear(x, mab.to_q, mab.to_kv)
        return zero_padding(mab.forward_unchecked(x, x, mask, projected), mask)


#: Rows (over the whole batch) per block of an ISAB's ``mab1`` when autograd is off.
ROW_BLOCK = 2048
#: Fewest rows per set in such a block: with more sets than ``ROW_BLOCK / MIN_BLOCK_ROWS`` the
#: blocks hold whole sets instead.
MIN_BLOCK_ROWS = 512
#: Fewest elements ``B * N * dim`` of a batch for blocks: below it (4 MiB in float32) the batch's
#: tensors stay in cache anyway, and it goes through ``mab1`` in one call.
MIN_SET_BLOCK_ELEMENTS = 2**20
#: Most elements ``rows * max(dim, ff_dim)`` of one call of an ISAB's ``mab1`` without autograd for
#: which the block keeps its buffers from call to call (:class:`InducedRows` ``keep_buffers``): a
#: few buffers of at most 4 MiB each in float32 per thread, shared by the ISABs on it. Fresh buffers
#: each call cost page faults (``benchmarks/kept_buffers.py``); a larger call gets them fresh and
#: frees them.
KEPT_BUFFER_ELEMENTS = 2**20


class ISAB(nn.Module):
    """Induced set attention block: ``ISAB_m(X) = MAB(X, H)``, ``H = MAB(I, X)``.

    ``m = num_inducing`` learned inducing points ``I`` summarise the set, so time and memory are
    linear in N (``O(N m)`` instead of ``O(N^2)``). ``mab0`` computes ``H``, ``mab1`` the output.

    Shapes: ``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``. Options as in :class:`MAB`.

    Example:
        >>> import torch
        >>> ISAB(3, 16, num_heads=4, num_inducing=8)(torch.randn(2, 1000, 3)).shape
        torch.Size([2, 1000, 16])
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        num_heads: int,
        num_inducing: int,
        *,
        options: BlockOptions | None = None,
        **keywords: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        check_positive("num_inducing", num_inducing)
        o = BlockOptions.of(options, keywords)
        self.dim_in = dim_in
        self.inducing = nn.Parameter(torch.empty(num_inducing, dim))
        self.mab0 = MAB(dim, dim_in, dim, num_heads, options=o)
        self.mab1 = MAB(dim_in, dim, dim, num_heads, options=o)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.inducing)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``x: (B, N, dim_in)``, ``mask: (B, N)`` -> ``(B, N, dim)``, zero at padded positions.

        ``chunk_size``: read ``x`` (then any sliceable array-like) ``chunk_size`` elements at a time,
        so that no activation larger than one chunk exists
        (see :func:`settransformer.nn.streaming.isab_chunked`).
        """
        if _chunked_input(x, chunk_size):
            return cast(Tensor, isab_chunked(self, x, mask, chunk_size=cast(int, chunk_size)))
        x, mask = prepare_set(x, mask, self.dim_in, self.inducing)
        return block_output(self.forward_unchecked(x, mask))

    def induce(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``H = MAB(I, X)``: ``(B, num_inducing, dim)``; ``x`` zero at padded rows."""
        return self.mab0.forward_unchecked(self.inducing[None], x, mask)

    def forward_unchecked(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`forward` without input checks; ``x`` must be zero at padded rows.

        Without autograd, ``mab1`` runs through :class:`InducedRows`, which prepares ``H`` once:
        over blocks of about :data:`ROW_BLOCK` rows (each element attends only to ``H``, so the
        result is the same, and a block's intermediates stay in the CPU cache instead of streaming
        ``(B, N, dim)`` tensors through memory: about 2x faster at N = 100k, and a fraction of the
        memory). A batch whose sets would get fewer than :data:`MIN_BLOCK_ROWS` rows each goes
        through whole sets at a time instead (a row block of many sets would be a strided slice,
        copied in and out), and a batch smaller than :data:`MIN_SET_BLOCK_ELEMENTS` in one call.
        Calls of at most :data:`KEPT_BUFFER_ELEMENTS` keep their buffers for the next forward
        (shared by the ISABs of this thread; a handful, each step writing over one whose content
        is not read again). A block's last step writes into the block's output, which also holds
        the attention scores before it where they fit, in place of one more buffer.
        With autograd (and off the CPU) the whole batch goes through the standard path at once:
        backward needs every row.
        """
        h = self.induce(x, mask)
        b, n = x.shape[:2]
        # tracers and compilers see one graph: no Python loop over a size that varies between calls
        if tracing() or torch.is_grad_enabled() or x.device.type != "cpu":
            return zero_padding(self.mab1.forward_unchecked(x, h, None), mask)
        block = max(1, ROW_BLOCK // max(b, 1))  # rows per set in a row block
        per = max(1, ROW_BLOCK // max(n, 1))  # sets per block when blocks hold whole sets
        by_set = block < MIN_BLOCK_ROWS
        if b * n * self.mab1.dim < MIN_SET_BLOCK_ELEMENTS:
            by_set, per = True, max(b, 1)  # one call over the whole batch
        rows = per * n if by_set else b * block
        keep = rows * max(self.mab1.dim, self.mab1.options.ff_dim or 0) <= KEPT_BUFFER_ELEMENTS
        form = self.mab1.choose_form(n, h.shape[1], x.device.type)
        with kept_buffers_free(keep) as keep:
            induced = InducedRows(self.mab1, h, form=form, keep_buffers=keep)
            if not induced.fast:
                return zero_padding(self.mab1.forward_unchecked(x, h, None, form=form), mask)
            out = x.new_empty(b, n, self.mab1.dim)
            step = per if by_set else block
            for i in range(0, b if by_set else n, step):
                if by_set:
                    induced(x[i : i + step], slice(i, i + step), out=out[i : i + step])
                else:
                    induced(x[:, i : i + step], out=out[:, i : i + step])
        return zero_padding(out, mask)

    def pipeline(self) -> Pipeline:
        """The block as chunked evaluation sees it (:class:`~settransformer.nn.streaming.Chunkable`)."""
        return Pipeline(self.dim_in, self.mab1.dim, self.inducing, stages=[self])

    def summary_queries(self, name: str) -> PooledQueries:
        """The inducing points prepared to attend over chunks of the set (``H``, chunk by chunk)."""
        check_dot_product(self.mab0, f"{name}.mab0")
        return PooledQueries(self.mab0, self.inducing[None])

    def rows_given(self, summary: Tensor) -> InducedRows:
        """The block's output row by row, given its induced set ``H = summary: (B, m, dim)``."""
        return InducedRows(self.mab1, summary)


class PMA(nn.Module):
    """Pooling by multihead attention: ``PMA_k(Z) = MAB(S, Z)`` with ``k = num_seeds`` learned seeds.

    Permutation invariant. The paper's optional rFF on ``Z`` before pooling is omitted, as in all
    of the paper's experiments.

    Shapes: ``z: (B, N, dim)``, ``mask: (B, N)`` -> ``(B, num_seeds, dim)``. An empty set pools to
    the seeds passed through the block with a zero attention output (finite).

    Example:
        >>> import torch
        >>> PMA(16, num_heads=4, num_seeds=2)(torch.randn(3, 10, 16)).shape
        torch.Size([3, 2, 16])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_seeds: int,
        *,
        options: BlockOptions | None = None,
        **keywords: Unpack[BlockKeywords],
    ) -> None:
        super().__init__()
        check_positive("num_seeds", num_seeds)
        self.dim = dim
        self.seeds = nn.Parameter(torch.empty(num_seeds, dim))
        self.mab = MAB(dim, dim, dim, num_heads, options=BlockOptions.of(options, keywords))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.seeds)

    def forward(self, z: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``z: (B, N, dim)``, ``mask: (B, N)`` -> ``(B, num_seeds, dim)``.

        ``chunk_size``: accumulate the attention over ``chunk_size`` elements at a time with an online
        softmax (see :func:`settransformer.nn.streaming.pma_chunked`); ``z`` may be any sliceable array-like.
        """
        if _chunked_input(z, chunk_size):
            return pma_chunked(self, z, mask, chunk_size=cast(int, chunk_size))
        z, mask = prepare_set(z, mask, self.dim, self.seeds, name="z")
        return block_output(self.forward_unchecked(z, mask))

    def forward_unchecked(self, z: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`forward` without input checks; ``z`` must be zero at padded rows."""
        return self.mab.forward_unchecked(self.seeds[None], z, mask)

    def pipeline(self) -> Pipeline:
        """The block as chunked evaluation sees it (:class:`~settransformer.nn.streaming.Chunkable`)."""
        return Pipeline(self.dim, self.dim, self.seeds, pooling=self)

    def summary_queries(self, name: str) -> PooledQueries:
        """The seeds prepared to attend over chunks of the set."""
        check_dot_product(self.mab, f"{name}.mab")
        return PooledQueries(self.mab, self.seeds[None])


# Fused CPU attention that also returns the log-sum-exp (a private op: absent -> plain products).
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def check_dot_product(mab: MAB, name: str) -> None:
    """Raise ``ValueError`` unless ``mab`` uses the default soft dot-product attention.

    The online softmax accumulates ``exp(q . x)`` over raw rows; other score functions (a MAB's
    ``score`` other than ``None``, i.e. ``"dot"``) and hard ``top_k`` attention do not decompose
    that way.

    Example:
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
    :class:`~settransformer.nn.streaming.SummaryQueries`.

    Args:
        mab: the block, with dot-product scores.
        q: its raw queries ``(Bq, Nq, dim_q)``, ``Bq`` = 1 (learned, shared) or ``B``.

    Example:
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
        scores = torch.matmul(self.q_in, kvn.transpose(1, 2))  # (B, H*Nq, c)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        # An all-masked chunk has max -inf; clamping keeps the reference finite (its weights are 0).
        ref = scores.detach().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
        weights = torch.exp(scores - ref)
        denom = weights.sum(dim=-1, keepdim=True)
        if dropout:
            # dropout on the normalised weights = dropout on the numerator only
            weights = F.dropout(weights, mab.dropout)
        return ref, denom, torch.matmul(weights, kvn)

    def _fused_stats(self, kvn: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`stats` by PyTorch's fused CPU flash-attention kernel (no autograd, no dropout).

        Its normalised output and log-sum-exp are the statistics relative to ``ref = lse``
        (``denom = 1``); about twice as fast as separate products and exponentials for narrow sets.
        """
        assert _FUSED is not None
        b = kvn.shape[0]
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
        denom = torch.ones_like(lse[:, 0, :, None])
        if mask is not None:  # the kernel gives an all-masked row out = 0, lse = 0
            denom = denom * mask.any(dim=1).to(denom.dtype)[:, None, None]
        return lse[:, 0, :, None], denom, out[:, 0]

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
    buffers reused from call to call. Where :func:`~settransformer.nn.attention.induced_is_cheaper`
    says so, ``h``'s keys are folded with the query projection and its values with the output
    projection (the ``"induced"`` form of :func:`settransformer.nn.attention.induced_attention`):
    a chunk then costs two large products (scores, output) plus the rFF. The output bias is folded
    into the values: each head's softmax weights sum to one, so adding ``b_o / H`` to every folded
    value row adds ``b_o`` to the output. Otherwise (no output projection, as in the official
    layout, or many induced vectors) a chunk runs the standard per-head products on ``h``'s
    precomputed keys and values.

    With autograd, autocast, active dropout, another score function or ``top_k``, or off the CPU,
    it calls :meth:`MAB.forward_unchecked` instead (in ``form`` where one is given); both agree up
    to float rounding.

    Args:
        mab: an ISAB's ``mab1``.
        h: the induced set ``(B, m, dim)``.
        form: ``"induced"``: fold as above; ``"standard"``: the per-head products; ``"pooled"``:
            call :meth:`MAB.forward_unchecked` in that form; ``None``: fold where it is cheaper
            (and off the fast path, let each call choose).
        keep_buffers: take the buffers kept on this thread from an earlier
            ``InducedRows(..., keep_buffers=True)`` of any block and keep them for the next one
            (see :mod:`settransformer.nn.workspace`), instead of new ones for this object only.

    Results of the fast path are overwritten by the next call (see :meth:`__call__`), and with
    ``keep_buffers`` by the next call of any ``InducedRows`` with ``keep_buffers`` on this thread.

    Example:
        >>> import torch
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
            plain and h.device.type == "cpu" and not dropout and not torch.is_grad_enabled() and not autocast
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
        """The fast path of :meth:`__call__`, in the buffers of ``ws``."""
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
    """:class:`_InPlaceOps` writing into workspace buffers (no dropout): the tail's steps named by
    :meth:`MAB._norm_ff` (``"n1"``, ``"out"``, ``"nff"``) and :func:`_feed_forward_in_place`
    (``"ff0"``, ``"ff2"``) go to the slots of ``slots`` (see :func:`_tail_slots`)."""

    def __init__(self, ws: Workspace, slots: Mapping[str, str]) -> None:
        self.ws = ws.named(slots)

    def norm(self, layer: nn.Module, x: Tensor, name: str) -> Tensor:
        return _layer_norm(layer, x, self.ws.get(name, *x.shape), self.ws)

    def ff(self, mab: MAB, x: Tensor) -> Tensor:
        return _feed_forward_in_place(mab.ff, x, self.ws)


def _tail_slots(mab: MAB, stream: str, spare: tuple[str, ...]) -> dict[str, str]:
    """Where each step of ``mab``'s tail writes (:class:`_BufferOps`), given the slot ``stream``
    holding its input and the slots ``spare`` free to overwrite: each step takes a slot whose
    content is not read again, so a block holds a few buffers, not one per step. The last step
    writes the tail's result into ``spare[0]``, which the callers name ``"s"``: the slot
    :meth:`InducedRows.__call__` lends to its ``out``."""
    a, b = spare[0], spare[1] if len(spare) > 1 else "t"
    if mab.norm == "post":  # n1 = norm1(y); ff(n1) (+ n1, in place); out = norm2(that)
        return {"n1": a, "ff0": stream, "ff2": b, "out": a}
    # ff(...) (+ y, in place): the rFF's last product holds the result
    two = len(mab.ff) > 2 if isinstance(mab.ff, nn.Sequential) else False
    if mab.norm == "pre":  # nff = norm(y), read by the first product only
        return {"nff": a, "ff0": b, "ff2": a} if two else {"nff": b, "ff0": a}
    return {"ff0": b, "ff2": a} if two else {"ff0": a}


def _linear(layer: nn.Linear, x: Tensor, out: Tensor) -> Tensor:
    """``layer(x)`` written into ``out`` (same leading shape as ``x``)."""
    flat = out.view(-1, layer.out_features)
    torch.addmm(layer.bias, x.reshape(-1, layer.in_features), layer.weight.t(), out=flat)
    return out


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


def _feed_forward_in_place(ff: nn.Module, x: Tensor, ws: Workspace | None = None) -> Tensor:
    """``ff(x)`` without autograd for the blocks' own ``Linear, ReLU[, Linear]``: ReLU in place, each
    product into a workspace buffer of ``ws`` when given (any other module: called)."""
    if not isinstance(ff, nn.Sequential) or not all(isinstance(m, nn.Linear | nn.ReLU) for m in ff):
        return cast(Tensor, ff(x))
    for i, layer in enumerate(ff):
        if not isinstance(layer, nn.Linear):
            x = x.relu_()
        elif ws is None:
            x = layer(x)
        else:
            x = _linear(layer, x, ws.get(f"ff{i}", *x.shape[:-1], layer.out_features))
    return x


@contextlib.contextmanager
def attention_forms(model: nn.Module, forms: Form | Mapping[MAB, Form | Sequence[Form]]) -> Iterator[None]:
    """Within the context, the attention blocks of ``model`` use pinned forms (:attr:`MAB.form`).

    Args:
        model: the module whose :class:`MAB` s are pinned.
        forms: one of :data:`FORMS` for every block of ``model``, or a form (or a sequence of
            forms, replayed call after call) per block; blocks not named keep choosing by cost.

    The forms are exact rewrites of each other, so results agree up to float rounding; what
    changes is the cost, and which form a trace records.

    Example:
        >>> import torch
        >>> from settransformer import SetTransformer
        >>> model, x = SetTransformer(2, 1, 1, dim_hidden=16, num_inducing=4).eval(), torch.randn(2, 50, 2)
        >>> with attention_forms(model, "standard"):
        ...     standard = model(x)
        >>> torch.allclose(standard, model(x), atol=1e-5)
        True
    """
    mabs = [m for m in model.modules() if isinstance(m, MAB)]
    pins = dict.fromkeys(mabs, forms) if isinstance(forms, str) else dict(forms)
    saved = {m: m.form for m in pins}
    try:
        for m, f in pins.items():
            m.form = f
        yield
    finally:
        for m, previous in saved.items():
            m.form = previous


Batch = tuple[Tensor, ...]  # (x, mask) and the model's further inputs, if any


@contextlib.contextmanager
def large_set_forms(
    model: nn.Module, example: Batch, probe: Batch, call: Callable[[Batch], object]
) -> Iterator[None]:
    """Within the context, every :class:`MAB` of ``model`` uses the form it picks for large sets.

    That is the form ``torch.export`` picks with a symbolic set size; a trace at ``example``'s
    size then holds for every size.

    Args:
        model: the model to be traced.
        example, probe: ``(x, mask)`` batches (and the model's further inputs) of two different
            set sizes.
        call: runs ``model`` on a batch (in evaluation mode, without gradients).

    The blocks are called in the same order on every forward pass, so the ``k``-th call of a block
    is given the form computed from its ``k``-th call at the two sizes: a count that differs between
    them grows with N and counts as infinite.

    Example:
        >>> import torch
        >>> from settransformer import SetTransformer
        >>> model = SetTransformer(2, 1, 1, dim_hidden=16, num_inducing=4).eval()
        >>> def batch(n):
        ...     return torch.randn(2, n, 2), torch.ones(2, n, dtype=torch.bool)
        >>> with large_set_forms(model, batch(8), batch(11), lambda b: model(*b)):
        ...     model.pma.mab.choose_form(1, 8)  # what it picks for a large set
        'pooled'
    """
    mabs = [m for m in model.modules() if isinstance(m, MAB)]
    first = _attention_sizes(mabs, example, call)
    second = _attention_sizes(mabs, probe, call)
    forms: dict[MAB, tuple[Form, ...]] = {}
    for m in mabs:
        a, b = first[m], second[m]
        forms[m] = ("standard",)  # the form whose graph holds for every size, when in doubt
        if len(a) == len(b) and a:
            forms[m] = tuple(
                m._cheapest(math.inf if q1 != q2 else q1, math.inf if k1 != k2 else k1)
                for (q1, k1), (q2, k2) in zip(a, b)
            )
    with attention_forms(model, forms):
        yield


def _attention_sizes(
    mabs: list[MAB], batch: Batch, call: Callable[[Batch], object]
) -> dict[MAB, list[tuple[int, int]]]:
    """The ``(queries, keys)`` counts of every :meth:`MAB.choose_form` call of each block on ``batch``."""
    for m in mabs:
        m._size_log = []
    try:
        call(batch)
        return {m: list(m._size_log or ()) for m in mabs}
    finally:
        for m in mabs:
            m._size_log = None
