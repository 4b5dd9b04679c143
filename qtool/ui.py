"""Terminal output, the only module that imports Rich: progress on stderr, result tables on stdout.

Progress bars appear only on an interactive stderr (not in pipes, CI logs or with --quiet). NO_COLOR is honoured
by Rich itself.
"""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from qtool import quality

err = Console(stderr=True)


def out_console() -> Console:
    # Built per call so that CliRunner's captured stdout is the one written to. Piped output gets a wide table
    # rather than Rich's 80-column default, so that names are not cut.
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


class RichProgress:
    """Implements qtool.api.Progress: one bar per component, in bytes read, with speed and ETA."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and err.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def start(self, description: str, total: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_quantize_result(result) -> None:
    """The summary table of `qtool quantize` (a qtool.api.QuantizeResult) on stdout."""
    budget = result.choice is not None
    target = f"a budget of {result.budget.text}" if budget else result.spec.label
    if result.spec.scale_search:
        target += ", scale search"
    table = Table(title=f"{'Plan' if result.dry_run else 'Quantized'} {result.source} -> {target}")
    columns = ["component", "class", "params", "Linear quantized / kept", "before", "after", "x smaller"]
    if budget:
        columns[2:2] = ["method", "16-bit by budget"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("component", "class", "method") else "right")
    if not result.dry_run:
        table.add_column("time", justify="right")
    for c in result.components:
        row = [
            c.name or "(model)",
            c.class_name,
            f"{c.parameters / 1e6:,.1f}M",
            f"{c.layers_quantized} / {c.layers_kept}",
            human_bytes(c.bytes_before),
            ("~" if result.dry_run else "") + human_bytes(c.bytes_after),
            f"{c.compression:.2f}",
        ]
        if budget:
            spec = result.spec_of(c)
            row[2:2] = [spec.label if spec else "as stored", str(c.budget_kept)]
        if not result.dry_run:
            row.append(f"{c.seconds:.1f} s")
        table.add_row(*row)
    console = out_console()
    console.print(table)
    if budget:
        _print_budget_line(console, result)
    if not result.dry_run:
        print_quality(console, [(c.name, c.quality) for c in result.components], "measured in this run")
        worst = [(c.name, q) for c in result.components for q in quality.worst(c.layer_quality)]
        if worst:
            console.print(_worst_table(worst))
    if result.copied:
        console.print(f"copied as they are: {', '.join(result.copied)}")
    if result.dry_run:
        console.print("dry run: nothing was downloaded or written")
    else:
        console.print(
            f"wrote {result.output} in {result.seconds:.1f} s on {result.device} "
            f"(peak host memory {human_bytes(result.peak_rss_bytes)})"
        )


def _objective(choice) -> str:
    """A Choice's objective as the summary states it: the parameter-weighted relative error, and in dB."""
    db = "" if choice.relative_error <= 0 else f" ({10 * math.log10(1 / choice.relative_error):.1f} dB)"
    return f"{choice.relative_error:.3g}{db}"


def _print_budget_line(console: Console, result) -> None:
    """What a budget chose in `qtool quantize`: the bytes against the budget, the objective, and how it was chosen."""
    choice, budget = result.choice, result.budget
    others = f", {human_bytes(choice.other_bytes)} of it copied as it is" if choice.other_bytes else ""
    widths = " or ".join(f"{b}-bit" for b in budget.bits)
    if result.dry_run:
        console.print(
            f"estimate: ~{human_bytes(choice.bytes)} of {human_bytes(budget.bytes)} ({budget.measure}){others}; "
            f"error {_objective(choice)}. Chosen from nominal errors (those of Gaussian weights: no weight was "
            "read); the run measures every layer's error first and may choose other layers."
        )
        return
    console.print(
        f"budget: {human_bytes(result.budget_used)} of {human_bytes(budget.bytes)} ({budget.measure}){others}. "
        f"Per component {widths} and per layer 16-bit, for the least sum of parameters x relative error: "
        f"{_objective(choice)} over the quantizable layers, as measured (one more read of their weights)."
    )


def _db(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} dB"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_quality(console: Console, rows: list, source: str) -> None:
    """The quality table of `qtool quantize`'s summary and of `qtool footprint` (``rows``: (component name,
    qtool.quality.ComponentQuality or None)), with what its figures mean; nothing when no row has figures."""
    if not any(q is not None for _, q in rows):
        return
    table = Table(title=f"Quality of the quantized layers ({source})")
    for column in ("component", "layers", "SQNR mean / min", "SQNR all", "rel. Frob.", "max |err|", "extreme"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for name, q in rows:
        if q is None:
            continue
        layers = str(q.layers) + (f" ({q.layers_nonfinite} NaN/Inf)" if q.layers_nonfinite else "")
        sqnr = "-" if q.sqnr_mean_db is None else f"{q.sqnr_mean_db:.1f} / {q.sqnr_min_db:.1f} dB"
        table.add_row(
            name or "(model)", layers, sqnr, _db(q.sqnr_db), _g(q.rel_fro), _g(q.max_abs_err), _percent(q.extreme_share)
        )
    console.print(table)
    console.print(
        "SQNR = 10 log10(sum w^2 / sum (w - q)^2), w the source weight and q its dequantization: mean and least over "
        "the layers, and over the component as one tensor (all); rel. Frob. = ||w - q|| / ||w||; extreme: weights "
        "stored as the code of their block's absmax (NF4/FP4 +-1) or row's SCB (int8 +-127).",
        style="dim",
    )


def _worst_table(rows: list) -> Table:
    """The lowest-SQNR layers (``rows``: (component name, qtool.quality.LayerQuality)), lowest first per component.
    No relative Frobenius error (10^(-SQNR/20)): the layer names keep the room, whole in 100 columns."""
    table = Table(title="Lowest SQNR layers")
    for column in ("layer", "SQNR", "max |err|", "extreme"):
        table.add_column(column, justify="left" if column == "layer" else "right", overflow="fold")
    for name, q in rows:
        layer = q.key.removesuffix(".weight")
        table.add_row(
            f"{name}/{layer}" if name else layer, _db(q.sqnr_db), _g(q.max_abs_err), _percent(q.extreme_share)
        )
    return table


def _size_cell(size) -> str:
    """A qtool.footprint.Size as "memory" over "disk" (two lines)."""
    if size is None:
        return "-"
    return f"{human_bytes(size.memory_bytes)}\n[dim]disk {human_bytes(size.disk_bytes)}[/dim]"


def _fit_cell(fit: dict) -> str:
    if fit["fits"] is None:
        return "?"
    room = fit["headroom_bytes"]
    return (
        f"[green]yes[/green], {human_bytes(room)} free" if fit["fits"] else f"[red]no[/red], {human_bytes(-room)} short"
    )


def print_footprint(result) -> None:
    """The table of `qtool footprint` (a qtool.footprint.Footprint) on stdout."""
    from qtool.footprint import fit

    state = f"quantized ({result.method})" if result.quantized else "predicted from the safetensors headers"
    table = Table(title=f"Footprint of {result.source}: {state}", show_lines=True)
    table.add_column("component")
    table.add_column("class")
    table.add_column("params", justify="right")
    table.add_column("Linear quantized / kept", justify="right")
    table.add_column("now" if result.quantized else "as stored", justify="right")
    for method in result.methods:
        starred = method == result.method and result.gpu_memory is not None
        table.add_column(method + (" *" if starred else ""), justify="right")
    if result.gpu_memory is not None:
        table.add_column(f"fits in {human_bytes(result.gpu_memory)}?", justify="right")
    for c in result.components:
        layers = f"{c.layers_quantized} / {c.layers_kept}" if c.role != "kept" else "(kept as is)"
        if c.quantization and "method" in c.quantization:
            layers += f"\n{c.quantization['method']}"
        row = [c.name or "(model)", c.class_name, _params(c.parameters), layers, _size_cell(c.stored)]
        row += [_size_cell(c.size(m)) for m in result.methods]
        if result.gpu_memory is not None:
            row.append(_fit_cell(fit(c.size(result.method), result.gpu_memory)))
        table.add_row(*row)
    if len(result.components) > 1:
        parameters = [c.parameters for c in result.components]
        row = ["total", "", _params(None if None in parameters else sum(parameters)), "", _size_cell(result.total())]
        row += [_size_cell(result.total(m)) for m in result.methods]
        if result.gpu_memory is not None:
            row.append(_fit_cell(fit(result.total(result.method), result.gpu_memory)))
        table.add_row(*row, style="bold")
    console = out_console()
    console.print(table)
    console.print(
        "memory: get_memory_footprint() once loaded with bitsandbytes in the stored dtypes; disk: tensor bytes."
        + (
            f" Fit (* = {result.method}) counts the weights and quant states on the GPU, not activations."
            if result.gpu_memory is not None
            else ""
        )
    )
    for c in result.components:
        if c.note:
            console.print(f"{c.name or 'model'}: {c.note}")
    print_quality(console, [(c.name, c.quality) for c in result.components], "recorded in qtool.json")
    if result.quality_note:
        console.print(result.quality_note)
    if result.budget is not None:
        _print_footprint_budget(console, result)


def _print_footprint_budget(console: Console, result) -> None:
    """What a budget would choose (`qtool footprint --max-size/--max-vram`), per component, and how it was chosen."""
    budget, choice = result.budget, result.choice
    if choice is None:
        console.print(f"budget: {result.budget_note}")  # it fits as it is
        return
    quantizable = {c.name: c.layers_quantized for c in result.components}
    table = Table(title=f"What a budget of {budget.text} would choose (estimate)")
    for column in ("component", "method", "Linear quantized / 16-bit by budget", budget.measure):
        table.add_column(column, justify="left" if column in ("component", "method") else "right")
    for c in choice.components:
        kept = len(c.kept)
        method = result.budget_methods.get(c.name) or "as stored"
        table.add_row(c.name or "(model)", method, f"{quantizable[c.name] - kept} / {kept}", human_bytes(c.bytes))
    if choice.other_bytes:
        table.add_row("the others", "as stored", "", human_bytes(choice.other_bytes))
    table.add_row("total", "", "", human_bytes(choice.bytes), style="bold")
    console.print(table)
    console.print(
        f"Parameter-weighted relative error {_objective(choice)}, nominal: chosen from the errors of Gaussian "
        "weights, as the headers say nothing of the weights, which settles the widths and sizes but not which "
        "layers. `qtool quantize` with the same budget measures every layer's error first and chooses from those."
    )


def _params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}M"


def print_dequantize_result(result) -> None:
    """The summary table of `qtool dequantize` (a qtool.dequant.DequantizeResult) on stdout."""
    table = Table(title=f"Dequantized {result.source}")
    for column in ("component", "class", "was", "layers", "before", "after", "dtype", "time"):
        table.add_column(column, justify="left" if column in ("component", "class", "was", "dtype") else "right")
    for c in result.components:
        table.add_row(
            c.name or "(model)",
            c.class_name,
            c.method,
            str(c.layers),
            human_bytes(c.bytes_before),
            human_bytes(c.bytes_after),
            ", ".join(c.dtypes),
            f"{c.seconds:.1f} s",
        )
    console = out_console()
    console.print(table)
    if result.copied:
        console.print(f"copied as they are: {', '.join(result.copied)}")
    console.print(
        f"wrote {result.output} in {result.seconds:.1f} s on {result.device} "
        f"(peak host memory {human_bytes(result.peak_rss_bytes)}); it loads without bitsandbytes"
    )


def print_push_result(result) -> None:
    """What `qtool push` uploaded or, with --dry-run, would upload (a qtool.push.PushResult)."""
    table = Table(title=f"{'Would upload' if result.dry_run else 'Uploaded'} {result.folder} -> {result.url}")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        note = " (model card, written by qtool)" if path == "README.md" and result.card_written else ""
        table.add_row(path + note, human_bytes(size))
    table.add_row("total", human_bytes(result.total_bytes), style="bold")
    console = out_console()
    console.print(table)
    if result.dry_run:
        console.print("dry run: nothing was written or uploaded")
    elif result.pr_url:
        console.print(f"opened a pull request: {result.pr_url}")
    else:
        console.print(f"one commit: {result.commit_url}")
