"""Running the CLI in-process from a test: exit code and captured output."""

from __future__ import annotations

import pytest

from settransformer import cli


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``settransformer ARGV...`` -> ``(exit code, stdout, stderr)``; argparse's exits included."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
