"""``qtool.nn``'s in-memory quantization (CPU, offline): ``from_linear`` and ``quantize_linears_``.

``from_linear`` must give exactly the layer ``from_entries`` builds from ``quantize_tensor``'s entries (the bytes
``qtool quantize`` writes), so the checks are bit for bit, no tolerance. ``quantize_linears_``'s skip rule is checked
against the libraries themselves: diffusers' and transformers' ``replace_with_bnb_linear`` on the same module tree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_equal
from qtool.nn import QuantLinear4bit, QuantLinear8bit, quantize_linears_
from qtool.quantize import quantize_tensor

# (quant_type, double_quant, blocksize); K = 192 is not a multiple of 128, so the last blocks span two rows.
METHODS_4BIT = [("nf4", False, 64), ("nf4", True, 64), ("fp4", False, 64), ("nf4", False, 128)]


def linear(k: int = 192, n: int = 80, bias: bool = True, dtype=torch.bfloat16) -> nn.Linear:
    layer = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    return layer


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("quant_type", "double_quant", "blocksize"), METHODS_4BIT)
def test_from_linear_4bit_is_quantize_tensor(quant_type, double_quant, blocksize, bias):
    source = linear(bias=bias)
    options = {"quant_type": quant_type, "double_quant": double_quant, "blocksize": blocksize}
    layer = QuantLinear4bit.from_linear(source, **options, compute_dtype=torch.bfloat16)
    entries = quantize_tensor(source.weight.detach(), bits=4, **options)
    expected = {**entries, **({"bias": source.bias.detach()} if bias else {})}
    state = layer.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert_equal(state[key], tensor, key)
    assert layer.compute_dtype == torch.bfloat16 and layer.double_quant == double_quant

    x = torch.randn(3, 5, 192, dtype=torch.bfloat16)
    reference = QuantLinear4bit.from_entries(entries, expected.get("bias"), torch.bfloat16)
    assert_equal(layer(x), reference(x), "output")


@pytest.mark.parametrize("threshold", [6.0, 0.0, None], ids=["threshold-6", "threshold-0", "weight-only"])
def test_from_linear_8bit_is_quantize_tensor(threshold):
    source = linear()
    layer = QuantLinear8bit.from_linear(source, threshold=threshold)
    entries = quantize_tensor(source.weight.detach(), bits=8)
    state = layer.state_dict()
    assert sorted(state) == sorted([*entries, "bias"])
    for key, tensor in entries.items():
        assert_equal(state[key], tensor, key)
    assert_equal(state["bias"], source.bias.detach(), "bias")
    assert layer.threshold == threshold

    x = torch.randn(4, 192, dtype=torch.bfloat16)
    x[:, 3] *= 400  # an outlier column (|x| >= 6) so that the threshold matters
    reference = QuantLinear8bit.from_entries(entries, source.bias.detach(), threshold)
    assert_equal(layer(x), reference(x), "output")


def test_from_linear_default_threshold_is_bnbs():
    assert QuantLinear8bit.from_linear(linear()).threshold == 6.0


def test_from_linear_leaves_the_source_alone():
    source = linear()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    QuantLinear4bit.from_linear(source)
    QuantLinear8bit.from_linear(source)
    for key, tensor in source.state_dict().items():
        assert_equal(tensor, before[key], key)


@pytest.mark.parametrize("cls", [QuantLinear4bit, QuantLinear8bit])
def test_from_linear_refuses_what_it_cannot_quantize(cls):
    with pytest.raises(TypeError, match=r"from_linear takes an nn.Linear, got Conv2d"):
        cls.from_linear(nn.Conv2d(4, 4, 3))
    three_d = linear()
    three_d.weight = nn.Parameter(torch.zeros(2, 80, 96))
    with pytest.raises(ValueError, match=r"2-D weight .*got \[2, 80, 96\]"):
        cls.from_linear(three_d)
    packed = linear()
    packed.weight = nn.Parameter(torch.zeros(80, 192, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match=r"float weight, got torch.uint8 \(already quantized\?\)"):
        cls.from_linear(packed)
    with pytest.raises(ValueError, match="meta device"):
        cls.from_linear(nn.Linear(192, 80, device="meta"))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(width, width)
        self.attn.to_out = nn.ModuleList([nn.Linear(width, width), nn.Dropout(0.0)])
        self.proj_out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class Tree(nn.Module):
    """FLUX-like names: a skip name can be a child name ("proj_out"), a full name, or a prefix of blocks."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.x_embedder = nn.Linear(width, width)
        self.transformer_blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.single_transformer_blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.proj_out = nn.Linear(width, width)


def linear_names(model: nn.Module, cls: type = nn.Linear) -> set[str]:
    return {name for name, module in model.named_modules() if type(module) is cls}


SKIPS = [
    [],
    ["proj_out"],
    ["transformer_blocks.0"],
    ["single_transformer_blocks.1.attn.to_q", "x_embedder"],
    ["to_out"],
    ["attn"],
]


@pytest.mark.bnb
@pytest.mark.parametrize("skip", SKIPS, ids=lambda s: ",".join(s) or "none")
@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_quantize_linears_skips_as_the_library_does(library, skip):
    """The Linears replaced are exactly those the library's replace_with_bnb_linear turns into Linear4bit for the
    same llm_int8_skip_modules."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    theirs = Tree().to("meta")
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
        from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear
    else:
        from transformers import BitsAndBytesConfig
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    replace_with_bnb_linear(theirs, list(skip), quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    expected = linear_names(theirs, bnb.nn.Linear4bit)

    ours = Tree()
    made = []

    def make(layer: nn.Linear) -> nn.Module:
        made.append(layer)
        return QuantLinear4bit.from_linear(layer)

    assert quantize_linears_(ours, make, skip=skip, library=library) is ours
    assert linear_names(ours, QuantLinear4bit) == expected
    assert linear_names(ours) == linear_names(Tree()) - expected  # the rest are the same nn.Linear modules
    assert len(made) == len(expected)


def test_quantize_linears_output_and_shared_layers():
    """A model's forward through replaced layers equals the same layers built one by one; a Linear reachable under
    two names is made once and replaced under both."""
    torch.manual_seed(0)
    model = nn.Sequential(linear(64, 128), nn.GELU(), linear(128, 64))
    shared = nn.Module()
    shared.a = linear(64, 64)
    shared.b = shared.a
    expected = [QuantLinear4bit.from_linear(model[0]), QuantLinear4bit.from_linear(model[2])]
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    want = expected[1](nn.functional.gelu(expected[0](x)))
    quantize_linears_(model, QuantLinear4bit.from_linear)
    assert_equal(model(x), want, "output")

    calls = []
    quantize_linears_(shared, lambda layer: calls.append(layer) or QuantLinear8bit.from_linear(layer))
    assert len(calls) == 1 and shared.a is shared.b and isinstance(shared.a, QuantLinear8bit)


def test_quantize_linears_skip_may_be_one_name():
    model = Tree()
    quantize_linears_(model, QuantLinear4bit.from_linear, skip="proj_out")
    assert {n for n in linear_names(model) if n.endswith("proj_out")} == linear_names(model)


def test_quantize_linears_refuses_bad_arguments():
    with pytest.raises(ValueError, match="library must be 'diffusers' or 'transformers'"):
        quantize_linears_(Tree(), QuantLinear4bit.from_linear, library="bnb")
    with pytest.raises(ValueError, match=r"for one Linear call make\(linear\)"):
        quantize_linears_(linear(), QuantLinear4bit.from_linear)


@pytest.mark.parametrize(
    "make",
    [lambda layer: QuantLinear4bit.from_linear(layer, double_quant=True), QuantLinear8bit.from_linear],
    ids=["nf4-dq", "int8"],
)
def test_quantized_model_saves_with_safetensors(make, tmp_path):
    """Layers made by from_linear share no memory (the code books come from one cache, some entries are views into
    a larger buffer), so a quantized model saves through safetensors, which refuses shared or partial storage, and
    the file holds the state dict."""
    from safetensors.torch import load_file, save_model

    torch.manual_seed(0)
    model = quantize_linears_(nn.Sequential(linear(64, 128), nn.GELU(), linear(128, 64)), make)
    save_model(model, str(tmp_path / "m.safetensors"))
    stored, state = load_file(str(tmp_path / "m.safetensors")), model.state_dict()
    assert set(stored) == set(state)
    for key, tensor in stored.items():
        assert_equal(tensor, state[key], key)
