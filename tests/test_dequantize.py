"""`qtool dequantize` on the example pipeline: values equal bitsandbytes' own dequantization of the same bytes,
quantize-then-dequantize has exactly the codec's error, the output loads without bitsandbytes, refusals, the Hub
path and the CLI. Single models written by bnb's own save_pretrained: tests/e2e/test_quantize_models.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from bnb_loading import read_all
from typer.testing import CliRunner

from helpers import FLUX_METHODS, SQNR_FLOOR_DB, assert_equal
from qtool.cli.app import app
from qtool.dequant import dequantize_checkpoint
from qtool.errors import QtoolError
from qtool.formats.layers import quantized_layers
from qtool.quantize import dequantize_tensor, quantize_tensor

QUANTIZED = ("text_encoder_2", "transformer")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bnb_dequantize(entries: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own dequantization of one layer's entries (on-disk names relative to the module)."""
    import bitsandbytes.functional as F  # noqa: N812

    if "SCB" in entries:
        return F.int8_vectorwise_dequant(entries["weight"], entries["SCB"]).to(dtype)
    state = F.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in entries.items() if k != "weight"}, device=torch.device("cpu")
    )
    state.dtype = dtype  # bnb dequantizes to the quant state's dtype
    return F.dequantize_4bit(entries["weight"], state)


def same(ours: torch.Tensor, bnb: torch.Tensor, key: str) -> None:
    """Bit for bit, except the sign of zero: FP4 code 8 is +0.0 in the quant_map that qtool (and bnb's pure-torch
    CPU path) look up, and -0.0 in bnb's C++ and CUDA kernels, which apply the sign bit. ``x + 0.0`` maps -0.0 to
    +0.0 and leaves every other value as it is (README, compatibility table)."""
    assert_equal(ours + 0.0, bnb + 0.0, key)


def check_against_bnb(quantized_folder, dequantized_folder, dtype: str | None, int8_default=torch.bfloat16) -> int:
    """Every dequantized weight equals bnb's float32 dequantization of the source's bytes, rounded once to the
    output dtype; everything else is unchanged. Returns the number of layers checked.

    (bnb's C++ CPU kernel, used where the CPU has AVX512, computes a float16 output in float16 and can be an ulp
    off its own float32 result; bnb CUDA, which qtool follows, matches: test_gpu_path_equals_bnb_cuda_...)"""
    source, ours = read_all(quantized_folder), read_all(dequantized_folder)
    layers = quantized_layers(source)
    owned = {k for layer in layers.values() for k in layer.entries.values()} - set(layers)
    assert sorted(ours) == sorted(k for k in source if k not in owned)
    for key, layer in layers.items():
        entries = {name: source[k] for name, k in layer.entries.items()}
        if dtype:
            target = TORCH_DTYPES[dtype]
        elif layer.bits == 4:
            target = getattr(
                torch, json.loads(bytes(entries[next(n for n in entries if "quant_state" in n)].tolist()))["dtype"]
            )
        else:
            target = int8_default
        same(ours[key], bnb_dequantize(entries, torch.float32).to(target), key)
    for key in ours:
        if key not in layers:
            assert_equal(ours[key], source[key], key)
    config = json.loads((dequantized_folder / "config.json").read_text())
    expected = json.loads((quantized_folder / "config.json").read_text())
    expected.pop("quantization_config")
    assert config == expected
    return len(layers)


@pytest.mark.bnb
@pytest.mark.parametrize("dtype", [None, "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("label", ["nf4", "nf4-dq", "fp4-dq", "int8"])
def test_values_equal_bnb_dequantization(flux_outputs, tmp_path, label, dtype):
    """For each method and output dtype, bit for bit (default dtype: the quant state's, bf16 here)."""
    result = dequantize_checkpoint(flux_outputs[label], output=tmp_path / "out", dtype=dtype, device="cpu")
    assert [c.name for c in result.components] == list(QUANTIZED)
    for name in QUANTIZED:
        assert check_against_bnb(flux_outputs[label] / name, tmp_path / "out" / name, dtype) > 0
    assert {c.method for c in result.components} == {label}
    assert {d for c in result.components for d in c.dtypes} == {str(TORCH_DTYPES[dtype or "bf16"])[6:]}


@pytest.mark.parametrize("label", ["nf4", "nf4-dq", "fp4-dq", "int8"])
def test_quantize_then_dequantize_has_exactly_the_codec_error(tiny_flux, flux_outputs, tmp_path, label):
    """Each dequantized weight is exactly dequantize(quantize(source weight)), so its error is the codec's; its
    SQNR against the source is above the codec's floor for N(0, 1) weights (helpers.SQNR_FLOOR_DB). The example's
    weights are fixed (seeded), so this is deterministic: measured minima 20.64 dB (NF4), 18.15 dB (FP4-DQ, the
    T5 encoder; floor 18.07) and 43.29 dB (int8)."""
    dequantize_checkpoint(flux_outputs[label], output=tmp_path / "out", device="cpu")
    spec = FLUX_METHODS[label]
    sqnrs = []
    for name in QUANTIZED:
        source, back = read_all(tiny_flux / name), read_all(tmp_path / "out" / name)
        layers = quantized_layers(read_all(flux_outputs[label] / name))
        for key in layers:
            w = source[key]
            kwargs = (
                {"bits": 8} if spec.bits == 8 else {"quant_type": spec.quant_type, "double_quant": spec.double_quant}
            )
            codec = dequantize_tensor(quantize_tensor(w, **kwargs), dtype=w.dtype)
            assert_equal(back[key], codec, key)
            error = (w.float() - back[key].float()).pow(2).sum()
            sqnrs.append(10 * math.log10(w.float().pow(2).sum() / error))
    floor = SQNR_FLOOR_DB["int8", False, 0] if spec.bits == 8 else SQNR_FLOOR_DB[spec.quant_type, spec.double_quant, 64]
    assert min(sqnrs) >= floor, (min(sqnrs), sum(sqnrs) / len(sqnrs))


@pytest.mark.parametrize("label", ["nf4-dq", "int8"])
def test_the_output_loads_without_bitsandbytes(flux_outputs, tmp_path, label):
    """In a fresh process where `import bitsandbytes` fails: FluxPipeline.from_pretrained(out) loads, with plain
    nn.Linear layers holding exactly the dequantized weights."""
    out = tmp_path / "out"
    dequantize_checkpoint(flux_outputs[label], output=out, device="cpu")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["bitsandbytes"] = None  # any import of it raises ImportError
        import torch
        from diffusers import FluxPipeline
        from safetensors.torch import load_file
        import glob
        pipe = FluxPipeline.from_pretrained({str(out)!r}, torch_dtype=torch.bfloat16)
        for name in ("transformer", "text_encoder_2"):
            model = getattr(pipe, name)
            assert getattr(model.config, "quantization_config", None) is None, name
            assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
            files = {{}}
            for f in glob.glob(f"{str(out)}/{{name}}/*.safetensors"):
                files.update(load_file(f))
            state = model.state_dict()
            for key, value in files.items():
                assert torch.equal(state[key], value), key
        print("loaded", "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded False"


def test_components_and_copies(flux_outputs, tmp_path):
    """--components dequantizes those only; the rest of the pipeline is copied as it is (still quantized)."""
    result = dequantize_checkpoint(
        flux_outputs["nf4"], output=tmp_path / "out", components=["transformer"], device="cpu"
    )
    assert [c.name for c in result.components] == ["transformer"]
    assert "text_encoder_2" in result.copied
    copied = json.loads((tmp_path / "out" / "text_encoder_2" / "config.json").read_text())
    assert copied["quantization_config"]["quant_method"] == "bitsandbytes"
    assert "quantization_config" not in json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    # qtool.json describes the quantized checkpoint, so it is not carried over.
    assert sorted(os.listdir(tmp_path / "out")) == sorted(set(os.listdir(flux_outputs["nf4"])) - {"qtool.json"})


def test_refusals(tiny_flux, flux_outputs, tmp_path):
    with pytest.raises(QtoolError, match="is not quantized: no component"):
        dequantize_checkpoint(tiny_flux, output=tmp_path / "a", device="cpu")
    with pytest.raises(QtoolError, match="component 'vae' is not quantized"):
        dequantize_checkpoint(flux_outputs["nf4"], output=tmp_path / "b", components=["vae"], device="cpu")
    with pytest.raises(QtoolError, match="no component 'unet'"):
        dequantize_checkpoint(flux_outputs["nf4"], output=tmp_path / "c", components=["unet"], device="cpu")
    with pytest.raises(QtoolError, match="its config.json has no quantization_config"):
        dequantize_checkpoint(tiny_flux / "transformer", output=tmp_path / "d", device="cpu")
    (tmp_path / "e").mkdir()
    with pytest.raises(QtoolError, match="already exists"):
        dequantize_checkpoint(flux_outputs["nf4"], output=tmp_path / "e", device="cpu")
    with pytest.raises(QtoolError, match="--dtype must be one of"):
        dequantize_checkpoint(flux_outputs["nf4"], output=tmp_path / "f", dtype="int4", device="cpu")
    assert sorted(os.listdir(tmp_path)) == ["e"]


def test_a_foreign_quantization_is_refused(flux_outputs, tmp_path):
    """A checkpoint quantized with another method (here: its config says gguf) is named, not misread."""
    import shutil

    folder = tmp_path / "gguf"
    shutil.copytree(flux_outputs["nf4"] / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QtoolError, match="quantized with gguf; qtool dequantizes bitsandbytes checkpoints only"):
        dequantize_checkpoint(folder, output=tmp_path / "out", device="cpu")


def test_a_hub_repo_fetches_json_first_and_refuses_before_weights(
    fake_hub, tiny_flux, flux_outputs, tmp_path, monkeypatch
):
    """From a repo: the JSON files first; a plain repo is refused before any weight is downloaded; a quantized one
    then fetches model_index.json and the component folders, and writes what a local run writes."""
    monkeypatch.chdir(tmp_path)
    fake_hub.serve("acme/plain", tiny_flux)
    with pytest.raises(QtoolError, match="^acme/plain is not quantized"):  # named as the user named it
        dequantize_checkpoint("acme/plain", device="cpu")
    assert fake_hub.downloaded_patterns() == [["*.json"]]
    fake_hub.serve("acme/nf4", flux_outputs["nf4"])
    result = dequantize_checkpoint("acme/nf4", revision="v2", device="cpu")
    assert result.output == tmp_path / "nf4-dequantized"
    patterns = fake_hub.downloaded_patterns()[1:]
    assert patterns[0] == ["*.json"] and "model_index.json" in patterns[1] and "transformer/*" in patterns[1]
    local = dequantize_checkpoint(flux_outputs["nf4"], output=tmp_path / "local", device="cpu")
    for name in QUANTIZED:
        a, b = read_all(result.output / name), read_all(local.output / name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cli(flux_outputs, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["dequantize", str(flux_outputs["int8"]), "--output", str(out), "--dtype", "fp32", "--json", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["output"] == str(out) and [c["dtypes"] for c in data["components"]] == [["float32"], ["float32"]]
    again = CliRunner().invoke(app, ["dequantize", str(flux_outputs["int8"]), "--output", str(out)])
    assert again.exit_code == 1 and "already exists" in again.stderr and "--overwrite" in again.stderr
    quiet = CliRunner().invoke(app, ["dequantize", str(flux_outputs["int8"]), "-o", str(out), "--overwrite", "-q"])
    assert quiet.exit_code == 0 and quiet.stdout.strip() == str(out)


@pytest.mark.gpu
@pytest.mark.bnb
@pytest.mark.parametrize("dtype", [None, "fp32", "fp16"])
@pytest.mark.parametrize("label", ["nf4", "nf4-dq", "fp4-dq", "int8"])
def test_gpu_path_equals_bnb_cuda_dequantization(flux_outputs, tmp_path, label, dtype):
    """On a GPU (Triton kernels): every weight equals bnb CUDA's dequantization of the same bytes and the CPU path's."""
    import bitsandbytes.functional as F  # noqa: N812

    gpu = dequantize_checkpoint(flux_outputs[label], output=tmp_path / "gpu", dtype=dtype, device="cuda")
    dequantize_checkpoint(flux_outputs[label], output=tmp_path / "cpu", dtype=dtype, device="cpu")
    assert gpu.device == "cuda"
    for name in QUANTIZED:
        source, ours, cpu = (read_all(f / name) for f in (flux_outputs[label], tmp_path / "gpu", tmp_path / "cpu"))
        for key, layer in quantized_layers(source).items():
            entries = {n: source[k].cuda() for n, k in layer.entries.items()}
            target = ours[key].dtype
            if "SCB" in entries:
                expected = F.int8_vectorwise_dequant(entries["weight"], entries["SCB"]).to(target)
            else:
                state = F.QuantState.from_dict(
                    {k.removeprefix("weight."): v for k, v in entries.items() if k != "weight"},
                    device=torch.device("cuda"),
                )
                state.dtype = target
                expected = F.dequantize_4bit(entries["weight"], state)
            same(ours[key], expected.cpu(), key)
            assert_equal(ours[key], cpu[key], key)
