"""The digits-clustering task: split, sets, user features, baselines, training and plot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from settransformer.tasks.base import Task
from settransformer.tasks.digits_clustering import DigitsClustering

SMALL = {"num_test_sets": 4, "min_size": 40, "max_size": 80, "dim_hidden": 16}


@pytest.fixture
def task(tmp_path: Path) -> DigitsClustering:
    return DigitsClustering(cache_dir=str(tmp_path), **SMALL)


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    """Six well separated classes in 8-d, saved as a user feature file."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 10
    labels = np.repeat(np.arange(6), 60)
    path = tmp_path / "blobs.npz"
    np.savez(path, features=centres[labels] + rng.normal(size=(360, 8)), labels=labels)
    return path


def test_is_a_task() -> None:
    assert issubclass(DigitsClustering, Task)
    assert DigitsClustering.model_names[0] == "isab16-pma" and DigitsClustering.metric == "ari"
    assert DigitsClustering.budget("quick")["steps"] < DigitsClustering.budget("paper")["steps"]
    with pytest.raises(ValueError, match="unknown option"):
        DigitsClustering(pcaa=3)
    with pytest.raises(ValueError, match="pca"):
        DigitsClustering(pca=0)
    with pytest.raises(ValueError, match="standardize"):
        DigitsClustering(standardize="minmax")


def test_per_feature_standardisation() -> None:
    data = DigitsClustering(pca=None, standardize="feature", **SMALL).data()
    std = data["train_x"].std(0)
    assert (((std - 1).abs() < 1e-2) | (std < 1e-6)).all()  # unit variance, constant pixels stay 0
    glob = DigitsClustering(pca=None, **SMALL).data()["train_x"]
    assert abs(glob.std().item() - 1) < 1e-2 and glob.std(0).max() < 2  # one scale for all pixels


def test_split_is_disjoint_and_features_fitted_on_training_images(task: DigitsClustering) -> None:
    data = task.data()
    tr, te = set(data["train_index"].tolist()), set(data["test_index"].tolist())
    assert not tr & te and len(tr | te) == 1797
    assert data["train_x"].shape[1] == data["test_x"].shape[1] == task.dim == 16
    assert torch.allclose(data["train_x"].mean(0), torch.zeros(16), atol=1e-4)  # centred by training stats
    assert data["test_x"].mean(0).abs().max() > 1e-3  # ... which the test images do not share exactly
    # Principal axes in decreasing variance.
    var = data["train_x"].var(0)
    assert (var[:-1] >= var[1:] - 1e-4).all()


def test_sets_hold_four_classes_of_distinct_images(task: DigitsClustering) -> None:
    batch = task.sample_batch(5, torch.Generator().manual_seed(0))
    assert batch.mask is None and batch.x.shape[0] == 5 and 40 <= batch.x.shape[1] <= 80
    assert batch.x.shape[2] == 16 and batch.target.min() >= 0 and batch.target.max() <= 3
    train_x = task.data()["train_x"]
    for xb in batch.x:
        rows = torch.cdist(xb, train_x).argmin(1)
        assert len(set(rows.tolist())) == len(rows)  # drawn without replacement
    t = task.test_sets()
    assert t["x"].shape[0] == 4 and torch.equal(t["mask"], t["labels"] >= 0)
    again = DigitsClustering(**SMALL).test_sets()  # fixed by test_seed
    assert torch.equal(t["x"], again["x"])


def test_user_features_and_baselines(tmp_path: Path, blobs: Path) -> None:
    task = DigitsClustering(
        features_path=str(blobs), pca=None, num_clusters=3, cache_dir=str(tmp_path), **SMALL
    )
    assert task.dim == 8
    metrics = task.evaluate(task.build_model("rff-pma"), torch.device("cpu"))
    assert set(metrics) >= {"ari", "nmi", "ari1", "ll0", "kmeans_ari", "em_ari", "kmeans_nmi", "em_nmi"}
    assert metrics["kmeans_ari"] > 0.9 and metrics["em_ari"] > 0.9  # separated blobs are easy
    assert list(tmp_path.glob("digits-baselines-*.pt"))  # cached for the next evaluation
    # a folder of features.npy and labels.npy, the features rewritten in place with noise (the
    # folder's time unchanged): the cached scores of the blobs are not reused
    folder = tmp_path / "features"
    folder.mkdir()
    data = np.load(blobs)
    np.save(folder / "features.npy", data["features"])
    np.save(folder / "labels.npy", data["labels"])
    options = {"features_path": str(folder), "pca": None, "num_clusters": 3, "cache_dir": str(tmp_path)}
    assert DigitsClustering(**options, **SMALL).baselines()["kmeans_ari"].mean() > 0.9
    folder_time = os.stat(folder).st_mtime_ns
    np.save(folder / "features.npy", np.random.default_rng(1).normal(size=(360, 8)))
    os.utime(folder, ns=(folder_time, folder_time))
    noise = DigitsClustering(**options, **SMALL)
    assert noise.baselines()["kmeans_ari"].mean() < 0.5
    with pytest.raises(ValueError, match="num_clusters"):
        DigitsClustering(features_path=str(blobs), num_clusters=7, pca=None).data()
    with pytest.raises(ValueError, match="pca=16 exceeds"):
        DigitsClustering(features_path=str(blobs)).data()


def test_training_lowers_the_loss(task: DigitsClustering) -> None:
    torch.manual_seed(0)
    model = task.build_model("isab16-pma")
    batch = task.sample_batch(4, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]


def test_plot_writes_a_png(task: DigitsClustering, tmp_path: Path) -> None:
    paths = task.plot(task.build_model("isab16-pma"), tmp_path / "plots", torch.device("cpu"))
    assert len(paths) == 1 and paths[0].read_bytes()[:4] == b"\x89PNG"


def test_a_split_without_enough_classes_is_refused(tmp_path: Path) -> None:
    """A class of one image has none in the test split: its sets would hold fewer clusters than the
    metrics assume."""
    rng = np.random.default_rng(2)
    labels = np.r_[np.arange(150) % 3, 3]
    np.savez(tmp_path / "rare.npz", features=rng.normal(size=(151, 8)), labels=labels)
    task = DigitsClustering(features_path=str(tmp_path / "rare.npz"), pca=None, num_clusters=4, **SMALL)
    with pytest.raises(ValueError, match=r"its test split .* holds 3 classes, fewer than num_clusters=4"):
        task.data()
