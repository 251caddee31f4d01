"""The multihead attention block ``MAB(X, Y)`` (Lee et al., 2019, section 3.1), its options, and
every form of its attention.

A MAB takes its queries ``(B, Nq, dim_q)`` and the set they attend to ``(B, N, dim_kv)`` with an
optional boolean ``mask: (B, N)`` (True = real element); padded elements (whatever their values,
NaN included) have no influence on any output and receive zero gradient. The set blocks built on it
(SAB, ISAB, PMA) are in [`settransformer.nn.blocks`][settransformer.nn.blocks].

Options ([`BlockOptions`][settransformer.nn.mab.BlockOptions], or the same names as keywords of every block):

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
  [`settransformer.nn.scores`][settransformer.nn.scores].
- ``top_k``: hard attention: each query keeps only its ``top_k`` highest-scoring keys (``None``: all).

Forms of the attention. A MAB computes its dot-product attention in one of three exact forms
([`settransformer.nn.attention`][settransformer.nn.attention]), chosen by cost from the numbers of queries and
keys ([`MAB.choose_form`][settransformer.nn.mab.MAB.choose_form]): ``"standard"``; ``"pooled"`` for a few
queries over a large set (PMA seeds, inducing points); ``"induced"`` for a large set attending to a few keys
(an ISAB's second block). Sets read in chunks, and an ISAB's rows without autograd, use two more
([`settransformer.nn.rows`][settransformer.nn.rows]). All agree up to float rounding.

A form can be pinned ([`MAB.form`][settransformer.nn.mab.MAB.form],
[`attention_forms`][settransformer.nn.mab.attention_forms]): a trace (TorchScript, ONNX) keeps the form chosen
at the traced size for every size, so [`large_set_forms`][settransformer.nn.mab.large_set_forms] pins each
block, while a model is traced, to the form it uses for large sets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, TypedDict, Unpack, cast, get_args

import torch
from torch import Tensor, nn

from .attention import (
    FormSizes,
    _attention,
    cheapest_form,
    induced_attention,
    merge_heads,
    pooled_attention,
    split_heads,
)
from .scores import ScoreSpec, check_score, make_score
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
)
from .workspace import Workspace

__all__ = [
    "FORMS",
    "MAB",
    "BlockKeywords",
    "BlockOptions",
    "Form",
    "Norm",
    "attention_forms",
    "large_set_forms",
]

Norm = Literal["post", "pre"] | None
Residual = Literal["auto", "input", "projected"]
Form = Literal["standard", "pooled", "induced"]
FORMS: tuple[Form, ...] = get_args(Form)
"""The exact forms of a MAB's attention (see the module docstring)."""


class BlockKeywords(TypedDict, total=False):
    """The fields of [`BlockOptions`][settransformer.nn.mab.BlockOptions], as keyword arguments of the blocks
    and models.

    Examples:
        >>> keywords: BlockKeywords = {"norm": "pre", "ff_dim": 64}
        >>> MAB(3, 5, 16, num_heads=4, **keywords).norm
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

    Examples:
        >>> options = BlockOptions(norm="pre", ff_dim=64)
        >>> MAB(3, 5, 16, num_heads=4, options=options).norm
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
        # stored as Python numbers (NumPy scalars pass the checks), so configs and reprs stay plain
        object.__setattr__(self, "dropout", check_probability("dropout", self.dropout))
        check_scale(self.scale)
        if not isinstance(self.out_proj, bool):
            raise TypeError(f"out_proj: expected True or False, got {self.out_proj!r}")
        if self.residual not in ("auto", "input", "projected"):
            raise ValueError(f"residual: expected 'auto', 'input' or 'projected', got {self.residual!r}")
        check_score(self.score)
        object.__setattr__(self, "top_k", check_top_k(self.top_k))

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
    """The operations of a block's tail (`MAB._norm_ff`): new tensors, autograd, dropout."""

    def norm(self, layer: nn.Module, x: Tensor, name: str) -> Tensor:
        return cast(Tensor, layer(x))

    def ff(self, mab: MAB, x: Tensor) -> Tensor:
        return cast(Tensor, mab.drop(mab.ff(x)))

    def add(self, stream: Tensor, branch: Tensor) -> Tensor:
        return stream + branch


class _InPlaceOps(_Ops):
    """`_Ops` without autograd: ReLU and sums in place on the tensors the block just made,
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
        options: [`BlockOptions`][settransformer.nn.mab.BlockOptions]; keywords of the same names override its
            fields.

    Shapes: ``q: (B, Nq, dim_q)`` (or ``(1, Nq, dim_q)``, shared by the batch), ``kv: (B, Nk, dim_kv)``,
    ``mask: (B, Nk)`` over ``kv`` -> ``(B, Nq, dim)``.

    Examples:
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
        """The pinned form of the attention: ``None`` (default: the cheapest for each call's sizes), one of
        [`FORMS`][settransformer.nn.mab.FORMS] for every call, or a tuple of them replayed call after call.

        Blocks with another score or ``top_k`` always use ``"standard"``.

        Examples:
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
        """The form of the attention for ``nq`` queries and ``nk`` keys: the pinned
        [`form`][settransformer.nn.mab.MAB.form], or the cheapest exact one
        ([`cheapest_form`][settransformer.nn.attention.cheapest_form]) on a CPU.

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
        """[`forward`][settransformer.nn.mab.MAB.forward] without input checks; ``kv`` must already be zero at
        padded rows.

        ``projected`` lets a caller that already computed ``(q', k, v)`` (in one fused product,
        say) skip the projections. ``form`` is the form a caller already took from
        [`choose_form`][settransformer.nn.mab.MAB.choose_form] for this call (a second call would advance a
        pinned sequence again); by default this method asks
        [`choose_form`][settransformer.nn.mab.MAB.choose_form] itself.
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
        """The block after its attention: residual, then `_norm_ff`.

        ``q``: the raw queries ``(Bq, Nq, dim_q)``; ``qp``: the projected ones (the residual when
        `residual` is ``"projected"``); ``o``: the attention output after ``W^O``, ``(B, Nq, dim)``.
        """
        residual = q if self.residual == "input" or qp is None else qp
        ops = _tail_ops()
        return self._norm_ff(ops.add(residual, self.drop(o)), ops)

    def _norm_ff(self, h: Tensor, ops: _Ops = _NEW_TENSORS) -> Tensor:
        """The rFF and the norms around it, on ``h`` = residual + attention output ``(B, Nq, dim)``.

        ``ops`` computes each step: new tensors by default, workspace buffers in
        [`InducedRows`][settransformer.nn.rows.InducedRows].
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


def _linear(layer: nn.Linear, x: Tensor, out: Tensor) -> Tensor:
    """``layer(x)`` written into ``out`` (same leading shape as ``x``)."""
    flat = out.view(-1, layer.out_features)
    torch.addmm(layer.bias, x.reshape(-1, layer.in_features), layer.weight.t(), out=flat)
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
    """Within the context, the attention blocks of ``model`` use pinned forms
    ([`MAB.form`][settransformer.nn.mab.MAB.form]).

    Args:
        model: the module whose [`MAB`][settransformer.nn.mab.MAB]s are pinned.
        forms: one of [`FORMS`][settransformer.nn.mab.FORMS] for every block of ``model``, or a form (or a
            sequence of forms, replayed call after call) per block; blocks not named keep choosing by cost.

    The forms are exact rewrites of each other, so results agree up to float rounding; what
    changes is the cost, and which form a trace records.

    Examples:
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
    """Within the context, every [`MAB`][settransformer.nn.mab.MAB] of ``model`` uses the form it picks for
    large sets.

    That is the form ``torch.export`` picks with a symbolic set size; a trace at ``example``'s
    size then holds for every size.

    Args:
        model: the model to be traced.
        example: an ``(x, mask)`` batch (and the model's further inputs).
        probe: a batch like ``example`` of another set size.
        call: runs ``model`` on a batch (in evaluation mode, without gradients).

    The blocks are called in the same order on every forward pass, so the ``k``-th call of a block
    is given the form computed from its ``k``-th call at the two sizes: a count that differs between
    them grows with N and counts as infinite.

    Examples:
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
    """The ``(queries, keys)`` counts of every [`MAB.choose_form`][settransformer.nn.mab.MAB.choose_form] call
    of each block on ``batch``."""
    for m in mabs:
        m._size_log = []
    try:
        call(batch)
        return {m: list(m._size_log or ()) for m in mabs}
    finally:
        for m in mabs:
            m._size_log = None
