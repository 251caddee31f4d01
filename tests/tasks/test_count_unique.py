"""``settransformer.tasks.count_unique``: set sampling, the Poisson rule, models, metrics, plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from settransformer.tasks.count_unique import CountUnique, poisson_mode
from settransformer.training.config import TrainConfig
from settransformer.training.loop import train


@pytest.fixture(scope="module")
def task() -> CountUnique:
    return CountUnique(test_sets=300)


def distinct(labels: Tensor, mask: Tensor) -> list[int]:
    return [len(set(row[m].tolist())) for row, m in zip(labels, mask)]


def test_sets_hold_the_target_number_of_classes(task: CountUnique) -> None:
    batch = task.sample_batch(400, torch.Generator().manual_seed(0))
    assert batch.x.shape == (400, 10, 64) and batch.mask is not None
    sizes = batch.mask.sum(1)
    assert sizes.min() == 6 and sizes.max() == 10
    assert torch.equal(batch.mask, torch.arange(10) < sizes[:, None])  # real elements first
    # The count is recomputed from the images' own labels, not from the sampler's bookkeeping.
    labels = torch.from_numpy(task.part("train").labels)[batch.extra["index"]]
    assert distinct(labels, batch.mask) == batch.target.long().tolist()
    assert batch.target.min() == 1 and batch.target.max() == 10
    assert bool((batch.target <= sizes).all())
    assert bool((batch.x[~batch.mask] == 0).all())
    raw = torch.from_numpy(task.part("train").images[batch.extra["index"][batch.mask].numpy()]).flatten(1)
    assert torch.equal(batch.x[batch.mask], raw)  # raw pixels: the model normalises them
    model = task.build_model(task.model_names[0])
    assert float(model.pixel_mean) == task.pixel_mean and float(model.pixel_std) == task.pixel_std
    assert abs(task.pixel_mean - float(task.part("train").images.mean())) < 1e-4


def test_counts_are_uniform_given_the_size(task: CountUnique) -> None:
    batch = task.sample_batch(4000, torch.Generator().manual_seed(1))
    sizes = batch.mask.sum(1)  # type: ignore[union-attr]
    c = batch.target[sizes == 6]
    freq = torch.bincount(c.long(), minlength=7)[1:].float() / len(c)
    assert torch.allclose(freq, torch.full((6,), 1 / 6), atol=0.05)


def test_sampling_is_repeatable_and_test_sets_are_fixed(task: CountUnique) -> None:
    a = task.sample_batch(16, torch.Generator().manual_seed(5))
    b = task.sample_batch(16, torch.Generator().manual_seed(5))
    assert torch.equal(a.x, b.x) and torch.equal(a.target, b.target)
    other = CountUnique(test_sets=300)
    assert torch.equal(other.test_batch().x, task.test_batch().x)
    test_labels = torch.from_numpy(task.part("test").labels)[task.test_batch().extra["index"]]
    assert distinct(test_labels, task.test_batch().mask) == task.test_batch().target.long().tolist()


def test_poisson_mode_rule() -> None:
    rate = torch.tensor([0.3, 2.0, 2.999, 3.0, 7.5])
    assert poisson_mode(rate).tolist() == [0.0, 2.0, 2.0, 3.0, 7.0]


class FixedRate(nn.Module):
    """Outputs ``softplus^-1(rate)`` for a fixed vector of rates (one per test set)."""

    def __init__(self, rate: Tensor) -> None:
        super().__init__()
        self.raw = nn.Parameter(rate + torch.log(-torch.expm1(-rate)))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.raw[: x.shape[0], None, None]


def test_metrics_and_loss_follow_the_poisson_rule(task: CountUnique) -> None:
    count = task.test_batch().target
    hit = task.evaluate(FixedRate(count + 0.3), torch.device("cpu"))
    assert hit["accuracy"] == 1.0 and hit["mae"] == 0.0 and hit["accuracy_rounded"] == 1.0
    # Just below the true count: the Poisson mode is one less, rounding would still be right.
    miss = task.evaluate(FixedRate(count - 0.25), torch.device("cpu"))
    assert miss["accuracy"] == 0.0 and miss["mae"] == pytest.approx(1.0) and miss["accuracy_rounded"] == 1.0
    rate = count + 0.3
    nll = (rate - count * torch.log(rate) + torch.lgamma(count + 1)).mean()
    assert hit["nll"] == pytest.approx(float(nll), rel=1e-5)
    loss = task.loss(FixedRate(rate), task.test_batch()).detach()
    assert float(loss) == pytest.approx(float(nll), rel=1e-5)
    # For the loss, the best constant rate is the mean count.
    with torch.no_grad():
        nlls = [
            float(task.loss(FixedRate(torch.full_like(count, r)), task.test_batch())) for r in (3.0, 4.0, 5.0)
        ]
    best = [3.0, 4.0, 5.0][int(np.argmin(nlls))]
    assert abs(best - float(count.mean())) < 1.0


@pytest.mark.parametrize("name", CountUnique.model_names)
def test_models_are_permutation_and_padding_invariant(task: CountUnique, name: str) -> None:
    model = task.build_model(name).eval()
    batch = task.sample_batch(6, torch.Generator().manual_seed(2))
    x, mask = batch.x, batch.mask
    assert mask is not None
    out = model(x, mask)
    assert out.shape == (6, 1, 1)
    perm = torch.randperm(10)
    assert torch.allclose(model(x[:, perm], mask[:, perm]), out, atol=1e-5)
    junk = x.masked_fill(~mask[..., None], 3.0)
    assert torch.allclose(model(junk, mask), out, atol=1e-5)


def test_cnn_encoder_and_unknown_model(task: CountUnique) -> None:
    cnn = CountUnique(image_encoder="cnn", test_sets=10)
    model = cnn.build_model("sab-pma")
    batch = cnn.sample_batch(3, torch.Generator().manual_seed(0))
    assert model(batch.x, batch.mask).shape == (3, 1, 1)
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    with pytest.raises(ValueError, match="sab-pma"):
        task.build_model("transformer")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_size": 5, "max_size": 4}, "min_size"),
        ({"image_encoder": "resnet"}, "image_encoder"),
        ({"data": "/no/such/folder"}, "does not exist"),
        ({"dim_hidden": 30}, "num_heads"),
        ({"colour": True}, "unknown option"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CountUnique(**options)


def test_short_training_learns_to_count() -> None:
    task = CountUnique(test_sets=200, dim_hidden=32)
    torch.manual_seed(0)
    model = task.build_model("sab-pma")
    before = task.evaluate(model, torch.device("cpu"))
    config = TrainConfig(steps=60, batch_size=16, lr=3e-3, device="cpu", progress=False)
    after = train(model, task, config, model_name="sab-pma")["metrics"]
    assert after["nll"] < before["nll"] - 1.0
    assert after["mae"] < before["mae"]


def write_folder(root: Path, classes: int, per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.zeros((6, 6), np.uint8)
            pixels[k % 6] = 255  # a class is a bright row, plus noise
            pixels = np.clip(pixels + rng.integers(0, 40, (6, 6)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / f"class{k}" / f"{i}.png")


def test_bring_your_own_folder_and_plots(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs", classes=4, per_class=5)
    task = CountUnique(data=str(tmp_path / "imgs"), min_size=2, max_size=5, test_sets=40, image_size=8)
    batch = task.sample_batch(50, torch.Generator().manual_seed(0))
    assert batch.x.shape == (50, 5, 64)
    assert batch.target.max() == 4  # at most the 4 classes there are
    model = task.build_model("rff-pool")
    metrics = task.evaluate(model, torch.device("cpu"))
    assert set(metrics) == {"accuracy", "accuracy_rounded", "mae", "nll"} and all(
        math.isfinite(v) for v in metrics.values()
    )
    paths = task.plot(model, tmp_path / "plots", torch.device("cpu"))
    assert {p.name for p in paths} == {"count_unique_examples.png", "count_unique_accuracy.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_attribute_labels_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "attrs.npz"
    np.savez(path, images=np.zeros((20, 4, 4)), labels=np.ones((20, 3), int))
    with pytest.raises(ValueError, match="class labels"):
        CountUnique(data=str(path)).sample_batch(2, torch.Generator())
