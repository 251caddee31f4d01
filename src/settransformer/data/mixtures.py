"""Mixtures of Gaussians for amortized clustering (paper section 5.3): the data and the mixture math.

**The data.** Each set is drawn from its own mixture: mixing weights ``pi ~ Dirichlet(1, ..., 1)``
(flat), means ``mu_k ~ U(-4, 4)^D``, one standard deviation ``sigma = 0.3`` for every component and
dimension, labels ``z_i ~ Categorical(pi)`` and points ``x_i ~ N(mu_{z_i}, sigma^2 I)``. Training
batches ([`sample_mog`][settransformer.data.mixtures.sample_mog]) share one set size ``n`` across the batch,
as the official code does, so they need no mask; the size varies from batch to batch. The fixed test benchmark
([`load_benchmark`][settransformer.data.mixtures.load_benchmark]) has a different ``n`` per set and is stored
padded, with a mask. Beyond the paper, ``vary_components=True`` draws the number of clusters of each set,
``K ~ U{1..num_components}``: the unused mixture slots get weight 0.

**The math.** A network emits, per set, ``K`` vectors of ``1 + 2D`` numbers: the logit of the mixing
weight, the mean (``D``) and a raw scale (``D``) that goes through softplus
([`MixtureParams.from_output`][settransformer.data.mixtures.MixtureParams.from_output]). Each component has
its own scale *per dimension*; the official code's parser shares one scale across dimensions (its network
emits ``2D`` numbers per component while the parser reads ``1 + 2D``), which is not copied here. The
likelihoods, responsibilities and the EM step work on padded batches, ``x: (B, N, D)`` with ``mask: (B, N)``
(True = real point), and are vectorised over the batch: no Python loop over sets.

Examples:
    >>> s = sample_mog(3, 100, torch.Generator().manual_seed(0))  # 3 sets of 100 points in 2-D
    >>> out = torch.randn(3, 4, 1 + 2 * 2)          # a network's output: 4 components in 2-D
    >>> params = MixtureParams.from_output(out)
    >>> log_likelihood(s.x, params).shape           # per point
    torch.Size([3, 100])
    >>> em_step(s.x, params).mu.shape
    torch.Size([3, 4, 2])
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Generator, Tensor

from .files import atomic_write, default_cache_dir

__all__ = [
    "MIN_SIGMA",
    "MixtureParams",
    "MoGSample",
    "component_log_prob",
    "em_step",
    "hard_assignments",
    "load_benchmark",
    "log_likelihood",
    "mean_log_likelihood",
    "mixture_nll",
    "num_active_components",
    "responsibilities",
    "sample_mog",
]

BENCHMARK_VERSION = 2
"""Bumped when the benchmark's generation changes, so that old cache files are not reused."""
MIN_SIGMA = 1e-3
"""Floor on every standard deviation, so a component cannot collapse onto one point (infinite
likelihood). EM's M-step clamps to the same floor, which keeps it an exact (constrained) maximisation."""

_LOG_2PI = math.log(2 * math.pi)


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
        A [`MoGSample`][settransformer.data.mixtures.MoGSample] with ``x: (B, N, D)``, ``labels: (B, N)`` and
            the true parameters.

    Examples:
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


def _digest(data: dict[str, Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes: a cache whose values (e.g. the
    ``oracle_ll`` it reports) were edited no longer matches the digest stored beside them."""
    h = hashlib.sha256()
    for name in sorted(data):
        t = data[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


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

    The file name hashes every setting, so a changed setting makes a new file. The file stores a
    sha256 of its tensors: a cache that was edited (e.g. its ``oracle_ll``), truncated or damaged is
    regenerated (with a warning), never reported as is. A cache directory that cannot be written
    only costs the re-generation (a warning, not an error).

    Returns:
        ``x: (S, N_max, D)``, ``mask: (S, N_max)``, ``labels: (S, N_max)`` (-1 at padding),
            ``sizes: (S,)``, the true ``log_pi: (S, K)``, ``mu``/``sigma: (S, K, D)``,
            ``num_clusters: (S,)`` and ``oracle_ll: (S,)``, the log-likelihood per point of each set
            under its true parameters (computed in float64).

    Examples:
        >>> data = load_benchmark("cache", num_sets=8, min_size=10, max_size=20)  # written to cache/
        >>> data["x"].shape, data["mask"].shape, data["mu"].shape
        (torch.Size([8, 20, 2]), torch.Size([8, 20]), torch.Size([8, 4, 2]))
        >>> torch.equal(load_benchmark("cache", num_sets=8, min_size=10, max_size=20)["x"], data["x"])
        True
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
            stored = torch.load(path, weights_only=True)
            data = stored["data"]
            if stored["sha256"] == _digest(data):
                return data
            warnings.warn(
                f"{path}: benchmark cache edited or damaged (checksum mismatch); regenerating", stacklevel=2
            )
        except Exception as err:  # a truncated or foreign file: regenerate
            warnings.warn(
                f"{path}: unreadable benchmark cache ({str(err)[:200]}); regenerating", stacklevel=2
            )
    data = _generate_benchmark(config)
    stored = {"data": data, "sha256": _digest(data)}
    try:
        atomic_write(path, lambda f: torch.save(stored, f))  # concurrent runs never read half a file
    except OSError as err:
        warnings.warn(f"{path}: could not cache the MoG benchmark ({err}); using it uncached", stacklevel=2)
    return data


class MixtureParams(NamedTuple):
    """Parameters of a batch of diagonal Gaussian mixtures.

    Attributes:
        log_pi: log mixing weights ``(B, K)``; ``-inf`` marks an unused component.
        mu: means ``(B, K, D)``.
        sigma: standard deviations ``(B, K, D)``, positive.
    """

    log_pi: Tensor
    mu: Tensor
    sigma: Tensor

    @classmethod
    def from_output(cls, out: Tensor, min_sigma: float = MIN_SIGMA) -> MixtureParams:
        """Read a network output ``(B, K, 1 + 2D)`` as mixture parameters.

        ``out[..., 0]``: logit of pi (log-softmax over K); ``out[..., 1:1+D]``: mean;
        ``out[..., 1+D:]``: raw scale, ``sigma = softplus(raw) + min_sigma``.
        """
        if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[-1] < 3 or out.shape[-1] % 2 != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"out: expected a tensor of shape (B, K, 1 + 2D) with D >= 1, got {shape}")
        dim = (out.shape[-1] - 1) // 2
        log_pi = torch.log_softmax(out[..., 0], dim=-1)
        mu = out[..., 1 : 1 + dim]
        sigma = F.softplus(out[..., 1 + dim :]) + min_sigma
        return cls(log_pi, mu, sigma)

    @property
    def pi(self) -> Tensor:
        """Mixing weights ``(B, K)``."""
        return self.log_pi.exp()

    def to(self, device: torch.device | str) -> MixtureParams:
        """Move every tensor to ``device``."""
        return MixtureParams(*(t.to(device) for t in self))

    def detach(self) -> MixtureParams:
        """The same parameters without gradient history."""
        return MixtureParams(*(t.detach() for t in self))


def _check(x: Tensor, params: MixtureParams, mask: Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x: expected a tensor of shape (B, N, D), got {tuple(x.shape)}")
    b, _, d = x.shape
    if params.mu.dim() != 3 or params.mu.shape[0] != b or params.mu.shape[2] != d:
        raise ValueError(f"params.mu: expected shape ({b}, K, {d}) to match x, got {tuple(params.mu.shape)}")
    if params.sigma.shape != params.mu.shape or params.log_pi.shape != params.mu.shape[:2]:
        raise ValueError(
            f"params: expected log_pi (B, K) and sigma (B, K, D) matching mu {tuple(params.mu.shape)}, "
            f"got {tuple(params.log_pi.shape)} and {tuple(params.sigma.shape)}"
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
        raise ValueError(
            f"mask: expected a bool tensor of shape {tuple(x.shape[:2])}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )


def component_log_prob(x: Tensor, params: MixtureParams, mask: Tensor | None = None) -> Tensor:
    """Joint log-densities ``log pi_k + log N(x_i; mu_k, diag(sigma_k^2))``: ``(B, N, K)``.

    Args:
        x: points ``(B, N, D)``.
        params: the mixtures, ``K`` components each.
        mask: ``(B, N)``, True = real point; padded rows are zero-filled first so they stay finite.
    """
    _check(x, params, mask)
    if mask is not None:
        x = x.masked_fill(~mask[..., None], 0.0)
    log_pi, mu, sigma = params
    z = (x[:, :, None, :] - mu[:, None]) / sigma[:, None]  # (B, N, K, D)
    log_norm = -sigma.log().sum(-1) - 0.5 * mu.shape[-1] * _LOG_2PI  # (B, K)
    return log_pi[:, None] + log_norm[:, None] - 0.5 * z.square().sum(-1)


def log_likelihood(x: Tensor, params: MixtureParams, mask: Tensor | None = None) -> Tensor:
    """Log-likelihood of every point ``(B, N)``; zero at padded points."""
    ll = torch.logsumexp(component_log_prob(x, params, mask), dim=-1)
    return ll if mask is None else ll.masked_fill(~mask, 0.0)


def mean_log_likelihood(x: Tensor, params: MixtureParams, mask: Tensor | None = None) -> Tensor:
    """Log-likelihood per point of each set, averaged over its real points: ``(B,)``.

    An empty set gives 0.
    """
    ll = log_likelihood(x, params, mask)
    if mask is None:
        return ll.mean(dim=1)
    return ll.sum(dim=1) / mask.sum(dim=1).clamp_min(1).to(ll.dtype)


def mixture_nll(out: Tensor, x: Tensor, mask: Tensor | None = None, min_sigma: float = MIN_SIGMA) -> Tensor:
    """The training loss: negative log-likelihood per point, averaged over every real point of the batch.

    Args:
        out: network output ``(B, K, 1 + 2D)`` (see
            [`MixtureParams.from_output`][settransformer.data.mixtures.MixtureParams.from_output]).
        x: points ``(B, N, D)``.
        mask: ``(B, N)`` or ``None`` (all real).

    Returns:
        A scalar. When every set has the same size this is also the mean over sets of the per-set mean.
    """
    ll = log_likelihood(x, MixtureParams.from_output(out, min_sigma), mask)
    if mask is None:
        return -ll.mean()
    return -ll.sum() / mask.sum().clamp_min(1).to(ll.dtype)


def responsibilities(x: Tensor, params: MixtureParams, mask: Tensor | None = None) -> Tensor:
    """Posterior probability of each component for each point, ``(B, N, K)``; zero at padded points."""
    r = torch.softmax(component_log_prob(x, params, mask), dim=-1)
    return r if mask is None else r.masked_fill(~mask[..., None], 0.0)


def hard_assignments(x: Tensor, params: MixtureParams, mask: Tensor | None = None) -> Tensor:
    """Most probable component of each point (argmax responsibility), ``(B, N)`` int64; -1 at padding."""
    labels = component_log_prob(x, params, mask).argmax(dim=-1)
    return labels if mask is None else labels.masked_fill(~mask, -1)


def em_step(
    x: Tensor, params: MixtureParams, mask: Tensor | None = None, min_sigma: float = MIN_SIGMA
) -> MixtureParams:
    """One expectation-maximisation step for diagonal Gaussian mixtures, all sets at once.

    E-step: responsibilities under ``params``; M-step: weights, means and per-dimension variances
    that maximise the expected complete-data log-likelihood. The likelihood of ``x`` never decreases.
    A component that receives (numerically) no responsibility keeps its mean and scale and gets
    weight zero (``log_pi = -inf``); variances are floored at ``min_sigma ** 2``.

    Shapes: ``x: (B, N, D)``, ``mask: (B, N)`` -> parameters with ``(B, K)``, ``(B, K, D)``, ``(B, K, D)``.
    """
    r = responsibilities(x, params, mask)  # (B, N, K), zero at padding
    if mask is not None:
        x = x.masked_fill(~mask[..., None], 0.0)
    n_k = r.sum(dim=1)  # (B, K)
    n = n_k.sum(dim=1, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    # log(0) = -inf is the exact weight of an empty component and logsumexp handles it.
    log_pi = n_k.log() - n.clamp_min(tiny).log()
    alive = n_k > 1e-10 * n.clamp_min(1.0)
    denom = n_k.clamp_min(tiny)[..., None]
    mu = torch.einsum("bnk,bnd->bkd", r, x) / denom
    var = torch.einsum("bnk,bnkd->bkd", r, (x[:, :, None] - mu[:, None]).square()) / denom
    sigma = var.clamp_min(min_sigma**2).sqrt()
    keep = ~alive[..., None]
    mu = torch.where(keep, params.mu, mu)
    sigma = torch.where(keep, params.sigma, sigma)
    return MixtureParams(log_pi, mu, sigma)


def num_active_components(params: MixtureParams, threshold: float, separation: float = 0.0) -> Tensor:
    """Number of clusters read off a mixture that always has ``K_max`` components: ``(B,)`` int64.

    Components with weight ``pi_k <= threshold`` are dropped. With ``separation > 0``, components
    whose means are closer than ``separation`` scales apart, ``||(mu_i - mu_j) / ((sigma_i +
    sigma_j) / 2)|| < separation``, count as one cluster (and so does any chain of them). The
    likelihood gives no reason to empty a spare component: splitting one cluster over two
    coinciding components costs nothing, so thresholding the weights alone overcounts;
    ``separation=2`` is where a two-Gaussian mixture stops being unimodal.
    """
    keep = params.log_pi.exp() > threshold  # (B, K)
    if separation <= 0:
        return keep.sum(dim=-1)
    k = keep.shape[-1]
    scale = (params.sigma[:, :, None] + params.sigma[:, None]) / 2
    dist = ((params.mu[:, :, None] - params.mu[:, None]) / scale).norm(dim=-1)  # (B, K, K)
    reach = (dist < separation) & keep[:, :, None] & keep[:, None]
    reach = reach | torch.eye(k, dtype=torch.bool, device=reach.device)
    for _ in range(max(k - 1, 0).bit_length()):  # transitive closure by repeated squaring
        reach = (reach.float() @ reach.float()) > 0
    earlier = torch.ones(k, k, dtype=torch.bool, device=reach.device).triu(1)  # earlier[j, k]: j < k
    first_of_group = keep & ~(reach & earlier).any(dim=1)
    return first_of_group.sum(dim=-1)
