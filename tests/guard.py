"""What the fault tests share: fingerprints that show any change to a folder, the left-overs a run must not leave,
safetensors files rewritten with a damaged header, and the CLI run in-process or as a real process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from qtool.cli.app import app

# What a run creates beside its output while it works (qtool.api.atomic_output, _check_output).
LEFTOVER = re.compile(r"\.qtool-(tmp|old|probe)-\d+$")
T5_FIRST_SHARD = "model-00001-of-00002.safetensors"
T5_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"  # a quantized Linear in the first shard

runner = CliRunner()


def fingerprint(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind, size, mtime and, for files, the sha256 of the bytes."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        out[path.relative_to(folder).as_posix()] = (
            path.is_symlink(),
            path.is_dir(),
            st.st_size,
            st.st_mtime_ns,
            digest,
        )
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary entries of a run under ``parent`` (any depth): there must be none once it has ended."""
    return sorted(p.name for p in Path(parent).rglob("*") if LEFTOVER.search(p.name) or p.suffix in (".spool", ".part"))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def split_file(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data section."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_file(path: Path, header: dict | bytes, data: bytes, header_len: int | None = None) -> None:
    """Write a safetensors file from a header (a dict, or raw bytes) and data; ``header_len`` overrides the prefix."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = (len(raw) if header_len is None else header_len).to_bytes(8, "little")
    Path(path).write_bytes(prefix + raw + data)


def damage_header(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite ``path`` with ``change`` applied to its parsed header (the data section kept as it is)."""
    header, data = split_file(path)
    change(header)
    write_file(path, header, data)


def qtool(*args, env: dict | None = None) -> object:
    """Run the CLI in-process (CliRunner); the result has exit_code, stdout and stderr."""
    return runner.invoke(app, [str(a) for a in args], env=env)


def qtool_process(*args, cwd: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start the CLI as its own process (``python -m qtool``), stdout and stderr piped."""
    environment = {**os.environ, "QTOOL_DEBUG": "", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "qtool", *map(str, args)],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def assert_one_error(outcome, *fragments: str, hint: str | None = None) -> str:
    """Exit 1, nothing on stdout, ``error: ...`` (containing every fragment) and at most a ``hint: ...`` line on
    stderr, no traceback; returns the error line."""
    assert outcome.exit_code == 1, (outcome.exit_code, outcome.stdout, outcome.stderr)
    assert outcome.stdout == "", outcome.stdout
    lines = outcome.stderr.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), outcome.stderr
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), outcome.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if hint is not None:
        assert len(lines) == 2 and hint in lines[1], (hint, outcome.stderr)
    return lines[0]
