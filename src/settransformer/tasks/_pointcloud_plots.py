"""Figures of the point-cloud task: a confusion matrix and a grid of example clouds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .report import save_figure

__all__ = ["plot_confusion", "plot_examples"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(labels: np.ndarray, pred: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) of ``labels, pred: (S,)``."""
    plt = _pyplot()
    k = len(names)
    counts = np.zeros((k, k))
    np.add.at(counts, (labels, pred), 1)
    rates = counts / counts.sum(1, keepdims=True).clip(min=1)
    size = min(16.0, 2.5 + 0.32 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(k)
    ax.set_xticks(ticks, names, rotation=90, fontsize=7 if k > 20 else 9)
    ax.set_yticks(ticks, names, fontsize=7 if k > 20 else 9)
    if k <= 20:  # the numbers stay legible up to about 20 classes
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (accuracy {np.mean(labels == pred):.4f})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_examples(
    x: Tensor,
    mask: Tensor | None,
    labels: Tensor,
    pred: Tensor,
    names: Sequence[str],
    path: Path,
    spatial_dims: int = 3,
    count: int = 12,
) -> Path:
    """A grid of ``count`` test clouds ``x: (S, N, D)`` (spread over the classes, errors first) titled
    with the predicted and true class; 3-D scatter for 3 coordinates, else 2-D coloured by feature 3."""
    plt = _pyplot()
    labels_np, pred_np = labels.numpy(), pred.numpy()
    # one cloud per class while there are classes left, misclassified clouds preferred
    order = np.lexsort((np.arange(len(labels_np)), labels_np == pred_np))
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order:
        if int(labels_np[i]) not in seen:
            chosen.append(int(i))
            seen.add(int(labels_np[i]))
        if len(chosen) == count:
            break
    chosen += [int(i) for i in order if int(i) not in chosen][: count - len(chosen)]
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    three_d = spatial_dims >= 3 and x.shape[2] >= 3
    fig = plt.figure(figsize=(3.2 * cols, 3.2 * rows))
    for k, i in enumerate(chosen):
        pts = (x[i] if mask is None else x[i][mask[i]]).numpy()
        ok = labels_np[i] == pred_np[i]
        if three_d:
            ax = fig.add_subplot(rows, cols, k + 1, projection="3d")
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=2, c=pts[:, 2], cmap="viridis")
            # one scale on all axes, so a flat disc looks flat
            centre, half = (pts.max(0) + pts.min(0)) / 2, max(float(np.ptp(pts[:, :3], 0).max()) / 2, 1e-6)
            ax.set(
                xlim=centre[0] + [-half, half], ylim=centre[1] + [-half, half], zlim=centre[2] + [-half, half]
            )
            ax.set_zticks([])
        else:
            ax = fig.add_subplot(rows, cols, k + 1)
            colour = pts[:, 2] if pts.shape[1] > 2 else None
            ax.scatter(pts[:, 0], pts[:, 1], s=30, c=colour, cmap="Greys", vmin=0, edgecolors="none")
            ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"pred {names[pred_np[i]]}\ntrue {names[labels_np[i]]}", fontsize=9,
                     color="green" if ok else "red")  # fmt: skip
    return save_figure(fig, path)
