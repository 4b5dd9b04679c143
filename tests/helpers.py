"""Assertions that say what differs, and the measured error floors."""

from __future__ import annotations

import torch

from qtool.spec import QuantSpec

# The methods the pipeline-level tests quantize the example with (conftest's flux_outputs), by label.
FLUX_METHODS = {
    "nf4": QuantSpec(),
    "nf4-dq": QuantSpec(double_quant=True),
    "fp4-dq": QuantSpec(quant_type="fp4", double_quant=True),
    "int8": QuantSpec(bits=8),
}

# SQNR floors in dB for quantize -> dequantize of N(0, 1) bf16 [128, 512] weights: measured mean - 7 sigma over
# seeds 0..99 with qtool's reference (CPU, torch 2.13.0+cpu, 2026-11-25). Means: nf4 20.73, nf4+dq 20.72,
# fp4 18.28, fp4+dq 18.28, nf4 bs32 21.18, nf4 bs4096 19.18, int8 42.59 (sigma 0.03-0.10).
SQNR_FLOOR_DB = {
    ("nf4", False, 64): 20.55,
    ("nf4", True, 64): 20.55,
    ("fp4", False, 64): 18.08,
    ("fp4", True, 64): 18.07,
    ("nf4", False, 32): 20.99,
    ("nf4", False, 4096): 18.45,
    ("int8", False, 0): 41.99,
}


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())).item()


def assert_equal(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor", *, signed_zeros: bool = True
) -> None:
    """Bit-for-bit equality (NaN equals NaN), reporting the count and first positions of mismatches.

    With ``signed_zeros=False``, +0.0 and -0.0 count as equal (numerically equal, one bit apart).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))
        # +0.0 == -0.0 numerically; compare signs too so that the bytes are equal.
        if signed_zeros:
            same &= torch.signbit(a) == torch.signbit(e)
    else:
        same = a == e
    bad = (~same).nonzero()
    if len(bad):
        first = [tuple(i.tolist()) for i in bad[:5]]
        pairs = [(a[i].item(), e[i].item()) for i in first]
        raise AssertionError(f"{what}: {len(bad)} of {a.numel()} differ; first at {first}: (actual, expected) {pairs}")
