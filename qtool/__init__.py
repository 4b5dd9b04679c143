"""qtool: quantize Hugging Face checkpoints to the bitsandbytes 4-bit / 8-bit format, and back.

Importing qtool is cheap (no torch, Triton, Rich or Typer): the API below loads on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from qtool.loader import load
    from qtool.quantize import dequantize_tensor, quantize_tensor

__all__ = ["__version__", "quantize_tensor", "dequantize_tensor", "load"]


def __getattr__(name: str) -> Any:
    if name in ("quantize_tensor", "dequantize_tensor"):
        from qtool import quantize

        return getattr(quantize, name)
    if name == "load":
        from qtool.loader import load

        return load
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
