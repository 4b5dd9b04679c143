"""Scale search as Triton kernels: per 4-bit block or 8-bit row, the stored scale with the least squared error.

Bit-exact twins of ``qtool.reference.scale_search`` (the rule is in its docstring). Each candidate's errors are
summed as int64 fixed-point values, so the GPU's reduction order gives the reference's sums exactly, and the first
smallest wins in both. The candidates' codes are the plain quantizers' codes (the same code search and rounding),
so ``quantize_4bit(..., absmax=searched)`` reproduces the codes the search measured.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qtool.reference.codebooks import SCALE_STEPS, quant_map, scale_grid
from qtool.reference.quant4 import check_4bit_args
from qtool.reference.quant8 import check_8bit_args
from qtool.reference.scale_search import ERROR_ONE

from ._common import INTERPRETING, check_device, device_guard, launch_options, warps_option
from .quant_4bit import (
    block_absmax,
    blocks_per_program,
    code_tables,
    codes_4bit,
    load_pairs,
    pairs_view,
    quantize_constexprs,
)
from .quant_8bit import round_to_int8, row_absmax, tile_shape

_ERROR_ONE = tl.constexpr(ERROR_ONE)
_NO_ERROR_YET = tl.constexpr(2**63 - 1)

# Elements per program and warps when the caller gives none. The search is ~SCALE_STEPS times the arithmetic of a
# plain quantize over the same bytes (a few ms for a whole FLUX transformer on an H100), so the tiles are the
# quantizers' own.
SEARCH_4BIT_TILE = 16384 if INTERPRETING else 2048
SEARCH_4BIT_WARPS = 4
SEARCH_8BIT_TILE = 16384 if INTERPRETING else 4096
SEARCH_8BIT_K = 4096 if INTERPRETING else 1024
SEARCH_8BIT_WARPS = 8


@triton.jit
def _fixed(d):
    # scale_search._fixed: d * d in ERROR_ONE units, truncated to int64; NaN and infinite d count 0.
    finite = (d - d) == 0.0  # NaN - NaN and inf - inf are NaN
    return tl.where(finite, d * d * _ERROR_ONE, 0.0).to(tl.int64)


@triton.jit
def _search_absmax_kernel(
    # pointers
    w_ptr,  # *fp32|fp16|bf16 [n], the flattened weight, or *i32 [n / 2] with PAIRS
    out_ptr,  # *fp32 [nblocks], the chosen absmax
    thr_ptr,  # *fp32: the code search's table (quant_4bit.code_tables)
    qmap_ptr,  # *fp32 [16], the quant map
    grid_ptr,  # *fp32 [STEPS], codebooks.scale_grid(4)
    # sizes
    n,
    nblocks,
    # format constexprs
    QBLOCK: tl.constexpr,
    IS_NF4: tl.constexpr,
    STEPS: tl.constexpr,
    # layout and code generation constexprs, as in quant_4bit's quantize kernel
    PAIRS: tl.constexpr,
    IS_BF16: tl.constexpr,
    MAX_SKIPS_NAN: tl.constexpr,
    BUCKETS: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    # One program: BLOCKS quantization blocks, read once, every candidate scale tried on them in registers.
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCKS + tl.arange(0, BLOCKS)
    offs_p = offs_b[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]
    even, odd = load_pairs(w_ptr, offs_p, n, PAIRS, IS_BF16, EVEN)
    absmax = block_absmax(even, odd, MAX_SKIPS_NAN)
    recip = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), absmax)[:, None]
    t_even = even * recip  # x / a: the errors' unit is the absmax
    t_odd = odd * recip
    best_err = tl.full([BLOCKS], _NO_ERROR_YET, tl.int64)
    best = absmax
    for k in range(STEPS):
        c = tl.load(grid_ptr + k)
        s = absmax * c
        r = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), s)[:, None]
        v_even = tl.load(qmap_ptr + codes_4bit(even * r, thr_ptr, IS_NF4, BUCKETS)) * c
        v_odd = tl.load(qmap_ptr + codes_4bit(odd * r, thr_ptr, IS_NF4, BUCKETS)) * c
        err = tl.sum(_fixed(t_even - v_even) + _fixed(t_odd - v_odd), axis=1)
        better = err < best_err
        best_err = tl.where(better, err, best_err)
        best = tl.where(better, s, best)
    # A zero or infinite absmax (inf - inf is NaN) keeps itself: its errors are meaningless.
    best = tl.where((absmax == 0.0) | ((absmax - absmax) != 0.0), absmax, best)
    tl.store(out_ptr + offs_b, best, mask=offs_b < nblocks)


@triton.jit
def _search_scb_kernel(
    w_ptr,  # *fp32|fp16|bf16 [N, K], row-major
    out_ptr,  # *fp32 [N], the chosen SCB
    grid_ptr,  # *fp32 [STEPS], codebooks.scale_grid(8)
    N,
    K,
    STEPS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: ROWS rows. Their absmax, then per candidate one pass over K (after the first, mostly from L2).
    offs_n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask_n = offs_n < N
    absmax = row_absmax(w_ptr, offs_n, mask_n, K, BLOCK_K)
    t_scale = 127.0 * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), absmax)
    best_err = tl.full([ROWS], _NO_ERROR_YET, tl.int64)
    best = absmax
    for k in range(STEPS):
        c = tl.load(grid_ptr + k)
        s = absmax * c
        scale = 127.0 * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), s)
        err = tl.zeros([ROWS], dtype=tl.int64)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_n[:, None] & (offs_k < K)[None, :]
            x = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float16)
            x = x.to(tl.float32)
            q = round_to_int8(x * scale[:, None]).to(tl.float32)
            err += tl.sum(_fixed(x * t_scale[:, None] - q * c), axis=1)
        better = err < best_err
        best_err = tl.where(better, err, best_err)
        best = tl.where(better, s, best)
    best = tl.where((absmax == 0.0) | ((absmax - absmax) != 0.0), absmax, best)
    tl.store(out_ptr + offs_n, best, mask=mask_n)


def search_absmax(
    weight: torch.Tensor,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    tile: int | None = None,
    num_warps: int | None = None,
    search: str | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.reference.scale_search.search_absmax_ref``: float32 [ceil(n / blocksize)].

    ``tile``, ``num_warps`` and ``search`` as in ``quant_4bit.quantize_4bit``. Never waits for the GPU."""
    check_4bit_args(weight, quant_type, blocksize)
    check_device(weight)
    w = weight.contiguous().reshape(-1)
    n = w.numel()
    nblocks = math.ceil(n / blocksize)
    out = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    thresholds, buckets = code_tables(quant_type, search, w.device)
    pairs = pairs_view(w)
    blocks = blocks_per_program(blocksize, nblocks, tile, SEARCH_4BIT_TILE)
    with device_guard(w):
        _search_absmax_kernel[(triton.cdiv(nblocks, blocks),)](
            w if pairs is None else pairs,
            out,
            thresholds,
            quant_map(quant_type, w.device),
            scale_grid(4, w.device),
            n,
            nblocks,
            STEPS=SCALE_STEPS,
            **quantize_constexprs(w, quant_type, blocksize, blocks, buckets, pairs is not None),
            **warps_option(num_warps, SEARCH_4BIT_WARPS),
            **launch_options(),
        )
    return out


def search_scb(weight: torch.Tensor, *, tile: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Triton twin of ``qtool.reference.scale_search.search_scb_ref``: float32 [N]. Never waits for the GPU."""
    check_8bit_args(weight)
    check_device(weight)
    w = weight.contiguous()
    N, K = w.shape  # noqa: N806
    out = torch.empty(N, dtype=torch.float32, device=w.device)
    rows, block_k = tile_shape(N, K, tile or SEARCH_8BIT_TILE, SEARCH_8BIT_K)
    with device_guard(w):
        _search_scb_kernel[(triton.cdiv(N, rows),)](
            w,
            out,
            scale_grid(8, w.device),
            N,
            K,
            STEPS=SCALE_STEPS,
            ROWS=rows,
            BLOCK_K=block_k,
            **warps_option(num_warps, SEARCH_8BIT_WARPS),
            **launch_options(),
        )
    return out
