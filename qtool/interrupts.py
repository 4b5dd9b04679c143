"""Ctrl-C, SIGTERM and SIGHUP as exceptions that unwind through qtool's clean-up code.

Python turns only SIGINT into an exception (KeyboardInterrupt); SIGTERM (``kill``, a job scheduler's time limit, a
container stop) and SIGHUP (the terminal closed) kill the process where it stands, leaving temporary folders
behind. ``handle_signals`` makes all three raise ``Interrupted`` while a CLI command runs, so the same
``except BaseException`` clean-up runs for each. ``deferred`` holds them off for a few lines that must finish once
begun: the renames that put an output in place, and the removal of a temporary folder.

Python runs signal handlers in the main thread, between bytecodes: a handler runs within one tensor operation or
one read of the signal's arrival, which is what makes an interrupted run stop promptly.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(previous: dict) -> None:
    for s, handler in previous.items():
        # None: a handler set from C, which Python cannot reinstall; the default is the closest.
        signal.signal(s, signal.SIG_DFL if handler is None else handler)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Inside the block, SIGINT, SIGTERM and SIGHUP raise ``Interrupted``; the previous handlers come back after.
    A no-op outside the main thread (only it may set handlers)."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end even if SIGINT, SIGTERM or SIGHUP arrives; the first signal that arrived is then
    delivered again to whatever handler was in place before (``Interrupted`` under ``handle_signals``)."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        _restore(previous)
        if pending:
            signal.raise_signal(pending[0])
