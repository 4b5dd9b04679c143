"""`qtool dequantize`: parse the options, call qtool.dequant.dequantize_checkpoint, print the summary."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from qtool.cli._options import (
    AllowNonfiniteOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    SourceArg,
    TokenOpt,
    check_output_flags,
    split_components,
)

DEQUANTIZE_EXAMPLES = [
    "qtool dequantize ./FLUX.1-dev-nf4-dq --output ./FLUX.1-dev-bf16",
    "qtool dequantize someone/Llama-3.1-8B-bnb-4bit --dtype fp16 --output ./llama-fp16",
    "qtool dequantize ./my-flux-int8 --components transformer --device cpu",
]


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


def dequantize(
    source: SourceArg,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="DIR",
            help="Output folder. Default: ./<source name>-dequantized.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        Dtype | None,
        typer.Option(
            "--dtype",
            help="dtype of the dequantized weights. Default: the one each 4-bit quant state records (the original "
            "weight's); for 8-bit, the dtype of the checkpoint's other tensors. Other tensors stay as they are.",
            show_default=False,
        ),
    ] = None,
    components: Annotated[
        str | None,
        typer.Option(
            "--components",
            metavar="NAME,NAME",
            help="Comma-separated pipeline components to dequantize. Default: every quantized one.",
            show_default=False,
        ),
    ] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    device: DeviceOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
) -> None:
    """Turn a bitsandbytes 4-bit / 8-bit checkpoint back into a plain one that loads without bitsandbytes.

    Reads checkpoints written by qtool quantize or by diffusers/transformers save_pretrained with bitsandbytes
    (a pipeline or one model, local or on the Hub). The values equal bitsandbytes' own dequantization; the
    quantization error itself stays (dequantizing cannot restore the original weights).
    """
    check_output_flags(json_output, quiet)

    from qtool import dequant, ui

    result = dequant.dequantize_checkpoint(
        source,
        output=output,
        dtype=dtype.value if dtype else None,
        components=split_components(components),
        revision=revision,
        token=token,
        device=device.value if device else None,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        progress=ui.RichProgress(enabled=not (quiet or json_output)),
    )
    if json_output:
        ui.print_json(result.to_dict())
    elif quiet:
        typer.echo(str(result.output))
    else:
        ui.print_dequantize_result(result)
