"""Time attention scores against the fused dot product: bare ``attention()`` and a whole SAB.

    .venv/bin/python benchmarks/scores.py                 # N = 1000, 2 threads then 1 thread
    .venv/bin/python benchmarks/scores.py --n 256 --threads 1

Rows: ``dot`` (the default, PyTorch's fused kernel), ``gaussian`` (learnable bandwidth, through the
fused kernel with a per-key bias), ``additive`` (hidden 8 per head, the default) and
``additive-h32`` (hidden = head width 32). Columns: forward (``torch.inference_mode``) and
forward + backward, in milliseconds of CPU time (``time.process_time``: the CPU is shared, so wall
time would measure the neighbours; with T threads it adds up the T threads' time), medians over
repeats timed in interleaved rounds (each round times every row once), and each score's ratio to
``dot``. Dimension 128, 4 heads, B = 1, float32, CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from settransformer.nn.attention import attention
from settransformer.nn.blocks import SAB
from settransformer.nn.scores import AdditiveScore, make_score

DIM, HEADS = 128, 4
SCORES = ("dot", "gaussian", "additive", "additive-h32")


def _score(name: str) -> object:
    if name == "additive-h32":
        return AdditiveScore(HEADS, DIM // HEADS, hidden=DIM // HEADS)
    return name


def cases(name: str, n: int) -> dict[str, Callable[[], None]]:
    """Forward and forward+backward of bare attention and of a SAB with score ``name``."""
    torch.manual_seed(0)
    sab = SAB(DIM, DIM, HEADS, score=_score(name))  # type: ignore[arg-type]
    score = sab.mab.score
    dh = DIM // HEADS
    q, k, v = (torch.randn(1, HEADS, n, dh, requires_grad=True) for _ in range(3))
    x = torch.randn(1, n, DIM, requires_grad=True)

    def attn_fwd() -> None:
        with torch.inference_mode():
            attention(q, k, v, score=score)  # type: ignore[arg-type]

    def attn_bwd() -> None:
        attention(q, k, v, score=score).sum().backward()  # type: ignore[arg-type]

    def sab_fwd() -> None:
        with torch.inference_mode():
            sab(x)

    def sab_bwd() -> None:
        sab(x).square().mean().backward()
        sab.zero_grad(set_to_none=True)

    return {"attn_fwd": attn_fwd, "attn_fwdbwd": attn_bwd, "sab_fwd": sab_fwd, "sab_fwdbwd": sab_bwd}


def measure(
    n: int, budget_s: float, min_rounds: int = 5, max_rounds: int = 25
) -> dict[str, dict[str, float]]:
    """Median CPU ms of every case of every score, timed in interleaved rounds.

    Each round runs every (score, case) once, so a slow spell of the machine (a neighbour, a
    frequency change) falls on all rows alike instead of on the one being timed.
    """
    fns = {name: cases(name, n) for name in SCORES}
    for row in fns.values():
        for fn in row.values():
            fn()  # warm-up
    times: dict[str, dict[str, list[float]]] = {name: {c: [] for c in row} for name, row in fns.items()}
    start = time.process_time()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.process_time() - start < budget_s):
        for name, row in fns.items():
            for case, fn in row.items():
                t = time.process_time()
                fn()
                times[name][case].append(time.process_time() - t)
        rounds += 1
    return {name: {c: 1000 * statistics.median(ts) for c, ts in row.items()} for name, row in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="set size N (default 1000)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="thread counts (default 2 1)")
    parser.add_argument(
        "--budget",
        type=float,
        default=15.0,
        help="CPU seconds per thread count, at least 5 rounds (default 15)",
    )
    args = parser.parse_args()
    assert make_score("dot", HEADS, DIM // HEADS) is None  # "dot" is the fused default path
    cols = ("attn_fwd", "attn_fwdbwd", "sab_fwd", "sab_fwdbwd")
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = measure(args.n, args.budget)
        print(f"\nN={args.n}, dim={DIM}, heads={HEADS}, B=1, threads={threads}: CPU ms (ratio to dot)\n")
        print("| score | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for name, row in rows.items():
            cells = [f"{row[c]:.1f} ({row[c] / rows['dot'][c]:.2f}x)" for c in cols]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
