"""Buffers reused from call to call by the blocks' inference fast paths, and the per-thread store that
keeps them between forwards.

Without autograd an ISAB's second block ([`InducedRows`][settransformer.nn.rows.InducedRows]) writes each step
of a row block into a named buffer of a [`Workspace`][settransformer.nn.workspace.Workspace] instead of a
fresh tensor: a fresh multi-megabyte tensor per operation can cost more in page faults than the operation
itself, when the allocator hands memory back to the operating system. Where a call's buffers are small enough
([`KEPT_BUFFER_ELEMENTS`][settransformer.nn.blocks.KEPT_BUFFER_ELEMENTS]),
[`kept_workspace`][settransformer.nn.workspace.kept_workspace] keeps them for the next forward:

- per thread: a model serving several threads at once gives each its own buffers;
- shared by the blocks on that thread: a model's blocks run one after another, and a block's result
  is never a buffer, so a model holds one block's worth, not one per block;
- per dtype, device and inference mode: a tensor made in inference mode cannot be written to outside
  it;
- held through the blocks that used them (weakly: a block pickles and copies without them), so they
  go with the last of those blocks; [`clear_kept_buffers`][settransformer.nn.workspace.clear_kept_buffers]
  frees them sooner.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["Workspace", "clear_kept_buffers", "kept_buffers_free", "kept_workspace"]


class Workspace:
    """Named flat buffers of one dtype and device, each grown to the largest view asked of it.

    ``slots`` maps names a caller uses to the buffers that serve them (so several steps can share a
    buffer whose content is not read again); ``lent`` holds caller-owned contiguous tensors that serve
    a name instead of its buffer wherever they are large enough (a block's output, say).

    Examples:
        >>> ws = Workspace(torch.float32, torch.device("cpu"))
        >>> a = ws.get("s", 2, 3)
        >>> b = ws.get("s", 6)  # the same memory, whatever was written last
        >>> a.data_ptr() == b.data_ptr(), tuple(a.shape), tuple(b.shape)
        (True, (2, 3), (6,))
        >>> ws.named({"scores": "s"}).get("scores", 4).data_ptr() == a.data_ptr()
        True
        >>> out = torch.empty(8)
        >>> ws.with_buffer("s", out).get("s", 2, 4).data_ptr() == out.data_ptr()
        True
    """

    def __init__(
        self,
        dtype: torch.dtype,
        device: torch.device,
        buffers: dict[str, Tensor] | None = None,
        slots: Mapping[str, str] | None = None,
        lent: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, Tensor] = {} if buffers is None else buffers
        self.slots = slots or {}
        self.lent = lent or {}

    def named(self, slots: Mapping[str, str]) -> Workspace:
        """The same buffers, with the names of ``slots`` standing for the buffers they map to."""
        return Workspace(self.dtype, self.device, self.buffers, slots, self.lent)

    def with_buffer(self, name: str, buf: Tensor) -> Workspace:
        """The same buffers, with the contiguous ``buf`` (not kept) serving ``name`` where large enough."""
        return Workspace(self.dtype, self.device, self.buffers, self.slots, {**self.lent, name: buf})

    def get(self, name: str, *shape: int) -> Tensor:
        """A ``shape`` view of the buffer ``name``: its content is whatever was written last."""
        name = self.slots.get(name, name)
        n = math.prod(shape)
        lent = self.lent.get(name)
        if lent is not None and lent.numel() >= n:
            return lent.view(-1)[:n].view(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(n, dtype=self.dtype, device=self.device)
        return buf[:n].view(shape)


_KEPT = threading.local()
_Key = tuple[torch.dtype, torch.device, bool]


def kept_workspace(owner: object, like: Tensor) -> Workspace:
    """The workspace kept on this thread for tensors like ``like`` (its dtype and device) in the
    current inference mode, shared by every owner on this thread; ``owner`` (a block, held weakly)
    holds it from now on.

    Examples:
        >>> from torch import nn
        >>> first, second = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> x = torch.randn(3, 2)
        >>> kept_workspace(first, x) is kept_workspace(second, x)
        True
        >>> with torch.inference_mode():
        ...     kept_workspace(first, x) is kept_workspace(second, x), kept_workspace(first, x.double()).dtype
        (True, torch.float64)
        >>> clear_kept_buffers()
    """
    kept: weakref.WeakKeyDictionary[object, dict[_Key, Workspace]]
    kept = _KEPT.__dict__.setdefault("blocks", weakref.WeakKeyDictionary())
    shared: weakref.WeakValueDictionary[_Key, Workspace]
    shared = _KEPT.__dict__.setdefault("shared", weakref.WeakValueDictionary())
    spaces = kept.setdefault(owner, {})
    key = (like.dtype, like.device, torch.is_inference_mode_enabled())
    if key not in spaces:
        ws = shared.get(key)
        if ws is None:
            ws = shared[key] = Workspace(like.dtype, like.device)
        spaces[key] = ws
    return spaces[key]


@contextlib.contextmanager
def kept_buffers_free(wanted: bool) -> Iterator[bool]:
    """Whether the kept buffers may be used within the context: ``wanted``, and no caller on this
    thread using them already (a block's own module that runs another ISAB, say).

    Examples:
        >>> with kept_buffers_free(True) as outer:
        ...     with kept_buffers_free(True) as inner:
        ...         outer, inner
        (True, False)
    """
    busy = _KEPT.__dict__.get("busy", False)
    _KEPT.busy = busy or wanted
    try:
        yield wanted and not busy
    finally:
        _KEPT.busy = busy


def clear_kept_buffers() -> None:
    """Free the inference buffers the ISABs keep on this thread (see the module's description).

    They are freed with their blocks anyway; this returns their memory sooner.

    Examples:
        >>> from settransformer import ISAB
        >>> isab = ISAB(3, 16, num_heads=4, num_inducing=8).eval()
        >>> with torch.no_grad():
        ...     _ = isab(torch.randn(2, 50, 3))
        >>> clear_kept_buffers()
    """
    _KEPT.__dict__.pop("blocks", None)
    _KEPT.__dict__.pop("shared", None)
