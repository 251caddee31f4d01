"""Procedural 3-D shapes: an offline point-cloud classification data set generated from a seed.

Twelve classes of parametric surfaces ([`SHAPE_CLASSES`][settransformer.data.shapes.SHAPE_CLASSES]). Each
shape gets its own proportions (a cylinder's height, a torus' tube radius...), points drawn uniformly on its
surface (parts chosen by area, exact inverse-CDF sampling where the area element is not constant), then a
random pose: anisotropic per-axis scaling, a global size, a random rotation (about the vertical axis, like
ModelNet's aligned models, or uniform in 3-D) and Gaussian noise. So no single statistic (size,
extent along an axis) separates the classes; the model must look at the shape.

Everything is vectorised numpy: a batch of 64 clouds of 128 points takes a few milliseconds.

Examples:
    >>> points, labels = sample_shapes(8, 256, rng=0)
    >>> points.shape, labels.shape
    ((8, 256, 3), (8,))
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["SHAPE_CLASSES", "sample_shapes"]

Sampler = Callable[[int, int, np.random.Generator], np.ndarray]
_TAU = 2 * np.pi


def _sphere(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((k, n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(min=1e-12)


def _ring(angle: np.ndarray, radius: np.ndarray | float, z: np.ndarray | float) -> np.ndarray:
    """Points ``(radius cos a, radius sin a, z)`` stacked on a new last axis."""
    z = np.broadcast_to(z, angle.shape)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=-1)


def _triangles(tri: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform on a union of triangles ``tri: (k, T, 3, 3)`` (faces chosen by area)."""
    area = 0.5 * np.linalg.norm(np.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]), axis=-1)
    cdf = np.cumsum(area, axis=1) / area.sum(1, keepdims=True)
    face = (rng.random((tri.shape[0], n, 1)) > cdf[:, None, :-1]).sum(-1)  # (k, n)
    corners = np.take_along_axis(tri, face[..., None, None], axis=1)  # (k, n, 3, 3)
    r = rng.random((2, tri.shape[0], n, 1))
    r1, r2 = np.sqrt(r[0]), r[1]  # the square root makes the density uniform over the triangle
    return (1 - r1) * corners[:, :, 0] + r1 * (1 - r2) * corners[:, :, 1] + r1 * r2 * corners[:, :, 2]


def _parts(p_first: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(k, n)`` bool: True where a point falls on the first part (probability = its area share)."""
    return rng.random((len(p_first), n)) < p_first[:, None]


def _cube(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    axis, sign = rng.integers(0, 3, (k, n)), rng.choice([-1.0, 1.0], (k, n))
    p = rng.uniform(-1, 1, (k, n, 3))
    np.put_along_axis(p, axis[..., None], sign[..., None], axis=-1)
    return p


def _cylinder(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(2.4, 3.2, (k, 1))  # height, radius 1: taller than wide, unlike the cube
    side = _parts(h[:, 0] / (h[:, 0] + 1), n, rng)  # areas 2*pi*h : 2*pi
    a, u = rng.uniform(0, _TAU, (k, n)), rng.random((k, n))
    cap_z = np.where(rng.random((k, n)) < 0.5, -h, h) / 2
    return np.where(side[..., None], _ring(a, 1.0, (u - 0.5) * h), _ring(a, np.sqrt(u), cap_z))


def _cone(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(1.5, 2.5, (k, 1))
    slant = np.sqrt(1 + h**2)
    lateral = _parts(slant[:, 0] / (slant[:, 0] + 1), n, rng)  # areas pi*slant : pi
    a, t = rng.uniform(0, _TAU, (k, n)), np.sqrt(rng.random((k, n)))  # t: distance from apex / slant
    return np.where(lateral[..., None], _ring(a, t, h / 2 - t * h), _ring(a, t, -h / 2))


def _torus(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.25, 0.45, (k, 1))  # tube radius, ring radius 1
    # the area element is proportional to (1 + r cos phi): invert its CDF by Newton's method
    target = rng.random((k, n)) * _TAU
    phi = target.copy()
    for _ in range(8):
        phi -= (phi + r * np.sin(phi) - target) / (1 + r * np.cos(phi))
    a = rng.uniform(0, _TAU, (k, n))
    return _ring(a, 1 + r * np.cos(phi), r * np.sin(phi))


def _tetrahedron(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A triangular pyramid: an equilateral base (circumradius 1) and an apex of height 1.5 to 2.5."""
    h = rng.uniform(1.5, 2.5, k)
    angles = np.array([0, 1, 2]) * _TAU / 3
    base = np.stack([np.broadcast_to(np.cos(angles), (k, 3)), np.broadcast_to(np.sin(angles), (k, 3)),
                     np.broadcast_to(-h[:, None] / 2, (k, 3))], -1)  # fmt: skip
    apex = np.stack([np.zeros(k), np.zeros(k), h / 2], -1)
    faces = [np.stack([base[:, i], base[:, (i + 1) % 3], apex], 1) for i in range(3)]
    return _triangles(np.stack([*faces, base], 1), n, rng)


def _capsule(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    half = rng.uniform(1.5, 2.0, (k, 1))  # half-length of the straight part, radius 1
    side = _parts(half[:, 0] / (half[:, 0] + 1), n, rng)  # areas 4*pi*half : 4*pi
    a, u = rng.uniform(0, _TAU, (k, n)), rng.uniform(-1, 1, (k, n))
    cap = _sphere(k, n, rng)
    cap[..., 2] += np.sign(cap[..., 2]) * half
    return np.where(side[..., None], _ring(a, 1.0, u * half), cap)


def _helix(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    turns, height = rng.uniform(2.0, 3.5, (k, 1)), rng.uniform(1.5, 3.0, (k, 1))
    tube = rng.uniform(0.1, 0.2, (k, 1, 1))
    t = rng.random((k, n)) * _TAU * turns  # uniform in arc length: the helix has constant speed
    climb = height / (_TAU * turns)
    centre = _ring(t, 1.0, climb * t - height / 2)
    tangent = np.stack([-np.sin(t), np.cos(t), np.broadcast_to(climb, t.shape)], -1)
    tangent /= np.linalg.norm(tangent, axis=-1, keepdims=True)
    normal = -_ring(t, 1.0, 0.0)
    binormal = np.cross(tangent, normal)
    psi = rng.uniform(0, _TAU, (k, n, 1))
    return centre + tube * (np.cos(psi) * normal + np.sin(psi) * binormal)


def _disc(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return _ring(rng.uniform(0, _TAU, (k, n)), np.sqrt(rng.random((k, n))), 0.0)


def _hourglass(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Two open frusta meeting at a narrow waist: radius ``w`` at z = 0 widening to 1 at z = +-h/2."""
    h, w = rng.uniform(1.5, 2.5, (k, 1)), rng.uniform(0.15, 0.3, (k, 1))
    # t in [0, 1] runs up the slant; the area element grows with the radius w + (1 - w) t: invert its CDF
    u = rng.random((k, n)) * (1 + w) / 2
    t = (np.sqrt(w**2 + 2 * (1 - w) * u) - w) / (1 - w)
    sign = np.where(rng.random((k, n)) < 0.5, -1.0, 1.0)
    return _ring(rng.uniform(0, _TAU, (k, n)), w + (1 - w) * t, sign * t * h / 2)


def _bowl(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    p = _sphere(k, n, rng)
    p[..., 2] = -np.abs(p[..., 2])
    return p


def _dumbbell(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    rho, gap, rod = rng.uniform(0.5, 0.7, (k, 1)), rng.uniform(0.8, 1.4, (k, 1)), 0.15
    ball_area, rod_area = 2 * 4 * np.pi * rho**2, _TAU * rod * 2 * gap
    ball = _parts((ball_area / (ball_area + rod_area))[:, 0], n, rng)
    balls = _sphere(k, n, rng) * rho[..., None]
    balls[..., 2] += np.where(rng.random((k, n)) < 0.5, -1, 1) * (gap + rho * 0.8)
    a, u = rng.uniform(0, _TAU, (k, n)), rng.uniform(-1, 1, (k, n))
    return np.where(ball[..., None], balls, _ring(a, rod, u * gap))


_SAMPLERS: dict[str, Sampler] = {
    "sphere": _sphere,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "tetrahedron": _tetrahedron,
    "capsule": _capsule,
    "helix": _helix,
    "disc": _disc,
    "hourglass": _hourglass,
    "bowl": _bowl,
    "dumbbell": _dumbbell,
}
SHAPE_CLASSES: tuple[str, ...] = tuple(_SAMPLERS)
"""The class names, in label order."""


def _rotations(k: int, rng: np.random.Generator, about_z: bool = False) -> np.ndarray:
    """``k`` uniformly random rotation matrices ``(k, 3, 3)`` (from normalised quaternions); with
    ``about_z``, uniformly random rotations about the z axis only."""
    q = rng.standard_normal((k, 4))
    if about_z:
        q[:, 1:3] = 0
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def sample_shapes(
    num_shapes: int,
    num_points: int,
    rng: np.random.Generator | int,
    *,
    labels: np.ndarray | None = None,
    num_classes: int = len(SHAPE_CLASSES),
    noise: float = 0.02,
    anisotropy: tuple[float, float] = (0.8, 1.25),
    size: tuple[float, float] = (0.5, 2.0),
    rotation: str = "so3",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw random shapes as point clouds.

    Args:
        num_shapes: ``S``; num_points: ``N`` points per cloud.
        rng: a numpy ``Generator`` or a seed.
        labels: ``(S,)`` classes to draw (default: uniform over the first ``num_classes``).
        num_classes: use the first ``num_classes`` of
            [`SHAPE_CLASSES`][settransformer.data.shapes.SHAPE_CLASSES] (2 to 12).
        noise: std of the Gaussian jitter, relative to the shape's size.
        anisotropy: range of the independent per-axis scale factors (in the shape's own frame).
        size: range of the overall size (log-uniform).
        rotation: ``"so3"`` (uniformly random 3-D rotation), ``"z"`` (about the vertical axis only,
            shapes stay upright like ModelNet's aligned models) or ``"none"``.

    Returns:
        ``points: (S, N, 3)`` float32 and ``labels: (S,)`` int64.
    """
    if not 2 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes: expected 2 to {len(SHAPE_CLASSES)}, got {num_classes}")
    if rotation not in ("so3", "z", "none"):
        raise ValueError(f"rotation: expected 'so3', 'z' or 'none', got {rotation!r}")
    if num_shapes < 0 or num_points < 1:
        raise ValueError(f"num_shapes, num_points: expected >= 0 and >= 1, got {num_shapes}, {num_points}")
    rng = np.random.default_rng(rng)
    labels = rng.integers(0, num_classes, num_shapes) if labels is None else np.asarray(labels, np.int64)
    if labels.shape != (num_shapes,) or (num_shapes and not 0 <= labels.min() <= labels.max() < num_classes):
        raise ValueError(f"labels: expected ({num_shapes},) integers in [0, {num_classes}), got {labels}")
    points = np.empty((num_shapes, num_points, 3))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        p = _SAMPLERS[SHAPE_CLASSES[c]](len(idx), num_points, rng)
        points[idx] = p / np.abs(p).max(axis=(1, 2), keepdims=True)  # fit in [-1, 1]^3 before the pose
    k = num_shapes
    points *= rng.uniform(*anisotropy, (k, 1, 3))
    if rotation != "none":
        points = np.einsum("kij,knj->kni", _rotations(k, rng, about_z=rotation == "z"), points)
    scale = np.exp(rng.uniform(np.log(size[0]), np.log(size[1]), (k, 1, 1)))
    points = (points + noise * rng.standard_normal(points.shape)) * scale
    return points.astype(np.float32), labels.astype(np.int64)
