"""Loading bitsandbytes checkpoints with diffusers / transformers on a CPU, and what the end-to-end tests share.

diffusers refuses bnb models without a GPU ("No GPU found"), even pre-quantized ones; the recipe that works
(cpu-testing.md §4): report CUDA as available only while its quantizer's validate_environment runs, and pass
device_map="cpu". Never save a bnb model after a CPU forward pass (its AVX512 path repacks weights in place).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from unittest import mock

import torch

from compat import check_4bit_codes, check_int8_codes, check_nested_codes
from helpers import assert_equal
from qtool.io.reader import TensorReader, scan_component
from qtool.reference.quant4 import scale_blocks_ref
from qtool.spec import QuantSpec

# `qtool quantize` flags per method, and the QuantSpec (hence the BitsAndBytesConfig) they stand for.
METHODS = {
    "nf4-dq": (["--bits", "4", "--nf4", "--double-quant"], QuantSpec(double_quant=True)),
    "fp4": (["--bits", "4", "--fp4"], QuantSpec(quant_type="fp4")),
    "int8": (["--bits", "8"], QuantSpec(bits=8)),
}


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


def load(
    folder: Path, library: str, class_name: str, spec: QuantSpec | None = None, dtype: torch.dtype = torch.bfloat16
):
    """Load a component with from_pretrained on the CPU: pre-quantized or plain (spec None), or quantized on load by
    bnb; ``dtype`` is the load dtype of everything not quantized."""
    config = bnb_config(library, spec)
    kwargs = {"quantization_config": config} if config is not None else {}
    if library == "diffusers":
        import diffusers

        with diffusers_on_cpu():
            return getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=dtype, device_map="cpu", **kwargs)
    import transformers

    # device_map="cpu" also where a GPU exists: transformers would put a bnb model on it, away from the inputs.
    return getattr(transformers, class_name).from_pretrained(folder, dtype=dtype, device_map="cpu", **kwargs)


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or shards), by key."""
    weights = scan_component(folder)
    with TensorReader(weights) as reader:
        return {key: reader.read(key).clone() for key in weights.tensors}


def assert_matches_bnb_files(ours: dict, theirs: dict, source: dict, spec: QuantSpec) -> None:
    """Our tensors against bnb's save_pretrained of the same source (``read_all`` dicts): the same keys, dtypes and
    shapes; every tensor equal except where bnb's CPU kernels are allowed to differ (tests/compat.py): 4-bit and
    int8 codes at ties, and double-quant absmax codes at bnb CPU's grid snaps."""
    only_ours, only_bnb = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert not (only_ours or only_bnb), f"key sets differ: only ours {only_ours[:5]}, only bnb's {only_bnb[:5]}"
    for key in theirs:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key
    differing = nested = nested_total = 0
    for key in theirs:
        fqn = key.removesuffix(".weight")
        if key.endswith(".weight") and ours[key].dtype == torch.uint8:  # a packed 4-bit weight
            differing += check_4bit_codes(source[key], ours[key], theirs[key], spec.quant_type, spec.blocksize)
        elif key.endswith(".weight") and ours[key].dtype == torch.int8:
            differing += check_int8_codes(source[key], ours[key], theirs[key], ours[f"{fqn}.SCB"])
        elif key.endswith(".weight.absmax") and spec.double_quant:  # 8-bit codes of absmax - offset
            weight_key = key.removesuffix(".absmax")
            blob = ours[f"{weight_key}.quant_state.bitsandbytes__{spec.quant_type}"]
            offset = json.loads(bytes(blob.tolist()))["nested_offset"]  # the blob itself is compared byte for byte
            _, absmax = scale_blocks_ref(source[weight_key], spec.blocksize)
            nested_absmax = ours[f"{weight_key}.nested_absmax"]
            nested += check_nested_codes(absmax, offset, nested_absmax, ours[key], theirs[key], 1 / 65535)
            nested_total += ours[key].numel()
        else:
            assert_equal(ours[key], theirs[key], key)
    # Codes differ from bnb CPU only at ties (FP4 ~1.2% of bytes, int8 ~0.002%): far below 2% of the weights. Nested
    # codes: ~0.1% on random data (bnb-format.md §3.5), bounded as in tests/reference/test_against_bnb.py.
    assert differing <= 0.02 * sum(t.numel() for t in source.values())
    assert nested <= max(2, 0.01 * nested_total), f"{nested} of {nested_total} nested codes differ"


def flux_inputs(config) -> dict:
    """Random FluxTransformer2DModel inputs (bf16) for a forward pass; seed the global RNG first."""
    tokens, text = 16, 8
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, dtype=torch.bfloat16),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, dtype=torch.bfloat16),
        "timestep": torch.tensor([0.5], dtype=torch.bfloat16),
        "img_ids": torch.zeros(tokens, 3, dtype=torch.bfloat16),
        "txt_ids": torch.zeros(text, 3, dtype=torch.bfloat16),
        "guidance": torch.tensor([3.5], dtype=torch.bfloat16),
    }
