"""Kernel regression as attention: predict a noisy 1-D function at query points from a set of samples.

Each example is a random function ``f(x) = sum_j a_j sin(w_j x + phi_j)`` (``num_sines`` terms,
``a_j ~ N(0, 1 / num_sines)``, ``w_j ~ U[freq_low, freq_high]``, ``phi_j ~ U[0, 2 pi)``) on
``x in [x_low, x_high]``; the context set holds ``n ~ U{min_size..max_size}`` pairs
``(x_i, f(x_i) + eps_i)`` with ``eps ~ N(0, noise^2)``, and ``num_queries`` query points ``x ~ U``
ask for ``y = f(x) + eps``. Metric: MSE against the noisy query targets (its floor is
``noise^2``); ``mse_clean`` compares with ``f`` itself.

Rows (the classic attention-pooling comparison, then attention variants and order-aware baselines):

- ``average``: the mean of the context ``y`` (average pooling), no parameters.
- ``nw-fixed``: Nadaraya-Watson with the Gaussian kernel ``exp(-(x - x_i)^2 / (2 h^2))``, ``h =
  bandwidth`` fixed: attention with the query as query, ``x_i`` as keys and ``y_i`` as values.
- ``nw-learned``: the same with ``h`` learned.
- ``settransformer``: SAB x2 over the pairs, then each query (an MLP embedding of ``x``) attends to
  the encoded set through a MAB, and a linear head reads ``y``; ``-gaussian``, ``-additive`` and
  ``-top8`` use those scores / hard attention in every block.
- ``lstm``, ``janet``, ``indrnn``, ``transformer-pe``: order-aware encoders of the pairs in their
  given order ([`settransformer.nn.sequence`][settransformer.nn.sequence]) whose summary conditions an MLP on
  ``x``.

``evaluate`` also reports ``perm_sensitivity``: the standard deviation of predictions over
orderings of the context
([`settransformer.tasks.metrics.permutation_sensitivity`][settransformer.tasks.metrics.permutation_sensitivity]).
Batches: ``x: (B, N, 2)`` pairs, ``mask: (B, N)``, ``target: (B, Q)``; ``extra["queries"]: (B, Q, 1)``,
``extra["clean"]: (B, Q)`` and the functions' ``amp``, ``freq``, ``phase`` ``(B, num_sines)``.

Figures (``task.plot``,
[`plot_kernel_regression`][settransformer.tasks.kernel_regression.plot_kernel_regression]): fitted curves over
the noisy pairs, and attention heat maps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import split_heads
from ..nn.blocks import SAB
from ..nn.mab import MAB
from ..nn.scores import GaussianScore, attention_weights
from ..nn.sequence import SequenceSetModel
from ..nn.validation import zero_padding
from .base import Batch, Task
from .metrics import permutation_sensitivity
from .report import save_figure

__all__ = [
    "AverageRegressor",
    "KernelRegression",
    "NadarayaWatson",
    "SequenceRegressor",
    "SetRegressor",
    "plot_kernel_regression",
]


def _mlp(dim_in: int, dim: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim), nn.ReLU(), nn.Linear(dim, dim_out))


class AverageRegressor(nn.Module):
    """Predict the mean of the context ``y`` at every query. ``(B, N, 2), (B, N), (B, Q, 1) -> (B, Q)``.

    Has no parameters, only an empty placeholder so that optimisers accept it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.placeholder = nn.Parameter(torch.zeros(0))

    def forward(self, context: Tensor, mask: Tensor | None, queries: Tensor) -> Tensor:
        y = context[..., 1]
        if mask is None:
            mean = y.mean(1)
        else:
            mean = y.masked_fill(~mask, 0.0).sum(1) / mask.sum(1).clamp_min(1)
        return mean[:, None].expand(-1, queries.shape[1])


class NadarayaWatson(nn.Module):
    """Nadaraya-Watson regression with a Gaussian kernel: ``sum_i softmax_i(-(x - x_i)^2 / 2h^2) y_i``.

    ``learnable=False`` keeps ``h`` fixed (no parameters besides a placeholder for optimisers).
    Shapes: ``context: (B, N, 2)``, ``mask: (B, N)``, ``queries: (B, Q, 1)`` -> ``(B, Q)``.
    """

    def __init__(self, bandwidth: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        self.kernel = GaussianScore(1, bandwidth=bandwidth, learnable=learnable)
        if not learnable:
            self.placeholder = nn.Parameter(torch.zeros(0))

    def weights(self, context: Tensor, mask: Tensor | None, queries: Tensor) -> Tensor:
        """Attention weights ``(B, 1, Q, N)`` of each query over the context points."""
        context = zero_padding(context, mask)  # padded points may hold anything, NaN included
        return attention_weights(queries[:, None], context[:, None, :, :1], mask, score=self.kernel)

    def forward(self, context: Tensor, mask: Tensor | None, queries: Tensor) -> Tensor:
        weights = self.weights(context, mask, queries)[:, 0]
        return (weights @ zero_padding(context, mask)[..., 1:]).squeeze(-1)


class SetRegressor(nn.Module):
    """Set Transformer regressor: ``SAB x num_layers`` over the pairs, a MAB from the queries to the
    encoded set, a linear head.

    Args:
        dim_hidden: encoder width.
        num_heads: attention heads.
        num_layers: encoder depth.
        **block: options of every block ([`BlockOptions`][settransformer.nn.mab.BlockOptions]), e.g.
            ``score`` and ``top_k``.

    Shapes: ``context: (B, N, 2)``, ``mask: (B, N)``, ``queries: (B, Q, 1)`` -> ``(B, Q)``.
    """

    def __init__(self, dim_hidden: int = 64, num_heads: int = 4, num_layers: int = 2, **block: Any) -> None:
        super().__init__()
        d = dim_hidden
        self.encoder = nn.ModuleList(
            SAB(2 if i == 0 else d, d, num_heads, **block) for i in range(num_layers)
        )
        self.embed = _mlp(1, d, d)
        self.decoder = MAB(d, d, d, num_heads, **block)
        self.head = nn.Linear(d, 1)

    def _encode(self, context: Tensor, mask: Tensor | None, queries: Tensor) -> tuple[Tensor, Tensor]:
        z = context if mask is None else context.masked_fill(~mask[..., None], 0.0)
        for layer in cast(list[SAB], self.encoder):
            z = layer.forward_unchecked(z, mask)
        return self.embed(queries), z

    def weights(self, context: Tensor, mask: Tensor | None, queries: Tensor) -> Tensor:
        """The decoder MAB's attention weights ``(B, heads, Q, N)``."""
        q, z = self._encode(context, mask, queries)
        mab = self.decoder
        qp, k, _ = mab.project(q, z)
        h = mab.num_heads
        return attention_weights(
            split_heads(qp, h), split_heads(k, h), mask, scale=mab.scale, score=mab.score, top_k=mab.top_k
        )

    def forward(self, context: Tensor, mask: Tensor | None, queries: Tensor) -> Tensor:
        q, z = self._encode(context, mask, queries)
        return self.head(self.decoder.forward_unchecked(q, z, mask)).squeeze(-1)


class SequenceRegressor(nn.Module):
    """Order-aware regressor: a sequence model reads the pairs in order; its summary and an MLP
    embedding of each query feed an MLP. ``kind``: as in
    [`SequenceSetModel`][settransformer.nn.sequence.SequenceSetModel].

    Shapes: ``context: (B, N, 2)``, ``mask: (B, N)``, ``queries: (B, Q, 1)`` -> ``(B, Q)``.
    """

    def __init__(self, kind: str, dim_hidden: int = 64, num_heads: int = 4) -> None:
        super().__init__()
        d = dim_hidden
        self.encoder = SequenceSetModel(2, 1, d, kind=kind, dim_hidden=d, num_heads=num_heads)  # type: ignore[arg-type]
        self.embed = _mlp(1, d, d)
        self.head = nn.Sequential(nn.ReLU(), _mlp(2 * d, d, 1))

    def forward(self, context: Tensor, mask: Tensor | None, queries: Tensor) -> Tensor:
        r = self.encoder(context, mask)  # (B, 1, d)
        q = self.embed(queries)
        return self.head(torch.cat([r.expand(-1, q.shape[1], -1), q], -1)).squeeze(-1)


_SEQUENCE_ROWS = {"lstm": "lstm", "janet": "janet", "indrnn": "indrnn", "transformer-pe": "transformer"}
_ST_ROWS: dict[str, dict[str, Any]] = {
    "settransformer": {},
    "settransformer-gaussian": {"score": "gaussian"},
    "settransformer-additive": {"score": "additive"},
    "settransformer-top8": {"top_k": 8},
}


class KernelRegression(Task):
    """Regress a random noisy 1-D function at query points from a set of samples.

    Options:
        - x_low: lower end of the input range: context and query ``x`` are uniform over
            ``[x_low, x_high]``.
        - x_high: upper end of the input range ``[x_low, x_high]``; must exceed ``x_low``.
        - min_size: the smallest context set: sizes are uniform over ``min_size..max_size`` pairs.
        - max_size: context sets go up to ``max_size`` ``(x, y)`` pairs; batches are padded to the
            largest size drawn.
        - num_queries: query points per function, where the predictions are scored.
        - num_sines: sine terms of each random function ``f(x) = sum_j a_j sin(w_j x + phi_j)``, with
            ``a_j ~ N(0, 1 / num_sines)``.
        - freq_low: lowest frequency: every ``w_j`` is uniform over ``[freq_low, freq_high]``.
        - freq_high: highest frequency of the sine terms ``w_j``.
        - noise: std of the Gaussian noise on the context ``y`` and on the query targets (the MSE's
            floor is ``noise^2``); at least 0.
        - bandwidth: ``h`` of the Gaussian kernel of ``nw-fixed``, and the start of ``nw-learned``'s
            learned ``h``; above 0 (1.0: the standard Gaussian kernel).
        - dim_hidden: width of every layer of the ``settransformer*`` and order-aware models.
        - num_heads: attention heads of the ``settransformer*`` and ``transformer-pe`` models; must
            divide ``dim_hidden``.
        - test_sets: number of fixed test functions (context and queries) the metrics are computed on.
        - test_seed: seeds the draw of the fixed test sets.
        - sensitivity_sets: how many of the first test sets ``perm_sensitivity`` is measured on (at
            most ``test_sets``).
        - sensitivity_orders: random orderings of each context that ``perm_sensitivity`` compares (at
            least 2).

    Examples:
        >>> task = KernelRegression(test_sets=16)
        >>> batch = task.sample_batch(4, torch.Generator().manual_seed(0))
        >>> model = task.build_model("settransformer")
        >>> task.loss(model, batch).shape  # the mean squared error at the query points
        torch.Size([])
    """

    name: ClassVar[str] = "kernel-regression"
    model_names: ClassVar[tuple[str, ...]] = (
        "average",
        "nw-fixed",
        "nw-learned",
        *_ST_ROWS,
        *_SEQUENCE_ROWS,
    )
    metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    table_metrics: ClassVar[tuple[str, ...]] = ("perm_sensitivity",)
    default_model: ClassVar[str | None] = "settransformer"
    demo_models: ClassVar[tuple[str, ...] | None] = (
        "average",
        "nw-fixed",
        "nw-learned",
        "settransformer",
        "settransformer-gaussian",
        "lstm",
        "transformer-pe",
    )
    model_descriptions: ClassVar[dict[str, str]] = {
        "average": "mean of the context y (average pooling), no parameters",
        "nw-fixed": "Nadaraya-Watson, Gaussian kernel, fixed bandwidth",
        "nw-learned": "Nadaraya-Watson, Gaussian kernel, learned bandwidth",
        "settransformer": "SAB(64,4)x2 over (x,y); MAB(query, set); FC(1)",
        "settransformer-gaussian": "as settransformer, Gaussian-kernel scores",
        "settransformer-additive": "as settransformer, additive (Bahdanau) scores",
        "settransformer-top8": "as settransformer, hard attention to the top 8 keys",
        "lstm": "LSTM(64) over the pairs in order; MLP(state, query)",
        "janet": "JANET(64) over the pairs in order; MLP(state, query)",
        "indrnn": "IndRNN(64) over the pairs in order; MLP(state, query)",
        "transformer-pe": "Transformer encoder(64, 4) x1 with sinusoidal positions; MLP(mean, query)",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if not 1 <= o["min_size"] <= o["max_size"]:
            raise ValueError(
                f"min_size, max_size: expected 1 <= min_size <= max_size, "
                f"got {o['min_size']}, {o['max_size']}"
            )
        if not o["x_low"] < o["x_high"]:
            raise ValueError(f"x_low, x_high: expected x_low < x_high, got {o['x_low']}, {o['x_high']}")
        if not o["freq_low"] <= o["freq_high"]:
            raise ValueError(
                f"freq_low, freq_high: expected freq_low <= freq_high, got {o['freq_low']}, {o['freq_high']}"
            )
        for key in ("num_queries", "num_sines", "test_sets", "sensitivity_sets"):
            if o[key] < 1:
                raise ValueError(f"{key}: expected a positive integer, got {o[key]}")
        if o["sensitivity_orders"] < 2:
            raise ValueError(f"sensitivity_orders: expected at least 2, got {o['sensitivity_orders']}")
        if o["noise"] < 0 or o["bandwidth"] <= 0:
            raise ValueError(f"noise, bandwidth: expected >= 0 and > 0, got {o['noise']}, {o['bandwidth']}")
        self._test: Batch | None = None

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "x_low": 0.0,
            "x_high": 5.0,
            "min_size": 20,
            "max_size": 50,
            "num_queries": 32,
            "num_sines": 3,
            "freq_low": 0.5,
            "freq_high": 2.5,
            "noise": 0.2,
            "bandwidth": 1.0,
            "dim_hidden": 64,
            "num_heads": 4,
            "test_sets": 1000,
            "test_seed": 4321,
            "sensitivity_sets": 200,
            "sensitivity_orders": 4,
        }

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """``quick``: 500 steps of 64 sets (about 20 CPU-seconds per attention model);
        ``paper``: 20k steps, lr decay at 15k."""
        if name == "quick":
            return {"steps": 500, "batch_size": 64, "lr": 2e-3}
        if name == "paper":
            return {
                "steps": 20_000,
                "batch_size": 64,
                "lr": 5e-4,
                "lr_milestones": [15_000],
                "eval_every": 2000,
            }
        raise ValueError(f"budget: expected 'quick' or 'paper', got {name!r}")

    def build_model(self, model_name: str) -> nn.Module:
        """A fresh model: ``model(context (B, N, 2), mask (B, N), queries (B, Q, 1)) -> (B, Q)``."""
        d, h, bw = self.options["dim_hidden"], self.options["num_heads"], self.options["bandwidth"]
        if model_name == "average":
            return AverageRegressor()
        if model_name in ("nw-fixed", "nw-learned"):
            return NadarayaWatson(bw, learnable=model_name == "nw-learned")
        if model_name in _ST_ROWS:
            return SetRegressor(d, h, **_ST_ROWS[model_name])
        if model_name in _SEQUENCE_ROWS:
            return SequenceRegressor(_SEQUENCE_ROWS[model_name], d, h)
        raise ValueError(f"model: expected one of {', '.join(self.model_names)}, got {model_name!r}")

    def functions(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Random functions: ``amp``, ``freq``, ``phase``, each ``(B, num_sines)``."""
        o = self.options
        j = o["num_sines"]
        return {
            "amp": torch.randn(batch_size, j, generator=generator) / math.sqrt(j),
            "freq": torch.rand(batch_size, j, generator=generator) * (o["freq_high"] - o["freq_low"])
            + o["freq_low"],
            "phase": torch.rand(batch_size, j, generator=generator) * 2 * math.pi,
        }

    @staticmethod
    def evaluate_function(params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``f(x)`` for ``x: (B, M)`` and the functions ``params`` -> ``(B, M)``."""
        arg = x[..., None] * params["freq"][:, None, :] + params["phase"][:, None, :]
        return (params["amp"][:, None, :] * torch.sin(arg)).sum(-1)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        o = self.options
        span = o["x_high"] - o["x_low"]
        params = self.functions(batch_size, generator)
        sizes = torch.randint(o["min_size"], o["max_size"] + 1, (batch_size,), generator=generator)
        n = int(sizes.max())
        xc = torch.rand(batch_size, n, generator=generator) * span + o["x_low"]
        yc = self.evaluate_function(params, xc) + o["noise"] * torch.randn(batch_size, n, generator=generator)
        xq = torch.rand(batch_size, o["num_queries"], generator=generator) * span + o["x_low"]
        clean = self.evaluate_function(params, xq)
        target = clean + o["noise"] * torch.randn(clean.shape, generator=generator)
        mask = torch.arange(n)[None, :] < sizes[:, None]
        context = torch.stack([xc, yc], -1).masked_fill(~mask[..., None], 0.0)
        return Batch(context, mask, target, {"queries": xq[..., None], "clean": clean, **params})

    def test_batch(self) -> Batch:
        """The fixed test sets (``test_sets`` of them, drawn with ``test_seed``)."""
        if self._test is None:
            self._test = self.sample_batch(
                self.options["test_sets"], torch.Generator().manual_seed(self.options["test_seed"])
            )
        return self._test

    def test_inputs(self) -> tuple[list[Tensor], Tensor]:
        """The fixed test context sets ``(N_i, 2)`` (pairs ``(x, y)``) and their noisy targets
        ``(S, Q)``, the ones ``mse`` scores against; the query points are
        ``test_batch().extra["queries"]`` ``(S, Q, 1)``."""
        batch = self.test_batch()
        return [batch.x[i][batch.mask[i]] for i in range(len(batch))], batch.target  # type: ignore[index]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """MSE of the predictions at the queries against the noisy targets."""
        loss = F.mse_loss(model(batch.x, batch.mask, batch.extra["queries"]).float(), batch.target)
        if not loss.requires_grad:  # a model without parameters: keep the training loop's backward valid
            loss = loss + sum((p.sum() for p in model.parameters()), torch.zeros((), device=loss.device))
        return loss

    @torch.no_grad()
    def predict(self, model: nn.Module, device: torch.device, batch: Batch | None = None) -> Tensor:
        """Predictions ``(B, Q)`` on CPU for ``batch`` (default: the test sets), 500 sets at a time."""
        batch = self.test_batch() if batch is None else batch
        model.eval()
        out = []
        for i in range(0, len(batch), 500):
            x, queries = batch.x[i : i + 500].to(device), batch.extra["queries"][i : i + 500].to(device)
            mask = None if batch.mask is None else batch.mask[i : i + 500].to(device)
            out.append(model(x, mask, queries).float().cpu())
        return torch.cat(out)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``mse`` (noisy targets), ``mse_clean`` (against ``f``) and ``perm_sensitivity``."""
        batch = self.test_batch()
        pred = self.predict(model, device)
        s = self.options["sensitivity_sets"]
        xs, qs = batch.x[:s].to(device), batch.extra["queries"][:s].to(device)
        ms = None if batch.mask is None else batch.mask[:s].to(device)
        sensitivity = permutation_sensitivity(
            lambda x, m: model(x, m, qs),
            xs,
            ms,
            num_orders=self.options["sensitivity_orders"],
            generator=torch.Generator().manual_seed(0),
        )
        return {
            "mse": float((pred - batch.target).square().mean()),
            "mse_clean": float((pred - batch.extra["clean"]).square().mean()),
            "perm_sensitivity": sensitivity,
        }

    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``kernel_regression_fit.png`` (test set 0: ``f``, the noisy pairs, this model's curve
        beside ``average`` and ``nw-fixed``) and ``kernel_regression_attention.png`` (the
        attention weights of the models that have them)."""
        models = {
            "average": self.build_model("average"),
            "nw-fixed": self.build_model("nw-fixed"),
            "model": model,
        }
        return self.plot_models(models, out_dir, device)

    @torch.no_grad()
    def plot_models(
        self, models: dict[str, nn.Module], out_dir: Path, device: torch.device, index: int = 0
    ) -> list[Path]:
        """The classic attention-pooling figure for test set ``index``: the true function, the noisy
        pairs and each model's fitted curve (``kernel_regression_fit.png``), and the attention
        weights of grid queries against the keys sorted by ``x`` for every model that has them
        (``kernel_regression_attention.png``)."""
        o, test = self.options, self.test_batch()
        mask = test.mask[index]  # type: ignore[index]
        pairs = test.x[index][mask]
        pairs = pairs[pairs[:, 0].argsort()]  # keys sorted by x, for the heat maps
        params = {k: test.extra[k][index : index + 1] for k in ("amp", "freq", "phase")}
        grid = torch.linspace(o["x_low"], o["x_high"], 200)[None]
        context, queries = pairs[None].to(device), grid[..., None].to(device)
        curves, heat = {}, {}
        for name, m in models.items():
            m.to(device).eval()
            curves[name] = m(context, None, queries)[0].float().cpu()
            weights = getattr(m, "weights", None)
            if callable(weights):  # (1, heads, Q, N), heads averaged
                heat[name] = weights(context, None, queries)[0].float().mean(0).cpu()
        title = f"kernel regression, test set {index} ({len(pairs)} pairs)"
        truth = self.evaluate_function(params, grid)[0]
        return plot_kernel_regression(grid[0], truth, pairs, curves, heat, Path(out_dir), title)


def plot_kernel_regression(
    grid: Tensor,
    truth: Tensor,
    pairs: Tensor,
    curves: dict[str, Tensor],
    heat: dict[str, Tensor],
    out_dir: Path,
    title: str,
) -> list[Path]:
    """The classic attention-pooling figure and the attention weights.

    Args:
        grid: query positions ``(Q,)``; truth: the true function on them ``(Q,)``.
        pairs: the noisy context pairs ``(N, 2)`` (x, y), sorted by x.
        curves: each model's predictions on the grid ``(Q,)``.
        heat: attention weights ``(Q, N)`` of the models that have them (keys in ``pairs`` order).
        out_dir: folder for ``kernel_regression_fit.png`` and ``kernel_regression_attention.png``
            (the second only when ``heat`` is not empty).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = grid.numpy()
    ax.plot(xs, truth.numpy(), color="black", lw=2, label="truth f(x)")
    ax.scatter(pairs[:, 0].numpy(), pairs[:, 1].numpy(), s=14, color="gray", alpha=0.7, label="noisy pairs")
    for name, curve in curves.items():
        ax.plot(xs, curve.numpy(), lw=1.5, label=name)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    paths = [save_figure(fig, out_dir / "kernel_regression_fit.png")]
    if heat:
        fig, axes = plt.subplots(1, len(heat), figsize=(4 * len(heat), 3.6), squeeze=False)
        for ax, (name, w) in zip(axes[0], heat.items()):
            im = ax.imshow(w.numpy(), aspect="auto", cmap="Reds", origin="lower")
            ax.set_title(name)
            ax.set_xlabel("keys (sorted by x)")
            ax.set_ylabel("queries (grid over x)")
            fig.colorbar(im, ax=ax)
        paths.append(save_figure(fig, out_dir / "kernel_regression_attention.png"))
    return paths
