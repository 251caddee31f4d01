"""``settransformer.nn.sets``: ``pad_sets`` / ``unpad_sets`` and ``masked_pool``."""

from __future__ import annotations

import pytest
import reference as ref
import torch

from settransformer.nn.sets import masked_pool, pad_sets, unpad_sets


def test_pad_sets_layout() -> None:
    sets = [torch.randn(3, 2), torch.randn(5, 2), torch.randn(1, 2)]
    x, mask = pad_sets(sets)
    assert x.shape == (3, 5, 2) and mask.shape == (3, 5)
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 5, 1]
    assert mask[0].tolist() == [True] * 3 + [False] * 2  # real elements first
    for i, s in enumerate(sets):
        torch.testing.assert_close(x[i, : len(s)], s)
    assert (x[~mask] == 0).all()


@pytest.mark.parametrize("sizes", [[3, 5, 1], [0, 4, 0], [0], [0, 0], [7]])
def test_round_trip(sizes: list[int]) -> None:
    sets = [torch.randn(n, 3, dtype=torch.float64) for n in sizes]
    x, mask = pad_sets(sets)
    assert x.shape == (len(sizes), max(sizes), 3) and x.dtype == torch.float64
    back = unpad_sets(x, mask)
    assert len(back) == len(sets)
    for a, b in zip(back, sets):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_max_size_pads_further() -> None:
    sets = [torch.randn(2, 4), torch.randn(0, 4)]
    x, mask = pad_sets(sets, max_size=6)
    assert x.shape == (2, 6, 4)
    assert mask.sum(1).tolist() == [2, 0]
    assert (x[:, 2:] == 0).all()
    x_same, _ = pad_sets(sets, max_size=2)  # exactly the largest size is allowed
    assert x_same.shape == (2, 2, 4)


def test_sets_are_copied() -> None:
    s = torch.randn(3, 2)
    x, _ = pad_sets([s])
    x[0, 0] = 100.0
    assert s[0, 0] != 100.0


def test_gradient_flows_back_to_the_sets() -> None:
    sets = [torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    x, _ = pad_sets(sets)
    x.sum().backward()
    assert all(s.grad is not None and (s.grad == 1).all() for s in sets)


def test_unpad_keeps_elements_where_the_mask_is_true_in_order() -> None:
    x = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[False, True, True], [True, False, True]])
    a, b = unpad_sets(x, mask)
    assert a.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert b.tolist() == [[6.0, 7.0], [10.0, 11.0]]


# ---------------------------------------------------------------- errors


def test_pad_sets_rejects_an_empty_sequence() -> None:
    with pytest.raises(ValueError, match=r"^sets: .*at least one"):
        pad_sets([])


@pytest.mark.parametrize(
    ("bad", "what"),
    [(torch.randn(3), r"\(3,\)"), (torch.randn(1, 3, 2), r"\(1, 3, 2\)"), ([[1.0, 2.0]], "list")],
    ids=["1d", "3d", "list"],
)
def test_pad_sets_rejects_a_non_matrix(bad: object, what: str) -> None:
    with pytest.raises((TypeError, ValueError), match=rf"^sets\[1\]: .*\(N_i, D\).*{what}"):
        pad_sets([torch.randn(2, 2), bad])  # type: ignore[list-item]


def test_pad_sets_rejects_mixed_feature_sizes_or_dtypes() -> None:
    with pytest.raises(ValueError, match=r"^sets\[1\]: .*D=2.*got D=3"):
        pad_sets([torch.randn(2, 2), torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"^sets\[2\]: .*float32.*got D=2, torch.float64"):
        pad_sets([torch.randn(2, 2), torch.randn(1, 2), torch.randn(2, 2, dtype=torch.float64)])


def test_pad_sets_rejects_a_small_max_size() -> None:
    with pytest.raises(ValueError, match=r"^max_size: 3 is smaller than the largest set \(5\)"):
        pad_sets([torch.randn(5, 2), torch.randn(1, 2)], max_size=3)


def test_unpad_sets_rejects_bad_shapes() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        unpad_sets(x[0], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, N\).*\(2, 4\)"):
        unpad_sets(x, torch.ones(2, 4, dtype=torch.bool))


def test_unpad_sets_rejects_a_non_bool_mask() -> None:
    with pytest.raises((TypeError, ValueError), match="bool"):
        unpad_sets(torch.randn(2, 3, 4), torch.ones(2, 3))


def test_unpad_sets_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match=r"^x: "):
        unpad_sets([[[1.0]]], torch.ones(1, 1, dtype=torch.bool))  # type: ignore[arg-type]


# ---------------------------------------------------------------- masked_pool


@pytest.mark.parametrize("how", ["mean", "sum", "max"])
def test_masked_pool_matches_per_set(how: str, padded) -> None:
    x, mask, sets = padded([4, 1, 0, 6], 3, n=6)
    x = x.masked_fill(~mask[..., None], 0.0)  # masked_pool expects zeroed padding
    x.requires_grad_()
    pooled = masked_pool(x, mask, how)
    for i, s in enumerate(sets):
        torch.testing.assert_close(pooled[i], ref.pool(s, how))
    assert (pooled[2] == 0).all()
    pooled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("how", ["mean", "sum", "max"])
def test_masked_pool_without_mask(how: str) -> None:
    x = torch.randn(3, 5, 4)
    full = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(masked_pool(x, None, how), masked_pool(x, full, how))
    torch.testing.assert_close(masked_pool(x, None, how)[1], ref.pool(x[1], how))


@pytest.mark.parametrize("how", ["mean", "sum", "max"])
def test_masked_pool_of_zero_elements(how: str) -> None:
    """``N = 0`` (every set empty): zeros, like an all-padding set."""
    out = masked_pool(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool), how)
    torch.testing.assert_close(out, torch.zeros(2, 3))


def test_masked_pool_max_of_negative_values() -> None:
    """Padding must not win the max when every real value is negative."""
    x = -torch.rand(1, 4, 2) - 1
    mask = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(masked_pool(x.masked_fill(~mask[..., None], 0), mask, "max"), x[:, :2].amax(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_pool_mean_of_16_bit_floats_accumulates_wider(dtype: torch.dtype) -> None:
    big = torch.full((1, 1000, 2), 100.0, dtype=dtype)  # the sum, 1e5, is above float16's range
    many = torch.ones(1, 70_000, 2, dtype=dtype)  # the count is above float16's range too
    mask = torch.ones(1, 70_000, dtype=torch.bool)
    for x, m in ((big, None), (many, None), (many, mask)):
        out = masked_pool(x, m, "mean")
        assert out.dtype == dtype
        torch.testing.assert_close(out, x.float().mean(1).to(dtype))


def test_chunked_mean_pooling_of_a_half_model_matches_float32() -> None:
    from settransformer import SetTransformer

    torch.manual_seed(0)
    model = SetTransformer(3, 1, 2, dim_hidden=16, num_heads=2, num_inducing=4, pooling="mean").eval()
    x = torch.randn(1, 70_000, 3)
    with torch.no_grad():
        expected = model(x)
        half = model.half()
        for out in (half(x.half()), half(x.half(), chunk_size=8192)):
            assert out.dtype == torch.float16
            torch.testing.assert_close(out.float(), expected, atol=5e-3, rtol=5e-3)
