"""Exported models against PyTorch, and ``settransformer export`` end to end.

The ONNX file runs in ONNX Runtime (skipped when it is not installed) and the TorchScript file in
a fresh Python process that never imports settransformer; both must match the eager model to 1e-4
on padded batches of batch and set sizes never used at export (traced at batch 2, set size 8),
with junk (NaN) in the padding and an empty set. Each format is exported once per module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli as _cli
from torch import Tensor, nn

from settransformer.deploy.export import (
    ExportError,
    _example,
    _large_set_forms,
    export_onnx,
    export_torchscript,
)
from settransformer.nn.blocks import ROW_BLOCK
from settransformer.nn.mab import MAB
from settransformer.nn.models import SetTransformer
from settransformer.nn.sequence import SequenceSetModel
from settransformer.tasks.runs import build_task, load_run, train_run
from settransformer.training.config import TrainConfig

DIM = 3
SIZES = [(1, 1), (3, 5), (4, 37), (6, 130)]  # (batch, set size); export traced (2, 8)


def padded_batch(b: int, n: int, dim: int = DIM) -> tuple[Tensor, Tensor]:
    """``x: (b, n, dim)`` with NaN at padded rows (holes anywhere), ``mask: (b, n)``; for ``b > 2``
    the last set is empty."""
    gen = torch.Generator().manual_seed(100 * n + b)
    x = torch.randn(b, n, dim, generator=gen)
    mask = torch.rand(b, n, generator=gen) > 0.4
    mask[:, n // 2] = True
    if b > 2:
        mask[-1] = False
    return x.masked_fill(~mask[..., None], float("nan")), mask


@pytest.fixture(scope="module")
def model() -> SetTransformer:
    torch.manual_seed(0)
    # ISAB + PMA: small sets take other forms of the attention than large ones (MAB.choose_form)
    return SetTransformer(DIM, 2, 4, dim_hidden=16, num_heads=4, num_inducing=4).eval()


@pytest.fixture(scope="module")
def onnx_file(model: SetTransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", dim_input=DIM)


@pytest.fixture(scope="module")
def torchscript_file(model: SetTransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_torchscript(model, tmp_path_factory.mktemp("ts") / "model.pt", dim_input=DIM)


def eager(model: nn.Module, x: Tensor, mask: Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x, mask).numpy()


def test_onnx_runtime_matches_pytorch(model: SetTransformer, onnx_file: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    assert inputs == [
        ("x", "tensor(float)", ["batch", "set", DIM]),
        ("mask", "tensor(bool)", ["batch", "set"]),
    ]
    assert [o.name for o in session.get_outputs()] == ["output"]
    for b, n in SIZES:
        x, mask = padded_batch(b, n)
        (out,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
        expected = eager(model, x, mask)
        assert out.shape == (b, 2, 4) and np.isfinite(out).all()
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4, err_msg=f"batch {b}, set size {n}")


def test_onnx_ignores_padding(onnx_file: Path) -> None:
    """A set gives the same output alone and padded inside a batch."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x, mask = padded_batch(4, 37)
    (batch_out,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    for i in range(3):
        alone = x[i][mask[i]][None].numpy()
        (out,) = session.run(None, {"x": alone, "mask": np.ones(alone.shape[:2], dtype=bool)})
        np.testing.assert_allclose(out[0], batch_out[i], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SETTRANSFORMER_TEST_DYNAMO_ONNX"),
    reason="opt-in: set SETTRANSFORMER_TEST_DYNAMO_ONNX=1 (the torch.export-based exporter takes 15-40 s)",
)
def test_dynamo_exporter(model: SetTransformer, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(model, tmp_path / "model.onnx", dim_input=DIM, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, n in SIZES:
        x, mask = padded_batch(b, n)
        (out,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
        np.testing.assert_allclose(out, eager(model, x, mask), atol=1e-4, rtol=1e-4)


_CHILD = """
import sys, torch
model = torch.jit.load(sys.argv[1])
cases = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    outs = [model(x, mask) for x, mask in cases]
assert not any(m.startswith("settransformer") for m in sys.modules), "imported settransformer"
torch.save(outs, sys.argv[3])
"""


def test_torchscript_in_a_fresh_process(
    model: SetTransformer, torchscript_file: Path, tmp_path: Path
) -> None:
    cases = [padded_batch(b, n) for b, n in SIZES]
    torch.save(cases, tmp_path / "cases.pt")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(torchscript_file),
            str(tmp_path / "cases.pt"),
            str(tmp_path / "o.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: the child must not find the package's source
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outs = torch.load(tmp_path / "o.pt", weights_only=True)
    for (x, mask), out in zip(cases, outs):
        assert torch.isfinite(out).all()
        np.testing.assert_allclose(out.numpy(), eager(model, x, mask), atol=1e-4, rtol=1e-4)


def test_export_uses_the_large_set_form_of_each_attention(model: SetTransformer) -> None:
    """The traced forms are those eager mode picks for large sets, whatever the traced size."""
    # in call order: the ISABs' two blocks, then PMA (the decoder's SAB is given projections)
    mabs = [m for m in model.modules() if isinstance(m, MAB)][:5]

    def forms(n: int) -> list[str]:
        chosen: list[str] = []
        for m in mabs:

            def path(nq: int, nk: int, device_type: str = "cpu", _m: MAB = m) -> str:
                chosen.append(MAB.choose_form(_m, nq, nk, device_type))
                return chosen[-1]

            m.__dict__["choose_form"] = path
        try:
            eager(model, *padded_batch(2, n))
        finally:
            for m in mabs:
                m.__dict__.pop("choose_form")
        return chosen

    large = forms(ROW_BLOCK // 2)  # large, and one row block of ISAB.forward_unchecked: each MAB called once
    assert large != forms(3)  # the test means something: the forms differ with the set size
    with _large_set_forms(model, _example(2, 8, DIM, torch.float32, torch.device("cpu"))):
        assert [m.choose_form(0, 0) for m in mabs] == large


class _Context(nn.Module):  # the kernel-regression models' interface
    def forward(self, context: Tensor, mask: Tensor, queries: Tensor) -> Tensor:
        return context.sum(1) + queries.sum(1)


class _Pair(nn.Module):
    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return x, mask


class _Linear(nn.Module):  # declares no dim_input
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.linear(x).masked_fill(~mask[..., None], 0).sum(1)


class _SizeDependent(nn.Module):
    """Branches in Python on the set size: a trace keeps the branch of the example."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return x.masked_fill(~mask[..., None], 0).sum(1) * (2.0 if x.shape[1] > 8 else 1.0)


def test_models_that_cannot_be_exported(tmp_path: Path) -> None:
    for fn in (export_onnx, export_torchscript):
        with pytest.raises(
            TypeError, match=r"_Context.forward takes \(context, mask, queries\).*needs dim_query"
        ):
            fn(_Context(), tmp_path / "a", dim_input=2)
        with pytest.raises(TypeError, match=r"model\(x, mask, queries\).*_Pair.forward takes \(x, mask\)"):
            fn(_Pair(), tmp_path / "a", dim_input=2, dim_query=1)
        with pytest.raises(TypeError, match="returns one tensor; _Pair returned tuple"):
            fn(_Pair(), tmp_path / "a", dim_input=2)
        with pytest.raises(ValueError, match="dim_input: the model takes sets of 3 features, got 2"):
            fn(SetTransformer(3, 1, 1, dim_hidden=8), tmp_path / "a", dim_input=2)
        with pytest.raises(
            ExportError, match=r"_Linear\(x, mask\) failed on an example batch x: \(2, 8, 4\)"
        ):
            fn(_Linear(), tmp_path / "a", dim_input=4)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_trace_is_never_written(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    with pytest.raises(ExportError, match="disagrees with the model on a batch of 3 sets of size 13"):
        export_torchscript(_SizeDependent(), target, dim_input=2, overwrite=True)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with pytest.raises(FileExistsError, match="already exists"):
        export_torchscript(SetTransformer(2, 1, 1, dim_hidden=8), target, dim_input=2)
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="opset: expected an ONNX opset version 14 to 20, got 9"):
        export_onnx(_SizeDependent(), tmp_path / "m.onnx", dim_input=2, opset=9)


# --- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MoG clustering run (ISAB + PMA) of two steps, without plots."""
    root = tmp_path_factory.mktemp("cli")
    options = {"dim_hidden": 8, "num_test_sets": 4, "min_size": 5, "max_size": 20, "cache_dir": str(root)}
    task = build_task("mog-clustering", options)
    config = TrainConfig.from_dict({"steps": 2, "batch_size": 4, "progress": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(task, "isab16-pma", config, root / "run", plots=False)
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def test_cli_exports_both_formats(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, model, _ = load_run(run, "best", "cpu")
    x, mask = padded_batch(3, 23, dim=2)
    expected = eager(model, x, mask)

    code, out, err = _cli(capsys, "export", str(run), "--format", "torchscript", "--which", "best")
    assert code == 0, err
    assert f"as TorchScript: {run / 'model-best.pt'}" in out and "x float32 (batch, set, 2)" in out
    with torch.no_grad():
        got = torch.jit.load(run / "model-best.pt")(x, mask).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)

    ort = pytest.importorskip("onnxruntime")
    out_file = run.parent / "exported" / "mog.onnx"
    code, out, err = _cli(
        capsys, "export", str(run / "best.pt"), "--format", "onnx", "--output", str(out_file)
    )
    assert code == 0, err
    assert "ONNX (opset 18)" in out
    session = ort.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_cli_refuses_to_overwrite_and_bad_input(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = run / "model.pt"
    code, _, err = _cli(capsys, "export", str(run), "--format", "torchscript")
    assert code == 0, err
    before = target.read_bytes()
    for argv, message in [
        ([str(run), "--format", "torchscript"], f"--output {target}: already exists; pass --overwrite"),
        ([str(run.parent / "nope"), "--format", "onnx"], "nope"),
        ([str(run), "--format", "torchscript", "--opset", "17", "--output", "x.pt"], "--opset: only for"),
        ([str(run), "--format", "pickle"], "invalid choice: 'pickle'"),
        ([str(run), "--format", "onnx", "--output", str(run)], "is a folder"),
    ]:
        code, _, err = _cli(capsys, "export", *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert target.read_bytes() == before
    code, _, err = _cli(capsys, "export", str(run), "--format", "torchscript", "--overwrite")
    assert code == 0, err
    assert "warning" not in err
    code, _, err = _cli(
        capsys, "export", str(run), "--format", "torchscript", "--output", str(run / "m.onnx")
    )
    assert (
        code == 0 and "warning: --output m.onnx: the file holds torchscript; its usual suffix is .pt" in err
    )


def test_cli_export_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "export", "--help")
    assert code == 0
    for flag in ("RUN", "--format", "--output", "--which", "--opset", "--overwrite", "mask"):
        assert flag in out


@pytest.mark.parametrize(
    ("options", "message"), [({"top_k": 3}, "hard top_k=3"), ({"score": "additive"}, "the additive")]
)
def test_attention_a_graph_cannot_hold_is_refused_by_name(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    model = SetTransformer(3, 1, 2, dim_hidden=8, num_heads=2, num_inducing=4, **options)  # type: ignore[arg-type]
    for export in (export_onnx, export_torchscript):
        with pytest.raises(ExportError, match=f"encoder.0.mab0 uses {message}"):
            export(model, tmp_path / "m", dim_input=3)
    assert not list(tmp_path.iterdir())


def test_onnx_export_of_an_order_aware_baseline_says_why(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    with pytest.raises(ExportError, match=r"order-aware baseline \(lstm\), whose stable sort"):
        export_onnx(SequenceSetModel(2, 1, 1), tmp_path / "m.onnx", dim_input=2)
    assert not list(tmp_path.iterdir())
