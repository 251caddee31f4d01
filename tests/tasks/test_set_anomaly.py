"""``settransformer.tasks.set_anomaly``: set sampling, the equivariant scorer, metrics, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from settransformer.tasks.set_anomaly import ElementScorer, SetAnomaly
from settransformer.training.config import TrainConfig
from settransformer.training.loop import train


@pytest.fixture(scope="module")
def task() -> SetAnomaly:
    return SetAnomaly(test_sets=200)


def class_counts(labels: Tensor) -> list[dict[int, int]]:
    return [dict(zip(*np.unique(row.numpy(), return_counts=True))) for row in labels]


@pytest.mark.parametrize("normal_classes", [1, 2, 3])
def test_one_odd_element_per_set(normal_classes: int) -> None:
    task = SetAnomaly(normal_classes=normal_classes, test_sets=10)
    batch = task.sample_batch(300, torch.Generator().manual_seed(0))
    assert batch.x.shape == (300, 8, 64) and batch.mask is None
    anomaly = batch.extra["anomaly"]
    assert torch.equal(anomaly.sum(1), torch.ones(300, dtype=torch.long))
    assert torch.equal(anomaly.float().argmax(1), batch.target)
    labels = torch.from_numpy(task.part("train").labels)[batch.extra["index"]]
    odd = labels[torch.arange(300), batch.target]
    for counts, o in zip(class_counts(labels), odd.tolist()):
        assert counts[o] == 1  # the odd class appears once...
        normal = {k: v for k, v in counts.items() if k != o}
        assert len(normal) == normal_classes and min(normal.values()) >= 2  # ...the others at least twice
    # The odd one is anywhere in the set.
    assert set(batch.target.tolist()) == set(range(8))


def test_variable_sizes_are_padded(task: SetAnomaly) -> None:
    varied = SetAnomaly(min_size=5, test_sets=10)
    batch = varied.sample_batch(200, torch.Generator().manual_seed(1))
    assert batch.mask is not None
    sizes = batch.mask.sum(1)
    assert sizes.min() == 5 and sizes.max() == 8
    assert bool(batch.mask[torch.arange(200), batch.target].all())  # the odd one is a real element
    assert bool((batch.x[~batch.mask] == 0).all())
    assert not bool(batch.extra["anomaly"][~batch.mask].any())


def test_sampling_is_repeatable_and_test_sets_fixed(task: SetAnomaly) -> None:
    a = task.sample_batch(8, torch.Generator().manual_seed(3))
    b = task.sample_batch(8, torch.Generator().manual_seed(3))
    assert torch.equal(a.x, b.x) and torch.equal(a.target, b.target)
    assert torch.equal(SetAnomaly(test_sets=200).test_batch().x, task.test_batch().x)


def test_attribute_labels_follow_the_papers_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    attrs = (rng.random((400, 4)) < 0.5).astype(np.uint8)
    path = tmp_path / "faces.npz"
    np.savez(path, images=rng.random((400, 6, 6, 3)).astype(np.float32), labels=attrs)
    task = SetAnomaly(data=str(path), test_sets=20)
    batch = task.sample_batch(100, torch.Generator().manual_seed(0))
    assert batch.x.shape == (100, 8, 3 * 6 * 6)
    have = torch.from_numpy(task.part("train").labels)[batch.extra["index"]]  # (B, N, A)
    odd = batch.extra["anomaly"]
    # Some pair of attributes is shared by all normal images and absent from the odd one.
    for h, o in zip(have, odd):
        both = h[~o].all(0) & ~h[o][0]
        assert int(both.sum()) >= 2
    model = task.build_model("sab-pma")
    assert model(batch.x, batch.mask).shape == (100, 8)


@pytest.mark.parametrize("encoder", ["attention", "rff"])
@pytest.mark.parametrize("decoder", ["pma", "mean"])
def test_scorer_is_equivariant_and_ignores_padding(encoder: str, decoder: str) -> None:
    scorer = ElementScorer(16, 4, encoder, decoder).eval()
    x = torch.randn(3, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [False, True, True, False, True, True, True]])
    scores = scorer(x, mask)
    assert scores.shape == (3, 7)
    assert bool(torch.isinf(scores[~mask]).all()) and bool(torch.isfinite(scores[mask]).all())
    perm = torch.randperm(7)
    assert torch.allclose(scorer(x[:, perm], mask[:, perm]), scores[:, perm], atol=1e-5)
    junk = x.masked_fill(~mask[..., None], 100.0)
    assert torch.allclose(scorer(junk, mask)[mask], scores[mask], atol=1e-5)


def test_padding_is_never_chosen(task: SetAnomaly) -> None:
    varied = SetAnomaly(min_size=5, test_sets=50)
    model = varied.build_model("rff-pool")
    with torch.no_grad():
        nn.init.constant_(model.set_model.head.bias, 50.0)  # large scores everywhere
    prob = varied.predict(model, varied.test_batch(), torch.device("cpu"))
    mask = varied.test_batch().mask
    assert mask is not None and bool((prob[~mask] == 0).all())
    assert bool(mask[torch.arange(50), prob.argmax(1)].all())
    assert torch.allclose(prob.sum(1), torch.ones(50))


class Oracle(nn.Module):
    """Scores the test sets' true odd ones ``sign * 5`` above the rest."""

    def __init__(self, anomaly: Tensor, sign: float) -> None:
        super().__init__()
        self.anomaly, self.sign = anomaly, sign
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.anomaly[: x.shape[0]].float() * 5 * self.sign + self.dummy


def test_metrics(task: SetAnomaly) -> None:
    anomaly = task.test_batch().extra["anomaly"]
    perfect = task.evaluate(Oracle(anomaly, 1.0), torch.device("cpu"))
    assert perfect == {"auroc": 1.0, "aupr": 1.0, "accuracy": 1.0}
    worst = task.evaluate(Oracle(anomaly, -1.0), torch.device("cpu"))
    assert worst["auroc"] == 0.0 and worst["accuracy"] == 0.0
    assert worst["aupr"] == pytest.approx(1 / 8, abs=0.01)
    loss = task.loss(Oracle(anomaly, 1.0), task.test_batch()).detach()
    expected = -torch.log_softmax(torch.tensor([5.0] + [0.0] * 7), 0)[0]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_models_and_options(task: SetAnomaly) -> None:
    batch = task.sample_batch(4, torch.Generator().manual_seed(0))
    for name in SetAnomaly.model_names:
        assert task.build_model(name)(batch.x, batch.mask).shape == (4, 8)
    with pytest.raises(ValueError, match="rff-pool"):
        task.build_model("deepsets")
    with pytest.raises(ValueError, match="min_size"):
        SetAnomaly(normal_classes=3, set_size=6)
    with pytest.raises(ValueError, match="min_size"):
        SetAnomaly(min_size=9)


def test_short_training_finds_the_odd_one() -> None:
    task = SetAnomaly(normal_classes=1, test_sets=200, dim_hidden=32)
    torch.manual_seed(0)
    model = task.build_model("sab-pma")
    config = TrainConfig(steps=80, batch_size=16, lr=1e-3, device="cpu", progress=False)
    metrics = train(model, task, config, model_name="sab-pma")["metrics"]
    assert metrics["accuracy"] > 0.35 and metrics["auroc"] > 0.75  # chance: 0.125 and 0.5


def test_folder_with_too_few_classes_and_plots(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(3):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8), mode="L").save(
                tmp_path / "imgs" / f"c{k}" / f"{i}.png"
            )
    with pytest.raises(ValueError, match="normal_classes=3"):
        SetAnomaly(data=str(tmp_path / "imgs"), normal_classes=3, set_size=8).sample_batch(
            2, torch.Generator()
        )
    task = SetAnomaly(data=str(tmp_path / "imgs"), normal_classes=1, set_size=4, test_sets=12)
    model = task.build_model("sab-pool")
    paths = task.plot(model, tmp_path / "plots", torch.device("cpu"))
    assert {p.name for p in paths} == {"set_anomaly_examples.png", "set_anomaly_curves.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
