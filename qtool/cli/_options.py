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
# None stands for 4, except with a budget, where it lets the budget choose 4 or 8 per component.
BitsOpt = Annotated[
    int | None,
    typer.Option(
        "--bits",
        help="4 (NF4/FP4, QLoRA-style) or 8 (LLM.int8). Default: 4; with --max-size/--max-vram, the budget picks 4 or "
        "8 per component unless --bits names the one width it may use (beside 16-bit layers).",
        show_default=False,
    ),
]
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


MaxSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--max-size",
        metavar="SIZE",
        help="Size budget for the output's tensors on disk, every component counted (e.g. 7GB, 6.5GiB, 500MB): per "
        "quantized component 4-bit or 8-bit (one component cannot mix the two and load), and per layer 16-bit (added "
        "to llm_int8_skip_modules), for the least sum of parameters x relative error that fits. --nf4/--fp4/"
        "--double-quant/--blocksize set the 4-bit method, --scale-search applies to both widths, --bits allows "
        "one width only.",
        show_default=False,
    ),
]
MaxVramOpt = Annotated[
    str | None,
    typer.Option(
        "--max-vram",
        metavar="SIZE",
        help="As --max-size, for the GPU memory the loaded weights take: get_memory_footprint() plus the quant "
        "states bitsandbytes keeps beside it (footprint's --gpu-memory figure; activations not counted).",
        show_default=False,
    ),
]


def make_budget(max_size: str | None, max_vram: str | None, bits: int | None):
    """The qtool.budget.Budget that --max-size or --max-vram ask for (None without either): --bits, if given, is the
    one width allowed."""
    if max_size is not None and max_vram is not None:
        raise QtoolError("--max-size and --max-vram conflict", hint="give one budget: disk (--max-size) or GPU memory")
    if max_size is None and max_vram is None:
        return None
    from qtool.budget import Budget
    from qtool.footprint import parse_size

    measure, text = ("disk", max_size) if max_size is not None else ("gpu", max_vram)
    return Budget(parse_size(text), measure, (bits,) if bits in (4, 8) else (4, 8))


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
