"""The kernel-regression task: data, the table's models, loss, metrics and plots."""

from __future__ import annotations

import math

import pytest
import torch

from settransformer.tasks import get_task
from settransformer.tasks.kernel_regression import KernelRegression, NadarayaWatson
from settransformer.training.config import TrainConfig
from settransformer.training.loop import train

SMALL = {
    "test_sets": 24,
    "sensitivity_sets": 8,
    "dim_hidden": 16,
    "num_heads": 2,
    "max_size": 12,
    "min_size": 3,
}


@pytest.fixture
def task() -> KernelRegression:
    return KernelRegression(**SMALL)


def test_registered():
    assert get_task("kernel-regression") is KernelRegression
    assert KernelRegression.default_model in KernelRegression.model_names


def test_batches(task):
    g = torch.Generator().manual_seed(0)
    b = task.sample_batch(16, g)
    n = b.x.shape[1]
    assert b.x.shape == (16, n, 2) and b.mask.shape == (16, n) and b.target.shape == (16, 32)
    assert b.extra["queries"].shape == (16, 32, 1) and b.extra["amp"].shape == (16, 3)
    sizes = b.mask.sum(1)
    assert sizes.min() >= 3 and sizes.max() <= 12 and n == sizes.max()
    assert b.x[~b.mask].abs().sum() == 0
    real = b.x[b.mask]
    assert real[:, 0].min() >= 0 and real[:, 0].max() <= 5
    # targets are f(x_q) plus noise of the configured size
    clean = task.evaluate_function(b.extra, b.extra["queries"][..., 0])
    torch.testing.assert_close(clean, b.extra["clean"])
    assert 0.1 < float((b.target - clean).std()) < 0.3
    again = task.sample_batch(16, torch.Generator().manual_seed(0))
    assert torch.equal(again.x, b.x) and torch.equal(again.target, b.target)


def test_function_is_a_sum_of_sines(task):
    params = {
        "amp": torch.tensor([[1.0, -2.0]]),
        "freq": torch.tensor([[1.0, 0.5]]),
        "phase": torch.tensor([[0.0, 1.0]]),
    }
    x = torch.tensor([[0.3, 2.0]])
    expected = [math.sin(v) - 2 * math.sin(0.5 * v + 1) for v in (0.3, 2.0)]
    torch.testing.assert_close(task.evaluate_function(params, x), torch.tensor([expected]))


def test_noiseless_targets_are_the_function():
    task = KernelRegression(noise=0.0, **SMALL)
    b = task.sample_batch(4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b.target, b.extra["clean"])
    pairs = b.x[b.mask]
    assert pairs.shape[0] == int(b.mask.sum())


@pytest.mark.parametrize("name", KernelRegression.model_names)
def test_every_model_predicts_and_trains(task, name):
    torch.manual_seed(0)
    model = task.build_model(name)
    b = task.sample_batch(5, torch.Generator().manual_seed(2))
    pred = model(b.x, b.mask, b.extra["queries"])
    assert pred.shape == (5, 32) and torch.isfinite(pred).all()
    loss = task.loss(model, b)
    assert loss.dim() == 0 and loss.requires_grad  # even without parameters (the loop calls backward)
    loss.backward()
    assert list(model.parameters())  # optimisers need at least one
    # padded junk has no influence
    junk = b.x.masked_fill(~b.mask[..., None], 7.0)
    torch.testing.assert_close(model(junk, b.mask, b.extra["queries"]), pred, atol=1e-5, rtol=1e-5)


def test_average_and_nadaraya_watson_by_hand(task):
    b = task.sample_batch(3, torch.Generator().manual_seed(3))
    q = b.extra["queries"]
    avg = task.build_model("average")(b.x, b.mask, q)
    nw = task.build_model("nw-fixed")(b.x, b.mask, q)
    for i in range(3):
        xs, ys = b.x[i][b.mask[i]].unbind(-1)
        torch.testing.assert_close(avg[i], ys.mean().expand(32))
        k = torch.exp(-((q[i] - xs[None]) ** 2) / 2)  # the standard Gaussian kernel, h = 1
        torch.testing.assert_close(nw[i], (k @ ys) / k.sum(-1), atol=1e-5, rtol=1e-5)
    learned = task.build_model("nw-learned")
    assert [n for n, p in learned.named_parameters()] == ["kernel.log_bandwidth"]
    assert isinstance(learned, NadarayaWatson)


def test_attention_weights_for_the_heat_map(task):
    b = task.sample_batch(2, torch.Generator().manual_seed(4))
    q = b.extra["queries"]
    for name in ("nw-fixed", "settransformer", "settransformer-top8"):
        w = task.build_model(name).weights(b.x, b.mask, q)
        assert w.shape[0] == 2 and w.shape[2:] == (32, b.x.shape[1])
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert w.masked_select(~b.mask[:, None, None, :]).abs().sum() == 0
        if name.endswith("top8"):
            assert ((w > 0).sum(-1) <= 8).all()


def test_evaluate_reports_sensitivity(task):
    torch.manual_seed(0)
    metrics = {
        name: task.evaluate(task.build_model(name), torch.device("cpu"))
        for name in ("settransformer", "lstm")
    }
    for m in metrics.values():
        assert set(m) == {"mse", "mse_clean", "perm_sensitivity"} and m["mse"] > 0
    assert metrics["settransformer"]["perm_sensitivity"] < 1e-5
    assert metrics["lstm"]["perm_sensitivity"] > 1e-4


def test_training_learns_the_bandwidth(task):
    result = train(
        task.build_model("nw-learned"),
        task,
        TrainConfig(steps=40, batch_size=32, lr=0.05, progress=False, device="cpu"),
    )
    fixed = task.evaluate(task.build_model("nw-fixed"), torch.device("cpu"))
    assert result["metrics"]["mse"] < fixed["mse"]
    # a parameter-free row goes through the same loop
    assert (
        train(task.build_model("average"), task, TrainConfig(steps=2, progress=False, device="cpu"))["step"]
        == 2
    )


def test_plots(task, tmp_path):
    model = task.build_model("settransformer")
    paths = task.plot(model, tmp_path, torch.device("cpu"))
    assert [p.name for p in paths] == ["kernel_regression_fit.png", "kernel_regression_attention.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    paths = task.plot_models({"lstm": task.build_model("lstm")}, tmp_path / "seq", torch.device("cpu"))
    assert [p.name for p in paths] == ["kernel_regression_fit.png"]


def test_bad_options_and_names():
    with pytest.raises(ValueError, match="min_size"):
        KernelRegression(min_size=5, max_size=2)
    with pytest.raises(ValueError, match="x_low"):
        KernelRegression(x_low=1.0, x_high=1.0)
    with pytest.raises(ValueError, match="freq_low, freq_high: expected freq_low <= freq_high"):
        KernelRegression(freq_low=3.0, freq_high=1.0)
    with pytest.raises(ValueError, match="unknown option"):
        KernelRegression(sigma=1.0)
    with pytest.raises(ValueError, match="model"):
        KernelRegression().build_model("gp")
    with pytest.raises(ValueError, match="budget"):
        KernelRegression.budget("long")
    assert KernelRegression.budget("quick")["steps"] < KernelRegression.budget("paper")["steps"]


def test_nadaraya_watson_ignores_whatever_the_padding_holds():
    """Padded context points (junk, NaN) change nothing: the same output as the real points alone."""
    torch.manual_seed(0)
    model = NadarayaWatson(bandwidth=1.0)
    context, queries = torch.randn(1, 10, 2) * 30 + 1000, torch.randn(1, 3, 1) * 30 + 1000
    mask = torch.tensor([[True] * 6 + [False] * 4])
    alone = model(context[:, :6], None, queries)
    for junk in (0.0, 1e4, float("nan")):
        padded = context.masked_fill(~mask[..., None], junk)
        torch.testing.assert_close(model(padded, mask, queries), alone, atol=1e-4, rtol=1e-5)
