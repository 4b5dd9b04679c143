"""Quantize one FLUX-sized weight with qtool's Python API, the way bitsandbytes would store it, and back.

    python examples/python_api.py [--double-quant] [--bits 8]

Runs on the CPU (PyTorch reference) or on a GPU (Triton kernels), with no network.
"""

from __future__ import annotations

import argparse
import time

import torch

import qtool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--shape", type=int, nargs=2, default=(3072, 3072), metavar=("N", "K"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A FLUX attention projection is [3072, 3072] in bf16; its weights are roughly N(0, 0.02).
    weight = (torch.randn(*args.shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    weight = weight.to(device)
    start = time.perf_counter()
    if args.bits == 4:
        entries = qtool.quantize_tensor(weight, quant_type=args.quant_type, double_quant=args.double_quant)
    else:
        entries = qtool.quantize_tensor(weight, bits=8)
    elapsed = time.perf_counter() - start
    restored = qtool.dequantize_tensor(entries, dtype=torch.float32)

    size = sum(t.numel() * t.element_size() for t in entries.values())
    error = (restored - weight.float()).pow(2).sum() / weight.float().pow(2).sum()
    print(f"{tuple(weight.shape)} bf16 on {device}: {weight.numel() * 2 / 1e6:.1f} MB -> {size / 1e6:.2f} MB "
          f"in {elapsed * 1e3:.0f} ms, SQNR {-10 * torch.log10(error).item():.2f} dB")  # fmt: skip
    for key, tensor in entries.items():
        print(f"  {key:45s} {str(tensor.dtype):14s} {tuple(tensor.shape)}")


if __name__ == "__main__":
    main()
