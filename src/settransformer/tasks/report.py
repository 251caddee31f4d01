"""Results tables (ours beside the paper's) and figure saving, shared by every task.

Examples:
    >>> from settransformer.tasks.max_regression import MaxRegression
    >>> runs = {"deepsets-max": [{"mae": 0.14}, {"mae": 0.12}], "settransformer": [{"mae": 0.1}]}
    >>> print(results_table(MaxRegression, runs))  # doctest: +ELLIPSIS
    | model | what it is | seeds | mae (ours) | mae (paper) | perm_sensitivity (ours) | ...
    |---|---|---|---|---|---|---|
    | `deepsets-max` | rFF + Pooling (max): ... | 2 | 0.13 ± 0.014 | 0.1355 ± 0.0074 | – | – |
    | `settransformer` | SAB + PMA: ... | 1 | 0.1 | 0.2085 ± 0.013 | – | – |
    <BLANKLINE>
    Headline metric: mae (lower is better); ours is the mean ± std over seeds.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.files import atomic_write, write_text_atomic
from .base import Task

__all__ = ["mean_std", "plot_training_curve", "results_table", "save_figure", "write_results"]


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG at ``path`` (folders created) and close it.

    Build figures with ``matplotlib.figure.Figure`` rather than pyplot where possible: they need no
    backend (headless machines) and do not disturb a notebook's inline backend.
    """
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    if "matplotlib.pyplot" in sys.modules:  # pyplot keeps its figures alive until closed
        sys.modules["matplotlib.pyplot"].close(fig)
    return path


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    if not values:
        raise ValueError("values: expected at least one number")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"


def _metrics(task: type[Task], paper: dict[str, dict[str, float]]) -> list[str]:
    """The headline metric, any other metric the paper reports, then the task's ``table_metrics``."""
    names = [task.metric]
    for row in paper.values():
        names += [k for k in row if not k.endswith("_std") and k not in names]
    names += [k for k in getattr(task, "table_metrics", ()) if k not in names]
    return names


def results_table(
    task: type[Task],
    runs: dict[str, list[dict[str, float]]],
    paper: dict[str, dict[str, float]] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A markdown table: one row per model (in ``task.model_names`` order), our mean ± std over
    seeds beside the paper's number for each metric.

    Args:
        task: the task class (for its metric and its model descriptions).
        runs: ``{model_name: [metrics of seed 0, metrics of seed 1, ...]}``.
        paper: the paper's numbers (default ``task.paper``; a task instance's
            [`paper_comparison`][settransformer.tasks.base.Task.paper_comparison] picks those of its setup).
        notes: how the runs' setup differs from the paper's, written under the table.
    """
    paper = task.paper if paper is None else paper
    metrics = _metrics(task, paper)
    descriptions: dict[str, str] = getattr(task, "model_descriptions", {})
    header = ["model", "what it is", "seeds"]
    for m in metrics:
        header += [f"{m} (ours)", f"{m} (paper)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in [m for m in task.model_names if m in runs] + [m for m in runs if m not in task.model_names]:
        row = [f"`{name}`", descriptions.get(name, ""), str(len(runs[name]))]
        theirs = paper.get(name, {})
        for m in metrics:
            ours = [r[m] for r in runs[name] if m in r]
            row.append(_fmt(*mean_std(ours)) if ours else "–")
            row.append(_fmt(theirs.get(m), theirs.get(f"{m}_std")))
        lines.append("| " + " | ".join(row) + " |")
    direction = "higher" if task.higher_is_better else "lower"
    lines.append("")
    lines.append(
        f"Headline metric: {task.metric} ({direction} is better); ours is the mean ± std over seeds."
    )
    lines += [f"Not the paper's setup: {note}." for note in notes]
    return "\n".join(lines)


def write_results(
    out_dir: str | Path,
    task: type[Task],
    runs: dict[str, list[dict[str, float]]],
    settings: dict[str, Any],
    title: str | None = None,
    paper: dict[str, dict[str, float]] | None = None,
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``results.md`` (the table and the settings) and ``results.json`` into ``out_dir``
    (``paper``, ``notes``: see [`results_table`][settransformer.tasks.report.results_table])."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or f"{task.name}: our results beside the paper's"
    settings_md = "\n".join(f"- {k}: `{json.dumps(v)}`" for k, v in settings.items())
    md = f"# {title}\n\n{results_table(task, runs, paper, notes)}\n\nSettings:\n\n{settings_md}\n"
    write_text_atomic(out_dir / "results.md", md)
    summary = {
        name: {m: dict(zip(("mean", "std"), mean_std([r[m] for r in rs]))) for m in rs[0]}
        for name, rs in runs.items()
        if rs
    }
    payload = {
        "task": task.name,
        "metric": task.metric,
        "settings": settings,
        "runs": runs,
        "summary": summary,
    }
    write_text_atomic(out_dir / "results.json", json.dumps(payload, indent=2) + "\n")
    return out_dir / "results.md", out_dir / "results.json"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_training_curve(run_dir: str | Path, metric: str | None = None) -> Path | None:
    """``training_curve.png`` in ``run_dir``: the loss (log scale) and the headline ``metric``
    against steps, read from ``run_dir/metrics.jsonl``; ``None`` when it holds no logged step.

    Examples:
        >>> Path("run").mkdir()
        >>> lines = ['{"step": 10, "loss": 0.5}', '{"step": 20, "loss": 0.2, "mae": 1.5}']
        >>> _ = Path("run/metrics.jsonl").write_text("\\n".join(lines))
        >>> plot_training_curve("run", metric="mae")
        PosixPath('run/training_curve.png')
    """
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = []
    path = run_dir / "metrics.jsonl"
    # damaged bytes become U+FFFD, so their line fails to parse and is left out like a torn one
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and _is_number(record.get("step")):
            records.append(record)
    losses = [(r["step"], r["loss"]) for r in records if _is_number(r.get("loss"))]
    if not losses:
        return None
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    ax.plot(*zip(*losses), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if all(v > 0 for _, v in losses):
        ax.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    points = [(r["step"], r[metric]) for r in records if metric and _is_number(r.get(metric))]
    if points:
        right = ax.twinx()
        right.plot(*zip(*points), "o-", color="tab:orange", label=f"test {metric}")
        right.set_ylabel(str(metric))
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best")
    ax.set_title(f"training curve: {run_dir.name}")
    return save_figure(fig, run_dir / "training_curve.png")
