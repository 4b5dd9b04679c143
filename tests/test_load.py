"""``qtool.load``: bnb checkpoints run with qtool's layers (CPU, offline).

The models: a tiny Llama causal LM (untied lm_head), a T5 encoder (its ``wo`` stays 16-bit) and the example
pipeline's FLUX transformer, each in NF4, NF4 + double quant, FP4 and int8. The oracle is bitsandbytes loading the
same folder on the CPU: ``Linear4bit`` through its dequantize-then-``F.linear`` path (its AVX512-BF16 repacking off:
that path rounds absmax to bf16 first), ``Linear8bitLt`` through its inference path (LLM.int8: activations rounded to
int8 outside the outlier columns, threshold 6). Those are the maths of ``qtool.linear``'s references, and qtool's
dequantization equals bnb's bit for bit (README, "Compatibility"), so the outputs must be equal bit for bit: no
tolerance to derive. ``threshold=None`` (weight-only) is checked against ``Linear8bitLt``'s ``MatMul8bitFp`` path.

Beyond those: checkpoints whose keys transformers 5 renames on load (GPT-NeoX, legacy BERT LayerNorm names, LLaVA's
old layout, Mixtral's per-expert weights, the base-model prefix; RENAMED), against bnb the same way; and
save_pretrained round trips (a transformers model and the FLUX transformer, 4-bit and int8; a pipeline).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bnb_loading import flux_inputs, read_all
from bnb_loading import load as bnb_load

import qtool
from helpers import assert_equal
from qtool.errors import QtoolError
from qtool.nn import QuantLinear4bit, QuantLinear8bit
from qtool.spec import QuantSpec

METHODS = {
    "nf4": QuantSpec(),
    "nf4-dq": QuantSpec(double_quant=True),
    "fp4": QuantSpec(quant_type="fp4"),
    "int8": QuantSpec(bits=8),
}
# name: (library, class, the output compared)
MODELS = {
    "llama": ("transformers", "LlamaForCausalLM", "logits"),
    "t5": ("transformers", "T5EncoderModel", "last_hidden_state"),
    "flux": ("diffusers", "FluxTransformer2DModel", "sample"),
}
BNB_LAYERS = {"Linear4bit": QuantLinear4bit, "Linear8bitLt": QuantLinear8bit}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_flux) -> dict[str, Path]:
    from e2e.test_quantize_models import llama, t5

    root = tmp_path_factory.mktemp("load-src")
    for seed, (name, build) in enumerate({"llama": lambda: llama(False), "t5": t5}.items()):
        torch.manual_seed(seed)
        build().to(torch.bfloat16).save_pretrained(root / name)
    return {"llama": root / "llama", "t5": root / "t5", "flux": tiny_flux / "transformer"}


@pytest.fixture(scope="module")
def quantized(sources, tmp_path_factory):
    """(model, method) -> the folder qtool quantized it to (once per module)."""
    from qtool.api import quantize_checkpoint

    root, done = tmp_path_factory.mktemp("load-q"), {}

    def get(name: str, method: str) -> Path:
        if (name, method) not in done:
            out = root / f"{name}-{method}"
            result = quantize_checkpoint(sources[name], spec=METHODS[method], output=out, device="cpu")
            done[name, method] = result.output
        return done[name, method]

    return get


def bnb_same_math(model, weight_only: bool = False):
    """bnb's CPU 4-bit layers switched to dequantize + F.linear (see the module docstring); with ``weight_only``,
    its 8-bit layers too (``MatMul8bitFp``: training mode on those layers alone)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
        elif type(module).__name__ == "Linear8bitLt" and weight_only:
            module.train()
    return model


def forward(model, name: str) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        if name == "flux":
            output = model(**flux_inputs(model.config))
        else:
            output = model(input_ids=torch.randint(0, model.config.vocab_size, (2, 12)))
    return getattr(output, MODELS[name][2])


def check_like_bnb(ours, theirs) -> None:
    """Every bnb layer is the matching qtool layer at the same path; every other module has bnb's class, and every
    other parameter and buffer bnb's dtype, shape and value."""
    our_modules = dict(ours.named_modules())
    kinds = {type(m).__name__ for m in theirs.modules()}
    assert kinds & set(BNB_LAYERS), kinds
    for fqn, module in theirs.named_modules():
        kind = type(module).__name__
        if kind in BNB_LAYERS:
            assert type(our_modules[fqn]) is BNB_LAYERS[kind], fqn
        else:
            assert type(our_modules[fqn]).__name__ == kind, fqn
    quantized = {f for f, m in our_modules.items() if isinstance(m, (QuantLinear4bit, QuantLinear8bit))}
    our_tensors = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    for key, tensor in [*theirs.named_parameters(), *theirs.named_buffers()]:
        if key.rpartition(".")[0] in quantized and not key.endswith(".bias"):
            continue
        assert_equal(our_tensors[key].detach(), tensor.detach(), key)


@pytest.mark.bnb
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(MODELS))
def test_load_matches_bnb(quantized, name, method):
    """qtool layers exactly where bnb puts its own, everything else as from_pretrained loads it, and the same
    output as bnb's dequantize + F.linear path, bit for bit."""
    folder = quantized(name, method)
    library, class_name, _ = MODELS[name]
    ours = qtool.load(folder)
    theirs = bnb_same_math(bnb_load(folder, library, class_name))
    assert type(ours).__name__ == class_name and not ours.training
    check_like_bnb(ours, theirs)
    layer = next(m for m in ours.modules() if isinstance(m, (QuantLinear4bit, QuantLinear8bit)))
    assert isinstance(layer, QuantLinear8bit) == (method == "int8")
    if isinstance(layer, QuantLinear4bit):
        assert layer.double_quant == (method == "nf4-dq") and layer.quant_type == METHODS[method].quant_type
        assert layer.compute_dtype == torch.bfloat16  # qtool's default bnb_4bit_compute_dtype
    assert_equal(forward(ours, name), forward(theirs, name), "output")
    # The state dict holds the checkpoint's tensors under their on-disk names (the quantized ones included).
    stored, state = read_all(folder), ours.state_dict()
    assert set(stored) <= set(state)
    for key, tensor in stored.items():
        assert_equal(state[key].to(tensor.dtype) if tensor.is_floating_point() else state[key], tensor, key)


@pytest.mark.bnb
@pytest.mark.parametrize("name,method", [("llama", "nf4-dq"), ("t5", "int8")])
def test_loads_bnb_save_pretrained(sources, tmp_path, name, method):
    """A checkpoint written by bitsandbytes' own save_pretrained (quantized on load) runs the same as with bnb."""
    library, class_name, _ = MODELS[name]
    bnb_load(sources[name], library, class_name, METHODS[method]).save_pretrained(tmp_path / "bnb")
    ours = qtool.load(tmp_path / "bnb")
    theirs = bnb_same_math(bnb_load(tmp_path / "bnb", library, class_name))
    check_like_bnb(ours, theirs)
    assert_equal(forward(ours, name), forward(theirs, name), "output")


@pytest.mark.bnb
def test_int8_threshold_from_config_and_weight_only(quantized, tmp_path):
    """The layers take ``llm_int8_threshold`` from config.json (0: pure int8, as bnb runs it too); with the threshold
    set to None they compute weight-only, as bnb's ``MatMul8bitFp`` path does."""
    import shutil

    folder = tmp_path / "t0"
    shutil.copytree(quantized("llama", "int8"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["llm_int8_threshold"] = 0.0
    (folder / "config.json").write_text(json.dumps(config))
    library, class_name, _ = MODELS["llama"]
    ours, theirs = qtool.load(folder), bnb_load(folder, library, class_name)
    assert {m.threshold for m in ours.modules() if isinstance(m, QuantLinear8bit)} == {0.0}
    assert {m.state.threshold for m in theirs.modules() if type(m).__name__ == "Linear8bitLt"} == {0.0}
    assert_equal(forward(ours, "llama"), forward(theirs, "llama"), "output, threshold 0")
    for module in ours.modules():
        if isinstance(module, QuantLinear8bit):
            module.threshold = None
    weight_only = forward(ours, "llama")
    assert_equal(weight_only, forward(bnb_same_math(theirs, weight_only=True), "llama"), "output, weight-only")
    assert not torch.equal(weight_only, forward(qtool.load(folder), "llama"))  # the activations' rounding shows


# The renames transformers' from_pretrained applies (5.x, qtool/loader.py ``_names``), one checkpoint each. Before
# qtool.load asked transformers for them, each of these failed to load ("no tensor for lm_head.weight", "quantized
# layer language_model.model.layers.0.mlp.down_proj is not a module of the model", ...).
# name: (class in config.json, output compared, what the files hold)
RENAMED = {
    # GPT-NeoX's conversion mapping: transformers 5 saves the LM head as the original `embed_out`, loads it as
    # `lm_head`. The source as save_pretrained writes it, quantized by qtool.
    "neox": ("GPTNeoXForCausalLM", "logits", "embed_out.weight"),
    # The legacy LayerNorm names of old BERT checkpoints (bert-base-uncased's files still use them), quantized by qtool.
    "bert-gamma": ("BertModel", "last_hidden_state", "embeddings.LayerNorm.gamma"),
    # LLaVA's pre-5.0 layout, which transformers 5's own save_pretrained writes back: bnb's save of a LLaVA quantized
    # on load, so quantized entries are renamed too (language_model.model.layers.* -> model.language_model.layers.*).
    "llava": ("LlavaForConditionalGeneration", "logits", "language_model.model.layers.0.mlp.down_proj.weight.absmax"),
    # Mixtral's conversion mapping: per-expert weights (the layout transformers 5 saves, bnb leaves them unquantized)
    # merged into the fused experts by transformers' own tensor operations; `block_sparse_moe` renamed to `mlp`.
    "mixtral": ("MixtralForCausalLM", "logits", "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
    # A LlamaModel checkpoint (no `model.` prefix) whose config.json names LlamaForCausalLM: the base-model prefix is
    # added to every key, quantized entries included; lm_head is tied to the embeddings.
    "prefix-add": ("LlamaForCausalLM", "logits", "layers.0.self_attn.q_proj.weight.absmax"),
    # A LlamaForCausalLM checkpoint whose config.json names LlamaModel: the prefix is stripped, lm_head is left out.
    "prefix-strip": ("LlamaModel", "last_hidden_state", "model.layers.0.self_attn.q_proj.weight.quant_map"),
}


def _rename_keys(folder: Path, rename) -> None:
    from safetensors.torch import save_file

    tensors = read_all(folder)
    save_file({rename(k): t for k, t in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})


def _set_architecture(folder: Path, class_name: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": [class_name]}, indent=2))


@pytest.fixture(scope="module")
def renamed(tmp_path_factory, quantized):
    """name -> a quantized folder whose keys transformers renames on load (see RENAMED), made once per module."""
    import shutil

    import transformers as tf
    from e2e.test_quantize_models import llama

    from qtool.api import quantize_checkpoint

    root, done = tmp_path_factory.mktemp("renamed"), {}
    # Every Linear a multiple of 64 wide (bnb's CPU kernels), as in e2e/test_quantize_models.py.
    small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)

    def source(name: str, model) -> Path:
        model.to(torch.bfloat16).save_pretrained(root / f"{name}-src")
        return root / f"{name}-src"

    def get(name: str) -> Path:
        if name in done:
            return done[name]
        torch.manual_seed(0)
        out = root / name
        if name == "neox":
            config = tf.GPTNeoXConfig(vocab_size=256, max_position_embeddings=64, **small)
            quantize_checkpoint(source(name, tf.GPTNeoXForCausalLM(config)), output=out, device="cpu")
        elif name == "bert-gamma":
            folder = source(name, tf.BertModel(tf.BertConfig(vocab_size=256, max_position_embeddings=64, **small)))
            _rename_keys(
                folder,
                lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"),
            )
            quantize_checkpoint(folder, spec=METHODS["int8"], output=out, device="cpu")
        elif name == "llava":
            text = tf.LlamaConfig(vocab_size=256, num_key_value_heads=1, head_dim=64, **small)
            vision = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=1, image_size=32, patch_size=8)  # fmt: skip
            config = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=255)
            folder = source(name, tf.LlavaForConditionalGeneration(config))
            class_name = RENAMED[name][0]
            bnb_load(folder, "transformers", class_name, METHODS["nf4-dq"]).save_pretrained(out)
        elif name == "mixtral":
            config = tf.MixtralConfig(vocab_size=256, num_key_value_heads=1, head_dim=64, num_local_experts=4,
                                      num_experts_per_tok=2, max_position_embeddings=64, **small)  # fmt: skip
            quantize_checkpoint(
                source(name, tf.MixtralForCausalLM(config)), spec=METHODS["nf4-dq"], output=out, device="cpu"
            )
        elif name == "prefix-add":
            folder = source(name, llama(True).model)
            quantize_checkpoint(folder, spec=METHODS["nf4"], output=out, device="cpu")
            _set_architecture(out, "LlamaForCausalLM")
        else:
            shutil.copytree(quantized("llama", "fp4"), out)
            _set_architecture(out, "LlamaModel")
        done[name] = out
        return out

    return get


@pytest.mark.bnb
@pytest.mark.parametrize("name", list(RENAMED))
def test_renamed_keys_load_like_bnb(renamed, tmp_path, name):
    """Checkpoints whose keys transformers renames on load: qtool layers where bnb's are, every other tensor bnb's,
    the same output bit for bit. save_pretrained reverts the renames as transformers does (the prefix change is no
    rename: the model's own names are written) and the result runs the same with qtool and with bnb.

    (bnb's own save_pretrained of a pre-quantized checkpoint fails in transformers 5.23: its deserialize op has no
    reverse, huggingface/transformers#45743; qtool-loaded models do not carry that op.)"""
    folder = renamed(name)
    class_name, output, stored = RENAMED[name]
    keys = set(read_all(folder))
    assert stored in keys  # the case is what it says
    theirs = bnb_same_math(bnb_load(folder, "transformers", class_name))
    with pytest.warns(UserWarning, match="lm_head.weight") if name == "prefix-strip" else contextlib.nullcontext():
        ours = qtool.load(folder)
    assert type(ours).__name__ == class_name
    check_like_bnb(ours, theirs)
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 12))  # below LLaVA's image token (255)
    with torch.no_grad():
        out = getattr(ours(input_ids=ids), output)
        assert_equal(out, getattr(theirs(input_ids=ids), output), "output")

    ours.save_pretrained(tmp_path)
    if name == "prefix-add":
        keys = {f"model.{k}" for k in keys}
    elif name == "prefix-strip":
        keys = {k.removeprefix("model.") for k in keys if not k.startswith("lm_head.")}
    assert set(read_all(tmp_path)) == keys
    for again in (qtool.load(tmp_path), bnb_same_math(bnb_load(tmp_path, "transformers", class_name))):
        with torch.no_grad():
            assert_equal(getattr(again(input_ids=ids), output), out, f"{type(again).__name__} after save_pretrained")


def test_refuses_converting_a_quantized_weight(renamed, tmp_path):
    """transformers 4.x had Mixtral's experts as Linear layers, which bnb quantized; transformers 5 merges them into
    fused experts with tensor operations, which packed 4-bit weights do not allow: refused, naming the weight."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "mixtral-4x"
    shutil.copytree(renamed("mixtral"), folder)
    tensors = read_all(folder)
    for key in [k for k in tensors if ".experts." in k]:
        entries = qtool.quantize_tensor(tensors.pop(key), bits=4)
        tensors |= {f"{key.removesuffix('.weight')}.{entry}": t.clone() for entry, t in entries.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QtoolError, match=r"experts\.0\.w1\.weight through tensor operations") as info:
        qtool.load(folder)
    assert "cannot load this layer quantized either" in info.value.hint


@pytest.mark.bnb
@pytest.mark.parametrize("name,method", [("llama", "nf4-dq"), ("llama", "int8"), ("flux", "nf4"), ("flux", "int8")])
def test_save_pretrained_round_trip(quantized, tmp_path, name, method):
    """The loaded model's config carries the checkpoint's quantization_config as the library's BitsAndBytesConfig (as
    bnb's from_pretrained leaves it), and the model none of the attributes that send transformers and diffusers down
    bnb's paths. save_pretrained writes the checkpoint's tensors bit for bit and its quantization_config; the result
    runs as the original did, with qtool and with bnb."""
    folder = quantized(name, method)
    library, class_name, _ = MODELS[name]
    stored_config = json.loads((folder / "config.json").read_text())["quantization_config"]
    ours = qtool.load(folder)
    config = ours.config["quantization_config"] if library == "diffusers" else ours.config.quantization_config
    assert type(config).__module__.startswith(library) and type(config).__name__ == "BitsAndBytesConfig"
    assert config.to_dict() == stored_config
    for attribute in ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        assert not hasattr(ours, attribute), attribute

    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == stored_config
    stored, saved = read_all(folder), read_all(tmp_path)
    assert set(saved) == set(stored)
    for key, tensor in stored.items():
        assert_equal(saved[key], tensor, key)
    if library == "transformers":  # generation_config.json as the checkpoint has it, not rebuilt from config.json
        generation = [json.loads((f / "generation_config.json").read_text()) for f in (folder, tmp_path)]
        assert generation[0] == generation[1]
    expected = forward(ours, name)
    assert_equal(forward(qtool.load(tmp_path), name), expected, "qtool.load after save_pretrained")
    theirs = bnb_same_math(bnb_load(tmp_path, library, class_name))
    assert_equal(forward(theirs, name), expected, "bnb after save_pretrained")


def test_pipeline_save_pretrained_round_trip(flux_outputs, tmp_path):
    """A qtool-loaded pipeline saves as diffusers saves it, its quantized components with their quantization_config,
    and loads again with qtool to the same tensors."""
    folder = flux_outputs["nf4-dq"]
    pipe = qtool.load(folder)
    pipe.save_pretrained(tmp_path)
    again = qtool.load(tmp_path)
    for name in ("transformer", "text_encoder_2"):
        configs = [
            json.loads((f / name / "config.json").read_text())["quantization_config"] for f in (folder, tmp_path)
        ]
        assert configs[0] == configs[1]
        before, after = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert before.keys() == after.keys()
        for key, tensor in before.items():
            assert_equal(after[key], tensor, f"{name}.{key}")


def test_pipeline(flux_outputs):
    """A quantized pipeline: the quantized components are built by qtool, the rest load as diffusers loads them;
    `components` limits what qtool builds and refuses a component that is not quantized."""
    from collections import Counter

    pipe = qtool.load(flux_outputs["nf4-dq"])
    assert type(pipe).__name__ == "FluxPipeline"
    for name, quantized in (("transformer", 50), ("text_encoder_2", 12), ("text_encoder", 0), ("vae", 0)):
        kinds = Counter(type(m).__name__ for m in getattr(pipe, name).modules())
        assert kinds["QuantLinear4bit"] == quantized, (name, kinds)
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}
    image = pipe(
        "a cat", num_inference_steps=1, height=64, width=64, max_sequence_length=32,
        generator=torch.manual_seed(0), output_type="np",
    ).images  # fmt: skip
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()
    with pytest.raises(QtoolError, match="'vae' is not quantized"):
        qtool.load(flux_outputs["nf4-dq"], components=["vae"])


def test_torch_compile_fullgraph(quantized):
    """torch.compile(fullgraph=True) traces through the qtool layers (custom ops with fake kernels): no graph break
    anywhere, and the compiled model computes what the eager one does. aot_eager runs the same AOT tracing as
    inductor without compiling C++, which a CPU test cannot afford."""
    for name, method in (("llama", "nf4-dq"), ("flux", "int8")):
        model = qtool.load(quantized(name, method))
        torch._dynamo.reset()
        inputs = (
            flux_inputs(model.config)
            if name == "flux"
            else {"input_ids": torch.randint(0, model.config.vocab_size, (2, 12))}
        )
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(**inputs)
            assert explained.graph_break_count == 0, explained.break_reasons
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            out = getattr(compiled(**inputs), MODELS[name][2])
            assert_equal(out, getattr(model(**inputs), MODELS[name][2]), f"{name} compiled")


def test_hub_downloads_json_first(fake_hub, quantized):
    """A Hub repo: the JSON files first (a plain repo would be refused before any weight is fetched), then the
    model's files; the loaded model is the local one's."""
    from qtool.api import MODEL_PATTERNS

    fake_hub.serve("me/llama-nf4", quantized("llama", "nf4"))
    model = qtool.load("me/llama-nf4", revision="main")
    assert fake_hub.downloaded_patterns() == [["*.json"], MODEL_PATTERNS]
    assert_equal(forward(model, "llama"), forward(qtool.load(quantized("llama", "nf4")), "llama"), "output")


def test_quant_layers_keep_dtypes_and_compute_dtype(quantized):
    """.to(float16) casts the bias and other parameters but not the scales and code books (they would change the
    weights); a float16 input to a 4-bit layer computes in its compute_dtype (bnb's rule) and comes back float16."""
    from qtool.linear import linear_4bit_ref

    model = qtool.load(quantized("t5", "nf4"), dtype=torch.float32)
    layer = model.encoder.block[0].layer[0].SelfAttention.q
    before = {n: b.clone() for n, b in layer.named_buffers()}
    model.to(torch.float16)
    for name, buffer in layer.named_buffers():
        assert_equal(buffer, before[name], name)
    x = torch.randn(3, layer.in_features, dtype=torch.float16)
    expected = linear_4bit_ref(
        x.float(), layer.weight, layer.absmax, layer.quant_map, blocksize=layer.blocksize,
        shape=(layer.out_features, layer.in_features),
    ).half()  # fmt: skip
    layer.compute_dtype = torch.float32
    assert_equal(layer(x), expected, "fp16 in, fp32 compute")
    assert "nf4, blocksize=64, compute_dtype=float32" in repr(layer)


def test_refusals(tmp_path, sources, quantized):
    """Plain, foreign and pickle-only checkpoints are refused with a hint; a missing tensor is named."""
    with pytest.raises(QtoolError, match="is not quantized") as info:
        qtool.load(sources["llama"])
    assert "qtool quantize" in info.value.hint

    foreign = tmp_path / "gguf"
    foreign.mkdir()
    config = json.loads((sources["llama"] / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gguf"}}))
    with pytest.raises(QtoolError, match="quantized with gguf"):
        qtool.load(foreign)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((quantized("llama", "int8") / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(QtoolError, match="only pickled weights") as info:
        qtool.load(pickled)
    assert "never unpickles" in info.value.hint

    from safetensors.torch import save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((quantized("llama", "int8") / "config.json").read_text())
    tensors = read_all(quantized("llama", "int8"))
    del tensors["model.norm.weight"]
    save_file(tensors, partial / "model.safetensors")
    with pytest.raises(QtoolError, match=r"no tensor for model\.norm\.weight"):
        qtool.load(partial)


def test_runs_without_bitsandbytes(flux_outputs, quantized, tmp_path):
    """With bitsandbytes made unimportable (as if not installed), a pipeline and a transformers LLM load and run, the
    LLM saves, and nothing imported it."""
    code = f"""
import sys
sys.modules["bitsandbytes"] = None  # import fails, importlib.util.find_spec says not installed
import torch, qtool
pipe = qtool.load({str(flux_outputs["nf4"])!r})
pipe("a cat", num_inference_steps=1, height=64, width=64, max_sequence_length=32, output_type="np")
model = qtool.load({str(quantized("llama", "int8"))!r})
assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
model.save_pretrained({str(tmp_path)!r})
assert sys.modules["bitsandbytes"] is None
print("ok", type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "QuantLinear4bit"]


@pytest.mark.gpu
@pytest.mark.bnb
def test_gpu_pipeline_matches_bnb_and_runs_with_cpu_offload(tiny_flux, flux_outputs):
    """On a GPU: the qtool-loaded pipeline's image is bnb's up to rounding, and enable_model_cpu_offload runs it.

    The two differ only in bf16 rounding inside the matmuls (Triton against bnb's CUDA kernels), about 2**-8
    relative per operation, while both differ from the unquantized pipeline by NF4's weight error (SQNR ~20 dB, 10%
    relative per weight): so |ours - bnb| must be a small fraction of |bnb - unquantized|; 0.25 leaves room for the
    rounding to grow over the 2 steps. The offloaded run uses the same kernels on the same device, moved there by
    accelerate's hooks (buffers included): the same 8-bit image (every pixel within 1/255).
    """
    from diffusers import FluxPipeline

    folder = flux_outputs["nf4-dq"]
    kwargs = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="np")

    def image(pipe) -> torch.Tensor:
        return torch.from_numpy(pipe("a cat", generator=torch.manual_seed(0), **kwargs).images).double()

    ours = image(qtool.load(folder, device="cuda"))
    theirs = image(FluxPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda"))
    plain = image(FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.bfloat16).to("cuda"))
    assert (ours - theirs).norm() <= 0.25 * (theirs - plain).norm()
    offloaded = qtool.load(folder)
    offloaded.enable_model_cpu_offload()
    assert offloaded.transformer.device.type == "cpu"
    assert (image(offloaded) - ours).abs().max() < 1 / 255
