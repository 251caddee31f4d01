"""A training step with the training loop's optimizer against PyTorch's default Adam.

    .venv/bin/python benchmarks/optimizer.py            # every task shape (about a minute on 2 cores)
    .venv/bin/python benchmarks/optimizer.py --quick    # two small shapes (about 20 seconds)

At the shape of each task's default model (the rows of ``benchmarks/peers.py``, our default layout
with ``norm=None``), one training step (forward, backward, optimizer step) with the optimizer that
:func:`settransformer.training.optim.make_optimizer` builds for ``optimizer="adam"`` (PyTorch's fused
kernel where it has one) and with ``torch.optim.Adam``'s default implementation (on a CPU, a Python
loop over the parameters). Both optimizers step the same model in one process, interleaved
(default, ours, default, ...) ``--rounds`` times; each cell is the median over the rounds of the
mean step time, and the speed-up is computed round by round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import TASKS, Shape, build_task

from settransformer.training.config import TrainConfig
from settransformer.training.optim import make_optimizer

HERE = Path(__file__).resolve().parent
QUICK = ("max regression", "anomaly (set model)")


def measure(shape: Shape, n: int, rounds: int, seconds: float = 0.3) -> tuple[float, float, float, bool]:
    """Median step time (s) over sets of ``n`` elements with the default Adam and with
    ``make_optimizer``'s, the median ratio, and whether ``make_optimizer`` took the fused kernel."""
    torch.manual_seed(0)
    model, _ = build_task(shape, "default", None)
    model.train()
    x = torch.randn(shape.batch, n, shape.dim_input)
    ours = make_optimizer(model, TrainConfig(optimizer="adam", lr=1e-4))
    default = torch.optim.Adam(model.parameters(), lr=1e-4)
    optimizers = {"default": default, "ours": ours}

    def run(opt: torch.optim.Optimizer, steps: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = model(x).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    for opt in optimizers.values():
        run(opt)  # kernels, thread pools and the optimizer state before timing
    steps = max(1, round(seconds / run(default)))  # each timed loop about ``seconds`` long
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            times[name].append(run(opt, steps))
    ratio = statistics.median(d / o for d, o in zip(times["default"], times["ours"]))
    fused = bool(ours.defaults.get("fused"))
    return statistics.median(times["default"]), statistics.median(times["ours"]), ratio, fused


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two small shapes, fewer rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds per shape (default 15, 5 with --quick)"
    )
    parser.add_argument(
        "--output", help="markdown file (default benchmarks/results/optimizer.md; none with --quick)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    shapes = [s for s in TASKS if s.name in QUICK] if args.quick else TASKS
    started = time.perf_counter()
    lines = [
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, float32, "
        f"{rounds} interleaved rounds, load {os.getloadavg()[0]:.1f} at start",
        "",
        "| task shape (our default layout) | torch.optim.Adam (ms/step) | make_optimizer (ms/step) | fused "
        "| speed-up |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        n = sum(shape.sizes) // 2  # the middle of the task's set sizes
        default, ours, ratio, fused = measure(shape, n, rounds)
        row = (
            f"| {shape.name} (B={shape.batch}, N={n}, width {shape.width}) | {1e3 * default:.3g} | "
            f"{1e3 * ours:.3g} | {'yes' if fused else 'no'} | {ratio:.2f}x |"
        )
        lines.append(row)
        print(row, flush=True)
    took = f"{(time.perf_counter() - started) / 60:.1f} min"
    print(took)
    if args.quick and not args.output:
        return
    out = Path(args.output) if args.output else HERE / "results" / "optimizer.md"
    title = "# Training step: the training loop's optimizer against the default Adam\n\n"
    command = f"`python benchmarks/optimizer.py{' --quick' if args.quick else ''}` ({took})\n\n"
    out.write_text(title + command + "\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
