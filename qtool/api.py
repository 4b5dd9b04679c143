"""qtool's checkpoint-level Python API: what the CLI commands call.

``quantize_checkpoint`` streams a checkpoint layer by layer through ``qtool.pipeline`` (reads, device work and
writes overlap, a few layers in flight): safetensors in, the Triton kernels (GPU) or the PyTorch reference (CPU),
bitsandbytes-format shards out. The output is built in a temporary folder beside the target and renamed into place
only when complete and verified.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qtool.errors import QtoolError
from qtool.plan import MAX_SHARD_SIZE, ComponentPlan, Plan, plan_folder
from qtool.quality import ComponentQuality, LayerQuality, aggregate
from qtool.spec import QuantSpec

if TYPE_CHECKING:
    from qtool.budget import Budget, Choice
    from qtool.io.reader import ComponentWeights
    from qtool.pipeline import PipelineStats

# Root files of a pipeline that are not part of the diffusers layout and can be huge (FLUX.1-dev ships a 23.8 GB
# single-file checkpoint beside its component folders): never copied, never downloaded.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".sft")
# Root folders of a local checkpoint that are not part of it, never copied: git's store (a git-lfs clone holds every
# weight again under .git/lfs) and huggingface_hub's `--local-dir` download metadata (.cache/huggingface).
NOT_COPIED = (".git", ".cache")
# Files that describe a checkpoint rather than belong to it: the source's model card (it describes the source, not
# the output) and qtool's provenance record (PROVENANCE). Never copied from input to output.
DESCRIPTION_FILES = ("README.md", "qtool.json")
PROVENANCE = "qtool.json"
# The layout of the quality report (QuantizeResult.report); raised when a key changes meaning or goes.
REPORT_VERSION = 1
# What a one-model repo needs: configs, weights, tokenizer and remote-code files.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "README.md"]


class Progress(Protocol):
    """What the API reports while it works; the CLI renders it with Rich, the API alone stays silent.

    ``enabled`` also decides whether huggingface_hub draws its own download bars.
    """

    enabled: bool

    def start(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...

    def finish(self) -> None: ...


class _Silent:
    enabled = False

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class ComponentResult:
    """One quantized component. Bytes are tensor bytes (as safetensors stores them); ``layer_quality``: each
    quantized layer's figures in the plan's order (``qtool.quality``; empty in a dry run), ``quality`` the
    component's.

    With a size budget (``quantize_checkpoint(budget=...)``): ``spec`` is the component's own options (None: the
    run's), ``budget_kept`` the layers the budget keeps 16-bit (counted in ``layers_kept`` too), and ``unquantized``
    says that it kept them all: the component was copied as it is, with no quantization_config."""

    name: str
    class_name: str
    parameters: int
    layers_quantized: int
    layers_kept: int
    bytes_before: int
    bytes_after: int
    seconds: float = 0.0
    layer_quality: list[LayerQuality] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # What the run measured stage by stage (qtool.pipeline.PipelineStats); None in a dry run.
    pipeline: PipelineStats | None = None
    spec: QuantSpec | None = None
    budget_kept: int = 0
    unquantized: bool = False

    @classmethod
    def of_plan(cls, plan: ComponentPlan, bytes_after: int, **measured) -> ComponentResult:
        """The plan's counts, with the bytes written (or predicted) and what a run measured (time, SQNR, files)."""
        counts = {"layers_quantized": len(plan.layers), "layers_kept": len(plan.kept_linears)}
        return cls(
            name=plan.name,
            class_name=plan.class_name,
            parameters=plan.parameters,
            bytes_before=plan.bytes_before,
            bytes_after=bytes_after,
            **(counts | measured),
        )

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    @property
    def quality(self) -> ComponentQuality | None:
        """The component's figures (``qtool.quality.aggregate`` of ``layer_quality``); None in a dry run."""
        return aggregate(self.layer_quality)


@dataclass
class QuantizeResult:
    """A run (or a dry run's plan). ``spec``: the run's options; with a ``budget``, each component's own are
    ``spec_of(component)``, and ``choice`` is what the budget chose (from measured errors in a run, from nominal ones
    in a dry run); ``budget_used``: the output's bytes in the budget's measure, as written (None in a dry run)."""

    output: Path
    source: str
    spec: QuantSpec
    kind: str
    components: list[ComponentResult]
    copied: list[str]
    dry_run: bool
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    device: str = ""
    budget: Budget | None = None
    choice: Choice | None = None
    budget_used: int | None = None

    def spec_of(self, component: ComponentResult) -> QuantSpec | None:
        """The options ``component`` was quantized with (None: a budget left it unquantized)."""
        return None if component.unquantized else component.spec or self.spec

    def budget_dict(self) -> dict | None:
        """The budget and its choice (``qtool.budget.Choice.to_dict``), JSON-ready; None without a budget."""
        if self.budget is None or self.choice is None:
            return None
        return {
            "bits": list(self.budget.bits),
            "errors": "nominal" if self.dry_run else "measured",
            "used_bytes": self.budget_used,
            **self.choice.to_dict(),
        }

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "source": self.source,
            "kind": self.kind,
            "method": self.spec.label,
            "quantization_config": self.spec.quantization_config(),
            "budget": self.budget_dict(),
            "dry_run": self.dry_run,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "copied": self.copied,
            "components": [
                {
                    "name": c.name,
                    "class": c.class_name,
                    "method": _label(self.spec_of(c)),
                    "parameters": c.parameters,
                    "layers_quantized": c.layers_quantized,
                    "layers_kept": c.layers_kept,
                    "layers_kept_by_budget": c.budget_kept,
                    "bytes_before": c.bytes_before,
                    "bytes_after": c.bytes_after,
                    "seconds": round(c.seconds, 3),
                    "quality": _opt_dict(c.quality),
                    "files": c.files,
                    "pipeline": c.pipeline.to_dict() if c.pipeline else None,
                }
                for c in self.components
            ],
        }

    def report(self) -> dict:
        """The quality report (``quantize_checkpoint(report=...)``): the settings, and per component its figures
        and every quantized layer's (``qtool.quality``; JSON-ready, strict: no NaN or Infinity)."""
        from qtool import __version__

        settings = dataclasses.asdict(self.spec)
        settings["skip"] = list(self.spec.skip)
        return {
            "report_version": REPORT_VERSION,
            "qtool_version": __version__,
            "source": self.source,
            "output": str(self.output),
            "device": self.device,
            "method": self.spec.label,
            "settings": settings,
            "quantization_config": self.spec.quantization_config(),
            "budget": self.budget_dict(),
            "components": [
                {
                    "name": c.name,
                    "class": c.class_name,
                    "method": _label(self.spec_of(c)),
                    "quantization_config": _config(self.spec_of(c)),
                    "quality": _opt_dict(c.quality),
                    "layers": [q.to_dict() for q in c.layer_quality],
                }
                for c in self.components
            ],
        }


def _opt_dict(quality: ComponentQuality | None) -> dict | None:
    return quality.to_dict() if quality is not None else None


def _label(spec: QuantSpec | None) -> str | None:
    return spec.label if spec is not None else None


def _config(spec: QuantSpec | None) -> dict | None:
    return spec.quantization_config() if spec is not None else None


def default_output(source: str, suffix: str, local_folder: Path | None = None) -> Path:
    """``./<source name>-<suffix>`` (suffix: the method, e.g. nf4-dq); for a local source that holds the current
    folder (``qtool quantize .``), beside the source instead, since an output inside its input is refused."""
    cwd = Path.cwd().resolve()
    if local_folder is not None:
        folder = local_folder.resolve()
        where = folder.parent if cwd == folder or folder in cwd.parents else cwd
        return where / f"{folder.name}-{suffix}"
    return cwd / f"{Path(source.rstrip('/')).name or 'model'}-{suffix}"


def resolve_device(device: str | None) -> str:
    """ "cuda" (Triton kernels) or "cpu" (PyTorch reference); None picks cuda when PyTorch sees a GPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise QtoolError(f"--device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise QtoolError("--device cuda, but PyTorch sees no CUDA GPU", hint="use --device cpu (slower)")
    return device


@contextmanager
def atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` to build the output in, renamed to ``out`` when the block succeeds and
    removed when it fails (Ctrl-C, SIGTERM and SIGHUP included); a full disk becomes a QtoolError. Callers check
    the output first (``_check_output``, which also cleans up after runs killed outright). The renames and the
    clean-up run to their end even if a signal arrives meanwhile."""
    from qtool.interrupts import deferred

    tmp = out.resolve().parent / f".{out.name}.qtool-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        with deferred():
            _replace(tmp, out, overwrite)
    except BaseException as exc:
        with deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QtoolError(
                f"no space left on the device while writing {out}",
                hint="free some space, or choose an --output on a larger disk",
            ) from exc
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            raise QtoolError(
                f"a file grew past the file-size limit while writing {out} (`ulimit -f`, or the filesystem's own)",
                hint="raise the limit (ulimit -f unlimited), or choose an --output on a filesystem without one",
            ) from exc
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove what runs killed outright left beside ``name``: temporary and probe folders of dead processes. An old
    output that a killed run had moved aside (``.<name>.qtool-old-<pid>``) is moved back if nothing replaced it."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.qtool-(tmp|old|probe)-(\d+)$")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or _pid_alive(int(match[2])):
            continue
        target = parent / name
        if match[1] == "old" and not (target.exists() or target.is_symlink()):
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_output(output: Path, inputs: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (without overwrite), sits inside the input, or can't be made.
    Left-overs of killed runs are cleaned up first, so that an old output they had moved aside counts as existing."""
    _clean_stale(output.resolve().parent, output.name)
    if inputs is not None:
        src, dst = inputs.resolve(), output.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise QtoolError(
                f"the output {output} overlaps the input {inputs}", hint="choose an output folder elsewhere"
            )
    if output.exists() and not overwrite:
        raise QtoolError(f"{output} already exists", hint="pass --overwrite to replace it, or choose --output")
    parent = output.resolve().parent
    if not parent.exists():
        raise QtoolError(
            f"the output's parent folder {parent} does not exist", hint="create it first, or choose another --output"
        )
    # Create and remove a folder there, rather than ask os.access: root passes every permission check, yet may not
    # write to a read-only mount.
    probe = parent / f".{output.name}.qtool-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise QtoolError(
            f"cannot write to {parent} ({e.strerror or e})", hint="choose an --output in a folder you can write to"
        ) from e


def _copied_entries(folder: Path, names: list[str]) -> list[str]:
    """The root entries of a pipeline that a run copies as they are: not .git or .cache, and not the single-file
    checkpoints beside the component folders."""
    return [
        name
        for name in names
        if name not in NOT_COPIED + DESCRIPTION_FILES
        and not (name.endswith(WEIGHT_SUFFIXES) and not (folder / name).is_dir())
    ]


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link where possible (no extra disk; Hub cache files are symlinks to blobs, so link the blob)."""
    real = os.path.realpath(src)
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)


def _copy_entry(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=False)
    else:
        _link_or_copy(str(src), str(dst))


def copy_component_files(folder: Path, out: Path) -> None:
    """A component folder's files other than its weights, config.json and description files (tokenizer files,
    generation_config.json, ...), hard-linked into ``out``."""
    for entry in folder.iterdir():
        name = entry.name
        if name in ("config.json", *DESCRIPTION_FILES) or name.endswith((*WEIGHT_SUFFIXES, ".index.json")):
            continue
        _copy_entry(entry, out / name)


@dataclass
class _Done:
    """What the compute stage hands on: a quantized layer (``layer``, its host tensors in ``pending``, the check
    statistics in ``stats``) or, with ``layer`` None, tensors written as they are."""

    key: str
    tensors: dict[str, object]
    layer: object = None
    pending: object = None
    stats: object = None


# Threads per large read. With a GPU the pipeline waits on reads: from a warm page cache, one thread read the 23.8 GB
# FLUX transformer at 5.2 GB/s and 8 threads at 16.5 GB/s on the H100 machine (16 cores; benchmarks/results/e2e.csv),
# and 2 threads gave 17% over 1 even on a 2-core VM. On the CPU the reference's arithmetic is the bottleneck (reads are
# under 3% of a run) and uses every core.
READ_THREADS = {"cuda": max(2, min(8, (os.cpu_count() or 2) // 2)), "cpu": 1}


def stream_groups(reader, groups: list[list[str]]):
    """The pipeline's ``read`` stage over ``groups`` (lists of keys read together, in order): each group's tensors,
    read into the slot where they fit, the next group's byte ranges prefetched first so that disk reads run ahead
    (a no-op on a warm page cache)."""
    following = {tuple(g): groups[i + 1] for i, g in enumerate(groups[:-1])}
    sizes = reader.component.tensors

    def read(keys: list[str], slot) -> dict:
        for key in following.get(tuple(keys), ()):
            reader.prefetch(key)
        return {key: reader.read(key, out=slot.take(sizes[key].nbytes)) for key in keys}

    return read


def stream_component(
    reader, groups: list[list[str]], compute, write, device: str, device_groups: list[list[str]], out_bytes: int = 0
) -> PipelineStats:
    """``qtool.pipeline.run`` over ``groups`` of ``reader``'s component: each group read (``stream_groups``) into a
    slot sized by ``slot_bytes`` (``device_groups``: the groups sent to the device), computed, then written."""
    from qtool import pipeline

    return pipeline.run(
        groups,
        read=stream_groups(reader, groups),
        compute=compute,
        write=write,
        device=device,
        slots=pipeline.DEFAULT_SLOTS,
        slot_bytes=slot_bytes(reader.component, groups, device_groups),
        out_bytes=out_bytes,
    )


def slot_bytes(weights: ComponentWeights, groups: list[list[str]], device_groups: list[list[str]]) -> int:
    """Input bytes per pipeline slot: the largest group sent to the device (those must be pinned), and at least
    64 MiB or the largest group for the others (read into a reused buffer, which is ~5x faster than a fresh one)."""
    from qtool.pipeline import _align

    def size(keys: list[str]) -> int:
        return sum(_align(weights.tensors[k].nbytes) for k in keys)

    device = max((size(g) for g in device_groups), default=0)
    return max(device, min(max((size(g) for g in groups), default=0), 64 * 2**20))


def _writer_plan(plan: ComponentPlan, spec: QuantSpec, groups: list[list[str]]):
    """What the writer will be given, group by group in plan order (``ShardedWriter(plan=...)``), so that it writes
    each tensor once, at its place; None where a kept tensor has a dtype the writer cannot write (it then refuses
    it when it arrives, as without a plan). The quant-state blob's length is exact without double quant; with it,
    the offset's repr is guessed (``TYPICAL_OFFSET``) and the writer waits for the real one where it matters."""
    from qtool.formats.bnb4 import BLOB_PREFIX, blob_fields
    from qtool.io.writer import Planned, writable
    from qtool.plan import DTYPE_NAMES, TYPICAL_OFFSET
    from qtool.verify import expected_tensors

    expected = expected_tensors(plan, spec)
    out = []
    for keys in groups:
        layer = plan.layers.get(keys[0])
        names = list(keys)
        if layer is not None:
            if spec.bits == 8:
                names[:1] = [layer.key, f"{layer.fqn}.SCB", f"{layer.fqn}.weight_format"]
            else:
                nested = [".nested_absmax", ".nested_quant_map"] if spec.double_quant else []
                blob = "." + BLOB_PREFIX.removeprefix("weight.") + spec.quant_type
                suffixes = ["", ".absmax", ".quant_map", *nested, blob]
                names[:1] = [layer.key + suffix for suffix in suffixes]
        group = {}
        for name in names:
            tag, shape = expected[name]
            if not writable(tag):
                return None
            if shape is None:  # the blob
                offset = TYPICAL_OFFSET if spec.double_quant else None
                fields = blob_fields(spec.quant_type, spec.blocksize, DTYPE_NAMES[layer.dtype], layer.shape, offset)
                group[name] = Planned(tag, (len(json.dumps(fields).encode()),), exact=not spec.double_quant)
            else:
                group[name] = Planned(tag, tuple(shape))
        out.append(group)
    return out


def _output_bytes(writer_plan, groups: list[list[str]], layers) -> int:
    """An upper bound of a quantized layer's tensors copied back from the device (``Slot.to_host``), aligned: its
    planned entries, the double-quant offset and the check statistics, for the largest layer."""
    from qtool.pipeline import _align
    from qtool.verify import STATS

    if writer_plan is None:
        return 0
    sizes = [
        sum(_align(p.nbytes) for p in group.values()) + _align(4) + _align(8 * len(STATS))
        for keys, group in zip(groups, writer_plan, strict=True)
        if keys[0] in layers
    ]
    return max(sizes, default=0)


def _quantize_component(
    plan: ComponentPlan, spec: QuantSpec, out: Path, device: str, progress: Progress, allow_nonfinite: bool = False
) -> ComponentResult:
    """Stream one component through ``qtool.pipeline``: a reader thread reads each weight (with its bias), this
    thread quantizes it and measures it against the format's bound on the device (``verify.layer_stats``), a
    writer thread judges the measurements (``verify.judge_layer``) and hands the layer to the writer. Before
    returning, the written files are verified (``qtool.verify.verify_component``)."""
    import torch

    from qtool import quantize, verify
    from qtool.io.reader import TensorReader
    from qtool.io.writer import ShardedWriter

    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out.mkdir(parents=True, exist_ok=True)
    measured: dict[str, LayerQuality] = {}
    bias_of = {layer.fqn + ".bias": key for key, layer in plan.layers.items()}
    # A bias is read, and written, with its weight (in the same shard).
    groups = [
        [key] + ([layer.fqn + ".bias"] if layer is not None and layer.fqn + ".bias" in plan.weights.tensors else [])
        for key in plan.key_order
        if not (key in bias_of and bias_of[key] in plan.weights.tensors)
        for layer in [plan.layers.get(key)]
    ]
    # The writer decides the shards from the plan's order (writer_plan); the groups are worked on in key order,
    # save_file's layout within a dtype, so that each reaches the writer once everything before it in its shard's
    # layout is known (with double quant, the blobs' lengths) and is written straight to its place. It is also the
    # order the tensors lie in the source files that save_file wrote.
    writer_plan = _writer_plan(plan, spec, groups)
    order = sorted(groups)
    if spec.bits == 8:
        options = {"bits": 8, "scale_search": spec.scale_search}
    else:
        options = {"quant_type": spec.quant_type, "double_quant": spec.double_quant, "blocksize": spec.blocksize,
                   "scale_search": spec.scale_search}  # fmt: skip
    progress.start(f"{plan.name or plan.class_name}", plan.bytes_before)

    def compute(tensors: dict, slot) -> _Done:
        key = next(iter(tensors))
        layer = plan.layers.get(key)
        progress.advance(sum(plan.weights.tensors[k].nbytes for k in tensors))
        if layer is None:
            return _Done(key, tensors)
        weight = tensors.pop(key).to(device, non_blocking=True)
        # Looked up on the module at each call, so that tests can wrap it.
        pending = quantize.quantize_pending(weight, **options)
        stats = verify.layer_stats(weight, pending)
        host = slot.to_host({**pending.tensors, "": stats})
        stats = host.pop("")
        return _Done(key, tensors, layer, dataclasses.replace(pending, tensors=host), stats)

    def write(done: _Done) -> None:
        if done.layer is None:
            writer.add_group(done.tensors)
            return
        verify.judge_layer(
            done.stats,
            verify.tensor_name(plan.name, done.key),
            bits=spec.bits,
            shape=done.layer.shape,
            check_finite=not allow_nonfinite,
        )
        measured[done.key] = verify.layer_quality(done.stats, done.key, shape=done.layer.shape, method=spec.label)
        group = {f"{done.layer.fqn}.{name}": value for name, value in done.pending.entries().items()}
        writer.add_group(group | done.tensors)

    with (
        TensorReader(plan.weights, threads=READ_THREADS[device]) as reader,
        ShardedWriter(out, plan.weights.base_name, MAX_SHARD_SIZE[plan.library], plan=writer_plan) as writer,
    ):
        stats = stream_component(
            reader, order, compute, write, device, [g for g in order if g[0] in plan.layers],
            out_bytes=_output_bytes(writer_plan, groups, plan.layers),
        )  # fmt: skip
        t = time.perf_counter()
        files = writer.close()
        bytes_after = writer.total_size
        stats.finish = time.perf_counter() - t
        verify.verify_component(plan, spec, out, reader, device)
        stats.verify = time.perf_counter() - t - stats.finish
    progress.finish()
    stats.bytes_read = sum(plan.weights.tensors[k].nbytes for g in groups for k in g)
    stats.bytes_written = sum(p.stat().st_size for p in files)
    if device == "cuda":
        stats.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    config = dict(plan.config)
    config["quantization_config"] = spec.quantization_config()
    # diffusers and transformers both write json.dumps(indent=2, sort_keys=True) + "\n".
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_component_files(plan.folder, out)
    return ComponentResult.of_plan(
        plan,
        bytes_after,
        seconds=time.perf_counter() - start,
        layer_quality=[measured[key] for key in plan.layers],
        files=[p.name for p in files],
        pipeline=stats,
    )


def quantize_checkpoint(
    source: str | os.PathLike,
    *,
    spec: QuantSpec | None = None,
    components: list[str] | None = None,
    output: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
    device: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    report: str | os.PathLike | None = None,
    budget: Budget | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize a local folder or Hub repo (a diffusers pipeline or one model) into a bitsandbytes checkpoint.

    Args:
        source: a folder written by save_pretrained, or a Hub repo id.
        spec: the quantization options (default: 4-bit NF4, compute dtype bf16).
        components: pipeline components to quantize (default: transformer and text_encoder_2 when present).
        output: the output folder (default: ./<source name>-<method>, e.g. FLUX.1-dev-nf4-dq).
        revision, token: for Hub sources.
        device: "cuda" (Triton kernels) or "cpu" (PyTorch reference); default: cuda when available.
        dry_run: plan only: read configs and safetensors headers, download and write nothing.
        overwrite: replace an existing output folder.
        allow_nonfinite: quantize weights holding NaN or Inf (or, for 8-bit, values beyond float16's range) as
            bitsandbytes would, instead of refusing them (a QtoolError naming the tensor).
        report: also write the quality report (``QuantizeResult.report``, JSON) to this file, replacing it
            atomically once the output is in place; a path inside the output is written with the output, before
            it is renamed into place. Refused (before any work) with ``dry_run``, for a folder, inside the input,
            or in a folder that does not exist.
        budget: fit the output in a size budget (``qtool.budget.Budget``): per component 4-bit (``spec``'s 4-bit
            options) or 8-bit, and per layer 16-bit, with the least total error (parameters x relative error)
            that fits; see ``_fit_budget``. The components' weights are read twice: once to measure every layer's
            error at 4 and 8 bits, once to quantize. A dry run chooses from nominal errors instead (no weight read).
            Refused before any weight is read when even the smallest choice does not fit, and when nothing needs
            quantizing (``qtool.budget.FitsUnquantized``).
        progress: receives progress events (bytes read per component).

    Returns:
        QuantizeResult with per-component sizes, timings and quality figures of the quantized layers.
    """
    from qtool import hub

    spec = spec or QuantSpec()
    progress = progress or _Silent()
    started = time.perf_counter()
    source = str(source)
    device = resolve_device(device)
    local = hub.is_local(source)
    # For a local source, download() only resolves the path (~ expanded) and refuses a file.
    local_folder = hub.download(source, patterns=[]) if local else None
    suffix = spec.label + ("-budget" if budget is not None else "")
    out = Path(output).expanduser() if output else default_output(source, suffix, local_folder)
    report_path = Path(report).expanduser() if report is not None else None
    if report_path is not None and dry_run:
        raise QtoolError("--report and --dry-run conflict", hint="a dry run quantizes nothing to report on")
    if not dry_run:
        _check_output(out, local_folder, overwrite)
    # The report's path inside the output, when it is there (then written with the output).
    report_inside = _check_report(report_path, out, local_folder) if report_path is not None else None

    weights = files = None
    if local_folder is not None:
        folder = local_folder
        plan = plan_folder(folder, spec, components, source=source)
    elif dry_run:
        folder, plan, weights, files = plan_remote(source, spec, components, revision=revision, token=token)
    else:
        patterns = download_patterns(source, revision=revision, token=token, components=components)
        if budget is not None:  # refuse a budget out of reach (or needless) before downloading the weights
            _, early, early_weights, early_files = plan_remote(source, spec, components, revision=revision, token=token)
            _nominal_choice(early, spec, budget, copied_weight_bytes(early.copied, early_weights, early_files))
        folder = hub.download(source, patterns=patterns, revision=revision, token=token, progress=progress.enabled)
        plan = plan_folder(folder, spec, components, source=source)
    result = QuantizeResult(
        output=out,
        source=source,
        spec=spec,
        kind=plan.kind,
        components=[],
        copied=_copied_entries(folder, plan.copied),
        dry_run=dry_run,
        device=device,
        budget=budget,
    )
    work: list[tuple[ComponentPlan, QuantSpec | None]] = [(c, spec) for c in plan.components]
    if budget is not None:
        if weights is None:
            from qtool.io.reader import scan_component

            files = hub.list_files(str(folder))

            def weights(name: str) -> ComponentWeights:
                return scan_component(folder / name)

        other = copied_weight_bytes(result.copied, weights, files)
        result.choice, work = _fit_budget(
            plan, spec, budget, other, None if dry_run else device, progress, allow_nonfinite
        )
    if dry_run:
        result.components = [_planned(c, s, result.choice) for c, s in work]
        result.seconds = time.perf_counter() - started
        return result

    with atomic_output(out, overwrite) as tmp:
        _write(work, folder, tmp, device, progress, result, allow_nonfinite)
        if result.choice is not None:
            result.budget_used = _check_budget(result, work)
        provenance = _provenance(source, folder, local_folder is None, revision, plan, spec, result)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        if report_inside is not None:
            _report_into_output(result, tmp, report_inside, report_path)
    if report_path is not None and report_inside is None:
        try:
            write_report(result, report_path)
        except OSError as e:
            raise QtoolError(
                f"the output {out} is complete, but the report {report_path} could not be written ({e.strerror or e})",
                hint="qtool.json in the output holds each component's figures; for every layer's, run again with "
                "--overwrite and a --report path you can write to",
            ) from e
    result.seconds = time.perf_counter() - started
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _provenance(
    source: str, folder: Path, from_hub: bool, revision: str | None, plan: Plan, spec: QuantSpec, result: QuantizeResult
) -> dict:
    """What ``qtool push`` needs to describe the output: where it came from (a Hub repo id and the commit that was
    downloaded, or a local folder), the source card's license and tags, and the method; and what `qtool footprint`
    shows of its quality: each component's figures (``qtool.quality.ComponentQuality``), by component name."""
    from qtool import __version__, hub

    card = hub.card_metadata(folder / "README.md") if (folder / "README.md").is_file() else {}
    libraries = sorted({c.library for c in plan.components})
    return {
        "qtool_version": __version__,
        "source": source if from_hub else str(Path(source).expanduser().resolve()),
        "source_is_hub_repo": from_hub,
        # The Hub cache's snapshot folder is named after the commit it holds.
        "source_revision": folder.name if from_hub and re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision,
        "license": card.get("license"),
        "pipeline_tag": card.get("pipeline_tag"),
        "kind": plan.kind,
        "library_name": "diffusers" if plan.kind == "pipeline" else libraries[0],
        "method": spec.label,
        "quantization_config": spec.quantization_config(),
        # Each component's method (None: a budget left it unquantized); its config.json holds its own config.
        "methods": {c.name: _label(result.spec_of(c)) for c in result.components},
        "budget": result.budget_dict(),
        "components": [c.name for c in plan.components],
        "bytes_before": {c.name: c.bytes_before for c in plan.components},
        "quality": {c.name: _opt_dict(c.quality) for c in result.components},
    }


def _check_report(report: Path, out: Path, inputs: Path | None) -> Path | None:
    """Refuse, before any work, a report path that is a folder or the output, lies in the input (never written to)
    or in a folder that does not exist or cannot be written to. Returns its path relative to the output when it lies
    inside it (written with the output), else None."""
    where, target = report.resolve(), out.resolve()
    if where.is_dir() or where == target:
        raise QtoolError(
            f"the report {report} is a folder" if where.is_dir() else f"the report {report} is the output folder",
            hint="give --report a file name, e.g. quality.json",
        )
    if inputs is not None and inputs.resolve() in where.parents:
        raise QtoolError(
            f"the report {report} is inside the input {inputs}",
            hint="qtool never writes to its input: choose a path elsewhere",
        )
    if target in where.parents:
        return where.relative_to(target)
    parent = where.parent
    if not parent.is_dir():
        raise QtoolError(
            f"the report's folder {parent} does not exist", hint="create it first, or choose another --report path"
        )
    _clean_stale(parent, where.name)
    probe = parent / f".{where.name}.qtool-probe-{os.getpid()}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise QtoolError(
            f"cannot write the report to {parent} ({e.strerror or e})", hint="choose a --report path you can write to"
        ) from e
    return None


def write_report(result: QuantizeResult, path: Path) -> None:
    """``result.report()`` as JSON at ``path``: written beside it, then renamed over it (a reader never sees half of
    it, and an existing file, or a hard link to another, is replaced rather than written into)."""
    text = json.dumps(result.report(), indent=2, allow_nan=False) + "\n"
    tmp = path.parent / f".{path.name}.qtool-tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _report_into_output(result: QuantizeResult, tmp: Path, inside: Path, report: Path) -> None:
    """The report at its place inside the output being built (``tmp``), refused where the output has a file."""
    target = tmp / inside
    if target.exists() or target.is_symlink():
        raise QtoolError(
            f"the report {report} would replace {inside.as_posix()} of the output",
            hint="choose another --report path; nothing was written",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    write_report(result, target)


def _write(
    work: list[tuple[ComponentPlan, QuantSpec | None]],
    folder: Path,
    tmp: Path,
    device: str,
    progress,
    result: QuantizeResult,
    allow_nonfinite: bool,
) -> None:
    """Each component quantized with its spec (a budget's None: copied as it is), then the rest copied."""
    for component, spec in work:
        target = tmp / component.name if component.name else tmp
        if spec is None:
            assert component.name, "a model is never left whole by a budget (it would fit as it is)"
            _copy_entry(component.folder, target)
            result.components.append(_budgeted(component, None, result.choice, None))
            continue
        done = _quantize_component(component, spec, target, device, progress, allow_nonfinite)
        result.components.append(_budgeted(component, spec, result.choice, done) if result.choice else done)
    for name in result.copied:
        _copy_entry(folder / name, tmp / name)


def _budgeted(
    plan: ComponentPlan, spec: QuantSpec | None, choice: Choice, done: ComponentResult | None
) -> ComponentResult:
    """A component's result with what the budget chose for it: its spec and the layers it keeps 16-bit; for a
    component left unquantized, a result of its own (nothing quantized, every Linear kept, stored as it was)."""
    (chosen,) = [c for c in choice.components if c.name == plan.name]
    if spec is None:
        return ComponentResult.of_plan(
            plan, plan.bytes_before, layers_quantized=0, layers_kept=len(plan.layers) + len(plan.kept_linears),
            budget_kept=len(chosen.kept), unquantized=True,
        )  # fmt: skip
    return dataclasses.replace(done, spec=spec, budget_kept=len(chosen.kept))


def _planned(plan: ComponentPlan, spec: QuantSpec | None, choice: Choice | None) -> ComponentResult:
    """A dry run's component: the plan's counts and the predicted bytes."""
    result = None if spec is None else ComponentResult.of_plan(plan, plan.bytes_after(spec))
    return _budgeted(plan, spec, choice, result) if choice is not None else result


def copied_weight_bytes(names: list[str], weights: Callable[[str], ComponentWeights], files: list[str]) -> int:
    """Tensor bytes of the root folders among ``names`` (pipeline components copied as they are: a budget counts them
    beside the quantized ones), from their safetensors headers (``weights(name)``); a file, or a folder holding no
    weight file (scheduler, tokenizer), counts 0. ``files``: the checkpoint's file listing.

    Raises:
        QtoolError: a folder holds weights that are not safetensors, whose size qtool does not read.
    """
    total = 0
    for name in names:
        if not any(f.startswith(name + "/") and f.endswith(WEIGHT_SUFFIXES) for f in files):
            continue
        try:
            total += weights(name).total_bytes
        except QtoolError as e:
            raise QtoolError(
                f"a budget counts every component's tensors, but those of {name} cannot be counted: {e.message}",
                hint="convert that component to safetensors, or quantize without a budget",
            ) from e
    return total


def _fit_budget(
    plan: Plan,
    spec: QuantSpec,
    budget: Budget,
    other_bytes: int,
    device: str | None,
    progress: Progress,
    allow_nonfinite: bool,
) -> tuple[Choice, list[tuple[ComponentPlan, QuantSpec | None]]]:
    """What a size budget chooses (``qtool.budget``), and each component's plan and spec for it.

    First from nominal errors (``nominal_errors``: headers only), so that the refusals (nothing fits; everything fits
    as stored) come before any weight is read; a dry run (``device`` None) stops there. Then every quantizable layer
    is measured at 4 and 8 bits (``measure_errors``: one more read of the weights to quantize, shown as progress) and
    the choice is made again from those errors. With double quant, ``OFFSET_MARGIN`` bytes per layer are kept back
    (the blobs' lengths are known only once written; ``_check_budget`` checks the written bytes). A component whose
    skip list the budget extends is planned again with it, and that plan must quantize exactly the layers the budget
    did not keep (checked: a mismatch is a bug, refused before anything is written).
    """
    from qtool import budget as fit
    from qtool.io.reader import TensorReader
    from qtool.plan import plan_component

    choice = _nominal_choice(plan, spec, budget, other_bytes)
    if device is not None:
        errors = []
        for c in plan.components:
            total = sum(c.weights.tensors[key].nbytes for key in c.layers)
            progress.start(f"{c.name or c.class_name}: error at 4 and 8 bits", total)
            with TensorReader(c.weights, threads=READ_THREADS[device]) as reader:
                options = fit.quantize_options(spec)
                errors.append(
                    fit.measure_errors(
                        c, reader, device, options, allow_nonfinite=allow_nonfinite, advance=progress.advance
                    )
                )
            progress.finish()
        choice = fit.choose_for_plans(plan.components, spec, budget, errors, other_bytes=other_bytes)
    specs = choice.specs(spec)
    work = []
    for c, chosen in zip(plan.components, choice.components, strict=True):
        own = specs[c.name]
        if own is not None and own.skip != spec.skip:
            again = plan_component(c.name, c.folder, c.weights, own)
            if {x.fqn for x in again.layers.values()} != {x.fqn for x in c.layers.values()} - set(chosen.kept):
                raise QtoolError(
                    f"{c.name or c.class_name}: the skip list chosen for the budget does not keep exactly the chosen "
                    "layers",
                    hint="this is a qtool bug: please report it with the output of `qtool env`; nothing was written",
                )
            c = again
        work.append((c, own))
    return choice, work


def _nominal_choice(plan: Plan, spec: QuantSpec, budget: Budget, other_bytes: int) -> Choice:
    """The choice from nominal errors (headers only): what a dry run shows, and the refusals before any read."""
    from qtool import budget as fit

    errors = [fit.nominal_errors(c, spec) for c in plan.components]
    return fit.choose_for_plans(plan.components, spec, budget, errors, other_bytes=other_bytes)


def _check_budget(result: QuantizeResult, work: list[tuple[ComponentPlan, QuantSpec | None]]) -> int:
    """The output's bytes in the budget's measure, as written: the choice's prediction plus what the double-quant
    blobs' real lengths add to it (disk and gpu count the blobs, memory does not). Refused, before the output is
    renamed into place, if that exceeds the budget (``OFFSET_MARGIN`` makes it impossible)."""
    from qtool.budget import human_size

    deviation = 0
    if result.budget.measure != "memory":
        for (plan, spec), done in zip(work, result.components, strict=True):
            if spec is not None:
                deviation += done.bytes_after - plan.bytes_after(spec)
    used = result.choice.bytes + deviation
    if used > result.budget.bytes:
        raise QtoolError(
            f"the output came to {human_size(used)} ({result.budget.measure}), over the budget of "
            f"{human_size(result.budget.bytes)}",
            hint="this is a qtool bug: please report it with the output of `qtool env`; nothing was written",
        )
    return used


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an old output (with --overwrite) is removed only after that."""
    old = None
    if out.exists():
        if not overwrite:
            raise QtoolError(f"{out} appeared while qtool was writing", hint="pass --overwrite or choose --output")
        old = out.resolve().parent / f".{out.name}.qtool-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:  # a file, or a symlink (its target is not ours to delete)
        old.unlink(missing_ok=True)


def download_patterns(
    source: str, *, revision: str | None, token: str | None, components: list[str] | None = None
) -> list[str]:
    """What to fetch from the Hub: model_index.json and the pipeline's component folders, or a model's files,
    never the single-file checkpoints at a pipeline repo's root.

    Refuses first what the repo's JSON files decide (a QtoolError before any weight is downloaded): ``components``
    naming a component the pipeline lacks, or given for one model, and a checkpoint that is already quantized.
    """
    from qtool import hub
    from qtool.plan import choose_components, pipeline_components

    files = hub.list_files(source, revision=revision, token=token)
    if "model_index.json" not in files:
        if components:
            raise QtoolError("--components applies to pipelines (repos with model_index.json); this is one model")
        _refuse_quantized(source, "config.json", files, revision, token)
        return MODEL_PATTERNS
    # Every component is needed for the output pipeline to load; --components only chooses what is quantized.
    available = pipeline_components(hub.read_json(source, "model_index.json", revision=revision, token=token))
    for name in choose_components(available, components):
        _refuse_quantized(source, f"{name}/config.json", files, revision, token)
    return pipeline_patterns(available)


def pipeline_patterns(available) -> list[str]:
    """What a pipeline needs from its repo: model_index.json and every component folder, never root checkpoints."""
    return ["model_index.json", "README.md", *(f"{name}/*" for name in available)]


def _refuse_quantized(source: str, config: str, files: list[str], revision, token) -> None:
    from qtool import hub
    from qtool.plan import quant_method

    if config not in files:
        return  # plan_folder says what is missing, after the download
    method = quant_method(hub.read_json(source, config, revision=revision, token=token))
    if method is not None:
        where = f"{source}/{config.removesuffix('/config.json')}" if "/" in config else source
        raise QtoolError(
            f"{where} is already quantized ({method})", hint="point qtool at the original (unquantized) checkpoint"
        )


def _remote_weights(source: str, folder: Path, prefix: str, files: list[str], revision, token):
    """A component's ComponentWeights from the Hub's safetensors headers (HTTP range reads, no weight download)."""
    from qtool import hub
    from qtool.io.reader import SAFETENSORS_DTYPES, ComponentWeights, TensorInfo

    inside = [f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]]
    indexes = sorted(f for f in inside if f.endswith(".safetensors.index.json") and f.count(".") == 3)
    if indexes:
        weight_map = json.loads((folder / prefix / indexes[0]).read_text())["weight_map"]
        shard_files = list(dict.fromkeys(weight_map.values()))
        base_name = indexes[0].removesuffix(".safetensors.index.json")
    else:
        singles = sorted(f for f in inside if f.endswith(".safetensors") and f.count(".") == 1)
        if not singles:
            raise QtoolError(f"{source}: no safetensors weights in {prefix or 'the repo root'}")
        shard_files, base_name = singles[:1], singles[0].removesuffix(".safetensors")
    headers = hub.safetensors_headers(source, [prefix + f for f in shard_files], revision=revision, token=token)
    tensors = {}
    for file in shard_files:
        for key, meta in headers[prefix + file].items():
            shape = tuple(meta["shape"])
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise QtoolError(f"{source}: {prefix}{file}: tensor {key!r} has unknown dtype tag {meta['dtype']!r}")
            bits = SAFETENSORS_DTYPES[meta["dtype"]][0]
            tensors[key] = TensorInfo(key, meta["dtype"], shape, file, math.prod(shape) * bits // 8)
    return ComponentWeights(
        folder=folder / prefix, base_name=base_name, tensors=tensors, sharded=bool(indexes), index_metadata={},
        file_metadata={},
    )  # fmt: skip


def headers_only(
    source: str, *, revision=None, token=None
) -> tuple[Path, Callable[[str], ComponentWeights], list[str] | None]:
    """A checkpoint's JSON files (a local folder, or the repo's ``*.json`` in the Hub cache), a function giving a
    component's ``ComponentWeights`` from its safetensors headers alone (``""`` for a model folder): files read for
    a local folder, HTTP range reads for a repo; and the repo's file list (None for a local folder). No weight is
    downloaded."""
    from qtool import hub
    from qtool.io.reader import scan_component

    if hub.is_local(source):
        folder = hub.download(source, patterns=[])
        return folder, lambda name: scan_component(folder / name), None
    files = hub.list_files(source, revision=revision, token=token)
    folder = hub.download(source, patterns=["*.json"], revision=revision, token=token, progress=False)

    def weights(name: str) -> ComponentWeights:
        return _remote_weights(source, folder, f"{name}/" if name else "", files, revision, token)

    return folder, weights, files


def plan_remote(source: str, spec: QuantSpec, components: list[str] | None, *, revision=None, token=None):
    """Plan a Hub repo from its JSON files and safetensors headers only: what --dry-run needs. Returns the folder of
    its JSON files, the plan, and ``headers_only``'s component headers function and file list."""
    from qtool.plan import pipeline_components, read_json

    folder, weights, files = headers_only(source, revision=revision, token=token)
    if components and not (folder / "model_index.json").exists():
        raise QtoolError("--components applies to pipelines (repos with model_index.json); this is one model")
    plan = plan_folder(folder, spec, components, source=source, weights=weights)
    if plan.kind == "pipeline":
        # What a run downloads and copies (download_patterns): model_index.json and the other component folders.
        available = pipeline_components(read_json(folder / "model_index.json"))
        chosen = {c.name for c in plan.components}
        folders = {f.split("/")[0] for f in files if "/" in f and f.split("/")[0] in available}
        plan.copied = sorted({"model_index.json"} | (folders - chosen))
    return folder, plan, weights, files
