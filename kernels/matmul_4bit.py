"""W4A16 for decode: ``y = x W^T + b`` with W in bitsandbytes' 4-bit format, read once from memory, on CUDA cores.

The twin (and the oracle) is ``qtool.linear.linear_4bit_ref``: dequantize W to x's dtype, then ``F.linear``. Each
program streams BLOCK_N rows of packed codes for one row of x; the even and odd elements of a packed byte meet x's
even and odd columns, so the codes are never interleaved. With double quant the absmax is rebuilt from its code as
``dequantize_absmax`` does.

A tensor-core variant (W's dequantized tile as the MMA's register operand, any M) was measured on the H100 and
removed: 320-400 us at 1 and 16 rows of 4096 -> 14336 and 7.9-8.1 ms at 4608 rows of the FLUX shapes, where
dequantize + cuBLAS takes 108 us and 0.55 ms (benchmarks/results/tuning/matmul_sweep_f5d890a.csv).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.reference.codebooks import NESTED_BLOCKSIZE

from ._common import (
    INTERPRETING,
    check_device,
    device_guard,
    device_scalar,
    launch_options,
    round_16bit,
    warps_option,
)
from .double_quant import rebuild_absmax

# The CUDA-core kernel: up to MAX_M rows of x (one per program-grid row), K in whole BLOCK_K tiles. H100 sweep
# (bench_matmul.py --sweep, 1 x 4096 -> 14336): BLOCK_N 4, BLOCK_K 256, 1 warp 35.6 us (bnb 29, bf16 42); 8/256/2
# warps 36.2 us; a software-pipelined K loop (num_stages 2-3) 270-620 us. Each extra row of x costs about as much
# again (4 rows: 111 us), so dispatch takes one row only; more go to dequantize + cuBLAS.
MAX_M = 4
BLOCK_N = 16 if INTERPRETING else 4
BLOCK_K = 256
WARPS = 1


def choose(x: torch.Tensor, n: int, k: int, blocksize: int = 64) -> bool:
    """Whether ``qtool.linear`` calls this kernel for x [..., K] against an [N, K] weight: one row of 16-bit x, K a
    multiple of the K tile; otherwise dequantize + cuBLAS is faster on the H100 (or the only path)."""
    m = x.numel() // max(k, 1)
    return x.dtype in (torch.bfloat16, torch.float16) and m == 1 and n > 0 and _fits(m, k, blocksize, BLOCK_K)


@triton.jit
def _w4a16_gemv_kernel(
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
    SCALE_AFTER: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    # Few rows of x: CUDA-core products and row sums (no tensor-core layout shuffles), one x row per program axis 1.
    # The tile is [BLOCK_N, BLOCK_K / QBLOCK, QBLOCK / 2] bytes so each block's absmax is loaded once. SCALE_AFTER
    # sums quant_map[code] * x over each block in float32 and multiplies the sum by the block's absmax (one multiply
    # a block instead of two a byte, W never rounded to 16-bit: nearer the exact product than the reference);
    # otherwise W is dequantized and rounded as the reference does.
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
        cols = k0 + offs_b[:, None] * QBLOCK + 2 * offs_j[None, :]  # [BLOCK_K / QBLOCK, QBLOCK / 2]
        x_even = tl.load(x_ptr + row * stride_xm + cols).to(tl.float32)
        x_odd = tl.load(x_ptr + row * stride_xm + cols + 1).to(tl.float32)
        if SCALE_AFTER:
            c = tl.load(qmap_ptr + (p >> 4)) * x_even[None, :, :] + tl.load(qmap_ptr + (p & 15)) * x_odd[None, :, :]
            acc += tl.sum(tl.sum(c, axis=2) * a, axis=1)
        else:
            w_hi = round_16bit(tl.load(qmap_ptr + (p >> 4)) * a[:, :, None], dtype, BF16_BY_HAND).to(tl.float32)
            w_lo = round_16bit(tl.load(qmap_ptr + (p & 15)) * a[:, :, None], dtype, BF16_BY_HAND).to(tl.float32)
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
    tile: tuple[int, int, int] | None = None,
    scale_after: bool = True,
) -> torch.Tensor:
    """Triton twin of ``qtool.linear.linear_4bit_ref`` for at most ``MAX_M`` rows of 16-bit x and K a multiple of
    the K tile: [..., K] -> [..., N] in x's dtype. ``tile`` = (BLOCK_N, BLOCK_K, warps), by default the module's;
    ``scale_after``: see the kernel. Never waits for the GPU."""
    n, k = shape
    m = x.numel() // max(k, 1)
    block_n, block_k, warps = tile or (BLOCK_N, max(BLOCK_K, blocksize), WARPS)
    if x.dtype not in (torch.bfloat16, torch.float16) or not _fits(m, k, blocksize, block_k):
        raise ValueError(
            f"linear_4bit's kernel takes at most {MAX_M} rows of 16-bit x and K in whole {block_k} tiles "
            f"(a multiple of the blocksize {blocksize}): {tuple(x.shape)} {x.dtype}"
        )
    check_device(x, packed, absmax, quant_map)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    by_hand = INTERPRETING and x.dtype == torch.bfloat16
    if by_hand:  # the interpreter's bf16 loads and stores are not the GPU's (cpu-testing.md §2.2)
        x2 = x2.float()
        bias = bias.float() if bias is not None else None
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
    with device_guard(x):
        _w4a16_gemv_kernel[(triton.cdiv(n, block_n), m)](
            x2, packed.reshape(-1).view(torch.uint8), absmax if nested else absmax.to(torch.float32),
            quant_map.to(torch.float32), *nested_args, bias if bias is not None else out, out, m, n, k, x2.stride(0),
            QBLOCK=blocksize, NESTED=nested, NBLOCK=NESTED_BLOCKSIZE, HAS_BIAS=bias is not None, BLOCK_N=block_n,
            BLOCK_K=block_k, SCALE_AFTER=scale_after, BF16_BY_HAND=by_hand, **warps_option(warps, warps),
            **launch_options(),
        )  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _fits(m: int, k: int, blocksize: int, block_k: int) -> bool:
    return 0 < m <= MAX_M and k % block_k == 0 and block_k % blocksize == 0
