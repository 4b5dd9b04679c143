"""Double quantization of the 4-bit absmax vector ("nested" quantization), in pure PyTorch.

bnb's ``quantize_4bit(..., compress_statistics=True)``: offset = mean(absmax); the centred absmax is quantized
blockwise (256 per block) to 8-bit codes of the signed dynamic map. This module is the specification and oracle
for ``qtool.kernels.double_quant``. Format: ../shared/docs/bnb-format.md §1.6-1.7.
"""

from __future__ import annotations

import math

import torch

from qtool.reference.codebooks import NESTED_BLOCKSIZE, dynamic_map
from qtool.reference.quant4 import abs_ignoring_nan


def nearest_dynamic_code_ref(s: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bnb CUDA's dQuantize<0>: a 7-step binary search over the 256-entry sorted map, then a midpoint test.

    The result is the nearest code; a value exactly on a midpoint goes to the last pivot of the search (which
    may be the upper or the lower neighbour), and NaN goes to code 0. bnb's CPU path snaps s to a 65535-step
    grid first and differs from this in ~0.1% of codes, by one step (bnb-format.md §1.6).

    Args:
        s: float32, any shape, nominally in [-1, 1].
        code: float32 [256], sorted ascending.

    Returns:
        uint8 codes, same shape as s.
    """
    x = s.reshape(-1)
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    upper = torch.ones_like(x)
    lower = -torch.ones_like(x)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        lower = torch.where(right, val, lower)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    # Pivots 255 and 0 are never visited; their bounds are the table ends rather than the +-1 placeholders.
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > val
    # (upper + val) * 0.5 in float32, as the CUDA source computes the midpoint.
    go_up = x > (upper + val) * 0.5
    go_down = x < (lower + val) * 0.5
    result = torch.where(right, torch.where(go_up, upper_pivot, pivot), torch.where(go_down, lower_pivot, pivot))
    return result.to(torch.uint8).reshape(s.shape)


def quantize_absmax_ref(
    absmax: torch.Tensor, *, nested_blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a float32 absmax vector to 8-bit codes around its mean.

    Args:
        absmax: float32 [nblocks], the per-block absmax of a 4-bit weight.
        nested_blocksize: absmax values per nested block; bnb always uses 256.

    Returns:
        ``(absmax_codes, nested_absmax, nested_offset)``: uint8 [nblocks] (stored as ``weight.absmax``),
        float32 [ceil(nblocks / nested_blocksize)], and the float32 0-d offset (stored only in the JSON blob).

    The offset is ``torch.mean`` on absmax's own device: the summation order decides its last bit, and bnb
    computes it the same way on the device it quantizes on (bnb-format.md §1.6).
    """
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(f"absmax must be a non-empty 1-D float32 tensor, got {absmax.dtype} {tuple(absmax.shape)}")
    nblocks = absmax.numel()
    nested_offset = absmax.mean()
    centred = absmax - nested_offset
    nnested = math.ceil(nblocks / nested_blocksize)
    padded = torch.zeros(nnested * nested_blocksize, dtype=torch.float32, device=absmax.device)
    padded[:nblocks] = centred
    padded = padded.view(nnested, nested_blocksize)
    nested_absmax = abs_ignoring_nan(padded).amax(dim=1)
    # Same reciprocal-then-multiply as the 4-bit scale; a zero nested absmax gives NaN, which codes to 0.
    s = padded * torch.reciprocal(nested_absmax)[:, None]
    codes = nearest_dynamic_code_ref(s, dynamic_map(absmax.device)).reshape(-1)[:nblocks]
    return codes, nested_absmax, nested_offset


def dequantize_absmax_ref(
    absmax_codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    nested_offset: torch.Tensor | float,
    *,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """Rebuild the float32 absmax: ``nested_quant_map[code] * nested_absmax[block]``, THEN ``+ nested_offset``.

    Two float32 roundings (a fused multiply-add would differ in the last bit from bnb). Returns float32 [nblocks].
    """
    n = absmax_codes.numel()
    offset = torch.as_tensor(nested_offset, dtype=torch.float32, device=absmax_codes.device)
    scale = nested_absmax.to(torch.float32).repeat_interleave(nested_blocksize)[:n]
    return nested_quant_map.to(torch.float32)[absmax_codes.reshape(-1).long()] * scale + offset
