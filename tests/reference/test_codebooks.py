"""The format's tables, pinned to their float32 bit patterns (level 1: exact)."""

import hashlib
import struct

import pytest
import torch

from qtool.reference import codebooks


def hex32(t: torch.Tensor) -> list[str]:
    return [struct.pack(">f", v).hex() for v in t.tolist()]


def test_nf4_table_bits():
    assert hex32(codebooks.quant_map("nf4")) == [
        "bf800000", "bf3239b1", "bf066b30", "beca32a0", "be91a24d", "be3d353f", "bdba7871", "00000000",
        "3da2faff", "3e24cae3", "3e7c04dd", "3ead033a", "3ee1a4b8", "3f1007ab", "3f3913b3", "3f800000",
    ]  # fmt: skip


def test_fp4_table_bits_and_positive_zero_at_8():
    assert hex32(codebooks.quant_map("fp4")) == [
        "00000000", "3baaaaab", "3f2aaaab", "3f800000", "3eaaaaab", "3f000000", "3e2aaaab", "3e800000",
        "00000000", "bbaaaaab", "bf2aaaab", "bf800000", "beaaaaab", "bf000000", "be2aaaab", "be800000",
    ]  # fmt: skip


def test_nf4_midpoints_are_the_cuda_literals():
    """bnb CUDA's dQuantizeNF4 thresholds equal the float32 midpoints, so bucketize reproduces its tree."""
    literals = torch.tensor(codebooks.NF4_CUDA_THRESHOLDS, dtype=torch.float32)
    assert hex32(codebooks.nf4_midpoints()) == hex32(literals)


def test_dynamic_map_bytes():
    d = codebooks.dynamic_map()
    assert d.shape == (256,) and d.dtype == torch.float32
    assert hashlib.sha256(d.numpy().tobytes()).hexdigest() == (
        "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
    )
    assert d[127].item() == 0.0 and d[255].item() == 1.0 and d[0].item() == pytest.approx(-0.99296875)
    assert torch.all(d[1:] > d[:-1])


def test_unknown_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        codebooks.quant_map("int4")


@pytest.mark.bnb
def test_tables_equal_bnb():
    import bitsandbytes.functional as F

    assert torch.equal(codebooks.quant_map("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codebooks.quant_map("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(codebooks.dynamic_map(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bucket_tables_equal_counting_thresholds(quant_type):
    """The bucket search in kernels/quant_4bit.py is exact only if every slice holds at most one threshold, far (in
    float32 rounding terms) from the slice edges; and it must give the counting rule's result everywhere."""
    from qtool.reference import codebooks as cb

    if quant_type == "nf4":
        thresholds, lo, buckets, table = cb.nf4_midpoints(), -1.0, cb.NF4_BUCKETS, cb.nf4_buckets()
    else:
        thresholds, lo, buckets, table = cb.fp4_thresholds(), 0.0, cb.FP4_BUCKETS, cb.fp4_buckets()
    scale = buckets / (1 - lo)
    t = thresholds.double()
    assert float((((t - lo) * scale) - torch.round((t - lo) * scale)).abs().min() / scale) > 1e-3
    s = torch.cat([torch.linspace(lo, 1, 200_001), thresholds, torch.nextafter(thresholds, torch.tensor(2.0))])
    b = ((s - lo) * scale).long().clamp(0, buckets - 1)
    counts = table[buckets:].long()[b] + (s > table[:buckets][b]).long()
    assert torch.equal(counts, torch.bucketize(s, thresholds, right=False))
