"""A synthetic FLUX.1-dev pipeline for benchmarks: the real shapes, key names, configs and sharding, random weights.

``--size tiny`` is examples/make_tiny_flux.py's folder as it is; ``--size dev`` re-makes every model component of that
folder at FLUX.1-dev's real size (transformer 11.9B parameters, 23.8 GB bf16; T5-XXL encoder 4.8B; CLIP-L; the
16-channel VAE) from random bf16 weights generated on the GPU. Key names and shapes come from the real classes built
on the meta device; the key set is the one ``save_pretrained`` writes (taken from the tiny folder), sharded like the
Hub repo (10 GB / 5 GB shards). Marker files written last say what is complete, so later runs reuse it; only the
components a run needs are made full size.

Reading what was generated (``component_files``, ``header_stats``) needs no torch.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = ".e2e-source.json"  # in the pipeline folder: its size and generator version
FULL_SIZE = ".e2e-full-size"  # in a component folder: made at FLUX.1-dev's size
# Bump when the generated weights or layout change, so that old folders are re-made rather than reused.
GENERATOR_VERSION = 1

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
# What --size dev generates (tensor bytes, bf16), for plans printed before anything exists; measured from the headers.
DEV_BYTES = {
    "transformer": 23_802_816_640,
    "text_encoder_2": 9_524_621_312,
    "text_encoder": 246_120_960,
    "vae": 167_639_366,
}


def is_complete(src: Path, size: str) -> bool:
    try:
        marker = json.loads((src / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"size": size, "generator": GENERATOR_VERSION}


def is_full_size(src: Path, name: str) -> bool:
    return (src / name / FULL_SIZE).exists()


def ensure_source(src: Path, size: str, components: list[str]) -> bool:
    """Make ``src`` a complete pipeline for ``size`` whose ``components`` are at full size at dev (the others stay
    tiny until a later run asks for them); True if anything was generated. Everything is made from a pristine tiny
    pipeline kept beside ``src``, so that a run killed half way is repaired, not trusted; the dev weights are made
    in child processes, so that this one never holds GPU memory."""
    template = src.parent / "tiny-template"
    generated = ensure_template(template)
    if not is_complete(src, size):
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(template, src)
        (src / MARKER).write_text(json.dumps({"size": size, "generator": GENERATOR_VERSION}) + "\n")
        generated = True
    if size != "dev":
        return generated
    for seed, name in enumerate(DEV_CONFIGS):
        if name not in components or is_full_size(src, name):
            continue
        shutil.rmtree(src / name)
        shutil.copytree(template / name, src / name)
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import _flux_source as s; "
        code += f"s.regenerate(s.Path({str(src / name)!r}), s.DEV_CONFIGS[{name!r}], {seed})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=src.parent)
        (src / name / FULL_SIZE).touch()
        generated = True
    return generated


def ensure_template(template: Path) -> bool:
    """examples/make_tiny_flux.py's pipeline in ``template`` (kept once complete): the configs, key names and files
    every generated pipeline starts from. True if it was made now."""
    if is_complete(template, "tiny"):
        return False
    shutil.rmtree(template, ignore_errors=True)
    script = ROOT / "examples" / "make_tiny_flux.py"
    subprocess.run([sys.executable, str(script), str(template), "--overwrite"], check=True)
    (template / MARKER).write_text(json.dumps({"size": "tiny", "generator": GENERATOR_VERSION}) + "\n")
    return True


def dev_shapes(component: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the model that ``component``'s config.json describes, built on the meta device
    (no memory, no weights)."""
    from qtool.plan import build_meta_model, detect_library, read_json

    config = read_json(component / "config.json")
    library, class_name = detect_library(config, component)
    return {k: tuple(v.shape) for k, v in build_meta_model(library, class_name, component).state_dict().items()}


def random_weight(key: str, shape: tuple[int, ...], generator, device):
    """One generated bf16 tensor: a norm's 1-D scale is ones, anything else N(0, 0.02^2), drawn in float32."""
    import torch

    if "norm" in key and len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return tensor.mul_(0.02).to(torch.bfloat16)


def regenerate(component: Path, overrides: dict, seed: int) -> None:
    """Re-make one component at full size: config overrides, then random bf16 weights for the same key set."""
    import torch

    from qtool.io import ShardedWriter, scan_component
    from qtool.plan import read_json

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = read_json(component / "config.json") | overrides
    (component / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tiny = scan_component(component)
    shapes = dev_shapes(component)
    # The full model has more blocks than the tiny one: keep every key whose name, block numbers aside, is one the
    # tiny save_pretrained wrote (this drops what save_pretrained drops, e.g. T5's tied encoder.embed_tokens).
    saved = {re.sub(r"\.\d+\.", ".N.", key) for key in tiny.tensors}
    keys = [key for key in shapes if re.sub(r"\.\d+\.", ".N.", key) in saved]
    for path in component.iterdir():
        if path.name.endswith((".safetensors", ".safetensors.index.json")):
            path.unlink()
    generator = torch.Generator(device).manual_seed(seed)
    with ShardedWriter(component, tiny.base_name, DEV_SHARD_BYTES.get(component.name, 10**12)) as writer:
        for key in keys:
            tensor = random_weight(key, shapes[key], generator, device)
            writer.add_group({key: tensor})
            del tensor


def dev_layers(template: Path, name: str) -> dict[str, tuple[int, int]]:
    """The Linear weights ``qtool quantize`` quantizes in FLUX.1-dev's component ``name`` (key -> [out, in], in model
    order), as qtool.plan decides it from the template's config with DEV_CONFIGS over it: nothing is generated."""
    from qtool.io import ComponentWeights, TensorInfo
    from qtool.plan import plan_component, read_json
    from qtool.spec import QuantSpec

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        config = read_json(template / name / "config.json") | DEV_CONFIGS[name]
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shapes = dev_shapes(folder)
        # The headers a generated checkpoint would have (bf16, one file), for the planner.
        tensors = {k: TensorInfo(k, "BF16", s, "model.safetensors", 2 * math.prod(s)) for k, s in shapes.items()}
        plan = plan_component(name, folder, ComponentWeights(folder, "model", tensors, sharded=False), QuantSpec())
    return {layer.key: layer.shape for layer in plan.layers.values()}


def component_files(src: Path, components: list[str]) -> list[Path]:
    """Every file of these component folders (weights, index, config; not our markers), in name order."""
    files = (
        p for name in components for p in (src / name).rglob("*") if p.is_file() and p.name not in (MARKER, FULL_SIZE)
    )
    return sorted(files)


def header_stats(files: list[Path]) -> dict:
    """From the safetensors headers alone: total bytes and elements of the tensors, and the largest tensor's bytes."""
    total = numel = largest = 0
    for path in files:
        if path.suffix != ".safetensors":
            continue
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        for info in header.values():
            start, end = info["data_offsets"]
            total += end - start
            numel += math.prod(info["shape"])
            largest = max(largest, end - start)
    return {"bytes": total, "parameters": numel, "largest_tensor_bytes": largest}
