"""Pieces shared by the ``settransformer`` subcommands' parsers (:mod:`.cli`, :mod:`.cli_deploy`)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["THREADS_HELP", "Parser", "log", "positive_int"]

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
