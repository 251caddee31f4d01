"""``settransformer.sets``: ``pad_sets`` / ``unpad_sets``."""

from __future__ import annotations

import pytest
import torch

from settransformer.sets import pad_sets, unpad_sets


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
