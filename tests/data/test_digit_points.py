"""scikit-learn digits as 2-D point sets."""

from __future__ import annotations

import numpy as np
import pytest

from settransformer.data.digit_points import images_to_point_sets, load_digit_points


def test_images_to_point_sets_one_point_per_inked_pixel() -> None:
    images = np.zeros((2, 3, 3))
    images[0, 0, 0] = 16  # top-left, full ink
    images[0, 2, 1] = 8  # bottom-middle, half ink
    images[1, 1, 1] = 4
    points, mask = images_to_point_sets(images)
    assert points.shape == (2, 2, 3) and mask.tolist() == [[True, True], [True, False]]
    np.testing.assert_allclose(points[0], [[-1, 1, 1.0], [0, -1, 0.5]])  # (x, y up, intensity)
    np.testing.assert_allclose(points[1], [[0, 0, 0.25], [0, 0, 0]])
    with pytest.raises(ValueError, match="images"):
        images_to_point_sets(np.zeros((3, 3)))


def test_digit_points_split_is_fixed_stratified_and_complete() -> None:
    data = load_digit_points(test_fraction=0.2, seed=0)
    assert data.class_names == [str(d) for d in range(10)] and data.dim == 3
    assert len(data.train) + len(data.test) == 1797
    assert np.bincount(data.test.labels, minlength=10).min() >= 35
    assert data.train.mask is not None and data.test.mask is not None
    sizes = data.train.mask.sum(1)
    assert sizes.min() < sizes.max()  # variable-size sets: padding and masks are exercised
    real = data.train.points[data.train.mask]
    assert real[:, :2].min() >= -1 and real[:, :2].max() <= 1 and (real[:, 2] > 0).all()
    assert (data.train.points[~data.train.mask] == 0).all()

    again = load_digit_points(test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(again.test.points, data.test.points)
    other = load_digit_points(test_fraction=0.2, seed=1)
    assert not np.array_equal(other.test.points, data.test.points)


def test_digit_points_train_and_test_are_disjoint() -> None:
    """No image of the test split is in the training split (compared by pixel content, so exact
    duplicates in the source would show up too)."""
    from sklearn.datasets import load_digits

    images = load_digits().images.reshape(-1, 64)
    _, first = np.unique(images, axis=0, return_index=True)
    data = load_digit_points()
    key = lambda p, m: {r[m_].tobytes() for r, m_ in zip(p, m)}  # noqa: E731
    train, test = key(data.train.points, data.train.mask), key(data.test.points, data.test.mask)
    duplicates = len(images) - len(first)  # identical images may land on both sides; allow only those
    assert len(train & test) <= duplicates
