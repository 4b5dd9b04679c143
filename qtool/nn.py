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

``from_linear`` quantizes an ``nn.Linear`` in memory (``qtool.quantize.quantize_tensor``: Triton on CUDA, the PyTorch
reference elsewhere) into the entries ``qtool quantize`` would write for it; ``quantize_linears_`` swaps every
``nn.Linear`` of a model, skip names matched as diffusers or transformers match ``llm_int8_skip_modules``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

from qtool.formats import bnb4, bnb8
from qtool.linear import DEFAULT_THRESHOLD, check_threshold, linear_4bit, linear_8bit

_NATIVE = (torch.float32, torch.bfloat16)


def _linear_weight(linear: nn.Module, cls: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight [N, K] and bias of an ``nn.Linear``, detached; TypeError/ValueError saying what is wrong."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{cls}.from_linear takes an nn.Linear, got {type(linear).__name__}")
    weight = linear.weight
    if weight.dim() != 2:
        raise ValueError(f"{cls}.from_linear needs a 2-D weight [out_features, in_features], got {list(weight.shape)}")
    if not weight.is_floating_point():
        # e.g. a bitsandbytes Linear4bit (a subclass of nn.Linear) whose weight is already packed uint8
        raise ValueError(f"{cls}.from_linear needs a float weight, got {weight.dtype} (already quantized?)")
    if weight.is_meta:
        raise ValueError(f"{cls}.from_linear needs the weight's values; it is on the meta device")
    bias = linear.bias.detach() if linear.bias is not None else None
    return weight.detach(), bias


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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The bias, then the layer's on-disk entries (``_entries``): what bnb's layers write, under the same names.
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for name, tensor in self._entries().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()


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

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        double_quant: bool = False,
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear4bit:
        """Quantize an ``nn.Linear`` in memory, on its weight's device, into the entries ``qtool quantize`` writes.

        Args:
            linear: its weight float32/float16/bfloat16 [out_features, in_features], not on meta. Left unchanged;
                the new layer shares its bias.
            quant_type, double_quant, blocksize: as ``qtool.quantize_tensor`` (bnb's ``bnb_4bit_quant_type``,
                ``bnb_4bit_use_double_quant``; bnb's loaders use blocksize 64).
            compute_dtype: ``bnb_4bit_compute_dtype``, used for float16 inputs only (see the class docstring).

        Returns:
            The layer ``from_entries`` builds from ``quantize_tensor(linear.weight, ...)``; its ``state_dict()`` is
            those entries (and the bias).
        """
        from qtool.quantize import quantize_tensor

        weight, bias = _linear_weight(linear, cls.__name__)
        entries = quantize_tensor(weight, bits=4, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
        return cls.from_entries(_own_memory(entries), bias, compute_dtype)

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

    def _entries(self) -> dict[str, torch.Tensor]:
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
        return bnb4.encode(self.weight, state)

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
        check_threshold(threshold)
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

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, threshold: float | None = DEFAULT_THRESHOLD) -> QuantLinear8bit:
        """Quantize an ``nn.Linear`` in memory, on its weight's device, to LLM.int8 rows (``quantize_tensor(...,
        bits=8)``: int8 [N, K] and SCB [N], the entries ``qtool quantize --bits 8`` writes).

        Args:
            linear: its weight float32/float16/bfloat16 [out_features, in_features], not on meta. Left unchanged;
                the new layer shares its bias.
            threshold: ``llm_int8_threshold`` (see the class docstring); None is weight-only.
        """
        from qtool.quantize import quantize_tensor

        weight, bias = _linear_weight(linear, cls.__name__)
        return cls.from_entries(_own_memory(quantize_tensor(weight, bits=8)), bias, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return linear_8bit(x, self.weight, self.SCB, bias, threshold=self.threshold)

    def _entries(self) -> dict[str, torch.Tensor]:
        return bnb8.encode(self.weight, self.SCB)

    def extra_repr(self) -> str:
        math = "weight-only" if self.threshold is None else f"threshold={self.threshold:g}"
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, int8, {math}"


def quantize_linears_(
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    *,
    skip: Iterable[str] = (),
    library: Literal["diffusers", "transformers"] = "diffusers",
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose name ``skip`` does not match by ``make(linear)``.

    ``skip`` is matched as ``library`` matches ``llm_int8_skip_modules`` (``qtool.plan.diffusers_keeps`` /
    ``transformers_keeps``): for diffusers a name keeps a Linear if it is its child name or its full name, or if
    ``name + "."`` occurs in its full name ("proj_out" keeps every ``single_transformer_blocks.N.proj_out``); for
    transformers a name is a regular expression matched from the start up to a module boundary, or a suffix. Which
    Linears count follows the library too: diffusers replaces subclasses of ``nn.Linear``, transformers exact
    ``nn.Linear`` only. Only ``skip`` is applied: the library's own defaults (a model's ``_keep_in_fp32_modules``,
    transformers' tied weights and ``lm_head``) are the caller's to add.

    Args:
        model: changed in place (not itself an ``nn.Linear``). A Linear reachable under several names is replaced
            once, under all of them, unless ``skip`` matches any of them.
        make: builds the replacement, e.g. ``QuantLinear4bit.from_linear``; called once per Linear, in
            ``named_modules()`` order, and may materialize a meta-device Linear first.
        skip: module names to keep.
        library: whose matching rule ("diffusers" or "transformers").

    Returns:
        ``model``.
    """
    from qtool.plan import diffusers_keeps, transformers_keeps

    if library not in ("diffusers", "transformers"):
        raise ValueError(f"library must be 'diffusers' or 'transformers', got {library!r}")
    if isinstance(skip, str):  # a lone name would otherwise be read as its characters
        skip = [skip]
    names = list(skip)
    keeps = diffusers_keeps if library == "diffusers" else transformers_keeps
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_linears_ replaces the Linears inside a model; for one Linear call make(linear)")
    linears: dict[int, tuple[nn.Linear, list[str]]] = {}  # id -> (the Linear, all its names), in model order
    for fqn, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) if library == "diffusers" else type(module) is nn.Linear:
            linears.setdefault(id(module), (module, []))[1].append(fqn)
    chosen = [key for key, (_, fqns) in linears.items() if not any(keeps(fqn, names) for fqn in fqns)]
    for key in chosen:
        linear, fqns = linears.pop(key)
        new = make(linear)
        del linear  # the model's reference goes below: the old weight can be freed layer by layer
        for fqn in fqns:
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _own_memory(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the entries that share memory with anything else (the cached code books, views into a larger
    buffer), so a model of these layers saves through safetensors, which refuses shared or partial storage."""
    return {
        k: v.clone() if k.endswith("quant_map") or v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
        for k, v in entries.items()
    }


__all__ = ["QuantLinear4bit", "QuantLinear8bit", "quantize_linears_"]
