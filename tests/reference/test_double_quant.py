"""The double-quant reference against hand-computed cases and its defining property (level 1: exact)."""

import torch

from helpers import assert_equal
from qtool.reference.codebooks import dynamic_map
from qtool.reference.double_quant import dequantize_absmax_ref, nearest_dynamic_code_ref, quantize_absmax_ref


def test_worked_example():
    """bnb-format.md §1.9: four bf16-exact absmax values -> offset, one nested block, codes [255, 194, 31, 28]."""
    absmax = torch.tensor([0.1708984375, 0.130859375, 0.09765625, 0.09521484375])
    codes, nested_absmax, offset = quantize_absmax_ref(absmax)
    assert offset.item() == 0.1236572265625
    assert nested_absmax.tolist() == [0.0472412109375]
    assert codes.tolist() == [255, 194, 31, 28]
    rebuilt = dequantize_absmax_ref(codes, nested_absmax, dynamic_map(), offset)
    assert rebuilt[0].item() == 0.1708984375
    assert torch.allclose(rebuilt, absmax, rtol=0, atol=0.0472412109375 * 0.03)


def test_search_returns_a_nearest_code():
    """The binary search of bnb CUDA returns the code nearest to s; on an exact float32 midpoint, either neighbour."""
    code = dynamic_map()
    s = torch.cat([torch.rand(20000) * 2 - 1, code, torch.tensor([1.0, -1.0])])
    got = nearest_dynamic_code_ref(s, code).long()
    distance = (s.double()[:, None] - code.double()[None, :]).abs()
    assert_equal(distance.gather(1, got[:, None])[:, 0], distance.min(1).values, "distance to the chosen code")
    assert_equal(nearest_dynamic_code_ref(code, code), torch.arange(256, dtype=torch.uint8), "codes of the table")
    midpoints = (code[1:] + code[:-1]) * 0.5
    got = nearest_dynamic_code_ref(midpoints, code).long()
    assert torch.all((got == torch.arange(255)) | (got == torch.arange(1, 256)))


def test_nan_and_single_block():
    """One absmax: centred to 0, nested_absmax 0, s = 0 * inf = NaN -> code 0; dequantizes to the offset."""
    codes, nested_absmax, offset = quantize_absmax_ref(torch.tensor([0.75]))
    assert codes.tolist() == [0] and nested_absmax.tolist() == [0.0] and offset.item() == 0.75
    assert dequantize_absmax_ref(codes, nested_absmax, dynamic_map(), offset).tolist() == [0.75]


def test_ragged_nested_blocks():
    absmax = torch.rand(600) + 0.5
    codes, nested_absmax, offset = quantize_absmax_ref(absmax)
    assert codes.shape == (600,) and nested_absmax.shape == (3,)
    centred = torch.cat([absmax - offset, torch.zeros(168)]).view(3, 256)
    assert_equal(nested_absmax, centred.abs().amax(1), "nested_absmax")
    rebuilt = dequantize_absmax_ref(codes, nested_absmax, dynamic_map(), offset)
    # The dynamic map's widest gap near |s| = 1 is 1 - 0.99296875 ... 0.0703; the error is under half of it.
    assert ((rebuilt - absmax).abs() <= nested_absmax.repeat_interleave(256)[:600] * 0.036).all()
