"""The fault matrix, Hub rows: the real CLI in a subprocess against the HTTP fake Hub (tests/hub/fake_hub.py), so
huggingface_hub's own requests, errors and retries run, and qtool's mapping of them is what a user sees.

Each failure is exactly two lines on stderr (``error:`` naming the repo's URL, ``hint:`` saying what to do), exit
code 1, and nothing in the working folder. A token passed by ``--token`` or by ``HF_TOKEN`` never shows: not in
stdout, stderr (tracebacks with ``QTOOL_DEBUG=1`` included), the output folder or the Hub cache. A quantize through
HTTP writes the same bytes as a quantize of the same folder on disk.
"""

from __future__ import annotations

import json
import secrets
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub.fake_hub import FakeHub, client_env, refused_endpoint

MODEL = "acme/t5"  # the tiny pipeline's T5 encoder (text_encoder_2), a one-model repo
GATED = "acme/gated"
MISSING = "acme/missing"
COMMANDS = ["quantize", "footprint", "dequantize"]
# (source and options, words of the error line, words of the hint line); {url} is the endpoint.
CASES = {
    "not-found": ([MISSING], ["{url}/acme/missing", "not found"], ["check the repo id", "a token that can read it"]),
    "gated": ([GATED], ["{url}/acme/gated", "gated"], ["accept the license at {url}/acme/gated", "--token"]),
    "revision": ([MODEL, "--revision", "nope"], ["revision 'nope' not found", "{url}/acme/t5"], ["--revision"]),
    "no-network": (
        [MODEL],
        ["cannot reach the Hugging Face Hub", "{url}/acme/t5"],
        ["check the network", "HF_HUB_OFFLINE", "local folder"],
    ),
}
# Without any token: the Hub answers 401, and the hints say how to pass one.
ANONYMOUS = {
    "not-found": (["{url}/acme/missing", "not found"], ["check the repo id", "pass --token or set HF_TOKEN"]),
    "gated": (
        ["{url}/acme/gated", "gated", "no token was sent"],
        ["accept the license at {url}/acme/gated", "pass --token or set HF_TOKEN"],
    ),
}


def new_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


@pytest.fixture(scope="module")
def model_folder(tiny_flux) -> Path:
    return tiny_flux / "text_encoder_2"


@pytest.fixture(scope="module")
def hub(model_folder):
    """One fake Hub for the module: the T5 model, and a gated copy of it that no test token may read."""
    with FakeHub() as hub:
        hub.serve(MODEL, model_folder)
        hub.serve(GATED, model_folder, gated=True)
        yield hub
    assert hub.unexpected == []


class Run:
    """The CLI run in a fresh working folder and Hub cache, with tokens given as asked."""

    def __init__(self, tmp_path: Path, endpoint: str, *, flag: bool, env: bool, debug: bool = False):
        self.cwd, self.hf_home = tmp_path / "cwd", tmp_path / "hf-home"
        self.cwd.mkdir()
        self.endpoint = endpoint
        self.tokens = [t for t, given in ((new_token(), flag), (new_token(), env)) if given]
        self.options = ["--token", self.tokens[0]] if flag else []
        self.env = client_env(endpoint, self.hf_home)
        self.env.update(HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")  # a stuck request fails, not hangs
        if env:
            self.env["HF_TOKEN"] = self.tokens[-1]
        if debug:
            self.env["QTOOL_DEBUG"] = "1"

    def __call__(self, args: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "qtool", *args, *self.options],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.seconds = time.monotonic() - started
        return done

    def assert_no_token(self, done: subprocess.CompletedProcess) -> None:
        """No token in the output, nor in any file written in the working folder or the Hub cache."""
        files = [p for root in (self.cwd, self.hf_home) if root.exists() for p in root.rglob("*") if p.is_file()]
        for token in self.tokens:
            assert token not in done.stdout + done.stderr
            for path in files:
                assert token.encode() not in path.read_bytes(), path


def expected(words: list[str], url: str) -> list[str]:
    return [w.format(url=url) for w in words]


def check_failure(run: Run, done: subprocess.CompletedProcess, in_error: list[str], in_hint: list[str]) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), done.stderr
    for words in expected(in_error, run.endpoint):
        assert words in lines[0], lines[0]
    for words in expected(in_hint, run.endpoint):
        assert words in lines[1], lines[1]
    assert list(run.cwd.iterdir()) == []  # no output folder, no temporary folder
    run.assert_no_token(done)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "command,token",
    [("quantize", "flag"), ("quantize", "env"), ("footprint", "env"), ("dequantize", "flag")],
)
def test_hub_failure(hub, tmp_path, case, command, token):
    """Each Hub fault, for each command that reads a repo, with a token from --token or HF_TOKEN."""
    args = CASES[case][0]
    if case == "no-network":
        with refused_endpoint() as url:
            run = Run(tmp_path, url, flag=token == "flag", env=token == "env")
            done = run([command, *args])
        assert run.seconds < 15, "huggingface_hub retried: the tree listing is retried for ~25 s"
    else:
        run = Run(tmp_path, hub.url, flag=token == "flag", env=token == "env")
        done = run([command, *args])
        assert f"Bearer {run.tokens[0]}" in hub.authorizations  # the token was sent
    check_failure(run, done, *CASES[case][1:])


@pytest.mark.parametrize("case", ["not-found", "gated"])
def test_hub_failure_without_a_token(hub, tmp_path, case):
    """Anonymous requests get 401 from the Hub for a missing repo and a gated one: the same shape, and hints that
    say how to pass a token."""
    run = Run(tmp_path, hub.url, flag=False, env=False)
    done = run(["quantize", *CASES[case][0]])
    check_failure(run, done, *ANONYMOUS[case])


@pytest.mark.parametrize("case", list(CASES))
def test_hub_failure_with_debug_hides_the_tokens(hub, tmp_path, case):
    """QTOOL_DEBUG=1: the traceback (huggingface_hub's chained errors included) instead of the two lines, and still
    neither token, given both ways at once."""
    args = CASES[case][0]
    if case == "no-network":
        with refused_endpoint() as url:
            run = Run(tmp_path, url, flag=True, env=True, debug=True)
            done = run(["quantize", *args])
    else:
        run = Run(tmp_path, hub.url, flag=True, env=True, debug=True)
        done = run(["quantize", *args])
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "qtool.errors.QtoolError: " in done.stderr.splitlines()[-1]
    for words in expected(CASES[case][1], run.endpoint):
        assert words in done.stderr.splitlines()[-1]
    assert list(run.cwd.iterdir()) == []
    run.assert_no_token(done)


@pytest.mark.parametrize("token", ["flag", "env-debug"])
def test_dry_run_of_a_served_repo(hub, tmp_path, token):
    run = Run(tmp_path, hub.url, flag=token == "flag", env=token != "flag", debug=token == "env-debug")
    done = run(["quantize", MODEL, "--dry-run", "--json"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dry_run"] and result["source"] == MODEL and result["kind"] == "model"
    assert list(run.cwd.iterdir()) == []
    assert f"Bearer {run.tokens[0]}" in hub.authorizations
    run.assert_no_token(done)


@pytest.fixture(scope="module")
def local_output(model_folder, tmp_path_factory) -> Path:
    """The same model quantized from its folder on disk, by the API, with the CLI's defaults."""
    from qtool.api import quantize_checkpoint

    out = tmp_path_factory.mktemp("local") / "t5-nf4"
    return quantize_checkpoint(model_folder, output=out, device="cpu").output


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("token", ["flag", "env-debug"])
def test_quantize_through_http_equals_a_local_quantize(hub, local_output, tmp_path, token):
    """The served repo, downloaded by huggingface_hub and quantized: every file byte for byte as from the folder on
    disk, except where qtool.json names the source (the repo id and the commit that was downloaded)."""
    run = Run(tmp_path, hub.url, flag=token == "flag", env=token != "flag", debug=token == "env-debug")
    done = run(["quantize", MODEL, "--device", "cpu"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in run.cwd.iterdir()] == ["t5-nf4"]  # and no temporary folder left
    remote, local = files_of(run.cwd / "t5-nf4"), files_of(local_output)
    assert remote.keys() == local.keys()
    for name in remote.keys() - {"qtool.json"}:
        assert remote[name] == local[name], name
    remote_provenance, local_provenance = json.loads(remote["qtool.json"]), json.loads(local["qtool.json"])
    commit = hub.refs(MODEL)["main"]
    assert remote_provenance.pop("source") == MODEL and remote_provenance.pop("source_revision") == commit
    assert remote_provenance.pop("source_is_hub_repo") is True and local_provenance.pop("source_is_hub_repo") is False
    del local_provenance["source"], local_provenance["source_revision"]
    assert remote_provenance == local_provenance
    assert f"Bearer {run.tokens[0]}" in hub.authorizations
    run.assert_no_token(done)
