"""Quantized Linear forward on the GPU: qtool's W4A16 path beside bitsandbytes' and plain bf16, in one run (issue 9).

    python benchmarks/bench_matmul.py [--out benchmarks/results/matmul.csv] [--cases decode,flux] [--dry-run]

Per case (M tokens x K -> N, NF4 with and without double quant): qtool ``qtool.linear.linear_4bit`` (the custom op a
qtool-loaded model calls), bnb ``bitsandbytes.matmul_4bit`` with the same weight quantized by bnb, and bf16
``F.linear``. Each output is first compared with an float32 reference (dequantized weight, float64 matmul): qtool's
error must stay within 2x bf16 ``F.linear``'s own error against the same reference (the issue's bar), or the run
stops. Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), which leave out the host's
launch overhead (Python, Triton's launcher) that a compiled or graph-captured model does not pay either; the host
time per call is recorded too (``host_time``). Rows go to the CSV through benchmarks/_results.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results  # noqa: E402

# name: (M, K, N). decode: Llama-3-8B's MLP up projection, one and 16 tokens; flux: FLUX.1-dev's largest Linears at
# a 1024x1024 image's 4096 + 512 tokens.
CASES = {
    "decode": [(1, 4096, 14336), (16, 4096, 14336), (1, 3072, 3072), (1, 3072, 12288)],
    "flux": [(4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 3072)],
}


def bench(fn) -> tuple[float, float]:
    """(GPU time in us from CUDA-graph replays, host time per call in us)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        fn()
    host = (time.perf_counter() - t) / 20 * 1e6
    torch.cuda.synchronize()
    try:
        gpu = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
    except Exception:  # a provider that cannot be captured: plain events (launch overhead included)
        gpu = triton.testing.do_bench(fn, rep=100) * 1e3
    return gpu, host


def sweep() -> None:
    """Time kernels.matmul_4bit.linear_4bit over tile configurations on the decode cases (the defaults' source)."""
    import itertools

    from qtool.formats import bnb4
    from qtool.kernels import matmul_4bit
    from qtool.quantize import quantize_tensor

    for m, k, n in [(1, 4096, 14336), (4, 4096, 14336), (1, 3072, 3072)]:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        packed, state = bnb4.decode(quantize_tensor(w))
        results = []
        configs = [("dot", bn, bk, w, st) for bn, bk, w, st in itertools.product((32, 64), (256,), (4, 8), (3,))]
        if m <= matmul_4bit.ROWS_MAX_M:
            configs += [
                ("rows", bn, bk, w, 1) for bn, bk, w in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8))
            ]
        for variant, bn, bk, warps, stages in configs:
            fn = partial(matmul_4bit.linear_4bit, x, packed, state.absmax, state.quant_map, blocksize=64, shape=(n, k),
                         block_n=bn, block_k=bk, num_warps=warps, stages=stages, variant=variant)  # fmt: skip
            try:
                results.append((bench(fn)[0], variant, bn, bk, warps, stages))
            except Exception as e:  # noqa: BLE001 (a configuration that does not compile or fit)
                print(f"  {variant} bn {bn} bk {bk} warps {warps} stages {stages}: {type(e).__name__}")
        for r in sorted(results)[:6]:
            print(f"M={m} {k}->{n}: {r[0]:.2f} us  {r[1]} block_n {r[2]} block_k {r[3]} warps {r[4]} stages {r[5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=_results.RESULTS / "matmul.csv")
    parser.add_argument("--cases", default="decode,flux")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the GEMV kernel's tile configurations and stop")
    args = parser.parse_args()
    if args.sweep:
        return sweep()
    cases = [c for name in args.cases.split(",") for c in CASES[name]]
    if args.dry_run:
        for m, k, n in cases:
            print(f"M={m} {k}->{n}: qtool nf4 / nf4-dq, bnb nf4 / nf4-dq, bf16")
        return
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qtool.formats import bnb4
    from qtool.linear import linear_4bit
    from qtool.quantize import quantize_tensor

    torch.manual_seed(0)
    rows = []
    gpu_name = torch.cuda.get_device_name()
    for m, k, n in cases:
        shape = f"M={m} {k}->{n}"
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        exact = {}
        for dq in (False, True):
            method = "nf4-dq" if dq else "nf4"
            packed, state = bnb4.decode(quantize_tensor(w, double_quant=dq))
            nested = {}
            if dq:
                nested = {"nested_absmax": state.nested_absmax, "nested_quant_map": state.nested_quant_map,
                          "nested_offset": torch.tensor(state.nested_offset, device="cuda")}  # fmt: skip
            ours = partial(linear_4bit, x, packed, state.absmax, state.quant_map, blocksize=64, shape=(n, k), **nested)
            w_bnb, s_bnb = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=dq)
            theirs = partial(bnb.matmul_4bit, x, w_bnb.t(), quant_state=s_bnb)
            # The bar: qtool's error against the exact product of the same quantized weight within 2x bf16's own.
            from qtool.quantize import dequantize_tensor

            wq = dequantize_tensor(quantize_tensor(w, double_quant=dq), dtype=torch.float32)
            exact = x.double() @ wq.double().t()
            err_ours = (ours().double() - exact).norm().item()
            err_bf16 = (F.linear(x, wq.to(torch.bfloat16)).double() - exact).norm().item()
            if err_ours > 2 * err_bf16 + 1e-12:
                raise SystemExit(f"{shape} {method}: qtool's error {err_ours:.4g} > 2x bf16's {err_bf16:.4g}")
            for provider, fn in (("qtool", ours), ("bnb", theirs)):
                gpu, host = bench(fn)
                notes = (
                    f"{method}; error vs exact {err_ours / max(err_bf16, 1e-30):.2f}x bf16's"
                    if provider == "qtool"
                    else method
                )
                rows.append(_results.row(f"linear-{method}", provider, shape, "time", "us", round(gpu, 2), notes=notes))
                rows.append(_results.row(f"linear-{method}", provider, shape, "host_time", "us", round(host, 1)))
                print(f"{shape:24s} {method:7s} {provider:6s} {gpu:9.2f} us (host {host:7.1f} us)", flush=True)
        gpu, host = bench(partial(F.linear, x, w))
        rows.append(_results.row("linear-bf16", "torch", shape, "time", "us", round(gpu, 2)))
        wbytes = n * k / 2
        print(f"{shape:24s} bf16    torch  {gpu:9.2f} us (host {host:7.1f} us); NF4 weight {wbytes / 1e6:.1f} MB "
              f"= {wbytes / 3.35e12 * 1e6:.1f} us at 3.35 TB/s", flush=True)  # fmt: skip
    _results.append(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out} ({gpu_name})")


if __name__ == "__main__":
    main()
