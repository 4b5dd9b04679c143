"""`qtool quantize`: option parsing and errors with the API patched at the CLI boundary, then every flag and every
error message end to end on the tiny FLUX-shaped pipeline, through CliRunner and the installed script."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import typer
from huggingface_hub import constants
from typer.testing import CliRunner

import qtool.quantize
from qtool.api import ComponentResult, QuantizeResult
from qtool.cli.app import app
from qtool.errors import QtoolError
from qtool.io.reader import scan_component
from qtool.quality import LayerQuality
from qtool.spec import QuantSpec

runner = CliRunner()


def fake_layer(key: str, sqnr_db: float, extreme: int = 40) -> LayerQuality:
    """A 64 x 64 layer of the given SQNR (signal 4096, noise from the SQNR) and ``extreme`` weights on extreme codes."""
    return LayerQuality(key, (64, 64), "nf4", 4096, extreme, 4096.0, 4096.0 / 10 ** (sqnr_db / 10), 0.0125)


FAKE_LAYERS = [fake_layer("blocks.0.attn.to_q.weight", 20.9), fake_layer("blocks.0.attn.to_k.weight", 20.1, 80),
               fake_layer("blocks.1.ff.net.0.proj.weight", 21.3), fake_layer("proj_out.weight", 20.5)]  # fmt: skip


def fake_result(spec: QuantSpec | None = None, dry_run: bool = False):
    layers = [] if dry_run else FAKE_LAYERS
    component = ComponentResult("transformer", "FluxTransformer2DModel", 12_000_000, 50, 0, 24_000_000, 6_800_000,
                                1.5, layers, ["diffusion_pytorch_model.safetensors"])  # fmt: skip
    return QuantizeResult(output="/tmp/out", source="src", spec=spec or QuantSpec(), kind="pipeline",
                          components=[component], copied=["vae"], dry_run=dry_run, seconds=2.0,
                          peak_rss_bytes=10**9, device="cpu")  # fmt: skip


def invoke(*args, result=None):
    with mock.patch("qtool.api.quantize_checkpoint", return_value=result or fake_result()) as api:
        outcome = runner.invoke(app, ["quantize", *args])
    return outcome, api


def test_defaults_are_nf4_bf16_and_auto_device():
    """No options: NF4, bf16 compute, automatic device, nothing else passed to the API."""
    outcome, api = invoke("some/repo")
    assert outcome.exit_code == 0, outcome.output
    (source,), kwargs = api.call_args
    assert source == "some/repo"
    assert kwargs["spec"] == QuantSpec()
    assert kwargs["spec"].quantization_config()["bnb_4bit_compute_dtype"] == "bfloat16"
    assert kwargs | {"spec": None, "progress": None} == {
        "spec": None, "components": None, "output": None, "revision": None, "token": None, "device": None,
        "dry_run": False, "overwrite": False, "allow_nonfinite": False, "report": None, "budget": None,
        "progress": None,
    }  # fmt: skip


def test_every_flag_reaches_the_api():
    """Every flag reaches quantize_checkpoint as the matching QuantSpec field or argument."""
    outcome, api = invoke(
        "./flux", "--bits", "4", "--fp4", "--double-quant", "--blocksize", "128", "--compute-dtype", "fp16",
        "--components", "transformer, text_encoder_2", "--skip", "proj_out", "--skip", "x_embedder",
        "--threshold", "5.5", "--output", "out", "--revision", "v1", "--token", "hf_x", "--device", "cpu",
        "--dry-run", "--overwrite", "--allow-nonfinite", "--report", "q.json",
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    kwargs = api.call_args.kwargs
    assert kwargs["spec"] == QuantSpec(4, "fp4", True, 128, "fp16", ("proj_out", "x_embedder"), 5.5)
    assert kwargs["components"] == ["transformer", "text_encoder_2"]
    assert (kwargs["output"], kwargs["revision"], kwargs["token"], kwargs["device"]) == ("out", "v1", "hf_x", "cpu")
    assert kwargs["dry_run"] and kwargs["overwrite"] and kwargs["allow_nonfinite"] and kwargs["report"] == "q.json"


def test_a_budget_reaches_the_api():
    """--max-size is a disk budget, --max-vram a GPU one (sizes as footprint's --gpu-memory reads them); without
    --bits the budget may use both widths, with it only that one; the 4-bit flags stay the spec's."""
    from qtool.budget import Budget

    outcome, api = invoke("src", "--max-size", "7GB", "--double-quant", "--scale-search")
    assert outcome.exit_code == 0, outcome.output
    kwargs = api.call_args.kwargs
    assert kwargs["budget"] == Budget(7 * 10**9, "disk", (4, 8))
    assert kwargs["spec"] == QuantSpec(double_quant=True, scale_search=True)
    outcome, api = invoke("src", "--max-vram", "6.5GiB", "--bits", "8")
    assert outcome.exit_code == 0, outcome.output
    assert api.call_args.kwargs["budget"] == Budget(int(6.5 * 2**30), "gpu", (8,))
    assert api.call_args.kwargs["spec"] == QuantSpec(bits=8)
    outcome, api = invoke("src", "--max-size", "500MB", "--bits", "4", "--fp4")
    assert api.call_args.kwargs["budget"] == Budget(500 * 10**6, "disk", (4,))
    assert api.call_args.kwargs["spec"] == QuantSpec(quant_type="fp4")


def cells(stdout: str, first: str, after: str = "") -> list[str]:
    """The cells of the first table row of ``stdout`` (after the text ``after``) whose first cell is ``first``."""
    for line in stdout[stdout.index(after) :].splitlines():
        row = [cell.strip() for cell in line.strip("│ ").split("│")]
        if row[0] == first:
            return row
    raise AssertionError(f"no row {first!r} in:\n{stdout}")


def test_summary_table_and_json_and_quiet():
    """The table, --json and --quiet render a result as documented: the quality table gives the component's figures
    (SQNR mean / min of the layers, of the component as one tensor, relative Frobenius error, largest error, share
    on extreme codes: 200 of 4 x 4096) and the three lowest-SQNR layers, lowest first."""
    outcome, _ = invoke("src")
    out = outcome.stdout
    assert "FluxTransformer2DModel" in out and "copied as they are: vae" in out
    assert "Quality of the quantized layers" in out
    quality = cells(out, "transformer", after="Quality of the quantized layers")
    assert quality[1:] == ["4", "20.7 / 20.1 dB", "20.7 dB", "0.0925", "0.0125", "1.22%"]
    worst = [line.strip("│ ").split("│") for line in out.splitlines() if "transformer/" in line]
    assert [[cell.strip() for cell in row[:2]] for row in worst] == [
        ["transformer/blocks.0.attn.to_k", "20.1 dB"],
        ["transformer/proj_out", "20.5 dB"],
        ["transformer/blocks.0.attn.to_q", "20.9 dB"],
    ]
    assert cells(out, "transformer/blocks.0.attn.to_k")[2:] == ["0.0125", "1.95%"]
    outcome, _ = invoke("src", "--json")
    data = json.loads(outcome.stdout)
    assert data["components"][0]["bytes_after"] == 6_800_000 and data["method"] == "nf4"
    assert data["components"][0]["quality"] == {
        "layers": 4, "layers_nonfinite": 0, "sqnr_mean_db": 20.7, "sqnr_min_db": 20.1, "sqnr_db": 20.677,
        "rel_fro": 0.0925017, "max_abs_err": 0.0125, "extreme_share": 0.012207,
    }  # fmt: skip
    outcome, _ = invoke("src", "--quiet")
    assert outcome.stdout == "/tmp/out\n"


def test_dry_run_says_nothing_was_written():
    """A dry run's table ends with the note that nothing was downloaded or written."""
    outcome, _ = invoke("src", "--dry-run", result=fake_result(dry_run=True))
    assert "dry run: nothing was downloaded or written" in outcome.stdout


def error_text(message: str, hint: str | None = None) -> str:
    """What the CLI prints on stderr for a QtoolError, exactly."""
    return f"error: {message}\n" + (f"hint: {hint}\n" if hint else "")


FOUR_BIT_ONLY = "is a 4-bit option; drop it or use --bits 4"
THRESHOLD_HINT = "LLM.int8's default is 6.0"


CONFLICTS = [
    (["--nf4", "--fp4"], "--nf4 and --fp4 conflict", "choose one 4-bit code type (default: --nf4)"),
    (["--bits", "8", "--double-quant"], "--bits 8 and --double-quant conflict", f"--double-quant {FOUR_BIT_ONLY}"),
    (["--bits", "8", "--fp4"], "--bits 8 and --fp4 conflict", f"--fp4 {FOUR_BIT_ONLY}"),
    (["--bits", "8", "--nf4"], "--bits 8 and --nf4 conflict", f"--nf4 {FOUR_BIT_ONLY}"),
    (["--json", "--quiet"], "--json and --quiet conflict", "--json prints one JSON object; --quiet only the path"),
    (["--bits", "3"], "--bits must be 4 or 8, got 3", None),
    (["--blocksize", "100"], "--blocksize must be a power of two from 32 to 4096, got 100", None),
    (["--bits", "8", "--blocksize", "128"], "--nf4/--fp4, --double-quant and --blocksize apply to 4-bit only",
     "drop them with --bits 8 (LLM.int8 is row-wise, with no blocks or code table)"),
    (["--threshold", "nan"], "--threshold must be a finite number >= 0, got nan", THRESHOLD_HINT),
    (["--threshold", "inf"], "--threshold must be a finite number >= 0, got inf", THRESHOLD_HINT),
    (["--threshold", "-1"], "--threshold must be a finite number >= 0, got -1.0", THRESHOLD_HINT),
    (["--max-size", "7GB", "--max-vram", "7GB"], "--max-size and --max-vram conflict",
     "give one budget: disk (--max-size) or GPU memory"),
    (["--max-size", "lots"], "cannot read 'lots' as a memory size",
     "write it like 24GB, 24GiB, 7.5GB or 16000MB (GB = 10^9 bytes)"),
    (["--max-vram", "0GB"], "cannot read '0GB' as a memory size",
     "write it like 24GB, 24GiB, 7.5GB or 16000MB (GB = 10^9 bytes)"),
    (["--max-size", "7GB", "--bits", "8", "--double-quant"], "--bits 8 and --double-quant conflict",
     f"--double-quant {FOUR_BIT_ONLY}"),
]  # fmt: skip


@pytest.mark.parametrize("args,message,hint", CONFLICTS, ids=[" ".join(args) for args, _, _ in CONFLICTS])
def test_conflicts_fail_with_one_line(args, message, hint):
    """Conflicting or invalid options: exit 1, the exact error (and hint) on stderr, nothing on stdout, no API call."""
    outcome, api = invoke("src", *args)
    assert (outcome.exit_code, outcome.stdout, outcome.stderr) == (1, "", error_text(message, hint))
    api.assert_not_called()


def test_api_errors_print_message_and_hint_but_never_the_token():
    """An API error prints its message and hint on stderr, and never the --token."""
    error = QtoolError("repository x/y not found", hint="pass --token")
    with mock.patch("qtool.api.quantize_checkpoint", side_effect=error):
        outcome = runner.invoke(app, ["quantize", "x/y", "--token", "hf_SECRET123"])
    assert outcome.exit_code == 1
    assert outcome.stderr == "error: repository x/y not found\nhint: pass --token\n"
    assert "hf_SECRET123" not in outcome.output


def test_invalid_choice_is_a_usage_error():
    """A value outside an option's choices is a usage error (exit 2)."""
    outcome, _ = invoke("src", "--device", "tpu")
    assert outcome.exit_code == 2


def test_help_says_what_the_report_holds():
    """--report's help names each figure the report gives."""
    outcome = runner.invoke(app, ["quantize", "--help"])
    text = " ".join(outcome.stdout.split())
    for figure in ("--report", "SQNR in dB", "relative Frobenius error", "largest absolute error", "extreme code"):
        assert figure in text, figure


def test_help_states_defaults_and_examples():
    """--help shows every default and the examples."""
    outcome = runner.invoke(app, ["quantize", "--help"])
    assert outcome.exit_code == 0
    text = " ".join(outcome.stdout.split())
    for shown in ("Default: 4;", "[default: 64]", "[default: bf16]", "[default: 6.0]", "transformer,text_encoder_2",
                  "qtool quantize black-forest-labs/FLUX.1-dev --bits 4 --nf4 --double-quant"):  # fmt: skip
        assert shown in text, shown


# End to end: the real API on tiny_flux (tests/conftest.py), every flag and every error the command prints.

REPO = "acme/tiny-flux"
TOKEN = "hf_QtoolCliTestToken0123456789abcdefXYZ"
COMPONENTS = "scheduler, text_encoder, text_encoder_2, tokenizer, tokenizer_2, transformer, vae"
QUANTIZED = ("transformer", "text_encoder_2")
TO_Q = "transformer_blocks.0.attn.to_q.weight"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working directory (where default outputs go), tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def quantize(*args):
    return runner.invoke(app, ["quantize", *map(str, args)])


def succeeded(outcome) -> str:
    """Assert a clean success (exit 0, nothing on stderr); return stdout."""
    assert (outcome.exit_code, outcome.stderr) == (0, ""), outcome.output
    return outcome.stdout


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text()).get("quantization_config")


def headers(folder: Path) -> dict:
    """A component's output tensors: key -> (safetensors dtype, shape)."""
    return {k: (t.dtype, tuple(t.shape)) for k, t in scan_component(folder).tensors.items()}


def test_bits_8_threshold_device_cpu_and_json(tiny_flux, work):
    """--bits 8 --threshold --device cpu --json --output: int8 tensors, the threshold in configs, JSON of the files."""
    out = work / "int8"
    stdout = succeeded(
        quantize(tiny_flux, "--bits", "8", "--threshold", "4.5", "--device", "cpu", "--json", "--output", out)
    )
    data = json.loads(stdout)
    assert (data["output"], data["method"], data["device"], data["dry_run"]) == (str(out), "int8", "cpu", False)
    expected = QuantSpec(bits=8, threshold=4.5).quantization_config()
    assert data["quantization_config"] == expected
    assert expected["load_in_8bit"] and expected["llm_int8_threshold"] == 4.5
    for component in data["components"]:
        folder = out / component["name"]
        assert quantization_config(folder) == expected
        assert component["bytes_after"] == sum(t.nbytes for t in scan_component(folder).tensors.values())
    tensors = headers(out / "transformer")
    rows, cols = headers(tiny_flux / "transformer")[TO_Q][1]
    assert tensors[TO_Q] == ("I8", (rows, cols))
    assert tensors[TO_Q.replace(".weight", ".SCB")] == ("F32", (rows,))


def test_report_holds_the_figures_the_summary_shows(tiny_flux, work):
    """--report FILE: the JSON report at FILE, not inside the output; the summary shows the same figures, each
    component's row and its three lowest-SQNR layers; --json the same component figures."""
    out, report = work / "out", work / "quality.json"
    stdout = succeeded(quantize(tiny_flux, "--bits", "8", "--device", "cpu", "-o", out, "--report", report))
    data = json.loads(report.read_text())
    assert data["method"] == "int8" and "quality.json" not in os.listdir(out)
    assert [c["name"] for c in data["components"]] == list(QUANTIZED)
    for c in data["components"]:
        q = c["quality"]
        assert 40 < q["sqnr_min_db"] <= q["sqnr_mean_db"] < 50 and 0 < q["extreme_share"] < 0.05
        assert cells(stdout, c["name"], after="Quality of the quantized layers")[1:] == [
            str(q["layers"]), f"{q['sqnr_mean_db']:.1f} / {q['sqnr_min_db']:.1f} dB", f"{q['sqnr_db']:.1f} dB",
            f"{q['rel_fro']:.3g}", f"{q['max_abs_err']:.3g}", f"{100 * q['extreme_share']:.2f}%",
        ]  # fmt: skip
        lowest = sorted(c["layers"], key=lambda layer: layer["sqnr_db"])[:3]
        names = [f"{c['name']}/{layer['key'].removesuffix('.weight')}" for layer in lowest]
        shown = [line.strip("│ ").split("│")[0].strip() for line in stdout.splitlines() if f"│ {c['name']}/" in line]
        assert shown == names
        assert [cells(stdout, name)[1] for name in names] == [f"{layer['sqnr_db']:.1f} dB" for layer in lowest]
    as_json = json.loads(succeeded(quantize(tiny_flux, "--bits", "8", "--device", "cpu", "-o", work / "j", "--json")))
    assert [c["quality"] for c in as_json["components"]] == [c["quality"] for c in data["components"]]


def test_nf4_double_quant_blocksize_compute_dtype_skip_and_quiet(tiny_flux, work):
    """--nf4 --double-quant --blocksize --compute-dtype --skip -q -o: recorded, applied, and only the path printed."""
    out = work / "nf4"
    args = ["--nf4", "--double-quant", "--blocksize", "128", "--compute-dtype", "fp16", "--skip", "proj_out",
            "--skip", "context_embedder", "-q", "-o", out]  # fmt: skip
    assert succeeded(quantize(tiny_flux, *args)) == f"{out}\n"
    config = quantization_config(out / "transformer")
    assert (config["bnb_4bit_compute_dtype"], config["bnb_4bit_use_double_quant"]) == ("float16", True)
    assert config["llm_int8_skip_modules"] == ["proj_out", "context_embedder"]
    assert config == QuantSpec(4, "nf4", True, 128, "fp16", ("proj_out", "context_embedder")).quantization_config()
    source, tensors = headers(tiny_flux / "transformer"), headers(out / "transformer")
    rows, cols = source[TO_Q][1]
    assert tensors[TO_Q + ".absmax"] == ("U8", (rows * cols // 128,))
    assert TO_Q + ".quant_state.bitsandbytes__nf4" in tensors
    for kept in ("proj_out.weight", "context_embedder.weight"):
        assert tensors[kept] == source[kept] == ("BF16", source[kept][1])


def test_fp4_components_and_summary_table(tiny_flux, work):
    """--fp4 --components transformer: only the transformer is quantized, and the table says what was done."""
    out = work / "fp4"
    stdout = succeeded(quantize(tiny_flux, "--fp4", "--components", "transformer", "--device", "cpu", "-o", out))
    assert f"Quantized {tiny_flux} -> fp4" in stdout and "FluxTransformer2DModel" in stdout
    assert "T5EncoderModel" not in stdout and " dB" in stdout
    assert f"copied as they are: model_index.json, {COMPONENTS.replace('transformer, ', '')}" in stdout
    assert f"wrote {out} in " in stdout
    assert quantization_config(out / "transformer")["bnb_4bit_quant_type"] == "fp4"
    assert TO_Q + ".quant_state.bitsandbytes__fp4" in headers(out / "transformer")
    assert quantization_config(out / "text_encoder_2") is None
    for path in (tiny_flux / "text_encoder_2").iterdir():
        assert os.path.samefile(path, out / "text_encoder_2" / path.name)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_flux, work):
    """--dry-run: a plan table with estimated sizes and the note that nothing was written; nothing is."""
    stdout = succeeded(quantize(tiny_flux, "--dry-run"))
    assert f"Plan {tiny_flux} -> nf4" in stdout and "~" in stdout and "T5EncoderModel" in stdout
    assert stdout.rstrip().endswith("dry run: nothing was downloaded or written")
    assert os.listdir(work) == []


def test_an_existing_output_needs_overwrite(tiny_flux, work):
    """A second run to the same output fails with a hint and changes nothing; --overwrite replaces it."""
    out = work / "out"
    succeeded(quantize(tiny_flux, "-q", "-o", out))
    (out / "stale.txt").write_text("from before")
    outcome = quantize(tiny_flux, "-q", "-o", out)
    assert (outcome.exit_code, outcome.stdout) == (1, "")
    assert outcome.stderr == error_text(f"{out} already exists", "pass --overwrite to replace it, or choose --output")
    assert (out / "stale.txt").exists()
    assert succeeded(quantize(tiny_flux, "-q", "-o", out, "--overwrite")) == f"{out}\n"
    assert not (out / "stale.txt").exists() and (out / "transformer" / "config.json").exists()
    assert os.listdir(work) == ["out"]


def test_revision_and_token_reach_the_hub_and_are_never_printed(fake_hub, tiny_flux, work):
    """--revision and --token go to every Hub call, in a dry run, a run and a refusal; the token is never printed."""
    fake_hub.serve(REPO, tiny_flux)
    hub_args = ["--revision", "v1.0", "--token", TOKEN]
    data = json.loads(succeeded(quantize(REPO, *hub_args, "--dry-run", "--json")))
    assert (data["source"], data["dry_run"], [c["name"] for c in data["components"]]) == (REPO, True, list(QUANTIZED))
    assert succeeded(quantize(REPO, *hub_args, "--quiet")) == f"{work / 'tiny-flux-nf4'}\n"
    outcome = quantize(REPO, *hub_args, "--components", "unet", "-o", work / "other")
    assert (outcome.exit_code, outcome.stdout) == (1, "")
    assert outcome.stderr == error_text("no component 'unet' in this pipeline", f"it has: {COMPONENTS}")
    assert len(fake_hub.calls) > 5
    for name, _, kwargs in fake_hub.calls:
        assert (kwargs["revision"], kwargs["token"]) == ("v1.0", TOKEN), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(tiny_flux, work):
    """--device cuda without CUDA: the error and the way out, nothing written."""
    outcome = quantize(tiny_flux, "--device", "cuda")
    assert (outcome.exit_code, outcome.stdout) == (1, "")
    assert outcome.stderr == error_text("--device cuda, but PyTorch sees no CUDA GPU", "use --device cpu (slower)")
    assert os.listdir(work) == []


def error_cases(tiny_flux: Path, quantized: Path, work: Path) -> dict:
    """id -> (arguments, message, hint, set-up(monkeypatch) or None): every QtoolError of a valid command line."""
    t5, empty, out = work / "t5", work / "empty", work / "out"

    def disk_full(monkeypatch):
        monkeypatch.setattr("qtool.io.writer.ShardedWriter.add_group", mock.Mock(side_effect=OSError(28, "full")))

    return {
        "overlap": ([t5, "-o", t5 / "q"], f"the output {t5 / 'q'} overlaps the input {t5.resolve()}",
                    "choose an output folder elsewhere", lambda mp: shutil.copytree(tiny_flux / "text_encoder_2", t5)),
        "parent-missing": ([tiny_flux, "-o", work / "no" / "out"],
                           f"the output's parent folder {(work / 'no').resolve()} does not exist",
                           "create it first, or choose another --output", None),
        # /proc refuses new folders even to root, who passes every permission check.
        "read-only-parent": ([tiny_flux, "-o", "/proc/out"], "cannot write to /proc (No such file or directory)",
                             "choose an --output in a folder you can write to", None),
        "not-a-checkpoint": ([empty, "-o", out],
                             f"{empty.resolve()} has neither model_index.json (a diffusers pipeline) nor config.json "
                             "(a model)", "point qtool at a folder written by save_pretrained, or at a Hub repo id",
                             lambda mp: empty.mkdir()),
        "already-quantized": ([quantized, "-o", out],
                              f"{(quantized / 'transformer').resolve()} is already quantized (bitsandbytes)",
                              "point qtool at the original (unquantized) checkpoint", None),
        "skip-matches-nothing": ([tiny_flux, "--skip", "to_qq", "-o", out],
                                 "--skip to_qq matches no Linear layer of transformer, text_encoder_2",
                                 "name a module as the model names it, e.g. time_text_embed.timestep_embedder."
                                 "linear_1 (a module keeps every Linear inside it)", None),
        "missing-component": ([tiny_flux, "--components", "transformer,unet", "-o", out],
                              "no component 'unet' in this pipeline", f"it has: {COMPONENTS}", None),
        "components-on-a-model": ([tiny_flux / "text_encoder_2", "--components", "transformer", "-o", out],
                                  "--components applies to pipelines (folders with model_index.json); this is one "
                                  "model", None, None),
        "no-such-folder": (["./missing"], "no such folder: ./missing",
                           "check the path; a Hub repo id is `name` or `owner/name`", None),
        "a-file": (["./w.safetensors"], "./w.safetensors is a file, not a folder",
                   "pass the folder that holds the checkpoint (with its config.json or model_index.json)",
                   lambda mp: (work / "w.safetensors").write_bytes(b"x")),
        "not-a-repo-id": (["not a repo"], "'not a repo' is neither a local folder nor a Hugging Face repo id",
                          "pass a folder, or a repo id such as black-forest-labs/FLUX.1-dev", None),
        "hub-unreachable": (["acme/not-cached", "--token", TOKEN],
                            f"cannot reach the Hugging Face Hub for {constants.ENDPOINT}/acme/not-cached "
                            "(HF_HUB_OFFLINE is set)",
                            "check the network connection, or unset HF_HUB_OFFLINE, or pass a local folder", None),
        "disk-full": ([tiny_flux, "-o", out], f"no space left on the device while writing {out}",
                      "free some space, or choose an --output on a larger disk", disk_full),
        "report-is-a-folder": ([tiny_flux, "-o", out, "--report", work], f"the report {work} is a folder",
                               "give --report a file name, e.g. quality.json", None),
        "report-in-a-dry-run": ([tiny_flux, "--dry-run", "--report", work / "q.json"],
                                "--report and --dry-run conflict", "a dry run quantizes nothing to report on", None),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(error_cases(Path("s"), Path("q"), Path("w"))))
def test_every_error_is_one_message_on_stderr(tiny_flux, tiny_flux_nf4, work, monkeypatch, case):
    """Each error: exit 1, only `error: ...` (and `hint: ...`) on stderr, empty stdout, nothing left behind."""
    args, message, hint, setup = error_cases(tiny_flux, tiny_flux_nf4.output, work)[case]
    if setup is not None:
        setup(monkeypatch)
    before = sorted(os.listdir(work))
    outcome = quantize(*args)
    assert (outcome.exit_code, outcome.stdout) == (1, ""), outcome.output
    assert outcome.stderr == error_text(message, hint)
    assert sorted(os.listdir(work)) == before


def test_hints_name_only_existing_commands(tiny_flux_nf4, work):
    """A hint never sends the user to a `qtool` command that does not exist."""
    outcome = quantize(tiny_flux_nf4.output, "-o", work / "out")
    assert outcome.exit_code == 1 and outcome.stderr.startswith("error: ")
    commands = set(typer.main.get_command(app).commands)
    assert set(re.findall(r"`qtool ([\w-]+)", outcome.stderr)) <= commands, outcome.stderr


def test_ctrl_c_says_nothing_was_written(tiny_flux, work, monkeypatch):
    """Ctrl-C in the middle of a run: exit 130, one line on stderr, no output and no temporary folder."""
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = qtool.quantize.quantize_pending
    monkeypatch.setattr(qtool.quantize, "quantize_pending", interrupt)
    outcome = quantize(tiny_flux, "-o", work / "out")
    message = "interrupted (SIGINT): nothing half-written was left behind\n"
    assert (outcome.exit_code, outcome.stdout, outcome.stderr) == (130, "", message)
    assert len(calls) == 20 and os.listdir(work) == []


def test_installed_entry_point(tiny_flux, tmp_path):
    """The installed `qtool` script: clean JSON on stdout and empty stderr, then a two-line error with exit 1."""
    qtool_script = Path(sys.executable).with_name("qtool")
    assert qtool_script.is_file(), "pip install -e . installs the qtool console script"
    out = tmp_path / "out"
    run = subprocess.run([qtool_script, "quantize", tiny_flux, "--device", "cpu", "--json", "-o", out],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
    assert json.loads(run.stdout)["output"] == str(out) and (out / "transformer" / "config.json").is_file()
    run = subprocess.run([qtool_script, "quantize", tiny_flux, "-o", out], capture_output=True, text=True, cwd=tmp_path)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == error_text(f"{out} already exists", "pass --overwrite to replace it, or choose --output")


def test_scale_search_writes_the_same_format_with_less_error(tiny_flux, work):
    """--scale-search: the summary says so; the same config.json and the same keys, dtypes and shapes as without it;
    the settings recorded; and every component's error, as qtool.json records it, lower."""
    plain, searched = work / "plain", work / "searched"
    succeeded(quantize(tiny_flux, "--fp4", "--components", "transformer", "--device", "cpu", "-q", "-o", plain))
    stdout = succeeded(quantize(tiny_flux, "--fp4", "--components", "transformer", "--device", "cpu", "--scale-search",
                                "-o", searched, "--report", work / "r.json"))  # fmt: skip
    assert f"Quantized {tiny_flux} -> fp4, scale search" in stdout
    assert quantization_config(searched / "transformer") == quantization_config(plain / "transformer")
    ours, theirs = headers(searched / "transformer"), headers(plain / "transformer")
    assert {k: v for k, v in ours.items() if "quant_state" not in k} == {
        k: v for k, v in theirs.items() if "quant_state" not in k
    }
    assert json.loads((work / "r.json").read_text())["settings"]["scale_search"] is True
    quality = [json.loads((out / "qtool.json").read_text())["quality"]["transformer"] for out in (plain, searched)]
    assert quality[1]["sqnr_db"] > quality[0]["sqnr_db"] + 0.5
