"""The root command through Typer's CliRunner and as an installed console script."""

import importlib.metadata
import subprocess
import sys

from typer.testing import CliRunner

from qtool import __version__
from qtool.cli.app import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"qtool {__version__}\n"


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "bitsandbytes 4-bit / 8-bit" in result.output and "env" in result.output


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "Usage: qtool" in result.output


def test_env_reports_versions():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0
    assert f"qtool: {__version__}" in result.output and "torch: " in result.output and "kernels: " in result.output


def test_console_script_and_module():
    """`qtool` is declared as a console script for qtool.cli.app:main, and `python -m qtool` runs it."""
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="qtool")
    assert script.value == "qtool.cli.app:main"
    out = subprocess.run([sys.executable, "-m", "qtool", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == f"qtool {__version__}\n"
