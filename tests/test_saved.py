"""save_model / load_model: config.json + model.safetensors, no pickle; predict and export take the folder."""

from __future__ import annotations

import json
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch

from settransformer import DeepSets, SetTransformer, cli, load_model, save_model


@pytest.mark.parametrize(
    "model",
    [
        SetTransformer(3, 2, 4, dim_hidden=16, num_heads=2, num_inducing=4, pooling="pma"),
        SetTransformer(3, 1, 2, dim_hidden=8, num_heads=2, num_inducing=None, encoder="rff", pooling="max"),
        DeepSets(3, 1, 5, dim_hidden=8, pool="sum"),
    ],
)
def test_round_trip_gives_the_same_outputs(tmp_path: Path, model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    folder = save_model(model, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    info = json.loads((folder / "config.json").read_text())
    assert info["class"] == type(model).__name__ and info["config"] == model.config
    loaded = load_model(folder)
    assert type(loaded) is type(model) and not loaded.training
    x, mask = torch.randn(4, 7, 3), torch.rand(4, 7) > 0.3
    torch.testing.assert_close(loaded(x, mask), model.eval()(x, mask), atol=0, rtol=0)
    # the weights file is safetensors (a JSON header), not a pickle
    raw = (folder / "model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header])
    with pytest.raises(Exception):  # noqa: B017 - any unpickling failure
        pickletools.dis(raw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_comes_back_in_the_dtype_it_was_saved_in(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = SetTransformer(3, 1, 2, dim_hidden=16, num_heads=2, num_inducing=4).to(dtype).eval()
    folder = save_model(model, tmp_path / "m")
    loaded = load_model(folder)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    x = torch.randn(2, 9, 3, dtype=dtype)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    as_float32 = load_model(folder, dtype=torch.float32)
    assert {p.dtype for p in as_float32.parameters()} == {torch.float32}


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="save_model saves"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "lin")
    model = DeepSets(2, 1, 1, dim_hidden=4)
    save_model(model, tmp_path / "m")
    with pytest.raises(FileExistsError, match="already holds"):
        save_model(model, tmp_path / "m")
    save_model(model, tmp_path / "m", overwrite=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"format": 1, "class": "Evil", "config": {}}))
    with pytest.raises(ValueError, match="class 'Evil'"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"format": 1, "class": "DeepSets", "config": {**model.config, "dim_hidden": 8}})
    )
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(tmp_path / "m")


def test_predict_and_export_accept_a_saved_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = SetTransformer(2, 1, 3, dim_hidden=8, num_heads=2, num_inducing=4)
    folder = save_model(model, tmp_path / "mine")
    sets = [np.random.default_rng(i).normal(size=(n, 2)).astype(np.float32) for i, n in enumerate((4, 9, 1))]
    offsets = np.cumsum([0] + [len(s) for s in sets])
    np.savez(tmp_path / "in.npz", values=np.concatenate(sets), offsets=offsets)
    out = tmp_path / "out.npy"
    argv = [
        "predict",
        str(folder),
        "--input",
        str(tmp_path / "in.npz"),
        "--output",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    expected = torch.stack([model.eval()(torch.from_numpy(s)[None])[0] for s in sets])
    np.testing.assert_allclose(np.load(out), expected.detach().numpy(), atol=1e-5)
    ts = tmp_path / "mine.pt"
    assert cli.main(["export", str(folder), "--format", "torchscript", "--output", str(ts)]) == 0
    assert "SetTransformer (saved model" in capsys.readouterr().out
    x, mask = torch.randn(2, 5, 2), torch.rand(2, 5) > 0.3
    torch.testing.assert_close(torch.jit.load(str(ts))(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
