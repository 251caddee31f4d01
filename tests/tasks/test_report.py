"""Results tables beside the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from settransformer.tasks.count_unique import CountUnique
from settransformer.tasks.max_regression import MaxRegression
from settransformer.tasks.mog_clustering import MoGClustering
from settransformer.tasks.pointcloud import PointCloudClassification
from settransformer.tasks.report import mean_std, results_table, write_results


class TwoMetrics(MaxRegression):
    paper: ClassVar[dict[str, dict[str, float]]] = {"deepsets-max": {"mae": 0.5, "ll": -1.25, "ll_std": 0.01}}


def test_mean_std() -> None:
    assert mean_std([2.0]) == (2.0, None)
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_table_rows_in_table_order_with_paper_numbers() -> None:
    runs = {"settransformer": [{"mae": 0.25}, {"mae": 0.35}], "deepsets-max": [{"mae": 0.125}]}
    table = results_table(MaxRegression, runs)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`deepsets-max`", "`settransformer`"]
    assert "| 0.125 | 0.1355 ± 0.0074 |" in rows[0]
    assert "| 2 | 0.3 ± 0.071 | 0.2085 ± 0.013 |" in rows[1]  # ours: mean ± std over the two seeds
    assert "SAB(64,4)x2" in rows[1] and "lower is better" in table


def test_table_has_a_column_pair_per_paper_metric() -> None:
    table = results_table(
        TwoMetrics, {"deepsets-max": [{"mae": 0.4, "ll": -1.5}], "deepsets-sum": [{"mae": 1.0}]}
    )
    header = table.splitlines()[0]
    assert "mae (ours) | mae (paper) | ll (ours) | ll (paper)" in header
    assert "| 0.4 | 0.5 | -1.5 | -1.25 ± 0.01 |" in table
    assert "| 1 | – | – | – |" in table  # missing numbers are dashes, not errors


def test_write_results(tmp_path: Path) -> None:
    runs = {"deepsets-max": [{"mae": 0.2, "rmse": 0.3}, {"mae": 0.4, "rmse": 0.5}]}
    md, js = write_results(tmp_path / "out", MaxRegression, runs, {"steps": 10})
    assert md.read_text().startswith("# max-regression") and "- steps: `10`" in md.read_text()
    data = json.loads(js.read_text())
    assert data["runs"] == runs and data["summary"]["deepsets-max"]["mae"]["mean"] == pytest.approx(0.3)


def test_the_paper_column_follows_the_runs_setup() -> None:
    """Table 4 at the run's number of points, and a line under the table wherever the setup (the
    data, an option) is not the paper's; the paper's 1,000-point numbers were shown at any size."""
    task = PointCloudClassification(source="shapes", num_points=100)
    paper, notes = task.paper_comparison()
    table = results_table(PointCloudClassification, {"isab-pma": [{"accuracy": 0.5}]}, paper, notes)
    assert "| 0.5 | 0.8454 |" in table and "0.8662" not in table
    assert "Not the paper's setup: the paper's numbers are on ModelNet40, not on source=shapes." in table
    paper, notes = PointCloudClassification(source="shapes", num_points=64).paper_comparison()
    assert paper == {} and "no numbers at 64 points" in notes[-1]
    assert MaxRegression().paper_comparison() == (MaxRegression.paper, [])
    notes = MoGClustering(num_components=6, dim_hidden=32).paper_comparison()[1]
    differ = "num_components 6 (paper 4), dim_hidden 32 (paper 128)"
    assert notes == [f"this run's setup differs from the paper's: {differ}"]
    assert "Omniglot" in CountUnique().paper_comparison()[1][0]
