"""Benchmark the exported MoG Set Transformer: eager PyTorch against ONNX Runtime (and TorchScript).

    nice -n 19 .venv/bin/python benchmarks/export.py              # while developing (shared machine)
    .venv/bin/python benchmarks/export.py --threads 2             # the reported table (quiet machine)
    .venv/bin/python benchmarks/export.py --threads 1 --no-padding

The model is the mog-clustering task's default row (``isab16-pma``: ISAB16(128, 4) x 2, PMA + SAB,
2-D points, 4 components), with random weights (``--run`` loads a trained run instead). The input
is a batch of 10 MoG sets padded to N = 500: set ``i`` has ``500 - 5 i`` real points (up to 9 %
padding, junk in the padded rows), unless ``--no-padding``.

Every runtime gets the same CPU thread count: ``torch.set_num_threads(T)`` for eager and
TorchScript, ``intra_op_num_threads = T`` (and ``inter_op_num_threads = 1``) for ONNX Runtime,
``T = --threads`` (default 2). ONNX Runtime runs on the CPU execution provider with
``graph_optimization_level = ORT_ENABLE_ALL``, once with its default of spinning worker threads and
once without (spinning trades CPU time for latency; on a shared machine it hurts). Eager runs
under ``torch.inference_mode``; TorchScript is the file ``settransformer export`` writes, loaded
with ``torch.jit.load``. Each runtime is warmed up, then timed ``--repeats`` times in a row; the
table gives the median and the fastest call, and the largest absolute difference of its output
from eager PyTorch's. Target: ONNX Runtime at least as fast as eager, outputs within 1e-4.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from settransformer.deploy.export import DEFAULT_OPSET, export_onnx, export_torchscript
from settransformer.tasks.runs import build_task, load_run

BATCH, SET_SIZE, DIM_INPUT = 10, 500, 2


def _inputs(padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: (10, 500, 2)`` MoG sets, ``mask: (10, 500)``; set ``i`` keeps ``500 - 5 i`` points."""
    task = build_task("mog-clustering", {"min_size": SET_SIZE, "max_size": SET_SIZE})
    x = task.sample_batch(BATCH, torch.Generator().manual_seed(0)).x
    mask = torch.ones(BATCH, SET_SIZE, dtype=torch.bool)
    if padding:
        for i in range(BATCH):
            mask[i, SET_SIZE - 5 * i :] = False
        x = x.masked_fill(~mask[..., None], 1e3)  # junk the model must ignore
    return x, mask


def _time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median and minimum wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    time.sleep(0.2)  # let spinning worker threads go idle before the next runtime
    return statistics.median(times) * 1e3, min(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every runtime (default 2)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per runtime (default 30)")
    parser.add_argument("--no-padding", action="store_true", help="every set has all 500 points")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    parser.add_argument(
        "--run", help="a trained mog-clustering run folder or checkpoint (default: random weights)"
    )
    args = parser.parse_args(argv)

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    if args.run:
        _, model, _ = load_run(args.run, "last", "cpu")
    else:
        torch.manual_seed(0)
        task = build_task("mog-clustering")
        model = task.build_model(task.default_model or "isab16-pma").eval()
    x, mask = _inputs(not args.no_padding)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", dim_input=DIM_INPUT, opset=args.opset)
        onnx_seconds = time.perf_counter() - start
        ts_path = export_torchscript(model, Path(tmp) / "model.pt", dim_input=DIM_INPUT)
        scripted = torch.jit.load(str(ts_path))
        sessions = {}
        for spinning in (True, False):
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
            sessions[spinning] = ort.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )

    feed = {"x": x.numpy(), "mask": mask.numpy()}

    def eager() -> np.ndarray:
        with torch.inference_mode():
            return model(x, mask).numpy()

    def torchscript() -> np.ndarray:
        with torch.inference_mode():
            return scripted(x, mask).numpy()

    runtimes: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("PyTorch eager (inference_mode)", eager),
        ("TorchScript (torch.jit.load)", torchscript),
        ("ONNX Runtime CPU", lambda: sessions[True].run(None, feed)[0]),
        ("ONNX Runtime CPU, no spinning", lambda: sessions[False].run(None, feed)[0]),
    ]
    reference = eager()
    rows = []
    for name, fn in runtimes:
        diff = float(np.abs(fn() - reference).max())
        median, fastest = _time(fn, args.repeats)
        rows.append((name, median, fastest, diff))

    real = int(mask.sum())
    print(
        f"MoG Set Transformer (isab16-pma), batch {BATCH}, N = {SET_SIZE} ({real} real points, "
        f"{BATCH * SET_SIZE - real} padded), {args.threads} thread(s), {args.repeats} calls each; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, opset {args.opset}; "
        f"ONNX export + checks {onnx_seconds:.1f} s\n"
    )
    print("| runtime | median ms | fastest ms | vs eager (median) | max abs diff vs eager |")
    print("|---|---:|---:|---:|---:|")
    eager_median = rows[0][1]
    for name, median, fastest, diff in rows:
        print(f"| {name} | {median:.1f} | {fastest:.1f} | {eager_median / median:.2f}x | {diff:.1e} |")
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
