"""Blockwise 4-bit (NF4 / FP4) quantization in pure PyTorch: the specification of qtool's 4-bit codec.

This is the CPU path and the oracle the Triton kernels in ``qtool.kernels.quant_4bit`` must match bit for bit.
The rules are bitsandbytes' CUDA kernels (kQuantizeBlockwise, dQuantizeNF4, dQuantizeFP4), which is what users
run, with one documented deviation: the reciprocal of absmax is IEEE-rounded here, where bnb CUDA uses the
approximate ``rcp.approx`` instruction that no CPU can reproduce (see ``quantize_4bit_ref``).
Format: ../shared/docs/bnb-format.md §1.
"""

from __future__ import annotations

import math

import torch

from qtool.reference.codebooks import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    fp4_magnitude_codes,
    fp4_thresholds,
    nf4_midpoints,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_4bit_args(weight: torch.Tensor, quant_type: str, blocksize: int) -> None:
    """Raise ValueError for arguments the format cannot represent (shared by the reference and the kernel)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")


def abs_ignoring_nan(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN as 0: what an absmax is taken over. bnb CUDA's fmaxf skips NaN, so a NaN leaves its block's
    absmax alone (and itself codes to 0, below); torch's amax would make the absmax NaN, and Triton's max on a GPU
    differs from its interpreter. Saying it here makes every backend agree."""
    return torch.where(torch.isnan(x), 0.0, x.abs())


def scale_blocks_ref(
    weight: torch.Tensor, blocksize: int, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the flattened weight into blocks and scale each by the reciprocal of its absmax (or of the given one).

    Returns ``(s, absmax)``: s is float32 [nblocks, blocksize] with the tail padded with zeros (the pad is what bnb
    CUDA codes for the odd element of an odd numel), absmax is float32 [nblocks].
    """
    n = weight.numel()
    nblocks = math.ceil(n / blocksize)
    x = torch.zeros(nblocks * blocksize, dtype=torch.float32, device=weight.device)
    x[:n] = weight.reshape(-1).to(torch.float32)
    x = x.view(nblocks, blocksize)
    if absmax is None:
        absmax = abs_ignoring_nan(x).amax(dim=1)
    # bnb CUDA: s = x * rcp.approx(absmax), no clamp. An all-zero block gives 0 * inf = NaN, which codes to 0 (NF4
    # and FP4 alike): byte 0x00, where bnb CPU writes 0x77 for NF4. Both dequantize to 0.
    recip = torch.reciprocal(absmax)
    return x * recip[:, None], absmax


def check_given_scales(scales: torch.Tensor, count: int, name: str) -> None:
    """Raise ValueError unless given scales are a float32 vector of one value per block (row)."""
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() != count:
        raise ValueError(f"{name} must be float32 [{count}], got {scales.dtype} {tuple(scales.shape)}")


def codes_4bit_ref(s: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Map scaled values s (float32, any shape) to 4-bit codes (uint8, same shape), as bnb's CUDA kernel does."""
    if quant_type == "nf4":
        # code = #{midpoint < s}: the comparisons of dQuantizeNF4; an exact tie goes to the lower value.
        codes = torch.bucketize(s, nf4_midpoints(s.device), right=False)
    else:
        # dQuantizeFP4: sign bit iff s < 0 (-0.0 is positive), magnitude by `>` thresholds on |s|.
        k = torch.bucketize(s.abs(), fp4_thresholds(s.device), right=False)
        codes = fp4_magnitude_codes(s.device)[k].to(torch.int64) | torch.where(s < 0, 8, 0)
    # NaN fails every `>` comparison in the CUDA decision trees, so it lands on code 0.
    return torch.where(torch.isnan(s), 0, codes).to(torch.uint8)


def pack_4bit_ref(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Pack the first n codes (plus the padding code for odd n) two per byte, element 2j in the high nibble.

    Returns uint8 [(n + 1) // 2, 1], the shape bnb stores and diffusers checks.
    """
    flat = codes.reshape(-1)[: n + (n % 2)].to(torch.uint8)
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def quantize_4bit_ref(
    weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight of any shape to packed 4-bit codes and per-block absmax.

    Args:
        weight: float32 / float16 / bfloat16, any shape, numel >= 1. Flattened row-major; block b covers flat
            elements [b * blocksize, (b + 1) * blocksize), the last block may be ragged.
        quant_type: "nf4" or "fp4".
        blocksize: a power of two from 32 to 4096 (bnb and its loaders use 64).
        absmax: float32 [ceil(n / blocksize)], the scales to code against instead of each block's max |x| (e.g.
            ``scale_search.search_absmax_ref``'s); values beyond a given scale take the extreme codes.

    Returns:
        ``(packed, absmax)``: packed uint8 [(n + 1) // 2, 1]; absmax float32 [ceil(n / blocksize)], exact max |x|
        of each block (or the given absmax itself).

    The reciprocal 1 / absmax is IEEE-rounded here and in the Triton kernel, so the two agree bit for bit. bnb CUDA
    uses rcp.approx: its codes can differ from ours where s lies within an ulp or two of a decision threshold
    (measured on an H100: NF4 0 of 20.5M, FP4 ~1e-4 of codes; tests/kernels/test_quant_4bit_gpu.py).
    """
    check_4bit_args(weight, quant_type, blocksize)
    if absmax is not None:
        check_given_scales(absmax, math.ceil(weight.numel() / blocksize), "absmax")
    s, absmax = scale_blocks_ref(weight, blocksize, absmax)
    return pack_4bit_ref(codes_4bit_ref(s, quant_type), weight.numel()), absmax


def unpack_4bit_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [(n + 1) // 2, 1] (any storage dtype viewed as bytes) -> codes int64 [n], high nibble first."""
    p = packed.reshape(-1).view(torch.uint8)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n].to(torch.int64)


def check_4bit_layout(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, shape) -> None:
    """Raise ValueError unless packed (as bytes) and absmax fit n elements in blocks of blocksize."""
    nbytes, nblocks = packed.reshape(-1).view(torch.uint8).numel(), math.ceil(n / blocksize)
    if nbytes != (n + 1) // 2 or absmax.numel() != nblocks:
        raise ValueError(
            f"packed has {nbytes} bytes and absmax {absmax.numel()} blocks; shape {tuple(shape)} with blocksize "
            f"{blocksize} needs {(n + 1) // 2} and {nblocks}"
        )


def check_nested(absmax, nested_absmax, nested_quant_map, nested_offset, nested_blocksize: int) -> None:
    """Raise ValueError unless the double-quant entries are complete and consistent with absmax (its codes)."""
    if nested_quant_map is None or nested_offset is None:
        raise ValueError("double quant needs nested_absmax, nested_quant_map and nested_offset together")
    if absmax.dtype != torch.uint8:
        raise ValueError(f"with double quant, absmax holds uint8 codes, got {absmax.dtype}")
    if nested_absmax.numel() != math.ceil(absmax.numel() / nested_blocksize) or nested_quant_map.numel() != 256:
        raise ValueError(
            f"nested_absmax has {nested_absmax.numel()} values and nested_quant_map {nested_quant_map.numel()}; "
            f"{absmax.numel()} absmax codes in blocks of {nested_blocksize} need "
            f"{math.ceil(absmax.numel() / nested_blocksize)} and 256"
        )


def dequantize_4bit_ref(
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
) -> torch.Tensor:
    """Dequantize packed 4-bit codes: ``w = quant_map[code] * absmax[block]`` in float32, then cast to dtype.

    Args:
        packed: uint8 [(n + 1) // 2, 1] as stored in ``weight``.
        absmax: float32 [ceil(n / blocksize)], or with double quant the stored uint8 codes.
        quant_map: float32 [16], the stored ``weight.quant_map``.
        blocksize: the blocksize recorded in the quant state.
        shape: the original weight shape; n = prod(shape).
        dtype: output dtype; the float32 product is rounded to nearest even, as bnb's dequantize does.
        nested_absmax, nested_quant_map, nested_offset, nested_blocksize: with double quant, ``absmax`` holds the
            uint8 codes and the absmax is rebuilt first (``double_quant.dequantize_absmax_ref``).

    Returns:
        Tensor of ``shape`` and ``dtype``, equal to bnb's own dequantization of the same bytes.
    """
    n = math.prod(shape)
    check_4bit_layout(packed, absmax, n, blocksize, shape)
    if nested_absmax is not None:
        from qtool.reference.double_quant import dequantize_absmax_ref

        check_nested(absmax, nested_absmax, nested_quant_map, nested_offset, nested_blocksize)
        absmax = dequantize_absmax_ref(
            absmax, nested_absmax, nested_quant_map, nested_offset, nested_blocksize=nested_blocksize
        )
    codes = unpack_4bit_ref(packed, n)
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (quant_map.to(torch.float32)[codes] * scale).to(dtype).reshape(shape)
