"""FakeHub against the installed huggingface_hub: create_repo + upload_folder in a subprocess (huggingface_hub reads
HF_ENDPOINT at import time), then what the fake recorded. Both client paths of huggingface_hub 2.x are covered:
``lfs=True`` (create_commit and plain LFS, Xet off) and ``lfs=False`` (the default pipelined upload, files inline).
Then the read side: a served folder listed, downloaded and header-read by the client, byte for byte, its faults as
the client raises them, and an endpoint that refuses connections."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from hub.fake_hub import CDN, FakeHub, client_env, refused_endpoint

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


# Read endpoints: FakeHub.serve() behind the real download client

# Runs huggingface_hub calls given as JSON [[name, kwargs], ...] (a name of huggingface_hub, or "read": the bytes of
# the file a call returned, or "walk": a folder's files), and prints one JSON line per call: {"value": ...} or
# {"error": the exception's class names (MRO), "status": HTTP status or None}.
CALLS = """
import base64, json, os, sys
import huggingface_hub as hf
from huggingface_hub.errors import HfHubHTTPError

def plain(value):
    if isinstance(value, (list, tuple)) or type(value).__name__ == "generator":
        return [plain(v) for v in value]
    if isinstance(value, hf.ModelInfo):
        return {"sha": value.sha, "gated": value.gated, "siblings": [[s.rfilename, s.size, s.lfs is not None]
                for s in value.siblings]}
    if isinstance(value, (hf.RepoFile, hf.RepoFolder)):
        return [type(value).__name__, value.path, getattr(value, "lfs", None) is not None]
    if isinstance(value, hf.utils.SafetensorsFileMetadata):
        return {name: [info.dtype, list(info.shape)] for name, info in value.tensors.items()}
    return value

last = None
for name, kwargs in json.loads(sys.argv[1]):
    try:
        if name == "read":
            value = base64.b64encode(open(last, "rb").read()).decode()
        elif name == "walk":
            value = {os.path.relpath(os.path.join(root, f), last): base64.b64encode(
                     open(os.path.join(root, f), "rb").read()).decode() for root, _, fs in os.walk(last) for f in fs}
        else:
            last = getattr(hf, name)(**kwargs)
            value = plain(last)
        print(json.dumps({"value": value}))
    except Exception as exc:
        status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
        print(json.dumps({"error": [c.__name__ for c in type(exc).__mro__], "status": status, "message": str(exc)}))
"""


def run_calls(env: dict, calls: list) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", CALLS, json.dumps(calls)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A model folder: a safetensors file whose header is over 100 kB (two range reads), a small one, a binary
    file in a subfolder, and text files (one with a space in its name)."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("served")
    many = {f"encoder.block.{i}.layer.{j}.weight": torch.zeros(2, 3) for i in range(100) for j in range(20)}
    save_file(many, str(root / "model-00001-of-00002.safetensors"))
    save_file({"shared.weight": torch.ones(4, 8, dtype=torch.bfloat16)}, str(root / "model-00002-of-00002.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (root / "sub dir").mkdir()
    (root / "sub dir" / "notes v2.txt").write_text("plain text\n")
    (root / "sub dir" / "blob.bin").write_bytes(bytes(range(256)) * 8)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert len(files["model-00001-of-00002.safetensors"]) > 100_000
    return root, files


@pytest.mark.parametrize("lfs", [True, False], ids=["xet-disabled", "xet-enabled"])
def test_serve_round_trip(served, tmp_path, lfs):
    """Listing, info, tree (paginated), snapshot_download with patterns, hf_hub_download and header range reads
    through huggingface_hub, with a token: identical bytes; LFS files come from the "CDN" without the token; Xet is
    never tried, even where the client may use it."""
    folder, files = served
    with FakeHub(token=TOKEN, lfs=lfs, tree_page_size=2) as hub:
        commit = hub.serve(REPO, folder)
        repo = {"repo_id": REPO, "token": TOKEN}
        results = run_calls(
            hub.env(tmp_path / "hf-home"),
            [
                ["list_repo_files", repo],
                ["model_info", {**repo, "files_metadata": True}],
                ["list_repo_tree", repo],
                ["list_repo_tree", {**repo, "path_in_repo": "sub dir", "recursive": True}],
                ["snapshot_download", {**repo, "allow_patterns": ["*.json", "sub dir/*"]}],
                ["walk", {}],
                ["hf_hub_download", {**repo, "filename": "model-00002-of-00002.safetensors"}],
                ["read", {}],
                ["parse_safetensors_file_metadata", {**repo, "filename": "model-00001-of-00002.safetensors"}],
                ["parse_safetensors_file_metadata", {**repo, "filename": "model-00002-of-00002.safetensors"}],
            ],
        )
    values = [r.get("value", r) for r in results]
    listing, info, root, sub, snapshot, walked, _, single, big_header, small_header = values
    assert listing == sorted(files)
    assert info["sha"] == commit and info["gated"] is False
    lfs_files = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "sub dir/blob.bin"}
    assert info["siblings"] == [[name, len(data), name in lfs_files] for name, data in files.items()]
    assert root == [
        ["RepoFile", "config.json", False],
        ["RepoFile", "model-00001-of-00002.safetensors", True],
        ["RepoFile", "model-00002-of-00002.safetensors", True],
        ["RepoFolder", "sub dir", False],
    ]
    assert sub == [["RepoFile", "sub dir/blob.bin", True], ["RepoFile", "sub dir/notes v2.txt", False]]
    assert snapshot.endswith(f"snapshots/{commit}")
    assert walked == {name: b64(data) for name, data in files.items() if name.endswith(".json") or "/" in name}
    assert single == b64(files["model-00002-of-00002.safetensors"])
    assert len(big_header) == 2000 and big_header["encoder.block.0.layer.0.weight"] == ["F32", [2, 3]]
    assert small_header == {"shared.weight": ["BF16", [4, 8]]}

    assert hub.unexpected == []
    assert not any("xet" in r.path.lower() for r in hub.requests)
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"}
    cdn = [r for r in hub.requests if r.path.startswith(CDN)]
    assert cdn and not any(r.auth for r in cdn)  # the client drops the token on the redirect to another host
    assert all(r.auth for r in hub.requests if not r.path.startswith(CDN))
    assert any("cursor=" in r.path for r in hub.requests)  # the tree was paginated
    # Header reads: the first 100 kB, then the rest of a larger header; never the whole file.
    ranges = [r.range for r in cdn if r.method == "GET" and r.range]
    assert "bytes=0-100000" in ranges and any(r.startswith("bytes=8-") for r in ranges)


def test_serve_faults(served, tmp_path):
    """What the Hub answers and huggingface_hub raises: a missing or private repo (401 without a token, 404 with
    one), a gated repo (public info and listing; files 401 without a token, 403 with one without access), a missing
    revision or file."""
    folder, _ = served
    other = "hf_NoAccessToken0123456789abcdefXYZ"
    with FakeHub() as hub:
        hub.serve(REPO, folder)
        hub.serve("acme/gated", folder, gated=True, access=[TOKEN])
        hub.serve("acme/private", folder, private=True, access=[TOKEN])
        config = {"filename": "config.json"}
        calls = {
            "missing-anonymous": ["list_repo_files", {"repo_id": "acme/missing"}],
            "missing-token": ["snapshot_download", {"repo_id": "acme/missing", "token": other}],
            "private-anonymous": ["hf_hub_download", {"repo_id": "acme/private", **config}],
            "private-other": ["model_info", {"repo_id": "acme/private", "token": other}],
            "private-access": ["hf_hub_download", {"repo_id": "acme/private", "token": TOKEN, **config}],
            "gated-info": ["model_info", {"repo_id": "acme/gated"}],
            "gated-listing": ["list_repo_files", {"repo_id": "acme/gated", "token": other}],
            "gated-anonymous": ["hf_hub_download", {"repo_id": "acme/gated", **config}],
            "gated-other": ["snapshot_download", {"repo_id": "acme/gated", "token": other}],
            "gated-headers": [
                "parse_safetensors_file_metadata",
                {"repo_id": "acme/gated", "filename": "model-00002-of-00002.safetensors"},
            ],  # fmt: skip
            "gated-access": ["hf_hub_download", {"repo_id": "acme/gated", "token": TOKEN, **config}],
            "revision-listing": ["list_repo_files", {"repo_id": REPO, "revision": "nope"}],
            "revision-snapshot": ["snapshot_download", {"repo_id": REPO, "revision": "nope"}],
            "revision-file": ["hf_hub_download", {"repo_id": REPO, "revision": "nope", **config}],
            "entry": ["hf_hub_download", {"repo_id": REPO, "filename": "missing.json"}],
        }
        results = dict(zip(calls, run_calls(hub.env(tmp_path / "hf-home"), list(calls.values())), strict=True))
    assert hub.unexpected == []

    def error(case: str) -> tuple[str, int | None]:
        assert "error" in results[case], (case, results[case])
        return results[case]["error"][0], results[case]["status"]

    assert error("missing-anonymous") == ("RepositoryNotFoundError", 401)
    assert error("missing-token") == ("RepositoryNotFoundError", 404)
    assert error("private-anonymous") == ("RepositoryNotFoundError", 401)
    assert error("private-other") == ("RepositoryNotFoundError", 404)
    assert results["private-access"]["value"].endswith("config.json")
    assert results["gated-info"]["value"]["gated"] == "manual"
    assert "value" in results["gated-listing"]
    assert error("gated-anonymous") == ("GatedRepoError", 401)
    assert error("gated-other") == ("GatedRepoError", 403)
    assert error("gated-headers") == ("GatedRepoError", 401)
    assert results["gated-access"]["value"].endswith("config.json")
    for case in ("revision-listing", "revision-snapshot", "revision-file"):
        assert error(case) == ("RevisionNotFoundError", 404), case
    assert "EntryNotFoundError" in results["entry"]["error"] and results["entry"]["status"] == 404


def test_refused_endpoint(tmp_path):
    """No network: connections are refused at once; huggingface_hub raises its transport error, or says that the
    files are not in the cache. (Not hf_hub_download or list_repo_files: 2.x retries those for ~23 s.)"""
    with refused_endpoint() as url:
        started = time.monotonic()
        results = run_calls(
            client_env(url, tmp_path / "hf-home"),
            [["model_info", {"repo_id": REPO}], ["snapshot_download", {"repo_id": REPO}]],
        )
    assert "ConnectError" in results[0]["error"]
    assert "LocalEntryNotFoundError" in results[1]["error"]
    assert time.monotonic() - started < 20


def test_resolve_headers_and_ranges(served):
    """The resolve endpoint's answers as huggingface_hub reads them: commit, ETag and size headers; a redirect for an
    LFS file; byte ranges (206 with Content-Range, the last n bytes, 416 past the end)."""
    folder, files = served
    with FakeHub() as hub:
        commit = hub.serve(REPO, folder)
        connection = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=10)

        def request(method: str, path: str, **headers) -> tuple[int, dict, bytes]:
            connection.request(method, path, headers=headers)
            answer = connection.getresponse()
            return answer.status, dict(answer.getheaders()), answer.read()

        status, headers, _ = request("HEAD", f"/{REPO}/resolve/main/config.json")
        assert status == 200 and headers["X-Repo-Commit"] == commit
        assert headers["Content-Length"] == str(len(files["config.json"])) and headers["ETag"].startswith('"')
        status, headers, _ = request("HEAD", f"/{REPO}/resolve/{commit}/model-00002-of-00002.safetensors")
        sha256 = hashlib.sha256(files["model-00002-of-00002.safetensors"]).hexdigest()
        assert status == 302 and headers["X-Linked-Etag"] == f'"{sha256}"' and headers["X-Repo-Commit"] == commit
        assert headers["X-Linked-Size"] == str(len(files["model-00002-of-00002.safetensors"]))
        assert headers["Location"].startswith(f"{hub.cdn_url}{CDN}{sha256}")
        assert not any(key.lower().startswith("x-xet") for key in headers)
        text = files["sub dir/notes v2.txt"]
        path = f"/{REPO}/resolve/main/sub%20dir/notes%20v2.txt"
        assert request("GET", path, Range="bytes=2-5")[::2] == (206, text[2:6])
        assert request("GET", path, Range="bytes=-3")[::2] == (206, text[-3:])
        status, headers, _ = request("GET", path, Range=f"bytes={len(text)}-")
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(text)}"
        cdn = request("GET", f"{CDN}{sha256}", Range="bytes=0-7")
        assert cdn[0] == 206 and cdn[2] == files["model-00002-of-00002.safetensors"][:8]
        assert request("GET", f"{CDN}{sha256}", Authorization="Bearer x")[0] == 400
        connection.close()
    assert hub.unexpected == []
