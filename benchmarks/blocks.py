"""Benchmark the blocks against a naive implementation of the same equations.

    .venv/bin/python benchmarks/blocks.py            # full table (several minutes on 2 cores)
    .venv/bin/python benchmarks/blocks.py --quick    # small sizes only (a minute)

Each measurement runs in its own process, so the peak resident memory it reports (above the
model and its input) is honest. Times are medians of repeated runs; forward is timed under
``torch.inference_mode``. All on CPU, float32, ``--threads`` threads (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM, HEADS, INDUCING = 128, 4, 32
# Memory the naive path would need for its attention matrices (bytes); skip it beyond this.
NAIVE_LIMIT = 12 * 2**30


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(impl: str, block: str) -> torch.nn.Module:
    from naive import NaiveISAB, NaiveSAB

    from settransformer import ISAB, SAB

    if block == "isab":
        return ISAB(DIM, DIM, HEADS, INDUCING) if impl == "ours" else NaiveISAB(DIM, DIM, HEADS, INDUCING)
    return SAB(DIM, DIM, HEADS) if impl == "ours" else NaiveSAB(DIM, DIM, HEADS)


def _time(fn, budget_s: float = 4.0, max_runs: int = 40) -> float:
    """Median wall time of ``fn`` over repeated runs (at least 2, within about ``budget_s``).

    Fast calls get many runs (up to ``max_runs``), so one slow spell of the machine does not
    decide their median; slow ones (a second or more) get a few.
    """
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _register_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU fused attention kernel (torch counts only the CUDA ones)."""
    from torch.utils import flop_counter as fc

    ops = torch.ops.aten
    forward, backward = (
        ops._scaled_dot_product_flash_attention_for_cpu,
        ops._scaled_dot_product_flash_attention_for_cpu_backward,
    )
    if forward not in fc.flop_registry:

        @fc.register_flop_formula(forward)
        def _fwd(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
            return fc.sdpa_flop_count(q_shape, k_shape, v_shape)

        @fc.register_flop_formula(backward)
        def _bwd(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
            return fc.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def _count_flops(run) -> float:
    """Matrix-product FLOPs of one call of ``run`` (products, batched products, fused attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def _gemm_rate(n: int) -> float:
    """GFLOP/s of a plain ``(n, DIM) @ (DIM, DIM)`` product into a preallocated output."""
    a, w, out = torch.randn(n, DIM), torch.randn(DIM, DIM), torch.empty(n, DIM)
    return 2 * n * DIM * DIM / _time(lambda: torch.mm(a, w, out=out), budget_s=2.0, max_runs=15) / 1e9


def worker_block(impl: str, block: str, n: int, mode: str, flops: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model = _build(impl, block)
    x = torch.randn(1, n, DIM, requires_grad=mode == "fwdbwd")

    def run() -> None:
        if mode == "fwd":
            with torch.inference_mode():
                model(x)
        else:
            model(x).square().mean().backward()
            model.zero_grad(set_to_none=True)
            x.grad = None

    with torch.inference_mode():  # load kernels and threads before the memory baseline
        model(torch.randn(1, 8, DIM))
    base = _rss_mb()
    run()
    peak = _peak_mb() - base
    result = {"time_s": _time(run), "peak_mb": peak}
    if flops:
        # counted with autograd on (the counter needs it); the forward computes the same products
        counted = run if mode == "fwdbwd" else lambda: model(x)
        result.update(gflop=_count_flops(counted) / 1e9, gemm_gflops=_gemm_rate(n))
    return result


def worker_train(impl: str, steps: int) -> dict[str, float]:
    """Adam steps of the amortized-clustering SetTransformer: B=10, N ~ U{300..600} per step."""
    from naive import naive_like

    from settransformer import SetTransformer

    torch.manual_seed(0)
    model: torch.nn.Module = SetTransformer(2, 4, 5, dim_hidden=DIM, num_heads=HEADS, num_inducing=INDUCING)
    if impl == "naive":
        model = naive_like(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(300, 601, (steps + 10,), generator=g).tolist()
    data = [torch.randn(10, n, 2, generator=g) for n in sizes]

    def step(x: torch.Tensor) -> None:
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x in data[:10]:
        step(x)
    t = time.perf_counter()
    for x in data[10:]:
        step(x)
    return {"steps_per_s": steps / (time.perf_counter() - t)}


def _run_worker(threads: int, **spec: object) -> dict[str, float] | None:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _naive_fits(block: str, n: int, mode: str) -> bool:
    keys = n if block == "sab" else INDUCING
    # attention matrix, its softmax, and in backward their gradients
    copies = 2 if mode == "fwd" else 5
    return HEADS * n * keys * 4 * copies < NAIVE_LIMIT


def _flop_row(block: str, n: int, mode: str, ours: dict[str, float], naive: dict[str, float]) -> str:
    rate = ours["gemm_gflops"]
    ours_rate, naive_rate = ours["gflop"] / ours["time_s"], naive["gflop"] / naive["time_s"]
    ceiling = naive["time_s"] / (ours["gflop"] / rate)
    cells = [
        block.upper(),
        f"{n:,}",
        mode,
        f"{ours['gflop']:.2f}",
        f"{naive['gflop']:.2f}",
        f"{naive['gflop'] / ours['gflop']:.2f}x",
        f"{rate:.0f}",
        f"{ours_rate / rate:.0%}",
        f"{naive_rate / rate:.0%}",
        f"{ceiling:.2f}x",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="only N <= 10k and a short training row")
    parser.add_argument("--train-steps", type=int, default=60, help="timed steps of the training row")
    parser.add_argument(
        "--train-repeats", type=int, default=7, help="alternating runs of the training row (default 7)"
    )
    parser.add_argument("--rows", default="isab,sab,train", help="which rows to run (comma-separated)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        fn = worker_train if spec.pop("kind") == "train" else worker_block
        print(json.dumps(fn(**spec)))
        return

    sizes = {"isab": [100, 1_000, 10_000, 100_000, 1_000_000], "sab": [100, 1_000, 10_000, 16_384]}
    if args.quick:
        sizes = {"isab": [100, 1_000, 10_000], "sab": [100, 1_000, 4_096]}
    rows = args.rows.split(",")
    sizes = {block: ns for block, ns in sizes.items() if block in rows}
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"dim {DIM}, {HEADS} heads, {INDUCING} inducing points"
    )
    print(
        "| block | N | mode | ours (s) | naive (s) | speed-up "
        "| ours peak (MB) | naive peak (MB) | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    flop_rows: list[str] = []
    for block, ns in sizes.items():
        for n in ns:
            for mode in ("fwd", "fwdbwd"):
                # FLOP counts where the target applies (N >= 10k); beyond 100k they only scale with N
                flops = block == "isab" and 10_000 <= n <= 100_000
                spec = {"kind": "block", "block": block, "n": n, "mode": mode, "flops": flops}
                ours = _run_worker(args.threads, impl="ours", **spec)
                naive = None
                if _naive_fits(block, n, mode):
                    naive = _run_worker(args.threads, impl="naive", **spec)
                if ours is None:
                    continue
                if flops and naive is not None:
                    flop_rows.append(_flop_row(block, n, mode, ours, naive))
                row = [block.upper(), f"{n:,}", mode, f"{ours['time_s']:.4f}"]
                if naive is None:
                    row += ["(too large)", "-", f"{ours['peak_mb']:.0f}", "-", "-"]
                else:
                    row += [
                        f"{naive['time_s']:.4f}",
                        f"{naive['time_s'] / ours['time_s']:.2f}x",
                        f"{ours['peak_mb']:.0f}",
                        f"{naive['peak_mb']:.0f}",
                        f"{ours['peak_mb'] / max(naive['peak_mb'], 1e-9):.2f}x",
                    ]
                print("| " + " | ".join(row) + " |", flush=True)
    if flop_rows:
        print()
        print(
            "FLOPs of the matrix products (torch's FlopCounterMode); GEMM rate: a plain "
            "(N,128)@(128,128) product in the same process; ceiling: the naive time over ours "
            "if every one of our FLOPs ran at the GEMM rate"
        )
        print(
            "| block | N | mode | ours (GFLOP) | naive (GFLOP) | naive/ours | GEMM rate (GFLOP/s) "
            "| ours: of GEMM rate | naive: of GEMM rate | speed-up ceiling |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row_text in flop_rows:
            print(row_text)
    if "train" not in rows:
        return
    steps = 20 if args.quick else args.train_steps
    rates: dict[str, list[float]] = {"ours": [], "naive": []}
    for _ in range(args.train_repeats):  # alternating, so a change in the machine's load hits both
        for impl in rates:
            r = _run_worker(args.threads, kind="train", impl=impl, steps=steps)
            if r is not None:
                rates[impl].append(r["steps_per_s"])
    if rates["ours"] and rates["naive"]:
        ours_t, naive_t = statistics.median(rates["ours"]), statistics.median(rates["naive"])
        print()
        print(
            "| training step (B=10, N~U{300..600}, 2->4x5, width 128, ISAB(32)x2+PMA+SABx2, Adam) "
            "| ours (steps/s) | naive (steps/s) | speed-up |"
        )
        print("|---|---|---|---|")
        runs = " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(rates["ours"], rates["naive"]))
        ratio = ours_t / naive_t
        print(f"| SetTransformer (median; runs {runs}) | {ours_t:.1f} | {naive_t:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
