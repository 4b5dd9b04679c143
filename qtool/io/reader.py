"""Find a component's safetensors weights, list its tensors from the headers alone, and read tensors one at a time.

The read half of ``qtool.io``. ``scan_component`` parses headers (never tensor data) and checks them as strictly as
safetensors does (stricter on repeated keys), so a broken checkpoint fails at once, naming the file and tensor,
instead of halfway through a conversion. ``TensorReader`` then reads tensors one by one into private buffers. It
never reads pickled checkpoints (``.bin``, ``.pt``, ...): a pickle can run code.
Format: the safetensors spec (8-byte little-endian header length, JSON header, data section).

Why not ``safetensors.safe_open``: it maps the whole file, and every page a conversion touches stays resident in
that mapping until the file is closed. Reading a 3 GB file tensor by tensor through it measured 3.1 GB peak RSS
(2 CPU cores, safetensors 0.7); reading each tensor with ``pread`` into its own buffer, freed when the caller drops
it, keeps the peak at about one tensor. The header parsing here is complete anyway, so the reads are a few lines."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch

from qtool.errors import QtoolError

# Base names that diffusers (``diffusion_pytorch_model``) and transformers (``model``) save under.
STANDARD_BASE_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype tag -> (bits per element, torch dtype name or None where torch has none). Sub-byte tags count
# logical elements in the header shape (two F4 values per byte), so sizes are computed in bits.
SAFETENSORS_DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"),
    "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "C64": (64, "complex64"),
    "F64": (64, "float64"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
}

# safetensors refuses headers above 100 MB (a guard against hostile files); refusing them here keeps scan and
# safe_open in agreement.
MAX_HEADER_BYTES = 100_000_000
# serde_json, which safetensors parses headers with, refuses JSON nested deeper than this (objects and arrays
# together, the header object counting as one level). Python's json goes on to the interpreter's recursion limit
# and then raises RecursionError, so without this check a header could pass here and fail in safe_open.
MAX_JSON_DEPTH = 127
# safetensors reads shapes and offsets as 64-bit unsigned integers and multiplies a shape's dims in them, left to
# right, refusing the header on overflow (even when a later dim is 0).
_U64_MAX = 2**64 - 1
# torch sizes are signed 64-bit: a dim above this (possible only in a 0-element tensor) cannot be a torch shape.
_TORCH_DIM_MAX = 2**63 - 1

# Reads at least this large are split over ``TensorReader(threads=...)``: one thread copies from the page cache at
# 13 GB/s, two at 15.5 GB/s (a 2 GB file, warm cache, into a reused buffer, 2 CPU cores); below a few MB the hand-off
# costs more than it saves.
PARALLEL_READ_MIN = 16 * 2**20

_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
_INDEX_NAME = re.compile(r"^(?P<stem>.+)\.safetensors\.index(?:\.[^.]+)?\.json$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it.

    Attributes:
        key: the state-dict key, e.g. ``transformer_blocks.0.attn.to_q.weight``.
        dtype: the safetensors dtype tag, e.g. ``"BF16"``, ``"F32"``, ``"U8"``, ``"I8"``.
        shape: the header shape (``()`` for a 0-d tensor).
        file: the file holding it, a plain file name relative to the component folder.
        nbytes: size of its data in bytes.
        offset: where its data starts in the file, in bytes from the file's start (-1 where unknown, e.g. for a
            header read over HTTP); not part of equality.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    nbytes: int
    offset: int = field(default=-1, compare=False)


@dataclass
class ComponentWeights:
    """The safetensors weights of one component folder (``transformer/``, ``text_encoder_2/``, ...), headers only.

    Attributes:
        folder: the component folder.
        base_name: ``"diffusion_pytorch_model"`` or ``"model"`` (the file-name stem without shard or variant
            suffixes), the name to write converted weights under.
        tensors: key -> info in checkpoint order: the index's weight_map order for a sharded checkpoint, data order
            (ascending offset) for a single file.
        sharded: whether the weights came from a ``*.safetensors.index.json``.
        index_metadata: the index's ``"metadata"`` object, or ``{}``.
        file_metadata: file name -> that file's ``__metadata__`` (``{}`` where it has none).
    """

    folder: Path
    base_name: str
    tensors: dict[str, TensorInfo]
    sharded: bool
    index_metadata: dict = field(default_factory=dict)
    file_metadata: dict[str, dict] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Sum of all tensors' data sizes in bytes (headers not counted)."""
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def files(self) -> list[str]:
        """The weight file names, in the order their first tensor appears in ``tensors``."""
        return list(dict.fromkeys(info.file for info in self.tensors.values()))


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys silently; a header naming a tensor twice is corrupt.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _json_int(text: str) -> int | float:
    # serde_json reads "-0" as a float (so not a valid dim or offset to safetensors) and refuses integers beyond the
    # float range; Python's json makes both plain ints.
    if text == "-0":
        return -0.0
    if len(text) > 300 and math.isinf(float(text)):
        raise ValueError(f"number {text[:20]}... is out of range")
    return int(text)


def _json_float(text: str) -> float:
    # Python's json turns 1e400 into inf; serde_json refuses it.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _json_constant(name: str) -> float:
    # NaN, Infinity and -Infinity are a Python extension to JSON; serde_json refuses them.
    raise ValueError(f"{name} is not JSON")


def _too_deep(value: object, limit: int) -> bool:
    """Whether JSON ``value`` nests objects and arrays more than ``limit`` levels deep (iteratively: no recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _load_json(raw: bytes) -> object:
    """Parse a safetensors header as serde_json (safetensors' parser) would, refusing what it refuses.

    Python's json is more lenient in ways that matter here, each closed below: NaN/Infinity and out-of-range
    numbers, "-0" as an integer, lone UTF-16 surrogates in ``\\u`` escapes, and nesting past serde_json's limit
    (deeper still, Python raises RecursionError). Repeated keys are refused, which safetensors does not do.

    Raises:
        ValueError: (UnicodeDecodeError included) for anything serde_json would refuse, or a repeated key.
    """
    text = raw.decode("utf-8")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    if _too_deep(value, MAX_JSON_DEPTH):
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if "\\u" in text:
        # Only a \u escape can make a lone surrogate (the bytes were valid UTF-8); Rust strings cannot hold one.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a \\u escape encodes a lone UTF-16 surrogate") from None
    return value


def _brief(value: object) -> str:
    # A hostile header can hold a megabyte-long "dtype"; messages quote the start of it.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    # JSON true/false parse to bool, which is an int subclass in Python.
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, key: str, entry: object, data_start: int, data_len: int) -> tuple[TensorInfo, int]:
    """Check one header entry; return its info and its data start offset (relative to the data section)."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise QtoolError(f"{where}: header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise QtoolError(f"{where}: unknown dtype tag {_brief(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise QtoolError(f"{where}: shape {_brief(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise QtoolError(f"{where}: data_offsets {_brief(offsets)} is not a pair of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise QtoolError(f"{where}: data_offsets [{begin}, {end}] are out of order")
    if end > data_len:
        raise QtoolError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the file's {data_len}-byte data section"
            " (is the file truncated?)"
        )
    numel = 1
    bits = SAFETENSORS_DTYPES[dtype][0]
    for d in shape:
        numel *= d
        # Checked at each step, as safetensors does; it also keeps a long shape from making huge Python ints.
        if d > _U64_MAX or numel > _U64_MAX:
            raise QtoolError(f"{where}: shape {_brief(shape)} overflows a 64-bit element count")
    if numel * bits > _U64_MAX:
        raise QtoolError(f"{where}: shape {_brief(shape)} x {dtype} overflows a 64-bit size in bits")
    if numel * bits != 8 * (end - begin):
        raise QtoolError(
            f"{where}: shape {_brief(shape)} x {dtype} is {numel * bits / 8:g} bytes"
            f" but data_offsets span {end - begin}"
        )
    info = TensorInfo(
        key=key, dtype=dtype, shape=tuple(shape), file=path.name, nbytes=end - begin, offset=data_start + begin
    )
    return info, begin


def safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and check one safetensors file's header, reading no tensor data.

    The checks are those safetensors applies when it opens a file: the header fits in the file, is JSON as
    safetensors' parser reads it (see ``_load_json``) and an object, each dtype tag is known, each shape times its
    item size equals its offset span (without overflowing 64 bits), and the tensors tile the data section exactly
    (no overlap, no gap, nothing left over). Repeated keys are refused too, which safetensors lets pass.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(infos, metadata)``: key -> TensorInfo in data order (ascending offset; header order breaks ties between
        empty tensors), and the header's ``__metadata__`` (str -> str; ``{}`` when absent).

    Raises:
        QtoolError: naming the file (and the tensor where one is at fault) for any malformed header.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise QtoolError(f"{path}: truncated safetensors file ({size} bytes, not even the header length)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                raise QtoolError(f"{path}: header length {header_len} is larger than the file ({size} bytes)")
            if header_len > MAX_HEADER_BYTES:
                raise QtoolError(f"{path}: header length {header_len} exceeds safetensors' limit {MAX_HEADER_BYTES}")
            raw = f.read(header_len)
    except OSError as e:
        raise QtoolError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = _load_json(raw)
    except ValueError as e:  # UnicodeDecodeError is one
        raise QtoolError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise QtoolError(f"{path}: header is not a JSON object")

    # null counts as absent (safetensors reads an optional object); [], 0 or "" do not.
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QtoolError(f"{path}: __metadata__ must map strings to strings")

    data_len = size - 8 - header_len
    parsed = [_parse_entry(path, key, entry, 8 + header_len, data_len) for key, entry in header.items()]
    # Python's sort is stable, so empty tensors sharing an offset keep their header order.
    parsed.sort(key=lambda item: (item[1], item[1] + item[0].nbytes))
    expected, previous = 0, None
    for info, begin in parsed:
        if begin < expected:
            raise QtoolError(f"{path}: tensor {info.key!r} overlaps tensor {previous!r} in the data section")
        if begin > expected:
            raise QtoolError(f"{path}: gap of {begin - expected} bytes before tensor {info.key!r} in the data section")
        expected, previous = begin + info.nbytes, info.key
    if expected != data_len:
        raise QtoolError(f"{path}: the data section has {data_len} bytes but the tensors cover only {expected}")
    return {info.key: info for info, _ in parsed}, dict(metadata)


def _base_name(stem: str) -> str:
    # "model.fp16" (a variant) writes back as "model"; other stems are kept whole.
    for base in STANDARD_BASE_NAMES:
        if stem.startswith(base + "."):
            return base
    return stem


def _find_weight_file(folder: Path) -> str:
    """Pick the one index or single safetensors file that holds the component's weights."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    indexes = [n for n in names if _INDEX_NAME.match(n)]
    singles = [n for n in names if n.endswith(".safetensors") and not _SHARD_SUFFIX.search(n)]
    candidates = indexes + singles
    standard_names = {f"{b}.safetensors" for b in STANDARD_BASE_NAMES}
    standard_names |= {f"{b}.safetensors.index.json" for b in STANDARD_BASE_NAMES}
    standard = [n for n in candidates if n in standard_names]
    if len(standard) == 1:
        return standard[0]
    if len(standard) > 1 or len(candidates) > 1:
        found = ", ".join(standard or candidates)
        raise QtoolError(
            f"{folder}: several weight files ({found}); cannot tell which one holds the weights",
            hint="keep one checkpoint per component folder (move the others out)",
        )
    if candidates:
        return candidates[0]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise QtoolError(
            f"{folder}: only pickled weights ({', '.join(pickles)}); qtool reads safetensors only",
            hint="qtool never unpickles (a pickle can run arbitrary code): convert the checkpoint to safetensors"
            " first, e.g. load it with from_pretrained and save_pretrained(..., safe_serialization=True)",
        )
    if any(_SHARD_SUFFIX.search(n) for n in names):
        raise QtoolError(f"{folder}: safetensors shards but no *.safetensors.index.json to say what they hold")
    raise QtoolError(f"{folder}: no *.safetensors weights")


def _check_shard_name(index: Path, name: object) -> str:
    # Shards live beside their index; anything else could read files outside the folder. Unprintable names (a
    # newline, NUL, a lone surrogate) are no real shard's and would break the one-line messages that quote them.
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or ":" in name
        or not name.isprintable()
    ):
        raise QtoolError(
            f"{index}: weight_map names {name!r}, which is not a file name in the index's folder",
            hint="an index may only name shards that sit next to it",
        )
    return name


def _scan_sharded(folder: Path, index_name: str) -> ComponentWeights:
    index_path = folder / index_name
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QtoolError(f"{index_path}: cannot read: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack allows
        raise QtoolError(f"{index_path}: not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise QtoolError(f"{index_path}: no weight_map object")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise QtoolError(f"{index_path}: metadata is not a JSON object")

    shard_names = list(dict.fromkeys(_check_shard_name(index_path, name) for name in weight_map.values()))
    headers: dict[str, dict[str, TensorInfo]] = {}
    file_metadata: dict[str, dict] = {}
    for name in shard_names:
        try:
            found = (folder / name).is_file()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise QtoolError(f"{index_path}: cannot read shard {name}: {e.strerror or e}") from e
        if not found:
            raise QtoolError(
                f"{index_path}: shard {name} is missing", hint="download the whole folder again (all shards)"
            )
        headers[name], file_metadata[name] = safetensors_header(folder / name)

    tensors: dict[str, TensorInfo] = {}
    for key, name in weight_map.items():
        info = headers[name].get(key)
        if info is None:
            raise QtoolError(f"{index_path}: maps tensor {key!r} to {name}, which has no such tensor")
        tensors[key] = info
    for name, infos in headers.items():
        for key in infos:
            if weight_map.get(key) != name:
                raise QtoolError(f"{folder / name}: tensor {key!r} is not mapped to this file by {index_name}")
    stem = _INDEX_NAME.match(index_name)["stem"]
    return ComponentWeights(
        folder=folder,
        base_name=_base_name(stem),
        tensors=tensors,
        sharded=True,
        index_metadata=dict(metadata),
        file_metadata=file_metadata,
    )


def scan_component(folder: Path) -> ComponentWeights:
    """List a component's tensors from its safetensors headers, reading no tensor data.

    Finds ``*.safetensors.index.json`` (sharded) or a single ``*.safetensors``. With several candidates, the
    standard names (``diffusion_pytorch_model.*``, ``model.*``) win over variants such as ``model.fp16.safetensors``;
    two standard ones, or several non-standard ones, are ambiguous.

    Args:
        folder: a component folder, e.g. ``<snapshot>/transformer``.

    Returns:
        The component's weights (headers only), in checkpoint order.

    Raises:
        QtoolError: no weights, only pickled weights, ambiguous weights, an index naming a missing shard or a path
            outside the folder, or a malformed header; the message names the file (and tensor).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QtoolError(f"{folder}: not a folder")
    name = _find_weight_file(folder)
    if _INDEX_NAME.match(name):
        return _scan_sharded(folder, name)
    infos, metadata = safetensors_header(folder / name)
    return ComponentWeights(
        folder=folder,
        base_name=_base_name(name.removesuffix(".safetensors")),
        tensors=infos,
        sharded=False,
        index_metadata={},
        file_metadata={name: metadata},
    )


class TensorReader:
    """Reads a component's tensors one at a time, each into its own buffer.

    Each file is opened on its first read (and its header checked against the scan, so a file replaced since
    ``scan_component`` fails instead of giving wrong tensors), with the kernel told it will be read sequentially,
    and kept open until ``close()``. A returned tensor owns its memory: it stays valid after later reads and after
    ``close()``, writing to it never changes the file, and dropping it frees it. Resident memory is what the caller
    keeps, never the file.

    Use as a context manager::

        with TensorReader(scan_component(folder)) as reader:
            for key, tensor in reader.iter_tensors():
                ...

    One thread at a time may call ``read``; with ``threads > 1`` a large read is split over that many threads
    (``PARALLEL_READ_MIN``), which ``close()`` ends.
    """

    def __init__(self, component: ComponentWeights, threads: int = 1):
        """
        Args:
            component: from ``scan_component``.
            threads: threads per large read (``os.preadv`` releases the GIL, so they copy in parallel).
        """
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.component = component
        self.threads = threads
        self._fds: dict[str, int] = {}
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every open file and end the helper threads. Tensors already returned stay valid."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        self._closed = True

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                return fd
            path = self.component.folder / name
            infos, _ = safetensors_header(path)
            scanned = {k: i for k, i in self.component.tensors.items() if i.file == name}
            if any(infos.get(k) != info or infos[k].offset != info.offset for k, info in scanned.items()):
                raise QtoolError(f"{path}: the file changed since the scan", hint="run the command again")
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise QtoolError(f"{path}: cannot open: {e.strerror or e}") from e
            if hasattr(os, "posix_fadvise"):
                # A larger readahead window: tensors are read front to back, mostly in file order.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[name] = fd
            return fd

    def _read_into(self, fd: int, view: memoryview, offset: int) -> bool:
        """Fill ``view`` from ``fd`` at ``offset``; False if the file ends first. Large reads are split over the
        helper threads; every part has finished (or failed) when this returns or raises."""
        n = len(view)
        parts = self.threads if n >= PARALLEL_READ_MIN else 1
        if parts == 1:
            return _pread_all(fd, view, offset)
        step = -(-n // parts)
        step += -step % 2**20  # whole MiB per part
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="qtool-read")
        futures = [self._pool.submit(_pread_all, fd, view[a : a + step], offset + a) for a in range(step, n, step)]
        error: BaseException | None = None
        complete = False
        try:
            complete = _pread_all(fd, view[:step], offset)
        except BaseException as exc:
            error = exc
        # The helpers write into the caller's buffer: wait for each, even when this part failed or was interrupted.
        for future in futures:
            result, failure = _settle(future)
            error = error or failure
            complete = complete and bool(result)
        if error is not None:
            raise error
        return complete

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor.

        Args:
            key: a key of ``component.tensors``.
            out: a staging buffer to read into instead of a new one: a contiguous 1-D uint8 CPU tensor of at least
                the tensor's size, e.g. pinned memory for fast copies to a GPU. The result is then a view of it,
                valid until the buffer's next use. Reusing one buffer is what makes reads fast: a fresh buffer of
                100 MB is page-faulted in as it fills, which measured 2.5 GB/s from the page cache against 20 GB/s
                into a reused one (2 CPU cores).

        Returns:
            The tensor on the CPU, with the dtype and shape of its header entry (F4 is read as torch's packed
            ``float4_e2m1fn_x2``, half the last dimension).

        Raises:
            ValueError: ``out`` is not a large enough contiguous 1-D uint8 CPU tensor.
            KeyError: the key is not in the component.
            QtoolError: the file cannot be read, no longer matches the scanned header, or holds a dtype or shape
                this torch build cannot hold (an odd last dim of F4, dims beyond int64).
        """
        if self._closed:
            raise ValueError("read from a closed TensorReader")
        info = self.component.tensors.get(key)
        if info is None:
            raise KeyError(f"{key!r} is not a tensor of {self.component.folder}")
        path = self.component.folder / info.file
        bits, torch_name = SAFETENSORS_DTYPES[info.dtype]
        dtype = getattr(torch, torch_name, None) if torch_name else None
        if dtype is None:
            raise QtoolError(f"{path}: tensor {key!r} is {info.dtype}, which torch {torch.__version__} cannot hold")
        # The torch shape. The two refusals below pass safetensors' header checks; its get_tensor refuses them too.
        shape = list(info.shape)
        if bits == 4 and shape:
            if shape[-1] % 2:
                raise QtoolError(
                    f"{path}: tensor {key!r} is F4 of shape {_brief(list(info.shape))}: torch packs F4 in pairs"
                    " along the last dim, which must be even"
                )
            shape[-1] //= 2  # torch's float4_e2m1fn_x2 packs two values per element
        if any(d > _TORCH_DIM_MAX for d in shape):
            raise QtoolError(f"{path}: tensor {key!r} has shape {_brief(list(info.shape))}, beyond torch's int64 sizes")
        if out is None:
            buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("out must be a contiguous 1-D uint8 CPU tensor")
        elif out.numel() < info.nbytes:
            raise ValueError(f"out holds {out.numel()} bytes; {key!r} needs {info.nbytes}")
        else:
            buffer = out[: info.nbytes]
        fd = self._fd(info.file)
        try:
            complete = self._read_into(fd, memoryview(buffer.numpy()), info.offset)
        except OSError as e:
            raise QtoolError(f"{path}: cannot read tensor {key!r}: {e.strerror or e}") from e
        if not complete:
            raise QtoolError(f"{path}: the file ends inside tensor {key!r} (truncated since the scan?)")
        try:
            return buffer.view(dtype).reshape(shape)
        except RuntimeError as e:
            # Only an empty tensor gets here (others have a product of dims the file holds): its dims can still
            # overflow torch's int64 strides, e.g. [0, 2**62, 2], which safetensors' get_tensor refuses too.
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise QtoolError(
                f"{path}: tensor {key!r} of shape {_brief(list(info.shape))}: torch refuses it ({reason})"
            ) from e

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading ``key``'s bytes into the page cache now, without waiting for them.

        A conversion calls this for the next tensor before working on the current one, so that disk reads overlap
        the work (on a cold cache the reads are most of a conversion's time). It costs no process memory: page
        cache is not resident memory of this process. A no-op where the OS has no ``posix_fadvise``.
        """
        info = self.component.tensors.get(key)
        if info is None:
            raise KeyError(f"{key!r} is not a tensor of {self.component.folder}")
        if hasattr(os, "posix_fadvise") and info.nbytes:
            os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)

    def iter_tensors(
        self, keys: Iterable[str] | None = None, out: torch.Tensor | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time, the next tensor prefetched while the caller works on this one.

        Args:
            keys: which tensors, in which order; default: all, in checkpoint order.
            out: a staging buffer, as for ``read``: each yielded tensor is then a view of it, valid until the next.

        Yields:
            ``(key, tensor)`` as ``read`` returns it. Holding on to earlier tensors is the caller's choice; the
            reader keeps none.
        """
        keys = list(self.component.tensors if keys is None else keys)
        for i, key in enumerate(keys):
            if i + 1 < len(keys):
                self.prefetch(keys[i + 1])
            yield key, self.read(key, out=out)


def _pread_all(fd: int, view: memoryview, offset: int) -> bool:
    """Read ``len(view)`` bytes at ``offset`` into ``view``; False if the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            return False
        done += n
    return True


def _settle(future: Future) -> tuple[object, BaseException | None]:
    """``(result, exception)`` of a future, waiting for it to finish even through a signal (a helper thread may
    still be writing into the caller's buffer)."""
    interrupted = None
    while True:
        try:
            return future.result(), interrupted
        except BaseException as exc:
            if future.done():
                return None, interrupted or exc
            interrupted = interrupted or exc
