"""Point-cloud preprocessing: subsampling, the DeepSets standardisation, and the paper's augmentation.

All functions take a padded batch ``x: (B, N, D)`` with an optional ``mask: (B, N)`` (True = real
point), keep padded rows at zero, and draw randomness only from an explicit ``torch.Generator`` so
runs are repeatable. The order follows the DeepSets / Set Transformer code: subsample, standardise,
then (training only) augment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Standardizer",
    "augment",
    "fixed_indices",
    "fixed_subsample",
    "standardize_per_cloud",
    "subsample",
]


def fixed_indices(n: int, num_points: int) -> np.ndarray:
    """Indices of ``min(n, num_points)`` evenly spaced points out of ``n``: ``floor(j * n / num_points)``.

    When ``num_points`` divides ``n`` this is every ``(n / num_points)``-th point, the DeepSets rule
    (``x[:, ::10]`` for 1,000 of 10,000 points).
    """
    if num_points < 1:
        raise ValueError(f"num_points: expected a positive integer, got {num_points}")
    if n <= num_points:
        return np.arange(n)
    return (np.arange(num_points) * n) // num_points


def fixed_subsample(x: Tensor, num_points: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The fixed rule of [`subsample`][settransformer.data.point_transforms.subsample] for each cloud's real
    points, in tensor operations only.

    Each cloud's real points are moved to the front in their order, then the evenly spaced ones are
    kept: indices ``floor(j * n / num_points)`` of a cloud with ``n > num_points`` real points
    ([`fixed_indices`][settransformer.data.point_transforms.fixed_indices]), all ``n`` of a smaller one. No
    Python branch depends on the sizes or the values, so a traced graph (TorchScript, ONNX) computes the same
    for every batch and set size.

    Args:
        x: ``(B, N, D)`` clouds; mask: ``(B, N)`` bool, True = real point.
        num_points: points to keep.

    Returns:
        x: ``(B, P, D)`` with ``P = min(num_points, N)``, padded rows zero.
        mask: ``(B, P)``, ``mask[b, j] = j < min(n_b, P)``.

    Examples:
        >>> x = torch.arange(8.0).view(1, 8, 1)
        >>> mask = torch.tensor([[True, False, True, True, False, True, True, True]])
        >>> out, m = fixed_subsample(x, 3, mask)  # real points 0, 2, 3, 5, 6, 7: indices 0, 2, 4
        >>> out[0, :, 0].tolist(), m.tolist()
        ([0.0, 3.0, 6.0], [[True, True, True]])
    """
    if num_points < 1:
        raise ValueError(f"num_points: expected a positive integer, got {num_points}")
    real = mask.to(torch.long)
    position = torch.ones_like(real).cumsum(1) - 1  # (B, N): 0 .. N-1, whatever N is at run time
    counts = real.sum(1, keepdim=True)  # (B, 1)
    # rank of each point once real points come first (both groups in order): a permutation of 0 .. N-1
    rank = torch.where(mask, real.cumsum(1) - 1, counts + (1 - real).cumsum(1) - 1)
    order = torch.zeros_like(position).scatter(1, rank, position)  # order[:, rank] = position
    j = position[:, :num_points]  # (B, P): slicing clamps to N at run time
    src = torch.where(counts > num_points, (j * counts) // num_points, j)
    idx = order.gather(1, src)
    out = x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))
    new_mask = j < counts
    return out.masked_fill(~new_mask[..., None], 0.0), new_mask


def subsample(
    x: Tensor, num_points: int, mask: Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """Keep ``num_points`` points per cloud: evenly spaced (``generator=None``) or a random subset.

    Args:
        x: ``(B, N, D)`` clouds; mask: ``(B, N)`` bool or None.
        num_points: points to keep; clouds with fewer real points keep them all (and get padding).
        generator: draws the random subsets; ``None`` selects the fixed every-k-th rule of
            [`fixed_indices`][settransformer.data.point_transforms.fixed_indices], applied to each cloud's
            real points in order ([`fixed_subsample`][settransformer.data.point_transforms.fixed_subsample]).

    Returns:
        x: ``(B, P, D)``, ``P = min(num_points, N)``, real points first.
        mask: ``(B, P)``; None when every cloud has ``P`` real points.

    Examples:
        >>> x = torch.arange(10.0).view(1, 10, 1)
        >>> out, mask = subsample(x, 5)  # every 2nd point
        >>> out[0, :, 0].tolist(), mask
        ([0.0, 2.0, 4.0, 6.0, 8.0], None)
    """
    b, n, d = x.shape
    if generator is None:
        if mask is None:
            return x[:, torch.from_numpy(fixed_indices(n, num_points)).to(x.device)], None
        out, new_mask = fixed_subsample(x, num_points, mask)
    else:
        p = min(num_points, n)
        real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.cpu()
        keys = torch.rand(b, n, generator=generator).masked_fill(~real, 2.0)  # padding sorts last
        idx = keys.argsort(dim=1)[:, :p].to(x.device)
        out = x.gather(1, idx[..., None].expand(-1, -1, d))
        new_mask = (torch.arange(p)[None, :] < real.sum(1, keepdim=True)).to(x.device)
        out = out.masked_fill(~new_mask[..., None], 0.0)
    if bool(new_mask.all()):
        return out, None
    return out, new_mask


def _masked_moments(z: Tensor, mask: Tensor | None, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and (biased) std of ``z: (B, N, C)`` over ``dims``, counting only real points."""
    w = torch.ones_like(z[..., :1]) if mask is None else mask[..., None].to(z.dtype)
    w = w.expand_as(z)
    count = w.sum(dims, keepdim=True).clamp(min=1)
    mean = (z * w).sum(dims, keepdim=True) / count
    var = (((z - mean) ** 2) * w).sum(dims, keepdim=True) / count
    return mean, var.sqrt()


def standardize_per_cloud(x: Tensor, mask: Tensor | None = None, spatial_dims: int | None = None) -> Tensor:
    """The DeepSets code's standardisation, one cloud at a time.

    For each cloud: clip the coordinates to ``±100 · mean|x|``, subtract one scalar mean and divide by
    one scalar std (over all its real points and coordinate axes). This removes position and size,
    like the ``standardize`` of DeepSets' ``PointClouds/modelnet.py``.

    Args:
        x: ``(B, N, D)``; mask: ``(B, N)`` or None.
        spatial_dims: standardise only the first ``spatial_dims`` features (default: all).
    """
    c = x.shape[2] if spatial_dims is None else spatial_dims
    xyz = x[..., :c]
    clip = _masked_moments(xyz.abs(), mask, (1, 2))[0] * 100
    z = torch.maximum(torch.minimum(xyz, clip), -clip)
    mean, std = _masked_moments(z, mask, (1, 2))
    z = (z - mean) / std.clamp(min=1e-8)
    out = torch.cat([z, x[..., c:]], dim=2)
    return out if mask is None else out.masked_fill(~mask[..., None], 0.0)


@dataclass
class Standardizer:
    """The same rule with statistics of a whole (training) split: clip, one scalar mean, one scalar std.

    Examples:
        >>> train_x = torch.arange(12.0).reshape(2, 2, 3)  # 2 clouds of 2 points in 3-D
        >>> st = Standardizer.fit(train_x)
        >>> st.mean, round(st.std, 3)
        (5.5, 3.452)
        >>> st(torch.tensor([[[5.5, 0.0, 11.0]]]))  # a test cloud, with the training statistics
        tensor([[[ 0.0000, -1.5933,  1.5933]]])
    """

    clip: float
    mean: float
    std: float
    spatial_dims: int | None = None

    @classmethod
    def fit(cls, x: Tensor, mask: Tensor | None = None, spatial_dims: int | None = None) -> Standardizer:
        """Statistics of ``x: (S, N, D)`` (real points only, first ``spatial_dims`` features)."""
        c = x.shape[2] if spatial_dims is None else spatial_dims
        xyz = x[..., :c].double()
        clip = float(_masked_moments(xyz.abs(), mask, (0, 1, 2))[0]) * 100
        mean, std = _masked_moments(xyz.clamp(-clip, clip), mask, (0, 1, 2))
        return cls(clip, float(mean), max(float(std), 1e-8), spatial_dims)

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Standardise ``x: (B, N, D)`` with the stored statistics."""
        c = x.shape[2] if self.spatial_dims is None else self.spatial_dims
        z = (x[..., :c].clamp(-self.clip, self.clip) - self.mean) / self.std
        out = torch.cat([z, x[..., c:]], dim=2)
        return out if mask is None else out.masked_fill(~mask[..., None], 0.0)


def augment(
    x: Tensor,
    generator: torch.Generator,
    spatial_dims: int = 3,
    max_angle: float = 0.1 * math.pi,
    scale: tuple[float, float] = (0.8, 1.25),
) -> Tensor:
    """The paper's training augmentation: rotate about z by ``U(-max_angle, max_angle)``, then scale
    each coordinate axis by ``U(*scale)``, independently per cloud.

    The rotation acts on features 0 and 1 (x, y), the scaling on the first ``spatial_dims`` features;
    any further features (intensities...) are left alone. Padded rows stay zero (a linear map).

    Args:
        x: ``(B, N, D)`` with ``D >= spatial_dims >= 2``.
        generator: the only source of randomness.
    """
    b = x.shape[0]
    theta = (torch.rand(b, 1, generator=generator) * 2 - 1) * max_angle
    s = scale[0] + torch.rand(b, 1, spatial_dims, generator=generator) * (scale[1] - scale[0])
    theta, s = theta.to(x.device, x.dtype), s.to(x.device, x.dtype)
    cos, sin = theta.cos(), theta.sin()
    px, py = x[..., 0], x[..., 1]
    rotated = torch.stack([cos * px - sin * py, sin * px + cos * py], dim=2)
    xyz = torch.cat([rotated, x[..., 2:spatial_dims]], dim=2) * s
    return torch.cat([xyz, x[..., spatial_dims:]], dim=2)
