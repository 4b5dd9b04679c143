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

from qtool.reference.codebooks import (
    FP4_BUCKETS,
    NESTED_BLOCKSIZE,
    NF4_BUCKETS,
    fp4_buckets,
    fp4_thresholds,
    nf4_buckets,
    nf4_midpoints,
)
from qtool.reference.quant4 import check_4bit_args, check_4bit_layout, check_given_scales, check_nested

from ._common import (
    INTERPRETING,
    bf16_bits,
    bf16_rne_bits,
    check_device,
    device_guard,
    device_scalar,
    launch_options,
    output_view,
    store_rounded,
    warps_option,
)
from .double_quant import rebuild_absmax

# Elements per program and warps per program when the caller gives none. In the interpreter 16K elements keeps a
# 1M-element tensor at 64 programs (~0.5 s, cpu-testing.md §2.3); on the GPU the values were chosen by
# benchmarks/bench_codecs.py --sweep on an H100 (benchmarks/results/tuning/sweep.csv).
QUANTIZE_TILE = 16384 if INTERPRETING else 2048
QUANTIZE_WARPS = 2
# How a scaled value finds its 4-bit code: "buckets" (two table reads, codebooks.nf4_buckets / fp4_buckets) or
# "tree" (bnb CUDA's comparison trees, literally). Both give the same codes; buckets were faster on the H100.
SEARCH = "buckets"
DEQUANTIZE_TILE = 16384 if INTERPRETING else 4096
DEQUANTIZE_WARPS = 8


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
def _nf4_code_buckets(s, table_ptr, NBUCKETS: tl.constexpr):
    # codebooks.nf4_buckets: the slice of [-1, 1] that s falls in holds at most one midpoint. NaN and rounding past
    # +-1 are clamped into the end slices (a NaN converts to 0 on the GPU and to INT_MIN in numpy).
    b = ((s + 1.0) * (NBUCKETS // 2)).to(tl.int32)
    b = tl.minimum(tl.maximum(b, 0), NBUCKETS - 1)
    base = tl.load(table_ptr + NBUCKETS + b).to(tl.int32)
    return base + (s > tl.load(table_ptr + b)).to(tl.int32)


@triton.jit
def _fp4_code_buckets(s, table_ptr, NBUCKETS: tl.constexpr):
    # codebooks.fp4_buckets over |s| in [0, 1]; k = #{t < |s|} as in _fp4_code, then its magnitude code
    # (c2 ^ c1, c1, c0), i.e. k ^ ((k & 2) << 1). NaN clamps into slice 0, whose threshold NaN does not exceed.
    a = tl.abs(s)
    b = tl.minimum(tl.maximum((a * NBUCKETS).to(tl.int32), 0), NBUCKETS - 1)
    k = tl.load(table_ptr + NBUCKETS + b).to(tl.int32) + (a > tl.load(table_ptr + b)).to(tl.int32)
    return (s < 0).to(tl.int32) * 8 + (k ^ ((k & 2) << 1))


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
def load_pairs(w_ptr, offs_p, n, PAIRS: tl.constexpr, IS_BF16: tl.constexpr, EVEN: tl.constexpr):
    """Elements 2j and 2j+1 of the flattened weight for every pair index j in offs_p, as float32; past n: 0.0.

    With PAIRS, w_ptr is an int32 view of a 16-bit weight of even numel: one 32-bit load per pair, element 2j in the
    low half (little-endian). Widening bf16/fp16 to float32 is exact, so both paths give the same values.
    """
    if PAIRS:
        if EVEN:
            w = tl.load(w_ptr + offs_p)
        else:
            w = tl.load(w_ptr + offs_p, mask=offs_p < n // 2, other=0)
        if IS_BF16:
            even = (w << 16).to(tl.float32, bitcast=True)
            odd = ((w >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            even = ((w << 16) >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            odd = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        e = 2 * offs_p
        even = tl.load(w_ptr + e, mask=e < n, other=0.0).to(tl.float32)
        odd = tl.load(w_ptr + e + 1, mask=e + 1 < n, other=0.0).to(tl.float32)
    return even, odd


@triton.jit
def _quantize_4bit_kernel(
    # pointers
    w_ptr,  # *fp32|fp16|bf16 [n], the flattened weight, or *i32 [n / 2] with PAIRS
    packed_ptr,  # *u8 [(n + 1) // 2], two codes per byte, element 2j in the high nibble
    absmax_ptr,  # *fp32 [nblocks]: written, or read with GIVEN
    thr_ptr,  # *fp32: a bucket table [2 * BUCKETS], or NF4 midpoints [15] / FP4 magnitude thresholds [7]
    # sizes
    n,
    nblocks,
    # format constexprs
    QBLOCK: tl.constexpr,  # quantization blocksize
    IS_NF4: tl.constexpr,
    GIVEN: tl.constexpr,  # code against the absmax at absmax_ptr (e.g. searched) instead of each block's max |x|
    # layout constexprs
    PAIRS: tl.constexpr,  # w_ptr is an int32 view (16-bit weight, even numel)
    IS_BF16: tl.constexpr,
    # code generation constexprs
    MAX_SKIPS_NAN: tl.constexpr,  # tl.max ignores NaN (GPU); the interpreter's does not
    BUCKETS: tl.constexpr,  # slices of the bucket table at thr_ptr; 0: comparison tree over thr_ptr's thresholds
    EVEN: tl.constexpr,  # every program's tile lies inside the tensor: no masks (vector stores)
    # tile constexprs
    BLOCKS: tl.constexpr,  # quantization blocks per program
):
    # One program: BLOCKS quantization blocks -> their absmax and BLOCKS * QBLOCK / 2 packed bytes. Each byte is a
    # pair of elements, so the tile is [BLOCKS, QBLOCK / 2] pairs: codes pack without moving data between threads.
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    offs_p = offs_b[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]  # [BLOCKS, QBLOCK / 2]
    # Elements past n read as 0.0: the odd element's pad nibble is the code of 0, as bnb CUDA writes it.
    even, odd = load_pairs(w_ptr, offs_p, n, PAIRS, IS_BF16, EVEN)
    if GIVEN:
        absmax = tl.load(absmax_ptr + offs_b, mask=offs_b < nblocks, other=1.0)
    else:
        absmax = block_absmax(even, odd, MAX_SKIPS_NAN)
    # IEEE-rounded reciprocal, as the reference (torch.reciprocal) computes it; 1 / 0 = inf.
    recip = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), absmax)[:, None]
    hi = codes_4bit(even * recip, thr_ptr, IS_NF4, BUCKETS)
    lo = codes_4bit(odd * recip, thr_ptr, IS_NF4, BUCKETS)
    if EVEN:
        tl.store(packed_ptr + offs_p, ((hi << 4) | lo).to(tl.uint8))
    else:
        tl.store(packed_ptr + offs_p, ((hi << 4) | lo).to(tl.uint8), mask=offs_p < (n + 1) // 2)
    if not GIVEN:
        tl.store(absmax_ptr + offs_b, absmax, mask=offs_b < nblocks)


@triton.jit
def block_absmax(even, odd, MAX_SKIPS_NAN: tl.constexpr):
    """Each row's max |x| over a [BLOCKS, QBLOCK / 2] tile of element pairs, NaN ignored (abs_ignoring_nan)."""
    # On the GPU max.f32 already returns the other operand of a NaN, and the final maximum with 0 covers an all-NaN
    # block; the interpreter's numpy max propagates NaN, so it masks them first.
    if MAX_SKIPS_NAN:
        return tl.maximum(tl.max(tl.maximum(tl.abs(even), tl.abs(odd)), axis=1), 0.0)
    pair_max = tl.maximum(tl.where(even != even, 0.0, tl.abs(even)), tl.where(odd != odd, 0.0, tl.abs(odd)))
    return tl.max(pair_max, axis=1)


@triton.jit
def codes_4bit(s, thr_ptr, IS_NF4: tl.constexpr, BUCKETS: tl.constexpr):
    """The 4-bit codes of scaled values s (int32), by bucket tables (BUCKETS > 0) or comparison trees."""
    if IS_NF4 and BUCKETS > 0:
        return _nf4_code_buckets(s, thr_ptr, BUCKETS)
    if IS_NF4:
        return _nf4_code(s, thr_ptr)
    if BUCKETS > 0:
        return _fp4_code_buckets(s, thr_ptr, BUCKETS)
    return _fp4_code(s, thr_ptr)


@triton.jit
def _bf16_bits(x, BY_HAND: tl.constexpr):
    """The bf16 bit pattern of float32 x, rounded to nearest even, as int32 in [0, 65535]; BY_HAND (interpreter)
    as store_rounded does it."""
    if BY_HAND:
        return bf16_rne_bits(x).to(tl.int32)
    return x.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _dequantize_4bit_kernel(
    # pointers
    packed_ptr,  # *u8 [(n + 1) // 2]
    absmax_ptr,  # *fp32 [nblocks], or *u8 codes [nblocks] with NESTED
    qmap_ptr,  # *fp32 [16], the stored quant_map
    nested_absmax_ptr,  # *fp32 [ceil(nblocks / NBLOCK)] (NESTED only)
    nested_map_ptr,  # *fp32 [256], the stored nested_quant_map (NESTED only)
    offset_ptr,  # *fp32 [1], nested_offset (NESTED only)
    out_ptr,  # *fp32|fp16|bf16 [n]; *i32 [n / 2] with PAIRS; an int16 view of bf16 under the interpreter otherwise
    # sizes
    n,
    nblocks,
    # format constexprs
    QBLOCK: tl.constexpr,
    NESTED: tl.constexpr,  # double quant: rebuild each absmax from its code here, as dequantize_absmax does
    NBLOCK: tl.constexpr,  # nested blocksize
    # layout constexprs
    PAIRS: tl.constexpr,  # store two 16-bit outputs per int32 (16-bit output, even numel)
    IS_BF16: tl.constexpr,
    BF16_BITS: tl.constexpr,  # round to bf16 by hand (interpreter only)
    # tile constexprs
    BLOCKS: tl.constexpr,
):
    # One program: BLOCKS quantization blocks -> BLOCKS * QBLOCK output elements, one byte (two elements) at a time.
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCKS + tl.arange(0, BLOCKS)
    mask_b = offs_b < nblocks
    offs_p = offs_b[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]  # [BLOCKS, QBLOCK / 2]
    p = tl.load(packed_ptr + offs_p, mask=offs_p < (n + 1) // 2, other=0).to(tl.int32)
    if NESTED:
        absmax = rebuild_absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, offs_b, mask_b, NBLOCK)
    else:
        absmax = tl.load(absmax_ptr + offs_b, mask=mask_b, other=0.0)
    hi = tl.load(qmap_ptr + (p >> 4)) * absmax[:, None]  # element 2j
    lo = tl.load(qmap_ptr + (p & 15)) * absmax[:, None]  # element 2j + 1
    if PAIRS:
        if IS_BF16:
            word = _bf16_bits(hi, BF16_BITS) | (_bf16_bits(lo, BF16_BITS) << 16)
        else:
            hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            word = hi16 | (lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)
        tl.store(out_ptr + offs_p, word, mask=offs_p < n // 2)
    else:
        # Elements 2j and 2j + 1 stored apart. tl.interleave(hi, lo) into one [BLOCKS, QBLOCK] store gave wrong
        # float32 values on the H100 (Triton 3.6) at QBLOCK 128 with 32 blocks per program, though not at 8 blocks.
        even = offs_p * 2
        store_rounded(out_ptr + even, hi, even < n, BF16_BITS)
        store_rounded(out_ptr + even + 1, lo, even + 1 < n, BF16_BITS)


def pairs_view(t: torch.Tensor) -> torch.Tensor | None:
    """t (flat, contiguous, 16-bit) as int32 pairs, or None where that view is impossible (odd numel, misaligned)."""
    if t.dtype not in (torch.bfloat16, torch.float16) or t.numel() % 2 or t.data_ptr() % 4:
        return None
    return t.view(torch.int32)


def code_tables(quant_type: str, search: str | None, device: torch.device) -> tuple[torch.Tensor, int]:
    """The threshold table a kernel's code search reads and its BUCKETS constexpr (0: comparison trees)."""
    search = search or SEARCH
    if search not in ("buckets", "tree"):
        raise ValueError(f"search must be 'buckets' or 'tree', got {search!r}")
    if search == "buckets":
        if quant_type == "nf4":
            return nf4_buckets(device), NF4_BUCKETS
        return fp4_buckets(device), FP4_BUCKETS
    return (nf4_midpoints(device) if quant_type == "nf4" else fp4_thresholds(device)), 0


def quantize_constexprs(w: torch.Tensor, quant_type: str, blocksize: int, blocks: int, buckets: int, pairs: bool):
    """The format, layout and tile constexprs of a kernel that reads a flat weight as ``load_pairs`` tiles."""
    return {
        "QBLOCK": blocksize,
        "IS_NF4": quant_type == "nf4",
        "PAIRS": pairs,
        "IS_BF16": w.dtype == torch.bfloat16,
        "MAX_SKIPS_NAN": not INTERPRETING,
        "BUCKETS": buckets,
        "EVEN": w.numel() % (blocks * blocksize) == 0,
        "BLOCKS": blocks,
    }


def blocks_per_program(blocksize: int, nblocks: int, tile: int | None, default: int) -> int:
    per = max(1, (tile or default) // blocksize)
    # A power of two no larger than needed: small tensors launch one small program.
    return min(triton.next_power_of_2(per), triton.next_power_of_2(nblocks))


def quantize_4bit(
    weight: torch.Tensor,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    tile: int | None = None,
    num_warps: int | None = None,
    search: str | None = None,
    absmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``qtool.reference.quant4.quantize_4bit_ref`` (``absmax``: code against these scales); ``tile``
    is elements per program and ``num_warps`` warps per program (GPU only; both default to the configuration tuned
    on an H100).

    Returns ``(packed, absmax)``: uint8 [(n + 1) // 2, 1] and float32 [ceil(n / blocksize)]. Never waits for the GPU.
    """
    check_4bit_args(weight, quant_type, blocksize)
    check_device(weight)
    w = weight.contiguous().reshape(-1)
    n = w.numel()
    nblocks = math.ceil(n / blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    given = absmax is not None
    if given:
        check_given_scales(absmax, nblocks, "absmax")
        check_device(absmax)
    else:
        absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    thresholds, buckets = code_tables(quant_type, search, w.device)
    pairs = pairs_view(w)
    blocks = blocks_per_program(blocksize, nblocks, tile, QUANTIZE_TILE)
    grid = (triton.cdiv(nblocks, blocks),)
    with device_guard(w):
        _quantize_4bit_kernel[grid](
            w if pairs is None else pairs,
            packed,
            absmax,
            thresholds,
            n,
            nblocks,
            GIVEN=given,
            **quantize_constexprs(w, quant_type, blocksize, blocks, buckets, pairs is not None),
            **warps_option(num_warps, QUANTIZE_WARPS),
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
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | float | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tile: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.reference.quant4.dequantize_4bit_ref``: returns ``shape`` in ``dtype``.

    With ``nested_absmax``, ``absmax`` holds the double-quant codes and each absmax is rebuilt in the same kernel.
    Never waits for the GPU (a tensor ``nested_offset`` is read on the device).
    """
    n = math.prod(shape)
    nblocks = math.ceil(n / blocksize)
    p = packed.reshape(-1).view(torch.uint8)
    check_4bit_layout(p, absmax, n, blocksize, shape)
    check_device(p, absmax, quant_map)
    nested = nested_absmax is not None
    if nested:
        check_nested(absmax, nested_absmax, nested_quant_map, nested_offset, nested_blocksize)
        check_device(nested_absmax, nested_quant_map)
        offset = device_scalar(nested_offset, p.device)
        nested_args = (
            nested_absmax.to(torch.float32).contiguous(),
            nested_quant_map.to(torch.float32).contiguous(),
            offset,
        )
    else:
        nested_args = (absmax, absmax, absmax)  # unused placeholders
    out = torch.empty(shape, dtype=dtype, device=p.device)
    pairs = pairs_view(out.view(-1))
    blocks = blocks_per_program(blocksize, nblocks, tile, DEQUANTIZE_TILE)
    grid = (triton.cdiv(nblocks, blocks),)
    with device_guard(p):
        _dequantize_4bit_kernel[grid](
            p.contiguous(),
            absmax.contiguous() if nested else absmax.to(torch.float32).contiguous(),
            quant_map.to(torch.float32).contiguous(),
            *nested_args,
            output_view(out) if pairs is None else pairs,
            n,
            nblocks,
            QBLOCK=blocksize,
            NESTED=nested,
            NBLOCK=nested_blocksize,
            PAIRS=pairs is not None,
            IS_BF16=dtype == torch.bfloat16,
            BF16_BITS=bf16_bits(out),
            BLOCKS=blocks,
            **warps_option(num_warps, DEQUANTIZE_WARPS),
            **launch_options(),
        )
    return out
