"""The mog-clustering task: models, batches, loss, training, metrics and plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from settransformer.tasks.base import Task
from settransformer.tasks.mog_clustering import MoGClustering

SMALL = {"num_test_sets": 8, "min_size": 20, "max_size": 60, "dim_hidden": 16}


@pytest.fixture
def task(tmp_path: Path) -> MoGClustering:
    return MoGClustering(cache_dir=str(tmp_path), **SMALL)


class OracleModel(nn.Module):
    """Emits the true parameters of each benchmark set (found by its first point)."""

    def __init__(self, bench: dict[str, Tensor]) -> None:
        super().__init__()
        self.bench = bench
        self.anchor = nn.Parameter(torch.zeros(()))  # so the model has a device

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        first = self.bench["x"][:, 0]  # (S, D)
        idx = torch.stack([torch.nonzero((first == xb[0]).all(1))[0, 0] for xb in x])
        raw_sigma = torch.log(torch.expm1(self.bench["sigma"][idx] - 1e-3))  # inverse of softplus + floor
        return torch.cat([self.bench["log_pi"][idx, :, None], self.bench["mu"][idx], raw_sigma], -1)


def test_is_a_task_with_the_paper_table() -> None:
    assert issubclass(MoGClustering, Task)
    assert MoGClustering.model_names[0] == "rff-pool" and len(MoGClustering.model_names) == 9
    assert set(MoGClustering.paper) == set(MoGClustering.model_names)
    assert MoGClustering.metric == "ll0" and MoGClustering.higher_is_better
    assert MoGClustering.budget("paper")["lr_milestones"] == [35_000]
    assert MoGClustering.budget("quick")["steps"] < 5_000
    with pytest.raises(ValueError, match="budget"):
        MoGClustering.budget("huge")
    with pytest.raises(ValueError, match="unknown option"):
        MoGClustering(colour="red")
    with pytest.raises(ValueError, match="max_size"):
        MoGClustering(min_size=50, max_size=10)


def test_official_variant_uses_the_official_blocks() -> None:
    from torch import nn

    task = MoGClustering(dim_hidden=32)
    ours, official = task.build_model("isab16-pma"), task.build_model("isab16-pma-official")
    assert sum(p.numel() for p in official.parameters()) < sum(p.numel() for p in ours.parameters())
    mabs = [m for m in official.modules() if type(m).__name__ == "MAB"]
    assert len(mabs) == 2 * 2 + 1 + 1  # two ISABs, PMA, one decoder SAB
    for mab in mabs:
        assert mab.norm is None and mab.residual == "projected" and isinstance(mab.to_out, nn.Identity)
        assert mab.scale == pytest.approx(32**-0.5)
    assert not any(isinstance(m, nn.LayerNorm) for m in official.modules())


@pytest.mark.parametrize(("dim", "k"), [(2, 4), (1, 5)])
def test_every_model_emits_k_components(dim: int, k: int) -> None:
    task = MoGClustering(dim=dim, num_components=k, dim_hidden=16)
    batch = task.sample_batch(3, torch.Generator().manual_seed(0))
    assert batch.x.shape[0] == 3 and batch.x.shape[2] == dim and batch.mask is None
    assert 100 <= batch.x.shape[1] <= 500 and batch.target.shape == batch.x.shape[:2]
    for name in task.model_names:
        out = task.build_model(name)(batch.x[:, :50])
        assert out.shape == (3, k, 1 + 2 * dim), name
    with pytest.raises(ValueError, match="model_name"):
        task.build_model("transformer-xl")


def test_training_lowers_the_loss_on_a_fixed_batch(task: MoGClustering) -> None:
    torch.manual_seed(0)
    model = task.build_model("isab16-pma")
    batch = task.sample_batch(4, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_evaluate_with_the_true_parameters_matches_the_oracle(task: MoGClustering) -> None:
    bench = task.benchmark()
    metrics = task.evaluate(OracleModel(bench), torch.device("cpu"))
    assert metrics["ll0"] == pytest.approx(metrics["oracle"], abs=1e-4)
    assert metrics["oracle"] == pytest.approx(bench["oracle_ll"].mean().item())
    assert abs(metrics["ll0_gap"]) < 1e-4
    assert metrics["ll1"] >= metrics["ll0"] - 1e-5  # EM from the truth climbs to the MLE
    assert metrics["ari"] == pytest.approx(metrics["oracle_ari"], abs=1e-6)
    assert 0.5 < metrics["ari"] <= 1 and 0 < metrics["nmi"] <= 1


def test_evaluate_an_untrained_model(task: MoGClustering) -> None:
    metrics = task.evaluate(task.build_model("sab-pma"), torch.device("cpu"))
    assert set(metrics) >= {"ll0", "ll1", "oracle", "ll0_gap", "ari", "nmi", "ari1", "oracle_ari"}
    assert metrics["ll0"] < metrics["oracle"] and metrics["ll1"] > metrics["ll0"]
    assert "k_accuracy" not in metrics


def test_varying_number_of_clusters_is_counted(tmp_path: Path) -> None:
    task = MoGClustering(
        cache_dir=str(tmp_path), vary_components=True, count_threshold=0.0, count_separation=0.0, **SMALL
    )
    bench = task.benchmark()
    assert len(set(bench["num_clusters"].tolist())) > 1
    metrics = task.evaluate(OracleModel(bench), torch.device("cpu"))
    assert metrics["k_accuracy"] == metrics["oracle_k_accuracy"] == 1.0
    batch = task.sample_batch(6, torch.Generator().manual_seed(0))
    assert (batch.target < batch.extra["num_clusters"][:, None]).all()


def test_the_shared_training_loop_runs_the_task(task: MoGClustering, tmp_path: Path) -> None:
    train_mod = pytest.importorskip("settransformer.training.loop")
    from settransformer.training.config import TrainConfig

    model = task.build_model("rff-pma")
    config = TrainConfig(steps=4, batch_size=2, lr=1e-3, device="cpu", progress=False)
    result = train_mod.train(model, task, config, tmp_path / "run", model_name="rff-pma")
    assert set(result["metrics"]) >= {"ll0", "ll1", "ari"}


@pytest.mark.parametrize("dim", [2, 1])
def test_plot_writes_a_png(tmp_path: Path, dim: int) -> None:
    task = MoGClustering(cache_dir=str(tmp_path), dim=dim, **SMALL)
    paths = task.plot(task.build_model("isab16-pma"), tmp_path / "plots", torch.device("cpu"))
    assert len(paths) == 1 and paths[0].suffix == ".png"
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
