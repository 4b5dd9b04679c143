"""The benchmark scripts as CI sees them: every ``benchmarks/*.py`` answers ``--help`` and ``--dry-run`` (which
measure nothing), README's performance section is what ``make_table.py`` makes of the committed CSVs, and
``make_table``'s choice of the latest run per figure.

Benchmarks themselves are not tests: they need a GPU and minutes. These run in a few seconds on the CPU.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
# Scripts whose --help and --dry-run must not import torch (a plan is printed from arguments and file headers).
TORCH_FREE = {"e2e_quantize.py", "make_table.py", "bench_flux.py"}
# Runs a script as __main__ and reports at exit whether torch got imported.
WRAPPER = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else '', file=sys.stderr))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def load_make_table():
    spec = importlib.util.spec_from_file_location("make_table", BENCHMARKS / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_is_listed():
    assert {"e2e_quantize.py", "make_table.py", "bench_codecs.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("flag", ["--help", "--dry-run"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_dry_run(script, flag, tmp_path):
    """CI's only check of a benchmark: it starts, says what it would do, and measures nothing."""
    before = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("*")}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(BENCHMARKS / script), flag],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "printed nothing on stdout"
    if script in TORCH_FREE:
        assert "torch imported" not in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("*")}
    assert after == before, "a --help or --dry-run wrote results"


def test_e2e_dry_run_lists_shapes_and_commands(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "e2e_quantize.py"), "--dry-run", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for expected in ("flux-dev transformer:", "flux-dev text_encoder_2:", "flux-dev transformer+text_encoder_2:"):
        assert expected in proc.stdout
    assert "python -m qtool quantize" in proc.stdout and "--bits 4 --nf4 --double-quant" in proc.stdout
    assert not (tmp_path / "w").exists(), "--dry-run created the workdir"


def test_readme_tables_match_the_committed_csvs():
    """README's performance section is generated: regenerate with `python benchmarks/make_table.py`."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "make_table.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = [
        "op", "provider", "shape", "metric", "unit", "median", "p20", "p80", "notes",
        "gpu", "driver", "torch", "triton", "bnb", "diffusers", "transformers", "git_commit", "date",
    ]  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({"unit": "s", "gpu": "H100", **row})


def test_latest_run_per_figure(tmp_path):
    """The latest date wins per (op, provider, shape, metric, notes), wherever it sits in the file; a tie goes to
    the later row; different notes are different figures."""
    make_table = load_make_table()
    key = {"op": "quantize-nf4-dq", "provider": "qtool", "shape": "flux-dev transformer", "metric": "wall"}
    rows = [
        {**key, "notes": "page cache warm", "median": "9", "git_commit": "new", "date": "2026-11-26T10:00:00+00:00"},
        {**key, "notes": "page cache warm", "median": "12", "git_commit": "old", "date": "2026-11-25T10:00:00+00:00"},
        {**key, "notes": "page cache cold", "median": "30", "git_commit": "old", "date": "2026-11-25T10:00:00+00:00"},
        {**key, "notes": "page cache cold", "median": "31", "git_commit": "tie", "date": "2026-11-25T10:00:00+00:00"},
        {**key, "metric": "peak_rss", "unit": "GB", "notes": "page cache warm", "median": "1.5", "date": "2026-11-24"},
    ]
    write_csv(tmp_path / "e2e.csv", rows)
    tables, old = make_table.load(tmp_path)
    assert old == []
    chosen = {(r["metric"], r["notes"]): r["median"] for r in make_table.latest(tables["e2e.csv"])}
    assert chosen == {
        ("wall", "page cache warm"): "9",
        ("wall", "page cache cold"): "31",
        ("peak_rss", "page cache warm"): "1.5",
    }


def test_missing_and_old_csvs_render_without_crashing(tmp_path):
    make_table = load_make_table()
    (tmp_path / "quantize_flux.csv").write_text("tool,size,seconds\nqtool,dev,57.9\n")
    block = make_table.render(tmp_path)
    assert block.count("Not measured yet") == 4
    assert "quantize_flux.csv" in block and "57.9" not in block


def test_check_fails_until_the_readme_is_regenerated(tmp_path):
    make_table = load_make_table()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{make_table.BEGIN}\nhand-typed 57.9 s\n{make_table.END}\n\nrest\n")
    results = tmp_path / "results"
    results.mkdir()
    args = ["--results", str(results), "--readme", str(readme)]
    assert make_table.main([*args, "--check"]) == 1
    assert make_table.main(args) == 0
    assert make_table.main([*args, "--check"]) == 0
    assert "57.9" not in readme.read_text() and readme.read_text().endswith("\n\nrest\n")
    key = {"op": "read", "provider": "read-1-thread", "shape": "flux-dev transformer", "notes": "page cache cold"}
    write_csv(results / "e2e.csv", [{**key, "metric": "wall", "median": "19.8", "date": "2026-11-26"}])
    assert make_table.main([*args, "--check"]) == 1
    assert make_table.main(args) == 0
    assert "19.8" in readme.read_text()


def test_quality_table_shows_components_and_the_nf4_target(tmp_path):
    """quality.csv: one line per component and method (per-layer rows stay in the CSV), NF4 marked against issue 8's
    +0.5 dB target, one table per device and backend."""
    make_table = load_make_table()
    metrics = ("sqnr_gain_db", "sqnr_gain_min_db", "sqnr_gain_max_db", "sqnr_absmax_db", "sqnr_search_db",
               "time_ratio", "size_difference_bytes", "layers")  # fmt: skip
    rows = []
    for where, shape, gain in (("cpu, torch", "e2k", "0.56"), ("cpu, torch", "flux-dev transformer", "0.41"),
                               ("cuda, triton", "e2k", "0.57")):  # fmt: skip
        notes = f"scale search vs absmax; {where} backend"
        for metric in metrics:
            value = gain if metric.startswith("sqnr_gain") else "1"
            rows.append({"op": "quantize-nf4", "provider": "qtool", "shape": shape, "metric": metric,
                         "median": value, "notes": notes, "date": "2026-11-25"})  # fmt: skip
    rows.append({**rows[0], "shape": "e2k | accent:emb.weight 85x256", "median": "9.99"})
    write_csv(tmp_path / "quality.csv", rows)
    block = make_table.render(tmp_path)
    section = block.split("#### Scale search", 1)[1]
    assert "| e2k | nf4 | 1 | 1.00 | 1.00 | +0.56 ✓ |" in section
    assert "| flux-dev transformer | nf4 | 1 | 1.00 | 1.00 | +0.41 ✗ |" in section
    assert "9.99" not in section and "accent" not in section
    assert "On cpu, torch backend:" in section and "On cuda, triton backend:" in section
    assert "| e2k | nf4 | 1 | 1.00 | 1.00 | +0.57 ✓ |" in section.split("On cuda")[1]


def load_script(name: str):
    """A benchmark script as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.bnb
@pytest.mark.slow
def test_bench_flux_tiny_on_the_cpu(tmp_path):
    """bench_flux.py --tiny end to end on the CPU, as on the GPU but small: each variant in its own child, no compile.
    Every variant builds, steps and generates with no error row; every quantized variant converts all the model's
    Linears (diffusers' bnb quantizer skips none for FLUX); the ratios to bf16 come from the same run; the rows carry
    the environment; make_table renders them."""
    import torch
    from diffusers import FluxTransformer2DModel

    bench = load_script("bench_flux.py")
    with torch.device("meta"):
        model = FluxTransformer2DModel(**bench.TINY.transformer)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    out = tmp_path / "flux.csv"
    cmd = [sys.executable, str(BENCHMARKS / "bench_flux.py"), "--tiny", "--no-compile", "--out", str(out)]
    cmd += ["--variants", ",".join(bench.VARIANTS), "--steps", "2", "--reps", "2", "--warmup", "1"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open(newline="")))
    assert {r["shape"] for r in rows} == {"flux-tiny 64x64"}
    assert all(r["gpu"] == "cpu" and r["torch"] and r["bnb"] and r["diffusers"] and r["date"] for r in rows)
    assert not [r for r in rows if r["metric"] == "error"], [r for r in rows if r["metric"] == "error"]
    assert {r["notes"] for r in rows if r["op"] != "build"} == {"eager"}
    steps = {r["provider"]: r for r in rows if (r["op"], r["metric"]) == ("step", "time")}
    for variant in bench.VARIANTS:
        got = {(r["op"], r["metric"]): r for r in rows if r["provider"] == variant}
        step = steps[variant]
        assert 0 < float(step["p20"]) <= float(step["median"]) <= float(step["p80"])
        assert float(got["generate-2", "wall"]["median"]) > 0
        assert int(got["build", "linears_quantized"]["median"]) == (0 if variant == "bf16" else linears)
        ratios = {"time_vs_bf16", "wall_vs_bf16"} if variant != "bf16" else set()
        assert {metric for _, metric in got if metric.endswith("_vs_bf16")} == ratios
        if variant != "bf16":
            expected = float(step["median"]) / float(steps["bf16"]["median"])
            assert float(got["step", "time_vs_bf16"]["median"]) == pytest.approx(expected, rel=1e-3)
    block = load_make_table().render(tmp_path)
    section = block.split("#### FLUX.1-dev-shaped", 1)[1]
    assert "`flux-tiny 64x64`:" in section
    for variant in bench.VARIANTS:
        assert f"| {variant} | no |" in section
    assert "step ≤ 1.03x bf16: " in section and "step ≤ 1x bf16: " in section


def test_flux_table_shows_the_latest_run_and_the_targets(tmp_path):
    """flux.csv: a line per variant and compile setting from the latest run of each figure (an error an older run hit
    is not shown once a later run succeeds), issue 9's marks from the same-run ratios."""
    make_table = load_make_table()
    shape = "flux-dev 1024x1024"
    old, new = "2026-11-25T10:00:00+00:00", "2026-11-26T10:00:00+00:00"

    def r(provider, op, metric, median, notes="eager", date=new, unit="x"):
        return {"op": op, "provider": provider, "shape": shape, "metric": metric, "unit": unit, "median": median,
                "notes": notes, "date": date}  # fmt: skip

    rows = [
        r("bf16", "step", "time", "180", unit="ms"),
        r("qtool-nf4", "step", "time", "184", unit="ms"),
        r("qtool-nf4", "step", "time_vs_bf16", "1.02"),
        r("qtool-nf4", "step", "peak_memory_vs_bnb", "1.10"),
        r("qtool-int8", "step", "time_vs_bf16", "0.95"),
        r("qtool-nf4", "step", "error", "Unsupported: old failure", notes="compiled", date=old, unit="text"),
        r("qtool-nf4", "step", "time", "150", notes="compiled", unit="ms"),
        r("qtool-nf4", "step", "fullgraph", "1", notes="compiled", unit="bool"),
        r("bnb-nf4", "step", "error", "Unsupported: a | b", notes="compiled", unit="text"),
        r("bnb-nf4", "step", "fullgraph", "0", notes="compiled", unit="bool"),
        r("bnb-nf4", "run", "error", "child exited 1", notes="", date=old, unit="text"),
        r("bnb-nf4", "generate-28", "wall", "6.5", unit="s"),
    ]
    write_csv(tmp_path / "flux.csv", rows)
    section = make_table.render(tmp_path).split("#### FLUX.1-dev-shaped", 1)[1]
    assert "old failure" not in section and "child exited" not in section
    lines = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: line for line in section.splitlines()
             if line.startswith("| ") and not line.startswith("| variant")}  # fmt: skip
    assert "step ≤ 1.03x bf16: 1.02 ✓; peak ≤ bnb's: 1.10 ✗" in lines["qtool-nf4", "no"]
    assert "step ≤ 1x bf16: 0.95 ✓" in lines["qtool-int8", "no"]
    assert "| 150 |" in lines["qtool-nf4", "yes"] and "fullgraph" not in lines["qtool-nf4", "yes"]
    assert "fullgraph=False; step: Unsupported: a \\| b" in lines["bnb-nf4", "yes"]
    assert list(lines) == [("bf16", "no"), ("bnb-nf4", "no"), ("bnb-nf4", "yes"), ("qtool-nf4", "no"),
                           ("qtool-nf4", "yes"), ("qtool-int8", "no")]  # fmt: skip


def test_flux_ratios_skip_a_stopped_childs_error_row():
    """A child stopped at its time limit leaves an error row without notes in the bf16 rows; the next variant's
    ratios must still be found (a KeyError here once lost a whole H100 run's later variants)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _results
        import bench_flux
    finally:
        sys.path.remove(str(BENCHMARKS))
    bf16 = [
        _results.row("run", "bf16", "s", "error", "text", "child stopped after 45 s (--time-budget)"),
        _results.row("step", "bf16", "s", "time", "ms", 180.0, notes="eager"),
    ]
    rows = [_results.row("step", "bnb-nf4", "s", "time", "ms", 198.0, notes="eager")]
    (ratio,) = bench_flux.ratio_rows(rows, {"bf16": bf16})
    assert (ratio["metric"], ratio["median"], ratio["notes"]) == ("time_vs_bf16", 1.1, "eager")
