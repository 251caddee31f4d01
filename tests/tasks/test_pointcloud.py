"""The point-cloud classification task: sources, preprocessing, models, metrics, plots."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from settransformer.tasks.pointcloud import PointCloudClassification
from settransformer.training.loop import TrainConfig, train

CPU = torch.device("cpu")
SMALL = {"dim_hidden": 16, "num_heads": 2, "num_inducing": 4}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_batches_are_repeatable_and_standardised() -> None:
    task = PointCloudClassification(num_points=64, test_size=48)
    a, b = task.sample_batch(8, _gen()), task.sample_batch(8, _gen())
    assert a.x.shape == (8, 64, 3) and a.mask is None and a.target.shape == (8,)
    assert torch.equal(a.x, b.x) and torch.equal(a.target, b.target)
    assert not torch.equal(a.x, task.sample_batch(8, _gen(1)).x)
    # the DeepSets rule per cloud: scalar mean 0 and std 1 over all points and axes
    torch.testing.assert_close(a.x.mean((1, 2)), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.x.std((1, 2), unbiased=False), torch.ones(8), atol=1e-4, rtol=0)
    x, mask, y = task.test_split()
    assert x.shape == (48, 64, 3) and mask is None and torch.bincount(y).tolist() == [4] * 12
    # the fixed test set does not depend on the instance
    assert torch.equal(PointCloudClassification(num_points=64, test_size=48).test_split()[0], x)


@pytest.mark.parametrize("model_name", PointCloudClassification.model_names)
def test_every_model_trains_a_step_and_scores_every_test_cloud(model_name: str) -> None:
    task = PointCloudClassification(source="digits", **SMALL)
    model = task.build_model(model_name)
    batch = task.sample_batch(6, _gen())
    assert batch.mask is not None and batch.x.shape[2] == 3
    loss = task.loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(np.log(10), rel=0.5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    logits = task.predict(model, CPU)
    assert logits.shape == (359, 10)  # 359 test digits: not a multiple of the eval chunk, none dropped
    metrics = task.evaluate(model, CPU)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["test_loss"] > 0
    per_class = [metrics[f"class_accuracy/{d}"] for d in range(10)]
    assert metrics["mean_class_accuracy"] == pytest.approx(np.mean(per_class))
    assert model.training  # evaluation restored the mode


def test_evaluate_counts_hits_correctly(tmp_path: Path) -> None:
    """An oracle that reads the label off a planted feature scores 1.0; a constant scores 1/classes."""
    x = np.random.default_rng(0).normal(size=(40, 5, 3)).astype(np.float32)
    labels = np.arange(40) % 4
    x[:, :, 2] = labels[:, None]  # the third feature carries the class
    np.savez(tmp_path / "a.npz", train_points=x, train_labels=labels, test_points=x, test_labels=labels,
             class_names=np.array(list("abcd")))  # fmt: skip
    task = PointCloudClassification(source="array", path=str(tmp_path / "a.npz"), standardize="none", **SMALL)

    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return torch.nn.functional.one_hot(x[:, 0, 2].round().long(), 4).float()[:, None]

    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return torch.tensor([1.0, 0, 0, 0]).expand(x.shape[0], 1, 4)

    assert task.evaluate(Oracle(), CPU)["accuracy"] == 1.0
    const = task.evaluate(Constant(), CPU)
    assert const["accuracy"] == 0.25 and const["class_accuracy/a"] == 1.0 and const["class_accuracy/b"] == 0.0


def _array_file(tmp_path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    points = rng.normal(size=(30, n, 3)) * (1 + labels[:, None, None]) + 5
    np.savez(tmp_path / "clouds.npz", points=points.astype(np.float32), labels=labels)
    return tmp_path / "clouds.npz"


def test_array_source_random_subsets_train_statistics_and_augmentation(tmp_path: Path) -> None:
    path = _array_file(tmp_path)
    task = PointCloudClassification(
        source="array", path=str(path), num_points=10, subsample="random", test_subsample="fixed",
        standardize="train", augment=True, **SMALL,
    )  # fmt: skip
    a, b = task.sample_batch(4, _gen()), task.sample_batch(4, _gen(1))
    assert a.x.shape == (4, 10, 3) and task.train_size() == 24
    assert not torch.equal(a.x, b.x)
    st = task.clouds().standardizer
    assert st is not None and st.mean == pytest.approx(5.0, abs=0.5)  # statistics of the training split
    x, _, _ = task.test_split()
    assert x.shape == (6, 10, 3) and abs(float(x.mean())) < 0.5
    batch = task.train_batch(torch.tensor([0, 1, 2]), _gen())
    assert batch.target.tolist() == task.data().train.labels[:3].tolist()


def test_deepsets_h5_source_end_to_end(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "ModelNet40_cloud.h5", "w") as f:
        f["tr_cloud"] = rng.normal(size=(8, 100, 3)).astype(np.float32)
        f["tr_labels"] = np.arange(8) % 2
        f["test_cloud"] = rng.normal(size=(3, 100, 3)).astype(np.float32)
        f["test_labels"] = np.array([0, 1, 1])
    task = PointCloudClassification(
        source="deepsets-h5", path=str(tmp_path / "ModelNet40_cloud.h5"), num_points=20, **SMALL
    )
    assert task.preprocessing.augment and task.class_names == ["0", "1"]
    assert task.sample_batch(5, _gen()).x.shape == (5, 20, 3)
    assert task.test_split()[0].shape == (3, 20, 3)
    too_many = PointCloudClassification(
        source="deepsets-h5", path=str(tmp_path / "ModelNet40_cloud.h5"), num_points=500
    )
    with pytest.raises(ValueError, match="num_points: 500 is more than the 100 points"):
        too_many.test_split()


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="source"):
        PointCloudClassification(source="mnist")
    with pytest.raises(ValueError, match="path"):
        PointCloudClassification(source="pointnet-h5", path="/does/not/exist")
    with pytest.raises(ValueError, match="subsample"):
        PointCloudClassification(subsample="every")
    with pytest.raises(ValueError, match="num_points"):
        PointCloudClassification(num_points=0)
    with pytest.raises(ValueError, match="unknown option"):
        PointCloudClassification(points=100)
    with pytest.raises(ValueError, match="model"):
        PointCloudClassification(source="digits").build_model("pointnet")


def test_training_beats_chance_and_plots(tmp_path: Path) -> None:
    task = PointCloudClassification(source="digits", dim_hidden=32, dropout=0.0)
    model = task.build_model("rff-pool")
    config = TrainConfig(steps=150, batch_size=32, lr=3e-3, device="cpu", progress=False, seed=0)
    result = train(model, task, config, model_name="rff-pool")
    assert result["metrics"]["accuracy"] > 0.3  # chance is 0.1
    paths = task.plot(model, tmp_path, CPU)
    assert [p.name for p in paths] == ["pointcloud_confusion.png", "pointcloud_examples.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    shapes = PointCloudClassification(num_points=32, test_size=24, **SMALL)
    (p3,) = shapes.plot(shapes.build_model("isab-pma"), tmp_path / "3d", CPU)[1:]
    assert p3.is_file()
