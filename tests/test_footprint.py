"""`qtool footprint`: predictions against the real quantized outputs, actual sizes of quantized checkpoints,
--gpu-memory, the Hub path (headers only) and the CLI.

The real sizes: the tensor bytes `qtool quantize` writes (from the output's headers) and get_memory_footprint() of the
output loaded with bitsandbytes (on the CPU, tests/bnb_loading.py). The single models (Llama tied and untied, T5,
FLUX transformer) are checked in tests/e2e/test_quantize_models.py, which loads them anyway.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from bnb_loading import load
from typer.testing import CliRunner

from helpers import FLUX_METHODS
from qtool.cli.app import app
from qtool.errors import QtoolError
from qtool.footprint import footprint, parse_size
from qtool.io.reader import scan_component
from qtool.spec import QuantSpec

LOADERS = {"transformer": "diffusers", "text_encoder_2": "transformers"}


@pytest.mark.bnb
@pytest.mark.parametrize("label", FLUX_METHODS)
def test_prediction_equals_the_real_sizes(tiny_flux, flux_outputs, label):
    """Per component, the predicted disk bytes are the written tensor bytes (to within the length of the
    double-quant offset's repr, a few bytes per layer: far inside 0.5%) and the predicted memory is exactly what
    get_memory_footprint() of the output loaded with bnb reports; the kept components are as stored."""
    spec = FLUX_METHODS[label]
    predicted = footprint(tiny_flux, spec=spec)
    assert predicted.method == label and not predicted.quantized
    assert predicted.methods == (["int8", "fp4", "fp4-dq"] if spec.quant_type == "fp4" else ["int8", "nf4", "nf4-dq"])
    for c in predicted.components:
        folder = flux_outputs[label] / c.name
        real_disk = scan_component(folder).total_bytes
        if c.role == "kept":
            assert c.stored.disk_bytes == real_disk and c.size(label) == c.stored
            continue
        size = c.after[label]
        slack = 8 * c.layers_quantized if spec.double_quant else 0
        assert abs(size.disk_bytes - real_disk) <= slack <= 0.005 * real_disk, c.name
        model = load(folder, LOADERS[c.name], c.class_name)
        assert size.memory_bytes == model.get_memory_footprint(), c.name
        assert size.memory_bytes < size.gpu_bytes <= size.disk_bytes + slack
    total = predicted.total(label)
    assert abs(total.disk_bytes - sum(scan_component(flux_outputs[label] / c.name).total_bytes
                                      for c in predicted.components)) <= 0.005 * total.disk_bytes  # fmt: skip


@pytest.mark.bnb
@pytest.mark.parametrize("label", ["nf4-dq", "int8"])
def test_a_quantized_checkpoint_shows_its_actual_sizes_and_settings(flux_outputs, label):
    """On a quantized pipeline: its settings from config.json, its tensor bytes, and get_memory_footprint() exactly."""
    actual = footprint(flux_outputs[label])
    assert actual.quantized and actual.method == label and actual.methods == []
    roles = {c.name: c.role for c in actual.components}
    assert roles == {"text_encoder": "kept", "text_encoder_2": "quantized", "transformer": "quantized", "vae": "kept"}
    for c in actual.components:
        folder = flux_outputs[label] / c.name
        assert c.stored.disk_bytes == scan_component(folder).total_bytes
        if c.role == "quantized":
            assert c.quantization["method"] == label
            assert c.quantization["quantization_config"] == FLUX_METHODS[label].quantization_config()
            model = load(folder, LOADERS[c.name], c.class_name)
            assert c.stored.memory_bytes == model.get_memory_footprint()


def test_the_quantized_checkpoint_agrees_with_the_prediction(tiny_flux, flux_outputs):
    """The actual memory of each output equals the prediction for its method; parameters are the source's."""
    for label, spec in FLUX_METHODS.items():
        predicted = {c.name: c for c in footprint(tiny_flux, spec=spec).components}
        for c in footprint(flux_outputs[label]).components:
            p = predicted[c.name]
            assert c.parameters == p.parameters, c.name
            assert c.stored.memory_bytes == p.size(label).memory_bytes, (label, c.name)
            assert (c.layers_quantized, c.layers_kept) == (p.layers_quantized, p.layers_kept)


def test_gpu_memory_fit_and_headroom(tiny_flux):
    """Each component and the total fit or not against --gpu-memory, with the headroom (negative when short)."""
    predicted = footprint(tiny_flux, gpu_memory=2_000_000).to_dict()
    by_name = {c["name"]: c for c in predicted["components"]}
    transformer = by_name["transformer"]
    assert transformer["fit"] == {"fits": True, "headroom_bytes": 2_000_000 - transformer["after"]["nf4"]["gpu_bytes"]}
    total = predicted["total"]
    assert total["fit"]["fits"] is False
    assert total["fit"]["headroom_bytes"] == 2_000_000 - total["after"]["nf4"]["gpu_bytes"] < 0
    assert total["after"]["nf4"]["gpu_bytes"] == sum(
        (c["after"] or {}).get("nf4", c["stored"])["gpu_bytes"] for c in predicted["components"]
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GB", 24 * 10**9),
        ("24 GiB", 24 * 2**30),
        ("7.5G", 7_500_000_000),
        ("16000MB", 16 * 10**9),
        ("24", 24 * 10**9),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "0", "24XB", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(QtoolError, match="memory size"):
        parse_size(text)


def test_a_hub_repo_is_read_from_json_and_headers_only(fake_hub, tiny_flux, tmp_path):
    """A repo: only *.json downloaded, headers read for every component with weights, the same result as locally."""
    fake_hub.serve("acme/flux", tiny_flux)
    remote = footprint("acme/flux", revision="v1", token="hf_" + "x" * 30)
    assert fake_hub.downloaded_patterns() == [["*.json"]]
    local = footprint(tiny_flux)
    assert remote.to_dict() | {"source": ""} == local.to_dict() | {"source": ""}
    assert all(kwargs.get("revision") == "v1" for _, _, kwargs in fake_hub.calls)


def test_refusals(tiny_flux, flux_outputs):
    with pytest.raises(QtoolError, match="no component 'unet'"):
        footprint(tiny_flux, components=["unet"])
    with pytest.raises(QtoolError, match="already quantized"):
        footprint(flux_outputs["nf4"], components=["transformer"])
    with pytest.raises(QtoolError, match="applies to pipelines"):
        footprint(tiny_flux / "transformer", components=["transformer"])
    with pytest.raises(QtoolError, match="--skip nope matches no Linear"):
        footprint(tiny_flux, spec=QuantSpec(skip=("nope",)))


def test_cli_table(tiny_flux):
    result = CliRunner().invoke(app, ["footprint", str(tiny_flux), "--double-quant", "--gpu-memory", "2MB"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("transformer", "text_encoder_2", "vae", "(kept as is)", "nf4-dq *", "fits in 2.00 MB?", "total"):
        assert text in out, text
    assert "yes," in out and "short" in out


def test_cli_json(tiny_flux):
    result = CliRunner().invoke(app, ["footprint", str(tiny_flux), "--bits", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "int8" and data["methods"] == ["int8", "nf4", "nf4-dq"]
    assert data["gpu_memory_bytes"] is None and "fit" not in data["total"]
    assert data == footprint(tiny_flux, spec=QuantSpec(bits=8)).to_dict()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu-memory", "lots"], "error: cannot read 'lots' as a memory size"),
        (["--nf4", "--fp4"], "error: --nf4 and --fp4 conflict"),
        (["--bits", "8", "--double-quant"], "error: --bits 8 and --double-quant conflict"),
        (["--components", "unet"], "error: no component 'unet' in this pipeline"),
    ],
)
def test_cli_errors(tiny_flux, args, message):
    result = CliRunner().invoke(app, ["footprint", str(tiny_flux), *args])
    assert result.exit_code == 1 and message in result.stderr, result.output


def test_footprint_writes_nothing(tiny_flux, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tiny_flux))
    assert CliRunner().invoke(app, ["footprint", str(tiny_flux)]).exit_code == 0
    assert os.listdir(tmp_path) == [] and sorted(os.listdir(tiny_flux)) == before


# Quality figures of a qtool output, from its qtool.json


def test_a_qtool_output_shows_the_figures_its_run_measured(tiny_flux_nf4):
    """footprint of a qtool output: each quantized component's quality figures as qtool.json recorded them, which
    are the run's own (the same aggregate, to its 6 recorded digits), in the table and in --json; none for the
    components kept as they are."""
    result = footprint(tiny_flux_nf4.output)
    measured = {c.name: c.quality.to_dict() for c in tiny_flux_nf4.components}
    shown = {c.name: c.quality for c in result.components}
    assert {name: q.to_dict() for name, q in shown.items() if q is not None} == measured
    assert shown["vae"] is None and shown["text_encoder"] is None and result.quality_note == ""
    data = json.loads(CliRunner().invoke(app, ["footprint", str(tiny_flux_nf4.output), "--json"]).stdout)
    assert {c["name"]: c["quality"] for c in data["components"] if c["quality"]} == measured
    assert data["quality_note"] == ""
    table = CliRunner().invoke(app, ["footprint", str(tiny_flux_nf4.output)])
    assert table.exit_code == 0, table.output
    text = table.stdout[table.stdout.index("Quality of the quantized layers (recorded in qtool.json)") :]
    for name, q in measured.items():
        (row,) = [line for line in text.splitlines() if line.startswith(f"│ {name} ")]
        for cell in (f"{q['sqnr_mean_db']:.1f} / {q['sqnr_min_db']:.1f} dB", f"{q['sqnr_db']:.1f} dB",
                     f"{q['rel_fro']:.3g}", f"{q['max_abs_err']:.3g}", f"{100 * q['extreme_share']:.2f}%"):  # fmt: skip
            assert f" {cell} │" in row, (name, cell, row)


def test_a_qtool_model_folder_shows_its_figures(tiny_flux, tmp_path):
    """One model quantized by qtool (its figures recorded under the name ""): the same figures as its run's."""
    from qtool.api import quantize_checkpoint

    run = quantize_checkpoint(
        tiny_flux / "text_encoder_2", spec=QuantSpec(bits=8), output=tmp_path / "t5", device="cpu"
    )
    (component,) = footprint(tmp_path / "t5").components
    assert component.quality.to_dict() == run.components[0].quality.to_dict()


@pytest.mark.parametrize(
    "case,note",
    [
        ("no-qtool-json", "no quality figures: not written by qtool (no qtool.json)"),
        ("older-qtool", "no quality figures: qtool.json records none (written by an older qtool)"),
        ("not-json", "no quality figures: qtool.json cannot be read (Expecting value: line 1 column 1 (char 0))"),
        ("bad-figures", "no quality figures: qtool.json cannot be read (quality figure sqnr_db is '20')"),
    ],
)
def test_a_bnb_checkpoint_without_qtool_figures_says_why(tiny_flux_nf4, tmp_path, case, note):
    """A bitsandbytes checkpoint whose qtool.json is missing (written by diffusers / transformers), holds no figures,
    or cannot be read: its sizes as before, no quality figures, and a note saying why; never a crash."""
    folder = tmp_path / "bnb"
    shutil.copytree(tiny_flux_nf4.output, folder, copy_function=os.link)
    provenance = folder / "qtool.json"
    recorded = json.loads(provenance.read_text())
    provenance.unlink()  # a hard link to the shared output's: never written through
    if case == "older-qtool":
        del recorded["quality"]
    if case == "bad-figures":
        recorded["quality"]["transformer"]["sqnr_db"] = "20"
    if case != "no-qtool-json":
        provenance.write_text("" if case == "not-json" else json.dumps(recorded))
    result = footprint(folder)
    assert result.quantized and result.quality_note == note
    assert all(c.quality is None for c in result.components)
    assert [c.stored for c in result.components] == [c.stored for c in footprint(tiny_flux_nf4.output).components]
    outcome = CliRunner().invoke(app, ["footprint", str(folder)])
    assert outcome.exit_code == 0, outcome.output
    assert note in " ".join(outcome.stdout.split()) and "Quality of the quantized layers" not in outcome.stdout
    assert json.loads(CliRunner().invoke(app, ["footprint", str(folder), "--json"]).stdout)["quality_note"] == note
