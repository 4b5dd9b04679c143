"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

SourceArg = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE",
        help="A Hub repo id (e.g. black-forest-labs/FLUX.1-dev) or a local folder.",
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub branch, tag or commit to read. Default: the main branch.")
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hugging Face token for gated or private repos. Default: HF_TOKEN or the token saved by `hf auth login`.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; print only the output path.")]
