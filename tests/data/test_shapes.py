"""Procedural 3-D shapes: determinism, surface sampling, poses that do not give the class away."""

from __future__ import annotations

import numpy as np
import pytest

from settransformer.data import shapes
from settransformer.data.shapes import SHAPE_CLASSES, sample_shapes


def test_shapes_are_seeded_and_well_formed() -> None:
    x, y = sample_shapes(40, 64, 3)
    assert x.shape == (40, 64, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.isfinite(x).all() and y.min() >= 0 and y.max() < len(SHAPE_CLASSES)
    x2, y2 = sample_shapes(40, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, sample_shapes(40, 64, 4)[0])


def test_requested_labels_and_class_subset() -> None:
    labels = np.arange(24) % len(SHAPE_CLASSES)
    _, y = sample_shapes(24, 16, 0, labels=labels)
    np.testing.assert_array_equal(y, labels)
    _, y = sample_shapes(200, 8, 0, num_classes=3)
    assert set(y.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="num_classes"):
        sample_shapes(4, 8, 0, num_classes=1)
    with pytest.raises(ValueError, match="labels"):
        sample_shapes(2, 8, 0, labels=np.array([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match="rotation"):
        sample_shapes(2, 8, 0, rotation="xyz")


def _canonical(name: str, n: int = 4000, k: int = 3) -> np.ndarray:
    return shapes._SAMPLERS[name](k, n, np.random.default_rng(0))


def test_points_lie_on_the_surfaces() -> None:
    np.testing.assert_allclose(np.linalg.norm(_canonical("sphere"), axis=-1), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.abs(_canonical("cube")).max(-1), 1.0, atol=1e-9)
    bowl = _canonical("bowl")
    assert (bowl[..., 2] <= 0).all()
    disc = _canonical("disc")
    assert (disc[..., 2] == 0).all() and np.linalg.norm(disc, axis=-1).max() <= 1
    cyl = _canonical("cylinder")
    radius, height = np.linalg.norm(cyl[..., :2], axis=-1), np.abs(cyl[..., 2])
    half = height.max(1, keepdims=True)
    on_cap = np.isclose(height, half)
    assert np.allclose(radius[~on_cap], 1.0) and (radius[on_cap] <= 1 + 1e-9).all()


def test_parts_are_sampled_in_proportion_to_area() -> None:
    """Uniform on the surface: a cylinder of height h and radius 1 has its side hit with
    probability h / (h + 1); a torus' tube angle phi has density (1 + r cos phi) / 2pi, so
    E[cos phi] = r / 2 (the exact inverse-CDF sampling is checked here)."""
    cyl = _canonical("cylinder", n=20_000)
    height = np.abs(cyl[..., 2]).max(1) * 2
    side = ~np.isclose(np.abs(cyl[..., 2]), height[:, None] / 2)
    np.testing.assert_allclose(side.mean(1), height / (height + 1), atol=0.015)

    torus = _canonical("torus", n=20_000)
    offset = np.linalg.norm(torus[..., :2], axis=-1) - 1  # r cos phi
    r = np.sqrt(offset**2 + torus[..., 2] ** 2)
    assert np.allclose(r, r[:, :1])  # one tube radius per torus
    np.testing.assert_allclose((offset / r).mean(1), r[:, 0] / 2, atol=0.015)

    sphere = _canonical("sphere", n=20_000)
    np.testing.assert_allclose((sphere[..., 2] > 0.5).mean(1), 0.25, atol=0.015)  # Archimedes


def test_size_alone_does_not_separate_the_classes() -> None:
    """The spread of every class' cloud sizes overlaps the spread of every other class."""
    labels = np.repeat(np.arange(len(SHAPE_CLASSES)), 60)
    x, _ = sample_shapes(len(labels), 128, 0, labels=labels)
    extent = np.linalg.norm(x - x.mean(1, keepdims=True), axis=-1).max(1).reshape(len(SHAPE_CLASSES), -1)
    lo, hi = extent.min(1), extent.max(1)
    assert (lo[:, None] < hi[None, :]).all()


def test_rotation_modes() -> None:
    labels = np.zeros(50, np.int64)  # spheres, so only the pose varies
    kwargs = {"labels": labels, "noise": 0.0, "anisotropy": (0.5, 0.5), "size": (1.0, 1.0)}
    upright, _ = sample_shapes(50, 200, 0, rotation="z", **kwargs)
    flat, _ = sample_shapes(50, 200, 0, rotation="none", **kwargs)
    tumbled, _ = sample_shapes(50, 200, 0, rotation="so3", **kwargs)
    # anisotropy 0.5 on every axis = a sphere of radius 0.5: z extents stay 1 unless the pose is random
    z_extent = lambda p: np.ptp(p[..., 2], axis=1)  # noqa: E731
    assert np.allclose(z_extent(upright), z_extent(flat), atol=0.05)
    assert np.allclose(z_extent(tumbled), z_extent(flat), atol=0.05)  # a sphere looks the same...
    cubes, _ = sample_shapes(50, 400, 0, rotation="z", **{**kwargs, "labels": labels + 1})
    tumbling_cubes, _ = sample_shapes(50, 400, 0, rotation="so3", **{**kwargs, "labels": labels + 1})
    assert np.allclose(z_extent(cubes), 1.0, atol=0.02)  # ...but an upright cube keeps its height
    assert z_extent(tumbling_cubes).max() > 1.3
