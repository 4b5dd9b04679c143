"""The bitsandbytes 4-bit state-dict entries of one Linear layer: build them and read them back.

Only this module spells the on-disk key suffixes (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...)
and the JSON blob. Keys are relative to the module (``weight``, not ``transformer_blocks.0.attn.to_q.weight``).
Format: ../shared/docs/bnb-format.md §1.1 and §1.8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from qtool.reference.codebooks import NESTED_BLOCKSIZE, QUANT_TYPES

BLOB_PREFIX = "weight.quant_state.bitsandbytes__"
# The entries of one 4-bit layer, relative to the module, besides the blob (BLOB_PREFIX + quant type); the nested
# ones only with double quant.
ENTRY_NAMES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass
class QuantState4bit:
    """What one 4-bit weight stores besides its packed codes. Field names are the on-disk names.

    absmax is float32 [nblocks] without double quant, or uint8 codes [nblocks] with it; the nested fields are set
    only with double quant. dtype is the original weight dtype, the default output of dequantization.
    """

    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def blob_dict(state: QuantState4bit) -> dict:
    """The JSON object of the quant_state blob, with bnb's key order (QuantState.as_dict)."""
    return blob_fields(
        state.quant_type,
        state.blocksize,
        DTYPE_NAMES[state.dtype],
        state.shape,
        nested_offset=state.nested_offset if state.double_quant else None,
        nested_blocksize=state.nested_blocksize,
    )


def blob_fields(
    quant_type: str,
    blocksize: int,
    dtype_name: str,
    shape: tuple[int, ...],
    nested_offset: float | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> dict:
    """The quant_state JSON object from plain values (``nested_offset`` None: no double quant)."""
    d: dict = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype_name, "shape": list(shape)}
    if nested_offset is not None:
        d.update(
            {
                "nested_blocksize": nested_blocksize,
                "nested_dtype": "float32",
                # float(fp32): json writes the shortest repr of the double, exactly as bnb's offset.item().
                "nested_offset": float(nested_offset),
            }
        )
    return d


def encode_blob(d: dict) -> torch.Tensor:
    """json.dumps with Python's default separators, UTF-8, as a 1-D uint8 tensor (bnb's pack_dict_to_tensor)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def decode_blob(blob: torch.Tensor) -> dict:
    return json.loads(bytes(blob.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))


def encode(packed: torch.Tensor, state: QuantState4bit) -> dict[str, torch.Tensor]:
    """The entries bnb's Linear4bit saves for its weight, in its state-dict order (bias aside)."""
    entries = {"weight": packed, "weight.absmax": state.absmax, "weight.quant_map": state.quant_map}
    if state.double_quant:
        entries["weight.nested_absmax"] = state.nested_absmax
        entries["weight.nested_quant_map"] = state.nested_quant_map
    entries[BLOB_PREFIX + state.quant_type] = encode_blob(blob_dict(state))
    return entries


def is_4bit(entries: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(BLOB_PREFIX) for key in entries)


def decode(entries: dict[str, torch.Tensor]) -> tuple[torch.Tensor, QuantState4bit]:
    """Read ``(packed, state)`` back from a layer's entries; the blob decides how to decode (as in bnb).

    Raises ValueError naming the missing or inconsistent entry.
    """
    blobs = [key for key in entries if key.startswith(BLOB_PREFIX)]
    if len(blobs) != 1:
        raise ValueError(f"expected exactly one '{BLOB_PREFIX}<nf4|fp4>' entry, found {blobs or 'none'}")
    meta = decode_blob(entries[blobs[0]])
    quant_type = meta.get("quant_type")
    if quant_type not in QUANT_TYPES or blobs[0] != BLOB_PREFIX + quant_type:
        raise ValueError(f"quant state {blobs[0]!r} records quant_type {quant_type!r}")
    for key in ("weight", "weight.absmax", "weight.quant_map"):
        if key not in entries:
            raise ValueError(f"4-bit weight is missing its '{key}' entry")
    if meta.get("dtype") not in DTYPES_BY_NAME:
        raise ValueError(f"quant state records an unsupported dtype {meta.get('dtype')!r}")
    state = QuantState4bit(
        quant_type=quant_type,
        blocksize=int(meta["blocksize"]),
        dtype=DTYPES_BY_NAME[meta["dtype"]],
        shape=tuple(int(d) for d in meta["shape"]),
        absmax=entries["weight.absmax"],
        quant_map=entries["weight.quant_map"],
    )
    if "nested_offset" in meta:
        for key in ("weight.nested_absmax", "weight.nested_quant_map"):
            if key not in entries:
                raise ValueError(f"double-quantized 4-bit weight is missing its '{key}' entry")
        state.nested_absmax = entries["weight.nested_absmax"]
        state.nested_quant_map = entries["weight.nested_quant_map"]
        state.nested_offset = float(meta["nested_offset"])
        state.nested_blocksize = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
    return entries["weight"], state
