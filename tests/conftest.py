"""Shared fixtures: fixed seeds, random padded batches, permutations."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from settransformer import heap

# `import reference` from any test file, whatever pytest's import mode or rootdir.
sys.path.insert(0, str(Path(__file__).parent))

# Tests use tiny tensors, where intra-op threads only add synchronisation: on the shared 2-core
# machine a second thread made float64 gradchecks 3-10x slower. (pytest-xdist parallelises instead.)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own ``$SETTRANSFORMER_CACHE`` (the library's default cache folder), so no test
    writes into the user's ``~/.cache`` or finds another test's cache there."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SETTRANSFORMER_CACHE", str(folder))
    return folder


@pytest.fixture(autouse=True)
def _system_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests keep glibc's heap: ``cli.main`` (run in-process by the CLI tests) would change it for
    the rest of the worker, one way. ``tests/test_heap.py`` runs the real setting in child processes.
    (This file's fixtures do not reach the package's doctests under ``src``.)"""
    monkeypatch.setattr(heap, "_libc", lambda: None)


def _padded(
    sizes: Sequence[int], dim: int, *, n: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Random sets of the given sizes scattered (not as a prefix) into ``(B, N, dim)`` with a mask.

    Padded rows hold random junk (the blocks must ignore it). Returns ``x``, ``mask`` and the sets in
    the order their elements appear in ``x``.
    """
    n = max(sizes) if n is None else n
    x = torch.randn(len(sizes), n, dim, dtype=dtype) * 3
    mask = torch.zeros(len(sizes), n, dtype=torch.bool)
    for i, size in enumerate(sizes):
        # every other batch row keeps its elements in front, the rest get padding in the middle
        pos = torch.arange(size) if i % 2 == 0 else torch.randperm(n)[:size].sort().values
        mask[i, pos] = True
    return x, mask, [x[i][mask[i]] for i in range(len(sizes))]


@pytest.fixture
def padded() -> Callable[..., tuple[Tensor, Tensor, list[Tensor]]]:
    """Factory ``padded(sizes, dim, n=None, dtype=float32) -> (x, mask, sets)``; see :func:`_padded`."""
    return _padded


def _permute(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Permute the elements of every set of ``x: (B, N, D)`` independently (and the mask with them).

    Returns ``(x_perm, mask_perm, perm)`` with ``x_perm[b, i] = x[b, perm[b, i]]``.
    """
    b, n = x.shape[:2]
    perm = torch.stack([torch.randperm(n) for _ in range(b)])
    xp = torch.gather(x, 1, perm[..., None].expand_as(x))
    mp = None if mask is None else torch.gather(mask, 1, perm)
    return xp, mp, perm


@pytest.fixture
def permute() -> Callable[..., tuple[Tensor, Tensor | None, Tensor]]:
    """Factory ``permute(x, mask=None) -> (x_perm, mask_perm, perm)``; see :func:`_permute`."""
    return _permute


def gather_rows(y: Tensor, perm: Tensor) -> Tensor:
    """``y: (B, N, D)`` reordered by ``perm: (B, N)`` as :func:`_permute` does."""
    return torch.gather(y, 1, perm[..., None].expand_as(y))


@pytest.fixture
def gather() -> Callable[[Tensor, Tensor], Tensor]:
    """``gather(y, perm)``: apply to an output the permutation ``permute`` applied to the input."""
    return gather_rows


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in a fresh folder (run folders land there) with one thread, restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
