"""Figures for kernel regression: fitted curves over the noisy pairs, and attention heat maps."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .report import save_figure

__all__ = ["plot_kernel_regression"]


def plot_kernel_regression(
    grid: Tensor,
    truth: Tensor,
    pairs: Tensor,
    curves: dict[str, Tensor],
    heat: dict[str, Tensor],
    out_dir: Path,
    title: str,
) -> list[Path]:
    """The classic attention-pooling figure and the attention weights.

    Args:
        grid: query positions ``(Q,)``; truth: the true function on them ``(Q,)``.
        pairs: the noisy context pairs ``(N, 2)`` (x, y), sorted by x.
        curves: each model's predictions on the grid ``(Q,)``.
        heat: attention weights ``(Q, N)`` of the models that have them (keys in ``pairs`` order).
        out_dir: folder for ``kernel_regression_fit.png`` and ``kernel_regression_attention.png``
            (the second only when ``heat`` is not empty).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = grid.numpy()
    ax.plot(xs, truth.numpy(), color="black", lw=2, label="truth f(x)")
    ax.scatter(pairs[:, 0].numpy(), pairs[:, 1].numpy(), s=14, color="gray", alpha=0.7, label="noisy pairs")
    for name, curve in curves.items():
        ax.plot(xs, curve.numpy(), lw=1.5, label=name)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    paths = [save_figure(fig, out_dir / "kernel_regression_fit.png")]
    if heat:
        fig, axes = plt.subplots(1, len(heat), figsize=(4 * len(heat), 3.6), squeeze=False)
        for ax, (name, w) in zip(axes[0], heat.items()):
            im = ax.imshow(w.numpy(), aspect="auto", cmap="Reds", origin="lower")
            ax.set_title(name)
            ax.set_xlabel("keys (sorted by x)")
            ax.set_ylabel("queries (grid over x)")
            fig.colorbar(im, ax=ax)
        paths.append(save_figure(fig, out_dir / "kernel_regression_attention.png"))
    return paths
