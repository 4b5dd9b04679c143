"""The LLM.int8 reference against hand-computed cases (level 1: exact)."""

import pytest
import torch

from helpers import SQNR_FLOOR_DB, assert_equal, sqnr_db
from qtool.reference.quant8 import dequantize_8bit_rowwise_ref, quantize_8bit_rowwise_ref


def test_round_half_to_even():
    # SCB = 127 and 127 * fp32(1/127) == 1.0 exactly, so s = x and the halves are true ties.
    w = torch.tensor([[127, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5]], dtype=torch.float16)
    q, scb = quantize_8bit_rowwise_ref(w)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 64]] and scb.tolist() == [127.0]


def test_casts_to_float16_first():
    """bnb's Int8Params quantizes w.half(): fp32 values round to fp16 before the row absmax and the codes."""
    w = torch.tensor([[1.0, 0.50048828125 + 2**-13]], dtype=torch.float32)  # not an fp16 value
    q, scb = quantize_8bit_rowwise_ref(w)
    w16 = w.half().float()
    assert scb.tolist() == [1.0] and q.tolist() == [[127, round(w16[0, 1].item() * 127)]]


def test_zero_and_overflow_rows():
    w = torch.zeros(3, 8)
    w[1, 0] = 1e6  # inf in float16: SCB = inf, the whole row codes to 0
    w[2] = torch.arange(8.0)
    q, scb = quantize_8bit_rowwise_ref(w)
    assert q[0].abs().sum() == 0 and scb[0] == 0
    assert q[1].abs().sum() == 0 and torch.isinf(scb[1])
    assert q[2].tolist() == [0, 18, 36, 54, 73, 91, 109, 127]


def test_dequantize_uses_the_inverse_constant():
    """(q * SCB) * fp32(1/127), not q * SCB / 127: the two differ in float32 (bnb-format.md §6)."""
    q = torch.arange(-127, 128, dtype=torch.int8).view(1, -1)
    scb = torch.tensor([3.3])
    expected = (q.float() * scb) * torch.tensor(7.874015718698502e-3)
    assert_equal(dequantize_8bit_rowwise_ref(q, scb, dtype=torch.float32), expected, "dequantized")
    assert not torch.equal(expected, q.float() * scb / 127)


def test_sqnr_floor():
    w = torch.randn(128, 512).to(torch.bfloat16)
    q, scb = quantize_8bit_rowwise_ref(w)
    assert (
        sqnr_db(w.float(), dequantize_8bit_rowwise_ref(q, scb, dtype=torch.float32))
        >= SQNR_FLOOR_DB[("int8", False, 0)]
    )


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), (0, 4)])
def test_rejects_non_matrices(shape):
    with pytest.raises(ValueError, match="2-D"):
        quantize_8bit_rowwise_ref(torch.randn(shape))
