"""Double quantization of the 4-bit absmax (nested 8-bit dynamic codes) as Triton kernels.

Bit-exact twins of ``qtool.reference.double_quant``. The offset (the mean of absmax) is ``torch.mean`` in the
launcher on purpose: its summation order decides the last bit and must be PyTorch's on that device, as in bnb.
One program handles ``NESTED`` nested blocks of ``NBLOCK`` (= 256) absmax values.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qtool.reference.codebooks import NESTED_BLOCKSIZE, dynamic_map

from ._common import check_device, device_guard, device_scalar, launch_options

# absmax values per program; an FP4/NF4 weight of 56M elements has 0.9M absmax values -> 220 programs.
DEFAULT_TILE = 4096


@triton.jit
def _quantize_absmax_kernel(
    # pointers
    absmax_ptr,  # *fp32 [nblocks]
    codes_ptr,  # *u8 [nblocks], stored as weight.absmax
    nested_absmax_ptr,  # *fp32 [nnested]
    code_ptr,  # *fp32 [256], the sorted dynamic map
    offset_ptr,  # *fp32 [1], the mean of absmax (read here: the launcher never waits for it)
    # sizes
    nblocks,
    nnested,
    # format constexprs
    NBLOCK: tl.constexpr,  # nested blocksize (256)
    # tile constexprs
    NESTED: tl.constexpr,  # nested blocks per program
):
    # One program: NESTED nested blocks -> their nested_absmax and NESTED * NBLOCK codes.
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * NESTED + tl.arange(0, NESTED)
    offs = offs_b[:, None] * NBLOCK + tl.arange(0, NBLOCK)[None, :]  # [NESTED, NBLOCK]
    mask = offs < nblocks
    a = tl.where(mask, tl.load(absmax_ptr + offs, mask=mask, other=0.0) - tl.load(offset_ptr), 0.0)
    nested_absmax = tl.max(tl.where(a != a, 0.0, tl.abs(a)), axis=1)  # NaN ignored (abs_ignoring_nan)
    recip = tl.math.div_rn(tl.full([NESTED], 1.0, tl.float32), nested_absmax)
    x = a * recip[:, None]
    # bnb CUDA's dQuantize<0>: binary search from pivot 127 with steps 64..1, tracking the bracketing pivots.
    pivot = tl.full([NESTED, NBLOCK], 127, tl.int32)
    upper_pivot = tl.full([NESTED, NBLOCK], 255, tl.int32)
    lower_pivot = tl.full([NESTED, NBLOCK], 0, tl.int32)
    upper = tl.full([NESTED, NBLOCK], 1.0, tl.float32)
    lower = tl.full([NESTED, NBLOCK], -1.0, tl.float32)
    val = tl.load(code_ptr + pivot)
    for i in tl.static_range(7):
        step = 64 >> i
        right = x > val
        lower_pivot = tl.where(right, pivot, lower_pivot)
        lower = tl.where(right, val, lower)
        upper_pivot = tl.where(right, upper_pivot, pivot)
        upper = tl.where(right, upper, val)
        pivot = tl.where(right, pivot + step, pivot - step)
        val = tl.load(code_ptr + pivot)
    upper = tl.where(upper_pivot == 255, tl.load(code_ptr + 255), upper)
    lower = tl.where(lower_pivot == 0, tl.load(code_ptr + 0), lower)
    right = x > val
    go_up = x > (upper + val) * 0.5
    go_down = x < (lower + val) * 0.5
    code = tl.where(right, tl.where(go_up, upper_pivot, pivot), tl.where(go_down, lower_pivot, pivot))
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(nested_absmax_ptr + offs_b, nested_absmax, mask=offs_b < nnested)


@triton.jit
def rebuild_absmax(codes_ptr, nested_absmax_ptr, code_ptr, offset_ptr, offs, mask, NBLOCK: tl.constexpr):
    """The float32 absmax at offs from its codes: ``code[c] * nested_absmax[block]``, THEN ``+ offset``: two
    roundings, as the reference (callers launch without fp fusion). Shared with the 4-bit dequantize kernel."""
    c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(nested_absmax_ptr + offs // NBLOCK, mask=mask, other=0.0)
    return tl.load(code_ptr + c) * scale + tl.load(offset_ptr)


@triton.jit
def _dequantize_absmax_kernel(
    codes_ptr,  # *u8 [nblocks]
    nested_absmax_ptr,  # *fp32 [nnested]
    code_ptr,  # *fp32 [256], the stored nested_quant_map
    out_ptr,  # *fp32 [nblocks]
    offset_ptr,  # *fp32 [1]
    nblocks,
    NBLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # One program: BLOCK_SIZE absmax values.
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < nblocks
    absmax = rebuild_absmax(codes_ptr, nested_absmax_ptr, code_ptr, offset_ptr, offs, mask, NBLOCK)
    tl.store(out_ptr + offs, absmax, mask=mask)


def quantize_absmax(
    absmax: torch.Tensor, *, nested_blocksize: int = NESTED_BLOCKSIZE, tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``qtool.reference.double_quant.quantize_absmax_ref``.

    Returns ``(absmax_codes, nested_absmax, nested_offset)``: uint8 [nblocks], float32 [nnested], float32 0-d, all
    on absmax's device. Never waits for the GPU.
    """
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(f"absmax must be a non-empty 1-D float32 tensor, got {absmax.dtype} {tuple(absmax.shape)}")
    check_device(absmax)
    absmax = absmax.contiguous()
    nblocks = absmax.numel()
    nnested = math.ceil(nblocks / nested_blocksize)
    nested_offset = absmax.mean()
    codes = torch.empty(nblocks, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(nnested, dtype=torch.float32, device=absmax.device)
    per = min(
        triton.next_power_of_2(max(1, (tile or DEFAULT_TILE) // nested_blocksize)), triton.next_power_of_2(nnested)
    )
    with device_guard(absmax):
        _quantize_absmax_kernel[(triton.cdiv(nnested, per),)](
            absmax,
            codes,
            nested_absmax,
            dynamic_map(absmax.device),
            nested_offset.reshape(1),
            nblocks,
            nnested,
            NBLOCK=nested_blocksize,
            NESTED=per,
            **launch_options(),
        )
    return codes, nested_absmax, nested_offset


def dequantize_absmax(
    absmax_codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    nested_offset: torch.Tensor | float,
    *,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tile: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``qtool.reference.double_quant.dequantize_absmax_ref``: float32 [nblocks]. Never waits for the
    GPU (a tensor ``nested_offset`` is read on the device)."""
    check_device(absmax_codes, nested_absmax, nested_quant_map)
    codes = absmax_codes.reshape(-1).contiguous()
    nblocks = codes.numel()
    out = torch.empty(nblocks, dtype=torch.float32, device=codes.device)
    block = min(triton.next_power_of_2(tile or DEFAULT_TILE), triton.next_power_of_2(nblocks))
    with device_guard(codes):
        _dequantize_absmax_kernel[(triton.cdiv(nblocks, block),)](
            codes,
            nested_absmax.to(torch.float32).contiguous(),
            nested_quant_map.to(torch.float32).contiguous(),
            out,
            device_scalar(nested_offset, codes.device),
            nblocks,
            NBLOCK=nested_blocksize,
            BLOCK_SIZE=block,
            **launch_options(),
        )
    return out
