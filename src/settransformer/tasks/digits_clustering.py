"""Amortized clustering of real data: scikit-learn's handwritten digits (after the paper's CIFAR-100 run).

The paper (section 5.3) clusters sets of CIFAR-100 features drawn from 4 random classes. Here the
same experiment runs on ``sklearn.datasets.load_digits`` (1,797 8x8 images of 10 digits, shipped
with scikit-learn, so nothing is downloaded), or on the user's own features (``features_path``,
see [`settransformer.data.features`][settransformer.data.features]).

Data: the images are split once (``split_seed``, stratified, ``test_fraction``) into disjoint
training and test images; features are standardised (``standardize="global"``: centred and
divided by one scalar std, the default; ``"feature"``: per feature) and optionally reduced by PCA
(``pca``), both fitted on the training images only. A set is ``num_clusters`` random classes and
``n ~ U{min_size..max_size}`` images drawn from those classes without replacement (with
replacement only if the classes hold fewer than ``n`` images of the split). The digits have
about 180 images per class, so a 4-class set from one half of the split has at most ~350
distinct images: the default set size is ``U{100..300}`` rather than the paper's ``U{100..500}``
(set ``max_size`` for larger feature sets).
Training batches share one set size (no mask); the fixed test sets are padded with a mask.

The model emits ``num_clusters`` diagonal Gaussians in feature space and is trained by the mixture
negative log-likelihood, as in [`settransformer.tasks.mog_clustering`][settransformer.tasks.mog_clustering].
Metrics on the test sets: ``ari`` (headline) and ``nmi`` of the hard assignments against the classes, ``ari1``
after one EM step, ``ll0``, and two classical baselines on the same sets with K known: ``kmeans_ari``
(k-means) and ``em_ari`` (a diagonal-covariance Gaussian mixture fitted by EM), both from scikit-learn.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Generator, Tensor, nn

from ..data.features import FeatureData, load_features
from ..data.files import default_cache_dir
from ..data.mixtures import MixtureParams, hard_assignments, mixture_nll
from .base import Batch, Preprocessed, Task
from .metrics import adjusted_rand_index, normalized_mutual_info
from .mog_clustering import (
    MODEL_DESCRIPTIONS,
    build_clustering_model,
    evaluate_mixture_model,
    plot_mixture_grid,
)

__all__ = ["DigitsClustering", "FeatureProjection", "classical_baselines"]


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of image indices into (train, test), the same for a given seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _fit_projection(
    train: np.ndarray, pca: int | None, per_feature: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(mean (F,), std (F,), axes (F, P) or None)``: standardisation by training statistics, then
    the training principal axes.

    ``per_feature=False`` divides by one scalar (the std over all training values): per-feature
    scaling turns near-constant pixels (digit borders) into heavy-tailed outliers (kurtosis ~35 in
    the PCA space instead of ~3.5), which both EM and the network then spend components on.
    """
    mean = train.mean(0)
    if per_feature:
        std = train.std(0)
        std[std < 1e-8] = 1.0  # constant features stay zero instead of dividing by zero
    else:
        std = np.full_like(mean, max(float((train - mean).std()), 1e-8))
    if pca is None:
        return mean, std, None
    _, _, vt = np.linalg.svd((train - mean) / std, full_matrices=False)
    return mean, std, vt[:pca].T


class FeatureProjection(Preprocessed):
    """A network with the task's feature preprocessing, so it takes raw features.

    ``forward(x, mask) = model(((x - mean) / std) @ axes, mask)`` with the buffers ``mean, std: (F,)``
    and ``axes: (F, P)`` fitted on the training images (identity when there is no PCA); padded rows
    stay zero. ``x: (B, N, F)``, ``mask: (B, N)``. ``preprocessed=True`` takes features already
    projected (the task's training and test sets are projected once, not per batch).

    Examples:
        >>> net = build_clustering_model("rff-pool", 2, 3, dim_hidden=8)
        >>> model = FeatureProjection(net, torch.zeros(5), torch.ones(5), torch.eye(5)[:, :2])
        >>> model(torch.randn(4, 10, 5)).shape  # 3 Gaussians in the 2-d projected space
        torch.Size([4, 3, 5])
    """

    mean: Tensor
    std: Tensor
    axes: Tensor

    def __init__(self, model: nn.Module, mean: Tensor, std: Tensor, axes: Tensor) -> None:
        super().__init__()
        self.model, self.dim_input = model, int(mean.shape[0])
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        self.register_buffer("axes", axes.float().clone())

    def forward(self, x: Tensor, mask: Tensor | None = None, preprocessed: bool = False) -> Tensor:
        """``x: (B, N, F)`` raw features, ``mask: (B, N)`` bool -> mixtures ``(B, K, 1 + 2P)``."""
        if not preprocessed:
            x = ((x - self.mean) / self.std) @ self.axes
            x = x if mask is None else x.masked_fill(~mask[..., None], 0.0)
        return self.model(x, mask)


def classical_baselines(
    x: Tensor, mask: Tensor, labels: Tensor, num_clusters: int, seed: int = 0, n_init: int = 1
) -> dict[str, Tensor]:
    """ARI/NMI per set of k-means and of a diagonal Gaussian mixture fitted by EM (scikit-learn, K known).

    Shapes: ``x: (S, N, F)``, ``mask``/``labels: (S, N)`` -> ``kmeans_ari``, ``kmeans_nmi``,
    ``em_ari``, ``em_nmi``, each ``(S,)``. ``n_init``: restarts of each method (scikit-learn's
    defaults are one k-means++ start, and one k-means initialisation for EM).
    """
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    s, n = mask.shape
    pred = {"kmeans": torch.full((s, n), -1), "em": torch.full((s, n), -1)}
    for i in range(s):  # one fit per set: classical methods share nothing between sets
        pts = x[i][mask[i]].double().numpy()
        km = KMeans(num_clusters, n_init=n_init, random_state=seed).fit(pts)
        gm = GaussianMixture(num_clusters, covariance_type="diag", n_init=n_init, random_state=seed).fit(pts)
        pred["kmeans"][i, mask[i]] = torch.as_tensor(km.labels_, dtype=torch.long)
        pred["em"][i, mask[i]] = torch.as_tensor(gm.predict(pts), dtype=torch.long)
    out = {}
    for name, p in pred.items():
        out[f"{name}_ari"] = adjusted_rand_index(labels, p, mask)
        out[f"{name}_nmi"] = normalized_mutual_info(labels, p, mask)
    return out


class DigitsClustering(Task):
    """Cluster sets of digit images (4 random classes a set) with one forward pass.

    Options:
        - num_clusters: random classes per set, and the Gaussians the model emits (the paper: 4).
        - min_size: the smallest set: sizes are uniform over ``min_size..max_size`` images; a training
            batch shares one size.
        - max_size: set sizes go up to ``max_size`` images (the paper: 500); images are drawn without
            replacement unless the set's classes hold fewer in their part of the split.
        - pca: principal components kept, fitted on the training images (at most the number of
            features); ``null``: all features, no PCA.
        - standardize: ``global``: centre each feature and divide by one std over all training values;
            ``feature``: divide each feature by its own training std.
        - test_fraction: share of each class's images held out for the test sets, between 0 and 1.
        - split_seed: seeds the fixed, stratified train/test split of the images.
        - num_test_sets: number of fixed test sets the metrics and the k-means/EM baselines are
            computed on.
        - test_seed: seeds the draw of the fixed test sets.
        - features_path: your own features: a ``.npz``/``.h5`` with ``features`` ``(M, F)`` and
            ``labels`` ``(M,)``, ``features.npy,labels.npy``, or a folder holding both ``.npy`` files;
            ``null``: scikit-learn's digits (64 pixel features).
        - dim_hidden: width of every layer of the models.
        - baseline_n_init: restarts of each baseline (k-means, and EM for the diagonal Gaussian
            mixture) on every test set.
        - cache_dir: folder where the baselines' scores are cached; ``null``: ``$SETTRANSFORMER_CACHE``,
            else ``~/.cache/settransformer``.

    Examples:
        >>> task = DigitsClustering(num_test_sets=20)
        >>> model = task.build_model("isab16-pma")   # 4 Gaussians in the 16-d PCA space
        >>> metrics = task.evaluate(model, torch.device("cpu"))  # ari, nmi, kmeans_ari, em_ari, ...
    """

    name: ClassVar[str] = "digits-clustering"
    model_names: ClassVar[tuple[str, ...]] = ("isab16-pma", "sab-pma", "rff-pma", "isab16-pool", "rff-pool")
    metric: ClassVar[str] = "ari"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[dict[str, dict[str, float]]] = {}  # the paper's ARI is on CIFAR-100, not comparable
    model_descriptions: ClassVar[dict[str, str]] = {k: MODEL_DESCRIPTIONS[k] for k in model_names}
    default_model: ClassVar[str | None] = "isab16-pma"
    nullable_options: ClassVar[tuple[str, ...]] = ("pca",)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        for key in ("num_clusters", "min_size", "num_test_sets", "dim_hidden", "baseline_n_init"):
            if not isinstance(o[key], int) or o[key] < 1:
                raise ValueError(f"{self.name}: option {key} expected a positive integer, got {o[key]!r}")
        if o["max_size"] < o["min_size"]:
            raise ValueError(f"{self.name}: max_size ({o['max_size']}) is below min_size ({o['min_size']})")
        if o["pca"] is not None and (not isinstance(o["pca"], int) or o["pca"] < 1):
            raise ValueError(f"{self.name}: option pca expected a positive integer or None, got {o['pca']!r}")
        if o["standardize"] not in ("global", "feature"):
            raise ValueError(
                f"{self.name}: option standardize expected 'global' or 'feature', got {o['standardize']!r}"
            )
        if not 0 < o["test_fraction"] < 1:
            raise ValueError(
                f"{self.name}: option test_fraction expected in (0, 1), got {o['test_fraction']}"
            )
        self._data: dict[str, Any] | None = None
        self._test: dict[str, Tensor] | None = None
        self._baselines: dict[str, Tensor] | None = None

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """Task options with their defaults: 4 clusters, sets of 100 to 300 images, 16 PCA components."""
        return {
            "num_clusters": 4,
            "min_size": 100,
            "max_size": 300,
            "pca": 16,
            "standardize": "global",
            "test_fraction": 0.5,
            "split_seed": 0,
            "num_test_sets": 200,
            "test_seed": 0,
            "features_path": None,
            "dim_hidden": 128,
            "baseline_n_init": 1,
            "cache_dir": None,
        }

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """``paper``: 4k steps of 10 sets, Adam 1e-3, x0.1 at 3k (the MoG recipe, shortened: the
        digits are a small data set); ``quick``: about a minute on 2 cores for the whole table."""
        if name == "paper":
            # Test ARI plateaus after ~2.5k steps (0.71-0.72); the paper's CIFAR-100 recipe (50k+
            # steps of 512-d features) has no counterpart for 1.8k digit images.
            return {
                "steps": 4_000,
                "batch_size": 10,
                "lr": 1e-3,
                "lr_milestones": [3_000],
                "lr_gamma": 0.1,
                "eval_every": 1_000,
            }
        if name == "quick":
            return {"steps": 300, "batch_size": 10, "lr": 1e-3}
        raise ValueError(f"budget: expected 'quick' or 'paper', got {name!r}")

    # -- data ---------------------------------------------------------------------------------

    def data(self) -> dict[str, Any]:
        """The split, standardised features: ``train_x (M_tr, F)``, ``train_y``, ``test_x``, ``test_y``,
        the source rows of each split (``train_index``, ``test_index``) and, per split, the positions
        of each class's images (``train_classes``, ``test_classes``)."""
        if self._data is None:
            o = self.options
            if o["features_path"] is None:
                from sklearn.datasets import load_digits

                digits = load_digits()
                source = FeatureData(
                    digits.data.astype(np.float32), digits.target.astype(np.int64), "sklearn digits"
                )
            else:
                source = load_features(o["features_path"])
            if source.num_classes < o["num_clusters"]:
                raise ValueError(
                    f"{source.source}: {source.num_classes} classes, fewer than "
                    f"num_clusters={o['num_clusters']}"
                )
            if o["pca"] is not None and o["pca"] > source.features.shape[1]:
                raise ValueError(
                    f"{self.name}: option pca={o['pca']} exceeds the {source.features.shape[1]} features "
                    f"of {source.source}"
                )
            tr, te = _split(source.labels, o["test_fraction"], o["split_seed"])
            for split, idx in (("training", tr), ("test", te)):
                present = len(np.unique(source.labels[idx]))
                if present < o["num_clusters"]:  # a class of one or two images may round to none
                    raise ValueError(
                        f"{source.source}: its {split} split (test_fraction={o['test_fraction']}) holds "
                        f"{present} classes, fewer than num_clusters={o['num_clusters']}: classes with "
                        "too few images for both splits"
                    )
            mean, std, axes = _fit_projection(source.features[tr], o["pca"], o["standardize"] == "feature")
            axes = np.eye(len(mean), dtype=mean.dtype) if axes is None else axes
            train_x, test_x = (
                (((source.features[idx] - mean) / std) @ axes).astype(np.float32) for idx in (tr, te)
            )
            data: dict[str, Any] = {
                "projection": tuple(
                    torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (mean, std, axes)
                ),
                "test_raw": torch.from_numpy(source.features[te].astype(np.float32)),
                "train_x": torch.from_numpy(train_x),
                "test_x": torch.from_numpy(test_x),
                "train_index": torch.from_numpy(tr),
                "test_index": torch.from_numpy(te),
            }
            for split, idx in (("train", tr), ("test", te)):
                y = source.labels[idx]
                data[f"{split}_y"] = torch.from_numpy(y)
                data[f"{split}_classes"] = [
                    torch.from_numpy(np.flatnonzero(y == c)) for c in np.unique(y) if (y == c).any()
                ]
            self._data = data
        return self._data

    @property
    def dim(self) -> int:
        """Feature size seen by the model."""
        return int(self.data()["train_x"].shape[1])

    def _draw_set(self, split: str, n: int, generator: Generator) -> tuple[Tensor, Tensor]:
        """Image indices ``(n,)`` of one set and their cluster labels ``0..K-1``."""
        data, k = self.data(), self.options["num_clusters"]
        classes = data[f"{split}_classes"]
        chosen = torch.randperm(len(classes), generator=generator)[:k]
        pool = torch.cat([classes[int(c)] for c in chosen])
        cluster = torch.cat([torch.full((len(classes[int(c)]),), j) for j, c in enumerate(chosen)])
        if n <= len(pool):
            pick = torch.randperm(len(pool), generator=generator)[:n]
        else:
            pick = torch.randint(len(pool), (n,), generator=generator)
        return pool[pick], cluster[pick]

    def sample_batch(self, batch_size: int, generator: Generator) -> Batch:
        """Training sets of one shared size: ``x: (B, n, F)``, no mask, ``target: (B, n)`` cluster labels."""
        o = self.options
        n = int(torch.randint(o["min_size"], o["max_size"] + 1, (), generator=generator))
        drawn = [self._draw_set("train", n, generator) for _ in range(batch_size)]
        idx = torch.stack([d[0] for d in drawn])
        return Batch(self.data()["train_x"][idx], None, torch.stack([d[1] for d in drawn]))

    def test_sets(self) -> dict[str, Tensor]:
        """The fixed test sets: ``x: (S, N_max, F)``, ``mask: (S, N_max)``, ``labels: (S, N_max)``
        (-1 at padding)."""
        if self._test is None:
            o = self.options
            g = torch.Generator().manual_seed(o["test_seed"])
            sizes = torch.randint(o["min_size"], o["max_size"] + 1, (o["num_test_sets"],), generator=g)
            n_max = int(sizes.max())
            x = torch.zeros(len(sizes), n_max, self.dim)
            raw = torch.zeros(len(sizes), n_max, self.data()["test_raw"].shape[1])
            labels = torch.full((len(sizes), n_max), -1)
            for i, n in enumerate(sizes.tolist()):
                idx, lab = self._draw_set("test", n, g)
                x[i, :n], raw[i, :n], labels[i, :n] = (
                    self.data()["test_x"][idx],
                    self.data()["test_raw"][idx],
                    lab,
                )
            self._test = {"x": x, "raw": raw, "mask": labels >= 0, "labels": labels}
        return self._test

    def baselines(self) -> dict[str, Tensor]:
        """k-means and EM scores per test set, computed once and cached on disk (``cache_dir``)."""
        if self._baselines is None:
            o, t = self.options, self.test_sets()
            key = {k: o[k] for k in sorted(o) if k not in ("dim_hidden", "cache_dir")}
            # keyed on the test sets themselves: a data file rewritten in place (its folder's time
            # unchanged) gives other sets, hence another key
            content = hashlib.sha256()
            for name in ("x", "mask", "labels"):
                content.update(t[name].contiguous().numpy().tobytes())
            key["test_sets"] = content.hexdigest()
            digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
            cache = Path(o["cache_dir"] if o["cache_dir"] is not None else default_cache_dir())
            path = cache / f"digits-baselines-{digest}.pt"
            if path.is_file():
                self._baselines = torch.load(path, weights_only=True)
            else:
                self._baselines = classical_baselines(
                    t["x"], t["mask"], t["labels"], o["num_clusters"], n_init=o["baseline_n_init"]
                )
                try:
                    cache.mkdir(parents=True, exist_ok=True)
                    torch.save(self._baselines, path)
                except OSError:
                    pass  # caching only saves time
        return self._baselines

    # -- model, loss, metrics ---------------------------------------------------------------

    def build_model(self, model_name: str) -> nn.Module:
        """The network inside [`FeatureProjection`][settransformer.tasks.digits_clustering.FeatureProjection]:
        raw features ``x: (B, N, F)``, ``mask`` -> ``num_clusters`` Gaussians ``(B, K, 1 + 2P)`` in the
        projected space."""
        o = self.options
        net = build_clustering_model(model_name, self.dim, o["num_clusters"], o["dim_hidden"])
        return FeatureProjection(net, *self.data()["projection"])

    def test_inputs(self) -> tuple[list[Tensor], Tensor]:
        """The test sets as raw features ``(N_i, F)`` and their cluster labels ``(S, N_max)`` (-1 at
        padding); the mixtures a model emits live in the projected space, where eval scores them."""
        t = self.test_sets()
        return [t["raw"][i][t["mask"][i]] for i in range(len(t["raw"]))], t["labels"]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Negative log-likelihood per point under the model's diagonal Gaussian mixtures."""
        return mixture_nll(model(batch.x, batch.mask, preprocessed=True), batch.x, batch.mask)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``ari`` (headline), ``nmi``, ``ari1``, ``ll0``, ``ll1`` of the network on the projected test
        sets, and the k-means / EM baselines on the same sets."""
        t = self.test_sets()
        net = model.model if isinstance(model, FeatureProjection) else model
        per_set = evaluate_mixture_model(net, t["x"], t["mask"], t["labels"], device)
        result = {k: per_set[k].mean().item() for k in ("ari", "nmi", "ari1", "ll0", "ll1")}
        result.update({k: v.mean().item() for k, v in self.baselines().items()})
        return result

    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``<out_dir>/digits_clustering.png``: test sets in the first two feature dimensions (PCA
        axes by default), coloured by assigned cluster, with the emitted components' ellipses."""
        t = self.test_sets()
        count = min(6, t["x"].shape[0])
        x, mask, labels = t["x"][:count], t["mask"][:count], t["labels"][:count]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x.to(device), mask.to(device), preprocessed=True)
                params = MixtureParams.from_output(out.float()).to("cpu")
        finally:
            model.train(was_training)
        ari = adjusted_rand_index(labels, hard_assignments(x, params, mask), mask)
        keep = [0, 1] if self.dim >= 2 else [0]
        sub = MixtureParams(params.log_pi, params.mu[..., keep], params.sigma[..., keep])
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "digits_clustering.png"
        titles = [f"set {i}: n={int(mask[i].sum())}, ARI={float(ari[i]):.2f}" for i in range(count)]
        # Colours come from the full-dimensional assignments; only the drawing is 2-D.
        plot_mixture_grid(
            x[..., keep], mask, sub, path, titles=titles, assignments=hard_assignments(x, params, mask)
        )
        return [path]
