"""The code tables of the bitsandbytes format and the decision thresholds that choose a code.

Every table here is part of the on-disk format (``weight.quant_map``, ``weight.nested_quant_map``) or pins a
rounding rule; ../shared/docs/bnb-format.md §1.4-1.7 gives the provenance of each number. Tables are built as
float32 tensors exactly as bitsandbytes builds them, so that the bytes we write equal the bytes it writes.
"""

from __future__ import annotations

import functools

import torch

# NF4 values by code (sorted ascending), the QLoRA normal-float table. Stored as float32; the decimal literals
# below round to the fp32 values bnb writes (hex checked in tests/reference/test_codebooks.py).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (1 sign bit, 2 exponent bits, 1 mantissa bit) in bit-pattern order: bit 3 is the sign. bnb divides the
# integers by 12 in float32. Index 8 is +0.0: bnb writes the int literal -0, which is 0.
FP4_NUMERATORS = (0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3)

# FP4 as bnb's CUDA kernel (dQuantizeFP4) chooses it, which is what users run: the sign bit is set iff s < 0
# (so -0.0 and NaN are positive), then |s| is compared with `>` against these float literals. k = #{t < |s|}
# indexes FP4_MAGNITUDE_CODES. Ties go to the smaller magnitude. bnb's CPU path sorts the signed table instead
# and sends ties to the lower value and small positives to code 8; the two differ in ~1.2% of bytes (bnb-format.md
# §1.5, measured on an H100). We follow CUDA.
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_MAGNITUDE_CODES = (0, 1, 6, 7, 4, 5, 2, 3)

# bnb's CUDA dQuantizeNF4 compares s with `>` against 15 float literals. They are bit-identical to the float32
# midpoints of NF4_VALUES (a test pins this), so code = #{midpoint < s}, which is torch.bucketize(right=False).
NF4_CUDA_THRESHOLDS = (
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


@functools.cache
def _quant_map_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        # Divide in float32, as bnb does (torch.tensor(ints) / 12 would round differently in float64).
        return torch.tensor(FP4_NUMERATORS, dtype=torch.float32) / torch.tensor(12.0, dtype=torch.float32)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


# Tables are built once per device and shared: callers must not write into them. A fresh copy per call would cost
# a host-to-device copy from pageable memory per layer, which waits for the GPU and stalls a pipeline.
@functools.cache
def _on_device(name: str, device: torch.device) -> torch.Tensor:
    tables = {
        "nf4": lambda: _quant_map_cpu("nf4"),
        "fp4": lambda: _quant_map_cpu("fp4"),
        "nf4_midpoints": lambda: (_quant_map_cpu("nf4")[:-1] + _quant_map_cpu("nf4")[1:]) / 2,
        "fp4_thresholds": lambda: torch.tensor(FP4_THRESHOLDS, dtype=torch.float32),
        "dynamic": lambda: _dynamic_map_cpu(),
        "nf4_buckets": lambda: _bucket_table(
            _on_device("nf4_midpoints", torch.device("cpu")).tolist(), -1, NF4_BUCKETS
        ),
        "fp4_buckets": lambda: _bucket_table(torch.tensor(FP4_THRESHOLDS).tolist(), 0, FP4_BUCKETS),
    }
    if name not in tables:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {name!r}")
    return tables[name]().to(device)


def quant_map(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table of ``quant_type`` ("nf4" or "fp4"), index = code: ``weight.quant_map``."""
    return _on_device(quant_type, torch.device(device))


def nf4_midpoints(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 midpoints between consecutive NF4 values, [15]; code = number of midpoints strictly below s."""
    return _on_device("nf4_midpoints", torch.device(device))


# Bucket tables for the kernels' code search. [-1, 1] (NF4, over s) or [0, 1] (FP4, over |s|) is cut into equal
# slices; each holds at most one decision threshold, none closer than 1e-3 to a slice edge
# (tests/reference/test_codebooks.py), so float32 rounding of the slice index can never cross a threshold.
NF4_BUCKETS = 32
FP4_BUCKETS = 16


def _bucket_table(thresholds: list[float], lo: float, buckets: int) -> torch.Tensor:
    width = (1 - lo) / buckets
    table, bases = [], []
    for j in range(buckets):
        start, end = lo + j * width, lo + (j + 1) * width
        inside = [t for t in thresholds if start <= t < end]
        if len(inside) > 1:
            raise AssertionError(f"bucket {j} holds {len(inside)} thresholds")
        bases.append(sum(t < start for t in thresholds))
        table.append(inside[0] if inside else 2.0)  # 2.0: no threshold here, s never exceeds it
    return torch.tensor(table + bases, dtype=torch.float32)


def nf4_buckets(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [2 * NF4_BUCKETS]: per slice of [-1, 1], the NF4 midpoint inside it (or 2.0), then the number of
    midpoints below the slice. code(s) = bases[b] + (s > thresholds[b]) with b the slice of s: the same code as
    counting midpoints below s, with two table reads instead of a four-level search."""
    return _on_device("nf4_buckets", torch.device(device))


def fp4_buckets(device: torch.device | str = "cpu") -> torch.Tensor:
    """As ``nf4_buckets`` for FP4's magnitude thresholds over slices of [0, 1]: k = #{t < |s|}."""
    return _on_device("fp4_buckets", torch.device(device))


def fp4_thresholds(device: torch.device | str = "cpu") -> torch.Tensor:
    return _on_device("fp4_thresholds", torch.device(device))


def fp4_magnitude_codes(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(FP4_MAGNITUDE_CODES, dtype=torch.uint8, device=device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bnb's create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each exponent i the midpoints
    # of linspace(0.1, 1, 2**i + 1) scaled by 10**(i - 6), both signs, plus 0 and 1. Products are float32 tensor
    # products (float64 changes 30 entries), so the linspace and the scale stay float32 here.
    values: list[torch.Tensor] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2
        scale = 10 ** (i - 6)
        values.append(scale * means)
        values.append(-scale * means)
    table = torch.cat([*values, torch.tensor([0.0, 1.0])]).to(torch.float32)
    return torch.sort(table).values


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map (256 float32 values, sorted): ``weight.nested_quant_map``."""
    return _on_device("dynamic", torch.device(device))


# Scale search (qtool.reference.scale_search): the candidate scales of a block or row, as factors of its absmax.
# 32 candidates, 4-bit 1, 0.99, ..., 0.69 and 8-bit 1, 0.995, ..., 0.845. Measured on normal, Student-t and real
# weights (benchmarks/quality.py): a finer or wider 4-bit grid (64 steps down to 0.6) gains < 0.01 dB more; 8-bit
# rows need the finer steps (0.01 gave half the gain on real weights) and never chose factors below 0.85.
SCALE_STEPS = 32
SCALE_STEP = {4: 0.01, 8: 0.005}


@functools.cache
def _scale_grid_cpu(bits: int) -> torch.Tensor:
    if bits not in SCALE_STEP:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return torch.tensor([1 - k * SCALE_STEP[bits] for k in range(SCALE_STEPS)], dtype=torch.float32)


def scale_grid(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [SCALE_STEPS], descending from exactly 1.0: the scale search's candidate factors for ``bits``."""
    return _grid_on_device(bits, torch.device(device))


@functools.cache
def _grid_on_device(bits: int, device: torch.device) -> torch.Tensor:
    return _scale_grid_cpu(bits).to(device)
