"""W4A16: ``y = x W^T + b`` with W in bitsandbytes' 4-bit format, dequantized inside the matmul's K loop.

The twin (and the oracle) is ``qtool.linear.linear_4bit_ref``: dequantize W to x's dtype, then ``F.linear``. The
kernel dequantizes each [BLOCK_N, BLOCK_K] tile of W the same way (``quant_map[code] * absmax`` in float32, rounded
to x's dtype; with double quant the absmax rebuilt from its code as ``dequantize_absmax`` does) and feeds it to the
tensor cores with float32 accumulation: the result differs from the reference only by the order of the sums.

Small M (decode: a few tokens) is memory-bound on W: each program streams BLOCK_N rows of packed codes once for all
(up to 16) rows of x. The even and odd elements of a packed byte meet the even and odd columns of x in two dots, so
the codes are never interleaved in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.reference.codebooks import NESTED_BLOCKSIZE

from ._common import (
    INTERPRETING,
    bf16_rne_bits,
    check_device,
    device_guard,
    device_scalar,
    launch_options,
    warps_option,
)
from .double_quant import rebuild_absmax

# Rows of x a launch takes at most (the tensor cores' smallest M tile); larger M goes to dequantize + cuBLAS.
MAX_M = 16
GEMV_BLOCK_N = 64 if INTERPRETING else 32
GEMV_BLOCK_K = 256
GEMV_WARPS = 4
GEMV_STAGES = 4
# The CUDA-core variant for at most ROWS_MAX_M rows of x (one program row per x row).
ROWS_MAX_M = 4
ROWS_BLOCK_N = 16 if INTERPRETING else 8
ROWS_BLOCK_K = 512  # H100 sweep (M=1): block_n 8, block_k 512, 2 warps 38.1 us; 4 warps 40.9 us
ROWS_WARPS = 2


def supports(x: torch.Tensor, n: int, k: int, blocksize: int = 64) -> bool:
    """Whether ``qtool.linear`` should call this kernel rather than dequantize + cuBLAS: one row of 16-bit x with K
    in whole tiles of the CUDA-core variant, the one case where it was faster on the H100 (M=1 4096 -> 14336:
    38 us against ~100 us; the tensor-core variant took 570-1500 us there: benchmarks/bench_matmul.py --sweep)."""
    rows = x.numel() // max(k, 1)
    return (
        x.dtype in (torch.bfloat16, torch.float16) and rows == 1 and n > 0
        and k % ROWS_BLOCK_K == 0 and ROWS_BLOCK_K % blocksize == 0
    )  # fmt: skip


@triton.jit
def _gemv_4bit_kernel(
    # pointers
    x_ptr,  # *bf16|fp16 [M, K], row stride stride_xm
    packed_ptr,  # *u8 [N * K / 2], row-major W, element 2j in the high nibble
    absmax_ptr,  # *fp32 [nblocks], or *u8 codes with NESTED
    qmap_ptr,  # *fp32 [16]
    nested_absmax_ptr,  # *fp32 (NESTED only)
    nested_map_ptr,  # *fp32 [256] (NESTED only)
    offset_ptr,  # *fp32 [1] (NESTED only)
    bias_ptr,  # *bf16|fp16 [N] (HAS_BIAS only)
    out_ptr,  # *bf16|fp16 [M, N], row stride N
    # sizes
    M,
    N,
    K,
    stride_xm,
    # format constexprs
    QBLOCK: tl.constexpr,
    NESTED: tl.constexpr,
    NBLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    # tile constexprs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,  # interpreter: x and out are float32 copies; round W to bf16 by its bits
):
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_j = tl.arange(0, BLOCK_K // 2)  # bytes of a K tile: elements 2j, 2j + 1
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        cols = k0 + 2 * offs_j  # [BLOCK_K / 2], the even columns
        mask_k = cols < K
        mask_w = mask_n[:, None] & mask_k[None, :]
        elem = offs_n[:, None] * K + cols[None, :]  # flat index of the even element, [BLOCK_N, BLOCK_K / 2]
        p = tl.load(packed_ptr + elem // 2, mask=mask_w, other=0).to(tl.int32)
        blk = elem // QBLOCK  # both elements of a byte lie in one block (QBLOCK and 2j are even)
        if NESTED:
            a = rebuild_absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, blk, mask_w, NBLOCK)
        else:
            a = tl.load(absmax_ptr + blk, mask=mask_w, other=0.0)
        w_hi = _round_w(tl.load(qmap_ptr + (p >> 4)) * a, dtype, BF16_BY_HAND)
        w_lo = _round_w(tl.load(qmap_ptr + (p & 15)) * a, dtype, BF16_BY_HAND)
        x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)  # fmt: skip
        x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] + 1,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(x_even, tl.trans(w_hi), acc)
        acc = tl.dot(x_odd, tl.trans(w_lo), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(dtype), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _round_w(w, dtype, BF16_BY_HAND: tl.constexpr):
    # W in x's dtype, as the reference's dequantize rounds it (to nearest even). The interpreter's float32 -> bf16
    # cast truncates, so there W stays float32 holding the bf16-rounded value.
    if BF16_BY_HAND:
        return (bf16_rne_bits(w) << 16).to(tl.float32, bitcast=True)
    return w.to(dtype)


@triton.jit
def _gemv_4bit_rows_kernel(
    x_ptr,  # *bf16|fp16 [M, K]
    packed_ptr,  # *u8 [N * K / 2]
    absmax_ptr,  # *fp32 [nblocks], or *u8 codes with NESTED
    qmap_ptr,  # *fp32 [16]
    nested_absmax_ptr,
    nested_map_ptr,
    offset_ptr,
    bias_ptr,
    out_ptr,  # *bf16|fp16 [M, N]
    M,
    N,
    K,
    stride_xm,
    QBLOCK: tl.constexpr,
    NESTED: tl.constexpr,
    NBLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of QBLOCK; K must be a multiple of BLOCK_K
    BF16_BY_HAND: tl.constexpr,
):
    # Few rows of x: CUDA-core products and row sums (no tensor-core layout shuffles), one x row per program axis 1.
    # The tile is [BLOCK_N, BLOCK_K / QBLOCK, QBLOCK / 2] bytes so each block's absmax is loaded once.
    pid = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_b = tl.arange(0, BLOCK_K // QBLOCK)
    offs_j = tl.arange(0, QBLOCK // 2)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        blk = (offs_n[:, None] * K + k0) // QBLOCK + offs_b[None, :]  # [BLOCK_N, BLOCK_K / QBLOCK]
        if NESTED:
            a = rebuild_absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, blk, mask_n[:, None], NBLOCK)
        else:
            a = tl.load(absmax_ptr + blk, mask=mask_n[:, None], other=0.0)
        byte = blk[:, :, None] * (QBLOCK // 2) + offs_j[None, None, :]
        p = tl.load(packed_ptr + byte, mask=mask_n[:, None, None], other=0).to(tl.int32)
        w_hi = _round_w(tl.load(qmap_ptr + (p >> 4)) * a[:, :, None], dtype, BF16_BY_HAND).to(tl.float32)
        w_lo = _round_w(tl.load(qmap_ptr + (p & 15)) * a[:, :, None], dtype, BF16_BY_HAND).to(tl.float32)
        cols = k0 + offs_b[:, None] * QBLOCK + 2 * offs_j[None, :]  # [BLOCK_K / QBLOCK, QBLOCK / 2]
        x_even = tl.load(x_ptr + row * stride_xm + cols).to(tl.float32)
        x_odd = tl.load(x_ptr + row * stride_xm + cols + 1).to(tl.float32)
        acc += tl.sum(tl.sum(w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :], axis=2), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    blocksize: int,
    shape: tuple[int, int],
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | float | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    stages: int | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.linear.linear_4bit_ref`` for ``supports(x, *shape)``: [..., K] -> [..., N] in x's
    dtype. Never waits for the GPU."""
    n, k = shape
    rows = x.numel() // max(k, 1)
    if x.dtype not in (torch.bfloat16, torch.float16) or not 0 < rows <= MAX_M or k % 2:
        raise ValueError(f"linear_4bit's kernel takes 16-bit x of at most {MAX_M} rows and even K: {tuple(x.shape)}")
    check_device(x, packed, absmax, quant_map)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    by_hand = INTERPRETING and x.dtype == torch.bfloat16
    if by_hand:  # the interpreter's bf16 loads and stores are not the GPU's (cpu-testing.md §2.2)
        x2 = x2.float()
        bias = bias.float() if bias is not None else None
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x.device)
    nested = nested_absmax is not None
    if nested:
        nested_args = (
            nested_absmax.to(torch.float32).contiguous(),
            nested_quant_map.to(torch.float32).contiguous(),
            device_scalar(nested_offset, x.device),
        )
    else:
        nested_args = (absmax, absmax, absmax)  # unused placeholders
    rows_k = block_k or ROWS_BLOCK_K
    if variant not in (None, "rows", "dot"):
        raise ValueError(f"variant must be 'rows' or 'dot', got {variant!r}")
    args = (
        x2, packed.reshape(-1).view(torch.uint8), absmax if nested else absmax.to(torch.float32),
        quant_map.to(torch.float32), *nested_args, bias if bias is not None else out, out, m, n, k, x2.stride(0),
    )  # fmt: skip
    common = {"QBLOCK": blocksize, "NESTED": nested, "NBLOCK": NESTED_BLOCKSIZE, "HAS_BIAS": bias is not None,
              "BF16_BY_HAND": by_hand, **launch_options()}  # fmt: skip
    with device_guard(x):
        if variant == "rows" or (variant is None and m <= ROWS_MAX_M and k % rows_k == 0 and rows_k % blocksize == 0):
            block_n = block_n or ROWS_BLOCK_N
            _gemv_4bit_rows_kernel[(triton.cdiv(n, block_n), m)](
                *args, BLOCK_N=block_n, BLOCK_K=rows_k, **common, **warps_option(num_warps, ROWS_WARPS)
            )
        else:
            block_n = block_n or GEMV_BLOCK_N
            _gemv_4bit_kernel[(triton.cdiv(n, block_n),)](
                *args, BLOCK_M=MAX_M, BLOCK_N=block_n, BLOCK_K=block_k or GEMV_BLOCK_K, STAGES=stages or GEMV_STAGES,
                **common, **warps_option(num_warps, GEMV_WARPS),
            )  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
    block_n = block_n or GEMV_BLOCK_N
    with device_guard(x):
        _gemv_4bit_kernel[(triton.cdiv(n, block_n),)](
            x2,
            packed.reshape(-1).view(torch.uint8),
            absmax if nested else absmax.to(torch.float32),
            quant_map.to(torch.float32),
            *nested_args,
            bias if bias is not None else out,
            out,
            m,
            n,
            k,
            x2.stride(0),
            QBLOCK=blocksize,
            NESTED=nested,
            NBLOCK=NESTED_BLOCKSIZE,
            HAS_BIAS=bias is not None,
            BLOCK_M=MAX_M,
            BLOCK_N=block_n,
            BLOCK_K=block_k or GEMV_BLOCK_K,
            STAGES=stages or GEMV_STAGES,
            BF16_BY_HAND=by_hand,
            **warps_option(num_warps, GEMV_WARPS),
            **launch_options(),
        )
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
