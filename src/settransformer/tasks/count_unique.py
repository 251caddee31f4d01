"""Counting unique classes in a set of images (the paper's section 5.2, Table 2).

Each set holds ``n ~ U{min_size..max_size}`` images drawn from ``c ~ U{1..min(n, K)}`` distinct
classes, every chosen class appearing at least once (the paper: Omniglot characters, n in 6..10;
here by default scikit-learn's 8x8 digits, K = 10). Train and test sets are drawn from disjoint
images (a fixed split; ``split="classes"`` also makes the test classes unseen).

The model (image encoder per element, then a set model) outputs one number ``o``; the predicted
count is a Poisson distribution with rate ``softplus(o)``, trained by Poisson log-likelihood. A
prediction is a hit when the Poisson's mode equals the true count, as in the paper. The mode of a
Poisson with rate ``r`` is ``floor(r)``; when ``r`` is an integer, ``r`` and ``r - 1`` are both
modes and we take ``floor(r) = r`` (rates are continuous, so this has probability zero).

Rows (Table 2): ``sab-pma`` (SAB(64,4) x2 + PMA_1 + FC), ``rff-pool`` (FC(64) x4 + mean +
FC(64, ReLU) + FC), ``rff-pma`` and ``sab-pool``. Every row starts with the same per-image encoder
(``image_encoder="mlp"``, the default for 8x8 digits, or ``"cnn"``, the paper's conv stack).

Bring your own images with ``data=``: a folder of class folders (Omniglot:
``data=.../images_background``, ``class_depth=2``, ``image_size=28``) or an ``.npz``/``.h5`` file
with ``images`` and ``labels`` (see [`settransformer.data.images`][settransformer.data.images]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.models import SetTransformer
from .base import Batch
from .image_sets import ImageSetTask, save_figure

__all__ = ["CountUnique", "poisson_mode"]

# (encoder, pooling) of each Table 2 row; encoder depth follows the paper (rFF: FC x4, SAB x2).
_ROWS = {
    "sab-pma": ("attention", "pma"),
    "rff-pool": ("rff", "mean"),
    "rff-pma": ("rff", "pma"),
    "sab-pool": ("attention", "mean"),
}


def poisson_mode(rate: Tensor) -> Tensor:
    """The mode ``floor(rate)`` of a Poisson distribution (an integer rate gives the larger mode)."""
    return torch.floor(rate)


class CountUnique(ImageSetTask):
    """How many distinct classes are in this set of images? Metric: accuracy of the Poisson mode.

    Options:
        - data: the images: ``digits`` (scikit-learn's 8x8 digits, 10 classes), a folder of class folders,
            or a ``.npz``/``.h5`` file with ``images`` and ``labels`` (class labels, not attributes).
        - image_size: resize every image to this size, an int for a square or ``[height, width]``;
            ``null`` keeps the size (the images of a folder must then all have the same size).
        - class_depth: how many folder levels below ``data`` the class folders are (folders only; 2 for
            Omniglot's ``alphabet/character`` layout).
        - split: ``images``: disjoint train and test images of the same classes; ``classes``: whole
            classes are held out, so the test sets are drawn from unseen classes.
        - test_fraction: share of the images (of each class, ``split=images``) or of the classes
            (``split=classes``) held out for testing, between 0 and 1.
        - seed: seeds the fixed train/test split and the draw of the fixed test sets.
        - test_sets: number of fixed test sets the metrics are computed on.
        - image_encoder: the per-image network: ``mlp`` (Linear(256), BatchNorm, ReLU, Linear) or ``cnn``
            (the paper's stride-2 Conv(64, 3x3) + BatchNorm + ReLU blocks, then Linear).
        - dim_hidden: width of the image embeddings and of every layer of the set model (paper 64).
        - num_heads: attention heads of the SAB and PMA blocks; must divide ``dim_hidden`` (paper 4).
        - min_size: the smallest set: sizes are uniform over ``min_size..max_size`` images (paper 6).
        - max_size: set sizes go up to ``max_size`` images (paper 10); a set of ``n`` images holds
            ``1..min(n, K)`` distinct classes of the ``K`` available, uniformly.

    ``evaluate`` reports ``accuracy`` (the paper's rule), ``mae`` (mean
    |mode - count|), ``nll`` (Poisson negative log-likelihood per set) and ``accuracy_rounded``
    (``round(rate)`` equals the count; not the paper's metric) on ``test_sets`` fixed test sets. The
    likelihood's optimum for a sure count ``c`` is the rate ``c`` itself, exactly on the boundary between the
    modes ``c - 1`` and ``c``, so the paper's accuracy stays well below 1 even for a model that knows the
    answer; ``accuracy_rounded`` shows how often it does.

    Examples:
        >>> task = CountUnique(test_sets=64)
        >>> model = task.build_model("sab-pma")
        >>> batch = task.sample_batch(8, torch.Generator().manual_seed(0))
        >>> batch.x.shape, batch.target.shape  # 8 sets of up to 10 flattened 8x8 images, counts
        (torch.Size([8, 10, 64]), torch.Size([8]))
    """

    name: ClassVar[str] = "count-unique"
    model_names: ClassVar[tuple[str, ...]] = tuple(_ROWS)
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    paper_options: ClassVar[dict[str, Any]] = {"min_size": 6, "max_size": 10, "dim_hidden": 64}
    paper_data: ClassVar[str | None] = "Omniglot characters"
    paper: ClassVar[dict[str, dict[str, float]]] = {  # Omniglot, not digits
        "sab-pma": {"accuracy": 0.6037, "accuracy_std": 0.0072},
        "rff-pool": {"accuracy": 0.4366, "accuracy_std": 0.0071},
        "rff-pma": {"accuracy": 0.4617, "accuracy_std": 0.0073},
        "sab-pool": {"accuracy": 0.5659, "accuracy_std": 0.0067},
    }
    model_descriptions: ClassVar[dict[str, str]] = {
        "sab-pma": "SAB + PMA: image encoder, SAB(64,4)x2, PMA_1(64,4) (paper PMA_1(8,8)), FC(1)",
        "rff-pool": "rFF + Pooling: image encoder, FC(64,ReLU)x4, mean, FC(64,ReLU), FC(1)",
        "rff-pma": "rFF + PMA: image encoder, FC(64,ReLU)x4, PMA_1(64,4) (paper PMA_1(8,8)), FC(1)",
        "sab-pool": "SAB + Pooling: image encoder, SAB(64,4)x2, mean, FC(64,ReLU), FC(1)",
    }

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {**super().default_options(), "min_size": 6, "max_size": 10, "test_sets": 2000}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        lo, hi = self.options["min_size"], self.options["max_size"]
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"min_size, max_size: expected 1 <= min_size <= max_size, got {lo}, {hi}")

    def check_batch_size(self, batch_size: int) -> None:
        """The image encoder's BatchNorm needs two images per training step: a batch of one set of one
        image has one value per channel to normalise."""
        if batch_size * self.options["min_size"] < 2:
            raise ValueError(
                f"batch_size: {batch_size} set(s) per process of min_size={self.options['min_size']} "
                "image(s) can make a step of one image, which the image encoder's BatchNorm cannot "
                "normalise; use 2 or more sets per process, or min_size 2 or more"
            )

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """``quick``: 1,500 steps (the demo). ``paper``: 8,000 steps, lr 1e-3 then 1e-4 for the
        last quarter (the paper: 200,000 steps at 1e-4 on Omniglot)."""
        if name == "quick":
            return {"steps": 1500, "batch_size": 32, "lr": 1e-3, "eval_every": 500}
        if name == "paper":
            return {
                "steps": 8000,
                "batch_size": 32,
                "lr": 1e-3,
                "lr_milestones": [6000],
                "lr_gamma": 0.1,
                "eval_every": 2000,
            }
        raise ValueError(f"budget: expected 'quick' or 'paper', got {name!r}")

    def check_data(self, data: Any) -> None:
        if data.has_attributes:
            raise ValueError(f"data: {data.source}: count-unique needs class labels (M,), not attributes")

    def build_model(self, model_name: str) -> nn.Module:
        """Image encoder + the row's set model with one output (the Poisson rate before softplus)."""
        if model_name not in _ROWS:
            raise ValueError(f"model: expected one of {list(_ROWS)}, got {model_name!r}")
        encoder, pooling = _ROWS[model_name]
        dim = self.options["dim_hidden"]
        set_model = SetTransformer(
            dim,
            num_outputs=1,
            dim_output=1,
            dim_hidden=dim,
            num_heads=self.options["num_heads"],
            num_inducing=None,
            num_encoder_layers=2 if encoder == "attention" else 4,
            num_decoder_layers=0 if pooling == "pma" else 1,
            encoder=encoder,  # type: ignore[arg-type]
            pooling=pooling,  # type: ignore[arg-type]
        )
        return self.image_model(set_model)

    # -- data ---------------------------------------------------------------------------------
    def sample_sets(self, batch_size: int, generator: torch.Generator, split: str = "train") -> Batch:
        """``batch_size`` sets from ``split``'s images; vectorised.

        Returns a [`Batch`][settransformer.tasks.base.Batch] with ``x: (B, max_size, C*H*W)``,
        ``mask: (B, max_size)`` (real elements first, in random order), ``target: (B,)`` float counts and
        ``extra["index"]``: the image indices ``(B, max_size)`` into ``split``.
        """
        lo, hi = self.options["min_size"], self.options["max_size"]
        sampler = self.sampler(split)
        classes = sampler.nonempty  # (K,)
        k = len(classes)
        g = generator
        n = torch.randint(lo, hi + 1, (batch_size,), generator=g)
        c = 1 + (torch.rand(batch_size, generator=g) * torch.clamp(n, max=k)).long()  # U{1..min(n, K)}
        chosen = torch.rand(batch_size, k, generator=g).argsort(dim=1)[:, : min(k, hi)]  # c distinct classes
        # Slot j < c gets chosen class j (each class at least once); the rest pick among the c.
        pos = torch.arange(hi)
        slot = torch.where(
            pos < c[:, None], pos, (torch.rand(batch_size, hi, generator=g) * c[:, None]).long()
        ).clamp_max(min(k, hi) - 1)
        mask = pos < n[:, None]
        shuffle = torch.rand(batch_size, hi, generator=g).masked_fill(~mask, 2.0).argsort(dim=1)
        slot = slot.gather(1, shuffle)
        labels = classes[chosen.gather(1, slot)]
        index = sampler.sample(labels, g)
        x = self.gather_sets(index, mask, split)
        return Batch(x, mask, c.float(), {"index": index, "labels": labels})

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return self.sample_sets(batch_size, generator, "train")

    def test_batch(self) -> Batch:
        """The fixed test sets (``test_sets`` of them, seeded by ``seed``)."""
        if self._test_batch is None:
            self._test_batch = self.sample_sets(self.options["test_sets"], self.generator(1), "test")
        return self._test_batch

    # -- training and metrics -------------------------------------------------------------------
    @staticmethod
    def rate(model: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
        """Poisson rates ``(B,)`` of ``model`` for image sets ``x: (B, N, C*H*W)``."""
        return F.softplus(model(x, mask).reshape(x.shape[0]))

    @staticmethod
    def poisson_nll(rate: Tensor, count: Tensor) -> Tensor:
        """``-log Poisson(count | rate)`` per set, ``(B,)``."""
        return rate - count * torch.log(rate.clamp_min(1e-8)) + torch.lgamma(count + 1)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.poisson_nll(self.rate(model, batch.x, batch.mask), batch.target).mean()

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch, device: torch.device, chunk: int = 500) -> Tensor:
        """Rates ``(B,)`` (on CPU) for a batch, in chunks, in eval mode; restores the model's mode."""
        was_training = model.training
        model.eval()
        rates = []
        for s in range(0, len(batch), chunk):
            x = batch.x[s : s + chunk].to(device)
            m = None if batch.mask is None else batch.mask[s : s + chunk].to(device)
            rates.append(self.rate(model, x, m).float().cpu())
        model.train(was_training)
        return torch.cat(rates)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        batch = self.test_batch()
        rate = self.predict(model, batch, torch.device(device))
        mode = poisson_mode(rate)
        return {
            "accuracy": float((mode == batch.target).float().mean()),
            "accuracy_rounded": float((torch.round(rate) == batch.target).float().mean()),
            "mae": float((mode - batch.target).abs().mean()),
            "nll": float(self.poisson_nll(rate, batch.target).mean()),
        }

    # -- plots --------------------------------------------------------------------------------
    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``count_unique_examples.png`` (test sets with true and predicted counts) and
        ``count_unique_accuracy.png`` (accuracy by true count, by the mode and by the rounded rate)."""
        batch = self.test_batch()
        rate = self.predict(model, batch, torch.device(device))
        mode, count = poisson_mode(rate).numpy(), batch.target.numpy()
        # One example per true count where possible, so the figure spans easy and hard sets.
        picks = [int(np.flatnonzero(count == c)[0]) for c in np.unique(count)][:8]
        mask = batch.mask.numpy()  # type: ignore[union-attr]
        fig, axes = self.image_grid(batch.extra["index"].numpy()[picks], mask[picks])
        for row, i in enumerate(picks):
            hit = mode[i] == count[i]
            axes[row, 0].set_ylabel(
                f"true {count[i]:.0f}\npred {mode[i]:.0f}\n(rate {rate[i]:.2f})",
                rotation=0,
                ha="right",
                va="center",
                color="green" if hit else "red",
                fontsize=9,
            )
        fig.suptitle("Counting unique classes: test sets (green = correct)", fontsize=10)
        paths = [save_figure(fig, Path(out_dir) / "count_unique_examples.png")]

        import matplotlib.pyplot as plt

        values = np.unique(count)
        rounded = np.round(rate.numpy())
        acc = [float((mode[count == v] == v).mean()) for v in values]
        acc_rounded = [float((rounded[count == v] == v).mean()) for v in values]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.bar(values - 0.2, acc, width=0.4, color="tab:blue", label="Poisson mode (the paper's rule)")
        ax.bar(values + 0.2, acc_rounded, width=0.4, color="tab:gray", label="rounded rate")
        ax.set_xlabel("true number of classes")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_xticks(values)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
        overall, overall_rounded = float((mode == count).mean()), float((rounded == count).mean())
        ax.set_title(f"accuracy {overall:.3f} (rounded rate {overall_rounded:.3f})")
        paths.append(save_figure(fig, Path(out_dir) / "count_unique_accuracy.png"))
        return paths
