"""Max-value regression: data, models, loss, metric, plot, and that it can be learned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from settransformer.nn.sets import masked_pool
from settransformer.tasks import get_task
from settransformer.tasks.max_regression import MaxRegression
from settransformer.training.config import TrainConfig
from settransformer.training.loop import train


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Oracle(nn.Module):
    """The true maximum: ``x: (B, N, 1)``, ``mask: (B, N)`` -> ``(B,)``."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return masked_pool(x, mask, "max").reshape(-1)


def test_registered() -> None:
    assert get_task("max-regression") is MaxRegression
    assert MaxRegression.model_names[:4] == (
        "deepsets-mean",
        "deepsets-sum",
        "deepsets-max",
        "settransformer",
    )
    assert set(MaxRegression.model_names[4:]) == {"lstm", "janet", "indrnn", "transformer-pe"}


def test_order_aware_baselines_are_sensitive_to_order_and_set_models_are_not() -> None:
    torch.manual_seed(0)
    task = MaxRegression(test_sets=64)
    device = torch.device("cpu")
    sens = {
        name: task.evaluate(task.build_model(name), device)["perm_sensitivity"] for name in task.model_names
    }
    for name in SET_MODELS:
        assert sens[name] < 1e-4, (name, sens[name])
    for name in ("lstm", "janet", "indrnn", "transformer-pe"):
        assert sens[name] > 1e-3, (name, sens[name])


def test_batches_are_padded_sets_with_their_maximum() -> None:
    task = MaxRegression(min_size=2, max_size=6, low=-5.0, high=5.0)
    batch = task.sample_batch(256, torch.Generator().manual_seed(0))
    assert batch.x.shape[0] == 256 and batch.x.shape[2] == 1 and batch.x.shape[1] == 6
    assert batch.mask is not None and batch.mask.dtype == torch.bool
    sizes = batch.mask.sum(1)
    assert sizes.min() == 2 and sizes.max() == 6  # both ends of U{2..6} occur among 256 draws
    assert (batch.x[~batch.mask] == 0).all()
    real = batch.x[batch.mask]
    assert real.min() >= -5 and real.max() <= 5 and real.min() < -4 and real.max() > 4
    for i in range(5):
        assert batch.target[i] == batch.x[i, batch.mask[i], 0].max()
    again = task.sample_batch(256, torch.Generator().manual_seed(0))
    assert torch.equal(again.x, batch.x) and torch.equal(again.target, batch.target)


SET_MODELS = ("deepsets-mean", "deepsets-sum", "deepsets-max", "settransformer")


def test_every_set_model_is_a_permutation_invariant_set_function() -> None:
    task = MaxRegression(dim_hidden=16, test_sets=8)
    batch = task.sample_batch(6, torch.Generator().manual_seed(1))
    perm = torch.randperm(batch.x.shape[1])
    for name in SET_MODELS:
        torch.manual_seed(0)
        model = task.build_model(name).eval()
        out = model(batch.x, batch.mask)
        assert out.shape == (6,)
        torch.testing.assert_close(model(batch.x[:, perm], batch.mask[:, perm]), out)  # type: ignore[index]
        junk = batch.x.masked_fill(~batch.mask[..., None], 1e4)  # type: ignore[index]
        torch.testing.assert_close(model(junk, batch.mask), out)  # padding is ignored
    with pytest.raises(ValueError, match="model: expected one of deepsets-mean"):
        task.build_model("deepsets-median")


def test_loss_is_the_mean_absolute_error() -> None:
    task = MaxRegression(test_sets=8)
    batch = task.sample_batch(32, torch.Generator().manual_seed(2))
    model = task.build_model("deepsets-max")
    expected = (model(batch.x, batch.mask) - batch.target).abs().mean()
    torch.testing.assert_close(task.loss(model, batch), expected)
    assert task.loss(Oracle(), batch) == 0


def test_evaluate_on_a_fixed_test_set() -> None:
    task = MaxRegression(test_sets=300)
    assert task.evaluate(Oracle(), torch.device("cpu")) == {"mae": 0.0, "rmse": 0.0, "perm_sensitivity": 0.0}
    model = task.build_model("deepsets-mean")
    first = task.evaluate(model, torch.device("cpu"))
    assert first["mae"] > 1 and first["rmse"] >= first["mae"]
    assert MaxRegression(test_sets=300).evaluate(model, torch.device("cpu")) == first  # seeded, not random
    assert MaxRegression(test_sets=300, test_seed=5).evaluate(model, torch.device("cpu")) != first


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="min_size <= max_size"):
        MaxRegression(min_size=5, max_size=2)
    with pytest.raises(ValueError, match="low < high"):
        MaxRegression(low=1.0, high=1.0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['size'\]"):
        MaxRegression(size=3)


def test_budgets() -> None:
    paper = MaxRegression.budget("paper")
    assert (paper["steps"], paper["batch_size"], paper["lr"]) == (20_000, 128, 1e-3)
    assert not paper.get("lr_milestones")  # constant rate, as in the paper
    for name in ("quick", "paper"):
        TrainConfig.from_dict(MaxRegression.budget(name))
    with pytest.raises(ValueError, match="budget"):
        MaxRegression.budget("huge")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    (path,) = MaxRegression(test_sets=50).plot(Oracle(), tmp_path, torch.device("cpu"))
    assert path == tmp_path / "max_regression.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_max_pooling_learns_the_maximum_and_mean_pooling_cannot() -> None:
    task = MaxRegression(dim_hidden=32, test_sets=500)
    config = TrainConfig(
        steps=300, batch_size=64, lr=3e-3, lr_milestones=(200,), device="cpu", progress=False
    )
    mae = {}
    for name in ("deepsets-mean", "deepsets-max"):
        torch.manual_seed(0)
        model = task.build_model(name)
        untrained = task.evaluate(model, torch.device("cpu"))["mae"]
        mae[name] = train(model, task, config)["metrics"]["mae"]
        assert mae[name] < untrained / 3
    assert (
        mae["deepsets-max"] < 2.0 and mae["deepsets-max"] < mae["deepsets-mean"] / 4
    )  # measured 1.1 vs 11.6
