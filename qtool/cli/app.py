"""The root ``qtool`` command: registers the subcommands and turns errors into one-line messages.

Start-up stays fast: torch, Triton and the API are imported inside command bodies, never at module level.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from qtool import __version__
from qtool.cli._errors import report
from qtool.errors import QtoolError

app = typer.Typer(
    name="qtool",
    help="Quantize Hugging Face checkpoints to the bitsandbytes 4-bit / 8-bit format, with Triton kernels, and back.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    # Plain output and no locals in tracebacks: a --token must never reach the terminal.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"qtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print qtool's version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Quantize Hugging Face checkpoints to the bitsandbytes 4-bit / 8-bit format, with Triton kernels, and back."""
    # diffusers imports bitsandbytes whenever it is installed, and bnb 0.50 then logs a warning about an optional
    # CPU kernel package that qtool never uses. The CLI owns its process, so it silences that logger (not the API).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _register() -> None:
    from qtool.cli._errors import cli_errors
    from qtool.cli.dequantize import DEQUANTIZE_EXAMPLES, dequantize
    from qtool.cli.footprint import FOOTPRINT_EXAMPLES, footprint
    from qtool.cli.push import PUSH_EXAMPLES, push
    from qtool.cli.quantize import QUANTIZE_EXAMPLES, quantize

    for command, examples in (
        (quantize, QUANTIZE_EXAMPLES),
        (footprint, FOOTPRINT_EXAMPLES),
        (dequantize, DEQUANTIZE_EXAMPLES),
        (push, PUSH_EXAMPLES),
    ):
        app.command(epilog="Examples:\n\n" + "\n\n".join(f"  {e}" for e in examples))(cli_errors(command))


@app.command()
def env() -> None:
    """Print the versions, GPU and kernel mode qtool sees (paste this into bug reports)."""
    from qtool.environment import describe

    for key, value in describe().items():
        typer.echo(f"{key}: {value}")


_register()


def main() -> None:
    """Entry point: run the app; a QtoolError prints `error: ...` (and `hint: ...`) and exits 1."""
    try:
        app()
    except QtoolError as exc:  # raised outside a command body (commands report their own)
        if os.environ.get("QTOOL_DEBUG") == "1":
            raise
        report(exc)
        sys.exit(1)
