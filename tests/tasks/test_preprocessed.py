"""Deployed task models carry their preprocessing, and the bare network's state dict still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from settransformer.tasks.base import Preprocessed
from settransformer.tasks.digits_clustering import DigitsClustering
from settransformer.tasks.pointcloud import PointCloudClassification
from settransformer.tasks.runs import _misfit


def _tasks(tmp_path: Path) -> dict[str, tuple[object, str]]:
    return {
        "pointcloud": (PointCloudClassification(dim_hidden=16, num_points=32), "isab-pma"),
        "digits": (
            DigitsClustering(
                cache_dir=str(tmp_path), num_test_sets=2, min_size=20, max_size=30, dim_hidden=16
            ),
            "isab16-pma",
        ),
    }


@pytest.mark.parametrize("name", ["pointcloud", "digits"])
def test_bare_network_state_dict_loads_into_the_deployed_model(name: str, tmp_path: Path) -> None:
    task, model_name = _tasks(tmp_path)[name]
    torch.manual_seed(0)
    trained = task.build_model(model_name)
    assert isinstance(trained, Preprocessed)
    bare = trained.model.state_dict()  # the layout of a run whose model had no preprocessing
    assert not any(k.startswith("model.") for k in bare)
    torch.manual_seed(1)
    fresh = task.build_model(model_name)
    assert _misfit(fresh, bare) == ""
    fresh.load_state_dict(bare)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_misfit_still_names_weights_of_another_model(tmp_path: Path) -> None:
    task, model_name = _tasks(tmp_path)["pointcloud"]
    model = task.build_model(model_name)
    other = {k: v for k, v in model.state_dict().items() if "pma" not in k}
    other["model.head.weight"] = torch.zeros(3, 3)
    message = _misfit(model, other)
    assert "missing" in message and "of another shape" in message
