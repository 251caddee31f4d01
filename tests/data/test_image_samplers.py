"""``settransformer.data.image_samplers``: draws by class and by attribute pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from settransformer.data.image_samplers import AttributePairSampler, ClassSampler


def test_class_sampler_draws_the_requested_classes() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 4])  # class 3 has no image
    sampler = ClassSampler(labels, 5)
    assert sampler.nonempty.tolist() == [0, 1, 2, 4]
    classes = torch.tensor([[0, 1, 2], [4, 2, 2]]).repeat(50, 1)
    index = sampler.sample(classes, torch.Generator().manual_seed(0))
    assert torch.equal(torch.from_numpy(labels)[index], classes)
    assert set(index[classes == 2].tolist()) == {0, 2, 5}  # every image of the class is used
    with pytest.raises(ValueError, match="has none"):
        sampler.sample(torch.tensor([3]), torch.Generator())


def test_attribute_pair_sampler() -> None:
    attrs = np.random.default_rng(0).random((300, 5)) < 0.5
    sampler = AttributePairSampler(attrs, min_both=7)
    g = torch.Generator().manual_seed(0)
    pair = sampler.sample_pairs(64, g)
    a, b = sampler.pairs[pair].unbind(1)
    both, neither = sampler.sample_both(pair, 7, g), sampler.sample_neither(pair, g)
    t = torch.from_numpy(attrs)
    assert bool((t[both, a[:, None]] & t[both, b[:, None]]).all())
    assert bool((~t[neither, a] & ~t[neither, b]).all())
    assert bool((sampler.counts >= 7).all())
    with pytest.raises(ValueError, match="no pair of attributes"):
        AttributePairSampler(np.ones((10, 3), bool), min_both=2)
