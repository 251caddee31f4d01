"""Diagonal Gaussian mixtures for amortized clustering (paper section 5.3).

A network emits, per set, ``K`` vectors of ``1 + 2D`` numbers: the logit of the mixing weight, the
mean (``D``) and a raw scale (``D``) that goes through softplus. Each component has its own scale
*per dimension*; the official code's parser shares one scale across dimensions (its network emits
``2D`` numbers per component while the parser reads ``1 + 2D``), which is not copied here.

Everything works on padded batches, ``x: (B, N, D)`` with ``mask: (B, N)`` (True = real point), and is
vectorised over the batch: no Python loop over sets.

Example:
    >>> out = torch.randn(3, 4, 1 + 2 * 2)          # network output, 4 components in 2-D
    >>> params = MixtureParams.from_output(out)
    >>> x = torch.randn(3, 100, 2)
    >>> log_likelihood(x, params).shape               # per point
    torch.Size([3, 100])
    >>> em_step(x, params).mu.shape
    torch.Size([3, 4, 2])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MIN_SIGMA",
    "MixtureParams",
    "component_log_prob",
    "em_step",
    "hard_assignments",
    "log_likelihood",
    "mean_log_likelihood",
    "mixture_nll",
    "num_active_components",
    "responsibilities",
]

MIN_SIGMA = 1e-3
"""Floor on every standard deviation, so a component cannot collapse onto one point (infinite
likelihood). EM's M-step clamps to the same floor, which keeps it an exact (constrained) maximisation."""

_LOG_2PI = math.log(2 * math.pi)


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
        out: network output ``(B, K, 1 + 2D)`` (see :meth:`MixtureParams.from_output`).
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
