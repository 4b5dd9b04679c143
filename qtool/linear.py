"""Run a quantized Linear: ``y = x W^T + b`` with W stored in bitsandbytes' 4-bit or 8-bit format, without bnb.

Under ``torch.compile``, ``linear_4bit`` and ``linear_8bit`` call PyTorch custom ops (``torch.ops.qtool.*``), so the
compiler sees one opaque call per layer instead of tracing a kernel launcher (no graph break); eager calls skip the
op's dispatch, which on the H100's host cost more than the launch itself. Their reference is dequantize, then
``F.linear`` in the activation's dtype for 4-bit, LLM.int8's math for 8-bit (``linear_4bit_ref`` / ``linear_8bit_ref``:
the CPU path and the oracle); on CUDA tensors they dispatch to the Triton kernels in ``qtool.kernels.matmul_4bit``
(where ``matmul_4bit.choose`` takes the shape; the fused Triton dequantize + cuBLAS otherwise) and
``qtool.kernels.matmul_8bit``.

``QuantLinear4bit`` / ``QuantLinear8bit`` hold a layer's stored tensors as buffers (on-disk names) and call them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from qtool.reference.codebooks import NESTED_BLOCKSIZE
from qtool.reference.quant8 import INV_127

# With the nested tensors absent, the op still needs tensors in their places (custom ops take no Optional[Tensor]
# lists by position in every torch version): a 0-element tensor stands for "none".


def _none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _dequantize_4bit(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                     dtype) -> torch.Tensor:  # fmt: skip
    from qtool.quantize import _ops, resolve_backend

    nested = {}
    if nested_absmax is not None:
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
        packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, x.dtype
    )
    return F.linear(x, w, bias)


# bnb's 1/127^2 as ``int8_mm_dequant`` writes it (1/127 is ``quant8.INV_127``, ``int8_vectorwise_dequant``'s).
LLM_INT8_SCALE = 6.200124e-05
# ``llm_int8_threshold``'s default in transformers' and diffusers' BitsAndBytesConfig.
DEFAULT_THRESHOLD = 6.0


def check_threshold(threshold: float | None) -> None:
    """An 8-bit layer's threshold is None (weight-only) or a number >= 0 (LLM.int8); ValueError otherwise."""
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"threshold must be None (weight-only) or >= 0, got {threshold}")


def int8_activations_ref(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8's activation quantization, as bnb's ``int8_vectorwise_quant`` does it, for a [M, K] x.

    x is cast to float16 first (bnb's ``MatMul8bitLt`` does; for bf16 x that is exact in float16's normal range).
    With ``threshold > 0`` an element with ``|x| >= threshold`` is an outlier: it is left out of its row's absmax;
    every column holding one is an outlier column, whose codes are 0 (the matmul takes it in 16-bit instead).
    Returns ``CA`` (int8 [M, K]: ``round(x * ((1 / SCA) * 127))`` in float32, half to even; 0 for outliers and in a row
    whose SCA is 0; bnb's CA), ``SCA`` (float32 [M]: each row's absmax over the elements that are not outliers)
    and the outlier columns (bool [K]).
    """
    a = x.to(torch.float16)
    cols = torch.zeros(a.shape[-1], dtype=torch.bool, device=a.device)
    if threshold > 0:
        outliers = a.abs() >= threshold
        cols = outliers.any(dim=0)
        a = a.masked_fill(outliers, 0)
    SCA = a.abs().amax(dim=1).float() if a.shape[1] else a.new_zeros(a.shape[0], dtype=torch.float32)  # noqa: N806
    # bnb's expression; PyTorch evaluates 127.0 / t as t.reciprocal() * 127 (two float32 roundings)
    CA = torch.round(a * (127.0 / SCA.unsqueeze(-1)))  # noqa: N806
    CA = CA.masked_fill(~torch.isfinite(CA) | cols, 0).to(torch.int8)  # noqa: N806
    return CA, SCA, cols


def linear_8bit_ref(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    SCB: torch.Tensor,  # noqa: N803
    bias: torch.Tensor | None = None,
    *,
    threshold: float | None = None,
) -> torch.Tensor:
    """An LLM.int8 layer's ``y = x W^T + b``, W = ``weight_int8 * SCB / 127`` row by row.

    ``threshold=None``: weight-only, ``F.linear(x, W, bias)`` with W in x's dtype.

    ``threshold >= 0``: bnb ``Linear8bitLt``'s inference path (``MatMul8bitLt`` with ``int8_mixed_scaled_mm``): x
    quantized by ``int8_activations_ref``; the int32 product ``CA @ weight_int8^T`` scaled by
    ``SCA * SCB * LLM_INT8_SCALE`` in float32 (CA is 0 in the outlier columns), plus bias, rounded to x's dtype;
    then, if any, the outlier columns of x times W's columns ``(weight_int8 * SCB * INV_127)`` in x's dtype, added by
    ``addmm``. ``threshold=0`` is the pure int8 product. On the CPU this gives bnb's output bit for bit.
    """
    if threshold is None:
        from qtool.quantize import _ops, resolve_backend

        ops = _ops(resolve_backend("auto", weight_int8.device))
        return F.linear(x, ops["dequantize_8bit_rowwise"](weight_int8, SCB, dtype=x.dtype), bias)
    x2 = x.reshape(-1, x.shape[-1])
    CA, SCA, cols = int8_activations_ref(x2, threshold)  # noqa: N806
    # The int32 product, exactly (float64 holds every sum of K products of two int8 values for K < 2^38).
    out32 = (CA.double() @ weight_int8.double().t()).to(torch.int32)
    out = out32 * (SCA.unsqueeze(-1) * SCB.reshape(1, -1).float()) * LLM_INT8_SCALE
    if bias is not None:
        out += bias
    out = out.to(x.dtype)
    if bool(cols.any()):
        idx = cols.nonzero().reshape(-1)
        w_cols = (weight_int8[:, idx] * SCB.reshape(-1, 1).float() * INV_127).to(x.dtype)
        out = out.addmm(x2[:, idx], w_cols.t())
    return out.reshape(*x.shape[:-1], weight_int8.shape[0])


def _linear_4bit_impl(x, packed, absmax, quant_map, bias, nested_absmax, nested_quant_map, nested_offset, blocksize,
                      n, k) -> torch.Tensor:  # fmt: skip
    # The op's body, with None for absent tensors. Eager calls come here directly: the custom op's dispatch costs
    # more host time than the kernel launch (it exists for torch.compile, which must not trace the launcher).
    if x.is_cuda:
        from qtool.kernels import matmul_4bit

        kernel = matmul_4bit.choose(x, n, k, blocksize)
        if kernel:
            return matmul_4bit.linear_4bit(
                x, packed, absmax, quant_map, bias, blocksize=blocksize, shape=(n, k), nested_absmax=nested_absmax,
                nested_quant_map=nested_quant_map, nested_offset=nested_offset, kernel=kernel,
            )  # fmt: skip
    return linear_4bit_ref(
        x, packed, absmax, quant_map, bias, blocksize=blocksize, shape=(n, k), nested_absmax=nested_absmax,
        nested_quant_map=nested_quant_map, nested_offset=nested_offset,
    )  # fmt: skip


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
    return _linear_4bit_impl(
        x, packed, absmax, quant_map, bias if bias.numel() else None, nested_absmax if nested else None,
        nested_quant_map if nested else None, nested_offset if nested else None, blocksize, n, k,
    )  # fmt: skip


@_linear_4bit_op.register_fake
def _(x, packed, absmax, quant_map, bias, nested_absmax, nested_quant_map, nested_offset, blocksize, n, k):
    return x.new_empty((*x.shape[:-1], n))


def _linear_8bit_impl(x, weight_int8, SCB, bias, threshold: float | None) -> torch.Tensor:  # noqa: N803
    # As _linear_4bit_impl: the op's body, called directly in eager mode.
    if x.is_cuda and threshold is not None and x.dtype in (torch.bfloat16, torch.float16) and x.numel():
        from qtool.kernels import matmul_8bit

        return matmul_8bit.linear_8bit(x, weight_int8, SCB, bias, threshold=threshold)
    return linear_8bit_ref(x, weight_int8, SCB, bias, threshold=threshold)


@torch.library.custom_op("qtool::linear_8bit", mutates_args=())
def _linear_8bit_op(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    SCB: torch.Tensor,  # noqa: N803
    bias: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    # threshold < 0 stands for None (weight-only): the op's schema takes a plain float.
    return _linear_8bit_impl(x, weight_int8, SCB, bias if bias.numel() else None, threshold if threshold >= 0 else None)


@_linear_8bit_op.register_fake
def _(x, weight_int8, SCB, bias, threshold):  # noqa: N803
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
    """``linear_4bit_ref``'s result (Triton on CUDA); under ``torch.compile``, through the custom op
    ``torch.ops.qtool.linear_4bit``."""
    n, k = shape
    if x.shape[-1] != k or math.prod(shape) != packed.numel() * 2 - (math.prod(shape) % 2):
        raise ValueError(f"x {tuple(x.shape)} and a weight of shape {tuple(shape)} do not match")
    if not torch.compiler.is_compiling():
        return _linear_4bit_impl(
            x, packed, absmax, quant_map, bias, nested_absmax, nested_quant_map, nested_offset, blocksize, n, k
        )
    return _linear_4bit_op(
        x, packed, absmax, quant_map, _none(bias, x), _none(nested_absmax, absmax), _none(nested_quant_map, absmax),
        _none(nested_offset, absmax).reshape(-1).to(torch.float32), blocksize, n, k,
    )  # fmt: skip


def linear_8bit(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    SCB: torch.Tensor,  # noqa: N803
    bias: torch.Tensor | None = None,
    *,
    threshold: float | None = DEFAULT_THRESHOLD,
) -> torch.Tensor:
    """``linear_8bit_ref``'s result (Triton on CUDA); under ``torch.compile``, through the custom op
    ``torch.ops.qtool.linear_8bit``."""
    if x.shape[-1] != weight_int8.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and an int8 weight {tuple(weight_int8.shape)} do not match")
    check_threshold(threshold)
    if not torch.compiler.is_compiling():
        return _linear_8bit_impl(x, weight_int8, SCB, bias, None if threshold is None else float(threshold))
    return _linear_8bit_op(x, weight_int8, SCB, _none(bias, x), -1.0 if threshold is None else float(threshold))


__all__ = ["linear_4bit", "linear_8bit", "linear_4bit_ref", "linear_8bit_ref", "int8_activations_ref"]
