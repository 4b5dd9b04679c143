"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from qtool.errors import QtoolError

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
BitsOpt = Annotated[int, typer.Option("--bits", help="4 (NF4/FP4, QLoRA-style) or 8 (LLM.int8).")]
Nf4Opt = Annotated[bool, typer.Option("--nf4", help="4-bit NormalFloat codes (the default 4-bit type).")]
Fp4Opt = Annotated[bool, typer.Option("--fp4", help="4-bit floating-point codes instead of NF4.")]
DoubleQuantOpt = Annotated[
    bool, typer.Option("--double-quant", help="Also quantize the 4-bit scales (~0.4 bits/parameter less).")
]
ComponentsOpt = Annotated[
    str | None,
    typer.Option(
        "--components",
        metavar="NAME,NAME",
        help="Comma-separated pipeline components to quantize. Default: transformer,text_encoder_2 when present.",
        show_default=False,
    ),
]
SkipOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--skip",
        metavar="MODULE",
        help="Module name to keep in 16-bit (repeatable), matched as diffusers/transformers do.",
    ),
]


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


DeviceOpt = Annotated[
    Device | None,
    typer.Option("--device", help="cuda (Triton kernels) or cpu (PyTorch reference). Default: cuda if present."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
AllowNonfiniteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        help="Write weights holding NaN or Inf (or, for 8-bit, values beyond float16's range) as bitsandbytes "
        "would, instead of stopping with an error that names the tensor.",
    ),
]


def check_method_flags(bits: int, nf4: bool, fp4: bool, double_quant: bool) -> None:
    """The flag conflicts a QuantSpec cannot see (both code types; a 4-bit flag with --bits 8)."""
    if nf4 and fp4:
        raise QtoolError("--nf4 and --fp4 conflict", hint="choose one 4-bit code type (default: --nf4)")
    if bits == 8 and (nf4 or fp4 or double_quant):
        flag = "--nf4" if nf4 else "--fp4" if fp4 else "--double-quant"
        raise QtoolError(f"--bits 8 and {flag} conflict", hint=f"{flag} is a 4-bit option; drop it or use --bits 4")


def split_components(components: str | None) -> list[str] | None:
    return [c.strip() for c in components.split(",") if c.strip()] if components else None


def check_output_flags(json_output: bool, quiet: bool) -> None:
    if json_output and quiet:
        raise QtoolError("--json and --quiet conflict", hint="--json prints one JSON object; --quiet only the path")
