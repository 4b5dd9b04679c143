"""A FLUX.1-dev-shaped transformer in bf16, bitsandbytes and qtool: one denoising step and a whole generation, with
and without torch.compile, each variant in a fresh process, in one run (issue 9).

    python benchmarks/bench_flux.py [--variants bf16,bnb-nf4,qtool-nf4,qtool-int8] [--steps 28] [--reps 10]
                                    [--no-compile | --compile-only] [--out benchmarks/results/flux.csv] [--dry-run]
    python benchmarks/bench_flux.py --tiny --no-compile --out /tmp/flux.csv   # a 1+1-block model at 64x64 px

The model is ``FluxTransformer2DModel`` with FLUX.1-dev's config (19 double + 38 single blocks, hidden 3072, 11.9B
parameters; ``_flux_source.DEV_CONFIGS``), built on the meta device; then each tensor is made on the device from a
seeded N(0, 0.02^2) (norm scales: ones), the seed taken from the tensor's name, so that every variant gets the same
bf16 weights, and each Linear is quantized as soon as it exists: no quantized variant ever holds the bf16 model, and
its peak memory is its own. Variants (``--variants``):

- ``bf16``: as built.
- ``bnb-nf4``: ``bitsandbytes.nn.Linear4bit`` as diffusers' ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)`` makes it (no double quant, blocksize 64,
  uint8 storage), quantized as its ``create_quantized_param`` does (``Params4bit(w, **old.__dict__).to(device)``,
  without the trip through the CPU). ``bnb-nf4-dq``: with ``bnb_4bit_use_double_quant=True`` (the baselines' figure).
- ``bnb-int8``: ``Linear8bitLt(has_fp16_weights=False, threshold=6.0)``, as ``load_in_8bit=True`` makes it.
- ``qtool-nf4`` / ``qtool-nf4-dq``: ``qtool.nn.QuantLinear4bit.from_linear`` (NF4, compute dtype bf16).
- ``qtool-int8``: ``qtool.nn.QuantLinear8bit.from_linear(threshold=6.0)`` (bnb's LLM.int8 maths).
- ``qtool-int8-t0``: the same weights, ``threshold=0`` (``llm_int8_threshold: 0``): the pure int8 product.
- ``qtool-int8-wo``: the same weights, ``threshold=None``: weight-only (W dequantized, then cuBLAS in bf16).

Which Linears are quantized: those diffusers' bnb quantizer converts. Its ``_process_model_before_weight_loading``
keeps ``llm_int8_skip_modules`` (None by default) plus the model class's ``_keep_in_fp32_modules`` (None for
``FluxTransformer2DModel``; its ``_skip_layerwise_casting_patterns``, pos_embed and norm, are about layerwise casting,
not bnb), so every ``nn.Linear`` is converted, embedders, the norms' Linears and ``proj_out`` included (504 at dev
size). ``quantize_skip`` computes that list the same way; every quantized variant uses it.

Per variant, in a child process (``python bench_flux.py --child VARIANT``):

(a) ``step``: one transformer forward at 1024x1024 (4096 image tokens, 512 text tokens, batch 1, guidance 3.5), the
    inputs shaped and typed as ``FluxPipeline`` passes them: ``--warmup`` calls, then ``--reps`` timed with CUDA
    events (median, p20, p80). ``peak_memory``: ``max_memory_allocated``, reset before the variant is built (eager)
    or before compiling (compiled), read after the timed steps. ``build``: seconds to make and quantize the weights,
    and their memory (``memory_allocated`` once built: bnb's quant states included).
(b) ``generate-<steps>``: ``FluxPipeline`` with this transformer, an ``AutoencoderKL`` with FLUX.1-dev's VAE config
    (random weights), ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's config, and no text encoders or
    tokenizers: random ``prompt_embeds`` [1, 512, 4096] and ``pooled_prompt_embeds`` [1, 768] are given. ``--steps``
    steps at 1024x1024, guidance 3.5, decoded to a PIL image; wall seconds, GPU synchronized, after a 2-step warm-up
    generation (its seconds: ``warmup``); peak memory of the timed generation (the VAE's decode included).
(c) both again after ``transformer.compile_repeated_blocks(fullgraph=True)`` (each block class compiled once, reused
    by all its blocks; ``torch.compile`` of every block where diffusers lacks it). The first call's seconds
    (``first_call``: compiling) and the warm-up generation's are recorded apart, never in the step or generation time.
    A compile that fails is recorded as an ``error`` row and retried with ``fullgraph=False`` (``fullgraph`` = 0;
    ``error_fallback`` if that fails too).

Any phase that fails is an ``error`` row (its message in ``median``); the run goes on. Rows (benchmarks/_results.py's
schema, ``provider`` = the variant, ``notes`` = eager or compiled) are appended to ``--out`` after each child, with
``time_vs_bf16`` / ``wall_vs_bf16`` against the bf16 child of the same run and ``peak_memory_vs_bnb`` of a qtool
variant against its bnb twin of the same run (variants run in the order bf16, bnb, qtool, whatever ``--variants``
says). ``--tiny`` (1 double + 1 single block, hidden 128, 64x64 px, 8 text tokens) runs on the CPU in seconds, qtool
on its PyTorch reference path and bnb on its CPU backend: a smoke test (tests/test_benchmarks.py). Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import _flux_source  # noqa: E402
import _results  # noqa: E402

# Run order: bf16 first (every ratio needs it), bnb before qtool (qtool's peak is compared with bnb's).
VARIANTS = (
    "bf16", "bnb-nf4", "bnb-nf4-dq", "bnb-int8", "qtool-nf4", "qtool-nf4-dq", "qtool-int8", "qtool-int8-t0",
    "qtool-int8-wo",
)  # fmt: skip
DEFAULT_VARIANTS = ("bf16", "bnb-nf4", "qtool-nf4", "qtool-int8")
# qtool variant -> the bnb variant whose peak memory it is held to (issue 9: NF4 "peak memory <= bnb's").
BNB_TWIN = {"qtool-nf4": "bnb-nf4", "qtool-nf4-dq": "bnb-nf4-dq", "qtool-int8": "bnb-int8"}
GUIDANCE = 3.5
WARMUP_STEPS = 2  # inference steps of the warm-up generation
RESERVE_S = 60  # of --time-budget, kept for each variant still to run
GB = 1e9

# FLUX.1-dev's VAE (vae/config.json) and scheduler (scheduler/scheduler_config.json); the tiny VAE is the example's.
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "mid_block_add_attention": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass(frozen=True)
class Size:
    name: str
    transformer: dict
    vae: dict
    pixels: int  # height = width
    text_tokens: int

    @property
    def shape(self) -> str:
        return f"{self.name} {self.pixels}x{self.pixels}"

    @property
    def image_tokens(self) -> int:
        return (self.pixels // 16) ** 2  # 8x VAE downsampling, then 2x2 latent patches


DEV = Size("flux-dev", {"patch_size": 1, **_flux_source.DEV_CONFIGS["transformer"]}, VAE, 1024, 512)
TINY = Size(
    "flux-tiny",
    {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 64,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "guidance_embeds": True,
        "axes_dims_rope": (8, 28, 28),
    },
    {**VAE, "block_out_channels": (32, 32, 32, 64), "layers_per_block": 1},
    64,
    8,
)


# --- the child: one variant, measured in its own process ----------------------------------------------------------


@dataclass
class Child:
    """Writes each figure to ``rows_file`` (JSON lines) as soon as it is measured, so that the parent keeps what a
    child measured before it was killed at its time limit."""

    args: argparse.Namespace
    variant: str
    size: Size
    rows_file: Path
    device: object = None
    cuda: bool = False

    def emit(self, op: str, metric: str, unit: str, value, notes: str = "", **extra) -> None:
        row = _results.row(op, self.variant, self.size.shape, metric, unit, value, notes=notes, **extra)
        with self.rows_file.open("a") as f:
            f.write(json.dumps({"row": row}) + "\n")
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"[{self.variant}] {op} {notes} {metric}: {shown} {unit}", flush=True)

    def error(self, op: str, notes: str, exc: BaseException, prefix: str = "", metric: str = "error") -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300] if str(exc) else type(exc).__name__
        self.emit(op, metric, "text", prefix + message, notes)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def quantize_skip() -> list[str]:
    """What diffusers' bnb quantizer keeps for FluxTransformer2DModel with a default BitsAndBytesConfig:
    ``llm_int8_skip_modules`` (None) plus the class's ``_keep_in_fp32_modules`` (see the module docstring)."""
    from diffusers import FluxTransformer2DModel

    return list(FluxTransformer2DModel._keep_in_fp32_modules or [])


def linear_maker(variant: str):
    """nn.Linear (real weights, on the device) -> the variant's layer; None for bf16."""
    import torch

    if variant == "bf16":
        return None
    if variant.startswith("qtool-"):
        from qtool.nn import QuantLinear4bit, QuantLinear8bit

        if variant == "qtool-int8":
            return lambda linear: QuantLinear8bit.from_linear(linear, threshold=6.0)
        if variant == "qtool-int8-t0":
            return lambda linear: QuantLinear8bit.from_linear(linear, threshold=0.0)
        if variant == "qtool-int8-wo":
            return lambda linear: QuantLinear8bit.from_linear(linear, threshold=None)
        dq = variant.endswith("-dq")
        return lambda linear: QuantLinear4bit.from_linear(
            linear, quant_type="nf4", double_quant=dq, compute_dtype=torch.bfloat16
        )
    import bitsandbytes as bnb

    def bnb_4bit(linear: torch.nn.Linear) -> torch.nn.Module:
        # As diffusers' _replace_with_bnb_linear, then create_quantized_param: Params4bit(..., **old.__dict__).to()
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, linear.bias is not None, torch.bfloat16,
            compress_statistics=variant.endswith("-dq"), quant_type="nf4", quant_storage=torch.uint8, device="meta",
        )  # fmt: skip
        kwargs = dict(new.weight.__dict__)
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, **kwargs).to(linear.weight.device)
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        return new

    def bnb_int8(linear: torch.nn.Linear) -> torch.nn.Module:
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, linear.bias is not None, has_fp16_weights=False, threshold=6.0,
            device="meta",
        )  # fmt: skip
        kwargs = dict(new.weight.__dict__)
        # Int8Params.to() quantizes only what comes from the CPU (diffusers goes through it: 26 s for this model in
        # the baselines); _quantize is the step .to() would take, here on the weight's own device.
        weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, **kwargs)
        new.weight = weight._quantize(linear.weight.device)
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        return new

    return bnb_4bit if variant.startswith("bnb-nf4") else bnb_int8


def materialize_(module, prefix: str, device, seed: int):
    """Give ``module``'s own meta parameters values, bf16, seeded from their names (_flux_source.random_weight)."""
    import torch

    for name, param in list(module._parameters.items()):
        if param is None or not param.is_meta:
            continue
        key = f"{prefix}.{name}" if prefix else name
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        value = _flux_source.random_weight(key, tuple(param.shape), generator, device)
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return module


@contextlib.contextmanager
def default_dtype(dtype):
    """Modules built in bf16 directly: a ``.to(bfloat16)`` afterwards makes diffusers warn about fp32 modules."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_transformer(child: Child, make, skip: list[str]):
    """The variant's transformer on the device (see the module docstring); (model, Linears quantized)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from qtool.nn import quantize_linears_

    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = FluxTransformer2DModel(**child.size.transformer)
    names = {id(m): n for n, m in model.named_modules()}
    seed, device = child.args.seed, child.device
    made = []
    if make is not None:

        def quantized(linear):
            made.append(names[id(linear)])
            return make(materialize_(linear, names[id(linear)], device, seed))

        quantize_linears_(model, quantized, skip=skip)
    for name, module in model.named_modules():
        materialize_(module, name, device, seed)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    return model.eval().requires_grad_(False), len(made)


def step_inputs(size: Size, device) -> dict:
    """One transformer call's arguments as FluxPipeline passes them (dtypes included: guidance is float32)."""
    import torch
    from diffusers import FluxPipeline

    cfg = size.transformer
    g = torch.Generator().manual_seed(1)
    side = size.pixels // 16
    bf16 = torch.bfloat16
    return {
        "hidden_states": torch.randn(1, size.image_tokens, cfg["in_channels"], generator=g).to(device, bf16),
        "encoder_hidden_states": torch.randn(1, size.text_tokens, cfg["joint_attention_dim"], generator=g).to(
            device, bf16
        ),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, bf16),
        "timestep": torch.full([1], 500.0, device=device).to(bf16) / 1000,
        "guidance": torch.full([1], GUIDANCE, device=device, dtype=torch.float32),
        "txt_ids": torch.zeros(size.text_tokens, 3, device=device, dtype=bf16),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, device, bf16),
        "joint_attention_kwargs": {},  # FluxPipeline passes {}: None would recompile the blocks
        "return_dict": False,
    }


def timed(child: Child, fn) -> float:
    """Seconds of one call, the device synchronized before and after."""
    child.sync()
    start = time.perf_counter()
    fn()
    child.sync()
    return time.perf_counter() - start


def time_reps(child: Child, fn, reps: int) -> list[float]:
    """Milliseconds per call: CUDA events around each call (one synchronize at the end), or the host clock."""
    import torch

    if not child.cuda:
        return [timed(child, fn) * 1e3 for _ in range(reps)]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def quantiles(values: list[float]) -> dict:
    import statistics

    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"median": statistics.median(ordered), "p20": at(0.2), "p80": at(0.8)}


def measure_step(child: Child, model, inputs: dict, notes: str, first_done: bool = False) -> None:
    """``--warmup`` calls (the first timed as ``first_call`` unless ``first_done``: compile_and_warm made it), then
    ``--reps`` timed ones."""
    import torch

    args = child.args
    with torch.no_grad():
        if not first_done:
            child.emit("step", "first_call", "s", timed(child, lambda: model(**inputs)), notes)
        for _ in range(args.warmup - 1):
            model(**inputs)
        q = quantiles(time_reps(child, lambda: model(**inputs), args.reps))
    child.emit("step", "time", "ms", round(q["median"], 3), notes, p20=round(q["p20"], 3), p80=round(q["p80"], 3))
    if child.cuda:
        child.emit("step", "peak_memory", "GB", round(torch.cuda.max_memory_allocated() / GB, 3), notes)


def build_pipeline(child: Child, transformer):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(child.args.seed)
    with torch.device(child.device), default_dtype(torch.bfloat16):
        vae = AutoencoderKL(**child.size.vae).eval().requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    cfg = child.size.transformer
    embeds = {
        "prompt_embeds": torch.randn(1, child.size.text_tokens, cfg["joint_attention_dim"], generator=g),
        "pooled_prompt_embeds": torch.randn(1, cfg["pooled_projection_dim"], generator=g),
    }
    return pipe, {k: v.to(child.device, torch.bfloat16) for k, v in embeds.items()}


def measure_generation(child: Child, pipe, embeds: dict, notes: str) -> None:
    import torch

    def generate(steps: int):
        return pipe(
            **embeds, height=child.size.pixels, width=child.size.pixels, num_inference_steps=steps,
            guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="pil",
        ).images  # fmt: skip

    op = f"generate-{child.args.steps}"
    child.emit(op, "warmup", "s", timed(child, lambda: generate(WARMUP_STEPS)), notes)
    if child.cuda:
        torch.cuda.reset_peak_memory_stats()
    child.emit(op, "wall", "s", timed(child, lambda: generate(child.args.steps)), notes)
    if child.cuda:
        child.emit(op, "peak_memory", "GB", round(torch.cuda.max_memory_allocated() / GB, 3), notes)


def compile_transformer(model, fullgraph: bool) -> str:
    """Regional compilation: diffusers' compile_repeated_blocks where it exists, else torch.compile per block."""
    if hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(fullgraph=fullgraph)
        return "compile_repeated_blocks"
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile(fullgraph=fullgraph)
    return "torch.compile per block"


def compile_and_warm(child: Child, model, inputs: dict) -> bool:
    """Compile (fullgraph, else fullgraph=False after recording the error) and make the first call: True if the
    compiled model runs."""
    import torch

    for fullgraph in (True, False):
        if not fullgraph and not child.args.compile_fallback:
            return False
        try:
            torch._dynamo.reset()
            how = compile_transformer(model, fullgraph)
            print(f"[{child.variant}] {how}(fullgraph={fullgraph})", flush=True)
            with torch.no_grad():
                first = timed(child, lambda: model(**inputs))
        except Exception as exc:  # noqa: BLE001 (recorded; the run goes on)
            # Two metrics, so that both messages stay figures of their own when the fallback fails too.
            child.error("step", "compiled", exc, prefix=f"fullgraph={fullgraph}: ", metric="error" if fullgraph
                        else "error_fallback")  # fmt: skip
            continue
        child.emit("step", "fullgraph", "bool", int(fullgraph), "compiled")
        child.emit("step", "first_call", "s", first, "compiled")
        return True
    return False


def run_child(args: argparse.Namespace) -> int:
    import torch

    size = TINY if args.tiny else DEV
    child = Child(args=args, variant=args.child, size=size, rows_file=args.rows_file)
    with child.rows_file.open("a") as f:
        f.write(json.dumps({"environment": _results.environment()}) + "\n")
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if want == "cpu" and not args.tiny:
        raise SystemExit("FLUX.1-dev's size needs a GPU (23.8 GB of bf16 weights); use --tiny on the CPU")
    child.device, child.cuda = torch.device(want), want == "cuda"
    if not child.cuda:
        # One thread: on a shared or small CPU, more threads than free cores turn milliseconds into hundreds.
        torch.set_num_threads(1)
    # bnb's int8 layers warn at every call that bf16 inputs are cast to fp16 (as they should be: that is its maths).
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    make, skip = linear_maker(args.child), quantize_skip()  # imports bnb or qtool before the clock starts
    if child.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, count = build_transformer(child, make, skip)
    child.sync()
    child.emit("build", "wall", "s", time.perf_counter() - start)
    child.emit("build", "linears_quantized", "count", count)
    if child.cuda:
        child.emit("build", "weights", "GB", round(torch.cuda.memory_allocated() / GB, 3))
    else:
        params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        child.emit("build", "weights", "GB", round(params / GB, 6), "parameters and buffers")
    inputs = step_inputs(size, child.device)
    phases = ([] if args.compile_only else ["eager"]) + ([] if args.no_compile else ["compiled"])
    for notes in phases:
        if notes == "compiled":
            if child.cuda:
                torch.cuda.reset_peak_memory_stats()
            if not compile_and_warm(child, model, inputs):
                continue
        try:
            measure_step(child, model, inputs, notes, first_done=notes == "compiled")
        except Exception as exc:  # noqa: BLE001 (recorded; the generation is still tried)
            child.error("step", notes, exc)
        if args.steps <= 0:
            continue
        try:
            # A pipeline (VAE) per phase, dropped after it: the next phase's step peak holds the transformer only.
            pipe, embeds = build_pipeline(child, model)
            measure_generation(child, pipe, embeds, notes)
        except Exception as exc:  # noqa: BLE001 (recorded; the run goes on)
            child.error(f"generate-{args.steps}", notes, exc)
        finally:
            pipe = embeds = None
    return 0


# --- the parent: no torch here, one child per variant ------------------------------------------------------------


def ratio_rows(rows: list[dict], done: dict[str, list[dict]]) -> list[dict]:
    """time_vs_bf16 / wall_vs_bf16 of one variant's rows against the bf16 child's, and a qtool variant's
    peak_memory_vs_bnb against its bnb twin's: the same run, the same op, shape and notes."""

    def find(variant: str, like: dict, metric: str) -> float | None:
        for r in done.get(variant, []):
            # a child stopped at its limit leaves an error row without notes
            key = (r["op"], r["shape"], r.get("notes", ""), r["metric"])
            if key == (like["op"], like["shape"], like["notes"], metric):
                return float(r["median"])
        return None

    out = []
    for r in rows:
        variant, op, metric = r["provider"], r["op"], r["metric"]
        pairs = []
        if variant != "bf16" and (op, metric) == ("step", "time"):
            pairs.append(("bf16", "time_vs_bf16"))
        if variant != "bf16" and op.startswith("generate-") and metric == "wall":
            pairs.append(("bf16", "wall_vs_bf16"))
        if variant in BNB_TWIN and (op, metric) == ("step", "peak_memory"):
            pairs.append((BNB_TWIN[variant], "peak_memory_vs_bnb"))
        for other, name in pairs:
            base = find(other, r, metric)
            if base:
                value = round(float(r["median"]) / base, 4)
                out.append(_results.row(op, variant, r["shape"], name, "x", value, notes=r["notes"]))
    return out


def child_command(args: argparse.Namespace, variant: str, rows_file: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--rows-file", str(rows_file)]
    cmd += ["--steps", str(args.steps), "--reps", str(args.reps), "--warmup", str(args.warmup)]
    cmd += ["--seed", str(args.seed), "--device", args.device]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--no-compile"] if args.no_compile else []
    cmd += ["--compile-only"] if args.compile_only else []
    cmd += [] if args.compile_fallback else ["--no-compile-fallback"]
    return cmd


def plan(args: argparse.Namespace) -> str:
    size = TINY if args.tiny else DEV
    phases = ([] if args.compile_only else ["eager"]) + ([] if args.no_compile else ["compiled"])
    generation = f"a {WARMUP_STEPS}-step warm-up, then a {args.steps}-step generation" if args.steps > 0 else ""
    lines = [
        f"{size.shape}: {size.image_tokens} image + {size.text_tokens} text tokens; variants "
        f"{', '.join(args.variants)}, in that order, each in a fresh process",
        f"per variant and phase ({', '.join(phases)}): {args.warmup} warm-up + {args.reps} timed steps; "
        + (generation or "no generation"),
        f"time budget {args.time_budget:.0f} s, {RESERVE_S} s of it kept for each variant still to run (a child "
        "stopped at its limit keeps what it measured)",
        f"rows appended to {args.out}",
    ]
    lines += ["  " + " ".join(child_command(args, v, Path("ROWS.jsonl"))) for v in args.variants]
    return "\n".join(lines)


def read_rows_file(path: Path) -> tuple[dict | None, list[dict]]:
    """A child's environment and rows; a line cut short by a kill is dropped."""
    environment, rows = None, []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        environment = item.get("environment", environment)
        rows += [item["row"]] if "row" in item else []
    return environment, rows


def run_parent(args: argparse.Namespace) -> int:
    print(plan(args), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    shape = (TINY if args.tiny else DEV).shape
    done: dict[str, list[dict]] = {}
    failures = []
    environment: dict = {}
    deadline = time.monotonic() + args.time_budget
    with tempfile.TemporaryDirectory(prefix="bench-flux-") as tmp:
        for index, variant in enumerate(args.variants):
            # Each later variant keeps RESERVE_S of the budget, enough for its eager figures.
            later = len(args.variants) - index - 1
            limit = deadline - time.monotonic() - RESERVE_S * later
            if limit < 10:
                failures.append(f"{variant}: not run, the time budget was spent")
                continue
            rows_file = Path(tmp) / f"{variant}.jsonl"
            print(f"== {variant} (at most {limit:.0f} s)", flush=True)
            start = time.perf_counter()
            try:
                proc = subprocess.run(child_command(args, variant, rows_file), cwd=ROOT, env=env, timeout=limit)
                outcome = "" if proc.returncode == 0 else f"child exited {proc.returncode}"
            except subprocess.TimeoutExpired:
                outcome = f"child stopped after {limit:.0f} s (--time-budget)"
            found, rows = read_rows_file(rows_file)
            if outcome:
                failures.append(f"{variant}: {outcome}")
                rows.append(_results.row("run", variant, shape, "error", "text", outcome))
            rows += ratio_rows(rows, done)
            done[variant] = rows
            if found:
                environment = found
                _results.environment = lambda found=found: found  # the child's GPU and versions: no torch here
                _results.append(args.out, rows)
            print(f"== {variant}: {time.perf_counter() - start:.0f} s, {len(rows)} rows", flush=True)
    shown = [{**environment, "date": "this run", **r} for rows in done.values() for r in rows]
    if shown:
        import make_table

        print(make_table.render_flux(shown, source=str(args.out)), flush=True)
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=28, help="inference steps of the generation (0: none)")
    parser.add_argument("--reps", type=int, default=10, help="timed transformer steps")
    parser.add_argument("--warmup", type=int, default=3, help="transformer steps before the timed ones")
    compile_mode = parser.add_mutually_exclusive_group()
    compile_mode.add_argument("--no-compile", action="store_true", help="eager only")
    compile_mode.add_argument("--compile-only", action="store_true", help="compiled only")
    parser.add_argument(
        "--compile-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="retry a failed fullgraph compile with fullgraph=False",
    )
    parser.add_argument("--tiny", action="store_true", help="a 1+1-block FLUX at 64x64 px (CPU or GPU, seconds)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights and inputs")
    parser.add_argument("--time-budget", type=float, default=530, help="seconds for all children together")
    parser.add_argument("--out", type=Path, default=_results.RESULTS / "flux.csv", help="CSV the rows go to")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown or not chosen:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    args.variants = [v for v in VARIANTS if v in chosen]
    if args.reps < 1 or args.warmup < 1:
        parser.error("--reps and --warmup must be at least 1")
    if args.child and args.rows_file is None:
        parser.error("--child needs --rows-file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_child(args) if args.child else run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
