"""Point-cloud preprocessing: subsampling, DeepSets standardisation, augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from settransformer.data.point_transforms import (
    Standardizer,
    augment,
    fixed_indices,
    fixed_subsample,
    standardize_per_cloud,
    subsample,
)


def test_fixed_indices_is_every_kth_point() -> None:
    np.testing.assert_array_equal(fixed_indices(10_000, 1000), np.arange(0, 10_000, 10))
    idx = fixed_indices(2048, 1000)
    assert len(idx) == 1000 and len(set(idx.tolist())) == 1000 and idx.max() < 2048
    np.testing.assert_array_equal(fixed_indices(50, 100), np.arange(50))
    with pytest.raises(ValueError, match="num_points"):
        fixed_indices(10, 0)


def test_fixed_subsample_with_mask_takes_evenly_spaced_real_points() -> None:
    x = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1)
    mask = torch.tensor([[True] * 8, [False, True, False, True, True, False, False, True]])
    out, m = subsample(x, 2, mask)
    assert m is None  # both clouds have at least 2 real points
    assert out[0, :, 0].tolist() == [0.0, 4.0]
    assert out[1, :, 0].tolist() == [9.0, 12.0]  # real points 9, 11, 12, 15: the 0th and 2nd
    out, m = subsample(x, 6, mask)
    assert m is not None and m.sum(1).tolist() == [6, 4]
    assert out[1, :4, 0].tolist() == [9.0, 11.0, 12.0, 15.0] and out[1, 4:].abs().sum() == 0


def _every_kth_real_point(x: torch.Tensor, mask: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed rule cloud by cloud in plain indexing: the reference the tensor version must match."""
    size = min(p, x.shape[1])
    out, keep = torch.zeros(x.shape[0], size, x.shape[2]), torch.zeros(x.shape[0], size, dtype=torch.bool)
    for b in range(x.shape[0]):
        real = x[b][mask[b]]
        kept = real[torch.from_numpy(fixed_indices(len(real), p))]
        out[b, : len(kept)], keep[b, : len(kept)] = kept, True
    return out, keep


class _FixedSubsample(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fixed_subsample(x, 12, mask)


def test_fixed_subsample_matches_the_rule_per_cloud_eager_and_traced() -> None:
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 8, 3, generator=gen), torch.rand(2, 8, generator=gen) > 0.3)
    traced = torch.jit.trace(_FixedSubsample(), example, check_trace=False)  # traced below num_points
    for b, n in [(4, 40), (3, 13), (5, 12), (2, 7), (1, 1), (6, 100)]:
        x = torch.randn(b, n, 3, generator=gen)
        mask = torch.rand(b, n, generator=gen) < torch.linspace(0.05, 1.0, b)[:, None]  # sparse to full sets
        mask[0] = False  # an empty set
        x = x.masked_fill(~mask[..., None], 1e4)  # junk in the padding must not come through
        want = _every_kth_real_point(x, mask, 12)
        for got in (fixed_subsample(x, 12, mask), traced(x, mask)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (b, n)
        eager, eager_mask = subsample(x, 12, mask)  # the same, with None for a mask of full sets
        assert torch.equal(eager, want[0])
        assert bool(want[1].all()) if eager_mask is None else torch.equal(eager_mask, want[1])
    with pytest.raises(ValueError, match="num_points"):
        fixed_subsample(x, 0, mask)


def test_random_subsample_is_a_seeded_subset_of_real_points() -> None:
    x = torch.randn(3, 50, 3)
    mask = torch.rand(3, 50) > 0.3
    out, m = subsample(x, 10, mask, torch.Generator().manual_seed(1))
    assert m is None and out.shape == (3, 10, 3)
    for b in range(3):
        real = {tuple(p) for p in x[b][mask[b]].tolist()}
        picked = [tuple(p) for p in out[b].tolist()]
        assert set(picked) <= real and len(set(picked)) == 10
    again, _ = subsample(x, 10, mask, torch.Generator().manual_seed(1))
    other, _ = subsample(x, 10, mask, torch.Generator().manual_seed(2))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_standardize_per_cloud_zero_mean_unit_std_over_real_points() -> None:
    x = torch.randn(4, 30, 3) * torch.tensor([1.0, 5.0, 0.1, 20.0])[:, None, None] + 3
    mask = torch.rand(4, 30) > 0.2
    x = x.masked_fill(~mask[..., None], 123.0)  # junk in the padding must not count
    z = standardize_per_cloud(x, mask)
    for b in range(4):
        real = z[b][mask[b]]
        assert real.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert real.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert z[~mask].abs().sum() == 0
    # one scalar mean and std: a common shift and scale of all axes changes nothing
    torch.testing.assert_close(standardize_per_cloud(x * 7 - 2, mask), z, atol=1e-4, rtol=1e-4)


def test_standardize_clips_outliers_at_100_mean_abs() -> None:
    x = torch.ones(1, 1000, 1)
    x[0, 0, 0] = 1e6  # mean |x| ~ 1001, so the outlier is clipped to ~100,100
    z = standardize_per_cloud(x)
    unclipped = (x - x.mean()) / x.std(unbiased=False)
    assert z[0, 0, 0] < unclipped[0, 0, 0]
    clip = x.abs().mean() * 100
    expected = torch.minimum(x, clip)
    torch.testing.assert_close(z, (expected - expected.mean()) / expected.std(unbiased=False))


def test_standardize_leaves_extra_features_alone() -> None:
    x = torch.randn(2, 10, 4)
    z = standardize_per_cloud(x, spatial_dims=3)
    assert torch.equal(z[..., 3], x[..., 3])


def test_standardizer_uses_training_statistics() -> None:
    train = torch.randn(20, 50, 3) * 4 + 1
    st = Standardizer.fit(train)
    assert st.mean == pytest.approx(float(train.mean()), rel=1e-4)
    assert st.std == pytest.approx(float(train.std(unbiased=False)), rel=1e-3)
    test = torch.randn(5, 50, 3)
    torch.testing.assert_close(st(test), (test - st.mean) / st.std)


def test_augment_rotates_about_z_and_scales_axes() -> None:
    x = torch.randn(64, 20, 4)
    gen = torch.Generator().manual_seed(0)
    rotated = augment(x, gen, spatial_dims=3, scale=(1.0, 1.0))
    torch.testing.assert_close(rotated[..., 2:], x[..., 2:])  # z and the extra feature untouched
    torch.testing.assert_close(rotated[..., :2].norm(dim=-1), x[..., :2].norm(dim=-1))
    angle = torch.atan2(rotated[..., 1], rotated[..., 0]) - torch.atan2(x[..., 1], x[..., 0])
    angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    assert angle.abs().max() <= 0.1 * math.pi + 1e-4
    assert torch.allclose(angle, angle[:, :1], atol=1e-3)  # one angle per cloud
    assert angle[:, 0].std() > 0.02  # and different clouds get different angles

    scaled = augment(x, torch.Generator().manual_seed(0), spatial_dims=3, max_angle=0.0)
    ratio = scaled[..., :3] / x[..., :3]
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.25 + 1e-5
    assert torch.allclose(ratio, ratio[:, :1], atol=1e-4)  # the same scale for all points of a cloud
    again = augment(x, torch.Generator().manual_seed(0), spatial_dims=3, max_angle=0.0)
    assert torch.equal(scaled, again)
