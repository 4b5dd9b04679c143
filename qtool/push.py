"""``push``: publish a quantized checkpoint to the Hub in one commit, with a model card written if it has none.

The card's metadata (``base_model``, ``base_model_relation: quantized``, the source's license, ``library_name``,
tags) and its text (settings, the footprint table, a loading snippet) come from the folder itself: its configs,
its safetensors headers (``qtool.footprint``) and the provenance record that ``qtool quantize`` writes
(``qtool.json``). A folder written by bnb's save_pretrained works too; ``base_model`` then comes from
``--base-model`` or is left out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qtool.api import PROVENANCE
from qtool.errors import QtoolError
from qtool.plan import detect_library, read_json

CARD = "README.md"


@dataclass
class PushResult:
    folder: Path
    repo_id: str
    url: str  # where the files go: the repo (and branch) URL
    files: list[tuple[str, int]]  # (path in the repo, bytes), the model card included
    card_written: bool  # whether qtool wrote README.md (False: the folder had one)
    dry_run: bool
    commit_url: str | None = None
    pr_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def to_dict(self) -> dict:
        return {
            "folder": str(self.folder),
            "repo_id": self.repo_id,
            "url": self.url,
            "dry_run": self.dry_run,
            "card_written": self.card_written,
            "files": [{"path": p, "bytes": n} for p, n in self.files],
            "total_bytes": self.total_bytes,
            "commit_url": self.commit_url,
            "pr_url": self.pr_url,
        }


def _read_provenance(folder: Path) -> dict:
    path = folder / PROVENANCE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_card(folder: Path, repo_id: str, base_model: str | None = None) -> str:
    """The README.md qtool writes for a quantized checkpoint folder published as ``repo_id``."""
    from qtool import hub, ui
    from qtool.footprint import footprint

    folder = Path(folder)
    provenance = _read_provenance(folder)
    sizes = footprint(folder)
    if not sizes.quantized:
        raise QtoolError(
            f"{folder} is not quantized: no config.json has a quantization_config",
            hint="push publishes what qtool quantize wrote; quantize first",
        )
    base_model = base_model or (provenance.get("source") if provenance.get("source_is_hub_repo") else None)
    library = provenance.get("library_name")
    if library is None:  # a folder qtool did not write: a pipeline is diffusers'; a model says in its config
        config_path = folder / "config.json"
        library = "diffusers" if sizes.kind == "pipeline" else detect_library(read_json(config_path), config_path)[0]
    quantized = [c for c in sizes.components if c.quantization]
    configs = [c.quantization["quantization_config"] for c in quantized]
    # A size budget (qtool quantize --max-size) can give components different methods: the card names each.
    tags, kinds = ["bitsandbytes"], []
    for config in configs:
        four = bool(config.get("load_in_4bit") or config.get("_load_in_4bit"))
        quant_type = config.get("bnb_4bit_quant_type", "fp4") if four else "int8"
        double = four and bool(config.get("bnb_4bit_use_double_quant"))
        tags += ["4-bit" if four else "8-bit", quant_type] + (["double-quant"] if double else [])
        kinds.append("4-bit " + quant_type.upper() if four else "8-bit LLM.int8")
    tags = list(dict.fromkeys([*tags, "qtool"]))
    metadata: dict = {"library_name": library, "tags": tags}
    if base_model:
        metadata |= {"base_model": base_model, "base_model_relation": "quantized"}
    for key in ("license", "pipeline_tag"):
        if provenance.get(key):
            metadata[key] = provenance[key]

    name = folder.name
    repo_hint = base_model or "the original model"
    revision = provenance.get("source_revision")
    source_line = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else repo_hint
    if revision:
        source_line += f" at revision `{revision}`"
    rows = ["| component | class | Linear quantized / kept | size in memory | size on disk |", "|---|---|---|---|---|"]
    for c in sizes.components:
        if c.stored is None:
            continue
        layers = f"{c.layers_quantized} / {c.layers_kept}" if c.role == "quantized" else "not quantized"
        rows.append(
            f"| {c.name or '(model)'} | {c.class_name} | {layers} | {ui.human_bytes(c.stored.memory_bytes)} "
            f"| {ui.human_bytes(c.stored.disk_bytes)} |"
        )
    total = sizes.total()
    if total is not None and len(sizes.components) > 1:
        rows.append(f"| total | | | {ui.human_bytes(total.memory_bytes)} | {ui.human_bytes(total.disk_bytes)} |")
    before = provenance.get("bytes_before") or {}
    if before:
        after = {c.name: c.stored.disk_bytes for c in sizes.components if c.role == "quantized" and c.stored}
        shrink = ", ".join(
            f"{n or 'model'} {ui.human_bytes(before[n])} -> {ui.human_bytes(after[n])}" for n in before if n in after
        )
        rows.append(f"\nQuantized components before and after (tensor bytes): {shrink}.")
    if all(config == configs[0] for config in configs):
        settings = json.dumps(configs[0], indent=2, sort_keys=True)
    else:
        by_name = {c.name: config for c, config in zip(quantized, configs, strict=True)}
        settings = json.dumps(by_name, indent=2, sort_keys=True)
    version = f" {provenance['qtool_version']}" if provenance.get("qtool_version") else ""
    if library == "diffusers" and sizes.kind == "pipeline":
        snippet = (
            "import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16)\n'
            'pipe.to("cuda")'
        )
    elif library == "diffusers":
        class_name = sizes.components[0].class_name
        snippet = (
            f"import torch\nfrom diffusers import {class_name}\n\n"
            f'model = {class_name}.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16)'
        )
    else:
        snippet = (
            "import torch\nfrom transformers import AutoModel  # or AutoModelForCausalLM for an LLM\n\n"
            f'model = AutoModel.from_pretrained("{repo_id}", dtype=torch.bfloat16, device_map="auto")'
        )
    body = f"""# {name}

{sizes.method} ({", ".join(dict.fromkeys(kinds))}) quantization of {source_line}, in
the bitsandbytes format: diffusers and transformers load it with `bitsandbytes` installed and no quantization
arguments. Written by qtool{version}.

## Load it

```python
{snippet}
```

To get a plain (dequantized) checkpoint back, without bitsandbytes: `qtool dequantize {repo_id} --output DIR`.

## Size

{chr(10).join(rows)}

Memory is what `get_memory_footprint()` reports once loaded; disk is the tensor bytes of the safetensors files.

## Quantization settings

```json
{settings}
```
"""
    return hub.render_card(metadata, body)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Publish ``folder`` to the model repo ``repo_id`` in one commit (creating the repo if needed), with a model
    card written into the folder first if it has none. ``dry_run`` lists the files (the card included) and where
    they would go, offline, and writes nothing."""
    from qtool import hub

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise QtoolError(f"no such folder: {folder}", hint="pass the folder that qtool quantize wrote")
    hub.check_repo_id(repo_id)
    files = [(f, (folder / f).stat().st_size) for f in hub.list_files(str(folder))]
    card = None
    if not (folder / CARD).exists():
        card = model_card(folder, repo_id, base_model)
        files = sorted([*files, (CARD, len(card.encode("utf-8")))])
    branch = "" if create_pr or not revision else f"/tree/{revision}"
    url = f"{hub.endpoint()}/{repo_id}{branch}" + (" (as a pull request)" if create_pr else "")
    result = PushResult(folder, repo_id, url, files, card is not None, dry_run)
    if dry_run:
        return result
    if card is not None:
        tmp = folder / f".{CARD}.qtool-tmp"
        tmp.write_text(card, encoding="utf-8")
        os.replace(tmp, folder / CARD)
    result.commit_url, result.pr_url = hub.upload_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
    )
    return result
