"""The one CSV schema every benchmark appends to, and the facts each row carries about where it was measured.

A row is one figure: ``op`` (what ran), ``provider`` (who ran it: qtool, bnb, torch, diffusers+bnb, ...),
``shape`` (a tensor shape or a model), ``metric`` and ``unit`` (e.g. ``time``/``us``, ``bandwidth``/``TB/s``,
``wall``/``s``, ``peak_rss``/``GB``), ``median`` (with ``p20``/``p80`` where repeated), and ``notes`` (how it was
measured, e.g. ``page cache warm``). The rest is filled in here: GPU, driver, library versions, git commit, date.
"""

from __future__ import annotations

import csv
import datetime
import functools
import importlib.metadata
import os
import subprocess
from pathlib import Path

COLUMNS = [
    "op", "provider", "shape", "metric", "unit", "median", "p20", "p80", "notes",
    "gpu", "driver", "torch", "triton", "bnb", "diffusers", "transformers", "git_commit", "date",
]  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The checkout's short commit; the device machine gets the tree without .git, so QTOOL_GIT_SHA names it."""
    if os.environ.get("QTOOL_GIT_SHA"):
        return os.environ["QTOOL_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def environment() -> dict[str, str]:
    """GPU name, driver and library versions (imports torch; call it only when measuring)."""
    import torch

    gpu, driver = "cpu", ""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            )
            driver = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
        except OSError:
            driver = ""
    return {
        "gpu": gpu,
        "driver": driver,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "bnb": _version("bitsandbytes"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "git_commit": git_commit(),
    }


def row(op: str, provider: str, shape: str, metric: str, unit: str, median: float, **extra) -> dict:
    """One result row; ``extra`` may give p20, p80 and notes."""
    unknown = set(extra) - {"p20", "p80", "notes"}
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}")
    return {"op": op, "provider": provider, "shape": shape, "metric": metric, "unit": unit, "median": median, **extra}


def append(path: Path, rows: list[dict]) -> None:
    """Append rows (from ``row``) to the CSV at path, with the environment and today's date filled in."""
    stamp = {**environment(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**stamp, **r})


def read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
