"""`qtool quantize` option parsing and errors, with the API patched at the CLI boundary."""

from unittest import mock

import pytest
from typer.testing import CliRunner

from qtool.api import ComponentResult, QuantizeResult
from qtool.cli.app import app
from qtool.errors import QtoolError
from qtool.spec import QuantSpec

runner = CliRunner()


def fake_result(spec: QuantSpec | None = None, dry_run: bool = False):
    component = ComponentResult("transformer", "FluxTransformer2DModel", 12_000_000, 50, 0, 24_000_000, 6_800_000,
                                1.5, 20.7, 20.1, ["diffusion_pytorch_model.safetensors"])  # fmt: skip
    return QuantizeResult(output="/tmp/out", source="src", spec=spec or QuantSpec(), kind="pipeline",
                          components=[component], copied=["vae"], dry_run=dry_run, seconds=2.0,
                          peak_rss_bytes=10**9, device="cpu")  # fmt: skip


def invoke(*args, result=None):
    with mock.patch("qtool.api.quantize_checkpoint", return_value=result or fake_result()) as api:
        outcome = runner.invoke(app, ["quantize", *args])
    return outcome, api


def test_defaults_are_nf4_bf16_and_auto_device():
    outcome, api = invoke("some/repo")
    assert outcome.exit_code == 0, outcome.output
    (source,), kwargs = api.call_args
    assert source == "some/repo"
    assert kwargs["spec"] == QuantSpec()
    assert kwargs["spec"].quantization_config()["bnb_4bit_compute_dtype"] == "bfloat16"
    assert kwargs | {"spec": None, "progress": None} == {
        "spec": None, "components": None, "output": None, "revision": None, "token": None, "device": None,
        "dry_run": False, "overwrite": False, "progress": None,
    }  # fmt: skip


def test_every_flag_reaches_the_api():
    outcome, api = invoke(
        "./flux", "--bits", "4", "--fp4", "--double-quant", "--blocksize", "128", "--compute-dtype", "fp16",
        "--components", "transformer, text_encoder_2", "--skip", "proj_out", "--skip", "x_embedder",
        "--threshold", "5.5", "--output", "out", "--revision", "v1", "--token", "hf_x", "--device", "cpu",
        "--dry-run", "--overwrite",
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    kwargs = api.call_args.kwargs
    assert kwargs["spec"] == QuantSpec(4, "fp4", True, 128, "fp16", ("proj_out", "x_embedder"), 5.5)
    assert kwargs["components"] == ["transformer", "text_encoder_2"]
    assert (kwargs["output"], kwargs["revision"], kwargs["token"], kwargs["device"]) == ("out", "v1", "hf_x", "cpu")
    assert kwargs["dry_run"] and kwargs["overwrite"]


def test_summary_table_and_json_and_quiet():
    outcome, _ = invoke("src")
    assert "transformer" in outcome.stdout and "FluxTransformer2DModel" in outcome.stdout
    assert "20.7 / 20.1 dB" in outcome.stdout and "copied as they are: vae" in outcome.stdout
    outcome, _ = invoke("src", "--json")
    import json

    data = json.loads(outcome.stdout)
    assert data["components"][0]["bytes_after"] == 6_800_000 and data["method"] == "nf4"
    outcome, _ = invoke("src", "--quiet")
    assert outcome.stdout == "/tmp/out\n"


def test_dry_run_says_nothing_was_written():
    outcome, _ = invoke("src", "--dry-run", result=fake_result(dry_run=True))
    assert "dry run: nothing was downloaded or written" in outcome.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nf4", "--fp4"], "error: --nf4 and --fp4 conflict"),
        (["--bits", "8", "--double-quant"], "error: --bits 8 and --double-quant conflict"),
        (["--bits", "8", "--fp4"], "error: --bits 8 and --fp4 conflict"),
        (["--json", "--quiet"], "error: --json and --quiet conflict"),
        (["--bits", "3"], "error: --bits must be 4 or 8"),
        (["--blocksize", "100"], "error: --blocksize must be a power of two"),
        (["--bits", "8", "--blocksize", "128"], "apply to 4-bit only"),
    ],
)
def test_conflicts_fail_with_one_line(args, message):
    outcome, api = invoke("src", *args)
    assert outcome.exit_code == 1
    assert message in outcome.stderr and "Traceback" not in outcome.stderr
    api.assert_not_called()


def test_api_errors_print_message_and_hint_but_never_the_token():
    error = QtoolError("repository x/y not found", hint="pass --token")
    with mock.patch("qtool.api.quantize_checkpoint", side_effect=error):
        outcome = runner.invoke(app, ["quantize", "x/y", "--token", "hf_SECRET123"])
    assert outcome.exit_code == 1
    assert outcome.stderr == "error: repository x/y not found\nhint: pass --token\n"
    assert "hf_SECRET123" not in outcome.output


def test_invalid_choice_is_a_usage_error():
    outcome, _ = invoke("src", "--device", "tpu")
    assert outcome.exit_code == 2


def test_help_states_defaults_and_examples():
    outcome = runner.invoke(app, ["quantize", "--help"])
    assert outcome.exit_code == 0
    for text in ("[default: 4]", "[default: 64]", "[default: bf16]", "[default: 6.0]", "transformer,text_encoder_2",
                 "qtool quantize black-forest-labs/FLUX.1-dev --bits 4 --nf4 --double-quant"):  # fmt: skip
        assert text in outcome.stdout
