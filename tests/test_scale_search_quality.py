"""Scale search on real trained weights (issue 8), on the CPU and offline: the weights ship inside the e2k and
silero-vad wheels (the `test` extra); and benchmarks/quality.py, which reports the gains, runs end to end.

Level 5 (quality): SQNR gains against plain absmax with floors set below what benchmarks/quality.py measured on the
same layers; and, per 4-bit block or 8-bit row, the searched scale's squared error is at most the absmax's (the
absmax is candidate 0 of the search), up to float rounding.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtool.formats import bnb4

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    # Registered before it runs: dataclasses look their module up in sys.modules.
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = _load("quality")
results = quality._results

# e2k's smallest model, all 13 of its layers (0.56M weights: GRU gates, attention in/out projections, Linears,
# embeddings; the reference's search takes ~0.5 s per method on one thread). Measured on these layers
# (benchmarks/results/quality.csv, CPU, torch 2.13.0+cpu, 2026-11-25): mean gain nf4 +0.56 dB (layers +0.43 to
# +0.71), nf4-dq +0.56 (+0.46 to +0.73), fp4 +0.66 (+0.54 to +0.73), int8 +0.085 (+0.019 to +0.137).
E2K_MODEL = "model-c2k-turbo"
# Issue 8's target for NF4 is +0.5 dB over all real weights; these floors leave room for a different subset.
MEAN_GAIN_FLOOR_DB = {"nf4": 0.45, "nf4-dq": 0.45, "fp4": 0.5, "int8": 0.0}
BLOCKSIZE = 64
# The search sums squared errors as fixed-point integers (units of 2**-32, truncated, in units of absmax^2 for 4-bit
# and (absmax/127)^2 for 8-bit) computed in float32: its choice can be worse than the absmax by that much, no more.
RTOL = 1e-5
FIXED_POINT = 2.0**-32


def need(name: str) -> None:
    if quality.package_files(name) is None:
        pytest.skip(f"needs {name} (pip install -e .[test])")


@pytest.fixture(scope="module")
def e2k_layers() -> list:
    need("e2k")
    layers = [layer for layer in quality.real_layers("e2k") if layer.name.startswith(f"{E2K_MODEL}:")]
    assert len(layers) == 13, [layer.name for layer in layers]
    return layers


@pytest.fixture(scope="module")
def quantized(e2k_layers) -> dict:
    """(method, layer name) -> {False: absmax, True: searched} (entries and float32 dequantized weight).

    On one thread: these tensors are small, and on a busy 2-core machine two threads wait on each other (measured:
    0.2 s per method on one thread, up to 13 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            (method, layer.name): quality.quantize_both(layer.weight, method, backend="torch", repeats=0)
            for method in quality.METHODS
            for layer in e2k_layers
        }
    finally:
        torch.set_num_threads(threads)


def block_errors(weight: torch.Tensor, restored: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 sums of squared errors per 4-bit block (64 consecutive elements) or 8-bit row, and each one's
    tolerance for a choice that the search's fixed-point sums could not tell from a better one."""
    d = weight.double() - restored.double()
    a = weight.double().abs()
    if method == "int8":
        unit = (a.amax(dim=1) / 127) ** 2
        return d.square().sum(dim=1), unit * weight.shape[1] * FIXED_POINT
    pad = -weight.numel() % BLOCKSIZE
    d = torch.nn.functional.pad(d.reshape(-1), (0, pad)).view(-1, BLOCKSIZE)
    a = torch.nn.functional.pad(a.reshape(-1), (0, pad)).view(-1, BLOCKSIZE)
    return d.square().sum(dim=1), a.amax(dim=1) ** 2 * BLOCKSIZE * FIXED_POINT


@pytest.mark.parametrize("method", list(quality.METHODS))
def test_scale_search_gain_on_real_weights(method, e2k_layers, quantized):
    """Mean SQNR gain over the layers above the floor, and no layer worse."""
    gains = {}
    for layer in e2k_layers:
        both = quantized[method, layer.name]
        gains[layer.name] = quality.sqnr_db(layer.weight, both[True].restored) - quality.sqnr_db(
            layer.weight, both[False].restored
        )
    mean = sum(gains.values()) / len(gains)
    assert mean > MEAN_GAIN_FLOOR_DB[method] if method == "int8" else mean >= MEAN_GAIN_FLOOR_DB[method], gains
    worse = {name: gain for name, gain in gains.items() if gain < 0}
    assert not worse, f"{method}: layers with a lower SQNR with scale search: {worse}"


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_searched_scale_never_worse_per_block(method, e2k_layers, quantized):
    """Each block's (row's) squared error with its searched scale is at most the absmax's. Not with double quant,
    where both are rounded to 8-bit codes afterwards."""
    for layer in e2k_layers:
        both = quantized[method, layer.name]
        plain, tol = block_errors(layer.weight, both[False].restored, method)
        search, _ = block_errors(layer.weight, both[True].restored, method)
        bad = search > plain * (1 + RTOL) + tol
        assert not bad.any(), (
            f"{method} {layer.name}: {int(bad.sum())} of {bad.numel()} blocks have a larger error with the searched "
            f"scale, first at {bad.nonzero()[0].item()}: {search[bad][0].item():.6g} > {plain[bad][0].item():.6g}"
        )
        assert (search <= plain * (1 + RTOL) + tol).all()
        assert (search < plain).any(), f"{method} {layer.name}: the search changed no block"


@pytest.mark.parametrize("method", list(quality.METHODS))
def test_same_entries_and_size(method, e2k_layers, quantized):
    """Scale search changes values only: the same entries with the same dtypes, shapes and bytes. With double quant
    the quant-state JSON may differ in the offset's digits only (a few bytes, as between any two weights)."""
    for layer in e2k_layers:
        plain, search = (quantized[method, layer.name][s].entries for s in (False, True))
        assert list(plain) == list(search)
        for key in plain:
            a, b = plain[key], search[key]
            if key.startswith(bnb4.BLOB_PREFIX) and method == "nf4-dq":
                meta_a, meta_b = bnb4.decode_blob(a), bnb4.decode_blob(b)
                assert isinstance(meta_a.pop("nested_offset"), float) and isinstance(meta_b.pop("nested_offset"), float)
                assert meta_a == meta_b
                assert abs(a.numel() - b.numel()) <= 4
            else:
                assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{layer.name} {key}"
        if method != "nf4-dq":
            assert quality.nbytes(plain) == quality.nbytes(search)
            blob = [key for key in plain if key.startswith(bnb4.BLOB_PREFIX)]
            assert all(torch.equal(plain[key], search[key]) for key in blob)


def test_silero_layers_are_flattened_trained_weights():
    """silero-vad's TorchScript model gives its conv kernels and LSTM cells as 2-D layers, not the Fourier basis."""
    need("silero-vad")
    layers = {layer.name: layer.weight for layer in quality.real_layers("silero-vad")}
    assert len(layers) == 12, sorted(layers)
    assert layers["silero_vad:_model.encoder.0.reparam_conv.weight"].shape == (128, 129 * 3)
    assert layers["silero_vad:_model.decoder.rnn.weight_ih"].shape == (512, 128)
    assert not any("stft" in name for name in layers)
    assert all(w.dim() == 2 and w.dtype == torch.float32 and w.numel() >= quality.MIN_NUMEL for w in layers.values())


def test_quality_script_end_to_end(tmp_path):
    """benchmarks/quality.py on the CPU, one e2k layer, into a temporary CSV with benchmarks/_results.py's schema."""
    need("e2k")
    out = tmp_path / "quality.csv"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quality.py"), "--sources", "e2k", "--limit", "1", "--repeats", "1",
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean gain dB" in proc.stdout and "time ratio" in proc.stdout
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == results.COLUMNS
        rows = list(reader)
    for row in rows:
        assert row["provider"] == "qtool" and row["gpu"] == "cpu" and row["torch"] == torch.__version__
        assert row["git_commit"] and datetime.datetime.fromisoformat(row["date"])
        assert row["notes"] == "scale search vs absmax; cpu (1 thread), torch backend"
        assert math.isfinite(float(row["median"]))
    component = f"e2k {importlib.metadata.version('e2k')}"
    summary = {(r["op"], r["metric"]): float(r["median"]) for r in rows if r["shape"] == component}
    for method in quality.METHODS:
        op = f"quantize-{method}"
        assert {metric for o, metric in summary if o == op} == {
            "sqnr_gain_db", "sqnr_gain_min_db", "sqnr_gain_max_db", "sqnr_absmax_db", "sqnr_search_db",
            "time_absmax_ms", "time_search_ms", "time_ratio", "size_difference_bytes", "layers",
        }  # fmt: skip
        assert summary[op, "layers"] == 1
        assert summary[op, "sqnr_gain_db"] == summary[op, "sqnr_gain_min_db"] == summary[op, "sqnr_gain_max_db"] > 0
        assert summary[op, "sqnr_search_db"] - summary[op, "sqnr_absmax_db"] == pytest.approx(
            summary[op, "sqnr_gain_db"], abs=1e-3
        )
        assert summary[op, "time_ratio"] > 0
        if method != "nf4-dq":
            assert summary[op, "size_difference_bytes"] == 0
    layer_rows = [r for r in rows if r["shape"] != component]
    assert {r["shape"] for r in layer_rows} == {f"{component} | accent:emb.weight 85x256"}
    assert {(r["op"], r["metric"]) for r in layer_rows} == {
        (f"quantize-{m}", metric) for m in quality.METHODS for metric in ("sqnr_gain_db", "time_ratio")
    }


def test_quality_script_measures_something(tmp_path):
    """No source and no --flux is an error, not an empty CSV."""
    out = tmp_path / "quality.csv"
    with pytest.raises(SystemExit, match="nothing measured"):
        quality.main(["--sources", "none", "--device", "cpu", "--out", str(out)])
    assert not out.exists()
