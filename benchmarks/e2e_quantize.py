"""`qtool quantize` on a FLUX.1-dev-sized pipeline beside diffusers + bitsandbytes, in the same run.

    python benchmarks/bench_quantize_flux.py --workdir /tmp/fluxbench [--size dev|tiny] [--out CSV]

1. Builds a synthetic pipeline: examples/make_tiny_flux.py's folder (tokenizers, scheduler, model_index.json),
   with, at ``--size dev``, every model component re-made at FLUX.1-dev's real shapes (transformer 11.9B
   parameters, T5-XXL encoder 4.8B, CLIP-L, the 16-channel VAE) from random bf16 weights generated on the GPU.
   Key names and shapes come from the real classes built on the meta device; the key set is the one
   ``save_pretrained`` writes (taken from the tiny folder), sharded like the Hub repo (10 GB / 5 GB shards).
2. Quantizes ``transformer`` and ``text_encoder_2`` to NF4 + double quant, each tool in a fresh process (page cache
   dropped first where the kernel allows it):
   - ``qtool``: ``qtool.api.quantize_checkpoint`` (what ``qtool quantize`` calls), Triton on the GPU;
   - ``bnb``: diffusers' / transformers' ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
     then ``save_pretrained``, per component, the other components hard-linked (as qtool does).
   Each reports wall time, peak host memory (ru_maxrss: resident pages, file-backed ones included) and peak GPU
   memory allocated by PyTorch.
3. Checks the two outputs against each other (same key sets, dtypes and shapes; counts differing bytes of every
   tensor) and loads qtool's with ``FluxPipeline.from_pretrained(out)`` (no quantization arguments) for two steps.
4. Appends one CSV row per tool with the GPU, library versions and git commit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_codecs import git_sha  # noqa: E402

COMPONENTS = ("transformer", "text_encoder_2")
# The GPU is the point; without one (--size tiny, to try the script on a laptop) everything runs on the CPU, bnb's
# diffusers loader behind the tests' patch that lets it load on a CPU.
CUDA = os.environ.get("CUDA_VISIBLE_DEVICES") != "" and shutil.which("nvidia-smi") is not None
DEVICE = "cuda" if CUDA else "cpu"

# FLUX.1-dev's component configs (black-forest-labs/FLUX.1-dev, diffusers layout), applied over the tiny ones.
DEV_CONFIGS = {
    "transformer": {
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "in_channels": 64,
        "out_channels": None,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True,
    },
    "text_encoder_2": {  # google/t5-v1_1-xxl's encoder
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "vocab_size": 32128,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
    },
    "text_encoder": {  # openai/clip-vit-large-patch14's text tower
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "latent_channels": 16,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
    },
}
# save_pretrained's shard caps that give FLUX.1-dev's shard counts (transformer 3, T5 2).
DEV_SHARD_BYTES = {"transformer": 10 * 10**9, "text_encoder_2": 5 * 10**9}

COLUMNS = [
    "tool", "size", "components", "method", "seconds", "peak_host_gb", "peak_gpu_gb", "source_gb", "output_gb",
    "keys_equal", "differing_bytes", "compared_bytes", "loads_and_runs", "page_cache_dropped", "gpu_name", "torch",
    "triton", "bnb", "diffusers", "transformers", "qtool_git_sha", "timestamp",
]  # fmt: skip


def folder_bytes(folder: Path) -> int:
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def drop_page_cache() -> bool:
    """Make both tools read the source from disk, not from what the previous step left in RAM (needs root)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# --- 1. the synthetic source ----------------------------------------------------------------------------------


def regenerate(component: Path, overrides: dict, shard_bytes: int | None, seed: int) -> None:
    """Re-make one component at full size: config overrides, then random bf16 weights for the same key set."""
    import torch

    from qtool.io import ShardedWriter, scan_component
    from qtool.plan import build_meta_model, detect_library, read_json

    config = read_json(component / "config.json") | overrides
    (component / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tiny = scan_component(component)
    library, class_name = detect_library(config, component)
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(library, class_name, component).state_dict().items()}
    # The full model has more blocks than the tiny one: keep every key whose name, block numbers aside, is one the
    # tiny save_pretrained wrote (this drops what save_pretrained drops, e.g. T5's tied encoder.embed_tokens).
    saved = {re.sub(r"\.\d+\.", ".N.", key) for key in tiny.tensors}
    keys = [key for key in shapes if re.sub(r"\.\d+\.", ".N.", key) in saved]
    for path in component.iterdir():
        if path.name.endswith((".safetensors", ".safetensors.index.json")):
            path.unlink()
    generator = torch.Generator(DEVICE).manual_seed(seed)
    with ShardedWriter(component, tiny.base_name, shard_bytes or 10**12) as writer:
        for key in keys:
            shape = shapes[key]
            if "norm" in key and len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16, device=DEVICE)
            else:
                tensor = torch.randn(shape, generator=generator, device=DEVICE, dtype=torch.float32)
                tensor = tensor.mul_(0.02).to(torch.bfloat16)
            writer.add_group({key: tensor})
            del tensor


def make_source(src: Path, size: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_flux.py"), str(src), "--overwrite"], check=True)
    if size == "dev":
        for seed, (name, overrides) in enumerate(DEV_CONFIGS.items()):
            regenerate(src / name, overrides, DEV_SHARD_BYTES.get(name), seed)


# --- 2. the tools, each in its own process -----------------------------------------------------------------------


def run_qtool(src: Path, out: Path) -> dict:
    from qtool.api import quantize_checkpoint
    from qtool.spec import QuantSpec

    result = quantize_checkpoint(src, spec=QuantSpec(double_quant=True), output=out, device=DEVICE, overwrite=True)
    return {"components": {c.name: c.seconds for c in result.components}}


def run_bnb(src: Path, out: Path) -> dict:
    import diffusers
    import torch
    import transformers

    from qtool.api import _copy_entry

    kwargs = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    seconds = {}
    start = time.perf_counter()
    if CUDA:
        on_device, device_map = contextlib.nullcontext(), None
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from bnb_loading import diffusers_on_cpu

        on_device, device_map = diffusers_on_cpu(), "cpu"
    with on_device:
        model = diffusers.FluxTransformer2DModel.from_pretrained(
            src / "transformer",
            quantization_config=diffusers.BitsAndBytesConfig(**kwargs),
            torch_dtype=torch.bfloat16,
            device_map=device_map,
        )
    model.save_pretrained(out / "transformer")
    del model
    seconds["transformer"] = time.perf_counter() - start
    start = time.perf_counter()
    model = transformers.T5EncoderModel.from_pretrained(
        src / "text_encoder_2", quantization_config=transformers.BitsAndBytesConfig(**kwargs), dtype=torch.bfloat16
    )
    model.save_pretrained(out / "text_encoder_2")
    del model
    seconds["text_encoder_2"] = time.perf_counter() - start
    for entry in src.iterdir():
        if entry.name not in COMPONENTS:
            _copy_entry(entry, out / entry.name)
    return {"components": seconds}


def child(tool: str, src: Path, out: Path) -> None:
    """Run one tool in this (fresh) process and print one JSON line with its time and peak memory."""
    import torch

    start = time.perf_counter()
    report = {"qtool": run_qtool, "bnb": run_bnb}[tool](src, out)
    report["seconds"] = time.perf_counter() - start
    report["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if CUDA else 0
    print("RESULT " + json.dumps(report), flush=True)


def measure(tool: str, src: Path, out: Path) -> dict:
    dropped = drop_page_cache()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", tool, "--workdir", str(src.parent)],
        capture_output=True,
        text=True,
        cwd=src.parent,  # not the repo root, whose kernels/ folder would shadow the PyPI `kernels` bnb probes for
    )
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed with exit code {proc.returncode}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    report["page_cache_dropped"] = dropped
    return report


# --- 3. checks -------------------------------------------------------------------------------------------------


def compare(ours: Path, theirs: Path) -> tuple[bool, int, int]:
    """Key sets, dtypes and shapes of the quantized components, and how many tensor bytes differ."""
    import torch

    from qtool.io import TensorReader, scan_component

    keys_equal, differing, compared = True, 0, 0
    for name in COMPONENTS:
        a, b = scan_component(ours / name), scan_component(theirs / name)
        if {k: (i.dtype, i.shape) for k, i in a.tensors.items()} != {
            k: (i.dtype, i.shape) for k, i in b.tensors.items()
        }:
            keys_equal = False
            print(f"{name}: key sets, dtypes or shapes differ", file=sys.stderr)
            continue
        with TensorReader(a) as ra, TensorReader(b) as rb:
            for key in a.tensors:
                x, y = ra.read(key).to(DEVICE), rb.read(key).to(DEVICE)
                raw_x, raw_y = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
                differing += int((raw_x != raw_y).sum())
                compared += raw_x.numel()
    return keys_equal, differing, compared


def loads_and_runs(folder: Path) -> bool:
    code = f"""
import torch
from diffusers import FluxPipeline
import bitsandbytes as bnb
pipe = FluxPipeline.from_pretrained({str(folder)!r}, torch_dtype=torch.bfloat16).to("cuda")
assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)
image = pipe("a cat holding a sign", num_inference_steps=2, height=256, width=256, max_sequence_length=32,
             generator=torch.manual_seed(0), output_type="np").images
print("finite", bool(__import__("numpy").isfinite(image).all()), image.shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder.parent)
    print(proc.stdout.strip(), proc.stderr[-2000:] if proc.returncode else "", file=sys.stderr)
    return proc.returncode == 0


def versions() -> dict:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return ""

    return {
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": version("triton"),
        "bnb": version("bitsandbytes"),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="scratch folder (about 55 GB at --size dev)")
    parser.add_argument("--size", choices=("dev", "tiny"), default="dev")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_flux.csv")
    parser.add_argument("--child", choices=("qtool", "bnb"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    src = args.workdir / "src"
    if args.child:
        child(args.child, src, args.workdir / f"out-{args.child}")
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    make_source(src, args.size)
    print(f"source: {folder_bytes(src) / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    reports = {tool: measure(tool, src, args.workdir / f"out-{tool}") for tool in ("bnb", "qtool")}
    keys_equal, differing, compared = compare(args.workdir / "out-qtool", args.workdir / "out-bnb")
    runs = loads_and_runs(args.workdir / "out-qtool") if CUDA else "not run (no GPU)"

    common = versions() | {
        "size": args.size,
        "components": "+".join(COMPONENTS),
        "method": "nf4-dq",
        "source_gb": round(folder_bytes(src) / 1e9, 3),
        "keys_equal": keys_equal,
        "differing_bytes": differing,
        "compared_bytes": compared,
        "qtool_git_sha": git_sha(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for tool, report in reports.items():
        rows.append(
            common
            | {
                "tool": "qtool" if tool == "qtool" else "diffusers+transformers+bnb",
                "seconds": round(report["seconds"], 2),
                "peak_host_gb": round(report["peak_host_bytes"] / 1e9, 3),
                "peak_gpu_gb": round(report["peak_gpu_bytes"] / 1e9, 3),
                "output_gb": round(folder_bytes(args.workdir / f"out-{tool}") / 1e9, 3),
                "loads_and_runs": runs if tool == "qtool" else "",
                "page_cache_dropped": report["page_cache_dropped"],
            }
        )
        print(f"{tool}: {json.dumps(report)}", file=sys.stderr)
    new = not args.out.exists()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(",".join(str(row[c]) for c in COLUMNS))


if __name__ == "__main__":
    main()
