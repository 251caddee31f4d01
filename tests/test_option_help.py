"""Every task option has help text of its own in ``settransformer train TASK --list``."""

from __future__ import annotations

import pytest

from settransformer.tasks import TASKS, TaskUnavailable, get_task
from settransformer.tasks.base import Task
from settransformer.tasks.catalogue import describe_task, option_help


def _task(name: str) -> type[Task]:
    try:
        return get_task(name)
    except TaskUnavailable as e:  # an optional dependency is missing here
        pytest.skip(str(e))


@pytest.mark.parametrize("name", list(TASKS))
def test_every_option_has_help_of_its_own(name: str) -> None:
    cls = _task(name)
    helps = option_help(cls)
    options = list(cls.default_options())
    missing = [key for key in options if not helps.get(key, "").strip()]
    assert not missing, f"{name}: options without help: {missing}"
    shared: dict[str, list[str]] = {}
    for key in options:
        shared.setdefault(helps[key].strip(), []).append(key)
    assert not [keys for keys in shared.values() if len(keys) > 1], f"{name}: options sharing one help text"
    if getattr(cls, "option_help", None) is None:  # a docstring's list names only real options
        assert not sorted(set(helps) - set(options)), f"{name}: documented options that do not exist"


@pytest.mark.parametrize("name", list(TASKS))
def test_list_prints_each_options_help(name: str) -> None:
    cls = _task(name)
    text = describe_task(name)
    helps = option_help(cls)
    for key in cls.default_options():
        line = next(line for line in text.splitlines() if line.startswith(f"  {key} ("))
        assert line.endswith(f"): {helps[key]}"), line
