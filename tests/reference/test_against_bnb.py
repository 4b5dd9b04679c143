"""qtool's codecs against bitsandbytes 0.50.2 on the CPU (level 3: compatibility).

Bytes are identical except exactly where bnb's CPU path disagrees with its own CUDA kernels, which qtool follows
(tests/compat.py states each allowed difference); dequantization is identical both ways. bnb's CPU
``dequantize_4bit`` has a native AVX512 path that is wrong for rows of 32 (mod 64) elements (bnb-format.md §6),
so the oracle here is bnb's default-backend compute, fed by bnb's own QuantState.from_dict of our entries.
"""

import pytest
import torch

import qtool
from compat import check_4bit_codes, check_int8_codes, check_nested_codes
from helpers import assert_equal

pytestmark = pytest.mark.bnb

SHAPES = [(64, 64), (3, 5), (7, 100), (333, 77), (128, 96), (1, 4097), (4096,)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bnb_quant_state(entries: dict):
    from bitsandbytes.functional import QuantState

    return QuantState.from_dict({k: v for k, v in entries.items() if k != "weight"}, device=torch.device("cpu"))


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


def with_prefix(state) -> dict:
    return {"weight." + k: v for k, v in state.as_dict(packed=True).items()}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 32, 4096])
def test_4bit_bytes_and_dequantize_match_bnb(shape, dtype, quant_type, blocksize):
    import bitsandbytes.functional as F

    w = torch.randn(shape).to(dtype)
    if w.numel() >= 128:
        w.view(-1)[:64] = 0  # an all-zero block: 0x00 here (CUDA), 0x77 for NF4 on bnb CPU
    ours = qtool.quantize_tensor(w, quant_type=quant_type, blocksize=blocksize)
    packed_bnb, state_bnb = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    theirs = {"weight": packed_bnb, **with_prefix(state_bnb)}
    assert list(ours) == list(theirs), "entry names and order"
    for key in ours:
        if key != "weight":
            assert_equal(ours[key], theirs[key], key)
    check_4bit_codes(w, ours["weight"], packed_bnb, quant_type, blocksize)
    if quant_type == "nf4":
        # Outside all-zero blocks, NF4 bytes are identical.
        nonzero = torch.repeat_interleave(ours["weight.absmax"] > 0, blocksize // 2)[: packed_bnb.numel()]
        assert_equal(ours["weight"].reshape(-1)[nonzero], packed_bnb.reshape(-1)[nonzero], "nf4 bytes")
    # Both directions of dequantization agree exactly.
    assert_equal(qtool.dequantize_tensor(ours), bnb_dequantize_4bit(ours["weight"], bnb_quant_state(ours)), "ours")
    assert_equal(qtool.dequantize_tensor(theirs), bnb_dequantize_4bit(packed_bnb, state_bnb), "bnb's bytes")


@pytest.mark.parametrize("shape", [(64, 64), (333, 777), (7, 100), (1000, 1024)], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_bnb(shape, quant_type):
    import bitsandbytes.functional as F

    w = torch.randn(shape).to(torch.bfloat16)
    ours = qtool.quantize_tensor(w, quant_type=quant_type, double_quant=True)
    packed_bnb, state_bnb = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    theirs = {"weight": packed_bnb, **with_prefix(state_bnb)}
    assert list(ours) == list(theirs), "entry names and order"
    for key in ("weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"):
        assert_equal(ours[key], theirs[key], key)
    # The offset (a torch.mean on the same device) and so the whole JSON blob are identical.
    blob = f"weight.quant_state.bitsandbytes__{quant_type}"
    assert_equal(ours[blob], theirs[blob], "quant_state blob")
    plain = qtool.quantize_tensor(w, quant_type=quant_type)["weight.absmax"]
    ndiff = check_nested_codes(
        plain, state_bnb.offset, ours["weight.nested_absmax"], ours["weight.absmax"], theirs["weight.absmax"], 1 / 65535
    )
    assert ndiff <= max(2, 0.01 * plain.numel()), f"{ndiff} of {plain.numel()} nested codes differ"
    assert_equal(qtool.dequantize_tensor(ours), bnb_dequantize_4bit(ours["weight"], bnb_quant_state(ours)), "ours")
    assert_equal(qtool.dequantize_tensor(theirs), bnb_dequantize_4bit(packed_bnb, state_bnb), "bnb's bytes")


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 64), (333, 777)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_int8_matches_bnb(shape, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = (torch.randn(shape) * 3).to(dtype)
    ours = qtool.quantize_tensor(w, bits=8)
    # What Linear8bitLt saves: Int8Params quantizes on .to(device).
    layer = bnb.nn.Linear8bitLt(shape[1], shape[0], bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    theirs = {k: v for k, v in layer.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    assert_equal(ours["SCB"], theirs["SCB"], "SCB")
    assert_equal(ours["weight_format"], theirs["weight_format"], "weight_format")
    ndiff = check_int8_codes(w, ours["weight"], theirs["weight"], ours["SCB"])
    assert ndiff <= max(1, 1e-3 * w.numel())
    for q in (ours["weight"], theirs["weight"]):
        expected = F.int8_vectorwise_dequant(q, ours["SCB"])
        assert_equal(qtool.dequantize_tensor({**ours, "weight": q}, dtype=torch.float32), expected, "int8 dequant")


@pytest.mark.parametrize("shape", [(3, 5), (333, 777), (128, 96)], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [{"quant_type": "nf4"}, {"quant_type": "fp4", "blocksize": 32}, {"quant_type": "nf4", "double_quant": True},
     {"bits": 8}],
    ids=["nf4", "fp4-32", "nf4-dq", "int8"],
)  # fmt: skip
def test_scale_searched_entries_dequantize_in_bnb_as_in_qtool(shape, kwargs):
    """Scale-searched entries are read by bnb's own QuantState.from_dict and dequantized by bnb to exactly qtool's
    values: the format is unchanged, only the stored scales differ."""
    import bitsandbytes.functional as F

    w = torch.randn(shape).to(torch.bfloat16)
    ours = qtool.quantize_tensor(w, scale_search=True, **kwargs)
    if kwargs.get("bits") == 8:
        expected = F.int8_vectorwise_dequant(ours["weight"], ours["SCB"])
        assert_equal(qtool.dequantize_tensor(ours, dtype=torch.float32), expected, "int8 dequant")
    else:
        expected = bnb_dequantize_4bit(ours["weight"], bnb_quant_state(ours))
        assert_equal(qtool.dequantize_tensor(ours), expected, "4-bit dequant")
