"""Test set-up: Triton's interpreter on machines without CUDA, offline Hub, seeds, markers.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before ``qtool.kernels`` is
imported (../shared/docs/cpu-testing.md §2), so it is set here, at the top, before anything else imports qtool.
"""

import os
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the network or the user's Hub cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="qtool-hf-home-"))

_early = [m for m in sys.modules if m.startswith("qtool.kernels.")]
if _early and os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError(f"{_early} were imported before TRITON_INTERPRET was set: their kernels are compiled-mode")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_bnb = pytest.mark.skip(reason="needs bitsandbytes (pip install -e .[test])")
    has_bnb = _has_bnb()
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "bnb" in item.keywords and not has_bnb:
            item.add_marker(skip_bnb)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the GPU, or the CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
