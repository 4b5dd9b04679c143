"""Blockwise 4-bit (NF4 / FP4) quantize and dequantize as Triton kernels.

Bit-exact twins of ``qtool.reference.quant4`` (the specification): same arguments, same results, on the GPU and
in Triton's CPU interpreter. One program instance handles ``BLOCKS`` consecutive quantization blocks of
``QBLOCK`` elements as a [BLOCKS, QBLOCK] tile, so a launch has few programs (the interpreter pays ~4 ms each).
Limits: QBLOCK is a power of two from 32 to 4096; numel < 2**62.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qtool.reference.codebooks import fp4_thresholds, nf4_midpoints
from qtool.reference.quant4 import check_4bit_args

from ._common import bf16_bits, check_device, device_guard, launch_options, output_view, store_rounded

# Elements per program when the caller gives no tile. 16K elements keeps an interpreted 1M-element tensor at 64
# programs (~0.5 s, cpu-testing.md §2.3); on the GPU it is a starting point that issue #7 tunes.
DEFAULT_TILE = 16384


@triton.jit
def _nf4_code(s, mid_ptr):
    # code = #{m_k < s} over the 15 sorted NF4 midpoints, as a 4-level binary search: bnb CUDA's dQuantizeNF4
    # tree. The thresholds are loaded as float32 scalars so they are exactly the reference's midpoints.
    m0 = tl.load(mid_ptr + 0)
    m1 = tl.load(mid_ptr + 1)
    m2 = tl.load(mid_ptr + 2)
    m3 = tl.load(mid_ptr + 3)
    m4 = tl.load(mid_ptr + 4)
    m5 = tl.load(mid_ptr + 5)
    m6 = tl.load(mid_ptr + 6)
    m7 = tl.load(mid_ptr + 7)
    m8 = tl.load(mid_ptr + 8)
    m9 = tl.load(mid_ptr + 9)
    m10 = tl.load(mid_ptr + 10)
    m11 = tl.load(mid_ptr + 11)
    m12 = tl.load(mid_ptr + 12)
    m13 = tl.load(mid_ptr + 13)
    m14 = tl.load(mid_ptr + 14)
    b3 = s > m7
    b2 = s > tl.where(b3, m11, m3)
    b1 = s > tl.where(b3, tl.where(b2, m13, m9), tl.where(b2, m5, m1))
    t0 = tl.where(
        b3,
        tl.where(b2, tl.where(b1, m14, m12), tl.where(b1, m10, m8)),
        tl.where(b2, tl.where(b1, m6, m4), tl.where(b1, m2, m0)),
    )
    b0 = s > t0
    # NaN (an all-zero block: 0 * inf) fails every comparison and lands on code 0, as on CUDA.
    return b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _fp4_code(s, thr_ptr):
    # bnb CUDA's dQuantizeFP4: sign bit iff s < 0; k = #{t_j < |s|} over 7 magnitude thresholds; the magnitude
    # code for k = 0..7 is 0, 1, 6, 7, 4, 5, 2, 3, i.e. bits (c2 ^ c1, c1, c0) of k = (c2, c1, c0).
    t0 = tl.load(thr_ptr + 0)
    t1 = tl.load(thr_ptr + 1)
    t2 = tl.load(thr_ptr + 2)
    t3 = tl.load(thr_ptr + 3)
    t4 = tl.load(thr_ptr + 4)
    t5 = tl.load(thr_ptr + 5)
    t6 = tl.load(thr_ptr + 6)
    a = tl.abs(s)
    c2 = a > t3
    c1 = a > tl.where(c2, t5, t1)
    c0 = a > tl.where(c2, tl.where(c1, t6, t4), tl.where(c1, t2, t0))
    c2i = c2.to(tl.int32)
    c1i = c1.to(tl.int32)
    sign = (s < 0).to(tl.int32)
    return sign * 8 + (c2i ^ c1i) * 4 + c1i * 2 + c0.to(tl.int32)


@triton.jit
def _quantize_4bit_kernel(
    # pointers
    w_ptr,  # *fp32|fp16|bf16 [n], the flattened weight
    packed_ptr,  # *u8 [(n + 1) // 2], two codes per byte, element 2j in the high nibble
    absmax_ptr,  # *fp32 [nblocks]
    thr_ptr,  # *fp32, NF4 midpoints [15] or FP4 magnitude thresholds [7]
    # sizes
    n,
    nblocks,
    # format constexprs
    QBLOCK: tl.constexpr,  # quantization blocksize
    IS_NF4: tl.constexpr,
    # tile constexprs
    BLOCKS: tl.constexpr,  # quantization blocks per program
):
    # One program: BLOCKS quantization blocks -> their absmax and BLOCKS * QBLOCK / 2 packed bytes.
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    offs = offs_b[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]  # [BLOCKS, QBLOCK]
    # Elements past n read as 0.0: the odd element's pad nibble is the code of 0, as bnb CUDA writes it.
    x = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.where(x != x, 0.0, tl.abs(x)), axis=1)  # [BLOCKS]; NaN ignored (abs_ignoring_nan)
    # IEEE-rounded reciprocal, as the reference (torch.reciprocal) computes it; 1 / 0 = inf.
    recip = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), absmax)
    s = x * recip[:, None]
    if IS_NF4:
        codes = _nf4_code(s, thr_ptr)
    else:
        codes = _fp4_code(s, thr_ptr)
    hi, lo = tl.split(tl.reshape(codes, [BLOCKS, QBLOCK // 2, 2]))  # even elements, odd elements
    packed = ((hi << 4) | lo).to(tl.uint8)
    offs_p = offs_b[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]
    tl.store(packed_ptr + offs_p, packed, mask=offs_p < (n + 1) // 2)
    tl.store(absmax_ptr + offs_b, absmax, mask=offs_b < nblocks)


@triton.jit
def _dequantize_4bit_kernel(
    # pointers
    packed_ptr,  # *u8 [(n + 1) // 2]
    absmax_ptr,  # *fp32 [nblocks]
    qmap_ptr,  # *fp32 [16], the stored quant_map
    out_ptr,  # *fp32|fp16|bf16 [n] (an int16 view of bf16 under the interpreter)
    # sizes
    n,
    nblocks,
    # format constexprs
    QBLOCK: tl.constexpr,
    # tile constexprs
    BLOCKS: tl.constexpr,
    BF16_BITS: tl.constexpr,  # round to bf16 by hand (interpreter only)
):
    # One program: BLOCKS quantization blocks -> BLOCKS * QBLOCK output elements.
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCKS + tl.arange(0, BLOCKS)
    offs_p = offs_b[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]  # [BLOCKS, QBLOCK / 2]
    p = tl.load(packed_ptr + offs_p, mask=offs_p < (n + 1) // 2, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + offs_b, mask=offs_b < nblocks, other=0.0)
    hi = tl.load(qmap_ptr + (p >> 4)) * absmax[:, None]
    lo = tl.load(qmap_ptr + (p & 15)) * absmax[:, None]
    x = tl.interleave(hi, lo)  # [BLOCKS, QBLOCK], element 2j from the high nibble
    offs = offs_b[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    store_rounded(out_ptr + offs, x, offs < n, BF16_BITS)


def _blocks_per_program(blocksize: int, nblocks: int, tile: int | None) -> int:
    per = max(1, (tile or DEFAULT_TILE) // blocksize)
    # A power of two no larger than needed: small tensors launch one small program.
    return min(triton.next_power_of_2(per), triton.next_power_of_2(nblocks))


def quantize_4bit(
    weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64, tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``qtool.reference.quant4.quantize_4bit_ref``; ``tile`` is elements per program.

    Returns ``(packed, absmax)``: uint8 [(n + 1) // 2, 1] and float32 [ceil(n / blocksize)].
    """
    check_4bit_args(weight, quant_type, blocksize)
    check_device(weight)
    w = weight.contiguous().reshape(-1)
    n = w.numel()
    nblocks = math.ceil(n / blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    thresholds = nf4_midpoints(w.device) if quant_type == "nf4" else fp4_thresholds(w.device)
    blocks = _blocks_per_program(blocksize, nblocks, tile)
    grid = (triton.cdiv(nblocks, blocks),)
    with device_guard(w):
        _quantize_4bit_kernel[grid](
            w,
            packed,
            absmax,
            thresholds,
            n,
            nblocks,
            QBLOCK=blocksize,
            IS_NF4=quant_type == "nf4",
            BLOCKS=blocks,
            **launch_options(),
        )
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    *,
    blocksize: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    tile: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.reference.quant4.dequantize_4bit_ref``: returns ``shape`` in ``dtype``."""
    n = math.prod(shape)
    nblocks = math.ceil(n / blocksize)
    p = packed.reshape(-1).view(torch.uint8)
    if p.numel() != (n + 1) // 2 or absmax.numel() != nblocks:
        raise ValueError(
            f"packed has {p.numel()} bytes and absmax {absmax.numel()} blocks; shape {tuple(shape)} with blocksize "
            f"{blocksize} needs {(n + 1) // 2} and {nblocks}"
        )
    check_device(p, absmax, quant_map)
    out = torch.empty(shape, dtype=dtype, device=p.device)
    blocks = _blocks_per_program(blocksize, nblocks, tile)
    grid = (triton.cdiv(nblocks, blocks),)
    with device_guard(p):
        _dequantize_4bit_kernel[grid](
            p.contiguous(),
            absmax.to(torch.float32).contiguous(),
            quant_map.to(torch.float32).contiguous(),
            output_view(out),
            n,
            nblocks,
            QBLOCK=blocksize,
            BLOCKS=blocks,
            BF16_BITS=bf16_bits(out),
            **launch_options(),
        )
    return out
