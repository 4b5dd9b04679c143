"""Scale search: per 4-bit block or 8-bit row, the stored scale that minimizes the squared error, in pure PyTorch.

bitsandbytes stores each block's absmax (4-bit) or each row's absmax (8-bit, ``SCB``) and rounds to the nearest
code. The format does not require the absmax: any scale is dequantized the same way (``quant_map[code] * absmax``,
``q * SCB / 127``). A scale a little below the absmax clips the largest weight of the block to the extreme code
but spaces the codes closer together for all the others; for normally distributed weights that lowers the block's
squared error (NF4, blocks of 64: +0.55 dB SQNR on average, measured in benchmarks/quality.py).

The rule, which ``qtool.kernels.scale_search`` follows bit for bit:

- ``a`` is the block's (row's) absmax, NaN ignored, as the plain quantizer takes it; the candidates are
  ``s_k = a * c_k`` for the ``codebooks.scale_grid`` factors ``c_0 = 1 > c_1 > ... `` (so s_0 = a exactly).
- Each candidate's codes are exactly the plain quantizer's codes for the scale ``s_k`` (``x * (1 / s_k)`` to the
  nearest code; 8-bit: rounded, clamped to +-127).
- Its error is measured in units of the absmax, as a sum of fixed-point integers so that the sum does not depend on
  the order of addition (the GPU's reduction order is not PyTorch's): 4-bit ``d = x / a - quant_map[code] * c_k``,
  8-bit ``d = 127 x / a - q c_k``; ``e_k = sum(trunc(d * d * ERROR_ONE))`` as int64. NaN weights count 0.
- The first k with the smallest e_k wins (ties keep the larger scale); a block whose absmax is 0 or infinite keeps
  ``a`` (k = 0).

The chosen scales go to the plain quantizers as given scales (``quantize_4bit_ref(..., absmax=)``,
``quantize_8bit_rowwise_ref(..., SCB=)``); with double quant, to ``quantize_absmax_ref`` first, and the codes are
then chosen for the absmax as rebuilt from its 8-bit code, i.e. for the scale the loader will use.
"""

from __future__ import annotations

import torch

from qtool.reference.codebooks import quant_map, scale_grid
from qtool.reference.quant4 import abs_ignoring_nan, check_4bit_args, codes_4bit_ref, scale_blocks_ref
from qtool.reference.quant8 import check_8bit_args, round_int8_ref

# Fixed-point unit of a squared error: 2**32. 4-bit |d| <= 2 (blocks of at most 4096: sums below 2**46); 8-bit
# |d| <= 127 (rows of up to 2**15 columns keep sums below 2**63 even in the worst case, and far below it in practice).
ERROR_ONE = 2.0**32


def _fixed(d: torch.Tensor) -> torch.Tensor:
    """Squared errors as int64 fixed-point values (truncated, as the GPU's float-to-int conversion); NaN and
    infinite differences (NaN weights; a block with an infinite absmax, which keeps it anyway) count 0."""
    return torch.where(torch.isfinite(d), d * d * ERROR_ONE, 0.0).to(torch.int64)


def _argmin_first(errors: list[torch.Tensor]) -> torch.Tensor:
    """Per row, the index of the first smallest error over the candidates (a strict `<` scan, as the kernel)."""
    best_e, best_k = errors[0], torch.zeros_like(errors[0])
    for k, e in enumerate(errors[1:], start=1):
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_k = torch.where(better, k, best_k)
    return best_k


def search_absmax_ref(weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """The scale-searched absmax of each 4-bit block: float32 [ceil(n / blocksize)], each ``<=`` the true absmax.

    Args:
        weight: float32 / float16 / bfloat16, any shape; blocks as in ``quant4.quantize_4bit_ref``.
        quant_type: "nf4" or "fp4".
        blocksize: a power of two from 32 to 4096.
    """
    check_4bit_args(weight, quant_type, blocksize)
    t, absmax = scale_blocks_ref(weight, blocksize)  # t = x * (1 / a), the padding 0
    x = torch.zeros_like(t).view(-1)
    x[: weight.numel()] = weight.reshape(-1).to(torch.float32)
    x = x.view_as(t)
    table = quant_map(quant_type, weight.device)
    grid = scale_grid(4, weight.device)
    errors, scales = [], []
    for c in grid:
        s = absmax * c
        codes = codes_4bit_ref(x * torch.reciprocal(s)[:, None], quant_type).long()
        errors.append(_fixed(t - table[codes] * c).sum(dim=1))
        scales.append(s)
    k = _argmin_first(errors)
    k = torch.where((absmax == 0) | torch.isinf(absmax), 0, k)
    return torch.stack(scales, dim=1).gather(1, k[:, None])[:, 0]


def search_scb_ref(weight: torch.Tensor) -> torch.Tensor:
    """The scale-searched SCB of each 8-bit row: float32 [N], each ``<=`` the row absmax of the float16 weight.

    Args:
        weight: float32 / float16 / bfloat16 [N, K], cast to float16 first as the 8-bit quantizer does.
    """
    check_8bit_args(weight)
    w16 = weight.to(torch.float16).to(torch.float32)
    absmax = abs_ignoring_nan(w16).amax(dim=1)
    t = w16 * (127.0 * torch.reciprocal(absmax))[:, None]
    grid = scale_grid(8, weight.device)
    errors, scales = [], []
    for c in grid:
        s = absmax * c
        q = round_int8_ref(w16 * (127.0 * torch.reciprocal(s))[:, None]).to(torch.float32)
        errors.append(_fixed(t - q * c).sum(dim=1))
        scales.append(s)
    k = _argmin_first(errors)
    k = torch.where((absmax == 0) | torch.isinf(absmax), 0, k)
    return torch.stack(scales, dim=1).gather(1, k[:, None])[:, 0]
