"""FakeHub against the installed huggingface_hub: create_repo + upload_folder in a subprocess (huggingface_hub reads
HF_ENDPOINT at import time), then what the fake recorded. Both client paths of huggingface_hub 2.x are covered:
``lfs=True`` (create_commit and plain LFS, Xet off) and ``lfs=False`` (the default pipelined upload, files inline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from hub.fake_hub import FakeHub

REPO = "acme/tiny-flux-nf4"
TOKEN = "hf_FakeHubToken0123456789abcdefXYZ"

# Prints one JSON line: the CommitInfo's URLs, or the exception's class and HTTP status.
PUSH = """
import json, sys
import huggingface_hub as hf
from huggingface_hub.errors import HfHubHTTPError
a = json.loads(sys.argv[1])
try:
    repo = hf.create_repo(a["repo_id"], private=a["private"], exist_ok=True, token=a["token"])
    info = hf.upload_folder(repo_id=repo.repo_id, folder_path=a["folder"], revision=a["revision"],
                            create_pr=a["create_pr"], commit_message="Upload checkpoint", token=a["token"])
    print(json.dumps({"commit_url": info.commit_url, "pr_url": info.pr_url}))
except Exception as exc:
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
    print(json.dumps({"error": type(exc).__name__, "http_error": isinstance(exc, HfHubHTTPError), "status": status}))
"""


def write_folder(root, *, big: bool) -> dict[str, bytes]:
    files = {
        "notes.txt": b"quantized with qtool\n",
        "transformer/config.json": json.dumps({"_class_name": "FluxTransformer2DModel"}).encode(),
        # random bytes: binary, and over the Hub's 10 MiB limit for regular files when big
        "transformer/diffusion_pytorch_model.safetensors": os.urandom(12 * 2**20 if big else 4096),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    return root, write_folder(root, big=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return root, write_folder(root, big=False)


def push(hub, tmp_path, folder, *, token=TOKEN, private=True, revision=None, create_pr=False) -> dict:
    args = dict(repo_id=REPO, folder=str(folder), token=token, private=private, revision=revision, create_pr=create_pr)
    proc = subprocess.run(
        [sys.executable, "-c", PUSH, json.dumps(args)],
        env=hub.env(tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("lfs", [True, False], ids=["lfs", "inline"])
def test_round_trip(checkpoint, tmp_path, lfs):
    folder, files = checkpoint
    with FakeHub(token=TOKEN, lfs=lfs) as hub:
        result = push(hub, tmp_path, folder)
    assert result["commit_url"].startswith(f"{hub.url}/{REPO}/commit/"), result
    assert result["pr_url"] is None
    assert hub.repos == {REPO: {"private": True, "type": "model"}}
    [commit] = hub.commits
    assert commit["files"].keys() == files.keys()
    for name, data in files.items():
        assert commit["files"][name] == data, name
    assert commit["lfs"] == (["transformer/diffusion_pytorch_model.safetensors"] if lfs else [])
    assert (commit["repo_id"], commit["revision"], commit["create_pr"]) == (REPO, "main", False)
    assert commit["summary"] == "Upload checkpoint"
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert hub.unexpected == []


def test_existing_repo_keeps_its_visibility(small, tmp_path):
    folder, files = small
    with FakeHub() as hub:
        assert "commit_url" in push(hub, tmp_path, folder, private=None)
        assert "commit_url" in push(hub, tmp_path, folder, private=True)  # 409 from create, exist_ok
    assert hub.repos == {REPO: {"private": None, "type": "model"}}
    assert [c["files"] for c in hub.commits] == [files, files]
    assert hub.unexpected == []


@pytest.mark.parametrize("lfs", [True, False], ids=["lfs", "inline"])
def test_revision(small, tmp_path, lfs):
    folder, _ = small
    with FakeHub(lfs=lfs) as hub:
        assert push(hub, tmp_path, folder, revision="dev")["error"] == "RevisionNotFoundError"
    assert hub.commits == [] and hub.unexpected == []
    with FakeHub(existing_branches={"main", "dev"}, lfs=lfs) as hub:
        assert "commit_url" in push(hub, tmp_path, folder, revision="dev")
    assert [c["revision"] for c in hub.commits] == ["dev"]


def test_bad_token(small, tmp_path):
    folder, _ = small
    with FakeHub(token=TOKEN) as hub:
        result = push(hub, tmp_path, folder, token="hf_WrongToken")
    assert result["http_error"] and result["status"] == 401, result
    assert hub.repos == {} and hub.commits == []
    assert set(hub.authorizations) == {"Bearer hf_WrongToken"}


def test_failed_commit_records_nothing(small, tmp_path):
    folder, _ = small
    with FakeHub(fail_commit=True) as hub:
        result = push(hub, tmp_path, folder)
    assert result["http_error"] and result["status"] == 500, result
    assert REPO in hub.repos and hub.commits == [] and hub.unexpected == []


@pytest.mark.parametrize("lfs", [True, False], ids=["lfs", "inline"])
def test_pull_request(small, tmp_path, lfs):
    folder, files = small
    with FakeHub(lfs=lfs) as hub:
        result = push(hub, tmp_path, folder, create_pr=True)
    assert result["pr_url"] == f"{hub.url}/{REPO}/discussions/1", result
    [commit] = hub.commits
    assert (commit["revision"], commit["create_pr"], commit["files"]) == ("main", True, files)
    assert hub.unexpected == []


def test_unknown_request_is_recorded():
    with FakeHub() as hub:
        with pytest.raises(urllib.error.HTTPError) as info:
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            no_proxy.open(f"{hub.url}/api/models/{REPO}/xet-write-token/main", timeout=10)
    assert info.value.code == 404 and "error" in json.loads(info.value.read())
    assert hub.unexpected == [f"GET /api/models/{REPO}/xet-write-token/main"]
