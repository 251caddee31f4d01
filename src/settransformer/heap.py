"""The C heap under PyTorch's CPU tensors: keep freed memory for the next tensor.

PyTorch's CPU allocator takes every tensor from the C library's ``malloc`` and gives it back on
free. glibc serves a request above its mmap threshold (at most 32 MB by default) with fresh pages
from the kernel and returns them on free, so a tensor of a set of 100,000 elements at width 128
(51 MB) costs one page fault per 4 KB page each time it is made. On a 2-core x86 host adding two
such tensors takes about five times longer into a new tensor than into memory already mapped, and
a forward and backward pass through an ISAB at that size makes some twenty of them
(``benchmarks/heap.py`` measures both). Keeping freed memory in the heap, as jemalloc and tcmalloc
do (PyTorch's CPU tuning guide preloads one of them), removes that cost after the first step.

[`keep_freed_memory`][settransformer.heap.keep_freed_memory] does it for this process through glibc's
``mallopt``, with nothing to install or preload: it raises the mmap threshold and the trim threshold so that
large blocks come from the heap and stay there when freed. The price is resident memory: the heap keeps what
it once held, and blocks freed out of order leave holes (about twice glibc's peak in ``benchmarks/heap.py``).
The ``settransformer`` command sets it for its own process (``--heap system`` leaves glibc's
defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["KEEP_LIMIT", "keep_freed_memory"]

KEEP_LIMIT = 1 << 30
"""Largest block kept in the heap when freed, and the most free memory the heap holds before it
gives the top back to the system (bytes): larger blocks keep glibc's mmap behaviour."""

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or ``None`` for another C library (musl, macOS, Windows): mallopt is glibc's."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(limit: int = KEEP_LIMIT) -> bool:
    """Keep freed memory in this process's heap for the next tensor (glibc only).

    Blocks up to ``limit`` bytes come from the heap instead of fresh pages, and up to ``limit``
    free bytes stay in it, so a large tensor made again at every step reuses mapped memory rather
    than faulting in new pages. For the whole process, from the next allocation on; it cannot be
    undone (glibc's adaptive thresholds stay off), and calling it again changes the limit.

    Args:
        limit: the largest block kept and the most free memory held (bytes, from 128 KiB to
            2 GiB - 1: mallopt takes a C ``int``).

    Returns:
        Whether the setting took: ``False`` where the C library is not glibc.

    Examples:
        >>> import torch
        >>> took = keep_freed_memory()  # True on Linux with glibc
        >>> x = torch.ones(1, 100_000, 128)  # 51 MB: from the heap, and back to it when freed
        >>> del x
    """
    if not 128 * 1024 <= limit < 1 << 31:
        raise ValueError(f"limit: from 131072 (128 KiB) to 2147483647 bytes, got {limit}")
    libc = _libc()
    if libc is None:
        return False
    # the trim threshold first: with it at its default, the heap would give back what it keeps
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, limit)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, limit))
