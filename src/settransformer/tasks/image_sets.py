"""Shared pieces of the image-set tasks ([`count_unique`][settransformer.tasks.count_unique],
[`set_anomaly`][settransformer.tasks.set_anomaly]).

- [`ImageEncoder`][settransformer.tasks.image_sets.ImageEncoder]: the per-element image network (an MLP, or a
  small CNN as in the paper).
- [`ImageSetModel`][settransformer.tasks.image_sets.ImageSetModel]: that encoder applied to every real element
  of a padded batch of image sets, followed by any set model ``(B, N, D), mask -> ...``.
- [`ImageSetTask`][settransformer.tasks.image_sets.ImageSetTask]: options, data loading, the fixed train/test
  split, pixel normalisation and image-grid plotting common to both tasks.

Sets of images travel as flattened pixels ``x: (B, N, C*H*W)`` so that they fit the library's
``(B, N, D)`` convention; the encoder reshapes them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..data.image_samplers import ClassSampler
from ..data.images import ImageData, load_images
from .base import Task
from .report import save_figure

__all__ = ["ImageEncoder", "ImageSetModel", "ImageSetTask", "save_figure"]


class ImageEncoder(nn.Module):
    """One image to one vector.

    ``kind="mlp"``: flatten, Linear(C*H*W, 256), BatchNorm, ReLU, Linear(256, dim). ``kind="cnn"``:
    the paper's Conv(64, 3x3, stride 2) + BatchNorm + ReLU blocks (as many as halve the image down
    to about 1-2 pixels, at most 4), flatten, Linear(dim). BatchNorm keeps the differences between
    images at unit scale; without it the rFF baselines barely move off a constant score.

    Shapes: ``x: (M, C*H*W)`` or ``(M, C, H, W)`` -> ``(M, dim)``.

    Examples:
        >>> ImageEncoder((1, 8, 8), 64, "cnn")(torch.rand(5, 64)).shape
        torch.Size([5, 64])
    """

    def __init__(self, image_shape: tuple[int, int, int], dim: int, kind: str = "mlp") -> None:
        super().__init__()
        if kind not in ("mlp", "cnn"):
            raise ValueError(f"image_encoder: expected 'mlp' or 'cnn', got {kind!r}")
        self.image_shape = tuple(int(s) for s in image_shape)
        c, h, w = self.image_shape
        if kind == "mlp":
            self.net: nn.Module = nn.Sequential(
                nn.Flatten(), nn.Linear(c * h * w, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, dim)
            )
        else:
            layers: list[nn.Module] = []
            for i in range(min(4, max(1, math.ceil(math.log2(max(h, w)))))):
                layers += [nn.Conv2d(c if i == 0 else 64, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU()]
                h, w = (h + 1) // 2, (w + 1) // 2
            self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * h * w, dim))
        self.kind, self.dim = kind, dim

    def forward(self, x: Tensor) -> Tensor:
        """``x: (M, C*H*W)`` or ``(M, C, H, W)`` -> ``(M, dim)``."""
        return self.net(x.reshape(x.shape[0], *self.image_shape))


class ImageSetModel(nn.Module):
    """Normalise and encode each image of a padded set batch, then apply a set model.

    The pixels are normalised by ``(x - pixel_mean) / pixel_std`` (the training images' statistics,
    buffers that are recomputed from the data when a run is rebuilt, so a model takes raw pixels).
    Only real elements go through the image encoder, so padding never reaches BatchNorm statistics;
    padded rows of the embeddings are zero.

    Shapes: ``x: (B, N, C*H*W)``, ``mask: (B, N)`` -> whatever ``set_model((B, N, dim), mask)`` returns.

    Examples:
        >>> from settransformer import DeepSets
        >>> model = ImageSetModel(ImageEncoder((1, 8, 8), 16), DeepSets(16, 1, 1, dim_hidden=16))
        >>> model(torch.rand(3, 5, 64), torch.rand(3, 5) > 0.3).shape
        torch.Size([3, 1, 1])
    """

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self, encoder: ImageEncoder, set_model: nn.Module, pixel_mean: float = 0.0, pixel_std: float = 1.0
    ) -> None:
        super().__init__()
        self.encoder, self.set_model = encoder, set_model
        self.register_buffer("pixel_mean", torch.tensor(float(pixel_mean)), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(float(pixel_std)), persistent=False)

    def _encode(self, x: Tensor) -> Tensor:
        return self.encoder((x - self.pixel_mean) / self.pixel_std)

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, C*H*W)``, ``mask: (B, N)`` -> ``(B, N, dim)``, zero at padded rows."""
        if x.dim() != 3:
            raise ValueError(f"x: expected image sets of shape (B, N, C*H*W), got {tuple(x.shape)}")
        b, n = x.shape[:2]
        if mask is None:
            return self._encode(x.reshape(b * n, -1)).view(b, n, -1)
        if mask.shape != (b, n) or mask.dtype != torch.bool:
            got = f"{mask.dtype} {tuple(mask.shape)}"
            raise ValueError(f"mask: expected a bool tensor of shape ({b}, {n}), got {got}")
        z = self._encode(x[mask])
        return z.new_zeros(b, n, z.shape[-1]).masked_scatter(mask[..., None], z)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (B, N, C*H*W)``, ``mask: (B, N)`` -> ``set_model(embed(x, mask), mask)``."""
        return self.set_model(self.embed(x, mask), mask)


class ImageSetTask(Task):
    """A task whose sets are images from a labelled collection (see
    [`settransformer.data.images`][settransformer.data.images]).

    Common options: ``data`` (``"digits"``, a folder of class subfolders, or a ``.npz``/``.h5``
    file), ``image_size`` (resize; ``None`` keeps the size), ``class_depth`` (folders: 2 for
    Omniglot's ``alphabet/character`` layout), ``split`` (``"images"``: disjoint
    images of the same classes; ``"classes"``: unseen classes at test time), ``test_fraction``,
    ``seed`` (the split and the fixed test sets), ``test_sets``, ``image_encoder`` (``"mlp"`` or
    ``"cnn"``), ``dim_hidden`` and ``num_heads``.
    """

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "data": "digits",
            "image_size": None,
            "class_depth": 1,
            "split": "images",
            "test_fraction": 0.3,
            "seed": 0,
            "test_sets": 1000,
            "image_encoder": "mlp",
            "dim_hidden": 64,
            "num_heads": 4,
        }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["image_encoder"] not in ("mlp", "cnn"):
            raise ValueError(f"image_encoder: expected 'mlp' or 'cnn', got {o['image_encoder']!r}")
        if o["split"] not in ("images", "classes"):
            raise ValueError(f"split: expected 'images' or 'classes', got {o['split']!r}")
        for key in ("test_sets", "dim_hidden", "num_heads"):
            if not isinstance(o[key], int) or o[key] < 1:
                raise ValueError(f"{key}: expected a positive integer, got {o[key]!r}")
        if o["dim_hidden"] % o["num_heads"]:
            raise ValueError(f"num_heads: must divide dim_hidden={o['dim_hidden']}, got {o['num_heads']}")
        data = str(o["data"])
        if data != "digits" and not Path(data).exists():
            raise ValueError(f"data: expected 'digits', a folder or a .npz/.h5 file; {data!r} does not exist")
        self._splits: tuple[ImageData, ImageData] | None = None
        self._samplers: dict[str, ClassSampler] = {}
        self._test_batch: Any = None

    # -- data ---------------------------------------------------------------------------------
    def splits(self) -> tuple[ImageData, ImageData]:
        """The fixed ``(train, test)`` split, loaded on first use."""
        if self._splits is None:
            o = self.options
            data = load_images(o["data"], o["image_size"], o["class_depth"])
            self.check_data(data)
            by: Literal["images", "classes"] = "images" if data.has_attributes else o["split"]
            self._splits = data.split(o["test_fraction"], o["seed"], by=by)
            train_pixels = torch.from_numpy(self._splits[0].images)
            self.pixel_mean = float(train_pixels.mean())
            self.pixel_std = float(train_pixels.std().clamp_min(1e-6))
        return self._splits

    def check_data(self, data: ImageData) -> None:
        """Reject data the task cannot use (override); raise ``ValueError`` naming ``data.source``."""

    def part(self, split: str) -> ImageData:
        """``"train"`` or ``"test"`` images."""
        train, test = self.splits()
        return train if split == "train" else test

    def pixels(self, split: str, index: Tensor) -> Tensor:
        """Raw flattened images of ``split`` at ``index`` (any shape): ``(*index.shape, C*H*W)``; the
        model normalises them ([`ImageSetModel`][settransformer.tasks.image_sets.ImageSetModel])."""
        images = torch.from_numpy(self.part(split).images).flatten(1)  # a view, no copy
        return images[index]

    def sampler(self, split: str) -> ClassSampler:
        """A [`ClassSampler`][settransformer.data.image_samplers.ClassSampler] over ``split``'s class
        labels."""
        if split not in self._samplers:
            part = self.part(split)
            self._samplers[split] = ClassSampler(part.labels, part.num_classes)
        return self._samplers[split]

    def gather_sets(self, index: Tensor, mask: Tensor, split: str) -> Tensor:
        """Image sets ``(B, N, C*H*W)`` from image indices ``index: (B, N)``, zero where ``mask`` is False."""
        return self.pixels(split, index).masked_fill(~mask[..., None], 0.0)

    def image_encoder(self) -> ImageEncoder:
        """A fresh per-element encoder producing ``dim_hidden`` features."""
        o = self.options
        return ImageEncoder(self.part("train").image_shape, o["dim_hidden"], o["image_encoder"])

    def image_model(self, set_model: nn.Module) -> ImageSetModel:
        """A fresh image encoder + ``set_model``, normalising pixels by the training images' statistics."""
        encoder = self.image_encoder()  # loads the split, hence the statistics
        return ImageSetModel(encoder, set_model, self.pixel_mean, self.pixel_std)

    def test_inputs(self) -> tuple[list[Tensor], Tensor]:
        """The fixed test sets as raw flattened pixels ``(N_i, C*H*W)`` and their targets ``(S,)``."""
        batch = self.test_batch()
        sets = [batch.x[i] if batch.mask is None else batch.x[i][batch.mask[i]] for i in range(len(batch))]
        return sets, batch.target

    def test_batch(self) -> Any:
        """The fixed test sets (a [`Batch`][settransformer.tasks.base.Batch])."""
        raise NotImplementedError

    def generator(self, offset: int) -> torch.Generator:
        """A generator seeded from the ``seed`` option (``offset`` separates uses)."""
        return torch.Generator().manual_seed(int(self.options["seed"]) * 1000 + offset)

    # -- plots --------------------------------------------------------------------------------
    def image_grid(self, index: np.ndarray, mask: np.ndarray, split: str = "test") -> Any:
        """A figure with one row per set of images (``index``, ``mask``: ``(R, N)``); returns (fig, axes)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        images = self.part(split).images
        rows, cols = index.shape
        fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 2.2, 1.15 * rows + 0.4), squeeze=False)
        for r in range(rows):
            for c in range(cols):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if mask[r, c]:
                    img = images[index[r, c]]
                    img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
                    ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
                else:
                    ax.axis("off")
        return fig, axes
