"""Checks a run makes before it renames its output into place: nothing is written that qtool has not verified.

- ``check_finite``: a NaN or Inf in a weight (or, for 8-bit, a value beyond float16's range, which bnb's cast turns
  into Inf) spreads over its whole block or row when quantized; refused unless the caller allows it.
- ``check_layer``: a quantized layer's entries, dequantized, against the source weight, elementwise, within the error
  bound the format itself guarantees (derived below, nothing measured). It runs on every layer in memory (the
  codecs) and on a sample read back from the written files (the writer: keys, shards, offsets).
- ``layer_stats`` and ``judge_layer``: both checks split in two for a pipeline. ``layer_stats`` measures on the
  device, chunk by chunk, without waiting (counts, first offenders, SQNR sums, extreme codes: one small vector per
  layer); ``judge_layer`` raises from that vector, on the host, the same errors ``check_finite`` and ``check_layer``
  raise, and ``layer_quality`` turns it into the layer's quality figures (``qtool.quality``).
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

With scale search (``qtool.reference.scale_search``) the stored scale ``a'`` may lie below the absmax by up to
``search_range`` of it, and values beyond it take the extreme code: ``|w - a'| <= a - a'`` for those, which the
``|a - a'|`` term already covers (4-bit); for 8-bit the row's ``SCB`` shortfall is added to the bound the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qtool import quality
from qtool.errors import QtoolError
from qtool.formats import bnb4, bnb8
from qtool.reference.codebooks import NESTED_BLOCKSIZE, dynamic_map, quant_map, scale_grid
from qtool.reference.quant4 import abs_ignoring_nan

if TYPE_CHECKING:
    from qtool.formats.layers import QuantizedLayer
    from qtool.io.reader import ComponentWeights, TensorReader
    from qtool.plan import ComponentPlan
    from qtool.quality import LayerQuality
    from qtool.quantize import PendingLayer
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


# Elements per chunk of the per-layer checks. Their float32 temporaries (the weight, the block absmax input, the
# dequantized weight, the error, the bound) are a few times this: ~100 MB on a GPU whatever the layer's size (FLUX's
# largest Linear, 3072 x 15360, is 12 chunks). On the CPU smaller chunks stay in cache: 2**20 took 0.42 s for a
# 3072 x 12288 NF4 layer against 0.44-0.72 s at 2**22 and 1.3-1.5 s at 2**24 (2 cores).
CHECK_CHUNK = {"cuda": 2**22, "cpu": 2**20}

# What ``layer_stats`` measures, in this order, as a float64 vector (exact for counts and indices below 2**53):
# non-finite values (NaN, Inf, and "bad": what check_finite refuses, the count and the first's flat index); the stored
# scales (absmax or SCB) and the weights beyond their bound (count, first flat index, its error and bound); and the
# sums of squares for SQNR and the largest error; the layer's elements and how many of them took an extreme code
# (``extreme_codes``: the quality report's figures, ``qtool.quality``). An index of -1: none.
STATS = (
    "nan", "inf", "bad_over", "bad_at",
    "scale_over", "scale_at", "scale_err", "scale_bound",
    "weight_over", "weight_at", "weight_err", "weight_bound",
    "signal", "noise", "max_err",
    "count", "extreme",
)  # fmt: skip


@functools.cache
def search_range(bits: int) -> float:
    """How far below its absmax a searched scale may lie, as a fraction of it: 1 - the grid's smallest factor."""
    return 1.0 - float(scale_grid(bits)[-1])


def _chunk(device: torch.device) -> int:
    return CHECK_CHUNK["cuda" if device.type == "cuda" else "cpu"]


class _Stats:
    """``STATS`` as 0-d float64 device tensors, accumulated chunk by chunk without a host sync."""

    def __init__(self, device: torch.device):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.v = {name: zero - 1 if name.endswith("_at") else zero for name in STATS}

    def add(self, name: str, value: torch.Tensor) -> None:
        self.v[name] = self.v[name] + value.to(torch.float64)

    def max(self, name: str, value: torch.Tensor) -> None:
        self.v[name] = torch.maximum(self.v[name], value.to(torch.float64))

    def first(
        self,
        prefix: str,
        over: torch.Tensor,
        base: int,
        err: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ) -> None:
        """Count ``over`` (2-D bool, True where a check fails) and keep the first failure's flat index (``base`` +
        its row-major index; chunks come in order, so the first chunk with one wins) with its error and bound."""
        flat = over.reshape(-1)
        count = flat.sum(dtype=torch.float64)
        # The first True (argmax returns the first maximum; 0 if none), as a 1-element index: indexing with a 0-d
        # integer tensor would read it on the host (a sync).
        i = torch.argmax(flat.view(torch.uint8)).reshape(1)
        take = (self.v[f"{prefix}_at"] < 0) & (count > 0)
        self.v[f"{prefix}_at"] = torch.where(take, (i[0] + base).to(torch.float64), self.v[f"{prefix}_at"])
        if err is not None:
            row, col = i // over.shape[1], i % over.shape[1]
            bound = torch.broadcast_to(allowed, err.shape)[row, col][0]  # a view: no full-size bound is built
            self.v[f"{prefix}_err"] = torch.where(take, err[row, col][0].to(torch.float64), self.v[f"{prefix}_err"])
            self.v[f"{prefix}_bound"] = torch.where(take, bound.to(torch.float64), self.v[f"{prefix}_bound"])
        self.add(f"{prefix}_over", count)

    def finite(self, w: torch.Tensor, bits: int, base: int) -> None:
        """NaN and Inf counts of float32 ``w`` (2-D), and what check_finite refuses: non-finite values, and for
        8-bit anything beyond float16's range (bnb casts to float16 first)."""
        self.add("nan", torch.isnan(w).sum())
        self.add("inf", torch.isinf(w).sum())
        bad = ~torch.isfinite(w) if bits == 4 else ~(w.abs() <= FLOAT16_MAX)
        self.first("bad", bad, base)

    def errors(self, w: torch.Tensor, err: torch.Tensor) -> None:
        """SQNR sums and the largest error: float32 ``w`` and ``err`` = |w - restored| (zero padding adds nothing)."""
        self.add("signal", w.square().sum(dtype=torch.float64))
        self.add("noise", err.square().sum(dtype=torch.float64))
        self.max("max_err", torch.where(torch.isnan(err), 0.0, err).amax())

    def codes(self, n: int, extreme: torch.Tensor) -> None:
        """``n`` more elements, ``extreme`` (0-d, on the device) of them on an extreme code. Adding a Python number
        to a device tensor passes it as a kernel argument: no copy, no sync."""
        self.v["count"] = self.v["count"] + n
        self.add("extreme", extreme)

    def vector(self) -> torch.Tensor:
        return torch.stack([self.v[name] for name in STATS])


def extreme_codes(table: torch.Tensor) -> torch.Tensor:
    """bool [len(table)]: the codes whose value has the table's largest magnitude (a block's absmax, or a row's SCB,
    restores to them): NF4 0 and 15 (-1, +1), FP4 3 and 11 (+-12/12). Derived from the table itself, on its device."""
    magnitude = table.float().abs()
    return magnitude == magnitude.amax()


def _extreme_4bit(packed: torch.Tensor, n: int, per_byte: torch.Tensor, per_code: torch.Tensor) -> torch.Tensor:
    """How many of the ``n`` codes packed in uint8 ``packed`` [(n + 1) // 2] are extreme (0-d int64, on the device).

    ``per_byte`` [256]: extreme codes in each byte value (high nibble: element 2j, low: 2j + 1; 0, 1 or 2);
    ``per_code`` [16] bool: ``extreme_codes``. An odd ``n`` leaves a pad code in the last low nibble: not counted.
    """
    count = per_byte[packed.int()].sum()  # int32 indices: half the memory of int64 (a chunk's bytes x 4)
    if n % 2:
        count = count - per_code[(packed[-1:] & 15).int()].sum()
    return count


def _stats_4bit(weight: torch.Tensor, layer: PendingLayer, stats: _Stats, chunk: int) -> None:
    from qtool.quantize import NESTED_OFFSET, stored_absmax

    t, bs = layer.tensors, layer.blocksize
    state = bnb4.QuantState4bit(
        quant_type=layer.quant_type, blocksize=bs, dtype=layer.dtype, shape=layer.shape,
        absmax=t["weight.absmax"], quant_map=t["weight.quant_map"],
    )  # fmt: skip
    dq = NESTED_OFFSET in t
    if dq:
        state.nested_absmax, state.nested_quant_map = t["weight.nested_absmax"], t["weight.nested_quant_map"]
        state.nested_offset = t[NESTED_OFFSET]  # a 0-d device tensor: no sync
    # float32 [nblocks], what the layer dequantizes with; small (1/16 of a bf16 weight at blocksize 64).
    stored = stored_absmax(state, backend=layer.backend).float()
    if dq:
        nested = state.nested_absmax.float().repeat_interleave(state.nested_blocksize)[: stored.numel()]
        offset = t[NESTED_OFFSET].float().abs()
    flat, packed = weight.reshape(-1), t["weight"].reshape(-1)
    n = flat.numel()
    per_code = extreme_codes(t["weight.quant_map"])
    # uint8 [256]: byte value = high * 16 + low; uint8, so that a chunk's gather is one byte per packed byte.
    per_byte = (per_code[:, None].to(torch.uint8) + per_code[None, :].to(torch.uint8)).reshape(256)
    step = max(bs, chunk // bs * bs)  # whole blocks, so a chunk's blocks are the layer's blocks
    for s in range(0, n, step):
        e = min(n, s + step)
        b0, b1 = s // bs, -(-e // bs)
        w = flat[s:e].float()
        stats.finite(w[None], 4, s)
        blocks = _blocks(w, bs)
        absmax = abs_ignoring_nan(blocks).amax(dim=1)
        absmax_err = (absmax - stored[b0:b1]).abs()
        if dq:
            nest = nested[b0:b1]
            allowed = _half_gap_of("dynamic") * nest + SLACK * (nest + offset + absmax)
        else:
            allowed = torch.zeros_like(absmax)  # bnb stores the float32 absmax itself
        if layer.scale_search:
            allowed = allowed + search_range(4) * absmax  # a searched scale lies in [c_min a, a]
        over = (absmax_err > allowed) & ~torch.isnan(absmax_err)
        stats.first("scale", over[:, None], b0, absmax_err[:, None], allowed[:, None])
        # The layer's own dequantization of these blocks, from the absmax rebuilt above: s is even (whole blocks),
        # so the chunk's codes are whole bytes [s / 2, (e + 1) / 2) of the packed weight.
        part = dataclasses.replace(
            layer,
            tensors={"weight": packed[s // 2 : (e + 1) // 2], "weight.absmax": stored[b0:b1],
                     "weight.quant_map": t["weight.quant_map"]},
            shape=(e - s,),
        )  # fmt: skip
        restored = part.restored(torch.float32)
        err = torch.sub(blocks, _blocks(restored, bs)).abs_()  # in place: few chunk-sized temporaries at once
        del restored
        bound = (_half_gap_of(layer.quant_type) * absmax + absmax_err + SLACK * absmax)[:, None]
        stats.first("weight", (err > bound) & ~torch.isnan(err), s, err, bound)
        stats.errors(w, err)
        stats.codes(e - s, _extreme_4bit(packed[s // 2 : (e + 1) // 2], e - s, per_byte, per_code))


def _stats_8bit(weight: torch.Tensor, layer: PendingLayer, stats: _Stats, chunk: int) -> None:
    rows, k = weight.shape
    codes, scb_all = layer.tensors["weight"], layer.tensors["SCB"]
    step = max(1, chunk // max(k, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = weight[r0:r1].float()
        stats.finite(w, 8, r0 * k)
        # bnb quantizes the float16 cast: SCB is its row absmax, exactly (taken in float16: the same values).
        row_absmax = abs_ignoring_nan(weight[r0:r1].to(torch.float16)).amax(dim=1).float()
        scb = scb_all[r0:r1].float()
        scb_err = (row_absmax - scb).abs()
        scb_allowed = search_range(8) * row_absmax if layer.scale_search else torch.zeros_like(scb)
        over = (scb_err > scb_allowed) & ~torch.isnan(scb_err)
        stats.first("scale", over[:, None], r0, scb_err[:, None], scb_allowed[:, None])
        part = dataclasses.replace(layer, tensors={"weight": codes[r0:r1], "SCB": scb_all[r0:r1]}, shape=(r1 - r0, k))
        restored = part.restored(torch.float32)
        err = torch.sub(w, restored).abs_()
        del restored
        # SCB / 254 for the rounding, half a float16 ulp of |w| (2**-11 relative; 2**-25 absolute below float16's
        # normal range) for the cast: (scb c + |w| 2**-11) + 2**-25, summed in place (a + b is b + a, exactly).
        # A searched SCB below the row absmax clips: |w| - SCB <= scb_err more.
        allowed = w.abs().mul_(2**-11).add_((scb * (1 / 254 + SLACK) + scb_err)[:, None]).add_(2**-25)
        stats.first("weight", (err > allowed) & ~torch.isnan(err), r0 * k, err, allowed)
        stats.errors(w, err)
        rows_codes = codes[r0:r1]
        # bnb's codes lie in [-127, 127]; +-127 is the row's SCB itself. (== rather than abs(): abs(-128) overflows.)
        stats.codes(rows_codes.numel(), ((rows_codes == 127) | (rows_codes == -127)).sum())


def layer_stats(weight: torch.Tensor, layer: PendingLayer, chunk: int | None = None) -> torch.Tensor:
    """Measure a quantized layer against its source weight on the weight's device, without waiting for it.

    Everything the checks need (``judge_layer``): the non-finite values of ``weight`` (``check_finite``); each
    stored scale and each element of the layer's own dequantization against the format's error bound (module
    docstring); SQNR sums and the largest error; and for the quality figures (``layer_quality``) the elements and
    how many took an extreme code (``extreme_codes``). Works ``chunk`` elements (4-bit: whole blocks; 8-bit: whole
    rows) at a time, so the temporaries stay a few times ``chunk`` float32 values.

    Args:
        weight: the source weight, float32 / float16 / bfloat16, [N, K] (4-bit: any shape).
        layer: its quantization (``qtool.quantize.quantize_pending``), on the same device.
        chunk: elements per step; default ``CHECK_CHUNK`` of the device.

    Returns:
        float64 [len(STATS)] on the weight's device (copy it to the host with the layer's tensors).
    """
    chunk = chunk or _chunk(weight.device)
    stats = _Stats(weight.device)
    if weight.numel():
        (_stats_4bit if layer.bits == 4 else _stats_8bit)(weight, layer, stats, chunk)
    return stats.vector()


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for d in reversed(shape):
        out.append(index % d)
        index //= d
    return out[::-1]


def _judge_finite(v: dict[str, float], key: str, bits: int, shape: tuple[int, ...]) -> None:
    if not v["bad_over"]:
        return
    first = _unravel(int(v["bad_at"]), shape)
    nan, inf = int(v["nan"]), int(v["inf"])
    found = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    if bits == 8 and not (nan or inf):
        raise QtoolError(
            f"tensor {key!r} holds {int(v['bad_over'])} values beyond float16's range (+-65504), first at {first}: "
            "LLM.int8 quantizes the float16 cast, where they become Inf and their rows quantize to zeros",
            hint="use 4-bit (--bits 4), or pass --allow-nonfinite to quantize it anyway, as bitsandbytes would",
        )
    raise QtoolError(
        f"tensor {key!r} holds {found} value(s), first at {first}: no code can hold them (a NaN becomes a wrong "
        f"value, an Inf makes its whole {'row' if bits == 8 else 'block'} NaN)",
        hint="the checkpoint may be damaged; pass --allow-nonfinite to quantize it anyway, as bitsandbytes would",
    )


def _judge_bound(v: dict[str, float], prefix: str, key: str, what: str) -> None:
    if not v[f"{prefix}_over"]:
        return
    raise QtoolError(
        f"verification failed: {key}: {int(v[f'{prefix}_over'])} {what} value(s) off by more than the format allows "
        f"(first at flat index {int(v[f'{prefix}_at'])}: error {v[f'{prefix}_err']:.6g} > bound "
        f"{v[f'{prefix}_bound']:.6g})",
        hint="this is a qtool bug: please report it with the output of `qtool env`; nothing was written",
    )


def judge_layer(
    stats: torch.Tensor, key: str, *, bits: int, shape: tuple[int, ...], check_finite: bool = True
) -> float | None:
    """Decide on a layer from its ``layer_stats`` (on the host): raise what ``check_finite`` and ``check_layer``
    raise, in that order, or return the layer's SQNR in dB.

    Args:
        stats: ``layer_stats``' vector, copied to the host.
        key: the tensor's name in messages (``tensor_name``).
        bits: 4 or 8.
        shape: the weight's shape (for the multi-dimensional index of a non-finite value).
        check_finite: refuse NaN / Inf (and for 8-bit, values beyond float16); False with --allow-nonfinite.

    Returns:
        SQNR in dB: None for an all-zero weight, inf for an exact one, NaN where non-finite values were allowed.

    Raises:
        QtoolError: naming the tensor, as ``check_finite``, or "verification failed: ..." as ``check_layer``.
    """
    v = dict(zip(STATS, stats.tolist(), strict=True))
    if check_finite:
        _judge_finite(v, key, bits, shape)
    _judge_bound(v, "scale", key, "absmax" if bits == 4 else "SCB")
    _judge_bound(v, "weight", key, "weight")
    return quality.sqnr_db(v["signal"], v["noise"])


def layer_quality(stats: torch.Tensor, key: str, *, shape: tuple[int, ...], method: str) -> LayerQuality:
    """A layer's quality figures (``qtool.quality.LayerQuality``) from its ``layer_stats`` vector (on the host).

    Args:
        stats: ``layer_stats``' vector, copied to the host.
        key: the weight's state-dict key within its component.
        shape: the weight's shape.
        method: the method's label (``QuantSpec.label``).
    """
    v = dict(zip(STATS, stats.tolist(), strict=True))
    return quality.LayerQuality(
        key=key, shape=tuple(shape), method=method, elements=int(v["count"]), extreme=int(v["extreme"]),
        signal=v["signal"], noise=v["noise"], max_abs_err=v["max_err"],
        nonfinite=bool(v["nan"] or v["inf"] or v["bad_over"]),
    )  # fmt: skip


def check_finite(weight: torch.Tensor, key: str, bits: int) -> None:
    """Refuse a weight holding NaN or Inf, or, for 8-bit, a value beyond float16's range (bnb casts to float16).

    Raises QtoolError naming the tensor, its counts and the first index (as ``judge_layer`` does).
    """
    stats, step = _Stats(weight.device), _chunk(weight.device)
    flat = weight.reshape(1, -1)
    for s in range(0, flat.shape[1], step):
        stats.finite(flat[:, s : s + step].float(), bits, s)
    v = dict(zip(STATS, stats.vector().tolist(), strict=True))
    _judge_finite(v, key, bits, tuple(weight.shape))


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [nblocks, blocksize]: the flattened x, zero-padded to whole blocks."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)


def pending_from_entries(entries: dict[str, torch.Tensor], scale_search: bool = False) -> PendingLayer:
    """A layer's bnb entries (as written or read back) as a ``PendingLayer`` on their device; ``scale_search``: its
    scales were searched (``quantize_pending``), which the checks' bounds allow for.

    Raises:
        ValueError: the entries are not a bitsandbytes 4-bit or 8-bit layer.
    """
    from qtool.quantize import NESTED_OFFSET, PendingLayer, resolve_backend

    if bnb4.is_4bit(entries):
        packed, state = bnb4.decode(entries)
        backend = resolve_backend("auto", packed.device)
        tensors = {"weight": packed, "weight.absmax": state.absmax, "weight.quant_map": state.quant_map}
        if state.double_quant:
            if state.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {state.nested_blocksize} is not bitsandbytes' {NESTED_BLOCKSIZE}")
            tensors["weight.nested_absmax"] = state.nested_absmax
            tensors["weight.nested_quant_map"] = state.nested_quant_map
            tensors[NESTED_OFFSET] = torch.tensor(state.nested_offset, dtype=torch.float32, device=packed.device)
        return PendingLayer(
            4, tensors, quant_type=state.quant_type, blocksize=state.blocksize, dtype=state.dtype,
            shape=tuple(state.shape), backend=backend, scale_search=scale_search,
        )  # fmt: skip
    if bnb8.is_8bit(entries):
        weight, scb = bnb8.decode(entries)
        backend = resolve_backend("auto", weight.device)
        return PendingLayer(
            8, {"weight": weight, "SCB": scb}, shape=tuple(weight.shape), backend=backend, scale_search=scale_search
        )
    raise ValueError(f"not a bitsandbytes 4-bit or 8-bit layer: entries {sorted(entries)}")


def check_layer(
    weight: torch.Tensor, entries: dict[str, torch.Tensor], key: str, scale_search: bool = False
) -> float | None:
    """Dequantize ``entries`` (one layer's bnb entries, relative to the module, on the weight's device) and check
    each element, and each stored scale, against ``weight`` within the format's error bound (module docstring;
    ``scale_search``: the scales were searched, so each may lie below its absmax by ``search_range``).

    ``layer_stats`` then ``judge_layer`` (without the non-finite check), with one host sync.

    Returns:
        The layer's SQNR in dB (see ``judge_layer``).

    Raises:
        QtoolError: a value is further off than the format allows (a qtool bug; the run writes nothing).
    """
    layer = pending_from_entries(entries, scale_search)
    stats = layer_stats(weight, layer).cpu()
    return judge_layer(stats, key, bits=layer.bits, shape=tuple(weight.shape), check_finite=False)


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
            name = f"{tensor_name(plan.name, key)} (as written)"
            check_layer(source.read(key).to(device), entries, name, spec.scale_search)


def nonfinite_count(dense: torch.Tensor) -> torch.Tensor:
    """int64 0-d on ``dense``'s device: how many of its values are NaN or Inf (queues work, never waits)."""
    count, step = torch.zeros((), dtype=torch.int64, device=dense.device), _chunk(dense.device)
    flat = dense.reshape(-1)
    for s in range(0, flat.numel(), step):
        count = count + (~torch.isfinite(flat[s : s + step])).sum()
    return count


def judge_dequantized(count: int, key: str) -> None:
    """Refuse a dequantized weight with ``count`` NaN or Inf values (``nonfinite_count``): its stored scales (absmax,
    SCB) are not finite."""
    if count:
        raise QtoolError(
            f"tensor {key!r} dequantizes to {count} NaN or Inf value(s): its stored scales are not finite",
            hint="the checkpoint may be damaged; pass --allow-nonfinite to write them anyway",
        )


def check_dequantized_finite(dense: torch.Tensor, key: str) -> None:
    """Refuse a dequantized weight holding NaN or Inf (one host sync)."""
    judge_dequantized(int(nonfinite_count(dense)), key)


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
