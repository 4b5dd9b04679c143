"""The fault matrix: bad input, damaged or hostile checkpoints and faults while writing, each row a test of the real
CLI (in-process through CliRunner, or as its own process where a signal or a resource limit is the fault).

Every row asserts the same three things besides its message: a one-line error (exit 1, `error:` plus at most a
`hint:`, no traceback), no output and no temporary entry left beside it, and an input whose every byte and mtime
are as before. The Hub rows are in test_hub_faults.py, the header fuzz in test_fuzz_headers.py.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import pickle
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from guard import (
    T5_FIRST_SHARD,
    T5_Q,
    assert_one_error,
    damage_header,
    fingerprint,
    leftovers,
    qtool,
    qtool_process,
    split_file,
    tree,
    write_file,
)
from helpers import assert_equal
from qtool.io.reader import TensorReader, scan_component

COMMANDS = ("quantize", "footprint", "dequantize")


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The working directory (where outputs go), empty."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def t5(tiny_flux, tmp_path) -> Path:
    """A private copy of the example's T5 encoder (config.json, an index and two shards): a plain model folder."""
    return Path(shutil.copytree(tiny_flux / "text_encoder_2", tmp_path / "in" / "t5"))


@pytest.fixture
def t5_nf4(tiny_flux_nf4, tmp_path) -> Path:
    """A private copy of that encoder quantized to NF4 by qtool (a bnb model folder), resharded like the source:
    block 0 and the embeddings in the first shard, the rest in the second, each layer's entries together."""
    folder = Path(shutil.copytree(tiny_flux_nf4.output / "text_encoder_2", tmp_path / "in" / "t5-nf4"))
    with TensorReader(scan_component(folder)) as reader:
        tensors = {k: reader.read(k).clone() for k in reader.component.tensors}
    (folder / "model.safetensors").unlink()
    names = (T5_FIRST_SHARD, "model-00002-of-00002.safetensors")
    weight_map = {k: names[0] if k.startswith(("encoder.block.0.", "shared.")) else names[1] for k in tensors}
    for name in names:
        save_file({k: t for k, t in tensors.items() if weight_map[k] == name}, folder / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def refused(command: str, source: Path, work: Path, *fragments: str, args=(), hint: str | None = None) -> str:
    """Run ``qtool <command> <source>`` expecting one error line with ``fragments``; the source is untouched and
    nothing is left in ``work``. Returns the error line."""
    before = fingerprint(source)
    extra = ["--output", work / "out"] if command != "footprint" else []
    line = assert_one_error(qtool(command, source, *extra, *args), *fragments, hint=hint)
    assert fingerprint(source) == before
    assert os.listdir(work) == []
    return line


def source_of(command: str, t5: Path, t5_nf4: Path) -> Path:
    return t5_nf4 if command == "dequantize" else t5


# --- damaged safetensors files -----------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])


def _header_too_long(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes((len(raw) + 100).to_bytes(8, "little") + raw[8:])


def _not_json(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"#not json!#{"
    path.write_bytes(bytes(raw))


def _first_key(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(header: dict) -> None:
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[keys[0]]["data_offsets"], header[keys[1]]["data_offsets"]
    # The second tensor now starts inside the first (same span length), and the gap it leaves at its end is data.
    shift = (a[1] - a[0]) // 2
    header[keys[1]]["data_offsets"] = [b[0] - shift, b[1] - shift]


def _outside(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4096, end + 4096]


def _unknown_dtype(header: dict) -> None:
    header[T5_Q if T5_Q in header else _first_key(header)]["dtype"] = "Q7"


DAMAGE = {
    "truncated": (_truncate, None, "truncated"),
    "header-longer-than-file": (_header_too_long, None, "is larger than the file"),
    "header-not-json": (_not_json, None, "header is not valid JSON"),
    "overlapping-offsets": (None, _overlap, "overlaps tensor"),
    "offsets-outside-data": (None, _outside, "lie outside the file's"),
    "unknown-dtype": (None, _unknown_dtype, "unknown dtype tag 'Q7'"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_safetensors_file_is_named(t5, t5_nf4, work, command, damage):
    """Each way a file can be damaged: the error names the file (and the tensor, where one is at fault)."""
    source = source_of(command, t5, t5_nf4)
    whole, header_change, words = DAMAGE[damage]
    shard = source / T5_FIRST_SHARD
    if whole is not None:
        whole(shard)
    else:
        damage_header(shard, header_change)
    line = refused(command, source, work, str(shard), words)
    if damage == "unknown-dtype":
        assert "tensor 'encoder.block.0.layer.0.SelfAttention.q.weight" in line


# --- index.json -----------------------------------------------------------------------------------------------------


def _index(folder: Path) -> tuple[Path, dict]:
    path = folder / "model.safetensors.index.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("command", COMMANDS)
def test_an_index_naming_a_missing_shard_is_refused(t5, t5_nf4, work, command):
    source = source_of(command, t5, t5_nf4)
    (source / "model-00002-of-00002.safetensors").unlink()
    refused(command, source, work, "shard model-00002-of-00002.safetensors is missing", hint="download the whole")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["dot-dot", "absolute"])
def test_an_index_pointing_outside_the_checkpoint_is_refused_and_nothing_outside_is_opened(
    t5, t5_nf4, work, tmp_path, monkeypatch, command, where
):
    """A weight_map path with `..` or an absolute path: refused before any file outside the checkpoint is opened."""
    source = source_of(command, t5, t5_nf4)
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.zeros(4)}, outside)
    path, index = _index(source)
    name = "../../outside.safetensors" if where == "dot-dot" else str(outside)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    path.write_text(json.dumps(index))
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else "")
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        opened.append(os.fspath(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    refused(command, source, work, "weight_map names", "not a file name in the index's folder")
    monkeypatch.undo()
    assert not [p for p in opened if p and Path(p).resolve() == outside.resolve()]


# --- NaN and Inf ------------------------------------------------------------------------------------------------------


def _poison(folder: Path, value: float, where=(3, 5)) -> None:
    """Set one element of T5_Q (first shard) to ``value``."""
    shard = folder / T5_FIRST_SHARD
    header, data = split_file(shard)
    with TensorReader(scan_component(folder)) as reader:
        weight = reader.read(T5_Q).clone()
    weight[where] = value
    begin, end = header[T5_Q]["data_offsets"]
    data = data[:begin] + weight.contiguous().view(torch.uint8).numpy().tobytes() + data[end:]
    write_file(shard, header, data)


@pytest.mark.parametrize(
    "value, bits, words",
    [
        (float("nan"), "4", "holds 1 NaN value(s), first at [3, 5]"),
        (float("inf"), "4", "holds 1 Inf value(s), first at [3, 5]"),
        (float("-inf"), "8", "holds 1 Inf value(s), first at [3, 5]"),
        (70000.0, "8", "holds 1 values beyond float16's range (+-65504), first at [3, 5]"),
    ],
    ids=["nan", "inf", "inf-int8", "beyond-fp16-int8"],
)
def test_a_nonfinite_weight_is_named_unless_allowed(t5, work, value, bits, words):
    """NaN or Inf (or, for LLM.int8, beyond float16) in a weight: an error naming it. --allow-nonfinite writes it as
    bnb's CUDA kernels would: a NaN codes to 0 and leaves its block's absmax alone (it comes back as a wrong but
    finite value); an Inf makes its block (4-bit) or row (8-bit, where the float16 cast makes 70000 an Inf) NaN,
    which dequantize then refuses in turn unless allowed. Everything else comes back within the format's bound."""
    _poison(t5, value)
    refused("quantize", t5, work, f"tensor '{T5_Q}'", words, args=["--bits", bits], hint="--allow-nonfinite")
    outcome = qtool("quantize", t5, "--bits", bits, "--allow-nonfinite", "--output", work / "q", "--quiet")
    assert outcome.exit_code == 0, outcome.stderr
    with TensorReader(scan_component(t5)) as reader:
        source = reader.read(T5_Q).float()
    damaged = torch.zeros_like(source, dtype=torch.bool)
    if value != value:
        damaged[3, 5] = True
    elif bits == "8":
        damaged[3, :] = True
    else:
        block = (3 * source.shape[1] + 5) // 64
        damaged.view(-1)[block * 64 : (block + 1) * 64] = True
    if value == value:
        refusal = qtool("dequantize", work / "q", "--output", work / "d")
        assert_one_error(refusal, f"tensor '{T5_Q}'", "NaN or Inf", hint="--allow-nonfinite")
    outcome = qtool("dequantize", work / "q", "--allow-nonfinite", "--dtype", "fp32", "--output", work / "d")
    assert outcome.exit_code == 0, outcome.stderr
    with TensorReader(scan_component(work / "d")) as reader:
        restored = reader.read(T5_Q)
    intact = ~damaged
    assert torch.isfinite(restored[intact]).all()
    assert ((restored[intact] - source[intact]).abs() <= source[intact].abs().max() * 0.2).all()
    if value != value:  # code 0 of NF4 is -1: the NaN comes back as minus its block's absmax
        block = source.view(-1)[(3 * source.shape[1] + 5) // 64 * 64 :][:64]
        assert restored[3, 5] == -block[~torch.isnan(block)].abs().max()
    else:
        assert not torch.isfinite(restored[damaged]).any()
    if bits == "8":
        with TensorReader(scan_component(work / "q")) as reader:
            assert (reader.read(T5_Q)[3] == 0).all()  # bnb's float16 cast makes the row's SCB Inf: zero codes


# --- wrong kind of checkpoint ---------------------------------------------------------------------------------------


def test_an_already_quantized_checkpoint_is_refused_by_quantize(t5_nf4, work):
    refused("quantize", t5_nf4, work, "is already quantized (bitsandbytes)", hint="original (unquantized)")


def test_a_plain_checkpoint_is_refused_by_dequantize(t5, work):
    refused("dequantize", t5, work, "is not quantized: its config.json has no quantization_config")


class _Trap:
    """Unpickling this writes a file: proof that a checkpoint was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


@pytest.mark.parametrize("command", COMMANDS)
def test_pickle_only_checkpoints_are_refused_and_never_unpickled(t5, t5_nf4, work, tmp_path, command):
    source = source_of(command, t5, t5_nf4)
    for path in source.glob("*.safetensors*"):
        path.unlink()
    trap = tmp_path / "unpickled.txt"
    (source / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(trap))))
    refused(command, source, work, "only pickled weights (pytorch_model.bin)", hint="qtool never unpickles")
    assert not trap.exists()


@pytest.mark.parametrize(
    "edit, words, hint",
    [
        ({"architectures": ["T5EncoderModl"]}, "transformers", "did you mean T5EncoderModel"),
        (
            {"architectures": ["AcmeEncoder"], "auto_map": {"AutoModel": "modeling_acme.AcmeEncoder"}},
            "no model class 'AcmeEncoder'",
            "qtool never runs code from a checkpoint",
        ),
        ({"architectures": None}, "names no model class", "save_pretrained"),
    ],
    ids=["typo", "remote-code", "none"],
)
def test_an_unknown_architecture_is_refused_with_what_exists(t5, work, edit, words, hint):
    config = json.loads((t5 / "config.json").read_text()) | edit
    (t5 / "config.json").write_text(json.dumps(config))
    refused("quantize", t5, work, words, hint=hint)


def test_an_unknown_diffusers_class_is_refused_with_what_exists(tiny_flux, tmp_path, work):
    flux = Path(shutil.copytree(tiny_flux, tmp_path / "in" / "flux"))
    config = json.loads((flux / "transformer" / "config.json").read_text())
    (flux / "transformer" / "config.json").write_text(json.dumps(config | {"_class_name": "FluxTransformer2DModl"}))
    refused("quantize", flux, work, "has no model class 'FluxTransformer2DModl'", hint="FluxTransformer2DModel")


@pytest.mark.parametrize("command", ["quantize", "footprint"])
def test_a_component_without_config_json_is_named(tiny_flux, tmp_path, work, command):
    flux = Path(shutil.copytree(tiny_flux, tmp_path / "in" / "flux"))
    (flux / "transformer" / "config.json").unlink()
    refused(command, flux, work, str(flux / "transformer"), "config.json")


def test_a_folder_without_config_json_is_refused(t5, work):
    (t5 / "config.json").unlink()
    refused("quantize", t5, work, "has neither model_index.json", hint="save_pretrained")


@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_a_component_name_that_does_not_exist_lists_the_components(tiny_flux, tiny_flux_nf4, work, command):
    source = tiny_flux if command == "quantize" else tiny_flux_nf4.output
    assert_one_error(
        qtool(command, source, "--components", "unet", "--output", work / "out"),
        "no component 'unet' in this pipeline",
        hint="text_encoder, text_encoder_2, tokenizer, tokenizer_2, transformer, vae",
    )
    assert os.listdir(work) == []


# --- unusual tensors ------------------------------------------------------------------------------------------------


def _add_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add tensors to the first shard and the index (what a checkpoint with extra buffers looks like)."""
    shard = folder / T5_FIRST_SHARD
    with TensorReader(scan_component(folder)) as reader:
        kept = {k: reader.read(k).clone() for k, i in reader.component.tensors.items() if i.file == T5_FIRST_SHARD}
    save_file(kept | tensors, shard, metadata={"format": "pt"})
    path, index = _index(folder)
    index["weight_map"].update(dict.fromkeys(tensors, T5_FIRST_SHARD))
    path.write_text(json.dumps(index))


EXTRAS = {
    "extra.int64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "extra.int32": torch.arange(5, dtype=torch.int32),
    "extra.bool": torch.tensor([True, False, True]),
    "extra.fp8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
    "extra.uint8": torch.arange(7, dtype=torch.uint8),
    "extra.empty": torch.zeros(0, 4),
    "extra.scalar": torch.tensor(3.25),
    "extra.vector": torch.linspace(-1, 1, 9, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("bits", ["4", "8"])
def test_integer_bool_fp8_empty_and_0d_tensors_are_kept_as_they_are(t5, work, bits):
    """Tensors that are no Linear weight, whatever their dtype or shape, are written back byte for byte (as bnb's
    save_pretrained keeps every non-Linear tensor), and dequantize keeps them too."""
    _add_tensors(t5, EXTRAS)
    assert qtool("quantize", t5, "--bits", bits, "--output", work / "q", "--quiet").exit_code == 0
    assert qtool("dequantize", work / "q", "--output", work / "d", "--quiet").exit_code == 0
    for folder in (work / "q", work / "d"):
        with TensorReader(scan_component(folder)) as reader:
            for key, expected in EXTRAS.items():
                kept = reader.read(key)
                assert (kept.dtype, kept.shape) == (expected.dtype, expected.shape), key
                assert torch.equal(kept.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), key
    assert leftovers(work) == []


@pytest.mark.parametrize(
    "tensor, words",
    [
        (torch.zeros(128, 128, dtype=torch.int32), "is I32; qtool quantizes float32, float16 and bfloat16 weights"),
        (torch.zeros(128, 128).to(torch.float8_e4m3fn), "is F8_E4M3; qtool quantizes float32"),
        (torch.zeros(128 * 128, dtype=torch.bfloat16), "has shape [16384] but its Linear expects [128, 128]"),
        (torch.zeros(0, 128, dtype=torch.bfloat16), "has shape [0, 128] but its Linear expects [128, 128]"),
    ],
    ids=["int32", "fp8", "1-d", "0-size"],
)
def test_a_linear_weight_that_is_not_a_float_matrix_of_its_shape_is_refused(t5, work, tensor, words):
    _add_tensors(t5, {T5_Q: tensor})
    refused("quantize", t5, work, T5_Q, words)


def test_tiny_and_odd_dimensions_quantize_as_bnb_dequantizes_them(tmp_path, work):
    """Linear layers of 1x1, 3x5 (an odd count: half a byte of padding) and 7x33, each smaller than one block:
    bnb's own dequantization (CPU) of the written entries equals qtool's, for each method."""
    import bitsandbytes.functional as bnbf
    from transformers import T5Config, T5EncoderModel

    from qtool.formats.layers import quantized_layers
    from qtool.quantize import dequantize_tensor
    from qtool.verify import check_layer

    config = T5Config(vocab_size=11, d_model=5, d_kv=3, num_heads=1, d_ff=7, num_layers=1, feed_forward_proj="relu")
    torch.manual_seed(0)
    source = tmp_path / "odd"
    T5EncoderModel(config).to(torch.bfloat16).save_pretrained(source)
    with TensorReader(scan_component(source)) as reader:
        weights = {k: reader.read(k).clone() for k in reader.component.tensors}
    for method in (["--bits", "4"], ["--double-quant"], ["--fp4"], ["--bits", "8"]):
        out = work / "-".join(method)
        assert qtool("quantize", source, *method, "--output", out, "--quiet").exit_code == 0
        written = scan_component(out)
        layers = quantized_layers(written.tensors)
        assert len(layers) == 5  # q, k, v, o, wi (wo stays 16-bit: T5's _keep_in_fp32_modules)
        with TensorReader(written) as reader:
            for key, layer in layers.items():
                entries = {name: reader.read(k).clone() for name, k in layer.entries.items()}
                if layer.bits == 8:
                    ours = dequantize_tensor(entries, dtype=torch.float32)
                    theirs = bnbf.int8_vectorwise_dequant(entries["weight"], entries["SCB"])
                else:  # in the dtype the quant state records, bf16
                    ours = dequantize_tensor(entries)
                    state = bnbf.QuantState.from_dict(
                        {k: v for k, v in entries.items() if k != "weight"}, device=torch.device("cpu")
                    )
                    theirs = bnbf.dequantize_4bit(entries["weight"], state)
                assert_equal(ours, theirs, key)
                check_layer(weights[key], entries, key)


# --- the output folder ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_output_problems_are_refused_before_any_work(t5, t5_nf4, work, monkeypatch, command):
    """An existing output, an output inside the input, and a folder that cannot be written to: refused before a
    tensor is read."""
    source = source_of(command, t5, t5_nf4)

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor was read before the output was checked")

    monkeypatch.setattr("qtool.io.reader.TensorReader.read", forbidden)
    before = fingerprint(source)
    (work / "exists").mkdir()
    (work / "exists" / "keep.txt").write_text("mine")
    assert_one_error(qtool(command, source, "--output", work / "exists"), "already exists", hint="--overwrite")
    assert (work / "exists" / "keep.txt").read_text() == "mine"
    assert_one_error(qtool(command, source, "--output", source / "q"), "overlaps the input")
    # /proc refuses new folders even to root, whom no permission bit stops.
    assert_one_error(qtool(command, source, "--output", "/proc/out"), "cannot write to /proc")
    assert fingerprint(source) == before
    assert sorted(os.listdir(work)) == ["exists"]


# --- faults while writing: a file-size limit, signals ---------------------------------------------------------------


def _limit_file_size(limit: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_a_full_disk_leaves_no_output_and_no_temporary_files(t5, t5_nf4, work, command):
    """A write fails for lack of room (RLIMIT_FSIZE makes writes past 100 kB fail with EFBIG, as a full or
    size-limited filesystem does, without needing one): a clear error, no output, nothing temporary left."""
    source = source_of(command, t5, t5_nf4)
    before = fingerprint(source)
    process = qtool_process(
        command, source, "--device", "cpu", "--output", work / "out", cwd=work, preexec_fn=_limit_file_size(100_000)
    )
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert stderr.startswith(f"error: a file grew past the file-size limit while writing {work / 'out'}"), stderr
    assert "hint: raise the limit" in stderr and "Traceback" not in stderr
    assert os.listdir(work) == [] and fingerprint(source) == before


def _big_model(folder: Path) -> Path:
    """A T5 encoder of 4 layers, d_model 1024 (~80M parameters, bf16): long enough on the CPU to interrupt."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=1024, d_kv=64, num_heads=16, d_ff=4096, num_layers=4)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        key: torch.randn(tuple(t.shape), generator=generator).to(torch.bfloat16)
        for key, t in model.state_dict().items()
    }
    folder.mkdir(parents=True)
    config.architectures = ["T5EncoderModel"]
    config.save_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(the big model, its NF4 quantization)."""
    root = tmp_path_factory.mktemp("big")
    source = _big_model(root / "big")
    assert qtool("quantize", source, "--device", "cpu", "--output", root / "big-nf4", "--quiet").exit_code == 0
    return source, root / "big-nf4"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["quantize", "dequantize"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_midway_stops_promptly_and_leaves_nothing(big_pair, work, command, signum):
    """Ctrl-C, SIGTERM or SIGHUP while tensors are being written: the process exits within seconds with 128 +
    the signal number and one line, the temporary folder is gone, no output exists and the input is untouched."""
    source = big_pair[0] if command == "quantize" else big_pair[1]
    before = fingerprint(source)
    process = qtool_process(command, source, "--device", "cpu", "--output", work / "out", "--quiet", cwd=work)
    deadline = time.monotonic() + 120
    # Wait until the run is writing: its temporary folder holds a spool or a shard.
    while not any(p.suffix in (".spool", ".part") for p in work.rglob("*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.01)
    sent = time.monotonic()
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    took = time.monotonic() - sent
    name = signal.Signals(signum).name
    assert (process.returncode, stdout, stderr) == (
        128 + signum,
        "",
        f"interrupted ({name}): nothing half-written was left behind\n",
    )
    assert took < 10, f"took {took:.1f} s to stop"
    assert os.listdir(work) == [] and fingerprint(source) == before


# --- guarantees -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [[], ["--double-quant"], ["--fp4", "--double-quant"], ["--bits", "8"]])
def test_runs_are_deterministic_and_leave_the_input_as_it_was(tiny_flux, tmp_path, work, method):
    """The same input and options give byte-identical output (every file, qtool.json included), and the input's
    every byte and mtime are unchanged after quantize, footprint and dequantize."""
    source = Path(shutil.copytree(tiny_flux, tmp_path / "in" / "flux"))
    before = fingerprint(source)
    for name in ("a", "b"):
        assert qtool("quantize", source, *method, "--device", "cpu", "--output", work / name, "--quiet").exit_code == 0
        assert qtool("dequantize", work / name, "--device", "cpu", "--output", work / f"{name}-d").exit_code == 0
    assert qtool("footprint", source).exit_code == 0
    assert tree(work / "a") == tree(work / "b")
    assert tree(work / "a-d") == tree(work / "b-d")
    assert fingerprint(source) == before
    assert leftovers(work) == []


def _corrupt_entries(monkeypatch, target: str, n: int, change) -> None:
    """Make the n-th call of ``target`` (a dotted name of a function returning one quantized layer) change it."""
    import importlib

    module_name, _, attr = target.rpartition(".")
    owner = importlib.import_module(module_name)
    original, calls = getattr(owner, attr), {"n": 0}

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        return change(result) if calls["n"] == n else result

    monkeypatch.setattr(owner, attr, wrapper)


def _double_absmax(layer):
    """A codec defect: a quantized layer (``qtool.quantize.PendingLayer``) whose absmax is twice too large."""
    return dataclasses.replace(layer, tensors=layer.tensors | {"weight.absmax": layer.tensors["weight.absmax"] * 2})


def _double_absmax_in_group(group: dict) -> dict:
    """A writer defect: every quantized weight's absmax written twice too large."""
    return {k: (v * 2 if k.endswith(".weight.absmax") else v) for k, v in group.items()}


def test_verification_stops_a_codec_defect_before_anything_is_written(t5, work, monkeypatch):
    """Entries that do not dequantize to the source within the format's bound: the run stops, naming the layer."""
    _corrupt_entries(monkeypatch, "qtool.quantize.quantize_pending", 5, _double_absmax)
    refused("quantize", t5, work, "verification failed", "absmax value(s) off by more than the format allows")


def test_verification_reads_the_written_files_back(t5, work, monkeypatch):
    """A writer defect (the first layer's absmax written wrong): the read-back of the written files catches it."""
    from qtool.io.writer import ShardedWriter

    original = ShardedWriter.add_group
    monkeypatch.setattr(ShardedWriter, "add_group", lambda self, group: original(self, _double_absmax_in_group(group)))
    line = refused("quantize", t5, work, "verification failed", "(as written)")
    assert T5_Q.removesuffix("q.weight") in line or "encoder.block.0" in line


def test_verification_checks_the_written_key_set(t5, work, monkeypatch):
    """A writer defect (a tensor dropped): the key set read back differs from the plan."""
    from qtool.io.writer import ShardedWriter

    original = ShardedWriter.add_group
    dropped = "encoder.final_layer_norm.weight"

    def drop(self, group):
        group = {k: v for k, v in group.items() if k != dropped}
        return original(self, group) if group else None

    monkeypatch.setattr(ShardedWriter, "add_group", drop)
    refused("quantize", t5, work, "verification of", f"missing ['{dropped}']")


@pytest.mark.gpu
@pytest.mark.parametrize("method", [[], ["--double-quant"], ["--fp4"], ["--bits", "8"]])
def test_cuda_runs_are_deterministic_and_equal_the_cpu_run(tiny_flux, work, method):
    """On a GPU: two runs give the same bytes, and the Triton path writes what the CPU reference writes. With
    double quant, bnb takes the absmax mean (the nested offset) with torch.mean on the device it quantizes on, and
    so does qtool: its last bit, hence the blob, nested_absmax and some absmax codes, may differ between CPU and GPU;
    nothing else may (measured on the H100: one layer of the example differs, in those entries only). qtool.json's
    quality figures are float64 sums in each device's order: equal to their 6 recorded digits but for a last-digit
    tie, so compared to 1e-5."""
    from bnb_loading import read_all

    for name, device in (("cuda-a", "cuda"), ("cuda-b", "cuda"), ("cpu", "cpu")):
        outcome = qtool("quantize", tiny_flux, *method, "--device", device, "--output", work / name, "--quiet")
        assert outcome.exit_code == 0, outcome.stderr
    assert tree(work / "cuda-a") == tree(work / "cuda-b")
    if "--double-quant" not in method:
        gpu, cpu = tree(work / "cuda-a"), tree(work / "cpu")
        gpu_provenance, cpu_provenance = (json.loads(files.pop("qtool.json")) for files in (gpu, cpu))
        assert gpu == cpu
        gpu_quality, cpu_quality = gpu_provenance.pop("quality"), cpu_provenance.pop("quality")
        assert gpu_provenance == cpu_provenance and gpu_quality.keys() == cpu_quality.keys()
        for name, figures in gpu_quality.items():
            assert figures.keys() == cpu_quality[name].keys()
            for key, value in figures.items():
                expected = cpu_quality[name][key]
                assert (value is None) == (expected is None), (name, key)
                assert value is None or value == pytest.approx(expected, rel=1e-5), (name, key)
    for component in ("transformer", "text_encoder_2"):
        gpu, cpu = read_all(work / "cuda-a" / component), read_all(work / "cpu" / component)
        assert sorted(gpu) == sorted(cpu)
        differing = [k for k in gpu if not torch.equal(gpu[k], cpu[k])]
        allowed = (".weight.absmax", ".weight.nested_absmax", ".quant_state.bitsandbytes__nf4")
        assert all(k.endswith(allowed) for k in differing), differing
    for name, device in (("cuda-d", "cuda"), ("cpu-d", "cpu")):
        assert qtool("dequantize", work / "cpu", "--device", device, "--output", work / name).exit_code == 0
    assert tree(work / "cuda-d") == tree(work / "cpu-d")


def test_what_a_killed_run_left_is_cleaned_up_by_the_next_run(t5, work):
    """SIGKILL leaves no chance to clean up: the next run to the same output removes the dead run's temporary
    folder, and moves back an old output that the dead run had moved aside during --overwrite, so nothing is lost.
    A live run's temporary folder is left alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (work / f".out.qtool-tmp-{pid}").mkdir()
    (work / f".out.qtool-tmp-{pid}" / "half.safetensors.part").write_bytes(b"x" * 100)
    (work / f".out.qtool-old-{pid}").mkdir()
    (work / f".out.qtool-old-{pid}" / "mine.txt").write_text("the old output")
    (work / f".out.qtool-tmp-{os.getpid()}").mkdir()  # a live process's (this one's): not touched
    line = assert_one_error(qtool("quantize", t5, "--output", work / "out"), "already exists")
    assert str(work / "out") in line
    assert (work / "out" / "mine.txt").read_text() == "the old output"
    assert sorted(os.listdir(work)) == [f".out.qtool-tmp-{os.getpid()}", "out"]
