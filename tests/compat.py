"""Comparisons with bitsandbytes that allow exactly the documented differences, and count them.

bnb disagrees with itself between CPU and CUDA (bnb-format.md §7); qtool follows CUDA. Each function here returns
the number of differing entries after asserting that every one of them is of an allowed kind.
"""

from __future__ import annotations

import torch

from qtool.reference.codebooks import FP4_THRESHOLDS, dynamic_map, quant_map
from qtool.reference.quant4 import scale_blocks_ref


def codes_of(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n]


def near(a: torch.Tensor, b: torch.Tensor, ulps: int) -> torch.Tensor:
    """|a - b| within `ulps` float32 ulps of the larger magnitude (a and b float64)."""
    return (a - b).abs() <= ulps * torch.maximum(a.abs(), b.abs()) * 2.0**-23 + 1e-30


def fp4_threshold_slack() -> float:
    """How far bnb CUDA's FP4 literals (0.583333, ...) sit from the float32 midpoints bnb CPU uses: 3.7e-7."""
    magnitudes = torch.sort(quant_map("fp4")[:8]).values
    midpoints = (magnitudes[:-1] + magnitudes[1:]) / 2
    return (midpoints.double() - torch.tensor(FP4_THRESHOLDS, dtype=torch.float32).double()).abs().max().item()


def check_4bit_codes(weight, packed, packed_bnb, quant_type: str, blocksize: int) -> int:
    """Every differing code must dequantize to the same value (zero blocks, FP4's +-0) or sit on the boundary of
    the two values: s within a few ulps of their midpoint (bnb CPU sends ties to the lower value, and divides
    the tail block where CUDA multiplies by the reciprocal), or for FP4 between CUDA's literal threshold and the
    float32 midpoint."""
    weight, n = weight.cpu(), weight.numel()
    ours, theirs = codes_of(packed.cpu(), n), codes_of(packed_bnb.cpu(), n)
    bad = (ours != theirs).nonzero()[:, 0]
    if len(bad) == 0:
        return 0
    s, absmax = scale_blocks_ref(weight, blocksize)
    s = s.reshape(-1)[:n][bad].double()
    table = quant_map(quant_type).double()
    scale = absmax.repeat_interleave(blocksize)[:n][bad].double()
    v_ours, v_theirs = table[ours[bad]], table[theirs[bad]]
    same_value = v_ours * scale == v_theirs * scale
    slack = fp4_threshold_slack() if quant_type == "fp4" else 0.0
    values = torch.unique(table)  # sorted; FP4's two zeros are one value
    adjacent = (torch.searchsorted(values, v_ours) - torch.searchsorted(values, v_theirs)).abs() == 1
    tie = near((s - v_ours).abs(), (s - v_theirs).abs(), 4) | ((s - (v_ours + v_theirs) / 2).abs() <= slack + 1e-7)
    tie &= adjacent & ~torch.isnan(s)
    unexplained = ~(same_value | tie)
    assert not unexplained.any(), (
        f"{int(unexplained.sum())} {quant_type} codes differ from bnb beyond the allowed cases; first at flat index "
        f"{int(bad[unexplained][0])}: ours {int(ours[bad][unexplained][0])}, bnb {int(theirs[bad][unexplained][0])}"
    )
    return len(bad)


def check_nested_codes(absmax, offset, nested_absmax, codes, codes_bnb, grid_step: float) -> int:
    """Differing nested codes must be neighbours with s within `grid_step` of their midpoint: bnb CPU snaps s to
    a 65535-step grid (grid_step = 1/65535); CUDA's rcp.approx moves s by ulps (grid_step ~ 1e-6)."""
    absmax, nested_absmax, codes, codes_bnb = (t.cpu() for t in (absmax, nested_absmax, codes, codes_bnb))
    offset = torch.as_tensor(offset).cpu()
    bad = (codes != codes_bnb).nonzero()[:, 0]
    if len(bad) == 0:
        return 0
    lo = torch.minimum(codes[bad], codes_bnb[bad]).long()
    hi = torch.maximum(codes[bad], codes_bnb[bad]).long()
    assert torch.all(hi - lo == 1), "nested codes differ by more than one step"
    d = dynamic_map(absmax.device).double()
    s = (absmax[bad] - offset).double() / nested_absmax.repeat_interleave(256)[bad].double()
    mid = (d[lo] + d[hi]) / 2
    assert torch.all((s - mid).abs() <= grid_step + 1e-6), "a nested code differs away from a midpoint"
    return len(bad)


def check_int8_codes(weight, q, q_bnb, scb) -> int:
    """Differing int8 codes must be one step apart, at a scaled value within float32 rounding of a half-integer
    (127/SCB in one rounding on bnb CPU, 127 * rcp(SCB) on CUDA and here)."""
    weight, q, q_bnb, scb = (t.cpu() for t in (weight, q, q_bnb, scb))
    bad = (q != q_bnb).nonzero(as_tuple=True)
    if len(bad[0]) == 0:
        return 0
    assert torch.all((q[bad].int() - q_bnb[bad].int()).abs() == 1), "int8 codes differ by more than one step"
    v = weight.half().double()[bad] * 127 / scb.double()[bad[0]]
    assert torch.all(((v.abs() - v.abs().floor()) - 0.5).abs() <= 1e-5 * v.abs().clamp(min=1)), (
        "an int8 code differs away from a rounding tie"
    )
    return len(bad[0])
