"""The training loop: run folders, repeatability, exact resume, clipping, schedules; DDP: test_distributed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import settransformer
from settransformer.nn.models import DeepSets
from settransformer.tasks.base import Batch, Task
from settransformer.training.checkpoint import library_version, load_checkpoint
from settransformer.training.config import TrainConfig
from settransformer.training.loop import evaluated_weights, train
from settransformer.training.optim import WeightAverage, clamp_gradients, make_optimizer


class Tiny(Task):
    """Regress the sum of 5 numbers; the model has dropout, so the global RNG matters too."""

    name: ClassVar[str] = "tiny"
    model_names: ClassVar[tuple[str, ...]] = ("deepsets",)
    metric: ClassVar[str] = "mae"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, fail_at: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.calls, self.fail_at = 0, fail_at

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        return {"steps": 3, "batch_size": 8, "lr": 1e-2}

    def build_model(self, model_name: str) -> nn.Module:
        return DeepSets(1, 1, 1, dim_hidden=8, dropout=0.5)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        x = torch.rand(batch_size, 5, 1, generator=generator)
        return Batch(x, None, x.sum(dim=(1, 2)))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # a user pressing Ctrl-C in the middle of a step
        return F.l1_loss(model(batch.x, batch.mask).reshape(-1), batch.target)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        batch = self.sample_batch(64, torch.Generator().manual_seed(99)).to(device)
        mae = F.l1_loss(model(batch.x, batch.mask).reshape(-1), batch.target)
        return {"mae": float(mae), "touched_rng": float(torch.rand(()))}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    yield
    torch.set_num_threads(threads)


def _config(**changes: Any) -> TrainConfig:
    return TrainConfig(steps=6, batch_size=8, lr=1e-2, device="cpu", log_every=1, progress=False).replace(
        **changes
    )


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().build_model("deepsets")


def _lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_contents(tmp_path: Path) -> None:
    result = train(_model(), Tiny(), _config(eval_every=3), tmp_path / "run", model_name="deepsets")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "results.json",
    ]
    info = json.loads((run / "config.json").read_text())
    assert info["task"] == "tiny" and info["model"] == "deepsets" and info["seed"] == 0
    assert info["train"]["steps"] == 6 and "version" in info and info["task_options"] == {}
    lines = _lines(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) >= {"step", "loss", "lr", "elapsed"} for r in lines)
    assert [("mae" in r) for r in lines] == [False, False, True, False, False, True]
    assert result["step"] == 6 and result["metrics"]["mae"] == lines[-1]["mae"]
    assert result["best"] == min(lines[2]["mae"], lines[5]["mae"])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["model_name"] == "deepsets" and state["task"] == "tiny"
    assert {"model", "optimizer", "schedule", "rng", "version"} <= set(state)
    assert state["rng"][0]["data"].dtype == torch.uint8
    assert json.loads((run / "results.json").read_text())["metrics"] == result["metrics"]


def test_same_seed_same_losses_other_seed_other_losses(tmp_path: Path) -> None:
    runs = [(tmp_path / f"r{i}", seed) for i, seed in enumerate((0, 0, 1))]
    for run, seed in runs:
        train(_model(seed), Tiny(), _config(seed=seed), run)
    losses = [[r["loss"] for r in _lines(run)] for run, _ in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_resume_gives_exactly_the_uninterrupted_losses(tmp_path: Path) -> None:
    train(_model(), Tiny(), _config(steps=6), tmp_path / "straight", model_name="deepsets")
    train(_model(), Tiny(), _config(steps=3), tmp_path / "resumed", model_name="deepsets")
    # the first half ran to its end; a fresh process would rebuild the model from scratch
    train(
        _model(seed=123), Tiny(), _config(steps=6), tmp_path / "resumed", model_name="deepsets", resume=True
    )
    straight, resumed = _lines(tmp_path / "straight"), _lines(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    evaluated = {r["step"]: r["mae"] for r in straight if "mae" in r}  # steps 2, 4, 6
    assert evaluated == {r["step"]: r["mae"] for r in resumed if r["step"] in evaluated}
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for key in ("model", "average"):
        if a[key] is not None:
            wa, wb = a[key].get("weights", a[key]), b[key].get("weights", b[key])
            assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_takes_the_runs_learning_rate_weight_decay_and_optimizer(tmp_path: Path) -> None:
    """A resume with other settings (the CLI's ``--allow-changes``) trains with them: the checkpoint's
    optimiser state must not bring back its learning rate, weight decay or schedule's base rate."""
    first = _config(steps=3, lr_milestones=(2,), lr_gamma=0.5)
    train(_model(), Tiny(), first, tmp_path / "run", model_name="deepsets")
    later = first.replace(steps=5, lr=0.1, weight_decay=0.25)
    train(_model(), Tiny(), later, tmp_path / "run", model_name="deepsets", resume=True)
    assert [r["lr"] for r in _lines(tmp_path / "run")] == pytest.approx([1e-2, 1e-2, 5e-3, 0.05, 0.05])
    groups = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.25 and groups[0]["initial_lr"] == 0.1
    # another kind of optimiser: its own state, from scratch (Adam's moments are no SGD momentum)
    sgd = later.replace(steps=7, optimizer="sgd")
    with pytest.warns(UserWarning, match="optimiser is of another kind than 'sgd'"):
        train(_model(), Tiny(), sgd, tmp_path / "run", model_name="deepsets", resume=True)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]
    assert state["param_groups"][0]["momentum"] == 0.9 and "momentum_buffer" in state["state"][0]
    assert [r["step"] for r in _lines(tmp_path / "run")] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_after_interrupt_rewrites_lines_past_the_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # checkpoint at step 2, lines logged up to step 3
        train(_model(), Tiny(fail_at=4), _config(steps=5, eval_every=2), run, model_name="deepsets")
    assert [r["step"] for r in _lines(run)] == [1, 2, 3]
    train(_model(), Tiny(), _config(steps=5, eval_every=2), run, model_name="deepsets", resume=True)
    train(_model(), Tiny(), _config(steps=5, eval_every=2), tmp_path / "straight", model_name="deepsets")
    assert [r["step"] for r in _lines(run)] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in _lines(run)] == [r["loss"] for r in _lines(tmp_path / "straight")]


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    train(_model(), Tiny(), _config(steps=2), tmp_path / "run", model_name="deepsets")
    with pytest.raises(ValueError, match="holds tiny/deepsets, expected tiny/other"):
        train(_model(), Tiny(), _config(steps=4), tmp_path / "run", model_name="other", resume=True)


def _grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_clip_norm_and_clip_value(tmp_path: Path) -> None:
    free = _model()
    train(free, Tiny(), _config(steps=1))
    assert _grads(free).norm() > 1e-3 and _grads(free).abs().max() > 1e-4  # so clipping below has work to do

    clipped = _model()
    train(clipped, Tiny(), _config(steps=1, clip_norm=1e-3))
    assert _grads(clipped).norm() == pytest.approx(1e-3, rel=1e-4)

    clipped = _model()
    train(clipped, Tiny(), _config(steps=1, clip_value=1e-4))
    g = _grads(clipped)
    assert g.abs().max() <= 1e-4 + 1e-12 and (g.abs() == 1e-4).any()


def test_clip_bounds_are_separate(tmp_path: Path) -> None:
    model = _model()
    train(model, Tiny(), _config(steps=1, clip_min=-1e-5, clip_max=2e-4))
    g = _grads(model)
    assert g.min() >= -1e-5 and g.max() <= 2e-4
    assert (g == -1e-5).any() and (g == 2e-4).any()  # both bounds were hit, independently
    only_low = _model()
    train(only_low, Tiny(), _config(steps=1, clip_min=-1e-5))
    assert _grads(only_low).min() >= -1e-5 and _grads(only_low).max() > 2e-4


def test_clamp_gradients_leaves_parameters_without_a_gradient() -> None:
    w = nn.Linear(3, 1)
    (w.weight.sum() * 100).backward()  # no gradient reaches the bias
    clamp_gradients(w.parameters(), None, 1.0)
    assert w.bias.grad is None and w.weight.grad is not None and w.weight.grad.max() == 1.0


def test_step_and_cosine_schedules(tmp_path: Path) -> None:
    train(_model(), Tiny(), _config(steps=4, lr_milestones=[2], lr_gamma=0.1), tmp_path / "step")
    assert [r["lr"] for r in _lines(tmp_path / "step")] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    train(_model(), Tiny(), _config(steps=4, schedule="cosine"), tmp_path / "cos")
    assert [r["lr"] for r in _lines(tmp_path / "cos")] == pytest.approx(
        [1e-2, 0.854e-2, 0.5e-2, 0.146e-2], rel=1e-2
    )


def test_log_every_averages_losses(tmp_path: Path) -> None:
    train(_model(), Tiny(), _config(steps=4), tmp_path / "every")
    train(_model(), Tiny(), _config(steps=4, log_every=2), tmp_path / "pairs")
    every, pairs = _lines(tmp_path / "every"), _lines(tmp_path / "pairs")
    assert [r["step"] for r in pairs] == [2, 4]
    assert pairs[0]["loss"] == pytest.approx((every[0]["loss"] + every[1]["loss"]) / 2)


def test_evaluation_does_not_disturb_training_randomness(tmp_path: Path) -> None:
    train(_model(), Tiny(), _config(steps=4, eval_every=1), tmp_path / "a")
    train(_model(), Tiny(), _config(steps=4), tmp_path / "b")
    assert [r["loss"] for r in _lines(tmp_path / "a")] == [r["loss"] for r in _lines(tmp_path / "b")]


def test_no_run_dir_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = train(_model(), Tiny(), _config(steps=2))
    assert result["step"] == 2 and list(tmp_path.iterdir()) == []


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(_model(), Tiny(), _config(amp="fp16"))
    with pytest.raises(ValueError, match="resume: needs a run_dir"):
        train(_model(), Tiny(), _config(), resume=True)
    with pytest.raises(ValueError, match="clip_min <= clip_max"):
        _config(clip_min=1.0, clip_max=0.5)
    with pytest.raises(ValueError, match="steps: expected int"):
        TrainConfig.from_dict({"steps": "ten"})
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    result = train(_model(), Tiny(), _config(steps=2, amp="bf16"), tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _lines(tmp_path / "run"))
    assert result["step"] == 2


def test_tensorboard_when_installed_else_a_warning(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="tensorboard package is not installed"):
            train(_model(), Tiny(), _config(steps=2, tensorboard=True), tmp_path / "run")
        assert not (tmp_path / "run" / "tensorboard").exists()
    else:
        train(_model(), Tiny(), _config(steps=2, tensorboard=True), tmp_path / "run")
        assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert len(_lines(tmp_path / "run")) == 2


def test_weight_average_is_evaluated_and_handed_back(tmp_path: Path) -> None:
    model = _model()
    result = train(model, Tiny(), _config(steps=4, ema_decay=0.5), tmp_path / "run")
    (last,) = [r for r in _lines(tmp_path / "run") if "mae" in r]
    assert "raw_mae" in last and last["raw_mae"] != last["mae"]  # both the average and the raw weights
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    averaged = evaluated_weights(state)
    assert state["average"]["updates"] == 4 and not torch.equal(
        averaged["phi.0.weight"], state["model"]["phi.0.weight"]
    )
    assert torch.equal(
        model.state_dict()["phi.0.weight"], averaged["phi.0.weight"]
    )  # the model ends averaged
    assert result["metrics"]["mae"] == last["mae"]


def test_weight_average_warms_up() -> None:
    w = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(w.weight)
    average = WeightAverage(w, decay=0.99)
    with torch.no_grad():
        w.weight.fill_(1.0)
    average.update(w)  # keep min(0.99, 2/11): mostly the new weights already
    assert average.model.weight.item() == pytest.approx(1 - 2 / 11)
    assert not average.model.weight.requires_grad


PLAIN_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
}


@pytest.mark.parametrize("name", sorted(PLAIN_OPTIMIZERS))
def test_optimizer_is_fused_where_supported_and_steps_as_the_default_one(name: str) -> None:
    """The fused kernel where PyTorch has one for the parameters (CPU float32 in recent torch), and
    the same update as PyTorch's default implementation."""
    torch.manual_seed(0)
    a = DeepSets(3, 1, 1, dim_hidden=8)
    b = DeepSets(3, 1, 1, dim_hidden=8)
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    fast = make_optimizer(a, TrainConfig(optimizer=name, lr=1e-2, weight_decay=1e-2))
    kind, extra = PLAIN_OPTIMIZERS[name]
    plain = kind(b.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False, **extra)
    if torch.__version__ >= "2.5":  # TorchVersion compares as a version
        assert fast.defaults["fused"]
    x = torch.randn(4, 6, 3)
    for _ in range(3):
        for model, opt in ((a, fast), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start):
        assert not torch.equal(p, p0)  # the steps moved every parameter
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_optimizer_falls_back_where_no_fused_kernel_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device or dtype without a fused kernel gets PyTorch's default implementation."""
    calls: list[dict[str, Any]] = []
    real = torch.optim.Adam

    def refusing(params: Any, **options: Any) -> torch.optim.Optimizer:
        calls.append(options)
        if options.get("fused"):
            raise RuntimeError("fused=True requires all the params to be on a supported device")
        return real(params, **options)

    monkeypatch.setattr(torch.optim, "Adam", refusing)
    opt = make_optimizer(nn.Linear(2, 1), TrainConfig(optimizer="adam"))
    assert [c.get("fused") for c in calls] == [True, None]
    assert not opt.defaults["fused"] and len(opt.param_groups[0]["params"]) == 2


def test_run_files_carry_the_library_version(tmp_path: Path) -> None:
    assert library_version() == settransformer.__version__
    train(_model(), Tiny(), _config(steps=2), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["version"] == settransformer.__version__
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["version"] == settransformer.__version__
