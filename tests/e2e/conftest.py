import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """The shipped example pipeline (FLUX.1-dev layout, random bf16 weights), generated once per session."""
    folder = tmp_path_factory.mktemp("src") / "tiny-flux"
    subprocess.run([sys.executable, str(EXAMPLES / "make_tiny_flux.py"), str(folder)], check=True, capture_output=True)
    return folder
