"""Max-value regression (the paper's section 5.1, Table 1): predict the largest element of a set.

A set holds ``n ~ U{min_size..max_size}`` reals drawn from ``U[low, high]`` (the paper: 1..10 and
[0, 100]); the target is its maximum and the loss is the mean absolute error. Sets of different sizes
share a batch through padding and a mask. Mean and sum pooling cannot express a maximum and stay
far behind; max pooling has it built in, and attention (SAB + PMA) learns it.

Every model sees the set rescaled to [0, 1] and its output is scaled back (``y * (high - low) +
low``): the same function class as raw inputs, but well conditioned for any range.

Examples:
    >>> task = MaxRegression()
    >>> batch = task.sample_batch(4, torch.Generator().manual_seed(0))
    >>> batch.x.shape, batch.mask.shape, batch.target.shape   # (B, N, 1), (B, N), (B,)
    (torch.Size([4, 10, 1]), torch.Size([4, 10]), torch.Size([4]))
    >>> model = task.build_model("settransformer")
    >>> model(batch.x, batch.mask).shape  # one predicted maximum per set
    torch.Size([4])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.models import DeepSets, SetTransformer
from ..nn.sequence import SequenceSetModel
from .base import Batch, Task
from .metrics import permutation_sensitivity
from .report import save_figure

__all__ = ["MaxRegression"]


_SEQUENCE = {"lstm": "lstm", "janet": "janet", "indrnn": "indrnn", "transformer-pe": "transformer"}
_RESCALED = "; the set scaled to [0, 1], the output scaled back"


class _Rescaled(nn.Module):
    """``model((x - low) / (high - low)) * (high - low) + low``: ``x: (B, N, 1)`` -> ``(B,)``."""

    def __init__(self, model: nn.Module, low: float, high: float) -> None:
        super().__init__()
        self.model, self.low, self.span = model, low, high - low

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.model((x - self.low) / self.span, mask).reshape(x.shape[0]) * self.span + self.low


class MaxRegression(Task):
    """Regress the maximum of a set of reals.

    Options:
        - min_size: the smallest set: sizes are uniform over ``min_size..max_size`` (paper 1).
        - max_size: set sizes go up to ``max_size`` elements, uniform over ``min_size..max_size``
            (paper 10); batches are padded to the largest size drawn.
        - low: lower end of the element range: elements are uniform over ``[low, high]`` (paper 0).
        - high: upper end of the element range ``[low, high]`` (paper 100); must exceed ``low``. Every
            model sees the set rescaled from ``[low, high]`` to ``[0, 1]`` and its output scaled back.
        - dim_hidden: width of every layer of every model (paper 64).
        - num_heads: attention heads of the ``settransformer`` and ``transformer-pe`` models; must divide
            ``dim_hidden`` (paper 4).
        - test_sets: number of fixed test sets the metrics are computed on.
        - test_seed: seeds the draw of the fixed test sets.
    """

    name: ClassVar[str] = "max-regression"
    model_names: ClassVar[tuple[str, ...]] = (
        "deepsets-mean",
        "deepsets-sum",
        "deepsets-max",
        "settransformer",
        "lstm",
        "janet",
        "indrnn",
        "transformer-pe",
    )
    table_metrics: ClassVar[tuple[str, ...]] = ("perm_sensitivity",)
    """Extra columns of the results table: how much the output moves when the set is reordered."""
    metric: ClassVar[str] = "mae"
    higher_is_better: ClassVar[bool] = False
    paper_options: ClassVar[dict[str, Any]] = {
        "min_size": 1, "max_size": 10, "low": 0.0, "high": 100.0, "dim_hidden": 64, "num_heads": 4,
    }  # fmt: skip
    paper: ClassVar[dict[str, dict[str, float]]] = {
        "deepsets-mean": {"mae": 2.133, "mae_std": 0.190},
        "deepsets-sum": {"mae": 1.902, "mae_std": 0.137},
        "deepsets-max": {"mae": 0.1355, "mae_std": 0.0074},
        "settransformer": {"mae": 0.2085, "mae_std": 0.0127},
    }
    default_model: ClassVar[str | None] = "settransformer"
    model_descriptions: ClassVar[dict[str, str]] = {
        "deepsets-mean": "rFF + Pooling (mean): FC(64,ReLU)x3, mean, FC(64,ReLU), FC(1)" + _RESCALED,
        "deepsets-sum": "rFF + Pooling (sum): FC(64,ReLU)x3, sum, FC(64,ReLU), FC(1)" + _RESCALED,
        "deepsets-max": "rFF + Pooling (max): FC(64,ReLU)x3, max, FC(64,ReLU), FC(1)" + _RESCALED,
        "settransformer": "SAB + PMA: SAB(64,4)x2, PMA_1(64,4), FC(1)" + _RESCALED,
        "lstm": "order-aware baseline: LSTM(64) over the elements in their given order" + _RESCALED,
        "janet": "order-aware baseline: JANET(64) (forget-gate-only LSTM)" + _RESCALED,
        "indrnn": "order-aware baseline: IndRNN(64)" + _RESCALED,
        "transformer-pe": "order-aware baseline: Transformer encoder with sinusoidal positions" + _RESCALED,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if not 1 <= o["min_size"] <= o["max_size"]:
            got = f"{o['min_size']}, {o['max_size']}"
            raise ValueError(f"min_size, max_size: expected 1 <= min_size <= max_size, got {got}")
        if not o["low"] < o["high"]:
            raise ValueError(f"low, high: expected low < high, got {o['low']}, {o['high']}")
        if o["test_sets"] < 1:
            raise ValueError(f"test_sets: expected a positive integer, got {o['test_sets']}")
        self._test: Batch | None = None

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "min_size": 1,
            "max_size": 10,
            "low": 0.0,
            "high": 100.0,
            "dim_hidden": 64,
            "num_heads": 4,
            "test_sets": 2000,
            "test_seed": 1234,
        }

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """``paper``: 20k steps of 128 sets, Adam 1e-3 constant, as in the paper. At a constant rate the
        last weights wander (the test MAE of one model jumps between ~0.01 and ~1 from one thousand
        steps to the next), so we evaluate a moving average of the weights (``ema_decay``); the raw
        weights' metrics are logged beside it (``raw_mae``). ``quick``: 1k steps of 64 sets."""
        if name == "paper":
            return {"steps": 20_000, "batch_size": 128, "lr": 1e-3, "eval_every": 2000, "ema_decay": 0.999}
        if name == "quick":  # a higher rate, decayed for the last 30%: the ranking shows in 1k steps
            return {"steps": 1000, "batch_size": 64, "lr": 3e-3, "lr_milestones": [700], "lr_gamma": 0.1}
        raise ValueError(f"budget: expected 'quick' or 'paper', got {name!r}")

    def build_model(self, model_name: str) -> nn.Module:
        """The table row ``model_name``; takes ``x: (B, N, 1)``, ``mask: (B, N)`` and returns ``(B,)``."""
        d, h = self.options["dim_hidden"], self.options["num_heads"]
        model: nn.Module
        if model_name.startswith("deepsets-") and model_name in self.model_names:
            pool = model_name.removeprefix("deepsets-")
            model = DeepSets(1, 1, 1, dim_hidden=d, pool=pool, num_encoder_layers=3, num_decoder_layers=1)  # type: ignore[arg-type]
        elif model_name in _SEQUENCE:
            model = SequenceSetModel(1, 1, 1, kind=_SEQUENCE[model_name], dim_hidden=d, num_heads=h)  # type: ignore[arg-type]
        elif model_name == "settransformer":
            model = SetTransformer(
                1, 1, 1, dim_hidden=d, num_heads=h, num_inducing=None, num_decoder_layers=0
            )
        else:
            raise ValueError(f"model: expected one of {', '.join(self.model_names)}, got {model_name!r}")
        return _Rescaled(model, self.options["low"], self.options["high"])

    def sample_sets(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` sets: ``x: (B, N, 1)`` with ``N`` the largest size drawn, ``mask: (B, N)``,
        ``target: (B,)`` the maxima. Padded entries of ``x`` are zero."""
        o = self.options
        sizes = torch.randint(o["min_size"], o["max_size"] + 1, (batch_size,), generator=generator)
        n = int(sizes.max())
        values = torch.rand(batch_size, n, generator=generator) * (o["high"] - o["low"]) + o["low"]
        mask = torch.arange(n)[None, :] < sizes[:, None]
        target = values.masked_fill(~mask, float("-inf")).amax(dim=1)
        return Batch(values.masked_fill(~mask, 0.0)[..., None], mask, target)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return self.sample_sets(batch_size, generator)

    def test_batch(self) -> Batch:
        """The fixed test sets (``test_sets`` of them, drawn with ``test_seed``)."""
        if self._test is None:
            gen = torch.Generator().manual_seed(self.options["test_seed"])
            self._test = self.sample_sets(self.options["test_sets"], gen)
        return self._test

    def test_inputs(self) -> tuple[list[Tensor], Tensor]:
        """The fixed test sets ``(N_i, 1)`` (raw reals; the model rescales them) and their maxima ``(S,)``."""
        batch = self.test_batch()
        return [batch.x[i][batch.mask[i]] for i in range(len(batch))], batch.target  # type: ignore[index]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean absolute error (L1) between the predicted and the true maxima."""
        return F.l1_loss(model(batch.x, batch.mask).float(), batch.target)

    @torch.no_grad()
    def predict(self, model: nn.Module, device: torch.device) -> Tensor:
        """Predicted maxima ``(test_sets,)`` on CPU for the fixed test sets."""
        batch = self.test_batch()
        model.eval()
        out = [
            model(batch.x[i : i + 1000].to(device), batch.mask[i : i + 1000].to(device)).float().cpu()  # type: ignore[index]
            for i in range(0, len(batch), 1000)
        ]
        return torch.cat(out)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``mae`` (the table's metric) and ``rmse`` on the fixed test sets, and
        ``perm_sensitivity``: the std of the output over 8 random orderings of the first 500 test
        sets (0 for a set model up to float rounding; order-aware baselines are clearly above)."""
        batch = self.test_batch()
        err = self.predict(model, device) - batch.target
        x, mask = batch.x[:500].to(device), batch.mask[:500].to(device)  # type: ignore[index]
        gen = torch.Generator().manual_seed(0)
        sensitivity = permutation_sensitivity(model, x, mask, num_orders=8, generator=gen)
        return {
            "mae": float(err.abs().mean()),
            "rmse": float(err.pow(2).mean().sqrt()),
            "perm_sensitivity": float(sensitivity),
        }

    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``max_regression.png``: predicted against true maximum on the test sets."""
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

        pred, true = self.predict(model, device).numpy(), self.test_batch().target.numpy()
        lo, hi = self.options["low"], self.options["high"]
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1, label="perfect")
        ax.scatter(true, pred, s=4, alpha=0.5)
        ax.set_xlabel("true maximum")
        ax.set_ylabel("predicted maximum")
        ax.set_title(f"max regression: MAE {abs(pred - true).mean():.3f}")
        ax.legend(loc="upper left")
        return [save_figure(fig, Path(out_dir) / "max_regression.png")]
