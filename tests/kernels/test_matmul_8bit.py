"""LLM.int8 linear: the Triton kernels against their references (``qtool.linear``), in the interpreter on the CPU.

The activation quantization is defined bit for bit (bnb's ``int8_vectorwise_quant``), so the kernel must equal it.
The matmul's int32 part is exact and its scaling the reference's float32 operations, so without outliers it equals
the reference bit for bit too. With outliers the 16-bit part sums in another order and rounds once where bnb's
``addmm`` adds to an already rounded output: the bar is the issue's, an error against the exact value of the same
math (float64) within 2x the reference's own.
"""

import pytest
import torch

from qtool.kernels import matmul_8bit
from qtool.linear import LLM_INT8_SCALE, int8_activations_ref, linear_8bit, linear_8bit_ref
from qtool.reference.quant8 import INV_127


def operands(m, n, k, dtype, device, scale=1.5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * scale).to(dtype).to(device)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    scb = (torch.rand(n, generator=g) * 0.5 + 0.01).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, w, scb, b


def exact(x, w, scb, bias, threshold):
    """LLM.int8's value in float64: the same int8 codes and outlier columns, no intermediate rounding."""
    CA, SCA, cols = int8_activations_ref(x.cpu(), threshold)  # noqa: N806
    w, scb = w.cpu().double(), scb.cpu().double()
    y = (CA.masked_fill(cols, 0).double() @ w.t()) * (SCA.double()[:, None] * scb[None, :]) * LLM_INT8_SCALE
    if bias is not None:
        y += bias.cpu().double()
    return y + x.cpu().double()[:, cols] @ (w[:, cols] * scb[:, None] * INV_127).t()


ACTIVATION_CASES = [  # (M, K, threshold, scale)
    (1, 96, 6.0, 3.0),
    (7, 200, 3.0, 1.5),
    (33, 130, 0.0, 1.0),
    (20, 5000, 2.0, 1.0),  # two passes over K (longer than the K chunk), many outlier columns
    (4, 64, 6.0, 0.5),  # no outlier at all
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m,k,threshold,scale", ACTIVATION_CASES, ids=str)
def test_activations_equal_the_reference(m, k, threshold, scale, dtype, device):
    x, *_ = operands(m, 8, k, dtype, device, scale=scale)
    x[m // 2, : k // 3] = 0  # part of a row zero
    if m > 2:
        x[1] = 0  # a whole row zero: SCA 0, codes 0
    got = matmul_8bit.int8_activations(x, threshold)
    want = int8_activations_ref(x, threshold)
    for g, w, name in zip(got, want, ("CA", "SCA", "outlier columns"), strict=True):
        assert torch.equal(g.cpu(), w.cpu()), name
    assert (threshold > 0 and scale >= threshold / 3) <= bool(want[2].any())  # the cases do hit outliers


MATMUL_CASES = [  # (M, N, K, threshold, bias)
    (1, 40, 96, 6.0, True),
    (7, 70, 200, 3.0, False),
    (33, 64, 130, 0.0, True),
    (20, 48, 256, 2.0, True),
    (70, 36, 192, 0.0, False),  # several M tiles
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,k,threshold,has_bias", MATMUL_CASES, ids=str)
def test_matmul_against_the_reference(m, n, k, threshold, has_bias, dtype, device):
    x, w, scb, b = operands(m, n, k, dtype, device, bias=has_bias)
    y = matmul_8bit.linear_8bit(x, w, scb, b, threshold=threshold)
    ref = linear_8bit_ref(x, w, scb, b, threshold=threshold)
    assert y.shape == (m, n) and y.dtype == dtype
    if not int8_activations_ref(x.cpu(), threshold)[2].any():
        assert torch.equal(y, ref)  # integer sums and the same float32 operations: bit for bit
    else:
        e = exact(x, w, scb, b, threshold)
        err, bar = (y.cpu().double() - e).norm().item(), (ref.cpu().double() - e).norm().item()
        assert err <= 2 * bar + 1e-9, f"error {err:.4g} > 2x the reference's {bar:.4g}"


def test_the_op_dispatches_compiles_and_refuses(device):
    x, w, scb, b = operands(6, 24, 64, torch.bfloat16, device, scale=3.0)
    lead = x.reshape(2, 3, 64)
    y = linear_8bit(lead, w, scb, b, threshold=6.0)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.reshape(6, 24), linear_8bit_ref(x, w, scb, b, threshold=6.0), rtol=0, atol=0.07)
    compiled = torch.compile(lambda t: linear_8bit(t, w, scb, b, threshold=0.0), fullgraph=True, backend="eager")
    assert torch.equal(compiled(lead), linear_8bit(lead, w, scb, b, threshold=0.0))
    with pytest.raises(ValueError, match="threshold"):
        linear_8bit(x, w, scb, b, threshold=-1.0)
    with pytest.raises(ValueError, match="do not match"):
        linear_8bit(x[:, :32], w, scb, b)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        matmul_8bit.linear_8bit(x.float(), w, scb, b, threshold=6.0)


def test_outlier_columns_are_listed_in_order_across_chunks(device):
    """The compaction behind the outlier part: every flagged column once, in order, and their count after them,
    with flags in the first, middle and last chunk of the running prefix sum."""
    k = 3 * matmul_8bit.COMPACT_BLOCK + 5
    flagged = [0, 3, matmul_8bit.COMPACT_BLOCK - 1, matmul_8bit.COMPACT_BLOCK, 2 * matmul_8bit.COMPACT_BLOCK + 7, k - 1]
    cols = torch.zeros(k, dtype=torch.int32, device=device)
    cols[flagged] = 1
    idx = torch.full((k + 1,), -1, dtype=torch.int32, device=device)
    matmul_8bit._compact_cols_kernel[(1,)](cols, idx, k, BLOCK=matmul_8bit.COMPACT_BLOCK)
    assert idx[: len(flagged)].tolist() == flagged and idx[k].item() == len(flagged)
    assert (idx[len(flagged) : k] == -1).all()  # nothing written past the list
