"""Smoke-test a FLUX.1-dev-layout diffusers folder: load it with FluxPipeline and generate one tiny image.

    python examples/run_tiny_flux.py PIPELINE_DIR [--steps 2] [--device cuda|cpu]

Works on the random folder from make_tiny_flux.py and on a bitsandbytes-quantized copy of it: components whose
config.json carries a quantization_config load quantized without any extra argument here. Note that diffusers
(0.42) loads a bitsandbytes-quantized diffusers model (the transformer, the VAE) only when a CUDA, XPU or MPS device
exists, even for CPU use; transformers' text encoders load quantized on CPU too.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import numpy as np
import torch
from diffusers import FluxPipeline


def linear_kinds(pipe: FluxPipeline) -> str:
    """Count each component's Linear layers by class, e.g. "text_encoder_2: Linear4bit x12, Linear x2".

    bitsandbytes' layers subclass nn.Linear, so this shows at a glance whether a folder loaded quantized.
    """
    parts = []
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            kinds = Counter(type(m).__name__ for m in component.modules() if isinstance(m, torch.nn.Linear))
            parts.append(f"{name}: " + ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common()))
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline_dir", help="folder with model_index.json, e.g. from make_tiny_flux.py")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default: 2)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"torch device to run on (default: {default_device})")
    args = parser.parse_args()

    start = time.perf_counter()
    # bf16 is FLUX.1-dev's dtype; for quantized components it only sets the dtype of the unquantized parts.
    # torch_dtype, not dtype: diffusers 0.42 calls it deprecated, but older releases know no other name.
    pipe = FluxPipeline.from_pretrained(args.pipeline_dir, torch_dtype=torch.bfloat16)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    # FLUX.1-dev's usual settings at a size the tiny model handles: 64x64 pixels is a 4x4 grid of packed latent
    # patches (VAE factor 8, then 2x2 packing), and 32 T5 tokens hold the prompt.
    image = pipe(
        "a cat holding a sign",
        num_inference_steps=args.steps,
        height=64,
        width=64,
        max_sequence_length=32,
        guidance_scale=3.5,
        generator=torch.manual_seed(0),
        output_type="np",
    ).images
    done = time.perf_counter()

    print(f"Linear layers: {linear_kinds(pipe)}")
    print(
        f"image shape {image.shape}, mean {image.mean():.4f}; "
        f"load {loaded - start:.1f} s, {args.steps} steps {done - loaded:.1f} s on {args.device}"
    )
    if not np.isfinite(image).all():
        print("error: the image has NaN or infinite values", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
