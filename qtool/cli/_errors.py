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

F = TypeVar("F", bound=Callable)


def report(exc: QtoolError) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"hint: {exc.hint}", err=True)


def cli_errors(command: F) -> F:
    """Decorate a command so that a QtoolError (or Ctrl-C) ends it with a one-line message, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except QtoolError as exc:
            if os.environ.get("QTOOL_DEBUG") == "1":
                raise
            report(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
