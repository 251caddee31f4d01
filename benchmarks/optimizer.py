"""A training step with the training loop's optimizer against PyTorch's default Adam.

    .venv/bin/python benchmarks/optimizer.py            # every task shape (about a minute on 2 cores)
    .venv/bin/python benchmarks/optimizer.py --quick    # two small shapes (about 20 seconds)

At the shape of each task's default model (the rows of ``benchmarks/peers.py``, our default layout
with ``norm=None``), one training step (forward, backward, optimizer step) with the optimizer that
`settransformer.training.optim.make_optimizer` builds for ``optimizer="adam"`` (PyTorch's fused
kernel where it has one) and with ``torch.optim.Adam``'s default implementation (on a CPU, a Python
loop over the parameters). Both optimizers step the same model in one process, interleaved
(default, ours, default, ...) ``--rounds`` times; each cell is the median over the rounds of the
mean step time, and the speed-up is computed round by round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import Table, compare
from peers import TASKS, Shape, build_task

from settransformer.training.config import TrainConfig
from settransformer.training.optim import make_optimizer

QUICK = ("max regression", "anomaly (set model)")


def measure(shape: Shape, n: int, rounds: int) -> tuple[float, float, float, bool]:
    """Median step time (s) over sets of ``n`` elements with the default Adam and with
    ``make_optimizer``'s, the median ratio, and whether ``make_optimizer`` took the fused kernel."""
    torch.manual_seed(0)
    model, _ = build_task(shape, "default", None)
    model.train()
    x = torch.randn(shape.batch, n, shape.dim_input)
    ours = make_optimizer(model, TrainConfig(optimizer="adam", lr=1e-4))
    default = torch.optim.Adam(model.parameters(), lr=1e-4)

    def run(opt: torch.optim.Optimizer, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = model(x).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    t_default, t_ours, ratio = compare(lambda s: run(default, s), lambda s: run(ours, s), rounds)
    return t_default, t_ours, ratio, bool(ours.defaults.get("fused"))


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
    header = ["task shape (our default layout)", "torch.optim.Adam (ms/step)", "make_optimizer (ms/step)"]
    table = Table(args.threads, rounds, [*header, "fused", "speed-up"])
    for shape in shapes:
        n = sum(shape.sizes) // 2  # the middle of the task's set sizes
        default, ours, ratio, fused = measure(shape, n, rounds)
        table.row(
            [
                f"{shape.name} (B={shape.batch}, N={n}, width {shape.width})",
                f"{1e3 * default:.3g}",
                f"{1e3 * ours:.3g}",
                "yes" if fused else "no",
                f"{ratio:.2f}x",
            ]
        )
    title = "Training step: the training loop's optimizer against the default Adam"
    table.save("optimizer", title, args.quick, args.output)


if __name__ == "__main__":
    main()
