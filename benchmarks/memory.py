"""Peak memory of the peer benchmark's rows, counted by PyTorch's allocator: repeatable run to run.

    .venv/bin/python benchmarks/memory.py --official .peers/set_transformer   # every row (about 5 minutes)
    .venv/bin/python benchmarks/memory.py --quick                             # two task rows, N = 1k

``benchmarks/peers.py`` reports each cell's resident peak (``ru_maxrss``), which also holds what the
C heap keeps and maps between passes: at the small rows the peers differ by less than that noise.
Here each cell is one pass (an inference forward under ``eval`` and ``no_grad``, or a training step:
forward, backward, Adam) after one warm-up pass, and its figure is the peak of the bytes held through
PyTorch's CPU allocator during the pass above what was held at its start, summed from the profiler's
allocation and free events (``profile_memory=True``) in order. That counts every tensor, a kernel's
own scratch tensors included (such as the fused path of ``nn.MultiheadAttention`` that PyG's blocks
take in inference), and nothing else: not Python objects, not buffers a math library allocates
itself, not the allocator's rounding. What the warm-up left is not counted: Adam's moment buffers
(every column has its own, in proportion to its parameters), and no inference buffers our ISABs keep
between calls, because they are freed (`clear_kept_buffers`) before
each pass and so counted in it.

The rows and models are those of ``benchmarks/peers.py`` (same inputs, same seeds), SAB up to
``--max-sab-n``; a peer's SAB above ``--max-quadratic-n`` (its memory is quadratic in N) is left out.
Each cell: MB, and for our columns the ratio to the leanest peer (at most 1.00: no more memory than any
peer). One process runs every cell: a count does not depend on what ran before it. From one run to
the next the inference counts stay the same and a training step's moves by up to about 0.1 MB (0.25%
at the largest rows), where the resident peak moves by megabytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (
    BLOCK_SIZES,
    FWDBWD_MAX_N,
    PEERS,
    TASKS,
    TITLES,
    Cell,
    _build,
    _inputs,
    _label,
    missing_peers,
    results_head,
)

from settransformer.nn.workspace import clear_kept_buffers

IMPLS = ("same", "default", "official", "pyg")
QUADRATIC = {"official", "pyg"}  # their SAB stores every (head, query, key) weight


def allocator_peak_mb(run: Callable[[], object]) -> float:
    """Peak of the bytes held through PyTorch's CPU allocator while ``run()`` runs, above what was
    held when it started (MB): the allocation and free events of the profiler, summed in order.

    Example:
        >>> a = torch.randn(256, 256)
        >>> round(allocator_peak_mb(lambda: (a @ a).relu()), 2)  # the product and its ReLU at once
        0.5
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # the per-event byte counts are only in the raw (kineto) events; the summary table attributes
    # them to operators and loses their order
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def measure(cell: Cell, impl: str, official: str | None) -> dict[str, float]:
    """Allocator peak (MB) of each mode of ``cell`` for ``impl``, after one warm-up pass."""
    model, _ = _build(cell, impl, official)
    xs, _, _ = _inputs(cell, 8 if cell.kind == "task" else 1, torch.device("cpu"), torch.float32)
    out = {}
    for mode in cell.modes:
        if mode == "infer":
            model.eval()

            def run(model: nn.Module = model, xs: list[Tensor] = xs) -> None:
                with torch.no_grad():
                    for x in xs:
                        model(x)

        else:
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)

            def run(
                model: nn.Module = model, xs: list[Tensor] = xs, opt: torch.optim.Optimizer = opt
            ) -> None:
                for x in xs:
                    loss = model(x).float().square().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

        run()
        clear_kept_buffers()
        out[mode] = allocator_peak_mb(run)
    return out


def render(results: dict[str, dict[str, float | str]], impls: list[str]) -> list[str]:
    lines = ["| row | " + " | ".join(TITLES[i] for i in impls) + " |", "|---|" + "---|" * len(impls)]
    for label, row in results.items():
        peers = [v for i, v in row.items() if i in PEERS and isinstance(v, float)]
        leanest = min(peers) if peers else None
        cells = []
        for impl in impls:
            v = row.get(impl, "-")
            if not isinstance(v, float):
                cells.append(str(v))
                continue
            text = f"{v:.2f} MB"
            if impl not in PEERS and leanest:
                text += f" · **{v / leanest:.2f}x**"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", help="directory of the official code (models.py, modules.py)")
    parser.add_argument("--quick", action="store_true", help="two task rows and N = 1k (under a minute)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--max-n", type=float, default=1e6, help="largest block N (default 1e6; --quick 1e3)")
    parser.add_argument(
        "--max-sab-n", type=int, default=2**14, help="largest SAB N (default 16,384: a minute at 100k)"
    )
    parser.add_argument(
        "--max-quadratic-n",
        type=int,
        default=10_000,
        help="largest N of a peer's SAB, whose memory is quadratic in N (default 10,000)",
    )
    parser.add_argument("--output", help="markdown file (default benchmarks/results/memory.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    missing = missing_peers(args.official)
    impls, notes = [i for i in IMPLS if i not in missing], list(missing.values())
    max_n = int(1e3 if args.quick else args.max_n)
    cells = [Cell("task", s.name, ("infer", "train")) for s in (TASKS[:2] if args.quick else TASKS)]
    for block, largest in (("isab", max_n), ("sab", min(max_n, args.max_sab_n))):
        for n in (m for m in BLOCK_SIZES[block] if m <= largest):
            modes = ("infer", "train") if n <= FWDBWD_MAX_N else ("infer",)
            cells.append(Cell("block", f"{block}:{n}", modes))
    started = time.perf_counter()
    header = f"torch {torch.__version__}, cpu, {args.threads} threads, float32"
    print(header, flush=True)
    results: dict[str, dict[str, float | str]] = {}
    for cell in cells:
        n = int(cell.key.partition(":")[2] or 0)
        for impl in impls:
            if cell.key.startswith("sab") and impl in QUADRATIC and n > args.max_quadratic_n:
                for mode in cell.modes:
                    results.setdefault(_label(cell, mode), {})[impl] = "quadratic"
                continue
            official = str(Path(args.official).resolve()) if args.official else None
            for mode, mb in measure(cell, impl, official).items():
                results.setdefault(_label(cell, mode), {})[impl] = mb
        for mode in cell.modes:
            print(render({_label(cell, mode): results[_label(cell, mode)]}, impls)[-1], flush=True)
    above = [
        label
        for label, row in results.items()
        if isinstance(row.get("same"), float)
        and any(isinstance(row.get(p), float) and row["same"] > row[p] for p in PEERS)  # type: ignore[operator]
    ]
    text = [
        *results_head("Peak memory (PyTorch's allocator)", started, header),
        "Each cell: the peak of the bytes held through PyTorch's CPU allocator during one pass, above",
        "what was held at its start (the profiler's allocation events, summed in order; see the",
        "script's docstring for what this counts) · for our columns, that peak over the leanest peer's",
        '(at most 1.00: no more than any peer). "quadratic": a peer\'s SAB above `--max-quadratic-n`.',
        "",
        *render(results, impls),
        "",
        f"{TITLES['same']} above the leanest peer: "
        + (", ".join(above) if above else f"no row (of {len(results)})"),
        *(f"- {n}" for n in notes),
    ]
    print("\n".join(text[-2 - len(notes) :]))
    out = Path(args.output or Path(__file__).resolve().parent / "results" / "memory.md")
    if not args.quick or args.output:
        out.write_text("\n".join(text) + "\n")
        print(f"wrote {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
