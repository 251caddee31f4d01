"""Point-cloud data ready for training: a [`PointCloudData`][settransformer.data.pointclouds.PointCloudData]
after the preprocessing rules.

[`PreparedClouds`][settransformer.data.point_pipeline.PreparedClouds] applies
[`Preprocessing`][settransformer.data.point_pipeline.Preprocessing] once to the test split (and to the
training split where the rule is deterministic) and per batch where it is random, in the order of the DeepSets
/ Set Transformer code: subsample, standardise, augment (training only).

Examples:
    >>> from settransformer.data.pointclouds import load_array
    >>> points = np.random.default_rng(0).normal(size=(50, 200, 3)).astype(np.float32)
    >>> np.savez("clouds.npz", points=points, labels=np.arange(50) % 5)
    >>> prep = Preprocessing(num_points=100, subsample="random", augment=True)
    >>> clouds = PreparedClouds(load_array("clouds.npz"), prep)
    >>> gen = torch.Generator().manual_seed(0)
    >>> x, mask, y = clouds.train_batch(torch.tensor([0, 5, 7]), gen)  # 100 of each cloud's 200 points
    >>> x.shape, mask, y.shape
    (torch.Size([3, 100, 3]), None, torch.Size([3]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .point_transforms import Standardizer, augment, standardize_per_cloud, subsample
from .pointclouds import PointCloudData, PointSplit

__all__ = ["PreparedClouds", "Preprocessing"]

Clouds = tuple[Tensor, Tensor | None, Tensor]  # x: (S, N, D), mask: (S, N) or None, labels: (S,)


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing rules.

    Attributes:
        num_points: points kept per cloud (``None``: all).
        subsample: ``"fixed"`` (evenly spaced, every ``N/P``-th point) or ``"random"`` (a fresh subset
            per training batch); test_subsample: the test rule (``None``: the same; a random test
            subset is drawn once, with ``test_seed``).
        standardize: ``"cloud"`` (each cloud by its own statistics, the DeepSets code), ``"train"``
            (statistics of the training split) or ``"none"``.
        augment: rotate about z and scale the axes of training clouds.
        spatial_dims: the leading features that are coordinates (standardised and augmented).
        test_seed: seeds the random test subset.
    """

    num_points: int | None = None
    subsample: str = "fixed"
    test_subsample: str | None = None
    standardize: str = "cloud"
    augment: bool = False
    spatial_dims: int = 3
    test_seed: int = 0

    def __post_init__(self) -> None:
        for key, choices in (
            ("subsample", ("fixed", "random")),
            ("test_subsample", (None, "fixed", "random")),
            ("standardize", ("cloud", "train", "none")),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}: expected one of {choices}, got {getattr(self, key)!r}")
        if self.augment and self.spatial_dims < 2:
            raise ValueError(
                f"augment: needs at least 2 coordinates per point, got spatial_dims={self.spatial_dims}"
            )


def _tensors(split: PointSplit) -> Clouds:
    mask = None if split.mask is None else torch.from_numpy(split.mask)
    return torch.from_numpy(split.points), mask, torch.from_numpy(split.labels)


class PreparedClouds:
    """Train and test clouds of ``data`` under ``prep``, as CPU tensors.

    Args:
        data: the loaded clouds (an empty training split is allowed for generated data: then
            ``standardize="train"`` fits on ``fit_on``).
        prep: the rules.
        fit_on: ``(x, mask)`` to fit the ``"train"`` statistics on when the training split is empty.
    """

    def __init__(
        self, data: PointCloudData, prep: Preprocessing, fit_on: tuple[Tensor, Tensor | None] | None = None
    ):
        self.prep = prep
        p = prep.num_points
        train_x, train_mask, self.train_labels = _tensors(data.train)
        test_x, test_mask, test_labels = _tensors(data.test)
        if p is not None and test_mask is None and p > test_x.shape[1]:
            raise ValueError(
                f"num_points: {p} is more than the {test_x.shape[1]} points per cloud of the data"
            )
        if p is not None:
            random_test = (prep.test_subsample or prep.subsample) == "random"
            gen = torch.Generator().manual_seed(prep.test_seed) if random_test else None
            test_x, test_mask = subsample(test_x, p, test_mask, gen)
            if prep.subsample == "fixed" and len(train_x):
                train_x, train_mask = subsample(train_x, p, train_mask)
        self.standardizer: Standardizer | None = None
        if prep.standardize == "train":
            fit = (train_x, train_mask) if len(train_x) else fit_on
            if fit is None:
                raise ValueError(
                    "standardize='train': the training split is empty and nothing to fit on was given"
                )
            self.standardizer = Standardizer.fit(fit[0], fit[1], prep.spatial_dims)
        self.raw_test: Clouds = (test_x, test_mask, test_labels)
        """The test clouds after the test subsample, before standardisation: what a deployed model takes."""
        self.test: Clouds = (self.standardize(test_x, test_mask), test_mask, test_labels)
        if prep.subsample == "fixed" or p is None:
            train_x = self.standardize(train_x, train_mask)  # deterministic, so done once
        self.train_x, self.train_mask = train_x, train_mask

    def __len__(self) -> int:
        """Number of training clouds."""
        return len(self.train_labels)

    def standardize(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Apply the standardisation rule to ``x: (B, N, D)``."""
        if self.prep.standardize == "cloud":
            return standardize_per_cloud(x, mask, self.prep.spatial_dims)
        if self.standardizer is not None:
            return self.standardizer(x, mask)
        return x

    def finish(
        self, x: Tensor, mask: Tensor | None, generator: torch.Generator, standardize: bool = True
    ) -> Tensor:
        """Standardise (optionally) and augment training clouds ``x: (B, N, D)`` (e.g. generated ones)."""
        if standardize:
            x = self.standardize(x, mask)
        return augment(x, generator, self.prep.spatial_dims) if self.prep.augment else x

    def train_batch(self, indices: Tensor, generator: torch.Generator) -> Clouds:
        """Training clouds ``indices: (B,)``: random subset (if so), standardised, augmented."""
        x, mask = self.train_x[indices], None if self.train_mask is None else self.train_mask[indices]
        fresh = self.prep.subsample == "random" and self.prep.num_points is not None
        if fresh:
            x, mask = subsample(x, self.prep.num_points, mask, generator)  # type: ignore[arg-type]
        return (
            self.finish(x, mask, generator, standardize=fresh).contiguous(),
            mask,
            self.train_labels[indices],
        )
