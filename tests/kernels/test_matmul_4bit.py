"""W4A16 linear: the Triton kernel and the custom op against the reference (dequantize, then F.linear).

The bar (issue 9): the error against an exact product of the same quantized weight stays within 2x bf16 F.linear's
own error. On the CPU the kernel runs in Triton's interpreter (small shapes); the GPU run covers real sizes.
"""

import pytest
import torch

from qtool.formats import bnb4
from qtool.kernels import matmul_4bit
from qtool.linear import linear_4bit, linear_4bit_ref
from qtool.quantize import dequantize_tensor, quantize_tensor

# (M, N, K, double quant, blocksize, bias): one token, a few, ragged N, double quant, blocksize 128.
CASES = [
    (1, 96, 256, False, 64, False),
    (3, 70, 512, True, 64, True),
    (1, 24, 512, False, 128, False),
    (2, 40, 1024, True, 64, True),
    (4, 33, 768, False, 128, True),
]
# Each kernel at its default tile, the tensor-core one without split-K (one launch, no partials), and with more
# rows than one M tile holds (the test's rows times 5, in tiles of 16: the grid's M axis).
VARIANTS = {
    "gemv": {"kernel": "gemv"},
    "mma": {"kernel": "mma"},
    "mma-no-split": {"kernel": "mma", "tile": (*matmul_4bit.MMA_TILE[:3], 1)},
    "mma-m-tiles": {"kernel": "mma", "tile": (*matmul_4bit.MMA_TILE[:4], 16, 1)},
}
ROWS = {"gemv": lambda m: 1, "mma-m-tiles": lambda m: 5 * m}


def layer(n, k, dq, blocksize, device):
    torch.manual_seed(n * k)
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16).to(device)
    entries = quantize_tensor(w, double_quant=dq, blocksize=blocksize)
    packed, state = bnb4.decode(entries)
    nested = {}
    if dq:
        nested = {"nested_absmax": state.nested_absmax, "nested_quant_map": state.nested_quant_map,
                  "nested_offset": torch.tensor(state.nested_offset, device=device)}  # fmt: skip
    return entries, packed, state, nested


def check_bar(y, x, entries, bias):
    """|y - exact| <= 2 |bf16 F.linear - exact| (+ a float64 floor), exact = float64 x W_q^T + b."""
    wq = dequantize_tensor(entries, dtype=torch.float32)
    exact = x.double() @ wq.double().t() + (bias.double() if bias is not None else 0)
    dense = torch.nn.functional.linear(x, wq.to(x.dtype), bias)
    err, bf16 = (y.double() - exact).norm().item(), (dense.double() - exact).norm().item()
    assert err <= 2 * bf16 + 1e-9, f"error {err:.4g} > 2x bf16's {bf16:.4g}"


@pytest.mark.parametrize("m,n,k,dq,blocksize,has_bias", CASES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_against_the_reference(m, n, k, dq, blocksize, has_bias, variant, device):
    entries, packed, state, nested = layer(n, k, dq, blocksize, device)
    x = torch.randn(ROWS.get(variant, lambda m: m)(m), k).to(torch.bfloat16).to(device)  # gemv takes one row
    bias = torch.randn(n).to(torch.bfloat16).to(device) if has_bias else None
    y = matmul_4bit.linear_4bit(x, packed, state.absmax, state.quant_map, bias, blocksize=blocksize, shape=(n, k),
                                **VARIANTS[variant], **nested)  # fmt: skip
    assert y.shape == (x.shape[0], n) and y.dtype == torch.bfloat16
    check_bar(y, x, entries, bias)
    ref = linear_4bit_ref(x, packed, state.absmax, state.quant_map, bias, blocksize=blocksize, shape=(n, k), **nested)
    check_bar(ref, x, entries, bias)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=str)
def test_the_op_takes_any_leading_shape_and_compiles(lead, device):
    entries, packed, state, nested = layer(48, 128, True, 64, device)
    x = torch.randn(*lead, 4, 128).to(torch.bfloat16).to(device)

    def f(x):
        return linear_4bit(x, packed, state.absmax, state.quant_map, blocksize=64, shape=(48, 128), **nested)

    y = f(x)
    assert y.shape == (*lead, 4, 48)
    check_bar(y.reshape(-1, 48), x.reshape(-1, 128), entries, None)
    compiled = torch.compile(f, fullgraph=True, backend="eager")  # a custom op: no graph break
    torch.testing.assert_close(compiled(x), y, rtol=0, atol=0)


def test_choose_and_argument_errors(device):
    x = torch.zeros(17, 1024, dtype=torch.bfloat16, device=device)
    assert matmul_4bit.choose(x[:1], 8, 1024) == "gemv"  # one row: CUDA cores
    assert matmul_4bit.choose(x[:16], 8, 1024) == "mma"  # up to 16: tensor cores
    assert matmul_4bit.choose(x[:17], 8, 1024) is None  # more: dequantize + cuBLAS (faster on the H100)
    assert matmul_4bit.choose(x[:1].float(), 8, 1024) is None  # float32 x: dequantize + F.linear
    assert matmul_4bit.choose(x[:1, :192], 8, 192) is None  # K not in whole K tiles
    _, packed, state, _ = layer(8, 64, False, 64, device)
    with pytest.raises(ValueError, match="do not match"):
        linear_4bit(x[:, :32], packed, state.absmax, state.quant_map, blocksize=64, shape=(8, 64))
    with pytest.raises(ValueError, match="gemv kernel takes one row"):
        matmul_4bit.linear_4bit(x[:2, :256], packed, state.absmax, state.quant_map, blocksize=64, shape=(8, 256),
                                kernel="gemv")  # fmt: skip
    whole = f"mma kernel takes rows of 16-bit x and K in whole {matmul_4bit.MMA_TILE[1]} tiles"  # the device's tile
    with pytest.raises(ValueError, match=whole):
        matmul_4bit.linear_4bit(x[:2, :192], packed, state.absmax, state.quant_map, blocksize=64, shape=(8, 192),
                                kernel="mma")  # fmt: skip
    with pytest.raises(ValueError, match="kernel must be one of"):
        matmul_4bit.linear_4bit(x[:1, :256], packed, state.absmax, state.quant_map, blocksize=64, shape=(8, 256),
                                kernel="wgmma")  # fmt: skip
