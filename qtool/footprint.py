"""``qtool footprint``: what a checkpoint costs in memory before and after quantization, from headers alone.

For a plain checkpoint, each component to quantize is planned exactly as ``qtool quantize`` plans it (same layers
kept in 16-bit), and its size is predicted for 8-bit, 4-bit and 4-bit with double quant. For a checkpoint that is
already quantized (by qtool, or by diffusers/transformers with bitsandbytes), its actual sizes and settings are
read instead. Two figures per size:

- ``disk_bytes``: tensor bytes in the safetensors files (quant-state tensors included): for a prediction, what
  ``qtool quantize`` writes.
- ``memory_bytes``: what ``get_memory_footprint()`` reports for the model loaded with bitsandbytes in the dtypes it
  is stored in (``torch_dtype=torch.bfloat16`` for a bf16 checkpoint). It counts parameters and buffers, so a
  quantized weight counts as its packed codes only: bnb keeps absmax and SCB beside the parameter.
- ``gpu_bytes`` (the figure ``--gpu-memory`` checks): ``memory_bytes`` plus the quant states, which loading also
  puts on the GPU. Activations, the CUDA context and the allocator's cache come on top: hence the headroom.

For a checkpoint written by ``qtool quantize``, each quantized component's quality figures too (SQNR, relative
Frobenius error, largest error, extreme codes: ``qtool.quality``), as its ``qtool.json`` recorded them during the run;
other quantized checkpoints have none (``Footprint.quality_note`` says why).

Nothing here downloads a weight: a Hub repo's headers come through HTTP range reads, a folder's from its files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qtool.errors import QtoolError
from qtool.formats.layers import quant_state_keys, quantized_layers
from qtool.io.reader import ComponentWeights
from qtool.plan import (
    ComponentPlan,
    build_meta_model,
    check_skips,
    choose_components,
    detect_library,
    memory_bytes,
    model_tensors,
    packed_bytes,
    pipeline_components,
    plan_component,
    quant_method,
    quantized_bytes,
    read_json,
)
from qtool.quality import ComponentQuality
from qtool.spec import QuantSpec

if TYPE_CHECKING:
    from qtool.budget import Budget, Choice

_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


@dataclass(frozen=True)
class Size:
    """One component's size in one form (as stored, or after a quantization method). Bytes throughout."""

    disk_bytes: int
    memory_bytes: int
    gpu_bytes: int

    def __add__(self, other: Size) -> Size:
        return Size(
            self.disk_bytes + other.disk_bytes,
            self.memory_bytes + other.memory_bytes,
            self.gpu_bytes + other.gpu_bytes,
        )

    def to_dict(self) -> dict:
        return {"disk_bytes": self.disk_bytes, "memory_bytes": self.memory_bytes, "gpu_bytes": self.gpu_bytes}


ZERO = Size(0, 0, 0)


@dataclass
class ComponentFootprint:
    """One component (or the whole model, name ``""``).

    role: "quantize" (a plain component qtool would quantize; ``after`` holds its predicted sizes), "quantized"
    (already quantized; ``stored`` is its actual size and ``quantization`` its settings) or "kept" (a pipeline
    component that stays as it is, such as the VAE; ``stored`` only, None when it has no safetensors weights).
    """

    name: str
    class_name: str
    role: str
    parameters: int | None
    stored: Size | None
    layers_quantized: int = 0
    layers_kept: int = 0
    after: dict[str, Size] = field(default_factory=dict)
    quantization: dict | None = None
    note: str = ""
    # A component quantized by qtool: its figures as qtool.json recorded them.
    quality: ComponentQuality | None = None

    def size(self, method: str) -> Size | None:
        """Its size once the pipeline is quantized with ``method`` (its stored size unless it gets quantized: so
        for a checkpoint that is already quantized, its actual size whatever ``method`` says)."""
        return self.after.get(method, self.stored) if self.role == "quantize" else self.stored

    def to_dict(self, methods: list[str], gpu_memory: int | None, chosen: str) -> dict:
        out = {
            "name": self.name,
            "class": self.class_name,
            "role": self.role,
            "parameters": self.parameters,
            "layers_quantized": self.layers_quantized,
            "layers_kept": self.layers_kept,
            "stored": self.stored.to_dict() if self.stored else None,
            "after": {m: self.after[m].to_dict() for m in methods if m in self.after},
            "quantization": self.quantization,
            "note": self.note,
            "quality": self.quality.to_dict() if self.quality is not None else None,
        }
        size = self.size(chosen)
        if gpu_memory is not None:
            out["fit"] = fit(size, gpu_memory)
        return out


@dataclass
class Footprint:
    source: str
    kind: str  # "pipeline" or "model"
    quantized: bool  # whether the checkpoint is already quantized (sizes are then actual, not predicted)
    method: str  # the method --gpu-memory is checked for: the chosen one, or the checkpoint's own
    methods: list[str]  # the methods predicted, e.g. ["int8", "nf4", "nf4-dq"]; [] for a quantized checkpoint
    components: list[ComponentFootprint]
    gpu_memory: int | None = None
    # Why a quantized checkpoint shows no quality figures ("" when it does, or is not quantized).
    quality_note: str = ""
    # What a size budget would choose (qtool.budget.Choice, from nominal errors), and each component's method in it
    # (None: left as stored); no choice and a note when everything fits as it is.
    budget: Budget | None = None
    choice: Choice | None = None
    budget_methods: dict[str, str | None] = field(default_factory=dict)
    budget_note: str = ""

    def total(self, method: str | None = None) -> Size | None:
        """The whole checkpoint's size after ``method`` (None: as stored); None if a component's size is unknown."""
        sizes = [c.size(method) if method else c.stored for c in self.components]
        if any(s is None for s in sizes):
            return None
        return sum(sizes, ZERO)

    def to_dict(self) -> dict:
        total = {
            "stored": _opt(self.total()),
            "after": {m: _opt(self.total(m)) for m in self.methods},
        }
        if self.gpu_memory is not None:
            total["fit"] = fit(self.total(self.method), self.gpu_memory)
        return {
            "source": self.source,
            "kind": self.kind,
            "quantized": self.quantized,
            "method": self.method,
            "methods": self.methods,
            "gpu_memory_bytes": self.gpu_memory,
            "components": [c.to_dict(self.methods, self.gpu_memory, self.method) for c in self.components],
            "total": total,
            "quality_note": self.quality_note,
            "budget": self.budget_dict(),
        }

    def budget_dict(self) -> dict | None:
        if self.budget is None:
            return None
        return {
            "measure": self.budget.measure,
            "budget_bytes": self.budget.bytes,
            "bits": list(self.budget.bits),
            "errors": "nominal",
            "fits_as_is": self.choice is None,
            "note": self.budget_note,
            "methods": self.budget_methods,
            "choice": self.choice.to_dict() if self.choice is not None else None,
        }


def _opt(size: Size | None) -> dict | None:
    return size.to_dict() if size else None


def fit(size: Size | None, gpu_memory: int) -> dict:
    """Whether the weights fit in ``gpu_memory`` bytes, and the headroom left for activations (negative: short)."""
    if size is None:
        return {"fits": None, "headroom_bytes": None}
    return {"fits": size.gpu_bytes <= gpu_memory, "headroom_bytes": gpu_memory - size.gpu_bytes}


def parse_size(text: str) -> int:
    """``"24GB"``, ``"24 GiB"``, ``"7.5G"``, ``"24000MB"`` or ``"24"`` (GB) in bytes; GB = 10^9, GiB = 2^30."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = match and match[2].lower()
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise QtoolError(
            f"cannot read {text!r} as a memory size",
            hint="write it like 24GB, 24GiB, 7.5GB or 16000MB (GB = 10^9 bytes)",
        )
    return int(float(match[1]) * _UNITS[unit])


def methods_for(spec: QuantSpec) -> dict[str, QuantSpec]:
    """The methods a prediction shows (8-bit, 4-bit, 4-bit + double quant, with the chosen 4-bit code type), by
    label, in that order; the chosen spec's label is among them."""
    four = replace(spec, bits=4, double_quant=False) if spec.bits == 4 else QuantSpec(skip=spec.skip)
    specs = {
        "int8": QuantSpec(bits=8, skip=spec.skip, threshold=spec.threshold),
        four.label: four,
        replace(four, double_quant=True).label: replace(four, double_quant=True),
    }
    return specs


def _predicted(plan: ComponentPlan, specs: dict[str, QuantSpec]) -> ComponentFootprint:
    stored_memory = memory_bytes(plan.model_tensors, plan.weights.tensors)
    after = {}
    for label, spec in specs.items():
        memory = plan.memory_after(spec)
        # The quant states: what is written for each quantized layer beyond its packed weight.
        states = sum(
            quantized_bytes(layer.shape, spec, layer.dtype) - packed_bytes(layer.shape, spec)
            for layer in plan.layers.values()
        )
        after[label] = Size(plan.bytes_after(spec), memory, memory + states)
    return ComponentFootprint(
        name=plan.name,
        class_name=plan.class_name,
        role="quantize",
        parameters=plan.parameters,
        stored=Size(plan.bytes_before, stored_memory, stored_memory),
        layers_quantized=len(plan.layers),
        layers_kept=len(plan.kept_linears),
        after=after,
    )


def _quantized(name: str, folder: Path, weights: ComponentWeights, config: dict) -> ComponentFootprint:
    """An already quantized component: its actual sizes and its settings."""
    import torch

    method = quant_method(config)
    library, class_name = detect_library(config, folder / "config.json")
    quantization: dict = {"quant_method": method, "quantization_config": config["quantization_config"]}
    if method != "bitsandbytes":
        size = weights.total_bytes
        return ComponentFootprint(
            name, class_name, "quantized", None, Size(size, size, size), quantization=quantization,
            note=f"quantized with {method}: sizes are as stored; qtool reads bitsandbytes checkpoints only",
        )  # fmt: skip
    quantization["method"] = QuantSpec.from_quantization_config(config["quantization_config"]).label
    model = build_meta_model(library, class_name, folder)
    tensors = model_tensors(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = quantized_layers(weights.tensors)
    quantized = {layer.fqn for layer in layers.values()} & linears
    memory = memory_bytes(tensors, weights.tensors)
    # bnb puts the quant states (absmax, quant_map, nested_*, SCB) on the GPU beside the counted parameters.
    states = sum(weights.tensors[k].nbytes for k in quant_state_keys(layers))
    return ComponentFootprint(
        name=name,
        class_name=class_name,
        role="quantized",
        parameters=sum(t.numel for t in tensors.values() if not t.buffer),
        stored=Size(weights.total_bytes, memory, memory + states),
        layers_quantized=len(quantized),
        layers_kept=len(linears - quantized),
        quantization=quantization,
    )


def recorded_quality(folder: Path) -> tuple[dict[str, ComponentQuality | None], str]:
    """Each component's quality figures as the ``qtool.json`` in ``folder`` records them (by component name, ``""``
    for a model), or none and a note saying why: no qtool.json (not written by qtool), none recorded (an older qtool),
    or a file that cannot be read as qtool wrote it."""
    from qtool.api import PROVENANCE

    path = folder / PROVENANCE
    if not path.is_file():
        return {}, f"no quality figures: not written by qtool (no {PROVENANCE})"
    try:
        recorded = json.loads(path.read_text()).get("quality")
        if recorded is None:
            return {}, f"no quality figures: {PROVENANCE} records none (written by an older qtool)"
        if not isinstance(recorded, dict):
            raise ValueError(f"quality is {recorded!r}")
        return {k: None if v is None else ComponentQuality.from_dict(v) for k, v in recorded.items()}, ""
    except (OSError, ValueError, AttributeError) as e:
        return {}, f"no quality figures: {PROVENANCE} cannot be read ({e})"


def _kept(name: str, class_name: str, weights: Callable[[str], ComponentWeights]) -> ComponentFootprint:
    """A pipeline component left as it is: its stored size (memory as stored: no model is built for it)."""
    try:
        found = weights(name)
    except QtoolError as exc:
        return ComponentFootprint(name, class_name, "kept", None, None, note=exc.message)
    size = found.total_bytes
    parameters = sum(math.prod(t.shape) for t in found.tensors.values())
    return ComponentFootprint(name, class_name, "kept", parameters, Size(size, size, size))


def footprint(
    source: str | os.PathLike,
    *,
    spec: QuantSpec | None = None,
    components: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    gpu_memory: int | None = None,
    budget: Budget | None = None,
) -> Footprint:
    """Sizes of a checkpoint before and after quantization (or, if it is quantized, as it is), from headers only.

    Args:
        source: a local folder or a Hub repo id (a pipeline or one model).
        spec: the options; its skip list decides the kept layers, its code type (nf4/fp4) the 4-bit methods shown
            and its label the method that ``gpu_memory`` is checked for (default: 4-bit NF4).
        components: the pipeline components to quantize (default: transformer and text_encoder_2, as quantize).
        revision, token: for Hub sources (a token reaches gated repos).
        gpu_memory: the GPU's memory in bytes, to say whether each component and the whole checkpoint fit.
        budget: also say what ``qtool quantize`` would choose for this size budget (``_budget_choice``).
    """
    from qtool.api import headers_only

    spec = spec or QuantSpec()
    source = str(source)
    folder, weights, files = headers_only(source, revision=revision, token=token)
    specs = methods_for(spec)
    if (folder / "model_index.json").exists():
        kind = "pipeline"
        available = pipeline_components(read_json(folder / "model_index.json"))
        configs = {
            name: read_json(folder / name / "config.json")
            for name in available
            if (folder / name / "config.json").is_file()
        }
        quantized = [name for name, config in configs.items() if quant_method(config) is not None]
        chosen = [] if quantized else choose_components(available, components)
    elif (folder / "config.json").exists():
        kind, available = "model", {"": ("", "")}
        configs = {"": read_json(folder / "config.json")}
        quantized = [""] if quant_method(configs[""]) is not None else []
        chosen = [] if quantized else [""]
        if components:
            raise QtoolError("--components applies to pipelines (folders with model_index.json); this is one model")
    else:
        raise QtoolError(
            f"{source} has neither model_index.json (a diffusers pipeline) nor config.json (a model)",
            hint="point qtool at a folder written by save_pretrained, or at a Hub repo id",
        )
    if quantized and components:
        raise QtoolError(
            f"{source} is already quantized ({', '.join(n or 'the model' for n in quantized)}): footprint shows its "
            "actual sizes, and --components chooses what to quantize",
            hint="drop --components",
        )
    if quantized and budget is not None:
        raise QtoolError(
            f"{source} is already quantized ({', '.join(n or 'the model' for n in quantized)}): a budget applies to "
            "a checkpoint not yet quantized",
            hint="point footprint at the original checkpoint",
        )

    plans = [plan_component(name, folder / name, weights(name), spec) for name in chosen]
    check_skips(plans, spec)
    by_name = {p.name: p for p in plans}
    figures, quality_note = recorded_quality(folder) if quantized else ({}, "")
    rows = []
    for name, (_, class_name) in available.items():
        if name in by_name:
            rows.append(_predicted(by_name[name], specs))
        elif name in quantized:
            rows.append(
                replace(_quantized(name, folder / name, weights(name), configs[name]), quality=figures.get(name))
            )
        elif name in configs:
            rows.append(_kept(name, class_name, weights))
    if quantized:
        labels = [r.quantization.get("method", r.quantization["quant_method"]) for r in rows if r.quantization]
        method = ", ".join(dict.fromkeys(labels))
        methods = []
    else:
        method, methods = spec.label, list(specs)
    result = Footprint(
        source=source,
        kind=kind,
        quantized=bool(quantized),
        method=method,
        methods=methods,
        components=rows,
        gpu_memory=gpu_memory,
        quality_note=quality_note,
        budget=budget,
    )
    if budget is not None:
        if kind == "pipeline" and files is None:  # a local folder: quantize copies every other folder
            from qtool import hub

            copied = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in chosen)
            files = hub.list_files(str(folder))
        else:  # a repo: the component folders quantize downloads
            copied = [name for name in available if name not in chosen] if kind == "pipeline" else []
        _budget_choice(result, plans, spec, budget, copied, weights, files or [])
    return result


def _budget_choice(result: Footprint, plans: list[ComponentPlan], spec: QuantSpec, budget: Budget, copied, weights,
                   files) -> None:  # fmt: skip
    """What ``qtool quantize`` would choose for ``budget`` (``qtool.budget.choose_for_plans``, as quantize calls it):
    from nominal errors (``nominal_errors``: Gaussian weights), since footprint reads no weight, with the folders
    quantize copies as they are (``copied``) counted beside. Everything fitting as stored is no error here: the
    note says so."""
    from qtool.api import copied_weight_bytes
    from qtool.budget import FitsUnquantized, choose_for_plans, nominal_errors

    other = copied_weight_bytes(copied, weights, files)
    errors = [nominal_errors(plan, spec) for plan in plans]
    try:
        result.choice = choose_for_plans(plans, spec, budget, errors, other_bytes=other)
    except FitsUnquantized as e:
        result.budget_note = e.message
        return
    result.budget_methods = {c.name: c.spec(spec).label if c.bits else None for c in result.choice.components}
