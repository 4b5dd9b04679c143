"""Seeded fuzz of qtool's safetensors reader: 2000 corrupted checkpoints, each judged against safetensors.

Each case starts from a small valid file written by ``safetensors.torch.save_file`` (or a sharded folder: index + 2
shards), corrupts it (bytes of the length prefix or of the JSON header, truncation, header lengths up to 2**64 - 1,
structured JSON changes, raw JSON tokens Python's json takes but JSON does not, repeated keys, deep nesting, invalid
UTF-8, index faults), then runs ``scan_component`` and reads every tensor with ``TensorReader``. Allowed outcomes:

- ``QtoolError`` with a one-line message naming the file (the folder or index for index faults); nothing else may
  escape (ValueError, KeyError, RecursionError, OverflowError, torch's errors, ...);
- success, and then safetensors (``safe_open`` and ``load_file``) accepts the files too and every tensor is equal bit
  for bit (and in dtype and shape) to safetensors'.

qtool is stricter than safetensors on one documented rule only, repeated keys (safetensors keeps the last); for a
sharded folder also where the index and the shards disagree (safetensors has no notion of an index). Any other case
that safetensors accepts and qtool refuses fails the test.

Reproduce a case: each has its own ``random.Random(f"{seed}/{i}")``, so case i is the same in any run; a failure
message gives seed, index and mutations. QTOOL_FUZZ_SEED, QTOOL_FUZZ_CASES and QTOOL_FUZZ_SECONDS change the seed,
the number of cases and the time after which no new case starts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import resource
import shutil
import signal
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qtool.errors import QtoolError
from qtool.io import TensorReader, safetensors_header, scan_component
from qtool.io.reader import MAX_HEADER_BYTES, SAFETENSORS_DTYPES

SEED = int(os.environ.get("QTOOL_FUZZ_SEED", "20250611"))
# About a millisecond a case (2 CPU cores): 2000 cases take a few seconds, the budget is for slow machines.
CASES = int(os.environ.get("QTOOL_FUZZ_CASES", "2000"))
BUDGET_S = float(os.environ.get("QTOOL_FUZZ_SECONDS", "20"))
MIN_CASES = min(200, CASES)
CASE_TIMEOUT_S = 10  # one case takes milliseconds; a hang fails the test instead of stalling it

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


# --- base checkpoints -------------------------------------------------------------------------------------------


@dataclass
class Base:
    """A valid safetensors file, split into its parsed header (in file order) and its data section."""

    name: str
    header: dict
    data: bytes

    @property
    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]


def split(path: Path, name: str) -> Base:
    """The file's header and data, the header in a fixed order (metadata first and sorted, then tensors by offset):
    safetensors writes both in hash-map order, which changes from run to run and would make the cases change too."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    order = sorted(header, key=lambda k: (k != "__metadata__", header[k].get("data_offsets", []), k))
    return Base(name, {k: header[k] for k in order}, blob[8 + n :])


def random_tensors(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "mixed": {
            "w.bf16": torch.randn(3, 2, generator=g).bfloat16(),
            "h.f16": torch.randn(4, generator=g).half(),
            "p.f32": torch.randn(2, 2, generator=g),
            "idx.i64": torch.randint(-(2**40), 2**40, (3,), generator=g),
            "mask.bool": torch.rand(5, generator=g) > 0.5,
            "codes.u8": torch.randint(0, 256, (7,), dtype=torch.uint8, generator=g),
            "empty": torch.zeros(0, 3),
            "scalar": torch.tensor(2.5),
        },
        "small": {"a": torch.randint(0, 256, (4,), dtype=torch.uint8, generator=g), "b": torch.tensor(-1.0)},
        "empties": {
            "e1": torch.zeros(0, dtype=torch.bfloat16),
            "e2": torch.zeros(2, 0, dtype=torch.int64),
            "x": torch.randn(1, generator=g).half(),
        },
        "nothing": {},
        "shard1": {"s1.a": torch.randn(2, 3, generator=g), "s1.b": torch.randn(4, generator=g).bfloat16()},
        "shard2": {
            "s2.a": torch.randint(0, 9, (2,), generator=g),
            "s2.b": torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g),
            "s2.e": torch.zeros(0),
        },
    }


@dataclass
class Bases:
    singles: list[Base]
    shards: dict[str, Base]  # shard file name -> its base
    index: dict


def make_bases(folder: Path, seed: int) -> Bases:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(seed)
    metadata = {"mixed": {"format": "pt", "note": "fuzz base"}, "shard2": {"format": "pt"}}
    bases = {}
    for name, group in tensors.items():
        save_file(group, folder / f"{name}.safetensors", metadata=metadata.get(name))
        bases[name] = split(folder / f"{name}.safetensors", name)
    weight_map = {k: SHARDS[0] for k in tensors["shard1"]} | {k: SHARDS[1] for k in tensors["shard2"]}
    total = sum(t.nbytes for k in ("shard1", "shard2") for t in tensors[k].values())
    return Bases(
        singles=[bases[n] for n in ("mixed", "small", "empties", "nothing")],
        shards={SHARDS[0]: bases["shard1"], SHARDS[1]: bases["shard2"]},
        index={"metadata": {"total_size": total}, "weight_map": weight_map},
    )


# --- mutations --------------------------------------------------------------------------------------------------

# Raw JSON tokens, spliced into the serialized header where a placeholder string stood. Many are Python-json-only
# (NaN, -0 as an int, lone surrogates, 1e400) or not JSON at all.
NUMBER_TOKENS = [
    b"NaN", b"Infinity", b"-Infinity", b"-0", b"-0.0", b"0.0", b"2.0", b"1e400", b"-1e400", b"1e308", b"1e2",
    b"1" + b"0" * 308, b"1" + b"0" * 309, b"1" + b"0" * 30, b"1" + b"0" * 5000, b"18446744073709551615",
    b"18446744073709551616", b"9223372036854775808", b"-1", b"0x10", b"+1", b"01", b"1.", b".5", b"true", b"null",
    b"[]", b"{}", b"0e999999999999999999", b"1e-400", b"1E400", b"-0e0", b"1.7976931348623159e308",
]  # fmt: skip
STRING_TOKENS = [
    b'"\\ud800"', b'"x\\udc00"', b'"\\uDBFF\\u0041"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"a\x00b"', b'"\xff"',
    b'"\xed\xa0\x80"', b'"\xc3\x28"', b'"\xf4\x90\x80\x80"', b'"tab\there"', b'"new\nline"', b'"\\x41"', b"'single'",
    b'"\\u00e9t\xc3\xa9"', b'"ok"', b'"\\u"', b'"unterminated',
]  # fmt: skip
DEPTHS = [1, 2, 60, 120, 124, 125, 126, 127, 128, 130, 1000, 5000, 100_000]
# Bytes written over header bytes: JSON structure, NUL, invalid UTF-8 starts.
HEADER_BYTES = b'\x00\xff\x80\xc3\xed"{}[],: \\\n-0e.'
# Tags grouped by bits per element, for wrong-size and same-size dtype changes.
TAG_BITS = {tag: bits for tag, (bits, _) in SAFETENSORS_DTYPES.items()}


def nested(rng: random.Random, depth: int) -> bytes:
    if rng.random() < 0.5:
        return b"[" * depth + b"]" * depth
    return b'{"n":' * depth + b"1" + b"}" * depth


TEXT_KINDS = ["leading_ws", "trailing_ws", "bom", "nul_pad", "insert", "delete", "replace", "comma"]
BYTE_KINDS = ["prefix_bitflip", "prefix_byte", "header_bitflip", "header_byte", "data_bitflip", "truncate", "length"]
BYTE_KINDS += ["append"]


class Mutator:
    """Builds one corrupted file from a base; ``labels`` names what was done, for counts and failure messages."""

    def __init__(self, rng: random.Random, base: Base):
        self.rng = rng
        self.base = base
        self.header: object = copy.deepcopy(base.header)
        self.data = base.data
        self.tokens: dict[str, bytes] = {}  # placeholder -> raw JSON text
        self.labels: list[str] = []

    # helpers ------------------------------------------------------------------------------------------------------

    def placeholder(self, token: bytes) -> str:
        name = f"@@P{len(self.tokens)}@@"
        self.tokens[name] = token
        return name

    def entries(self) -> list[str]:
        h = self.header
        return [k for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)] if isinstance(h, dict) else []

    def entry(self) -> tuple[str, dict] | None:
        keys = self.entries()
        if not keys:
            return None
        key = self.rng.choice(keys)
        return key, self.header[key]

    # dict-stage mutations: each returns False when it does not apply -----------------------------------------------

    def dtype_unknown(self) -> bool:
        if (e := self.entry()) is None:
            return False
        e[1]["dtype"] = self.rng.choice(["F12", "f32", "", "BF16 ", "FLOAT32", "F8", "I4", 3, None, ["F32"], True])
        return True

    def dtype_wrong_size(self) -> bool:
        if (e := self.entry()) is None or not isinstance(e[1].get("dtype"), str) or e[1]["dtype"] not in TAG_BITS:
            return False
        bits = TAG_BITS[e[1]["dtype"]]
        e[1]["dtype"] = self.rng.choice([t for t, b in TAG_BITS.items() if b != bits])
        return True

    def retag(self) -> bool:
        """Any tag with a shape of the same byte size: valid for safetensors (torch may still lack the dtype)."""
        if (e := self.entry()) is None:
            return False
        entry = e[1]
        offsets = entry.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            return False
        nbytes = offsets[1] - offsets[0]
        if not 0 <= nbytes <= len(self.data):  # a span an earlier mutation made huge has no useful shapes
            return False
        rng = self.rng
        choices = [t for t, b in TAG_BITS.items() if (8 * nbytes) % b == 0]
        tag = rng.choice(choices)
        numel = 8 * nbytes // TAG_BITS[tag]
        if numel == 0:
            # Huge dims with a 0: fine for safetensors' header check; torch takes some (int64 sizes and strides).
            shape = rng.choice(
                [[0], [rng.randint(1, 5), 0], [0, rng.randint(1, 5)], [2**63 - 1, 0], [0, 2**63], [2**62, 2, 0]]
                + [[0, 2**62, 2], [0, 2**62, 4], [0, 3, 2**62], [0, 2**32, 2**32 - 1], [2**62, 4, 0]]
            )
        else:
            splits = [[numel], [numel, 1], [1, numel]]
            splits += [[a, numel // a] for a in range(2, numel + 1) if numel % a == 0]
            shape = rng.choice(splits)
        entry["dtype"], entry["shape"] = tag, shape
        return True

    def shape_bad(self) -> bool:
        if (e := self.entry()) is None:
            return False
        shape = e[1].get("shape")
        dims = list(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else [2]
        rng = self.rng
        options = [
            [-1] + dims,
            [-2**63],
            [float(d) for d in dims] or [1.0],
            [str(d) for d in dims] or ["1"],
            [True] + dims,
            [2**64] + dims,
            [2**64 - 1] + dims,
            [2**63, 2, 0],
            [0, 2**64],
            [2**32, 2**32, 0],
            [2**63] * 3000 + [0],
            [dims],
            None,
            {},
            "2",
            dims + [2],
            dims[1:],
            [],
        ]  # fmt: skip
        e[1]["shape"] = rng.choice(options)
        return True

    def shape_same_size(self) -> bool:
        if (e := self.entry()) is None or not isinstance(e[1].get("shape"), list):
            return False
        dims = e[1]["shape"]
        e[1]["shape"] = self.rng.choice([[1] + dims, dims + [1], dims[::-1], [*dims, 1, 1]])
        return True

    def offsets_bad(self) -> bool:
        if (e := self.entry()) is None:
            return False
        offsets = e[1].get("data_offsets")
        valid = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        b, end = offsets if valid else (0, 4)
        k = self.rng.randint(1, 9)
        options = [
            [end, b],
            [b, end + k],
            [b + k, end + k],
            [max(b - k, 0), end],
            [b, end, end],
            [b],
            [],
            [float(b), float(end)],
            [-k, end],
            [b, -k],
            [False, True],
            [str(b), str(end)],
            None,
            {"begin": b, "end": end},
            [2**64, 2**64],
            [b, 2**64 - 1],
            [2**63, 2**63 + 4],
        ]
        e[1]["data_offsets"] = self.rng.choice(options)
        return True

    def field_removed(self) -> bool:
        if (e := self.entry()) is None:
            return False
        e[1].pop(self.rng.choice(["dtype", "shape", "data_offsets"]), None)
        return True

    def field_added(self) -> bool:
        """An unknown field: safetensors ignores it, so a plain value keeps the file valid."""
        if (e := self.entry()) is None:
            return False
        value = self.rng.choice([1, "x", None, True, 2.5, [1, [2, {"a": None}]], {"nested": {"b": []}}, 10**30, {}])
        e[1][self.rng.choice(["extra", "dtype ", "Shape", "__metadata__", ""])] = value
        return True

    def entry_not_object(self) -> bool:
        if (e := self.entry()) is None:
            return False
        self.header[e[0]] = self.rng.choice([1, "F32", None, [e[1]], True, []])
        return True

    def tensor_removed(self) -> bool:
        if (e := self.entry()) is None:
            return False
        del self.header[e[0]]
        return True

    def tensor_added(self) -> bool:
        if not isinstance(self.header, dict):
            return False
        n = len(self.data)
        k = self.rng.randint(0, 4)
        entry = self.rng.choice(
            [
                {"dtype": "U8", "shape": [k], "data_offsets": [n, n + k]},
                {"dtype": "U8", "shape": [0], "data_offsets": [n, n]},
                {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
            ]
        )
        self.header[self.rng.choice(["new", "", "ünï", "a\u0000b", "__metadata__ "])] = entry
        if entry["data_offsets"][0] == n and self.rng.random() < 0.7:
            self.data += bytes(range(k))
        return True

    def tensor_renamed(self) -> bool:
        if (e := self.entry()) is None:
            return False
        new = self.rng.choice(["renamed", "", " ", "é", "😀", "a\u0000b", "x" * 300, "line\nbreak"])
        if new in self.header:
            return False
        self.header = {new if k == e[0] else k: v for k, v in self.header.items()}
        return True

    def entries_shuffled(self) -> bool:
        if not isinstance(self.header, dict) or len(self.header) < 2:
            return False
        items = list(self.header.items())
        self.rng.shuffle(items)
        self.header = dict(items)
        return True

    def metadata_bad(self) -> bool:
        if not isinstance(self.header, dict):
            return False
        options = [{"a": 1}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}}, {"a": True}, [], 0, "", False, None, {}]
        options += ["pt", [["a", "b"]], {"a": "b", "c": "d"}, {"": ""}]
        self.header["__metadata__"] = self.rng.choice(options)
        return True

    def metadata_removed(self) -> bool:
        if not isinstance(self.header, dict) or "__metadata__" not in self.header:
            return False
        del self.header["__metadata__"]
        return True

    def header_replaced(self) -> bool:
        self.header = self.rng.choice([[], 0, "x", None, True, [1, 2], {}, 1.5, [{}]])
        return True

    def raw_token(self) -> bool:
        """A raw JSON token where a dim, an offset, a dtype, an unknown field, a metadata value or a key stood."""
        rng = self.rng
        token = rng.choice(NUMBER_TOKENS + STRING_TOKENS)
        spot = rng.choice(["dim", "offset", "dtype", "field", "metadata", "key"])
        e = self.entry()
        if spot == "key" or e is None:
            if not isinstance(self.header, dict) or not token.startswith(b'"'):
                return False
            entry = e[1] if e else {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
            self.header = {**self.header, self.placeholder(token): copy.deepcopy(entry)}
            if e:
                del self.header[e[0]]
        elif spot == "dim" and isinstance(e[1].get("shape"), list) and e[1]["shape"]:
            e[1]["shape"][rng.randrange(len(e[1]["shape"]))] = self.placeholder(token)
        elif spot == "offset" and isinstance(e[1].get("data_offsets"), list) and e[1]["data_offsets"]:
            e[1]["data_offsets"][rng.randrange(len(e[1]["data_offsets"]))] = self.placeholder(token)
        elif spot == "dtype":
            e[1]["dtype"] = self.placeholder(token)
        elif spot == "metadata":
            self.header["__metadata__"] = {"k": self.placeholder(token)}
        else:
            e[1]["extra"] = self.placeholder(token)
        self.labels.append(f"token={token[:12]!r}@{spot}")
        return True

    def deep_nesting(self) -> bool:
        """Nested arrays or objects in an unknown field, or as the whole header (serde_json stops at 128 levels)."""
        depth = self.rng.choice(DEPTHS)
        e = self.entry()
        if e is None or self.rng.random() < 0.25:
            self.header = self.placeholder(nested(self.rng, depth))
        else:
            e[1]["extra"] = self.placeholder(nested(self.rng, depth))
        self.labels.append(f"depth={depth}")
        return True

    def duplicate_key(self) -> bool:
        """A key written twice, by splicing raw text (a dict cannot hold it): tensor, field, metadata or nested."""
        if (e := self.entry()) is None:
            return False
        key, entry = e
        where = self.rng.choice(["tensor", "tensor_changed", "field", "metadata", "nested"])
        if where.startswith("tensor"):
            twin = copy.deepcopy(entry)
            if where == "tensor_changed":
                twin["dtype"] = "U8" if twin.get("dtype") != "U8" else "I8"
            self.header[self.placeholder(json.dumps(key).encode())] = twin
        elif where == "field":
            self.header[key] = {self.placeholder(b'"dtype"'): entry.get("dtype"), **entry}
        elif where == "metadata":
            meta = self.header.get("__metadata__")
            meta = meta if isinstance(meta, dict) and meta else {"format": "pt"}
            first = next(iter(meta))
            self.header["__metadata__"] = {**meta, self.placeholder(json.dumps(first).encode()): "again"}
        else:
            entry["extra"] = {"q": 1, self.placeholder(b'"q"'): 2}
        self.labels.append(f"dup={where}")
        return True

    # text-stage mutations (on the serialized header) -------------------------------------------------------------

    def text_mutation(self, text: bytes) -> bytes:
        rng = self.rng
        kind = rng.choice(TEXT_KINDS)
        self.labels.append(f"text:{kind}")
        pos = rng.randrange(len(text) + 1)
        if kind == "leading_ws":
            return rng.choice([b" ", b"\t", b"\n", b"\r\n", b"    "]) + text
        if kind == "trailing_ws":
            return text + rng.choice([b" ", b"\t\n", b"        "])
        if kind == "bom":
            return b"\xef\xbb\xbf" + text
        if kind == "nul_pad":
            return text + b"\x00" * rng.randint(1, 8)
        if kind == "insert":
            return text[:pos] + bytes([rng.choice(HEADER_BYTES)]) + text[pos:]
        if kind == "delete":
            return text[:pos] + text[pos + 1 :]
        if kind == "replace":
            return text[:pos] + bytes([rng.choice(HEADER_BYTES)]) + text[pos + 1 :]
        return text[:-1] + b",}" if text.endswith(b"}") else text + b","  # trailing comma

    # file-stage mutations (on the whole file) --------------------------------------------------------------------

    def byte_mutation(self, blob: bytes, header_len: int) -> bytes:
        rng = self.rng
        kind = rng.choice(BYTE_KINDS + ["length"])
        b = bytearray(blob)
        header_end = min(8 + header_len, len(b))
        if kind == "prefix_bitflip":
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(8)] ^= 1 << rng.randrange(8)
        elif kind == "prefix_byte":
            b[rng.randrange(8)] = rng.randrange(256)
        elif kind in ("header_bitflip", "header_byte") and header_end > 8:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(8, header_end)
                b[i] = b[i] ^ (1 << rng.randrange(8)) if kind == "header_bitflip" else rng.choice(HEADER_BYTES)
        elif kind == "data_bitflip" and len(b) > header_end:
            i = rng.randrange(header_end, len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            region = rng.choice(["prefix", "header", "data"])
            lo, hi = {"prefix": (0, 8), "header": (8, header_end), "data": (header_end, len(b))}[region]
            kind = f"truncate_{region}"
            if hi > lo:
                del b[rng.randrange(lo, hi) :]
        elif kind == "length":
            size = len(b)
            value = rng.choice(
                [
                    header_len + rng.randint(-16, 16),
                    size - 8 + rng.randint(-3, 3),
                    size,
                    2 * size,
                    0,
                    1,
                    2**32,
                    MAX_HEADER_BYTES - 1,
                    MAX_HEADER_BYTES,
                    MAX_HEADER_BYTES + 1,
                    2**63 - 1,
                    2**63,
                    2**64 - 1,
                    rng.getrandbits(64),
                ]
            )
            b[:8] = max(value, 0).to_bytes(8, "little")
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            kind = "append"
        self.labels.append(f"bytes:{kind}")
        return bytes(b)

    DICT_MUTATIONS = (
        "dtype_unknown dtype_wrong_size retag shape_bad shape_same_size offsets_bad field_removed field_added"
        " entry_not_object tensor_removed tensor_added tensor_renamed entries_shuffled metadata_bad metadata_removed"
        " header_replaced raw_token raw_token deep_nesting duplicate_key"
    ).split()

    def build(self) -> bytes:
        rng = self.rng
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            name = rng.choice(self.DICT_MUTATIONS)
            if getattr(self, name)():
                self.labels.append(name)
        text = json.dumps(
            self.header, separators=rng.choice([(",", ":"), (", ", ": ")]), ensure_ascii=rng.random() < 0.5
        ).encode("utf-8", "surrogatepass")
        for name, token in self.tokens.items():
            text = text.replace(json.dumps(name).encode(), token)
        if rng.random() < 0.2:
            text = self.text_mutation(text)
        if rng.random() < 0.4:
            text += b" " * (-len(text) % 8)  # safetensors' own padding
        header_len = len(text)
        if rng.random() < 0.1:
            header_len = max(0, header_len + rng.choice([-2, -1, 1, 2, 8]))
            self.labels.append("length_off")
        blob = header_len.to_bytes(8, "little") + text + self.data
        if not self.labels or rng.random() < 0.3:
            blob = self.byte_mutation(blob, header_len)
        return blob


INDEX_MUTATIONS = [
    "dotdot", "absolute", "absolute_real", "subdir", "backslash", "drive", "missing_shard", "special_name",
    "not_safetensors", "wrong_shard", "drop_key", "ghost_key", "value_type", "weight_map_type", "no_weight_map",
    "not_object", "metadata", "truncated", "invalid_utf8", "deep", "duplicate_key", "reordered",
]  # fmt: skip


def mutate_index(rng: random.Random, index: dict, folder: Path) -> tuple[bytes, str]:
    index = copy.deepcopy(index)
    wm = index["weight_map"]
    key = rng.choice(list(wm))
    kind = rng.choice(INDEX_MUTATIONS)
    other = SHARDS[1] if wm[key] == SHARDS[0] else SHARDS[0]
    raw = None
    if kind == "dotdot":
        wm[key] = "../" + wm[key]
    elif kind == "absolute":
        wm[key] = rng.choice(["/etc/passwd", "/" + wm[key]])
    elif kind == "absolute_real":
        wm[key] = str(folder / wm[key])  # the right file, by an absolute path: still refused
    elif kind == "subdir":
        wm[key] = "sub/" + wm[key]
    elif kind == "backslash":
        wm[key] = "..\\" + wm[key]
    elif kind == "drive":
        wm[key] = "C:" + wm[key]
    elif kind == "missing_shard":
        wm[key] = "model-00003-of-00003.safetensors"
    elif kind == "special_name":
        wm[key] = rng.choice(["", ".", "..", "a\nb", "a\x00b", "x" * 300, " " + wm[key], "\u2028", "\udcff"])
    elif kind == "not_safetensors":
        wm[key] = "config.json"
    elif kind == "wrong_shard":
        wm[key] = other
    elif kind == "drop_key":
        del wm[key]
    elif kind == "ghost_key":
        wm["ghost"] = wm[key]
    elif kind == "value_type":
        wm[key] = rng.choice([3, None, [wm[key]], {"f": wm[key]}, True])
    elif kind == "weight_map_type":
        index["weight_map"] = rng.choice([[], "x", None, 3, {}, list(wm.items())])
    elif kind == "no_weight_map":
        del index["weight_map"]
    elif kind == "not_object":
        index = rng.choice([[], "x", 3, None, [index]])
    elif kind == "metadata":
        index["metadata"] = rng.choice([[1], "x", 3, None, {}, {"total_size": -1}, []])
    elif kind == "truncated":
        text = json.dumps(index).encode()
        raw = text[: rng.randrange(len(text))]
    elif kind == "invalid_utf8":
        text = json.dumps(index).encode()
        pos = rng.randrange(len(text))
        raw = text[:pos] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + text[pos:]
    elif kind == "deep":
        depth = rng.choice([50, 5000, 100_000])
        raw = json.dumps(index).encode()[:-1] + b', "deep": ' + nested(rng, depth) + b"}"
        kind = f"deep={depth}"
    elif kind == "duplicate_key":
        raw = json.dumps(index).encode()
        raw = raw.replace(b'"weight_map": {', b'"weight_map": {%s: "%s", ' % (json.dumps(key).encode(), other.encode()))
    else:
        items = list(wm.items())
        rng.shuffle(items)
        index["weight_map"] = dict(items)
    if raw is None:
        raw = json.dumps(index, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    return raw, f"index:{kind}"


@dataclass
class Case:
    i: int
    files: dict[str, bytes]  # file name -> content, written into a fresh folder
    target: str  # the file the fault was put in
    labels: list[str]
    sharded: bool = False

    def describe(self, seed: int) -> str:
        return f"seed={seed} case={self.i} target={self.target} mutations={self.labels}"


def make_case(seed: int, i: int, bases: Bases, folder: Path) -> Case:
    """Case ``i`` of ``seed``: a function of both only (and of the bases, themselves made from the seed)."""
    rng = random.Random(f"{seed}/{i}")
    if rng.random() < 0.8:
        mutator = Mutator(rng, rng.choice(bases.singles))
        blob = mutator.build()
        return Case(i, {SINGLE: blob}, SINGLE, [f"base={mutator.base.name}", *mutator.labels])
    files = {name: assemble(b) for name, b in bases.shards.items()}
    files["config.json"] = b"{}"
    if rng.random() < 0.6:
        files[INDEX], label = mutate_index(rng, bases.index, folder)
        return Case(i, files, INDEX, [label], sharded=True)
    files[INDEX] = json.dumps(bases.index).encode()
    shard = rng.choice(SHARDS)
    mutator = Mutator(rng, bases.shards[shard])
    files[shard] = mutator.build()
    return Case(i, files, shard, [f"base={mutator.base.name}", *mutator.labels], sharded=True)


def assemble(base: Base) -> bytes:
    text = json.dumps(base.header).encode()
    return len(text).to_bytes(8, "little") + text + base.data


# --- the oracle -------------------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the per-case alarm; a BaseException so that no ``except Exception`` under test swallows it."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Turn a hang into a failure (where SIGALRM exists and this is the main thread; elsewhere no guard)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"no outcome after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def qtool_read(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """qtool's view: every tensor, read one by one, and each file's metadata."""
    component = scan_component(folder)
    with TensorReader(component) as reader:
        tensors = dict(reader.iter_tensors())
    return tensors, component.file_metadata


def safetensors_read(path: Path) -> tuple[dict[str, torch.Tensor], dict] | BaseException:
    """safetensors' view of one file (safe_open and load_file must both accept it), or why it refuses."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
        loaded = load_file(path)
        if set(loaded) != set(tensors):
            return AssertionError(f"load_file gives {sorted(loaded)}, safe_open {sorted(tensors)}")
        return tensors, metadata
    except (KeyboardInterrupt, CaseTimeout):
        raise
    except BaseException as e:  # SafetensorError, torch's TypeError, pyo3's PanicException (a BaseException)
        return e


def has_duplicate_keys(path: Path) -> bool:
    """Whether a file's header (valid JSON, as safetensors accepted it) names some key twice, at any level."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    found = []

    def pairs(items):
        keys = [k for k, _ in items]
        found.append(len(keys) != len(set(keys)))
        return dict(items)

    json.loads(blob[8 : 8 + n], object_pairs_hook=pairs)
    return any(found)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


@dataclass
class Verdict:
    outcome: str = ""  # "accepted", "refused", or "stricter:<rule>" (safetensors accepts, qtool refuses by rule)
    problems: list[str] = field(default_factory=list)


def judge(case: Case, folder: Path, read: Callable = qtool_read) -> Verdict:
    """Run qtool's reader on the case's folder and check the outcome against safetensors (see the module doc)."""
    verdict = Verdict()
    try:
        with deadline(CASE_TIMEOUT_S):
            got, metadata = read(folder)
        error = None
    except QtoolError as e:
        error = e
    except CaseTimeout as e:
        verdict.problems.append(f"hang: {e}")
        return verdict
    except BaseException as e:  # noqa: B036 - whatever escapes is the finding (RecursionError, MemoryError, ...)
        if isinstance(e, KeyboardInterrupt):
            raise
        verdict.problems.append(f"{type(e).__name__} escaped: {str(e)[:300]}")
        return verdict

    if error is not None:
        message = error.message
        lines = message.splitlines()
        if not message.strip() or len(lines) != 1 or str(error) != message:
            verdict.problems.append(f"QtoolError message is not one non-empty line: {message[:300]!r}")
        # A shard's fault may show as the index disagreeing with it; an index may name any path (the folder's).
        named = [str(folder / case.target)] + ([str(folder / INDEX)] if case.sharded else [])
        named += [str(folder)] if case.target == INDEX else []
        if not any(name in message for name in named):
            verdict.problems.append(f"QtoolError does not name {case.target}: {message[:300]!r}")

    if case.sharded:
        expected, reference, duplicates = sharded_reference(folder)
    else:
        st = safetensors_read(folder / SINGLE)
        expected = not isinstance(st, BaseException)
        reference = {SINGLE: st} if expected else {}
        duplicates = expected and has_duplicate_keys(folder / SINGLE)

    if error is not None:
        if not expected:
            verdict.outcome = "refused"
        elif duplicates:
            verdict.outcome = "stricter:duplicate keys"
        else:
            verdict.problems.append(f"safetensors accepts what qtool refuses: {error.message[:300]}")
        return verdict

    verdict.outcome = "accepted"
    if not expected:
        why = "" if case.sharded else f": {type(st).__name__}: {str(st)[:200]}"
        verdict.problems.append(f"qtool accepts what safetensors refuses{why}")
        return verdict
    want = {k: t for tensors, _ in reference.values() for k, t in tensors.items()}
    if set(got) != set(want):
        verdict.problems.append(f"qtool read keys {sorted(got)[:10]}, safetensors {sorted(want)[:10]}")
    for key in set(got) & set(want):
        a, b = got[key], want[key]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(bits(a), bits(b)):
            verdict.problems.append(f"tensor {key!r}: qtool {a.dtype} {list(a.shape)}, safetensors differs")
    for name, (_, meta) in reference.items():
        if metadata.get(name, {}) != meta:
            verdict.problems.append(f"{name}: metadata {metadata.get(name)} != safetensors' {meta}")
    return verdict


def sharded_reference(folder: Path) -> tuple[bool, dict, bool]:
    """Whether a careful loader should accept a sharded folder, judged without qtool: the index is a JSON object
    whose non-empty weight_map maps every key to a file written into the folder, safetensors accepts each file
    named, and each file's keys are exactly those mapped to it. Returns that, safetensors' view of each file, and
    whether some file named has repeated keys."""
    try:
        index = json.loads((folder / INDEX).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        return False, {}, False
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return False, {}, False
    if index.get("metadata") and not isinstance(index["metadata"], dict):
        return False, {}, False
    written = {p.name for p in folder.iterdir()}
    if not all(isinstance(n, str) and n in written for n in weight_map.values()):
        return False, {}, False
    names = set(weight_map.values())
    reference, duplicates = {}, False
    for name in names:
        st = safetensors_read(folder / name)
        if isinstance(st, BaseException):
            return False, {}, False
        reference[name] = st
        duplicates |= has_duplicate_keys(folder / name)
        if set(st[0]) != {k for k, n in weight_map.items() if n == name}:
            return False, {}, duplicates
    return True, reference, duplicates


def write_case(case: Case, folder: Path) -> None:
    folder.mkdir()
    for name, blob in case.files.items():
        (folder / name).write_bytes(blob)


def run_fuzz(root: Path, seed: int, cases: int, budget_s: float) -> tuple[Counter, Counter, list[str], int, float]:
    bases = make_bases(root / "bases", seed)
    outcomes, kinds, failures = Counter(), Counter(), []
    start = time.monotonic()
    ran = 0
    for i in range(cases):
        if time.monotonic() - start > budget_s:
            break
        folder = root / f"case{i:04d}"
        case = make_case(seed, i, bases, folder)
        write_case(case, folder)
        verdict = judge(case, folder)
        ran += 1
        outcomes[verdict.outcome or "broken"] += 1
        kinds.update(label.split("=")[0] for label in case.labels if not label.startswith("base="))
        if verdict.problems:
            failures.append(f"{case.describe(seed)}: {'; '.join(verdict.problems)}")
        shutil.rmtree(folder)
    return outcomes, kinds, failures, ran, time.monotonic() - start


# --- tests ------------------------------------------------------------------------------------------------------


def test_fuzzed_headers_fail_cleanly_or_read_as_safetensors_does(tmp_path):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes, kinds, failures, ran, elapsed = run_fuzz(tmp_path, SEED, CASES, BUDGET_S)
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    report = (
        f"seed {SEED}: {ran} of {CASES} cases in {elapsed:.1f} s; outcomes {dict(outcomes)};"
        f" peak RSS grew {rss_growth_mb:.0f} MB; mutation kinds {dict(sorted(kinds.items()))}"
    )
    assert not failures, f"{len(failures)} failing cases ({report}):\n" + "\n".join(failures[:20])
    assert ran >= MIN_CASES, f"only {ran} cases within {BUDGET_S} s (need {MIN_CASES}): {report}"
    # Both outcomes must be well represented, or the fuzz tests one side only.
    assert outcomes["accepted"] >= ran // 10 and outcomes["refused"] >= ran // 2, report
    # qtool is stricter than safetensors on repeated keys only (any other disagreement is a failure above).
    assert set(outcomes) <= {"accepted", "refused", "stricter:duplicate keys"}, report
    if ran >= 1000:
        # Every kind of mutation ran (a kind that never applies would be dead code in the fuzz).
        expected = set(Mutator.DICT_MUTATIONS) | {f"text:{k}" for k in TEXT_KINDS}
        expected |= {f"bytes:{k}" for k in BYTE_KINDS if k != "truncate"} | {f"index:{k}" for k in INDEX_MUTATIONS}
        expected |= {f"bytes:truncate_{region}" for region in ("prefix", "header", "data")}
        assert expected <= set(kinds), f"never ran: {sorted(expected - set(kinds))}; {report}"
        assert outcomes["stricter:duplicate keys"] > 0, report
    assert rss_growth_mb < 300, report


def test_fuzz_cases_are_deterministic(tmp_path):
    a = make_bases(tmp_path / "a", SEED)
    b = make_bases(tmp_path / "b", SEED)
    for i in range(40):
        assert make_case(SEED, i, a, tmp_path / "x").files == make_case(SEED, i, b, tmp_path / "x").files, i
    assert any(make_case(SEED, i, a, tmp_path).files != make_case(SEED + 1, i, a, tmp_path).files for i in range(5))


def test_the_oracle_catches_wrong_outcomes(tmp_path):
    """The fuzz can fail: a refusal and an acceptance are recognised, and each kind of wrong reader is caught."""
    bases = make_bases(tmp_path / "bases", SEED)
    mixed = bases.singles[0]
    good = assemble(mixed)
    u8 = json.dumps({"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}).encode()
    files = {
        "good": good,
        "flipped_data": good[:-20] + bytes([good[-20] ^ 1]) + good[-19:],
        "truncated": good[:20],
        "length_2**64-1": (2**64 - 1).to_bytes(8, "little") + good[8:],
        "nan": st_bytes(b'{"a":%s}' % u8.replace(b"}", b', "x": NaN}'), b"\1"),
        "duplicate": st_bytes(b'{"a":%s,"a":%s}' % (u8, u8), b"\1"),
    }
    cases = {name: Case(i, {SINGLE: blob}, SINGLE, [name]) for i, (name, blob) in enumerate(files.items())}
    outcome = {}
    for name, case in cases.items():
        write_case(case, tmp_path / name)
        verdict = judge(case, tmp_path / name)
        assert not verdict.problems, (name, verdict.problems)
        outcome[name] = verdict.outcome
    assert outcome == {
        "good": "accepted",
        "flipped_data": "accepted",
        "truncated": "refused",
        "length_2**64-1": "refused",
        "nan": "refused",
        "duplicate": "stricter:duplicate keys",
    }

    def flips_a_bit(folder):
        tensors, metadata = qtool_read(folder)
        key = next(k for k, t in tensors.items() if t.numel())
        bits(tensors[key])[0] ^= 1
        return tensors, metadata

    def raises(error):
        def read(folder):
            raise error

        return read

    def drops_metadata(folder):
        return qtool_read(folder)[0], {}

    def accepts_anything(folder):
        return {}, {}

    wrong_readers = {
        "flips a bit": (flips_a_bit, "good", "safetensors differs"),
        "ValueError": (raises(ValueError("bad")), "truncated", "ValueError escaped"),
        "RecursionError": (raises(RecursionError()), "good", "RecursionError escaped"),
        "two lines": (raises(QtoolError(f"{tmp_path / 'truncated' / SINGLE}:\nbad")), "truncated", "one non-empty"),
        "no file name": (raises(QtoolError("header is bad")), "truncated", "does not name"),
        "refuses a good file": (raises(QtoolError(f"{tmp_path / 'good' / SINGLE}: no")), "good", "safetensors accepts"),
        "accepts a bad file": (accepts_anything, "truncated", "qtool accepts what safetensors refuses"),
        "loses tensors": (accepts_anything, "good", "qtool read keys"),
        "loses metadata": (drops_metadata, "good", "metadata"),
    }
    for name, (reader, case_name, problem) in wrong_readers.items():
        verdict = judge(cases[case_name], tmp_path / case_name, read=reader)
        assert any(problem in p for p in verdict.problems), (name, verdict.problems)


def st_bytes(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def test_huge_header_lengths_are_refused_without_allocating(tmp_path):
    """Header lengths at or past safetensors' 100 MB limit are refused before any read of that size: in a tiny
    file, and in a sparse file large enough to hold the header (which takes no disk)."""
    tiny = tmp_path / "tiny" / SINGLE
    sparse = tmp_path / "sparse" / SINGLE
    for path in (tiny, sparse):
        path.parent.mkdir()
    cases = [
        (tiny, MAX_HEADER_BYTES - 1, 0, "larger than the file"),
        (tiny, MAX_HEADER_BYTES + 1, 0, "larger than the file"),
        (tiny, 2**64 - 1, 0, "larger than the file"),
        (sparse, MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES + 64, "exceeds safetensors' limit"),
        (sparse, 2**63, MAX_HEADER_BYTES + 64, "larger than the file"),
    ]
    for path, header_len, size, message in cases:
        path.write_bytes(header_len.to_bytes(8, "little") + b"{}")
        if size:
            with open(path, "r+b") as f:
                f.truncate(size)  # a hole: no disk used
        tracemalloc.start()
        try:
            try:
                safetensors_header(path)
            except QtoolError as e:
                error = e
            else:
                raise AssertionError(f"header length {header_len} accepted")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert message in error.message and str(path) in error.message, error.message
        assert peak < 2**20, f"header length {header_len}: {peak} bytes allocated to refuse it"
        assert isinstance(safetensors_read(path), BaseException), "safetensors accepts it"
