"""`qtool quantize` on the example FLUX-shaped pipeline, checked against bitsandbytes' own quantize-on-load.

For each method: the output loads in diffusers / transformers with bnb on the CPU and no quantization arguments;
its key set, dtypes and shapes equal what bnb's save_pretrained writes for the same source; tensors are equal
where the codec is exact (tests/compat.py allows the documented CPU/CUDA differences); a forward pass matches.
"""

import json
import os

import pytest
import torch
from bnb_loading import METHODS, assert_matches_bnb_files, flux_inputs, load, read_all
from typer.testing import CliRunner

from qtool.cli.app import app

pytestmark = pytest.mark.bnb

COMPONENTS = {
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
}


@pytest.fixture(scope="module", params=list(METHODS))
def quantized(request, tiny_flux, tmp_path_factory):
    args, spec = METHODS[request.param]
    out = tmp_path_factory.mktemp("out") / f"tiny-flux-{request.param}"
    # --device cpu: bnb quantizes the reference on the CPU, and the double-quant offset (a mean) differs in its last
    # bits between CPU and GPU summation order. tests/kernels/test_gpu.py compares the GPU path with bnb CUDA.
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_flux), "--output", str(out), "--quiet", "--device", "cpu", *args]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    return out, spec


def test_layout_and_configs(quantized, tiny_flux):
    out, spec = quantized
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in tiny_flux.iterdir()), "qtool.json"])
    for name in COMPONENTS:
        config = json.loads((out / name / "config.json").read_text())
        assert config["quantization_config"] == spec.quantization_config()
        source = json.loads((tiny_flux / name / "config.json").read_text())
        assert {k: v for k, v in config.items() if k != "quantization_config"} == source
    # Components that are not quantized are hard links of the source files (no extra disk).
    for path in (tiny_flux / "vae").iterdir():
        assert os.path.samefile(path, out / "vae" / path.name)
    assert not list(out.parent.glob(".*qtool-tmp*")), "temporary folder left behind"


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_matches_bnb_save_pretrained(quantized, tiny_flux, tmp_path, name):
    out, spec = quantized
    library, class_name = COMPONENTS[name]
    model = load(tiny_flux / name, library, class_name, spec)
    model.save_pretrained(tmp_path / "bnb")  # before any forward pass (cpu-testing.md §3.3)
    assert_matches_bnb_files(read_all(out / name), read_all(tmp_path / "bnb"), read_all(tiny_flux / name), spec)


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_loads_without_arguments_and_runs_like_bnb(quantized, tiny_flux, name):
    out, spec = quantized
    library, class_name = COMPONENTS[name]
    ours = load(out / name, library, class_name)  # no quantization_config: read from config.json
    theirs = load(tiny_flux / name, library, class_name, spec)
    layer = "Linear8bitLt" if spec.bits == 8 else "Linear4bit"
    assert (
        sum(type(m).__name__ == layer for m in ours.modules())
        == sum(type(m).__name__ == layer for m in theirs.modules())
        > 0
    )
    torch.manual_seed(0)
    with torch.no_grad():
        if library == "transformers":
            ids = torch.randint(0, ours.config.vocab_size, (1, 12))
            a, b = ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state
        else:
            inputs = flux_inputs(ours.config)
            a, b = ours(**inputs).sample, theirs(**inputs).sample
    assert torch.isfinite(a).all()
    # Codes differ from bnb CPU only at ties (FP4, int8) and nested-code grid snaps (double quant): a perturbation
    # of one quantization step in <2% of weights, far below the quantization error itself (SQNR ~20 dB = 10%).
    assert (a.float() - b.float()).norm() <= 0.05 * b.float().norm()
