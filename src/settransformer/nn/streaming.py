"""Chunked, memory-bounded evaluation of set models over huge sets.

A set of millions of elements is read ``chunk_size`` elements at a time; only one chunk's
activations exist at any moment. Two facts make this exact:

- The attention of a few learned queries (inducing points, PMA seeds) over the whole set is
  accumulated with an online softmax ([`OnlineSoftmax`][settransformer.nn.streaming.OnlineSoftmax]).
- Everything else acts row by row: the second MAB of an ISAB (each element attends to the ``m``
  induced vectors), the rFF, and every LayerNorm.

A stack of ``L`` ISABs followed by pooling is evaluated in ``L + 1`` passes over the input, each
recomputing the earlier layers chunk by chunk instead of storing their ``(N, dim)`` outputs::

    pass 1:    H_1 = MAB(I_1, X)                          accumulated over chunks of X
    pass 2:    H_2 = MAB(I_2, Y_1), Y_1 = mab1_1(X, H_1)  Y_1 recomputed per chunk
    ...
    pass L+1:  PMA(S, Y_L) accumulated over chunks, then the decoder on the few seeds

So the chunked path computes ``L (L + 1) / 2`` row-wise ``mab1`` passes instead of ``L``.

This module knows no concrete block or model: it sees a module through
[`Chunkable`][settransformer.nn.streaming.Chunkable], whose `pipeline` describes it as row-wise stages (some
of which first need a summary of the whole set, [`InducedStage`][settransformer.nn.streaming.InducedStage]), a
pooling and a decoder of the pooled vectors ([`Pipeline`][settransformer.nn.streaming.Pipeline]).
[`ISAB`][settransformer.nn.blocks.ISAB], [`PMA`][settransformer.nn.blocks.PMA],
[`SetTransformer`][settransformer.nn.models.SetTransformer] and
[`DeepSets`][settransformer.nn.models.DeepSets] implement it.

The input ``x`` may be any array-like sliceable along the element axis: a tensor, a NumPy array
or ``np.memmap``, an ``h5py`` dataset ([`ChunkSource`][settransformer.nn.streaming.ChunkSource]). Only one
chunk is turned into a tensor at a time (in the model's dtype and on its device), so a set larger than memory
can be encoded. ``x`` is either a batch ``(B, N, D)`` (with an optional ``mask: (B, N)``, True = real element)
or one set ``(N, D)`` (mask ``(N,)``); for one set, results have no batch dimension.

Memory (float32, ``c = chunk_size``, ``w = max(dim, heads * m)``):

- inference (under ``torch.no_grad()`` / ``torch.inference_mode()``): ``O(B c w)`` for one chunk's
  activations, plus ``O(B m dim)`` per layer for the inducing statistics. Per-element outputs
  ([`encode_chunked`][settransformer.nn.streaming.encode_chunked],
  [`isab_chunked`][settransformer.nn.streaming.isab_chunked]) add their own ``(B, N, dim)`` result, unless
  written into a memmap or h5py ``out``.
- training (grad enabled): each chunk's function is checkpointed
  (`torch.utils.checkpoint.checkpoint`), so forward keeps only the chunk inputs (views of
  ``x`` when it is a tensor, otherwise the ``O(B N D)`` converted chunks) and ``O(B heads m)``
  rescaling factors per chunk and layer; backward recomputes one chunk at a time,
  ``O(B c w L)``. Gradients equal the unchunked ones (up to how a max pooling splits the
  gradient among tied elements). Attention dropout is applied to each
  chunk's weights (the same distribution as unchunked dropout, not the same random draws); in
  training mode each chunk draws from its own seed, the same in every pass, so the rows that
  attend to a summary are the rows it was built from.

Only soft dot-product attention can be accumulated this way: an ISAB's first MAB or PMA with
another ``score`` or with ``top_k`` raises ``ValueError`` (the second MAB may use any). SAB encoder
layers attend over the whole set and cannot be chunked.

The online softmax: one query row ``j`` needs three running statistics over the raw rows ``x_i``
it has seen (in the pooled form of
[`settransformer.nn.attention.pooled_attention`][settransformer.nn.attention.pooled_attention]): ``r_j``, a
reference score (the running maximum, for numerical stability); ``S_j = sum_i exp(s_ij - r_j)``, the softmax
denominator; ``A_j = sum_i exp(s_ij - r_j) x_i``, the un-normalised weighted sum. Two partial results combine
exactly by rescaling both to the larger reference, and the softmax output is ``A_j / S_j`` whatever the
chunking, up to float rounding. The references are detached: they cancel out of ``A / S`` exactly, so treating
them as constants gives the true gradient, and combining a chunk's statistics then saves only its
``(B, queries, 1)`` factors for backward, never the chunk's ``(B, queries, D)`` sums.

Examples:
    >>> import torch
    >>> from settransformer import SetTransformer
    >>> model = SetTransformer(3, num_outputs=1, dim_output=2, dim_hidden=16, num_inducing=4).eval()
    >>> x = torch.randn(2, 1000, 3)
    >>> with torch.no_grad():
    ...     torch.allclose(encode_pool_chunked(model, x, chunk_size=300), model(x), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .sets import PoolKind, accumulation_dtype, finish_pool, merge_pooled, pool_count, pool_partial
from .validation import check_finite, check_positive, zero_padding

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkSource",
    "Chunkable",
    "InducedStage",
    "MappedRows",
    "OnlineSoftmax",
    "Pipeline",
    "SummaryQueries",
    "encode_chunked",
    "encode_pool_chunked",
    "induce_chunked",
    "isab_chunked",
    "iter_encode_chunked",
    "pma_chunked",
]

DEFAULT_CHUNK_SIZE = 4096
"""``chunk_size`` of the chunked functions when none is given: the fastest of 1,024 .. 16,384 for a
width-128 SetTransformer at N = 1e6 on 2 CPU threads (``benchmarks/results/chunk_sizes.md``): smaller
chunks pay each chunk's fixed costs more often, larger ones leave the CPU's caches."""

RowFn = Callable[[Tensor], Tensor]
Stats = tuple[Tensor, Tensor, Tensor]


@runtime_checkable
class SummaryQueries(Protocol):
    """A few queries' softmax attention over a set, from statistics gathered chunk by chunk.

    ``stats(x, mask)``: one chunk's ``(ref, denom, acc)`` (see
    [`OnlineSoftmax`][settransformer.nn.streaming.OnlineSoftmax]) for ``x: (B, c, D)`` zero at padded rows;
    ``finish(pooled, empty)``: the attention block's output from the softmax-weighted rows and the ``(B,)``
    flags of empty sets.

    Examples:
        >>> from settransformer.nn.blocks import PMA
        >>> queries = PMA(8, num_heads=2, num_seeds=1).summary_queries("pma")
        >>> ref, denom, acc = queries.stats(torch.randn(2, 5, 8), None)
        >>> isinstance(queries, SummaryQueries), ref.shape, acc.shape
        (True, torch.Size([2, 2, 1]), torch.Size([2, 2, 8]))
    """

    def stats(self, x: Tensor, mask: Tensor | None) -> Stats:
        """One chunk's ``ref: (B, Q, 1)`` (detached), ``denom: (B, Q, 1)`` and ``acc: (B, Q, D)``."""
        ...

    def finish(self, pooled: Tensor, empty: Tensor) -> Tensor:
        """The attention block's output ``(B, Nq, dim)`` from ``pooled: (B, Q, D)`` and ``empty: (B,)``."""
        ...


@runtime_checkable
class SummarySource(Protocol):
    """What attends over the whole set: ``summary_queries(name)`` returns its
    [`SummaryQueries`][settransformer.nn.streaming.SummaryQueries] (``ValueError`` naming ``name`` when its
    attention cannot be accumulated chunk by chunk).

    Examples:
        >>> from settransformer.nn.blocks import PMA
        >>> isinstance(PMA(8, num_heads=2, num_seeds=1), SummarySource)
        True
    """

    def summary_queries(self, name: str) -> SummaryQueries:
        """The module's queries prepared to attend over the set chunk by chunk (``name`` for messages)."""
        ...


@runtime_checkable
class InducedStage(SummarySource, Protocol):
    """A row-wise stage that first needs a summary of the whole set (an ISAB).

    ``summary_queries`` gives the summary ``H`` over the stage's input; ``rows_given(H)`` the
    row-wise function ``(B, c, D_in) -> (B, c, D_out)`` of the stage.

    Examples:
        >>> from settransformer.nn.blocks import ISAB
        >>> isab = ISAB(3, 8, num_heads=2, num_inducing=4)
        >>> isinstance(isab, InducedStage), isab.rows_given(torch.randn(2, 4, 8))(torch.randn(2, 5, 3)).shape
        (True, torch.Size([2, 5, 8]))
    """

    def rows_given(self, summary: Tensor) -> RowFn:
        """The stage's row-wise function ``(B, c, D_in) -> (B, c, D_out)`` given ``summary: (B, m, D)``."""
        ...


@dataclass(frozen=True)
class Pipeline:
    """A module as the chunked evaluation sees it.

    Attributes:
        dim_in: feature size of the input elements.
        dim_out: feature size of the per-element output of the stages.
        like: a parameter of the module: chunks are converted to its dtype and device.
        stages: applied in order, each to rows zero at padding: a row-wise module/function, or an
            [`InducedStage`][settransformer.nn.streaming.InducedStage].
        pooling: a [`SummarySource`][settransformer.nn.streaming.SummarySource] (attention pooling), a masked
            pooling kind, or ``None`` (per-element outputs only).
        pool_input: a row-wise function applied to the stages' output before pooling only.
        decode_pooled: from the pooled ``(B, k, dim)`` (attention) or ``(B, dim)`` (masked
            pooling) to the module's output.

    Examples:
        >>> from settransformer import DeepSets
        >>> pipe = DeepSets(3, 1, 2, dim_hidden=16, pool="max").pipeline()
        >>> pipe.dim_in, pipe.dim_out, pipe.pooling, len(pipe.stages)
        (3, 16, 'max', 1)
    """

    dim_in: int
    dim_out: int
    like: Tensor
    stages: Sequence[RowFn | InducedStage] = ()
    pooling: SummarySource | PoolKind | None = None
    pool_input: RowFn | None = None
    decode_pooled: RowFn | None = None
    seeded: bool = False
    """Whether each chunk draws its random numbers (dropout) from its own seed, the same in every
    pass; set for a module in training mode."""


@runtime_checkable
class Chunkable(Protocol):
    """A module evaluated chunk by chunk: ``pipeline()`` describes it
    ([`Pipeline`][settransformer.nn.streaming.Pipeline]).

    Examples:
        >>> from settransformer import SetTransformer
        >>> model = SetTransformer(3, num_outputs=1, dim_output=2, dim_hidden=16, num_inducing=4)
        >>> isinstance(model, Chunkable), isinstance(torch.nn.Linear(3, 2), Chunkable)
        (True, False)
    """

    def pipeline(self) -> Pipeline:
        """The module as chunked evaluation sees it ([`Pipeline`][settransformer.nn.streaming.Pipeline])."""
        ...


class OnlineSoftmax:
    """Running softmax statistics of ``Q`` query rows over a set seen chunk by chunk.

    Feed it each chunk's ``(ref, denom, acc)``
    (from [`SummaryQueries.stats`][settransformer.nn.streaming.SummaryQueries.stats]) with
    [`add`][settransformer.nn.streaming.OnlineSoftmax.add]: ``ref: (B, Q, 1)`` detached, ``denom: (B, Q, 1)``
    and ``acc: (B, Q, D)`` relative to it. [`result`][settransformer.nn.streaming.OnlineSoftmax.result]
    returns the softmax-weighted sums ``(B, Q, D)`` and which sets were empty. Sums of 16-bit floats
    accumulate in float32 (the sum over a set of more than 65,504 elements overflows float16), and the
    result is in the dtype of the chunks' ``acc``.

    Examples:
        >>> import torch
        >>> s = torch.randn(1, 1, 10)  # scores of one query over 10 rows x
        >>> x = torch.randn(1, 10, 3)
        >>> acc = OnlineSoftmax()
        >>> for part in (slice(0, 4), slice(4, 10)):
        ...     ref = s[..., part].amax(-1, keepdim=True)
        ...     w = torch.exp(s[..., part] - ref)
        ...     acc.add(ref, w.sum(-1, keepdim=True), w @ x[:, part])
        >>> out, empty = acc.result()
        >>> torch.allclose(out, torch.softmax(s, -1) @ x), empty.tolist()
        (True, [False])
    """

    def __init__(self) -> None:
        self.ref: Tensor | None = None  # (B, Q, 1), detached, finite
        self.denom: Tensor | None = None  # (B, Q, 1)
        self.acc: Tensor | None = None  # (B, Q, D)
        self.dtype: torch.dtype | None = None  # the chunks' (acc's) dtype, that of the result

    def add(self, ref: Tensor, denom: Tensor, acc: Tensor) -> None:
        """Merge one chunk's statistics (``ref`` detached, ``denom`` and ``acc`` relative to it)."""
        if self.ref is None or self.denom is None or self.acc is None:
            self.dtype = acc.dtype
            self.ref, self.denom, self.acc = _wide(ref), _wide(denom), _wide(acc)
            return
        ref, denom, acc = _wide(ref), _wide(denom), _wide(acc)
        new_ref = torch.maximum(self.ref, ref)
        old_scale, scale = torch.exp(self.ref - new_ref), torch.exp(ref - new_ref)
        self.denom = self.denom * old_scale + denom * scale
        self.acc = self.acc * old_scale + acc * scale
        self.ref = new_ref

    def result(self) -> tuple[Tensor, Tensor]:
        """``(weighted sums (B, Q, D), empty (B,) bool)``; an empty set's sums are zero."""
        if self.denom is None or self.acc is None:
            raise ValueError("x: the set has no elements (chunked evaluation saw no chunk)")
        seen = self.denom > 0  # the running maximum contributes exp(0) = 1 unless all are masked
        out = self.acc / torch.where(seen, self.denom, torch.ones_like(self.denom))
        return out.to(self.dtype), ~seen[:, 0, 0]


def _wide(t: Tensor) -> Tensor:
    """``t`` in its [`accumulation_dtype`][settransformer.nn.sets.accumulation_dtype]."""
    return t.to(accumulation_dtype(t.dtype))


def _grad_mode() -> bool:
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, checkpointed when autograd records (backward recomputes it)."""
    return checkpoint(fn, *args, use_reentrant=False) if _grad_mode() else fn(*args)


class _Evaluation:
    """One chunked evaluation of a [`Pipeline`][settransformer.nn.streaming.Pipeline] over one
    [`ChunkSource`][settransformer.nn.streaming.ChunkSource]."""

    def __init__(self, pipe: Pipeline, x: Any, mask: Any, chunk_size: int) -> None:
        self.pipe, self.chunk_size = pipe, check_positive("chunk_size", chunk_size)
        # every summary up front: a block that cannot be chunked fails before any pass
        self.summaries = [
            stage.summary_queries(f"encoder[{i}]") if isinstance(stage, InducedStage) else None
            for i, stage in enumerate(pipe.stages)
        ]
        self.pool_queries = (
            pipe.pooling.summary_queries("pma") if isinstance(pipe.pooling, SummarySource) else None
        )
        self.src = ChunkSource(x, mask, pipe.dim_in, dtype=pipe.like.dtype, device=pipe.like.device)
        # Pass p recomputes the stages before p on every chunk: with dropout, a chunk must draw the
        # same numbers each time, or the rows that attend to a summary are not those it was built from.
        self.seed = int(torch.randint(2**62, ())) if pipe.seeded else None

    def chunks(self) -> Iterator[tuple[int, Tensor, Tensor | None]]:
        for start in range(0, self.src.n, self.chunk_size):
            yield (start, *self.src.chunk(start, start + self.chunk_size))

    def call(self, fn: Callable[..., Any], start: int, x: Tensor, mask: Tensor | None) -> Any:
        """``fn(x, mask)`` on the chunk at ``start``, checkpointed under autograd, its random
        numbers (if seeded) drawn from the chunk's own seed."""
        if self.seed is None:
            return _run(fn, x, mask)
        cuda = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            torch.manual_seed(self.seed + start)
            return _run(fn, x, mask)

    def accumulate(self, fn: Callable[[Tensor, Tensor | None], Stats]) -> tuple[Tensor, Tensor]:
        """Feed ``fn(x_chunk, mask_chunk) -> (ref, denom, acc)`` of every chunk to an online softmax."""
        acc = OnlineSoftmax()
        for start, x, mask in self.chunks():
            if acc.ref is not None and mask is not None and not bool(mask.any()):
                continue  # all padding: contributes nothing
            acc.add(*self.call(fn, start, x, mask))
        return acc.result()

    def row_fns(self) -> list[RowFn]:
        """Passes 1..L: every stage as a row-wise function, each induced stage given its summary."""
        fns: list[RowFn] = []
        for stage, queries in zip(self.pipe.stages, self.summaries):
            if not isinstance(stage, InducedStage):
                fns.append(stage)
                continue
            assert queries is not None

            def stats(
                x: Tensor, mask: Tensor | None, q: SummaryQueries = queries, depth: int = len(fns)
            ) -> Stats:
                # the stages so far, bound now: a checkpointed chunk is recomputed after more are added
                return q.stats(_rows(fns[:depth], x, mask), mask)

            fns.append(stage.rows_given(queries.finish(*self.accumulate(stats))))
        return fns

    def pooled(self) -> Tensor:
        """Pass L+1: the stages' output accumulated into the pooling, then decoded."""
        pipe, fns = self.pipe, self.row_fns()
        decode = pipe.decode_pooled or (lambda pooled: pooled)

        def stage_output(x: Tensor, mask: Tensor | None) -> Tensor:
            z = _rows(fns, x, mask)
            return z if pipe.pool_input is None else zero_padding(pipe.pool_input(z), mask)

        if self.pool_queries is not None:
            queries = self.pool_queries

            def stats(x: Tensor, mask: Tensor | None) -> Stats:
                return queries.stats(stage_output(x, mask), mask)

            return decode(queries.finish(*self.accumulate(stats)))
        how = pipe.pooling
        if how not in ("mean", "sum", "max"):
            raise TypeError(f"model: {type(pipe).__name__} has no pooling to evaluate chunk by chunk")

        dtypes: list[torch.dtype] = []  # the stage output's: the pooled sums accumulate wider

        def partial(x: Tensor, mask: Tensor | None) -> Tensor:
            z = stage_output(x, mask)
            dtypes.append(z.dtype)
            return pool_partial(z, mask, how)

        total: Tensor | None = None
        count: Tensor | None = None
        for start, x, mask in self.chunks():
            part = self.call(partial, start, x, mask)
            n = pool_count(x, mask).to(part.dtype)
            total = part if total is None else merge_pooled(total, part, how)
            count = n if count is None else count + n
        if total is None or count is None:
            raise ValueError("x: the set has no elements")
        return decode(finish_pool(total, count, how, dtype=dtypes[-1]))

    def rows(self) -> Iterator[tuple[int, Tensor]]:
        """``(start, z)`` per chunk: the per-element outputs of every stage, after ``L`` passes."""
        fns = self.row_fns()

        def rows(x: Tensor, mask: Tensor | None) -> Tensor:
            return _rows(fns, x, mask)

        for start, x, mask in self.chunks():
            yield start, self.src.squeeze(self.call(rows, start, x, mask))


def _rows(fns: Sequence[RowFn], x: Tensor, mask: Tensor | None) -> Tensor:
    """Row-wise functions one after the other on one chunk ``x: (B, c, D)`` zero at padded rows."""
    for fn in fns:
        x = zero_padding(fn(x), mask)
    return x


def _pipeline(module: object, name: str, expected: str, fits: Callable[[Pipeline], bool]) -> Pipeline:
    """``module.pipeline()``, or ``TypeError`` naming ``name`` unless it is what ``fits`` accepts."""
    pipe = module.pipeline() if isinstance(module, Chunkable) else None
    if pipe is None or not fits(pipe):
        raise TypeError(f"{name}: expected {expected}, got {type(module).__name__}")
    training = isinstance(module, torch.nn.Module) and any(m.training for m in module.modules())
    return replace(pipe, seeded=training) if training else pipe


def _any(pipe: Pipeline) -> bool:
    return True


def _is_isab(pipe: Pipeline) -> bool:
    return len(pipe.stages) == 1 and isinstance(pipe.stages[0], InducedStage) and pipe.pooling is None


def _is_pma(pipe: Pipeline) -> bool:
    return not pipe.stages and isinstance(pipe.pooling, SummarySource)


_MODEL = "a SetTransformer, DeepSets, ISAB or PMA (a Chunkable module)"


def encode_pool_chunked(
    model: Chunkable, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """``model(x, mask)`` evaluated chunk by chunk in ``L + 1`` passes over ``x``.

    Args:
        model: a [`SetTransformer`][settransformer.nn.models.SetTransformer] (ISAB or rFF encoder, any
            pooling), a [`DeepSets`][settransformer.nn.models.DeepSets], a
            [`PMA`][settransformer.nn.blocks.PMA], or any [`Chunkable`][settransformer.nn.streaming.Chunkable]
            with a pooling.
        x: ``(B, N, dim_input)`` or one set ``(N, dim_input)``; a tensor or any array-like
            sliceable along the element axis (NumPy array, ``np.memmap``, h5py dataset).
        mask: ``(B, N)`` (or ``(N,)``) bool, True for real elements; ``None``: all real.
        chunk_size: elements per chunk (per set of the batch); 2k-8k is fastest on CPU.

    Returns:
        ``(B, num_outputs, dim_output)`` (``(num_outputs, dim_output)`` for one set), equal to the
            unchunked ``model(x, mask)`` up to float rounding.

    Examples:
        >>> from settransformer import DeepSets
        >>> model, x = DeepSets(3, 1, 2, dim_hidden=8, pool="max"), np.random.rand(500, 3)  # one set
        >>> with torch.no_grad():
        ...     encode_pool_chunked(model, x, chunk_size=128).shape
        torch.Size([1, 2])
    """
    pools = "a SetTransformer, DeepSets or PMA (a Chunkable module that pools; ISAB: encode_chunked)"
    pipe = _pipeline(model, "model", pools, lambda p: p.pooling is not None)
    run = _Evaluation(pipe, x, mask, chunk_size)
    return run.src.squeeze(run.pooled())


def pma_chunked(pma: Chunkable, z: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``pma(z, mask)`` over ``z: (B, N, dim)`` (or ``(N, dim)``) accumulated chunk by chunk.

    Returns ``(B, num_seeds, dim)`` (``(num_seeds, dim)`` for one set).

    Examples:
        >>> import torch
        >>> from settransformer import PMA
        >>> pma, z = PMA(8, num_heads=2, num_seeds=3).eval(), torch.randn(2, 100, 8)
        >>> with torch.no_grad():
        ...     torch.allclose(pma_chunked(pma, z, chunk_size=32), pma(z), atol=1e-5)
        True
    """
    pipe = _pipeline(pma, "pma", "a PMA", _is_pma)
    run = _Evaluation(pipe, z, mask, chunk_size)
    return run.src.squeeze(run.pooled())


def induce_chunked(
    isab: Chunkable, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """An ISAB's induced set ``H = MAB(I, X)`` accumulated chunk by chunk: ``(B, m, dim)``.

    Examples:
        >>> import torch
        >>> from settransformer import ISAB
        >>> isab, x = ISAB(3, 8, num_heads=2, num_inducing=4).eval(), torch.randn(2, 100, 3)
        >>> with torch.no_grad():
        ...     torch.allclose(induce_chunked(isab, x, chunk_size=32), isab.induce(x, None), atol=1e-5)
        True
    """
    pipe = _pipeline(isab, "isab", "an ISAB", _is_isab)
    run = _Evaluation(pipe, x, mask, chunk_size)
    queries = run.summaries[0]
    assert queries is not None

    def stats(xc: Tensor, mc: Tensor | None) -> Stats:
        return queries.stats(xc, mc)

    return queries.finish(*run.accumulate(stats))


def iter_encode_chunked(
    model: Chunkable, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[int, Tensor]]:
    """Per-element encoder outputs, one chunk at a time, after ``L`` passes over ``x``.

    Yields ``(start, z)`` with ``z: (B, c, dim_hidden)`` (``(c, dim_hidden)`` for one set) the
    embeddings of elements ``start .. start + c``, zero at padded positions.

    Examples:
        >>> import torch
        >>> from settransformer import ISAB
        >>> isab, x = ISAB(3, 8, num_heads=2, num_inducing=4).eval(), torch.randn(1, 100, 3)
        >>> with torch.no_grad():
        ...     [(start, z.shape[1]) for start, z in iter_encode_chunked(isab, x, chunk_size=40)]
        [(0, 40), (40, 40), (80, 20)]
    """
    pipe = _pipeline(model, "model", _MODEL, _any)
    for start, z in _Evaluation(pipe, x, mask, chunk_size).rows():
        yield start, z if _grad_mode() else z.clone()  # the fast path reuses its output buffer


def encode_chunked(
    model: Chunkable,
    x: Any,
    mask: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    out: Any = None,
) -> Any:
    """``model.encode(x, mask)`` (or an ISAB's output) computed chunk by chunk.

    Args:
        model: as in [`encode_pool_chunked`][settransformer.nn.streaming.encode_pool_chunked] (or an ISAB).
        x: as in [`encode_pool_chunked`][settransformer.nn.streaming.encode_pool_chunked].
        mask: as in [`encode_pool_chunked`][settransformer.nn.streaming.encode_pool_chunked].
        chunk_size: as in [`encode_pool_chunked`][settransformer.nn.streaming.encode_pool_chunked].
        out: where to write the ``(B, N, dim_hidden)`` (or ``(N, dim_hidden)``) result: a tensor,
            a NumPy array / memmap or an h5py dataset of that shape; ``None`` allocates a tensor.
            Needs grad disabled unless ``None``.

    Returns:
        ``out`` (with grad enabled and ``out=None``: a tensor that backpropagates per chunk).

    Examples:
        >>> import torch
        >>> from settransformer import SetTransformer
        >>> model = SetTransformer(3, 1, 2, dim_hidden=16, num_inducing=4).eval()
        >>> x = torch.randn(2, 100, 3)
        >>> with torch.no_grad():
        ...     torch.allclose(encode_chunked(model, x, chunk_size=32), model.encode(x), atol=1e-5)
        True
    """
    return _encode(_pipeline(model, "model", _MODEL, _any), x, mask, chunk_size, out)


def isab_chunked(
    isab: Chunkable, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE, out: Any = None
) -> Any:
    """``isab(x, mask)`` in two passes over ``x``; see
    [`encode_chunked`][settransformer.nn.streaming.encode_chunked] for ``out``.

    Returns ``(B, N, dim)`` (``(N, dim)`` for one set), zero at padded positions.

    Examples:
        >>> import torch
        >>> from settransformer import ISAB
        >>> isab = ISAB(3, 16, num_heads=4, num_inducing=8).eval()
        >>> x = torch.randn(2, 500, 3)
        >>> with torch.no_grad():
        ...     torch.allclose(isab_chunked(isab, x, chunk_size=128), isab(x), atol=1e-5)
        True
    """
    return _encode(_pipeline(isab, "isab", "an ISAB", _is_isab), x, mask, chunk_size, out)


def _encode(pipe: Pipeline, x: Any, mask: Any, chunk_size: int, out: Any) -> Any:
    run = _Evaluation(pipe, x, mask, chunk_size)
    src = run.src
    if _grad_mode():
        if out is not None:
            raise ValueError("out: cannot write into an array with autograd enabled; use torch.no_grad()")
        return torch.cat([z for _, z in run.rows()], dim=0 if src.single else 1)
    shape = (src.n, pipe.dim_out) if src.single else (src.b, src.n, pipe.dim_out)
    if out is None:
        out = torch.empty(shape, dtype=pipe.like.dtype, device=pipe.like.device)
    elif tuple(getattr(out, "shape", ())) != shape:
        raise ValueError(
            f"out: expected an array of shape {shape}, got {getattr(out, 'shape', type(out).__name__)}"
        )
    for start, z in run.rows():
        stop = start + z.shape[-2]
        value: Any = z if isinstance(out, Tensor) else z.cpu().numpy()
        if src.single:
            out[start:stop] = value
        else:
            out[:, start:stop] = value
    return out


def _is_float(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.is_floating_point()
    try:
        return bool(np.issubdtype(np.dtype(x.dtype), np.floating))
    except TypeError:
        return False


def _to_tensor(a: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(a, Tensor):
        # a copy: memmaps may be read-only, and h5py / other array-likes return NumPy arrays anyway
        a = torch.from_numpy(np.array(a))
    return a.to(device=device, dtype=dtype)


class MappedRows:
    """The rows of an array-like source passed through a row-wise function as they are read: what a
    model's preprocessing (standardising features, say) gives a chunked forward, without making the
    whole preprocessed set.

    Args:
        x: the set(s) ``(B, N, D)`` or ``(N, D)``: a tensor, NumPy array, memmap or h5py dataset.
        fn: a row-wise map of a float32 tensor ``(..., D) -> (..., D)``.

    Slicing reads the slice of ``x`` and returns ``fn`` of it, so
    [`ChunkSource`][settransformer.nn.streaming.ChunkSource] reads one chunk at a time.

    Examples:
        >>> import numpy as np, torch
        >>> rows = MappedRows(np.arange(6.0).reshape(3, 2), lambda t: t * 10)
        >>> rows.shape, rows[1:]
        ((3, 2), tensor([[20., 30.],
                [40., 50.]]))
    """

    dtype = np.dtype(np.float32)

    def __init__(self, x: Any, fn: Callable[[Tensor], Tensor]) -> None:
        if not hasattr(x, "shape") or not hasattr(x, "__getitem__"):
            raise TypeError(f"x: expected an array-like with shape and slicing, got {type(x).__name__}")
        if not _is_float(x):
            raise TypeError(f"x: expected floating-point values, got dtype {x.dtype}")
        self.x, self.fn = x, fn
        self.shape = tuple(int(s) for s in x.shape)

    def __getitem__(self, index: Any) -> Tensor:
        part = self.x[index]
        if not isinstance(part, Tensor):
            part = torch.from_numpy(np.array(part))  # a copy: memmaps may be read-only
        return self.fn(part.float())


class ChunkSource:
    """``x: (B, N, dim)`` or one set ``(N, dim)``, with an optional mask, read in chunks.

    Args:
        x: the set(s), any floating-point array-like.
        mask: ``None`` or a bool ``(B, N)`` (``(N,)`` for one set) tensor or NumPy array.
        dim: the expected feature size.
        dtype: what each chunk is converted to (the model's).
        device: where each chunk goes (the model's).

    Accepts a tensor, a NumPy array or ``np.memmap``, an h5py dataset, or anything with ``shape``,
    ``dtype`` and slicing; only the requested chunk is ever turned into a tensor.

    Examples:
        >>> import numpy as np, torch
        >>> src = ChunkSource(np.ones((10, 3), np.float64), None, 3, dtype=torch.float32, device="cpu")
        >>> x, mask = src.chunk(8, 12)
        >>> x.shape, x.dtype, mask
        (torch.Size([1, 2, 3]), torch.float32, None)
    """

    def __init__(
        self, x: Any, mask: Any, dim: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = getattr(x, "shape", None)
        expected = f"a floating-point array of shape (B, N, {dim}) or (N, {dim})"
        if shape is None or not hasattr(x, "__getitem__") or not hasattr(x, "dtype"):
            raise TypeError(
                f"x: expected {expected} (tensor, NumPy array, memmap, h5py dataset), got {type(x).__name__}"
            )
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3) or shape[-1] != dim:
            raise ValueError(f"x: expected {expected}, got shape {shape}")
        if not _is_float(x):
            raise TypeError(f"x: expected {expected}, got dtype {x.dtype}")
        if shape[-2] == 0:
            raise ValueError(f"x: expected at least one element per set, got shape {shape}")
        self.x, self.single = x, len(shape) == 2
        self.b, self.n = (1 if self.single else shape[0]), shape[-2]
        self.dtype, self.device = dtype, torch.device(device)
        self.mask = self._check_mask(mask, shape[:-1])

    def _check_mask(self, mask: Any, shape: tuple[int, ...]) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            if not isinstance(mask, np.ndarray):
                raise TypeError(
                    f"mask: expected a bool tensor or NumPy array of shape {shape}, got {type(mask).__name__}"
                )
            mask = torch.from_numpy(np.asarray(mask))
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool array of shape {shape}, got dtype {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"mask: expected shape {shape} (True for real elements), got {tuple(mask.shape)}"
            )
        mask = mask.to(self.device)
        return mask[None] if self.single else mask

    def chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
        """Elements ``start:stop`` of every set: ``x (B, c, dim)`` zero at padded rows, ``mask (B, c)``."""
        part = self.x[start:stop] if self.single else self.x[:, start:stop]
        x = _to_tensor(part, self.dtype, self.device)
        if self.single:
            x = x.unsqueeze(0)
        mask = None if self.mask is None else self.mask[:, start:stop]
        x = zero_padding(x, mask)
        try:  # every chunked path reads through here: one finiteness check for tensors, memmaps, HDF5
            check_finite(x, "x")
        except ValueError as e:
            raise ValueError(f"{e} (in elements {start}:{stop} of the chunked input)") from None
        return x, mask

    def squeeze(self, out: Tensor) -> Tensor:
        """A result ``(B, ...)`` without its batch dimension when the source is one set."""
        return out[0] if self.single else out
