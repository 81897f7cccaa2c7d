"""Ctrl-C while the command line loads onnxopt (numpy, onnx, onnxruntime: a second or two) gets
the one line and exit code that an interrupt gets later, instead of a traceback through the
import machinery. Only for the ``onnxopt`` command (or ``python -m onnxopt.cli``), only in the main
thread, and only while the package loads: ``import onnxopt`` in a user's program keeps Python's
own Ctrl-C. Standard library only: nothing else has loaded yet."""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def _as_command() -> bool:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    orig = list(getattr(sys, "orig_argv", []))
    return argv0 in ("onnxopt", "onnxopt.exe") or any(
        orig[i:i + 2] == ["-m", "onnxopt.cli"] for i in range(len(orig)))


def _interrupted(signum, frame):  # pragma: no cover - exercised from a subprocess in the tests
    sys.stderr.write("error: interrupted; nothing was written\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT)  # nothing has been written yet, and no import must run on


_previous = None


def quiet_interrupts_while_loading() -> None:
    """Install the one-line Ctrl-C handler when running as the command, until
    :func:`restore_interrupts` (the CLI calls it when a command starts)."""
    global _previous
    if _as_command() and threading.current_thread() is threading.main_thread():
        _previous = signal.signal(signal.SIGINT, _interrupted)


def restore_interrupts() -> None:
    """Python's own Ctrl-C again (a KeyboardInterrupt the CLI turns into its one line)."""
    global _previous
    if _previous is not None:
        signal.signal(signal.SIGINT, _previous)
        _previous = None
