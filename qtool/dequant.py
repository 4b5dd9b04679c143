"""``dequantize_checkpoint``: a bitsandbytes 4-bit / 8-bit checkpoint back to a plain one, without bitsandbytes.

Any bnb checkpoint (qtool's, or diffusers'/transformers' ``save_pretrained``; a pipeline or one model folder; local
or on the Hub): each quantized Linear's entries become one dense ``weight`` (the Triton kernels on a GPU, the
PyTorch reference on the CPU; equal to bnb's own dequantization of the same bytes), ``quantization_config`` leaves
config.json, and every other tensor and file is kept as it is. Streams layer by layer (``qtool.pipeline``: reads,
device work and writes overlap) into a temporary folder that is renamed into place when complete and verified, like
``quantize_checkpoint``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qtool.api import (
    Progress,
    _check_output,
    _copied_entries,
    _copy_entry,
    _Silent,
    atomic_output,
    copy_component_files,
    default_output,
    peak_rss_bytes,
    resolve_device,
)
from qtool.errors import QtoolError
from qtool.formats.layers import QuantizedLayer, quant_state_keys, quantized_layers
from qtool.plan import MAX_SHARD_SIZE, choose_components, detect_library, pipeline_components, quant_method, read_json

if TYPE_CHECKING:
    from qtool.pipeline import PipelineStats

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class DequantizedComponent:
    name: str
    class_name: str
    method: str  # what it was: nf4-dq, fp4, int8 ...
    layers: int
    bytes_before: int
    bytes_after: int
    dtypes: list[str] = field(default_factory=list)  # the dtypes the dequantized weights were written in
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    pipeline: PipelineStats | None = None  # what the run measured stage by stage


@dataclass
class DequantizeResult:
    output: Path
    source: str
    kind: str
    components: list[DequantizedComponent]
    copied: list[str]
    device: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "source": self.source,
            "kind": self.kind,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "copied": self.copied,
            "components": [
                {
                    "name": c.name,
                    "class": c.class_name,
                    "method": c.method,
                    "layers_dequantized": c.layers,
                    "bytes_before": c.bytes_before,
                    "bytes_after": c.bytes_after,
                    "dtypes": c.dtypes,
                    "seconds": round(c.seconds, 3),
                    "files": c.files,
                    "pipeline": c.pipeline.to_dict() if c.pipeline else None,
                }
                for c in self.components
            ],
        }


def quantized_components(
    folder: Path, components: list[str] | None, name: str | None = None
) -> tuple[str, list[str], list[str]]:
    """``(kind, the components to dequantize, the root entries to copy)``; refuses a checkpoint with nothing to do.
    ``name``: what messages call the checkpoint (a Hub repo's id rather than its cache folder)."""
    label = name or folder
    if (folder / "model_index.json").exists():
        available = pipeline_components(read_json(folder / "model_index.json"))
        methods = {
            name: quant_method(read_json(folder / name / "config.json"))
            for name in available
            if (folder / name / "config.json").is_file()
        }
        if components:
            components = choose_components(available, components)  # refuses names the pipeline lacks
            plain = [c for c in components if methods.get(c) is None]
            if plain:
                quantized = [n for n, m in methods.items() if m] or ["none"]
                raise QtoolError(
                    f"component {', '.join(map(repr, plain))} is not quantized",
                    hint=f"the quantized components are: {', '.join(quantized)}",
                )
        chosen = list(dict.fromkeys(components)) if components else [n for n, m in methods.items() if m]
        if not chosen:
            raise QtoolError(
                f"{label} is not quantized: no component's config.json has a quantization_config",
                hint="dequantize reads checkpoints written by qtool quantize or by bitsandbytes' save_pretrained",
            )
        _check_bnb({name: methods[name] for name in chosen})
        copied = [p.name for p in folder.iterdir() if p.name not in chosen]
        return "pipeline", chosen, _copied_entries(folder, sorted(copied))
    if (folder / "config.json").exists():
        if components:
            raise QtoolError("--components applies to pipelines (folders with model_index.json); this is one model")
        method = quant_method(read_json(folder / "config.json"))
        if method is None:
            raise QtoolError(
                f"{label} is not quantized: its config.json has no quantization_config",
                hint="dequantize reads checkpoints written by qtool quantize or by bitsandbytes' save_pretrained",
            )
        _check_bnb({"": method})
        return "model", [""], []
    raise QtoolError(
        f"{label} has neither model_index.json (a diffusers pipeline) nor config.json (a model)",
        hint="point qtool at a folder written by save_pretrained, or at a Hub repo id",
    )


def _check_bnb(methods: dict[str, str | None]) -> None:
    other = {name: m for name, m in methods.items() if m != "bitsandbytes"}
    if other:
        name, method = next(iter(other.items()))
        raise QtoolError(
            f"{name or 'the model'} is quantized with {method}; qtool dequantizes bitsandbytes checkpoints only"
        )


def _default_dtype(weights, owned: set[str]) -> str:
    """An 8-bit layer records no dtype: use the one the checkpoint's other floating-point tensors are stored in
    (the dtype it was loaded in before quantization), float16 where there are none (bnb's int8 input dtype).
    ``owned``: the quant-state keys (the quantized weights themselves are integer, never counted)."""
    tags = Counter(t.dtype for k, t in weights.tensors.items() if k not in owned and t.dtype in ("BF16", "F16", "F32"))
    by_tag = {tag: name for name, tag in _TAGS.items()}
    return by_tag[tags.most_common(1)[0][0]] if tags else "float16"


def _dequantize_component(
    folder: Path, out: Path, name: str, dtype: str | None, device: str, progress: Progress, allow_nonfinite: bool
) -> DequantizedComponent:
    """Stream one component through ``qtool.pipeline``: a reader thread reads each layer's entries (or a plain
    tensor), this thread dequantizes on the device and counts non-finite values there, a writer thread refuses
    non-finite layers (unless allowed) and writes. Before returning, the written files are verified."""
    import torch

    from qtool import verify
    from qtool.api import READ_THREADS, stream_component
    from qtool.formats.bnb4 import BLOB_PREFIX
    from qtool.io.reader import TensorReader, scan_component
    from qtool.io.writer import ShardedWriter
    from qtool.pipeline import ALIGN
    from qtool.quantize import dequantize_tensor

    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = read_json(folder / "config.json")
    library, class_name = detect_library(config, folder / "config.json")
    weights = scan_component(folder)
    layers = quantized_layers(weights.tensors)
    if not layers:
        raise QtoolError(
            f"{folder}: config.json says bitsandbytes, but no tensor is quantized (no quant_state or SCB entries)",
            hint="the weights may belong to another checkpoint",
        )
    for key, layer in layers.items():
        if key not in weights.tensors:
            raise QtoolError(f"{folder}: quantized layer {layer.fqn} has quant-state entries but no {key!r}")
    owned = quant_state_keys(layers)
    order = [k for k in weights.tensors if k not in owned]
    int8_dtype = getattr(torch, dtype or _default_dtype(weights, owned))

    def target(layer: QuantizedLayer) -> torch.dtype | None:
        return getattr(torch, dtype) if dtype else (int8_dtype if layer.bits == 8 else None)

    # A layer's weight is read with its quant-state entries (the weight first); other tensors alone.
    groups = [
        [key, *(k for k in layers[key].entries.values() if k != key)] if key in layers else [key] for key in order
    ]
    out.mkdir(parents=True, exist_ok=True)
    dtypes: set[str] = set()
    method = _method(config)
    progress.start(name or class_name, weights.total_bytes)

    def compute(tensors: dict, slot) -> tuple:
        key = next(iter(tensors))
        progress.advance(sum(weights.tensors[k].nbytes for k in tensors))
        layer = layers.get(key)
        if layer is None:
            return key, tensors[key], None
        # The JSON blob and the int8 format flag are read on the host (no device round trip); the rest goes to the
        # device from the slot's pinned memory.
        entries = {
            n: t if n.startswith(BLOB_PREFIX) or n == "weight_format" else t.to(device, non_blocking=True)
            for n, k in layer.entries.items()
            for t in [tensors[k]]
        }
        try:
            dense = dequantize_tensor(entries, dtype=target(layer))
        except ValueError as exc:
            raise QtoolError(f"{folder}: cannot dequantize {layer.fqn}: {exc}") from exc
        dtypes.add(str(dense.dtype).removeprefix("torch."))
        checked = {} if allow_nonfinite else {"count": verify.nonfinite_count(dense)}
        host = slot.to_host({"dense": dense, **checked})
        return key, host["dense"], host.get("count")

    def write(done: tuple) -> None:
        key, tensor, count = done
        if count is not None:
            verify.judge_dequantized(int(count), verify.tensor_name(name, key))
        writer.add_group({key: tensor})

    with TensorReader(weights, threads=READ_THREADS[device]) as reader:
        writer_plan = _writer_plan(reader, weights, layers, order, target)
        # The largest dense weight, and its non-finite count, copied back from the device.
        out_bytes = max((2 * ALIGN + g[key].nbytes for g in writer_plan or () for key in g if key in layers), default=0)
        with ShardedWriter(out, weights.base_name, MAX_SHARD_SIZE[library], plan=writer_plan) as writer:
            stats = stream_component(
                reader, groups, compute, write, device, [g for g in groups if g[0] in layers], out_bytes=out_bytes
            )
            t = time.perf_counter()
            files = writer.close()
            bytes_after = writer.total_size
            stats.finish = time.perf_counter() - t
            verify.verify_dequantized(weights, layers, out, reader, device, target)
            stats.verify = time.perf_counter() - t - stats.finish
    progress.finish()
    stats.bytes_read = weights.total_bytes
    stats.bytes_written = sum(p.stat().st_size for p in files)
    if device == "cuda":
        stats.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    config.pop("quantization_config")
    # diffusers and transformers both write json.dumps(indent=2, sort_keys=True) + "\n".
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_component_files(folder, out)
    return DequantizedComponent(
        name=name,
        class_name=class_name,
        method=method,
        layers=len(layers),
        bytes_before=weights.total_bytes,
        bytes_after=bytes_after,
        dtypes=sorted(dtypes),
        seconds=time.perf_counter() - start,
        files=[p.name for p in files],
        pipeline=stats,
    )


def _writer_plan(reader, weights, layers: dict[str, QuantizedLayer], order: list[str], target):
    """Each output tensor's dtype tag and shape, for ``ShardedWriter(plan=...)``: a dequantized weight's from its
    quant state (the 4-bit blobs are read here, a few hundred bytes each), every other tensor's from the source.
    None if a blob cannot be read as one, or a kept tensor has a dtype the writer cannot write: the run then
    reports the problem where it always has, the writer planning nothing."""
    import torch

    from qtool.formats import bnb4
    from qtool.io.writer import Planned, writable

    plan = []
    for key in order:
        layer = layers.get(key)
        if layer is None:
            info = weights.tensors[key]
            if not writable(info.dtype):
                return None
            plan.append({key: Planned(info.dtype, tuple(info.shape))})
            continue
        dtype = target(layer)
        if layer.bits == 8:
            shape = tuple(weights.tensors[key].shape)
        else:
            blob = next((k for n, k in layer.entries.items() if n.startswith(bnb4.BLOB_PREFIX)), None)
            try:
                meta = bnb4.decode_blob(reader.read(blob))
                shape, dtype = tuple(int(d) for d in meta["shape"]), dtype or bnb4.DTYPES_BY_NAME[meta["dtype"]]
            except (QtoolError, ValueError, KeyError, TypeError, AttributeError):
                return None
        plan.append({key: Planned(_TAGS[str(dtype or torch.float16).removeprefix("torch.")], shape)})
    return plan


def _method(config: dict) -> str:
    from qtool.spec import QuantSpec

    try:
        return QuantSpec.from_quantization_config(config["quantization_config"]).label
    except (QtoolError, TypeError, ValueError, AttributeError):
        return "bitsandbytes"


def dequantize_checkpoint(
    source: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    dtype: str | None = None,
    components: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> DequantizeResult:
    """Write a bitsandbytes checkpoint (local folder or Hub repo; a pipeline or one model) back as a plain one.

    Args:
        source: a folder written by qtool quantize or bnb's save_pretrained, or a Hub repo id.
        output: the output folder (default: ./<source name>-dequantized).
        dtype: "bf16", "fp16" or "fp32" for the dequantized weights; default: for 4-bit layers the dtype their
            quant state records (the original weight's), for 8-bit ones the dtype of the checkpoint's other float
            tensors. Other tensors are kept as they are.
        components: the pipeline components to dequantize (default: every quantized one).
        revision, token: for Hub sources.
        device: "cuda" (Triton kernels) or "cpu" (PyTorch reference); default: cuda when available.
        overwrite: replace an existing output folder.
        allow_nonfinite: write layers that dequantize to NaN or Inf (non-finite stored scales) instead of refusing
            them (a QtoolError naming the layer).
        progress: receives progress events (bytes read per component).
    """
    from qtool import hub

    if dtype is not None and dtype not in DTYPES:
        raise QtoolError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    progress = progress or _Silent()
    started = time.perf_counter()
    source = str(source)
    device = resolve_device(device)
    local_folder = hub.download(source, patterns=[]) if hub.is_local(source) else None
    out = Path(output).expanduser() if output else default_output(source, "dequantized", local_folder)
    _check_output(out, local_folder, overwrite)
    if local_folder is not None:
        folder = local_folder
    else:
        folder = download_quantized(source, components, revision=revision, token=token, progress=progress.enabled)
    kind, chosen, copied = quantized_components(folder, components)
    result = DequantizeResult(output=out, source=source, kind=kind, components=[], copied=copied, device=device)
    with atomic_output(out, overwrite) as tmp:
        for name in chosen:
            target = tmp / name if name else tmp
            result.components.append(
                _dequantize_component(
                    folder / name, target, name, DTYPES.get(dtype or ""), device, progress, allow_nonfinite
                )
            )
        for name in copied:
            _copy_entry(folder / name, tmp / name)
    result.seconds = time.perf_counter() - started
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def download_quantized(source: str, components: list[str] | None, *, revision, token, progress: bool) -> Path:
    """The repo's JSON files first, so that a plain or foreign checkpoint is refused before any weight is fetched;
    then the pipeline's component folders (never root single-file checkpoints), or the model's files."""
    from qtool import hub
    from qtool.api import MODEL_PATTERNS, pipeline_patterns

    folder = hub.download(source, patterns=["*.json"], revision=revision, token=token, progress=False)
    quantized_components(folder, components, name=source)
    if (folder / "model_index.json").exists():
        patterns = pipeline_patterns(pipeline_components(read_json(folder / "model_index.json")))
    else:
        patterns = MODEL_PATTERNS
    return hub.download(source, patterns=patterns, revision=revision, token=token, progress=progress)
