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

# The CUDA-core variant ("rows"): up to ROWS_MAX_M rows of x, one per program-grid row, K in whole BLOCK_K tiles.
ROWS_MAX_M = 4
ROWS_BLOCK_N = 16 if INTERPRETING else 8
ROWS_BLOCK_K = 512
ROWS_WARPS = 2
ROWS_STAGES = 1
# The tensor-core variant ("dot"): tiles (BLOCK_M rows of x, BLOCK_N rows of W, BLOCK_K, warps, stages), one for a
# few rows of x (decode) and one for many (prefill, diffusion). W's tile is the MMA's left operand (out^T = W x^T).
DOT_SMALL_M = 16
DOT_SMALL = (16, 32, 64, 4, 1) if INTERPRETING else (16, 64, 256, 4, 4)
DOT_LARGE = (32, 32, 64, 4, 1) if INTERPRETING else (128, 128, 64, 8, 3)
GROUP_M = 8


# Which kernel serves which M on the GPU, from benchmarks/bench_matmul.py --sweep on the H100: (largest M, variant);
# above the last entry, dequantize + cuBLAS.
DISPATCH = ((ROWS_MAX_M, "rows"), (DOT_SMALL_M, "dot"))


def choose(x: torch.Tensor, n: int, k: int, blocksize: int = 64) -> str | None:
    """The variant ``qtool.linear`` calls for x [..., K] against an [N, K] weight ("rows" or "dot"), or None where
    dequantize + cuBLAS is faster (or no kernel takes the shape: 16-bit x, K a multiple of the blocksize)."""
    m = x.numel() // max(k, 1)
    if x.dtype not in (torch.bfloat16, torch.float16) or m == 0 or n == 0 or k % blocksize:
        return None
    for top, variant in DISPATCH:
        if m <= top and (variant != "rows" or _rows_fit(m, k, blocksize, max(ROWS_BLOCK_K, blocksize))):
            return variant
    return None


@triton.jit
def _w4a16_dot_kernel(
    x_ptr,  # *bf16|fp16 [M, K] (float32 with BF16_BY_HAND), row stride stride_xm
    packed_ptr,  # *u8 [N * K / 2], row-major W, element 2j in the high nibble
    absmax_ptr,  # *fp32 [nblocks], or *u8 codes with NESTED
    qmap_ptr,  # *fp32 [16]
    nested_absmax_ptr,  # *fp32 (NESTED only)
    nested_map_ptr,  # *fp32 [256] (NESTED only)
    offset_ptr,  # *fp32 [1] (NESTED only)
    bias_ptr,  # *bf16|fp16 [N] (HAS_BIAS only)
    out_ptr,  # *bf16|fp16 [M, N], row stride N
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
    BLOCK_K: tl.constexpr,  # a multiple of QBLOCK
    GROUP: tl.constexpr,
    STAGES: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    # out^T tile [BLOCK_N, BLOCK_M] = W tile [BLOCK_N, BLOCK_K] @ x^T tile [BLOCK_K, BLOCK_M]: W, dequantized in
    # registers as the reference does (quant_map[code] * absmax in float32, rounded to x's dtype), is the MMA's left
    # operand, which can stay in registers; x goes through shared memory. INTERLEAVE puts each byte's two elements
    # side by side (one dot over BLOCK_K, x loaded contiguous); otherwise the even and odd elements meet x's even
    # and odd columns in two dots of BLOCK_K / 2 (no shuffle of W, x loaded with a stride of 2).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group
    pid_n = (pid % per_group) // group
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_b = tl.arange(0, BLOCK_K // QBLOCK)
    offs_j = tl.arange(0, QBLOCK // 2)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        # [BLOCK_N, BLOCK_K / QBLOCK] blocks; a block never straddles rows (QBLOCK divides K here)
        blk = (offs_n[:, None] * K + k0) // QBLOCK + offs_b[None, :]
        mask_b = mask_n[:, None] & (k0 + offs_b * QBLOCK < K)[None, :]
        if NESTED:
            a = rebuild_absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, blk, mask_b, NBLOCK)
        else:
            a = tl.load(absmax_ptr + blk, mask=mask_b, other=0.0)
        p = tl.load(packed_ptr + blk[:, :, None] * (QBLOCK // 2) + offs_j[None, None, :], mask=mask_b[:, :, None],
                    other=0).to(tl.int32)  # fmt: skip
        w_hi = _round_w(tl.load(qmap_ptr + (p >> 4)) * a[:, :, None], dtype, BF16_BY_HAND)
        w_lo = _round_w(tl.load(qmap_ptr + (p & 15)) * a[:, :, None], dtype, BF16_BY_HAND)
        if INTERLEAVE:
            w = tl.reshape(tl.join(w_hi, w_lo), [BLOCK_N, BLOCK_K])
            ks = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None], mask=mask_m[None, :] & (ks < K)[:, None],
                         other=0.0)  # fmt: skip
            acc = tl.dot(w, xt, acc)
        else:
            ke = k0 + 2 * tl.arange(0, BLOCK_K // 2)  # the even columns
            mask_x = mask_m[None, :] & (ke < K)[:, None]
            x_even = tl.load(x_ptr + offs_m[None, :] * stride_xm + ke[:, None], mask=mask_x, other=0.0)
            x_odd = tl.load(x_ptr + offs_m[None, :] * stride_xm + ke[:, None] + 1, mask=mask_x, other=0.0)
            acc = tl.dot(tl.reshape(w_hi, [BLOCK_N, BLOCK_K // 2]), x_even, acc)
            acc = tl.dot(tl.reshape(w_lo, [BLOCK_N, BLOCK_K // 2]), x_odd, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + offs_m[None, :] * N + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _round_w(w, dtype, BF16_BY_HAND: tl.constexpr):
    # W in x's dtype, as the reference's dequantize rounds it (to nearest even). The interpreter's float32 -> bf16
    # cast truncates, so there W stays float32 holding the bf16-rounded value.
    if BF16_BY_HAND:
        return (bf16_rne_bits(w) << 16).to(tl.float32, bitcast=True)
    return w.to(dtype)


@triton.jit
def _w4a16_rows_kernel(
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
    STAGES: tl.constexpr,
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
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
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
            w_hi = _round_w(tl.load(qmap_ptr + (p >> 4)) * a[:, :, None], dtype, BF16_BY_HAND).to(tl.float32)
            w_lo = _round_w(tl.load(qmap_ptr + (p & 15)) * a[:, :, None], dtype, BF16_BY_HAND).to(tl.float32)
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
    variant: str | None = None,
    tile: tuple[int, int, int, int, int] | None = None,
    interleave: bool = True,
    scale_after: bool = True,
) -> torch.Tensor:
    """Triton twin of ``qtool.linear.linear_4bit_ref``: 16-bit [..., K] -> [..., N] in x's dtype.

    ``variant``: "rows" (CUDA cores; at most ``ROWS_MAX_M`` rows of x, K a multiple of the K tile) or "dot" (tensor
    cores, any M); None picks "rows" where it can, else "dot". ``tile``: "rows" (BLOCK_N, BLOCK_K, warps, stages), "dot"
    (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); None: the defaults above. ``interleave`` / ``scale_after``: the
    "dot" / "rows" kernel's options (see the kernels). Never waits for the GPU."""
    n, k = shape
    rows = x.numel() // max(k, 1)
    if x.dtype not in (torch.bfloat16, torch.float16) or rows == 0 or k % blocksize:
        raise ValueError(f"linear_4bit's kernels take 16-bit x and K a multiple of the blocksize: {tuple(x.shape)}")
    if variant not in (None, "rows", "dot"):
        raise ValueError(f"variant must be 'rows' or 'dot', got {variant!r}")
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
    args = (
        x2, packed.reshape(-1).view(torch.uint8), absmax if nested else absmax.to(torch.float32),
        quant_map.to(torch.float32), *nested_args, bias if bias is not None else out, out, m, n, k, x2.stride(0),
    )  # fmt: skip
    common = {"QBLOCK": blocksize, "NESTED": nested, "NBLOCK": NESTED_BLOCKSIZE, "HAS_BIAS": bias is not None,
              "BF16_BY_HAND": by_hand, **launch_options()}  # fmt: skip
    if variant is None:
        variant = "rows" if _rows_fit(m, k, blocksize, tile[1] if tile else ROWS_BLOCK_K) else "dot"
    with device_guard(x):
        if variant == "rows":
            block_n, block_k, warps, stages = tile or (ROWS_BLOCK_N, max(ROWS_BLOCK_K, blocksize), ROWS_WARPS,
                                                       ROWS_STAGES)  # fmt: skip
            if not _rows_fit(m, k, blocksize, block_k):
                raise ValueError(f"the rows variant takes at most {ROWS_MAX_M} rows and K in whole {block_k} tiles")
            _w4a16_rows_kernel[(triton.cdiv(n, block_n), m)](
                *args, BLOCK_N=block_n, BLOCK_K=block_k, SCALE_AFTER=scale_after, STAGES=stages, **common,
                **warps_option(warps, warps),
            )  # fmt: skip
        else:
            block_m, block_n, block_k, warps, stages = tile or (DOT_SMALL if m <= DOT_SMALL_M else DOT_LARGE)
            if tile is None:
                block_k = max(block_k, blocksize)  # blocksizes are powers of two
            if block_k % blocksize:
                raise ValueError(f"the dot variant's K tile ({block_k}) must be a multiple of the blocksize")
            grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
            _w4a16_dot_kernel[grid](
                *args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=GROUP_M, STAGES=stages,
                INTERLEAVE=interleave, **common, **warps_option(warps, warps),
            )  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _rows_fit(m: int, k: int, blocksize: int, block_k: int) -> bool:
    return m <= ROWS_MAX_M and k % block_k == 0 and block_k % blocksize == 0
