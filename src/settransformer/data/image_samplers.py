"""Vectorised random draws of images: by class
([`ClassSampler`][settransformer.data.image_samplers.ClassSampler]) and by pairs of attributes
([`AttributePairSampler`][settransformer.data.image_samplers.AttributePairSampler], the paper's CelebA anomaly
rule).

Both return image indices as ``torch.long`` tensors and draw only from a ``torch.Generator``, so
batches are repeatable.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["AttributePairSampler", "ClassSampler"]


class ClassSampler:
    """Draws random images of given classes, vectorised (with replacement within a class).

    Args:
        labels: ``(M,)`` class ids in ``0..K-1`` (classes may be empty).
        num_classes: ``K``.

    Examples:
        >>> sampler = ClassSampler(np.array([0, 1, 1, 2]), 3)
        >>> idx = sampler.sample(torch.tensor([[1, 2], [0, 1]]), torch.Generator().manual_seed(0))
        >>> idx.shape  # image indices, one per requested class
        torch.Size([2, 2])
    """

    def __init__(self, labels: np.ndarray, num_classes: int) -> None:
        ids = torch.as_tensor(np.asarray(labels, np.int64))
        self.order = torch.argsort(ids, stable=True)  # image indices grouped by class
        self.counts = torch.bincount(ids, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    @property
    def nonempty(self) -> Tensor:
        """Ids of the classes with at least one image, ``(K',)``."""
        return torch.nonzero(self.counts > 0).flatten()

    def sample(self, classes: Tensor, generator: torch.Generator) -> Tensor:
        """One random image index per entry of ``classes`` (any shape, long); same shape out."""
        counts = self.counts[classes]
        if bool((counts == 0).any()):
            raise ValueError("classes: asked for an image of a class that has none")
        u = torch.rand(classes.shape, generator=generator, dtype=torch.float64)
        within = (u * counts).long().clamp_max(counts - 1)
        return self.order[self.offsets[classes] + within]


class AttributePairSampler:
    """The paper's CelebA anomaly rule: pairs of attributes, images with both, images with neither.

    Only pairs with at least ``min_both`` images having both attributes and one having neither are
    used. Images with both come from per-pair index lists; images with neither by vectorised
    rejection from all images (neither is common for most pairs, and those lists would be huge).

    Args:
        attributes: ``(M, A)`` bool.
        min_both: the fewest "both" images a usable pair needs.

    Examples:
        >>> attrs = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]], bool)
        >>> sampler = AttributePairSampler(attrs, min_both=2)
        >>> g = torch.Generator().manual_seed(0)
        >>> pairs = sampler.sample_pairs(4, g)  # (4,) ids into sampler.pairs
        >>> sampler.sample_both(pairs, 3, g).shape, sampler.sample_neither(pairs, g).shape
        (torch.Size([4, 3]), torch.Size([4]))
    """

    def __init__(self, attributes: np.ndarray, min_both: int) -> None:
        attrs = np.asarray(attributes, bool)
        a = attrs.shape[1]
        pairs, both_lists = [], []
        for i in range(a):
            for j in range(i + 1, a):
                both = np.flatnonzero(attrs[:, i] & attrs[:, j])
                if len(both) >= min_both and not (attrs[:, i] | attrs[:, j]).all():
                    pairs.append((i, j))
                    both_lists.append(both)
        if not pairs:
            raise ValueError(
                f"labels: no pair of attributes has >= {min_both} images with both and one with neither"
            )
        self.pairs = torch.tensor(pairs)  # (P, 2)
        self.attributes = torch.from_numpy(attrs)
        counts = torch.tensor([len(b) for b in both_lists])
        self.counts, self.offsets = counts, torch.cumsum(counts, 0) - counts
        self.both = torch.from_numpy(np.concatenate(both_lists))

    def sample_pairs(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Random usable pair ids ``(B,)``."""
        return torch.randint(len(self.pairs), (batch_size,), generator=generator)

    def sample_both(self, pair: Tensor, count: int, generator: torch.Generator) -> Tensor:
        """``count`` images having both attributes of each pair: ``(B, count)`` indices."""
        n = self.counts[pair][:, None]
        within = (torch.rand(len(pair), count, generator=generator, dtype=torch.float64) * n).long()
        return self.both[self.offsets[pair][:, None] + within.clamp_max(n - 1)]

    def sample_neither(self, pair: Tensor, generator: torch.Generator, tries: int = 10_000) -> Tensor:
        """One image having neither attribute of each pair: ``(B,)`` indices."""
        out = torch.full((len(pair),), -1, dtype=torch.long)
        todo = torch.arange(len(pair))
        for _ in range(tries):
            cand = torch.randint(len(self.attributes), (len(todo), 32), generator=generator)
            pa, pb = self.pairs[pair[todo]].unbind(1)
            ok = ~(self.attributes[cand, pa[:, None]] | self.attributes[cand, pb[:, None]])  # (T, 32)
            found = ok.any(dim=1)
            first = ok.float().argmax(dim=1)
            out[todo[found]] = cand[found, first[found]]
            todo = todo[~found]
            if len(todo) == 0:
                return out
        raise RuntimeError("sample_neither: images with neither attribute are too rare to find")
