"""scikit-learn's handwritten digits as 2-D point sets: an offline, variable-size classification set.

Each 8x8 image of ``sklearn.datasets.load_digits`` (1,797 images, bundled with scikit-learn, so no
download) becomes the set of its inked pixels, one point per pixel with value > 0 and features
``(x, y, intensity)``: ``x, y`` in ``[-1, 1]`` (y pointing up) and ``intensity`` in ``(0, 1]``. Sets
have 16 to 42 points (33 on average), so batches are padded and masked. The train/test split is
fixed, disjoint and stratified ([`split_stratified`][settransformer.data.pointclouds.split_stratified]).

Examples:
    >>> data = load_digit_points()
    >>> data.train.points.shape[2], data.num_classes, data.train.mask is not None
    (3, 10, True)
"""

from __future__ import annotations

import numpy as np

from .pointclouds import PointCloudData, PointSplit, split_stratified

__all__ = ["images_to_point_sets", "load_digit_points"]


def images_to_point_sets(images: np.ndarray, max_value: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """Grey images ``(S, H, W)`` -> point sets ``(S, N, 3)`` of ``(x, y, intensity)`` and ``mask (S, N)``.

    A point per pixel above zero, in row-major order; ``N`` is the largest number of inked pixels.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images: expected shape (S, H, W), got {images.shape}")
    s, h, w = images.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = (cols - (w - 1) / 2) / ((w - 1) / 2)
    y = ((h - 1) / 2 - rows) / ((h - 1) / 2)
    features = np.stack(
        [np.broadcast_to(x, images.shape), np.broadcast_to(y, images.shape), images / max_value], -1
    )
    inked = images.reshape(s, -1) > 0
    n = max(1, int(inked.sum(1).max()))
    # a stable argsort puts every image's inked pixels first, in row-major order
    order = np.argsort(~inked, axis=1, kind="stable")[:, :n]
    points = np.take_along_axis(features.reshape(s, -1, 3), order[..., None], axis=1)
    mask = np.take_along_axis(inked, order, axis=1)
    return np.where(mask[..., None], points, 0).astype(np.float32), mask


def load_digit_points(test_fraction: float = 0.2, seed: int = 0) -> PointCloudData:
    """The digits as point sets with a fixed stratified split (``test_fraction`` of each class).

    Returns:
        [`PointCloudData`][settransformer.data.pointclouds.PointCloudData]: points ``(S, 42, 3)`` with masks,
            labels 0-9, class names ``"0".."9"``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    points, mask = images_to_point_sets(digits.images)
    labels = digits.target.astype(np.int64)
    train, test = split_stratified(labels, test_fraction, seed)
    return PointCloudData(
        PointSplit(points[train], labels[train], mask[train]),
        PointSplit(points[test], labels[test], mask[test]),
        [str(d) for d in range(10)],
    )
