"""`qtool quantize`: parse the options, call qtool.api.quantize_checkpoint, print the summary."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from qtool.cli._options import (
    AllowNonfiniteOpt,
    BitsOpt,
    ComponentsOpt,
    DeviceOpt,
    DoubleQuantOpt,
    Fp4Opt,
    JsonOpt,
    MaxSizeOpt,
    MaxVramOpt,
    Nf4Opt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    SkipOpt,
    SourceArg,
    TokenOpt,
    check_method_flags,
    check_output_flags,
    make_budget,
    split_components,
)
from qtool.cli.push import PrivateOpt
from qtool.errors import QtoolError

QUANTIZE_EXAMPLES = [
    "qtool quantize black-forest-labs/FLUX.1-dev --bits 4 --nf4 --double-quant",
    "qtool quantize ./my-flux-pipeline --bits 8 --output ./my-flux-int8",
    "qtool quantize meta-llama/Llama-3.1-8B --fp4 --dry-run",
    "qtool quantize ./tiny-flux --components transformer --skip proj_out --json",
    "qtool quantize ./tiny-flux --nf4 --double-quant --scale-search",
    "qtool quantize ./tiny-flux --bits 8 --report int8-quality.json",
    "qtool quantize black-forest-labs/FLUX.1-dev --max-size 9GB --double-quant",
    "qtool quantize ./tiny-flux --max-vram 4MB --dry-run",
]


class ComputeDtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


def quantize(
    source: SourceArg,
    bits: BitsOpt = None,
    nf4: Nf4Opt = False,
    fp4: Fp4Opt = False,
    double_quant: DoubleQuantOpt = False,
    blocksize: Annotated[
        int, typer.Option("--blocksize", help="4-bit weights per scale, a power of two from 32 to 4096.")
    ] = 64,
    compute_dtype: Annotated[
        ComputeDtype, typer.Option("--compute-dtype", help="dtype the 4-bit layers compute in when loaded.")
    ] = ComputeDtype.bf16,
    components: ComponentsOpt = None,
    skip: SkipOpt = None,
    max_size: MaxSizeOpt = None,
    max_vram: MaxVramOpt = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="LLM.int8 outlier threshold recorded for 8-bit inference.")
    ] = 6.0,
    scale_search: Annotated[
        bool,
        typer.Option(
            "--scale-search",
            help="Store per 4-bit block (8-bit row) the scale, at most its absmax, with the least squared error "
            "instead of the absmax: same format and size, loads the same everywhere, lower error (NF4 ~+0.5 dB SQNR). "
            "Slower to quantize on a CPU.",
        ),
    ] = False,
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
    report: Annotated[
        str | None,
        typer.Option(
            "--report",
            metavar="FILE",
            help="Also write a JSON quality report to FILE: the settings, and for every quantized layer (and each "
            "component as a whole) its SQNR in dB, relative Frobenius error ||W - Q|| / ||W||, largest absolute "
            "error and share of weights stored as an extreme code (the one their block's absmax or row's SCB "
            "restores to: NF4/FP4 +-1, int8 +-127). Measured during the run, without reading the weights again. "
            "FILE is replaced once the output is in place; it goes inside the output only if FILE points there.",
            show_default=False,
        ),
    ] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    device: DeviceOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan and sizes; download weights and write nothing. With a budget, what it would choose "
            "from nominal errors (an estimate: a run measures every layer's error first).",
        ),
    ] = False,
    push_to: Annotated[
        str | None,
        typer.Option(
            "--push-to",
            metavar="REPO_ID",
            help="Then publish the output to this Hub repo in one commit, with a model card (as qtool push).",
            show_default=False,
        ),
    ] = None,
    private: PrivateOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
) -> None:
    """Quantize a diffusers pipeline or a model to bitsandbytes 4-bit / 8-bit, loadable with no extra arguments.

    With --max-size or --max-vram, the output fits the budget with the least error: the weights are read twice, first
    to measure every quantizable layer's error at 4 and 8 bits, then to quantize.
    """
    check_method_flags(bits, nf4, fp4, double_quant)
    check_output_flags(json_output, quiet)
    budget = make_budget(max_size, max_vram, bits)
    if push_to and dry_run:
        raise QtoolError("--push-to and --dry-run conflict", hint="a dry run writes nothing to push")
    if private and not push_to:
        raise QtoolError("--private applies to --push-to", hint="add --push-to REPO_ID, or drop --private")
    if push_to:
        from qtool.hub import check_repo_id

        check_repo_id(push_to)  # before the work, not after

    from qtool import api, ui
    from qtool.spec import QuantSpec

    spec = QuantSpec(
        bits=bits or 4,
        quant_type="fp4" if fp4 else "nf4",
        double_quant=double_quant,
        blocksize=blocksize,
        compute_dtype=compute_dtype.value,
        skip=tuple(skip or ()),
        threshold=threshold,
        scale_search=scale_search,
    )
    result = api.quantize_checkpoint(
        source,
        spec=spec,
        components=split_components(components),
        output=output,
        revision=revision,
        token=token,
        device=device.value if device else None,
        dry_run=dry_run,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        report=report,
        budget=budget,
        progress=ui.RichProgress(enabled=not (quiet or json_output)),
    )
    pushed = None
    if push_to:
        from qtool.push import push_folder

        pushed = push_folder(result.output, push_to, private=private, token=token)
    if json_output:
        ui.print_json(result.to_dict() | ({"push": pushed.to_dict()} if pushed else {}))
    elif quiet:
        typer.echo(str(result.output))
    else:
        ui.print_quantize_result(result)
        if pushed:
            ui.print_push_result(pushed)
