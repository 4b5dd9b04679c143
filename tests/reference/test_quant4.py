"""The 4-bit reference against hand-computed cases (level 1: exact bytes; level 5: SQNR floors)."""

import pytest
import torch

from helpers import SQNR_FLOOR_DB, assert_equal, sqnr_db
from qtool.reference.codebooks import FP4_MAGNITUDE_CODES, FP4_THRESHOLDS, quant_map
from qtool.reference.quant4 import dequantize_4bit_ref, quantize_4bit_ref

# bnb-format.md §1.9: bf16 [[0.02, -0.04, 0.0, 0.08, -0.01]] -> absmax 0.080078125, s = [0.25, -0.5, 0, 1, -0.125].
W5 = torch.tensor([[0.02, -0.04, 0.0, 0.08, -0.01]], dtype=torch.bfloat16)


def test_nf4_worked_example():
    packed, absmax = quantize_4bit_ref(W5, quant_type="nf4")
    # codes 10, 2, 7, 15, 6 and the pad element 0.0 -> 7 (odd numel): high nibble first.
    assert packed.tolist() == [[0xA2], [0x7F], [0x67]]
    assert absmax.tolist() == [0.080078125]
    out = dequantize_4bit_ref(packed, absmax, quant_map("nf4"), blocksize=64, shape=(1, 5), dtype=torch.bfloat16)
    assert out.float().tolist() == [[0.0196533203125, -0.0419921875, 0.0, 0.080078125, -0.007293701171875]]


def test_fp4_worked_example():
    packed, absmax = quantize_4bit_ref(W5, quant_type="fp4")
    assert packed.tolist() == [[0x7D], [0x03], [0xE0]]
    out = dequantize_4bit_ref(packed, absmax, quant_map("fp4"), blocksize=64, shape=(1, 5), dtype=torch.bfloat16)
    assert out.float().tolist() == [[0.02001953125, -0.0400390625, 0.0, 0.080078125, -0.01336669921875]]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_block_codes_to_zero_like_cuda(quant_type):
    """bnb CUDA: 0 * (1/0) = NaN -> code 0, byte 0x00 (bnb CPU writes 0x77 for NF4; both dequantize to 0)."""
    w = torch.zeros(3, 64)
    w[1] = torch.linspace(-1, 1, 64)
    packed, absmax = quantize_4bit_ref(w, quant_type=quant_type)
    assert packed[:32].unique().tolist() == [0] and packed[64:].unique().tolist() == [0]
    assert absmax.tolist()[0] == 0.0 and absmax.tolist()[2] == 0.0
    out = dequantize_4bit_ref(packed, absmax, quant_map(quant_type), blocksize=64, shape=(3, 64), dtype=torch.float32)
    assert out[0].abs().sum() == 0 and out[2].abs().sum() == 0


def test_fp4_sign_and_ties_follow_cuda():
    """CUDA's dQuantizeFP4: -0.0 and tiny positives are code 0 (bnb CPU: 8); a value exactly on a threshold goes
    to the smaller magnitude, for either sign (bnb CPU sends negative ties to the larger magnitude)."""
    thresholds = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32)
    # absmax is 1 (the first element), so s = x exactly.
    w = torch.cat([torch.tensor([1.0, -0.0, 0.001, -0.001]), thresholds, -thresholds, torch.zeros(1)])
    packed, _ = quantize_4bit_ref(w, quant_type="fp4")
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1).tolist()[: w.numel()]
    assert codes[:4] == [3, 0, 0, 8]
    assert codes[4:11] == list(FP4_MAGNITUDE_CODES[:7])
    assert codes[11:18] == [8 + c for c in FP4_MAGNITUDE_CODES[:7]]


@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1), (3, 5), (2, 63), (5, 65), (1, 4097)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_shapes_and_sizes(shape, blocksize):
    w = torch.randn(shape)
    n = w.numel()
    packed, absmax = quantize_4bit_ref(w, quant_type="nf4", blocksize=blocksize)
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    nblocks = -(-n // blocksize)
    assert absmax.shape == (nblocks,) and absmax.dtype == torch.float32
    flat = torch.cat([w.reshape(-1), torch.zeros(nblocks * blocksize - n)]).view(nblocks, blocksize)
    assert_equal(absmax, flat.abs().amax(1), "absmax")
    out = dequantize_4bit_ref(packed, absmax, quant_map("nf4"), blocksize=blocksize, shape=shape, dtype=torch.float32)
    assert out.shape == w.shape
    # Nearest-value rounding: no error exceeds half the widest gap of the table (-1 to -0.696) times absmax.
    half_gap = (quant_map("nf4").diff().max() / 2).item()
    scale = absmax.repeat_interleave(blocksize)[:n].view(shape)
    assert torch.all((out - w).abs() <= scale * half_gap * (1 + 1e-6))


@pytest.mark.parametrize(
    "quant_type,blocksize", [("nf4", 64), ("fp4", 64), ("nf4", 32), ("nf4", 4096)], ids=lambda v: str(v)
)
def test_sqnr_floor(quant_type, blocksize):
    """Level 5: N(0, 1) bf16 round trip above the measured floor (tests/helpers.py)."""
    w = torch.randn(128, 512).to(torch.bfloat16)
    packed, absmax = quantize_4bit_ref(w, quant_type=quant_type, blocksize=blocksize)
    out = dequantize_4bit_ref(packed, absmax, quant_map(quant_type), blocksize=blocksize, shape=w.shape,
                              dtype=torch.float32)  # fmt: skip
    assert sqnr_db(w.float(), out) >= SQNR_FLOOR_DB[(quant_type, False, blocksize)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quant_type": "int4"}, "quant_type"),
        ({"blocksize": 48}, "blocksize"),
        ({"blocksize": 8192}, "blocksize"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_4bit_ref(torch.randn(4, 4), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_4bit_ref(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit_ref(torch.ones(0, 4))
