"""Loading bitsandbytes checkpoints with diffusers / transformers on a CPU, for the end-to-end tests.

diffusers refuses bnb models without a GPU ("No GPU found"), even pre-quantized ones; the recipe that works
(cpu-testing.md §4): report CUDA as available only while its quantizer's validate_environment runs, and pass
device_map="cpu". Never save a bnb model after a CPU forward pass (its AVX512 path repacks weights in place).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import torch

from qtool.spec import QuantSpec


@contextlib.contextmanager
def diffusers_on_cpu():
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    patches = []
    for cls in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        original = cls.validate_environment

        def validate(self, *args, _original=original, **kwargs):
            with mock.patch("torch.cuda.is_available", return_value=True):
                return _original(self, *args, **kwargs)

        patches.append(mock.patch.object(cls, "validate_environment", validate))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def bnb_config(library: str, spec: QuantSpec | None):
    if spec is None:
        return None
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    kwargs = {"llm_int8_skip_modules": list(spec.skip) or None, "llm_int8_threshold": spec.threshold}
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **kwargs)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=dtypes[spec.compute_dtype],
        **kwargs,
    )


def load(folder: Path, library: str, class_name: str, spec: QuantSpec | None = None):
    """Load a component with from_pretrained on the CPU: pre-quantized (spec None) or quantized on load by bnb."""
    config = bnb_config(library, spec)
    kwargs = {"quantization_config": config} if config is not None else {}
    if library == "diffusers":
        import diffusers

        with diffusers_on_cpu():
            return getattr(diffusers, class_name).from_pretrained(
                folder, torch_dtype=torch.bfloat16, device_map="cpu", **kwargs
            )
    import transformers

    return getattr(transformers, class_name).from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
