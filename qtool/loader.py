"""``qtool.load``: run a bitsandbytes 4-bit / 8-bit checkpoint with qtool's layers, without bitsandbytes.

A pipeline folder (model_index.json) or one model folder (diffusers or transformers), local or on the Hub, written
by ``qtool quantize`` or by bnb's own ``save_pretrained``. Each quantized component is built here: its class from
config.json (the quantization_config taken out, so no quantizer runs), parameters on the meta device (buffers such
as rotary tables are computed as usual), every quantized ``nn.Linear`` replaced by ``qtool.nn.QuantLinear4bit`` /
``QuantLinear8bit`` made from its stored entries, and every other tensor filled from the safetensors files in
``dtype`` as ``from_pretrained(torch_dtype=dtype)`` would. The rest of a pipeline (VAE, CLIP, tokenizers, scheduler)
loads through ``DiffusionPipeline.from_pretrained`` as usual. Nothing here imports bitsandbytes.

transformers 5.x renames checkpoint keys while loading (``_names``): legacy LayerNorm ``gamma``/``beta``, each model
class's conversion mapping (GPT-NeoX's ``embed_out`` -> ``lm_head``, LLaVA's pre-5.0 layout, ...), and the base-model
prefix added or stripped. qtool asks transformers for the same renames and moves a quantized layer's entries with its
weight. The model then carries what a bnb-loaded one does for saving (``_like_from_pretrained``): the checkpoint's
``quantization_config`` in its config, and the renames that matched, which save_pretrained reverts.

Why the module is not called ``load.py``: importing a submodule ``qtool.load`` would replace the function
``qtool.load`` on the package with the module.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtool.errors import QtoolError

_PLAIN_HINT = (
    "qtool.load runs bitsandbytes 4-bit / 8-bit checkpoints (qtool quantize's output, or bnb's save_pretrained); "
    "load a plain checkpoint with from_pretrained, or quantize it first: qtool quantize SOURCE"
)


def load(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    revision: str | None = None,
    token: str | None = None,
    components: list[str] | None = None,
) -> Any:
    """Build a diffusers pipeline, or one diffusers / transformers model, from a bnb 4-bit / 8-bit checkpoint.

    Args:
        source: a local folder or a Hub repo id: a pipeline (model_index.json) or one model (config.json) whose
            config.json (each quantized component's) has a bitsandbytes ``quantization_config``.
        device: where to put the model or pipeline (e.g. "cuda"); None leaves it on the CPU, for example for
            ``pipe.enable_model_cpu_offload()``. The quantized weights are read straight onto it.
        dtype: the dtype of every floating-point tensor that is not quantized (as ``from_pretrained``'s
            ``torch_dtype``); None keeps the stored dtypes.
        revision, token: for Hub sources (only the files the load needs are downloaded).
        components: for a pipeline, the quantized components qtool builds (default: every quantized one); others
            load through diffusers as usual.

    Returns:
        The ``DiffusionPipeline`` or the model, in eval mode. A model's config carries the checkpoint's
        ``quantization_config``, so its ``save_pretrained`` writes a bnb checkpoint again (module docstring).

    Raises:
        QtoolError: the checkpoint is not bnb-quantized, pickle-only, or its tensors do not fit its model class
            (a missing tensor is named), or transformers would load a quantized weight through tensor operations.
    """
    from qtool import hub
    from qtool.dequant import download_quantized, quantized_components

    source = str(source)
    try:
        if hub.is_local(source):
            folder = hub.download(source, patterns=[])
        else:
            folder = download_quantized(source, components, revision=revision, token=token, progress=True)
        kind, chosen, _ = quantized_components(folder, components, name=source)
    except QtoolError as exc:
        if "not quantized" in exc.message:
            raise QtoolError(exc.message, hint=_PLAIN_HINT) from None
        raise
    if kind == "model":
        return load_model(folder, device=device, dtype=dtype)
    built = {name: load_model(folder / name, device=device, dtype=dtype) for name in chosen}
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **built, torch_dtype=dtype)
    if device is not None:
        pipe.to(device)
    return pipe


def load_model(folder: str | os.PathLike, *, device=None, dtype: torch.dtype | None = torch.bfloat16):
    """One local model folder with a bnb quantization_config, built with qtool's layers (see the module docstring)."""
    from qtool.formats.layers import quantized_layers
    from qtool.io.reader import TensorReader, scan_component
    from qtool.plan import detect_library, quant_method, read_json

    folder = Path(folder)
    config = read_json(folder / "config.json")
    method = quant_method(config)
    if method is None:
        raise QtoolError(f"{folder} is not quantized: its config.json has no quantization_config", hint=_PLAIN_HINT)
    if method != "bitsandbytes":
        raise QtoolError(f"{folder} is quantized with {method}; qtool.load runs bitsandbytes checkpoints only")
    library, class_name = detect_library(config, folder / "config.json")
    weights = scan_component(folder)  # refuses pickle-only folders before anything is built
    layers = {layer.fqn: layer for layer in quantized_layers(weights.tensors).values()}
    if not layers:
        raise QtoolError(
            f"{folder}: config.json says bitsandbytes, but no tensor is quantized (no quant_state or SCB entries)",
            hint="the weights may belong to another checkpoint",
        )
    compute_dtype = _compute_dtype(config["quantization_config"])
    threshold = _threshold(config["quantization_config"])
    model = _empty_model(library, class_name, folder)
    keep_fp32 = _keep_in_fp32(model, library, dtype)
    names = _names(model, library, weights.tensors, layers, folder)  # before any module is replaced

    def cast(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(torch.float32 if keep_fp32(key) else dtype)
        return tensor.to(device) if device is not None else tensor

    loaded: set[str] = set()
    unexpected: list[str] = []
    with TensorReader(weights) as reader:
        for fqn, layer in layers.items():
            loaded |= set(layer.entries.values())
            if fqn not in names.layers:  # e.g. an LM head in a checkpoint loaded as the base model
                unexpected += layer.entries.values()
                continue
            bias_key = names.disk.get(f"{names.layers[fqn]}.bias", f"{fqn}.bias")
            _replace_linear(
                model, names.layers[fqn], layer, bias_key, reader, weights, cast, device, compute_dtype, threshold,
                loaded,
            )  # fmt: skip
        for key in weights.tensors:
            if key in loaded or key in names.converted:
                continue
            target = names.keys.get(key, key)
            if not _set_tensor(model, target, lambda k=key, t=target: cast(t, reader.read(k))):
                unexpected.append(key)
        for target, sources in names.grouped().items():
            converter = copy.deepcopy(names.converters[sources[0][1]])
            for key, pattern in sources:
                converter.add_tensor(target, key, pattern, lambda k=key, t=target: cast(t, reader.read(k)))
            try:  # transformers' own tensor operations (merging per-expert weights, splitting a fused qkv, ...)
                converted = converter.convert(target, model=model, config=model.config)
            except Exception as exc:  # whatever its operations raise (shapes, missing sources)
                keys = ", ".join(key for key, _ in sources[:3])
                raise QtoolError(f"{folder}: transformers' {converter} failed on {keys}: {exc}") from exc
            for name, tensor in converted.items():
                tensor = tensor[0] if isinstance(tensor, list) else tensor
                if not _set_tensor(model, name, lambda t=tensor: t):
                    unexpected.append(name)
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    unexpected = [
        k for k in unexpected if not any(re.search(p, k) or re.search(p, names.keys.get(k, k)) for p in ignored)
    ]
    if unexpected:
        warnings.warn(
            f"{folder}: tensors the model has no place for were ignored: {', '.join(unexpected[:5])}", stacklevel=2
        )
    if library == "transformers":
        missing = {n for n, t in model.named_parameters(remove_duplicate=False) if t.is_meta}
        try:
            model.tie_weights(missing_keys=missing)
        except TypeError:  # transformers 4.x: no missing_keys
            model.tie_weights()
    left = [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()] if t.is_meta]
    if left:
        raise QtoolError(
            f"{folder}: the checkpoint has no tensor for {', '.join(left[:5])}"
            + (f" and {len(left) - 5} more" if len(left) > 5 else ""),
            hint=f"the weights do not belong to the {class_name} that config.json describes",
        )
    if device is not None:
        model.to(device)  # the buffers the class computes (rotary tables...), which the files do not hold
    _like_from_pretrained(model, library, folder, config["quantization_config"], names)
    return model.eval()


def _compute_dtype(quantization_config: dict) -> torch.dtype | None:
    from qtool.formats.bnb4 import DTYPES_BY_NAME

    name = quantization_config.get("bnb_4bit_compute_dtype")
    return DTYPES_BY_NAME.get(str(name).removeprefix("torch.")) if name else None


def _threshold(quantization_config: dict) -> float:
    """``llm_int8_threshold`` as bnb's Linear8bitLt takes it (6.0 when the config does not say)."""
    from qtool.linear import DEFAULT_THRESHOLD

    value = quantization_config.get("llm_int8_threshold")
    return DEFAULT_THRESHOLD if value is None else float(value)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every ``nn.Parameter`` on the meta device while buffers are made as usual (what accelerate's
    ``init_empty_weights(include_buffers=False)`` does, and from_pretrained with it): no memory for the weights,
    but non-persistent buffers such as rotary ``inv_freq``, which no checkpoint holds, get their real values."""
    original = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(module._parameters[name].__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _empty_model(library: str, class_name: str, folder: Path):
    """The model class built from config.json without its quantization_config, parameters on meta."""
    from qtool.plan import build_model

    return build_model(library, class_name, folder, _parameters_on_meta(), without_quantization_config=True)


def _keep_in_fp32(model, library: str, dtype: torch.dtype | None):
    """Whether a key stays float32, by the library's ``_keep_in_fp32_modules`` rule: diffusers for any dtype (a
    module name among the key's parts), transformers for float16 (``_strict``: float16 and bfloat16)."""
    if library == "diffusers":
        names = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return lambda key: bool(names) and any(n in key.split(".") for n in names)
    names = list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return lambda key: any(re.search(rf"(^|\.){re.escape(n)}(\.|$)", key) for n in names)


@dataclass
class _Names:
    """Where the checkpoint's tensors go in the model: keys on disk -> names in the model (unlisted: the same).

    Attributes:
        layers: a quantized layer's module path on disk -> its module in the model; absent where the model has no
            place for its weight.
        keys: every other renamed key on disk -> its parameter or buffer; ``disk`` the other way round.
        converted: a key that transformers converts with tensor operations -> (the first target it feeds, the
            matching source pattern); ``converters``: source pattern -> its ``WeightConverter``.
        used: the transforms that matched a key (transformers 5.x), which save_pretrained reverts.
    """

    layers: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    disk: dict[str, str] = field(default_factory=dict)
    converted: dict[str, tuple[str, str]] = field(default_factory=dict)
    converters: dict[str, Any] = field(default_factory=dict)
    used: list | None = None

    def grouped(self) -> dict[str, list[tuple[str, str]]]:
        """First target -> its (key on disk, source pattern) pairs: the tensors one converter takes together."""
        groups: dict[str, list[tuple[str, str]]] = {}
        for key, (target, pattern) in self.converted.items():
            groups.setdefault(target, []).append((key, pattern))
        return groups


def _names(model, library: str, keys, layers: dict, folder: Path) -> _Names:
    """The key renames transformers' from_pretrained applies, asked of transformers itself (5.x).

    from_pretrained takes the transforms from ``get_model_conversion_mapping(model, key_mapping, hf_quantizer)``
    (modeling_utils.py:4402 in transformers 5.23: the model's conversion mapping per class and ``model_type``,
    sub-models scoped to their prefix, then the legacy LayerNorm ``gamma``/``beta`` and weight-norm renames) and
    renames each key with ``rename_source_key``, the base-model prefix added or stripped where the model has the
    result (core_model_loading.py:1742-1752). Its bnb quantizer folds ``weight.absmax`` etc. into their layer's
    ``weight`` (quantizers/base.py ``get_weight_conversions``); here a quantized layer's entries follow the rename of
    its ``weight`` key. transformers 4.x (no ``conversion_mapping`` module) and diffusers: keys are taken as stored.
    """
    names = _Names(layers={fqn: fqn for fqn in layers})
    if library != "transformers":
        return names
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    except ImportError:
        return names
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names.converters = {pattern: c for c in converters for pattern in c.source_patterns}
    meta = model.state_dict()  # names only: the parameters are on meta
    prefix = model.base_model_prefix

    def rename(key: str) -> tuple[str, str | None]:
        new, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if new not in meta and key in meta:  # a key the model has only gets its prefix (core_model_loading.py:1748)
            new, pattern = rename_source_key(key, [], [], prefix, meta)
        return new, pattern

    weight_keys = {layer.weight_key: fqn for fqn, layer in layers.items()}
    entries = {key for layer in layers.values() for key in layer.entries.values()}
    names.layers = {}
    # In from_pretrained's order: a GroupWeightRename decides on the first key it sees.
    for key in sorted(keys, key=dot_natural_key):
        if key in weight_keys:
            new, pattern = rename(key)
            if pattern is not None:
                raise QtoolError(
                    f"{folder}: transformers loads {key} through tensor operations ({names.converters[pattern]}), "
                    "which a quantized weight does not allow",
                    hint="bitsandbytes' from_pretrained cannot load this layer quantized either",
                )
            if new in meta and new.endswith(".weight"):
                names.layers[weight_keys[key]] = new.removesuffix(".weight")
        elif key not in entries:
            new, pattern = rename(key)
            if pattern is not None and new in meta:
                names.converted[key] = (new, pattern)
            elif new != key:
                names.keys[key] = new
    names.disk = {new: key for key, new in names.keys.items()}
    names.used = [t for t in transforms if t.was_used()]
    return names


def _like_from_pretrained(model, library: str, folder: Path, quantization_config: dict, names: _Names) -> None:
    """Set what a bnb-loaded from_pretrained model carries besides its weights, so that ``save_pretrained`` writes a
    checkpoint that loads again (with qtool.load, or bitsandbytes). Line numbers: transformers 5.23.

    * The checkpoint's ``quantization_config``, as the library's ``BitsAndBytesConfig`` (what transformers'
      ``HfQuantizer.postprocess_model`` and diffusers' from_pretrained leave in the config; the plain dict if it does
      not parse): save_pretrained writes it into config.json. diffusers' config is a FrozenDict, changed through
      ``register_to_config``.
    * transformers: ``config._is_quantized`` on every sub-model, as ``_assign_is_quantized`` sets it
      (quantizers/base.py:66; never saved): flash attention reads it for the dtype of float32 queries, instead of
      looking for an ``nn.Linear`` weight (integrations/flash_attention.py:20), which qtool's layers are not.
      ``_weight_conversions``, the transforms that matched (core_model_loading.py:1876-1877), which save_pretrained
      reverts (modeling_utils.py:3532): the renamed keys are written as they were stored. And generation_config.json,
      which from_pretrained reads too.

    Left unset on purpose: ``hf_quantizer``, ``is_quantized``, ``quantization_method`` and ``is_loaded_in_4bit`` /
    ``8bit``. With them, transformers and diffusers take bnb's paths: ``model.to(dtype)``, ``.half()`` and
    ``.float()`` refuse, moving an 8-bit model needs bitsandbytes >= 0.48 (modeling_utils.py:3770),
    ``dequantize()`` calls bnb. qtool's layers need none of that (their buffers keep their dtypes under casts).
    """
    if library == "diffusers":
        import diffusers

        model.register_to_config(quantization_config=_bnb_config(diffusers.BitsAndBytesConfig, quantization_config))
        return
    import transformers

    model.config.quantization_config = _bnb_config(transformers.BitsAndBytesConfig, quantization_config)
    for module in model.modules():
        if isinstance(module, transformers.PreTrainedModel):
            module.config._is_quantized = True
    if names.used is not None:
        model._weight_conversions = names.used
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)


def _bnb_config(cls, quantization_config: dict):
    """``cls.from_dict`` of a copy (the library's own parse, as its from_pretrained does), else the dict as stored."""
    try:
        return cls.from_dict(dict(quantization_config))
    except (TypeError, ValueError):
        return dict(quantization_config)


def _replace_linear(
    model, fqn, layer, bias_key, reader, weights, cast, device, compute_dtype, threshold, loaded: set[str]
) -> None:
    from qtool.formats import bnb4
    from qtool.nn import QuantLinear4bit, QuantLinear8bit

    try:
        module = model.get_submodule(fqn)
    except AttributeError:
        raise QtoolError(f"{weights.folder}: quantized layer {fqn} is not a module of the model") from None
    if not isinstance(module, torch.nn.Linear):
        raise QtoolError(f"{weights.folder}: quantized layer {fqn} is a {type(module).__name__}, not an nn.Linear")
    entries = {}
    for name, key in layer.entries.items():
        tensor = reader.read(key)
        # The blob and the int8 format flag are read on the host; the rest (stored dtypes kept) goes to the device.
        host = name.startswith(bnb4.BLOB_PREFIX) or name == "weight_format"
        entries[name] = tensor if host or device is None else tensor.to(device)
    bias = None
    if module.bias is not None:
        if bias_key not in weights.tensors:
            raise QtoolError(f"{weights.folder}: the checkpoint has no tensor for {fqn}.bias")
        bias = cast(f"{fqn}.bias", reader.read(bias_key))
        loaded.add(bias_key)
    try:
        if layer.bits == 4:
            new = QuantLinear4bit.from_entries(entries, bias, compute_dtype)
        else:
            new = QuantLinear8bit.from_entries(entries, bias, threshold)
    except ValueError as exc:
        raise QtoolError(f"{weights.folder}: cannot load {fqn}: {exc}") from exc
    if (new.out_features, new.in_features) != (module.out_features, module.in_features):
        raise QtoolError(
            f"{weights.folder}: {fqn} stores a [{new.out_features}, {new.in_features}] weight but the model's Linear"
            f" is [{module.out_features}, {module.in_features}]",
            hint="the weights do not belong to the model config.json describes",
        )
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _set_tensor(model, key: str, read) -> bool:
    """Put the checkpoint tensor ``key`` (``read()`` gives it) in its parameter or buffer; False if there is none."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    if attr in module._parameters and module._parameters[attr] is not None:
        old = module._parameters[attr]
        tensor = read()
        _check_shape(key, tensor, old)
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        return True
    if attr in module._buffers and attr not in module._non_persistent_buffers_set:
        old = module._buffers[attr]
        tensor = read()
        if old is not None:
            _check_shape(key, tensor, old)
        module._buffers[attr] = tensor
        return True
    return False


def _check_shape(key: str, tensor: torch.Tensor, old: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(old.shape):
        raise QtoolError(
            f"{key} has shape {list(tensor.shape)} in the checkpoint but {list(old.shape)} in the model",
            hint="the weights do not belong to the model config.json describes",
        )
