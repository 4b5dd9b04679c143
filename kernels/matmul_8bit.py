"""W8A8 with LLM.int8's outliers: ``y = x W^T + b`` for W in bnb's row-wise int8 format, on the int8 tensor cores.

Twins (and oracles): ``int8_activations`` is ``qtool.linear.int8_activations_ref`` bit for bit; ``linear_8bit`` is
``qtool.linear.linear_8bit_ref`` with a threshold (bnb ``Linear8bitLt``'s inference math).

Up to five launches, no host sync (so CUDA graphs and ``torch.compile`` keep the layer whole):

1. With a threshold, ``_outlier_cols_kernel`` flags every column of x holding an element of magnitude >= threshold
   (programs only ever store 1 into the zeroed flags, so their races are harmless).
2. ``_int8_activations_kernel``: each row's absmax over the elements below the threshold, and the int8 codes, 0 in
   the outlier columns (bnb's CA).
3. ``_int8_matmul_kernel``: the int32 product on the tensor cores; the epilogue scales by
   ``SCA * SCB * LLM_INT8_SCALE`` in float32, adds the bias and rounds to x's dtype (bnb's ``int8_mm_dequant``).
4. With a threshold, ``_compact_cols_kernel`` lists the flagged columns (one program, a running prefix sum), and
   ``_outlier_addmm_kernel`` adds x's outlier columns times W's dequantized columns (in x's dtype) onto that output,
   one more rounding, as bnb's ``addmm`` does. It gathers only the listed columns (bnb gathers them too, then calls
   cuBLAS) and returns at once when there is none. Keeping it out of the matmul keeps the matmul's registers for
   the int32 tile: with it inside, the common case without outliers ran 1.8x slower on the H100; walking the
   flagged 32-column tiles instead of a list made FLUX's step (outliers in most tiles) slower than bnb's.

Under the interpreter bf16 x comes in as a float32 copy and every bf16 rounding is done on the bits (cpu-testing.md
§2.2), so the CPU tests see the GPU's arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.linear import LLM_INT8_SCALE
from qtool.reference.quant8 import INV_127

from ._common import INTERPRETING, check_device, device_guard, launch_options, round_16bit, warps_option
from .quant_8bit import round_to_int8

_SCALE = tl.constexpr(LLM_INT8_SCALE)
_INV_127 = tl.constexpr(INV_127)

# Outlier columns: the tile per program. Activation quantization: rows per program and the K chunk (two passes over
# K when a row is longer).
FLAG_TILE = (64, 256)
ACT_ROWS = 16 if INTERPRETING else 1
ACT_BLOCK_K = 4096 if INTERPRETING else 2048
ACT_WARPS = 4
# Matmul tiles: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for a large M and for a few rows (decode).
# H100 sweep (bench_matmul.py --sweep, 4608 x 3072 -> 12288, with the outlier pass then inside the matmul):
# 128x128x256, 8 warps, 3 stages 709 us; 128x128x128, 8 warps, 4 stages 829 us; 128x256 tiles or 4 warps 2-4 ms
# (register spills). Without it the first takes 438-464 us (bf16: 511). 16 rows x 4096 -> 14336: 16x64x256 35 us.
LARGE_TILE = (32, 32, 64, 4, 1) if INTERPRETING else (128, 128, 256, 8, 3)
SMALL_TILE = (16, 32, 64, 4, 1) if INTERPRETING else (16, 64, 256, 4, 4)
SMALL_M = 16
GROUP_M = 8
# The outlier part: (BLOCK_M, BLOCK_N, BLOCK_K, warps) over the compacted outlier columns, and the compaction's chunk.
OUTLIER_TILE = (32, 32, 16, 4) if INTERPRETING else (128, 128, 32, 8)
COMPACT_BLOCK = 64 if INTERPRETING else 4096  # small in the interpreter: the tests cross chunks


@triton.jit
def _outlier_cols_kernel(
    x_ptr,  # *fp16|bf16|fp32 [M, K]
    cols_ptr,  # *i32 [K], zeroed by the caller: 1 for each outlier column
    M,
    K,
    stride_xm,
    threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    a = _load_fp16(x_ptr, offs_m, offs_m < M, k0, K, stride_xm, BLOCK_K)
    hit = tl.max((tl.abs(a) >= threshold).to(tl.int32), axis=0)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(cols_ptr + offs_k, hit, mask=(offs_k < K) & (hit > 0))


@triton.jit
def _int8_activations_kernel(
    x_ptr,  # *fp16|bf16|fp32 [M, K], row stride stride_xm
    ca_ptr,  # *i8 [M, K]
    sca_ptr,  # *fp32 [M]
    cols_ptr,  # *i32 [K] outlier-column flags (THRESHOLD only)
    M,
    K,
    stride_xm,
    threshold,
    THRESHOLD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask_m = offs_m < M
    absmax = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_fp16(x_ptr, offs_m, mask_m, k0, K, stride_xm, BLOCK_K)
        if THRESHOLD:
            a = tl.where(tl.abs(a) >= threshold, 0.0, a)
        absmax = tl.maximum(absmax, tl.max(tl.abs(a), axis=1))
    # bnb: A * (127.0 / row_stats), which PyTorch computes as row_stats.reciprocal() * 127: two float32 roundings
    # (div_rn: Triton's "/" is approximate on the GPU).
    scale = 127.0 * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), absmax)
    for k0 in range(0, K, BLOCK_K):
        a = _load_fp16(x_ptr, offs_m, mask_m, k0, K, stride_xm, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if THRESHOLD:
            flagged = tl.load(cols_ptr + offs_k, mask=offs_k < K, other=0) > 0
            a = tl.where(flagged[None, :], 0.0, a)
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        tl.store(ca_ptr + offs_m[:, None] * K + offs_k[None, :], round_to_int8(a * scale[:, None]), mask=mask)
    tl.store(sca_ptr + offs_m, absmax, mask=mask_m)


@triton.jit
def _load_fp16(x_ptr, offs_m, mask_m, k0, K, stride_xm, BLOCK_K: tl.constexpr):
    # x's float16 cast (bnb quantizes A.to(float16)) as float32, [ROWS, BLOCK_K] from column k0.
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    return a.to(tl.float16).to(tl.float32)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    # Grouped launch order: GROUP row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group
    pid_n = (pid % per_group) // group
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def _int8_matmul_kernel(
    ca_ptr,  # *i8 [M, K]
    cb_ptr,  # *i8 [N, K]: the stored weight
    sca_ptr,  # *fp32 [M]
    scb_ptr,  # *fp32 [N]
    bias_ptr,  # *bf16|fp16 [N] (HAS_BIAS)
    out_ptr,  # *bf16|fp16 [M, N] (float32 with BY_HAND)
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    STAGES: tl.constexpr,
    BY_HAND: tl.constexpr,
):
    offs_m, offs_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = ca_ptr + offs_m[:, None] * K + offs_k[None, :]
    b_ptrs = cb_ptr + offs_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        mask_k = (k0 + offs_k < K)[None, :]
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k, other=0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_k, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sca = tl.load(sca_ptr + offs_m, mask=mask_m, other=0.0)
    scb = tl.load(scb_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * (sca[:, None] * scb[None, :]) * _SCALE
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, round_16bit(y, out_ptr.dtype.element_ty, BY_HAND), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _compact_cols_kernel(
    cols_ptr,  # *i32 [K] outlier-column flags
    idx_ptr,  # *i32 [K + 1]: the flagged columns in order, then (at K) how many there are
    K,
    BLOCK: tl.constexpr,
):
    # One program: a running prefix sum of the flags gives each flagged column its slot.
    count = 0
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        f = tl.load(cols_ptr + offs, mask=offs < K, other=0)
        slot = count + tl.cumsum(f, axis=0) - 1
        tl.store(idx_ptr + slot, offs.to(tl.int32), mask=f > 0)
        count += tl.sum(f, axis=0)
    tl.store(idx_ptr + K, count)


@triton.jit
def _outlier_addmm_kernel(
    x_ptr,  # *bf16|fp16 [M, K] (float32 with BY_HAND), row stride stride_xm
    cb_ptr,  # *i8 [N, K]
    scb_ptr,  # *fp32 [N]
    idx_ptr,  # *i32 [K + 1]: the outlier columns, their count at K
    out_ptr,  # *bf16|fp16 [M, N], read and written (float32 with BY_HAND)
    M,
    N,
    K,
    stride_xm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    BY_HAND: tl.constexpr,
):
    count = tl.load(idx_ptr + K)
    if count > 0:
        offs_m, offs_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
        mask_m = offs_m < M
        mask_n = offs_n < N
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        y = tl.load(out, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        scb = tl.load(scb_ptr + offs_n, mask=mask_n, other=0.0)
        for c0 in range(0, count, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            valid = (c < count)[None, :]
            ks = tl.load(idx_ptr + c, mask=c < count, other=0).to(tl.int64)
            b = tl.load(cb_ptr + offs_n[:, None] * K + ks[None, :], mask=mask_n[:, None] & valid, other=0)
            xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & valid, other=0.0)
            # W's outlier columns as bnb's int8_vectorwise_dequant gives them, rounded to x's dtype
            w = round_16bit(b.to(tl.float32) * scb[:, None] * _INV_127, xo.dtype, BY_HAND)
            y = tl.dot(xo, tl.trans(w), y)
        tl.store(out, round_16bit(y, out_ptr.dtype.element_ty, BY_HAND), mask=mask_m[:, None] & mask_n[None, :])


def int8_activations(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``qtool.linear.int8_activations_ref`` for a [M, K] x: int8 CA, float32 SCA and the outlier
    columns (bool [K]; all False without a threshold). Never waits for the GPU."""
    if x.dim() != 2:
        raise ValueError(f"int8_activations takes a [M, K] x, got {tuple(x.shape)}")
    check_device(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    ca, sca, cols = _activations(x, threshold)
    return ca, sca, cols.bool()


def _activations(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    ca = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sca = torch.empty(m, dtype=torch.float32, device=x.device)
    cols = torch.zeros(k, dtype=torch.int32, device=x.device)
    with device_guard(x):
        if threshold > 0:
            block_m, block_k = FLAG_TILE
            _outlier_cols_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
                x, cols, m, k, x.stride(0), float(threshold), BLOCK_M=block_m, BLOCK_K=block_k, **launch_options()
            )
        _int8_activations_kernel[(triton.cdiv(m, ACT_ROWS),)](
            x, ca, sca, cols, m, k, x.stride(0), float(threshold), THRESHOLD=threshold > 0, ROWS=ACT_ROWS,
            BLOCK_K=min(ACT_BLOCK_K, triton.next_power_of_2(k)), **warps_option(None, ACT_WARPS), **launch_options(),
        )  # fmt: skip
    return ca, sca, cols


def linear_8bit(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    SCB: torch.Tensor,  # noqa: N803
    bias: torch.Tensor | None = None,
    *,
    threshold: float,
    tile: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.linear.linear_8bit_ref(..., threshold=threshold)`` for 16-bit x: [..., K] -> [..., N].

    ``tile`` = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the matmul; by default ``SMALL_TILE`` up to
    ``SMALL_M`` rows of x, ``LARGE_TILE`` above. Never waits for the GPU."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"linear_8bit's kernel takes bf16 or fp16 x, got {x.dtype}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    n, k = weight_int8.shape
    if x.shape[-1] != k:
        raise ValueError(f"x {tuple(x.shape)} and an int8 weight {tuple(weight_int8.shape)} do not match")
    check_device(x, weight_int8, SCB)
    weight_int8 = weight_int8.contiguous()  # the kernels index it as row-major [N, K]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    ca, sca, cols = _activations(x2, threshold)
    by_hand = INTERPRETING and x.dtype == torch.bfloat16
    if by_hand:  # the interpreter's bf16 arithmetic is not the GPU's (cpu-testing.md §2.2)
        x2 = x2.float()
        bias = bias.float() if bias is not None else None
    out = torch.empty((m, n), dtype=x2.dtype, device=x.device)
    scb = SCB.reshape(-1).to(torch.float32)
    block_m, block_n, block_k, warps, stages = tile or (SMALL_TILE if m <= SMALL_M else LARGE_TILE)
    with device_guard(x):
        _int8_matmul_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
            ca, weight_int8, sca, scb, bias if bias is not None else out, out, m, n, k, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=GROUP_M, STAGES=stages, BY_HAND=by_hand,
            **warps_option(warps, warps), **launch_options(),
        )  # fmt: skip
        if threshold > 0:
            idx = torch.empty(k + 1, dtype=torch.int32, device=x.device)
            _compact_cols_kernel[(1,)](cols, idx, k, BLOCK=min(COMPACT_BLOCK, triton.next_power_of_2(k)))
            block_m, block_n, block_k, warps = OUTLIER_TILE
            _outlier_addmm_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
                x2, weight_int8, scb, idx, out, m, n, k, x2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_K=block_k, GROUP=GROUP_M, BY_HAND=by_hand, **warps_option(warps, warps), **launch_options(),
            )  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


__all__ = ["int8_activations", "linear_8bit"]
