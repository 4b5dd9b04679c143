"""End to end: `qtool quantize` / `qtool dequantize` of a FLUX.1-dev-sized pipeline beside diffusers/transformers +
bitsandbytes and beside merely reading the files, each in a fresh process, in one run (issue 7).

    python benchmarks/e2e_quantize.py --workdir /tmp/e2e [--size dev|tiny] [--only read,qtool-nf4dq,...] [--dry-run]
    python benchmarks/e2e_quantize.py --components transformer --no-combined --only read,qtool-nf4dq,bnb-nf4dq

1. Source: a synthetic pipeline with FLUX.1-dev's shapes, key names, configs and sharding (benchmarks/_flux_source.py)
   in ``<workdir>/src-<size>``; marker files say what is complete, so re-runs reuse it, and only the components a
   run needs are made full size.
2. Steps (``--only``; each stands alone, so a run can be split over several calls), per target: each item of
   ``--components`` (``a+b``: both in one run) and, with ``--combined``, all of them in one run:
   - ``read``: every file of the target read once, page cache cold (evicted) and warm, 1 thread (16 MiB
     ``readinto``) and ``--read-threads`` threads (64 MiB ranges, ``os.preadv``): the floor for any loader.
   - ``qtool-<method>``: ``python -m qtool quantize`` (the CLI, under a 3-line atexit hook that reports PyTorch's
     peak GPU memory); the first run of each op with an empty Triton cache is recorded as its own row.
   - ``bnb-<method>``: diffusers' / transformers' ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
     then ``save_pretrained``, the other components hard-linked (as qtool does); then both outputs are compared.
   - ``qtool-dequant-<method>`` / ``bnb-dequant-<method>``: ``python -m qtool dequantize`` of qtool's output, and
     ``from_pretrained`` of the same output, ``model.dequantize()``, ``save_pretrained``.
   - ``loads``: qtool's NF4 output through ``FluxPipeline.from_pretrained(out)`` for two steps (GPU only).
   qtool's outputs are kept in ``<workdir>/keep`` for later steps (comparison, dequantize, loads) and deleted, least
   recently used first, when a step needs the disk; a step that would still not fit is skipped and says so.
3. Figures per run: wall time from spawn to exit (files written, not yet synced; ``sync_after`` is the ``os.sync``
   that follows), peak host memory (``ru_maxrss`` from ``wait4``: resident pages, file-backed ones included), peak GPU
   memory (PyTorch's ``max_memory_allocated`` in the process, and NVML's figure for the pid sampled every 50 ms, the
   CUDA context included), bytes written (files not hard-linked to an input), and the tool's own stage times.
   Every figure is a row of benchmarks/_results.py's schema appended to ``--out``; a summary table ends the output.
   This process stays small and torch-free: children started by vfork inherit its peak RSS as their ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import _flux_source  # noqa: E402
import _pagecache  # noqa: E402
import _proc  # noqa: E402
import _results  # noqa: E402
import make_table  # noqa: E402

GB = 1e9
COMPONENTS = ("transformer", "text_encoder_2")
# Per method: the op name in the CSV, qtool's flags (bnb's config: _children.BNB_CONFIGS), and output bytes per source
# byte (for the disk checks).
METHODS = {
    "nf4dq": {"op": "nf4-dq", "flags": ["--bits", "4", "--nf4", "--double-quant"], "ratio": 0.30},
    "int8": {"op": "int8", "flags": ["--bits", "8"], "ratio": 0.52},
    # The same output format with --scale-search: issue 8's "at most 2x the time of plain quantization".
    "nf4dq-ss": {
        "op": "nf4-dq-scale-search",
        "flags": ["--bits", "4", "--nf4", "--double-quant", "--scale-search"],
        "ratio": 0.30,
    },
}
STEPS = (
    "read",
    "qtool-nf4dq",
    "qtool-nf4dq-ss",
    "qtool-int8",
    "bnb-nf4dq",
    "bnb-int8",
    "qtool-dequant-nf4dq",
    "qtool-dequant-int8",
    "bnb-dequant-nf4dq",
    "bnb-dequant-int8",
    "loads",
)
# `python -m qtool ...` plus a hook that leaves PyTorch's peak GPU memory in $QTOOL_E2E_PROBE at exit.
PROBE = """import atexit, json, os, runpy, sys
def _report():
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_initialized()
    with open(os.environ.get("QTOOL_E2E_PROBE", os.devnull), "w") as f:
        json.dump({"peak_gpu_torch_bytes": torch.cuda.max_memory_allocated() if cuda else None}, f)
atexit.register(_report)
sys.argv[0] = "qtool"
runpy.run_module("qtool", run_name="__main__", alter_sys=True)
"""


@dataclass
class Bench:
    args: argparse.Namespace
    src: Path
    cuda: bool
    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    recorded_sources: set = field(default_factory=set)
    workaround: str = ""  # what the last bnb child had to do differently from the documented route

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def out_dir(self) -> Path:
        return self.args.workdir / "out"

    @property
    def keep_dir(self) -> Path:
        return self.args.workdir / "keep"

    @property
    def triton_dir(self) -> Path:
        return self.args.workdir / "triton-cache"

    def shape(self, target: tuple[str, ...]) -> str:
        return f"flux-{self.args.size} {'+'.join(target)}"

    def env(self) -> dict:
        env = dict(os.environ, TRITON_CACHE_DIR=str(self.triton_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if not self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def emit(self, rows: list[dict]) -> None:
        """Append now, so that a run killed at its time limit keeps what it measured."""
        if rows:
            _results.append(self.args.out, rows)
            self.rows += rows


def library(component: Path) -> str:
    """diffusers or transformers, from config.json (as qtool.plan.detect_library, without importing torch)."""
    return "diffusers" if "_class_name" in json.loads((component / "config.json").read_text()) else "transformers"


def bnb_provider(src: Path, target: tuple[str, ...]) -> str:
    libraries = sorted({library(src / name) for name in target})
    return "+".join(libraries) + "+bnb"


def targets(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """What is measured, each in its own runs: every --components item (``a+b`` is a and b in one run), and with
    --combined all the components named, together."""
    found = [canonical(item.split("+")) for item in args.components]
    together = components(args)
    if args.combined and len(together) > 1 and together not in found:
        found.append(together)
    return found


def components(args: argparse.Namespace) -> tuple[str, ...]:
    """Every component named in --components, once, in order."""
    return canonical(name for item in args.components for name in item.split("+"))


def canonical(names) -> tuple[str, ...]:
    """Component names once each, in the pipeline's order (so that a+b and b+a are one target)."""
    order = list(_flux_source.DEV_CONFIGS)
    return tuple(sorted(set(names), key=lambda n: order.index(n) if n in order else len(order)))


def inodes(folder: Path) -> set:
    return {(p.stat().st_dev, p.stat().st_ino) for p in folder.rglob("*") if p.is_file()}


def written_bytes(out: Path, *inputs: Path) -> int:
    """Bytes of the files in ``out`` that are not hard links to a file of an input (those were not written)."""
    linked = set().union(*(inodes(i) for i in inputs))
    total = 0
    for path in out.rglob("*"):
        if path.is_file():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in linked:
                total += st.st_size
    return total


def stats(values: list[float]) -> dict:
    """median, and p20/p80 where there are at least 2 values."""
    out = {"median": round(statistics.median(values), 4)}
    if len(values) >= 2:
        deciles = statistics.quantiles(values, n=10, method="inclusive")
        out |= {"p20": round(deciles[1], 4), "p80": round(deciles[7], 4)}
    return out


def rows_of(op: str, provider: str, shape: str, notes: str, runs: list[dict]) -> list[dict]:
    """One row per metric over repeated runs; ``runs`` are {metric: (unit, value)}."""
    rows = []
    for metric, (unit, _) in runs[0].items():
        values = [run[metric][1] for run in runs if metric in run]
        rows.append(_results.row(op, provider, shape, metric, unit, notes=notes, **stats(values)))
    return rows


# --- disk: outputs kept for later steps, evicted when space runs short ---------------------------------------------


def make_room(bench: Bench, need: int, protect: tuple[Path, ...] = ()) -> bool:
    """Delete kept outputs, least recently used first, until ``need`` bytes plus the reserve are free."""
    reserve = int(bench.args.reserve_gb * GB)
    bench.args.workdir.mkdir(parents=True, exist_ok=True)
    kept = sorted(bench.keep_dir.glob("*"), key=lambda p: p.stat().st_mtime) if bench.keep_dir.exists() else []
    kept = [p for p in kept if p not in protect]
    while shutil.disk_usage(bench.args.workdir).free < need + reserve and kept:
        victim = kept.pop(0)
        print(f"  disk: removing kept {victim.name} to make room", file=sys.stderr)
        shutil.rmtree(victim)
    free = shutil.disk_usage(bench.args.workdir).free
    return free >= need + reserve


def source_bytes(bench: Bench, target: tuple[str, ...]) -> int:
    return _flux_source.header_stats(_flux_source.component_files(bench.src, list(target)))["bytes"]


def guard(bench: Bench, what: str, need: int, protect: tuple[Path, ...] = ()) -> bool:
    if make_room(bench, need, protect):
        return True
    free = shutil.disk_usage(bench.args.workdir).free
    message = f"{what}: skipped, needs {need / GB:.1f} GB + {bench.args.reserve_gb} GB reserve, {free / GB:.1f} free"
    print("  " + message, file=sys.stderr)
    bench.skipped.append(message)
    return False


# --- page cache ---------------------------------------------------------------------------------------------------


def page_cache(bench: Bench, folder: Path, target: tuple[str, ...], state: str) -> str:
    """Put the target's files in the given cache state; returns the notes' words for it."""
    files = _flux_source.component_files(folder, list(target))
    if state == "cold":
        how = _pagecache.evict(files)
        print(f"  page cache: evicted ({how}), {_pagecache.resident(files):.1%} of the files resident", file=sys.stderr)
        return f"page cache cold ({how})"
    if _pagecache.resident(files) < 0.99:
        read_in_child(bench, folder, target, 16)
    print(f"  page cache: {_pagecache.resident(files):.1%} of the files resident", file=sys.stderr)
    return "page cache warm"


def read_in_child(bench: Bench, folder: Path, target: tuple[str, ...], threads: int) -> tuple[int, float]:
    """Read the target's files in a child process, timed there; returns (bytes, seconds). Never in this process:
    a child started by vfork inherits its parent's peak RSS as its own ru_maxrss, so the parent must stay small."""
    cmd = child_cmd("read", folder, folder, target, str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=bench.args.workdir, env=bench.env(), check=True)
    report = json.loads(proc.stdout.splitlines()[-1].removeprefix("RESULT "))
    return report["bytes"], report["seconds"]


def record_source(bench: Bench, target: tuple[str, ...]) -> None:
    if target in bench.recorded_sources:
        return
    bench.recorded_sources.add(target)
    info = _flux_source.header_stats(_flux_source.component_files(bench.src, list(target)))
    figures = {
        "size": ("GB", round(info["bytes"] / GB, 3)),
        "parameters": ("1e9", round(info["parameters"] / 1e9, 3)),
        "largest_tensor": ("GB", round(info["largest_tensor_bytes"] / GB, 4)),
    }
    bench.emit(rows_of("source", "synthetic", bench.shape(target), "random bf16 weights", [figures]))


# --- step: read -----------------------------------------------------------------------------------------------------


def step_read(bench: Bench) -> None:
    for target in targets(bench.args):
        record_source(bench, target)
        for threads in (1, *bench.args.read_threads):
            for state in ("cold", "warm"):
                runs, notes = [], ""
                for _ in range(bench.args.repeat):
                    cache = page_cache(bench, bench.src, target, state)
                    n, seconds = read_in_child(bench, bench.src, target, threads)
                    runs.append(
                        {"wall": ("s", round(seconds, 4)), "read_bandwidth": ("GB/s", round(n / seconds / GB, 3))}
                    )
                    how = "16 MiB readinto, one file after another" if threads == 1 else "64 MiB ranges, os.preadv"
                    notes = f"{cache}; {how}"
                provider = f"read-{threads}-thread" + ("s" if threads > 1 else "")
                print(f"  read {bench.shape(target)} {provider} {state}: {seconds:.2f} s", file=sys.stderr)
                bench.emit(rows_of("read", provider, bench.shape(target), notes, runs))


# --- running the tools --------------------------------------------------------------------------------------------


def qtool_cmd(bench: Bench, verb: str, src: Path, out: Path, target: tuple[str, ...], flags: list[str]) -> list[str]:
    cmd = [sys.executable, "-c", PROBE, verb, str(src), *flags, "--components", ",".join(target)]
    return cmd + ["--output", str(out), "--json", "--device", bench.device]


def child_cmd(kind: str, src: Path, out: Path, target: tuple[str, ...], method: str = "") -> list[str]:
    return [sys.executable, str(BENCH / "_children.py"), kind, str(src), str(out), ",".join(target), method]


def shown(cmd: list[str]) -> str:
    """A command as a person would type it (the probe hook shown as `-m qtool`)."""
    words = ["python", "-m", "qtool", *cmd[3:]] if cmd[1:3] == ["-c", PROBE] else ["python", *cmd[1:]]
    return " ".join(words)


def run_tool(bench: Bench, label: str, cmd: list[str], out: Path, inputs: tuple[Path, ...]) -> dict | None:
    """Run one measured process writing ``out``; returns its figures {metric: (unit, value)}, or None if it failed."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = bench.args.workdir / "logs" / label
    probe = log.with_suffix(".probe.json")
    probe.unlink(missing_ok=True)
    env = bench.env() | {"QTOOL_E2E_PROBE": str(probe)}
    print(f"  $ {shown(cmd)}", file=sys.stderr)
    m = _proc.run_measured(cmd, cwd=bench.args.workdir, env=env, log=log, sample_gpu=bench.cuda)
    if m.returncode != 0:
        print(m.stderr[-3000:], file=sys.stderr)
        bench.failures.append(f"{label}: exit code {m.returncode} (log {log}.err)")
        shutil.rmtree(out, ignore_errors=True)
        return None
    start = time.perf_counter()
    os.sync()
    figures = {
        "wall": ("s", round(m.wall_s, 3)),
        "peak_rss": ("GB", round(m.peak_rss_bytes / GB, 3)),
        "written": ("GB", round(written_bytes(out, *inputs) / GB, 3)),
        "sync_after": ("s", round(time.perf_counter() - start, 3)),
    }
    if m.peak_gpu_nvml_bytes is not None:
        metric = "peak_gpu_nvml" if m.nvml_how == "per-process" else "peak_gpu_nvml_device"
        figures[metric] = ("GB", round(m.peak_gpu_nvml_bytes / GB, 3))
    report = {}
    lines = [line for line in m.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:  # our own children
        report = json.loads(lines[-1].removeprefix("RESULT "))
    elif probe.exists():  # qtool under the hook: --json's object on stdout
        try:
            report = json.loads(m.stdout) | json.loads(probe.read_text())
        except ValueError:
            print("  (qtool's --json output did not parse; its stage times are not recorded)", file=sys.stderr)
    if report.get("peak_gpu_torch_bytes") is not None and bench.cuda:
        figures["peak_gpu_torch"] = ("GB", round(report["peak_gpu_torch_bytes"] / GB, 3))
    if isinstance(report.get("seconds"), int | float):
        figures["in_process"] = ("s", round(report["seconds"], 3))
        figures["startup_and_exit"] = ("s", round(m.wall_s - report["seconds"], 3))
    for name, value in stage_seconds(report).items():
        figures[f"stage:{name}"] = ("s", round(value, 3))
    bench.workaround = report.get("workaround", "")
    print("  " + ", ".join(f"{k} {v[1]} {v[0]}" for k, v in figures.items() if ":" not in k), file=sys.stderr)
    return figures


def stage_seconds(report: dict) -> dict[str, float]:
    """Every timing in a tool's JSON report besides the total, named by its path: any number under a key that says
    seconds (our children's ``stage_seconds``; qtool's per component, and per-stage busy times where it has them)."""
    found = {}
    skip = ("components", "seconds", "stage_seconds")

    def walk(value, path: list[str]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, path + [key])
        elif isinstance(value, list):
            for i, item in enumerate(value):
                name = item.get("name", str(i)) if isinstance(item, dict) else str(i)
                walk(item, path + [name])
        elif isinstance(value, int | float) and not isinstance(value, bool) and any("seconds" in p for p in path):
            words = [p.removesuffix("_seconds") for p in path if p not in skip]
            if words:
                found[".".join(words)] = float(value)

    walk({k: v for k, v in report.items() if k != "seconds"}, [])
    return found


def triton_notes(bench: Bench, op: str) -> tuple[str, Path | None]:
    """The Triton-cache words for the notes, and the marker to create once a run of this op has compiled."""
    if not bench.cuda:
        return "PyTorch reference on the CPU", None
    marker = bench.triton_dir / f".e2e-warm-{op}"
    return ("Triton cache warm" if marker.exists() else "Triton cache cold"), marker


def measure_qtool(bench: Bench, op: str, verb: str, src: Path, target, flags, inputs, keep: Path | None) -> None:
    """qtool's runs of one op on one target: a Triton-cache-cold run first where the cache is empty, then the warm
    ones, in each page-cache state asked for; the last output is kept at ``keep`` for later steps."""
    out = bench.out_dir / f"{op}-{'+'.join(target)}"
    for state in bench.args.page_cache:
        runs, notes = [], ""
        while len(runs) < bench.args.repeat:
            cache = page_cache(bench, src, target, state)
            triton, marker = triton_notes(bench, op)
            figures = run_tool(
                bench, f"qtool-{op}-{'+'.join(target)}", qtool_cmd(bench, verb, src, out, target, flags), out, inputs
            )
            if figures is None:
                return
            if marker is not None and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                bench.emit(rows_of(op, "qtool", bench.shape(target), f"{cache}; {triton}", [figures]))
                continue
            runs.append(figures)
            notes = f"{cache}; {triton}"
        bench.emit(rows_of(op, "qtool", bench.shape(target), notes, runs))
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        keep.parent.mkdir(parents=True, exist_ok=True)
        out.rename(keep)
    else:
        shutil.rmtree(out, ignore_errors=True)


def kept_name(method: str, target: tuple[str, ...]) -> str:
    return f"qtool-{method}-{'+'.join(target)}"


def ensure_quantized(bench: Bench, method: str, target: tuple[str, ...], protect: tuple[Path, ...] = ()) -> Path | None:
    """qtool's output of this method and target, from an earlier step if kept, else made now (not measured)."""
    keep = bench.keep_dir / kept_name(method, target)
    if keep.exists():
        os.utime(keep)
        return keep
    need = int(METHODS[method]["ratio"] * source_bytes(bench, target))
    if not guard(bench, f"quantize {method} {'+'.join(target)} as input", need, protect):
        return None
    print(f"  preparing {keep.name} (not measured)", file=sys.stderr)
    keep.parent.mkdir(parents=True, exist_ok=True)
    cmd = qtool_cmd(bench, "quantize", bench.src, keep, target, METHODS[method]["flags"])
    log = bench.args.workdir / "logs" / f"prepare-{keep.name}"
    m = _proc.run_measured(cmd, cwd=bench.args.workdir, env=bench.env(), log=log, sample_gpu=False)
    if m.returncode != 0:
        print(m.stderr[-3000:], file=sys.stderr)
        bench.failures.append(f"prepare {keep.name}: exit code {m.returncode} (log {log}.err)")
        return None
    _, marker = triton_notes(bench, f"quantize-{METHODS[method]['op']}")
    if marker is not None:
        marker.touch()
    return keep


# --- steps: quantize and dequantize -------------------------------------------------------------------------------


def step_qtool(bench: Bench, method: str) -> None:
    spec = METHODS[method]
    op = f"quantize-{spec['op']}"
    for target in targets(bench.args):
        record_source(bench, target)
        if not guard(bench, f"{op} {'+'.join(target)}", int(spec["ratio"] * source_bytes(bench, target))):
            continue
        keep = bench.keep_dir / kept_name(method, target)
        measure_qtool(bench, op, "quantize", bench.src, target, spec["flags"], (bench.src,), keep)


def step_bnb(bench: Bench, method: str) -> None:
    spec = METHODS[method]
    op = f"quantize-{spec['op']}"
    for target in targets(bench.args):
        record_source(bench, target)
        provider = bnb_provider(bench.src, target)
        if not guard(bench, f"{op} {'+'.join(target)} by {provider}", int(spec["ratio"] * source_bytes(bench, target))):
            continue
        out = measure_bnb(bench, op, "bnb-quantize", bench.src, target, method, (bench.src,), "")
        if out.exists() and bench.args.compare:
            ours = ensure_quantized(bench, method, target, protect=(out,))
            if ours is not None:
                compare_outputs(bench, op, provider, target, ours, out)
        shutil.rmtree(out, ignore_errors=True)


def measure_bnb(bench: Bench, op: str, kind: str, src: Path, target, method: str, inputs, more: str) -> Path:
    """The diffusers/transformers + bnb route's runs of one op on one target, in each page-cache state asked for;
    returns where the last one wrote (for the comparison)."""
    provider = bnb_provider(bench.src, target)
    out = bench.out_dir / f"{kind}-{method}-{'+'.join(target)}"
    for state in bench.args.page_cache:
        runs, notes = [], ""
        for _ in range(bench.args.repeat):
            notes = page_cache(bench, src, target, state) + more
            figures = run_tool(bench, out.name, child_cmd(kind, src, out, target, method), out, inputs)
            if figures is None:
                break
            runs.append(figures)
            notes += f"; {bench.workaround}" if bench.workaround else ""
        if runs:
            bench.emit(rows_of(op, provider, bench.shape(target), notes, runs))
    return out


def compare_outputs(bench: Bench, op: str, provider: str, target, ours: Path, theirs: Path) -> None:
    cmd = child_cmd("compare", ours, theirs, target)
    log = bench.args.workdir / "logs" / f"compare-{ours.name}"
    m = _proc.run_measured(cmd, cwd=bench.args.workdir, env=bench.env(), log=log, sample_gpu=False)
    lines = [line for line in m.stdout.splitlines() if line.startswith("RESULT ")]
    if m.returncode != 0 or not lines:
        bench.failures.append(f"compare {ours.name}: exit code {m.returncode} (log {log}.err)")
        return
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"  compare qtool vs {provider}: {result}", file=sys.stderr)
    shape, who = bench.shape(target), f"qtool vs {provider}"
    how = "key sets, dtypes and shapes equal; tensor bytes that differ"
    bench.emit(
        [
            _results.row(op, who, shape, "keys_equal", "bool", int(result["keys_equal"]), notes=how),
            _results.row(op, who, shape, "differing_bytes", "bytes", result["differing"], notes=how),
            _results.row(op, who, shape, "compared_bytes", "bytes", result["compared"], notes=how),
        ]
    )


def step_dequant(bench: Bench, method: str, tool: str) -> None:
    op = f"dequantize-{METHODS[method]['op']}"
    for target in targets(bench.args):
        record_source(bench, target)
        if tool == "bnb" and not bench.cuda and "diffusers" in {library(bench.src / n) for n in target}:
            message = f"{op} {'+'.join(target)} by bnb: skipped, diffusers' dequantize() moves the model to CUDA"
            print("  " + message, file=sys.stderr)
            bench.skipped.append(message)
            continue
        kept = bench.keep_dir / kept_name(method, target)
        need = int((1 + (0 if kept.exists() else METHODS[method]["ratio"])) * source_bytes(bench, target))
        if not guard(bench, f"{op} {'+'.join(target)} by {tool}", need, protect=(kept,)):
            continue
        quantized = ensure_quantized(bench, method, target)
        if quantized is None:
            continue
        if tool == "qtool":
            measure_qtool(bench, op, "dequantize", quantized, target, [], (bench.src, quantized), None)
            continue
        inputs = (bench.src, quantized)
        out = measure_bnb(bench, op, "bnb-dequantize", quantized, target, method, inputs, "; input written by qtool")
        shutil.rmtree(out, ignore_errors=True)


def step_loads(bench: Bench) -> None:
    """qtool's NF4 + double-quant output (transformer and T5) loads with FluxPipeline.from_pretrained and runs."""
    target = COMPONENTS
    if not bench.cuda:
        bench.skipped.append("loads: skipped, needs a GPU")
        return
    folder = ensure_quantized(bench, "nf4dq", target)
    if folder is None:
        return
    code = f"""
import torch
from diffusers import FluxPipeline
import bitsandbytes as bnb
pipe = FluxPipeline.from_pretrained({str(folder)!r}, torch_dtype=torch.bfloat16).to("cuda")
assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)
image = pipe("a cat holding a sign", num_inference_steps=2, height=256, width=256, max_sequence_length=32,
             generator=torch.manual_seed(0), output_type="np").images
assert __import__("numpy").isfinite(image).all(), "non-finite pixels"
print("image", image.shape)
"""
    log = bench.args.workdir / "logs" / "loads"
    m = _proc.run_measured(
        [sys.executable, "-c", code], cwd=bench.args.workdir, env=bench.env(), log=log, sample_gpu=False
    )
    print(f"  loads and runs: exit code {m.returncode} {m.stdout.strip()}", file=sys.stderr)
    if m.returncode != 0:
        print(m.stderr[-2000:], file=sys.stderr)
    notes = "FluxPipeline.from_pretrained(out), no quantization arguments, 2 steps at 256x256"
    bench.emit(
        [
            _results.row(
                "quantize-nf4-dq",
                "qtool",
                bench.shape(target),
                "loads_and_runs",
                "bool",
                int(m.returncode == 0),
                notes=notes,
            )
        ]
    )


# --- plan, summary, main ------------------------------------------------------------------------------------------


def needed_components(args: argparse.Namespace) -> list[str]:
    """The components to make full size: the measured ones, and all of them for `loads` (it runs the pipeline)."""
    return list(_flux_source.DEV_CONFIGS) if "loads" in args.steps else list(components(args))


def plan(bench: Bench, steps: list[str]) -> str:
    """What a run would do, from the arguments and the disk alone (no torch)."""
    args, lines = bench.args, []
    src, complete = bench.src, _flux_source.is_complete(bench.src, args.size)
    todo = [] if complete else ["the tiny pipeline (examples/make_tiny_flux.py)"]
    if args.size == "dev":
        todo += [n for n in needed_components(args) if not (complete and _flux_source.is_full_size(src, n))]
    took = " (~1-2 min on a GPU for all)" if args.size == "dev" else ""
    made = f"first generates {', '.join(todo)}{took}" if todo else "reused"
    lines.append(f"source: {src}: {made}")
    for target in targets(args):
        if complete and (args.size == "tiny" or all(_flux_source.is_full_size(src, n) for n in target)):
            info = _flux_source.header_stats(_flux_source.component_files(src, list(target)))
            size, params = info["bytes"], f"{info['parameters'] / 1e9:.3g}B parameters"
        elif args.size == "dev":
            size, params = sum(_flux_source.DEV_BYTES[n] for n in target), "as FLUX.1-dev"
        else:
            size, params = None, "sizes known once generated"
        lines.append(f"target {bench.shape(target)}: " + (f"{size / GB:.3g} GB ({params})" if size else params))
    existing = args.workdir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    lines += [
        f"device: {bench.device}; disk free at {args.workdir}: {free / GB:.1f} GB (reserve {args.reserve_gb} GB)",
        f"page cache: {', '.join(args.page_cache)}; eviction by {'drop_caches' if can_drop else 'fadvise DONTNEED'}",
        f"Triton cache: {bench.triton_dir} (the first run of an op there is recorded as 'Triton cache cold')",
        f"repeat: {args.repeat}; rows appended to {args.out}",
        "steps:",
    ]
    target = targets(args)[0]
    out = args.workdir / "out" / "OUT"
    for step in steps:
        lines.append(f"  {step}:")
        if step == "read":
            threads = ", ".join(str(t) for t in (1, *args.read_threads))
            lines.append(f"    per target, page cache cold and warm, {threads} thread(s)")
        elif step.startswith("qtool-dequant-"):
            q = bench.keep_dir / kept_name(step.rsplit("-", 1)[1], target)
            lines.append("    " + shown(qtool_cmd(bench, "dequantize", q, out, target, [])))
        elif step.startswith("qtool-"):
            flags = METHODS[step.split("-", 1)[1]]["flags"]
            lines.append("    " + shown(qtool_cmd(bench, "quantize", src, out, target, flags)))
        elif step.startswith("bnb-dequant-"):
            q = bench.keep_dir / kept_name(step.rsplit("-", 1)[1], target)
            lines.append("    " + shown(child_cmd("bnb-dequantize", q, out, target, step.rsplit("-", 1)[1])))
        elif step.startswith("bnb-"):
            lines.append("    " + shown(child_cmd("bnb-quantize", src, out, target, step.split("-", 1)[1])))
        elif step == "loads":
            what = "+".join(COMPONENTS)
            lines.append(f"    FluxPipeline.from_pretrained(<qtool nf4dq output of {what}>) on the GPU, 2 steps")
        if step not in ("read", "loads") and len(targets(args)) > 1:
            lines.append(f"    (and likewise for {', '.join('+'.join(t) for t in targets(args)[1:])})")
    return "\n".join(lines)


def summary(bench: Bench) -> str:
    rows = make_table.latest(_results.read(bench.args.out)) if bench.args.out.exists() else []
    lines = [make_table.render_e2e(rows, source=str(bench.args.out), legend=False)]
    # Children started by vfork inherit this process's peak RSS as their own ru_maxrss: it must stay far below theirs.
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lines.append(f"this process's peak RSS, a floor under every child's: {parent / GB:.3f} GB")
    lines += [f"skipped: {s}" for s in bench.skipped]
    lines += [f"FAILED: {f}" for f in bench.failures]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-e2e"), help="scratch folder (~65 GB at dev)")
    parser.add_argument("--size", choices=("dev", "tiny"), default="dev", help="FLUX.1-dev's sizes, or the example's")
    parser.add_argument("--out", type=Path, default=_results.RESULTS / "e2e.csv", help="CSV the rows are appended to")
    parser.add_argument(
        "--only",
        default="all",
        help=f"comma-separated steps, in this order whatever the order given: {','.join(STEPS)}",
    )
    parser.add_argument(
        "--components",
        default=",".join(COMPONENTS),
        help="what is measured, comma-separated: a component alone, or a+b for both in one run",
    )
    parser.add_argument(
        "--combined",
        action=argparse.BooleanOptionalAction,
        help="also measure all --components in one run (default: at dev yes, at tiny no: there it would only add "
        "process start-ups)",
    )
    parser.add_argument(
        "--page-cache", default="warm", help="page-cache states of the tool runs: warm, cold or warm,cold"
    )
    parser.add_argument("--read-threads", default="8", help="thread counts of the parallel reads (1 is always read)")
    parser.add_argument("--repeat", type=int, default=1, help="measured runs per figure (median, p20, p80)")
    parser.add_argument(
        "--compare", action=argparse.BooleanOptionalAction, default=True, help="compare qtool's and bnb's outputs"
    )
    parser.add_argument(
        "--reserve-gb", type=float, default=2.0, help="disk space left free; steps that would not fit skip"
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (sizes, steps, commands) and stop")
    args = parser.parse_args(argv)
    args.components = [c for c in args.components.split(",") if c]
    args.combined = args.size == "dev" if args.combined is None else args.combined
    args.page_cache = [s for s in args.page_cache.split(",") if s]
    args.read_threads = [int(t) for t in args.read_threads.split(",") if t and int(t) > 1]
    args.workdir = args.workdir.expanduser().resolve()
    only = STEPS if args.only == "all" else tuple(s for s in args.only.split(",") if s)
    unknown = sorted(set(only) - set(STEPS))
    known = set(_flux_source.DEV_CONFIGS)
    if set(components(args)) - known:
        parser.error(f"--components: unknown {sorted(set(components(args)) - known)}; known: {sorted(known)}")
    if unknown or set(args.page_cache) - {"warm", "cold"} or args.repeat < 1:
        parser.error(f"unknown steps {unknown}" if unknown else "--page-cache takes warm and/or cold; --repeat >= 1")
    args.steps = [s for s in STEPS if s in only]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda" or (
        args.device == "auto"
        and os.environ.get("CUDA_VISIBLE_DEVICES") != ""
        and shutil.which("nvidia-smi") is not None
    )
    bench = Bench(args=args, src=args.workdir / f"src-{args.size}", cuda=cuda)
    print(plan(bench, args.steps), flush=True)
    if args.dry_run:
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    # GPU, driver, versions and commit for every row, found by a child: importing torch here would raise this
    # process's RSS, which children started by vfork inherit as a floor under their own ru_maxrss.
    proc = subprocess.run(
        child_cmd("environment", ROOT, ROOT, ()), capture_output=True, text=True, cwd=ROOT, check=True
    )
    found = json.loads(proc.stdout.splitlines()[-1].removeprefix("RESULT "))
    _results.environment = lambda: found
    start = time.perf_counter()
    if _flux_source.ensure_source(bench.src, args.size, needed_components(args)):
        print(f"source generated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for step in args.steps:
        print(f"== {step}", file=sys.stderr)
        step_start = time.perf_counter()
        if step == "read":
            step_read(bench)
        elif step.startswith("qtool-dequant-"):
            step_dequant(bench, step.rsplit("-", 1)[1], "qtool")
        elif step.startswith("bnb-dequant-"):
            step_dequant(bench, step.rsplit("-", 1)[1], "bnb")
        elif step.startswith("qtool-"):
            step_qtool(bench, step.split("-", 1)[1])
        elif step.startswith("bnb-"):
            step_bnb(bench, step.split("-", 1)[1])
        elif step == "loads":
            step_loads(bench)
        print(f"== {step}: {time.perf_counter() - step_start:.0f} s", file=sys.stderr)
    print(summary(bench))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
