"""qtool.verify's per-layer checks in their pipeline form (layer_stats on the device, judge_layer on the host): the
same decisions and messages as the checks written plainly over whole tensors (``plain_check`` below, the form they
had before issue 7), whatever the chunking; memory bounded on the GPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import sqnr_db
from qtool.errors import QtoolError
from qtool.formats import bnb4
from qtool.quantize import quantize_pending, stored_absmax
from qtool.reference.codebooks import quant_map
from qtool.reference.quant4 import abs_ignoring_nan, unpack_4bit_ref
from qtool.verify import (
    SLACK,
    STATS,
    _half_gap_of,
    check_finite,
    check_layer,
    extreme_codes,
    judge_dequantized,
    judge_layer,
    layer_quality,
    layer_stats,
    nonfinite_count,
)

METHODS = {
    "nf4": {"bits": 4},
    "fp4-bs128": {"bits": 4, "quant_type": "fp4", "blocksize": 128},
    "nf4-dq": {"bits": 4, "double_quant": True},
    "fp4-dq-bs32": {"bits": 4, "quant_type": "fp4", "double_quant": True, "blocksize": 32},
    "int8": {"bits": 8},
}


def plain_check(weight: torch.Tensor, layer, key: str) -> None:
    """The bound checks over whole tensors, one reduction each, from the layer's entries: the oracle for the
    chunked form."""
    t = layer.tensors

    def report(err, allowed, what):
        allowed = allowed.expand_as(err)
        over = (err > allowed) & ~torch.isnan(err)
        if bool(over.any()):
            i = int(over.reshape(-1).nonzero()[0])
            raise QtoolError(
                f"verification failed: {key}: {int(over.sum())} {what} value(s) off by more than the format allows "
                f"(first at flat index {i}: error {err.reshape(-1)[i].item():.6g} > bound "
                f"{allowed.reshape(-1)[i].item():.6g})"
            )

    restored = layer.restored(torch.float32)
    if layer.bits == 8:
        scb = t["SCB"].float()
        row_absmax = abs_ignoring_nan(weight.to(torch.float16).float()).amax(dim=1)
        report((row_absmax - scb).abs(), torch.zeros_like(scb), "SCB")
        w = weight.float()
        report((w - restored).abs(), scb[:, None] * (1 / 254 + SLACK) + w.abs() * 2**-11 + 2**-25, "weight")
        return
    bs = layer.blocksize

    def blocks(x):
        flat = x.reshape(-1).float()
        return torch.nn.functional.pad(flat, (0, -flat.numel() % bs)).view(-1, bs)

    _, state = bnb4.decode(layer.entries())
    stored = stored_absmax(state).float()
    absmax = abs_ignoring_nan(blocks(weight)).amax(dim=1)
    absmax_err = (absmax - stored).abs()
    if state.double_quant:
        nested = state.nested_absmax.float().repeat_interleave(state.nested_blocksize)[: absmax.numel()]
        allowed = _half_gap_of("dynamic") * nested + SLACK * (nested + abs(state.nested_offset) + absmax)
    else:
        allowed = torch.zeros_like(absmax)
    report(absmax_err, allowed, "absmax")
    bound = _half_gap_of(layer.quant_type) * absmax + absmax_err + SLACK * absmax
    report((blocks(weight) - blocks(restored)).abs(), bound[:, None], "weight")


def outcome(fn) -> str:
    try:
        return f"ok {fn()}"
    except QtoolError as e:
        return str(e)


def corrupt(layer, how: str):
    """A defect in one quantized layer: its scales too large, or two codes flipped (one early, one late)."""
    t = dict(layer.tensors)
    if how == "scale":
        name = "SCB" if layer.bits == 8 else "weight.absmax"
        t[name] = t[name] * 2 if t[name].dtype != torch.uint8 else t[name] // 2
    elif layer.bits == 8:
        codes = t["weight"].clone()
        codes[0, 3], codes[-1, -2] = codes[0, 3] // 2 + 50, 127 - codes[-1, -2].abs()
        t["weight"] = codes
    else:
        codes = t["weight"].clone()
        codes[3] ^= 0x77
        codes[-2] ^= 0x31
        t["weight"] = codes
    return dataclasses.replace(layer, tensors=t)


@pytest.mark.parametrize("shape", [(96, 320), (1, 64), (7, 33), (300, 1000)], ids=str)
@pytest.mark.parametrize("defect", [None, "scale", "codes"])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_chunked_checks_decide_as_the_plain_ones(method, defect, shape):
    """Correct layers pass with the SQNR of their dequantization; defective ones fail with the plain check's exact
    message (count, first flat index, error and bound), for chunks of one block (or row) up to the whole layer."""
    kwargs = METHODS[method]
    torch.manual_seed(sum(shape))
    weight = torch.randn(shape, dtype=torch.bfloat16)
    layer = quantize_pending(weight, **kwargs)
    if defect:
        layer = corrupt(layer, defect)
    expected = outcome(lambda: plain_check(weight, layer, "k"))
    for chunk in (1 if weight.numel() < 50_000 else 640, 4096, 10**9):
        got = outcome(lambda c=chunk: judge_layer(layer_stats(weight, layer, c), "k", bits=layer.bits, shape=shape))
        if got.startswith("ok "):
            assert math.isclose(float(got[3:]), sqnr_db(weight.float(), layer.restored(torch.float32)), rel_tol=1e-6)
            got = "ok None"
        assert got == expected, f"chunk {chunk}"
    if shape[0] > 1:  # (a defect in a one-row layer may change nothing, e.g. one block's double-quant absmax)
        assert (defect is None) == (expected == "ok None")


@pytest.mark.parametrize(
    "method, values, message",
    [
        ("nf4", {(3, 5): "nan"}, "holds 1 NaN value(s), first at [3, 5]: no code can hold them"),
        ("nf4-dq", {(40, 2): "inf", (3, 5): "nan", (3, 7): "-inf"}, "holds 1 NaN, 2 Inf value(s), first at [3, 5]"),
        ("int8", {(9, 0): "-inf"}, "holds 1 Inf value(s), first at [9, 0]: no code can hold them (a NaN becomes a "
         "wrong value, an Inf makes its whole row NaN)"),
        ("int8", {(2, 1): 70000.0, (5, 5): -65520.0},
         "holds 2 values beyond float16's range (+-65504), first at [2, 1]"),
    ],
    ids=["nan", "dq-nan-inf", "int8-inf", "int8-beyond-fp16"],
)  # fmt: skip
def test_nonfinite_weights_are_named_unless_allowed(method, values, message):
    """NaN / Inf (8-bit: beyond float16) are refused with counts and the first index, as check_finite refuses them
    before quantizing; allowed, the layer passes the bound checks (NaN errors are not checked) with a NaN SQNR."""
    weight = torch.randn(64, 128, dtype=torch.float32)
    for where, value in values.items():
        weight[where] = float(value)
    layer = quantize_pending(weight, **METHODS[method])
    for chunk in (64, 10**9):
        stats = layer_stats(weight, layer, chunk)
        with pytest.raises(QtoolError) as info:
            judge_layer(stats, "t", bits=layer.bits, shape=tuple(weight.shape))
        assert info.value.message.startswith(f"tensor 't' {message}") and "--allow-nonfinite" in info.value.hint
        assert math.isnan(judge_layer(stats, "t", bits=layer.bits, shape=tuple(weight.shape), check_finite=False))
    with pytest.raises(QtoolError) as plain:
        check_finite(weight, "t", layer.bits)
    assert plain.value.message == info.value.message


def test_a_zero_weight_has_no_sqnr_and_an_exact_one_infinite_sqnr():
    zero = torch.zeros(4, 64)
    assert judge_layer(layer_stats(zero, quantize_pending(zero)), "z", bits=4, shape=(4, 64)) is None
    exact = torch.zeros(4, 64)
    exact[:, 0] = 1.0  # every block holds 1 and zeros: both are codes of NF4 exactly
    assert judge_layer(layer_stats(exact, quantize_pending(exact)), "e", bits=4, shape=(4, 64)) == math.inf


def test_stats_are_one_float64_vector_on_the_weights_device(device):
    weight = torch.randn(32, 256, device=device)
    stats = layer_stats(weight, quantize_pending(weight, double_quant=True))
    assert stats.dtype == torch.float64 and stats.shape == (len(STATS),) and stats.device.type == device


def test_check_layer_reads_entries_as_written():
    """check_layer (the read-back of written files) decides from the on-disk entries as judge_layer does."""
    weight = torch.randn(48, 192, dtype=torch.bfloat16)
    for kwargs in METHODS.values():
        layer = quantize_pending(weight, **kwargs)
        sqnr = judge_layer(layer_stats(weight, layer), "k", bits=layer.bits, shape=(48, 192))
        assert check_layer(weight, layer.entries(), "k") == sqnr
        for defect in ("scale", "codes"):
            bad = corrupt(layer, defect)
            got = outcome(lambda b=bad: check_layer(weight, b.entries(), "k"))
            assert (got if got.startswith("verification") else "ok None") == outcome(
                lambda b=bad: plain_check(weight, b, "k")
            )


# The codes of +-1 (NF4: -1 and 1; FP4: bit patterns 0b0011 = 12/12 and 0b1011 = -12/12), written out by hand.
EXTREME = {"nf4": {0, 15}, "fp4": {3, 11}}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_extreme_codes_are_those_of_the_tables_largest_magnitude(quant_type):
    assert set(extreme_codes(quant_map(quant_type)).nonzero().flatten().tolist()) == EXTREME[quant_type]


def expected_codes(layer, numel: int) -> tuple[int, int]:
    """(elements, extreme codes) of a layer, counted independently of layer_stats: the 4-bit codes unpacked by the
    reference (the pad code of an odd numel dropped), the int8 codes compared with +-127 in int16."""
    if layer.bits == 8:
        return numel, int((layer.tensors["weight"].to(torch.int16).abs() == 127).sum())
    codes = unpack_4bit_ref(layer.tensors["weight"], numel)
    return numel, sum(int(c) in EXTREME[layer.quant_type] for c in codes)


@pytest.mark.parametrize("shape", [(96, 320), (1, 64), (7, 33), (5, 39)], ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_elements_and_extreme_codes_are_counted_from_the_stored_codes(method, shape):
    """``count`` is the layer's numel and ``extreme`` how many of its codes are extreme (4-bit: the codes of +-1;
    int8: +-127), for chunks of one block (or row) up to the whole layer; odd numels (231, 195) included. Uniform
    weights put ~14% of NF4 codes (the values above its last midpoint, 0.86) on the extremes: far from 0."""
    torch.manual_seed(sum(shape))
    weight = (torch.rand(shape) * 2 - 1).to(torch.bfloat16)
    layer = quantize_pending(weight, **METHODS[method])
    expected = expected_codes(layer, weight.numel())
    assert expected[1] > 0
    for chunk in (1, 4096, 10**9):
        v = dict(zip(STATS, layer_stats(weight, layer, chunk).tolist(), strict=True))
        assert (v["count"], v["extreme"]) == expected, f"chunk {chunk}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_pad_code_of_an_odd_numel_is_not_counted(quant_type):
    """The low nibble of an odd-sized layer's last byte holds no element: set to an extreme code, it changes
    neither the checks nor the counts."""
    weight = torch.randn(3, 21)  # 63 elements: 32 bytes, the last low nibble padding
    layer = quantize_pending(weight, quant_type=quant_type)
    packed = layer.tensors["weight"].clone()
    padded = {}
    for code in sorted(EXTREME[quant_type]):
        packed[-1, 0] = (packed[-1, 0] & 0xF0) | code
        tampered = dataclasses.replace(layer, tensors=layer.tensors | {"weight": packed})
        padded[code] = dict(zip(STATS, layer_stats(weight, tampered, 64).tolist(), strict=True))
    plain = dict(zip(STATS, layer_stats(weight, layer, 64).tolist(), strict=True))
    assert all(v == plain for v in padded.values())
    assert (plain["count"], plain["extreme"]) == expected_codes(layer, 63)


def test_layer_quality_reads_the_figures_from_the_stats():
    """layer_quality: the SQNR judge_layer returns, rel. Frobenius = sqrt(noise / signal) and the largest error of
    the layer's dequantization, measured independently in float64; its extreme share; the non-finite flag."""
    weight = torch.randn(48, 192, dtype=torch.bfloat16)
    for kwargs in METHODS.values():
        layer = quantize_pending(weight, **kwargs)
        stats = layer_stats(weight, layer)
        q = layer_quality(stats, "k.weight", shape=(48, 192), method="m")
        w, r = weight.double(), layer.restored(torch.float32).double()
        assert (q.key, q.shape, q.method, q.status, q.nonfinite) == ("k.weight", (48, 192), "m", "ok", False)
        assert q.sqnr_db == judge_layer(stats, "k", bits=layer.bits, shape=(48, 192))
        assert math.isclose(q.sqnr_db, sqnr_db(w, r), rel_tol=1e-6)
        assert math.isclose(q.rel_fro, float((w - r).norm() / w.norm()), rel_tol=1e-6)
        assert q.max_abs_err == float((w - r).abs().max())  # float32 differences of float32 values: exact
        assert q.extreme_share == expected_codes(layer, w.numel())[1] / w.numel()
    weight = weight.float()
    weight[2, 3] = float("nan")
    layer = quantize_pending(weight)
    q = layer_quality(layer_stats(weight, layer), "k", shape=(48, 192), method="nf4")
    assert (q.nonfinite, q.status) == (True, "nonfinite")


def test_dequantized_nonfinite_values_are_counted_and_named():
    dense = torch.randn(10, 10)
    dense[1, 1], dense[2, 2] = float("nan"), float("-inf")
    assert int(nonfinite_count(dense)) == 2
    judge_dequantized(0, "w")
    with pytest.raises(QtoolError, match=r"tensor 'w' dequantizes to 2 NaN or Inf value\(s\)"):
        judge_dequantized(2, "w")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["nf4", "nf4-dq", "int8"])
def test_the_checks_of_the_largest_flux_layer_stay_within_128_mb_and_never_sync(method):
    """FLUX's largest Linear (3072 x 15360, bf16): what layer_stats allocates beyond its inputs stays under 128 MB
    on the GPU, and it queues its work without a host sync (the double-quant absmax rebuild is the kernels' own
    affair: torch syncs there until they take the offset as a tensor)."""
    weight = torch.randn(3072, 15360, device="cuda", dtype=torch.bfloat16)
    layer = quantize_pending(weight, **METHODS[method])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_sync_debug_mode("default" if method == "nf4-dq" else "error")
    try:
        stats = layer_stats(weight, layer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= 128 * 2**20, f"{peak / 2**20:.0f} MB"
    assert judge_layer(stats.cpu(), "big", bits=layer.bits, shape=tuple(weight.shape)) > 20
