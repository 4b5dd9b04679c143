"""``nn.Module`` drop-ins for bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` that need no bitsandbytes.

Each holds one layer's stored tensors as buffers (so ``.to(device)``, ``model.cuda()`` and accelerate's offload hooks
move them with the module) and calls the custom ops of ``qtool.linear`` (Triton on CUDA, dequantize + ``F.linear``
elsewhere), which ``torch.compile`` sees as one opaque call per layer.

Buffer names, and the on-disk entries (bnb-format.md §1.1, §2.1; keys relative to the module) they hold:

=====================  ==========================================  ==============================================
attribute              on disk                                     dtype and shape
=====================  ==========================================  ==============================================
``weight``             ``weight``                                  uint8 [ceil(N*K/2), 1]: two 4-bit codes a byte
``absmax``             ``weight.absmax``                           float32 [nblocks]; uint8 codes with double quant
``quant_map``          ``weight.quant_map``                        float32 [16]: the NF4 or FP4 code book
``nested_absmax``      ``weight.nested_absmax``                    float32 [ceil(nblocks/256)] (double quant only)
``nested_quant_map``   ``weight.nested_quant_map``                 float32 [256] (double quant only)
``nested_offset``      the blob's ``nested_offset``                float32 [1] (double quant only)
plain attributes       the blob ``weight.quant_state.bitsandbytes__<nf4|fp4>``: ``quant_type``, ``blocksize``,
                       ``weight_dtype`` (its "dtype"), ``out_features``/``in_features`` (its "shape")
``weight`` (8-bit)     ``weight``                                  int8 [N, K]
``SCB``                ``SCB``                                     float32 [N]: each row's absmax
=====================  ==========================================  ==============================================

The nested buffers are None without double quant. The buffers move with ``.to(device)`` but keep their dtypes
under ``.to(dtype)`` / ``.half()`` (a float16 code book would change the weights); ``bias`` is a Parameter and
casts. ``state_dict()`` writes the on-disk names back (bnb's exact entries: ``formats.bnb4.encode`` /
``formats.bnb8.encode``): a qtool-loaded model's state dict holds exactly the checkpoint's tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from qtool.formats import bnb4, bnb8
from qtool.linear import DEFAULT_THRESHOLD, linear_4bit, linear_8bit

_NATIVE = (torch.float32, torch.bfloat16)


class _QuantLinear(nn.Module):
    """What both layers share: their buffers follow device moves but never dtype casts."""

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.float16)`` / ``.half()`` cast floating buffers, which here are scales and code books that
        # must stay float32: keep each buffer's dtype and take only the new device (bias, a Parameter, does cast).
        before = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class QuantLinear4bit(_QuantLinear):
    """``y = x W^T + b`` with W [out_features, in_features] stored as bnb NF4/FP4 (optionally double-quantized).

    Compute dtype, as bnb's ``Linear4bit`` chooses it: a float32 or bfloat16 input computes in its own dtype; a
    float16 input is cast to ``compute_dtype`` (``bnb_4bit_compute_dtype``; None: float16) and the output back.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: torch.Tensor,
        state: bnb4.QuantState4bit,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if tuple(state.shape) != (out_features, in_features):
            raise ValueError(f"quant state shape {list(state.shape)} is not [{out_features}, {in_features}]")
        if packed.dtype != torch.uint8 or packed.numel() != (out_features * in_features + 1) // 2:
            raise ValueError(f"packed weight must be uint8 with {(out_features * in_features + 1) // 2} elements")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.nested_blocksize = state.nested_blocksize
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", packed.reshape(-1, 1))
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.quant_map)
        nested = state.double_quant
        self.register_buffer("nested_absmax", state.nested_absmax if nested else None)
        self.register_buffer("nested_quant_map", state.nested_quant_map if nested else None)
        offset = torch.tensor([state.nested_offset], dtype=torch.float32, device=packed.device) if nested else None
        self.register_buffer("nested_offset", offset)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_entries(
        cls,
        entries: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear4bit:
        """From one layer's on-disk entries (``weight``, ``weight.absmax``, ..., the quant-state blob); ValueError
        naming what is missing or inconsistent."""
        packed, state = bnb4.decode(entries)
        if len(state.shape) != 2:
            raise ValueError(f"a 4-bit Linear weight must be 2-D, its quant state says {list(state.shape)}")
        out_features, in_features = state.shape
        return cls(in_features, out_features, packed, state, bias, compute_dtype)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if in_dtype not in _NATIVE:
            x = x.to(self.compute_dtype or in_dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = linear_4bit(
            x, self.weight, self.absmax, self.quant_map, bias, blocksize=self.blocksize,
            shape=(self.out_features, self.in_features), nested_absmax=self.nested_absmax,
            nested_quant_map=self.nested_quant_map, nested_offset=self.nested_offset,
        )  # fmt: skip
        return y.to(in_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        state = bnb4.QuantState4bit(
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            dtype=self.weight_dtype,
            shape=(self.out_features, self.in_features),
            absmax=self.absmax,
            quant_map=self.quant_map,
            nested_absmax=self.nested_absmax,
            nested_quant_map=self.nested_quant_map,
            nested_offset=float(self.nested_offset.item()) if self.double_quant else None,
            nested_blocksize=self.nested_blocksize,
        )
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for name, tensor in bnb4.encode(self.weight, state).items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        compute = str(self.compute_dtype).removeprefix("torch.") if self.compute_dtype else "input"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}{dq}, blocksize={self.blocksize}, compute_dtype={compute}"
        )


class QuantLinear8bit(_QuantLinear):
    """``y = x W^T + b`` with W stored as LLM.int8 rows: ``W = weight * SCB[:, None] / 127``.

    ``threshold`` (``llm_int8_threshold``, 6.0 by default as in bnb) picks bnb ``Linear8bitLt``'s inference math:
    the activations are rounded to int8 row by row, except the columns holding an element of magnitude
    ``>= threshold``, which are multiplied in 16-bit (``qtool.linear.linear_8bit_ref``); 0 is the pure int8 product.
    ``threshold=None`` is weight-only: W dequantized to x's dtype, then ``F.linear`` (no activation rounding).
    """

    def __init__(
        self,
        weight_int8: torch.Tensor,
        SCB: torch.Tensor,  # noqa: N803
        bias: torch.Tensor | None = None,
        threshold: float | None = DEFAULT_THRESHOLD,
    ):
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2 or SCB.numel() != weight_int8.shape[0]:
            raise ValueError(f"8-bit weight must be int8 [N, K] with SCB [N], got {tuple(weight_int8.shape)}")
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"threshold must be None (weight-only) or >= 0, got {threshold}")
        self.out_features, self.in_features = weight_int8.shape
        self.threshold = threshold
        self.register_buffer("weight", weight_int8)
        self.register_buffer("SCB", SCB.reshape(-1).to(torch.float32))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_entries(
        cls,
        entries: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        threshold: float | None = DEFAULT_THRESHOLD,
    ) -> QuantLinear8bit:
        weight, scb = bnb8.decode(entries)
        return cls(weight, scb, bias, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return linear_8bit(x, self.weight, self.SCB, bias, threshold=self.threshold)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for name, tensor in bnb8.encode(self.weight, self.SCB).items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def extra_repr(self) -> str:
        math = "weight-only" if self.threshold is None else f"threshold={self.threshold:g}"
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, int8, {math}"


__all__ = ["QuantLinear4bit", "QuantLinear8bit"]
