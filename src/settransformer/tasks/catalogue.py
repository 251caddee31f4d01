"""What the CLI shows about the registered tasks: one line each (``settransformer tasks``), and a
task's models, options and budgets (``settransformer train TASK --list``).

Every text comes from the task classes themselves (``description``, ``model_descriptions``, the
``Options:`` section of the docstring or an ``option_help`` mapping, ``default_options``, ``budget``),
so a task documents its options once, where it defines them.

Examples:
    >>> print(describe_task("max-regression").splitlines()[0])
    max-regression: Regress the maximum of a set of reals.
"""

from __future__ import annotations

import json

from . import TASKS, get_task
from .base import Task
from .runs import default_model, task_class

__all__ = ["describe_task", "option_help", "task_summaries"]


def task_summaries() -> list[tuple[str, str]]:
    """``(name, one line)`` for every registered task: its ``description`` or its docstring's first line."""
    out = []
    for name in TASKS:
        try:
            cls = get_task(name)
        except ValueError as e:  # TaskUnavailable: say why instead of describing it
            out.append((name, f"(unavailable: {e})"))
            continue
        text = getattr(cls, "description", None) or (cls.__doc__ or "").strip()
        out.append((name, text.splitlines()[0] if text else ""))
    return out


def option_help(cls: type[Task]) -> dict[str, str]:
    """``{option: help}``: the task's ``option_help`` mapping, else its docstring's ``Options:``
    section (``- name, other: text`` entries, a Markdown list, continued on deeper-indented lines)."""
    given = getattr(cls, "option_help", None)
    if given:
        return dict(given)
    lines = (cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Options:"), None)
    helps: dict[str, str] = {}
    if start is None:
        return helps
    names: list[str] = []
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        head, sep, text = line.strip().removeprefix("- ").partition(": ")
        if depth == indent and sep and all(n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]
            for n in names:
                helps[n] = text.strip().replace("``", "")
        elif depth < indent:
            break
        else:
            for n in names:
                helps[n] += " " + line.strip().replace("``", "")
    return helps


def describe_task(name: str) -> str:
    """What ``settransformer train TASK --list`` prints: the task, its models (the default
    marked) with one line each, its options with type, default and help text, and its budgets."""
    cls = task_class(name)
    default = default_model(cls)
    lines = [f"{name}: {dict(task_summaries())[name]}", "", "models (--model):"]
    for m in cls.model_names:
        mark = " (default)" if m == default else ""
        lines.append(f"  {m}{mark}: {cls.model_descriptions.get(m, '')}".rstrip(": "))
    helps = option_help(cls)
    lines += ["", "options (--set KEY=VALUE):"]
    for key, value in cls.default_options().items():
        kind = "any" if value is None else type(value).__name__
        lines.append(f"  {key} ({kind}, default {json.dumps(value)}): {helps.get(key, '')}".rstrip(": "))
    budgets = "; ".join(f"{b}: {_budget_line(cls, b)}" for b in ("quick", "paper"))
    lines += ["", f"budgets (--budget): {budgets}"]
    return "\n".join(lines)


def _budget_line(cls: type[Task], name: str) -> str:
    b = cls.budget(name)
    others = [f"{k} {v}" for k, v in b.items() if k not in ("steps", "batch_size", "lr")]
    return ", ".join([f"{b['steps']} steps of {b['batch_size']} sets, lr {b['lr']}", *others])
