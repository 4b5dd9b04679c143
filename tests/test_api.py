"""The public tensor API: qtool.quantize_tensor / qtool.dequantize_tensor."""

import json
import subprocess
import sys

import pytest
import torch

import qtool
from helpers import SQNR_FLOOR_DB, assert_equal, sqnr_db


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_entries(quant_type, double_quant):
    w = torch.randn(96, 320, dtype=torch.bfloat16)
    entries = qtool.quantize_tensor(w, quant_type=quant_type, double_quant=double_quant)
    blob = f"weight.quant_state.bitsandbytes__{quant_type}"
    expected = {"weight": (torch.uint8, (15360, 1)), "weight.quant_map": (torch.float32, (16,))}
    if double_quant:
        expected |= {
            "weight.absmax": (torch.uint8, (480,)),
            "weight.nested_absmax": (torch.float32, (2,)),
            "weight.nested_quant_map": (torch.float32, (256,)),
        }
    else:
        expected["weight.absmax"] = (torch.float32, (480,))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in entries.items() if k != blob} == expected
    meta = json.loads(bytes(entries[blob].tolist()))
    assert list(meta)[:4] == ["quant_type", "blocksize", "dtype", "shape"]
    assert meta["quant_type"] == quant_type and meta["dtype"] == "bfloat16" and meta["shape"] == [96, 320]
    assert ("nested_offset" in meta) == double_quant
    out = qtool.dequantize_tensor(entries)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert sqnr_db(w.float(), out.float()) >= SQNR_FLOOR_DB[(quant_type, double_quant, 64)] - 0.5  # bf16 output


def test_8bit_entries():
    w = torch.randn(64, 128, dtype=torch.float16)
    entries = qtool.quantize_tensor(w, bits=8)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in entries.items()} == {
        "weight": (torch.int8, (64, 128)),
        "SCB": (torch.float32, (64,)),
        "weight_format": (torch.uint8, ()),
    }
    out = qtool.dequantize_tensor(entries)
    assert out.dtype == torch.float16
    assert sqnr_db(w.float(), out.float()) >= SQNR_FLOOR_DB[("int8", False, 0)] - 1


@pytest.mark.parametrize(
    "kwargs", [{"bits": 4, "double_quant": True, "quant_type": "fp4", "blocksize": 128}, {"bits": 8}], ids=str
)
def test_backends_give_identical_entries(kwargs):
    """The Triton kernels (interpreter on CPU, compiled on GPU) and the reference write the same bytes on the same
    device (the double-quant offset is torch.mean on that device: CPU and CUDA sums can differ in the last bit)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(40, 192, dtype=torch.bfloat16, device=device)
    ref = qtool.quantize_tensor(w, backend="torch", **kwargs)
    tri = qtool.quantize_tensor(w, backend="triton", **kwargs)
    assert list(ref) == list(tri)
    for key in ref:
        assert_equal(tri[key].cpu(), ref[key], key)
    for dtype in (torch.float32, torch.bfloat16):
        assert_equal(
            qtool.dequantize_tensor(tri, dtype=dtype, backend="triton").cpu(),
            qtool.dequantize_tensor(ref, dtype=dtype, backend="torch"),
            f"dequantized to {dtype}",
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3}, "bits must be 4 or 8"),
        ({"bits": 8, "quant_type": "fp4"}, "4-bit only"),
        ({"bits": 8, "double_quant": True}, "4-bit only"),
        ({"quant_type": "int4"}, "quant_type"),
        ({"blocksize": 100}, "blocksize"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qtool.quantize_tensor(torch.randn(8, 64), **kwargs)


def test_dequantize_rejects_other_entries():
    with pytest.raises(ValueError, match="not a bitsandbytes"):
        qtool.dequantize_tensor({"weight": torch.randn(4, 4)})
    entries = qtool.quantize_tensor(torch.randn(4, 64), double_quant=True)
    del entries["weight.nested_absmax"]
    with pytest.raises(ValueError, match="nested_absmax"):
        qtool.dequantize_tensor(entries)


def test_import_is_light():
    """`import qtool` and the CLI module load neither torch nor triton (fast --help and --version)."""
    code = "import sys, qtool, qtool.cli.app; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
