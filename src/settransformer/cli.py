"""The ``settransformer`` command: train, evaluate, plot, reproduce the paper's tables, and a demo.

Run ``settransformer --help`` or ``settransformer SUBCOMMAND --help``. Every bad input (an unknown
task or model, a malformed setting, a missing run folder...) ends with one line on stderr naming
the culprit and exit code 2, before anything on disk is touched. ``predict`` and ``export`` use a
trained run on new sets, or export its model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .data.files import WriteError, short, write_text_atomic
from .data.set_files import read_inputs, read_queries
from .deploy.export import DEFAULT_OPSET, check_opset, export_onnx, export_torchscript
from .deploy.inference import (
    check_forward,
    check_output_path,
    input_dim,
    jsonl_lines,
    per_element_output,
    predict,
    takes_queries,
    top_labels,
    write_outputs,
)
from .heap import keep_freed_memory
from .tasks import TASKS
from .tasks.catalogue import describe_task, task_summaries
from .tasks.demo import DEMO_TITLE, demo_tasks, run_demo
from .tasks.report import plot_training_curve
from .tasks.runs import (
    RunError,
    build_task,
    check_buildable,
    check_model,
    check_not_run_file,
    check_resume,
    check_startable,
    check_task_options,
    data_changes,
    default_model,
    load_for_inference,
    load_run,
    lock_if_run,
    new_run_dir,
    parse_option,
    read_checkpoint,
    read_run_config,
    reproduce,
    run_lock,
    task_class,
    train_run,
)
from .training.checkpoint import library_version
from .training.config import TrainConfig, read_config_file
from .training.distributed import is_main_process, launched_world_size
from .training.interrupt import Interrupted

__all__ = ["THREADS_HELP", "Parser", "add_export_parser", "add_predict_parser", "log", "main", "positive_int"]

_OFF = "off"


def _float_or_off(text: str) -> float | str:
    """argparse ``type=``: a number, or ``off`` (a setting that a budget turns on, turned off)."""
    if text.strip().lower() in ("off", "none", "null"):
        return _OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


# (flag, type or action, help): the training settings shared by ``train`` and ``reproduce``. Their
# defaults are None, meaning "from the task's budget or the --config file".
_TRAIN_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("--steps", int, "optimisation steps in all"),
    ("--batch-size", int, "sets per step (over all processes under torchrun)"),
    ("--lr", float, "peak learning rate"),
    ("--optimizer", ("adam", "adamw", "sgd"), "optimizer (default adam, as the paper)"),
    ("--weight-decay", float, "weight decay (default 0)"),
    (
        "--schedule",
        ("step", "cosine", "constant"),
        "lr schedule (default: the budget's, else step: x LR_GAMMA at each milestone)",
    ),
    (
        "--lr-milestones",
        str,
        "comma-separated steps where the step schedule multiplies the lr by LR_GAMMA (default: the "
        "budget's, else none)",
    ),
    ("--lr-gamma", float, "factor of the step schedule (default 0.1)"),
    ("--seed", int, "seed of the data, the initial weights and dropout (default 0)"),
    ("--device", ("auto", "cpu", "cuda"), "where to train (default auto: CUDA when available)"),
    ("--amp", ("off", "bf16", "fp16"), "mixed precision (default off; fp16 needs CUDA)"),
    ("--clip-norm", float, "clip the global gradient norm to this (clip_grad_norm_; default off)"),
    ("--clip-value", float, "clip each gradient entry to [-V, V] (clip_grad_value_; default off)"),
    ("--clip-min", float, "lower bound of every gradient entry, after the backward pass (default off)"),
    ("--clip-max", float, "upper bound of every gradient entry, after the backward pass (default off)"),
    (
        "--ema-decay",
        _float_or_off,
        "evaluate a moving average of the weights with this decay, e.g. 0.999, or 'off' (default: the "
        "budget's, else off; train TASK --list shows it)",
    ),
    (
        "--eval-every",
        int,
        "evaluate and checkpoint every this many steps (0: only at the end; default: the budget's)",
    ),
    ("--log-every", int, "append to metrics.jsonl every this many steps (default 10)"),
    ("--tensorboard", "store_true", "also log to TensorBoard (needs the tensorboard package)"),
    ("--no-progress", "store_false", "no progress bar"),
)
_TRAIN_KEYS = tuple(f.removeprefix("--no-").removeprefix("--").replace("-", "_") for f, _, _ in _TRAIN_FLAGS)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """The training settings, plus --budget, --config and --set."""
    g = p.add_argument_group("training settings (the task's --budget, overridden by --config, then by flags)")
    g.add_argument(
        "--budget",
        choices=("quick", "paper"),
        help="the task's preset steps, batch, lr and, where it sets them, schedule, milestones and "
        "evaluation interval (train TASK --list shows them; default paper)",
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        help="JSON/YAML settings: keys as the flags with _ (steps, threads, model, budget...), plus "
        "task_options (a mapping, as --set); flags given on the command line win",
    )
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help=_SET_HELP)
    for flag, kind, text in _TRAIN_FLAGS:
        dest = flag.removeprefix("--no-").removeprefix("--").replace("-", "_")
        if kind in ("store_true", "store_false"):
            g.add_argument(flag, dest=dest, action=kind, default=None, help=text)
        elif isinstance(kind, tuple):
            g.add_argument(flag, dest=dest, choices=kind, help=text)
        else:
            g.add_argument(flag, dest=dest, type=kind, metavar=dest.upper(), help=text)
    g.add_argument("--threads", type=positive_int, metavar="N", help=THREADS_HELP)


_SET_HELP = "a task option, e.g. --set max_size=20 (repeatable; the value is read as JSON when it parses)"
_DEMOTHREADS_HELP = (
    "CPU threads for PyTorch (default 1: the quick models are small, more threads add contention)"
)


_NOT_IN_CONFIG = ("help", "config", "task", "func", "command", "parser")
"""Flags that a --config file cannot set: the file itself, and the task (the positional argument)."""


def _read_config(args: argparse.Namespace) -> dict[str, Any]:
    """Read ``--config`` once: every key named like one of the command's flags (``threads``,
    ``model``, ``out``, ``budget``...) fills that flag where the command line left it unset; the
    rest (training settings, ``task_options``) is returned for `_settings`."""
    cached = getattr(args, "config_values", None)
    if cached is not None:
        return dict(cached)
    try:
        values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    except ValueError as e:
        raise RunError(str(e)) from None
    parser: argparse.ArgumentParser | None = getattr(args, "parser", None)
    actions = {} if parser is None else {a.dest: a for a in parser._actions}
    for key in [k for k in values if k.startswith("no_") and k[3:] in _TRAIN_KEYS]:
        value = values.pop(key)  # a --no-X flag spelled as its key: no_progress: true
        if not isinstance(value, bool):
            raise RunError(f"{args.config}: {key}: expected true or false like the flag --no-{key[3:]}")
        values.setdefault(key[3:], not value)
    settings = {*TrainConfig.known_settings(), "task_options"}
    unknown = sorted(set(values) - set(actions) - settings)
    if unknown:
        keys = settings | {k for k, a in actions.items() if a.option_strings and k not in _NOT_IN_CONFIG}
        raise RunError(
            f"{args.config}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(keys))}"
        )
    for key in [k for k in values if k in actions and k not in _TRAIN_KEYS]:
        action, value = actions[key], values.pop(key)
        if key in _NOT_IN_CONFIG:
            raise RunError(f"{args.config}: {key}: not a setting a config file can hold")
        value = _config_value(args.config, action, value)
        if key == "set":  # the command line's --set come after the file's
            args.set = value + list(args.set)
        elif getattr(args, key) in (None, action.default):  # the command line wins
            setattr(args, key, value)
            if key == "threads":
                torch.set_num_threads(value)
    args.config_values = values
    return dict(values)


def _config_value(source: str, action: argparse.Action, value: Any) -> Any:
    """``value`` of a config file, checked as the flag ``action`` checks the command line."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    key = action.dest
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise RunError(f"{source}: {key}: expected true or false like the flag {flag}, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):  # --set: a list of KEY=VALUE texts
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RunError(f"{source}: {key}: expected a list of KEY=VALUE texts, got {value!r}")
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # models: [a, b] for A,B
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RunError(f"{source}: {key}: expected a value like the flag {flag} takes, got {value!r}")
    try:
        value = action.type(str(value)) if callable(action.type) else str(value)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise RunError(f"{source}: {key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise RunError(f"{source}: {key}: expected one of {choices}, got {value!r}")
    return value


def _settings(
    args: argparse.Namespace, base: dict[str, Any], default_budget: str | None
) -> tuple[TrainConfig, dict[str, Any], str | None]:
    """Merge ``base`` < the budget (``--budget``, else the file's, else ``default_budget``) < the
    ``--config`` file < flags. Returns the training settings, the task options (file and ``--set``)
    and the budget's name."""
    values: dict[str, Any] = dict(base)
    preset: dict[str, Any] = {}  # the budget's settings
    file_values = _read_config(args)
    source = args.config or "flags"
    task_options = file_values.pop("task_options", {}) or {}
    if not isinstance(task_options, dict):
        raise RunError(f"{source}: task_options must be a mapping of option names to values")
    budget = args.budget or default_budget
    if budget is not None:
        preset = task_class(args.task).budget(budget)
        values.update(preset)
    values.update(file_values)
    flags = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k, None) is not None}
    values.update({k: None if v == _OFF else v for k, v in flags.items()})  # "off": the budget's off too
    milestones = preset.get("lr_milestones")
    if (
        milestones is not None
        and values["lr_milestones"] is milestones
        and values["steps"] != preset["steps"]
    ):
        # milestones of the budget, steps of the user: decay at the same fractions of the run
        # (a milestone that lands at or past the last step would never act: it is left out)
        scale = values["steps"] / preset["steps"]
        scaled = (max(1, round(m * scale)) for m in milestones)
        values["lr_milestones"] = [m for m in scaled if m < values["steps"]]
    for text in args.set:
        key, value = parse_option(text)
        task_options[key] = value
    try:
        config = TrainConfig.from_dict(values, source=source)
    except ValueError as e:
        raise RunError(str(e)) from None
    late = [m for m in config.lr_milestones if m >= config.steps]
    if late and config.schedule == "step":
        log(
            f"warning: lr_milestones {', '.join(map(str, late))} at or past steps={config.steps}: "
            "the learning rate is never multiplied there"
        )
    return config, task_options, budget


def _cmd_train(args: argparse.Namespace) -> int:
    _read_config(args)  # the file may hold --list, --out, --resume, --model...
    if args.list:
        print(describe_task(args.task))
        return 0
    cls = task_class(args.task)
    if args.allow_changes and not args.resume:
        raise RunError("--allow-changes: only with --resume (a new run has no earlier settings to change)")
    if args.resume:
        if args.out is None:
            raise RunError("--resume: needs --out RUN_DIR, the run to continue")
        info = read_run_config(args.out)
        if info["task"] != args.task:
            raise RunError(f"--resume {args.out}: the run is of task {info['task']}, not {args.task}")
        if args.model and args.model != info["model"]:
            raise RunError(
                f"--resume {args.out}: holds a checkpoint of model {info['model']}, not {args.model}"
            )
        if not (Path(args.out) / "checkpoint.pt").is_file():
            raise RunError(f"--resume {args.out}: no checkpoint.pt there to continue from")
        read_checkpoint(Path(args.out) / "checkpoint.pt", resume=True)  # damaged: one line, no traceback
        config, options, budget = _settings(args, info["train"], None)
        saved = info["task_options"]
        changed = {k: v for k, v in check_task_options(args.task, options).items() if saved.get(k) != v}
        if changed:  # the same values again (the first command repeated) are no change
            shown = ", ".join(
                f"{k} {short(saved.get(k), 200)} -> {short(new, 200)}" for k, new in changed.items()
            )
            raise RunError(
                "--set, task_options: task options cannot change when resuming "
                f"(the data would differ): {shown}"
            )
        task, model, run_dir = build_task(args.task, saved), info["model"], Path(args.out)
    else:
        config, options, budget = _settings(args, {}, "paper")
        model = check_model(cls, args.model or default_model(cls))
        task = build_task(args.task, options)
        check_buildable(task, model)
    check_startable(task, config)  # before a run folder is made or changed
    if not args.resume:
        run_dir = new_run_dir(args.task, model, args.out)
    with run_lock(run_dir):
        if args.resume:
            check_resume(run_dir, info, config, allow_changes=args.allow_changes)
        if is_main_process():  # under torchrun, one report for the job
            what = "resuming" if args.resume else "training"
            plan = f"{config.steps} steps of {config.batch_size} sets"
            plan += f" ({budget} budget)" if budget is not None else ""
            print(f"{what} {args.task}/{model} in {run_dir}: {plan}", file=sys.stderr)
        result = train_run(task, model, config, run_dir, resume=args.resume)
    if not is_main_process():
        return 0
    _print_metrics(
        result["metrics"], f"{args.task}/{model} after {result['step']} steps ({result['elapsed']:.1f}s)"
    )
    for p in result.get("plots", []):
        print(f"plot: {p}")
    return 0


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    print(title)
    for key, value in metrics.items():
        print(f"  {key}: {value:.6g}")


def _cmd_eval(args: argparse.Namespace) -> int:
    with lock_if_run(args.run):
        return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    task, model, state = load_run(args.run, args.checkpoint, args.device)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        metrics = {k: float(v) for k, v in task.evaluate(model, device).items()}
    info = read_run_config(args.run)
    folder = Path(args.run) if Path(args.run).is_dir() else None  # None: a checkpoint file alone
    which = args.checkpoint if folder is not None else Path(args.run).name
    _print_metrics(metrics, f"{info['task']}/{info['model']} ({which} checkpoint, step {state['step']})")
    out = {
        "task": info["task"],
        "model": info["model"],
        "checkpoint": which,
        "step": state["step"],
        "metrics": metrics,
    }
    if folder is not None:  # beside a checkpoint file we print only: its folder may not be ours
        changes = data_changes(folder, task.options)
        for line in changes:
            log(f"warning: {line} since the run trained: the metrics are of the data as it is now")
        if changes:
            out["data_changes"] = changes
        write_text_atomic(folder / "results.json", json.dumps(out, indent=2) + "\n")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    folder = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent  # or beside the file
    with lock_if_run(folder):
        task, model, _ = load_run(args.run, args.checkpoint, args.device)
        paths = task.plot(model, folder, next(model.parameters()).device)
        if Path(args.run).is_dir():  # the curve of a run folder's metrics.jsonl
            curve = plot_training_curve(folder, task.metric)
            paths += [curve] if curve is not None else []
    for p in paths:
        print(f"plot: {p}")
    if not paths:
        print(f"{task.name} has no plots", file=sys.stderr)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    cls = task_class(args.task)
    config, options, budget = _settings(args, {}, "paper")
    # an empty --models (an unset shell variable) is an error, not the whole table
    models = args.models.split(",") if args.models is not None else list(cls.model_names)
    task = build_task(args.task, options)
    out = Path(args.out) if args.out else Path("runs") / args.task / f"reproduce-{budget}"
    _, md = reproduce(task, models, config, out, seeds=args.seeds, overwrite=args.overwrite, log=log)
    print(md.read_text())
    print(f"written: {md} and {md.with_suffix('.json')}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    summaries = task_summaries()
    width = max(len(name) for name, _ in summaries)
    for name, line in summaries:
        print(f"{name:<{width}}  {line}")
    print("\nsettransformer train TASK --list: a task's models and options")
    return 0


def _user_data(name: str) -> bool:
    """Whether the task ``name`` trains on a user's file (``False`` where it cannot be imported)."""
    try:
        return bool(task_class(name).user_data)
    except RunError:
        return False


def _cmd_demo(args: argparse.Namespace) -> int:
    names = args.tasks.split(",") if args.tasks is not None else demo_tasks()
    for name in names:
        if name not in TASKS:
            raise RunError(f"--tasks: unknown task {name!r}; expected some of {', '.join(TASKS)}")
        if _user_data(name):
            raise RunError(
                f"--tasks: {name} trains on your own file (settransformer train {name} --set path=FILE); "
                "the demo runs the tasks that bring their own data"
            )
    out, started = Path(args.out), time.perf_counter()
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    tables = run_demo(
        names,
        out,
        jobs=jobs,
        threads=args.threads,
        device=args.device,
        steps=args.steps,
        all_models=args.all_models,
        progress=not args.no_progress,
        log=log,
    )
    sections = []
    for name, table in tables.items():
        if table.startswith("skipped: "):
            sections.append(f"## {name}\n\n{table}\n")
            continue
        print(table)
        sections.append(table.replace("# ", "## ", 1))
    summary = out / "results.md"
    minutes = (time.perf_counter() - started) / 60
    summary.parent.mkdir(parents=True, exist_ok=True)
    setup = f"{jobs} process(es) of {args.threads} thread(s)"
    head = f"{DEMO_TITLE} (quick budgets, {minutes:.1f} min, {setup})"
    write_text_atomic(summary, head + "\n\n" + "\n".join(sections))
    print(f"demo finished in {minutes:.1f} min; tables in {summary}, plots under {out}/<task>/<model>/seed0/")
    return 0


_MAIN_DOC = "The Set Transformer's experiments: train, evaluate, plot, reproduce the paper's tables, a demo."
_TRAIN_DOC = "Train one model of a task into a run folder: runs/<task>/<model>-<time>/, or --out."
_RUN_DOC = "Evaluate a run's model on the task's fixed test data; print the metrics and write results.json."
_PLOT_DOC = "Write a run's figures (PNG) into its folder."
_REPRODUCE_DOC = (
    "Train every model of a task's results table (or --models) for --seeds seeds, then write results.md "
    "(our table beside the paper's) and results.json. Runs already in --out with the same settings are "
    "continued or reused."
)
_TASKS_DOC = "Every task (experiment) with a one-line description; `train TASK --list` tells more."
_DEMO_DOC = (
    "Quick budgets of every available task on CPU (a few minutes): prints each table beside the "
    "paper's and writes plots under --out, replacing earlier demo runs there. The tasks on your own "
    "files (set-classification, set-regression) have no data of their own and are left out."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``settransformer`` argument parser (subcommands train, eval, plot, reproduce, demo)."""
    tasks = ", ".join(TASKS)
    parser = Parser(prog="settransformer", description=_MAIN_DOC)
    parser.add_argument("--version", action="version", version=f"settransformer {library_version()}")
    parser.add_argument(
        "--heap",
        choices=("keep", "system"),
        default="keep",
        help="before the subcommand: 'keep' (default) keeps freed memory in the process heap for the next "
        "tensor (glibc; large sets on the CPU run faster, the heap holds its peak: see "
        "settransformer.heap); 'system' leaves glibc's defaults",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="train one model of a task", description=_TRAIN_DOC)
    p.add_argument("task", metavar="TASK", help=f"the experiment: {tasks}")
    p.add_argument("--model", help="the table row to train (default: the task's default model)")
    p.add_argument(
        "--out", metavar="DIR", help="the run folder (must not exist or be empty, unless --resume)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--list",
        action="store_true",
        help="list the task's models, options (with defaults) and budgets; train nothing",
    )
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: accept settings that differ from the checkpoint's, recorded with their step "
        "in RUN/changes.jsonl (default: refuse them)",
    )
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train, parser=p)

    commands = (("eval", _cmd_eval, _RUN_DOC, "evaluate a run"), ("plot", _cmd_plot, _PLOT_DOC, "plot a run"))
    for name, func, doc, summary in commands:
        p = sub.add_parser(name, help=summary, description=doc)
        p.add_argument(
            "run", metavar="RUN", help="a run folder written by `settransformer train`, or a checkpoint"
        )
        p.add_argument(
            "--checkpoint",
            choices=("last", "best"),
            default="last",
            help="a run folder's checkpoint.pt (last, default) or best.pt (best)",
        )
        p.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="where to run (default auto: CUDA when available)",
        )
        p.set_defaults(func=func)

    p = sub.add_parser(
        "reproduce", help="train a task's whole table, beside the paper's", description=_REPRODUCE_DOC
    )
    p.add_argument("task", metavar="TASK", help=f"the experiment: {tasks}")
    p.add_argument("--models", metavar="A,B", help="comma-separated table rows (default: all)")
    p.add_argument(
        "--seeds", type=int, default=1, help="runs per model, with seeds SEED..SEED+N-1 (default 1)"
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<task>/reproduce-<budget>)")
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already exist in --out")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_reproduce, parser=p)

    p = sub.add_parser(
        "demo", help="quick budgets of every available task, tables and plots", description=_DEMO_DOC
    )
    p.add_argument(
        "--tasks",
        metavar="A,B",
        help=f"only these tasks (default: every available one of {tasks}, but those on your own files)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="runs/demo",
        help="output folder (default runs/demo); an earlier demo's runs there are replaced, and a "
        "non-empty folder that is not a demo's is refused",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to train (default cpu)"
    )
    p.add_argument("--threads", type=positive_int, metavar="N", default=1, help=_DEMOTHREADS_HELP)
    p.add_argument(
        "--jobs",
        type=positive_int,
        metavar="J",
        help="worker processes, each training one model at a time (default: 2, or 1 on a 1-CPU machine)",
    )
    p.add_argument(
        "--steps", type=positive_int, help="steps per model instead of the quick budget's (smoke tests)"
    )
    p.add_argument(
        "--all-models",
        action="store_true",
        help="every row of each task's table (default: the rows that carry each table's headline "
        "comparison, where the whole table is slow: MoG, point clouds, kernel regression)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("tasks", help="list the tasks, one line each", description=_TASKS_DOC)
    p.set_defaults(func=_cmd_tasks)
    add_predict_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``settransformer`` and ``python -m settransformer``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.heap == "keep":
        keep_freed_memory()
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    try:
        if launched_world_size() > 1 and args.command not in ("train", "tasks"):
            # reproduce and demo train one run after another, the others run one process's work
            raise RunError(
                "runs in one process: launch it without torchrun (train alone runs under torchrun, "
                "with one process per rank)"
            )
        with _one_line_warnings(f"settransformer {args.command}"):
            code = int(args.func(args))
        sys.stdout.flush()  # here, so that a reader gone by now is a BrokenPipeError caught below
        return code
    except (RunError, FileNotFoundError, WriteError) as e:  # bad input, a missing data set, a full disk
        print(f"settransformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged (a settings problem): the last checkpoint stays
        if is_main_process():
            print(f"settransformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGINT/SIGTERM in training: the step reached is saved
        if is_main_process():
            print(f"settransformer {args.command}: {e}{_continue_hint(args, e)}", file=sys.stderr)
        return e.exit_code  # 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training: files on disk stay whole
        print(f"settransformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`| head`): stop quietly, as a killed pipe writer would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141


@contextlib.contextmanager
def _one_line_warnings(prefix: str) -> Iterator[None]:
    """Warnings as ``PREFIX: warning: message`` lines, without Python's file and source line."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"{prefix}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def _continue_hint(args: argparse.Namespace, e: Interrupted) -> str:
    if e.checkpoint is None:
        return ""
    if args.command == "train":
        return f" (continue: settransformer train {args.task} --out {e.checkpoint.parent} --resume)"
    return " (run the same command again to continue)" if args.command == "reproduce" else ""


THREADS_HELP = "CPU threads for PyTorch (default: PyTorch's; 1 is often fastest for small sets)"


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse ``type=``: a positive integer, or a one-line error naming the bad value."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def log(message: str) -> None:
    """A status line on stderr (stdout stays for results a user may pipe)."""
    print(message, file=sys.stderr, flush=True)


def _add_which(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--which",
        choices=("last", "best"),
        default="last",
        help="for a run folder: its checkpoint.pt (last, default) or best.pt (best)",
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    # Everything about the output is checked before any work, so a refused run costs nothing.
    out = None
    if args.output is not None:
        check_not_run_file(args.output)
        if any(Path(args.output).resolve() == Path(p).resolve() for p in args.input):
            raise RunError(f"--output {args.output}: is one of the --input files; choose another name")
        if Path(args.output).exists() and not args.overwrite:
            raise RunError(f"--output {args.output}: already exists; pass --overwrite to replace it")
        try:
            out = check_output_path(args.output, overwrite=args.overwrite)
        except ValueError as e:
            raise RunError(f"--output {e}") from None
        if args.labels and out.suffix.lower() == ".npy":
            raise RunError(f"--output {out}: --labels needs .csv or .jsonl (.npy holds only the outputs)")
    missing = [p for p in args.input if not Path(p).is_file()]
    if missing and Path(missing[0]).is_dir():
        raise RunError(f"--input {missing[0]}: is a folder; pass its files (e.g. {missing[0]}/*.npy)")
    if missing:
        raise RunError(f"--input {missing[0]}: no such file")
    task, model, what = load_for_inference(args.run, which=args.which, device=args.device)
    classes = _class_labels(task, what) if args.labels else None
    if args.chunk_size is not None and "chunk_size" not in inspect.signature(model.forward).parameters:
        raise RunError(
            f"--chunk-size: {what} has no chunked forward (its task's preprocessing has none; runs of "
            "set-classification and set-regression and save_model folders have one); leave --chunk-size out"
        )
    try:
        with_queries = takes_queries(model)
        check_forward(model, queries=with_queries)
        dim = input_dim(model)
        sets, ids = read_inputs(args.input, dim_input=dim, set_column=args.set_column)
        queries = read_queries(args.input) if with_queries else None
        per_element = queries is None and per_element_output(
            model, dim if dim is not None else int(sets[0].shape[1])
        )
        if classes is not None and per_element:
            raise RunError(f"--labels: {what} gives one output per element, not one class per set")
        sizes = {len(s) for s in sets}
        if queries is not None and len({len(q) for q in queries}) > 1:
            per_element = True  # a row per query (.csv): the sets ask for different numbers of values
            sizes = {len(q) for q in queries}
        if out is not None and out.suffix.lower() == ".npy" and per_element and len(sizes) > 1:
            what = "query" if queries is not None else "element"
            raise RunError(
                f"--output {out}: the model gives one output per {what} and the sets differ in their "
                f"number of {'queries' if queries is not None else 'elements'}, so the outputs do not "
                "stack into one array; write .csv or .jsonl"
            )
        outputs = predict(
            model,
            sets,
            queries=queries,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            progress=args.progress,
        )
        labels = None if classes is None else top_labels(outputs, classes)
    except RunError:
        raise
    except ValueError as e:  # a bad input file, or a model predict cannot run
        raise RunError(str(e)) from None
    if out is None:
        for line in jsonl_lines(ids, outputs, labels=labels):
            print(line)
    else:
        with lock_if_run(out.parent):
            write_outputs(out, ids, outputs, per_element=per_element, labels=labels, overwrite=args.overwrite)
    where = f"written to {out}" if out is not None else "written to stdout"
    log(f"{what}: {len(outputs)} set{'' if len(outputs) == 1 else 's'} {where}")
    return 0


def _class_labels(task: Any, what: str) -> list[Any]:
    """The class labels of a classification run, in the order of its model's outputs."""
    if task is None:
        raise RunError(f"--labels: {what} holds no class labels; give a run folder or checkpoint")
    if not hasattr(type(task), "class_names"):
        raise RunError(f"--labels: {task.name} is not a classification task; it has no class labels")
    classes = task.options.get("classes")  # set-classification keeps the labels' own types
    try:
        return list(classes) if isinstance(classes, list) else list(task.class_names)
    except (ValueError, OSError) as e:  # class names read from a data file that is gone
        raise RunError(f"--labels: cannot read the class labels of {what} ({e})") from None


_PREDICT_DOC = (
    "Run a trained model over sets read from files and write its raw outputs, one per set (e.g. "
    "(num_outputs, dim_output) for a Set Transformer: logits, mixture parameters, the regressed "
    "value; no post-processing). Inputs: .npy (one set (N, D) or a batch (S, N, D)); .npz/.h5 with "
    "'x' (or 'sets') and an optional bool 'mask', or ragged 'values' (total, D) + 'offsets' (S+1,), "
    "and optional 'ids'; .csv with one element per row (one set per file, or many with "
    "--set-column). Sets of different sizes are batched with masks; outputs keep the input order. "
    "Models that also take query points (kernel-regression) read them from the same .npz/.h5: "
    "'queries' (S, Q, 1), or ragged 'query_values' + 'query_offsets'; the output of a set is its Q "
    "predicted values. "
    "RUN is a run folder or checkpoint of `settransformer train` (the model then takes raw sets: it "
    "carries its task's preprocessing), or a folder written by settransformer.save_model."
)


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="run a trained model over sets from files", description=_PREDICT_DOC)
    p.add_argument(
        "run",
        metavar="RUN",
        help="a run folder written by `settransformer train`, one of its checkpoints, or a folder "
        "written by save_model (config.json + model.safetensors)",
    )
    p.add_argument(
        "--input",
        metavar="FILE",
        nargs="+",
        action="extend",
        required=True,
        help="input file(s): .npy, .npz, .h5/.hdf5 or .csv (repeatable; several files are read in order)",
    )
    p.add_argument(
        "--set-column",
        metavar="NAME",
        help="CSV inputs: the header column holding set ids; rows with the same id form one set",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="where to write: .npy (an array (S, ...), rows in input order), .csv (a set column, one "
        'column per output value) or .jsonl ({"set": id, "output": [...]} per line); '
        "default: JSON lines on stdout",
    )
    p.add_argument(
        "--labels",
        action="store_true",
        help="classification runs: add each set's predicted class (the original label of the highest "
        "output) as a 'label' column (.csv) or field (.jsonl, stdout)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    _add_which(p)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default auto: CUDA when available)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=64, metavar="B", help="sets per forward pass (default 64)"
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        metavar="C",
        help="evaluate C elements at a time with bounded memory (huge sets; Set Transformers with ISAB "
        "or rFF encoders and DeepSets, from set-classification and set-regression runs or save_model "
        "folders); a set larger than C is evaluated alone (default: every set whole)",
    )
    p.add_argument("--threads", type=positive_int, metavar="N", help=THREADS_HELP)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


_EXPORT_DOC = (
    "Export a run's model for inference without this package: an ONNX graph (ONNX Runtime; needs "
    "pip install 'settransformer[onnx]') or a TorchScript file (torch.jit.load). Both take x (B, N, D) "
    "float32, the padded sets, and mask (B, N) bool, True for real elements (an all-False row is an "
    "empty set), with any batch size B >= 1 and set size N >= 1, and return the model's output (ONNX "
    "names: x, mask, output); a model that takes query points (kernel-regression) also takes queries "
    "(B, Q, Dq) float32, with any Q >= 1 (ONNX name: queries). The file is checked against PyTorch on "
    "padded batches of other sizes (1e-4) before it is written. RUN is a run folder or checkpoint of "
    "`settransformer train` (the exported model carries its task's preprocessing), or a folder written "
    "by settransformer.save_model."
)


def _default_export_path(run: Path, fmt: str, which: str) -> Path:
    """``RUN/model[-best].onnx|pt`` for a run folder, ``<stem>-model.onnx|pt`` beside a checkpoint."""
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    if run.is_dir():
        return run / f"model{'-best' if which == 'best' else ''}{suffix}"
    return run.with_name(f"{run.stem}-model{suffix}")


def _cmd_export(args: argparse.Namespace) -> int:
    run = Path(args.run)
    output = Path(args.output) if args.output else _default_export_path(run, args.format, args.which)
    # Everything about the output is checked before loading the model, so a refused export is quick.
    if output.is_dir():
        raise RunError(f"--output {output}: is a folder; expected a file name")
    check_not_run_file(output)
    if output.resolve() == run.resolve():
        raise RunError(f"--output {output}: is the checkpoint being exported; choose another name")
    if output.exists() and not args.overwrite:
        raise RunError(f"--output {output}: already exists; pass --overwrite to replace it")
    if args.opset is not None and args.format != "onnx":
        raise RunError("--opset: only for --format onnx")
    try:
        check_opset(args.opset)
    except ValueError as e:
        raise RunError(f"--{e}") from None
    usual = (".onnx",) if args.format == "onnx" else (".pt", ".pth")
    if output.suffix.lower() in {".onnx", ".pt", ".pth"} - set(usual):
        log(f"warning: --output {output.name}: the file holds {args.format}; its usual suffix is {usual[0]}")
    with lock_if_run(output.parent):
        return _export(args, run, output)


def _export(args: argparse.Namespace, run: Path, output: Path) -> int:
    task, model, name = load_for_inference(run, which=args.which, device="cpu")
    dim = input_dim(model)
    if dim is None and task is not None:  # a model that does not say: the task's own batches do
        dim = int(task.sample_batch(2, torch.Generator().manual_seed(0)).x.shape[-1])
    if dim is None:
        raise RunError(f"{name}: cannot export: the model does not say its input feature size")
    dim_query = None
    if takes_queries(model):  # the task's batches hold the query points the model is asked about
        if task is None:
            raise RunError(
                f"{name}: cannot export: the model takes queries of a feature size it does not say"
            )
        dim_query = int(task.sample_batch(2, torch.Generator().manual_seed(0)).extra["queries"].shape[-1])
    try:
        if args.format == "onnx":
            export_onnx(
                model, output, dim_input=dim, dim_query=dim_query, opset=args.opset, overwrite=args.overwrite
            )
        else:
            export_torchscript(model, output, dim_input=dim, dim_query=dim_query, overwrite=args.overwrite)
    except (ImportError, TypeError, ValueError, FileExistsError) as e:  # ExportError is a ValueError
        raise RunError(f"{name}: cannot export: {e}") from None
    source = f"{args.which} checkpoint, " if task is not None and run.is_dir() else ""
    kind = f"ONNX (opset {args.opset or DEFAULT_OPSET})" if args.format == "onnx" else "TorchScript"
    where = "" if str(run) in name else f" ({source}{run})"  # a saved model's name holds its folder
    print(f"exported {name}{where} as {kind}: {output}")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"  inputs: x {dtype} (batch, set, {dim}), mask bool (batch, set), True for real elements")
    if dim_query is not None:
        print(f"          queries {dtype} (batch, queries, {dim_query}), the points each set is asked about")
    if args.format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        log("warning: onnxruntime is not installed, so the file was checked but not run")
    return 0


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript", description=_EXPORT_DOC)
    p.add_argument(
        "run",
        metavar="RUN",
        help="a run folder written by `settransformer train`, one of its checkpoints, or a folder "
        "written by save_model (config.json + model.safetensors)",
    )
    p.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        required=True,
        help="onnx: a .onnx graph for ONNX Runtime; torchscript: a traced module for torch.jit.load",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="the file to write (default: model.onnx or model.pt in the run folder, model-best.* with "
        "--which best; <name>-model.onnx|pt beside a checkpoint file)",
    )
    _add_which(p)
    p.add_argument(
        "--opset",
        type=positive_int,
        metavar="N",
        help=f"ONNX opset version, 14 to 20 (default {DEFAULT_OPSET}); --format onnx only",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    p.set_defaults(func=_cmd_export)
