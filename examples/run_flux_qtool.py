"""Generate an image with a bitsandbytes-quantized FLUX pipeline run by qtool's own layers (no bitsandbytes needed).

    python examples/run_flux_qtool.py [PIPELINE] [--device cuda] [--steps 2] [--compile] [--output flux-qtool.png]

PIPELINE is a local folder or a Hub repo id (default: tiny-flux-nf4-dq, the README's example output). Every
quantized Linear of the transformer and of the T5 encoder runs through qtool's Triton kernels on a GPU (on the CPU
the PyTorch reference: dequantize, then F.linear; slow but fine for the tiny example). ``--offload`` uses diffusers'
``enable_model_cpu_offload`` instead of moving the whole pipeline to the device. For FLUX.1-dev itself use
``--size 1024 --steps 28``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image

import qtool


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?", default="tiny-flux-nf4-dq", help="folder or Hub repo id")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default: {default_device}")
    parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload() instead of --device")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default: 2)")
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels (default: 64)")
    parser.add_argument("--prompt", default="a cat holding a sign")
    parser.add_argument("--compile", action="store_true", help="torch.compile(transformer, fullgraph=True)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--output", default="flux-qtool.png", help="PNG path (default: flux-qtool.png)")
    args = parser.parse_args()

    start = time.perf_counter()
    pipe = qtool.load(args.pipeline, device=None if args.offload else args.device)
    if args.offload:
        pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        # One graph for the whole transformer: qtool's layers are custom ops, which break nothing.
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=args.compile_backend)
    loaded = time.perf_counter()

    image = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        max_sequence_length=32 if args.size <= 128 else 512,
        guidance_scale=3.5,
        generator=torch.manual_seed(0),
        output_type="np",
    ).images[0]
    done = time.perf_counter()
    if not np.isfinite(image).all():
        print("error: the image has NaN or infinite values", file=sys.stderr)
        return 1
    png = Image.fromarray((image * 255).round().astype(np.uint8))
    png.save(args.output)

    for name in ("transformer", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            kinds = Counter(type(m).__name__ for m in module.modules() if "Linear" in type(m).__name__)
            print(f"{name}: " + ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common()))
    print(
        f"wrote {args.output} ({png.width}x{png.height}, mean {image.mean():.4f}); load {loaded - start:.1f} s, "
        f"{args.steps} steps {done - loaded:.1f} s on {'offload' if args.offload else args.device}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
