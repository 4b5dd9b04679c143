"""GPU: the Triton kernels on FLUX-sized weights against the reference (exact) and against bitsandbytes' CUDA
kernels (counted; each difference must be of a documented kind, see tests/compat.py).

Set QTOOL_GPU_REPORT=DIR to write the counts to DIR/gpu_counts.jsonl.
"""

import json
import os

import pytest
import torch

import qtool
from compat import check_4bit_codes, check_int8_codes, check_nested_codes
from helpers import assert_equal

pytestmark = pytest.mark.gpu

# FLUX.1-dev transformer: attention 3072x3072, fused MLP up 12288x3072, single-block out 3072x15360.
FLUX_SHAPES = [(3072, 3072), (12288, 3072), (3072, 15360)]
# Every shape benchmarks/bench_codecs.py times: the kernels' speed is only claimed where they are proven exact.
BENCH_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (3072, 15360), (14336, 4096)]


def report(**row):
    print(json.dumps(row))
    folder = os.environ.get("QTOOL_GPU_REPORT")
    if folder:
        with open(os.path.join(folder, "gpu_counts.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def flux_weight(shape, dtype):
    # Real weights are roughly N(0, 0.02); a zeroed block exercises the all-zero rule.
    w = torch.randn(shape, device="cuda") * 0.02
    w.view(-1)[:64] = 0
    return w.to(dtype)


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_4bit_flux_shapes(shape, quant_type, double_quant):
    w = flux_weight(shape, torch.bfloat16)
    tri = qtool.quantize_tensor(w, quant_type=quant_type, double_quant=double_quant, backend="triton")
    ref = qtool.quantize_tensor(w, quant_type=quant_type, double_quant=double_quant, backend="torch")
    assert list(tri) == list(ref)
    for key in ref:
        assert_equal(tri[key], ref[key], key)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert_equal(
            qtool.dequantize_tensor(tri, dtype=dtype, backend="triton"),
            qtool.dequantize_tensor(ref, dtype=dtype, backend="torch"),
            f"dequantized {dtype}",
        )


@pytest.mark.bnb
@pytest.mark.parametrize("shape", FLUX_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_against_bnb_cuda(shape, dtype, quant_type):
    import bitsandbytes.functional as F

    w = flux_weight(shape, dtype)
    ours = qtool.quantize_tensor(w, quant_type=quant_type, backend="triton")
    packed_bnb, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert_equal(ours["weight.absmax"], state.absmax, "absmax")
    ndiff = check_4bit_codes(w, ours["weight"], packed_bnb, quant_type, 64)
    zero_block_bytes = int((ours["weight.absmax"] == 0).sum()) * 32
    report(test="4bit_vs_bnb_cuda", shape=shape, dtype=str(dtype), quant_type=quant_type, codes=w.numel(),
           differing=ndiff, zero_block_bytes=zero_block_bytes)  # fmt: skip
    # bnb's dequantization of our bytes equals ours (bnb CUDA kernel, fp32 multiply then cast), up to the sign of
    # zero: bnb CUDA's FP4 decoder applies the sign bit to code 8 and returns -0.0, where the stored quant_map (which
    # qtool and bnb CPU use) says +0.0.
    assert_equal(
        qtool.dequantize_tensor(ours),
        F.dequantize_4bit(ours["weight"], state),
        "bnb dequant of ours",
        signed_zeros=quant_type == "nf4",
    )


@pytest.mark.bnb
@pytest.mark.parametrize("shape", FLUX_SHAPES, ids=str)
def test_double_quant_against_bnb_cuda(shape):
    import bitsandbytes.functional as F

    w = flux_weight(shape, torch.bfloat16)
    ours = qtool.quantize_tensor(w, double_quant=True, backend="triton")
    plain = qtool.quantize_tensor(w, backend="triton")["weight.absmax"]
    _, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert_equal(ours["weight.nested_absmax"], state.state2.absmax, "nested_absmax")
    offset = torch.tensor(json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))["nested_offset"])
    assert offset.item() == state.offset.item(), "nested_offset (torch.mean on the same GPU)"
    ndiff = check_nested_codes(plain, state.offset, ours["weight.nested_absmax"], ours["weight.absmax"], state.absmax,
                               1e-6)  # fmt: skip
    report(test="nested_vs_bnb_cuda", shape=shape, codes=plain.numel(), differing=ndiff)
    # bnb dequantizes our double-quantized bytes exactly as we do.
    state.absmax = ours["weight.absmax"]
    assert_equal(qtool.dequantize_tensor(ours), F.dequantize_4bit(ours["weight"], state), "bnb dequant of ours")


@pytest.mark.bnb
@pytest.mark.parametrize("shape", FLUX_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_int8_against_bnb_cuda(shape, dtype):
    import bitsandbytes.functional as F

    w = flux_weight(shape, dtype)
    ours = qtool.quantize_tensor(w, bits=8, backend="triton")
    ref = qtool.quantize_tensor(w, bits=8, backend="torch")
    for key in ref:
        assert_equal(ours[key], ref[key], key)
    q_bnb, scb_bnb, _ = F.int8_vectorwise_quant(w.half())
    assert_equal(ours["SCB"], scb_bnb, "SCB")
    ndiff = check_int8_codes(w, ours["weight"], q_bnb, ours["SCB"])
    report(test="int8_vs_bnb_cuda", shape=shape, dtype=str(dtype), codes=w.numel(), differing=ndiff)
    assert_equal(qtool.dequantize_tensor(ours, dtype=torch.float32), F.int8_vectorwise_dequant(ours["weight"],
                 ours["SCB"]), "bnb dequant of ours")  # fmt: skip


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_int8_bench_shapes(shape, dtype):
    w = flux_weight(shape, dtype)
    ours = qtool.quantize_tensor(w, bits=8, backend="triton")
    ref = qtool.quantize_tensor(w, bits=8, backend="torch")
    for key in ref:
        assert_equal(ours[key], ref[key], key)
    for out in (torch.bfloat16, torch.float16, torch.float32):
        assert_equal(
            qtool.dequantize_tensor(ours, dtype=out, backend="triton"),
            qtool.dequantize_tensor(ref, dtype=out, backend="torch"),
            f"dequantized {out}",
        )


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
@pytest.mark.parametrize("shape", [(4097, 33), (3072, 3071)], ids=str)
def test_4bit_unpaired_layouts(shape, offset):
    """Odd numel or a weight starting at an odd element: the kernels' element-wise path, same bytes."""
    flat = flux_weight((shape[0] * shape[1] + offset,), torch.bfloat16)
    w = flat[offset:].view(shape)
    for double_quant in (False, True):
        tri = qtool.quantize_tensor(w, double_quant=double_quant, backend="triton")
        ref = qtool.quantize_tensor(w, double_quant=double_quant, backend="torch")
        for key in ref:
            assert_equal(tri[key], ref[key], key)
        assert_equal(
            qtool.dequantize_tensor(tri, backend="triton"), qtool.dequantize_tensor(ref, backend="torch"), "dequantized"
        )
