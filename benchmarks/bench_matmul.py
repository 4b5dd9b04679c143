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
# LLM.int8 (threshold 6): the same shapes; "+outliers" puts 8 columns of x at 10x scale, so they hold outliers (as
# trained LLMs' activations do) and the 16-bit part runs.
INT8_CASES = [(1, 4096, 14336), (16, 4096, 14336), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 3072)]


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


def sweep(out: Path | None, kinds: set[str]) -> None:
    """Time the kernels' tile configurations (the defaults' source): kernels.matmul_4bit's gemv at one row and its
    mma at 1, 4 and 16 rows and, as mma-large, 4608 (beside dequantize + cuBLAS), kernels.matmul_8bit (threshold 6)
    at 16 and 4608 rows.
    ``kinds``: which of gemv, mma, mma-large, int8. The fastest per case are printed; all go to ``out``."""
    import csv
    import itertools

    from qtool.formats import bnb4
    from qtool.kernels import matmul_4bit, matmul_8bit
    from qtool.linear import linear_4bit_ref
    from qtool.quantize import quantize_tensor

    product = itertools.product
    gemv = [("gemv", dict(kernel="gemv", tile=t)) for t in product((4, 8), (256, 512), (1, 2))]
    mma = [("mma", dict(kernel="mma", tile=t)) for t in product((64, 128), (256,), (4,), (1, 2, 4, 8))]
    mma += [("mma", dict(kernel="mma", tile=t)) for t in [(32, 256, 4, 8), (64, 128, 4, 8), (128, 256, 8, 4)]]
    # (BLOCK_N, BLOCK_K, warps, split, BLOCK_M, num_stages): the mma kernel as a fused GEMM for FLUX's token counts
    mma_large = [("mma-large", dict(kernel="mma", tile=t)) for t in [
        (128, 64, 8, 1, 128, 1), (128, 64, 8, 1, 128, 3), (128, 128, 8, 1, 128, 1), (128, 128, 8, 1, 128, 3),
        (256, 64, 8, 1, 128, 3), (128, 64, 8, 1, 256, 3), (128, 64, 4, 1, 64, 3)]]  # fmt: skip
    dequant = [("dequant+cublas", {})]
    int8_small = [("int8", dict(tile=t)) for t in product((16,), (64, 128), (128, 256), (4,), (4,))]
    int8_large = [("int8", dict(tile=t)) for t in [
        (128, 128, 256, 8, 3), (128, 128, 128, 8, 4), (128, 128, 256, 8, 4), (128, 128, 128, 8, 5),
        (256, 128, 128, 8, 3), (64, 128, 256, 4, 4)]]  # fmt: skip
    plan = [
        ((1, 4096, 14336), gemv + mma),
        ((4, 4096, 14336), mma + dequant),
        ((16, 4096, 14336), mma + dequant + int8_small),
        ((4608, 3072, 12288), int8_large + mma_large + dequant),
        ((4608, 12288, 3072), int8_large[:4]),
    ]
    records = []
    for (m, k, n), configs in plan:
        configs = [c for c in configs if c[0] in kinds or (c[0] == "dequant+cublas" and kinds & {"mma", "mma-large"})]
        if not configs:
            continue
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        packed, state = bnb4.decode(quantize_tensor(w))
        w8, scb8 = bnb8_weight(w) if "int8" in kinds else (None, None)
        results = []
        for kind, opts in configs:
            if kind == "int8":
                fn = partial(matmul_8bit.linear_8bit, x, w8, scb8, threshold=6.0, **opts)
            else:
                four = matmul_4bit.linear_4bit if kind != "dequant+cublas" else linear_4bit_ref
                fn = partial(four, x, packed, state.absmax, state.quant_map, blocksize=64, shape=(n, k), **opts)
            try:
                t = bench(fn)[0]
            except Exception as e:  # noqa: BLE001 (a configuration that does not compile, fit or apply)
                print(f"  M={m} {k}->{n} {kind} {opts}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            results.append((t, kind, opts))
            records.append({"shape": f"M={m} {k}->{n}", "kind": kind, "opts": repr(opts), "us": round(t, 2)})
        for t, kind, opts in sorted(results, key=lambda r: r[0])[:8]:
            print(f"M={m} {k}->{n}: {t:9.2f} us  {kind} {opts}", flush=True)
        for kind in ("gemv", "mma", "mma-large", "dequant+cublas", "int8"):
            best = min((r for r in results if r[1] == kind), key=lambda r: r[0], default=None)
            if best:
                print(f"M={m} {k}->{n}: best {kind}: {best[0]:.2f} us {best[2]}", flush=True)
        t_bf16 = bench(partial(F.linear, x, w))[0]
        print(f"M={m} {k}->{n}: bf16 {t_bf16:.2f} us", flush=True)
        records.append({"shape": f"M={m} {k}->{n}", "kind": "bf16", "opts": "", "us": round(t_bf16, 2)})
    if out:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["shape", "kind", "opts", "us"])
            writer.writeheader()
            writer.writerows(records)
        print(f"wrote {len(records)} sweep rows to {out}")


def bnb8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W as qtool writes it in 8-bit: int8 rows and their absmax (SCB)."""
    from qtool.formats import bnb8
    from qtool.quantize import quantize_tensor

    return bnb8.decode(quantize_tensor(w, bits=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=_results.RESULTS / "matmul.csv")
    parser.add_argument("--cases", default="decode,flux", help="4-bit case groups (decode, flux), or none")
    parser.add_argument("--int8", action="store_true", help="also the LLM.int8 cases")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the kernels' tile configurations and stop")
    parser.add_argument("--sweep-out", type=Path, default=None, help="CSV for every configuration --sweep times")
    parser.add_argument("--sweep-kinds", default="gemv,mma,int8", help="the kernels --sweep times (or mma-large)")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args.sweep_out, set(args.sweep_kinds.split(",")))
    cases = [c for name in args.cases.split(",") if name != "none" for c in CASES[name]]
    if args.dry_run:
        for m, k, n in cases:
            print(f"M={m} {k}->{n}: qtool nf4 / nf4-dq, bnb nf4 / nf4-dq, bf16")
        return
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qtool.formats import bnb4
    from qtool.linear import linear_4bit
    from qtool.quantize import dequantize_tensor, quantize_tensor

    torch.manual_seed(0)
    rows = []
    gpu_name = torch.cuda.get_device_name()
    for m, k, n in cases:
        shape = f"M={m} {k}->{n}"
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        for dq in (False, True):
            method = "nf4-dq" if dq else "nf4"
            entries = quantize_tensor(w, double_quant=dq)
            packed, state = bnb4.decode(entries)
            nested = {}
            if dq:
                nested = {"nested_absmax": state.nested_absmax, "nested_quant_map": state.nested_quant_map,
                          "nested_offset": torch.tensor(state.nested_offset, device="cuda")}  # fmt: skip
            ours = partial(linear_4bit, x, packed, state.absmax, state.quant_map, blocksize=64, shape=(n, k), **nested)
            w_bnb, s_bnb = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=dq)
            theirs = partial(bnb.matmul_4bit, x, w_bnb.t(), quant_state=s_bnb)
            # The bar: qtool's error against the exact product of the same quantized weight within 2x bf16's own.
            wq = dequantize_tensor(entries, dtype=torch.float32)
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
    if args.int8:
        rows += bench_int8()
    _results.append(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out} ({gpu_name})")


def bench_int8() -> list[dict]:
    """qtool's LLM.int8 op (threshold 6 and 0) beside bnb's Linear8bitLt (threshold 6) and bf16, same weight."""
    import bitsandbytes as bnb

    from qtool.linear import linear_8bit, linear_8bit_ref

    rows = []
    for (m, k, n), outliers in [(c, False) for c in INT8_CASES] + [(INT8_CASES[2], True)]:
        shape = f"M={m} {k}->{n}" + (" +outliers" if outliers else "")
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        if outliers:
            x[:, torch.arange(8, device="cuda") * (k // 8)] *= 10
        w8, scb = bnb8_weight(w)
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        layer = layer.cuda().eval()  # bnb quantizes the weight itself, as a bnb user's model does
        differ = int((layer.weight.data != w8).sum())
        print(f"{shape}: bnb's CUDA int8 weight differs from qtool's in {differ} of {w8.numel()} codes", flush=True)
        # The bar, on at most 256 rows: qtool's error against LLM.int8's exact value (float64) within 2x that of the
        # reference (PyTorch ops, bnb's math); bnb's own error is recorded beside it.
        sub = x[:256]
        exact = _int8_exact(sub, w8, scb, 6.0)
        errs = {}
        for name, y in (("qtool", linear_8bit(sub, w8, scb, threshold=6.0)),
                        ("ref", linear_8bit_ref(sub, w8, scb, threshold=6.0)), ("bnb", layer(sub))):  # fmt: skip
            errs[name] = (y.double() - exact).norm().item()
        if errs["qtool"] > 2 * errs["ref"] + 1e-12:
            raise SystemExit(f"{shape} int8: qtool's error {errs['qtool']:.4g} > 2x the reference's {errs['ref']:.4g}")
        with torch.no_grad():
            for provider, method, fn in (
                ("qtool", "int8-t6", partial(linear_8bit, x, w8, scb, threshold=6.0)),
                ("qtool", "int8-t0", partial(linear_8bit, x, w8, scb, threshold=0.0)),
                ("bnb", "int8-t6", partial(layer, x)),
                ("torch", "bf16", partial(F.linear, x, w)),
            ):
                gpu, host = bench(fn)
                notes = f"error vs exact LLM.int8 {errs[provider] / errs['ref']:.2f}x the reference's" if (
                    provider != "torch" and method == "int8-t6") else ""  # fmt: skip
                rows.append(_results.row(f"linear-{method}", provider, shape, "time", "us", round(gpu, 2), notes=notes))
                print(f"{shape:34s} {method:8s} {provider:6s} {gpu:9.2f} us (host {host:7.1f} us) {notes}", flush=True)
    return rows


def _int8_exact(x, w8, scb, threshold):
    from qtool.linear import LLM_INT8_SCALE, int8_activations_ref
    from qtool.reference.quant8 import INV_127

    ca, sca, cols = int8_activations_ref(x, threshold)
    w, s = w8.double(), scb.double()
    y = (ca.masked_fill(cols, 0).double() @ w.t()) * (sca.double()[:, None] * s[None, :]) * LLM_INT8_SCALE
    return y + x.double()[:, cols] @ (w[:, cols] * s[:, None] * INV_127).t()


if __name__ == "__main__":
    main()
