"""`qtool push`: parse the options, call qtool.push.push_folder, print what was (or would be) uploaded."""

from __future__ import annotations

from typing import Annotated

import typer

from qtool.cli._options import JsonOpt, TokenOpt

PUSH_EXAMPLES = [
    "qtool push ./FLUX.1-dev-nf4-dq me/FLUX.1-dev-nf4-dq --dry-run",
    "qtool push ./FLUX.1-dev-nf4-dq me/FLUX.1-dev-nf4-dq --private",
    "qtool push ./my-llm-int8 someorg/my-llm-int8 --create-pr --commit-message 'int8 weights'",
]

PrivateOpt = Annotated[
    bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")
]


def push(
    folder: Annotated[
        str, typer.Argument(metavar="FOLDER", help="The folder qtool quantize wrote.", show_default=False)
    ],
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="The model repo to push to, owner/name.", show_default=False)
    ],
    private: PrivateOpt = False,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Branch to commit to (it must exist). Default: main.", show_default=False),
    ] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", metavar="M", help="The commit message.", show_default=False)
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            metavar="REPO_ID",
            help="base_model for the model card. Default: the Hub repo qtool quantize read, if it read one.",
            show_default=False,
        ),
    ] = None,
    token: TokenOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List every file (the model card too), sizes and target; upload nothing.")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Publish a quantized checkpoint to the Hugging Face Hub in one commit, with a model card.

    Creates the repo if needed and uploads every file of FOLDER in a single commit, so nobody sees a config.json
    without its weights. Writes README.md (a model card: base_model, license, tags, settings, sizes and a loading
    snippet) into FOLDER first unless it has one. An interrupted push resumes when run again: files the Hub already
    holds are not uploaded twice.
    """
    from qtool import push as api
    from qtool import ui

    result = api.push_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
        base_model=base_model,
        dry_run=dry_run,
    )
    if json_output:
        ui.print_json(result.to_dict())
    else:
        ui.print_push_result(result)
