"""`qtool footprint`: parse the options, call qtool.footprint.footprint, print the table or JSON."""

from __future__ import annotations

from typing import Annotated

import typer

from qtool.cli._options import (
    BitsOpt,
    ComponentsOpt,
    DoubleQuantOpt,
    Fp4Opt,
    JsonOpt,
    MaxSizeOpt,
    MaxVramOpt,
    Nf4Opt,
    RevisionOpt,
    SkipOpt,
    SourceArg,
    TokenOpt,
    check_method_flags,
    make_budget,
    split_components,
)

FOOTPRINT_EXAMPLES = [
    "qtool footprint black-forest-labs/FLUX.1-dev --gpu-memory 16GB",
    "qtool footprint meta-llama/Llama-3.1-8B --bits 8 --gpu-memory 12GB --json",
    "qtool footprint ./FLUX.1-dev-nf4-dq",
    "qtool footprint black-forest-labs/FLUX.1-dev --max-size 9GB --double-quant",
]


def footprint(
    source: SourceArg,
    bits: BitsOpt = None,
    nf4: Nf4Opt = False,
    fp4: Fp4Opt = False,
    double_quant: DoubleQuantOpt = False,
    components: ComponentsOpt = None,
    skip: SkipOpt = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            "--gpu-memory",
            metavar="SIZE",
            help="GPU memory to check against, e.g. 24GB or 16GiB: says what fits, with the headroom left.",
            show_default=False,
        ),
    ] = None,
    max_size: MaxSizeOpt = None,
    max_vram: MaxVramOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Memory and disk size before and after 8-bit / 4-bit quantization, from safetensors headers only.

    Nothing is downloaded but the JSON files and the safetensors headers. Sizes after quantization are predicted
    from the plan `qtool quantize` would follow (the same layers kept in 16-bit): "memory" is what
    get_memory_footprint() reports once loaded with bitsandbytes in the stored dtypes, "disk" the tensor bytes
    written. --bits/--fp4/--double-quant choose the method that --gpu-memory is checked for. For a checkpoint that
    is already quantized, its actual sizes and settings.

    With --max-size or --max-vram, what `qtool quantize` would choose for that budget, per component: 4-bit or 8-bit,
    the layers kept 16-bit, the bytes. Chosen from nominal errors (headers say nothing of the weights): it settles
    widths and sizes, while `qtool quantize` measures every layer's error and picks the layers from those.
    """
    check_method_flags(bits, nf4, fp4, double_quant)
    budget = make_budget(max_size, max_vram, bits)

    from qtool import footprint as api
    from qtool import ui
    from qtool.spec import QuantSpec

    spec = QuantSpec(
        bits=bits or 4, quant_type="fp4" if fp4 else "nf4", double_quant=double_quant, skip=tuple(skip or ())
    )
    result = api.footprint(
        source,
        spec=spec,
        components=split_components(components),
        revision=revision,
        token=token,
        gpu_memory=api.parse_size(gpu_memory) if gpu_memory is not None else None,
        budget=budget,
    )
    if json_output:
        ui.print_json(result.to_dict())
    else:
        ui.print_footprint(result)
