"""`qtool quantize`: parse the options, call qtool.api.quantize_checkpoint, print the summary."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from qtool.cli._options import JsonOpt, QuietOpt, RevisionOpt, SourceArg, TokenOpt
from qtool.errors import QtoolError

QUANTIZE_EXAMPLES = [
    "qtool quantize black-forest-labs/FLUX.1-dev --bits 4 --nf4 --double-quant",
    "qtool quantize ./my-flux-pipeline --bits 8 --output ./my-flux-int8",
    "qtool quantize meta-llama/Llama-3.1-8B --fp4 --dry-run",
    "qtool quantize ./tiny-flux --components transformer --skip proj_out --json",
]


class ComputeDtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


def quantize(
    source: SourceArg,
    bits: Annotated[int, typer.Option("--bits", help="4 (NF4/FP4, QLoRA-style) or 8 (LLM.int8).")] = 4,
    nf4: Annotated[bool, typer.Option("--nf4", help="4-bit NormalFloat codes (the default 4-bit type).")] = False,
    fp4: Annotated[bool, typer.Option("--fp4", help="4-bit floating-point codes instead of NF4.")] = False,
    double_quant: Annotated[
        bool, typer.Option("--double-quant", help="Also quantize the 4-bit scales (~0.4 bits/parameter less).")
    ] = False,
    blocksize: Annotated[
        int, typer.Option("--blocksize", help="4-bit weights per scale, a power of two from 32 to 4096.")
    ] = 64,
    compute_dtype: Annotated[
        ComputeDtype, typer.Option("--compute-dtype", help="dtype the 4-bit layers compute in when loaded.")
    ] = ComputeDtype.bf16,
    components: Annotated[
        str | None,
        typer.Option(
            "--components",
            metavar="NAME,NAME",
            help="Comma-separated pipeline components to quantize. Default: transformer,text_encoder_2 when present.",
            show_default=False,
        ),
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip",
            metavar="MODULE",
            help="Module name to keep in 16-bit (repeatable), matched as diffusers/transformers do.",
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="LLM.int8 outlier threshold recorded for 8-bit inference.")
    ] = 6.0,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="DIR",
            help="Output folder. Default: ./<source name>-<method> (beside the source when run inside it).",
            show_default=False,
        ),
    ] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    device: Annotated[
        Device | None,
        typer.Option("--device", help="cuda (Triton kernels) or cpu (PyTorch reference). Default: cuda if present."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and sizes; download weights and write nothing.")
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")] = False,
) -> None:
    """Quantize a diffusers pipeline or a model to bitsandbytes 4-bit / 8-bit, loadable with no extra arguments."""
    if nf4 and fp4:
        raise QtoolError("--nf4 and --fp4 conflict", hint="choose one 4-bit code type (default: --nf4)")
    if bits == 8 and (nf4 or fp4 or double_quant):
        flag = "--nf4" if nf4 else "--fp4" if fp4 else "--double-quant"
        raise QtoolError(f"--bits 8 and {flag} conflict", hint=f"{flag} is a 4-bit option; drop it or use --bits 4")
    if json_output and quiet:
        raise QtoolError("--json and --quiet conflict", hint="--json prints one JSON object; --quiet only the path")

    from qtool import api, ui
    from qtool.spec import QuantSpec

    spec = QuantSpec(
        bits=bits,
        quant_type="fp4" if fp4 else "nf4",
        double_quant=double_quant,
        blocksize=blocksize,
        compute_dtype=compute_dtype.value,
        skip=tuple(skip or ()),
        threshold=threshold,
    )
    result = api.quantize_checkpoint(
        source,
        spec=spec,
        components=[c.strip() for c in components.split(",") if c.strip()] if components else None,
        output=output,
        revision=revision,
        token=token,
        device=device.value if device else None,
        dry_run=dry_run,
        overwrite=overwrite,
        progress=ui.RichProgress(enabled=not (quiet or json_output)),
    )
    if json_output:
        ui.print_json(result.to_dict())
    elif quiet:
        typer.echo(str(result.output))
    else:
        ui.print_quantize_result(result)
