"""Decide, from configs and safetensors headers only, what a quantization run does to each tensor.

A plan says which Linear weights become 4-bit or 8-bit, which stay as they are, and in what order the output
state dict lists them. It must quantize exactly the modules that diffusers or transformers would replace with
bitsandbytes layers when loading the output, or the loader fails (bnb-format.md §3.3): so the model class is built
on the meta device (no weights, no memory) to list its ``nn.Linear`` modules, and each library's own skip rules are
applied as that library applies them. ``qtool footprint`` and ``--dry-run`` stop here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qtool.errors import QtoolError
from qtool.io.reader import ComponentWeights, TensorInfo
from qtool.spec import QuantSpec

# What FLUX.1-dev-style pipelines quantize by default: the two big components (seed document: CLIP and the VAE are
# small and have few Linear layers).
DEFAULT_PIPELINE_COMPONENTS = ("transformer", "text_encoder_2")
# save_pretrained's default shard sizes (decimal bytes).
MAX_SHARD_SIZE = {"diffusers": 10 * 10**9, "transformers": 50 * 10**9}
FLOAT_TAGS = {"F32": 4, "F16": 2, "BF16": 2}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The quant_state blob records the double-quant offset as the repr of a float32 widened to a double; its length
# (typically 17-20 characters, e.g. 0.12803184986114502) is the one part of a size prediction not known exactly.
TYPICAL_OFFSET = 0.12803184986114502


@dataclass(frozen=True)
class LayerPlan:
    """One Linear whose weight is quantized. ``key`` is the full weight key; shape is [out_features, in_features]."""

    fqn: str
    key: str
    shape: tuple[int, int]
    dtype: str


@dataclass(frozen=True)
class ModelTensor:
    """A parameter or buffer of the model as its class builds it (on the meta device)."""

    numel: int
    itemsize: int
    floating: bool
    buffer: bool = False


@dataclass
class ComponentPlan:
    """What happens to one model folder (a pipeline component, or the whole model)."""

    name: str
    library: str
    class_name: str
    weights: ComponentWeights
    config: dict
    layers: dict[str, LayerPlan]
    kept_linears: dict[str, str]
    key_order: list[str]
    skips_matched: set[str] = field(default_factory=set)  # the --skip names that keep at least one Linear here
    model_tensors: dict[str, ModelTensor] = field(default_factory=dict)  # parameters (tied ones once) and buffers

    @property
    def folder(self) -> Path:
        return self.weights.folder

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.weights.tensors.values())

    @property
    def bytes_before(self) -> int:
        return self.weights.total_bytes

    def bytes_after(self, spec: QuantSpec) -> int:
        """Tensor bytes written (exact but for the length of the double-quant offset's repr in each layer's blob)."""
        total = 0
        for key, info in self.weights.tensors.items():
            layer = self.layers.get(key)
            total += quantized_bytes(layer.shape, spec, layer.dtype) if layer else info.nbytes
        return total

    def memory_after(self, spec: QuantSpec) -> int:
        """What ``get_memory_footprint()`` reports for the quantized model loaded with bnb (see memory_bytes)."""
        packed = {key: packed_bytes(layer.shape, spec) for key, layer in self.layers.items()}
        return memory_bytes(self.model_tensors, self.weights.tensors, packed)


@dataclass
class Plan:
    """A whole run: the source, the components to quantize, and the other components to copy as they are."""

    source: str
    kind: str  # "pipeline" or "model"
    spec: QuantSpec
    components: list[ComponentPlan]
    copied: list[str] = field(default_factory=list)


def packed_bytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes of a quantized weight's ``weight`` tensor alone: 4-bit codes two per byte, or int8."""
    n = math.prod(shape)
    return n if spec.bits == 8 else (n + 1) // 2


def quantized_bytes(shape: tuple[int, ...], spec: QuantSpec, dtype: str = "BF16") -> int:
    """Bytes of one quantized weight's tensors as bitsandbytes stores them (bnb-format.md §1.1, §2.1); ``dtype`` is
    the source weight's safetensors tag, which the 4-bit quant-state blob records."""
    from qtool.formats.bnb4 import blob_fields

    n = math.prod(shape)
    if spec.bits == 8:
        return n + 4 * shape[0] + 1  # weight int8, SCB float32 per row, weight_format uint8
    nblocks = math.ceil(n / spec.blocksize)
    offset = TYPICAL_OFFSET if spec.double_quant else None
    blob = len(json.dumps(blob_fields(spec.quant_type, spec.blocksize, DTYPE_NAMES[dtype], shape, offset)))
    size = packed_bytes(shape, spec) + 16 * 4 + blob
    if spec.double_quant:
        return size + nblocks + 4 * math.ceil(nblocks / 256) + 256 * 4
    return size + 4 * nblocks


def memory_bytes(
    model_tensors: dict[str, ModelTensor], stored: dict[str, TensorInfo], packed: dict[str, int] | None = None
) -> int:
    """What ``get_memory_footprint()`` of the loaded model reports when it loads in the dtypes it is stored in
    (``torch_dtype=torch.bfloat16`` for a bf16 checkpoint): every parameter (tied ones once) and buffer.

    A weight that bnb quantizes counts as its ``weight`` tensor only (``packed``, or its stored size in a checkpoint
    that is already quantized): bnb keeps absmax, SCB and the rest as attributes, which the footprint does not
    see. A parameter the checkpoint does not store is created in the load dtype (the stored floating-point dtype);
    a buffer it does not store (non-persistent, e.g. rotary ``inv_freq``) keeps the dtype its module gives it.
    """
    packed = packed or {}
    float_sizes = [FLOAT_TAGS[t.dtype] for t in stored.values() if t.dtype in FLOAT_TAGS]
    float_size = max(set(float_sizes), key=float_sizes.count) if float_sizes else 4
    total = 0
    for name, tensor in model_tensors.items():
        if name in packed:
            total += packed[name]
        elif name in stored:
            total += stored[name].nbytes
        else:
            total += tensor.numel * (float_size if tensor.floating and not tensor.buffer else tensor.itemsize)
    return total


def model_tensors(model) -> dict[str, ModelTensor]:
    """The parameters (each shared tensor once, as ``named_parameters`` lists it) and buffers of a meta model."""
    tensors = {n: ModelTensor(t.numel(), t.element_size(), t.is_floating_point()) for n, t in model.named_parameters()}
    for name, t in model.named_buffers():
        tensors[name] = ModelTensor(t.numel(), t.element_size(), t.is_floating_point(), buffer=True)
    return tensors


def read_json(path: Path) -> dict:
    """A local JSON object file (config.json, model_index.json), checked and reported as qtool.hub does."""
    from qtool import hub

    return hub.read_json(str(Path(path).parent), Path(path).name)


def detect_library(config: dict, path: Path) -> tuple[str, str]:
    """``(library, class_name)`` of a model folder's config.json."""
    if "_class_name" in config:
        return "diffusers", config["_class_name"]
    architectures = config.get("architectures") or []
    if architectures:
        return "transformers", architectures[0]
    raise QtoolError(
        f"{path} names no model class (no '_class_name' or 'architectures')",
        hint="qtool needs a config.json as diffusers' or transformers' save_pretrained writes it",
    )


# --- which Linear layers each library quantizes ------------------------------------------------------------------


def diffusers_keeps(fqn: str, not_convert: list[str]) -> bool:
    """diffusers' rule (quantizers/bitsandbytes/utils.py): a Linear stays unquantized if its child name is in the
    list, or if a key equals its full name, or if ``key + "."`` occurs anywhere in its full name. So "proj_out"
    also keeps every ``single_transformer_blocks.N.proj_out``."""
    child = fqn.rsplit(".", 1)[-1]
    return child in not_convert or any(key + "." in fqn or key == fqn for key in not_convert)


def transformers_keeps(fqn: str, patterns: list[str]) -> bool:
    """transformers' rule (quantizers_utils.should_convert_module): a pattern matches from the start up to a module
    boundary (as a regular expression), or is a plain suffix of the full name ("fc1" keeps "model.layers.3.fc1")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", fqn):
                return True
        except re.error:
            pass
        if fqn.endswith(key):
            return True
    return False


def _unknown_class(library: str, version: str, class_name: str, names: list[str], folder: Path):
    """The error for a config naming a class the installed library lacks, with the nearest names it has."""
    import difflib

    close = difflib.get_close_matches(class_name, names, n=3)
    if read_json(folder / "config.json").get("auto_map"):
        hint = "its config.json asks for the model's own code (auto_map); qtool never runs code from a checkpoint"
    elif close:
        hint = f"did you mean {', '.join(close)}? Or upgrade {library} (pip install -U {library})"
    else:
        hint = f"upgrade {library} (pip install -U {library}), or check the class name in config.json"
    return QtoolError(f"{library} {version} has no model class {class_name!r} ({folder / 'config.json'})", hint=hint)


def build_meta_model(library: str, class_name: str, folder: Path):
    """The model class instantiated on the meta device from the folder's config: structure only, no memory."""
    import torch

    return build_model(library, class_name, folder, torch.device("meta"))


def build_model(library: str, class_name: str, folder: Path, init, *, without_quantization_config: bool = False):
    """The diffusers / transformers class ``class_name`` (QtoolError if the library has no such model class), built
    from the folder's config.json inside the context manager ``init`` (a device, or one that puts only parameters on
    meta); ``without_quantization_config``: built as if the config had none, so no quantizer is asked for."""
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            names = [n for n in dir(diffusers) if n[:1].isupper()]
            raise _unknown_class(library, diffusers.__version__, class_name, names, folder)
        config = cls.load_config(folder)
        if without_quantization_config:
            config = dict(config)
            config.pop("quantization_config", None)
        with init:
            return cls.from_config(config)
    import transformers

    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        names = [n for n in dir(transformers) if n[:1].isupper()]
        raise _unknown_class(library, transformers.__version__, class_name, names, folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    if without_quantization_config and hasattr(config, "quantization_config"):
        del config.quantization_config
    with init:
        return cls(config)


def transformers_default_skips(model) -> list[str]:
    """transformers' get_keys_to_not_convert: tied weights, the module of the last parameter (an LLM's lm_head),
    and the output embeddings. Applied only when no skip list is given (base.get_modules_to_not_convert)."""
    keys = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys |= set(tied.keys()) | set(tied.values())
    keys.add(list(model.named_parameters())[-1][0])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        keys |= {name for name, module in model.named_modules() if module is output}
    return sorted({k.removesuffix(".weight") for k in keys})


def quant_method(config: dict) -> str | None:
    """The ``quant_method`` of a config.json's quantization_config ("bitsandbytes", "gguf", ...), or None."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return None
    return str(quantization.get("quant_method", "unknown")) if isinstance(quantization, dict) else "unknown"


def plan_component(name: str, folder: Path, weights: ComponentWeights, spec: QuantSpec) -> ComponentPlan:
    """Plan one model folder: list its Linear layers on the meta device and apply the loader's skip rules."""
    import torch

    config = read_json(folder / "config.json")
    if quant_method(config) is not None:
        raise QtoolError(
            f"{folder} is already quantized ({quant_method(config)})",
            hint="point qtool at the original (unquantized) checkpoint",
        )
    library, class_name = detect_library(config, folder / "config.json")
    model = build_meta_model(library, class_name, folder)
    skip = list(spec.skip)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if library == "diffusers":
        not_convert = skip + keep_fp32
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

        def keeps(fqn: str, names: list[str] = not_convert) -> bool:
            return diffusers_keeps(fqn, names)

    else:
        from transformers.pytorch_utils import Conv1D

        conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
        if conv1d:
            raise QtoolError(
                f"{class_name} uses transformers' Conv1D layers ({conv1d[0]}, ...), which qtool does not quantize yet",
                hint="bitsandbytes transposes Conv1D weights on load; only nn.Linear models are supported",
            )
        defaults = transformers_default_skips(model) if not skip else []
        patterns = sorted(set(skip + keep_fp32 + defaults))
        # transformers converts exact nn.Linear only (type(module) is nn.Linear), not subclasses.
        candidates = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}

        def keeps(fqn: str, names: list[str] = patterns) -> bool:
            return transformers_keeps(fqn, names)

    tied = getattr(model, "all_tied_weights_keys", None) or {}  # transformers: {tied key: the key it shares}
    layers: dict[str, LayerPlan] = {}
    kept: dict[str, str] = {}
    for fqn, module in candidates.items():
        key = f"{fqn}.weight"
        if keeps(fqn):
            kept[fqn] = "--skip" if skip and keeps(fqn, skip) else f"{library} keeps it"
            continue
        info = weights.tensors.get(key)
        if info is None and key in tied:
            # Only with --skip, which replaces transformers' default skips (they keep every tied weight): transformers
            # would then wrap the tied 16-bit weight in a bitsandbytes layer that fails at its first forward.
            raise QtoolError(
                f"{name or class_name}: {fqn} shares its weight with {tied[key]} (tied, not stored); a --skip list "
                f"replaces transformers' default skips, so it would load as a bitsandbytes layer that cannot run",
                hint=f"add --skip {fqn} (transformers keeps it unquantized only when no skip list is given)",
            )
        if info is None:
            raise QtoolError(f"{name or class_name}: the checkpoint has no tensor {key!r} for Linear {fqn}")
        check_linear_weight(info, (module.out_features, module.in_features))
        layers[key] = LayerPlan(fqn=fqn, key=key, shape=tuple(info.shape), dtype=info.dtype)

    matched = {s for s in skip if any(keeps(fqn, [s]) for fqn in candidates)}
    key_order = [k for k in model.state_dict() if k in weights.tensors]
    in_model = set(key_order)
    key_order += [k for k in weights.tensors if k not in in_model]
    return ComponentPlan(
        name=name,
        library=library,
        class_name=class_name,
        weights=weights,
        config=config,
        layers=layers,
        kept_linears=kept,
        key_order=key_order,
        skips_matched=matched,
        model_tensors=model_tensors(model),
    )


def check_skips(plans: list[ComponentPlan], spec: QuantSpec) -> None:
    """Refuse a --skip name that keeps no Linear in any quantized component: a typo would otherwise quantize the
    layer the user meant to keep, silently."""
    unmatched = [s for s in spec.skip if not any(s in p.skips_matched for p in plans)]
    if unmatched:
        where = ", ".join(p.name or p.class_name for p in plans)
        example = next((layer.fqn for p in plans for layer in p.layers.values()), "proj_out")
        raise QtoolError(
            f"--skip {', '.join(unmatched)} matches no Linear layer of {where}",
            hint=f"name a module as the model names it, e.g. {example} (a module keeps every Linear inside it)",
        )


def check_linear_weight(info: TensorInfo, shape: tuple[int, int]) -> None:
    """A Linear's stored weight must be a float tensor of the shape its module expects, as from_pretrained checks."""
    if info.dtype not in FLOAT_TAGS:
        raise QtoolError(
            f"{info.key} ({info.file}) is {info.dtype}; qtool quantizes float32, float16 and bfloat16 weights",
            hint="an integer or float8 Linear weight means the checkpoint is already quantized some other way; "
            "point qtool at the original float checkpoint",
        )
    if tuple(info.shape) != shape:
        raise QtoolError(
            f"{info.key} ({info.file}) has shape {list(info.shape)} but its Linear expects {list(shape)}",
            hint="the weights do not belong to the model config.json describes",
        )


def pipeline_components(model_index: dict) -> dict[str, tuple[str, str]]:
    """``{component: (library, class_name)}`` from model_index.json entries like ``["diffusers", "AutoencoderKL"]``."""
    out = {}
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        out[name] = (value[0], value[1])
    return out


def choose_components(available: dict[str, tuple[str, str]], requested: list[str] | None) -> list[str]:
    """The components to quantize: the requested ones (all must exist) or the defaults that exist."""
    if requested:
        missing = [c for c in requested if c not in available]
        if missing:
            raise QtoolError(
                f"no component {', '.join(repr(c) for c in missing)} in this pipeline",
                hint=f"it has: {', '.join(available)}",
            )
        return list(dict.fromkeys(requested))
    chosen = [c for c in DEFAULT_PIPELINE_COMPONENTS if c in available]
    if not chosen:
        raise QtoolError(
            "this pipeline has neither a 'transformer' nor a 'text_encoder_2' to quantize by default",
            hint=f"pick components with --components; it has: {', '.join(available)}",
        )
    return chosen


def plan_folder(
    folder: Path,
    spec: QuantSpec,
    components: list[str] | None = None,
    source: str = "",
    weights: Callable[[str], ComponentWeights] | None = None,
) -> Plan:
    """Plan a pipeline folder (model_index.json) or model folder (config.json), from configs and headers only.

    ``weights(component)`` gives a component's ComponentWeights (``""`` for a model folder); by default it scans
    the safetensors files in the folder. A Hub dry run passes one that reads the headers over HTTP instead.
    """
    from qtool.io.reader import scan_component

    folder = Path(folder)
    if weights is None:

        def weights(name: str) -> ComponentWeights:
            return scan_component(folder / name)

    if (folder / "model_index.json").exists():
        available = pipeline_components(read_json(folder / "model_index.json"))
        chosen = choose_components(available, components)
        plans = [plan_component(name, folder / name, weights(name), spec) for name in chosen]
        check_skips(plans, spec)
        copied = sorted(p.name for p in folder.iterdir() if p.name not in chosen)
        return Plan(source=source or str(folder), kind="pipeline", spec=spec, components=plans, copied=copied)
    if (folder / "config.json").exists():
        if components:
            raise QtoolError("--components applies to pipelines (folders with model_index.json); this is one model")
        plan = plan_component("", folder, weights(""), spec)
        check_skips([plan], spec)
        return Plan(source=source or str(folder), kind="model", spec=spec, components=[plan])
    raise QtoolError(
        f"{folder} has neither model_index.json (a diffusers pipeline) nor config.json (a model)",
        hint="point qtool at a folder written by save_pretrained, or at a Hub repo id",
    )
