"""ISAB inference with the buffers kept between calls against fresh buffers each call.

    .venv/bin/python benchmarks/kept_buffers.py            # every shape (about 2-3 minutes on 2 cores)
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
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import Table, compare
from peers import TASKS, build_block, build_task

from settransformer.nn import blocks
from settransformer.nn.workspace import clear_kept_buffers

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


def measure(model: nn.Module, xs: list[Tensor], rounds: int) -> tuple[float, float, float]:
    """Median forward time (s) with fresh and with kept buffers, and the median ratio."""
    model.eval()
    kept = blocks.KEPT_BUFFER_ELEMENTS

    def run(limit: int, passes: int) -> float:
        blocks.KEPT_BUFFER_ELEMENTS = limit
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(passes):
                for x in xs:
                    model(x)
        return (time.perf_counter() - start) / passes

    try:
        fresh, kept_t, ratio = compare(lambda p: run(0, p), lambda p: run(kept, p), rounds)
    finally:
        blocks.KEPT_BUFFER_ELEMENTS = kept
        clear_kept_buffers()
    return fresh / len(xs), kept_t / len(xs), ratio


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
    header = ["inference", "layout", "fresh buffers (ms)", "kept buffers (ms)", "speed-up"]
    table = Table(args.threads, rounds, header)
    for name, build, xs in cases(args.quick):
        for impl, layout in (("same", "official function"), ("default", "our default")):
            torch.manual_seed(0)
            fresh, kept, ratio = measure(build(impl), xs, rounds)
            table.row([name, layout, f"{1e3 * fresh:.3g}", f"{1e3 * kept:.3g}", f"{ratio:.2f}x"])
    title = "ISAB inference: buffers kept between calls against fresh buffers"
    table.save("kept_buffers", title, args.quick, args.output)


if __name__ == "__main__":
    main()
