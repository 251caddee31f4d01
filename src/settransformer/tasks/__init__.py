"""The experiments, by CLI name, imported only when used.

Each task lives in its own module (see [`settransformer.tasks.base`][settransformer.tasks.base] for the
interface). The registry maps CLI names to ``"module:Class"`` strings and imports lazily, so a task whose
optional dependency is missing, or whose module is not part of this installation, fails only when it is
asked for, with a message that says why.

Examples:
    >>> cls = get_task("max-regression")
    >>> cls.model_names[:4]
    ('deepsets-mean', 'deepsets-sum', 'deepsets-max', 'settransformer')
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Task

__all__ = ["TASKS", "TaskUnavailable", "available_tasks", "did_you_mean", "get_task", "is_present"]

TASKS: dict[str, str] = {
    "max-regression": "settransformer.tasks.max_regression:MaxRegression",
    "count-unique": "settransformer.tasks.count_unique:CountUnique",
    "mog-clustering": "settransformer.tasks.mog_clustering:MoGClustering",
    "digits-clustering": "settransformer.tasks.digits_clustering:DigitsClustering",
    "set-anomaly": "settransformer.tasks.set_anomaly:SetAnomaly",
    "pointcloud": "settransformer.tasks.pointcloud:PointCloudClassification",
    "kernel-regression": "settransformer.tasks.kernel_regression:KernelRegression",
    "set-classification": "settransformer.tasks.labelled_sets:SetClassification",
    "set-regression": "settransformer.tasks.labelled_sets:SetRegression",
}
"""CLI name -> "module:Class". The order is the order of the paper (and of ``demo``)."""


class TaskUnavailable(ValueError):
    """A registered task that cannot be used here (module absent or a dependency missing)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the closest of ``choices`` to a misspelled ``word``, else ``""``.

    Examples:
        >>> did_you_mean("max-regresion", TASKS)
        " (did you mean 'max-regression'?)"
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_name(name: str) -> tuple[str, str]:
    if name not in TASKS:
        raise ValueError(
            f"task: unknown task {name!r}{did_you_mean(name, TASKS)}; expected one of {', '.join(TASKS)}"
        )
    module, _, cls = TASKS[name].partition(":")
    return module, cls


def is_present(name: str) -> bool:
    """Whether the module of the registered task ``name`` exists (without importing it)."""
    module, _ = _check_name(name)
    return importlib.util.find_spec(module) is not None


def available_tasks() -> list[str]:
    """Registered tasks whose module exists, in registry order."""
    return [name for name in TASKS if is_present(name)]


def get_task(name: str) -> type[Task]:
    """The [`Task`][settransformer.tasks.base.Task] subclass registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered.
        TaskUnavailable: its module is absent, or imports a package that is not installed.
    """
    module_name, cls_name = _check_name(name)
    if not is_present(name):
        raise TaskUnavailable(f"task {name!r}: its module {module_name} is not part of this installation")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or e.name == module_name:
            raise
        raise TaskUnavailable(
            f"task {name!r} needs the package {e.name!r}, which is not installed "
            f"(pip install 'settransformer[train]' or pip install {e.name})"
        ) from e
    try:
        return getattr(module, cls_name)
    except AttributeError:
        raise TaskUnavailable(f"task {name!r}: {module_name} defines no class {cls_name}") from None
