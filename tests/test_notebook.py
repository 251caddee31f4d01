"""The max-regression notebook runs headless, start to end, on a tiny budget."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "max_regression.ipynb"


@pytest.mark.slow
def test_max_regression_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SETTRANSFORMER_NOTEBOOK_STEPS", "10")
    monkeypatch.setenv("SETTRANSFORMER_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # stored clean
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "10 steps per model" in text and "settransformer" in text and "test MAE" in text
    tables = [out.data["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert len(tables) == 1 and all(
        f"`{m}`" in tables[0] for m in ("deepsets-mean", "deepsets-max", "settransformer")
    )
    assert "0.2085" in tables[0]  # the paper's number beside ours
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 3  # the training curves and two prediction plots
    assert (tmp_path / "runs" / "settransformer" / "metrics.jsonl").exists()
