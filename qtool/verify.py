"""Checks a run makes before it renames its output into place: nothing is written that qtool has not verified.

- ``check_finite``: a NaN or Inf in a weight (or, for 8-bit, a value beyond float16's range, which bnb's cast turns
  into Inf) spreads over its whole block or row when quantized; refused unless the caller allows it.
- ``check_layer``: a quantized layer's entries, dequantized, against the source weight, elementwise, within the error
  bound the format itself guarantees (derived below, nothing measured). It runs on every layer in memory (the
  codecs) and on a sample read back from the written files (the writer: keys, shards, offsets).
- ``verify_component``: the written headers re-read (key set, dtypes and shapes exactly the plan's), and a sample of
  layers read back from the written files and checked against the source with ``check_layer``.
- ``verify_dequantized``: the same for ``qtool dequantize``, where a sampled layer read back must equal the
  dequantization of its source entries bit for bit.

The 4-bit bound. Codes are chosen from ``s = w / a`` (``a`` the block's absmax, so |s| <= 1) as the nearest entry
``c`` of the codebook, so ``|s - c| <= h``, half the codebook's largest gap. Dequantization gives ``c * a'`` where
``a'`` is the stored absmax: ``a`` itself, or with double quant ``a`` rebuilt from an 8-bit code of the dynamic map,
``|a - a'| <= h_dyn * nested_absmax`` by the same argument. Hence, as |c| <= 1,
``|w - c a'| <= |w - c a| + |c| |a - a'| <= h a + |a - a'|``. 8-bit: bnb quantizes the float16 cast ``w16`` of the
weight, ``SCB`` is each row's absmax of ``w16`` exactly, and ``|w16 - q SCB / 127| <= SCB / 254``; the cast adds at
most half a float16 ulp of |w|. Each bound gets a float32 slack of a few ulps of the values involved.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qtool.errors import QtoolError
from qtool.formats import bnb4, bnb8
from qtool.reference.codebooks import NESTED_BLOCKSIZE, dynamic_map, quant_map
from qtool.reference.quant4 import abs_ignoring_nan

if TYPE_CHECKING:
    from qtool.formats.layers import QuantizedLayer
    from qtool.io.reader import ComponentWeights, TensorReader
    from qtool.plan import ComponentPlan
    from qtool.spec import QuantSpec

FLOAT16_MAX = 65504.0
# Relative float32 slack: the scale is a reciprocal times a product (and, on CUDA, an approximate reciprocal), and
# the double-quant absmax is a product plus an offset; 1e-5 is ~80 float32 ulps, far below any real defect.
SLACK = 1e-5


def tensor_name(component: str, key: str) -> str:
    """A tensor's name in messages: ``transformer/<key>`` in a pipeline's component, the key alone in a model."""
    return f"{component}/{key}" if component else key


def half_gap(table: torch.Tensor) -> float:
    """Half the largest gap between neighbouring entries of a codebook: the most nearest-rounding can be off."""
    values = torch.sort(table.float().cpu()).values
    return float((values[1:] - values[:-1]).max()) / 2


@functools.cache
def _half_gap_of(codebook: str) -> float:
    # Once per codebook ("nf4", "fp4", "dynamic"), not once per layer.
    return half_gap(dynamic_map() if codebook == "dynamic" else quant_map(codebook))


def check_finite(weight: torch.Tensor, key: str, bits: int) -> None:
    """Refuse a weight holding NaN or Inf, or, for 8-bit, a value beyond float16's range (bnb casts to float16).

    One reduction and one host sync per weight. Raises QtoolError naming the tensor, its counts and the first index.
    """
    peak = weight.abs().amax().item() if weight.numel() else 0.0  # NaN propagates through amax
    limit = FLOAT16_MAX if bits == 8 else math.inf
    if math.isfinite(peak) and peak <= limit:
        return
    bad = ~torch.isfinite(weight) if bits == 4 else ~(weight.abs() <= limit)
    first = [int(i) for i in bad.nonzero()[0]]
    nan, inf = int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum())
    found = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    if bits == 8 and not (nan or inf):
        raise QtoolError(
            f"tensor {key!r} holds {int(bad.sum())} values beyond float16's range (+-65504), first at {first}: "
            "LLM.int8 quantizes the float16 cast, where they become Inf and their rows quantize to zeros",
            hint="use 4-bit (--bits 4), or pass --allow-nonfinite to quantize it anyway, as bitsandbytes would",
        )
    raise QtoolError(
        f"tensor {key!r} holds {found} value(s), first at {first}: no code can hold them (a NaN becomes a wrong "
        f"value, an Inf makes its whole {'row' if bits == 8 else 'block'} NaN)",
        hint="the checkpoint may be damaged; pass --allow-nonfinite to quantize it anyway, as bitsandbytes would",
    )


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [nblocks, blocksize]: the flattened x, zero-padded to whole blocks."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)


def _report(err: torch.Tensor, allowed: torch.Tensor, key: str, what: str) -> None:
    allowed = allowed.expand_as(err)
    # NaN errors (non-finite weights the caller allowed) are not checked: there is no bound to hold.
    over = (err > allowed) & ~torch.isnan(err)
    if bool(over.any()):
        i = int(over.reshape(-1).nonzero()[0])
        raise QtoolError(
            f"verification failed: {key}: {int(over.sum())} {what} value(s) off by more than the format allows (first "
            f"at flat index {i}: error {err.reshape(-1)[i].item():.6g} > bound {allowed.reshape(-1)[i].item():.6g})",
            hint="this is a qtool bug: please report it with the output of `qtool env`; nothing was written",
        )


def _check_4bit(weight: torch.Tensor, entries: dict[str, torch.Tensor], restored: torch.Tensor, key: str) -> None:
    from qtool.quantize import stored_absmax

    _, state = bnb4.decode(entries)
    stored = stored_absmax(state).float()
    blocks = _blocks(weight, state.blocksize)
    absmax = abs_ignoring_nan(blocks).amax(dim=1)
    absmax_err = (absmax - stored).abs()
    if state.double_quant:
        nested = state.nested_absmax.float().repeat_interleave(state.nested_blocksize)[: absmax.numel()]
        allowed = _half_gap_of("dynamic") * nested + SLACK * (nested + abs(state.nested_offset) + absmax)
    else:
        allowed = torch.zeros_like(absmax)  # bnb stores the float32 absmax itself
    _report(absmax_err, allowed, key, "absmax")
    bound = _half_gap_of(state.quant_type) * absmax + absmax_err + SLACK * absmax
    _report((blocks - _blocks(restored, state.blocksize)).abs(), bound[:, None], key, "weight")


def _check_8bit(weight: torch.Tensor, entries: dict[str, torch.Tensor], restored: torch.Tensor, key: str) -> None:
    _, scb = bnb8.decode(entries)
    scb = scb.float()
    row_absmax = abs_ignoring_nan(weight.to(torch.float16).float()).amax(dim=1)
    _report((row_absmax - scb).abs(), torch.zeros_like(scb), key, "SCB")
    w = weight.float()
    # Half a float16 ulp of |w| (2**-11 relative; 2**-25 absolute below float16's normal range) for the cast.
    allowed = scb[:, None] * (1 / 254 + SLACK) + w.abs() * 2**-11 + 2**-25
    _report((w - restored).abs(), allowed, key, "weight")


def check_layer(weight: torch.Tensor, entries: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Dequantize ``entries`` (one layer's bnb entries, relative to the module, on the weight's device) and check
    each element, and each stored scale, against ``weight`` within the format's error bound (module docstring).

    Returns:
        The dequantized weight in float32 (for the caller's error statistics).

    Raises:
        QtoolError: a value is further off than the format allows (a qtool bug; the run writes nothing).
    """
    from qtool.quantize import dequantize_tensor

    restored = dequantize_tensor(entries, dtype=torch.float32)
    if bnb4.is_4bit(entries):
        _check_4bit(weight, entries, restored, key)
    else:
        _check_8bit(weight, entries, restored, key)
    return restored


def expected_tensors(plan: ComponentPlan, spec: QuantSpec) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Every output key with its safetensors dtype tag and shape (None for the quant-state blob, whose length
    depends on the double-quant offset's repr)."""
    out: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for key, info in plan.weights.tensors.items():
        layer = plan.layers.get(key)
        if layer is None:
            out[key] = (info.dtype, tuple(info.shape))
            continue
        rows, n = layer.shape[0], math.prod(layer.shape)
        if spec.bits == 8:
            out.update({key: ("I8", layer.shape), f"{layer.fqn}.SCB": ("F32", (rows,))})
            out[f"{layer.fqn}.weight_format"] = ("U8", ())
            continue
        nblocks = math.ceil(n / spec.blocksize)
        out[key] = ("U8", ((n + 1) // 2, 1))
        out[f"{key}.absmax"] = ("U8", (nblocks,)) if spec.double_quant else ("F32", (nblocks,))
        out[f"{key}.quant_map"] = ("F32", (16,))
        if spec.double_quant:
            out[f"{key}.nested_absmax"] = ("F32", (math.ceil(nblocks / NESTED_BLOCKSIZE),))
            out[f"{key}.nested_quant_map"] = ("F32", (256,))
        out[f"{key}.quant_state.bitsandbytes__{spec.quant_type}"] = ("U8", None)
    return out


def sample(keys: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` keys spread evenly over ``keys``, first and last included: which layers are read back."""
    if len(keys) <= n:
        return list(keys)
    return [keys[round(i * (len(keys) - 1) / (n - 1))] for i in range(n)]


def verify_component(plan: ComponentPlan, spec: QuantSpec, out: Path, source: TensorReader, device: str) -> None:
    """Verify a component's written files before they are renamed into place.

    Re-reads the written headers (as strictly as any other input): the key set, every dtype and shape must be the
    plan's. Then reads a sample of quantized layers back from the written files and the source weights from
    ``source`` (the run's reader) and checks them with ``check_layer``: this catches a tensor written under the
    wrong key, into the wrong shard or at the wrong offset, which the in-memory checks cannot see.

    Raises:
        QtoolError: "verification of <out> failed: ...", naming what differs.
    """
    from qtool.formats.layers import quantized_layers
    from qtool.io.reader import TensorReader, scan_component

    written = scan_component(out)
    found = {k: (t.dtype, tuple(t.shape)) for k, t in written.tensors.items()}
    expected = expected_tensors(plan, spec)
    # A shape of None (the blob) matches any shape.
    both = set(expected) & set(found)
    wrong = sorted(k for k in both if expected[k] != (found[k][0], None if expected[k][1] is None else found[k][1]))
    if set(found) != set(expected) or wrong:
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        raise QtoolError(
            f"verification of {out} failed: missing {missing}, unexpected {extra}, wrong dtype or shape {wrong[:3]}",
            hint="this is a qtool bug: please report it with the output of `qtool env`; nothing was written",
        )
    layers = quantized_layers(written.tensors)
    with TensorReader(written) as reader:
        for key in sample(list(plan.layers)):
            entries = {name: reader.read(k).to(device) for name, k in layers[key].entries.items()}
            check_layer(source.read(key).to(device), entries, f"{tensor_name(plan.name, key)} (as written)")


def check_dequantized_finite(dense: torch.Tensor, key: str) -> None:
    """Refuse a dequantized weight holding NaN or Inf: its stored scales (absmax, SCB) are not finite."""
    if dense.numel() and not math.isfinite(dense.abs().amax().item()):
        count = int((~torch.isfinite(dense)).sum())
        raise QtoolError(
            f"tensor {key!r} dequantizes to {count} NaN or Inf value(s): its stored scales are not finite",
            hint="the checkpoint may be damaged; pass --allow-nonfinite to write them anyway",
        )


def verify_dequantized(
    weights: ComponentWeights,
    layers: dict[str, QuantizedLayer],
    out: Path,
    source: TensorReader,
    device: str,
    target: Callable[[QuantizedLayer], torch.dtype | None],
) -> None:
    """Verify a dequantized component's written files before they are renamed into place.

    The written keys are the source's minus every quant-state entry; each dequantized weight is float and has the
    shape its quant state records, every other tensor the source's dtype and shape. A sample of layers is read back
    and must equal, bit for bit, the dequantization of the source entries (``target(layer)``: the output dtype).

    Raises:
        QtoolError: "verification of <out> failed: ...", naming what differs.
    """
    from qtool.formats.layers import quant_state_keys
    from qtool.io.reader import TensorReader, scan_component
    from qtool.quantize import dequantize_tensor

    written = scan_component(out)
    expected = [k for k in weights.tensors if k not in quant_state_keys(layers)]

    def fail(what: str) -> QtoolError:
        return QtoolError(
            f"verification of {out} failed: {what}",
            hint="this is a qtool bug: please report it with the output of `qtool env`; nothing was written",
        )

    if sorted(written.tensors) != sorted(expected):
        raise fail("the written keys are not the source's minus its quant states")
    for key in expected:
        info, src = written.tensors[key], weights.tensors[key]
        if key not in layers and (info.dtype, info.shape) != (src.dtype, src.shape):
            raise fail(f"{key} changed from {src.dtype} {list(src.shape)} to {info.dtype} {list(info.shape)}")
        if key in layers and (info.dtype not in ("BF16", "F16", "F32") or len(info.shape) != 2):
            raise fail(f"{key} is {info.dtype} {list(info.shape)}, not a 2-D float weight")
    with TensorReader(written) as reader:
        for key in sample(list(layers)):
            layer = layers[key]
            entries = {name: source.read(k).to(device) for name, k in layer.entries.items()}
            dense = dequantize_tensor(entries, dtype=target(layer)).cpu()
            back = reader.read(key)
            if (
                back.dtype != dense.dtype
                or back.shape != dense.shape
                or not torch.equal(back.view(torch.uint8), dense.view(torch.uint8))
            ):
                raise fail(f"{key} as written differs from the dequantization of its source entries")
