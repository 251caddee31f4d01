"""Ragged batches: sets concatenated into one ``(total, D)`` tensor, described by offsets or a batch vector.

Set ``s`` is ``x[offsets[s]:offsets[s + 1]]`` (``offsets: (S + 1,)``, starting at 0), or, as
PyTorch Geometric passes it, the rows with ``batch == s`` (``batch: (total,)``, sorted). Set sizes
may differ wildly (10 to 100,000 elements in one batch); padding every set to the largest one
would waste most of the compute and memory.

Every block of the Set Transformer treats each set on its own, so a ragged batch is evaluated by
sorting its sets by size and cutting them into *buckets* of similar sizes: each bucket is padded
only to its own largest set (at most ``slack`` times its real rows, and at most ``max_rows``
rows unless one set is larger), run through the ordinary masked blocks, and its outputs are
scattered back into the ragged order. Results equal the padded path up to float rounding, for
every block option, with no attention code of its own. ``slack=1`` never pads (sets of equal size
share a bucket, every other set runs alone).

Examples:
    >>> from settransformer import SetTransformer
    >>> model = SetTransformer(2, num_outputs=1, dim_output=3, dim_hidden=16, num_inducing=4).eval()
    >>> x, offsets = torch.randn(120, 2), torch.tensor([0, 10, 110, 120])
    >>> out = ragged_forward(model, x, offsets)  # (3, 1, 3)
    >>> xp, mask = ragged_to_padded(x, offsets)  # (3, 100, 2), (3, 100)
    >>> torch.allclose(out, model(xp, mask), atol=1e-5)
    True
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..nn.blocks import ISAB, PMA
from ..nn.validation import check_finite, check_like, check_positive, zero_padding

__all__ = [
    "batch_to_offsets",
    "check_offsets",
    "isab_ragged",
    "offsets_to_batch",
    "padded_to_ragged",
    "pma_ragged",
    "ragged_encode",
    "ragged_forward",
    "ragged_to_padded",
    "size_buckets",
]

DEFAULT_SLACK = 1.25
DEFAULT_MAX_ROWS = 1 << 16


def batch_to_offsets(batch: Tensor, num_sets: int | None = None) -> Tensor:
    """``batch: (total,)`` sorted set indices -> ``offsets: (S + 1,)`` int64.

    ``num_sets`` counts trailing empty sets (default ``batch.max() + 1``).

    Examples:
        >>> batch_to_offsets(torch.tensor([0, 0, 1, 3])).tolist()
        [0, 2, 3, 3, 4]
    """
    if (
        not isinstance(batch, Tensor)
        or batch.dim() != 1
        or batch.is_floating_point()
        or batch.dtype == torch.bool
    ):
        raise ValueError(f"batch: expected a 1-D integer tensor of set indices, got {_describe(batch)}")
    if batch.numel() and (int(batch.min()) < 0 or bool((batch[1:] < batch[:-1]).any())):
        raise ValueError(
            "batch: expected non-negative set indices in non-decreasing order (sort the rows by set)"
        )
    n = int(batch.max()) + 1 if batch.numel() else 0
    if num_sets is None:
        num_sets = n
    else:
        try:
            num_sets = operator.index(num_sets)
        except TypeError:
            raise TypeError(f"num_sets: expected an integer, got {type(num_sets).__name__}") from None
    if num_sets < n:
        raise ValueError(f"num_sets: {num_sets} is smaller than the largest set index + 1 ({n})")
    counts = torch.bincount(batch.long(), minlength=num_sets)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def offsets_to_batch(offsets: Tensor) -> Tensor:
    """``offsets: (S + 1,)`` -> ``batch: (total,)``, the set index of every row.

    Examples:
        >>> offsets_to_batch(torch.tensor([0, 2, 3, 3, 4])).tolist()
        [0, 0, 1, 3]
    """
    offsets = check_offsets(offsets, None)
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=offsets.device), offsets.diff())


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def check_offsets(offsets: Tensor | Sequence[int], total: int | None, name: str = "offsets") -> Tensor:
    """Check CSR ``offsets: (S + 1,)`` of ``total`` rows (``None``: any) and return them as int64.

    Examples:
        >>> check_offsets([0, 2, 5], total=5)
        tensor([0, 2, 5])
        >>> check_offsets([0, 5, 3], total=5, name="ptr")
        Traceback (most recent call last):
        ...
        ValueError: ptr: expected non-decreasing offsets starting at 0
    """
    if not isinstance(offsets, Tensor):
        # no dtype forced: a float sequence must be refused below, not truncated to integers
        offsets = torch.as_tensor(list(offsets))
    if (
        offsets.dim() != 1
        or offsets.numel() < 2
        or offsets.is_floating_point()
        or offsets.dtype == torch.bool
    ):
        raise ValueError(
            f"{name}: expected a 1-D integer tensor (S + 1,) with S >= 1, got {_describe(offsets)}"
        )
    offsets = offsets.long()
    if int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
        raise ValueError(f"{name}: expected non-decreasing offsets starting at 0")
    if total is not None and int(offsets[-1]) != total:
        raise ValueError(
            f"{name}: the last offset ({int(offsets[-1])}) must equal the number of rows ({total})"
        )
    return offsets


def _resolve(
    x: Tensor, offsets: Tensor | Sequence[int] | None, batch: Tensor | None, num_sets: int | None
) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor (total, D), got {_describe(x)}")
    if (offsets is None) == (batch is None):
        raise ValueError("offsets, batch: pass exactly one of them")
    if offsets is not None and num_sets is not None:
        raise ValueError("num_sets: only with batch (offsets already give the number of sets)")
    if batch is not None:
        offsets = batch_to_offsets(batch, num_sets)  # first: it checks that batch is a 1-D integer tensor
        if batch.shape != x.shape[:1]:
            raise ValueError(f"batch: expected shape ({x.shape[0]},) like x's rows, got {_describe(batch)}")
        if len(offsets) < 2:
            raise ValueError("batch: no sets (pass num_sets for a batch of empty sets)")
    assert offsets is not None
    return check_offsets(offsets, x.shape[0]).to(x.device)


def _check_rows(x: Tensor, module: nn.Module, dim: int | None, name: str = "x") -> None:
    """A block's input checks on the ragged rows ``x: (total, D)`` themselves (feature size ``dim``,
    the device and dtype of ``module``'s parameters, finite values), so that a message names the row of
    ``x`` rather than a position in a padded bucket."""
    if dim is not None and x.shape[1] != dim:
        shape = tuple(x.shape)
        raise ValueError(f"{name}: expected rows of {dim} features (total, {dim}), got shape {shape}")
    like = next(module.parameters(), None)
    if like is not None:
        check_like(x, like, name)
    check_finite(x, name)


def ragged_to_padded(
    x: Tensor,
    offsets: Tensor | Sequence[int] | None = None,
    *,
    batch: Tensor | None = None,
    num_sets: int | None = None,
    max_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Ragged ``x: (total, D)`` -> zero-padded ``(S, N, D)`` and ``mask: (S, N)`` (True = real).

    ``N`` is the largest set size (or ``max_size``, at least that). Pass ``offsets`` or ``batch``.

    Examples:
        >>> x, mask = ragged_to_padded(torch.randn(5, 2), torch.tensor([0, 2, 5]))
        >>> x.shape, mask.sum(1).tolist()
        (torch.Size([2, 3, 2]), [2, 3])
    """
    offsets = _resolve(x, offsets, batch, num_sets)
    sizes = offsets.diff()
    n = int(sizes.max())
    if max_size is not None:
        if check_positive("max_size", max_size, allow_zero=True) < n:
            raise ValueError(f"max_size: {max_size} is smaller than the largest set ({n})")
        n = int(max_size)
    return _gather(x, offsets[:-1], sizes, n)


def padded_to_ragged(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Padded ``x: (S, N, D)`` with ``mask: (S, N)`` -> ragged ``(total, D)`` and ``offsets (S + 1,)``.

    Each set keeps its real elements (mask True) in order; ``mask=None`` keeps every row.

    Examples:
        >>> x, mask = torch.arange(4.0).view(2, 2, 1), torch.tensor([[True, False], [True, True]])
        >>> rows, offsets = padded_to_ragged(x, mask)
        >>> rows[:, 0].tolist(), offsets.tolist()
        ([0.0, 2.0, 3.0], [0, 1, 3])
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected a tensor (S, N, D), got {_describe(x)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:2]:
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(x.shape[:2])}, got {_describe(mask)}")
    counts = mask.sum(dim=1)
    return x[mask], torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _gather(x: Tensor, starts: Tensor, sizes: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Sets ``x[starts[i] : starts[i] + sizes[i]]`` padded to ``n`` rows: ``(b, n, D)``, ``(b, n)``."""
    pos = torch.arange(n, device=x.device)
    mask = pos[None, :] < sizes[:, None]
    if x.shape[0] == 0:
        return x.new_zeros(len(sizes), n, x.shape[1]), mask
    index = (starts[:, None] + pos[None, :]).masked_fill(~mask, 0)
    return zero_padding(x[index], mask), mask


def size_buckets(
    sizes: Sequence[int],
    *,
    slack: float = DEFAULT_SLACK,
    max_rows: float = DEFAULT_MAX_ROWS,
    max_sets: int | None = None,
    alone_above: int | None = None,
) -> list[list[int]]:
    """Group set indices into buckets of similar sizes, largest first.

    A bucket padded to its largest set holds at most ``slack`` times its real rows (empty sets
    count as one row), at most ``max_rows`` rows in all unless its one set is larger, and at most
    ``max_sets`` sets; a set of more than ``alone_above`` elements is a bucket of its own.

    Examples:
        >>> size_buckets([5, 100, 4, 90, 5], slack=1.25)
        [[1, 3], [0, 4, 2]]
        >>> size_buckets([5, 100, 4, 90, 5], slack=float("inf"), max_sets=2, alone_above=50)
        [[1], [3], [0, 4], [2]]
    """
    # written so that NaN, and anything that is not a real number, fails
    if isinstance(slack, bool) or not isinstance(slack, numbers.Real) or not slack >= 1:
        raise ValueError(f"slack: expected a number >= 1 (inf: any padding), got {slack!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, numbers.Real) or not max_rows >= 1:
        raise ValueError(f"max_rows: expected a number of rows >= 1 (inf: no limit), got {max_rows!r}")
    if max_sets is not None:
        check_positive("max_sets", max_sets)
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    buckets: list[list[int]] = []
    top = real = 0
    closed = False  # the last bucket takes no more sets
    for i in order:
        n = max(int(sizes[i]), 1)
        alone = alone_above is not None and sizes[i] > alone_above
        rows = (len(buckets[-1]) + 1) * top if buckets else 0
        full = bool(buckets) and max_sets is not None and len(buckets[-1]) >= max_sets
        if not buckets or closed or alone or full or rows > slack * (real + n) or rows > max_rows:
            buckets.append([])
            top, real = n, 0
        buckets[-1].append(i)
        real += n
        closed = alone
    return buckets


def _apply(
    fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    offsets: Tensor,
    per_element: bool,
    slack: float,
    max_rows: int,
) -> Tensor:
    """Run ``fn(x_padded, mask)`` bucket by bucket; gather per-set or scatter per-element outputs."""
    sizes = offsets.diff()
    outs, where = [], []
    for bucket in size_buckets(sizes.tolist(), slack=slack, max_rows=max_rows):
        idx = torch.tensor(bucket, device=x.device)
        n = max(int(sizes[idx].max()), 1)
        xb, mask = _gather(x, offsets[idx], sizes[idx], n)
        y = fn(xb, mask)
        if per_element:
            outs.append(y[mask])
            where.append((offsets[idx][:, None] + torch.arange(n, device=x.device))[mask])
        else:
            outs.append(y)
            where.append(idx)
    values, index = torch.cat(outs), torch.cat(where)
    return values.new_zeros((len(index), *values.shape[1:])).index_copy(0, index, values)


def isab_ragged(
    isab: ISAB,
    x: Tensor,
    offsets: Tensor | Sequence[int] | None = None,
    *,
    batch: Tensor | None = None,
    num_sets: int | None = None,
    slack: float = DEFAULT_SLACK,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Tensor:
    """``ISAB`` over a ragged batch: ``x: (total, dim_in)`` -> ``(total, dim)``, row for row.

    ``offsets: (S + 1,)`` or ``batch: (total,)`` as in
    [`ragged_forward`][settransformer.large.ragged.ragged_forward].

    Examples:
        >>> isab = ISAB(2, 8, num_heads=2, num_inducing=3)
        >>> isab_ragged(isab, torch.randn(7, 2), torch.tensor([0, 3, 7])).shape
        torch.Size([7, 8])
    """
    if not isinstance(isab, ISAB):
        raise TypeError(f"isab: expected an ISAB, got {type(isab).__name__}")
    offsets = _resolve(x, offsets, batch, num_sets)
    _check_rows(x, isab, isab.dim_in)
    return _apply(isab.forward_unchecked, x, offsets, True, slack, max_rows)


def pma_ragged(
    pma: PMA,
    z: Tensor,
    offsets: Tensor | Sequence[int] | None = None,
    *,
    batch: Tensor | None = None,
    num_sets: int | None = None,
    slack: float = DEFAULT_SLACK,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Tensor:
    """``PMA`` over a ragged batch: ``z: (total, dim)`` -> ``(S, num_seeds, dim)``.

    ``offsets: (S + 1,)`` or ``batch: (total,)`` as in
    [`ragged_forward`][settransformer.large.ragged.ragged_forward].

    Examples:
        >>> pma = PMA(8, num_heads=2, num_seeds=1)
        >>> pma_ragged(pma, torch.randn(7, 8), batch=torch.tensor([0, 0, 0, 1, 1, 1, 1])).shape
        torch.Size([2, 1, 8])
    """
    if not isinstance(pma, PMA):
        raise TypeError(f"pma: expected a PMA, got {type(pma).__name__}")
    offsets = _resolve(z, offsets, batch, num_sets)
    _check_rows(z, pma, pma.dim, "z")
    return _apply(pma.forward_unchecked, z, offsets, False, slack, max_rows)


def ragged_encode(
    model: nn.Module,
    x: Tensor,
    offsets: Tensor | Sequence[int] | None = None,
    *,
    batch: Tensor | None = None,
    num_sets: int | None = None,
    slack: float = DEFAULT_SLACK,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Tensor:
    """A set model's element embeddings over a ragged batch: ``(total, dim_input) -> (total, dim_hidden)``.

    ``offsets: (S + 1,)`` or ``batch: (total,)`` as in
    [`ragged_forward`][settransformer.large.ragged.ragged_forward].

    Examples:
        >>> from settransformer import SetTransformer
        >>> model = SetTransformer(2, num_outputs=1, dim_output=3, dim_hidden=8, num_heads=2, num_inducing=3)
        >>> ragged_encode(model, torch.randn(7, 2), torch.tensor([0, 3, 7])).shape
        torch.Size([7, 8])
    """
    offsets = _resolve(x, offsets, batch, num_sets)
    _check_rows(x, model, getattr(model, "dim_input", None))
    return _apply(model.encode, x, offsets, True, slack, max_rows)  # type: ignore[arg-type]


def ragged_forward(
    model: nn.Module,
    x: Tensor,
    offsets: Tensor | Sequence[int] | None = None,
    *,
    batch: Tensor | None = None,
    num_sets: int | None = None,
    chunk_size: int | None = None,
    slack: float = DEFAULT_SLACK,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Tensor:
    """``model`` (a [`SetTransformer`][settransformer.nn.models.SetTransformer] or
    [`DeepSets`][settransformer.nn.models.DeepSets]) over a ragged batch.

    Args:
        model: the set model; its ``forward(x, mask)`` runs on each padded bucket.
        x: ``(total, dim_input)``, the sets' rows concatenated.
        offsets: ``(S + 1,)``; or ``batch: (total,)`` sorted set indices (``num_sets`` counts
            trailing empty sets).
        chunk_size: also evaluate each bucket chunk by chunk (see
            [`settransformer.nn.streaming`][settransformer.nn.streaming]).
        slack: bucketing, see [`size_buckets`][settransformer.large.ragged.size_buckets].
        max_rows: bucketing, see [`size_buckets`][settransformer.large.ragged.size_buckets].

    Returns:
        ``(S, num_outputs, dim_output)``, equal to ``model(*ragged_to_padded(x, offsets))``.

    Examples:
        >>> from settransformer import DeepSets
        >>> model = DeepSets(2, num_outputs=1, dim_output=3, dim_hidden=8)
        >>> ragged_forward(model, torch.randn(7, 2), batch=torch.tensor([0, 0, 0, 1, 2, 2, 2])).shape
        torch.Size([3, 1, 3])
    """
    offsets = _resolve(x, offsets, batch, num_sets)
    _check_rows(x, model, getattr(model, "dim_input", None))

    def run(xb: Tensor, mask: Tensor) -> Tensor:
        if chunk_size is None:
            return model(xb, mask)
        return model(xb, mask, chunk_size=chunk_size)

    return _apply(run, x, offsets, False, slack, max_rows)
