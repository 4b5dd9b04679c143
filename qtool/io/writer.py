"""Write a component's tensors as size-capped safetensors shards plus an index, holding about one tensor in memory.

``ShardedWriter`` takes groups of tensors (a quantized layer's weight with all its companions, or one plain tensor),
keeps each group in a single shard (diffusers' 4-bit loader looks for the companions in the weight's shard), and
lays each shard out exactly as ``safetensors.torch.save_file`` would: the output is byte-identical to
``save_pretrained(max_shard_size=...)`` of the same state dict. It is not a general safetensors library: it writes
whole-byte dtypes only, and does not deduplicate tensors that share storage.

save_file's layout (by dtype, then key, behind a header that lists every offset) is known only once a shard's last
tensor is. Told nothing in advance, the writer spools tensor bytes to disk as they arrive and copies them into place
when a shard is complete: every byte is written twice. Told the groups to come (``plan``), it computes the layout
first and writes each tensor at its final place as it arrives (``os.pwrite``): once.
"""

from __future__ import annotations

import bisect
import errno
import json
import math
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from qtool.io.reader import SAFETENSORS_DTYPES

# The order of safetensors' Rust `Dtype` enum (0.8.0). save_file lays data out by this order, descending, then by
# key (byte-wise, which for str is code-point order): U64 I64 F64 C64 F32 U32 I32 BF16 F16 U16 I16 F8_* I8 U8 BOOL.
# Measured by saving one tensor of every torch dtype under shuffled keys; it is the enum's declaration order, not
# the item size (C64, 8 bytes, sorts after F64 and before F32).
LAYOUT_ORDER = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)
_LAYOUT_RANK = {tag: rank for rank, tag in enumerate(LAYOUT_ORDER)}

# torch dtype -> safetensors tag, for whole-byte dtypes this torch build has. torch's float4_e2m1fn_x2 (F4) is left
# out: its header shape counts two values per byte, which this writer does not translate.
_TAGS: dict[torch.dtype, str] = {
    getattr(torch, name): tag
    for tag, (bits, name) in SAFETENSORS_DTYPES.items()
    if name is not None and bits % 8 == 0 and hasattr(torch, name)
}

_WRITABLE = frozenset(_TAGS.values())

# Bytes per element of each whole-byte safetensors tag.
_ITEMSIZE = {tag: bits // 8 for tag, (bits, _) in SAFETENSORS_DTYPES.items() if bits % 8 == 0}

# Bytes per copy step: the most a shard copy holds in memory where the kernel cannot copy file to file itself.
COPY_CHUNK_BYTES = 64 * 2**20

# safetensors pads the JSON header with spaces so that the data section starts 8-byte aligned.
_HEADER_ALIGN = 8

_DEFAULT_METADATA = {"format": "pt"}


@dataclass
class _Entry:
    key: str
    tag: str
    shape: list[int]
    offset: int  # in the spool
    nbytes: int


@dataclass(frozen=True)
class Planned:
    """A tensor a ``ShardedWriter`` is told to expect: its safetensors dtype tag and shape. ``exact=False`` marks a
    guessed shape (a JSON blob whose length depends on a value computed later): the writer holds back what lies
    after it in the layout until it arrives."""

    tag: str
    shape: tuple[int, ...]
    exact: bool = True

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.tag]


@dataclass
class _Placed:
    """A planned tensor: what the plan (or, once it arrived, the tensor) says, and where its bytes went."""

    key: str
    group: int  # its group's index in the plan
    tag: str
    shape: list[int]
    nbytes: int
    exact: bool
    arrived: bool = False
    where: str = ""  # "part" (at its place in the predicted shard's file) or "spool", once written
    pos: int = 0  # byte position in that file
    shard: int = -1  # the predicted shard
    index: int = -1  # its place in that shard's layout


@dataclass
class _Predicted:
    """A shard as the plan predicts it, its file written in place, a spool for what could not be."""

    groups: list[int]
    entries: list[_Placed]  # layout order
    data_start: int  # 8 + the padded header's length
    offsets: list[int]  # offsets[i]: where entries[i] starts in the data section, with the sizes known now
    pending: list[int]  # sorted layout indices of inexact entries not arrived yet
    part: Path | None = None
    part_fd: int | None = None
    spool: Path | None = None
    spool_fd: int | None = None
    spool_size: int = 0


def writable(tag: str) -> bool:
    """Whether the writer can write tensors of this safetensors dtype tag (whole-byte dtypes this torch has)."""
    return tag in _WRITABLE


def _split(sizes: list[int], max_shard_size: int) -> list[list[int]]:
    """Group indices per shard, in huggingface_hub's numbering, as ``add_group`` splits groups arriving in order."""
    done: list[list[int]] = []
    current: list[int] | None = None
    size = 0
    for i, n in enumerate(sizes):
        if n > max_shard_size:
            done.append([i])  # finished at once: numbered before the shard still open
            continue
        if current is not None and size + n > max_shard_size:
            done.append(current)
            current = None
        if current is None:
            current, size = [], 0
        current.append(i)
        size += n
    if current is not None:
        done.append(current)
    return done


def _layout_order(e) -> tuple[int, str]:
    return (-_LAYOUT_RANK[e.tag], e.key)


def _pwrite_all(fd: int, data, pos: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


@dataclass
class _Shard:
    spool: Path | None
    spool_file: BinaryIO | None
    entries: list[_Entry] = field(default_factory=list)
    size: int = 0  # bytes of tensor data, i.e. the spool length
    part: Path | None = None  # the finished file, under its temporary name until close()
    final: Path | None = None


def _copy_range(src: int, dst: int, offset: int, length: int, use_kernel_copy: bool) -> bool:
    """Append ``length`` bytes at ``offset`` of fd ``src`` to fd ``dst`` (at its position).

    Returns whether the kernel copy is still usable (it is given up for good on filesystems that refuse it).
    """
    while length:
        step = min(length, COPY_CHUNK_BYTES)
        if use_kernel_copy:
            try:
                # Copies inside the kernel (or as a reflink): the bytes never pass through Python.
                n = os.copy_file_range(src, dst, step, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_kernel_copy = False
                continue
        else:
            data = os.pread(src, step, offset)
            n = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
        if n == 0:
            raise OSError(errno.EIO, f"spool ended {length} bytes early")
        offset += n
        length -= n
    return use_kernel_copy


class ShardedWriter:
    """Writes one component's safetensors shards and index with bounded memory.

    Sharding follows ``huggingface_hub.split_torch_state_dict_into_shards`` (what diffusers' and transformers'
    ``save_pretrained`` use) with a group in place of a tensor: groups fill the open shard in arrival order; a group
    that would push it over ``max_shard_size`` closes it and opens the next; a group larger than ``max_shard_size``
    gets a shard of its own at once, numbered before the shard still open (as huggingface_hub numbers an oversized
    tensor). With one shard the file is ``<base_name>.safetensors`` and there is no index; with N it is
    ``<base_name>-0000k-of-0000N.safetensors`` plus ``<base_name>.safetensors.index.json``.

    Memory: each tensor is copied to the CPU, written to disk and dropped, so the writer holds no tensor after
    ``add_group`` returns. Without a plan each goes to the open shard's spool file in ``folder``, and a shard is
    assembled from its spool by file-to-file copies (``COPY_CHUNK_BYTES`` at most in memory); disk: up to twice the
    largest shard, briefly. With a plan, see ``__init__``.

    Use as a context manager: leaving the block normally calls ``close()`` (unless already called), leaving it by an
    exception calls ``abort()``. After an error other than a ``ValueError`` from argument checks, call ``abort()``.
    """

    def __init__(
        self,
        folder: Path,
        base_name: str,
        max_shard_size: int,
        metadata: dict[str, str] | None = None,
        plan: list[dict[str, Planned]] | None = None,
    ):
        """
        Args:
            folder: output folder; created if missing.
            base_name: ``"diffusion_pytorch_model"`` or ``"model"`` (any plain file-name stem works).
            max_shard_size: in bytes, decimal as huggingface_hub counts ("10GB" = 10**10).
            metadata: each shard's ``__metadata__``; default ``{"format": "pt"}``, which every HF loader expects.
                With more than one key, ``save_file`` itself orders them at random (a Rust HashMap), so byte
                identity with it is only defined for one key; this writer keeps the given order.
            plan: the groups to come, in the order that decides the shards (as ``add_group`` calls would give
                them), each ``{key: Planned}``. Groups may then arrive in any order: the shards and their layout
                are computed from the plan, and each tensor is written at its final place, unless a guessed
                (``exact=False``) tensor before it in its shard has not arrived yet, in which case it waits in a
                spool. ``close()`` checks the result against what arrived (a group left out, a tensor of another
                shape) and re-lays the shards out if anything differs, so the files are always those of the
                groups that arrived, added in plan order. Groups arriving in save_file's order (by key, for one
                dtype) never wait.
        """
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
        if not base_name or base_name.startswith(".") or "/" in base_name or "\\" in base_name:
            raise ValueError(f"base_name must be a plain file-name stem, got {base_name!r}")
        metadata = dict(_DEFAULT_METADATA if metadata is None else metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map str to str (safetensors stores text only)")
        if sys.byteorder != "little":
            raise NotImplementedError("safetensors is little-endian; this writer copies native bytes")
        self.folder = Path(folder)
        self.base_name = base_name
        self.max_shard_size = max_shard_size
        self.metadata = metadata
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._keys: dict[str, _Shard] = {}  # every key added, in order, and its shard
        self._created: list[_Shard] = []  # every shard begun, finished or not: what abort() removes
        self._done: list[_Shard] = []  # finished shards, in huggingface_hub's numbering order
        self._open: _Shard | None = None
        self._total_size = 0
        self._index: Path | None = None
        self._index_part: Path | None = None
        self._files: list[Path] | None = None
        self._weight_map: dict[str, str] | None = None
        self._aborted = False
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._plan: list[list[str]] | None = None
        self._placed: dict[str, _Placed] = {}
        self._predicted: list[_Predicted] = []
        self._deviated = False
        if plan is not None:
            self._set_plan(plan)

    def _set_plan(self, plan: list[dict[str, Planned]]) -> None:
        self._plan = []
        for index, group in enumerate(plan):
            for key, p in group.items():
                if not isinstance(key, str) or key == "__metadata__" or key in self._placed:
                    raise ValueError(f"invalid or repeated key {key!r} in the plan")
                if not writable(p.tag):
                    raise ValueError(f"{key!r}: dtype tag {p.tag!r} cannot be written by qtool")
                self._placed[key] = _Placed(key, index, p.tag, list(p.shape), p.nbytes, p.exact)
            self._plan.append(list(group))
        sizes = [sum(self._placed[k].nbytes for k in keys) for keys in self._plan]
        for number, groups in enumerate(_split(sizes, self.max_shard_size)):
            entries = sorted((self._placed[k] for g in groups for k in self._plan[g]), key=_layout_order)
            offsets, offset = [], 0
            for i, e in enumerate(entries):
                e.shard, e.index = number, i
                offsets.append(offset)
                offset += e.nbytes
            pending = [i for i, e in enumerate(entries) if not e.exact]
            self._predicted.append(_Predicted(groups, entries, len(self._header(entries)), offsets, pending))

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._files is None and not self._aborted:
            self.close()

    @property
    def total_size(self) -> int:
        """Bytes of tensor data added so far (the index's ``metadata.total_size``)."""
        return self._total_size

    @property
    def weight_map(self) -> dict[str, str]:
        """key -> shard file name, in the order the keys were added. Available after ``close()``."""
        if self._weight_map is None:
            raise RuntimeError("weight_map is known only after close()")
        return dict(self._weight_map)

    def _check_writable(self) -> None:
        if self._aborted:
            raise RuntimeError("the writer was aborted")
        if self._files is not None:
            raise RuntimeError("the writer is closed")

    def _create(self, suffix: str, access: int = os.O_WRONLY) -> tuple[int, Path]:
        """Create a new hidden file in the folder; return its fd (write-only by default) and path."""
        while True:
            path = self.folder / f".{self.base_name}.{secrets.token_hex(6)}{suffix}"
            try:
                # Mode 0666 less the umask, as save_file's own open() gives its file (mkstemp would give 0600).
                return os.open(path, access | os.O_CREAT | os.O_EXCL, 0o666), path
            except FileExistsError:
                continue

    def _new_shard(self) -> _Shard:
        fd, path = self._create(".spool")
        shard = _Shard(spool=path, spool_file=os.fdopen(fd, "wb"))
        self._created.append(shard)
        return shard

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors that must share a shard; their bytes go to disk before this returns.

        Args:
            tensors: key -> tensor, any device, any strides; whole-byte dtypes (bool, [u]int8-64, float8 variants,
                float16, bfloat16, float32, float64, complex64). Keys must be new to this writer.

        Raises:
            ValueError: an empty group, a repeated or reserved key, a non-tensor, a sparse tensor or an unsupported
                dtype; with a plan, a key it lacks or keys of two planned groups. Nothing is written then.
            RuntimeError: the writer is closed or aborted.
        """
        self._check_writable()
        if not tensors:
            raise ValueError("a group needs at least one tensor")
        group_size = 0
        for key, tensor in tensors.items():
            if not isinstance(key, str) or key == "__metadata__":
                raise ValueError(f"invalid key {key!r}")
            if key in self._keys or (key in self._placed and self._placed[key].arrived):
                raise ValueError(f"key {key!r} was already added")
            if self._plan is not None and key not in self._placed:
                raise ValueError(f"key {key!r} is not in the writer's plan")
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
                raise ValueError(f"{key!r}: expected a dense torch.Tensor with data, got {tensor!r:.80}")
            if tensor.dtype not in _TAGS:
                raise ValueError(f"{key!r}: dtype {tensor.dtype} cannot be written to safetensors by qtool")
            group_size += tensor.numel() * tensor.element_size()

        if self._plan is not None:
            self._add_planned(tensors)
            self._total_size += group_size
            return
        if group_size > self.max_shard_size:
            shard = self._new_shard()
            self._write(shard, tensors)
            self._finish(shard)
        else:
            if self._open is not None and self._open.size + group_size > self.max_shard_size:
                self._finish(self._open)
                self._open = None
            if self._open is None:
                self._open = self._new_shard()
            self._write(self._open, tensors)
        self._total_size += group_size

    def _write(self, shard: _Shard, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            tag = _TAGS[tensor.dtype]
            cpu = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            nbytes = cpu.numel() * cpu.element_size()
            if nbytes:
                # [*shape] -> [nbytes] uint8 view of the same memory; numpy exposes it as a buffer without a copy.
                shard.spool_file.write(cpu.reshape(-1).view(torch.uint8).numpy())
            shard.entries.append(_Entry(key, tag, list(cpu.shape), shard.size, nbytes))
            shard.size += nbytes
            self._keys[key] = shard
            del cpu

    def _add_planned(self, tensors: dict[str, torch.Tensor]) -> None:
        if len({self._placed[k].group for k in tensors}) > 1:
            raise ValueError(f"keys {sorted(tensors)[:4]} belong to different groups of the plan")
        for key, tensor in tensors.items():
            p = self._placed[key]
            shard = self._predicted[p.shard]
            cpu = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            nbytes = cpu.numel() * cpu.element_size()
            tag, shape = _TAGS[cpu.dtype], list(cpu.shape)
            # A tensor unlike its plan may move what lies after it, possibly onto bytes already written in place:
            # from then on everything is spooled, and close() re-lays the shards out from parts and spools.
            self._deviated = self._deviated or (p.exact and (tag, shape) != (p.tag, p.shape))
            p.tag, p.shape, p.arrived = tag, shape, True
            settled = not p.exact or nbytes != p.nbytes  # a guess now known, or a deviation
            p.nbytes = nbytes
            if not p.exact:
                shard.pending.pop(bisect.bisect_left(shard.pending, p.index))
            if settled:
                # What follows it moves, up to the next guess still pending: nothing past that one is written in
                # place before it arrives, and its arrival moves the rest, whether its own size was guessed right
                # or not (an earlier guess may have moved it). Linear in the shard's entries over all arrivals.
                after = bisect.bisect_left(shard.pending, p.index)
                end = shard.pending[after] + 1 if after < len(shard.pending) else len(shard.entries)
                for i in range(p.index + 1, end):
                    shard.offsets[i] = shard.offsets[i - 1] + shard.entries[i - 1].nbytes
            data = cpu.reshape(-1).view(torch.uint8).numpy()
            if self._deviated or (shard.pending and shard.pending[0] < p.index):
                # Its place depends on a guess not settled yet (or the plan was wrong): spool it.
                if shard.spool_fd is None:
                    shard.spool_fd, shard.spool = self._create(".spool", os.O_RDWR)
                p.where, p.pos = "spool", shard.spool_size
                if nbytes:
                    _pwrite_all(shard.spool_fd, data, p.pos)
                shard.spool_size += nbytes
            else:
                if shard.part_fd is None:
                    shard.part_fd, shard.part = self._create(".safetensors.part", os.O_RDWR)
                p.where, p.pos = "part", shard.data_start + shard.offsets[p.index]
                if nbytes:
                    _pwrite_all(shard.part_fd, data, p.pos)
            del cpu, data

    def _finish_planned(self) -> None:
        """Lay out the shards of the groups that arrived (in plan order, as add_group would have split them) and
        complete their files: in place where the prediction held (header written, spooled tensors copied to their
        places), else re-laid out into new files from wherever each tensor's bytes are."""
        arrived = [(g, [k for k in keys if self._placed[k].arrived]) for g, keys in enumerate(self._plan)]
        arrived = [(g, keys) for g, keys in arrived if keys]
        sizes = [sum(self._placed[k].nbytes for k in keys) for _, keys in arrived]
        shards = []
        for groups in _split(sizes, self.max_shard_size):
            entries = sorted((self._placed[k] for i in groups for k in arrived[i][1]), key=_layout_order)
            shards.append(([arrived[i][0] for i in groups], entries, self._header(entries)))
        # In place only if the shards are those predicted, each header as long as predicted, and every tensor
        # written in place where the layout of what arrived puts it.
        in_place = [s.groups for s in self._predicted] == [groups for groups, _, _ in shards]
        for predicted, (_, entries, header) in zip(self._predicted, shards, strict=False):
            offset = len(header)
            in_place = in_place and offset == predicted.data_start
            for e in entries:
                in_place = in_place and (e.where != "part" or e.pos == offset)
                offset += e.nbytes
        for _, entries, _ in shards:
            self._done.append(_Shard(spool=None, spool_file=None, size=sum(e.nbytes for e in entries)))
        if in_place:
            for predicted, (_, entries, header), shard in zip(self._predicted, shards, self._done, strict=True):
                if predicted.part_fd is None:
                    predicted.part_fd, predicted.part = self._create(".safetensors.part", os.O_RDWR)
                _pwrite_all(predicted.part_fd, header, 0)
                offset = len(header)
                for e in entries:
                    if e.where == "spool" and e.nbytes:
                        os.lseek(predicted.part_fd, offset, os.SEEK_SET)
                        self._kernel_copy = _copy_range(
                            predicted.spool_fd, predicted.part_fd, e.pos, e.nbytes, self._kernel_copy
                        )
                    offset += e.nbytes
                shard.part, predicted.part = predicted.part, None
        else:
            for (_, entries, header), shard in zip(shards, self._done, strict=True):
                fd, shard.part = self._create(".safetensors.part")
                try:
                    _pwrite_all(fd, header, 0)
                    os.lseek(fd, len(header), os.SEEK_SET)
                    for e in entries:
                        source = self._predicted[e.shard]
                        src = source.part_fd if e.where == "part" else source.spool_fd
                        if e.nbytes:
                            self._kernel_copy = _copy_range(src, fd, e.pos, e.nbytes, self._kernel_copy)
                finally:
                    os.close(fd)
        for (_, entries, _), shard in zip(shards, self._done, strict=True):
            for e in entries:
                self._keys[e.key] = shard
        self._keys = {k: self._keys[k] for keys in self._plan for k in keys if k in self._keys}  # plan order
        self._release_planned()

    def _release_planned(self) -> None:
        """Close the predicted shards' files and remove what is not a finished shard (spools, unused parts)."""
        for predicted in self._predicted:
            for attr in ("part_fd", "spool_fd"):
                fd = getattr(predicted, attr)
                if fd is not None:
                    os.close(fd)
                    setattr(predicted, attr, None)
            for attr in ("part", "spool"):
                path = getattr(predicted, attr)
                if path is not None:
                    path.unlink(missing_ok=True)
                    setattr(predicted, attr, None)

    def _header(self, entries: list[_Entry]) -> bytes:
        """The header as save_file writes it: 8-byte length, compact JSON, space padding to a multiple of 8."""
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for e in entries:
            header[e.key] = {"dtype": e.tag, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        # serde_json escapes only '"', '\\' and control characters, and writes other text as raw UTF-8.
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % _HEADER_ALIGN)
        return len(text).to_bytes(8, "little") + text

    def _finish(self, shard: _Shard) -> None:
        """Assemble a shard's file (temporary name) from its spool in save_file's layout, then drop the spool."""
        shard.spool_file.close()
        shard.spool_file = None
        entries = sorted(shard.entries, key=lambda e: (-_LAYOUT_RANK[e.tag], e.key))
        fd, shard.part = self._create(".safetensors.part")
        src = os.open(shard.spool, os.O_RDONLY)
        try:
            view = memoryview(self._header(entries))
            while view:
                view = view[os.write(fd, view) :]
            for e in entries:
                self._kernel_copy = _copy_range(src, fd, e.offset, e.nbytes, self._kernel_copy)
        finally:
            os.close(src)
            os.close(fd)
        shard.spool.unlink()
        self._done.append(shard)

    def close(self) -> list[Path]:
        """Finish the last shard, give the shards their final names and write the index (sharded only).

        Returns:
            The files written: shards in order, then the index if any. Calling again returns the same list.

        Raises:
            ValueError: no tensor was added (a component without tensors is a caller bug).
        """
        if self._files is not None:
            return list(self._files)
        if self._aborted:
            raise RuntimeError("the writer was aborted")
        if not self._keys and not any(p.arrived for p in self._placed.values()):
            raise ValueError("no tensors were added; a component with no tensors cannot be written")
        try:
            if self._plan is not None:
                self._finish_planned()
            if self._open is not None:
                self._finish(self._open)
                self._open = None
            n = len(self._done)
            for k, shard in enumerate(self._done, start=1):
                suffix = "" if n == 1 else f"-{k:05d}-of-{n:05d}"
                final = self.folder / f"{self.base_name}{suffix}.safetensors"
                os.replace(shard.part, final)
                shard.final = final
            weight_map = {key: shard.final.name for key, shard in self._keys.items()}
            files = [shard.final for shard in self._done]
            if n > 1:
                # As huggingface_hub's save_pretrained writes it: indent 2, sorted keys, ASCII escapes, newline.
                index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
                fd, self._index_part = self._create(".json.part")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                final = self.folder / f"{self.base_name}.safetensors.index.json"
                os.replace(self._index_part, final)
                self._index = final
                files.append(final)
        except BaseException:
            self.abort()
            raise
        self._weight_map = weight_map
        self._files = files
        return list(files)

    def abort(self) -> None:
        """Remove everything this writer created: spools, partial shards, and (even after ``close()``) its outputs.

        Files it replaced under the same names are not brought back. Safe to call more than once.
        """
        self._release_planned()
        for shard in self._created:
            if shard.spool_file is not None:
                shard.spool_file.close()
                shard.spool_file = None
            for path in (shard.spool, shard.part, shard.final):
                if path is not None:
                    path.unlink(missing_ok=True)
        for shard in self._done:  # planned mode's shards are not in _created
            for path in (shard.part, shard.final):
                if path is not None:
                    path.unlink(missing_ok=True)
        for path in (self._index_part, self._index):
            if path is not None:
                path.unlink(missing_ok=True)
        self._open = None
        self._files = None
        self._weight_map = None
        self._aborted = True
        if self._made_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass  # not empty: it holds files that are not ours
