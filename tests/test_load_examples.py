"""examples/run_flux_qtool.py and examples/run_llm_qtool.py run end to end on the CPU (tiny models, subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str) -> str:
    # TRITON_INTERPRET and HF_HUB_OFFLINE come from conftest through the environment.
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_run_flux_qtool(flux_outputs, tmp_path):
    """The FLUX example loads an NF4-DQ pipeline with qtool.load, generates and writes a PNG."""
    png = tmp_path / "out.png"
    out = run(str(EXAMPLES / "run_flux_qtool.py"), str(flux_outputs["nf4-dq"]), "--device", "cpu", "--steps", "1",
              "--output", str(png))  # fmt: skip
    assert "transformer: QuantLinear4bit x50" in out and "text_encoder_2: QuantLinear4bit x12" in out
    assert Image.open(png).size == (64, 64)


def test_run_llm_qtool():
    """The LLM example without a checkpoint: a tiny random Llama quantized on the fly, compiled (aot_eager: no C++
    compiler needed), generates the tokens it was asked for."""
    out = run(str(EXAMPLES / "run_llm_qtool.py"), "--device", "cpu", "--max-new-tokens", "4", "--compile",
              "--compile-backend", "aot_eager")  # fmt: skip
    assert "Linear layers: QuantLinear4bit x14, Linear x1" in out
    tokens = out.split("new tokens: ")[1].splitlines()[0]
    assert len(json.loads(tokens)) == 4
