"""Chunked, memory-bounded evaluation of ISAB, PMA and the Set Transformer over huge sets.

A set of millions of elements is read ``chunk_size`` elements at a time; only one chunk's
activations exist at any moment. Two facts make this exact:

- The attention of a few learned queries (inducing points, PMA seeds) over the whole set is
  accumulated with an online softmax (:mod:`settransformer.nn.blocks`).
- Everything else acts row by row: ``mab1`` of an ISAB (each element attends to the ``m`` induced
  vectors), the rFF, and every LayerNorm.

A stack of ``L`` ISABs followed by pooling is evaluated in ``L + 1`` passes over the input, each
recomputing the earlier layers chunk by chunk instead of storing their ``(N, dim)`` outputs::

    pass 1:    H_1 = MAB(I_1, X)                          accumulated over chunks of X
    pass 2:    H_2 = MAB(I_2, Y_1), Y_1 = mab1_1(X, H_1)  Y_1 recomputed per chunk
    ...
    pass L+1:  PMA(S, Y_L) accumulated over chunks, then the decoder on the few seeds

So the chunked path computes ``L (L + 1) / 2`` row-wise ``mab1`` passes instead of ``L``.

The input ``x`` may be any array-like sliceable along the element axis: a tensor, a NumPy array
or ``np.memmap``, an ``h5py`` dataset. Only one chunk is turned into a tensor at a time (in the
model's dtype and on its device), so a set larger than memory can be encoded. ``x`` is either a
batch ``(B, N, D)`` (with an optional ``mask: (B, N)``, True = real element) or one set ``(N, D)``
(mask ``(N,)``); for one set, results have no batch dimension.

Memory (float32, ``c = chunk_size``, ``w = max(dim, heads * m)``):

- inference (under ``torch.no_grad()`` / ``torch.inference_mode()``): ``O(B c w)`` for one chunk's
  activations, plus ``O(B m dim)`` per layer for the inducing statistics. Per-element outputs
  (:func:`encode_chunked`, :func:`isab_chunked`) add their own ``(B, N, dim)`` result, unless
  written into a memmap or h5py ``out``.
- training (grad enabled): each chunk's function is checkpointed
  (:func:`torch.utils.checkpoint.checkpoint`), so forward keeps only the chunk inputs (views of
  ``x`` when it is a tensor, otherwise the ``O(B N D)`` converted chunks) and ``O(B heads m)``
  rescaling factors per chunk and layer; backward recomputes one chunk at a time,
  ``O(B c w L)``. Gradients equal the unchunked ones. Attention dropout is applied to each
  chunk's weights (the same distribution as unchunked dropout, not the same random draws).

Only soft dot-product attention can be accumulated this way: an ISAB's ``mab0`` or PMA with
another ``score`` or with ``top_k`` raises ``ValueError`` (``mab1`` may use any). SAB encoder
layers attend over the whole set and cannot be chunked.

Example:
    >>> from settransformer import SetTransformer
    >>> model = SetTransformer(3, num_outputs=1, dim_output=2, dim_hidden=16, num_inducing=4).eval()
    >>> x = torch.randn(2, 1000, 3)
    >>> with torch.no_grad():
    ...     torch.allclose(encode_pool_chunked(model, x, chunk_size=300), model(x), atol=1e-5)
    True


A set batch read chunk by chunk from any array-like sliceable along the element axis.

Accepts a tensor, a NumPy array or ``np.memmap``, an h5py dataset, or anything with ``shape``,
``dtype`` and slicing; only the requested chunk is ever turned into a tensor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .blocks import ISAB, PMA, SAB, InducedRows, OnlineSoftmax, PooledQueries, check_dot_product
from .models import DeepSets, SetTransformer
from .validation import zero_padding

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkSource",
    "encode_chunked",
    "encode_pool_chunked",
    "induce_chunked",
    "isab_chunked",
    "iter_encode_chunked",
    "pma_chunked",
]

DEFAULT_CHUNK_SIZE = 2048
Model = SetTransformer | DeepSets


class _Plan:
    """What a module computes, split into row-wise stages, a pooling and a decoder on pooled vectors.

    ``stages``: ISABs (an induced pass each) or row-wise modules; ``pooling``: a PMA, a
    ``masked_pool`` kind, or ``None`` for per-element outputs only.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.stages: list[nn.Module] = []
        self.pooling: PMA | str | None = None
        self.dim_in, self.dim_out = 0, 0
        if isinstance(module, ISAB):
            self.stages, self.dim_in, self.dim_out = [module], module.dim_in, module.mab1.dim
        elif isinstance(module, PMA):
            self.pooling, self.dim_in = module, module.dim
        elif isinstance(module, SetTransformer):
            for i, layer in enumerate(module.encoder):
                if isinstance(layer, SAB):
                    raise ValueError(
                        f"model.encoder[{i}]: a SAB attends over the whole set and cannot be chunked; "
                        "use ISAB encoder layers (num_inducing=...) or evaluate without chunk_size"
                    )
            self.stages = list(module.encoder)
            self.pooling = module.pma if module.pma is not None else module.pooling
            self.dim_in, self.dim_out = module.dim_input, module.config["dim_hidden"]
        elif isinstance(module, DeepSets):
            self.stages, self.pooling = [module.phi], module.pool
            self.dim_in, self.dim_out = module.dim_input, module.config["dim_hidden"]
        else:
            raise TypeError(
                f"model: expected a SetTransformer, DeepSets, ISAB or PMA, got {type(module).__name__}"
            )
        for i, stage in enumerate(self.stages):
            if isinstance(stage, ISAB):
                check_dot_product(stage.mab0, f"encoder[{i}].mab0")
        if isinstance(self.pooling, PMA):
            check_dot_product(self.pooling.mab, "pma.mab")
        self.param = next(module.parameters())

    def source(self, x: Any, mask: Any) -> ChunkSource:
        return ChunkSource(x, mask, self.dim_in, dtype=self.param.dtype, device=self.param.device)

    def row_fns(self, hs: list[Tensor | None]) -> list[nn.Module | InducedRows]:
        """The first ``len(hs)`` stages as row-wise functions, given the ISABs' induced sets ``hs``."""
        return [
            stage if h is None else InducedRows(cast(ISAB, stage).mab1, h)
            for stage, h in zip(self.stages, hs)
        ]

    def rows(self, fns: list[nn.Module | InducedRows], x: Tensor, mask: Tensor | None, upto: int) -> Tensor:
        """The first ``upto`` stages on one chunk ``x: (B, c, D)`` zero at padded rows."""
        for fn in fns[:upto]:
            x = zero_padding(fn(x), mask)
        if upto == len(self.stages) and isinstance(self.module, SetTransformer):
            x = zero_padding(self.module.encoder_norm(x), mask)
        return x

    def decode(self, pooled: Tensor) -> Tensor:
        """From the pooled ``(B, k, dim)`` (PMA) or ``(B, dim)`` (masked pooling) to the outputs."""
        m = self.module
        if isinstance(m, SetTransformer):
            if m.pma is None:
                return m.head(m.decoder[0](pooled)).view(pooled.shape[0], m.num_outputs, m.dim_output)
            for layer in m.decoder:
                pooled = layer.encode(pooled, None)  # type: ignore[operator]
            return m.head(m.decoder_drop(m.decoder_norm(pooled)))
        if isinstance(m, DeepSets):
            return m.rho(pooled).view(pooled.shape[0], m.num_outputs, m.dim_output)
        return pooled


def _check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    return chunk_size


def _grad_mode() -> bool:
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _accumulate(fn: Any, src: ChunkSource, chunk_size: int) -> tuple[Tensor, ...]:
    """Feed ``fn(x_chunk, mask_chunk) -> (ref, denom, acc)`` of every chunk to an online softmax."""
    acc, grad = OnlineSoftmax(), _grad_mode()
    for start in range(0, src.n, chunk_size):
        x, mask = src.chunk(start, start + chunk_size)
        if acc.ref is not None and mask is not None and not bool(mask.any()):
            continue  # all padding: contributes nothing
        acc.add(*(checkpoint(fn, x, mask, use_reentrant=False) if grad else fn(x, mask)))
    return acc.result()


def _induce_all(plan: _Plan, src: ChunkSource, chunk_size: int) -> list[Tensor | None]:
    """Passes 1..L: each ISAB's induced set ``H_l (B, m, dim)`` (``None`` for row-wise stages)."""
    hs: list[Tensor | None] = []
    for i, stage in enumerate(plan.stages):
        if not isinstance(stage, ISAB):
            hs.append(None)
            continue
        pq, fns = PooledQueries(stage.mab0, stage.inducing[None]), plan.row_fns(hs)

        def stats(x: Tensor, mask: Tensor | None, i: int = i, pq: PooledQueries = pq, fns: Any = fns) -> Any:
            return pq.stats(plan.rows(fns, x, mask, i), mask)

        hs.append(pq.finish(*_accumulate(stats, src, chunk_size)))
    return hs


def _masked_pool_chunked(
    plan: _Plan, hs: list[Tensor | None], src: ChunkSource, chunk_size: int, how: str
) -> Tensor:
    """``masked_pool`` over the encoder output, accumulated chunk by chunk: ``(B, dim)``."""
    grad, depth, fns = _grad_mode(), len(plan.stages), plan.row_fns(hs)
    total: Tensor | None = None
    count = torch.zeros(src.b, 1, dtype=plan.param.dtype, device=plan.param.device)
    best: Tensor | None = None

    def stats(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        z = plan.rows(fns, x, mask, depth)
        if isinstance(plan.module, SetTransformer):
            z = zero_padding(plan.module.decoder_drop(z), mask)
        low = z if mask is None else z.masked_fill(~mask[..., None], torch.finfo(z.dtype).min)
        return z.sum(dim=1), low.amax(dim=1)

    for start in range(0, src.n, chunk_size):
        x, mask = src.chunk(start, start + chunk_size)
        count = count + (x.shape[1] if mask is None else mask.sum(dim=1, keepdim=True))
        s, mx = checkpoint(stats, x, mask, use_reentrant=False) if grad else stats(x, mask)
        total = s if total is None else total + s
        best = mx if best is None else torch.maximum(best, mx)
    if total is None or best is None:
        raise ValueError("x: the set has no elements")
    if how == "sum":
        return total
    if how == "mean":
        return total / count.clamp_min(1)
    return best.masked_fill(count == 0, 0.0)


def _pool(plan: _Plan, hs: list[Tensor | None], src: ChunkSource, chunk_size: int) -> Tensor:
    """The last pass: the encoder output accumulated into the pooling, then the decoder."""
    depth = len(plan.stages)
    if not isinstance(plan.pooling, PMA):
        return plan.decode(_masked_pool_chunked(plan, hs, src, chunk_size, str(plan.pooling)))
    pq = PooledQueries(plan.pooling.mab, plan.pooling.seeds[None])
    drop = plan.module.decoder_drop if isinstance(plan.module, SetTransformer) else None
    fns = plan.row_fns(hs)

    def stats(x: Tensor, mask: Tensor | None) -> Any:
        z = plan.rows(fns, x, mask, depth)
        if drop is not None:
            z = zero_padding(drop(z), mask)
        return pq.stats(z, mask)

    return plan.decode(pq.finish(*_accumulate(stats, src, chunk_size)))


def _squeeze(out: Tensor, src: ChunkSource) -> Tensor:
    return out[0] if src.single else out


def encode_pool_chunked(
    model: Model | PMA, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """``model(x, mask)`` evaluated chunk by chunk in ``L + 1`` passes over ``x``.

    Args:
        model: a :class:`SetTransformer` (ISAB or rFF encoder, any pooling), a :class:`DeepSets`,
            or a :class:`PMA`.
        x: ``(B, N, dim_input)`` or one set ``(N, dim_input)``; a tensor or any array-like
            sliceable along the element axis (NumPy array, ``np.memmap``, h5py dataset).
        mask: ``(B, N)`` (or ``(N,)``) bool, True for real elements; ``None``: all real.
        chunk_size: elements per chunk (per set of the batch); 2k-8k is fastest on CPU.

    Returns:
        ``(B, num_outputs, dim_output)`` (``(num_outputs, dim_output)`` for one set), equal to the
        unchunked ``model(x, mask)`` up to float rounding.
    """
    chunk_size = _check_chunk_size(chunk_size)
    plan = _Plan(model)
    src = plan.source(x, mask)
    return _squeeze(_pool(plan, _induce_all(plan, src, chunk_size), src, chunk_size), src)


def pma_chunked(pma: PMA, z: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``pma(z, mask)`` over ``z: (B, N, dim)`` (or ``(N, dim)``) accumulated chunk by chunk.

    Returns ``(B, num_seeds, dim)`` (``(num_seeds, dim)`` for one set).
    """
    if not isinstance(pma, PMA):
        raise TypeError(f"pma: expected a PMA, got {type(pma).__name__}")
    return encode_pool_chunked(pma, z, mask, chunk_size=chunk_size)


def induce_chunked(isab: ISAB, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """An ISAB's induced set ``H = MAB(I, X)`` accumulated chunk by chunk: ``(B, m, dim)``."""
    if not isinstance(isab, ISAB):
        raise TypeError(f"isab: expected an ISAB, got {type(isab).__name__}")
    plan = _Plan(isab)
    h = _induce_all(plan, plan.source(x, mask), _check_chunk_size(chunk_size))[0]
    assert h is not None
    return h


def _iter_rows(plan: _Plan, src: ChunkSource, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
    hs = _induce_all(plan, src, chunk_size)
    depth, grad, fns = len(plan.stages), _grad_mode(), plan.row_fns(hs)

    def rows(xc: Tensor, mc: Tensor | None) -> Tensor:
        return plan.rows(fns, xc, mc, depth)

    for start in range(0, src.n, chunk_size):
        xc, mc = src.chunk(start, start + chunk_size)
        z = checkpoint(rows, xc, mc, use_reentrant=False) if grad else rows(xc, mc)
        yield start, _squeeze(z, src)


def iter_encode_chunked(
    model: Model | ISAB, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[int, Tensor]]:
    """Per-element encoder outputs, one chunk at a time, after ``L`` passes over ``x``.

    Yields ``(start, z)`` with ``z: (B, c, dim_hidden)`` (``(c, dim_hidden)`` for one set) the
    embeddings of elements ``start .. start + c``, zero at padded positions.
    """
    plan = _Plan(model)
    for start, z in _iter_rows(plan, plan.source(x, mask), _check_chunk_size(chunk_size)):
        yield start, z if _grad_mode() else z.clone()  # the fast path reuses its output buffer


def encode_chunked(
    model: Model | ISAB,
    x: Any,
    mask: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    out: Any = None,
) -> Any:
    """``model.encode(x, mask)`` (or an ISAB's output) computed chunk by chunk.

    Args:
        model, x, mask, chunk_size: as in :func:`encode_pool_chunked` (or an :class:`ISAB`).
        out: where to write the ``(B, N, dim_hidden)`` (or ``(N, dim_hidden)``) result: a tensor,
            a NumPy array / memmap or an h5py dataset of that shape; ``None`` allocates a tensor.
            Needs grad disabled unless ``None``.

    Returns:
        ``out`` (with grad enabled and ``out=None``: a tensor that backpropagates per chunk).
    """
    plan = _Plan(model)
    src = plan.source(x, mask)
    chunks = _iter_rows(plan, src, _check_chunk_size(chunk_size))
    if _grad_mode():
        if out is not None:
            raise ValueError("out: cannot write into an array with autograd enabled; use torch.no_grad()")
        return torch.cat([z for _, z in chunks], dim=0 if src.single else 1)
    shape = (src.n, plan.dim_out) if src.single else (src.b, src.n, plan.dim_out)
    if out is None:
        out = torch.empty(shape, dtype=plan.param.dtype, device=plan.param.device)
    elif tuple(getattr(out, "shape", ())) != shape:
        raise ValueError(
            f"out: expected an array of shape {shape}, got {getattr(out, 'shape', type(out).__name__)}"
        )
    for start, z in chunks:
        stop = start + z.shape[-2]
        value: Any = z if isinstance(out, Tensor) else z.cpu().numpy()
        if src.single:
            out[start:stop] = value
        else:
            out[:, start:stop] = value
    return out


def isab_chunked(
    isab: ISAB, x: Any, mask: Any = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE, out: Any = None
) -> Any:
    """``isab(x, mask)`` in two passes over ``x``; see :func:`encode_chunked` for ``out``.

    Returns ``(B, N, dim)`` (``(N, dim)`` for one set), zero at padded positions.

    Example:
        >>> isab = ISAB(3, 16, num_heads=4, num_inducing=8).eval()
        >>> x = torch.randn(2, 500, 3)
        >>> with torch.no_grad():
        ...     torch.allclose(isab_chunked(isab, x, chunk_size=128), isab(x), atol=1e-5)
        True
    """
    if not isinstance(isab, ISAB):
        raise TypeError(f"isab: expected an ISAB, got {type(isab).__name__}")
    return encode_chunked(isab, x, mask, chunk_size=chunk_size, out=out)


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


class ChunkSource:
    """``x: (B, N, dim)`` or one set ``(N, dim)``, with an optional mask, read in chunks.

    Args:
        x: the set(s), any floating-point array-like.
        mask: ``None`` or a bool ``(B, N)`` (``(N,)`` for one set) tensor or NumPy array.
        dim: the expected feature size.
        dtype, device: what each chunk is converted to (the model's).

    Example:
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
        return zero_padding(x, mask), mask
