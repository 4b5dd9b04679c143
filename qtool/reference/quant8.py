"""LLM.int8 row-wise weight quantization in pure PyTorch: the specification of qtool's 8-bit codec.

What bnb's ``Int8Params`` stores: the weight cast to float16, per-row absmax ``SCB`` (float32) and int8 rows.
Oracle for ``qtool.kernels.quant_8bit``. Format: ../shared/docs/bnb-format.md §2.
"""

from __future__ import annotations

import torch

from qtool.reference.quant4 import FLOAT_DTYPES, abs_ignoring_nan, check_given_scales

# bnb's int8 dequantize multiplies by this float32 constant (1/127 rounded), not divides by 127: the two differ
# in float32 for 4.4% of elements (bnb-format.md §6).
INV_127 = 7.874015718698502e-3


def check_8bit_args(weight: torch.Tensor) -> None:
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"8-bit quantization takes float32, float16 or bfloat16 weights, got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"8-bit row-wise quantization takes a non-empty 2-D weight, got shape {tuple(weight.shape)}")


def round_int8_ref(v: torch.Tensor) -> torch.Tensor:
    """Scaled values to int8 codes: round half to even, clamp to [-127, 127] (reached only with a given SCB below
    the row's absmax), NaN to 0 (0 * inf in a zero row, inf * 0 in an inf row: CUDA's float-to-int gives 0)."""
    return torch.nan_to_num(torch.round(v).clamp(-127, 127), nan=0.0).to(torch.int8)


def quantize_8bit_rowwise_ref(
    weight: torch.Tensor,
    *,
    SCB: torch.Tensor | None = None,  # noqa: N803
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight to int8 rows and per-row absmax.

    Args:
        weight: float32 / float16 / bfloat16 [N, K]. Cast to float16 first, as bnb's Int8Params does for every
            input dtype (so |w| > 65504 becomes inf and its row quantizes to 0).
        SCB: float32 [N], the row scales to code against instead of each row's absmax (e.g.
            ``scale_search.search_scb_ref``'s); values beyond a given scale take the codes +-127.

    Returns:
        ``(weight_int8, SCB)``: int8 [N, K] and float32 [N] (the given SCB itself when given).

    Rule (bnb CUDA kInt8VectorQuant): ``q = round_half_even(w16 * (127 * (1 / SCB)))``. CUDA computes the scale
    with ``__fdividef``, i.e. 127 times an approximate reciprocal; here the reciprocal is IEEE-rounded. bnb CPU
    divides 127 / SCB in one rounding instead; both differ from this by one step in ~1e-4 of entries, only where
    the scaled value lies within float32 rounding of a half-integer. A row of zeros (SCB = 0) gives zeros.
    """
    check_8bit_args(weight)
    w16 = weight.to(torch.float16).to(torch.float32)
    if SCB is None:
        scb = abs_ignoring_nan(w16).amax(dim=1)
    else:
        check_given_scales(SCB, weight.shape[0], "SCB")
        scb = SCB
    scale = 127.0 * torch.reciprocal(scb)
    return round_int8_ref(w16 * scale[:, None]), scb


def dequantize_8bit_rowwise_ref(weight_int8: torch.Tensor, SCB: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:  # noqa: N803
    """``w = (q * SCB[row]) * INV_127`` in float32, then cast to dtype: int8 [N, K], float32 [N] -> dtype [N, K]."""
    w = weight_int8.to(torch.float32) * SCB.to(torch.float32).view(-1, 1) * torch.tensor(INV_127, dtype=torch.float32)
    return w.to(dtype)
