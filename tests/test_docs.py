"""The documentation is true: its Python examples run, its API pages cover the package, it stays short.

Every fenced ```python block of README.md and of the pages under docs/ (the API pages hold no code) is
executed; the blocks of one page share a namespace and run in order, in a temporary working folder, so
an example may write a file that a later block reads. A block preceded by the line
``<!-- no-test -->`` needs files only the user has and is skipped. Shell examples are not run.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "src" / "settransformer"
SKIP_MARK = "<!-- no-test -->"
FENCE = re.compile(r"^```(\S*)(.*)$")

PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "api" not in p.relative_to(DOCS).parts)]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of ``path`` not marked ``no-test``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None or not m.group(1):
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        previous = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        if lang == "python" and previous != SKIP_MARK:
            blocks.append((start + 2, "\n".join(body)))
    return blocks


def test_blocks_are_found() -> None:
    """The extractor sees the README's quick start (a guard against a parser that finds nothing)."""
    readme = python_blocks(ROOT / "README.md")
    assert readme and any("SetTransformer" in code for _, code in readme)
    without = {page.name for page in PAGES if page.parent == DOCS / "guides" and not python_blocks(page)}
    assert without <= {"distributed.md"}, f"guides without a tested Python example: {sorted(without)}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip("no Python example")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks:
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.relative_to(ROOT)}, block at line {line}: {err!r}") from err


def _api_targets() -> list[str]:
    return [
        line.removeprefix(":::").strip()
        for page in sorted((DOCS / "api").glob("*.md"))
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith(":::")
    ]


def test_api_reference_covers_every_module() -> None:
    """Each module of the package has its section in the API reference, and every section imports."""
    modules = {
        ".".join(("settransformer", *p.relative_to(PACKAGE).with_suffix("").parts))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and not p.name.startswith("_")
    }
    targets = _api_targets()
    assert len(targets) == len(set(targets)), "a module is documented twice"
    missing = modules - set(targets)
    assert not missing, f"modules without an API section (add `::: MODULE` to docs/api/): {sorted(missing)}"
    for target in targets:
        importlib.import_module(target)


def test_readme_is_short_and_tells_no_history() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 260
    history = re.compile(
        r"\bsessions? \d|\btarget(s)? (met|not met)|\bnot met\b|\bround of work", re.IGNORECASE
    )
    for page in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *DOCS.rglob("*.md")]:
        found = history.search(page.read_text(encoding="utf-8"))
        assert found is None, f"{page.relative_to(ROOT)}: {found.group(0)!r}"
