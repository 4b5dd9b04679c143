"""scan_component / TensorReader: round trips, header-only scans, and every malformed checkpoint named in the error."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from helpers import assert_equal
from qtool.errors import QtoolError
from qtool.io import TensorReader, safetensors_header, scan_component
from qtool.io.writer import ShardedWriter


def tensors() -> dict[str, torch.Tensor]:
    return {
        "proj.weight": torch.randn(6, 5).bfloat16(),
        "proj.bias": torch.randn(6),
        "codes": torch.randint(0, 256, (11, 1), dtype=torch.uint8),
        "q8": torch.randint(-128, 128, (3, 4), dtype=torch.int8),
        "h": torch.randn(3).half(),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 2),
    }


def st_file(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a safetensors file byte by byte, so that it can be as broken as a test needs."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + raw + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_single_file_round_trip(tmp_path):
    expected = tensors()
    save_file(expected, tmp_path / "model.safetensors", metadata={"format": "pt"})
    component = scan_component(tmp_path)
    assert component.base_name == "model" and not component.sharded
    assert component.file_metadata == {"model.safetensors": {"format": "pt"}} and component.index_metadata == {}
    assert component.total_bytes == sum(t.nbytes for t in expected.values())
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert list(component.tensors) == f.offset_keys()  # data order
    info = component.tensors["proj.weight"]
    assert (info.dtype, info.shape, info.file, info.nbytes) == ("BF16", (6, 5), "model.safetensors", 60)
    assert component.tensors["scalar"].shape == ()
    loaded = load_file(tmp_path / "model.safetensors")
    with TensorReader(component) as reader:
        got = dict(reader.iter_tensors())
    assert list(got) == list(component.tensors)
    for key, tensor in loaded.items():
        assert_equal(got[key], tensor, key)
        assert_equal(got[key], expected[key], key)


def test_sharded_round_trip_in_weight_map_order(tmp_path):
    expected = tensors()
    keys = list(expected)
    save_file({k: expected[k] for k in keys[:3]}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: expected[k] for k in keys[3:]}, tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    order = ["scalar", "codes", "proj.weight", "empty", "h", "q8", "proj.bias"]
    weight_map = {k: f"diffusion_pytorch_model-0000{1 if keys.index(k) < 3 else 2}-of-00002.safetensors" for k in order}
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    component = scan_component(tmp_path)
    assert component.sharded and component.base_name == "diffusion_pytorch_model"
    assert list(component.tensors) == order
    assert component.index_metadata == {"total_size": 123}
    assert component.files == sorted(set(weight_map.values()), key=list(weight_map.values()).index)
    assert set(component.file_metadata) == set(weight_map.values())
    with TensorReader(component) as reader:
        for key, tensor in reader.iter_tensors(["q8", "codes"]):
            assert_equal(tensor, expected[key], key)
        assert_equal(reader.read("h"), expected["h"], "h")


def test_writer_output_scans_back(tmp_path):
    groups = [{f"l{i}.weight": torch.randn(8, 8), f"l{i}.bias": torch.randn(8)} for i in range(4)]
    with ShardedWriter(tmp_path, "model", 300) as w:  # 288 bytes a group: one group a shard
        for group in groups:
            w.add_group(group)
    component = scan_component(tmp_path)
    assert component.sharded and len(component.files) == 4
    assert {k: i.file for k, i in component.tensors.items()} == w.weight_map
    with TensorReader(component) as reader:
        for group in groups:
            for key, tensor in group.items():
                assert_equal(reader.read(key), tensor, key)


def test_scan_reads_headers_only(tmp_path):
    """Garbage in the data section changes nothing; a 1 TB tensor in a sparse file scans at once."""
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    infos, _ = safetensors_header(path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    raw = bytearray(path.read_bytes())
    raw[8 + header_len :] = os.urandom(len(raw) - 8 - header_len)
    path.write_bytes(bytes(raw))
    assert scan_component(tmp_path).tensors == infos

    huge = tmp_path / "huge"
    huge.mkdir()
    nbytes = 2**39  # 2**38 bf16 values
    header = json.dumps({"w": entry("BF16", [2**19, 2**19], 0, nbytes)}).encode()
    st_file(huge / "model.safetensors", header)
    with open(huge / "model.safetensors", "r+b") as f:
        f.truncate(8 + len(header) + nbytes)  # a hole: no disk used, and any read would take minutes
    assert scan_component(huge).total_bytes == nbytes


def test_tensors_outlive_reads_and_close(tmp_path):
    expected = tensors()
    save_file(expected, tmp_path / "model.safetensors")
    reader = TensorReader(scan_component(tmp_path))
    first = reader.read("proj.bias")
    for key in expected:
        reader.read(key)
    reader.close()
    assert_equal(first, expected["proj.bias"], "after close")
    first.zero_()  # a private buffer: the file keeps its bytes
    assert_equal(load_file(tmp_path / "model.safetensors")["proj.bias"], expected["proj.bias"], "file")
    with pytest.raises(ValueError, match="closed"):
        reader.read("h")


READ_ALL = """
import resource, sys
from qtool.io import TensorReader, scan_component
weights = scan_component(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with TensorReader(weights) as reader:
    for key, tensor in reader.iter_tensors():
        tensor.sum()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_reading_a_file_holds_about_one_tensor(tmp_path):
    # 16 tensors of 16 MB: a reader that maps the file (safe_open) ends with all 256 MB resident.
    tensor_bytes = 16 * 2**20
    save_file({f"t{i}": torch.full((tensor_bytes // 4,), float(i)) for i in range(16)}, tmp_path / "model.safetensors")
    run = subprocess.run([sys.executable, "-c", READ_ALL, str(tmp_path)], capture_output=True, text=True, check=True)
    growth = int(run.stdout.split()[-1])
    assert growth < 4 * tensor_bytes, f"peak RSS grew by {growth / 2**20:.0f} MB reading 16 x 16 MB"


def test_iter_tensors_prefetches_the_next_tensor(tmp_path, monkeypatch):
    """While a tensor is handed out, the kernel is already asked for the next one's exact byte range; each file is
    declared sequential once, when it is opened."""
    save_file(tensors(), tmp_path / "model.safetensors")
    component = scan_component(tmp_path)
    hints, files = [], []

    def fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_SEQUENTIAL:
            files.append((offset, length))
        else:
            hints.append((offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    keys = list(component.tensors)
    expected = [(t.offset, t.nbytes, os.POSIX_FADV_WILLNEED) for t in component.tensors.values() if t.nbytes]
    expected = expected[1:] if component.tensors[keys[0]].nbytes else expected
    with TensorReader(component) as reader:
        for i, _ in enumerate(reader.iter_tensors()):
            # By the time tensor i is handed out, every later non-empty tensor up to i + 1 has been hinted.
            assert hints == [h for h in expected if h[0] <= component.tensors[keys[min(i + 1, len(keys) - 1)]].offset]
        with pytest.raises(KeyError, match="nope"):
            reader.prefetch("nope")
    assert hints == expected
    assert files == [(0, 0)]  # the whole file


def test_read_into_a_reused_buffer(tmp_path):
    """read(out=...) fills the given buffer and returns a view of it, equal to a plain read; bad buffers are refused."""
    expected = tensors()
    save_file(expected, tmp_path / "model.safetensors")
    component = scan_component(tmp_path)
    staging = torch.full((max(t.nbytes for t in component.tensors.values()),), 0xAB, dtype=torch.uint8)
    with TensorReader(component) as reader:
        for key in component.tensors:
            got = reader.read(key, out=staging)
            assert got.numel() == 0 or got.data_ptr() == staging.data_ptr(), key
            assert_equal(got, expected[key], key)
        for bad, match in [
            (torch.empty(64, dtype=torch.int8), "contiguous 1-D uint8"),
            (torch.empty(8, 8, dtype=torch.uint8), "contiguous 1-D uint8"),
            (torch.empty(128, dtype=torch.uint8)[::2], "contiguous 1-D uint8"),
            (torch.empty(3, dtype=torch.uint8), "holds 3 bytes; 'proj.weight' needs 60"),
        ]:
            with pytest.raises(ValueError, match=match):
                reader.read("proj.weight", out=bad)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_large_read_split_over_threads_equals_a_plain_one(tmp_path, monkeypatch, threads):
    """threads > 1 splits each read of PARALLEL_READ_MIN bytes or more into whole-MiB parts read in parallel, into
    a reused buffer or a fresh one; the bytes equal a one-thread read, and close() ends the helper threads."""
    from qtool.io import reader as reader_module

    monkeypatch.setattr(reader_module, "PARALLEL_READ_MIN", 2**20)
    expected = {"big": torch.randn(5 * 2**20 // 4 + 3), "small": torch.randn(7), "mid": torch.randn(2**20 // 4)}
    save_file(expected, tmp_path / "model.safetensors")
    component = scan_component(tmp_path)
    staging = torch.full((max(t.nbytes for t in component.tensors.values()),), 0xAB, dtype=torch.uint8)
    with TensorReader(component, threads=threads) as reader:
        for key in component.tensors:
            assert_equal(reader.read(key), expected[key], key)
            assert_equal(reader.read(key, out=staging), expected[key], key)
        helpers = [t for t in threading.enumerate() if t.name.startswith("qtool-read")]
        assert 1 <= len(helpers) <= threads - 1
    assert not [t for t in threading.enumerate() if t.name.startswith("qtool-read") and t.is_alive()]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        TensorReader(component, threads=0)


def test_a_file_truncated_under_a_split_read_is_named(tmp_path, monkeypatch):
    """A file cut short after the scan: the split read notices the missing part, whichever thread reads it."""
    from qtool.io import reader as reader_module

    monkeypatch.setattr(reader_module, "PARALLEL_READ_MIN", 2**20)
    save_file({"big": torch.randn(4 * 2**20)}, tmp_path / "model.safetensors")
    component = scan_component(tmp_path)
    with TensorReader(component, threads=4) as reader:
        reader.read("big")  # opens the file and checks its header
        os.truncate(tmp_path / "model.safetensors", (tmp_path / "model.safetensors").stat().st_size - 2**20 - 5)
        with pytest.raises(QtoolError, match="the file ends inside tensor 'big'"):
            reader.read("big")


def test_read_unknown_key(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    with TensorReader(scan_component(tmp_path)) as reader, pytest.raises(KeyError, match="nope"):
        reader.read("nope")


def test_read_notices_a_file_changed_after_scan(tmp_path):
    save_file({"a": torch.ones(4)}, tmp_path / "model.safetensors")
    component = scan_component(tmp_path)
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    with TensorReader(component) as reader, pytest.raises(QtoolError, match="changed since the scan"):
        reader.read("a")


# --- choosing the weight file -----------------------------------------------------------------------------------


def touch_st(path: Path) -> None:
    save_file({"x": torch.zeros(1)}, path)


def test_prefers_standard_name_over_variant(tmp_path):
    touch_st(tmp_path / "model.safetensors")
    touch_st(tmp_path / "model.fp16.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    component = scan_component(tmp_path)
    assert component.files == ["model.safetensors"] and component.base_name == "model"


def test_a_lone_variant_is_used_under_the_standard_base_name(tmp_path):
    touch_st(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    component = scan_component(tmp_path)
    assert component.files == ["diffusion_pytorch_model.fp16.safetensors"]
    assert component.base_name == "diffusion_pytorch_model"


@pytest.mark.parametrize(
    "names",
    [
        ["model.safetensors", "diffusion_pytorch_model.safetensors"],
        ["model.safetensors", "model.safetensors.index.json"],
        ["model.fp16.safetensors", "model.bf16.safetensors"],
    ],
)
def test_ambiguous_weights(tmp_path, names):
    for name in names:
        if name.endswith(".json"):
            (tmp_path / name).write_text('{"weight_map": {"x": "model.safetensors"}}')
        else:
            touch_st(tmp_path / name)
    with pytest.raises(QtoolError, match="several weight files") as e:
        scan_component(tmp_path)
    assert all(name in e.value.message for name in names)


def test_pickled_weights_only(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QtoolError, match="diffusion_pytorch_model.bin") as e:
        scan_component(tmp_path)
    assert "never unpickles" in e.value.hint and "safetensors" in e.value.hint


@pytest.mark.parametrize(
    "files, message",
    [
        ([], "no \\*.safetensors weights"),
        (["model-00001-of-00002.safetensors"], "no \\*.safetensors.index.json"),
    ],
)
def test_no_weights(tmp_path, files, message):
    for name in files:
        touch_st(tmp_path / name)
    with pytest.raises(QtoolError, match=message):
        scan_component(tmp_path)


def test_not_a_folder(tmp_path):
    with pytest.raises(QtoolError, match="not a folder"):
        scan_component(tmp_path / "missing")


# --- malformed indexes ------------------------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


def write_index(folder: Path, weight_map: dict, raw: str | None = None) -> None:
    text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / INDEX).write_text(text)


@pytest.mark.parametrize("name", ["../model-00001-of-00001.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_path_outside_the_folder(tmp_path, name):
    write_index(tmp_path, {"x": name})
    with pytest.raises(QtoolError, match=INDEX) as e:
        scan_component(tmp_path)
    assert repr(name) in e.value.message


def test_index_names_a_missing_shard(tmp_path):
    touch_st(tmp_path / "model-00001-of-00002.safetensors")
    write_index(tmp_path, {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"})
    with pytest.raises(QtoolError, match="model-00002-of-00002.safetensors is missing"):
        scan_component(tmp_path)


@pytest.mark.parametrize("raw", ["{not json", "[]", '{"weight_map": {}}', '{"weight_map": {"x": 3}}'])
def test_index_malformed(tmp_path, raw):
    write_index(tmp_path, {}, raw=raw)
    with pytest.raises(QtoolError, match=INDEX):
        scan_component(tmp_path)


def test_index_nested_too_deeply(tmp_path):
    # Python's json raised RecursionError here (found by tests/faults/test_fuzz_headers.py).
    write_index(tmp_path, {}, raw="[" * 100_000 + "]" * 100_000)
    with pytest.raises(QtoolError, match=f"{INDEX}: not valid JSON"):
        scan_component(tmp_path)


@pytest.mark.parametrize(
    "name, message",
    [("x" * 300, "cannot read shard x+: File name too long"), ("a\nb", "not a file name"), ("\u2028", "not a file")],
    ids=["too_long", "newline", "line_separator"],
)
def test_index_names_an_impossible_file(tmp_path, name, message):
    """A name the file system refuses raised OSError; one with a line break made a two-line message (fuzz)."""
    write_index(tmp_path, {"x": name})
    with pytest.raises(QtoolError, match=message) as e:
        scan_component(tmp_path)
    assert INDEX in e.value.message and len(e.value.message.splitlines()) == 1


def test_index_and_shards_disagree(tmp_path):
    shard = "model-00001-of-00001.safetensors"
    save_file({"x": torch.zeros(1), "extra": torch.zeros(1)}, tmp_path / shard)
    write_index(tmp_path, {"x": shard, "ghost": shard})
    with pytest.raises(QtoolError, match=f"{INDEX}.*'ghost'.*{shard}"):
        scan_component(tmp_path)
    write_index(tmp_path, {"x": shard})
    with pytest.raises(QtoolError, match=f"{shard}: tensor 'extra' is not mapped"):
        scan_component(tmp_path)


# --- malformed safetensors files --------------------------------------------------------------------------------

F32x2 = entry("F32", [2], 0, 8)

# (case, header, data, declared header length or None, expected message). safetensors refuses each case too, except a
# repeated key: it keeps the last entry, which hides which one the writer meant.
CORRUPT = [
    ("truncated", b"", b"", None, "truncated"),
    ("header_longer_than_file", b"{}", b"", 1000, "larger than the file"),
    ("not_json", b"{nope", b"", None, "not valid JSON"),
    ("not_utf8", b'{"\xff": 1}', b"", None, "not valid JSON"),
    ("not_an_object", b"[1, 2]", b"", None, "not a JSON object"),
    ("duplicate_key", b'{"a": %s, "a": %s}' % ((json.dumps(F32x2).encode(),) * 2), bytes(8), None, "duplicate key 'a'"),
    ("unknown_dtype", {"a": entry("F12", [2], 0, 8)}, bytes(8), None, "'a': unknown dtype tag 'F12'"),
    ("size_mismatch", {"a": entry("F32", [3], 0, 8)}, bytes(8), None, "'a': shape \\[3\\] x F32 is 12 bytes"),
    ("negative_shape", {"a": entry("F32", [-2], 0, 8)}, bytes(8), None, "'a': shape"),
    (
        "offsets_reversed",
        {"a": entry("F32", [2], 8, 0)},
        bytes(8),
        None,
        "'a': data_offsets \\[8, 0\\] are out of order",
    ),
    ("outside_file", {"a": entry("F32", [4], 0, 16)}, bytes(8), None, "'a': data_offsets \\[0, 16\\] lie outside"),
    ("overlap", {"a": F32x2, "b": entry("F32", [2], 4, 12)}, bytes(12), None, "'b' overlaps tensor 'a'"),
    ("gap", {"a": F32x2, "b": entry("F32", [1], 12, 16)}, bytes(16), None, "gap of 4 bytes before tensor 'b'"),
    ("trailing_bytes", {"a": F32x2}, bytes(12), None, "data section has 12 bytes but the tensors cover only 8"),
    ("metadata_not_text", {"__metadata__": {"n": 1}, "a": F32x2}, bytes(8), None, "__metadata__"),
    # Found by tests/faults/test_fuzz_headers.py: Python's json accepts these, serde_json (safetensors) does not.
    ("metadata_not_an_object", {"__metadata__": [], "a": F32x2}, bytes(8), None, "__metadata__"),
    ("nan", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}', bytes(8), None, "NaN"),
    ("out_of_range", b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "x": 1e400}}', b"", None, "range"),
    ("minus_zero", b'{"a": {"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}}', b"", None, "'a': shape"),
    ("lone_surrogate", b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', b"", None, "surrogate"),
    ("too_deep", {"a": entry("U8", [0], 0, 0) | {"x": [[[]]]}}, b"", None, "nested more than 127"),
    ("recursion", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "nested more than 127"),
    ("shape_overflow", {"a": entry("U8", [2**63, 2, 0], 0, 0)}, b"", None, "'a': shape .* overflows"),
    ("dim_beyond_u64", {"a": entry("U8", [0, 2**64], 0, 0)}, b"", None, "'a': shape .* overflows"),
]


@pytest.mark.parametrize("case, header, data, header_len, message", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_file(tmp_path, case, header, data, header_len, message):
    if case == "too_deep":  # 128 levels: the header, the entry, 126 nested lists
        header = json.dumps(header).encode().replace(b"[[[]]]", b"[" * 126 + b"]" * 126)
    path = st_file(tmp_path / "model.safetensors", header, data, header_len)
    if case == "truncated":
        path.write_bytes(b"\x05\x00\x00")
    with pytest.raises(QtoolError, match=message) as e:
        scan_component(tmp_path)
    assert str(path) in e.value.message
    if case != "duplicate_key":
        # Otherwise scan is no stricter than safetensors: whatever it refuses, safe_open refuses too.
        with pytest.raises(SafetensorError):
            safe_open(path, framework="pt")


def test_json_nesting_limit_is_safetensors(tmp_path):
    """127 levels pass (both here and in safe_open); test_corrupt_file's too_deep case is one more."""
    header = json.dumps({"a": entry("U8", [0], 0, 0) | {"x": [[[]]]}}).encode()
    st_file(tmp_path / "model.safetensors", header.replace(b"[[[]]]", b"[" * 125 + b"]" * 125))
    assert list(scan_component(tmp_path).tensors) == ["a"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert list(f.keys()) == ["a"]


@pytest.mark.parametrize(
    "dtype, shape, nbytes, message",
    [
        ("F4", [2, 3], 3, "F4 of shape \\[2, 3\\]: torch packs F4 in pairs"),
        ("F4", [0, 3], 0, "F4 of shape \\[0, 3\\]: torch packs F4 in pairs"),
        ("U8", [2**63, 0], 0, "beyond torch's int64 sizes"),
        ("F4", [2**63, 0], 0, "beyond torch's int64 sizes"),
        ("U8", [0, 2**62, 2], 0, "torch refuses it \\(Stride calculation overflowed\\)"),
    ],
    ids=["f4_odd_last_dim", "f4_odd_last_dim_empty", "dim_beyond_int64", "f4_dim_beyond_int64", "strides_overflow"],
)
def test_read_refuses_what_torch_cannot_hold(tmp_path, dtype, shape, nbytes, message):
    """Valid headers (safe_open opens them) that no torch tensor can match: torch raised RuntimeError or TypeError
    from reshape, or an empty F4 tensor came back with a wrong shape (found by tests/faults/test_fuzz_headers.py)."""
    path = st_file(tmp_path / "model.safetensors", {"t": entry(dtype, shape, 0, nbytes)}, bytes(nbytes))
    component = scan_component(tmp_path)
    with TensorReader(component) as reader, pytest.raises(QtoolError, match=message) as e:
        reader.read("t")
    assert str(path) in e.value.message
    with safe_open(path, framework="pt") as f, pytest.raises(Exception):  # noqa: B017 - torch's or safetensors'
        f.get_tensor("t")


def test_read_takes_f4_dims_as_torch_holds_them(tmp_path):
    """An F4 dim of 2**63 is 2**62 torch elements: safetensors reads it, so qtool must too (found by the fuzz)."""
    path = st_file(tmp_path / "model.safetensors", {"t": entry("F4", [0, 2**63], 0, 0)})
    with TensorReader(scan_component(tmp_path)) as reader:
        got = reader.read("t")
    with safe_open(path, framework="pt") as f:
        want = f.get_tensor("t")
    assert got.dtype == want.dtype == torch.float4_e2m1fn_x2 and got.shape == want.shape == (0, 2**62)


def test_corrupt_shard_is_named(tmp_path):
    shard = "model-00002-of-00002.safetensors"
    touch_st(tmp_path / "model-00001-of-00002.safetensors")
    st_file(tmp_path / shard, {"y": entry("F32", [2], 0, 8)}, bytes(4))
    write_index(tmp_path, {"x": "model-00001-of-00002.safetensors", "y": shard})
    with pytest.raises(QtoolError, match=f"{shard}: tensor 'y'.*outside"):
        scan_component(tmp_path)
