"""Stop training cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, a batch scheduler's notice).

While a [`StopOnSignal`][settransformer.training.interrupt.StopOnSignal] is active, these signals only set a
flag. The training loop asks [`StopOnSignal.agreed`][settransformer.training.interrupt.StopOnSignal.agreed]
between steps, and when it says stop, writes a checkpoint of the step it reached and raises
[`Interrupted`][settransformer.training.interrupt.Interrupted]; ``settransformer train`` turns that into one
line naming the checkpoint and the exit code ``128 + signal`` (130 for SIGINT, 143 for SIGTERM: the shell's
code for a process ended by that signal, so schedulers and scripts see that the run did not finish).

A second signal while the first is being handled raises ``KeyboardInterrupt`` at once: the atomic
checkpoint writes ([`settransformer.training.checkpoint`][settransformer.training.checkpoint]) keep the last
checkpoint on disk intact.

Under ``torchrun`` every process gets the signal (a terminal's Ctrl-C reaches the whole process
group; torchrun forwards SIGTERM to its workers and sends SIGKILL 30 s later). The processes must
stop at the same step, or some would wait forever in a collective the others never join; so they
decide together: between every two steps they reduce their flags (one number, on the CPU, beside
the gradients DDP reduces every step anyway) and all stop when any has one. Rank 0 then writes the
checkpoint, with the running loss averaged over the ranks.

Examples:
    >>> import os, signal
    >>> step = 0
    >>> with StopOnSignal() as stop:
    ...     while step < 100 and stop.signum is None:
    ...         step += 1  # one training step
    ...         if step == 3:
    ...             os.kill(os.getpid(), signal.SIGTERM)  # as a batch scheduler would
    >>> step, signal.Signals(stop.signum).name
    (3, 'SIGTERM')
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from .distributed import Distributed

__all__ = ["SIGNALS", "Interrupted", "StopOnSignal"]

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop training cleanly."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving its state: ``signum``, the ``step`` reached, and the
    ``checkpoint`` written there (``None`` without a run folder, and on ranks other than 0).

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it, and ``except Exception`` does not
    swallow it.

    Examples:
        >>> err = Interrupted(signal.SIGTERM, 120, Path("runs/x/checkpoint.pt"))
        >>> print(err)
        interrupted by SIGTERM at step 120; checkpoint saved: runs/x/checkpoint.pt
        >>> err.exit_code  # 128 + 15
        143
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(str(self))

    @property
    def exit_code(self) -> int:
        """``128 + signum``, the status a shell reports for a process ended by the signal."""
        return 128 + self.signum

    def __str__(self) -> str:
        where = f"checkpoint saved: {self.checkpoint}" if self.checkpoint else "no run folder, nothing saved"
        return f"interrupted by {signal.Signals(self.signum).name} at step {self.step}; {where}"


class StopOnSignal:
    """Context manager: while active, SIGINT and SIGTERM set `signum` instead of ending the
    process; the previous handlers come back on exit.

    Signal handlers can only be set in the main thread: elsewhere it installs nothing and
    `signum` stays ``None`` (the signals then act as they did before). A signal the process
    ignores (``SIG_IGN``, e.g. SIGINT in a background job of a script) stays ignored. ``install`` and
    ``restore`` do the same as entering and leaving, for code that cannot indent a block.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        """The first signal received while active, or ``None``."""
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored signal stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __enter__(self) -> StopOnSignal:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now, without the final checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, world: Distributed) -> int | None:
        """The signal to stop for now, or ``None`` to go on: the same answer on every process.

        One process: `signum`. Under DDP, a collective that every rank calls between the same
        two steps ([`Distributed.any_rank`][settransformer.training.distributed.Distributed.any_rank]).
        """
        if not world.enabled:
            return self.signum
        signum = world.any_rank(self.signum or 0)
        if signum:
            self.signum = self.signum or signum
        return signum or None
