"""README's performance tables, generated from benchmarks/results/*.csv (benchmarks/_results.py's schema), never typed.

    python benchmarks/make_table.py            # rewrite README.md between <!-- perf-table --> and <!-- /perf-table -->
    python benchmarks/make_table.py --check    # exit 1 if README.md is not what the CSVs give (a test runs this)
    python benchmarks/make_table.py --dry-run  # print the tables, write nothing

Each figure shown is the latest row (by date) of its (op, provider, shape, metric, notes); older rows stay in the CSVs
as history. CSVs in an earlier format are listed, not rendered; a missing CSV gives "not measured yet".
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
BEGIN, END = "<!-- perf-table -->", "<!-- /perf-table -->"
KEY = ("op", "provider", "shape", "metric", "notes")
REQUIRED = {"op", "provider", "shape", "metric", "unit", "median", "notes", "date"}
ENVIRONMENT = ("gpu", "driver", "torch", "triton", "bnb", "diffusers", "transformers")
E2E, KERNELS, QUALITY, FLUX, MATMUL = "e2e.csv", "codecs.csv", "quality.csv", "flux.csv", "matmul.csv"
# Issue 8's target for scale search: a mean SQNR gain of at least this over the layers of a component, NF4.
NF4_GAIN_TARGET_DB = 0.5
QUALITY_LEGEND = (
    "*gain*: per layer, the SQNR (dB, float64, of the float32 dequantized weight) with the searched scales minus "
    "with the absmax, the same entries and size; mean, smallest and largest over the component's layers. "
    "*time ratio*: `quantize_pending` with scale search over without, times summed over the layers, on the device "
    "and backend named (the CPU's is the PyTorch reference). *bytes +/-*: the outputs' size difference (with double "
    "quant, the digits of the offset in the quant-state JSON). Per-layer figures are in the CSV."
)
METRIC_ORDER = {"time": 0, "bandwidth": 1, "speedup_vs_bnb": 2, "host_time": 3}
OP_ORDER = ("read", "quantize-nf4-dq", "quantize-int8", "dequantize-nf4-dq", "dequantize-int8")
# The end-to-end table's columns: (metric, header). What each means is said under the table.
E2E_COLUMNS = (
    ("wall", "wall s"),
    ("startup_and_exit", "start-up + exit s"),
    ("peak_rss", "peak RSS GB"),
    ("peak_gpu_torch", "peak GPU (PyTorch) GB"),
    ("peak_gpu_nvml", "peak GPU (NVML) GB"),
    ("written", "written GB"),
    ("sync_after", "sync after s"),
)
E2E_LEGEND = (
    "*wall*: process start to exit, files written (not yet synced; *sync after* is the `os.sync()` that follows). "
    "*start-up + exit*: wall minus the time the tool's own timer reports (interpreter, imports, exit). "
    "*peak RSS*: `ru_maxrss` of the process (`wait4`), file-backed pages included. "
    "*peak GPU (PyTorch)*: `torch.cuda.max_memory_allocated()` in the process; *(NVML)*: the process's memory as NVML "
    "reports it, sampled every 50 ms, the CUDA context included. *written*: bytes of new files (hard links to the "
    "input not counted)."
)


def fmt(value: float | str, unit: str = "") -> str:
    """Three significant digits or so, integers whole, booleans as yes/no."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if unit == "bool":
        return "yes" if v else "no"
    if v == int(v):
        return f"{int(v):,}"
    for limit, spec in ((100, ",.0f"), (10, ".1f"), (1, ".2f")):
        if abs(v) >= limit:
            return format(v, spec)
    return format(v, ".3g")


def when(row: dict) -> tuple:
    try:
        return (datetime.datetime.fromisoformat(row.get("date", "")).timestamp(), row.get("date", ""))
    except ValueError:
        return (0.0, row.get("date", ""))


def latest(rows: list[dict]) -> list[dict]:
    """The latest row (by date; the later one in the file on a tie) of each (op, provider, shape, metric, notes)."""
    chosen: dict[tuple, tuple] = {}
    for index, row in enumerate(rows):
        key = tuple(row.get(k, "") for k in KEY)
        rank = (when(row), index)
        if key not in chosen or rank >= chosen[key][0]:
            chosen[key] = (rank, row)
    return [row for _, row in sorted(chosen.values(), key=lambda item: item[0][1])]


def load(results: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Rows of every CSV in ``results`` that has this schema, by file name; and the names of those that don't."""
    tables, old = {}, []
    for path in sorted(results.glob("*.csv")):
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not REQUIRED <= set(reader.fieldnames or ()):
                old.append(path.name)
                continue
            tables[path.name] = list(reader)
    return tables, old


def environment(rows: list[dict]) -> str:
    """Where the rows were measured: GPU, driver, versions, commits, dates (several where they differ)."""
    setups = []
    for row in rows:
        setup = row.get("gpu", "?")
        if row.get("driver"):
            setup += f" (driver {row['driver']})"
        names = {"torch": "torch", "triton": "Triton", "bnb": "bitsandbytes"}
        names |= {"diffusers": "diffusers", "transformers": "transformers"}
        setup += ", " + ", ".join(f"{label} {row[k]}" for k, label in names.items() if row.get(k))
        if setup not in setups:
            setups.append(setup)
    commits = sorted({row.get("git_commit", "") for row in rows} - {""})
    dates = sorted({row.get("date", "")[:10] for row in rows} - {""})
    span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "?"
    return f"Measured on {' / '.join(setups)}; commit {', '.join(commits) or '?'}; {span}."


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def op_rank(op: str) -> tuple:
    return (OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER), op)


def shapes_of(rows: list[dict]) -> list[str]:
    """Shapes in a stable order: single components first, then combinations."""
    return sorted({r["shape"] for r in rows}, key=lambda s: ("+" in s, s))


def figure(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def render_e2e(rows: list[dict], source: str = f"benchmarks/results/{E2E}", legend: bool = True) -> str:
    """The end-to-end section: reads, tool runs per shape, how they stand against issue 7's targets, and checks."""
    title = f"#### End to end (`benchmarks/e2e_quantize.py`, `{source}`)"
    if not rows:
        return f"{title}\n\nNot measured yet: run `python benchmarks/e2e_quantize.py` on a GPU machine."
    parts = [title, environment(rows)]
    reads = [r for r in rows if r["op"] == "read"]
    if reads:
        body = []
        for shape in shapes_of(reads):
            for key in dict.fromkeys((r["provider"], r["notes"]) for r in reads if r["shape"] == shape):
                cells = [
                    figure(reads, shape=shape, provider=key[0], notes=key[1], metric=m)
                    for m in ("wall", "read_bandwidth")
                ]
                body.append([shape, key[0], key[1], *(fmt(c["median"]) if c else "" for c in cells)])
        parts.append("Reading the files, nothing else:\n\n" + table(["files of", "reader", "how", "s", "GB/s"], body))
    runs = [r for r in rows if r["op"] != "read" and r["op"] != "source" and " vs " not in r["provider"]]
    runs = [r for r in runs if r["metric"] != "loads_and_runs"]
    for shape in shapes_of(runs):
        here = [r for r in runs if r["shape"] == shape]
        keys = sorted(
            dict.fromkeys((r["op"], r["provider"], r["notes"]) for r in here),
            key=lambda k: (op_rank(k[0]), k[1] != "qtool", k[1], k[2]),
        )
        columns = [(m, h) for m, h in E2E_COLUMNS if any(r["metric"] == m for r in here)]
        body = []
        for op, provider, notes in keys:
            cells = [figure(here, op=op, provider=provider, notes=notes, metric=m) for m, _ in columns]
            body.append([op, provider, notes, *(fmt(c["median"]) if c else "" for c in cells)])
        parts.append(f"`{shape}`:\n\n" + table(["op", "tool", "conditions", *(h for _, h in columns)], body))
    if runs:
        parts += [E2E_LEGEND] if legend else []
        parts.append(render_targets(rows))
    checks = [r for r in rows if " vs " in r["provider"] or r["metric"] == "loads_and_runs"]
    if checks:
        body = []
        for shape, op, what, notes in dict.fromkeys((r["shape"], r["op"], r["provider"], r["notes"]) for r in checks):
            found = {
                r["metric"]: r
                for r in checks
                if (r["shape"], r["op"], r["provider"], r["notes"]) == (shape, op, what, notes)
            }
            value = "; ".join(f"{m.replace('_', ' ')} {fmt(r['median'], r['unit'])}" for m, r in found.items())
            body.append([shape, op, what, value, notes])
        parts.append("Checks:\n\n" + table(["shape", "op", "what", "result", "how"], body))
    return "\n\n".join(parts)


def render_targets(rows: list[dict]) -> str:
    """qtool against issue 7's targets, per shape and op, Triton cache warm: wall <= 1.25x the fastest read of the
    files, >= 3x faster than the diffusers/transformers + bnb route, peak RSS <= 2 GB + the largest tensor, peak GPU
    <= 2 GB (PyTorch's figure; NVML's adds the CUDA context)."""
    body = []
    for shape in shapes_of(rows):
        here = [r for r in rows if r["shape"] == shape]
        reads = [r for r in here if r["op"] == "read" and r["metric"] == "wall"]
        fastest = min((float(r["median"]) for r in reads), default=None)
        largest = figure(here, op="source", metric="largest_tensor")
        ours = [
            r
            for r in here
            if r["provider"] == "qtool" and r["metric"] == "wall" and "Triton cache cold" not in r["notes"]
        ]
        for row in sorted(ours, key=lambda r: (op_rank(r["op"]), r["notes"])):
            op, notes, wall = row["op"], row["notes"], float(row["median"])
            page = notes.split(";")[0]
            theirs = [
                float(r["median"])
                for r in here
                if r["op"] == op
                and r["provider"].endswith("+bnb")
                and r["metric"] == "wall"
                and r["notes"].split(";")[0] == page
            ]
            cells = [shape, op, page, fmt(wall)]
            cells.append(mark(wall / fastest, 1.25, "<=") if fastest else "no read measured")
            cells.append(mark(min(theirs) / wall, 3, ">=") if theirs else "not measured")
            rss = figure(here, op=op, provider="qtool", notes=notes, metric="peak_rss")
            limit = 2 + float(largest["median"]) if largest else None
            cells.append(mark(float(rss["median"]), limit, "<=") + f" (of {fmt(limit)})" if rss and limit else "–")
            torch_gpu = figure(here, op=op, provider="qtool", notes=notes, metric="peak_gpu_torch")
            nvml = figure(here, op=op, provider="qtool", notes=notes, metric="peak_gpu_nvml")
            gpu = mark(float(torch_gpu["median"]), 2, "<=") if torch_gpu else "–"
            cells.append(gpu + (f" (NVML {fmt(nvml['median'])})" if nvml else ""))
            body.append(cells)
    header = [
        "shape",
        "op",
        "page cache",
        "qtool wall s",
        "÷ fastest read (≤ 1.25)",
        "bnb route ÷ qtool (≥ 3)",
        "peak RSS GB (≤ 2 + largest tensor)",
        "peak GPU GB (≤ 2)",
    ]
    return "Against issue 7's targets (qtool runs with a warm Triton cache):\n\n" + table(header, body)


def render_quality(rows: list[dict], source: str = f"benchmarks/results/{QUALITY}") -> str:
    """Scale search against plain absmax: per component and method, the mean gain (NF4 against issue 8's target),
    its range, the SQNRs, the time ratio and the size difference; one table per device and backend."""
    title = f"#### Scale search (`benchmarks/quality.py`, `{source}`)"
    summary = [r for r in rows if " | " not in r["shape"]]  # per-layer rows are "component | layer shape"
    if not summary:
        return f"{title}\n\nNot measured yet: run `python benchmarks/quality.py` (with `--flux` on a GPU machine)."
    parts = [title]
    methods = ("quantize-nf4", "quantize-nf4-dq", "quantize-fp4", "quantize-int8")
    header = ["component", "method", "layers", "SQNR absmax dB", "SQNR search dB", "mean gain dB", "min", "max",
              "time ratio", "bytes +/-"]  # fmt: skip
    for how in dict.fromkeys(r["notes"] for r in summary):
        here = [r for r in summary if r["notes"] == how]
        body = []
        for shape in dict.fromkeys(r["shape"] for r in here):
            ops = dict.fromkeys(r["op"] for r in here if r["shape"] == shape)
            for op in sorted(ops, key=lambda o: (methods.index(o) if o in methods else len(methods), o)):
                f = {r["metric"]: float(r["median"]) for r in here if (r["shape"], r["op"]) == (shape, op)}

                def cell(metric: str, spec: str = "", f: dict = f) -> str:
                    return "" if metric not in f else format(f[metric], spec) if spec else fmt(f[metric])

                gain = cell("sqnr_gain_db", "+.2f")
                if op == "quantize-nf4" and gain:
                    gain += " ✓" if f["sqnr_gain_db"] >= NF4_GAIN_TARGET_DB else " ✗"
                body.append([
                    shape, op.removeprefix("quantize-"), cell("layers"), cell("sqnr_absmax_db", ".2f"),
                    cell("sqnr_search_db", ".2f"), gain, cell("sqnr_gain_min_db", "+.2f"),
                    cell("sqnr_gain_max_db", "+.2f"), cell("time_ratio"), cell("size_difference_bytes"),
                ])  # fmt: skip
        where = how.split("; ", 1)[-1]  # notes: "scale search vs absmax; <device>, <backend> backend"
        parts.append(f"{environment(here)} On {where}:\n\n" + table(header, body))
    parts.append(f"Issue 8's target: NF4 mean gain ≥ +{NF4_GAIN_TARGET_DB} dB (✓/✗). " + QUALITY_LEGEND)
    return "\n\n".join(parts)


def mark(value: float, limit: float, sense: str) -> str:
    ok = value <= limit if sense == "<=" else value >= limit
    return f"{fmt(value)} {'✓' if ok else '✗'}"


def shape_rank(shape: str) -> tuple:
    """``3072x12288`` by element count, then by name; other shapes by name."""
    dims = shape.split("x")
    return (0, math.prod(int(d) for d in dims), shape) if all(d.isdigit() for d in dims) else (1, 0, shape)


def render_pivot(rows: list[dict]) -> str:
    """Any other CSV (the kernels'): a table per op, a row per (notes, shape), a column per (provider, metric) that
    the op has, the time first."""
    parts = []
    order = ("quantize_4bit", "dequantize_4bit", "quantize_8bit", "dequantize_8bit")
    ops = dict.fromkeys(r["op"] for r in rows)
    for op in sorted(ops, key=lambda o: (o == "copy", order.index(o) if o in order else len(order), o)):
        here = [r for r in rows if r["op"] == op]
        keys = sorted(dict.fromkeys((r["notes"], r["shape"]) for r in here), key=lambda k: (k[0], shape_rank(k[1])))
        metrics = sorted(dict.fromkeys((r["metric"], r["unit"]) for r in here), key=lambda m: METRIC_ORDER.get(m[0], 9))
        providers = sorted(dict.fromkeys(r["provider"] for r in here), key=lambda p: (p != "qtool", p))
        columns = [(m, u, p) for m, u in metrics for p in providers if figure(here, metric=m, provider=p)]
        header = ["notes", "shape", *(f"{p} {m.replace('_', ' ')} ({u})" for m, u, p in columns)]
        body = []
        for notes, shape in keys:
            cells = [figure(here, notes=notes, shape=shape, metric=m, provider=p) for m, _, p in columns]
            body.append([notes, shape, *(fmt(c["median"]) if c else "" for c in cells)])
        parts.append(f"`{op}`:\n\n" + table(header, body))
    return "\n\n".join(parts)


FLUX_ORDER = (
    "bf16", "bnb-nf4", "bnb-nf4-dq", "bnb-int8", "qtool-nf4", "qtool-nf4-dq", "qtool-int8", "qtool-int8-t0",
    "qtool-int8-wo",
)  # fmt: skip
# Issue 9's targets: a qtool variant's transformer step over bf16's (the same run, the same compile setting); for NF4
# its peak memory over bnb NF4's, at most 1.
FLUX_TARGETS = {"qtool-nf4": 1.03, "qtool-nf4-dq": 1.03, "qtool-int8": 1.0}
FLUX_PEAK_TARGET = ("qtool-nf4", "qtool-nf4-dq")
FLUX_LEGEND = (
    "*step*: one transformer forward (at 1024x1024: 4096 image + 512 text tokens, batch 1, guidance), the median of "
    "the timed calls (CUDA events) after the warm-up ones; *÷ bf16*: over the bf16 variant's in the same run with "
    "the same compile setting. *peak*: `torch.cuda.max_memory_allocated()` from before the variant is built (eager) "
    "or compiled to after the timed steps. *weights*: the memory allocated once every weight is made and quantized "
    "(bnb's quant states included); *build*: making the random weights and quantizing them, layer by layer, on the "
    "GPU. *first call*: the first step's seconds (Triton's JIT; compiling, with torch.compile). *N steps*: a "
    "`FluxPipeline` generation at the same size, guidance 3.5, decoded to an image (random VAE weights; no text "
    "encoders: random prompt embeddings given), after a 2-step warm-up, and its peak memory. *torch.compile*: "
    "`compile_repeated_blocks(fullgraph=True)`, never counted in the times (fullgraph=False where the notes say). "
    "Issue 9's targets: qtool NF4 step ≤ 1.03x bf16 with peak memory ≤ bnb NF4's, qtool 8-bit ≤ 1.0x bf16."
)


def latest_runs(rows: list[dict]) -> list[dict]:
    """The rows of the latest run of each (op, provider, shape, notes) group, so that a figure that run did not
    produce (an error it no longer hits) is not shown beside its figures; a child's failure (op ``run``) only when
    nothing of that variant is newer."""
    rows = latest(rows)
    newest: dict[tuple, tuple] = {}
    for r in rows:
        key = (r["op"], r["provider"], r["shape"], r.get("notes", ""))
        newest[key] = max(newest.get(key, (0.0, "")), when(r))
    rows = [r for r in rows if when(r) == newest[(r["op"], r["provider"], r["shape"], r.get("notes", ""))]]
    variant: dict[tuple, tuple] = {}
    for r in rows:
        if r["op"] != "run":
            variant[r["provider"], r["shape"]] = max(variant.get((r["provider"], r["shape"]), (0.0, "")), when(r))
    return [r for r in rows if r["op"] != "run" or when(r) >= variant.get((r["provider"], r["shape"]), (0.0, ""))]


def render_flux(rows: list[dict], source: str = f"benchmarks/results/{FLUX}") -> str:
    """The FLUX transformer section: per shape, a line per variant and compile setting with the step, the
    generation, their ratios to bf16 and issue 9's targets."""
    title = f"#### FLUX.1-dev-shaped transformer, step and generation (`benchmarks/bench_flux.py`, `{source}`)"
    if not rows:
        return f"{title}\n\nNot measured yet: run `python benchmarks/bench_flux.py` on a GPU machine."
    rows = latest_runs(rows)
    parts = [title, environment(rows)]
    for shape in sorted({r["shape"] for r in rows}):
        here = [r for r in rows if r["shape"] == shape]
        gens = sorted({r["op"] for r in here if r["op"].startswith("generate-")}, key=lambda o: int(o.split("-")[1]))
        header = ["variant", "torch.compile", "step ms", "÷ bf16", "peak GB", "weights GB", "build s", "first call s"]
        for op in gens:
            header += [f"{op.split('-')[1]} steps s", "÷ bf16", "peak GB"]
        header += ["issue 9 target", "notes"]
        order = {v: i for i, v in enumerate(FLUX_ORDER)}
        body = []
        for provider in sorted({r["provider"] for r in here}, key=lambda p: (order.get(p, len(order)), p)):
            theirs = [r for r in here if r["provider"] == provider]
            build = [r for r in theirs if r["op"] == "build"]
            failed = [f"{r['median']}" for r in theirs if r["op"] == "run" and r["metric"] == "error"]
            for notes in ("eager", "compiled"):
                mine = [r for r in theirs if r["notes"] == notes]
                if not mine:
                    continue

                def cell(op: str, metric: str, found: list[dict] = mine) -> str:
                    f = figure(found, op=op, metric=metric)
                    return fmt(f["median"]) if f else ""

                cells = [provider, "yes" if notes == "compiled" else "no", cell("step", "time"),
                         cell("step", "time_vs_bf16"), cell("step", "peak_memory"), cell("build", "weights", build),
                         cell("build", "wall", build), cell("step", "first_call")]  # fmt: skip
                for op in gens:
                    cells += [cell(op, "wall"), cell(op, "wall_vs_bf16"), cell(op, "peak_memory")]
                cells.append(flux_target(provider, mine))
                remarks = [f"{r['op']}: {r['median']}" for r in mine if r["metric"].startswith("error")] + failed
                if cell("step", "fullgraph") == "0":
                    remarks.insert(0, "fullgraph=False")
                cells.append("; ".join(remarks).replace("|", "\\|"))
                body.append(cells)
        shown = [i for i in range(len(header)) if i < 2 or any(cells[i] for cells in body)]  # e.g. no peak on a CPU
        body = [[cells[i] for i in shown] for cells in body]
        parts.append(f"`{shape}`:\n\n" + table([header[i] for i in shown], body))
    parts.append(FLUX_LEGEND)
    return "\n\n".join(parts)


def flux_target(provider: str, rows: list[dict]) -> str:
    """Issue 9's marks for a qtool variant: step ÷ bf16 within its limit, NF4's peak within bnb NF4's."""
    if provider not in FLUX_TARGETS:
        return ""
    limit = FLUX_TARGETS[provider]
    ratio = figure(rows, op="step", metric="time_vs_bf16")
    marks = [f"step ≤ {fmt(limit)}x bf16: " + (mark(float(ratio["median"]), limit, "<=") if ratio else "not measured")]
    if provider in FLUX_PEAK_TARGET:
        peak = figure(rows, op="step", metric="peak_memory_vs_bnb")
        marks.append("peak ≤ bnb's: " + (mark(float(peak["median"]), 1, "<=") if peak else "not measured"))
    return "; ".join(marks)


def render_matmul(rows: list[dict], source: str) -> str:
    """bench_matmul.py's rows: the latest figure of each (op, provider, shape, metric), whatever its notes say (qtool's
    rows note their error ratio, which changes from run to run), pivoted as the other tables are."""
    chosen: dict[tuple, tuple] = {}
    for index, row in enumerate(rows):
        key = tuple(row.get(k, "") for k in KEY if k != "notes")
        rank = (when(row), index)
        if key not in chosen or rank >= chosen[key][0]:
            chosen[key] = (rank, row)
    picked = [{**row, "notes": ""} for _, row in sorted(chosen.values(), key=lambda item: item[0][1])]
    return (
        f"#### Quantized Linear forward (`benchmarks/bench_matmul.py`, `{source}`)\n\n{environment(picked)}\n\n"
        f"{render_pivot(picked)}\n\nEach row is the latest run's. Before timing, every qtool output is checked against"
        " the exact value of the same math (float64): within 2x bf16 F.linear's error for 4-bit, within 2x the"
        " reference's for LLM.int8 (the ratio is in each row's notes in the CSV)."
    )


def render(results: Path = RESULTS) -> str:
    """The whole generated block (markers excluded)."""
    tables, old = load(results)
    rel = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    parts = [f"<!-- generated by benchmarks/make_table.py from {rel}/*.csv: edit the CSVs, not this -->"]
    parts.append(render_e2e(latest(tables.get(E2E, [])), source=f"{rel}/{E2E}"))
    title = f"#### Kernels (`benchmarks/bench_codecs.py`, `{rel}/{KERNELS}`)"
    kernels = latest(tables.get(KERNELS, []))
    if kernels:
        parts.append(f"{title}\n\n{environment(kernels)}\n\n{render_pivot(kernels)}")
    else:
        parts.append(f"{title}\n\nNot measured yet: run `python benchmarks/bench_codecs.py` on a GPU machine.")
    parts.append(render_quality(latest(tables.get(QUALITY, [])), source=f"{rel}/{QUALITY}"))
    parts.append(render_flux(tables.get(FLUX, []), source=f"{rel}/{FLUX}"))
    if tables.get(MATMUL):
        parts.append(render_matmul(tables[MATMUL], source=f"{rel}/{MATMUL}"))
    for name, rows in tables.items():
        if name not in (E2E, KERNELS, QUALITY, FLUX, MATMUL) and rows:
            rows = latest(rows)
            parts.append(f"#### `{rel}/{name}`\n\n{environment(rows)}\n\n{render_pivot(rows)}")
    if old:
        listed = ", ".join(f"`{rel}/{name}`" for name in old)
        parts.append(f"Earlier results in an older format, kept as history and not shown: {listed}.")
    return "\n\n".join(parts)


def splice(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSVs")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="file holding the markers")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the README is out of date; write nothing")
    mode.add_argument("--dry-run", action="store_true", help="print the generated block; write nothing")
    args = parser.parse_args(argv)
    block = render(args.results)
    if args.dry_run:
        print(block)
        return 0
    readme = args.readme.read_text()
    updated = splice(readme, block)
    if args.check:
        if updated != readme:
            print(f"{args.readme} is out of date: run python benchmarks/make_table.py", file=sys.stderr)
            return 1
        return 0
    if updated != readme:
        args.readme.write_text(updated)
        print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
