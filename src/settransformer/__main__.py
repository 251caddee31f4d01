"""``python -m settransformer`` and the ``settransformer`` command (its console script calls
[`main`][settransformer.__main__.main])."""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Run the CLI ([`settransformer.cli.main`][settransformer.cli.main]) and return its exit code.

    Importing the CLI loads PyTorch, which takes seconds; Ctrl-C during them ends the process at once
    with one line and exit code 130, as it does later, instead of a traceback of the import.
    """
    try:
        from .cli import main as run_cli  # here, not at the top: inside the try, for Ctrl-C
    except KeyboardInterrupt:
        print("settransformer: interrupted", file=sys.stderr, flush=True)
        # Now, without the interpreter's teardown: modules left half-imported (PyTorch's) can fail
        # or hang in it. Nothing of ours is open yet.
        os._exit(130)
    return run_cli()


if __name__ == "__main__":
    raise SystemExit(main())
