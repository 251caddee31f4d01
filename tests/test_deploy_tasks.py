"""A deployed model carries its task's preprocessing: for every task, ``settransformer predict`` on the
raw test inputs reproduces ``eval``'s headline metric, and the exported ONNX graph agrees with PyTorch."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from settransformer import cli
from settransformer.data.mixtures import MixtureParams, hard_assignments, mean_log_likelihood
from settransformer.nn.sets import pad_sets
from settransformer.tasks.count_unique import poisson_mode
from settransformer.tasks.metrics import adjusted_rand_index
from settransformer.tasks.runs import load_run

Metric = Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor], object], float]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _accuracy(sets, targets, outputs, task) -> float:  # type: ignore[no-untyped-def]
    pred = torch.stack([o.reshape(-1) for o in outputs]).argmax(1)
    return float((pred == targets).float().mean())


def _mae(sets, targets, outputs, task) -> float:  # type: ignore[no-untyped-def]
    return float((torch.stack([o.reshape(()) for o in outputs]) - targets).abs().mean())


def _count_accuracy(sets, targets, outputs, task) -> float:  # type: ignore[no-untyped-def]
    rate = F.softplus(torch.stack([o.reshape(()) for o in outputs]))
    return float((poisson_mode(rate) == targets).float().mean())


def _auroc(sets, targets, outputs, task) -> float:  # type: ignore[no-untyped-def]
    from sklearn.metrics import roc_auc_score

    prob = torch.cat([torch.softmax(o.reshape(-1), 0) for o in outputs])
    odd = torch.cat([F.one_hot(t, len(s)) for s, t in zip(sets, targets, strict=True)])
    return float(roc_auc_score(odd.numpy(), prob.numpy()))


def _mixtures(sets, outputs, task):  # type: ignore[no-untyped-def]
    """The test sets in the space the mixtures live in (projected for digits), padded, and the mixtures."""
    x, mask = pad_sets(sets)
    if task.name == "digits-clustering":
        t = task.test_sets()
        x, mask = t["x"], t["mask"]
    return x, mask, MixtureParams.from_output(torch.stack(outputs))


def _ll0(sets, targets, outputs, task) -> float:  # type: ignore[no-untyped-def]
    x, mask, params = _mixtures(sets, outputs, task)
    return float(mean_log_likelihood(x, params, mask).mean())


def _ari(sets, targets, outputs, task) -> float:  # type: ignore[no-untyped-def]
    x, mask, params = _mixtures(sets, outputs, task)
    labels = targets[:, : x.shape[1]]
    return float(adjusted_rand_index(labels, hard_assignments(x, params, mask), mask).mean())


def _clouds(tmp: Path) -> str:
    """Point clouds far from the origin and large (scaled by 50, shifted by 200): only a model that
    standardises them itself gets them right; 64 points each, the model keeps 32."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    points = rng.normal(size=(60, 64, 3)) * (1 + labels[:, None, None]) * 50 + 200
    np.savez(tmp / "clouds.npz", points=points.astype(np.float32), labels=labels)
    return f"path={tmp / 'clouds.npz'}"


def _wine(tmp: Path, regression: bool = False) -> str:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    rng = np.random.default_rng(0)
    sets, labels = [], []
    for i in range(60):
        idx = rng.choice(np.flatnonzero(y == i % 3), size=int(rng.integers(4, 10)), replace=False)
        sets.append(x[idx].astype(np.float32))
        labels.append(["barolo", "grignolino", "barbera"][i % 3])
    target = np.array([s[:, 0].mean() for s in sets]) if regression else np.array(labels)
    path = tmp / "wine.npz"
    np.savez(path, values=np.concatenate(sets), offsets=np.cumsum([0] + [len(s) for s in sets]), y=target)
    return f"path={path}"


TINY = ["dim_hidden=8", "num_heads=2"]
#: task, model, --set options (a function of the temporary folder), the metric recomputed from outputs.
CASES: list[tuple[str, str, Callable[[Path], list[str]], Metric]] = [
    ("max-regression", "settransformer", lambda t: [*TINY, "test_sets=64"], _mae),
    ("count-unique", "sab-pma", lambda t: [*TINY, "test_sets=32"], _count_accuracy),
    ("set-anomaly", "sab-pma", lambda t: [*TINY, "test_sets=32"], _auroc),
    ("mog-clustering", "rff-pma", lambda t: ["dim_hidden=8", "num_test_sets=16", f"cache_dir={t}"], _ll0),
    (
        "digits-clustering",
        "rff-pma",
        lambda t: ["dim_hidden=8", "num_test_sets=8", "max_size=150", "baseline_n_init=1", f"cache_dir={t}"],
        _ari,
    ),
    ("pointcloud", "rff-pool", lambda t: ["dim_hidden=8", "num_points=32", "test_size=48"], _accuracy),
    ("pointcloud", "isab-pma", lambda t: [*TINY, "source=array", _clouds(t), "num_points=32"], _accuracy),
    ("set-classification", "settransformer", lambda t: [*TINY, "num_inducing=4", _wine(t)], _accuracy),
    ("set-regression", "deepsets", lambda t: ["dim_hidden=8", _wine(t, regression=True)], _mae),
]


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize(("name", "model", "options", "metric"), CASES, ids=[f"{c[0]}/{c[1]}" for c in CASES])
def test_predict_on_raw_inputs_reproduces_eval_and_onnx_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, model: str, options, metric: Metric
) -> None:
    run = tmp_path / "run"
    settings = [a for o in options(tmp_path) for a in ("--set", o)]
    _main(capsys, "train", name, "--model", model, "--steps", "4", "--batch-size", "8", "--out", str(run),
          "--no-progress", *settings)  # fmt: skip
    _main(capsys, "eval", str(run))
    measured = json.loads((run / "results.json").read_text())["metrics"]
    task, torch_model, _ = load_run(run, device="cpu")

    sets, targets = task.test_inputs()
    offsets = np.cumsum([0] + [len(s) for s in sets])
    raw = tmp_path / "raw.npz"
    np.savez(raw, values=torch.cat(sets).numpy(), offsets=offsets)
    if name in ("set-classification", "set-regression"):  # self-contained runs: no training file needed
        Path(task.options["path"]).unlink()
    predicted = tmp_path / "pred.jsonl"
    _main(capsys, "predict", str(run), "--input", str(raw), "--output", str(predicted), "--no-progress")
    outputs = [torch.tensor(json.loads(line)["output"]) for line in predicted.read_text().splitlines()]
    assert len(outputs) == len(sets)
    assert metric(sets, targets, outputs, task) == pytest.approx(measured[task.metric], abs=1e-4)

    onnx_file = tmp_path / "model.onnx"
    _main(capsys, "export", str(run), "--format", "onnx", "--output", str(onnx_file))
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x, mask = pad_sets(sets[:8])
    got = session.run(["output"], {"x": x.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        want = torch_model(x, mask).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_pointcloud_export_subsamples_clouds_of_any_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exported preprocessing keeps every n/P-th real point of clouds larger than num_points (the
    export traces sets smaller than it) and whole smaller clouds, in ONNX and TorchScript alike."""
    run = tmp_path / "run"
    _main(capsys, "train", "pointcloud", "--model", "isab-pma", "--steps", "2", "--batch-size", "8",
          "--out", str(run), "--no-progress", "--set", "dim_hidden=8", "--set", "num_heads=2",
          "--set", "num_points=16", "--set", "test_size=12", "--set", "standardize=train")  # fmt: skip
    _, torch_model, _ = load_run(run, device="cpu")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b, n in [(3, 40), (2, 16), (4, 17), (2, 9), (1, 100)]:
        x = torch.randn(b, n, 3, generator=gen) * 30 + 100
        mask = torch.rand(b, n, generator=gen) < torch.linspace(0.2, 1.0, b)[:, None]
        mask[:, 0] = True
        batches.append((x.masked_fill(~mask[..., None], 1e4), mask))
    with torch.no_grad():
        wants = [torch_model(x, mask) for x, mask in batches]
    import onnxruntime as ort

    for fmt in ("onnx", "torchscript"):
        path = tmp_path / f"model.{fmt}"
        _main(capsys, "export", str(run), "--format", fmt, "--output", str(path))
        if fmt == "onnx":
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            gots = [session.run(["output"], {"x": x.numpy(), "mask": m.numpy()})[0] for x, m in batches]
        else:
            traced = torch.jit.load(str(path))
            with torch.no_grad():
                gots = [traced(x, m).numpy() for x, m in batches]
        for got, want in zip(gots, wants, strict=True):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def _predicted(capsys: pytest.CaptureFixture[str], run: Path, raw: Path) -> list[torch.Tensor]:
    out = raw.with_suffix(".jsonl")
    _main(capsys, "predict", str(run), "--input", str(raw), "--output", str(out), "--no-progress",
          "--batch-size", "5")  # fmt: skip
    return [torch.tensor(json.loads(line)["output"]) for line in out.read_text().splitlines()]


def test_kernel_regression_predict_on_raw_inputs_and_queries_reproduces_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The context sets with their query points in one file: ``predict`` gives the Q values of each
    set that ``eval`` scored (``mse`` against the noisy targets); the exported ONNX graph takes the
    queries as a third input and agrees with PyTorch."""
    run = tmp_path / "run"
    _main(capsys, "train", "kernel-regression", "--model", "settransformer", "--steps", "4",
          "--batch-size", "8", "--out", str(run), "--no-progress", *[a for o in TINY for a in ("--set", o)],
          "--set", "test_sets=24", "--set", "sensitivity_sets=4", "--set", "num_queries=6")  # fmt: skip
    _main(capsys, "eval", str(run))
    measured = json.loads((run / "results.json").read_text())["metrics"]
    task, torch_model, _ = load_run(run, device="cpu")
    sets, targets = task.test_inputs()
    queries = task.test_batch().extra["queries"]
    assert queries.shape == (24, 6, 1) and targets.shape == (24, 6)

    x, mask = pad_sets(sets)
    dense = tmp_path / "dense.npz"
    np.savez(dense, x=x.numpy(), mask=mask.numpy(), queries=queries.numpy())
    outputs = _predicted(capsys, run, dense)
    assert [o.shape for o in outputs] == [(6,)] * 24
    mse = float((torch.stack(outputs) - targets).square().mean())
    assert mse == pytest.approx(measured["mse"], abs=1e-4)
    assert mse != pytest.approx(measured["mse_clean"], abs=1e-4)  # scored against the noisy targets

    # Ragged queries, a different count per set (padded per batch): each set's values are unchanged.
    qs = [q[: 1 + i % 6] for i, q in enumerate(queries)]
    ragged = tmp_path / "ragged.npz"
    np.savez(
        ragged,
        values=torch.cat(sets).numpy(),
        offsets=np.cumsum([0] + [len(s) for s in sets]),
        query_values=torch.cat(qs).numpy(),
        query_offsets=np.cumsum([0] + [len(q) for q in qs]),
    )
    for i, got in enumerate(_predicted(capsys, run, ragged)):
        torch.testing.assert_close(got, outputs[i][: 1 + i % 6], atol=1e-5, rtol=1e-5)

    onnx_file = tmp_path / "model.onnx"
    _main(capsys, "export", str(run), "--format", "onnx", "--output", str(onnx_file))
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "mask", "queries"]
    feed = {"x": x[:8].numpy(), "mask": mask[:8].numpy(), "queries": queries[:8, :4].numpy()}
    got = session.run(["output"], feed)[0]
    with torch.no_grad():
        want = torch_model(x[:8], mask[:8], queries[:8, :4]).numpy()
    assert got.shape == (8, 4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
