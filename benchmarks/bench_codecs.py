"""Quantize / dequantize throughput of qtool's Triton kernels beside bitsandbytes and plain torch, one run.

    python benchmarks/bench_codecs.py [--out benchmarks/results/codecs.csv] [--dry-run]

Effective bandwidth = (bytes read + bytes written) / median time of ``triton.testing.do_bench`` (which clears L2
between repetitions). Shapes are the FLUX.1-dev transformer's Linear weights and one LLM MLP, bf16. Each row of the
CSV names the GPU, the library versions and the git commit. A device-to-device copy of the same input is timed in
the same run as the ceiling.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
from pathlib import Path

SHAPES = {
    "flux_attn": (3072, 3072),
    "flux_qkv": (9216, 3072),
    "flux_mlp_up": (12288, 3072),
    "flux_mlp_down": (3072, 12288),
    "flux_single_out": (3072, 15360),
    "llm_mlp": (14336, 4096),
}
COLUMNS = [
    "op", "provider", "shape_name", "N", "K", "dtype", "quant_type", "double_quant", "ms_p50", "ms_p20", "ms_p80",
    "bytes_moved", "gbps", "gpu_name", "torch", "triton", "bnb", "qtool_git_sha", "timestamp",
]  # fmt: skip


def git_sha() -> str:
    # The device machine gets the working tree without .git: the caller passes QTOOL_GIT_SHA there.
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    return sha or os.environ.get("QTOOL_GIT_SHA", "unknown")


def cases():
    """(op, quant_type, double_quant) triples benchmarked for every shape."""
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            yield "quantize_4bit", quant_type, double_quant
    yield "dequantize_4bit", "nf4", False
    yield "dequantize_4bit", "nf4", True
    yield "quantize_8bit", "", False
    yield "dequantize_8bit", "", False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("QTOOL_BENCH_OUT", "benchmarks/results/codecs.csv"))
    parser.add_argument("--dry-run", action="store_true", help="List the shapes and cases, run nothing.")
    args = parser.parse_args()
    if args.dry_run:
        for name, (n, k) in SHAPES.items():
            print(name, n, k, [c for c in cases()])
        return

    import torch
    import triton
    import triton.testing

    import qtool

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        bnb = F = None
    versions = {
        "gpu_name": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bnb": bnb.__version__ if bnb else "",
        "qtool_git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []

    def bench(op, provider, name, n, k, quant_type, double_quant, fn, nbytes):
        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        rows.append(
            {"op": op, "provider": provider, "shape_name": name, "N": n, "K": k, "dtype": "bf16",
             "quant_type": quant_type, "double_quant": double_quant, "ms_p50": f"{p50:.5f}", "ms_p20": f"{p20:.5f}",
             "ms_p80": f"{p80:.5f}", "bytes_moved": nbytes, "gbps": f"{nbytes / p50 / 1e6:.1f}", **versions}
        )  # fmt: skip
        print(f"{op:16s} {provider:13s} {name:16s} {quant_type:4s} dq={int(double_quant)} {p50 * 1e3:8.1f} us "
              f"{nbytes / p50 / 1e6:8.1f} GB/s", flush=True)  # fmt: skip

    def run_shape(name: str, n: int, k: int) -> None:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        numel = w.numel()
        out = torch.empty_like(w)
        bench("copy", "torch", name, n, k, "", False, lambda: out.copy_(w), 2 * numel * 2)
        for op, quant_type, double_quant in cases():
            if op == "quantize_4bit":
                nblocks = numel // 64
                # read bf16; write packed codes + absmax (fp32, or uint8 + nested with double quant)
                nbytes = 2 * numel + numel // 2 + (nblocks if double_quant else 4 * nblocks)

                def ours(qt=quant_type, dq=double_quant):
                    return qtool.quantize_tensor(w, quant_type=qt, double_quant=dq)

                bench(op, "qtool-triton", name, n, k, quant_type, double_quant, ours, nbytes)
                if F:
                    bench(op, "bnb", name, n, k, quant_type, double_quant,
                          lambda qt=quant_type, dq=double_quant: F.quantize_4bit(w, blocksize=64, quant_type=qt,
                                                                                 compress_statistics=dq),
                          nbytes)  # fmt: skip
            elif op == "dequantize_4bit":
                entries = qtool.quantize_tensor(w, quant_type=quant_type, double_quant=double_quant)
                nblocks = numel // 64
                nbytes = numel // 2 + (nblocks if double_quant else 4 * nblocks) + 2 * numel
                bench(op, "qtool-triton", name, n, k, quant_type, double_quant,
                      lambda e=entries: qtool.dequantize_tensor(e), nbytes)  # fmt: skip
                if F:
                    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                    compress_statistics=double_quant)  # fmt: skip
                    bench(op, "bnb", name, n, k, quant_type, double_quant,
                          lambda p=packed, s=state: F.dequantize_4bit(p, s), nbytes)  # fmt: skip
            elif op == "quantize_8bit":
                nbytes = 2 * numel + numel + 4 * n
                bench(op, "qtool-triton", name, n, k, "", False, lambda: qtool.quantize_tensor(w, bits=8), nbytes)
                if F:
                    bench(op, "bnb", name, n, k, "", False, lambda: F.int8_vectorwise_quant(w.half()), nbytes)
            else:
                entries = qtool.quantize_tensor(w, bits=8)
                nbytes = numel + 4 * n + 2 * numel
                bench(op, "qtool-triton", name, n, k, "", False,
                      lambda e=entries: qtool.dequantize_tensor(e, dtype=torch.bfloat16), nbytes)  # fmt: skip
                if F:
                    bench(op, "bnb", name, n, k, "", False,
                          lambda e=entries: F.int8_vectorwise_dequant(e["weight"], e["SCB"]).to(torch.bfloat16),
                          nbytes)  # fmt: skip

    for name, (n, k) in SHAPES.items():
        run_shape(name, n, k)
        torch.cuda.empty_cache()

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
