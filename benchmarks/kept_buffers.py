"""ISAB inference with the buffers kept between calls against fresh buffers each call.

    .venv/bin/python benchmarks/kept_buffers.py            # every shape (about 3 minutes on 2 cores)
    .venv/bin/python benchmarks/kept_buffers.py --quick    # two shapes (under a minute)

Without autograd an ISAB's second attention runs through ``InducedRows``, whose buffers the block
keeps from one forward to the next where a call holds at most ``KEPT_BUFFER_ELEMENTS`` values per
buffer. Here the same model runs inference (``eval``, ``no_grad``) with that default and with
``KEPT_BUFFER_ELEMENTS = 0`` (fresh buffers each call, freed after it), in one process, interleaved
(fresh, kept, fresh, ...) ``--rounds`` times: the task rows of ``benchmarks/peers.py`` whose models
have ISABs (our model computing the official function, and our default layout with ``norm=None``)
and single ISABs (width 128, 4 heads, 32 inducing points) at N = 1k and 10k. Each cell is the median
over the rounds of the mean forward time; the speed-up is computed round by round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import TASKS, build_block, build_task

from settransformer.nn import blocks

HERE = Path(__file__).resolve().parent
QUICK = ("MoG clustering (official run.py)", "isab:1000")


def cases(quick: bool) -> list[tuple[str, Callable[[str], nn.Module], list[Tensor]]]:
    """``(name, build(impl), inputs)`` for each ISAB task shape and block size."""
    g = torch.Generator().manual_seed(1)
    out: list[tuple[str, Callable[[str], nn.Module], list[Tensor]]] = []
    for shape in TASKS:
        if not shape.inducing or (quick and shape.name not in QUICK):
            continue
        lo, hi = shape.sizes
        sizes = torch.randint(lo, hi + 1, (5,), generator=g).tolist()
        xs = [torch.randn(shape.batch, n, shape.dim_input, generator=g) for n in sizes]
        name = f"{shape.name} (B={shape.batch}, N={lo}..{hi}, width {shape.width})"
        out.append((name, lambda impl, s=shape: build_task(s, impl, None)[0], xs))
    for n in (1_000, 10_000):
        if quick and f"isab:{n}" not in QUICK:
            continue
        out.append(
            (f"ISAB, B=1, N={n:,}", lambda impl: build_block("isab", impl, None), [torch.randn(1, n, 128)])
        )
    return out


def measure(
    model: nn.Module, xs: list[Tensor], rounds: int, seconds: float = 0.3
) -> tuple[float, float, float]:
    """Median forward time (s) with fresh and with kept buffers, and the median ratio."""
    model.eval()
    kept = blocks.KEPT_BUFFER_ELEMENTS

    def run(limit: int, passes: int = 1) -> float:
        blocks.KEPT_BUFFER_ELEMENTS = limit
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(passes):
                for x in xs:
                    model(x)
        return (time.perf_counter() - start) / (passes * len(xs))

    try:
        run(0), run(kept)  # kernels, thread pools and the kept buffers before timing
        passes = max(1, round(seconds / (run(0) * len(xs))))
        fresh_t, kept_t = [], []
        for _ in range(rounds):
            fresh_t.append(run(0, passes))
            kept_t.append(run(kept, passes))
    finally:
        blocks.KEPT_BUFFER_ELEMENTS = kept
        blocks.clear_kept_buffers()
    ratio = statistics.median(f / k for f, k in zip(fresh_t, kept_t))
    return statistics.median(fresh_t), statistics.median(kept_t), ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per cell (default 11, 5 with --quick)")
    parser.add_argument(
        "--output", help="markdown file (default benchmarks/results/kept_buffers.md; none with --quick)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 11)
    started = time.perf_counter()
    lines = [
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, float32, "
        f"{rounds} interleaved rounds, load {os.getloadavg()[0]:.1f} at start",
        "",
        "| inference | layout | fresh buffers (ms) | kept buffers (ms) | speed-up |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, build, xs in cases(args.quick):
        for impl, layout in (("same", "official function"), ("default", "our default")):
            torch.manual_seed(0)
            fresh, kept, ratio = measure(build(impl), xs, rounds)
            row = f"| {name} | {layout} | {1e3 * fresh:.3g} | {1e3 * kept:.3g} | {ratio:.2f}x |"
            lines.append(row)
            print(row, flush=True)
    took = f"{(time.perf_counter() - started) / 60:.1f} min"
    print(took)
    if args.quick and not args.output:
        return
    out = Path(args.output) if args.output else HERE / "results" / "kept_buffers.md"
    title = "# ISAB inference: buffers kept between calls against fresh buffers\n\n"
    command = f"`python benchmarks/kept_buffers.py{' --quick' if args.quick else ''}` ({took})\n\n"
    out.write_text(title + command + "\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
