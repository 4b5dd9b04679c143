"""Find the bitsandbytes-quantized layers in a checkpoint's key set, and the keys each one owns.

A 4-bit layer ``<m>`` is recognised by its quant-state blob ``<m>.weight.quant_state.bitsandbytes__nf4|fp4``, an
8-bit one by ``<m>.SCB`` (bnb-format.md §1.1, §2.1). Every other key is a plain tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtool.formats import bnb4, bnb8


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized Linear: ``fqn`` is the module path, ``entries`` maps its on-disk names (``weight``,
    ``weight.absmax``, ``SCB``, ...) to full checkpoint keys."""

    fqn: str
    bits: int
    entries: dict[str, str]

    @property
    def weight_key(self) -> str:
        return f"{self.fqn}.weight"


def quantized_layers(keys) -> dict[str, QuantizedLayer]:
    """``{weight key: layer}`` for every quantized layer among ``keys``, in the order of their blobs / SCBs."""
    keys = list(keys)
    present = set(keys)
    layers = {}
    for key in keys:
        if f".{bnb4.BLOB_PREFIX}" in key:
            fqn, _, quant_type = key.partition(f".{bnb4.BLOB_PREFIX}")
            names = (*bnb4.ENTRY_NAMES, bnb4.BLOB_PREFIX + quant_type)
            bits = 4
        elif key.endswith(".SCB"):
            fqn, names, bits = key.removesuffix(".SCB"), bnb8.ENTRY_NAMES, 8
        else:
            continue
        entries = {name: f"{fqn}.{name}" for name in names if f"{fqn}.{name}" in present}
        layers[f"{fqn}.weight"] = QuantizedLayer(fqn, bits, entries)
    return layers


def quant_state_keys(layers: dict[str, QuantizedLayer]) -> set[str]:
    """The keys of ``layers`` (from quantized_layers) that are not their ``weight``: absmax, quant_map, SCB, blobs."""
    return {k for layer in layers.values() for k in layer.entries.values() if k != layer.weight_key}
