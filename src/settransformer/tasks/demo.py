"""The demo: every task's table at its quick budget, its runs spread over worker processes.

Each (task, model) run is one job. With ``jobs > 1`` the jobs run in that many spawned processes
of ``threads`` threads each (one thread per core is fastest for these small models: more threads
per process mostly add synchronisation), longest tasks first so that no long run starts last.
Once a task's runs are done, [`reproduce`][settransformer.tasks.runs.reproduce] reads them back (a finished
run is reused, not retrained) and writes the task's ``results.md`` beside the paper's numbers.

Example (5 steps per model instead of the quick budget; ``jobs=2`` spreads the runs over two processes):
    >>> quiet = {"progress": False, "log": lambda line: None}
    >>> tables = run_demo(["max-regression"], Path("demo"), jobs=1, steps=5, **quiet)
    >>> print(tables["max-regression"].splitlines()[0])  # {task: results.md text}
    # max-regression: our results beside the paper's
    >>> (Path("demo") / "max-regression" / "results.md").exists()
    True
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.files import write_text_atomic
from ..training.config import TrainConfig
from . import available_tasks
from .runs import RunError, build_task, reproduce, task_class, train_run

__all__ = ["DEMO_MARK", "DEMO_TITLE", "demo_tasks", "run_demo"]

# Wall seconds of a task's whole quick table on one core (measured with `demo --jobs 1`): the
# order in which jobs start. Unknown tasks go first.
_QUICK_SECONDS = {
    "kernel-regression": 238,
    "pointcloud": 170,
    "mog-clustering": 135,
    "digits-clustering": 58,
    "count-unique": 52,
    "max-regression": 38,
    "set-anomaly": 36,
}


def demo_tasks() -> list[str]:
    """The tasks ``settransformer demo`` runs by default: every available one that brings its own
    data (tasks on a user's file, ``user_data``, are left out).

    Examples:
        >>> "max-regression" in demo_tasks(), "set-classification" in demo_tasks()
        (True, False)
    """
    out = []
    for name in available_tasks():
        try:
            if task_class(name).user_data:
                continue
        except RunError:  # a missing dependency: kept, so the demo says why it is skipped
            pass
        out.append(name)
    return out


def _quick_config(name: str, *, device: str, steps: int | None, progress: bool) -> TrainConfig:
    settings = {**task_class(name).budget("quick"), "device": device, "progress": progress}
    if steps is not None:
        settings["steps"] = steps
    return TrainConfig.from_dict(settings)


def _train_one(name: str, model: str, run_dir: str, config: dict[str, Any], threads: int) -> None:
    """A worker's job: train one model of one task into ``run_dir``, plots included."""
    torch.set_num_threads(threads)
    train_run(build_task(name), model, TrainConfig.from_dict(config), Path(run_dir), plots=True)


DEMO_MARK = ".settransformer-demo"
"""The file that marks a folder as ``run_demo``'s: a later demo replaces the runs in it."""
DEMO_TITLE = "# settransformer demo"
"""How the summary ``results.md`` of a demo folder begins (``settransformer demo`` writes it)."""


def _has_demo_summary(out: Path) -> bool:
    """Whether ``out`` holds the summary a demo writes (a folder of an earlier version's demo)."""
    try:
        with open(out / "results.md", encoding="utf-8", errors="replace") as f:
            return f.read(len(DEMO_TITLE)) == DEMO_TITLE
    except OSError:
        return False


def run_demo(
    names: list[str],
    out: Path,
    *,
    jobs: int = 2,
    threads: int = 1,
    device: str = "cpu",
    steps: int | None = None,
    all_models: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Train every model of each task in ``names`` at its quick budget under ``out/<task>/``.

    Args:
        names: task names ([`settransformer.tasks.TASKS`][settransformer.tasks.TASKS]).
        out: the demo folder; earlier demo runs of these tasks' models are replaced. A folder that
            holds files but no [`DEMO_MARK`][settransformer.tasks.demo.DEMO_MARK] (not a demo's) is
            refused, so a demo never deletes runs it did not make.
        jobs: worker processes (1: everything in this process, with per-run progress bars).
        threads: torch threads per process.
        device: as ``settransformer train``'s ``--device``.
        steps: as ``settransformer train``'s ``--steps``.
        all_models: every row of each table, not just the task's ``demo_models``.
        progress: progress bars (one over all runs when ``jobs > 1``).
        log: where one line per finished run and per skipped task goes.

    Returns:
        ``{task: results.md text}`` in the order of ``names``; a task that cannot run (a missing
            optional dependency, say) maps to ``"skipped: <why>"``.
    """
    mark = out / DEMO_MARK
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (mark.exists() or _has_demo_summary(out)):
        raise RunError(
            f"--out {out}: holds files that are not a demo's (a demo replaces the runs in its folder); "
            "choose another --out"
        )
    write_text_atomic(mark, "A folder of `settransformer demo` runs: the next demo here replaces them.\n")
    tables: dict[str, str] = {}
    plans: dict[str, tuple[Any, TrainConfig]] = {}
    models: dict[str, list[str]] = {}
    for name in names:
        try:
            task = build_task(name)
            bars = progress and jobs == 1  # workers' bars would interleave: one bar over all runs instead
            plans[name] = (task, _quick_config(name, device=device, steps=steps, progress=bars))
            models[name] = list(task.model_names if all_models else task.demo_models or task.model_names)
        except (RunError, FileNotFoundError, ImportError) as e:
            log(f"== {name}: skipped ({e})")
            tables[name] = f"skipped: {e}"
    for name, (_, config) in plans.items():
        log(f"== {name}: {len(models[name])} models, {config.steps} steps each (quick budget)")
        for model in models[name]:
            shutil.rmtree(out / name / model / "seed0", ignore_errors=True)
    if jobs > 1:
        _train_in_workers(plans, models, out, jobs=jobs, threads=threads, progress=progress, tables=tables)
    for name, (task, config) in plans.items():
        if name in tables:  # a worker found it cannot run
            log(f"== {name}: skipped ({tables[name].removeprefix('skipped: ')})")
            continue
        try:  # with workers: every run is finished, so this reads them back and writes the table
            _, md = reproduce(task, models[name], config, out / name, log=log, plots=jobs == 1)
        except (RunError, FileNotFoundError, ImportError) as e:
            log(f"== {name}: skipped ({e})")
            tables[name] = f"skipped: {e}"
            continue
        tables[name] = md.read_text()
    return {name: tables[name] for name in names}


def _train_in_workers(
    plans: dict[str, tuple[Any, TrainConfig]],
    models: dict[str, list[str]],
    out: Path,
    *,
    jobs: int,
    threads: int,
    progress: bool,
    tables: dict[str, str],
) -> None:
    """Run every (task, model) of ``plans`` in ``jobs`` processes; failures go into ``tables``."""
    order = sorted(plans, key=lambda n: -_QUICK_SECONDS.get(n, 10**6))
    queue = [(name, model) for name in order for model in models[name]]
    plain = progress and not sys.stderr.isatty()  # piped logs: one plain line per run, no \r updates
    bar = tqdm(total=len(queue), desc="demo runs", unit="run", disable=not progress or plain)
    # spawn, not fork: a forked child would inherit this process's OpenMP thread pool in a broken state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        running: dict[Future[None], str] = {}
        for name, model in queue:
            config = plans[name][1].to_dict()
            run_dir = str(out / name / model / "seed0")
            running[pool.submit(_train_one, name, model, run_dir, config, threads)] = name
        pending, finished = set(running), 0
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                bar.update(1)
                finished += 1
                if plain:
                    print(f"demo runs: {finished}/{len(queue)} done", file=sys.stderr, flush=True)
                error = future.exception()
                if isinstance(error, (RunError, FileNotFoundError, ImportError)):
                    tables.setdefault(running[future], f"skipped: {error}")
                elif error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
    bar.close()
