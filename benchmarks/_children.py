"""What benchmarks/e2e_quantize.py runs in fresh processes, one per measurement, so that each starts from nothing.

    python benchmarks/_children.py KIND SRC DST COMPONENTS METHOD

KIND is ``environment`` (GPU, driver, versions: the parent must not import torch), ``read`` (the files of
COMPONENTS under SRC, METHOD threads), ``bnb-quantize`` / ``bnb-dequantize`` (the diffusers / transformers +
bitsandbytes routes, SRC to DST) or ``compare`` (two quantized checkpoints, byte for byte). Each prints one line,
``RESULT {json}``, last.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import _flux_source  # noqa: E402
import _pagecache  # noqa: E402
import _results  # noqa: E402

# BitsAndBytesConfig arguments per method (as e2e_quantize.METHODS names them); 4-bit computes in bf16.
BNB_CONFIGS = {
    "nf4dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}


def main(kind: str, src: Path, dst: Path, components: list[str], method: str) -> None:
    """Run in a fresh process; prints one ``RESULT {json}`` line: ``seconds`` (from this function's start, the
    imports included), ``stage_seconds`` and PyTorch's peak GPU memory."""
    start = time.perf_counter()
    if kind == "environment":
        print("RESULT " + json.dumps(_results.environment()), flush=True)
        return
    if kind == "read":
        files = _flux_source.component_files(src, components)
        threads = int(method)
        n = _pagecache.read_sequential(files) if threads == 1 else _pagecache.read_parallel(files, threads)
        print("RESULT " + json.dumps({"bytes": n, "seconds": time.perf_counter() - start}), flush=True)
        return
    import torch

    cuda = torch.cuda.is_available()
    if kind == "compare":
        print("RESULT " + json.dumps(compare(src, dst, components, "cuda" if cuda else "cpu")), flush=True)
        return
    import diffusers
    import transformers

    from qtool.api import _copy_entry

    stages = {"import": time.perf_counter() - start}  # torch, diffusers, transformers (bitsandbytes with them)
    workaround = ""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for name in components:
        config = json.loads((src / name / "config.json").read_text())
        lib = diffusers if "_class_name" in config else transformers
        cls = getattr(lib, config["_class_name"] if lib is diffusers else config["architectures"][0])
        kwargs = {"torch_dtype" if lib is diffusers else "dtype": torch.bfloat16}
        if kind == "bnb-quantize":
            extra = {"bnb_4bit_compute_dtype": torch.bfloat16} if BNB_CONFIGS[method].get("load_in_4bit") else {}
            kwargs["quantization_config"] = lib.BitsAndBytesConfig(**BNB_CONFIGS[method], **extra)
        if not cuda:  # bnb's CPU backend: diffusers behind the tests' patch, both libraries on device_map="cpu"
            kwargs["device_map"] = "cpu"
        t = time.perf_counter()
        if lib is diffusers and not cuda:
            sys.path.insert(0, str(ROOT / "tests"))
            from bnb_loading import diffusers_on_cpu

            with diffusers_on_cpu():
                model = cls.from_pretrained(src / name, **kwargs)
        else:
            model = cls.from_pretrained(src / name, **kwargs)
        stages[f"{name}.from_pretrained"] = time.perf_counter() - t
        if kind == "bnb-dequantize":
            t = time.perf_counter()
            model = model.dequantize()
            if lib is diffusers:  # diffusers' dequantize() leaves quantization_config in the config it saves
                from diffusers.configuration_utils import FrozenDict

                model._internal_dict = FrozenDict(
                    {k: v for k, v in model._internal_dict.items() if k != "quantization_config"}
                )
            stages[f"{name}.dequantize"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            model.save_pretrained(dst / name)
        except NotImplementedError:
            # transformers 5 cannot revert its load-time weight conversions once dequantize() swapped the layers.
            workaround = "save_original_format=False (the default raised NotImplementedError)"
            model.save_pretrained(dst / name, save_original_format=False)
        stages[f"{name}.save_pretrained"] = time.perf_counter() - t
        del model
        if cuda:
            torch.cuda.empty_cache()
    t = time.perf_counter()
    for entry in src.iterdir():
        if entry.name not in components and not entry.name.startswith("."):
            _copy_entry(entry, dst / entry.name)
    stages["copy_rest"] = time.perf_counter() - t
    report = {
        "seconds": time.perf_counter() - start,
        "stage_seconds": stages,
        "peak_gpu_torch_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "workaround": workaround,
    }
    print("RESULT " + json.dumps(report), flush=True)


def compare(ours: Path, theirs: Path, components: list[str], device: str) -> dict:
    """Key sets, dtypes and shapes of the quantized components, and how many tensor bytes differ."""
    import torch

    from qtool.io import TensorReader, scan_component

    keys_equal, differing, compared = True, 0, 0
    for name in components:
        a, b = scan_component(ours / name), scan_component(theirs / name)
        if {k: (i.dtype, i.shape) for k, i in a.tensors.items()} != {
            k: (i.dtype, i.shape) for k, i in b.tensors.items()
        }:
            keys_equal = False
            print(f"{name}: key sets, dtypes or shapes differ", file=sys.stderr)
            continue
        with TensorReader(a) as ra, TensorReader(b) as rb:
            for key in a.tensors:
                x, y = ra.read(key).to(device), rb.read(key).to(device)
                raw_x, raw_y = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
                differing += int((raw_x != raw_y).sum())
                compared += raw_x.numel()
    return {"keys_equal": keys_equal, "differing": differing, "compared": compared}


if __name__ == "__main__":
    kind, src, dst, components, method = sys.argv[1:6]
    main(kind, Path(src), Path(dst), [c for c in components.split(",") if c], method)
