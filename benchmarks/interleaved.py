"""Two ways of doing the same work, timed in one process, interleaved, and the table they fill.

The A/B benchmarks (``optimizer.py``, ``kept_buffers.py``) compare a baseline with a candidate on
the same model and inputs. Separate processes on a shared 2-core machine differ by up to 30%, so
both run in one process, alternating (baseline, candidate, baseline, ...), and the speed-up is the
median of the round-by-round ratios.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def compare(
    baseline: Callable[[int], float], candidate: Callable[[int], float], rounds: int, seconds: float = 0.3
) -> tuple[float, float, float]:
    """Median seconds per step of ``baseline`` and ``candidate``, and the median ratio baseline /
    candidate over ``rounds`` interleaved rounds.

    Each callable runs ``steps`` steps and returns the seconds per step. Both run once first
    (kernels, thread pools, caches); a timed loop then holds about ``seconds`` of the baseline.
    """
    baseline(1), candidate(1)
    steps = max(1, round(seconds / baseline(1)))
    base_t, cand_t = [], []
    for _ in range(rounds):
        base_t.append(baseline(steps))
        cand_t.append(candidate(steps))
    ratio = statistics.median(b / c for b, c in zip(base_t, cand_t))
    return statistics.median(base_t), statistics.median(cand_t), ratio


class Table:
    """A markdown table printed row by row and written to ``results/<name>.md`` at the end.

    ``header``: the column titles; the first line records torch, threads, rounds and the load.
    """

    def __init__(self, threads: int, rounds: int, header: list[str]) -> None:
        self.started = time.perf_counter()
        self.lines = [
            f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs "
            f"(capability {torch.backends.cpu.get_cpu_capability()}), float32, "
            f"{rounds} interleaved rounds, load {os.getloadavg()[0]:.1f} at start",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        print("\n".join(self.lines), flush=True)

    def row(self, cells: list[str]) -> None:
        line = "| " + " | ".join(cells) + " |"
        self.lines.append(line)
        print(line, flush=True)

    def save(self, name: str, title: str, quick: bool, output: str | None) -> None:
        """Print the run's duration and write the table to ``output`` (default
        ``results/<name>.md``; nothing for a ``quick`` run without ``output``)."""
        took = f"{(time.perf_counter() - self.started) / 60:.1f} min"
        print(took)
        if quick and not output:
            return
        out = Path(output) if output else RESULTS / f"{name}.md"
        command = f"`python benchmarks/{name}.py{' --quick' if quick else ''}` ({took})\n\n"
        out.write_text(f"# {title}\n\n" + command + "\n".join(self.lines) + "\n")
        print(f"written to {out}")
