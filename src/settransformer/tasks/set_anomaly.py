"""Set anomaly detection (the paper's section 5.4, Table 5): find the image that does not belong.

Each set holds ``set_size`` images (paper: 8): all but one share a property and one does not.

- Class labels (digits, Omniglot, any folder): the normal images come from ``normal_classes``
  random classes, each of them at least twice, and the odd one from another class. With the
  default ``normal_classes=2`` the shared property is "belongs to one of this set's two classes",
  which is not a class on its own: the model has to find the only class that appears once.
  ``normal_classes=1`` is the easy "7 of one class and 1 of another".
- Attribute labels ``(M, A)`` (e.g. CelebA's 40 attributes in an ``.npz``/``.h5`` file): the
  paper's rule, all but one image have both of two random attributes and the odd one has neither.

The model scores every element (permutation *equivariant*, ``(B, N)``) and the anomaly is the
highest score. Training minimises the cross-entropy of a softmax over each set's elements (exactly
one element is odd, so this is a categorical choice); padded elements get a score of ``-inf`` and
are never chosen. Metrics over all real test elements, using each element's softmax probability
as its score: ``auroc``, ``aupr`` (average precision), plus ``accuracy`` (top-1: the highest
score is the odd one). Chance: AUROC 0.5, AUPR 1/set_size, accuracy 1/set_size.

Rows (Table 5): ``sab-pma`` (SAB(64,4) x2 + PMA_4 summary + MAB from each element to the
summary + FC(1)), ``sab-pool`` (SAB x2, mean summary concatenated to each element, FC(64,ReLU),
FC(1)), ``rff-pma`` and ``rff-pool`` (rFF: FC(64,ReLU) x4 instead of the SABs). Every row starts
with the same per-image encoder (``image_encoder="mlp"`` or ``"cnn"``).

Bring your own images with ``data=``: CelebA as an ``.npz``/``.h5`` file with ``images`` (M, H, W, 3)
and ``labels`` (M, 40) (0/1 or -1/1), e.g. ``image_size=32``, ``image_encoder=cnn``,
``num_layers=4`` for the paper's setting; or any folder of class folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.image_samplers import AttributePairSampler
from ..nn.blocks import PMA, SAB
from ..nn.mab import MAB
from ..nn.sets import masked_pool
from ..nn.validation import zero_padding
from .base import Batch
from .image_sets import ImageSetTask, save_figure

__all__ = ["ElementScorer", "SetAnomaly"]

_ROWS = {
    "sab-pma": ("attention", "pma"),
    "sab-pool": ("attention", "mean"),
    "rff-pma": ("rff", "pma"),
    "rff-pool": ("rff", "mean"),
}


class ElementScorer(nn.Module):
    """One score per element, permutation equivariant: ``z: (B, N, dim)``, ``mask`` -> ``(B, N)``.

    ``encoder="attention"``: ``num_layers`` SABs; ``"rff"``: ``2 * num_layers`` x (Linear, ReLU),
    row-wise. ``decoder="pma"``: a
    ``PMA_num_seeds`` summary of the set, then ``MAB(element, summary)`` and a linear score;
    ``"mean"``: the masked mean of the set concatenated to each element, then FC(dim, ReLU) and a
    linear score. Padded elements score ``-inf``.

    Examples:
        >>> scorer = ElementScorer(16, 4, "attention", "pma")
        >>> scorer(torch.randn(2, 8, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        encoder: str = "attention",
        decoder: str = "pma",
        *,
        num_layers: int = 2,
        num_seeds: int = 4,
    ) -> None:
        super().__init__()
        if encoder not in ("attention", "rff") or decoder not in ("pma", "mean"):
            raise ValueError(
                f"encoder, decoder: expected attention|rff and pma|mean, got {encoder}, {decoder}"
            )
        self.dim, self.encoder_kind, self.decoder_kind = dim, encoder, decoder
        if encoder == "attention":
            self.encoder = nn.ModuleList(SAB(dim, dim, num_heads) for _ in range(num_layers))
        else:
            self.encoder = nn.ModuleList(
                nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(2 * num_layers)
            )
        if decoder == "pma":
            self.pma: PMA | None = PMA(dim, num_heads, num_seeds)
            self.mab: nn.Module = MAB(dim, dim, dim, num_heads)
        else:
            self.pma = None
            self.mab = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())
        self.head = nn.Linear(dim, 1)

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """``z: (B, N, dim)``, ``mask: (B, N)`` -> scores ``(B, N)``, ``-inf`` at padded elements."""
        h = zero_padding(z, mask)
        for layer in self.encoder:
            h = layer(h, mask) if isinstance(layer, SAB) else zero_padding(layer(h), mask)
        if self.pma is not None:
            y = self.mab(h, self.pma(h, mask))  # each element attends to the set's summary
        else:
            pooled = masked_pool(h, mask, "mean")[:, None].expand_as(h)
            y = self.mab(torch.cat([h, pooled], dim=-1))
        scores = self.head(y).squeeze(-1).float()
        return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


class SetAnomaly(ImageSetTask):
    """Which image of the set is the odd one? Metric: AUROC over elements.

    Options:
        - data: the images: ``digits`` (scikit-learn's 8x8 digits, 10 classes), a folder of class folders,
            or a ``.npz``/``.h5`` file with ``images`` and ``labels``: class ids ``(M,)`` or attributes
            ``(M, A)`` such as CelebA's 40 (0/1 or -1/1).
        - image_size: resize every image to this size, an int for a square or ``[height, width]``;
            ``null`` keeps the size (the images of a folder must then all have the same size).
        - class_depth: how many folder levels below ``data`` the class folders are (folders only; 2 for
            Omniglot's ``alphabet/character`` layout).
        - split: ``images``: disjoint train and test images of the same classes; ``classes``: whole
            classes are held out, so the test sets are drawn from unseen classes (attribute labels
            always split by images).
        - test_fraction: share of the images (of each class, ``split=images``) or of the classes
            (``split=classes``) held out for testing, between 0 and 1.
        - seed: seeds the fixed train/test split and the draw of the fixed test sets.
        - test_sets: number of fixed test sets the metrics (AUROC, AUPR, accuracy) are computed on.
        - image_encoder: the per-image network: ``mlp`` (Linear(256), BatchNorm, ReLU, Linear) or ``cnn``
            (the paper's stride-2 Conv(64, 3x3) + BatchNorm + ReLU blocks, then Linear).
        - dim_hidden: width of the image embeddings and of every layer of the scorer (paper 128).
        - num_heads: attention heads of the SAB, PMA and MAB blocks; must divide ``dim_hidden`` (paper 4).
        - set_size: images per set, the odd one included (paper 8); the largest set when ``min_size`` is
            given.
        - min_size: ``null``: every set has ``set_size`` images; a number: sizes are uniform over
            ``min_size..set_size`` and batches are padded; at least ``2 * normal_classes + 1``.
        - normal_classes: class labels only: how many classes the normal images come from, each at least
            twice (1: all but one image of one class; 2: the odd one is the only class that appears once).
        - num_layers: encoder depth: ``num_layers`` SABs (``sab-*`` rows) or ``2 * num_layers``
            FC(dim_hidden, ReLU) layers (``rff-*`` rows) (paper 4).
        - num_seeds: seed vectors of the PMA summary of the ``*-pma`` rows (paper 4).

    Examples:
        >>> task = SetAnomaly(test_sets=64)
        >>> batch = task.sample_batch(4, torch.Generator().manual_seed(0))
        >>> batch.x.shape, batch.target  # 4 sets of 8 flattened 8x8 images; the odd one's position
        (torch.Size([4, 8, 64]), tensor([3, 0, 1, 2]))
    """

    name: ClassVar[str] = "set-anomaly"
    model_names: ClassVar[tuple[str, ...]] = tuple(_ROWS)
    metric: ClassVar[str] = "auroc"
    higher_is_better: ClassVar[bool] = True
    paper_options: ClassVar[dict[str, Any]] = {"set_size": 8}
    paper_data: ClassVar[str | None] = "CelebA faces"
    paper: ClassVar[dict[str, dict[str, float]]] = {  # CelebA, not digits
        "sab-pma": {"auroc": 0.5941, "auroc_std": 0.0170, "aupr": 0.4386, "aupr_std": 0.0089},
        "sab-pool": {"auroc": 0.5757, "auroc_std": 0.0143, "aupr": 0.4189, "aupr_std": 0.0167},
        "rff-pma": {"auroc": 0.5756, "auroc_std": 0.0130, "aupr": 0.4227, "aupr_std": 0.0127},
        "rff-pool": {"auroc": 0.5643, "auroc_std": 0.0139, "aupr": 0.4126, "aupr_std": 0.0108},
    }
    model_descriptions: ClassVar[dict[str, str]] = {
        "sab-pma": "SAB + PMA: image encoder, SAB(64,4)x2, PMA_4 summary, MAB(element, summary), FC(1)",
        "sab-pool": "SAB + Pooling: image encoder, SAB(64,4)x2, [element, mean], FC(64,ReLU), FC(1)",
        "rff-pma": "rFF + PMA: image encoder, FC(64,ReLU)x4, PMA_4 summary, MAB(element, summary), FC(1)",
        "rff-pool": "rFF + Pooling: image encoder, FC(64,ReLU)x4, [element, mean], FC(64,ReLU), FC(1)",
    }

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            **super().default_options(),
            "set_size": 8,
            "min_size": None,
            "normal_classes": 2,
            "num_layers": 2,
            "num_seeds": 4,
        }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        for key in ("set_size", "normal_classes", "num_layers", "num_seeds"):
            if not isinstance(o[key], int) or o[key] < 1:
                raise ValueError(f"{key}: expected a positive integer, got {o[key]!r}")
        lo = o["set_size"] if o["min_size"] is None else o["min_size"]
        if not (isinstance(lo, int) and 2 * o["normal_classes"] + 1 <= lo <= o["set_size"]):
            raise ValueError(
                f"min_size: expected 2 * normal_classes + 1 = {2 * o['normal_classes'] + 1} <= min_size <= "
                f"set_size = {o['set_size']} (every normal class appears twice, plus the odd one), got {lo!r}"
            )
        self._pair_samplers: dict[str, AttributePairSampler] = {}

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """``quick``: 1,000 steps (the demo). ``paper``: 5,000 steps, lr 1e-3 then 1e-4 for the last
        fifth (the paper: 1,000 iterations at 1e-4 on 800 CelebA sets)."""
        if name == "quick":
            return {"steps": 1000, "batch_size": 32, "lr": 1e-3, "eval_every": 500}
        if name == "paper":
            return {
                "steps": 5000,
                "batch_size": 32,
                "lr": 1e-3,
                "lr_milestones": [4000],
                "lr_gamma": 0.1,
                "eval_every": 1000,
            }
        raise ValueError(f"budget: expected 'quick' or 'paper', got {name!r}")

    def check_data(self, data: Any) -> None:
        if not data.has_attributes and data.num_classes < self.options["normal_classes"] + 1:
            raise ValueError(
                f"data: {data.source}: {data.num_classes} classes, but normal_classes="
                f"{self.options['normal_classes']} needs at least one more for the odd one"
            )

    def build_model(self, model_name: str) -> nn.Module:
        """Image encoder + [`ElementScorer`][settransformer.tasks.set_anomaly.ElementScorer]:
        ``x: (B, N, C*H*W)``, ``mask`` -> scores ``(B, N)``."""
        if model_name not in _ROWS:
            raise ValueError(f"model: expected one of {list(_ROWS)}, got {model_name!r}")
        encoder, decoder = _ROWS[model_name]
        o = self.options
        scorer = ElementScorer(
            o["dim_hidden"],
            o["num_heads"],
            encoder,
            decoder,
            num_layers=o["num_layers"],
            num_seeds=o["num_seeds"],
        )
        return self.image_model(scorer)

    # -- data ---------------------------------------------------------------------------------
    def sample_sets(self, batch_size: int, generator: torch.Generator, split: str = "train") -> Batch:
        """``batch_size`` sets from ``split``'s images; vectorised.

        Returns a [`Batch`][settransformer.tasks.base.Batch]: ``x: (B, set_size, C*H*W)``,
        ``mask: (B, set_size)`` (``None`` when every set is full), ``target: (B,)`` the odd element's
        position, and ``extra["index"]`` (image indices into ``split``) and ``extra["anomaly"]`` ((B, N)
        bool).
        """
        o, g = self.options, generator
        size = o["set_size"]
        lo = size if o["min_size"] is None else o["min_size"]
        n = torch.randint(lo, size + 1, (batch_size,), generator=g)
        pos = torch.arange(size)
        odd_slot = pos == (n - 1)[:, None]  # the odd one is placed last, then everything is shuffled
        if self.part(split).has_attributes:
            pairs = self.pair_sampler(split)
            pair = pairs.sample_pairs(batch_size, g)
            index = torch.where(
                odd_slot, pairs.sample_neither(pair, g)[:, None], pairs.sample_both(pair, size, g)
            )
        else:
            k = o["normal_classes"]
            sampler = self.sampler(split)
            classes = sampler.nonempty
            if len(classes) < k + 1:
                raise ValueError(f"{split} images: {len(classes)} classes, need normal_classes + 1 = {k + 1}")
            chosen = classes[torch.rand(batch_size, len(classes), generator=g).argsort(dim=1)[:, : k + 1]]
            # Normal slot j < 2k gets class j // 2 (each normal class at least twice); the rest any of the k.
            spare = (torch.rand(batch_size, size, generator=g) * k).long().clamp_max(k - 1)
            slot = torch.where(pos < 2 * k, pos // 2, spare).clamp_max(k - 1)
            labels = torch.where(odd_slot, chosen[:, k : k + 1], chosen.gather(1, slot))
            index = sampler.sample(labels, g)
        mask = pos < n[:, None]
        shuffle = torch.rand(batch_size, size, generator=g).masked_fill(~mask, 2.0).argsort(dim=1)
        index, anomaly = index.gather(1, shuffle), odd_slot.gather(1, shuffle)
        x = self.gather_sets(index, mask, split)
        full = bool(mask.all())
        return Batch(
            x, None if full else mask, anomaly.float().argmax(dim=1), {"index": index, "anomaly": anomaly}
        )

    def pair_sampler(self, split: str) -> AttributePairSampler:
        """The attribute-pair sampler of ``split`` (attribute labels only)."""
        if split not in self._pair_samplers:
            self._pair_samplers[split] = AttributePairSampler(
                self.part(split).labels, self.options["set_size"] - 1
            )
        return self._pair_samplers[split]

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return self.sample_sets(batch_size, generator, "train")

    def test_batch(self) -> Batch:
        """The fixed test sets (``test_sets`` of them, seeded by ``seed``)."""
        if self._test_batch is None:
            self._test_batch = self.sample_sets(self.options["test_sets"], self.generator(2), "test")
        return self._test_batch

    # -- training and metrics -------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Cross-entropy of the softmax over each set's elements (padding at ``-inf``)."""
        return F.cross_entropy(model(batch.x, batch.mask).float(), batch.target)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch, device: torch.device, chunk: int = 500) -> Tensor:
        """Per-element probabilities ``(B, N)`` on CPU (0 at padding); restores the model's mode."""
        was_training = model.training
        model.eval()
        out = []
        for s in range(0, len(batch), chunk):
            x = batch.x[s : s + chunk].to(device)
            m = None if batch.mask is None else batch.mask[s : s + chunk].to(device)
            out.append(torch.softmax(model(x, m).float(), dim=1).cpu())
        model.train(was_training)
        return torch.cat(out)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``auroc``, ``aupr`` over all real test elements and top-1 ``accuracy`` per set."""
        from sklearn.metrics import average_precision_score, roc_auc_score

        batch = self.test_batch()
        prob = self.predict(model, batch, torch.device(device))
        real = torch.ones_like(prob, dtype=torch.bool) if batch.mask is None else batch.mask
        y, p = batch.extra["anomaly"][real].numpy(), prob[real].numpy()
        return {
            "auroc": float(roc_auc_score(y, p)),
            "aupr": float(average_precision_score(y, p)),
            "accuracy": float((prob.argmax(dim=1) == batch.target).float().mean()),
        }

    # -- plots --------------------------------------------------------------------------------
    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``set_anomaly_examples.png`` (test sets; true odd one framed red, prediction marked
        blue) and ``set_anomaly_curves.png`` (ROC and precision-recall curves)."""
        import matplotlib.pyplot as plt
        from sklearn.metrics import precision_recall_curve, roc_curve

        batch = self.test_batch()
        prob = self.predict(model, batch, torch.device(device))
        pred = prob.argmax(dim=1).numpy()
        true = batch.target.numpy()
        # Show hits and misses: up to 5 correct sets and 3 wrong ones.
        hits, misses = np.flatnonzero(pred == true), np.flatnonzero(pred != true)
        picks = np.concatenate([hits[: 8 - min(3, len(misses))], misses[:3]])[:8]
        mask = np.ones(prob.shape, bool) if batch.mask is None else batch.mask.numpy()
        fig, axes = self.image_grid(batch.extra["index"].numpy()[picks], mask[picks])
        names = self.part("test").names
        labels = self.part("test").labels
        for row, i in enumerate(picks):
            for col in range(prob.shape[1]):
                ax = axes[row, col]
                if not mask[i, col]:
                    continue
                label = "" if labels.ndim == 2 else f"{names[labels[batch.extra['index'][i, col]]]}: "
                ax.set_title(f"{label}{prob[i, col]:.2f}", fontsize=7)
                if col == true[i]:
                    for spine in ax.spines.values():
                        spine.set(color="red", linewidth=3)
                if col == pred[i]:
                    ax.set_xlabel("predicted", color="tab:blue", fontsize=8, fontweight="bold")
            axes[row, 0].set_ylabel(
                "hit" if pred[i] == true[i] else "miss", rotation=0, ha="right", fontsize=9
            )
        fig.suptitle(
            "Set anomaly: red frame = true odd one, blue = predicted; titles: [class:] probability",
            fontsize=10,
        )
        paths = [save_figure(fig, Path(out_dir) / "set_anomaly_examples.png")]

        real = mask.reshape(-1)
        y, p = batch.extra["anomaly"].numpy().reshape(-1)[real], prob.numpy().reshape(-1)[real]
        metrics = self.evaluate(model, device)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.6))
        fpr, tpr, _ = roc_curve(y, p)
        ax1.plot(fpr, tpr, label=f"AUROC {metrics['auroc']:.3f}")
        ax1.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="chance")
        ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        precision, recall, _ = precision_recall_curve(y, p)
        ax2.plot(recall, precision, label=f"AUPR {metrics['aupr']:.3f}")
        ax2.axhline(y.mean(), color="gray", lw=1, ls="--", label="chance")
        ax2.set(xlabel="recall", ylabel="precision", title="precision-recall")
        for ax in (ax1, ax2):
            ax.legend(loc="lower right" if ax is ax1 else "lower left")
        paths.append(save_figure(fig, Path(out_dir) / "set_anomaly_curves.png"))
        return paths
