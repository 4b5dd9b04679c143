"""`qtool quantize --max-size / --max-vram` (issue 8's size budget) end to end through the CLI, and `qtool footprint`
with a budget: on the tiny FLUX pipeline (a transformer and a T5 quantized, the rest copied) and on a tiny Llama.

With a budget between the all-4-bit and the all-8-bit sizes, the output fits it (the written tensor bytes, or the GPU
figure footprint reads back from the output), each component's config.json is the QuantSpec the choice gives it, it
loads with bnb on the CPU with exactly the chosen layers 16-bit and every other Linear the chosen bnb class, and the
error the run measured (sum over layers of elements x noise / signal, from the report) is the choice's objective and
lower than the all-4-bit run's. Refusals (out of reach, fits as it is) come before any weight is read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from bnb_loading import load
from typer.testing import CliRunner

from qtool import budget as fit
from qtool.api import quantize_checkpoint
from qtool.cli.app import app
from qtool.footprint import footprint
from qtool.io.reader import scan_component
from qtool.plan import plan_folder
from qtool.push import model_card
from qtool.spec import QuantSpec

runner = CliRunner()
# tiny_flux's tensor bytes: 3,498,979 with both components NF4, 4,489,284 with both int8, 6,587,142 as stored.
FLUX_BUDGET = 4_000_000
LOADERS = {"transformer": ("diffusers", "FluxTransformer2DModel"), "text_encoder_2": ("transformers", "T5EncoderModel")}
CLASSES = {4: "Linear4bit", 8: "Linear8bitLt"}


def cli(*args) -> tuple[int, str, str]:
    outcome = runner.invoke(app, [*map(str, args)])
    return outcome.exit_code, outcome.stdout, outcome.stderr


def tensor_bytes(folder: Path) -> int:
    """Tensor bytes of every safetensors file of an output (each component folder, or the model folder)."""
    folders = [folder] if (folder / "config.json").exists() else [p for p in folder.iterdir() if p.is_dir()]
    return sum(scan_component(f).total_bytes for f in folders if any(f.glob("*.safetensors")))


def weighted_error(layers) -> float:
    """sum of elements x noise / signal over a run's quantized layers (report dicts or LayerQuality)."""
    get = (lambda x, k: x[k]) if layers and isinstance(layers[0], dict) else getattr
    return math.fsum(get(x, "elements") * get(x, "noise") / get(x, "signal") for x in layers)


def linear_classes(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_component(out: Path, chosen: dict, kept_anyway: set[str], library: str, class_name: str) -> None:
    """config.json holds the QuantSpec of the chosen width with the chosen skip list; loaded with bnb, the chosen
    layers and those kept anyway are nn.Linear and every other Linear the chosen width's bnb class."""
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = fit.spec_for_bits(QuantSpec(), chosen["bits"], tuple(chosen["llm_int8_skip_modules"]))
    assert config == spec.quantization_config()
    read_back = QuantSpec.from_quantization_config(config)
    assert (read_back.label, read_back.skip) == (spec.label, spec.skip)
    classes = linear_classes(load(out, library, class_name))
    kept = set(chosen["kept_16bit"]) | kept_anyway
    assert kept <= set(classes)
    assert classes == {n: "Linear" if n in kept else CLASSES[chosen["bits"]] for n in classes}


@pytest.fixture(scope="module")
def flux_run(tiny_flux, tmp_path_factory):
    """tiny_flux through `qtool quantize --max-size 4MB --report --json` on the CPU: (output, --json, report)."""
    work = tmp_path_factory.mktemp("budget")
    out, report = work / "out", work / "report.json"
    code, stdout, stderr = cli("quantize", tiny_flux, "--max-size", "4MB", "--device", "cpu", "-o", out,
                               "--report", report, "--json")  # fmt: skip
    assert (code, stderr) == (0, ""), stderr
    return out, json.loads(stdout), json.loads(report.read_text())


@pytest.mark.bnb
def test_a_pipeline_budget_fits_loads_and_lowers_the_error(tiny_flux, tiny_flux_nf4, flux_run):
    """4 MB: the written tensors fit (the run's own figure, exactly); at this budget the choice mixes widths across
    components (the transformer NF4 with its worst layers 16-bit, the T5 int8), each loading as chosen; the
    measured error is the choice's objective and below the all-NF4 run's."""
    out, data, report = flux_run
    sizes = {c.name: c.after for c in footprint(tiny_flux).components if c.role == "quantize"}
    assert sum(s["nf4"].disk_bytes for s in sizes.values()) < sum(s["int8"].disk_bytes for s in sizes.values())
    used = tensor_bytes(out)
    assert used == data["budget"]["used_bytes"] <= FLUX_BUDGET
    assert used > tensor_bytes(tiny_flux_nf4.output)  # the budget buys something
    choice = {c["name"]: c for c in data["budget"]["components"]}
    assert {c["bits"] for c in choice.values()} == {4, 8}
    assert sum(len(c["kept_16bit"]) for c in choice.values()) > 0
    plans = {p.name: p for p in plan_folder(tiny_flux, QuantSpec()).components}
    for c in data["components"]:
        chosen = choice[c["name"]]
        assert c["method"] == ("nf4" if chosen["bits"] == 4 else "int8")
        assert c["layers_kept_by_budget"] == len(chosen["kept_16bit"])
        assert c["layers_quantized"] == len(plans[c["name"]].layers) - len(chosen["kept_16bit"])
        check_component(out / c["name"], chosen, set(plans[c["name"]].kept_linears), *LOADERS[c["name"]])
    # The report: each component's own method, per layer too; the objective as measured.
    layers = [x for c in report["components"] for x in c["layers"]]
    methods = {c["name"]: c["method"] for c in data["components"]}
    assert {c["name"]: c["method"] for c in report["components"]} == methods
    assert all(x["method"] == c["method"] for c in report["components"] for x in c["layers"])
    measured = weighted_error(layers)
    assert measured == pytest.approx(data["budget"]["error"], rel=1e-4)
    all_4bit = weighted_error([x for c in tiny_flux_nf4.components for x in c.layer_quality])
    assert measured < 0.8 * all_4bit
    provenance = json.loads((out / "qtool.json").read_text())
    assert provenance["methods"] == {c["name"]: c["method"] for c in data["components"]}
    assert provenance["budget"]["components"] == data["budget"]["components"]
    # A published card names both methods, and each component's settings.
    card = model_card(out, "me/tiny-flux-4mb")
    assert "- 8-bit\n- int8\n- 4-bit\n- nf4\n" in card and "(8-bit LLM.int8, 4-bit NF4)" in card
    assert '"text_encoder_2": {' in card and '"transformer": {' in card


def test_the_summary_says_what_the_budget_chose(tiny_flux, tmp_path):
    """The table: per component its method and layers kept 16-bit by the budget; the line under it, the bytes
    against the budget and that the errors were measured (one more read)."""
    code, stdout, _ = cli("quantize", tiny_flux, "--max-size", "4MB", "--device", "cpu", "-o", tmp_path / "o")
    assert code == 0
    text = " ".join(stdout.split())
    assert "-> a budget of 4.00 MB (disk)" in text and "16-bit by budget" in text
    assert "of 4.00 MB (disk), 1.99 MB of it copied as it is" in text and "one more read" in text
    summary = stdout[: stdout.index("Quality of the quantized layers")]
    rows = {line.split("│")[1].strip(): line for line in summary.splitlines() if line.startswith("│")}
    assert "│ nf4 " in rows["transformer"] and "│ int8 " in rows["text_encoder_2"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A 2-layer Llama with an untied lm_head (kept 16-bit by transformers' default skips), random bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("llama") / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.bnb
def test_a_gpu_budget_on_a_transformers_model(llama_folder, tmp_path):
    """--max-vram, with double quant and scale search, halfway between NF4-DQ's and int8's GPU figures: int8 does
    not fit, so NF4-DQ with layers kept 16-bit (lm_head stays, named in the list); the output's GPU figure as
    footprint reads it back is the run's own and within the budget; it loads as chosen; the measured error is below
    the all-NF4-DQ (searched) run's."""
    spec = QuantSpec(double_quant=True, scale_search=True)
    (predicted,) = footprint(llama_folder, spec=spec).components
    low, high = predicted.after["nf4-dq"].gpu_bytes, predicted.after["int8"].gpu_bytes
    budget = (low + high) // 2
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = ["--double-quant", "--scale-search", "--device", "cpu", "-o", out, "--json", "--report", report]
    code, stdout, stderr = cli("quantize", llama_folder, "--max-vram", f"{budget}B", *args)
    assert (code, stderr) == (0, ""), stderr
    data = json.loads(stdout)
    (chosen,) = data["budget"]["components"]
    assert (data["budget"]["measure"], chosen["bits"], data["components"][0]["method"]) == ("gpu", 4, "nf4-dq")
    assert chosen["kept_16bit"] and chosen["llm_int8_skip_modules"][0] == "lm_head"
    (written,) = footprint(out).components
    assert written.stored.gpu_bytes == data["budget"]["used_bytes"] <= budget
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == fit.spec_for_bits(spec, 4, tuple(chosen["llm_int8_skip_modules"])).quantization_config()
    classes = linear_classes(load(out, "transformers", "LlamaForCausalLM"))
    kept = set(chosen["kept_16bit"]) | {"lm_head"}
    assert classes == {n: "Linear" if n in kept else "Linear4bit" for n in classes}
    plain = quantize_checkpoint(llama_folder, spec=spec, output=tmp_path / "all", device="cpu")
    measured = weighted_error(json.loads(report.read_text())["components"][0]["layers"])
    assert measured == pytest.approx(chosen["error"], rel=1e-4)
    assert measured < 0.9 * weighted_error(plain.components[0].layer_quality)


def test_a_component_the_budget_keeps_whole_is_copied_as_it_is(tiny_flux, tmp_path, monkeypatch):
    """With the T5's measured errors made huge, 3.95 MB keeps it whole: it is copied as it is (hard links, no
    quantization_config), shown as "as stored", and the transformer alone is quantized."""
    measure = fit.measure_errors

    def t5_worse(plan, *args, **kwargs):
        errors = measure(plan, *args, **kwargs)
        scale = 1000 if plan.name == "text_encoder_2" else 1
        return {f: {b: e * scale for b, e in by_bits.items()} for f, by_bits in errors.items()}

    monkeypatch.setattr(fit, "measure_errors", t5_worse)
    out = tmp_path / "out"
    result = quantize_checkpoint(tiny_flux, output=out, device="cpu", budget=fit.Budget(3_950_000))
    t5 = {c.name: c for c in result.components}["text_encoder_2"]
    assert t5.unquantized and result.spec_of(t5) is None and t5.bytes_after == t5.bytes_before
    assert "quantization_config" not in json.loads((out / "text_encoder_2" / "config.json").read_text())
    for path in (tiny_flux / "text_encoder_2").iterdir():
        assert os.path.samefile(path, out / "text_encoder_2" / path.name)
    assert result.to_dict()["components"][1]["method"] is None
    assert tensor_bytes(out) == result.budget_used <= 3_950_000


def no_weight_read(monkeypatch) -> None:
    """Make any measurement or quantization fail: a refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(fit, "measure_errors", refuse)
    monkeypatch.setattr("qtool.api._quantize_component", refuse)


def test_a_budget_out_of_reach_is_refused_before_any_read(tiny_flux, tmp_path, monkeypatch):
    """3 MB is below everything at NF4: one error line with the smallest size, exit 1, nothing read or written;
    with --bits 8 the hint says to allow 4-bit."""
    no_weight_read(monkeypatch)
    code, stdout, stderr = cli("quantize", tiny_flux, "--max-size", "3MB", "-o", tmp_path / "o")
    assert (code, stdout) == (1, "")
    assert stderr.startswith("error: the budget of 3.00 MB (disk) is out of reach: the smallest size is 3.50 MB")
    assert os.listdir(tmp_path) == []
    code, _, stderr = cli("quantize", tiny_flux, "--max-size", "4MB", "--bits", "8", "-o", tmp_path / "o")
    assert code == 1 and "smallest size is 4.49 MB" in stderr
    assert stderr.endswith("hint: allow 4-bit too (drop --bits 8), or raise the budget\n")


def test_a_checkpoint_that_fits_as_it_is_is_refused(tiny_flux, tmp_path, monkeypatch):
    """7 MB holds all 6.59 MB as stored: nothing to do, said as an error (exit 1) before any read."""
    no_weight_read(monkeypatch)
    code, stdout, stderr = cli("quantize", tiny_flux, "--max-vram", "7MB", "-o", tmp_path / "o")
    assert (code, stdout) == (1, "")
    assert stderr == (
        "error: it already fits as it is: 6.59 MB (gpu) unquantized, within the budget of 7.00 MB; nothing needs "
        "quantizing\nhint: drop the budget to quantize anyway, or give a smaller one\n"
    )
    assert os.listdir(tmp_path) == []


def test_a_dry_run_estimates_from_nominal_errors(tiny_flux, tmp_path, monkeypatch):
    """--dry-run with a budget: no weight read, nothing written; the plan is labelled an estimate, its JSON says
    "nominal", and it is what `footprint --max-size` shows for the same budget."""
    monkeypatch.chdir(tmp_path)
    no_weight_read(monkeypatch)
    code, stdout, _ = cli("quantize", tiny_flux, "--max-size", "4MB", "--dry-run")
    assert code == 0
    text = " ".join(stdout.split())
    assert "Plan " in text and "estimate: ~" in text and "nominal errors" in text and "~1.44 MB" in text
    code, stdout, _ = cli("quantize", tiny_flux, "--max-size", "4MB", "--dry-run", "--json")
    planned = json.loads(stdout)
    assert (planned["budget"]["errors"], planned["budget"]["used_bytes"]) == ("nominal", None)
    assert planned["budget"]["bytes"] <= FLUX_BUDGET
    assert [c["bytes_after"] for c in planned["components"]] == [c["bytes"] for c in planned["budget"]["components"]]
    code, stdout, _ = cli("footprint", tiny_flux, "--max-size", "4MB", "--json")
    shown = json.loads(stdout)["budget"]
    assert shown["choice"]["components"] == planned["budget"]["components"]
    assert os.listdir(tmp_path) == []


def test_footprint_shows_what_a_budget_would_choose(tiny_flux, tiny_flux_nf4):
    """footprint --max-size: a table per component (method, layers quantized / kept 16-bit, bytes), the others
    and the total, said to be nominal; --json has the Choice; a budget that holds everything says it fits as it
    is; a quantized checkpoint is refused."""
    code, stdout, _ = cli("footprint", tiny_flux, "--max-size", "4MB")
    assert code == 0
    text = " ".join(stdout.split())
    assert "What a budget of 4.00 MB (disk) would choose (estimate)" in text and "nominal" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in stdout.splitlines() if line.startswith("│")}  # fmt: skip
    data = json.loads(cli("footprint", tiny_flux, "--max-size", "4MB", "--json")[1])["budget"]
    assert (data["measure"], data["budget_bytes"], data["errors"], data["fits_as_is"]) == (
        "disk", FLUX_BUDGET, "nominal", False,
    )  # fmt: skip
    for c in data["choice"]["components"]:
        method = data["methods"][c["name"]]
        assert method == {4: "nf4", 8: "int8"}[c["bits"]]
        assert rows[c["name"]][0] == method and rows[c["name"]][1].endswith(f"/ {len(c['kept_16bit'])}")
    assert rows["the others"][-1] == "1.99 MB" and data["choice"]["other_bytes"] == 1_990_918
    assert data["choice"]["bytes"] <= FLUX_BUDGET
    code, stdout, _ = cli("footprint", tiny_flux, "--max-size", "7MB")
    assert code == 0 and "budget: it already fits as it is: 6.59 MB (disk)" in " ".join(stdout.split())
    data = json.loads(cli("footprint", tiny_flux, "--max-size", "7MB", "--json")[1])["budget"]
    assert (data["fits_as_is"], data["choice"]) == (True, None)
    code, _, stderr = cli("footprint", tiny_flux_nf4.output, "--max-size", "4MB")
    assert code == 1 and "a budget applies to a checkpoint not yet quantized" in stderr


def test_a_weightless_copy_counts_nothing_and_a_pickled_one_is_refused(tiny_flux, tmp_path):
    """Folders copied as they are count their safetensors tensors (the VAE's, CLIP's), not tokenizers; one holding
    only pickled weights cannot be counted, so a budget refuses it."""
    source = tmp_path / "src"
    shutil.copytree(tiny_flux, source, copy_function=os.link)
    (source / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (source / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    code, _, stderr = cli("footprint", source, "--max-size", "4MB")
    assert code == 1 and "those of vae cannot be counted" in stderr


def test_a_repo_is_budgeted_from_its_headers_before_any_download(fake_hub, tiny_flux, tmp_path, monkeypatch):
    """On a Hub repo: a dry run with a budget reads JSON files and headers only (the VAE's and CLIP's too, which
    count against it) and chooses as for the local folder; a budget out of reach is refused before the weights are
    downloaded."""
    from qtool.errors import QtoolError

    monkeypatch.chdir(tmp_path)
    fake_hub.serve("acme/tiny-flux", tiny_flux)
    remote = quantize_checkpoint("acme/tiny-flux", dry_run=True, device="cpu", budget=fit.Budget(FLUX_BUDGET))
    local = quantize_checkpoint(tiny_flux, dry_run=True, device="cpu", budget=fit.Budget(FLUX_BUDGET))
    assert remote.choice == local.choice and remote.choice.other_bytes == 1_990_918
    assert fake_hub.downloaded_patterns() == [["*.json"]]
    with pytest.raises(QtoolError, match="out of reach"):
        quantize_checkpoint("acme/tiny-flux", device="cpu", budget=fit.Budget(3_000_000))
    assert all(patterns == ["*.json"] for patterns in fake_hub.downloaded_patterns())
    assert os.listdir(tmp_path) == []
