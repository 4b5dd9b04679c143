"""The bitsandbytes LLM.int8 state-dict entries of one Linear layer: build them and read them back.

``SCB`` is a module-level key (``<m>.SCB``, not ``<m>.weight.SCB``); ``weight_format`` is a 0-d uint8 0 ("row"),
which bnb's loader pops and checks. Format: ../shared/docs/bnb-format.md §2.1.
"""

from __future__ import annotations

import torch

ROW_FORMAT = 0
# The entries of one 8-bit layer, relative to the module; "weight_format" is optional on read.
ENTRY_NAMES = ("weight", "SCB", "weight_format")


def encode(weight_int8: torch.Tensor, SCB: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: N803
    return {"weight": weight_int8, "SCB": SCB, "weight_format": torch.tensor(ROW_FORMAT, dtype=torch.uint8)}


def is_8bit(entries: dict[str, torch.Tensor]) -> bool:
    return "SCB" in entries


def decode(entries: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_int8, SCB)``; raises ValueError for a layout bnb itself would reject."""
    weight, scb = entries.get("weight"), entries.get("SCB")
    if weight is None or scb is None:
        raise ValueError("8-bit weight needs both 'weight' and 'SCB' entries")
    if weight.dtype != torch.int8 or weight.dim() != 2 or scb.numel() != weight.shape[0]:
        raise ValueError(f"8-bit weight must be int8 [N, K] with SCB [N], got {weight.dtype} {tuple(weight.shape)}")
    fmt = entries.get("weight_format")
    if fmt is not None and int(fmt.item()) != ROW_FORMAT:
        raise ValueError(f"only the row-major int8 weight format (0) is supported, got {int(fmt.item())}")
    return weight, scb
