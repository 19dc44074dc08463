"""What the ``mixcompile`` command does before it imports torch (a second or more): Ctrl-C, SIGTERM and
SIGHUP then end it as at any other time, with one line and exit code 128 + the signal's number (130 for
Ctrl-C), not a traceback through torch's imports nor a silent death. Standard library only, and outside
:mod:`mixcompile.cli`: the package root installs it first (the console script and ``python -m mixcompile``
import the root before the CLI), without loading the CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
COMMANDS = ("mixcompile", "mixcompile.exe")


def guard_imports() -> None:
    """Exit on SIGINT, SIGTERM and SIGHUP until :func:`end_import_guard`, when this process is the
    ``mixcompile`` command (never in a program that imports mixcompile: its signals are its own)."""
    if not is_the_command() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    try:
        for signum in _SIGNALS:
            if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
                signal.signal(signum, _exit_interrupted)
    except ValueError:  # imported outside the main thread, where no handler can be set
        return


def end_import_guard() -> None:
    """From here the command handles them (cleaning up what it wrote first): Ctrl-C raises
    ``KeyboardInterrupt`` again, SIGTERM and SIGHUP raise :class:`Terminated`."""
    for signum in _SIGNALS:
        if signal.getsignal(signum) is _exit_interrupted:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else raise_terminated)


class Terminated(BaseException):
    """SIGTERM / SIGHUP received by the command: unwinds like KeyboardInterrupt, so cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """The command's SIGTERM / SIGHUP handler once torch is imported: a ``KeyboardInterrupt`` of its own."""
    raise Terminated(signum)


def is_the_command() -> bool:
    """The console script (``argv[0]`` names it) or ``python -m mixcompile`` (``argv[0]`` is ``-m`` while
    the package is imported)."""
    if sys.argv and os.path.basename(sys.argv[0]) in COMMANDS:
        return True
    original = list(getattr(sys, "orig_argv", []))
    if sys.argv[:1] != ["-m"] or "-m" not in original:
        return False
    flag = original.index("-m")
    return original[flag + 1 : flag + 2] == ["mixcompile"]


def _exit_interrupted(signum: int, frame: FrameType | None) -> None:
    """Exit now: nothing is written while importing, so nothing needs cleaning up, and an exception raised
    here could be caught by the module being imported (a ``SystemExit`` was, in some import of torch's)."""
    what = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    with contextlib.suppress(OSError, ValueError):
        print(f"mixcompile: error: {what}; nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)
