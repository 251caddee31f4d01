"""Scaling benchmark: time and peak memory against N for sets of up to 10 million elements.

    .venv/bin/python benchmarks/scale.py --plot scale.png     # N = 1e3 .. 1e7 (10+ minutes on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick              # N <= 1e5, small ragged batch (a minute)
    .venv/bin/python benchmarks/scale.py --max-n 1e6 --rows st,flops
    .venv/bin/python benchmarks/scale.py --rows chunks                  # chunk sizes at N = 1e6 (8 minutes)

Rows (float32, ``dim_input`` 3, width 128, 4 heads, 32 inducing points, ``ff_dim=None``, inference):

- ``isab``: ISAB forward, every element's output; ``st``: SetTransformer (2 ISABs, PMA with one
  seed, 2 SABs, linear head) forward, i.e. encode + PMA. Each as ``chunked``
  (`settransformer.nn.streaming`), ``unchunked`` (the blocks as is) and ``naive``
  (``benchmarks/naive.py``), each point in its own process. A point is skipped when its memory,
  extrapolated linearly from the previous N, would exceed ``--mem-limit-gb``.
- ``flops``: ISAB forward at N = 1e6 against a plain ``(N, 128) @ (128, 128)`` matmul in the same
  process, both writing into a preallocated output (``out=``; the chunked ISAB also into a new
  one). FLOPs are counted for the attention forms the code runs (2 per multiply-add of every
  matrix product, including the ``K = 3`` products; softmax, LayerNorm, bias and ReLU not counted).
- ``chunks`` (not run by default): the SetTransformer at N = 1e6 (``--max-n`` if smaller) chunked at
  each of ``--chunk-sizes`` and unchunked, in rounds of one process per point (``--chunk-rounds``,
  interleaved), each point's best round: time, memory above baseline and throughput against the
  unchunked path, the evidence for the library's default ``chunk_size``.
- ``ragged``: 64 sets with sizes log-uniform in [10, ``--ragged-max``] (seed 0) through the
  SetTransformer as a ragged batch (`settransformer.large.ragged.ragged_forward`) and padded to
  the largest set (``model(x, mask)``; if that would exceed the memory limit, the padded batch
  evaluated with ``chunk_size`` instead). Both include their input in the peak; outputs compared.

Peak memory is ``ru_maxrss`` of the worker process, total and above the baseline after imports,
model construction and a small warm-up. Times are medians of repeated runs (one run when a run
takes more than a third of ``--budget`` seconds). ``load`` is the 1-minute load average when the
point started (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from settransformer.nn.streaming import DEFAULT_CHUNK_SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM_IN, DIM, HEADS, INDUCING = 3, 128, 4, 32
IMPLS = ("chunked", "unchunked", "naive")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn: Callable[[], object], budget_s: float, max_runs: int = 5) -> tuple[float, int, float]:
    """Median wall time of ``fn``, the number of runs (the first is always timed), median CPU time.

    CPU time is the process's, all threads: on a shared machine it shows the work done when wall
    time mostly shows the waiting.
    """
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs:
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if times[0] > budget_s / 3 or time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times), statistics.median(cpu)


def _model(what: str, impl: str) -> torch.nn.Module:
    from naive import NaiveISAB, naive_like

    from settransformer import ISAB, SetTransformer

    torch.manual_seed(0)
    if what == "isab":
        block = ISAB(DIM_IN, DIM, HEADS, INDUCING).eval()
        if impl == "naive":
            naive = NaiveISAB(DIM_IN, DIM, HEADS, INDUCING)
            naive.load_state_dict(block.state_dict())
            return naive.eval()
        return block
    model = SetTransformer(DIM_IN, 1, 1, dim_hidden=DIM, num_heads=HEADS, num_inducing=INDUCING).eval()
    return naive_like(model).eval() if impl == "naive" else model


def _runner(what: str, impl: str, model: torch.nn.Module, chunk_size: int) -> Callable[[torch.Tensor], Any]:
    from settransformer.nn.streaming import isab_chunked

    if impl != "chunked":
        return model
    if what == "isab":
        return lambda x: isab_chunked(model, x, chunk_size=chunk_size)  # type: ignore[arg-type]
    return lambda x: model(x, chunk_size=chunk_size)


def worker_point(what: str, impl: str, n: int, chunk_size: int, budget: float) -> dict[str, float]:
    load = os.getloadavg()[0]
    model = _model(what, impl)
    run = _runner(what, impl, model, chunk_size)
    with torch.inference_mode():
        run(torch.randn(1, 1000, DIM_IN))  # kernels, thread pools
        base = _rss_mb()
        x = torch.randn(1, n, DIM_IN)
        seconds, runs, cpu = _time(lambda: run(x), budget)
    return {
        "time_s": seconds,
        "runs": runs,
        "cpu_s": cpu,
        "peak_mb": _peak_mb(),
        "base_mb": base,
        "load": load,
    }


def _isab_flops(isab: Any, n: int, nq: int) -> float:
    """FLOPs (2 per multiply-add) of the matrix products of ISAB over n elements, mab1 on nq-row chunks."""
    mab0, mab1 = isab.mab0, isab.mab1
    h, d, m, dkv, dq = mab0.num_heads, mab0.dim, isab.inducing.shape[0], mab0.dim_kv, mab1.dim_q
    induce = 2 * h * m * dkv * 2  # pooled form: scores and weighted sum over raw rows
    if mab1.choose_form(nq, m) != "induced":
        raise RuntimeError("the FLOP count assumes mab1's induced form")
    rows = 2 * dq * h * m + 2 * h * m * d + 2 * d * d  # scores, values folded with W_O, rFF
    rows += 2 * dq * d if mab1.residual == "projected" else 0  # projected residual
    return float(n * (induce + rows))


def worker_flops(n: int, chunk_size: int, budget: float) -> dict[str, float]:
    from settransformer.nn.streaming import isab_chunked

    load = os.getloadavg()[0]
    isab = _model("isab", "unchunked")
    x = torch.randn(1, n, DIM_IN)
    a, w, out = torch.randn(n, DIM), torch.randn(DIM, DIM), torch.empty(n, DIM)
    z = torch.empty(1, n, DIM)
    with torch.inference_mode():
        isab(x[:, :1000])
        torch.mm(a, w, out=out)  # touches the output pages
        isab_chunked(isab, x, chunk_size=chunk_size, out=z)
        mm_s, _, mm_cpu = _time(lambda: torch.mm(a, w, out=out), budget)
        un_s, _, un_cpu = _time(lambda: isab(x), budget)
        ch_s, _, ch_cpu = _time(lambda: isab_chunked(isab, x, chunk_size=chunk_size, out=z), budget)
        fresh_s, _, fresh_cpu = _time(lambda: isab_chunked(isab, x, chunk_size=chunk_size), budget)
    if isab.mab0.choose_form(INDUCING, n) != "pooled":
        raise RuntimeError("the FLOP count assumes mab0's pooled form")
    return {
        "flops_per_element": _isab_flops(isab, 1, chunk_size),
        "mm_s": mm_s,
        "chunked_s": ch_s,
        "unchunked_s": un_s,
        "mm_cpu_s": mm_cpu,
        "chunked_cpu_s": ch_cpu,
        "unchunked_cpu_s": un_cpu,
        "fresh_s": fresh_s,
        "fresh_cpu_s": fresh_cpu,
        "load": load,
    }


def ragged_sizes(max_size: int, count: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.exp(torch.empty(count).uniform_(math.log(10), math.log(max_size), generator=g)).long()


def worker_ragged(impl: str, max_size: int, chunk_size: int, budget: float, save: str) -> dict[str, float]:
    from settransformer.large.ragged import ragged_forward, ragged_to_padded

    load = os.getloadavg()[0]
    model = _model("st", "unchunked")
    sizes = ragged_sizes(max_size)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    with torch.inference_mode():
        model(torch.randn(2, 1000, DIM_IN))
        base = _rss_mb()
        x = torch.randn(int(offsets[-1]), DIM_IN, generator=torch.Generator().manual_seed(1))
        if impl == "ragged":
            run: Callable[[], torch.Tensor] = lambda: ragged_forward(model, x, offsets)  # noqa: E731
        else:
            xp, mask = ragged_to_padded(x, offsets)
            del x
            kw = {"chunk_size": chunk_size} if impl == "padded-chunked" else {}
            run = lambda: model(xp, mask, **kw)  # noqa: E731
        seconds, runs, cpu = _time(run, budget)
        torch.save(run(), save)
    return {
        "time_s": seconds,
        "runs": runs,
        "cpu_s": cpu,
        "peak_mb": _peak_mb(),
        "base_mb": base,
        "load": load,
    }


WAIT_POLICY = "default"


def _run_worker(threads: int, **spec: Any) -> dict[str, float] | None:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(threads)]
    env = dict(os.environ)
    if WAIT_POLICY != "default":
        env["OMP_WAIT_POLICY"] = WAIT_POLICY
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"worker {spec} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_mb(r: dict[str, float]) -> str:
    return f"{r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f}"


def sweep(args: argparse.Namespace, sizes: list[int]) -> dict[tuple[str, str], list[tuple[int, dict]]]:
    limit_mb = args.mem_limit_gb * 1024
    results: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    print(
        "| what | N | impl | time (s) | CPU (s) | runs | Melem/s | peak RSS (MB) | above base (MB) | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for what in [w for w in ("isab", "st") if w in args.rows]:
        for n in sizes:
            for impl in [i for i in IMPLS if i in args.impls]:
                done = results.setdefault((what, impl), [])
                if done:
                    n0, r0 = done[-1]
                    estimate = (r0["peak_mb"] - r0["base_mb"]) * n / n0
                    if estimate > limit_mb:
                        gb = estimate / 1024
                        print(f"| {what} | {n:,} | {impl} | skipped: ~{gb:.0f} GB estimated | | | | | | |")
                        continue
                r = _run_worker(
                    args.threads, kind="point", what=what, impl=impl, n=n, chunk_size=args.chunk_size,
                    budget=args.budget,
                )  # fmt: skip
                if r is None:
                    continue
                done.append((n, r))
                rate = n / r["time_s"] / 1e6
                print(
                    f"| {what} | {n:,} | {impl} | {r['time_s']:.3f} | {r['cpu_s']:.2f} | {r['runs']} | "
                    f"{rate:.2f} | "
                    f"{_fmt_mb(r)} | {r['load']:.1f} |",
                    flush=True,
                )
    return results


def ragged_row(args: argparse.Namespace, max_size: int) -> None:
    sizes = ragged_sizes(max_size)
    rows = 64 * int(sizes.max())
    per_row_mb = 2.7e-3  # unchunked SetTransformer inference, measured: about 2.6 kB per padded row
    impls = ["ragged", "padded" if rows * per_row_mb < args.mem_limit_gb * 1024 else "padded-chunked"]
    print(
        f"\nragged batch: 64 sets, sizes log-uniform in [10, {max_size:,}] (seed 0): {int(sizes.sum()):,} "
        f"elements, largest {int(sizes.max()):,}, padded {rows:,} rows"
    )
    if impls[1] != "padded":
        print(
            f"(plain padding estimated at {rows * per_row_mb / 1024:.0f} GB: padded path run with chunk_size)"
        )
    print("| impl | time (s) | CPU (s) | runs | peak RSS (MB) | above base (MB) | load |")
    print("|---|---|---|---|---|---|---|")
    res, outs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in impls:
            save = f"{tmp}/{impl}.pt"
            r = _run_worker(
                args.threads, kind="ragged", impl=impl, max_size=max_size, chunk_size=args.chunk_size,
                budget=args.budget, save=save,
            )  # fmt: skip
            if r is None:
                return
            res[impl], outs[impl] = r, torch.load(save, weights_only=True)
            row = f"| {impl} | {r['time_s']:.3f} | {r['cpu_s']:.2f} | {r['runs']} | {_fmt_mb(r)} | "
            row += f"{r['load']:.1f} |"
            print(row, flush=True)
    a, b = res["ragged"], res[impls[1]]
    diff = (outs["ragged"] - outs[impls[1]]).abs().max().item()
    above = (b["peak_mb"] - b["base_mb"]) / max(a["peak_mb"] - a["base_mb"], 1)
    print(
        f"ragged vs {impls[1]}: {b['time_s'] / a['time_s']:.1f}x faster, "
        f"{above:.1f}x less memory above baseline "
        f"({b['peak_mb'] / a['peak_mb']:.1f}x total), max output difference {diff:.1e}"
    )


def chunks_row(args: argparse.Namespace, n: int) -> None:
    """The SetTransformer at ``n`` elements chunked at each of ``args.chunk_sizes`` and unchunked."""
    points: list[tuple[str, int]] = [("unchunked", 0)] + [("chunked", c) for c in args.chunk_sizes]
    best: dict[int, dict[str, float]] = {}
    for _ in range(args.chunk_rounds):  # interleaved: a slow spell of a shared machine hits every point
        for impl, chunk in points:
            r = _run_worker(
                args.threads, kind="point", what="st", impl=impl, n=n, chunk_size=chunk or DEFAULT_CHUNK_SIZE,
                budget=args.budget,
            )  # fmt: skip
            if r is not None and (chunk not in best or r["time_s"] < best[chunk]["time_s"]):
                best[chunk] = r
    if 0 not in best:
        return
    print(
        f"\nSetTransformer at N={n:,} by chunk size (best of {args.chunk_rounds} rounds, one process per "
        f"point and round; default {DEFAULT_CHUNK_SIZE}):\n"
        "| chunk size | time (s) | CPU (s) | above base (MB) | throughput vs unchunked | load |\n"
        "|---|---|---|---|---|---|"
    )
    for _, chunk in points:
        r = best.get(chunk)
        if r is not None:
            ratio = best[0]["time_s"] / r["time_s"]
            print(
                f"| {chunk or 'unchunked'} | {r['time_s']:.3f} | {r['cpu_s']:.2f} | "
                f"{r['peak_mb'] - r['base_mb']:.0f} | {ratio:.2f}x | {r['load']:.1f} |"
            )


def flops_row(args: argparse.Namespace, n: int) -> None:
    r = _run_worker(args.threads, kind="flops", n=n, chunk_size=args.chunk_size, budget=args.budget)
    if r is None:
        return
    print(
        f"\nISAB forward at N={n:,} ({r['flops_per_element']:.0f} FLOP/element counted), "
        f"load {r['load']:.1f}:\n"
        "| computation | time (s) | GFLOP/s | of matmul rate | CPU (s) | GFLOP/CPU-s | of matmul |\n"
        "|---|---|---|---|---|---|---|"
    )
    mm = 2 * n * DIM * DIM
    isab = r["flops_per_element"] * n
    rows = [("(N,128)@(128,128) matmul, out=", mm, "mm"), ("ISAB chunked, out=", isab, "chunked")]
    rows += [("ISAB chunked, new output", isab, "fresh"), ("ISAB unchunked", isab, "unchunked")]
    base, base_cpu = mm / r["mm_s"], mm / r["mm_cpu_s"]
    for name, work, key in rows:
        wall, cpu = work / r[f"{key}_s"], work / r[f"{key}_cpu_s"]
        print(
            f"| {name} | {r[f'{key}_s']:.3f} | {wall / 1e9:.1f} | {wall / base:.0%} | "
            f"{r[f'{key}_cpu_s']:.2f} | {cpu / 1e9:.1f} | {cpu / base_cpu:.0%} |"
        )


def plot(results: dict[tuple[str, str], list[tuple[int, dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (what, impl), points in results.items():
        if not points:
            continue
        ns = [n for n, _ in points]
        style = {"chunked": "-o", "unchunked": "--s", "naive": ":^"}[impl]
        label = f"{'ISAB' if what == 'isab' else 'SetTransformer'} {impl}"
        ax_t.loglog(ns, [r["time_s"] for _, r in points], style, label=label)
        ax_m.loglog(ns, [max(r["peak_mb"] - r["base_mb"], 1) for _, r in points], style, label=label)
    ax_t.set(xlabel="set size N", ylabel="time (s)", title="forward time")
    ax_m.set(xlabel="set size N", ylabel="peak RSS above baseline (MB)", title="peak memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="N <= 1e5, ragged sizes up to 1e4")
    parser.add_argument("--max-n", type=float, default=1e7, help="largest N of the sweep (default 1e7)")
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help="which implementations of the sweep (default all)"
    )
    parser.add_argument("--min-n", type=float, default=1e3, help="smallest N of the sweep (default 1e3)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"elements per chunk (default {DEFAULT_CHUNK_SIZE}, the library's default)",
    )
    parser.add_argument(
        "--rows", default="isab,st,flops,ragged", help="which rows to run (comma-separated; also: chunks)"
    )
    parser.add_argument(
        "--chunk-sizes",
        default="1024,2048,4096,8192,16384",
        help="chunk sizes of the chunks row (comma-separated)",
    )
    parser.add_argument(
        "--chunk-rounds", type=int, default=2, help="interleaved rounds of the chunks row (default 2)"
    )
    parser.add_argument(
        "--ragged-max", type=int, default=100_000, help="largest ragged set size (default 1e5)"
    )
    parser.add_argument("--mem-limit-gb", type=float, default=12.0, help="skip points estimated above this")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds of repeats per point (default 20)"
    )
    parser.add_argument("--plot", help="write a log-log PNG of time and peak memory against N")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["auto", "passive", "active", "default"],
        default="auto",
        help="OMP_WAIT_POLICY of the workers. Spinning threads make timings erratic on a shared, "
        "oversubscribed machine, sleeping ones cost a little on a quiet one; 'auto' (default) picks "
        "passive when the load average exceeds the CPU count at start, else leaves the environment as is",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        fn = {"point": worker_point, "flops": worker_flops, "ragged": worker_ragged}[spec.pop("kind")]
        print(json.dumps(fn(**spec)))
        return

    global WAIT_POLICY
    WAIT_POLICY = args.omp_wait_policy
    if WAIT_POLICY == "auto":
        WAIT_POLICY = "passive" if os.getloadavg()[0] > (os.cpu_count() or 1) else "default"
    max_n = min(int(args.max_n), 100_000) if args.quick else int(args.max_n)
    sizes = [n for n in (1_000, 10_000, 100_000, 1_000_000, 10_000_000) if args.min_n <= n <= max_n]
    args.rows, args.impls = args.rows.split(","), args.impls.split(",")
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, chunk {args.chunk_size}, "
        f"dim_input {DIM_IN}, width {DIM}, {HEADS} heads, {INDUCING} inducing points, "
        f"OMP_WAIT_POLICY {WAIT_POLICY}, load {os.getloadavg()[0]:.1f}"
    )
    results = sweep(args, sizes) if {"isab", "st"} & set(args.rows) else {}
    for n in (1_000_000, 100_000):
        for what in ("isab", "st"):
            pts = {impl: dict(results.get((what, impl), [])).get(n) for impl in ("chunked", "unchunked")}
            if pts["chunked"] and pts["unchunked"]:
                ratio = pts["unchunked"]["time_s"] / pts["chunked"]["time_s"]
                print(f"{what} N={n:,}: chunked throughput {ratio:.2f}x the unchunked path")
    if "chunks" in args.rows:
        args.chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
        chunks_row(args, min(1_000_000, max_n))
    if "flops" in args.rows:
        flops_row(args, min(1_000_000, max_n))
    if "ragged" in args.rows:
        ragged_row(args, 10_000 if args.quick else args.ragged_max)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
