"""The attention kernels at the shapes the blocks run, and the rule that chooses between them.

    .venv/bin/python benchmarks/kernels.py            # the tables (about a minute on 2 cores)
    .venv/bin/python benchmarks/kernels.py --quick    # a few shapes (under a minute)
    python benchmarks/kernels.py --device cuda        # the GPU rule, at the shapes the blocks run there

For each shape ``(B, H, Nq, Nk, Dh)`` it times `settransformer.nn.attention.attention`'s two
dot-product kernels, ``fused`` (PyTorch's ``scaled_dot_product_attention``) and ``explicit`` (two
batched products and a softmax), forward without autograd and forward+backward, on inputs laid out
as the blocks lay them out (per-head views of one projection, or the pooled form's stacked
queries), and shows which one `settransformer.nn.attention.choose_kernel` picks. Times are
the best of interleaved rounds (fused, explicit, fused, ...) in one process, ``--threads`` threads.
The last column is the time of the rule's pick over the faster kernel's (1.00 = the faster one).
With ``--device cuda`` the shapes are those the blocks run on a GPU (the standard form: per-head
views, no pooled form), including an ISAB's inducing points over sets of up to 1M elements, and the
softmax table is left out (its rule is the CPU's).

A second table times ``torch.softmax`` against the three vectorised passes
(``exp(x - max) / sum``) that `settransformer.nn.scores.softmax` runs without autograd for
rows shorter than one CPU vector (`SHORT_ROW` floats: 16 with
AVX-512, 8 otherwise) in tensors of at least
`SHORT_ROW_MIN_ELEMENTS` values, and shows which one its rule
(`softmax_in_passes`) picks. PyTorch's kernel runs a scalar loop
over a row shorter than one vector, so which is faster depends on the machine: the header records
PyTorch's CPU capability.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from settransformer.nn.attention import _attention, choose_kernel, split_heads
from settransformer.nn.scores import SHORT_ROW, SHORT_ROW_MIN_ELEMENTS, _softmax_passes, softmax_in_passes

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")

# (B, H, Nq, Nk, Dh, layout): "self" = queries, keys and values from one (B, N, 3 H Dh) projection;
# "cross" = queries (B, Nq, H Dh) and keys/values (B, Nk, 2 H Dh); "pooled" = the pooled form,
# H * Nq stacked queries of one head (batch 1, shared) over the raw set (Dh = the set's width).
SHAPES: list[tuple[int, int, int, int, int, str]] = [
    (32, 4, 8, 8, 16, "self"),  # anomaly: SAB encoder
    (32, 4, 10, 10, 16, "self"),  # counting: SAB encoder
    (128, 4, 10, 10, 16, "self"),  # max regression: SAB encoder
    (64, 4, 10, 10, 16, "self"),  # max regression at half the batch
    (128, 4, 4, 10, 16, "cross"),  # PMA(4) over sets of 10, B = 128
    (10, 4, 4, 4, 32, "self"),  # MoG: decoder SAB over 4 seeds
    (32, 4, 8, 4, 16, "cross"),  # anomaly: elements over the pooled summary
    (32, 4, 4, 8, 16, "cross"),  # anomaly: PMA(4) over 8 elements
    (128, 1, 4, 10, 64, "pooled"),  # max regression: PMA(1)
    (10, 1, 16, 450, 128, "pooled"),  # MoG: PMA(4)
    (10, 1, 16, 200, 128, "pooled"),  # digits: PMA(4)
    (64, 1, 4, 100, 256, "pooled"),  # point cloud, 100 points: PMA(1)
    (32, 1, 4, 1000, 256, "pooled"),  # point cloud, 1,000 points: PMA(1)
    (10, 1, 128, 450, 128, "pooled"),  # MoG: 32 inducing points
    (10, 1, 64, 200, 128, "pooled"),  # digits: 16 inducing points
    (64, 1, 64, 100, 256, "pooled"),  # point cloud, 100 points: 16 inducing points
    (32, 1, 64, 1000, 256, "pooled"),  # point cloud, 1,000 points
    (1, 1, 128, 1000, 128, "pooled"),  # ISAB block, N = 1k
    (1, 1, 128, 10_000, 128, "pooled"),  # ISAB block, N = 10k
    (1, 1, 128, 100_000, 128, "pooled"),  # ISAB block, N = 100k
    (10, 4, 450, 32, 32, "cross"),  # MoG: 450 elements over 32 inducing points
    (10, 4, 200, 16, 32, "cross"),  # digits
    (64, 4, 100, 16, 64, "cross"),  # point cloud, 100 points
    (32, 4, 1000, 16, 64, "cross"),  # point cloud, 1,000 points
    (1, 4, 1000, 32, 32, "cross"),  # ISAB block, N = 1k
    (1, 4, 10_000, 32, 32, "cross"),  # ISAB block, N = 10k
    (1, 4, 100_000, 32, 32, "cross"),  # ISAB block, N = 100k
    (64, 4, 100, 100, 64, "self"),  # SAB over 100 elements
    (10, 4, 450, 450, 32, "self"),  # SAB over a MoG set
    (1, 4, 1000, 1000, 32, "self"),  # SAB block, N = 1k
    (1, 4, 4096, 4096, 32, "self"),  # SAB block, N = 4k
]
QUICK = [0, 1, 4, 7, 8, 18, 23, 26]
# On a GPU the blocks run the standard form: the pooled rows become their per-head cross attention.
GPU_SHAPES: list[tuple[int, int, int, int, int, str]] = [
    *(s for s in SHAPES if s[5] != "pooled"),
    (10, 4, 4, 450, 32, "cross"),  # MoG: PMA(4)
    (32, 4, 1, 1000, 64, "cross"),  # point cloud, 1,000 points: PMA(1)
    (10, 4, 32, 450, 32, "cross"),  # MoG: 32 inducing points over the set
    (32, 4, 16, 1000, 64, "cross"),  # point cloud, 1,000 points: 16 inducing points
    (1, 4, 32, 1000, 32, "cross"),  # ISAB block, N = 1k: inducing points over the set
    (1, 4, 32, 10_000, 32, "cross"),  # ISAB block, N = 10k
    (1, 4, 32, 100_000, 32, "cross"),  # ISAB block, N = 100k
    (1, 4, 32, 1_000_000, 32, "cross"),  # ISAB block, N = 1M
    (1, 4, 1_000_000, 32, 32, "cross"),  # ISAB block, N = 1M: the set over the inducing points
]
ROW_LENGTHS = [2, 4, 7, 8, 10, 15, 16, 32]
ROW_COUNTS = [512, 2048, 20_000]


def inputs(
    b: int,
    h: int,
    nq: int,
    nk: int,
    dh: int,
    layout: str,
    grad: bool,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``q, k, v`` as the blocks pass them to the kernel, and the leaves to differentiate."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    if layout == "pooled":
        q0, kv = leaf(1, 1, h * nq, dh), leaf(b, 1, nk, dh)
        return q0.expand(b, -1, -1, -1), kv, kv, [q0, kv]
    if layout == "self":
        x = leaf(b, nq, 3 * h * dh)
        q, k, v = (split_heads(t, h) for t in x.chunk(3, dim=-1))
        return q, k, v, [x]
    xq, xkv = leaf(b, nq, h * dh), leaf(b, nk, 2 * h * dh)
    k, v = (split_heads(t, h) for t in xkv.chunk(2, dim=-1))
    return split_heads(xq, h), k, v, [xq, xkv]


def best_time(
    fns: dict[str, Callable[[], object]], budget: float, rounds: int = 5, device: torch.device = CPU
) -> dict[str, float]:
    """Best seconds per call of each of ``fns``, timed in interleaved rounds (on a GPU up to the
    end of the last kernel)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn()
    reps = {}
    for name, fn in fns.items():
        sync()
        t = time.perf_counter()
        fn()
        sync()
        reps[name] = max(1, int(budget / rounds / max(time.perf_counter() - t, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t) / reps[name])
    return best


def measure(
    shape: tuple[int, int, int, int, int, str],
    grad: bool,
    budget: float,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
) -> dict[str, object]:
    b, h, nq, nk, dh, layout = shape
    q, k, v, leaves = inputs(b, h, nq, nk, dh, layout, grad, device, dtype)
    out_grad = torch.ones(b, q.shape[1], q.shape[2], v.shape[-1], device=device, dtype=dtype)

    def run(kernel: str) -> Callable[[], object]:
        def call() -> None:
            if grad:
                for t in leaves:
                    t.grad = None
                _attention(q, k, v, kernel=kernel).backward(out_grad)  # type: ignore[arg-type]
            else:
                with torch.no_grad():
                    _attention(q, k, v, kernel=kernel)  # type: ignore[arg-type]

        return call

    times = best_time({"fused": run("fused"), "explicit": run("explicit")}, budget, device=device)
    with torch.set_grad_enabled(grad):
        pick = choose_kernel(q, k, v)
    return {"times": times, "pick": pick}


def softmax_table(budget: float) -> tuple[list[str], list[float]]:
    """Rows of the short-row softmax table (``torch.softmax`` against `softmax`, and which
    one `softmax` runs), and the time of that pick over the faster one's, per measurement."""
    lines = [
        f"softmax without autograd (SHORT_ROW = {SHORT_ROW}, "
        f"SHORT_ROW_MIN_ELEMENTS = {SHORT_ROW_MIN_ELEMENTS})",
        "",
        "| rows x length | torch.softmax (ms) | three passes (ms) | three passes' speed-up | rule picks | "
        "pick / fastest |",
        "|---|---|---|---|---|---|",
    ]
    losses = []
    for rows in ROW_COUNTS:
        for n in ROW_LENGTHS:
            x = torch.randn(rows, n, generator=torch.Generator().manual_seed(0))
            fns = {"torch": lambda x=x: torch.softmax(x, dim=-1), "passes": lambda x=x: _softmax_passes(x)}
            with torch.no_grad():
                t = best_time(fns, budget)
                pick = "passes" if softmax_in_passes(x) else "torch"
            losses.append(t[pick] / min(t.values()))
            lines.append(
                f"| {rows:,} x {n} | {1e3 * t['torch']:.3f} | {1e3 * t['passes']:.3f} | "
                f"{t['torch'] / t['passes']:.2f}x | {pick} | {losses[-1]:.2f} |"
            )
    return lines, losses


def _geomean(values: list[float]) -> float:
    return torch.tensor(values).log().mean().exp().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few shapes, shorter timings")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the kernels run (default cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the inputs' dtype (default float32)",
    )
    parser.add_argument(
        "--output",
        help="markdown file (default benchmarks/results/kernels.md, kernels-cuda.md with --device cuda; "
        "none with --quick)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in both kernels
    all_shapes = GPU_SHAPES if gpu else SHAPES
    shapes = [all_shapes[i] for i in QUICK if i < len(all_shapes)] if args.quick else all_shapes
    budget = 0.15 if args.quick else 0.4
    started = time.perf_counter()
    cpu = f"{os.cpu_count()} CPUs (capability {torch.backends.cpu.get_cpu_capability()})"
    place = torch.cuda.get_device_name(device) if gpu else f"{args.threads} threads, {cpu}"
    header = f"torch {torch.__version__}, {place}, {args.dtype}, load {os.getloadavg()[0]:.1f} at start"
    lines = [
        header,
        "",
        "| B, H, Nq, Nk, Dh (layout) | mode | fused (ms) | explicit (ms) | explicit speed-up | rule picks | "
        "pick / fastest |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    worst, total = 1.0, []
    for shape in shapes:
        for grad in (False, True):
            m = measure(shape, grad, budget, device, dtype)
            t: dict[str, float] = m["times"]  # type: ignore[assignment]
            pick = str(m["pick"])
            loss = t[pick] / min(t.values())
            worst, total = max(worst, loss), [*total, loss]
            row = (
                f"| {', '.join(map(str, shape[:5]))} ({shape[5]}) | {'fwd+bwd' if grad else 'fwd'} | "
                f"{1e3 * t['fused']:.3f} | {1e3 * t['explicit']:.3f} | {t['fused'] / t['explicit']:.2f}x | "
                f"{pick} | {loss:.2f} |"
            )
            lines.append(row)
            print(row, flush=True)
    geo = _geomean(total)
    summary = [
        "",
        f"rule's pick over the fastest kernel: geometric mean {geo:.3f}, worst {worst:.2f} "
        f"({len(total)} measurements, {(time.perf_counter() - started) / 60:.1f} min)",
    ]
    if not gpu:
        softmax_lines, losses = softmax_table(budget / 2)
        summary += [
            "",
            *softmax_lines,
            "",
            f"softmax rule's pick over the faster: geometric mean {_geomean(losses):.3f}, "
            f"worst {max(losses):.2f}",
        ]
    print("\n".join(summary))
    if args.quick and not args.output:
        return
    out = (
        Path(args.output) if args.output else HERE / "results" / ("kernels-cuda.md" if gpu else "kernels.md")
    )
    command = "python benchmarks/kernels.py" + (" --quick" if args.quick else "")
    command += f" --device cuda --dtype {args.dtype}" if gpu else ""
    out.write_text("\n".join([f"# Attention kernels\n\n`{command}`\n", *lines, *summary, ""]))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
