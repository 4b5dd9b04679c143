"""One weight in, its bitsandbytes state-dict entries out, and back: ``quantize_tensor`` / ``dequantize_tensor``.

Chooses the backend: the Triton kernels (``qtool.kernels``, GPU, or the CPU interpreter) or their pure-PyTorch
twins (``qtool.reference``). Both give the same bytes. Later stages (the checkpoint pipeline) build on these two.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Literal

import torch

from qtool.formats import bnb4, bnb8
from qtool.reference import codebooks

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")


def _kernel(module: str) -> ModuleType:
    # Imported on first use: `import qtool` (and the CLI's --help) must not import Triton.
    return importlib.import_module(f"qtool.kernels.{module}")


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """ "auto" is Triton for CUDA tensors and the PyTorch reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


@functools.cache
def _ops(backend: str) -> MappingProxyType:
    # Looked up once per backend: the quantized layers call this on every forward (qtool.linear).
    return MappingProxyType(_load_ops(backend))


def _load_ops(backend: str) -> dict:
    if backend == "triton":
        q4, dq, q8 = _kernel("quant_4bit"), _kernel("double_quant"), _kernel("quant_8bit")
        search = _kernel("scale_search")
        return {
            "search_absmax": search.search_absmax,
            "search_scb": search.search_scb,
            "quantize_4bit": q4.quantize_4bit,
            "dequantize_4bit": q4.dequantize_4bit,
            "quantize_absmax": dq.quantize_absmax,
            "dequantize_absmax": dq.dequantize_absmax,
            "quantize_8bit_rowwise": q8.quantize_8bit_rowwise,
            "dequantize_8bit_rowwise": q8.dequantize_8bit_rowwise,
        }
    from qtool.reference import double_quant, quant4, quant8, scale_search

    return {
        "search_absmax": scale_search.search_absmax_ref,
        "search_scb": scale_search.search_scb_ref,
        "quantize_4bit": quant4.quantize_4bit_ref,
        "dequantize_4bit": quant4.dequantize_4bit_ref,
        "quantize_absmax": double_quant.quantize_absmax_ref,
        "dequantize_absmax": double_quant.dequantize_absmax_ref,
        "quantize_8bit_rowwise": quant8.quantize_8bit_rowwise_ref,
        "dequantize_8bit_rowwise": quant8.dequantize_8bit_rowwise_ref,
    }


# The key of the double-quant offset in PendingLayer.tensors; not an on-disk entry (it lives in the JSON blob).
NESTED_OFFSET = "nested_offset"


@dataclass
class PendingLayer:
    """One quantized layer before its entries are final: nothing here has waited for the GPU.

    ``tensors`` are the layer's entries (on-disk names, relative to the module) except the quant-state blob, which
    is JSON and needs ``nested_offset`` on the host; with double quant ``tensors[NESTED_OFFSET]`` is that offset, a
    float32 0-d tensor on the weight's device. A pipeline copies ``tensors`` to the host (``to``), waits for the
    copy, then calls ``entries``. ``restored`` dequantizes on the tensors' device, also without waiting.
    """

    bits: int
    tensors: dict[str, torch.Tensor]
    quant_type: str = "nf4"
    blocksize: int = 64
    dtype: torch.dtype = torch.bfloat16
    shape: tuple[int, ...] = ()
    backend: str = "torch"
    scale_search: bool = False  # the stored scales were searched: each at most its block's (row's) absmax

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PendingLayer:
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}
        return dataclasses.replace(self, tensors=moved)

    def _state(self, nested_offset) -> bnb4.QuantState4bit:
        t = self.tensors
        state = bnb4.QuantState4bit(
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            dtype=self.dtype,
            shape=self.shape,
            absmax=t["weight.absmax"],
            quant_map=t["weight.quant_map"],
        )
        if NESTED_OFFSET in t:
            state.nested_absmax = t["weight.nested_absmax"]
            state.nested_quant_map = t["weight.nested_quant_map"]
            state.nested_offset = nested_offset
        return state

    def entries(self) -> dict[str, torch.Tensor]:
        """The bitsandbytes entries, blob included (reads the offset: call once the tensors are on the host)."""
        if self.bits == 8:
            return bnb8.encode(self.tensors["weight"], self.tensors["SCB"])
        offset = self.tensors.get(NESTED_OFFSET)
        return bnb4.encode(self.tensors["weight"], self._state(None if offset is None else offset.item()))

    def restored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight in ``dtype`` on the tensors' device; queues work, never waits for it."""
        ops = _ops(self.backend)
        t = self.tensors
        if self.bits == 8:
            return ops["dequantize_8bit_rowwise"](t["weight"], t["SCB"], dtype=dtype)
        return _dequantize_4bit(ops, t["weight"], self._state(t.get(NESTED_OFFSET)), dtype)


def quantize_pending(
    weight: torch.Tensor,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize: int = 64,
    backend: Backend = "auto",
    scale_search: bool = False,
) -> PendingLayer:
    """``quantize_tensor`` without waiting for the device: the same arguments; see ``PendingLayer``."""
    resolved = resolve_backend(backend, weight.device)
    ops = _ops(resolved)
    if bits == 8:
        if quant_type != "nf4" or double_quant or blocksize != 64:
            raise ValueError("quant_type, double_quant and blocksize apply to 4-bit only; 8-bit is row-wise")
        scb = ops["search_scb"](weight) if scale_search else None
        weight_int8, scb = ops["quantize_8bit_rowwise"](weight, SCB=scb)
        return PendingLayer(
            8, {"weight": weight_int8, "SCB": scb}, shape=tuple(weight.shape), backend=resolved,
            scale_search=scale_search,
        )  # fmt: skip
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    nested: dict[str, torch.Tensor] = {}
    if scale_search:
        # Codes are chosen for the absmax the loader will use: the searched one, or with double quant the searched
        # one as rebuilt from its 8-bit code (scale_search's module docstring).
        absmax = ops["search_absmax"](weight, quant_type=quant_type, blocksize=blocksize)
        if double_quant:
            nested = _double_quant(ops, absmax, weight.device)
            absmax = ops["dequantize_absmax"](
                nested["weight.absmax"], nested["weight.nested_absmax"], nested["weight.nested_quant_map"],
                nested[NESTED_OFFSET],
            )  # fmt: skip
        packed, absmax = ops["quantize_4bit"](weight, quant_type=quant_type, blocksize=blocksize, absmax=absmax)
    else:
        packed, absmax = ops["quantize_4bit"](weight, quant_type=quant_type, blocksize=blocksize)
        nested = _double_quant(ops, absmax, weight.device) if double_quant else {}
    tensors = {
        "weight": packed,
        "weight.absmax": absmax,
        "weight.quant_map": codebooks.quant_map(quant_type, weight.device),
    }
    tensors.update(nested)  # the double-quant codes replace the float32 absmax
    return PendingLayer(
        4, tensors, quant_type=quant_type, blocksize=blocksize, dtype=weight.dtype, shape=tuple(weight.shape),
        backend=resolved, scale_search=scale_search,
    )  # fmt: skip


def _double_quant(ops: dict, absmax: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    codes, nested_absmax, offset = ops["quantize_absmax"](absmax)
    return {
        "weight.absmax": codes,
        "weight.nested_absmax": nested_absmax,
        "weight.nested_quant_map": codebooks.dynamic_map(device),
        NESTED_OFFSET: offset,
    }


def quantize_tensor(
    weight: torch.Tensor,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize: int = 64,
    backend: Backend = "auto",
    scale_search: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize one Linear weight into the state-dict entries bitsandbytes saves for it.

    Args:
        weight: float32 / float16 / bfloat16. 4-bit takes any shape; 8-bit takes [N, K].
        bits: 4 (blockwise NF4/FP4, QLoRA) or 8 (LLM.int8 row-wise).
        quant_type: "nf4" or "fp4".
        double_quant: also quantize the absmax to 8 bits (4-bit only; ~0.4 bits per parameter less).
        blocksize: elements per absmax, a power of two from 32 to 4096 (4-bit only; bnb's loaders use 64).
        backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors).
        scale_search: store per block (4-bit) or row (8-bit) the scale, at most its absmax, that minimizes its
            squared error (``qtool.reference.scale_search``); same format, lower error.

    Returns:
        Entries keyed relative to the module, on the weight's device. 4-bit: ``weight`` (uint8 [(n+1)//2, 1]),
        ``weight.absmax``, ``weight.quant_map``, with double quant ``weight.nested_absmax`` and
        ``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__<quant_type>`` (JSON as uint8).
        8-bit: ``weight`` (int8 [N, K]), ``SCB`` (float32 [N]) and ``weight_format`` (uint8 0).
    """
    return quantize_pending(
        weight, bits=bits, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, backend=backend,
        scale_search=scale_search,
    ).entries()  # fmt: skip


def stored_absmax(state: bnb4.QuantState4bit, *, backend: Backend = "auto") -> torch.Tensor:
    """The absmax a 4-bit weight dequantizes with: ``state.absmax`` itself, or rebuilt from its double-quant codes
    (float32 [nblocks] either way; the dtype is kept as stored without double quant)."""
    if not state.double_quant:
        return state.absmax
    ops = _ops(resolve_backend(backend, state.absmax.device))
    return ops["dequantize_absmax"](
        state.absmax,
        state.nested_absmax,
        state.nested_quant_map,
        state.nested_offset,
        nested_blocksize=state.nested_blocksize,
    )


def _dequantize_4bit(ops: dict, packed: torch.Tensor, state: bnb4.QuantState4bit, dtype: torch.dtype) -> torch.Tensor:
    # With double quant the absmax is rebuilt from its codes inside the same kernel (one launch, no float32 absmax).
    nested = {}
    if state.double_quant:
        nested = {
            "nested_absmax": state.nested_absmax,
            "nested_quant_map": state.nested_quant_map,
            "nested_offset": state.nested_offset,
            "nested_blocksize": state.nested_blocksize,
        }
    return ops["dequantize_4bit"](
        packed, state.absmax, state.quant_map, blocksize=state.blocksize, shape=state.shape, dtype=dtype, **nested
    )


def dequantize_tensor(
    entries: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None, backend: Backend = "auto"
) -> torch.Tensor:
    """Rebuild the dense weight from a layer's bitsandbytes entries (qtool's or bnb's own).

    Args:
        entries: as returned by ``quantize_tensor`` or read from a checkpoint, keyed relative to the module.
        dtype: output dtype; default: 4-bit the dtype recorded in the quant state, 8-bit float16 (bnb quantizes
            the float16 cast of the weight and records no dtype).
        backend: as in ``quantize_tensor``.

    Returns:
        The weight in its original shape. Values equal bitsandbytes' own dequantization of the same bytes.
    """
    if bnb4.is_4bit(entries):
        packed, state = bnb4.decode(entries)
        ops = _ops(resolve_backend(backend, packed.device))
        return _dequantize_4bit(ops, packed, state, dtype or state.dtype)
    if bnb8.is_8bit(entries):
        weight_int8, scb = bnb8.decode(entries)
        ops = _ops(resolve_backend(backend, weight_int8.device))
        return ops["dequantize_8bit_rowwise"](weight_int8, scb, dtype=dtype or torch.float16)
    raise ValueError(f"not a bitsandbytes 4-bit or 8-bit layer: entries {sorted(entries)}")


__all__ = ["quantize_tensor", "quantize_pending", "PendingLayer", "dequantize_tensor", "stored_absmax"]
