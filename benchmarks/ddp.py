"""Data-parallel scaling on CPU: 2 processes of 1 thread vs 1 process of 1 thread, same per-process batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp.py             # about a minute on a quiet machine
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp.py --steps 20 --repeats 1   # a smoke test

Trains the point-cloud task's default model (``isab-pma`` on procedural shapes, 128 points, width
64) with `settransformer.training.loop.train`, the loop ``settransformer train`` runs, in ``W``
processes joined by gloo exactly as ``torchrun --nproc-per-node W`` would (``WORLD_SIZE``, ``RANK``,
``MASTER_ADDR``/``MASTER_PORT``), each with one thread. The global batch is ``W x --batch-size``,
so every process computes the same amount per step. Sets per second are timed on rank 0 from the
end of the ``--warmup``-th step to the end of the last step before the final evaluation (from
``metrics.jsonl``, logged every 10 steps as by default: logging every step would add a
collective and a flush per step that real runs do not pay); process start-up, warm-up and
evaluation are excluded.
Each setting runs ``--repeats`` times, alternating, and the median is reported.

A second table shows what drawing the whole global batch on every rank costs (the price of
sampling that is exactly the same as one process's): ``sample_batch`` at the per-process and the
global batch size, beside one training step, all in this process with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODEL = "isab-pma"


def _task() -> Any:
    from settransformer.tasks.pointcloud import PointCloudClassification

    # the default task; a small fixed test set, because evaluation is not what is timed
    return PointCloudClassification(test_size=48)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str, settings: dict[str, Any]) -> None:
    """One process of the job (``torch.multiprocessing`` entry point)."""
    if world > 1:
        os.environ.update(
            WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )  # fmt: skip
    torch.set_num_threads(1)
    from settransformer.training.config import TrainConfig
    from settransformer.training.loop import train

    task = _task()
    torch.manual_seed(0)
    model = task.build_model(MODEL)
    train(model, task, TrainConfig(**settings), Path(out) / "run", model_name=MODEL)


def _run(world: int, batch_size: int, warmup: int, steps: int) -> float:
    """Sets per second of ``world`` processes at ``batch_size`` sets each."""
    import torch.multiprocessing as mp

    settings = {
        "steps": warmup + steps + 1,  # the last step also evaluates: left out of the timing
        "batch_size": batch_size * world,
        "lr": 1e-3,
        "device": "cpu",
        "log_every": 10,
        "progress": False,
    }
    with tempfile.TemporaryDirectory() as out:
        args = (world, _free_port(), out, settings)
        mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
        lines = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed"] for r in lines}
    return steps * batch_size * world / (elapsed[warmup + steps] - elapsed[warmup])


def _sampling_costs(batch_size: int, world: int, repeats: int = 20) -> list[tuple[str, float]]:
    """Milliseconds of ``sample_batch`` at the per-process and global batch, and of one training step."""
    torch.set_num_threads(1)
    task, generator = _task(), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = task.build_model(MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = task.sample_batch(batch_size, generator)

    def step() -> None:
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()

    def ms(fn: Any) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    return [
        (
            f"sample_batch({batch_size}): one process's share",
            ms(lambda: task.sample_batch(batch_size, generator)),
        ),
        (
            f"sample_batch({batch_size * world}): the global batch each rank draws",
            ms(lambda: task.sample_batch(batch_size * world, generator)),
        ),
        (f"training step at {batch_size} sets (forward, backward, Adam)", ms(step)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="W, compared with 1 process (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="sets per process per step (default 64)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting (default 3)")
    args = parser.parse_args()
    if args.warmup % 10 or args.steps % 10:
        parser.error("--warmup and --steps: multiples of 10 (metrics.jsonl has a line every 10 steps)")
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1; setting it for the worker processes", file=sys.stderr)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers, before their torch starts

    worlds = (1, args.processes)
    rates: dict[int, list[float]] = {w: [] for w in worlds}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for w in worlds:  # alternating, so a change in the machine's load hits both settings
            rates[w].append(_run(w, args.batch_size, args.warmup, args.steps))
            print(f"{w} process(es): {rates[w][-1]:.1f} sets/s", file=sys.stderr, flush=True)

    base = statistics.median(rates[1])
    print(f"# DDP scaling on CPU: pointcloud/{MODEL}, gloo, 1 thread per process\n")
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up steps, median of {args.repeats} run(s); "
        f"{os.cpu_count()} CPUs visible; torch {torch.__version__}\n"
    )
    print("| processes | per-process batch | global batch | sets/s (median) | runs | speed-up |")
    print("|---:|---:|---:|---:|---|---:|")
    for w in worlds:
        median = statistics.median(rates[w])
        runs = ", ".join(f"{r:.0f}" for r in rates[w])
        cells = [w, args.batch_size, args.batch_size * w, f"{median:.1f}", runs, f"{median / base:.2f}x"]
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\nWhat each rank's sampling of the whole global batch costs (1 thread, median ms):\n")
    print("| operation | ms |")
    print("|---|---:|")
    for name, value in _sampling_costs(args.batch_size, args.processes):
        print(f"| {name} | {value:.2f} |")
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
