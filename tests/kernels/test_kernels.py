"""Each Triton kernel against its PyTorch twin (level 1 exact codes, level 2 exact dequantized values).

Runs on the GPU, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py). Interpreted
programs cost ~4 ms each, so shapes are small and `tile` is varied to force several programs and ragged tiles.
"""

import pytest
import torch

from helpers import assert_equal
from qtool.kernels import double_quant, quant_4bit, quant_8bit
from qtool.reference import double_quant as double_quant_ref
from qtool.reference import quant4, quant8
from qtool.reference.codebooks import dynamic_map, quant_map

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (shape, blocksize, tile): one row, odd numel, numel not a multiple of the blocksize, 1-D, several programs.
CASES_4BIT = [
    ((1, 64), 64, None),
    ((3, 5), 64, None),
    ((7, 100), 32, 64),
    ((333, 77), 128, 1024),
    ((4099,), 4096, None),
    ((2, 4096), 4096, 4096),
    ((64, 192), 64, 2048),
    ((24, 512), 128, None),  # 32 blocks a program: float32 output went wrong there on the H100 (tl.interleave)
]


def weights(shape, dtype, device):
    w = torch.randn(shape) * 0.05
    flat = w.view(-1)
    if flat.numel() >= 256:
        flat[64:128] = 0  # an all-zero block
        flat[130] = 0.0859375 * flat[128:192].abs().max()  # a value near an FP4 threshold
    return w.to(dtype).to(device)


@pytest.mark.parametrize("shape,blocksize,tile", CASES_4BIT, ids=str)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit(shape, blocksize, tile, dtype, quant_type, device):
    w = weights(shape, dtype, device)
    packed, absmax = quant_4bit.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, tile=tile)
    packed_ref, absmax_ref = quant4.quantize_4bit_ref(w, quant_type=quant_type, blocksize=blocksize)
    assert_equal(packed, packed_ref, "packed")
    assert_equal(absmax, absmax_ref, "absmax")


@pytest.mark.parametrize("shape,blocksize,tile", CASES_4BIT, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit(shape, blocksize, tile, out_dtype, quant_type, device):
    """bf16 output is exact too: the interpreter's truncating cast is replaced by hand rounding."""
    w = weights(shape, torch.float32, device)
    packed, absmax = quant4.quantize_4bit_ref(w, quant_type=quant_type, blocksize=blocksize)
    qmap = quant_map(quant_type, device)
    kwargs = {"blocksize": blocksize, "shape": shape, "dtype": out_dtype}
    out = quant_4bit.dequantize_4bit(packed, absmax, qmap, tile=tile, **kwargs)
    assert_equal(out, quant4.dequantize_4bit_ref(packed, absmax, qmap, **kwargs), "dequantized")


@pytest.mark.parametrize("shape,blocksize,tile", CASES_4BIT, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dequantize_4bit_nested(shape, blocksize, tile, out_dtype, device):
    """With double quant the kernel rebuilds each absmax from its code itself; same values as the reference."""
    w = weights(shape, torch.float32, device)
    packed, absmax = quant4.quantize_4bit_ref(w, blocksize=blocksize)
    codes, nested_absmax, offset = double_quant_ref.quantize_absmax_ref(absmax)
    kwargs = {"blocksize": blocksize, "shape": shape, "dtype": out_dtype, "nested_absmax": nested_absmax,
              "nested_quant_map": dynamic_map(device)}  # fmt: skip
    want = quant4.dequantize_4bit_ref(packed, codes, quant_map("nf4", device), nested_offset=offset, **kwargs)
    for off in (offset, offset.item()):  # a device tensor (never waited for) or a float from the JSON blob
        out = quant_4bit.dequantize_4bit(
            packed, codes, quant_map("nf4", device), tile=tile, nested_offset=off, **kwargs
        )
        assert_equal(out, want, "dequantized")


@pytest.mark.parametrize("shape,blocksize,tile", CASES_4BIT[:4], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_searches_agree(shape, blocksize, tile, quant_type, device):
    """Both code searches (bnb's comparison trees, bucket tables) give the reference's bytes."""
    w = weights(shape, torch.bfloat16, device)
    want = quant4.quantize_4bit_ref(w, quant_type=quant_type, blocksize=blocksize)
    for search in ("tree", "buckets"):
        got = quant_4bit.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, tile=tile, search=search)
        assert_equal(got[0], want[0], f"packed (search {search})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_4bit_misaligned_weight(dtype, device):
    """A 16-bit weight starting at an odd element cannot be read as int32 pairs: the element-wise path, same bytes."""
    flat = weights((1, 64 * 40 + 1), dtype, device).reshape(-1)
    w = flat[1:].view(40, 64)
    assert w.data_ptr() % 4 == 2
    packed, absmax = quant_4bit.quantize_4bit(w, tile=512)
    packed_ref, absmax_ref = quant4.quantize_4bit_ref(w)
    assert_equal(packed, packed_ref, "packed")
    assert_equal(absmax, absmax_ref, "absmax")


@pytest.mark.parametrize("nblocks,tile", [(1, None), (5, None), (256, None), (600, 256), (4097, 1024)], ids=str)
def test_double_quant(nblocks, tile, device):
    absmax = (torch.rand(nblocks) * 0.2 + 0.01).to(device)
    absmax[::7] = 0.0  # zero blocks are common in real absmax vectors
    codes, nested_absmax, offset = double_quant.quantize_absmax(absmax, tile=tile)
    codes_ref, nested_absmax_ref, offset_ref = double_quant_ref.quantize_absmax_ref(absmax)
    assert_equal(codes, codes_ref, "absmax codes")
    assert_equal(nested_absmax, nested_absmax_ref, "nested_absmax")
    assert_equal(offset, offset_ref, "nested_offset")
    d = dynamic_map(device)
    rebuilt = double_quant.dequantize_absmax(codes, nested_absmax, d, offset, tile=tile)
    assert_equal(rebuilt, double_quant_ref.dequantize_absmax_ref(codes, nested_absmax, d, offset), "rebuilt absmax")


@pytest.mark.parametrize("shape,tile", [((1, 1), None), ((3, 5), None), ((7, 100), 128), ((33, 5000), 8192)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_quantize_8bit_rowwise(shape, tile, dtype, device):
    w = (torch.randn(shape) * 2).to(dtype)
    if shape[0] > 2:
        w[0] = 0  # SCB 0
        w[1, 0] = 6e4 if dtype == torch.float16 else 1e6  # inf after the float16 cast
        w[2, :5] = torch.tensor([127, 0.5, 1.5, 2.5, -2.5])  # exact ties when SCB = 127
    w = w.to(device)
    q, scb = quant_8bit.quantize_8bit_rowwise(w, tile=tile)
    q_ref, scb_ref = quant8.quantize_8bit_rowwise_ref(w)
    assert_equal(q, q_ref, "int8")
    assert_equal(scb, scb_ref, "SCB")


@pytest.mark.parametrize("shape,tile", [((1, 1), None), ((7, 100), 128), ((33, 5000), 8192)], ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dequantize_8bit_rowwise(shape, tile, out_dtype, device):
    q, scb = quant8.quantize_8bit_rowwise_ref(torch.randn(shape))
    q, scb = q.to(device), scb.to(device)
    out = quant_8bit.dequantize_8bit_rowwise(q, scb, dtype=out_dtype, tile=tile)
    assert_equal(out, quant8.dequantize_8bit_rowwise_ref(q, scb, dtype=out_dtype), "dequantized")


def test_kernel_argument_errors(device):
    with pytest.raises(ValueError, match="blocksize"):
        quant_4bit.quantize_4bit(torch.randn(8, 8, device=device), blocksize=16)
    with pytest.raises(ValueError, match="search must be"):
        quant_4bit.quantize_4bit(torch.randn(8, 8, device=device), search="gather")
    packed, absmax = quant4.quantize_4bit_ref(torch.randn(8, 8))
    with pytest.raises(ValueError, match="needs 32 and 1"):
        quant_4bit.dequantize_4bit(packed[:-1].to(device), absmax.to(device), quant_map("nf4", device), blocksize=64,
                                   shape=(8, 8), dtype=torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="do not match"):
        quant_8bit.dequantize_8bit_rowwise(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3), dtype=torch.float16)


@pytest.mark.parametrize(
    "kwargs",
    [{"quant_type": "nf4"}, {"quant_type": "fp4", "double_quant": True}, {"bits": 8}],
    ids=["nf4", "fp4-dq", "int8"],
)
def test_nonfinite_weights_give_the_same_entries_on_every_backend(kwargs, device):
    """NaN and Inf (which --allow-nonfinite lets through): an absmax ignores NaN and a NaN codes to 0, on every
    backend alike. Triton's max on a GPU skips NaN while its interpreter and torch's amax propagate it, so the rule
    is spelled out in the kernels and the references (abs_ignoring_nan)."""
    from qtool.quantize import quantize_tensor

    w = torch.randn(6, 128) * 0.05
    w[0, 3] = float("nan")  # one NaN in a block
    w[1, :64] = float("nan")  # an all-NaN block
    w[2, 70] = float("inf")
    w[4, 5] = float("-inf")
    w = w.to(torch.bfloat16).to(device)
    ours = quantize_tensor(w, backend="triton", **kwargs)
    ref = quantize_tensor(w, backend="torch", **kwargs)
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert_equal(ours[key], ref[key], key)


# --- scale search: the search kernels and the quantizers with given scales, against the reference ---------------

SEARCH_CASES_4BIT = [((3, 5), 64, None), ((7, 100), 32, 64), ((333, 77), 128, 8192), ((64, 192), 64, 2048)]


@pytest.mark.parametrize("shape,blocksize,tile", SEARCH_CASES_4BIT, ids=str)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_search_absmax(shape, blocksize, tile, dtype, quant_type, device):
    """The chosen absmax bit for bit (an all-zero block, a NaN and ragged tiles included), and the codes for it."""
    from qtool.kernels import scale_search
    from qtool.reference import scale_search as scale_search_ref

    w = weights(shape, dtype, device)
    w.view(-1)[min(3, w.numel() - 1)] = float("nan")
    chosen = scale_search.search_absmax(w, quant_type=quant_type, blocksize=blocksize, tile=tile)
    expected = scale_search_ref.search_absmax_ref(w, quant_type=quant_type, blocksize=blocksize)
    assert_equal(chosen, expected, "searched absmax")
    packed, absmax = quant_4bit.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, tile=tile, absmax=chosen)
    packed_ref, _ = quant4.quantize_4bit_ref(w, quant_type=quant_type, blocksize=blocksize, absmax=expected)
    assert_equal(packed, packed_ref, "packed for the searched absmax")
    assert absmax is chosen  # given scales are returned, not copied or rewritten


@pytest.mark.parametrize("shape,tile", [((1, 1), None), ((7, 100), 128), ((33, 5000), 8192)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_search_scb(shape, tile, dtype, device):
    """The chosen SCB bit for bit (a zero row, an infinite row, a NaN), and the clamped codes for it."""
    from qtool.kernels import scale_search
    from qtool.reference import scale_search as scale_search_ref

    w = torch.randn(shape) * 3
    if shape[0] > 2:
        w[0] = 0
        w[1, 0] = float("inf")
        w[2, 1] = float("nan")
    w = w.to(dtype).to(device)
    chosen = scale_search.search_scb(w, tile=tile)
    expected = scale_search_ref.search_scb_ref(w)
    assert_equal(chosen, expected, "searched SCB")
    q, scb = quant_8bit.quantize_8bit_rowwise(w, SCB=chosen, tile=tile)
    q_ref, _ = quant8.quantize_8bit_rowwise_ref(w, SCB=expected)
    assert_equal(q, q_ref, "int8 codes for the searched SCB")
    assert scb is chosen


@pytest.mark.parametrize(
    "kwargs",
    [{"quant_type": "nf4"}, {"quant_type": "fp4"}, {"quant_type": "nf4", "double_quant": True}, {"bits": 8}],
    ids=["nf4", "fp4", "nf4-dq", "int8"],
)
def test_scale_search_entries_equal_on_every_backend(kwargs, device):
    from qtool.quantize import quantize_tensor

    w = (torch.randn(40, 192) * 0.05).to(torch.bfloat16).to(device)
    ours = quantize_tensor(w, backend="triton", scale_search=True, **kwargs)
    ref = quantize_tensor(w, backend="torch", scale_search=True, **kwargs)
    assert list(ours) == list(ref)
    for key in ref:
        assert_equal(ours[key], ref[key], key)


def test_given_scale_argument_errors(device):
    w = torch.randn(8, 8, device=device)
    with pytest.raises(ValueError, match=r"absmax must be float32 \[1\]"):
        quant_4bit.quantize_4bit(w, absmax=torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"SCB must be float32 \[8\]"):
        quant_8bit.quantize_8bit_rowwise(w, SCB=torch.ones(8, dtype=torch.float64, device=device))
