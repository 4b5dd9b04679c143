"""Test set-up: Triton's interpreter on machines without CUDA, offline Hub, seeds, markers.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before ``qtool.kernels`` is
imported (../shared/docs/cpu-testing.md §2), so it is set here, at the top, before anything else imports qtool.
"""

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the network or the user's Hub cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="qtool-hf-home-"))

_early = [m for m in sys.modules if m.startswith("qtool.kernels.")]
if _early and os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError(f"{_early} were imported before TRITON_INTERPRET was set: their kernels are compiled-mode")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_bnb = pytest.mark.skip(reason="needs bitsandbytes (pip install -e .[test])")
    has_bnb = _has_bnb()
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "bnb" in item.keywords and not has_bnb:
            item.add_marker(skip_bnb)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the GPU, or the CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """The shipped example pipeline (FLUX.1-dev layout, random bf16 weights), generated once per session."""
    folder = tmp_path_factory.mktemp("src") / "tiny-flux"
    subprocess.run([sys.executable, str(EXAMPLES / "make_tiny_flux.py"), str(folder)], check=True, capture_output=True)
    return folder


@pytest.fixture(scope="session")
def tiny_flux_nf4(tiny_flux, tmp_path_factory):
    """tiny_flux quantized by the API with the default options on the CPU (a QuantizeResult): the reference output of
    a local run, and an already-quantized source. Its files are hard links shared with tiny_flux: never modify them."""
    from qtool.api import quantize_checkpoint

    return quantize_checkpoint(tiny_flux, output=tmp_path_factory.mktemp("ref") / "tiny-flux-nf4", device="cpu")


class FakeHub:
    """qtool.hub's repo functions (list_files, download, read_json, safetensors_headers) serving local folders as Hub
    repos, with every call recorded. ``download`` copies the files that match the patterns (fnmatch, as
    huggingface_hub matches allow_patterns) into one snapshot folder per repo and revision, as the Hub cache does.
    Local sources go to the real functions and are not recorded."""

    def __init__(self, real: dict, cache: Path):
        self.real = real
        self.cache = cache
        self.repos: dict[str, Path] = {}
        self.calls: list[tuple[str, str, dict]] = []

    def serve(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = Path(folder)

    def files(self, repo_id: str) -> list[str]:
        return self.real["list_files"](str(self.repos[repo_id]))

    def _repo(self, name: str, source: str, **kwargs) -> Path | None:
        if source not in self.repos:
            assert self.real["is_local"](source), f"the fake Hub does not serve {source!r}"
            return None
        self.calls.append((name, source, kwargs))
        return self.repos[source]

    def downloaded_patterns(self) -> list[list[str]]:
        return [kwargs["patterns"] for name, _, kwargs in self.calls if name == "download"]

    def list_files(self, source, *, revision=None, token=None):
        repo = self._repo("list_files", source, revision=revision, token=token)
        return self.real["list_files"](source) if repo is None else self.files(source)

    def download(self, source, *, patterns, revision=None, token=None, progress=True):
        repo = self._repo("download", source, patterns=list(patterns), revision=revision, token=token)
        if repo is None:
            return self.real["download"](source, patterns=patterns)
        snapshot = self.cache / source.replace("/", "--") / (revision or "main")
        for name in self.files(source):
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / name, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return snapshot

    def read_json(self, source, filename, *, revision=None, token=None):
        repo = self._repo("read_json", source, filename=filename, revision=revision, token=token)
        return self.real["read_json"](str(repo or source), filename)

    def safetensors_headers(self, source, filenames, *, revision=None, token=None):
        repo = self._repo("safetensors_headers", source, filenames=list(filenames), revision=revision, token=token)
        return self.real["safetensors_headers"](str(repo or source), filenames)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path_factory) -> FakeHub:
    """A FakeHub patched into qtool.hub for one test; serve a folder with ``fake_hub.serve(repo_id, folder)``."""
    from qtool import hub

    names = ("is_local", "list_files", "download", "read_json", "safetensors_headers")
    fake = FakeHub({name: getattr(hub, name) for name in names}, tmp_path_factory.mktemp("hub-cache"))
    for name in names[1:]:
        monkeypatch.setattr(hub, name, getattr(fake, name))
    return fake


@pytest.fixture(scope="session")
def flux_outputs(tiny_flux, tmp_path_factory) -> dict[str, Path]:
    """tiny_flux quantized by qtool on the CPU with each of FLUX_METHODS: label -> output folder. Never modify."""
    from helpers import FLUX_METHODS
    from qtool.api import quantize_checkpoint

    root = tmp_path_factory.mktemp("flux-outputs")
    return {
        label: quantize_checkpoint(tiny_flux, spec=spec, output=root / label, device="cpu").output
        for label, spec in FLUX_METHODS.items()
    }
