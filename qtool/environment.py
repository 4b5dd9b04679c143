"""What qtool runs on: library versions, the GPU, and whether Triton kernels are compiled or interpreted."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict[str, str]:
    import torch

    from qtool import __version__

    info = {"qtool": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "triton", "safetensors", "huggingface_hub", "transformers", "diffusers", "bitsandbytes"):
        info[package] = _version(package)
    info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        info["kernels"] = "Triton interpreter (TRITON_INTERPRET=1)"
    else:
        info["kernels"] = "Triton on the GPU" if torch.cuda.is_available() else "PyTorch reference (no GPU)"
    return info
