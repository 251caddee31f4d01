"""Preprocessing rules applied to a whole data set: what is done once, what per batch, train vs test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from settransformer.data.point_pipeline import PreparedClouds, Preprocessing
from settransformer.data.pointclouds import PointCloudData, PointSplit


def _data(n: int = 40, with_mask: bool = False) -> PointCloudData:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(12, n, 3)) * 3 + 10).astype(np.float32)
    mask = None
    if with_mask:
        mask = np.arange(n)[None, :] < rng.integers(5, n, 12)[:, None]
        x = np.where(mask[..., None], x, 0).astype(np.float32)
    labels = np.arange(12) % 3
    split = lambda i: PointSplit(x[i], labels[i], None if mask is None else mask[i])  # noqa: E731
    return PointCloudData(split(slice(0, 8)), split(slice(8, 12)), ["a", "b", "c"])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fixed_rule_is_applied_once_and_identically_to_train_and_test() -> None:
    data = _data()
    clouds = PreparedClouds(data, Preprocessing(num_points=10))
    x, mask, y = clouds.test
    assert x.shape == (4, 10, 3) and mask is None and y.tolist() == [2, 0, 1, 2]
    raw = torch.from_numpy(data.test.points[:, ::4])  # every 4th point of 40
    expected = (raw - raw.mean((1, 2), keepdim=True)) / raw.std((1, 2), unbiased=False, keepdim=True)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    a, _, ya = clouds.train_batch(torch.tensor([0, 3]), _gen(0))
    b, _, _ = clouds.train_batch(torch.tensor([0, 3]), _gen(1))
    assert torch.equal(a, b)  # nothing random without augmentation or random subsets
    assert ya.tolist() == [0, 0]


def test_random_rule_draws_fresh_training_subsets_but_a_fixed_test_subset() -> None:
    prep = Preprocessing(num_points=10, subsample="random", test_seed=5)
    clouds = PreparedClouds(_data(), prep)
    a, _, _ = clouds.train_batch(torch.tensor([0, 1]), _gen(0))
    b, _, _ = clouds.train_batch(torch.tensor([0, 1]), _gen(1))
    assert a.shape == (2, 10, 3) and not torch.equal(a, b)
    torch.testing.assert_close(a.mean((1, 2)), torch.zeros(2), atol=1e-5, rtol=0)  # standardised per batch
    again = PreparedClouds(_data(), prep)
    assert torch.equal(again.test[0], clouds.test[0])
    fixed_test = PreparedClouds(
        _data(), Preprocessing(num_points=10, subsample="random", test_subsample="fixed")
    )
    assert not torch.equal(fixed_test.test[0], clouds.test[0])


def test_train_statistics_come_from_the_training_split() -> None:
    data = _data()
    clouds = PreparedClouds(data, Preprocessing(standardize="train"))
    assert clouds.standardizer is not None
    assert clouds.standardizer.mean == pytest.approx(float(data.train.points.mean()), rel=1e-4)
    x = clouds.test[0]
    expected = (torch.from_numpy(data.test.points) - clouds.standardizer.mean) / clouds.standardizer.std
    torch.testing.assert_close(x, expected)


def test_augmentation_only_in_training_and_masks_kept() -> None:
    data = _data(with_mask=True)
    prep = Preprocessing(standardize="none", augment=True)
    clouds = PreparedClouds(data, prep)
    torch.testing.assert_close(clouds.test[0], torch.from_numpy(data.test.points))  # test untouched
    x, mask, _ = clouds.train_batch(torch.tensor([0, 1, 2]), _gen())
    raw = torch.from_numpy(data.train.points[:3])
    assert mask is not None and torch.equal(mask, torch.from_numpy(data.train.mask[:3]))
    assert not torch.allclose(x, raw) and (x[~mask] == 0).all()
    ratio = x[..., 2][mask] / raw[..., 2][mask]  # z is only scaled
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.25 + 1e-5


def test_bad_rules() -> None:
    with pytest.raises(ValueError, match="subsample"):
        Preprocessing(subsample="strided")
    with pytest.raises(ValueError, match="standardize"):
        Preprocessing(standardize="global")
    with pytest.raises(ValueError, match="augment"):
        Preprocessing(augment=True, spatial_dims=1)
    with pytest.raises(ValueError, match="num_points: 100 is more than the 40"):
        PreparedClouds(_data(), Preprocessing(num_points=100))
