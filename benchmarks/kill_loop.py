"""kill -9 at random moments: a run always leaves a loadable checkpoint, and --resume finishes it.

    nice -n 19 .venv/bin/python benchmarks/kill_loop.py                 # 20 kills (a few minutes)
    nice -n 19 .venv/bin/python benchmarks/kill_loop.py --kills 3       # a smoke run

Starts ``settransformer train max-regression`` (a small Set Transformer; a checkpoint every 2 steps,
a metrics line every step) in a subprocess and SIGKILLs it a random delay, uniform in [0,
``--window``] seconds, after it wrote config.json (its first write: a kill during the imports before
touches nothing). So kills land in the resume's rewrite of metrics.jsonl, the steps, the evaluations
and the checkpoint writes. After each kill it checks the last checkpoint: ``load_checkpoint`` with
the keys ``--resume`` needs, and ``load_run`` rebuilding the model from the run folder and from the
file alone. Then it starts ``--resume`` and kills again. After ``--kills`` kills the last resume runs
to the end, and the run is compared with an uninterrupted run of the same seed: every metrics.jsonl
line (without its wall-clock time), the weights of checkpoint.pt and best.pt, results.json.

A run is *lost* when its checkpoint does not load or a resume fails on its own. "killed mid-write"
counts kills that left a temporary file behind, i.e. landed inside an atomic write (the next write
removes it). Prints markdown tables: every kill, then the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from settransformer.tasks.runs import load_run
from settransformer.training.checkpoint import RESUME_KEYS, check_checkpoint, load_checkpoint

TASK_OPTIONS = ["--set", "dim_hidden=32", "--set", "test_sets=200"]
FLAGS = [
    *("--model", "settransformer", "--batch-size", "32", "--eval-every", "2", "--log-every", "1"),
    *("--schedule", "constant", "--lr", "1e-3", "--seed", "0", "--threads", "1", "--no-progress"),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(run: Path, steps: int, resume: bool) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "settransformer", "train", "max-regression", "--out", str(run)]
    command += [*FLAGS, "--steps", str(steps), *(["--resume", "--allow-changes"] if resume else TASK_OPTIONS)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _step(run: Path) -> int | None:
    try:
        return int(load_checkpoint(run / "checkpoint.pt")["step"])
    except (FileNotFoundError, ValueError):
        return None


def _lines(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append({k: v for k, v in json.loads(line).items() if k != "elapsed"})
        except json.JSONDecodeError:
            records.append({"torn": line})
    return records


def _check(run: Path) -> str | None:
    """None when the run's checkpoint loads and rebuilds its model, else what failed."""
    try:
        path = run / "checkpoint.pt"
        check_checkpoint(load_checkpoint(path), path, RESUME_KEYS)
        load_run(run, device="cpu")
        load_run(path, device="cpu")
        if (run / "best.pt").exists():
            load_run(run, "best", device="cpu")
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _weights_equal(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _until_training(run: Path, proc: subprocess.Popen[str], config_before: int) -> float:
    """Wait until ``proc`` (re)wrote the run's config.json, its first write; return the seconds."""
    started = time.monotonic()
    while _mtime(run / "config.json") == config_before and proc.poll() is None:
        time.sleep(0.002)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--window", type=float, default=2.0, help="seconds of training the kills cover")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--out", help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kill_loop_"))
    run = work / "run"
    if run.exists():
        shutil.rmtree(run)

    rows, lost, loadable, mid_write, startups = [], 0, 0, 0, []
    for kill in range(1, args.kills + 1):
        before, lines_before, config_before = _step(run), len(_lines(run)), _mtime(run / "config.json")
        proc = _start(run, 100_000, resume=kill > 1)
        startups.append(_until_training(run, proc, config_before))
        delay = rng.uniform(0, args.window)
        time.sleep(delay)
        if proc.poll() is not None:  # it ended by itself: a failed resume
            lost += 1
            error = proc.communicate()[1].strip().splitlines()[-1:]
            rows.append(f"| {kill} | {delay:.2f} | {before} | - | - | - | resume failed: {error} |")
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        temporaries = sorted(p.name for p in run.glob(".*.tmp"))
        mid_write += bool(temporaries)
        problem = _check(run)
        loadable += problem is None
        lost += problem is not None
        after = _step(run)
        rows.append(
            f"| {kill} | {delay:.2f} | {before} -> {after} | {len(_lines(run)) - lines_before:+d} | "
            f"{', '.join(temporaries) or '-'} | {'yes' if problem is None else 'NO'} | {problem or ''} |"
        )
        if problem is not None:
            break

    final_steps = (_step(run) or 0) + 20
    done = _start(run, final_steps, resume=True)
    _, err = done.communicate()
    if done.returncode != 0:
        lost += 1
        print(f"final resume failed: {err}", file=sys.stderr)
    reference = work / "uninterrupted"
    shutil.rmtree(reference, ignore_errors=True)
    _, err = _start(reference, final_steps, resume=False).communicate()
    if not (reference / "results.json").exists():
        sys.exit(f"the uninterrupted run failed: {err}")
    same_lines = _lines(run) == _lines(reference)
    same_weights = all(_weights_equal(run / f, reference / f) for f in ("checkpoint.pt", "best.pt"))
    results = [json.loads((p / "results.json").read_text())["metrics"] for p in (run, reference)]

    print("| kill | delay (s) | checkpoint step | new metrics lines | temporary left | loadable | problem |")
    print("|---:|---:|---|---:|---|---|---|")
    print("\n".join(rows))
    print()
    print(
        "| kills | loadable checkpoints | lost runs | killed mid-write | final step "
        "| metrics.jsonl = uninterrupted | weights = uninterrupted | mae resumed / uninterrupted |"
    )
    print("|---:|---:|---:|---:|---:|---|---|---|")
    yes = {True: "yes", False: "NO"}
    print(
        f"| {len(rows)} | {loadable} | {lost} | {mid_write} | {final_steps} | {yes[same_lines]} "
        f"| {yes[same_weights]} | {results[0]['mae']:.6g} / {results[1]['mae']:.6g} |"
    )
    print(
        f"\ndelay: seconds after the process wrote config.json (its first write; start-up before it took "
        f"{min(startups):.1f}-{max(startups):.1f} s), uniform in [0, {args.window}]"
    )
    if not args.out:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
