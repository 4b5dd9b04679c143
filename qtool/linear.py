"""Run a quantized Linear: ``y = x W^T + b`` with W stored in bitsandbytes' 4-bit or 8-bit format, without bnb.

``linear_4bit`` and ``linear_8bit`` are PyTorch custom ops (``torch.ops.qtool.*``), so ``torch.compile`` sees one
opaque call per layer instead of tracing a kernel launcher (no graph break). Their reference is dequantize, then
``F.linear`` in the activation's dtype (``linear_4bit_ref`` / ``linear_8bit_ref``: the CPU path and the oracle); on
CUDA tensors they dispatch to the Triton kernels in ``qtool.kernels.matmul_4bit`` where one exists for the shape, and
to the fused Triton dequantize + cuBLAS otherwise.

``QuantLinear4bit`` / ``QuantLinear8bit`` hold a layer's stored tensors as buffers (on-disk names) and call them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from qtool.reference.codebooks import NESTED_BLOCKSIZE

# With the nested tensors absent, the op still needs tensors in their places (custom ops take no Optional[Tensor]
# lists by position in every torch version): a 0-element tensor stands for "none".


def _none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _dequantize_4bit(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                     dtype) -> torch.Tensor:  # fmt: skip
    from qtool.quantize import _ops, resolve_backend

    nested = {}
    if nested_absmax.numel():
        nested = {
            "nested_absmax": nested_absmax,
            "nested_quant_map": nested_quant_map,
            "nested_offset": nested_offset,
            "nested_blocksize": NESTED_BLOCKSIZE,
        }
    ops = _ops(resolve_backend("auto", packed.device))
    return ops["dequantize_4bit"](
        packed, absmax, quant_map, blocksize=blocksize, shape=tuple(shape), dtype=dtype, **nested
    )


def linear_4bit_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    blocksize: int,
    shape: tuple[int, int],
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` the [N, K] weight dequantized to x's dtype (bnb's Linear4bit computes
    the same: dequantize to the compute dtype, then a dense matmul). Entries as ``quantize.dequantize_tensor`` reads
    them; ``nested_offset`` a float32 0-d or [1] tensor."""
    w = _dequantize_4bit(
        packed, absmax, quant_map, _none(nested_absmax, absmax), _none(nested_quant_map, absmax),
        _none(nested_offset, absmax), blocksize, shape, x.dtype,
    )  # fmt: skip
    return F.linear(x, w, bias)


def linear_8bit_ref(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    SCB: torch.Tensor,
    bias: torch.Tensor | None = None,  # noqa: N803
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W = q * SCB / 127`` in x's dtype: the weight-only reference of an LLM.int8
    layer (its int8 activation path differs from it by the activations' own int8 rounding)."""
    from qtool.quantize import _ops, resolve_backend

    ops = _ops(resolve_backend("auto", weight_int8.device))
    return F.linear(x, ops["dequantize_8bit_rowwise"](weight_int8, SCB, dtype=x.dtype), bias)


@torch.library.custom_op("qtool::linear_4bit", mutates_args=())
def _linear_4bit_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    bias: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    nested_offset: torch.Tensor,
    blocksize: int,
    n: int,
    k: int,
) -> torch.Tensor:
    nested = nested_absmax.numel() > 0
    if x.is_cuda:
        from qtool.kernels import matmul_4bit

        if matmul_4bit.supports(x, n, k, blocksize):
            return matmul_4bit.linear_4bit(
                x, packed, absmax, quant_map, bias if bias.numel() else None, blocksize=blocksize, shape=(n, k),
                nested_absmax=nested_absmax if nested else None, nested_quant_map=nested_quant_map if nested else None,
                nested_offset=nested_offset if nested else None,
            )  # fmt: skip
    w = _dequantize_4bit(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                         (n, k), x.dtype)  # fmt: skip
    return F.linear(x, w, bias if bias.numel() else None)


@_linear_4bit_op.register_fake
def _(x, packed, absmax, quant_map, bias, nested_absmax, nested_quant_map, nested_offset, blocksize, n, k):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("qtool::linear_8bit", mutates_args=())
def _linear_8bit_op(x: torch.Tensor, weight_int8: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # noqa: N803
    return linear_8bit_ref(x, weight_int8, SCB, bias if bias.numel() else None)


@_linear_8bit_op.register_fake
def _(x, weight_int8, SCB, bias):  # noqa: N803
    return x.new_empty((*x.shape[:-1], weight_int8.shape[0]))


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    blocksize: int,
    shape: tuple[int, int],
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """``linear_4bit_ref``'s result through the custom op ``torch.ops.qtool.linear_4bit`` (Triton on CUDA)."""
    n, k = shape
    if x.shape[-1] != k or math.prod(shape) != packed.numel() * 2 - (math.prod(shape) % 2):
        raise ValueError(f"x {tuple(x.shape)} and a weight of shape {tuple(shape)} do not match")
    return _linear_4bit_op(
        x, packed, absmax, quant_map, _none(bias, x), _none(nested_absmax, absmax), _none(nested_quant_map, absmax),
        _none(nested_offset, absmax).reshape(-1).to(torch.float32), blocksize, n, k,
    )  # fmt: skip


def linear_8bit(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    SCB: torch.Tensor,
    bias: torch.Tensor | None = None,  # noqa: N803
) -> torch.Tensor:
    """``linear_8bit_ref``'s result through the custom op ``torch.ops.qtool.linear_8bit``."""
    if x.shape[-1] != weight_int8.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and an int8 weight {tuple(weight_int8.shape)} do not match")
    return _linear_8bit_op(x, weight_int8, SCB, _none(bias, x))


__all__ = ["linear_4bit", "linear_8bit", "linear_4bit_ref", "linear_8bit_ref"]
