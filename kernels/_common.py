"""Helpers shared by qtool's Triton kernels. No driver or device query runs at import time.

Under ``TRITON_INTERPRET=1`` (CPU tests) kernels run in Triton's interpreter, which differs from the GPU in ways
that matter to bit-exact codecs (../shared/docs/cpu-testing.md §2): bf16 stores truncate instead of rounding, and
each program instance costs ~4 ms, so tiles are large and bf16 outputs are rounded by hand (``store_rounded``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read when the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETING = is_interpreting()


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors only under the interpreter; say which is wrong."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRETING:
            continue
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got a {t.device.type} tensor); use backend='torch' on CPU, "
            "or set TRITON_INTERPRET=1 before importing qtool.kernels to run them in Triton's interpreter"
        )


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU the current one for the launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def device_scalar(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """value as a float32 [1] tensor on device, without a host sync: a tensor is copied on the device, a Python
    float is filled in by a kernel (a host-to-device copy from pageable memory would wait for the stream)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def launch_options() -> dict:
    """Keyword options for every codec launch.

    Floating-point contraction is off: ``a * b + c`` must round twice, as PyTorch (the reference) and bnb do;
    a fused multiply-add changes the last bit (e.g. the double-quant absmax rebuild). The interpreter never fuses.
    """
    return {} if INTERPRETING else {"enable_fp_fusion": False}


def warps_option(num_warps: int | None, default: int) -> dict:
    """The ``num_warps`` launch option (GPU only: the interpreter runs a program as one whole-tile step)."""
    return {} if INTERPRETING else {"num_warps": num_warps or default}


def output_view(out: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel stores into: bf16 outputs are written as int16 bit patterns under the interpreter."""
    if INTERPRETING and out.dtype == torch.bfloat16:
        return out.view(torch.int16)
    return out


@triton.jit
def bf16_rne_bits(x):
    """The bf16 bit pattern of finite float32 x rounded to nearest even, as uint32 in [0, 65535], by integer
    arithmetic: the interpreter's fp32 -> bf16 cast truncates (32,543 of 65,536 values wrong, cpu-testing.md §2.2)."""
    b = x.to(tl.uint32, bitcast=True)
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@triton.jit
def round_16bit(v, dtype, BY_HAND: tl.constexpr):
    """Float32 v rounded to the 16-bit dtype (to nearest even). With BY_HAND (the interpreter, whose casts to bf16
    truncate) the result is a float32 holding the bf16-rounded value, rounded on the bits (bf16_rne_bits)."""
    if BY_HAND:
        return (bf16_rne_bits(v) << 16).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def store_rounded(ptr, x, mask, BF16_BITS: tl.constexpr):
    """Store float32 x into ptr's dtype with round-to-nearest-even.

    With BF16_BITS, ptr is an int16 view of a bf16 tensor and the rounding is done on the bits (bf16_rne_bits).
    """
    if BF16_BITS:
        tl.store(ptr, bf16_rne_bits(x).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


def bf16_bits(out: torch.Tensor) -> bool:
    return INTERPRETING and out.dtype == torch.bfloat16
