"""The inference buffers: a workspace's named buffers and the per-thread store that keeps them."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from torch import nn

from settransformer.nn import workspace
from settransformer.nn.workspace import Workspace, clear_kept_buffers, kept_buffers_free, kept_workspace


def test_a_buffer_grows_to_the_largest_view_and_is_reused_below_it() -> None:
    ws = Workspace(torch.float32, torch.device("cpu"))
    small = ws.get("a", 2, 3)
    large = ws.get("a", 4, 5)
    assert ws.buffers["a"].numel() == 20 and large.shape == (4, 5)
    assert small.data_ptr() != large.data_ptr()  # grown: a new allocation
    again = ws.get("a", 3, 3)
    assert again.data_ptr() == large.data_ptr() and again.shape == (3, 3)
    assert ws.get("b", 1).data_ptr() != large.data_ptr()  # another name, another buffer


def test_slots_share_buffers_and_a_lent_tensor_serves_only_where_it_fits() -> None:
    ws = Workspace(torch.float64, torch.device("cpu"))
    named = ws.named({"scores": "s", "out": "s"})
    assert named.get("scores", 6).data_ptr() == named.get("out", 2, 3).data_ptr() == ws.get("s", 1).data_ptr()
    assert named.buffers is ws.buffers and ws.get("s", 1).dtype == torch.float64
    out = torch.empty(12, dtype=torch.float64)
    lent = ws.with_buffer("s", out)
    assert lent.get("s", 3, 4).data_ptr() == out.data_ptr()
    assert lent.get("s", 13).data_ptr() != out.data_ptr()  # too small: the kept buffer
    assert "s" not in ws.lent  # the original workspace lends nothing


def _kept_on_another_thread(owner: nn.Module, like: torch.Tensor) -> Workspace:
    got: list[Workspace] = []
    thread = threading.Thread(target=lambda: got.append(kept_workspace(owner, like)))
    thread.start()
    thread.join()
    return got[0]


def test_kept_workspaces_are_shared_per_thread_and_key_and_go_with_their_owners() -> None:
    clear_kept_buffers()
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    x = torch.randn(2, 2)
    ws = kept_workspace(first, x)
    assert kept_workspace(second, x) is ws
    assert kept_workspace(first, x.double()) is not ws
    with torch.inference_mode():
        assert kept_workspace(first, x) is not ws
    assert _kept_on_another_thread(first, x) is not ws
    shared = workspace._KEPT.shared
    assert len(shared) == 3  # float32, float64, float32 in inference mode
    del ws, first
    gc.collect()
    assert len(shared) == 1  # only the float32 one, still held by the second owner
    del second
    gc.collect()
    assert len(shared) == 0
    clear_kept_buffers()
    assert "blocks" not in workspace._KEPT.__dict__


def test_kept_buffers_free_nests_and_restores_after_an_error() -> None:
    # not wanted: leaves them free for an inner caller
    with (
        kept_buffers_free(False) as first,
        kept_buffers_free(True) as second,
        kept_buffers_free(True) as third,
    ):
        assert (first, second, third) == (False, True, False)
    with pytest.raises(RuntimeError, match="boom"), kept_buffers_free(True):
        raise RuntimeError("boom")
    with kept_buffers_free(True) as again:
        assert again
