"""W4A16: ``y = x W^T + b`` with W in bitsandbytes' 4-bit format, read once from memory, for a few rows of x.

The twin (and the oracle) is ``qtool.linear.linear_4bit_ref``: dequantize W to x's dtype, then ``F.linear``. Two
kernels; ``choose`` picks one by the number of rows (M), and every other call is Triton dequantize + cuBLAS:

- ``gemv`` (M = 1): CUDA cores. Each program streams BLOCK_N rows of packed codes; the even and odd elements of a
  packed byte meet x's even and odd columns, so the codes are never interleaved. The absmax multiplies each block's
  float32 sum of ``quant_map[code] * x`` (one multiply a block, W never rounded to 16-bit: nearer the exact product
  than the reference).
- ``mma`` (any M; dispatched for 2..MMA_MAX_M): tensor cores. x's tile of BLOCK_M rows (MMA_M by default, padded)
  is the MMA's A operand; W's tile, dequantized and rounded to x's dtype as the reference rounds it, is the B
  operand (``tl.dot(x_even, W_hi^T)`` plus the odd half).
  With split-K, SPLIT programs share a column tile's K tiles and a second launch sums their float32 partials in a
  fixed order (the result does not vary from run to run, as atomics would make it).

With double quant the absmax is rebuilt from its code as ``dequantize_absmax`` does. As a fused-dequantize GEMM for
FLUX's 4608 rows (BLOCK_M 64-256) this kernel takes 7.5-23 ms on the H100 at 3072 -> 12288, where dequantize +
cuBLAS takes 0.57 ms (benchmarks/results/tuning/matmul_sweep_c5c167e.csv), so more rows than MMA_MAX_M go there. An
earlier tensor-core design with W as the A operand (out^T = W x^T) was measured and removed: 320-400 us at 1 and 16
rows of 4096 -> 14336 and 7.9-8.1 ms at 4608 rows (matmul_sweep_f5d890a.csv).
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

# gemv: (BLOCK_N, BLOCK_K, warps). H100 sweep (bench_matmul.py --sweep, 1 x 4096 -> 14336): 4/256/1 34.3 us (bnb 29,
# bf16 42); 8/256/2 35.4 us; loading the next K tile before this one's products (a register prefetch) 50-86 us; a
# software-pipelined K loop (num_stages 2-3) 270-620 us.
GEMV_TILE = (16, 256, 1) if INTERPRETING else (4, 256, 1)
# mma: (BLOCK_N, BLOCK_K, warps, split-K[, BLOCK_M, num_stages]); BLOCK_M is MMA_M (tl.dot's least M) unless given.
# H100 sweep, 4096 -> 14336 (benchmarks/results/tuning/matmul_sweep_ca699ee.csv): at 16 rows 128/256/8 warps/split
# 4 94.6 us, 64/256/4/1 104 us, 32/256/4/1 145 us (x is re-read per program); at 4 rows 64/256/4/8 71 us;
# dequantize + cuBLAS 108 us, bnb 67, bf16 42. Triton's software pipelining (num_stages 2-3) is 3-4x slower.
MMA_TILE = (16, 128, 4, 2) if INTERPRETING else (128, 256, 8, 4)
MMA_M = 16
# choose() sends 2..MMA_MAX_M rows to the mma kernel (more go to dequantize + cuBLAS).
MMA_MAX_M = 16
SUM_BLOCK = 1024
KERNELS = ("gemv", "mma")


def choose(x: torch.Tensor, n: int, k: int, blocksize: int = 64) -> str | None:
    """The kernel ``qtool.linear`` calls for x [..., K] against an [N, K] weight: "gemv" for one row of 16-bit x,
    "mma" for up to MMA_MAX_M rows, K in whole K tiles of either; None where dequantize + cuBLAS is faster on the H100
    (or the only path)."""
    m = x.numel() // max(k, 1)
    if x.dtype not in (torch.bfloat16, torch.float16) or n <= 0:
        return None
    for kernel in KERNELS:
        if _fits(kernel, m, k, blocksize, _tile(kernel, None, blocksize)) and (kernel == "gemv" or m <= MMA_MAX_M):
            return kernel
    return None


@triton.jit
def _load_blocks(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, blk, offs_j, mask,
                 QBLOCK: tl.constexpr, NESTED: tl.constexpr, NBLOCK: tl.constexpr):  # fmt: skip
    """The packed codes [R, B, QBLOCK / 2] (int32) and float32 absmax [R, B] of the quantization blocks ``blk``."""
    if NESTED:
        a = rebuild_absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, blk, mask, NBLOCK)
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    byte = blk[:, :, None] * (QBLOCK // 2) + offs_j[None, None, :]
    p = tl.load(packed_ptr + byte, mask=mask[:, :, None], other=0).to(tl.int32)
    return p, a


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
):
    # One x row per program axis 1. The tile is [BLOCK_N, BLOCK_K / QBLOCK, QBLOCK / 2] bytes so each block's absmax
    # is loaded once.
    pid = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[:, None]
    offs_b = tl.arange(0, BLOCK_K // QBLOCK)
    offs_j = tl.arange(0, QBLOCK // 2)
    blk0 = (offs_n[:, None] * K) // QBLOCK + offs_b[None, :]  # [BLOCK_N, BLOCK_K / QBLOCK], K tile 0
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p, a = _load_blocks(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, blk0 + k0 // QBLOCK,
                            offs_j, mask, QBLOCK, NESTED, NBLOCK)  # fmt: skip
        cols = k0 + offs_b[:, None] * QBLOCK + 2 * offs_j[None, :]  # [BLOCK_K / QBLOCK, QBLOCK / 2]
        x_even = tl.load(x_ptr + row * stride_xm + cols).to(tl.float32)
        x_odd = tl.load(x_ptr + row * stride_xm + cols + 1).to(tl.float32)
        c = tl.load(qmap_ptr + (p >> 4)) * x_even[None, :, :] + tl.load(qmap_ptr + (p & 15)) * x_odd[None, :, :]
        acc += tl.sum(tl.sum(c, axis=2) * a, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _w4a16_mma_kernel(
    x_ptr,  # *bf16|fp16 [M, K]
    packed_ptr,
    absmax_ptr,
    qmap_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of QBLOCK; K must be a multiple of BLOCK_K
    SPLIT: tl.constexpr,  # > 1: program (n, s) takes K tiles s, s + SPLIT, ... into float32 partials [SPLIT, M, N]
    STAGES: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[:, None]
    offs_m = tl.program_id(2).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_K // QBLOCK)
    offs_j = tl.arange(0, QBLOCK // 2)
    blk0 = (offs_n[:, None] * K) // QBLOCK + offs_b[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm + 2 * tl.arange(0, BLOCK_K // 2)[None, :]
    mask_m = (offs_m < M)[:, None]
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    split = tl.program_id(1)
    for k0 in tl.range(split * BLOCK_K, K, SPLIT * BLOCK_K, num_stages=STAGES):  # 2-3 stages: 4x slower at M <= 16
        p, a = _load_blocks(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                            blk0 + k0 // QBLOCK, offs_j, mask, QBLOCK, NESTED, NBLOCK)  # fmt: skip
        w_hi = round_16bit(tl.load(qmap_ptr + (p >> 4)) * a[:, :, None], dtype, BF16_BY_HAND)
        w_lo = round_16bit(tl.load(qmap_ptr + (p & 15)) * a[:, :, None], dtype, BF16_BY_HAND)
        x_even = tl.load(x_rows + k0, mask=mask_m, other=0.0)
        x_odd = tl.load(x_rows + k0 + 1, mask=mask_m, other=0.0)
        acc = tl.dot(x_even, tl.trans(tl.reshape(w_hi, (BLOCK_N, BLOCK_K // 2))), acc)
        acc = tl.dot(x_odd, tl.trans(tl.reshape(w_lo, (BLOCK_N, BLOCK_K // 2))), acc)
    out = out_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m & (offs_n < N)[None, :])


@triton.jit
def _split_sum_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    # out = sum of the SPLIT float32 partials [SPLIT, M * N] in a fixed order (deterministic), + bias, in out's dtype.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
    kernel: str | None = None,
    tile: tuple | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.linear.linear_4bit_ref`` for 16-bit x: [..., K] -> [..., N] in x's dtype. ``kernel``:
    "gemv" (one row) or "mma" (any rows), by default ``choose``'s; ``tile``: that kernel's (GEMV_TILE / MMA_TILE).
    Never waits for the GPU."""
    n, k = shape
    m = x.numel() // max(k, 1)
    kernel = kernel or choose(x, n, k, blocksize) or "mma"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    tile = _tile(kernel, tile, blocksize)
    if x.dtype not in (torch.bfloat16, torch.float16) or not _fits(kernel, m, k, blocksize, tile):
        rows = "one row" if kernel == "gemv" else "rows"
        raise ValueError(
            f"linear_4bit's {kernel} kernel takes {rows} of 16-bit x and K in whole {tile[1]} tiles "
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
    args = (
        x2, packed.reshape(-1).view(torch.uint8), absmax if nested else absmax.to(torch.float32),
        quant_map.to(torch.float32), *nested_args, bias if bias is not None else out,
    )  # fmt: skip
    common = dict(QBLOCK=blocksize, NESTED=nested, NBLOCK=NESTED_BLOCKSIZE, HAS_BIAS=bias is not None)
    block_n, block_k, warps = tile[:3]
    with device_guard(x):
        if kernel == "gemv":
            _w4a16_gemv_kernel[(triton.cdiv(n, block_n), m)](
                *args, out, m, n, k, x2.stride(0), **common, BLOCK_N=block_n, BLOCK_K=block_k,
                **warps_option(warps, warps), **launch_options(),
            )  # fmt: skip
        else:
            block_m = tile[4] if len(tile) > 4 else MMA_M
            stages = tile[5] if len(tile) > 5 else 1
            split = max(1, min(tile[3], k // block_k))
            if split * m * n >= 2**31:  # the kernels index the partials [split, M, N] in int32
                split = 1
            part = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
            _w4a16_mma_kernel[(triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))](
                *args, part, m, n, k, x2.stride(0), **common, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                SPLIT=split, STAGES=stages, BF16_BY_HAND=by_hand, **warps_option(warps, warps), **launch_options(),
            )  # fmt: skip
            if split > 1:
                _split_sum_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
                    part, bias if bias is not None else out, out, m * n, n, SPLIT=split, HAS_BIAS=bias is not None,
                    BLOCK=SUM_BLOCK, **launch_options(),
                )  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _tile(kernel: str, tile: tuple | None, blocksize: int) -> tuple:
    block_n, block_k, *rest = tile or (GEMV_TILE if kernel == "gemv" else MMA_TILE)
    return block_n, max(block_k, blocksize), *rest


def _fits(kernel: str, m: int, k: int, blocksize: int, tile: tuple) -> bool:
    block_k = tile[1]
    return 0 < m and (kernel != "gemv" or m == 1) and k % block_k == 0 and block_k % blocksize == 0
