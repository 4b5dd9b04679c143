"""Scale search (issue 8): per layer, the SQNR with searched scales against plain absmax at the same size, and the
time it costs, on real pretrained weights that PyPI packages ship and on a FLUX.1-dev-shaped synthetic model.

    python benchmarks/quality.py                                    # real weights of the installed packages below
    python benchmarks/quality.py --flux --device cuda               # and FLUX.1-dev's transformer and T5-XXL shapes
    python benchmarks/quality.py --sources e2k --limit 2 --out /tmp/q.csv   # a quick look
    python benchmarks/quality.py --dry-run [--flux]                 # the layers it would measure; nothing quantized

Sources, each a "component" in the results:

- Real weights inside the wheels of PyPI packages (``PACKAGES``), read where the package is installed (found with
  ``importlib.util.find_spec``, never imported; nothing is downloaded). A layer is each floating-point ``*weight*``
  tensor with at least 2 dimensions and 4096 elements, flattened to [out, rest] (conv kernels, GRU/LSTM gates,
  embeddings). A package that is not installed is skipped with a note saying how to install it.
- ``--flux``: one layer per distinct shape among the Linear weights ``qtool quantize`` quantizes in FLUX.1-dev's
  transformer and T5-XXL encoder (``transformer``, ``text_encoder_2``: planned by qtool.plan from the real configs,
  benchmarks/_flux_source.py), with random bf16 weights drawn as benchmarks/e2e_quantize.py's source draws them.

Per layer and method (nf4, nf4-dq, fp4, int8), without and with ``scale_search``: ``quantize_pending`` (timed: on a
GPU with CUDA events around each call, on the CPU its wall time; the median of ``--repeats`` calls after one warm-up),
its entries, ``dequantize_tensor`` to float32 and the SQNR in float64, ``10 log10(sum x^2 / sum (x - x')^2)``. The
two must have the same entries with the same dtypes and shapes, and the same quant-state JSON but for the
double-quant offset's digits: anything else stops the run. Rows (benchmarks/_results.py's schema) per component and
method: the mean, smallest and largest SQNR gain in dB over its layers, the mean SQNR of each, the summed times and
their ratio, the byte difference (0, or the offset's digits); per layer, its gain and time ratio.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _flux_source  # noqa: E402
import _results  # noqa: E402


@dataclass(frozen=True)
class Package:
    """A PyPI package whose wheel ships trained weights."""

    module: str  # the import name, to find the installed files
    version: str  # the version measured (pyproject.toml's [test] extra pins e2k and silero-vad to it)
    files: tuple[str, ...]  # glob patterns under the package folder
    what: str


PACKAGES = {
    "e2k": Package(
        "e2k", "0.8.1", ("models/*.safetensors",),
        "English to katakana (5 models): GRU, attention in_proj/out_proj, Linear and embedding weights, float16",
    ),
    "silero-vad": Package(
        "silero_vad", "6.2.3", ("data/silero_vad.jit",),
        "voice activity detection, the 16 kHz and 8 kHz models: conv kernels and LSTM cell, float32 (TorchScript)",
    ),
    "wordllama": Package(
        "wordllama", "0.4.0.post1", ("weights/*.safetensors",), "a 32000x256 token embedding, float16",
    ),
}  # fmt: skip
MIN_NUMEL = 4096
# quantize_pending's arguments per method.
METHODS = {
    "nf4": {"bits": 4, "quant_type": "nf4"},
    "nf4-dq": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "fp4": {"bits": 4, "quant_type": "fp4"},
    "int8": {"bits": 8},
}
FLUX_COMPONENTS = ("transformer", "text_encoder_2")


@dataclass
class Layer:
    component: str
    name: str
    weight: object  # torch.Tensor [out, rest], as stored (float16 / float32 / bfloat16), on the CPU or the device

    @property
    def shape(self) -> str:
        return "x".join(str(d) for d in self.weight.shape)


@dataclass
class Quantized:
    """One way of quantizing one layer: its entries, the weight they restore (float32) and the call times (s)."""

    entries: dict
    restored: object
    times: list[float]

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


@dataclass
class Result:
    component: str
    layer: str
    shape: str
    method: str
    sqnr_absmax: float  # dB
    sqnr_search: float  # dB
    seconds_absmax: float  # median time of quantize_pending
    seconds_search: float
    bytes_absmax: int
    bytes_search: int

    @property
    def gain(self) -> float:
        return self.sqnr_search - self.sqnr_absmax

    @property
    def time_ratio(self) -> float:
        return self.seconds_search / self.seconds_absmax


# --- sources -------------------------------------------------------------------------------------------------------


def package_files(name: str) -> list[Path] | None:
    """The weight files of an installed package, in name order; None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGES[name].module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p for pattern in PACKAGES[name].files for p in folder.glob(pattern))


def is_layer(key: str, tensor) -> bool:
    """A trained weight worth quantizing: floating, >= 2 dims, >= MIN_NUMEL elements, ``weight`` in its name (so not
    silero's ``stft.forward_basis_buffer``, a fixed Fourier basis)."""
    last = key.rsplit(".", 1)[-1]
    return tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() >= MIN_NUMEL and "weight" in last


def component_name(name: str) -> str:
    """A package's component in the results: its name and installed version (the weights are the version's)."""
    return f"{name} {importlib.metadata.version(name)}"


def real_layers(name: str, limit: int | None = None) -> list[Layer]:
    """A package's layers (CPU tensors), file by file in stored order; empty when it is not installed."""
    import torch
    from safetensors.torch import load_file

    if package_files(name) is None:
        return []
    component, layers = component_name(name), []
    for path in package_files(name) or []:
        if path.suffix == ".jit":
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = load_file(path)
        for key, tensor in state.items():
            if is_layer(key, tensor):
                weight = tensor.reshape(tensor.shape[0], -1).contiguous()
                layers.append(Layer(component, f"{path.stem}:{key}", weight))
    return layers[:limit]


def flux_shapes(template: Path, name: str) -> dict[str, tuple[int, int]]:
    """The first key of each distinct Linear shape qtool quantizes in FLUX.1-dev's component, in model order."""
    first: dict[tuple[int, int], str] = {}
    for key, shape in _flux_source.dev_layers(template, name).items():
        first.setdefault(shape, key)
    return {key: shape for shape, key in first.items()}


def flux_layers(template: Path, name: str, device: str, limit: int | None = None) -> list[Layer]:
    """Random bf16 weights for ``flux_shapes``, drawn on ``device`` with _flux_source's generator and seeds."""
    import torch

    generator = torch.Generator(device).manual_seed(list(_flux_source.DEV_CONFIGS).index(name))
    shapes = list(flux_shapes(template, name).items())[:limit]
    return [
        Layer(f"flux-dev {name}", key, _flux_source.random_weight(key, shape, generator, device))
        for key, shape in shapes
    ]


# --- measuring -----------------------------------------------------------------------------------------------------


def sqnr_db(weight, restored) -> float:
    """10 log10(sum x^2 / sum (x - x')^2), in float64."""
    x = weight.double()
    noise = (x - restored.double()).square().sum()
    return (10 * (x.square().sum() / noise).log10()).item() if noise > 0 else math.inf


def nbytes(entries: dict) -> int:
    return sum(t.numel() * t.element_size() for t in entries.values())


def layout(entries: dict) -> dict:
    """Entry -> (dtype, shape), and for the quant-state blob its JSON without the double-quant offset (whose digits,
    a few bytes, depend on the scales)."""
    from qtool.formats import bnb4

    found = {}
    for key, tensor in entries.items():
        if key.startswith(bnb4.BLOB_PREFIX):
            meta = bnb4.decode_blob(tensor.cpu())
            meta.pop("nested_offset", None)
            found[key] = json.dumps(meta, sort_keys=True)
        else:
            found[key] = (str(tensor.dtype), tuple(tensor.shape))
    return found


def timed(fn, calls: int, cuda: bool) -> tuple[object, list[float]]:
    """fn's last result and each call's time in seconds (CUDA events around the call on a GPU)."""
    import torch

    times, out = [], None
    for _ in range(calls):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - begin)
    return out, times


def quantize_both(weight, method: str, *, backend: str = "auto", repeats: int = 1) -> dict[bool, Quantized]:
    """The layer quantized by ``method`` without (False) and with (True) scale search.

    Args:
        weight: [N, K] float16 / float32 / bfloat16, on the device to measure on.
        method: a key of METHODS.
        backend: as in qtool.quantize_tensor.
        repeats: timed calls per variant, after one untimed warm-up call (Triton compiles; first-call set-up);
            0 times nothing.
    """
    import torch

    from qtool.quantize import dequantize_tensor, quantize_pending

    cuda = weight.device.type == "cuda"
    done = {}
    for search in (False, True):
        pending, times = timed(
            lambda s=search: quantize_pending(weight, backend=backend, scale_search=s, **METHODS[method]),
            1 + repeats,
            cuda,
        )
        entries = pending.entries()
        restored = dequantize_tensor(entries, dtype=torch.float32, backend=backend)
        done[search] = Quantized(entries, restored, times[1:])
    if layout(done[False].entries) != layout(done[True].entries):
        raise SystemExit(
            f"{method} {tuple(weight.shape)}: scale search changed the entries' layout:\n"
            f"  absmax: {layout(done[False].entries)}\n  search: {layout(done[True].entries)}"
        )
    return done


def measure(layer: Layer, method: str, *, backend: str, repeats: int) -> Result:
    both = quantize_both(layer.weight, method, backend=backend, repeats=repeats)
    plain, search = both[False], both[True]
    return Result(
        layer.component, layer.name, layer.shape, method,
        sqnr_db(layer.weight, plain.restored), sqnr_db(layer.weight, search.restored),
        plain.seconds, search.seconds, nbytes(plain.entries), nbytes(search.entries),
    )  # fmt: skip


# --- results -------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    component: str
    method: str
    results: list[Result] = field(default_factory=list)

    @property
    def gains(self) -> list[float]:
        return [r.gain for r in self.results]

    def figures(self) -> dict[str, tuple[str, float]]:
        """metric -> (unit, value)."""
        rs, absmax = self.results, sum(r.seconds_absmax for r in self.results)
        search = sum(r.seconds_search for r in rs)
        return {
            "sqnr_gain_db": ("dB", round(statistics.mean(self.gains), 4)),
            "sqnr_gain_min_db": ("dB", round(min(self.gains), 4)),
            "sqnr_gain_max_db": ("dB", round(max(self.gains), 4)),
            "sqnr_absmax_db": ("dB", round(statistics.mean(r.sqnr_absmax for r in rs), 4)),
            "sqnr_search_db": ("dB", round(statistics.mean(r.sqnr_search for r in rs), 4)),
            "time_absmax_ms": ("ms", round(absmax * 1e3, 4)),
            "time_search_ms": ("ms", round(search * 1e3, 4)),
            "time_ratio": ("x", round(search / absmax, 3)),
            "size_difference_bytes": ("B", sum(r.bytes_search - r.bytes_absmax for r in rs)),
            "layers": ("count", len(rs)),
        }


def notes(device: str, backend: str) -> str:
    """How the rows were measured; on the CPU with torch's thread count (OMP_NUM_THREADS=1 keeps a shared machine's
    oversubscribed threads from timing their own waits)."""
    import torch

    threads = torch.get_num_threads()
    where = f"cpu ({threads} thread{'s' * (threads != 1)})" if device == "cpu" else device
    return f"scale search vs absmax; {where}, {backend} backend"


def rows(summaries: list[Summary], how: str) -> list[dict]:
    """Per component and method its figures; per layer its gain and time ratio (shape ``component | layer NxK``)."""
    out = []
    for s in summaries:
        op = f"quantize-{s.method}"
        for metric, (unit, value) in s.figures().items():
            out.append(_results.row(op, "qtool", s.component, metric, unit, value, notes=how))
        for r in s.results:
            shape = f"{r.component} | {r.layer} {r.shape}"
            out.append(_results.row(op, "qtool", shape, "sqnr_gain_db", "dB", round(r.gain, 4), notes=how))
            out.append(_results.row(op, "qtool", shape, "time_ratio", "x", round(r.time_ratio, 3), notes=how))
    return out


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body, strict=True)]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def summary_table(summaries: list[Summary]) -> str:
    body = []
    for s in summaries:
        f = {k: v for k, (_, v) in s.figures().items()}
        body.append([
            s.component, s.method, f["layers"], f"{f['sqnr_absmax_db']:.2f}", f"{f['sqnr_search_db']:.2f}",
            f"{f['sqnr_gain_db']:+.3f}", f"{f['sqnr_gain_min_db']:+.3f}", f"{f['sqnr_gain_max_db']:+.3f}",
            f"{f['time_absmax_ms']:.3f}", f"{f['time_search_ms']:.3f}", f"{f['time_ratio']:.2f}",
            f["size_difference_bytes"],
        ])  # fmt: skip
    header = ["component", "method", "layers", "SQNR absmax dB", "SQNR search dB", "mean gain dB", "min", "max",
              "absmax ms", "search ms", "time ratio", "bytes +/-"]  # fmt: skip
    return table(header, body)


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    add = parser.add_argument
    add("--sources", default=",".join(PACKAGES), help="real-weight packages, comma-separated, or 'none' (default: all)")
    add("--flux", action="store_true", help="also the FLUX.1-dev transformer and T5-XXL Linear shapes")
    add("--device", choices=("cuda", "cpu"), help="where to quantize (default: cuda if available)")
    add("--backend", choices=("auto", "triton", "torch"), default="auto", help="qtool's (default: Triton on CUDA)")
    add("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    add("--limit", type=int, help="at most this many layers per component (the first ones)")
    add("--repeats", type=int, help="timed calls per variant after a warm-up (default: 5 on cuda, 3 on cpu)")
    add("--out", type=Path, default=_results.RESULTS / "quality.csv", help="CSV to append to")
    add("--workdir", type=Path, help="where --flux keeps its tiny template pipeline (default: a temporary folder)")
    add("--dry-run", action="store_true", help="list the layers; quantize and write nothing")
    args = parser.parse_args(argv)
    args.sources = [] if args.sources in ("none", "") else args.sources.split(",")
    unknown = [s for s in args.sources if s not in PACKAGES] + [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown sources or methods: {', '.join(unknown)}")
    args.methods = args.methods.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qtool.quantize import resolve_backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    backend = resolve_backend(args.backend, torch.device(device))
    repeats = args.repeats or (5 if device == "cuda" else 3)
    how = notes(device, backend)

    components: list[list[Layer]] = []
    for name in args.sources:
        if package_files(name) is None:
            package = PACKAGES[name]
            print(f"note: {name} is not installed, skipped (pip install {name}=={package.version})", file=sys.stderr)
            continue
        if args.dry_run:
            print(f"{component_name(name)}: {PACKAGES[name].what}")
        components.append(real_layers(name, args.limit))
    with tempfile.TemporaryDirectory() as tmp:
        if args.flux:
            template = (args.workdir or Path(tmp)) / "tiny-template"
            _flux_source.ensure_template(template)
            for name in FLUX_COMPONENTS:
                if args.dry_run:
                    shapes = list(flux_shapes(template, name).items())[: args.limit]
                    print(f"flux-dev {name}: {len(shapes)} layers (random bf16 weights, made when measuring)")
                    for key, shape in shapes:
                        print(f"  {key} {shape[0]}x{shape[1]}")
                    continue
                components.append(flux_layers(template, name, device, args.limit))

    if args.dry_run:
        for layers in components:
            if layers:
                numel = sum(layer.weight.numel() for layer in layers)
                print(f"{layers[0].component}: {len(layers)} layers, {numel / 1e6:.2f}M weights")
            for layer in layers:
                print(f"  {layer.name} {layer.shape} {str(layer.weight.dtype).removeprefix('torch.')}")
        print(f"methods {', '.join(args.methods)}, each without and with scale search, on {device} ({backend}), "
              f"{repeats} timed call(s) each -> {args.out}")  # fmt: skip
        return 0

    summaries = []
    width = max((len(f"{layer.component} {layer.name}") for layers in components for layer in layers), default=5)
    print(f"{'layer':{width}s} {'shape':>11s} {'method':>6s} {'absmax dB':>9s} {'search dB':>9s} {'gain':>7s} "
          f"{'absmax ms':>10s} {'search ms':>10s} {'ratio':>6s}", flush=True)  # fmt: skip
    for layers in components:
        for method in args.methods:
            summary = Summary(layers[0].component, method) if layers else None
            for layer in layers:
                r = measure(Layer(layer.component, layer.name, layer.weight.to(device)), method,
                            backend=args.backend, repeats=repeats)  # fmt: skip
                summary.results.append(r)
                print(f"{r.component + ' ' + r.layer:{width}s} {r.shape:>11s} {method:>6s} {r.sqnr_absmax:9.3f} "
                      f"{r.sqnr_search:9.3f} {r.gain:+7.3f} {r.seconds_absmax * 1e3:10.3f} "
                      f"{r.seconds_search * 1e3:10.3f} {r.time_ratio:6.2f}", flush=True)  # fmt: skip
            if summary:
                summaries.append(summary)
        if device == "cuda":
            torch.cuda.empty_cache()
    if not summaries:
        raise SystemExit("nothing measured: no source installed (see the notes above) and no --flux")
    written = rows(summaries, how)
    _results.append(args.out, written)
    print(f"\nScale search against plain absmax ({how}); gains are per layer, in dB of SQNR:\n")
    print(summary_table(summaries))
    print(f"\nwrote {len(written)} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
