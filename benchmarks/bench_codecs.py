"""Quantize / dequantize throughput of qtool's Triton kernels beside bitsandbytes and plain torch, in one run.

    python benchmarks/bench_codecs.py [--out benchmarks/results/codecs.csv] [--sweep] [--dry-run]

Each op is timed at the level bitsandbytes offers it (``bitsandbytes.functional``): tensors in, tensors out on the
GPU, no file format. Effective bandwidth = (bytes read + bytes written) / median time of
``triton.testing.do_bench``, which clears L2 before every repetition; the bytes are the op's essential traffic
(each input read once, each output written once). Shapes: the FLUX.1-dev transformer's Linear weights and one LLM
MLP, bf16. A device-to-device copy of the same input is timed in the same run as the ceiling. Before timing, each
qtool output is compared with the PyTorch reference on the same GPU (bit for bit); a mismatch stops the run.

``--sweep`` times every tile / warp configuration in ``SWEEP`` instead and writes benchmarks/results/tuning/sweep.csv:
that is where the kernels' GPU defaults come from.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results  # noqa: E402

SHAPES = {
    "flux_attn": (3072, 3072),
    "flux_qkv": (9216, 3072),
    "flux_mlp_up": (12288, 3072),
    "flux_mlp_down": (3072, 12288),
    "flux_single_out": (3072, 15360),
    "llm_mlp": (14336, 4096),
}
# (op, quant_type, double_quant) for every shape.
CASES = [
    *(("quantize_4bit", qt, dq) for qt in ("nf4", "fp4") for dq in (False, True)),
    ("dequantize_4bit", "nf4", False),
    ("dequantize_4bit", "nf4", True),
    ("quantize_8bit", "", False),
    ("dequantize_8bit", "", False),
]


# Configurations tried by --sweep: keyword arguments of the kernel launchers (tile = elements per program).
def _grid(**axes) -> list[dict]:
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


SWEEP = {
    "quantize_4bit": _grid(tile=(1024, 2048, 4096), num_warps=(2, 4, 8), search=("tree", "buckets")),
    "dequantize_4bit": _grid(tile=(2048, 4096, 8192), num_warps=(2, 4, 8)),
    "quantize_8bit": _grid(tile=(4096, 8192, 16384), num_warps=(4, 8, 16)),
    "dequantize_8bit": _grid(tile=(4096, 8192, 16384), num_warps=(2, 4, 8)),
}


def traffic(op: str, n: int, k: int, double_quant: bool) -> int:
    """Essential bytes of an op on a bf16 [n, k] weight with blocksize 64."""
    numel, nblocks = n * k, n * k // 64
    scales = nblocks + 4 * -(-nblocks // 256) if double_quant else 4 * nblocks
    return {
        "quantize_4bit": 2 * numel + numel // 2 + scales,
        "dequantize_4bit": numel // 2 + scales + 2 * numel,
        "quantize_8bit": 2 * numel + numel + 4 * n,
        "dequantize_8bit": numel + 4 * n + 2 * numel,
        "copy": 4 * numel,
    }[op]


def describe(quant_type: str, double_quant: bool) -> str:
    return " ".join(x for x in (quant_type, "double_quant" if double_quant else "") if x)


class Ops:
    """The timed callables of each provider for one weight."""

    def __init__(self, w):
        import torch

        from qtool.kernels import double_quant, quant_4bit, quant_8bit
        from qtool.reference.codebooks import dynamic_map, quant_map

        self.torch, self.w = torch, w
        self.q4, self.dq, self.q8 = quant_4bit, double_quant, quant_8bit
        self.quant_map, self.dynamic_map = quant_map, dynamic_map
        try:
            import bitsandbytes.functional as bnb_f
        except ImportError:
            bnb_f = None
        self.bnb = bnb_f

    def qtool(self, op: str, quant_type: str, double_quant: bool, **config):
        """A zero-argument callable running qtool's op (inputs prepared here, outside the timing)."""
        w, q4, dq, q8 = self.w, self.q4, self.dq, self.q8
        if op == "quantize_4bit":

            def run():
                packed, absmax = q4.quantize_4bit(w, quant_type=quant_type, **config)
                return (packed, *dq.quantize_absmax(absmax)) if double_quant else (packed, absmax)

            return run
        if op == "dequantize_4bit":
            packed, absmax = q4.quantize_4bit(w, quant_type=quant_type)
            qmap = self.quant_map(quant_type, w.device)
            if not double_quant:
                return lambda: q4.dequantize_4bit(
                    packed, absmax, qmap, blocksize=64, shape=w.shape, dtype=w.dtype, **config
                )
            codes, nested_absmax, offset = dq.quantize_absmax(absmax)
            nested = {"nested_absmax": nested_absmax, "nested_quant_map": self.dynamic_map(w.device)}
            return lambda: q4.dequantize_4bit(
                packed,
                codes,
                qmap,
                blocksize=64,
                shape=w.shape,
                dtype=w.dtype,
                nested_offset=offset,
                **nested,
                **config,
            )
        if op == "quantize_8bit":
            return lambda: q8.quantize_8bit_rowwise(w, **config)
        q, scb = q8.quantize_8bit_rowwise(w)
        return lambda: q8.dequantize_8bit_rowwise(q, scb, dtype=w.dtype, **config)

    def bnb_op(self, op: str, quant_type: str, double_quant: bool):
        F, w = self.bnb, self.w  # noqa: N806
        if F is None:
            return None
        if op == "quantize_4bit":
            return lambda: F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
        if op == "dequantize_4bit":
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
            return lambda: F.dequantize_4bit(packed, state)
        if op == "quantize_8bit":
            # bnb's Int8Params quantizes the float16 cast; qtool's kernel casts inside.
            return lambda: F.int8_vectorwise_quant(w.half())
        q, scb = F.int8_vectorwise_quant(w.half())[:2]
        return lambda: F.int8_vectorwise_dequant(q, scb).to(self.torch.bfloat16)

    def check(self, op: str, quant_type: str, double_quant: bool) -> None:
        """qtool's outputs equal the PyTorch reference's on this GPU, bit for bit (raises otherwise)."""
        import qtool

        torch, w = self.torch, self.w
        kwargs = {"bits": 8} if op.endswith("8bit") else {"quant_type": quant_type, "double_quant": double_quant}
        if op.startswith("quantize"):
            got = qtool.quantize_tensor(w, backend="triton", **kwargs)
            want = qtool.quantize_tensor(w, backend="torch", **kwargs)
        else:
            entries = qtool.quantize_tensor(w, backend="torch", **kwargs)
            got = {"w": qtool.dequantize_tensor(entries, dtype=w.dtype, backend="triton")}
            want = {"w": qtool.dequantize_tensor(entries, dtype=w.dtype, backend="torch")}
        for key in want:
            a, b = got[key], want[key]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                raise SystemExit(f"{op} {describe(quant_type, double_quant)} {tuple(w.shape)}: {key} differs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="CSV to append to (default benchmarks/results/codecs.csv or sweep.csv)"
    )
    parser.add_argument("--sweep", action="store_true", help="time every tile/warp configuration (kernel tuning)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    parser.add_argument("--ops", default=",".join(SWEEP), help="comma-separated subset of: " + ", ".join(SWEEP))
    parser.add_argument("--dry-run", action="store_true", help="list the shapes and cases, run nothing")
    args = parser.parse_args()
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    cases = [case for case in CASES if case[0] in args.ops.split(",")]
    out = args.out or (_results.RESULTS / "tuning" / "sweep.csv" if args.sweep else _results.RESULTS / "codecs.csv")
    if args.dry_run:
        for name, (n, k) in shapes.items():
            for op, qt, dq in cases:
                configs = len(SWEEP[op]) if args.sweep else 1
                print(f"{name} {n}x{k} {op} {describe(qt, dq)}: {configs} config(s), {traffic(op, n, k, dq)} bytes")
        print(f"-> {out}")
        return

    import torch
    import triton.testing

    rows: list[dict] = []

    def host_us(fn, calls: int = 200) -> float:
        # CPU time to enqueue one call (no synchronization inside): when it exceeds the GPU time, do_bench measures
        # the launch path rather than the kernels.
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return round(elapsed / calls * 1e6, 1)

    def bench(op, provider, shape, notes, fn, nbytes):
        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        rows.append(_results.row(op, provider, shape, "host_time", "us", host_us(fn), notes=notes))
        us = [round(v * 1e3, 2) for v in (p50, p20, p80)]
        rows.append(_results.row(op, provider, shape, "time", "us", us[0], p20=us[1], p80=us[2], notes=notes))
        rows.append(_results.row(op, provider, shape, "bandwidth", "TB/s", round(nbytes / p50 / 1e9, 3), notes=notes))
        print(
            f"{op:16s} {provider:6s} {shape:11s} {notes:17s} {us[0]:9.1f} us {nbytes / p50 / 1e9:6.2f} TB/s", flush=True
        )
        return p50

    def run_shape(n: int, k: int) -> None:
        shape = f"{n}x{k}"
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ops = Ops(w)
        if not args.sweep:
            out_copy = torch.empty_like(w)
            bench("copy", "torch", shape, "", lambda: out_copy.copy_(w), traffic("copy", n, k, False))
        for op, quant_type, double_quant in cases:
            notes, nbytes = describe(quant_type, double_quant), traffic(op, n, k, double_quant)
            if args.sweep:
                if op == "quantize_4bit" and double_quant:
                    continue  # the same 4-bit kernel; double quant adds launches that no tile changes
                for config in SWEEP[op]:
                    label = " ".join(f"{key}={value}" for key, value in config.items())
                    bench(op, "qtool", shape, f"{notes} {label}".strip(),
                          ops.qtool(op, quant_type, double_quant, **config), nbytes)  # fmt: skip
                continue
            ops.check(op, quant_type, double_quant)
            ours = bench(op, "qtool", shape, notes, ops.qtool(op, quant_type, double_quant), nbytes)
            theirs_fn = ops.bnb_op(op, quant_type, double_quant)
            if theirs_fn is not None:
                theirs = bench(op, "bnb", shape, notes, theirs_fn, nbytes)
                rows.append(
                    _results.row(op, "qtool", shape, "speedup_vs_bnb", "x", round(theirs / ours, 2), notes=notes)
                )

    for n, k in shapes.values():
        run_shape(n, k)
        torch.cuda.empty_cache()
    _results.append(out, rows)
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
