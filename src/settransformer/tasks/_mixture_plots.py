"""Figures for the clustering tasks: sets coloured by assigned component, with component ellipses."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..mixture import MixtureParams, hard_assignments

__all__ = ["plot_mixture_grid"]


def plot_mixture_grid(
    x: Tensor,
    mask: Tensor,
    params: MixtureParams,
    path: Path,
    *,
    titles: list[str] | None = None,
    assignments: Tensor | None = None,
) -> Path:
    """Save a grid of sets as a PNG: points coloured by their most probable component, and
    ellipses at 1, 2 and 3 standard deviations of each component with weight above 1%.

    Args:
        x: ``(S, N, D)`` points (only the first two dimensions are drawn; D = 1 draws a histogram
            and the component densities instead).
        mask: ``(S, N)``; params: ``S`` mixtures of ``K`` components.
        path: the PNG to write. titles: one per set.
        assignments: ``(S, N)`` colours of the points; default: argmax responsibility under ``params``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    s, dim = x.shape[0], x.shape[-1]
    cols = min(3, s)
    rows = -(-s // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    pred = hard_assignments(x, params, mask) if assignments is None else assignments
    colours = plt.get_cmap("tab10")
    for i, ax in enumerate(axes.flat):
        if i >= s:
            ax.axis("off")
            continue
        pts, lab = x[i][mask[i]].numpy(), pred[i][mask[i]].numpy()
        pi, mu, sig = params.pi[i].numpy(), params.mu[i].numpy(), params.sigma[i].numpy()
        if dim == 1:
            grid = torch.linspace(float(pts.min()) - 1, float(pts.max()) + 1, 400)
            ax.hist(pts[:, 0], bins=40, density=True, color="0.8")
            for k in range(len(pi)):
                dens = (
                    pi[k] * torch.distributions.Normal(float(mu[k, 0]), float(sig[k, 0])).log_prob(grid).exp()
                )
                ax.plot(grid.numpy(), dens.numpy(), color=colours(k % 10))
        else:
            ax.scatter(pts[:, 0], pts[:, 1], c=[colours(int(k) % 10) for k in lab], s=6, alpha=0.7)
            for k in range(len(pi)):
                if pi[k] < 0.01:
                    continue
                for n_sd in (1, 2, 3):
                    ax.add_patch(
                        Ellipse(
                            (float(mu[k, 0]), float(mu[k, 1])),
                            2 * n_sd * float(sig[k, 0]),
                            2 * n_sd * float(sig[k, 1]),
                            fill=False,
                            color=colours(k % 10),
                            lw=1.2 / n_sd,
                        )
                    )
            ax.set_aspect("equal", adjustable="datalim")
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
