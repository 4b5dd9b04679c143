"""qtool's error type: a one-line message plus an optional hint, printed by the CLI without a traceback."""

from __future__ import annotations


class QtoolError(Exception):
    """A failure the user can act on. ``hint`` says what to do next."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
