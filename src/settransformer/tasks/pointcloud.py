"""Point-cloud classification (the paper's section 5.5, Table 4: ModelNet40).

Each example is a set of points; the model predicts its class and is trained by cross-entropy.
Sources (option ``source``), all offline:

- ``shapes`` (default): procedural 3-D shapes generated on the fly from the seed
  ([`settransformer.data.shapes`][settransformer.data.shapes]); a fixed test set of ``test_size`` shapes;
- ``digits``: scikit-learn's 8x8 digits as 2-D point sets ``(x, y, intensity)`` of variable size
  ([`settransformer.data.digit_points`][settransformer.data.digit_points]);
- ``deepsets-h5``, ``pointnet-h5``, ``modelnet-off``, ``array``: ModelNet40 in its usual releases, or
  any ``.npy``/``.npz`` ([`settransformer.data.pointclouds`][settransformer.data.pointclouds]), read from
  ``path``.

Preprocessing ([`settransformer.data.point_transforms`][settransformer.data.point_transforms]) follows the
DeepSets / Set Transformer
code: subsample to ``num_points`` (``fixed``: every ``N/P``-th point; ``random``: a fresh subset for
every training batch), standardise (``cloud``: each cloud by its own clipped scalar mean and std, as
that code does; ``train``: one clip/mean/std from the training split), and augment training clouds
only (rotation about z by U(-0.1π, 0.1π), per-axis scaling by U(0.8, 1.25)).

Rows (Table 4): ``rff-pool`` (row-wise MLP + max pooling: DeepSets/PointNet style), ``rff-pma``,
``isab-pool`` (ISAB(16) x2 + max pooling) and ``isab-pma`` (ISAB(16) x2 + PMA_1, the default).

Examples:
    >>> task = PointCloudClassification(source="shapes", num_points=128)
    >>> batch = task.sample_batch(4, torch.Generator().manual_seed(0))
    >>> batch.x.shape, batch.target.shape
    (torch.Size([4, 128, 3]), torch.Size([4]))

Figures (``task.plot``): a confusion matrix
([`plot_confusion`][settransformer.tasks.pointcloud.plot_confusion]) and a grid of example clouds
([`plot_examples`][settransformer.tasks.pointcloud.plot_examples]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.digit_points import load_digit_points
from ..data.modelnet_off import load_modelnet_off
from ..data.point_pipeline import PreparedClouds, Preprocessing
from ..data.point_transforms import fixed_subsample, standardize_per_cloud, subsample
from ..data.pointclouds import (
    PointCloudData,
    PointSplit,
    load_array,
    load_deepsets_h5,
    load_pointnet_h5,
)
from ..data.shapes import SHAPE_CLASSES, sample_shapes
from ..nn.models import DeepSets, SetTransformer
from .base import Batch, Preprocessed, Task
from .report import save_figure

__all__ = ["CloudPreprocessing", "PointCloudClassification", "plot_confusion", "plot_examples"]

SOURCES = ("shapes", "digits", "deepsets-h5", "pointnet-h5", "modelnet-off", "array")
_FILE_SOURCES = SOURCES[2:]
_MODELNET = SOURCES[2:5]
_DEFAULT_POINTS = {"shapes": 128, "deepsets-h5": 1000, "pointnet-h5": 1000, "modelnet-off": 1000}
_EVAL_CHUNK = 256


class CloudPreprocessing(Preprocessed):
    """A point-cloud network with the task's test-time preprocessing, so it takes raw clouds.

    ``forward(x, mask)``: keep ``num_points`` points per cloud by the fixed rule (every ``n/P``-th
    of its ``n`` real points when ``n > num_points``, all of them otherwise, real points first:
    [`fixed_subsample`][settransformer.data.point_transforms.fixed_subsample]), standardise the first
    ``spatial_dims`` features (``"cloud"``: each cloud by its own statistics; ``"train"``: the
    buffers ``clip, mean, std`` of the training split; ``"none"``), then run ``model``.
    ``x: (B, N, D)``, ``mask: (B, N)`` -> ``model``'s output. With a mask, no Python branch depends
    on the sizes or values, so the exported graph (ONNX, TorchScript) subsamples clouds of any size.
    ``preprocessed=True`` skips the preprocessing: training batches arrive subsampled, standardised
    and augmented (in that order, as in the DeepSets code).

    Examples:
        >>> net = DeepSets(3, 1, 4, dim_hidden=8)
        >>> model = CloudPreprocessing(net, num_points=16, standardize="cloud", spatial_dims=3)
        >>> model(torch.randn(2, 50, 3) * 50 + 200).shape  # raw clouds of 50 points
        torch.Size([2, 1, 4])
    """

    clip: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        num_points: int | None,
        standardize: str,
        spatial_dims: int,
        stats: tuple[float, float, float] = (float("inf"), 0.0, 1.0),
    ) -> None:
        super().__init__()
        if standardize not in ("cloud", "train", "none"):
            raise ValueError(f"standardize: expected 'cloud', 'train' or 'none', got {standardize!r}")
        self.model, self.num_points, self.standardize, self.spatial_dims = (
            model, num_points, standardize, spatial_dims,
        )  # fmt: skip
        for name, value in zip(("clip", "mean", "std"), stats, strict=True):
            self.register_buffer(name, torch.tensor(float(value)))

    def forward(self, x: Tensor, mask: Tensor | None = None, preprocessed: bool = False) -> Tensor:
        """``x: (B, N, D)`` raw clouds, ``mask: (B, N)`` bool -> the network's output."""
        if not preprocessed:
            if self.num_points is not None:
                if mask is None:  # eager only: an export always passes a mask
                    x, mask = subsample(x, self.num_points)
                else:
                    x, mask = fixed_subsample(x, self.num_points, mask)
            c = self.spatial_dims
            if self.standardize == "cloud":
                x = standardize_per_cloud(x, mask, c)
            elif self.standardize == "train":
                z = (torch.minimum(torch.maximum(x[..., :c], -self.clip), self.clip) - self.mean) / self.std
                x = torch.cat([z, x[..., c:]], dim=2)
                x = x if mask is None else x.masked_fill(~mask[..., None], 0.0)
        return self.model(x, mask)


class PointCloudClassification(Task):
    """Classify point clouds (or any sets of points) with a set model.

    Options:
        - source: where the clouds come from: ``shapes`` (procedural 3-D shapes), ``digits``
            (scikit-learn's digits as 2-D point sets), or, read from ``path``, ``deepsets-h5``,
            ``pointnet-h5``, ``modelnet-off`` (ModelNet40 releases) or ``array`` (a ``.npy``/``.npz``).
        - path: the file or folder of a file source (``deepsets-h5``, ``pointnet-h5``, ``modelnet-off``,
            ``array``); unused otherwise.
        - labels_path: ``array`` source only: the labels ``.npy`` of a ``.npy`` points file.
        - num_points: points per cloud (``null``: 128 for shapes, 1000 for ModelNet sources, all
            otherwise).
        - subsample: how a cloud is cut to ``num_points``: ``fixed`` (every ``N/P``-th point) or
            ``random`` (a fresh subset for every training batch).
        - test_subsample: the rule for the test clouds, ``fixed`` or ``random`` (a subset drawn once
            with ``test_seed``); ``null``: the same as ``subsample``.
        - standardize: ``cloud`` (each cloud by its own clipped mean and std), ``train`` (one clip, mean
            and std from the training split) or ``none``; ``null``: ``none`` for digits, else ``cloud``.
        - augment: ``true``: rotate training clouds about z by U(-0.1 pi, 0.1 pi) and scale each axis
            by U(0.8, 1.25); ``null``: on for ModelNet sources, off otherwise.
        - dim_hidden: width of every layer of the models (paper 256; ``null``: 256 for ModelNet
            sources, 64 otherwise, so the offline sources train in minutes on a CPU).
        - num_heads: attention heads of the ISAB and PMA blocks; must divide the width (paper 4).
        - num_inducing: inducing points of each ISAB of the ``isab-*`` rows (paper 16).
        - dropout: rate of the models' dropout layers, before pooling and/or before the classifier
            (see the model rows); from 0 up to, not including, 1 (paper 0.5).
        - num_classes: ``shapes`` only: how many of the 12 shape classes are used (2 to 12).
        - noise: ``shapes`` only: std of the Gaussian jitter of the points, relative to the shape's size.
        - rotation: ``shapes`` only: the random pose of each shape: ``z`` (about the vertical axis),
            ``so3`` (any 3-D rotation) or ``none``.
        - test_size: ``shapes`` only: number of fixed test shapes.
        - test_seed: seeds the fixed test data (the test shapes, a random test subsample) and, for
            shapes, the clouds that ``standardize=train`` is fitted on.
        - test_fraction: test share of the split of ``digits`` and of single-split ``array`` data.
        - split_seed: seeds the split of ``digits`` and of single-split ``array`` data, and the point
            sampling of ``.off`` meshes.
        - off_points: ``modelnet-off`` only: points sampled per ``.off`` mesh (later cut to
            ``num_points``).
        - cache_dir: ``modelnet-off`` only: folder of the cache of sampled points; ``null``:
            ``$SETTRANSFORMER_CACHE``, else ``~/.cache/settransformer``.
    """

    name: ClassVar[str] = "pointcloud"
    model_names: ClassVar[tuple[str, ...]] = ("rff-pool", "rff-pma", "isab-pool", "isab-pma")
    demo_models: ClassVar[tuple[str, ...] | None] = ("rff-pool", "isab-pma")
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    default_model: ClassVar[str | None] = "isab-pma"
    paper: ClassVar[dict[str, dict[str, float]]] = {
        "rff-pool": {"accuracy": 0.8551, "accuracy_std": 0.0142},
        "rff-pma": {"accuracy": 0.8534, "accuracy_std": 0.0152},
        "isab-pool": {"accuracy": 0.8915, "accuracy_std": 0.0144},
        "isab-pma": {"accuracy": 0.8662, "accuracy_std": 0.0149},
    }
    """ModelNet40 at 1,000 points (the default ``source`` is procedural shapes, not ModelNet40)."""
    paper_by_points: ClassVar[dict[int, dict[str, float]]] = {
        100: {"rff-pool": 0.7951, "rff-pma": 0.8076, "isab-pool": 0.8273, "isab-pma": 0.8454},
        1000: {"rff-pool": 0.8551, "rff-pma": 0.8534, "isab-pool": 0.8915, "isab-pma": 0.8662},
        5000: {"rff-pool": 0.8933, "rff-pma": 0.8628, "isab-pool": 0.9040, "isab-pma": 0.8779},
    }
    """Table 4 in full: ``{num_points: {model: accuracy}}`` (ModelNet40, mean of 5 runs)."""

    model_descriptions: ClassVar[dict[str, str]] = {
        "rff-pool": "rFF + Pooling: FC(d,ReLU)x3, max, Dropout, FC(d,ReLU), Dropout, FC(classes)",
        "rff-pma": "rFF + PMA: FC(d,ReLU)x3, Dropout, PMA_1(d,4), Dropout, FC(classes)",
        "isab-pool": "ISAB(16) + Pooling: ISAB_16(d,4)x2, max, Dropout, FC(d,ReLU), Dropout, FC(classes)",
        "isab-pma": "ISAB(16) + PMA: ISAB_16(d,4)x2, Dropout, PMA_1(d,4), Dropout, FC(classes)",
    }

    def paper_comparison(self) -> tuple[dict[str, dict[str, float]], list[str]]:
        """Table 4's numbers at this task's number of points (with their spread at 1,000), and
        a note where the source is not ModelNet40 or the paper has no column for the points."""
        source, points = self.options["source"], self.preprocessing.num_points
        notes = (
            [] if source in _MODELNET else [f"the paper's numbers are on ModelNet40, not on source={source}"]
        )
        row = self.paper_by_points.get(points) if points is not None else None
        if row is None:
            shown = "every point" if points is None else f"{points:,} points"
            notes.append(f"the paper has no numbers at {shown} (it has 100, 1,000 and 5,000)")
            return {}, notes
        paper = type(self).paper if points == 1000 else {m: {"accuracy": a} for m, a in row.items()}
        return paper, notes

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "source": "shapes",
            "path": None,
            "labels_path": None,
            "num_points": None,
            "subsample": "fixed",
            "test_subsample": None,
            "standardize": None,
            "augment": None,
            "dim_hidden": None,
            "num_heads": 4,
            "num_inducing": 16,
            "dropout": 0.5,
            "num_classes": 12,
            "noise": 0.02,
            "rotation": "z",
            "test_size": 1200,
            "test_seed": 1234,
            "test_fraction": 0.2,
            "split_seed": 0,
            "off_points": 2048,
            "cache_dir": None,
        }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["source"] not in SOURCES:
            raise ValueError(f"source: expected one of {', '.join(SOURCES)}, got {o['source']!r}")
        if o["source"] in _FILE_SOURCES and (o["path"] is None or not Path(o["path"]).exists()):
            raise ValueError(
                f"path: source {o['source']!r} needs an existing file or folder, got {o['path']!r}"
            )
        for key, choices in (
            ("standardize", (None, "cloud", "train", "none")),
            ("augment", (None, True, False)),
            ("rotation", ("z", "so3", "none")),
        ):
            if o[key] not in choices:
                raise ValueError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {o[key]!r}")
        positive = ["num_heads", "num_inducing", "num_classes", "test_size", "off_points"]
        for key in positive + [k for k in ("num_points", "dim_hidden") if o[k] is not None]:
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
                raise ValueError(f"{key}: expected a positive integer, got {o[key]!r}")
        if self.dim_hidden % o["num_heads"]:
            raise ValueError(f"num_heads: must divide dim_hidden={self.dim_hidden}, got {o['num_heads']}")
        if not 0 <= o["dropout"] < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {o['dropout']!r}")
        shapes = o["source"] == "shapes"
        self.preprocessing = Preprocessing(  # checks subsample and test_subsample
            num_points=o["num_points"] or _DEFAULT_POINTS.get(o["source"]),
            subsample=o["subsample"],
            test_subsample=o["test_subsample"],
            standardize=o["standardize"] or ("none" if o["source"] == "digits" else "cloud"),
            augment=o["augment"] if o["augment"] is not None else o["source"] in _MODELNET,
            spatial_dims=2 if o["source"] == "digits" else 3,  # lowered to D for arrays with D < 3
            test_seed=o["test_seed"],
        )
        if shapes and self.preprocessing.num_points is None:
            raise ValueError("num_points: procedural shapes need a number of points")
        self._data: PointCloudData | None = None
        self._clouds: PreparedClouds | None = None

    @property
    def dim_hidden(self) -> int:
        """Model width: the paper's 256 for ModelNet sources, 64 (CPU-friendly) otherwise."""
        return int(self.options["dim_hidden"] or (256 if self.options["source"] in _MODELNET else 64))

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """``quick``: about a minute on 2 CPU cores. ``paper``: the 10-minute CPU targets (shapes,
        digits); real ModelNet40 needs far more steps (pass ``--steps``)."""
        if name == "quick":
            return {"steps": 800, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "eval_every": 400}
        if name == "paper":
            return {"steps": 4000, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "eval_every": 1000}
        raise ValueError(f"budget: expected 'quick' or 'paper', got {name!r}")

    # -- data ------------------------------------------------------------------------------------
    def data(self) -> PointCloudData:
        """The loaded data (``shapes``: only the fixed test shapes; training shapes are drawn per batch)."""
        if self._data is None:
            self._data = self._load()
        return self._data

    def _load(self) -> PointCloudData:
        o, prep = self.options, self.preprocessing
        # a fixed subsample can be taken while reading: ModelNet40 at 10,000 points is 1.2 GB
        both_fixed = prep.subsample == "fixed" and (prep.test_subsample or prep.subsample) == "fixed"
        keep = prep.num_points if both_fixed else None
        if o["source"] == "shapes":
            labels = np.arange(o["test_size"]) % o["num_classes"]
            x, y = sample_shapes(
                len(labels), prep.num_points or 128, o["test_seed"], labels=labels, **self._shape_options()
            )
            empty = PointSplit(x[:0], y[:0])
            return PointCloudData(empty, PointSplit(x, y), list(SHAPE_CLASSES[: o["num_classes"]]))
        if o["source"] == "digits":
            return load_digit_points(o["test_fraction"], o["split_seed"])
        if o["source"] == "deepsets-h5":
            return load_deepsets_h5(o["path"], keep)
        if o["source"] == "pointnet-h5":
            return load_pointnet_h5(o["path"], keep)
        if o["source"] == "modelnet-off":
            return load_modelnet_off(o["path"], o["off_points"], o["split_seed"], cache_dir=o["cache_dir"])
        return load_array(o["path"], o["labels_path"], o["test_fraction"], o["split_seed"])

    @property
    def class_names(self) -> list[str]:
        return self.data().class_names

    @property
    def dim_input(self) -> int:
        return self.data().dim

    def clouds(self) -> PreparedClouds:
        """The preprocessed data (built on first use)."""
        if self._clouds is None:
            prep = self.preprocessing
            if prep.spatial_dims > self.dim_input:
                prep = replace(prep, spatial_dims=self.dim_input)
            data, p = self.data(), prep.num_points
            n, where = data.test.points.shape[1], self.options["path"] or self.options["source"]
            if p is not None and data.test.mask is None and p > n:
                raise ValueError(f"num_points: {p} is more than the {n} points per cloud of {where}")
            fit_on = None
            if self.options["source"] == "shapes" and prep.standardize == "train":
                x, _ = self._shapes(2000, torch.Generator().manual_seed(self.options["test_seed"] + 1))
                fit_on = (x, None)
            self._clouds = PreparedClouds(data, prep, fit_on)
        return self._clouds

    def _shape_options(self) -> dict[str, Any]:
        return {k: self.options[k] for k in ("num_classes", "noise", "rotation")}

    def _shapes(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # numpy draws, seeded from torch's
        x, y = sample_shapes(batch_size, self.preprocessing.num_points or 128, seed, **self._shape_options())
        return torch.from_numpy(x), torch.from_numpy(y)

    def train_size(self) -> int | None:
        """Number of training clouds (``None`` for procedural shapes, which are unlimited)."""
        return None if self.options["source"] == "shapes" else len(self.data().train)

    def train_batch(self, indices: Tensor, generator: torch.Generator) -> Batch:
        """Training clouds ``indices: (B,)`` preprocessed for training (random subset, standardisation,
        augmentation drawn from ``generator``): for epoch-style sampling over ``range(train_size())``."""
        if self.options["source"] == "shapes":
            raise ValueError("train_batch: procedural shapes have no fixed training set; use sample_batch")
        return Batch(*self.clouds().train_batch(indices, generator))

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` training clouds drawn with replacement: ``x: (B, P, D)``, ``mask: (B, P)`` or
        None, ``target: (B,)`` class indices."""
        clouds = self.clouds()
        if self.options["source"] == "shapes":
            x, y = self._shapes(batch_size, generator)
            return Batch(clouds.finish(x, None, generator), None, y)
        index = torch.randint(0, len(clouds), (batch_size,), generator=generator)
        return Batch(*clouds.train_batch(index, generator))

    def test_split(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """The fixed, preprocessed test data ``(x: (S, P, D), mask: (S, P) or None, labels: (S,))``."""
        return self.clouds().test

    # -- models, loss, metrics -------------------------------------------------------------------
    def build_model(self, model_name: str) -> nn.Module:
        """A fresh model inside [`CloudPreprocessing`][settransformer.tasks.pointcloud.CloudPreprocessing]:
        raw ``x: (B, N, D)``, ``mask: (B, N)`` -> logits ``(B, 1, num_classes)``."""
        net = self._network(model_name)
        with torch.device("cpu"):  # the data are real even while the model is sized on the meta device
            clouds = self.clouds()
        st = clouds.standardizer
        stats = (float("inf"), 0.0, 1.0) if st is None else (st.clip, st.mean, st.std)
        prep = clouds.prep
        return CloudPreprocessing(net, prep.num_points, prep.standardize, prep.spatial_dims, stats)

    def test_inputs(self) -> tuple[list[Tensor], Tensor]:
        """The raw test clouds ``(N_i, D)`` (before standardisation; subsampled only by a random
        test rule, which a deployed model cannot repeat) and their labels ``(S,)``."""
        prep, data = self.clouds().prep, self.data()
        if prep.num_points is None or (prep.test_subsample or prep.subsample) == "fixed":
            x, mask, labels = (
                torch.from_numpy(data.test.points),
                None if data.test.mask is None else torch.from_numpy(data.test.mask),
                torch.from_numpy(data.test.labels),
            )
        else:
            x, mask, labels = self.clouds().raw_test
        return [x[i] if mask is None else x[i][mask[i]] for i in range(len(x))], labels

    def _network(self, model_name: str) -> nn.Module:
        o = self.options
        d, c, h, drop = self.dim_input, len(self.class_names), self.dim_hidden, o["dropout"]
        common = {"dim_hidden": h, "num_heads": o["num_heads"], "decoder_dropout": drop}
        if model_name == "rff-pool":
            return DeepSets(
                d, 1, c, dim_hidden=h, pool="max", num_encoder_layers=3, num_decoder_layers=1, dropout=drop
            )
        if model_name == "rff-pma":
            return SetTransformer(
                d, 1, c, encoder="rff", num_encoder_layers=3, num_decoder_layers=0, **common
            )
        if model_name in ("isab-pool", "isab-pma"):
            pool = model_name == "isab-pool"
            return SetTransformer(
                d, 1, c, num_inducing=o["num_inducing"], num_encoder_layers=2,
                pooling="max" if pool else "pma", num_decoder_layers=1 if pool else 0, **common,
            )  # fmt: skip
        raise ValueError(f"model: expected one of {', '.join(self.model_names)}, got {model_name!r}")

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Cross-entropy of the logits ``(B, classes)`` against ``batch.target``."""
        logits = model(batch.x, batch.mask, preprocessed=True).reshape(len(batch), -1)
        return F.cross_entropy(logits.float(), batch.target)

    @torch.no_grad()
    def predict(self, model: nn.Module, device: torch.device) -> Tensor:
        """Logits ``(S, classes)`` (on CPU) for every test cloud, in chunks (no cloud is dropped): the
        raw clouds through the whole model, preprocessing included, as ``predict`` runs it."""
        x, mask, _ = self.clouds().raw_test
        was_training = model.training
        model.eval()
        try:
            out = []
            for i in range(0, x.shape[0], _EVAL_CHUNK):
                m = None if mask is None else mask[i : i + _EVAL_CHUNK].to(device)
                out.append(
                    model(x[i : i + _EVAL_CHUNK].to(device), m)
                    .reshape(min(_EVAL_CHUNK, x.shape[0] - i), -1)
                    .float()
                    .cpu()
                )
        finally:
            model.train(was_training)
        return torch.cat(out)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``accuracy``, ``mean_class_accuracy``, ``test_loss`` (not ``loss``: metrics.jsonl logs the
        training loss under that name) and ``class_accuracy/<name>`` per class."""
        logits, labels = self.predict(model, device), self.test_split()[2]
        pred = logits.argmax(1)
        result = {
            "accuracy": float((pred == labels).float().mean()),
            "test_loss": float(F.cross_entropy(logits, labels)),
        }
        per_class = {}
        for c, name in enumerate(self.class_names):
            hit = pred[labels == c] == c
            if len(hit):
                per_class[f"class_accuracy/{name}"] = float(hit.float().mean())
        result["mean_class_accuracy"] = float(np.mean(list(per_class.values())))
        return {**result, **per_class}

    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``pointcloud_confusion.png`` (row-normalised confusion matrix) and ``pointcloud_examples.png``."""

        x, mask, labels = self.test_split()
        pred = self.predict(model, device).argmax(1)
        names = self.class_names
        return [
            plot_confusion(labels.numpy(), pred.numpy(), names, Path(out_dir) / "pointcloud_confusion.png"),
            plot_examples(
                x,
                mask,
                labels,
                pred,
                names,
                Path(out_dir) / "pointcloud_examples.png",
                self.clouds().prep.spatial_dims,
            ),
        ]


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
