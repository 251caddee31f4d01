"""``settransformer.large.ragged``: ragged batches give the padded path's outputs; conversions round-trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from settransformer import ISAB, PMA, SetTransformer
from settransformer.large.ragged import (
    batch_to_offsets,
    isab_ragged,
    offsets_to_batch,
    padded_to_ragged,
    pma_ragged,
    ragged_encode,
    ragged_forward,
    ragged_to_padded,
    size_buckets,
)

DIM, HEADS, M = 16, 4, 5
SIZES = [0, 1, 3, 40, 7, 120, 9, 0, 33, 2]


def ragged(sizes: list[int], dim: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    return torch.randn(int(offsets[-1]), dim, dtype=dtype), offsets


def assert_close(a: Tensor, b: Tensor, atol: float = 2e-5) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol), f"max difference {(a - b).abs().max().item():.2e}"


def test_offsets_and_batch_round_trip() -> None:
    batch = torch.tensor([0, 0, 1, 3, 3, 3])
    offsets = batch_to_offsets(batch, num_sets=5)
    assert offsets.tolist() == [0, 2, 3, 3, 6, 6]
    assert offsets_to_batch(offsets).tolist() == batch.tolist()


def test_padded_round_trip(padded) -> None:
    x, mask, sets = padded([4, 0, 7, 2], 3)  # real elements not only in front
    flat, offsets = padded_to_ragged(x, mask)
    assert torch.equal(flat, torch.cat(sets)) and offsets.tolist() == [0, 4, 4, 11, 13]
    xp, mp = ragged_to_padded(flat, offsets, max_size=9)
    assert xp.shape == (4, 9, 3) and mp.sum(1).tolist() == [4, 0, 7, 2]
    assert torch.equal(xp[mp], flat) and not xp[~mp].any()
    xb, mb = ragged_to_padded(flat, batch=offsets_to_batch(offsets), num_sets=4)
    assert torch.equal(xb, xp[:, :7]) and torch.equal(mb, mp[:, :7])


@pytest.mark.parametrize("slack", [1.0, 1.25, 3.0])
def test_size_buckets(slack: float) -> None:
    sizes = torch.randint(0, 500, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    buckets = size_buckets(sizes, slack=slack, max_rows=2000)
    assert sorted(i for b in buckets for i in b) == list(range(60))
    for b in buckets:
        real = [max(sizes[i], 1) for i in b]
        if len(b) > 1:
            assert len(b) * max(real) <= slack * sum(real) + 1e-9
            assert len(b) * max(real) <= 2000
        if slack == 1.0:
            assert len(set(real)) == 1


@pytest.mark.parametrize("norm", ["post", "pre", None])
def test_forward_matches_padded(norm: str | None) -> None:
    model = SetTransformer(3, 2, 4, dim_hidden=DIM, num_heads=HEADS, num_inducing=M, norm=norm).eval()
    x, offsets = ragged(SIZES, 3)
    xp, mask = ragged_to_padded(x, offsets)
    with torch.no_grad():
        expected = model(xp, mask)
        assert_close(ragged_forward(model, x, offsets), expected)
        assert_close(ragged_forward(model, x, batch=offsets_to_batch(offsets), num_sets=len(SIZES)), expected)
        assert_close(ragged_forward(model, x, offsets, slack=1.0, max_rows=50), expected)
        assert_close(ragged_forward(model, x, offsets, chunk_size=16), expected)
        assert_close(ragged_encode(model, x, offsets), model.encode(xp, mask)[mask])


def test_blocks_match_padded() -> None:
    isab, pma = ISAB(3, DIM, HEADS, M).eval(), PMA(DIM, HEADS, 3).eval()
    x, offsets = ragged(SIZES, 3)
    z, _ = ragged(SIZES, DIM)
    xp, mask = ragged_to_padded(x, offsets)
    zp, _ = ragged_to_padded(z, offsets)
    with torch.no_grad():
        assert_close(isab_ragged(isab, x, offsets), isab(xp, mask)[mask])
        assert_close(pma_ragged(pma, z, offsets), pma(zp, mask))


def test_gradients_match_padded() -> None:
    model = SetTransformer(3, 2, 4, dim_hidden=DIM, num_heads=HEADS, num_inducing=M).double()
    x, offsets = ragged([5, 0, 30, 12], 3, dtype=torch.float64)
    weight = torch.randn(4, 2, 4, dtype=torch.float64)

    def grads(run: Any) -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        (run(xg) * weight).sum().backward()
        return [p.grad for p in model.parameters()] + [xg.grad]

    padded = grads(lambda xg: model(*ragged_to_padded(xg, offsets)))
    rag = grads(lambda xg: ragged_forward(model, xg, offsets))
    for a, b in zip(padded, rag, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_errors() -> None:
    model = SetTransformer(3, 1, 1, dim_hidden=DIM, num_heads=HEADS, num_inducing=M)
    x, offsets = ragged([3, 4], 3)
    with pytest.raises(ValueError, match="exactly one"):
        ragged_forward(model, x)
    with pytest.raises(ValueError, match="exactly one"):
        ragged_forward(model, x, offsets, batch=offsets_to_batch(offsets))
    with pytest.raises(ValueError, match="non-decreasing order"):
        ragged_forward(model, x, batch=torch.tensor([0, 1, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="last offset"):
        ragged_forward(model, x, torch.tensor([0, 3, 6]))
    for floats in (torch.tensor([0.0, 3.0, 7.0]), [0, 3.5, 7], np.array([0.0, 3.0, 7.0])):
        with pytest.raises(ValueError, match="offsets: expected a 1-D integer"):  # never truncated
            ragged_forward(model, x, floats)
    as_list = ragged_forward(model, x, [0, 3, 7])
    torch.testing.assert_close(as_list, ragged_forward(model, x, np.array([0, 3, 7])))
    batch = offsets_to_batch(offsets)
    with pytest.raises(ValueError, match="batch: expected a 1-D integer tensor"):
        ragged_forward(model, x, batch=batch.tolist())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_sets: expected an integer, got float"):
        ragged_forward(model, x, batch=batch, num_sets=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_sets: only with batch"):
        ragged_forward(model, x, offsets, num_sets=5)
    assert ragged_forward(model, x, batch=batch, num_sets=np.int64(3)).shape[0] == 3
    with pytest.raises(ValueError, match=r"x: expected a floating-point tensor \(total, D\)"):
        ragged_forward(model, x[None], offsets)
    with pytest.raises(ValueError, match="max_size"):
        ragged_to_padded(x, offsets, max_size=2)
    with pytest.raises(ValueError, match=r"max_size: expected a non-negative integer, got 12\.0"):
        ragged_to_padded(x, offsets, max_size=12.0)  # type: ignore[arg-type]
    assert ragged_to_padded(x, offsets, max_size=np.int64(6))[0].shape == (2, 6, 3)
    for slack in ("1", float("nan"), 0.5):
        with pytest.raises(ValueError, match="slack: expected a number >= 1"):
            ragged_forward(model, x, offsets, slack=slack)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_rows: expected a number of rows >= 1"):
        size_buckets([3, 4], max_rows=float("nan"))
    with torch.no_grad():
        chunked = model(x[None, :3], chunk_size=np.int64(2))  # type: ignore[arg-type]
        torch.testing.assert_close(chunked, model(x[None, :3]))
    with pytest.raises(TypeError, match="isab"):
        isab_ragged(model, x, offsets)  # type: ignore[arg-type]


def test_ragged_helpers_check_their_rows_and_name_the_row() -> None:
    torch.manual_seed(0)
    isab, pma = ISAB(3, 8, num_heads=2, num_inducing=4).eval(), PMA(8, num_heads=2, num_seeds=1).eval()
    model = SetTransformer(3, 1, 2, dim_hidden=8, num_heads=2, num_inducing=4).eval()
    offsets = torch.tensor([0, 5, 305, 595])
    x = torch.randn(595, 3)
    x[315, 0] = float("nan")  # the third set's 11th element: row 315 of x, not a bucket's position
    for call in (
        lambda: isab_ragged(isab, x, offsets),
        lambda: ragged_encode(model, x, offsets),
        lambda: ragged_forward(model, x, offsets),
    ):
        with pytest.raises(ValueError, match=r"the first at x\[315\]"):
            call()
    with pytest.raises(ValueError, match=r"x: expected rows of 3 features"):
        isab_ragged(isab, torch.randn(7, 5), [0, 3, 7])
    with pytest.raises(ValueError, match=r"z: expected rows of 8 features"):
        pma_ragged(pma, torch.randn(7, 5), [0, 3, 7])
    with pytest.raises(TypeError, match=r"expected dtype torch\.float32"):
        isab_ragged(isab, torch.randn(7, 3, dtype=torch.float64), [0, 3, 7])
