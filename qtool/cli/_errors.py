"""One place that turns a QtoolError into `error: ...` / `hint: ...` on stderr and exit code 1.

The traceback is shown only with QTOOL_DEBUG=1; tracebacks never show local variables (a --token must not leak).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import typer

from qtool.errors import QtoolError
from qtool.interrupts import Interrupted, handle_signals

F = TypeVar("F", bound=Callable)


def report(exc: QtoolError) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"hint: {exc.hint}", err=True)


def cli_errors(command: F) -> F:
    """Decorate a command so that a QtoolError, Ctrl-C, SIGTERM or SIGHUP ends it with a one-line message, not a
    traceback (exit codes 1, 130, 143, 129)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with handle_signals():
                return command(*args, **kwargs)
        except QtoolError as exc:
            if os.environ.get("QTOOL_DEBUG") == "1":
                raise
            report(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            # An output is renamed into place whole or not at all, so either is true of an interrupted run.
            name = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
            typer.echo(f"interrupted ({name}): nothing half-written was left behind", err=True)
            raise typer.Exit(exc.exit_code if isinstance(exc, Interrupted) else 130) from None

    return wrapper  # type: ignore[return-value]
