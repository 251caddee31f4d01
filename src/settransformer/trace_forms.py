"""Pinning the form of every attention block while a model is traced (used by :mod:`.export`).

A :class:`~settransformer.blocks.MAB` picks one of three exact forms of its attention by cost from
the numbers of queries and keys (``MAB._path``). A trace records the form chosen for the traced
sizes and keeps it for every size, so :func:`large_set_forms` makes each block use, whatever the
sizes it is traced at, the form it picks when the sizes that grow with the set are large -- what
``torch.export`` picks with a symbolic set size. Which counts grow with the set is found by running
the model at two sizes first.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from .blocks import MAB

__all__ = ["large_set_forms"]

Batch = tuple[Tensor, Tensor]


@contextlib.contextmanager
def large_set_forms(
    model: nn.Module, example: Batch, probe: Batch, call: Callable[[Batch], object]
) -> Iterator[None]:
    """Within the context, every :class:`MAB` of ``model`` uses its large-set form.

    Args:
        model: the model to be traced.
        example, probe: ``(x, mask)`` batches of two different set sizes.
        call: runs ``model`` on a batch (in evaluation mode, without gradients).

    The blocks are called in the same order on every forward pass, so the ``k``-th call of a block
    replays the form computed from its ``k``-th call at the two sizes: a count that differs between
    them grows with N and is passed to ``MAB._path`` as infinite.
    """
    mabs = [m for m in model.modules() if isinstance(m, MAB)]
    first = _attention_sizes(mabs, example, call)
    second = _attention_sizes(mabs, probe, call)
    try:
        for m in mabs:
            a, b = first[id(m)], second[id(m)]
            paths = ["standard"]  # the form whose graph holds for every size, when in doubt
            if len(a) == len(b) and a:
                paths = [
                    m._path(math.inf if q1 != q2 else q1, math.inf if k1 != k2 else k1)  # type: ignore[arg-type]
                    for (q1, k1), (q2, k2) in zip(a, b)
                ]
            m.__dict__["_path"] = _replay(paths)  # shadows the method
        yield
    finally:
        for m in mabs:
            m.__dict__.pop("_path", None)


def _replay(paths: list[str]) -> Callable[[object, object], str]:
    """A stand-in for ``MAB._path`` whose ``k``-th call returns ``paths[k % len(paths)]``."""
    count = itertools.count()

    def path(nq: object, nk: object) -> str:
        return paths[next(count) % len(paths)]

    return path


def _attention_sizes(
    mabs: list[MAB], batch: Batch, call: Callable[[Batch], object]
) -> dict[int, list[tuple[int, int]]]:
    """The ``(queries, keys)`` counts of every call of each block of ``mabs`` (by ``id``) on ``batch``."""
    calls: dict[int, list[tuple[int, int]]] = {id(m): [] for m in mabs}
    for m in mabs:

        def record(nq: int, nk: int, _m: MAB = m) -> str:
            calls[id(_m)].append((nq, nk))
            return MAB._path(_m, nq, nk)

        m.__dict__["_path"] = record
    try:
        call(batch)
    finally:
        for m in mabs:
            m.__dict__.pop("_path", None)
    return calls
