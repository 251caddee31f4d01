"""Large CPU tensors with glibc's default heap against ``settransformer.heap.keep_freed_memory``.

    .venv/bin/python benchmarks/heap.py                                   # every row (~6 minutes)
    .venv/bin/python benchmarks/heap.py --official .peers/set_transformer # and the official ISAB (17)
    .venv/bin/python benchmarks/heap.py --quick                           # two rows, N = 10k (< 1 minute)

The setting is process-wide and one-way, so every measurement is a fresh worker process, and the
two heaps alternate (system, keep, system, ...) for ``--rounds`` rounds. Rows: adding two
``(1, N, 128)`` tensors into a new one (the cost of a large tensor's first touch), and our ISAB
(width 128, 4 heads, 32 inducing points, the official function through
``compat.official_options``) forward (inference) and forward+backward with Adam at N = 10k, 100k,
1M (forward only), the official code's ISAB beside it where ``--official DIR`` is given. Each cell:
the median over rounds of each process's best call (ms); the speed-up, computed round by round;
the minor page faults per call (thousands); and the process's peak resident memory (MB, after
imports, model and data: what the kept heap holds beyond glibc's defaults).
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

from blocks import _peak_mb
from peers import HERE, build_block, results_head, worker_env

from settransformer.heap import keep_freed_memory

ROWS = [
    ("add", 100_000, "infer"),
    ("isab", 10_000, "infer"),
    ("isab", 10_000, "train"),
    ("isab", 100_000, "infer"),
    ("isab", 100_000, "train"),
    ("isab", 1_000_000, "infer"),
]
QUICK = [("add", 10_000, "infer"), ("isab", 10_000, "train")]
WIDTH = 128


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(kind: str, n: int, mode: str, impl: str, official: str | None, budget: float) -> dict[str, float]:
    """Best seconds per call, minor faults per call and peak resident MB above the start, here."""
    torch.manual_seed(0)
    x = torch.randn(1, n, WIDTH)
    if kind == "add":
        y = torch.randn(1, n, WIDTH)

        def call() -> None:
            x + y

    else:
        model = build_block(kind, impl, official)
        if mode == "infer":
            model.eval()

            def call() -> None:
                with torch.no_grad():
                    model(x)

        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)

            def call() -> None:
                loss = model(x).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    base = _peak_mb()
    call()  # kernels, Adam's moments, and the heap's first blocks
    best, calls, faults, start = float("inf"), 0, _faults(), time.perf_counter()
    while calls < 3 or time.perf_counter() - start < budget:
        t = time.perf_counter()
        call()
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return {"s": best, "faults": (_faults() - faults) / calls, "rss_mb": _peak_mb() - base}


def _worker(spec: dict, heap: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--heap", heap]
    out = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", help="directory of the official code (modules.py): its ISAB too")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 1)")
    parser.add_argument(
        "--budget", type=float, default=1.5, help="seconds of calls per process (default 1.5)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    parser.add_argument("--quick", action="store_true", help="two rows at N = 10k, one round")
    parser.add_argument("--output", default=str(HERE / "results" / "heap.md"), help="markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--heap", choices=["system", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        if args.heap == "keep" and not keep_freed_memory():
            raise SystemExit("keep_freed_memory: not glibc")
        spec = json.loads(args.worker)
        print(json.dumps(measure(**spec)))
        return
    rounds = args.rounds or (1 if args.quick else 5)
    started = time.perf_counter()
    header = (
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs "
        f"(capability {torch.backends.cpu.get_cpu_capability()}), float32, {rounds} interleaved rounds, "
        f"load {os.getloadavg()[0]:.1f} at start"
    )
    print(header, flush=True)
    impls = ["same", "official"] if args.official else ["same"]
    names = {"same": "ours", "official": "official"}
    lines = [
        "| row | system (ms) | kept (ms) | kept speed-up | page faults per call, system / kept (k) "
        "| peak RSS, system / kept (MB) |",
        "|---|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    for kind, n, mode in QUICK if args.quick else ROWS:
        for impl in impls if kind != "add" else ["same"]:
            spec = {"kind": kind, "n": n, "mode": mode, "impl": impl, "official": args.official}
            spec["budget"] = args.budget
            res: dict[str, list[dict[str, float]]] = {"system": [], "keep": []}
            for _ in range(rounds):
                for heap in res:
                    res[heap].append(_worker(spec, heap))
            med = {h: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for h, rs in res.items()}
            ratio = statistics.median(s["s"] / k["s"] for s, k in zip(res["system"], res["keep"]))
            what = (
                "a + b" if kind == "add" else f"ISAB {'fwd' if mode == 'infer' else 'fwd+bwd'}, {names[impl]}"
            )
            sys_, keep = med["system"], med["keep"]
            line = (
                f"| {what}, N={n:,} | {1e3 * sys_['s']:.3g} | {1e3 * keep['s']:.3g} | **{ratio:.2f}x** "
                f"| {sys_['faults'] / 1e3:.1f} / {keep['faults'] / 1e3:.1f} "
                f"| {sys_['rss_mb']:.0f} / {keep['rss_mb']:.0f} |"
            )
            print(line, flush=True)
            lines.append(line)
    text = [*results_head("The C heap: glibc's defaults against keep_freed_memory", started, header), *lines]
    Path(args.output).write_text("\n".join(text) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
