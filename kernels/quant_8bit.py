"""LLM.int8 row-wise weight quantize and dequantize as Triton kernels.

Bit-exact twins of ``qtool.reference.quant8``. Quantize: one program handles ``ROWS`` rows, in two passes over K
(row absmax, then codes) of ``BLOCK_K`` columns. Dequantize: a 2-D grid of [ROWS, BLOCK_K] tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.reference.quant4 import check_given_scales
from qtool.reference.quant8 import INV_127, check_8bit_args

from ._common import (
    INTERPRETING,
    bf16_bits,
    check_device,
    device_guard,
    launch_options,
    output_view,
    store_rounded,
    warps_option,
)

# 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude < 2**22 to an integer, half to even
# (IEEE round-to-nearest-even addition). libdevice.rint does the same on the GPU but not in the interpreter.
_RNE_MAGIC = tl.constexpr(12582912.0)
_INV_127 = tl.constexpr(INV_127)

# Elements per program, columns per tile and warps per program when the caller gives none. The interpreter keeps
# large tiles (~4 ms per program, cpu-testing.md §2.3) and at most 4096 columns; on the GPU the values were chosen
# by benchmarks/bench_codecs.py --sweep on an H100 (benchmarks/results/tuning/sweep.csv).
QUANTIZE_TILE = 16384 if INTERPRETING else 4096
QUANTIZE_WARPS = 8
ONE_PASS_K = 4096 if INTERPRETING else 16384
DEQUANTIZE_TILE = 16384 if INTERPRETING else 8192
DEQUANTIZE_K = 4096 if INTERPRETING else 1024
DEQUANTIZE_WARPS = 4


@triton.jit
def round_to_int8(v):
    """quant8.round_int8_ref: round half to even, clamp to [-127, 127], NaN (zero row: 0 * inf; inf row: inf * 0)
    to 0, as CUDA's float-to-int conversion. The clamp matters only for a given SCB below the row absmax."""
    r = tl.minimum(tl.maximum((v + _RNE_MAGIC) - _RNE_MAGIC, -127.0), 127.0)
    return tl.where(v != v, 0.0, r).to(tl.int8)


@triton.jit
def _quantize_8bit_rowwise_kernel(
    w_ptr,  # *fp32|fp16|bf16 [N, K], row-major
    q_ptr,  # *i8 [N, K]
    scb_ptr,  # *fp32 [N]: written, or read with GIVEN
    N,
    K,
    GIVEN: tl.constexpr,  # code against the SCB at scb_ptr (e.g. searched) instead of each row's absmax
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    # One program: ROWS rows -> their SCB and int8 codes. ONE_PASS (BLOCK_K >= K): each row is read once and kept
    # in registers; otherwise two passes over K (row absmax, then codes), the second mostly from L2.
    offs_n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask_n = offs_n < N
    if ONE_PASS:
        offs_k = tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        # bnb's Int8Params quantizes the float16 cast of every weight dtype.
        x = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float16)
        x = x.to(tl.float32)
        if GIVEN:
            absmax = tl.load(scb_ptr + offs_n, mask=mask_n, other=1.0)
        else:
            absmax = tl.max(tl.where(x != x, 0.0, tl.abs(x)), axis=1)  # NaN ignored (abs_ignoring_nan)
        scale = 127.0 * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), absmax)
        tl.store(q_ptr + offs_n[:, None] * K + offs_k[None, :], round_to_int8(x * scale[:, None]), mask=mask)
    else:
        if GIVEN:
            absmax = tl.load(scb_ptr + offs_n, mask=mask_n, other=1.0)
        else:
            absmax = row_absmax(w_ptr, offs_n, mask_n, K, BLOCK_K)
        # bnb CUDA: scale = 127 * reciprocal(SCB); here the reciprocal is IEEE-rounded, as in the reference.
        scale = 127.0 * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), absmax)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_n[:, None] & (offs_k < K)[None, :]
            x = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float16)
            q = round_to_int8(x.to(tl.float32) * scale[:, None])
            tl.store(q_ptr + offs_n[:, None] * K + offs_k[None, :], q, mask=mask)
    if not GIVEN:
        tl.store(scb_ptr + offs_n, absmax, mask=mask_n)


@triton.jit
def row_absmax(w_ptr, offs_n, mask_n, K, BLOCK_K: tl.constexpr):
    """The absmax of rows offs_n of the float16 cast of [N, K] weight, NaN ignored, BLOCK_K columns at a time."""
    absmax = tl.zeros(offs_n.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        x = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float16)
        ax = tl.abs(x.to(tl.float32))
        absmax = tl.maximum(absmax, tl.max(tl.where(ax != ax, 0.0, ax), axis=1))
    return absmax


@triton.jit
def _dequantize_8bit_rowwise_kernel(
    q_ptr,  # *i8 [N, K]
    scb_ptr,  # *fp32 [N]
    out_ptr,  # *fp32|fp16|bf16 [N, K] (an int16 view of bf16 under the interpreter)
    N,
    K,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    # One program: a [ROWS, BLOCK_K] tile -> (q * SCB) * INV_127, two float32 roundings as bnb.
    offs_n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    offs = offs_n[:, None] * K + offs_k[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    scb = tl.load(scb_ptr + offs_n, mask=offs_n < N, other=0.0)
    store_rounded(out_ptr + offs, (q * scb[:, None]) * _INV_127, mask, BF16_BITS)


def tile_shape(N: int, K: int, tile: int, max_k: int) -> tuple[int, int]:  # noqa: N803
    block_k = min(triton.next_power_of_2(K), max_k)
    rows = min(triton.next_power_of_2(max(1, tile // block_k)), triton.next_power_of_2(N))
    return rows, block_k


def quantize_8bit_rowwise(
    weight: torch.Tensor,
    *,
    SCB: torch.Tensor | None = None,  # noqa: N803
    tile: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``qtool.reference.quant8.quantize_8bit_rowwise_ref``: int8 [N, K] and float32 SCB [N]
    (``SCB``: code against these row scales, returned as they are).

    ``tile`` is elements per program, ``num_warps`` warps per program (GPU); both default to values tuned on an
    H100. A row of up to ``ONE_PASS_K`` columns is read once; longer rows twice."""
    check_8bit_args(weight)
    check_device(weight)
    w = weight.contiguous()
    N, K = w.shape  # noqa: N806
    q = torch.empty((N, K), dtype=torch.int8, device=w.device)
    given = SCB is not None
    if given:
        check_given_scales(SCB, N, "SCB")
        check_device(SCB)
        scb = SCB
    else:
        scb = torch.empty(N, dtype=torch.float32, device=w.device)
    rows, block_k = tile_shape(N, K, tile or QUANTIZE_TILE, ONE_PASS_K)
    with device_guard(w):
        _quantize_8bit_rowwise_kernel[(triton.cdiv(N, rows),)](
            w,
            q,
            scb,
            N,
            K,
            GIVEN=given,
            ROWS=rows,
            BLOCK_K=block_k,
            ONE_PASS=block_k >= K,
            **warps_option(num_warps, QUANTIZE_WARPS),
            **launch_options(),
        )
    return q, scb


def dequantize_8bit_rowwise(
    weight_int8: torch.Tensor,
    SCB: torch.Tensor,  # noqa: N803
    *,
    dtype: torch.dtype,
    tile: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.reference.quant8.dequantize_8bit_rowwise_ref``: dtype [N, K]."""
    if weight_int8.dim() != 2 or SCB.numel() != weight_int8.shape[0]:
        raise ValueError(f"int8 weight {tuple(weight_int8.shape)} and SCB {tuple(SCB.shape)} do not match")
    check_device(weight_int8, SCB)
    q = weight_int8.contiguous()
    N, K = q.shape  # noqa: N806
    out = torch.empty((N, K), dtype=dtype, device=q.device)
    rows, block_k = tile_shape(N, K, tile or DEQUANTIZE_TILE, DEQUANTIZE_K)
    with device_guard(q):
        _dequantize_8bit_rowwise_kernel[(triton.cdiv(N, rows), triton.cdiv(K, block_k))](
            q,
            SCB.to(torch.float32).contiguous(),
            output_view(out),
            N,
            K,
            ROWS=rows,
            BLOCK_K=block_k,
            BF16_BITS=bf16_bits(out),
            **warps_option(num_warps, DEQUANTIZE_WARPS),
            **launch_options(),
        )
    return out
