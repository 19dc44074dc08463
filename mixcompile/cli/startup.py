"""What the ``mixcompile`` command does before it imports torch (a second or more): Ctrl-C then ends it as
at any other time, with one line and exit code 130, not a traceback through torch's imports. Standard
library only, so it is in place before anything slow is imported."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

INTERRUPTED = "interrupted; nothing was written"
COMMANDS = ("mixcompile", "mixcompile.exe")


def guard_imports() -> None:
    """Exit on SIGINT until :func:`end_import_guard`, when this process is the ``mixcompile`` command (never
    in a program that imports mixcompile: its Ctrl-C is its own)."""
    if not is_the_command() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    try:
        signal.signal(signal.SIGINT, _exit_interrupted)
    except ValueError:  # imported outside the main thread, where no handler can be set
        return


def end_import_guard() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` again: the command now handles it (after cleaning up)."""
    if signal.getsignal(signal.SIGINT) is _exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    with contextlib.suppress(OSError, ValueError):
        print(f"mixcompile: error: {INTERRUPTED}", file=sys.stderr, flush=True)
    os._exit(128 + signum)
