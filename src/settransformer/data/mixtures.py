"""Synthetic mixtures of Gaussians for amortized clustering (paper section 5.3).

Each set is drawn from its own mixture: mixing weights ``pi ~ Dirichlet(1, ..., 1)`` (flat), means
``mu_k ~ U(-4, 4)^D``, one standard deviation ``sigma = 0.3`` for every component and dimension,
labels ``z_i ~ Categorical(pi)`` and points ``x_i ~ N(mu_{z_i}, sigma^2 I)``.

Training batches (:func:`sample_mog`) share one set size ``n`` across the batch, as the official
code does, so they need no mask; the size varies from batch to batch. The fixed test benchmark
(:func:`load_benchmark`) has a different ``n`` per set and is stored padded, with a mask.

Beyond the paper, ``vary_components=True`` draws the number of clusters of each set,
``K ~ U{1..num_components}``: the unused mixture slots get weight 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Generator, Tensor

from ..mixture import MixtureParams, log_likelihood

__all__ = ["MoGSample", "default_cache_dir", "load_benchmark", "sample_mog"]

BENCHMARK_VERSION = 1


@dataclass
class MoGSample:
    """A batch of sets drawn from Gaussian mixtures.

    Attributes:
        x: points ``(B, N, D)`` (zero at padding).
        labels: component of each point ``(B, N)`` int64 (-1 at padding).
        params: the true mixtures: ``log_pi: (B, K)`` (``-inf`` for unused slots), ``mu``,
            ``sigma: (B, K, D)``.
        num_clusters: clusters each set was drawn with ``(B,)`` int64.
        mask: ``(B, N)`` bool, or ``None`` when every set has all ``N`` points.
    """

    x: Tensor
    labels: Tensor
    params: MixtureParams
    num_clusters: Tensor
    mask: Tensor | None = None


def _flat_dirichlet(shape: tuple[int, int], active: Tensor, generator: Generator) -> Tensor:
    """Flat Dirichlet weights ``(B, K)`` over the first ``active[b]`` slots (zeros elsewhere).

    Normalised Exp(1) variables are flat-Dirichlet distributed; drawn from uniforms so that only
    ``generator`` is used (``torch.distributions`` cannot take one).
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    e = -torch.log1p(-u)  # Exp(1); 1 - u lies in (0, 1], so this is finite
    e = e * (torch.arange(shape[1])[None] < active[:, None])
    return (e / e.sum(dim=1, keepdim=True)).float()


def sample_mog(
    batch_size: int,
    num_points: int,
    generator: Generator,
    *,
    dim: int = 2,
    num_components: int = 4,
    sigma: float = 0.3,
    mean_range: float = 4.0,
    vary_components: bool = False,
) -> MoGSample:
    """Draw ``batch_size`` sets of ``num_points`` points, each from its own random mixture.

    Args:
        batch_size: number of sets ``B``.
        num_points: points per set ``N`` (shared by the batch: no mask needed).
        generator: the only source of randomness (repeatable runs).
        dim: dimension ``D`` of the points.
        num_components: ``K`` (``K_max`` when ``vary_components``).
        sigma: standard deviation of every component in every dimension.
        mean_range: means are uniform in ``[-mean_range, mean_range]^D``.
        vary_components: draw the number of clusters of each set uniformly in ``1..K``.

    Returns:
        A :class:`MoGSample` with ``x: (B, N, D)``, ``labels: (B, N)`` and the true parameters.

    Example:
        >>> s = sample_mog(10, 300, torch.Generator().manual_seed(0))
        >>> s.x.shape, s.labels.shape, s.params.mu.shape
        (torch.Size([10, 300, 2]), torch.Size([10, 300]), torch.Size([10, 4, 2]))
    """
    for name, value in [("batch_size", batch_size), ("dim", dim), ("num_components", num_components)]:
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if num_points < 0:
        raise ValueError(f"num_points: expected a non-negative integer, got {num_points}")
    if sigma <= 0 or mean_range <= 0:
        raise ValueError(f"sigma, mean_range: expected positive numbers, got {sigma}, {mean_range}")
    b, k = batch_size, num_components
    if vary_components:
        active = torch.randint(1, k + 1, (b,), generator=generator)
    else:
        active = torch.full((b,), k)
    pi = _flat_dirichlet((b, k), active, generator)
    mu = (2 * torch.rand(b, k, dim, generator=generator) - 1) * mean_range
    sig = torch.full((b, k, dim), float(sigma))
    if num_points > 0:
        labels = torch.multinomial(pi, num_points, replacement=True, generator=generator)
    else:
        labels = torch.zeros(b, 0, dtype=torch.long)
    centres = torch.gather(mu, 1, labels[..., None].expand(-1, -1, dim))
    x = centres + sigma * torch.randn(b, num_points, dim, generator=generator)
    return MoGSample(x, labels, MixtureParams(pi.log(), mu, sig), active)


def default_cache_dir() -> Path:
    """``$SETTRANSFORMER_CACHE`` if set, else ``~/.cache/settransformer``."""
    env = os.environ.get("SETTRANSFORMER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "settransformer"


def _generate_benchmark(config: dict[str, float | int | bool]) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(int(config["seed"]))
    num_sets, lo, hi = int(config["num_sets"]), int(config["min_size"]), int(config["max_size"])
    sizes = torch.randint(lo, hi + 1, (num_sets,), generator=g)
    # Points are i.i.d. given the mixture, so the first n_i of max-size draws are a draw of size n_i.
    s = sample_mog(
        num_sets,
        hi,
        g,
        dim=int(config["dim"]),
        num_components=int(config["num_components"]),
        sigma=float(config["sigma"]),
        mean_range=float(config["mean_range"]),
        vary_components=bool(config["vary_components"]),
    )
    mask = torch.arange(hi)[None] < sizes[:, None]
    x = s.x.masked_fill(~mask[..., None], 0.0)
    labels = s.labels.masked_fill(~mask, -1)
    ll = log_likelihood(x.double(), MixtureParams(*(t.double() for t in s.params)), mask)
    oracle = (ll.sum(1) / sizes).float()
    return {
        "x": x,
        "mask": mask,
        "labels": labels,
        "sizes": sizes,
        "log_pi": s.params.log_pi,
        "mu": s.params.mu,
        "sigma": s.params.sigma,
        "num_clusters": s.num_clusters,
        "oracle_ll": oracle,
    }


def load_benchmark(
    cache_dir: str | Path | None = None,
    *,
    num_sets: int = 1000,
    min_size: int = 100,
    max_size: int = 500,
    seed: int = 0,
    dim: int = 2,
    num_components: int = 4,
    sigma: float = 0.3,
    mean_range: float = 4.0,
    vary_components: bool = False,
) -> dict[str, Tensor]:
    """The fixed test sets: generated once from ``seed`` and cached as a ``.pt`` file.

    The file name hashes every setting, so a changed setting makes a new file. A cache directory
    that cannot be written only costs the re-generation (a warning, not an error).

    Returns:
        ``x: (S, N_max, D)``, ``mask: (S, N_max)``, ``labels: (S, N_max)`` (-1 at padding),
        ``sizes: (S,)``, the true ``log_pi: (S, K)``, ``mu``/``sigma: (S, K, D)``,
        ``num_clusters: (S,)`` and ``oracle_ll: (S,)``, the log-likelihood per point of each set
        under its true parameters (computed in float64).
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(
            f"min_size, max_size: expected 1 <= min_size <= max_size, got {min_size}, {max_size}"
        )
    if num_sets < 1:
        raise ValueError(f"num_sets: expected a positive integer, got {num_sets}")
    config: dict[str, float | int | bool] = {
        "version": BENCHMARK_VERSION,
        "num_sets": num_sets,
        "min_size": min_size,
        "max_size": max_size,
        "seed": seed,
        "dim": dim,
        "num_components": num_components,
        "sigma": float(sigma),
        "mean_range": float(mean_range),
        "vary_components": bool(vary_components),
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"mog-benchmark-{key}.pt"
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            if isinstance(data, dict) and "oracle_ll" in data:
                return data
        except Exception as err:  # a truncated or foreign file: regenerate
            warnings.warn(f"{path}: unreadable benchmark cache ({err}); regenerating", stacklevel=2)
    data = _generate_benchmark(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(data, tmp)
        tmp.replace(path)  # atomic, so concurrent runs never read half a file
    except OSError as err:
        warnings.warn(f"{path}: could not cache the MoG benchmark ({err}); using it uncached", stacklevel=2)
    return data
